//! BPF_PROG_TEST_RUN on the real XDP object, katran-style: a table of {description, packet
//! in, expected action, expected packet out, expected counters}. Needs root.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{conntrack::place, consts::PROTO_TCP, hash::Flow};
use lb_testbed::{
    lab::{
        CLIENT_MAC, CONNTRACK_SEED, ENCAP_SRC4, ENCAP_SRC6, Lab, NO_ECHO_ADDR, SEED,
        VIP_ANY_PORT_DSR, VIP_DPORT_HASH, VIP_FRAGMENTS, VIP_FRAGMENTS6, VIP_MIXED, VIP_MIXED_DSR,
        VIP_SOURCE_HASH, VIP_SOURCE_HASH6, VIP_TCP, VIP_UDP, VIP_V6, deltas,
    },
    packets::*,
};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

const CLIENT: &str = "10.50.0.7";
const CLIENT6: &str = "fd00:50::7";
const VIP: &str = "10.200.0.1";
const VIP_DSR: &str = "10.200.0.2";
const VIP6: &str = "fd00:200::1";

struct Fixture {
    description: &'static str,
    input: Vec<u8>,
    action: u32,
    /// `None`: the packet must come out untouched (PASS) or is not looked at (DROP).
    output: Option<Vec<u8>>,
    counters: Vec<(&'static str, u64)>,
}

fn flow(src: &str, sport: u16, dst: &str, dport: u16, proto: u8) -> Flow {
    Flow {
        src: ip(src),
        dst: ip(dst),
        sport,
        dport,
        proto,
    }
}

/// The IPIP output for `input` (at `l3`) of `flow` to Vip `vip`'s predicted backend.
fn ipip(lab: &Lab, input: &[u8], l3: usize, vip: u32, flow: &Flow) -> Vec<u8> {
    let backend = lab.backend(lab.predict(vip, flow));
    let IpAddr::V4(dst) = backend.addr else {
        panic!("v4 backend")
    };
    let src = encap_src4(ENCAP_SRC4, flow.hash(SEED));
    expect_ipip_at(input, l3, lab.lb_mac, backend.mac, src, dst.octets())
}

fn ip6ip6(lab: &Lab, input: &[u8], vip: u32, flow: &Flow) -> Vec<u8> {
    let backend = lab.backend(lab.predict(vip, flow));
    let IpAddr::V6(dst) = backend.addr else {
        panic!("v6 backend")
    };
    let hash = flow.hash(SEED);
    let src = encap_src6(ENCAP_SRC6.parse().unwrap(), hash);
    expect_ip6ip6(input, lab.lb_mac, backend.mac, src, dst.octets(), hash)
}

/// The IPv4-in-IPv6 output for an untagged IPv4 `input` of `flow` to `vip`'s IPv6 backend.
fn ip4in6(lab: &Lab, input: &[u8], vip: u32, flow: &Flow) -> Vec<u8> {
    let backend = lab.backend(lab.predict(vip, flow));
    let IpAddr::V6(dst) = backend.addr else {
        panic!("v6 backend")
    };
    let hash = flow.hash(SEED);
    let src = encap_src6(ENCAP_SRC6.parse().unwrap(), hash);
    expect_4in6(input, 14, lab.lb_mac, backend.mac, src, dst.octets(), hash)
}

fn pass(description: &'static str, input: Vec<u8>, counter: &'static str) -> Fixture {
    Fixture {
        description,
        input,
        action: XDP_PASS,
        output: None,
        counters: vec![(counter, 1)],
    }
}

fn drop(description: &'static str, input: Vec<u8>, counters: &[&'static str]) -> Fixture {
    Fixture {
        description,
        input,
        action: XDP_DROP,
        output: None,
        counters: counters.iter().map(|c| (*c, 1)).collect(),
    }
}

