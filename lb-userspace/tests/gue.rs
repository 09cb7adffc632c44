//! GUE forwarding (`forwarding: gue`): what `lb_ingress` sends for a GUE Vip (exact bytes,
//! counters), that GUE Vips are not chained by second chance, what `lb_decap` does with
//! GUE, and real TCP and UDP clients reaching real servers through GUE Vips (IPv4, IPv6,
//! IPv4 Vip with IPv6 backends), with `lb_decap` on the backends. Needs root.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use lb_common::{
    consts::{DEFAULT_GUE_PORT, DecapCounter, vip_flags},
    hash::Flow,
    maglev::{self, MaglevBackend},
    types::TunnelConfig,
};
use lb_testbed::{
    daemon::{DaemonBed, VIP, VIP6, connect},
    lab::{CLIENT_MAC, ENCAP_SRC4, ENCAP_SRC6, Lab, LabVip, SEED, TABLE_SIZE, deltas},
    packets::*,
};
use lb_userspace::dataplane::TestRunOutcome;

const CLIENT: &str = "10.50.0.7";
const CLIENT6: &str = "fd00:50::7";
/// GUE Vips added to the lab: IPv4 (backends 1-3), IPv6 (4-5), IPv4 with IPv6 backends.
const VIP_GUE: u32 = 13;
const VIP_GUE6: u32 = 14;
const VIP_GUE_MIXED: u32 = 15;
const GUE_ADDR: &str = "10.200.0.10";
const GUE_ADDR6: &str = "fd00:200::4";
const GUE_MIXED_ADDR: &str = "10.200.0.11";

fn gue_lab() -> Lab {
    let mut lab = Lab::new();
    let v = |id, addr: &str, backends: &[u32], flags| LabVip {
        id,
        addr: ip(addr),
        port: 80,
        proto: 6,
        flags: flags | vip_flags::GUE | vip_flags::ACTIVE,
        backends: backends.to_vec(),
    };
    lab.add_vip(v(VIP_GUE, GUE_ADDR, &[1, 2, 3], 0));
    lab.add_vip(v(VIP_GUE6, GUE_ADDR6, &[4, 5], vip_flags::IPV6));
    lab.add_vip(v(VIP_GUE_MIXED, GUE_MIXED_ADDR, &[4, 5], 0));
    lab.dataplane
        .set_tunnel(&TunnelConfig {
            mtu: 0,
            gue_port: DEFAULT_GUE_PORT.to_be(),
            _pad: 0,
        })
        .unwrap();
    lab
}

fn flow(src: &str, sport: u16, dst: &str) -> Flow {
    Flow {
        src: ip(src),
        dst: ip(dst),
        sport,
        dport: 80,
        proto: 6,
    }
}

