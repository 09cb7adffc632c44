//! The real data plane between real hosts: a client, the load balancer (lb_ingress
//! attached in native mode on a veth) and three backends running real TCP and UDP servers,
//! each in its own network namespace. Needs root.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    process::{Child, Stdio},
    time::Duration,
};

use aya::programs::XdpMode;
use lb_common::{
    consts::{Counter, backend_flags, icmp_rate_slots, prog_names, vip_flags},
    hash::{Flow, addr_words},
    maglev::{self, MaglevBackend, MaglevTable},
    types::{Backend, GlobalConfig, VipAddr, VipKey, VipState, vip_addr_flags},
};
use lb_testbed::{
    packets::ip,
    testbed::{NIC, Testbed},
};
use lb_userspace::dataplane::{Capacities, Dataplane, enable_forwarding};

const SEED: u32 = 0xfeed;
const TABLE_SIZE: u32 = 65_537;
const TIMEOUT: Duration = Duration::from_secs(3);

const VIP4: &str = "10.200.0.1";
const VIP_DSR: &str = "10.200.0.2";
const VIP6: &str = "fd00:200::1";
const VIP_TCP: u32 = 0;
const VIP_UDP: u32 = 1;
const VIP_L2: u32 = 2;
const VIP_TCP6: u32 = 3;
const VIP_UDP6: u32 = 4;
/// VIP_DSR:8080/tcp in L2 DSR, served by the backends' IPv6 addresses (mixed families).
const VIP_L2_MIXED: u32 = 5;

/// The testbed with the data plane attached and configured, and servers running.
struct Bed {
    bed: Testbed,
    dataplane: Dataplane,
    tables: BTreeMap<u32, MaglevTable>,
    _servers: Vec<Child>,
}

/// Backend ids: be<i> is id i (IPv4) and id 3+i (IPv6).
fn backend_ids(v6: bool) -> [u32; 3] {
    if v6 { [4, 5, 6] } else { [1, 2, 3] }
}

fn backend_name(id: u32) -> String {
    format!("be{}", (id - 1) % 3 + 1)
}

