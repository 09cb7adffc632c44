//! Second chance on the real XDP object, by BPF_PROG_TEST_RUN: what `lb_ingress` sends
//! when a Vip has a previous table (exact bytes, counters), and what `lb_decap` does with
//! what it receives (deliver, send on, drop). Needs root.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, TcpListener, TcpStream},
};

use lb_common::{
    consts::{PROTO_TCP, PROTO_UDP},
    hash::Flow,
    maglev::{self, MaglevBackend, MaglevTable},
};
use lb_testbed::{
    lab::{
        CLIENT_MAC, ENCAP_SRC4, ENCAP_SRC6, Lab, SEED, TABLE_SIZE, VIP_ANY_PORT_DSR, VIP_MIXED,
        VIP_SOURCE_HASH, VIP_TCP, VIP_UDP, VIP_V6, deltas,
    },
    packets::*,
};
use lb_userspace::dataplane::TestRunOutcome;

const CLIENT: &str = "10.50.0.7";
const CLIENT6: &str = "fd00:50::7";

/// The table of `members` (backend ids of the lab), built as the daemon builds it.
fn table(lab: &Lab, members: &[u32]) -> MaglevTable {
    let members: Vec<MaglevBackend> = members
        .iter()
        .map(|id| MaglevBackend::new(*id, lab.backend(*id).addr, 1))
        .collect();
    maglev::build(&members, TABLE_SIZE, SEED)
}

#[expect(
    clippy::too_many_arguments,
    reason = "a flow's fields, spelled out at each call"
)]
/// A source port from `dst:dport` whose flow the current table and `previous` send to
/// different backends (`moved`) or to the same one.
fn port_where(
    lab: &Lab,
    vip: u32,
    previous: &MaglevTable,
    src: &str,
    dst: &str,
    dport: u16,
    proto: u8,
    moved: bool,
) -> (u16, Flow) {
    (1024..u16::MAX)
        .map(|sport| {
            let flow = Flow {
                src: ip(src),
                dst: ip(dst),
                sport,
                dport,
                proto,
            };
            (sport, flow)
        })
        .find(|(_, flow)| {
            let hash = flow.hash(SEED);
            (lab.tables[&vip].lookup(hash) != previous.lookup(hash)) == moved
        })
        .expect("a port")
}

/// A backend's MAC and address, copied out of the lab.
#[derive(Clone, Copy)]
struct Hop {
    mac: [u8; 6],
    addr: IpAddr,
}

fn hop(lab: &Lab, id: u32) -> Hop {
    let b = lab.backend(id);
    Hop {
        mac: b.mac,
        addr: b.addr,
    }
}

