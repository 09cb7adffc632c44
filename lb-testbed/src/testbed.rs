//! A load balancer in front of real backends, all in network namespaces this process
//! creates: for the network tests, the benchmarks and the demo.
//!
//! ```text
//!   client ──┐            (bridge br0 in namespace "sw")
//!   lb ──────┼── br0      lb: the load balancer's NIC, XDP attached here
//!   be1..N ──┘            backends: Vips on lo, lb_decap on their NIC
//! ```
//! One L2 segment, 10.100.0.0/24 and fd00:100::/64; the client routes the Vip prefixes
//! via the load balancer; backends answer the client directly (direct server return).

use std::{io, net::IpAddr, path::Path};

use aya::programs::XdpMode;
use lb_common::consts::prog_names;

use lb_userspace::{dataplane::Dataplane, state};

use crate::netns::Netns;

pub const SUBNET4: &str = "10.100.0";
pub const SUBNET6: &str = "fd00:100:";
/// Vip prefixes the client routes through the load balancer.
pub const VIP_PREFIX4: &str = "10.200.0.0/24";
pub const VIP_PREFIX6: &str = "fd00:200::/64";
/// Frames grow by the outer header (20 or 40 bytes): the segment carries them, the
/// client's own MTU stays at 1500.
pub const SEGMENT_MTU: &str = "1600";

/// A host on the segment: its namespace, NIC name inside it, and addresses.
pub struct Host {
    pub netns: Netns,
    pub name: String,
    pub addr4: IpAddr,
    pub addr6: IpAddr,
}

pub struct Testbed {
    /// Holds the bridge; the other hosts' veth peers are its ports, named `p-<host>`.
    pub switch: Netns,
    pub client: Host,
    pub lb: Host,
    pub backends: Vec<Host>,
}

/// The NIC name inside every host namespace.
pub const NIC: &str = "eth0";

impl Testbed {
    /// Builds the segment with `backends` backends serving `vips` (addresses put on their
    /// loopback so they accept the client's packets).
    pub fn new(backends: usize, vips: &[IpAddr]) -> io::Result<Self> {
        let switch = Netns::new("mlb-sw")?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "mtu", SEGMENT_MTU, "up"])?;
        let client = host(&switch, "client", 2, "1500")?;
        let lb = host(&switch, "lb", 1, SEGMENT_MTU)?;
        let backends = (0..backends)
            .map(|i| host(&switch, &format!("be{}", i + 1), 11 + i as u8, SEGMENT_MTU))
            .collect::<io::Result<Vec<_>>>()?;

        // The client reaches Vips through the load balancer; XDP-touched packets lose the
        // veth checksum offload state, so the client computes checksums itself.
        client
            .netns
            .ip(&["route", "add", VIP_PREFIX4, "via", &lb.addr4.to_string()])?;
        client.netns.ip(&[
            "-6",
            "route",
            "add",
            VIP_PREFIX6,
            "via",
            &lb.addr6.to_string(),
        ])?;
        client.netns.exec("ethtool", &["-K", NIC, "tx", "off"])?;
        for b in &backends {
            for vip in vips {
                let (addr, len) = if vip.is_ipv4() {
                    (vip.to_string(), 32)
                } else {
                    (vip.to_string(), 128)
                };
                b.netns
                    .ip(&["addr", "add", &format!("{addr}/{len}"), "dev", "lo"])?;
            }
            // Never answer ARP for the Vips on lo; accept decapsulated packets whatever
            // their source path.
            for (key, value) in [
                ("net.ipv4.conf.all.arp_ignore", "1"),
                ("net.ipv4.conf.all.arp_announce", "2"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.eth0.rp_filter", "0"),
                ("net.ipv4.conf.lo.rp_filter", "0"),
            ] {
                b.netns
                    .exec("sysctl", &["-qw", &format!("{key}={value}")])?;
            }
        }
        Ok(Self {
            switch,
            client,
            lb,
            backends,
        })
    }

    /// The bridge port facing `host` (XDP_TX out of a veth needs a program on this peer).
    pub fn switch_port(&self, host: &Host) -> String {
        format!("p-{}", host.name)
    }

    /// Attaches, from `dataplane`'s object, what the segment itself needs besides the load
    /// balancer: `lb_pass` on the switch port facing the load balancer (XDP_TX out of a
    /// veth needs a program on its peer) and `lb_decap` on every backend (IPIP).
    pub fn attach_plumbing(&self, dataplane: &mut Dataplane) -> io::Result<()> {
        let attach = |dataplane: &mut Dataplane, netns: &Netns, program, dev: &str| {
            netns
                .enter(|| dataplane.attach(program, dev, XdpMode::Driver).map(|_| ()))?
                .map_err(io::Error::other)
        };
        attach(
            dataplane,
            &self.switch,
            prog_names::LB_PASS,
            &self.switch_port(&self.lb),
        )?;
        for b in &self.backends {
            backend_decap(dataplane, &self.switch, b)?;
        }
        Ok(())
    }

    /// Makes the load balancer resolve every backend's MAC (its next hops), as health
    /// checks do in production.
    pub fn resolve_backends(&self) -> io::Result<()> {
        for b in &self.backends {
            for addr in [b.addr4, b.addr6] {
                self.lb
                    .netns
                    .exec("ping", &["-c1", "-W1", "-q", &addr.to_string()])?;
            }
        }
        Ok(())
    }
}

