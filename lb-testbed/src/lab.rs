//! The fixture lab: one namespace, one veth (`veth0`, the load balancer's NIC), static
//! neighbour entries for the backends, the real XDP object with a fixed configuration.

use std::{collections::HashMap, net::IpAddr};

use lb_common::{
    consts::{
        Counter, DecapCounter, FAMILY_V4, FAMILY_V6, backend_flags, icmp_rate_slots, prog_names,
        vip_flags,
    },
    hash::{Flow, HashMode, addr_words},
    maglev::{self, MaglevBackend, MaglevTable},
    types::{Backend, GlobalConfig, VipAddr, VipKey, VipState, vip_addr_flags},
};
use lb_userspace::dataplane::{Capacities, Dataplane, TestRunOutcome};

use crate::netns::Netns;

pub const SEED: u32 = 0x5eed_1234;
pub const CONNTRACK_SEED: u64 = 0x5eed_c0ff_ee00_1234;
pub const TABLE_SIZE: u32 = 65_537;
pub const ENCAP_SRC4: [u8; 4] = [172, 16, 0, 0];
pub const ENCAP_SRC6: &str = "fd00:ffff::";
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc1];
/// Echo replies per second per CPU in the lab: more than any test sends, but for the one
/// that sets its own.
pub const ICMP_RATE: u32 = 1_000_000;
/// The Vip address whose Vips leave pings to the local stack (`icmp_echo: false`).
pub const NO_ECHO_ADDR: &str = "10.200.0.2";

pub struct LabBackend {
    pub id: u32,
    pub addr: IpAddr,
    pub mac: [u8; 6],
    pub up: bool,
}

pub struct LabVip {
    pub id: u32,
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub flags: u32,
    pub backends: Vec<u32>,
}

pub fn backends() -> Vec<LabBackend> {
    let b = |id: u32, addr: &str, up| LabBackend {
        id,
        addr: addr.parse().unwrap(),
        mac: [0x02, 0, 0, 0, 0xbe, id as u8],
        up,
    };
    vec![
        b(1, "10.111.0.11", true),
        b(2, "10.111.0.12", true),
        b(3, "10.111.0.13", true),
        b(4, "fd00:111::11", true),
        b(5, "fd00:111::12", true),
        b(6, "10.111.0.14", false),
    ]
}

pub const VIP_TCP: u32 = 0; // 10.200.0.1:80/tcp, IPIP, backends 1-3
pub const VIP_UDP: u32 = 1; // 10.200.0.1:53/udp, IPIP, backends 1-3
pub const VIP_ANY_PORT_DSR: u32 = 2; // 10.200.0.2:*/tcp, L2 DSR, backends 1-2
pub const VIP_V6: u32 = 3; // [fd00:200::1]:80/tcp, IPv6-in-IPv6, backends 4-5
pub const VIP_EMPTY_DROP: u32 = 4; // 10.200.0.3:80/tcp, no backend: drop
pub const VIP_EMPTY_PASS: u32 = 5; // 10.200.0.4:80/tcp, no backend: pass
pub const VIP_SOURCE_HASH: u32 = 6; // 10.200.0.5:80/tcp, hash source, backends 1-3
pub const VIP_DPORT_HASH: u32 = 7; // 10.200.0.6:*/udp, hash dport, backends 1-3
pub const VIP_SOURCE_HASH6: u32 = 8; // [fd00:200::2]:80/tcp, hash source, backends 4-5
pub const VIP_FRAGMENTS: u32 = 9; // 10.200.0.7:53/udp, fragments track, backends 1-3
pub const VIP_FRAGMENTS6: u32 = 10; // [fd00:200::3]:53/udp, fragments track, backends 4-5
pub const VIP_MIXED: u32 = 11; // 10.200.0.8:80/tcp, IPv4-in-IPv6, backends 4-5
pub const VIP_MIXED_DSR: u32 = 12; // 10.200.0.9:80/tcp, L2 DSR, backends 4-5