fn run(lab: &mut Lab, packet: &[u8]) -> (TestRunOutcome, Vec<(&'static str, u64)>) {
    let before = lab.counters();
    let out = lab.run(packet);
    let mut d = deltas(&before, &lab.counters());
    d.sort();
    (out, d)
}

fn counters(names: &[&'static str]) -> Vec<(&'static str, u64)> {
    let mut c: Vec<_> = names.iter().map(|n| (*n, 1)).collect();
    c.sort();
    c
}

fn v4(addr: IpAddr) -> [u8; 4] {
    match addr {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(_) => panic!("v4"),
    }
}

fn v6(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(_) => panic!("v6"),
    }
}

#[test]
fn a_moved_non_syn_tcp_packet_goes_to_its_backend_with_the_previous_one_attached() {
    let mut lab = Lab::new();
    // The Vip had backends 1 and 2; 3 was added.
    let previous = table(&lab, &[1, 2]);
    lab.dataplane
        .install_prev_tables(&[(VIP_TCP, &previous)])
        .unwrap();
    let (sport, flow) = port_where(
        &lab,
        VIP_TCP,
        &previous,
        CLIENT,
        "10.200.0.1",
        80,
        PROTO_TCP,
        true,
    );
    let hash = flow.hash(SEED);
    let (now, before) = (lab.tables[&VIP_TCP].lookup(hash), previous.lookup(hash));
    let input = tcp(lab.lb_mac, ip(CLIENT), sport, ip("10.200.0.1"), 80, false);
    let src = encap_src4(ENCAP_SRC4, hash);
    let (cur, prev) = (hop(&lab, now), hop(&lab, before));
    // Inside: to the previous backend; outside: to the current one, at its MAC.
    let middle = expect_ipip(&input, lab.lb_mac, cur.mac, src, v4(prev.addr));
    let want = expect_ipip(&middle, lab.lb_mac, cur.mac, src, v4(cur.addr));
    let chained = counters(&[
        "conntrack_miss",
        "conntrack_miss_non_syn",
        "second_chance",
        "tx",
    ]);
    for round in 1..=2 {
        let (out, got) = run(&mut lab, &input);
        assert_eq!(out.action, XDP_TX, "round {round}");
        assert_eq!(out.packet, want, "round {round}: double IPIP, exact bytes");
        // No connection-table entry and no cache: the next packet is chained again.
        assert_eq!(got, chained, "round {round}");
    }
    assert_eq!(
        lab.dataplane.chained(true, 16).unwrap()[VIP_TCP as usize],
        2
    );
    assert_eq!(
        lab.dataplane.chained(false, 64).unwrap()[before as usize],
        2
    );

    // A SYN starts a new connection: straight to the current backend, never chained.
    let syn = tcp(lab.lb_mac, ip(CLIENT), sport, ip("10.200.0.1"), 80, true);
    let (out, got) = run(&mut lab, &syn);
    assert_eq!(
        out.packet,
        expect_ipip(&syn, lab.lb_mac, cur.mac, src, v4(cur.addr))
    );
    assert_eq!(got, counters(&["conntrack_miss", "tx"]));

    // Its next packet hits the connection entry the SYN made: not chained either.
    let (out, got) = run(&mut lab, &input);
    assert_eq!(
        out.packet,
        expect_ipip(&input, lab.lb_mac, cur.mac, src, v4(cur.addr))
    );
    assert_eq!(got, counters(&["conntrack_hit", "tx"]));
}

/// Chained headers are of the Vip's family, so an IPv4 Vip's IPv6 backend (IPv4-in-IPv6)
/// is never chained: a moved flow goes to it alone, as without second chance. Found by the
/// differential fuzzer: it went out as IPv4 to the first 32 bits of the IPv6 address.
#[test]
fn a_moved_flow_to_an_ipv4_vips_ipv6_backend_is_not_chained() {
    let mut lab = Lab::new();
    // The Vip's pool was IPv4 backends 1 and 2; it is IPv6 backends 4 and 5 now.
    let previous = table(&lab, &[1, 2]);
    lab.dataplane
        .install_prev_tables(&[(VIP_MIXED, &previous)])
        .unwrap();
    let (sport, flow) = port_where(
        &lab,
        VIP_MIXED,
        &previous,
        CLIENT,
        "10.200.0.8",
        80,
        PROTO_TCP,
        true,
    );
    let input = tcp(lab.lb_mac, ip(CLIENT), sport, ip("10.200.0.8"), 80, false);
    let hash = flow.hash(SEED);
    let cur = hop(&lab, lab.predict(VIP_MIXED, &flow));
    let src = encap_src6(ENCAP_SRC6.parse().unwrap(), hash);
    let want = expect_4in6(&input, 14, lab.lb_mac, cur.mac, src, v6(cur.addr), hash);
    let (out, got) = run(&mut lab, &input);
    assert_eq!(out.action, XDP_TX);
    assert_eq!(
        out.packet, want,
        "IPv4-in-IPv6 to the current backend alone"
    );
    assert_eq!(
        got,
        counters(&["conntrack_miss", "conntrack_miss_non_syn", "tx"])
    );
}

#[test]
fn only_moved_tcp_flows_of_encapsulating_vips_with_an_up_previous_backend_are_chained() {
    let mut lab = Lab::new();
    let previous = table(&lab, &[1, 2]);
    let previous_dsr = table(&lab, &[1]);
    let previous_v6 = table(&lab, &[4]);
    lab.dataplane
        .install_prev_tables(&[
            (VIP_TCP, &previous),
            (VIP_UDP, &previous),
            (VIP_ANY_PORT_DSR, &previous_dsr),
            (VIP_V6, &previous_v6),
        ])
        .unwrap();
    let plain = counters(&["conntrack_miss", "conntrack_miss_non_syn", "tx"]);

    // A flow whose slot did not move: plain IPIP.
    let (sport, flow) = port_where(
        &lab,
        VIP_TCP,
        &previous,
        CLIENT,
        "10.200.0.1",
        80,
        PROTO_TCP,
        false,
    );
    let input = tcp(lab.lb_mac, ip(CLIENT), sport, ip("10.200.0.1"), 80, false);
    let b = hop(&lab, lab.predict(VIP_TCP, &flow));
    let src = encap_src4(ENCAP_SRC4, flow.hash(SEED));
    let (out, got) = run(&mut lab, &input);
    assert_eq!(
        out.packet,
        expect_ipip(&input, lab.lb_mac, b.mac, src, v4(b.addr))
    );
    assert_eq!(got, plain, "unmoved");

    // UDP is never chained: no connection state for a backend to look up.
    let (sport, flow) = port_where(
        &lab,
        VIP_UDP,
        &previous,
        CLIENT,
        "10.200.0.1",
        53,
        PROTO_UDP,
        true,
    );
    let input = udp(lab.lb_mac, ip(CLIENT), sport, ip("10.200.0.1"), 53);
    let b = hop(&lab, lab.predict(VIP_UDP, &flow));
    let src = encap_src4(ENCAP_SRC4, flow.hash(SEED));
    let (out, got) = run(&mut lab, &input);
    assert_eq!(
        out.packet,
        expect_ipip(&input, lab.lb_mac, b.mac, src, v4(b.addr))
    );
    assert_eq!(got, counters(&["conntrack_miss", "tx"]), "udp");

    // L2 DSR has no header to carry a previous hop: the MACs are rewritten, as without.
    let (sport, flow) = port_where(
        &lab,
        VIP_ANY_PORT_DSR,
        &previous_dsr,
        CLIENT,
        "10.200.0.2",
        8080,
        PROTO_TCP,
        true,
    );
    let input = tcp(lab.lb_mac, ip(CLIENT), sport, ip("10.200.0.2"), 8080, false);
    let b = hop(&lab, lab.predict(VIP_ANY_PORT_DSR, &flow));
    let (out, got) = run(&mut lab, &input);
    assert_eq!(out.packet, expect_l2(&input, lab.lb_mac, b.mac));
    assert_eq!(got, plain, "l2 dsr");

    // IPv6: IPv6-in-IPv6 twice.
    let (sport, flow) = port_where(
        &lab,
        VIP_V6,
        &previous_v6,
        CLIENT6,
        "fd00:200::1",
        80,
        PROTO_TCP,
        true,
    );
    let input = tcp(lab.lb_mac, ip(CLIENT6), sport, ip("fd00:200::1"), 80, false);
    let hash = flow.hash(SEED);
    let cur = hop(&lab, lab.predict(VIP_V6, &flow));
    let prev = hop(&lab, previous_v6.lookup(hash));
    let src = encap_src6(ENCAP_SRC6.parse().unwrap(), hash);
    let middle = expect_ip6ip6(&input, lab.lb_mac, cur.mac, src, v6(prev.addr), hash);
    let want = expect_ip6ip6(&middle, lab.lb_mac, cur.mac, src, v6(cur.addr), hash);
    let (out, got) = run(&mut lab, &input);
    assert_eq!(out.packet, want, "ipv6 chained");
    assert_eq!(
        got,
        counters(&[
            "conntrack_miss",
            "conntrack_miss_non_syn",
            "second_chance",
            "tx"
        ])
    );

    // A previous backend that is down is not worth a hop.
    let (sport, flow) = port_where(
        &lab,
        VIP_TCP,
        &previous,
        CLIENT,
        "10.200.0.1",
        80,
        PROTO_TCP,
        true,
    );
    let before = previous.lookup(flow.hash(SEED));
    lab.set_backend_up(before, false);
    let input = tcp(lab.lb_mac, ip(CLIENT), sport, ip("10.200.0.1"), 80, false);
    let (_, got) = run(&mut lab, &input);
    assert_eq!(got, plain, "previous backend down");
    lab.set_backend_up(before, true);

    // The previous table expired (removed by the daemon): nothing is chained.
    lab.dataplane.remove_prev_table(VIP_TCP).unwrap();
    assert_eq!(lab.dataplane.prev_table(VIP_TCP).unwrap(), None);
    let (sport, _) = port_where(
        &lab,
        VIP_TCP,
        &previous,
        "10.50.0.8",
        "10.200.0.1",
        80,
        PROTO_TCP,
        true,
    );
    let input = tcp(
        lab.lb_mac,
        ip("10.50.0.8"),
        sport,
        ip("10.200.0.1"),
        80,
        false,
    );
    let (_, got) = run(&mut lab, &input);
    assert_eq!(got, plain, "expired");
}

/// `inner` (an Ethernet frame) inside IPIP from `src` to `dst`, at the backend's MAC.
fn wrap4(inner: &[u8], src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    expect_ipip(inner, CLIENT_MAC, [0x02, 0, 0, 0, 0, 0xbb], src, dst)
}

fn wrap6(inner: &[u8], src: [u8; 16], dst: [u8; 16]) -> Vec<u8> {
    expect_ip6ip6(inner, CLIENT_MAC, [0x02, 0, 0, 0, 0, 0xbb], src, dst, 7)
}

/// What the kernel gets after decapsulation: `inner`'s IP packet behind the frame's own
/// (outer) MACs.
fn delivered(frame: &[u8], inner: &[u8]) -> Vec<u8> {
    let mut out = frame[..14].to_vec();
    out.extend_from_slice(&inner[14..]);
    out
}

#[test]
fn lb_decap_delivers_sends_on_or_drops() {
    let mut lab = Lab::new();
    lab.dataplane
        .set_decap_sources(&[(ip("172.16.0.0"), 16), (ip("fd00:ffff::"), 96)])
        .unwrap();
    // This "backend" (the lab's namespace, 10.111.0.1) has a connection on port 8080.
    let listener = lab
        .netns
        .enter(|| TcpListener::bind("10.111.0.1:8080"))
        .unwrap()
        .unwrap();
    let mut client = lab
        .netns
        .enter(|| TcpStream::connect("10.111.0.1:8080"))
        .unwrap()
        .unwrap();
    let (mut server, peer) = listener.accept().unwrap();
    client.write_all(b"x").unwrap();
    let mut byte = [0; 1];
    server.read_exact(&mut byte).unwrap();
    let (IpAddr::V4(peer_ip), peer_port) = (peer.ip(), peer.port()) else {
        panic!("v4 peer")
    };

    let lb = [172, 16, 0, 9];
    let (prev_mac, prev_addr) = (lab.backend(2).mac, v4(lab.backend(2).addr));
    let lb_mac = lab.lb_mac;
    let me = [10, 111, 0, 1];
    let inner_of = |sport: u16, dport: u16, syn: bool| {
        tcp(
            lb_mac,
            IpAddr::V4(peer_ip),
            sport,
            ip("10.111.0.1"),
            dport,
            syn,
        )
    };
    let chained = |inner: &[u8]| wrap4(&wrap4(inner, lb, prev_addr), lb, me);

    // Plain IPIP from a load balancer: delivered.
    let inner = inner_of(peer_port, 8080, false);
    let frame = wrap4(&inner, lb, me);
    let (out, got) = lab.run_decap(&frame);
    assert_eq!(
        (out.action, out.packet),
        (XDP_PASS, delivered(&frame, &inner))
    );
    assert_eq!(got, [("delivered", 1)]);

    // From anyone else: dropped, never reaches a socket.
    for spoofed in [
        wrap4(&inner, [10, 9, 9, 9], me),
        wrap4(&wrap4(&inner, [10, 9, 9, 9], prev_addr), lb, me),
    ] {
        let (out, got) = lab.run_decap(&spoofed);
        assert_eq!(out.action, XDP_DROP);
        assert_eq!(got, [("drop_source", 1)]);
    }

    // Chained, and the established socket here has the flow: delivered, both headers off.
    let frame = chained(&inner);
    let (out, got) = lab.run_decap(&frame);
    assert_eq!(
        (out.action, out.packet),
        (XDP_PASS, delivered(&frame, &inner))
    );
    assert_eq!(got, [("chained_local", 1)]);

    // Chained SYN: a new connection is always this backend's.
    let syn = inner_of(40_000, 8080, true);
    let frame = chained(&syn);
    let (out, got) = lab.run_decap(&frame);
    assert_eq!(
        (out.action, out.packet),
        (XDP_PASS, delivered(&frame, &syn))
    );
    assert_eq!(got, [("chained_local", 1)]);

    // Chained, no socket has it (a listener without a SYN cookie does not count; nothing
    // listens on 9090): the outer header goes, the rest to the previous backend's MAC.
    for dport in [8080, 9090] {
        let stray = inner_of(40_001, dport, false);
        let frame = chained(&stray);
        let (out, got) = lab.run_decap(&frame);
        let mut want = prev_mac.to_vec();
        want.extend_from_slice(&lb_mac);
        want.extend_from_slice(&frame[12..14]);
        want.extend_from_slice(&frame[34..]);
        assert_eq!((out.action, out.packet), (XDP_TX, want), "port {dport}");
        assert_eq!(got, [("chained_forwarded", 1)]);
    }

    // Chained, but not a TCP segment inside: dropped.
    let junk = udp(lb_mac, IpAddr::V4(peer_ip), 5000, ip("10.111.0.1"), 53);
    let (out, got) = lab.run_decap(&chained(&junk));
    assert_eq!(out.action, XDP_DROP);
    assert_eq!(got, [("drop_malformed", 1)]);

    // IPv6: chained and sent on to the previous backend.
    let lb6: Ipv6Addr = "fd00:ffff::9".parse().unwrap();
    let me6: Ipv6Addr = "fd00:111::1".parse().unwrap();
    let (prev6_mac, prev6_addr) = (lab.backend(5).mac, v6(lab.backend(5).addr));
    let inner6 = tcp(lb_mac, ip(CLIENT6), 40_002, IpAddr::V6(me6), 9090, false);
    let frame = wrap6(
        &wrap6(&inner6, lb6.octets(), prev6_addr),
        lb6.octets(),
        me6.octets(),
    );
    let (out, got) = lab.run_decap(&frame);
    let mut want = prev6_mac.to_vec();
    want.extend_from_slice(&lab.lb_mac);
    want.extend_from_slice(&frame[12..14]);
    want.extend_from_slice(&frame[54..]);
    assert_eq!((out.action, out.packet), (XDP_TX, want));
    assert_eq!(got, [("chained_forwarded", 1)]);
    // A spoofed IPv6 outer source.
    let spoofed = wrap6(
        &inner6,
        "fd00:1::1".parse::<Ipv6Addr>().unwrap().octets(),
        me6.octets(),
    );
    let (out, got) = lab.run_decap(&spoofed);
    assert_eq!(out.action, XDP_DROP);
    assert_eq!(got, [("drop_source", 1)]);

    // IPv4-in-IPv6 (an IPv4 Vip with IPv6 backends): delivered as IPv4.
    let frame = {
        let mut f = CLIENT_MAC.to_vec();
        f.extend_from_slice(&lb_mac);
        f.extend_from_slice(&[0x86, 0xdd]);
        let payload = (inner.len() - 14) as u16;
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&payload.to_be_bytes());
        f.extend_from_slice(&[4, 64]);
        f.extend_from_slice(&lb6.octets());
        f.extend_from_slice(&me6.octets());
        f.extend_from_slice(&inner[14..]);
        f
    };
    let (out, got) = lab.run_decap(&frame);
    let mut want = frame[..12].to_vec();
    want.extend_from_slice(&[0x08, 0x00]);
    want.extend_from_slice(&inner[14..]);
    assert_eq!((out.action, out.packet), (XDP_PASS, want), "4in6");
    assert_eq!(got, [("delivered", 1)]);

    // With no source configured, nothing encapsulated is accepted.
    lab.dataplane.set_decap_sources(&[]).unwrap();
    let (out, got) = lab.run_decap(&wrap4(&inner, lb, me));
    assert_eq!(out.action, XDP_DROP);
    assert_eq!(got, [("drop_source", 1)]);
}