impl Bed {
    fn new() -> Self {
        let vips = [ip(VIP4), ip(VIP_DSR), ip(VIP6)];
        let bed = Testbed::new(3, &vips).expect("testbed");
        let mut servers = Vec::new();
        let script = lb_testbed::daemon::SCRIPT;
        for (i, b) in bed.backends.iter().enumerate() {
            servers.push(start_server(
                &b.netns,
                script,
                &format!("be{}", i + 1),
                &[VIP4, VIP6],
            ));
        }
        servers.push(start_server(&bed.lb.netns, script, "lb-itself", &[]));

        let mut dataplane = Dataplane::load(Capacities {
            max_vips: 8,
            max_backends: 16,
            conntrack_entries: 65_536,
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
        bed.lb
            .netns
            .enter(|| {
                enable_forwarding(NIC).unwrap();
                dataplane
                    .attach(prog_names::LB_INGRESS, NIC, XdpMode::Driver)
                    .unwrap();
            })
            .unwrap();
        bed.attach_plumbing(&mut dataplane).unwrap();
        bed.resolve_backends()
            .expect("the load balancer reaches every backend");

        let mut this = Self {
            bed,
            dataplane,
            tables: BTreeMap::new(),
            _servers: servers,
        };
        this.configure();
        this
    }

    fn configure(&mut self) {
        self.dataplane
            .set_global(&GlobalConfig {
                hash_seed: SEED,
                fib_generation: 1,
                encap_src4_base: u32::from_be_bytes([172, 16, 0, 0]),
                encap_src4_hostmask: 0xFFFF,
                encap_src6_base: addr_words(ip("fd00:ffff::")),
                flow_cache_mask: 0,             // set by Dataplane::set_global
                cache_epoch: 0,                 // set by Dataplane::set_global
                vip_filter: Default::default(), // set by Dataplane::set_vip_filter
            })
            .unwrap();
        for (i, b) in self.bed.backends.iter().enumerate() {
            let id = i as u32 + 1;
            let up = backend_flags::UP;
            let v4 = Backend {
                addr: addr_words(b.addr4),
                flags: up,
                generation: 1,
            };
            let v6 = Backend {
                addr: addr_words(b.addr6),
                flags: up | backend_flags::IPV6,
                generation: 1,
            };
            self.dataplane.set_backend(id, &v4).unwrap();
            self.dataplane.set_backend(id + 3, &v6).unwrap();
        }
        self.dataplane
            .set_vip_filter([ip(VIP4), ip(VIP_DSR), ip(VIP6)])
            .unwrap();
        // Pings to VIP4 and VIP6 are answered from XDP, to VIP_DSR left to the stack; the
        // UDP Vips track fragments.
        let echo_frags = vip_addr_flags::ICMP_ECHO | vip_addr_flags::FRAGMENTS;
        for (addr, flags) in [(VIP4, echo_frags), (VIP_DSR, 0), (VIP6, echo_frags)] {
            self.dataplane
                .set_vip_addr(ip(addr), Some(VipAddr { flags }))
                .unwrap();
        }
        self.dataplane
            .set_icmp_rate(icmp_rate_slots::ECHO, 100)
            .unwrap();
        let _ = vip_addr_flags::ANY_PORT_TCP;
        let vips = [
            (VIP_TCP, VIP4, 80, 6, 0),
            (VIP_UDP, VIP4, 53, 17, vip_flags::FRAGMENTS_TRACK),
            (VIP_L2, VIP_DSR, 80, 6, vip_flags::L2_DSR),
            (VIP_TCP6, VIP6, 80, 6, vip_flags::IPV6),
            (
                VIP_UDP6,
                VIP6,
                53,
                17,
                vip_flags::IPV6 | vip_flags::FRAGMENTS_TRACK,
            ),
        ];
        for (id, addr, port, proto, flags) in vips {
            let v6 = flags & vip_flags::IPV6 != 0;
            self.set_table(id, &backend_ids(v6));
            let key = VipKey {
                addr: addr_words(ip(addr)),
                port: u16::to_be(port),
                proto,
                family: if v6 { 6 } else { 4 },
            };
            let state = VipState {
                flags: flags | vip_flags::ACTIVE,
                generation: 1,
            };
            self.dataplane.set_vip(id, &key, &state).unwrap();
        }
        // An IPv4 Vip whose pool is the backends' IPv6 addresses: the next hop is found
        // in IPv6, the packet goes unchanged.
        self.set_table(VIP_L2_MIXED, &backend_ids(true));
        let key = VipKey {
            addr: addr_words(ip(VIP_DSR)),
            port: 8080u16.to_be(),
            proto: 6,
            family: 4,
        };
        let state = VipState {
            flags: vip_flags::L2_DSR | vip_flags::ACTIVE,
            generation: 1,
        };
        self.dataplane.set_vip(VIP_L2_MIXED, &key, &state).unwrap();
    }

    fn set_table(&mut self, vip: u32, members: &[u32]) {
        let backends: Vec<MaglevBackend> = members
            .iter()
            .map(|&id| {
                let host = &self.bed.backends[((id - 1) % 3) as usize];
                MaglevBackend::new(id, if id > 3 { host.addr6 } else { host.addr4 }, 1)
            })
            .collect();
        let table = maglev::build(&backends, TABLE_SIZE, SEED);
        self.dataplane.install_table(vip, &table).unwrap();
        self.tables.insert(vip, table);
    }

    /// Which backend userspace predicts for this flow.
    fn predict(&self, vip: u32, flow: &Flow) -> String {
        backend_name(self.tables[&vip].lookup(flow.hash(SEED)))
    }
}

fn start_server(
    netns: &lb_testbed::netns::Netns,
    script: &str,
    name: &str,
    vips: &[&str],
) -> Child {
    let mut child = netns
        .command("python3")
        .args([
            script, "--name", name, "--tcp", "80", "--tcp", "8080", "--udp", "53",
        ])
        .args(vips.iter().flat_map(|v| ["--vip", v]))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start backend server");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "backend server {name} did not start");
    child
}

/// Opens a TCP connection and returns it with the name of the backend that answered.
fn connect(addr: SocketAddr) -> (TcpStream, String, Flow) {
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    let local = stream.local_addr().unwrap();
    let flow = Flow {
        src: local.ip(),
        dst: addr.ip(),
        sport: local.port(),
        dport: addr.port(),
        proto: 6,
    };
    (stream, line.trim().to_owned(), flow)
}

/// Sends a line on `stream`; returns the name of the backend that echoed it.
fn echo(stream: &mut TcpStream, text: &str) -> String {
    writeln!(stream, "{text}").unwrap();
    let mut line = String::new();
    BufReader::new(&*stream).read_line(&mut line).unwrap();
    let (name, rest) = line
        .trim()
        .split_once(' ')
        .unwrap_or_else(|| panic!("reply {line:?}"));
    assert_eq!(rest, text);
    name.to_owned()
}

/// Spread must match the table (exactly, per flow) and the weights (±5 points).
/// Sends `datagrams` UDP datagrams (`payload(i)`), each from a fresh socket (a new flow),
/// to Vip `vip` at `target` from the client; each must come back echoed whole. Which
/// backend answered how many, and how many answers userspace did not predict.
fn udp_spread(
    bed: &Bed,
    vip: u32,
    target: SocketAddr,
    datagrams: u32,
    payload: impl Fn(u32) -> Vec<u8> + Send + Sync,
) -> (BTreeMap<String, u32>, u32) {
    let exchange = |payload: &[u8]| -> std::io::Result<(String, Flow)> {
        let socket = UdpSocket::bind(if target.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        })?;
        socket.set_read_timeout(Some(TIMEOUT))?;
        socket.connect(target)?; // so local_addr() names the source address
        socket.send(payload)?;
        let mut buf = vec![0u8; 8192];
        let n = socket.recv(&mut buf)?;
        let reply = &buf[..n];
        let space = reply.iter().position(|&b| b == b' ').unwrap_or(n);
        if reply.get(space + 1..) != Some(payload) {
            return Err(std::io::Error::other(
                "the reply is not the datagram echoed whole",
            ));
        }
        let local = socket.local_addr()?;
        let flow = Flow {
            src: local.ip(),
            dst: target.ip(),
            sport: local.port(),
            dport: target.port(),
            proto: 17,
        };
        Ok((String::from_utf8_lossy(&reply[..space]).into_owned(), flow))
    };
    bed.bed
        .client
        .netns
        .enter(|| {
            let mut got = BTreeMap::<String, u32>::new();
            let mut mispredicted = 0;
            for i in 0..datagrams {
                let (name, flow) = exchange(&payload(i)).unwrap_or_else(|e| {
                    let counters: Vec<(&str, u64)> = Counter::ALL
                        .iter()
                        .map(|&c| (c.name(), bed.dataplane.counter(c).unwrap()))
                        .filter(|(_, v)| *v != 0)
                        .collect();
                    panic!("UDP datagram {i} to {target}: {e}; counters {counters:?}")
                });
                mispredicted += u32::from(name != bed.predict(vip, &flow));
                *got.entry(name).or_default() += 1;
            }
            (got, mispredicted)
        })
        .unwrap()
}

fn check_spread(label: &str, got: &BTreeMap<String, u32>, flows: u32, mispredicted: u32) {
    assert_eq!(
        mispredicted, 0,
        "{label}: {mispredicted} flows went elsewhere than predicted"
    );
    assert_eq!(got.len(), 3, "{label}: every backend gets flows: {got:?}");
    for (name, n) in got {
        let share = *n as f64 / flows as f64;
        assert!(
            (share - 1.0 / 3.0).abs() <= 0.05,
            "{label}: {name} got {share:.3} of flows: {got:?}"
        );
    }
}

/// Flows per spread check.
const FLOWS: u32 = 3000;

#[test]
fn flows_spread_over_backends_exactly_as_predicted_in_both_modes() {
    let bed = Bed::new();
    // The 3,000 flows per case: with fewer, a fair spread strays past ±5 points by
    // chance (600 flows: σ ≈ 1.9 points, a flake in a few percent of runs).
    let cases = [
        (VIP_TCP, VIP4, FLOWS),
        (VIP_L2, VIP_DSR, FLOWS),
        (VIP_TCP6, VIP6, FLOWS),
    ];
    for (vip, addr, flows) in cases {
        let target = SocketAddr::new(ip(addr), 80);
        let (got, mispredicted) = bed
            .bed
            .client
            .netns
            .enter(|| {
                let mut got = BTreeMap::<String, u32>::new();
                let mut mispredicted = 0;
                for _ in 0..flows {
                    let (_stream, name, flow) = connect(target);
                    if name != bed.predict(vip, &flow) {
                        mispredicted += 1;
                    }
                    *got.entry(name).or_default() += 1;
                }
                (got, mispredicted)
            })
            .unwrap();
        check_spread(&format!("TCP to {target}"), &got, flows, mispredicted);
    }

    // UDP: each datagram from a fresh socket is a new flow.
    let (got, mispredicted) =
        udp_spread(&bed, VIP_UDP, SocketAddr::new(ip(VIP4), 53), FLOWS, |i| {
            format!("q{i}").into_bytes()
        });
    check_spread("UDP", &got, FLOWS, mispredicted);
}

#[test]
fn long_lived_connection_stays_on_its_backend_while_the_table_changes() {
    let mut bed = Bed::new();
    let target = SocketAddr::new(ip(VIP4), 80);
    let client = &bed.bed.client.netns;
    let (mut stream, first, _) = client.enter(|| connect(target)).unwrap();
    let first_id: u32 = first[2..].parse().unwrap();
    let other = backend_ids(false)
        .into_iter()
        .find(|&b| b != first_id)
        .unwrap();

    // Table without another backend, then without the connection's own backend: the
    // connection keeps its backend (still up) and nothing breaks.
    let without_other: Vec<u32> = backend_ids(false)
        .into_iter()
        .filter(|&b| b != other)
        .collect();
    let without_first: Vec<u32> = backend_ids(false)
        .into_iter()
        .filter(|&b| b != first_id)
        .collect();
    for (step, members) in [
        without_other.clone(),
        without_first,
        backend_ids(false).to_vec(),
    ]
    .iter()
    .enumerate()
    {
        bed.set_table(VIP_TCP, members);
        let client = &bed.bed.client.netns;
        for i in 0..20 {
            let name = client
                .enter(|| echo(&mut stream, &format!("step{step}-msg{i}")))
                .unwrap();
            assert_eq!(
                name, first,
                "the connection moved after table change {step}"
            );
        }
        // New flows follow the new table.
        let new_flows: Vec<String> = client
            .enter(|| (0..60).map(|_| connect(target).1).collect())
            .unwrap();
        for name in &new_flows {
            let id: u32 = name[2..].parse().unwrap();
            assert!(
                members.contains(&id),
                "a new flow went to {name}, not in table {members:?}"
            );
        }
    }
}

#[test]
fn traffic_not_for_a_vip_still_works() {
    let bed = Bed::new();
    let lb4 = bed.bed.lb.addr4;
    let lb6 = bed.bed.lb.addr6;
    for addr in [lb4, lb6] {
        bed.bed
            .client
            .netns
            .exec("ping", &["-c2", "-W2", "-q", &addr.to_string()])
            .expect("ping the load balancer");
    }
    // A TCP service on the load balancer's own address passes through XDP untouched.
    for addr in [lb4, lb6] {
        let (mut stream, name, _) = bed
            .bed
            .client
            .netns
            .enter(|| connect(SocketAddr::new(addr, 8080)))
            .unwrap();
        assert_eq!(name, "lb-itself");
        let echoed = bed
            .bed
            .client
            .netns
            .enter(|| echo(&mut stream, "hi"))
            .unwrap();
        assert_eq!(echoed, "lb-itself");
    }
    let passed = bed
        .dataplane
        .counter(lb_common::consts::Counter::PassNotVip)
        .unwrap();
    assert!(
        passed > 0,
        "the XDP program saw the non-Vip traffic and passed it"
    );
}

#[test]
fn pings_to_a_vip_are_answered_by_the_load_balancer_from_xdp() {
    let bed = Bed::new();
    let client = &bed.bed.client.netns;
    let replies = || bed.dataplane.counter(Counter::IcmpEchoReply).unwrap();
    let before = replies();
    for vip in [VIP4, VIP6] {
        let out = client
            .command("ping")
            .args(["-c3", "-i0.2", "-W2", vip])
            .output()
            .unwrap_or_else(|e| panic!("ping {vip}: {e}"));
        let out = String::from_utf8_lossy(&out.stdout);
        // From the Vip, with the load balancer's TTL: no backend saw the request.
        assert_eq!(
            out.lines()
                .filter(|l| l.contains(&format!("from {vip}")) && l.contains("ttl=64"))
                .count(),
            3,
            "{out}"
        );
    }
    assert_eq!(replies() - before, 6, "every reply came from XDP");
    // The address whose Vips leave pings to the stack: not answered by XDP.
    let passed = bed.dataplane.counter(Counter::PassVipOther).unwrap();
    let _ = client.exec("ping", &["-c1", "-W1", VIP_DSR]);
    assert_eq!(replies() - before, 6);
    assert!(bed.dataplane.counter(Counter::PassVipOther).unwrap() > passed);
}

#[test]
fn fragmented_udp_datagrams_reach_one_backend_whole() {
    let bed = Bed::new();
    let tracked = || bed.dataplane.counter(Counter::FragmentTracked).unwrap();
    let before = tracked();
    const DATAGRAMS: u32 = 12;
    // The backends' replies (as large) must fit the client's 1,500-byte link, not the
    // segment's 1,600: their kernels fragment to the route's MTU.
    let client = &bed.bed.client;
    for b in &bed.bed.backends {
        for (addr, len) in [(client.addr4, 32), (client.addr6, 128)] {
            let to = format!("{addr}/{len}");
            b.netns
                .ip(&["route", "replace", &to, "dev", NIC, "mtu", "1500"])
                .unwrap();
        }
    }
    for (vip, id) in [(VIP4, VIP_UDP), (VIP6, VIP_UDP6)] {
        // 3,000 bytes over the client's 1,500-byte MTU: its kernel sends three fragments,
        // and the backend's kernel must put them back together (the backend echoes it).
        let (got, mispredicted) =
            udp_spread(&bed, id, SocketAddr::new(ip(vip), 53), DATAGRAMS, |i| {
                (0..3000u32)
                    .map(|b| b"0123456789"[(b % 10) as usize] ^ (i as u8 & 1))
                    .collect()
            });
        assert_eq!(mispredicted, 0, "{vip}: {got:?}");
        assert!(got.len() > 1, "{vip}: the datagrams spread, {got:?}");
    }
    // Three fragments per datagram, each steered by its datagram's ports.
    assert_eq!(tracked() - before, 2 * 3 * u64::from(DATAGRAMS));
}

#[test]
fn an_ipv4_vip_in_l2_dsr_is_served_by_ipv6_backends() {
    let bed = Bed::new();
    let target = SocketAddr::new(ip(VIP_DSR), 8080);
    let (got, mispredicted) = bed
        .bed
        .client
        .netns
        .enter(|| {
            let mut got = BTreeMap::<String, u32>::new();
            let mut mispredicted = 0;
            for _ in 0..30 {
                let (mut stream, name, flow) = connect(target);
                assert_eq!(
                    echo(&mut stream, "hi"),
                    name,
                    "the connection works both ways"
                );
                if name != bed.predict(VIP_L2_MIXED, &flow) {
                    mispredicted += 1;
                }
                *got.entry(name).or_default() += 1;
            }
            (got, mispredicted)
        })
        .unwrap();
    assert_eq!(mispredicted, 0, "{got:?}");
    assert_eq!(got.len(), 3, "every IPv6 backend serves: {got:?}");
}