pub fn vips() -> Vec<LabVip> {
    let v = |id, addr: &str, port, proto, flags, backends: &[u32]| LabVip {
        id,
        addr: addr.parse().unwrap(),
        port,
        proto,
        flags: flags | vip_flags::ACTIVE,
        backends: backends.to_vec(),
    };
    vec![
        v(VIP_TCP, "10.200.0.1", 80, 6, 0, &[1, 2, 3]),
        v(VIP_UDP, "10.200.0.1", 53, 17, 0, &[1, 2, 3]),
        v(
            VIP_ANY_PORT_DSR,
            "10.200.0.2",
            0,
            6,
            vip_flags::L2_DSR,
            &[1, 2],
        ),
        v(VIP_V6, "fd00:200::1", 80, 6, vip_flags::IPV6, &[4, 5]),
        v(VIP_EMPTY_DROP, "10.200.0.3", 80, 6, 0, &[]),
        v(
            VIP_EMPTY_PASS,
            "10.200.0.4",
            80,
            6,
            vip_flags::PASS_WHEN_EMPTY,
            &[],
        ),
        v(
            VIP_SOURCE_HASH,
            "10.200.0.5",
            80,
            6,
            vip_flags::HASH_SOURCE,
            &[1, 2, 3],
        ),
        v(
            VIP_DPORT_HASH,
            "10.200.0.6",
            0,
            17,
            vip_flags::HASH_DPORT,
            &[1, 2, 3],
        ),
        v(
            VIP_SOURCE_HASH6,
            "fd00:200::2",
            80,
            6,
            vip_flags::IPV6 | vip_flags::HASH_SOURCE,
            &[4, 5],
        ),
        v(
            VIP_FRAGMENTS,
            "10.200.0.7",
            53,
            17,
            vip_flags::FRAGMENTS_TRACK,
            &[1, 2, 3],
        ),
        v(
            VIP_FRAGMENTS6,
            "fd00:200::3",
            53,
            17,
            vip_flags::IPV6 | vip_flags::FRAGMENTS_TRACK,
            &[4, 5],
        ),
        v(VIP_MIXED, "10.200.0.8", 80, 6, 0, &[4, 5]),
        v(
            VIP_MIXED_DSR,
            "10.200.0.9",
            80,
            6,
            vip_flags::L2_DSR,
            &[4, 5],
        ),
    ]
}

pub struct Lab {
    pub netns: Netns,
    pub dataplane: Dataplane,
    pub ifindex: u32,
    pub lb_mac: [u8; 6],
    pub backends: Vec<LabBackend>,
    pub vips: Vec<LabVip>,
    pub tables: HashMap<u32, MaglevTable>,
    /// The Vips' previous tables (second chance): none unless a test installs them.
    pub prev_tables: HashMap<u32, MaglevTable>,
    /// Loaded from another build's object (`with_object`).
    pub other_object: bool,
}