fn tx(
    description: &'static str,
    input: Vec<u8>,
    output: Vec<u8>,
    counters: &[&'static str],
) -> Fixture {
    Fixture {
        description,
        input,
        action: XDP_TX,
        output: Some(output),
        counters: counters.iter().map(|c| (*c, 1)).collect(),
    }
}

fn fixtures(lab: &Lab) -> Vec<Fixture> {
    let mac = lab.lb_mac;
    let (client, client6, vip, vip6) = (ip(CLIENT), ip(CLIENT6), ip(VIP), ip(VIP6));
    let miss_tx = &["conntrack_miss", "tx"][..];

    let syn = tcp(mac, client, 40001, vip, 80, true);
    let syn_flow = flow(CLIENT, 40001, VIP, 80, 6);
    let ack = tcp(mac, client, 40001, vip, 80, false);
    let mid_flow = tcp(mac, client, 40002, vip, 80, false);
    let opts = with_ipv4_options(&tcp(mac, client, 40003, vip, 80, true));
    let vlan = with_vlan(&tcp(mac, client, 40004, vip, 80, true), 42);
    let udp_in = udp(mac, client, 5353, vip, 53);
    let icmp = icmp4_frag_needed(mac, Ipv4Addr::new(10, 99, 0, 1), client, 40001, vip, 80);
    let dsr = tcp(mac, client, 40005, ip(VIP_DSR), 8080, true);
    let dsr_backend =
        lab.backend(lab.predict(VIP_ANY_PORT_DSR, &flow(CLIENT, 40005, VIP_DSR, 8080, 6)));
    let syn6 = tcp(mac, client6, 40006, vip6, 80, true);
    let syn6_flow = flow(CLIENT6, 40006, VIP6, 80, 6);
    let icmp6 = icmp6_too_big(mac, "fd00:99::1".parse().unwrap(), client6, 40006, vip6, 80);

    let mut truncated_tcp = tcp(mac, client, 40007, vip, 80, true);
    truncated_tcp.truncate(14 + 20 + 10);
    truncated_tcp[16..18].copy_from_slice(&30u16.to_be_bytes());
    fix_ipv4_checksum(&mut truncated_tcp, 14);
    let mut bad_doff = tcp(mac, client, 40008, vip, 80, true);
    bad_doff[14 + 20 + 12] = 0x40;
    let mut bad_udp_len = udp(mac, client, 5354, vip, 53);
    bad_udp_len[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&4u16.to_be_bytes());
    // Data offset 15 (60 bytes) in a 34-byte segment (20-byte header + payload).
    let mut long_doff = tcp(mac, client, 40016, vip, 80, true);
    long_doff[14 + 20 + 12] = 0xF0;
    let mut long_doff6 = tcp(mac, client6, 40017, vip6, 80, true);
    long_doff6[14 + 40 + 12] = 0xF0;
    // UDP length one past the IP payload.
    let mut long_udp_len = udp(mac, client, 5356, vip, 53);
    let udp_len = (8 + PAYLOAD.len() + 1) as u16;
    long_udp_len[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&udp_len.to_be_bytes());
    let mut long_udp_len6 = udp(mac, client6, 5357, vip6, 53);
    long_udp_len6[14 + 40 + 4..14 + 40 + 6].copy_from_slice(&udp_len.to_be_bytes());
    // The same UDP datagram with the IP total length cut to end inside the payload (the
    // frame keeps its bytes: Ethernet padding).
    let mut udp_past_tot_len = udp(mac, client, 5358, vip, 53);
    udp_past_tot_len[16..18].copy_from_slice(&(20 + 8 + 4u16).to_be_bytes());
    fix_ipv4_checksum(&mut udp_past_tot_len, 14);
    let mut ihl4 = syn.clone();
    ihl4[14] = 0x44;
    let mut version6_in_v4 = syn.clone();
    version6_in_v4[14] = 0x65;
    let mut long_tot_len = syn.clone();
    long_tot_len[16..18].copy_from_slice(&1400u16.to_be_bytes());
    fix_ipv4_checksum(&mut long_tot_len, 14);
    let mut short_tot_len = syn.clone();
    short_tot_len[16..18].copy_from_slice(&10u16.to_be_bytes());
    fix_ipv4_checksum(&mut short_tot_len, 14);
    let mut long_payload6 = syn6.clone();
    long_payload6[18..20].copy_from_slice(&1400u16.to_be_bytes());
    let mut truncated_tcp6 = tcp(mac, client6, 40009, vip6, 80, true);
    truncated_tcp6.truncate(14 + 40 + 10);
    truncated_tcp6[18..20].copy_from_slice(&10u16.to_be_bytes());
    // A 600-byte UDP datagram to the fragment-tracking Vips, in 256-byte pieces; a later
    // piece of a datagram whose first was never seen; a first piece to a port of the
    // tracking address that no Vip serves.
    let (frag_flow, frag6_flow) = (
        flow(CLIENT, 6000, "10.200.0.7", 53, 17),
        flow(CLIENT6, 6001, "fd00:200::3", 53, 17),
    );
    let frags = udp_fragments(mac, (client, 6000), (ip("10.200.0.7"), 53), 600, 256, 77);
    let frags6 = udp_fragments(mac, (client6, 6001), (ip("fd00:200::3"), 53), 600, 256, 78);
    let orphan = udp_fragments(mac, (client, 6002), (ip("10.200.0.7"), 53), 600, 256, 79);
    let orphan6 = udp_fragments(mac, (client6, 6003), (ip("fd00:200::3"), 53), 600, 256, 80);
    let other_port = udp_fragments(mac, (client, 6004), (ip("10.200.0.7"), 54), 600, 256, 81);
    let tracked_hit = &["fragment_tracked", "conntrack_hit", "tx"][..];
    // An IPv4 Vip with IPv6 backends, IPIP and L2 DSR; TOS 0xb8 (EF) must reach the
    // outer traffic class.
    let mixed_flow = flow(CLIENT, 7000, "10.200.0.8", 80, 6);
    let mut mixed_syn = tcp(mac, client, 7000, ip("10.200.0.8"), 80, true);
    mixed_syn[15] = 0xb8;
    fix_ipv4_checksum(&mut mixed_syn, 14);
    let mixed_ack = {
        let mut p = tcp(mac, client, 7000, ip("10.200.0.8"), 80, false);
        p[15] = 0xb8;
        fix_ipv4_checksum(&mut p, 14);
        p
    };
    let mixed_dsr = tcp(mac, client, 7001, ip("10.200.0.9"), 80, true);
    let mixed_dsr_backend =
        lab.backend(lab.predict(VIP_MIXED_DSR, &flow(CLIENT, 7001, "10.200.0.9", 80, 6)));
    // Total length 20 + 4: the ICMP header ends past the IP packet (the frame goes on).
    let mut short_echo = icmp_echo((CLIENT_MAC, mac), client, vip, 9, false);
    short_echo[16..18].copy_from_slice(&24u16.to_be_bytes());
    fix_ipv4_checksum(&mut short_echo, 14);
    let mut short_quote = icmp.clone();
    short_quote.truncate(14 + 20 + 8 + 20 + 2);
    short_quote[16..18].copy_from_slice(&50u16.to_be_bytes());
    fix_ipv4_checksum(&mut short_quote, 14);

    vec![
        pass("ARP is passed untouched", arp(mac), "pass_not_ip"),
        pass(
            "LLDP (not IP) is passed",
            with_ethertype(syn.clone(), 0x88cc),
            "pass_not_ip",
        ),
        pass(
            "a QinQ outer tag is not parsed: passed",
            with_ethertype(syn.clone(), 0x88a8),
            "pass_not_ip",
        ),
        pass(
            "TCP to the load balancer's own address is passed",
            tcp(mac, client, 40010, ip("10.111.0.1"), 22, true),
            "pass_not_vip",
        ),
        pass(
            "IPv6 TCP to a non-Vip is passed",
            tcp(mac, client6, 40011, ip("fd00:111::1"), 22, true),
            "pass_not_vip",
        ),
        tx(
            "TCP SYN to a Vip is IPIP-encapsulated to its Maglev backend",
            syn.clone(),
            ipip(lab, &syn, 14, VIP_TCP, &syn_flow),
            miss_tx,
        ),
        tx(
            "the flow's next packet hits the connection table",
            ack.clone(),
            ipip(lab, &ack, 14, VIP_TCP, &syn_flow),
            &["conntrack_hit", "tx"],
        ),
        tx(
            "TCP without SYN on an unknown flow is still forwarded by the table",
            mid_flow.clone(),
            ipip(
                lab,
                &mid_flow,
                14,
                VIP_TCP,
                &flow(CLIENT, 40002, VIP, 80, 6),
            ),
            &["conntrack_miss", "conntrack_miss_non_syn", "tx"],
        ),
        tx(
            "IPv4 options (IHL 6) are carried through",
            opts.clone(),
            ipip(lab, &opts, 14, VIP_TCP, &flow(CLIENT, 40003, VIP, 80, 6)),
            miss_tx,
        ),
        tx(
            "an 802.1Q-tagged packet keeps its tag",
            vlan.clone(),
            ipip(lab, &vlan, 18, VIP_TCP, &flow(CLIENT, 40004, VIP, 80, 6)),
            miss_tx,
        ),
        tx(
            "UDP to a UDP Vip is encapsulated",
            udp_in.clone(),
            ipip(lab, &udp_in, 14, VIP_UDP, &flow(CLIENT, 5353, VIP, 53, 17)),
            miss_tx,
        ),
        pass(
            "TCP to a Vip address on a port with no Vip is passed",
            tcp(mac, client, 40012, vip, 81, true),
            "pass_vip_other",
        ),
        pass(
            "UDP to a TCP-only Vip port is passed",
            udp(mac, client, 5355, vip, 80),
            "pass_vip_other",
        ),
        tx(
            "ICMP echo to a Vip address is answered from XDP (MACs, addresses swapped, TTL 64)",
            icmp_echo((CLIENT_MAC, mac), client, vip, 9, false),
            icmp_echo((mac, CLIENT_MAC), vip, client, 64, true),
            &["icmp_echo_reply"],
        ),
        tx(
            "ICMPv6 echo to a Vip address is answered from XDP (hop limit 64)",
            icmp_echo((CLIENT_MAC, mac), client6, vip6, 9, false),
            icmp_echo((mac, CLIENT_MAC), vip6, client6, 64, true),
            &["icmp_echo_reply"],
        ),
        tx(
            "an 802.1Q-tagged echo is answered with its tag",
            with_vlan(&icmp_echo((CLIENT_MAC, mac), client, vip, 9, false), 42),
            with_vlan(&icmp_echo((mac, CLIENT_MAC), vip, client, 64, true), 42),
            &["icmp_echo_reply"],
        ),
        pass(
            "ICMP echo to a Vip address whose Vips have icmp_echo off goes to the local stack",
            icmp_echo((CLIENT_MAC, mac), client, ip(NO_ECHO_ADDR), 9, false),
            "pass_vip_other",
        ),
        pass(
            "ICMP echo to a non-Vip is passed",
            icmp_echo((CLIENT_MAC, mac), client, ip("10.111.0.1"), 9, false),
            "pass_not_vip",
        ),
        pass(
            "an ICMP echo reply to a Vip address goes to the local stack",
            icmp_echo((CLIENT_MAC, mac), client, vip, 9, true),
            "pass_vip_other",
        ),
        drop(
            "an echo request cut short by its IP total length is dropped",
            short_echo,
            &["drop_malformed"],
        ),
        tx(
            "ICMP fragmentation-needed goes to the quoted flow's backend",
            icmp.clone(),
            ipip(lab, &icmp, 14, VIP_TCP, &syn_flow),
            &["icmp_to_backend", "tx"],
        ),
        tx(
            "an any-port Vip in L2 DSR mode rewrites only the MACs",
            dsr.clone(),
            expect_l2(&dsr, mac, dsr_backend.mac),
            miss_tx,
        ),
        tx(
            "IPv6 SYN to a Vip is IPv6-in-IPv6 encapsulated",
            syn6.clone(),
            ip6ip6(lab, &syn6, VIP_V6, &syn6_flow),
            miss_tx,
        ),
        tx(
            "ICMPv6 packet-too-big goes to the quoted flow's backend",
            icmp6.clone(),
            ip6ip6(lab, &icmp6, VIP_V6, &syn6_flow),
            &["icmp_to_backend", "tx"],
        ),
        drop(
            "an IPv4 first fragment to a Vip is dropped",
            as_fragment(&syn, true, 0),
            &["drop_fragment"],
        ),
        drop(
            "an IPv4 later fragment to a Vip is dropped",
            as_fragment(&syn, false, 100),
            &["drop_fragment"],
        ),
        pass(
            "an IPv4 fragment to a non-Vip is passed",
            as_fragment(
                &tcp(mac, client, 40013, ip("10.111.0.1"), 22, true),
                true,
                0,
            ),
            "pass_not_vip",
        ),
        drop(
            "an IPv6 fragment header to a Vip is dropped",
            with_ipv6_ext(&syn6, 44),
            &["drop_fragment"],
        ),
        tx(
            "a first fragment to a fragments: track Vip goes to its flow's backend",
            frags[0].clone(),
            ipip(lab, &frags[0], 14, VIP_FRAGMENTS, &frag_flow),
            &["fragment_tracked", "conntrack_miss", "tx"],
        ),
        tx(
            "its middle fragment follows it, by (source, destination, IP id, protocol)",
            frags[1].clone(),
            ipip(lab, &frags[1], 14, VIP_FRAGMENTS, &frag_flow),
            tracked_hit,
        ),
        tx(
            "its last fragment follows it",
            frags[2].clone(),
            ipip(lab, &frags[2], 14, VIP_FRAGMENTS, &frag_flow),
            tracked_hit,
        ),
        drop(
            "a later fragment whose first was never seen is dropped",
            orphan[1].clone(),
            &["drop_fragment_unknown"],
        ),
        pass(
            "a first fragment to a port of a tracking address with no Vip goes to the stack",
            other_port[0].clone(),
            "pass_vip_other",
        ),
        tx(
            "an IPv6 first fragment to a fragments: track Vip goes to its flow's backend",
            frags6[0].clone(),
            ip6ip6(lab, &frags6[0], VIP_FRAGMENTS6, &frag6_flow),
            &["fragment_tracked", "conntrack_miss", "tx"],
        ),
        tx(
            "an IPv6 later fragment follows its first",
            frags6[2].clone(),
            ip6ip6(lab, &frags6[2], VIP_FRAGMENTS6, &frag6_flow),
            tracked_hit,
        ),
        drop(
            "an IPv6 later fragment whose first was never seen is dropped",
            orphan6[2].clone(),
            &["drop_fragment_unknown"],
        ),
        tx(
            "an IPv4 Vip with IPv6 backends: IPv4-in-IPv6 to the Maglev backend",
            mixed_syn.clone(),
            ip4in6(lab, &mixed_syn, VIP_MIXED, &mixed_flow),
            miss_tx,
        ),
        tx(
            "its next packet: the connection table, never the flow cache (full path again)",
            mixed_ack.clone(),
            ip4in6(lab, &mixed_ack, VIP_MIXED, &mixed_flow),
            &["conntrack_hit", "tx"],
        ),
        tx(
            "an IPv4 Vip in L2 DSR with IPv6 backends: only the MACs change",
            mixed_dsr.clone(),
            expect_l2(&mixed_dsr, mac, mixed_dsr_backend.mac),
            miss_tx,
        ),
        drop(
            "an IPv6 hop-by-hop header to a Vip is dropped",
            with_ipv6_ext(&syn6, 0),
            &["drop_ipv6_ext"],
        ),
        drop(
            "an IPv6 routing header to a Vip is dropped",
            with_ipv6_ext(&syn6, 43),
            &["drop_ipv6_ext"],
        ),
        drop(
            "an IPv6 destination-options header to a Vip is dropped",
            with_ipv6_ext(&syn6, 60),
            &["drop_ipv6_ext"],
        ),
        drop(
            "a Vip with no backend drops",
            tcp(mac, client, 40014, ip("10.200.0.3"), 80, true),
            &["conntrack_miss", "drop_no_backend"],
        ),
        pass_with(
            "a Vip with no backend set to pass passes",
            tcp(mac, client, 40015, ip("10.200.0.4"), 80, true),
            &["conntrack_miss", "pass_no_backend"],
        ),
        // (A frame shorter than Ethernet cannot be fed in: BPF_PROG_TEST_RUN refuses it.)
        pass(
            "a truncated VLAN tag is passed",
            with_vlan(&syn, 1)[..16].to_vec(),
            "pass_malformed",
        ),
        pass(
            "a truncated IPv4 header is passed",
            syn[..14 + 12].to_vec(),
            "pass_malformed",
        ),
        pass("IPv4 with IHL < 5 is passed", ihl4, "pass_malformed"),
        pass(
            "version 6 under the IPv4 EtherType is passed",
            version6_in_v4,
            "pass_malformed",
        ),
        pass(
            "IPv4 total length beyond the frame is passed",
            long_tot_len,
            "pass_malformed",
        ),
        pass(
            "IPv4 total length shorter than its header is passed",
            short_tot_len,
            "pass_malformed",
        ),
        drop(
            "a truncated TCP header to a Vip is dropped",
            truncated_tcp,
            &["drop_malformed"],
        ),
        drop(
            "TCP data offset < 5 to a Vip is dropped",
            bad_doff,
            &["drop_malformed"],
        ),
        drop(
            "UDP length < 8 to a Vip is dropped",
            bad_udp_len,
            &["drop_malformed"],
        ),
        drop(
            "TCP data offset past the segment to a Vip is dropped",
            long_doff,
            &["drop_malformed"],
        ),
        drop(
            "TCP data offset past the segment in IPv6 to a Vip is dropped",
            long_doff6,
            &["drop_malformed"],
        ),
        drop(
            "UDP length beyond the IP payload to a Vip is dropped",
            long_udp_len,
            &["drop_malformed"],
        ),
        drop(
            "UDP length beyond the IPv6 payload to a Vip is dropped",
            long_udp_len6,
            &["drop_malformed"],
        ),
        drop(
            "UDP length beyond an IPv4 total length shorter than the frame is dropped",
            udp_past_tot_len,
            &["drop_malformed"],
        ),
        pass(
            "a truncated IPv6 header is passed",
            syn6[..14 + 30].to_vec(),
            "pass_malformed",
        ),
        pass(
            "IPv6 payload length beyond the frame is passed",
            long_payload6,
            "pass_malformed",
        ),
        drop(
            "a truncated TCP header in IPv6 to a Vip is dropped",
            truncated_tcp6,
            &["drop_malformed"],
        ),
        drop(
            "an ICMP error with a truncated quote is dropped",
            short_quote,
            &["drop_malformed"],
        ),
    ]
}

fn pass_with(description: &'static str, input: Vec<u8>, counters: &[&'static str]) -> Fixture {
    Fixture {
        description,
        input,
        action: XDP_PASS,
        output: None,
        counters: counters.iter().map(|c| (*c, 1)).collect(),
    }
}