/// What a GUE packet for `input` (an untagged IP packet at 14) must be, built from the
/// spec rather than the data plane's code: new MACs; an outer IPv4 header (TOS from the
/// inner packet, protocol 17, checksum) or IPv6 header (traffic class from the inner,
/// flow label from the hash, next header 17), from the hash-varied source to the backend;
/// UDP from port 0xC000 | (hash & 0x3FFF) to 6080, checksum 0; the client's packet.
fn expect_gue(
    input: &[u8],
    (smac, dmac): ([u8; 6], [u8; 6]),
    backend: IpAddr,
    hash: u32,
) -> Vec<u8> {
    let inner = &input[14..];
    let (tos, inner_len) = if inner[0] >> 4 == 4 {
        (inner[1], u16::from_be_bytes([inner[2], inner[3]]))
    } else {
        let vtc = u32::from_be_bytes(inner[0..4].try_into().unwrap());
        (
            (vtc >> 20) as u8,
            u16::from_be_bytes([inner[4], inner[5]]) + 40,
        )
    };
    let mut out = dmac.to_vec();
    out.extend_from_slice(&smac);
    match backend {
        IpAddr::V4(dst) => {
            out.extend_from_slice(&[0x08, 0x00]);
            let mut outer = vec![0x45, tos];
            outer.extend_from_slice(&(inner_len + 28).to_be_bytes());
            outer.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0]);
            outer.extend_from_slice(&encap_src4(ENCAP_SRC4, hash));
            outer.extend_from_slice(&dst.octets());
            let sum = checksum(&outer);
            outer[10..12].copy_from_slice(&sum.to_be_bytes());
            out.extend_from_slice(&outer);
        }
        IpAddr::V6(dst) => {
            out.extend_from_slice(&[0x86, 0xDD]);
            let vtc = (6 << 28) | (u32::from(tos) << 20) | (hash & 0x000F_FFFF);
            out.extend_from_slice(&vtc.to_be_bytes());
            out.extend_from_slice(&(inner_len + 8).to_be_bytes());
            out.extend_from_slice(&[17, 64]);
            out.extend_from_slice(&encap_src6(ENCAP_SRC6.parse().unwrap(), hash));
            out.extend_from_slice(&dst.octets());
        }
    }
    out.extend_from_slice(&(0xC000 | (hash as u16 & 0x3FFF)).to_be_bytes());
    out.extend_from_slice(&DEFAULT_GUE_PORT.to_be_bytes());
    out.extend_from_slice(&(inner_len + 8).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(inner);
    out
}