impl Lab {
    #[expect(
        clippy::new_without_default,
        reason = "loads the XDP object into a new namespace: not a default value"
    )]
    pub fn new() -> Self {
        Self::with_capacities(Capacities {
            max_vips: 16,
            max_backends: 64,
            conntrack_entries: 65_536,
            flow_cache_entries: 8192,
            ..Default::default()
        })
    }

    pub fn with_capacities(capacities: Capacities) -> Self {
        Self::with_object(capacities, None)
    }

    /// The lab on another build's XDP object (`None`: this build's), for the benchmark's
    /// A/B; an older object may lack the maps of newer options, which are then left out.
    pub fn with_object(capacities: Capacities, object: Option<&[u8]>) -> Self {
        let netns = Netns::new("mlb-fx").expect("create namespace");
        netns
            .ip(&[
                "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
            ])
            .unwrap();
        for dev in ["veth0", "veth1"] {
            netns.ip(&["link", "set", dev, "up"]).unwrap();
        }
        netns
            .ip(&["addr", "add", "10.111.0.1/24", "dev", "veth0"])
            .unwrap();
        netns
            .ip(&["addr", "add", "fd00:111::1/64", "dev", "veth0", "nodad"])
            .unwrap();
        let backends = backends();
        for b in &backends {
            let mac = format_mac(&b.mac);
            let addr = b.addr.to_string();
            netns
                .ip(&[
                    "neigh",
                    "replace",
                    &addr,
                    "lladdr",
                    &mac,
                    "dev",
                    "veth0",
                    "nud",
                    "permanent",
                ])
                .unwrap();
        }
        netns
            .enter(|| lb_userspace::dataplane::enable_forwarding("veth0"))
            .unwrap()
            .unwrap();
        let ifindex = netns.ifindex("veth0").unwrap();
        let lb_mac = netns.mac("veth0").unwrap();
        let dataplane = match object {
            None => Dataplane::load(capacities),
            Some(object) => Dataplane::load_object(capacities, object),
        }
        .unwrap_or_else(|e| panic!("{e}"));
        let mut lab = Self {
            netns,
            dataplane,
            ifindex,
            lb_mac,
            backends,
            vips: vips(),
            tables: HashMap::new(),
            prev_tables: HashMap::new(),
            other_object: object.is_some(),
        };
        lab.configure();
        lab
    }

    fn configure(&mut self) {
        // A known connection-table placement, so that tests can reason about buckets.
        self.dataplane.set_conntrack_seed(CONNTRACK_SEED).unwrap();
        let encap6: std::net::Ipv6Addr = ENCAP_SRC6.parse().unwrap();
        self.dataplane
            .set_global(&GlobalConfig {
                hash_seed: SEED,
                fib_generation: 1,
                encap_src4_base: u32::from_be_bytes(ENCAP_SRC4),
                encap_src4_hostmask: 0xFFFF,
                encap_src6_base: addr_words(encap6.into()),
                flow_cache_mask: 0,             // set by Dataplane::set_global
                cache_epoch: 0,                 // set by Dataplane::set_global
                vip_filter: Default::default(), // set by Dataplane::set_vip_filter
            })
            .unwrap();
        for b in &self.backends {
            let mut flags = if b.up { backend_flags::UP } else { 0 };
            if b.addr.is_ipv6() {
                flags |= backend_flags::IPV6;
            }
            self.dataplane
                .set_backend(
                    b.id,
                    &Backend {
                        addr: addr_words(b.addr),
                        flags,
                        generation: 1,
                    },
                )
                .unwrap();
        }
        for slot in [icmp_rate_slots::ECHO, icmp_rate_slots::TOO_BIG] {
            if let Err(e) = self.dataplane.set_icmp_rate(slot, ICMP_RATE) {
                assert!(self.other_object, "{e}");
            }
        }
        let mut addr_flags: HashMap<IpAddr, u32> = HashMap::new();
        let no_echo: IpAddr = NO_ECHO_ADDR.parse().unwrap();
        for v in &self.vips {
            let flags = addr_flags.entry(v.addr).or_default();
            if v.addr != no_echo {
                *flags |= vip_addr_flags::ICMP_ECHO;
            }
            if v.flags & vip_flags::FRAGMENTS_TRACK != 0 {
                *flags |= vip_addr_flags::FRAGMENTS;
            }
            if v.port == 0 {
                *flags |= if v.proto == 6 {
                    vip_addr_flags::ANY_PORT_TCP
                } else {
                    vip_addr_flags::ANY_PORT_UDP
                };
            }
        }
        self.dataplane
            .set_vip_filter(addr_flags.keys().copied())
            .unwrap();
        for (addr, flags) in addr_flags {
            self.dataplane
                .set_vip_addr(addr, Some(VipAddr { flags }))
                .unwrap();
        }
        let vips: Vec<(u32, Vec<u32>)> = self
            .vips
            .iter()
            .map(|v| (v.id, v.backends.clone()))
            .collect();
        for (id, members) in vips {
            self.set_table(id, &members);
        }
        for v in &self.vips {
            let key = vip_key(v.addr, v.port, v.proto);
            self.dataplane
                .set_vip(
                    v.id,
                    &key,
                    &VipState {
                        flags: v.flags,
                        generation: 1,
                    },
                )
                .unwrap();
        }
    }

    /// Adds Vip `vip` (a free id below `max_vips`) to the data plane: its address (ICMP
    /// echo on), the pre-filter, its table and state. For tests of options the shared
    /// fixture Vips leave out.
    pub fn add_vip(&mut self, vip: LabVip) {
        let mut addrs: Vec<IpAddr> = self.vips.iter().map(|v| v.addr).collect();
        addrs.push(vip.addr);
        self.dataplane.set_vip_filter(addrs).unwrap();
        if !self.vips.iter().any(|v| v.addr == vip.addr) {
            self.dataplane
                .set_vip_addr(
                    vip.addr,
                    Some(VipAddr {
                        flags: vip_addr_flags::ICMP_ECHO,
                    }),
                )
                .unwrap();
        }
        self.set_table(vip.id, &vip.backends.clone());
        let key = vip_key(vip.addr, vip.port, vip.proto);
        let state = VipState {
            flags: vip.flags | vip_flags::ACTIVE,
            generation: 1,
        };
        self.dataplane.set_vip(vip.id, &key, &state).unwrap();
        self.vips.push(vip);
    }

    /// Builds and installs Vip `id`'s table from the given backend ids.
    pub fn set_table(&mut self, id: u32, members: &[u32]) {
        let table = self.build_table(members);
        self.dataplane.install_table(id, &table).unwrap();
        self.tables.insert(id, table);
    }

    /// The table of the given backend ids, built as the daemon builds it.
    pub fn build_table(&self, members: &[u32]) -> MaglevTable {
        let members: Vec<MaglevBackend> = members
            .iter()
            .map(|m| {
                let b = self.backend(*m);
                MaglevBackend::new(b.id, b.addr, 1)
            })
            .collect();
        maglev::build(&members, TABLE_SIZE, SEED)
    }

    /// Builds and installs Vip `id`'s previous table (second chance) from the given backend
    /// ids, as if its pool had been `members` before; `None` removes it (expired).
    pub fn set_prev_table(&mut self, id: u32, members: Option<&[u32]>) {
        match members {
            Some(members) => {
                let table = self.build_table(members);
                self.dataplane.install_prev_tables(&[(id, &table)]).unwrap();
                self.prev_tables.insert(id, table);
            }
            None => {
                self.dataplane.remove_prev_table(id).unwrap();
                self.prev_tables.remove(&id);
            }
        }
    }

    /// Marks backend `id` up or down in the data plane, as the daemon does: going down
    /// takes a new generation, voiding the connection entries made while it was up.
    pub fn set_backend_up(&mut self, id: u32, up: bool) {
        let mut backend = self.dataplane.backend(id).unwrap();
        if up {
            backend.flags |= backend_flags::UP;
        } else {
            backend.flags &= !backend_flags::UP;
            backend.generation += 1;
        }
        self.dataplane.set_backend(id, &backend).unwrap();
    }

    pub fn backend(&self, id: u32) -> &LabBackend {
        self.backends
            .iter()
            .find(|b| b.id == id)
            .expect("known backend")
    }

    pub fn backend_by_addr(&self, addr: IpAddr) -> Option<&LabBackend> {
        self.backends.iter().find(|b| b.addr == addr)
    }

    /// The backend id userspace predicts for a new flow to Vip `vip` (under its hash mode).
    pub fn predict(&self, vip: u32, flow: &Flow) -> u32 {
        let flags = self
            .vips
            .iter()
            .find(|v| v.id == vip)
            .expect("known vip")
            .flags;
        self.tables[&vip].lookup(flow.table_hash(HashMode::of(flags), SEED))
    }

    /// Runs `lb_ingress` once on `packet`, as if it arrived on veth0.
    pub fn run(&mut self, packet: &[u8]) -> TestRunOutcome {
        let ifindex = self.ifindex;
        let dataplane = &mut self.dataplane;
        self.netns
            .enter(|| dataplane.test_run(prog_names::LB_INGRESS, packet, ifindex, 1))
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `lb_decap` once on `packet`, as if it arrived on veth0, and the decap counters'
    /// deltas by name.
    pub fn run_decap(&mut self, packet: &[u8]) -> (TestRunOutcome, Vec<(&'static str, u64)>) {
        let before = self.dataplane.decap_counters().unwrap();
        let ifindex = self.ifindex;
        let dataplane = &mut self.dataplane;
        let out = self
            .netns
            .enter(|| dataplane.test_run(prog_names::LB_DECAP, packet, ifindex, 1))
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}"));
        let after = self.dataplane.decap_counters().unwrap();
        let deltas = DecapCounter::ALL
            .iter()
            .filter_map(|c| {
                let d = after[*c as usize] - before[*c as usize];
                (d != 0).then_some((c.name(), d))
            })
            .collect();
        (out, deltas)
    }

    /// Runs `f` inside the lab's namespace with the data plane (for many packets at once).
    pub fn with_dataplane<T: Send>(
        &mut self,
        f: impl FnOnce(&mut Dataplane, u32) -> T + Send,
    ) -> T {
        let ifindex = self.ifindex;
        let dataplane = &mut self.dataplane;
        self.netns.enter(|| f(dataplane, ifindex)).unwrap()
    }

    pub fn counters(&self) -> Vec<u64> {
        self.dataplane.counters().unwrap()
    }
}

pub fn vip_key(addr: IpAddr, port: u16, proto: u8) -> VipKey {
    VipKey {
        addr: addr_words(addr),
        port: port.to_be(),
        proto,
        family: if addr.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 },
    }
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Counter deltas between two snapshots, by name, only the non-zero ones.
pub fn deltas(before: &[u64], after: &[u64]) -> Vec<(&'static str, u64)> {
    Counter::ALL
        .iter()
        .filter_map(|&c| {
            let d = after[c as usize] - before[c as usize];
            (d != 0).then_some((c.name(), d))
        })
        .collect()
}