fn action_name(action: u32) -> &'static str {
    ["ABORTED", "DROP", "PASS", "TX", "REDIRECT"]
        .get(action as usize)
        .copied()
        .unwrap_or("?")
}

#[test]
fn fixtures_give_expected_action_packet_and_counters() {
    let mut lab = Lab::new();
    let mut failures = Vec::new();
    for fixture in fixtures(&lab) {
        let before = lab.counters();
        let out = lab.run(&fixture.input);
        let after = lab.counters();
        let mut problems = Vec::new();
        if out.action != fixture.action {
            problems.push(format!(
                "action {} (want {})",
                action_name(out.action),
                action_name(fixture.action)
            ));
        }
        let want = match (&fixture.output, fixture.action) {
            (Some(packet), _) => Some(packet),
            (None, XDP_PASS) => Some(&fixture.input),
            _ => None,
        };
        if let Some(want) = want
            && out.packet != *want
        {
            problems.push(format!(
                "packet\n  got  {}\n  want {}",
                hex(&out.packet),
                hex(want)
            ));
        }
        let mut got = deltas(&before, &after);
        let mut want = fixture.counters.clone();
        got.sort();
        want.sort();
        if got != want {
            problems.push(format!("counters {got:?} (want {want:?})"));
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {}", fixture.description, problems.join("; ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} fixture(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn encapsulated_ipv4_headers_have_valid_checksums() {
    let mut lab = Lab::new();
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..200 {
        let sport = rng.random_range(1024..65535);
        let client = IpAddr::V4(Ipv4Addr::new(10, 50, rng.random(), rng.random()));
        let out = lab.run(&tcp(lab.lb_mac, client, sport, ip(VIP), 80, true));
        assert_eq!(out.action, XDP_TX);
        let outer = &out.packet[14..34];
        assert_eq!(checksum(outer), 0, "outer IPv4 header checksum");
        let (header, _) = etherparse::Ipv4Header::from_slice(outer).unwrap();
        assert_eq!(header.calc_header_checksum(), header.header_checksum);
        let inner = &out.packet[34..54];
        assert_eq!(checksum(inner), 0, "inner IPv4 header checksum untouched");
    }
}

/// A random client address in fd00:50::/96 or 10.50.0.0/16 – 10.59.0.0/16.
fn random_client(rng: &mut StdRng, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0x50,
            0,
            0,
            0,
            0,
            rng.random(),
            rng.random(),
        ))
    } else {
        IpAddr::V4(Ipv4Addr::new(
            10,
            rng.random_range(50..60),
            rng.random(),
            rng.random(),
        ))
    }
}

