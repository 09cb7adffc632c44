//! ICMP "fragmentation needed" / ICMPv6 "packet too big" from the data plane: a packet
//! that would not fit the interfaces' MTU once encapsulated is answered, not silently
//! lost. Fixtures (exact bytes of the error, checksums, counters, the rate limit, the fast
//! path) and a real TCP connection whose client learns the path MTU from it. Needs root.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::IpAddr,
    time::Duration,
};

use lb_common::{
    consts::{DEFAULT_GUE_PORT, icmp_rate_slots, vip_flags},
    types::TunnelConfig,
};
use lb_testbed::{
    daemon::{DaemonBed, connect},
    lab::{CLIENT_MAC, Lab, LabVip, deltas},
    packets::*,
};

const CLIENT: &str = "10.50.0.7";
const CLIENT6: &str = "fd00:50::7";
const VIP: &str = "10.200.0.1"; // the lab's IPIP Vip, port 80
const VIP6: &str = "fd00:200::1"; // IPv6-in-IPv6, port 80
const VIP_GUE: u32 = 13;
const GUE_ADDR: &str = "10.200.0.10";
const MTU: u32 = 1500;

fn lab() -> Lab {
    let mut lab = Lab::new();
    lab.add_vip(LabVip {
        id: VIP_GUE,
        addr: ip(GUE_ADDR),
        port: 80,
        proto: 6,
        flags: vip_flags::GUE | vip_flags::ACTIVE,
        backends: vec![1, 2, 3],
    });
    lab.dataplane
        .set_tunnel(&TunnelConfig {
            mtu: MTU,
            gue_port: DEFAULT_GUE_PORT.to_be(),
            _pad: 0,
        })
        .unwrap();
    lab
}

/// A TCP ACK from the client whose IP packet is `l3_len` bytes long; IPv4 with DF as
/// asked.
fn big_tcp(mac: [u8; 6], src: &str, dst: &str, sport: u16, l3_len: usize, df: bool) -> Vec<u8> {
    let (src, dst) = (ip(src), ip(dst));
    let header = if src.is_ipv4() { 20 + 20 } else { 40 + 20 };
    let payload: Vec<u8> = (0..l3_len - header).map(|i| i as u8).collect();
    let eth = etherparse::PacketBuilder::ethernet2(CLIENT_MAC, mac);
    let ip_builder = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("one family"),
    };
    let mut out = Vec::new();
    ip_builder
        .tcp(sport, 80, 1000, 64240)
        .ack(1)
        .write(&mut out, &payload)
        .unwrap();
    if src.is_ipv4() {
        out[20] = if df { 0x40 } else { 0 };
        out[21] = 0;
        fix_ipv4_checksum(&mut out, 14);
    }
    assert_eq!(out.len(), 14 + l3_len);
    out
}