fn run(lab: &mut Lab, packet: &[u8]) -> (TestRunOutcome, Vec<(&'static str, u64)>) {
    let before = lab.counters();
    let out = lab.run(packet);
    let mut got = deltas(&before, &lab.counters());
    got.sort();
    (out, got)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Each GUE Vip's packets, new flow then established (the second from the flow cache,
/// the fast path's GUE branch), go to the predicted backend in exactly the GUE bytes.
#[test]
fn gue_vips_send_the_clients_packet_in_udp_to_the_predicted_backend() {
    let mut lab = gue_lab();
    let mac = lab.lb_mac;
    let cases = [
        (VIP_GUE, CLIENT, GUE_ADDR, "IPv4"),
        (VIP_GUE6, CLIENT6, GUE_ADDR6, "IPv6"),
        (
            VIP_GUE_MIXED,
            CLIENT,
            GUE_MIXED_ADDR,
            "IPv4 Vip, IPv6 backend",
        ),
    ];
    for (vip, client, addr, label) in cases {
        for sport in [40_000u16, 40_001, 40_002, 40_003] {
            let flow = flow(client, sport, addr);
            let hash = flow.hash(SEED);
            let backend = lab.backend(lab.predict(vip, &flow));
            let hop = (mac, backend.mac);
            let backend_addr = backend.addr;
            let packets = [true, false, false].map(|syn| {
                let mut p = tcp(mac, ip(client), sport, ip(addr), 80, syn);
                if client == CLIENT {
                    // A TOS the outer header must carry.
                    p[15] = 0xb8;
                    fix_ipv4_checksum(&mut p, 14);
                }
                p
            });
            let want_counters: [&[(&str, u64)]; 3] = [
                &[("conntrack_miss", 1), ("tx", 1)],
                &[("conntrack_hit", 1), ("tx", 1)],
                &[("conntrack_hit", 1), ("tx", 1)],
            ];
            for (i, packet) in packets.iter().enumerate() {
                let (out, counters) = run(&mut lab, packet);
                let want = expect_gue(packet, hop, backend_addr, hash);
                assert_eq!(out.action, XDP_TX, "{label} packet {i}");
                assert_eq!(
                    hex(&out.packet),
                    hex(&want),
                    "{label} packet {i} (sport {sport})"
                );
                assert_eq!(counters, want_counters[i], "{label} packet {i}");
            }
        }
    }
}

/// The outer IPv4 header's checksum is valid, and the UDP length covers exactly the rest.
#[test]
fn gue_outer_headers_are_consistent() {
    let mut lab = gue_lab();
    let mac = lab.lb_mac;
    for sport in 1000..1100u16 {
        let p = syn_or_ack(mac, sport);
        let out = lab.run(&p);
        assert_eq!(out.action, XDP_TX);
        let o = &out.packet;
        assert_eq!(checksum(&o[14..34]), 0, "outer IPv4 checksum");
        assert_eq!(u16::from_be_bytes([o[38], o[39]]) as usize, o.len() - 34);
        let sport_out = u16::from_be_bytes([o[34], o[35]]);
        assert!(
            sport_out >= 0xC000,
            "source port {sport_out} in the dynamic range"
        );
    }
}

fn syn_or_ack(mac: [u8; 6], sport: u16) -> Vec<u8> {
    tcp(
        mac,
        ip(CLIENT),
        sport,
        ip(GUE_ADDR),
        80,
        sport.is_multiple_of(2),
    )
}

/// The source port carries the flow's entropy: 200 flows use many ports, as a backend
/// NIC's RSS needs to spread them.
#[test]
fn gue_source_ports_spread_with_the_flow() {
    let mut lab = gue_lab();
    let mac = lab.lb_mac;
    let ports: std::collections::BTreeSet<u16> = (2000..2200u16)
        .map(|sport| {
            let out = lab.run(&tcp(mac, ip(CLIENT), sport, ip(GUE_ADDR), 80, true));
            u16::from_be_bytes([out.packet[34], out.packet[35]])
        })
        .collect();
    assert!(ports.len() > 190, "{} distinct source ports", ports.len());
}

/// GUE Vips are not chained by second chance: a moved non-SYN packet goes to the current
/// backend in plain GUE, with no second header and no `second_chance` count.
#[test]
fn gue_vips_are_not_chained() {
    let mut lab = gue_lab();
    let mac = lab.lb_mac;
    let members: Vec<MaglevBackend> = [1u32, 2]
        .iter()
        .map(|id| MaglevBackend::new(*id, lab.backend(*id).addr, 1))
        .collect();
    let previous = maglev::build(&members, TABLE_SIZE, SEED);
    lab.dataplane
        .install_prev_tables(&[(VIP_GUE, &previous)])
        .unwrap();
    let (sport, flow) = (1024..u16::MAX)
        .map(|sport| (sport, flow(CLIENT, sport, GUE_ADDR)))
        .find(|(_, f)| lab.tables[&VIP_GUE].lookup(f.hash(SEED)) != previous.lookup(f.hash(SEED)))
        .expect("a moved flow");
    let packet = tcp(mac, ip(CLIENT), sport, ip(GUE_ADDR), 80, false);
    let (out, counters) = run(&mut lab, &packet);
    let backend = lab.backend(lab.predict(VIP_GUE, &flow));
    assert_eq!(out.action, XDP_TX);
    assert_eq!(
        hex(&out.packet),
        hex(&expect_gue(
            &packet,
            (mac, backend.mac),
            backend.addr,
            flow.hash(SEED)
        ))
    );
    assert_eq!(
        counters,
        [
            ("conntrack_miss", 1),
            ("conntrack_miss_non_syn", 1),
            ("tx", 1)
        ]
    );
    // The same flow on the IPIP Vip with the same previous table is chained: the test
    // would see it.
    lab.dataplane
        .install_prev_tables(&[(lb_testbed::lab::VIP_TCP, &previous)])
        .unwrap();
    let ipip_flow = (1024..u16::MAX)
        .map(|sport| (sport, self::flow(CLIENT, sport, "10.200.0.1")))
        .find(|(_, f)| {
            lab.tables[&lb_testbed::lab::VIP_TCP].lookup(f.hash(SEED))
                != previous.lookup(f.hash(SEED))
        })
        .expect("a moved flow");
    let packet = tcp(mac, ip(CLIENT), ipip_flow.0, ip("10.200.0.1"), 80, false);
    let (_, counters) = run(&mut lab, &packet);
    assert!(
        counters.contains(&("second_chance", 1)),
        "the IPIP Vip chains: {counters:?}"
    );
}

/// `lb_decap` takes GUE off (both outer families, both inner ones) when it comes from a
/// load balancer's prefix to the GUE port: the client's packet is delivered as it was
/// sent. From elsewhere it is dropped and counted; UDP to another port is not GUE.
#[test]
fn lb_decap_takes_gue_off_from_load_balancers_only() {
    let mut lab = gue_lab();
    lab.dataplane
        .set_decap_sources(&[(ip("172.16.0.0"), 16), (ip("fd00:ffff::"), 96)])
        .unwrap();
    let mac = lab.lb_mac;
    let be_mac = [0x02, 0, 0, 0, 0xbe, 1];
    let cases = [
        (CLIENT, GUE_ADDR, ip("10.111.0.11")),
        (CLIENT6, GUE_ADDR6, ip("fd00:111::11")),
        (CLIENT, GUE_MIXED_ADDR, ip("fd00:111::11")),
    ];
    for (client, vip, backend) in cases {
        let inner = tcp(CLIENT_MAC, ip(client), 5555, ip(vip), 80, false);
        let hash = 0x1234_5678;
        let packet = expect_gue(&inner, (mac, be_mac), backend, hash);
        let (out, counters) = lab.run_decap(&packet);
        assert_eq!(out.action, XDP_PASS, "{vip}");
        let mut want = packet[..12].to_vec();
        want.extend_from_slice(&inner[12..]);
        assert_eq!(hex(&out.packet), hex(&want), "{vip}: the client's packet");
        assert_eq!(counters, [("delivered", 1)], "{vip}");

        // The same from outside the load balancers' prefixes.
        let mut spoofed = packet.clone();
        let src = if backend.is_ipv4() { 26 } else { 22 };
        spoofed[src] ^= 0x80;
        if backend.is_ipv4() {
            fix_ipv4_checksum(&mut spoofed, 14);
        }
        let (out, counters) = lab.run_decap(&spoofed);
        assert_eq!(out.action, XDP_DROP, "{vip} spoofed");
        assert_eq!(counters, [("drop_source", 1)], "{vip} spoofed");

        // To another UDP port: ordinary UDP, left to the kernel untouched.
        let mut other = packet.clone();
        let dport = if backend.is_ipv4() { 36 } else { 56 };
        other[dport..dport + 2].copy_from_slice(&6081u16.to_be_bytes());
        let (out, counters) = lab.run_decap(&other);
        assert_eq!((out.action, &out.packet), (XDP_PASS, &other), "{vip} port");
        assert!(counters.is_empty(), "{vip} port: {counters:?}");
    }
}

/// Real clients through GUE Vips to real servers whose backends run `lb_decap`: TCP and
/// UDP to an IPv4 Vip, TCP to an IPv6 Vip, and TCP to an IPv4 Vip served by the
/// backends' IPv6 addresses (IPv4 in UDP over IPv6); and, beside them, the same mix in
/// IPIP (IPv4-in-IPv6).
#[test]
fn real_clients_reach_real_servers_through_gue_vips() {
    let mut bed = DaemonBed::new(3);
    let pool = |name: &str, v6: bool| {
        let mut yaml = format!("  {name}:\n    backends:\n");
        for (i, b) in bed.bed.backends.iter().enumerate() {
            let addr = if v6 { b.addr6 } else { b.addr4 };
            let suffix = if v6 { "-6" } else { "" };
            yaml += &format!(
                "      - address: {addr}\n        name: be{}{suffix}\n",
                i + 1
            );
        }
        yaml
    };
    let pools = pool("web4", false) + &pool("web6", true);
    let vips = format!(
        "  - {{ address: {VIP}, port: 80, protocol: tcp, forwarding: gue, pool: web4 }}\n\
         \x20 - {{ address: {VIP}, port: 53, protocol: udp, forwarding: gue, pool: web4 }}\n\
         \x20 - {{ address: \"{VIP6}\", port: 80, protocol: tcp, forwarding: gue, pool: web6 }}\n\
         \x20 - {{ address: {VIP}, port: 8080, protocol: tcp, forwarding: gue, pool: web6 }}\n\
         \x20 - {{ address: {VIP}, port: 81, protocol: tcp, forwarding: ipip, pool: web6 }}\n"
    );
    bed.write_config(&bed.config_yaml(&vips, &pools));
    bed.start_daemon();
    let delivered = |bed: &DaemonBed| bed.decap_counters()[DecapCounter::Delivered as usize];
    let before = delivered(&bed);
    let client = &bed.bed.client.netns;

    // TCP over IPv4: 30 connections, each greeted and echoed by a backend.
    let tcp_names = |addr: SocketAddr| {
        client
            .enter(|| {
                (0..30)
                    .map(|i| {
                        let (mut stream, name) = connect(addr);
                        writeln!(stream, "hello {i}").unwrap();
                        let mut line = String::new();
                        BufReader::new(&stream).read_line(&mut line).unwrap();
                        assert_eq!(line.trim(), format!("{name} hello {i}"), "{addr}");
                        name
                    })
                    .collect::<std::collections::BTreeSet<String>>()
            })
            .unwrap()
    };
    let names = tcp_names(bed.vip(80));
    assert!(names.len() >= 2, "GUE over IPv4 spreads: {names:?}");
    let names6 = tcp_names(SocketAddr::new(ip(VIP6), 80));
    assert!(names6.len() >= 2, "GUE over IPv6 spreads: {names6:?}");

    // UDP over IPv4: every datagram answered by a backend.
    let answers = client
        .enter(|| {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            (0..10)
                .map(|i| {
                    socket
                        .send_to(format!("q{i}").as_bytes(), bed.vip(53))
                        .unwrap();
                    let mut buf = [0; 128];
                    let n = socket.recv(&mut buf).expect("a UDP answer through GUE");
                    String::from_utf8_lossy(&buf[..n]).into_owned()
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    for (i, a) in answers.iter().enumerate() {
        assert!(a.starts_with("be") && a.ends_with(&format!(" q{i}")), "{a}");
    }

    // IPv4 Vips served by IPv6 backends, in GUE and in IPIP: HTTP on 8080, and the TCP
    // greeting server on 81 (IPv4-in-IPv6).
    let http = client
        .enter(|| {
            let (mut stream, _) = (
                std::net::TcpStream::connect_timeout(&bed.vip(8080), Duration::from_secs(3))
                    .expect("connect through GUE over IPv6"),
                (),
            );
            stream
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            write!(stream, "GET / HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
            let mut text = String::new();
            std::io::Read::read_to_string(&mut stream, &mut text).unwrap();
            text
        })
        .unwrap();
    assert!(
        http.starts_with("HTTP/1.1 200")
            && http
                .trim_end()
                .rsplit('\n')
                .next()
                .is_some_and(|b| b.starts_with("be")),
        "{http}"
    );
    // Nothing listens on 81: the backend's kernel refuses (a RST straight to the client),
    // which it can only do if the IPv4-in-IPv6 packet arrived and was taken off; lost
    // packets would time out instead.
    let ipip = client
        .enter(|| {
            std::net::TcpStream::connect_timeout(
                &SocketAddr::new(ip(VIP), 81),
                Duration::from_secs(3),
            )
            .map(|_| ())
        })
        .unwrap();
    assert_eq!(
        ipip.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "IPv4-in-IPv6 reached a backend"
    );
    assert!(
        delivered(&bed) >= before + 60 + 10,
        "lb_decap delivered {} GUE packets",
        delivered(&bed) - before
    );
}