/// Userspace predicts every backend choice exactly (same hash, same table).
#[test]
fn kernel_backend_choice_equals_userspace_for_10000_random_flows() {
    let mut lab = Lab::new();
    let mut rng = StdRng::seed_from_u64(42);
    let flows: Vec<(Flow, Vec<u8>)> = (0..10_000)
        .map(|i| {
            let v6 = i % 10 == 0;
            let src = random_client(&mut rng, v6);
            let dst = if v6 { ip(VIP6) } else { ip(VIP) };
            let sport = rng.random_range(1024..65535);
            let f = Flow {
                src,
                dst,
                sport,
                dport: 80,
                proto: PROTO_TCP,
            };
            (f, tcp(lab.lb_mac, src, sport, dst, 80, true))
        })
        .collect();
    let outs = run_all(&mut lab, flows.iter().map(|(_, pkt)| pkt));
    let mut mismatches = 0;
    let mut per_backend = std::collections::BTreeMap::<u32, u32>::new();
    for ((f, _), (action, packet)) in flows.iter().zip(&outs) {
        assert_eq!(*action, XDP_TX);
        let vip = if f.src.is_ipv4() { VIP_TCP } else { VIP_V6 };
        let predicted = lab.predict(vip, f);
        let chosen = outer_backend(&lab, packet, f.src.is_ipv4());
        *per_backend.entry(chosen).or_default() += 1;
        if chosen != predicted {
            mismatches += 1;
        }
    }
    assert_eq!(
        mismatches, 0,
        "kernel and userspace disagree on {mismatches} of 10000 flows"
    );
    // And the flows spread over every backend of each Vip.
    assert_eq!(
        per_backend.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5],
        "{per_backend:?}"
    );

    // Every flow's next packet stays on its backend, whether it is found in this CPU's
    // flow cache (8192 slots here, so many collide) or in the LRU connection table.
    let mac = lab.lb_mac;
    let before = lab.counters();
    let again: Vec<(u32, Vec<u8>)> = lab.with_dataplane(|dp, ifindex| {
        flows
            .iter()
            .map(|(f, _)| {
                let ack = tcp(mac, f.src, f.sport, f.dst, 80, false);
                let out = dp.test_run("lb_ingress", &ack, ifindex, 1).unwrap();
                (out.action, out.packet)
            })
            .collect()
    });
    let after = lab.counters();
    for ((f, _), ((_, first), (action, second))) in flows.iter().zip(outs.iter().zip(&again)) {
        assert_eq!(*action, XDP_TX);
        let outer = if f.src.is_ipv4() { 14..34 } else { 14..54 };
        assert_eq!(
            first[outer.clone()],
            second[outer],
            "{f:?} changed backend on its second packet"
        );
    }
    let hits = deltas(&before, &after);
    assert!(hits.contains(&("conntrack_hit", 10_000)), "{hits:?}");
}