/// The ICMP error for `input`, built from RFC 792: MACs swapped; IPv4 from the Vip to the
/// client, TOS 0xC0, TTL 64, protocol 1; type 3 code 4, 16 unused bits, the next-hop MTU;
/// the first 68 bytes of the client's IP packet.
fn expect_frag_needed(input: &[u8], mtu: u16) -> Vec<u8> {
    let quote = &input[14..14 + 68];
    let mut out = input[6..12].to_vec();
    out.extend_from_slice(&input[0..6]);
    out.extend_from_slice(&[0x08, 0x00]);
    let mut ip4 = vec![0x45, 0xC0];
    ip4.extend_from_slice(&(20u16 + 8 + 68).to_be_bytes());
    ip4.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
    ip4.extend_from_slice(&input[30..34]); // the Vip
    ip4.extend_from_slice(&input[26..30]); // the client
    let sum = checksum(&ip4);
    ip4[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut icmp = vec![3, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(quote);
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    out.extend_from_slice(&ip4);
    out.extend_from_slice(&icmp);
    out
}

/// The ICMPv6 "packet too big" for `input` (RFC 4443): MACs swapped, IPv6 from the Vip to
/// the client (hop limit 64, next header 58), type 2 code 0, the 32-bit MTU, the first
/// 200 bytes of the client's packet; checksum over the pseudo-header.
fn expect_too_big6(input: &[u8], mtu: u32) -> Vec<u8> {
    let quote = &input[14..14 + 200];
    let (client, vip) = (&input[22..38], &input[38..54]);
    let mut out = input[6..12].to_vec();
    out.extend_from_slice(&input[0..6]);
    out.extend_from_slice(&[0x86, 0xDD, 0x60, 0, 0, 0]);
    out.extend_from_slice(&208u16.to_be_bytes());
    out.extend_from_slice(&[58, 64]);
    out.extend_from_slice(vip);
    out.extend_from_slice(client);
    let mut icmp = vec![2, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(quote);
    let mut pseudo = vip.to_vec();
    pseudo.extend_from_slice(client);
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&icmp);
    let sum = checksum(&pseudo);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    out.extend_from_slice(&icmp);
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn run(lab: &mut Lab, packet: &[u8]) -> (u32, Vec<u8>, Vec<(&'static str, u64)>) {
    let before = lab.counters();
    let out = lab.run(packet);
    let mut got = deltas(&before, &lab.counters());
    got.sort();
    (out.action, out.packet, got)
}

const UNKNOWN_FLOW: [(&str, u64); 2] = [("conntrack_miss", 1), ("conntrack_miss_non_syn", 1)];

fn with(
    counters: &[(&'static str, u64)],
    more: &[(&'static str, u64)],
) -> Vec<(&'static str, u64)> {
    let mut all = [counters, more].concat();
    all.sort();
    all
}

#[test]
fn a_packet_too_big_once_encapsulated_is_answered_with_icmp() {
    let mut lab = lab();
    let mac = lab.lb_mac;

    // IPIP adds 20 bytes: 1480 fits a 1500 MTU, 1481 does not.
    let fits = big_tcp(mac, CLIENT, VIP, 5000, 1480, true);
    let (action, _, counters) = run(&mut lab, &fits);
    assert_eq!(action, XDP_TX);
    assert_eq!(counters, with(&UNKNOWN_FLOW, &[("tx", 1)]));

    let too_big = big_tcp(mac, CLIENT, VIP, 5001, 1481, true);
    let (action, out, counters) = run(&mut lab, &too_big);
    assert_eq!(action, XDP_TX, "answered");
    assert_eq!(hex(&out), hex(&expect_frag_needed(&too_big, 1480)));
    assert_eq!(counters, with(&UNKNOWN_FLOW, &[("icmp_too_big", 1)]));
    // Both checksums of what went out hold (the expected bytes were built apart).
    assert_eq!(checksum(&out[14..34]), 0);
    assert_eq!(checksum(&out[34..]), 0);

    // Without DF the client asked to be fragmented, which XDP cannot do: dropped, counted.
    let no_df = big_tcp(mac, CLIENT, VIP, 5002, 1481, false);
    let (action, _, counters) = run(&mut lab, &no_df);
    assert_eq!(action, XDP_DROP);
    assert_eq!(counters, with(&UNKNOWN_FLOW, &[("drop_too_big", 1)]));

    // GUE adds 28 bytes: the MTU the client is told is 1472.
    let gue = big_tcp(mac, CLIENT, GUE_ADDR, 5003, 1473, true);
    let (action, out, _) = run(&mut lab, &gue);
    assert_eq!(action, XDP_TX);
    assert_eq!(hex(&out), hex(&expect_frag_needed(&gue, 1472)));

    // IPv6-in-IPv6 adds 40: "packet too big" with MTU 1460, whatever the flags.
    let fits6 = big_tcp(mac, CLIENT6, VIP6, 5004, 1460, true);
    assert_eq!(run(&mut lab, &fits6).0, XDP_TX);
    let too_big6 = big_tcp(mac, CLIENT6, VIP6, 5005, 1461, true);
    let (action, out, counters) = run(&mut lab, &too_big6);
    assert_eq!(action, XDP_TX);
    assert_eq!(hex(&out), hex(&expect_too_big6(&too_big6, 1460)));
    assert_eq!(counters, with(&UNKNOWN_FLOW, &[("icmp_too_big", 1)]));

    // With no MTU known (0), nothing is checked.
    lab.dataplane.set_tunnel(&TunnelConfig::default()).unwrap();
    let (action, out, _) = run(&mut lab, &too_big);
    assert_eq!(
        (action, out.len()),
        (XDP_TX, too_big.len() + 20),
        "forwarded as before"
    );
}

/// A flow in the flow cache (the fast path) gets the error too: the fast path leaves
/// packets near the MTU to the full path.
#[test]
fn an_established_flows_large_packet_is_answered_too() {
    let mut lab = lab();
    let mac = lab.lb_mac;
    for syn in [true, false, false] {
        let p = tcp(mac, ip(CLIENT), 6000, ip(VIP), 80, syn);
        assert_eq!(lab.run(&p).action, XDP_TX);
    }
    let small = tcp(mac, ip(CLIENT), 6000, ip(VIP), 80, false);
    let (_, _, counters) = run(&mut lab, &small);
    assert_eq!(counters, [("conntrack_hit", 1), ("tx", 1)]);
    let big = big_tcp(mac, CLIENT, VIP, 6000, 1481, true);
    let (action, out, counters) = run(&mut lab, &big);
    assert_eq!(action, XDP_TX);
    assert_eq!(hex(&out), hex(&expect_frag_needed(&big, 1480)));
    assert_eq!(counters, [("conntrack_hit", 1), ("icmp_too_big", 1)]);

    // L2 DSR adds nothing: a full-size packet of a cached flow is forwarded.
    for syn in [true, false] {
        let p = tcp(mac, ip(CLIENT), 6001, ip("10.200.0.2"), 80, syn);
        assert_eq!(lab.run(&p).action, XDP_TX);
    }
    let full = big_tcp(mac, CLIENT, "10.200.0.2", 6001, 1500, true);
    let (action, out, counters) = run(&mut lab, &full);
    assert_eq!((action, out.len()), (XDP_TX, full.len()));
    assert_eq!(counters, [("conntrack_hit", 1), ("tx", 1)]);

    // A cached GUE flow: told 1472.
    for syn in [true, false] {
        let p = tcp(mac, ip(CLIENT), 6002, ip(GUE_ADDR), 80, syn);
        assert_eq!(lab.run(&p).action, XDP_TX);
    }
    let big = big_tcp(mac, CLIENT, GUE_ADDR, 6002, 1473, true);
    let (action, out, counters) = run(&mut lab, &big);
    assert_eq!(action, XDP_TX);
    assert_eq!(hex(&out), hex(&expect_frag_needed(&big, 1472)));
    assert_eq!(counters, [("conntrack_hit", 1), ("icmp_too_big", 1)]);
}

#[test]
fn too_big_errors_stop_at_the_rate() {
    let mut lab = lab();
    let mac = lab.lb_mac;
    let big = big_tcp(mac, CLIENT, VIP, 7000, 1481, true);
    let before = lab.counters();
    let actions = lab.with_dataplane(|dp, ifindex| {
        // SAFETY: a zeroed cpu_set_t is valid; the call changes only this thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
        }
        dp.set_icmp_rate(icmp_rate_slots::TOO_BIG, 2).unwrap();
        (0..4)
            .map(|_| dp.test_run("lb_ingress", &big, ifindex, 1).unwrap().action)
            .collect::<Vec<_>>()
    });
    assert_eq!(actions, [XDP_TX, XDP_TX, XDP_DROP, XDP_DROP]);
    let got = deltas(&before, &lab.counters());
    assert!(got.contains(&("icmp_too_big", 2)), "{got:?}");
    assert!(got.contains(&("icmp_too_big_limited", 2)), "{got:?}");
}

/// Path MTU discovery through the load balancer, for real: the client and the load
/// balancer's link have MTU 1500, so the client's full-size segments (1500 bytes) do not
/// fit once encapsulated (1520 in IPIP, 1540 in IPv6-in-IPv6). The load balancer tells it
/// so; the client's kernel lowers its path MTU to the Vip, and a 20 kB line is echoed
/// back whole, in both families. Without the error the segments would vanish and the
/// exchange time out.
#[test]
fn a_clients_tcp_connection_learns_the_path_mtu_and_completes() {
    let mut bed = DaemonBed::new(2);
    for (netns, dev) in [(&bed.bed.lb.netns, "eth0"), (&bed.bed.switch, "p-lb")] {
        netns.ip(&["link", "set", dev, "mtu", "1500"]).unwrap();
    }
    let vips = "  - { address: 10.200.0.1, port: 80, protocol: tcp, pool: web }\n\
                \x20 - { address: \"fd00:200::1\", port: 80, protocol: tcp, pool: web6 }\n";
    let mut pools = bed.pool_yaml("web", &[(1, 1), (2, 1)], "");
    pools += "  web6:\n    backends:\n";
    for (i, b) in bed.bed.backends.iter().enumerate() {
        pools += &format!(
            "      - address: {}\n        name: be{}-6\n",
            b.addr6,
            i + 1
        );
    }
    bed.write_config(&bed.config_yaml(vips, &pools));
    bed.start_daemon();
    let line: String = (0..20_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    for (vip, want_mtu) in [("10.200.0.1", "mtu 1480"), ("fd00:200::1", "mtu 1460")] {
        let addr = std::net::SocketAddr::new(ip(vip), 80);
        let (echo, pmtu) = bed
            .bed
            .client
            .netns
            .enter(|| {
                let (mut stream, name) = connect(addr);
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                writeln!(stream, "{line}").unwrap();
                let mut echo = String::new();
                let read = BufReader::new(&stream).read_line(&mut echo);
                let pmtu = std::process::Command::new("ip")
                    .args(["route", "get", vip])
                    .output()
                    .unwrap();
                (
                    read.map(|_| echo.trim().strip_prefix(&format!("{name} ")).map(str::len)),
                    String::from_utf8_lossy(&pmtu.stdout).into_owned(),
                )
            })
            .unwrap();
        assert_eq!(
            echo.map_err(|e| e.kind()),
            Ok(Some(line.len())),
            "{vip}: the whole line came back"
        );
        assert!(
            pmtu.contains(want_mtu),
            "{vip}: the client learnt the path MTU: {pmtu}"
        );
    }
    let status = bed.status_text();
    assert!(status.contains("icmp_too_big"), "{status}");
}