/// Creates a host namespace with its NIC on the switch's bridge at `SUBNET.last`.
pub fn host(switch: &Netns, name: &str, last: u8, mtu: &str) -> io::Result<Host> {
    let netns = Netns::new(&format!("mlb-{name}"))?;
    let host = Host {
        netns,
        name: name.to_owned(),
        addr4: format!("{SUBNET4}.{last}").parse().expect("valid"),
        addr6: format!("{SUBNET6}:{last:x}").parse().expect("valid"),
    };
    plug(switch, &host, mtu)?;
    Ok(host)
}

/// What a backend runs, from `dataplane`'s object: `lb_decap` on its NIC, accepting
/// encapsulated packets from the load balancers' default source prefixes only; `lb_pass` on
/// its switch port (second chance sends chained packets on with XDP_TX, which out of a veth
/// needs a program on the peer); forwarding on its NIC (`bpf_fib_lookup` answers only
/// there, and the kernel forwards what it cannot).
pub fn backend_decap(dataplane: &mut Dataplane, switch: &Netns, backend: &Host) -> io::Result<()> {
    let attach = |dataplane: &mut Dataplane, netns: &Netns, program, dev: &str| {
        netns
            .enter(|| dataplane.attach(program, dev, XdpMode::Driver).map(|_| ()))?
            .map_err(io::Error::other)
    };
    attach(dataplane, &backend.netns, prog_names::LB_DECAP, NIC)?;
    attach(
        dataplane,
        switch,
        prog_names::LB_PASS,
        &format!("p-{}", backend.name),
    )?;
    backend
        .netns
        .enter(|| lb_userspace::dataplane::enable_forwarding(NIC))??;
    let (v4, len4) = lb_userspace::config::DEFAULT_ENCAP_SOURCE_V4;
    let (v6, len6) = lb_userspace::config::DEFAULT_ENCAP_SOURCE_V6;
    dataplane
        .set_decap_sources(&[(v4.into(), len4), (v6.into(), len6)])
        .map_err(io::Error::other)?;
    // GUE on the default port too (the load balancer's own writes, when it shares this
    // object, say the same).
    dataplane
        .set_tunnel(&lb_common::types::TunnelConfig {
            gue_port: lb_common::consts::DEFAULT_GUE_PORT.to_be(),
            ..Default::default()
        })
        .map_err(io::Error::other)
}

/// (Re)creates `host`'s NIC: a veth whose peer `p-<name>` is a port of the switch's
/// bridge, up with `host`'s addresses.
pub fn plug(switch: &Netns, host: &Host, mtu: &str) -> io::Result<()> {
    let port = format!("p-{}", host.name);
    let netns = &host.netns;
    switch.ip(&[
        "link",
        "add",
        &port,
        "type",
        "veth",
        "peer",
        "name",
        NIC,
        "netns",
        netns.name(),
    ])?;
    switch.ip(&["link", "set", &port, "master", "br0", "mtu", mtu, "up"])?;
    netns.ip(&["link", "set", NIC, "mtu", mtu, "up"])?;
    netns.ip(&["addr", "add", &format!("{}/24", host.addr4), "dev", NIC])?;
    netns.ip(&[
        "addr",
        "add",
        &format!("{}/64", host.addr6),
        "dev",
        NIC,
        "nodad",
    ])
}

/// Removes everything a daemon pinned under `pin_dir` leaves on the host, also when it was
/// killed: the pins, and its files under [`state::RUN_DIR`] and [`state::LIB_DIR`] (state,
/// control socket, maintenance flag, lock: every `<pin dir name>.*`).
pub fn remove_daemon_files(pin_dir: &Path) {
    let _ = std::fs::remove_dir_all(pin_dir);
    let Some(name) = pin_dir.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    let prefix = format!("{name}.");
    for dir in [state::RUN_DIR, state::LIB_DIR] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix))
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}