/// Invariant 2: the connection table keeps a flow on its backend through table changes;
/// when the backend goes down the flow is re-steered by the table, not dropped.
#[test]
fn established_flow_survives_table_change_and_resteers_when_backend_down() {
    let mut lab = Lab::new();
    let client = ip(CLIENT);
    let f = flow(CLIENT, 41000, VIP, 80, 6);
    let first = lab.run(&tcp(lab.lb_mac, client, 41000, ip(VIP), 80, true));
    let backend_of = |packet: &[u8]| Ipv4Addr::from(<[u8; 4]>::try_from(&packet[30..34]).unwrap());
    let original = backend_of(&first.packet);
    let original_id = lab.backend_by_addr(original.into()).unwrap().id;
    assert_eq!(original_id, lab.predict(VIP_TCP, &f));

    // A new table without the flow's backend: the flow stays (its backend is still up).
    let others: Vec<u32> = [1, 2, 3]
        .into_iter()
        .filter(|&b| b != original_id)
        .collect();
    lab.set_table(VIP_TCP, &others);
    for _ in 0..3 {
        let out = lab.run(&tcp(lab.lb_mac, client, 41000, ip(VIP), 80, false));
        assert_eq!(out.action, XDP_TX);
        assert_eq!(
            backend_of(&out.packet),
            original,
            "flow moved while its backend was up"
        );
    }

    // Its backend goes down: re-steered by the new table, counted, not dropped.
    lab.set_backend_up(original_id, false);
    let before = lab.counters();
    let out = lab.run(&tcp(lab.lb_mac, client, 41000, ip(VIP), 80, false));
    let after = lab.counters();
    assert_eq!(out.action, XDP_TX, "re-steered, not dropped");
    let resteered = backend_of(&out.packet);
    let resteered_id = lab.backend_by_addr(resteered.into()).unwrap().id;
    assert_eq!(resteered_id, lab.predict(VIP_TCP, &f));
    assert_ne!(resteered, original);
    assert!(deltas(&before, &after).contains(&("conntrack_resteer", 1)));

    // The backend comes back: the flow stays where it was re-steered to.
    lab.set_backend_up(original_id, true);
    let out = lab.run(&tcp(lab.lb_mac, client, 41000, ip(VIP), 80, false));
    assert_eq!(backend_of(&out.packet), resteered);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The flow cache holds whole Routes: any change to a Vip or a Backend must void them, so
/// a cached flow never goes where the daemon no longer sends it.
#[test]
fn cached_routes_die_with_their_vip() {
    let mut lab = Lab::new();
    let client = ip(CLIENT);
    let packet = tcp(lab.lb_mac, client, 42000, ip(VIP), 80, false);
    for _ in 0..3 {
        assert_eq!(lab.run(&packet).action, XDP_TX, "warming the flow cache");
    }
    let before = lab.counters();
    let key = lb_testbed::lab::vip_key(ip(VIP), 80, PROTO_TCP);
    lab.dataplane.remove_vip(VIP_TCP, &key).unwrap();
    let out = lab.run(&packet);
    assert_eq!(
        out.action, XDP_PASS,
        "a removed Vip's cached flow was forwarded"
    );
    assert_eq!(out.packet, packet, "passed untouched");
    let moved = deltas(&before, &lab.counters());
    assert!(
        !moved.iter().any(|(c, _)| *c == "conntrack_hit"),
        "{moved:?}"
    );
}

/// The fast path handles only plain packets of cached flows; every other packet of such a
/// flow must get what the full path gives it: forwarded the same way, or dropped.
#[test]
fn cached_flow_variants_take_the_full_path() {
    let mut lab = Lab::new();
    let (mac, client, vip) = (lab.lb_mac, ip(CLIENT), ip(VIP));
    let ack = tcp(mac, client, 43000, vip, 80, false);
    let mut plain = lab.run(&ack);
    for _ in 0..2 {
        plain = lab.run(&ack);
        assert_eq!(plain.action, XDP_TX, "warming the flow cache");
    }
    let (dmac, smac) = (
        <[u8; 6]>::try_from(&plain.packet[0..6]).unwrap(),
        <[u8; 6]>::try_from(&plain.packet[6..12]).unwrap(),
    );
    let src = <[u8; 4]>::try_from(&plain.packet[26..30]).unwrap();
    let dst = <[u8; 4]>::try_from(&plain.packet[30..34]).unwrap();

    let tagged = with_vlan(&ack, 42);
    let out = lab.run(&tagged);
    assert_eq!(out.action, XDP_TX, "VLAN-tagged");
    assert_eq!(
        hex(&out.packet),
        hex(&expect_ipip_at(&tagged, 18, smac, dmac, src, dst))
    );

    let options = with_ipv4_options(&ack);
    let out = lab.run(&options);
    assert_eq!(out.action, XDP_TX, "IP options");
    assert_eq!(
        hex(&out.packet),
        hex(&expect_ipip(&options, smac, dmac, src, dst))
    );

    let mut bad_doff = ack.clone();
    bad_doff[14 + 20 + 12] = 0x40;
    let before = lab.counters();
    assert_eq!(lab.run(&bad_doff).action, XDP_DROP, "TCP data offset 4");
    assert!(deltas(&before, &lab.counters()).contains(&("drop_malformed", 1)));

    let before = lab.counters();
    let fragment = as_fragment(&ack, true, 0);
    assert_eq!(lab.run(&fragment).action, XDP_DROP, "first fragment");
    assert!(deltas(&before, &lab.counters()).contains(&("drop_fragment", 1)));

    let ack6 = tcp(mac, ip(CLIENT6), 43000, ip(VIP6), 80, false);
    for _ in 0..3 {
        assert_eq!(
            lab.run(&ack6).action,
            XDP_TX,
            "warming the flow cache (IPv6)"
        );
    }
    let before = lab.counters();
    let routing = with_ipv6_ext(&ack6, 43);
    assert_eq!(lab.run(&routing).action, XDP_DROP, "IPv6 routing header");
    assert!(deltas(&before, &lab.counters()).contains(&("drop_ipv6_ext", 1)));
}

/// A flow whose flow-cache slot another flow took keeps its backend from the connection
/// table, not from a Maglev table that changed in between (invariant 2 on the fast path's
/// cache-miss branch).
#[test]
fn evicted_flow_keeps_its_backend_from_the_connection_table() {
    let mut lab = Lab::new();
    let mask =
        lb_common::consts::flow_cache_slots(lab.dataplane.capacities().flow_cache_entries) - 1;
    let (mac, client, vip) = (lab.lb_mac, ip(CLIENT), ip(VIP));
    let a = flow(CLIENT, 44000, VIP, 80, 6);
    let slot = a.hash(SEED) & mask;
    // Another flow of the same Vip that lands in the same slot.
    let sport_b = (44001..u16::MAX)
        .find(|&p| flow(CLIENT, p, VIP, 80, 6).hash(SEED) & mask == slot)
        .expect("a colliding flow");
    let backend_of = |packet: &[u8]| Ipv4Addr::from(<[u8; 4]>::try_from(&packet[30..34]).unwrap());

    let packet_a = tcp(mac, client, 44000, vip, 80, false);
    let first = lab.run(&packet_a);
    assert_eq!(first.action, XDP_TX);
    let original = backend_of(&first.packet);
    let original_id = lab.backend_by_addr(original.into()).unwrap().id;
    // A new table without flow A's backend, which stays up.
    let others: Vec<u32> = [1, 2, 3]
        .into_iter()
        .filter(|&b| b != original_id)
        .collect();
    lab.set_table(VIP_TCP, &others);
    // Flow B takes A's cache slot.
    assert_eq!(
        lab.run(&tcp(mac, client, sport_b, vip, 80, false)).action,
        XDP_TX
    );

    let before = lab.counters();
    let out = lab.run(&packet_a);
    assert_eq!(out.action, XDP_TX);
    assert_eq!(
        backend_of(&out.packet),
        original,
        "flow A moved after losing its cache slot"
    );
    assert!(deltas(&before, &lab.counters()).contains(&("conntrack_hit", 1)));
}

/// BPF_PROG_TEST_RUN on a program fd: the Dataplane is busy on another thread.
fn raw_test_run(prog: std::os::fd::BorrowedFd<'_>, packet: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
    lb_userspace::dataplane::test_run_fd(prog, packet, ifindex)
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"))
}

/// Invariant 3 for the global config: while the daemon rewrites it, every packet sees the
/// old one or the new one. Config A has the Vip in its filter and seed SEED; config B has an
/// empty filter and another seed. The program reads the filter before the seed, so a packet
/// that saw half of a write of B over A (A's filter, B's seed) is forwarded with B's hash:
/// an outer source address neither config gives.
#[test]
fn a_packet_sees_the_old_global_config_or_the_new_one() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut lab = Lab::new();
    let a = lab.dataplane.global().unwrap();
    let b = lb_common::types::GlobalConfig {
        hash_seed: SEED ^ 0x0bad_5eed,
        vip_filter: Default::default(),
        ..a
    };
    let mac = lab.lb_mac;
    let mut rng = StdRng::seed_from_u64(15);
    // Distinct flows, so that no packet hits the connection table or the flow cache; and
    // none whose bucket and tag an earlier one has (a SYN follows such a way: 1 or 2 of
    // 200,000 in this table).
    let mask = lab.dataplane.capacities().conntrack_buckets() - 1;
    let mut places = std::collections::HashSet::new();
    let flows: Vec<(Flow, Vec<u8>)> = (0..200_000u32)
        .filter_map(|i| {
            let src = IpAddr::V4(Ipv4Addr::new(
                10,
                60 + (i >> 16) as u8,
                rng.random(),
                rng.random(),
            ));
            let sport = 1024 + (i % 60_000) as u16;
            let f = flow(&src.to_string(), sport, VIP, 80, PROTO_TCP);
            let p = place(f.conntrack_hash(CONNTRACK_SEED), mask);
            let fresh = places.insert((p.first, p.tag)) & places.insert((p.second, p.tag));
            fresh.then(|| (f, tcp(mac, src, sport, ip(VIP), 80, true)))
        })
        .collect();
    let expected_a: Vec<Vec<u8>> = flows
        .iter()
        .map(|(f, pkt)| ipip(&lab, pkt, 14, VIP_TCP, f))
        .collect();
    let done = AtomicBool::new(false);
    let (outcomes, writes) = lab.with_dataplane(|dp, ifindex| {
        let prog = dp
            .xdp(lb_common::consts::prog_names::LB_INGRESS)
            .unwrap()
            .fd()
            .unwrap()
            .try_clone()
            .unwrap();
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let outcomes: Vec<(u32, Vec<u8>)> = flows
                    .iter()
                    .map(|(_, pkt)| raw_test_run(prog.as_fd(), pkt, ifindex))
                    .collect();
                done.store(true, Ordering::Relaxed);
                outcomes
            });
            let mut writes = 0u64;
            while !done.load(Ordering::Relaxed) {
                let epoch = a.cache_epoch.wrapping_add(writes as u32).max(1);
                let next = if writes.is_multiple_of(2) { &b } else { &a };
                dp.write_global(&lb_common::types::GlobalConfig {
                    cache_epoch: epoch,
                    ..*next
                })
                .unwrap();
                writes += 1;
            }
            (reader.join().unwrap(), writes)
        })
    });
    use std::os::fd::AsFd as _;
    let (mut seen_a, mut seen_b, mut mixed) = (0, 0, Vec::new());
    for (i, ((action, packet), want_a)) in outcomes.iter().zip(&expected_a).enumerate() {
        if *action == XDP_TX && packet == want_a {
            seen_a += 1;
        } else if *action == XDP_PASS && *packet == flows[i].1 {
            seen_b += 1;
        } else {
            mixed.push(format!(
                "flow {i}: {} {}",
                action_name(*action),
                hex(packet)
            ));
        }
    }
    eprintln!(
        "{writes} config writes; packets saw A {seen_a}, B {seen_b}, a mix {}",
        mixed.len()
    );
    assert!(writes > 100, "only {writes} config writes during the run");
    assert!(
        seen_a > 0 && seen_b > 0,
        "A {seen_a}, B {seen_b}: the configs did not alternate"
    );
    assert!(
        mixed.is_empty(),
        "{} packets saw a mixed config:\n{}",
        mixed.len(),
        mixed[..mixed.len().min(5)].join("\n")
    );
}