#[test]
fn a_vip_hashing_on_the_source_address_chains_by_that_hash() {
    use lb_common::hash::HashMode;
    let mut lab = Lab::new();
    let previous = table(&lab, &[1, 2]);
    lab.dataplane
        .install_prev_tables(&[(VIP_SOURCE_HASH, &previous)])
        .unwrap();
    // A client whose source-address slot moved from the previous table to the current.
    let (client, hash, slot_hash) = (1..=250u8)
        .map(|last| {
            let flow = Flow {
                src: ip(&format!("10.50.1.{last}")),
                dst: ip("10.200.0.5"),
                sport: 40_000,
                dport: 80,
                proto: PROTO_TCP,
            };
            (
                flow.src,
                flow.hash(SEED),
                flow.table_hash(HashMode::SourceAddress, SEED),
            )
        })
        .find(|(_, _, h)| lab.tables[&VIP_SOURCE_HASH].lookup(*h) != previous.lookup(*h))
        .expect("a moved client");
    let (cur, prev) = (
        hop(&lab, lab.tables[&VIP_SOURCE_HASH].lookup(slot_hash)),
        hop(&lab, previous.lookup(slot_hash)),
    );
    let input = tcp(lab.lb_mac, client, 40_000, ip("10.200.0.5"), 80, false);
    let src = encap_src4(ENCAP_SRC4, hash);
    let middle = expect_ipip(&input, lab.lb_mac, cur.mac, src, v4(prev.addr));
    let (out, got) = run(&mut lab, &input);
    assert_eq!(
        out.packet,
        expect_ipip(&middle, lab.lb_mac, cur.mac, src, v4(cur.addr))
    );
    assert_eq!(
        got,
        counters(&[
            "conntrack_miss",
            "conntrack_miss_non_syn",
            "second_chance",
            "tx"
        ])
    );
}