/// A Backend marked down is never picked for a new flow, even from a table that still lists
/// it (the window before the daemon swaps in a table without it); an established flow on it
/// is re-steered even if its generation did not move (the UP flag alone decides).
#[test]
fn a_down_backend_gets_no_new_flow_before_the_table_swap() {
    let mut lab = Lab::new();
    let (mac, client, vip) = (lab.lb_mac, ip(CLIENT), ip(VIP));
    let down = 1;
    // Flows the (unchanged) table sends to backend 1.
    let ports: Vec<u16> = (45000..u16::MAX)
        .filter(|&p| lab.predict(VIP_TCP, &flow(CLIENT, p, VIP, 80, 6)) == down)
        .take(20)
        .collect();
    // One of them established first, while backend 1 is up.
    let established = tcp(mac, client, ports[0], vip, 80, false);
    assert_eq!(lab.run(&established).action, XDP_TX);

    // Down by its flag only, same generation, table untouched.
    let mut backend = lab.dataplane.backend(down).unwrap();
    backend.flags &= !lb_common::consts::backend_flags::UP;
    lab.dataplane.set_backend(down, &backend).unwrap();

    let dead = lab.backend(down).addr;
    for (i, &port) in ports.iter().enumerate().skip(1) {
        let syn = i % 2 == 0;
        let before = lab.counters();
        let out = lab.run(&tcp(mac, client, port, vip, 80, syn));
        assert_eq!(
            out.action,
            XDP_DROP,
            "new flow {port} (SYN {syn}) to down backend {dead}: {}",
            action_name(out.action)
        );
        assert!(deltas(&before, &lab.counters()).contains(&("drop_no_backend", 1)));
    }
    let before = lab.counters();
    let out = lab.run(&established);
    let moved = deltas(&before, &lab.counters());
    assert!(
        moved.contains(&("conntrack_resteer", 1)),
        "the established flow on a down backend was not re-steered: {moved:?}"
    );
    assert_ne!(
        out.action, XDP_TX,
        "re-steered into the same stale table slot, yet sent"
    );
}

/// A Vip removed and added again under the same id with another pool (a new generation)
/// does not keep its old connection-table entries: their flows follow the new pool.
#[test]
fn a_vip_readded_with_another_pool_drops_its_old_flows_backends() {
    let mut lab = Lab::new();
    let (mac, client, vip) = (lab.lb_mac, ip(CLIENT), ip(VIP));
    let key = lb_testbed::lab::vip_key(vip, 80, PROTO_TCP);
    let backend_of = |packet: &[u8]| Ipv4Addr::from(<[u8; 4]>::try_from(&packet[30..34]).unwrap());
    let flows: Vec<u16> = (46000..46050).collect();
    let mut first = Vec::new();
    for &port in &flows {
        let out = lab.run(&tcp(mac, client, port, vip, 80, false));
        assert_eq!(out.action, XDP_TX);
        first.push(
            lab.backend_by_addr(backend_of(&out.packet).into())
                .unwrap()
                .id,
        );
    }
    // Backend 3 stays up, but the re-added Vip's pool is backends 1 and 2 only.
    lab.dataplane.remove_vip(VIP_TCP, &key).unwrap();
    lab.set_table(VIP_TCP, &[1, 2]);
    let flags = lab.vips.iter().find(|v| v.id == VIP_TCP).unwrap().flags;
    lab.dataplane
        .set_vip(
            VIP_TCP,
            &key,
            &lb_common::types::VipState {
                flags,
                generation: 2,
            },
        )
        .unwrap();
    let mut stayed_on_3 = 0;
    for (&port, &was) in flows.iter().zip(&first) {
        let out = lab.run(&tcp(mac, client, port, vip, 80, false));
        assert_eq!(out.action, XDP_TX);
        let now = lab
            .backend_by_addr(backend_of(&out.packet).into())
            .unwrap()
            .id;
        assert_eq!(
            now,
            lab.predict(VIP_TCP, &flow(CLIENT, port, VIP, 80, 6)),
            "flow {port} (was on {was}) is not on the new pool's table backend"
        );
        stayed_on_3 += usize::from(now == 3);
    }
    assert!(
        first.contains(&3),
        "no flow was on backend 3 to begin with: {first:?}"
    );
    assert_eq!(stayed_on_3, 0);
}

/// Pins the calling thread to CPU 0: the echo budget is per CPU.
fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t is valid; the call changes only this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn echo_replies_stop_at_the_rate_and_resume_with_a_new_budget() {
    let mut lab = Lab::new();
    let mac = lab.lb_mac;
    let ping = icmp_echo((CLIENT_MAC, mac), ip(CLIENT), ip(VIP), 9, false);
    let before = lab.counters();
    let actions = lab.with_dataplane(|dp, ifindex| {
        pin_to_cpu0();
        dp.set_icmp_rate(lb_common::consts::icmp_rate_slots::ECHO, 3)
            .unwrap();
        let mut actions: Vec<u32> = (0..5)
            .map(|_| dp.test_run("lb_ingress", &ping, ifindex, 1).unwrap().action)
            .collect();
        // A new budget (a reload) starts a fresh window.
        dp.set_icmp_rate(lb_common::consts::icmp_rate_slots::ECHO, 1)
            .unwrap();
        actions
            .extend((0..2).map(|_| dp.test_run("lb_ingress", &ping, ifindex, 1).unwrap().action));
        actions
    });
    assert_eq!(
        actions,
        [XDP_TX, XDP_TX, XDP_TX, XDP_DROP, XDP_DROP, XDP_TX, XDP_DROP],
        "3 per second, then 1"
    );
    let mut got = deltas(&before, &lab.counters());
    got.sort();
    assert_eq!(got, [("icmp_echo_limited", 3), ("icmp_echo_reply", 4)]);
}

/// Runs `lb_ingress` on each packet: action and output.
fn run_all<'a>(
    lab: &mut Lab,
    packets: impl Iterator<Item = &'a Vec<u8>> + Send,
) -> Vec<(u32, Vec<u8>)> {
    lab.with_dataplane(|dp, ifindex| {
        packets
            .map(|pkt| {
                let out = dp.test_run("lb_ingress", pkt, ifindex, 1).unwrap();
                (out.action, out.packet)
            })
            .collect()
    })
}

/// The backend an encapsulated output goes to, by its outer destination (IPv4 or IPv6
/// outer header, as the client's packet was).
fn outer_backend(lab: &Lab, packet: &[u8], v4: bool) -> u32 {
    let dst: IpAddr = if v4 {
        IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(&packet[30..34]).unwrap(),
        ))
    } else {
        IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(&packet[38..54]).unwrap(),
        ))
    };
    lab.backend_by_addr(dst).expect("a known backend").id
}

/// The backend the kernel sent each packet to, and the backend userspace predicts for
/// its flow to `vip`.
fn kernel_and_predicted(lab: &mut Lab, vip: u32, flows: &[(Flow, Vec<u8>)]) -> Vec<(u32, u32)> {
    let outs = run_all(lab, flows.iter().map(|(_, pkt)| pkt));
    flows
        .iter()
        .zip(outs)
        .map(|((f, _), (action, packet))| {
            assert_eq!(action, XDP_TX, "{f:?}");
            (
                outer_backend(lab, &packet, f.src.is_ipv4()),
                lab.predict(vip, f),
            )
        })
        .collect()
}

#[test]
fn hash_modes_keep_a_client_or_a_port_on_one_backend_and_spread_the_rest() {
    let mut lab = Lab::new();
    let mac = lab.lb_mac;
    let mut rng = StdRng::seed_from_u64(16);
    // Source mode: 200 IPv4 and 60 IPv6 clients, 5 connections each from random ports.
    for (vip, dst, v6, clients, backends) in [
        (VIP_SOURCE_HASH, "10.200.0.5", false, 200, 3),
        (VIP_SOURCE_HASH6, "fd00:200::2", true, 60, 2),
    ] {
        let mut flows = Vec::new();
        for _ in 0..clients {
            let src = random_client(&mut rng, v6);
            for _ in 0..5 {
                let sport = rng.random_range(1024..65535);
                let f = flow(&src.to_string(), sport, dst, 80, PROTO_TCP);
                flows.push((f, tcp(mac, src, sport, ip(dst), 80, true)));
            }
        }
        let got = kernel_and_predicted(&mut lab, vip, &flows);
        let mut per_backend = std::collections::BTreeMap::<u32, u32>::new();
        for (client, chunk) in got.chunks(5).enumerate() {
            assert!(
                chunk.iter().all(|&(k, p)| k == p && k == chunk[0].0),
                "client {client}: kernel / predicted {chunk:?}: not one backend"
            );
            *per_backend.entry(chunk[0].0).or_default() += 1;
        }
        // Stickiness must not cost the spread: every backend gets clients.
        assert_eq!(per_backend.len(), backends, "{per_backend:?}");
        let least = *per_backend.values().min().unwrap() as f64;
        assert!(
            least > 0.6 * clients as f64 / backends as f64,
            "{per_backend:?}"
        );
    }
    // Destination-port mode: 150 ports of the any-port UDP Vip, 4 clients each.
    let mut flows = Vec::new();
    for _ in 0..150 {
        let dport: u16 = rng.random_range(1..65535);
        for _ in 0..4 {
            let src = IpAddr::V4(Ipv4Addr::new(10, 51, rng.random(), rng.random()));
            let sport = rng.random_range(1024..65535);
            let f = flow(&src.to_string(), sport, "10.200.0.6", dport, 17);
            flows.push((f, udp(mac, src, sport, ip("10.200.0.6"), dport)));
        }
    }
    let got = kernel_and_predicted(&mut lab, VIP_DPORT_HASH, &flows);
    let mut per_backend = std::collections::BTreeMap::<u32, u32>::new();
    for (port, chunk) in got.chunks(4).enumerate() {
        assert!(
            chunk.iter().all(|&(k, p)| k == p && k == chunk[0].0),
            "port {port}: kernel / predicted {chunk:?}: not one backend"
        );
        *per_backend.entry(chunk[0].0).or_default() += 1;
    }
    assert_eq!(per_backend.len(), 3, "{per_backend:?}");
    // And a 5-tuple Vip does spread one client's connections (the modes are per Vip).
    let src = ip(CLIENT);
    let flows: Vec<(Flow, Vec<u8>)> = (0..60)
        .map(|i| {
            let sport = 20_000 + i;
            let f = flow(CLIENT, sport, VIP, 80, PROTO_TCP);
            (f, tcp(mac, src, sport, ip(VIP), 80, true))
        })
        .collect();
    let got = kernel_and_predicted(&mut lab, VIP_TCP, &flows);
    assert!(got.iter().all(|&(k, p)| k == p));
    let distinct: std::collections::BTreeSet<u32> = got.iter().map(|&(k, _)| k).collect();
    assert_eq!(distinct.len(), 3, "{got:?}");
}

/// The counters of a packet `lb_ingress` passes because it is not for a Vip.
const NOT_FOR_A_VIP: [&str; 4] = [
    "pass_not_ip",
    "pass_not_vip",
    "pass_malformed",
    "pass_vip_other",
];

#[test]
fn a_next_program_gets_exactly_the_packets_not_for_a_vip() {
    let mut lab = Lab::new();
    // XDP_DROP: a verdict lb_ingress never gives these packets, so seeing it proves the
    // next program's verdict is what comes back.
    let next = lb_testbed::next::CountNext::load(XDP_DROP);
    let fixtures = fixtures(&lab);
    let chained = |f: &Fixture| {
        f.action == XDP_PASS && f.counters.iter().any(|(c, _)| NOT_FOR_A_VIP.contains(c))
    };
    let kinds: Vec<_> = fixtures
        .iter()
        .filter(|f| chained(f))
        .flat_map(|f| f.counters.iter().map(|(c, _)| *c))
        .collect();
    for kind in NOT_FOR_A_VIP {
        assert!(kinds.contains(&kind), "no fixture of {kind}");
    }
    lab.with_dataplane(|dataplane, ifindex| {
        dataplane
            .set_next_programs(&[(ifindex, next.fd())])
            .unwrap()
    });
    let mut failures = Vec::new();
    for fixture in &fixtures {
        let before = (lab.counters(), next.count());
        let out = lab.run(&fixture.input);
        let after = (lab.counters(), next.count());
        let (want_action, want_count) = match chained(fixture) {
            true => (XDP_DROP, 1),
            false => (fixture.action, 0),
        };
        let mut counters = deltas(&before.0, &after.0);
        let mut want_counters = fixture.counters.clone();
        counters.sort();
        want_counters.sort();
        let got = (out.action, after.1 - before.1, counters);
        if got != (want_action, want_count, want_counters.clone()) {
            failures.push(format!(
                "{}: action {}, counted {}, counters {:?} (want {}, {}, {:?})",
                fixture.description,
                action_name(got.0),
                got.1,
                got.2,
                action_name(want_action),
                want_count,
                want_counters
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Another interface (loopback) has no next program: its packets go to the kernel.
    let arp_in = arp(lab.lb_mac);
    let (action, counted) = (
        lab.with_dataplane(|dataplane, _| {
            dataplane
                .test_run(lb_common::consts::prog_names::LB_INGRESS, &arp_in, 1, 1)
                .unwrap()
                .action
        }),
        next.count(),
    );
    assert_eq!((action, counted), (XDP_PASS, kinds.len() as u64));
    // Removed: the kernel gets them again.
    lab.with_dataplane(|dataplane, _| dataplane.set_next_programs(&[]).unwrap());
    assert_eq!(lab.run(&arp_in).action, XDP_PASS);
    assert_eq!(next.count(), kinds.len() as u64);
}
