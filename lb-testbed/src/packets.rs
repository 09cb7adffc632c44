//! Packet builders (etherparse) for the fixtures, and the expected outputs, built
//! independently of the data plane's code.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::PacketBuilder;

use crate::lab::CLIENT_MAC;

pub const PAYLOAD: &[u8] = b"hello, backend";

/// The kernel's XDP actions (`enum xdp_action`), as `BPF_PROG_TEST_RUN` returns them.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// An address from its text (a test's own constant).
pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn v4(a: IpAddr) -> [u8; 4] {
    match a {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(_) => panic!("expected IPv4"),
    }
}

fn v6(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(_) => panic!("expected IPv6"),
    }
}

/// A TCP packet from `src:sport` to `dst:dport` (IPv4 or IPv6), SYN or ACK.
pub fn tcp(
    lb_mac: [u8; 6],
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    syn: bool,
) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, lb_mac);
    let ip = if src.is_ipv4() {
        eth.ipv4(v4(src), v4(dst), 64)
    } else {
        eth.ipv6(v6(src), v6(dst), 64)
    };
    let tcp = ip.tcp(sport, dport, 1000, 64240);
    let tcp = if syn { tcp.syn() } else { tcp.ack(1) };
    let mut out = Vec::new();
    tcp.write(&mut out, PAYLOAD).unwrap();
    out
}

pub fn udp(lb_mac: [u8; 6], src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, lb_mac);
    let ip = if src.is_ipv4() {
        eth.ipv4(v4(src), v4(dst), 64)
    } else {
        eth.ipv6(v6(src), v6(dst), 64)
    };
    let mut out = Vec::new();
    ip.udp(sport, dport).write(&mut out, PAYLOAD).unwrap();
    out
}

/// An ICMP or ICMPv6 echo request (`reply`: its reply) from `src` to `dst` with `ttl`,
/// between the given MACs.
pub fn icmp_echo(
    macs: ([u8; 6], [u8; 6]),
    src: IpAddr,
    dst: IpAddr,
    ttl: u8,
    reply: bool,
) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(macs.0, macs.1);
    let mut out = Vec::new();
    match (src.is_ipv4(), reply) {
        (true, false) => eth
            .ipv4(v4(src), v4(dst), ttl)
            .icmpv4_echo_request(7, 1)
            .write(&mut out, PAYLOAD),
        (true, true) => eth
            .ipv4(v4(src), v4(dst), ttl)
            .icmpv4_echo_reply(7, 1)
            .write(&mut out, PAYLOAD),
        (false, false) => eth
            .ipv6(v6(src), v6(dst), ttl)
            .icmpv6_echo_request(7, 1)
            .write(&mut out, PAYLOAD),
        (false, true) => eth
            .ipv6(v6(src), v6(dst), ttl)
            .icmpv6_echo_reply(7, 1)
            .write(&mut out, PAYLOAD),
    }
    .unwrap();
    out
}

/// ICMP "fragmentation needed" from a router to the Vip, quoting a TCP segment the
/// backend sent from `vip:vport` to `client:cport`.
pub fn icmp4_frag_needed(
    lb_mac: [u8; 6],
    router: Ipv4Addr,
    client: IpAddr,
    cport: u16,
    vip: IpAddr,
    vport: u16,
) -> Vec<u8> {
    let quoted = tcp([0; 6], vip, vport, client, cport, false);
    let quoted = &quoted[14..14 + 20 + 8];
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, lb_mac)
        .ipv4(router.octets(), v4(vip), 64)
        .icmpv4_raw(3, 4, [0, 0, 0x05, 0xdc])
        .write(&mut out, quoted)
        .unwrap();
    out
}

/// ICMPv6 "packet too big" to the Vip quoting a TCP segment from the Vip to the client.
pub fn icmp6_too_big(
    lb_mac: [u8; 6],
    router: Ipv6Addr,
    client: IpAddr,
    cport: u16,
    vip: IpAddr,
    vport: u16,
) -> Vec<u8> {
    let quoted = tcp([0; 6], vip, vport, client, cport, false);
    let quoted = &quoted[14..14 + 40 + 8];
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, lb_mac)
        .ipv6(router.octets(), v6(vip), 64)
        .icmpv6_raw(2, 0, [0, 0, 0x05, 0x00])
        .write(&mut out, quoted)
        .unwrap();
    out
}

pub fn arp(lb_mac: [u8; 6]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&[0xff; 6]);
    out.extend_from_slice(&CLIENT_MAC);
    out.extend_from_slice(&[0x08, 0x06]);
    out.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    out.extend_from_slice(&CLIENT_MAC);
    out.extend_from_slice(&[10, 111, 0, 50]);
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&[10, 111, 0, 1]);
    let _ = lb_mac;
    out
}

/// Replaces the EtherType of a frame.
pub fn with_ethertype(mut pkt: Vec<u8>, ethertype: u16) -> Vec<u8> {
    pkt[12..14].copy_from_slice(&ethertype.to_be_bytes());
    pkt
}

/// Inserts an 802.1Q tag with VLAN id `vid`.
pub fn with_vlan(pkt: &[u8], vid: u16) -> Vec<u8> {
    let mut out = pkt[..12].to_vec();
    out.extend_from_slice(&[0x81, 0x00]);
    out.extend_from_slice(&vid.to_be_bytes());
    out.extend_from_slice(&pkt[12..]);
    out
}

/// RFC 1071 checksum over `bytes` (even length).
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
        .sum();
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// Recomputes the IPv4 header checksum of the header at `l3`.
pub fn fix_ipv4_checksum(pkt: &mut [u8], l3: usize) {
    let ihl = (pkt[l3] & 0x0F) as usize * 4;
    pkt[l3 + 10..l3 + 12].fill(0);
    let sum = checksum(&pkt[l3..l3 + ihl]);
    pkt[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
}

/// Adds 4 bytes of NOP options to the IPv4 header (IHL 6).
pub fn with_ipv4_options(pkt: &[u8]) -> Vec<u8> {
    let mut out = pkt[..14 + 20].to_vec();
    out.extend_from_slice(&[1, 1, 1, 1]);
    out.extend_from_slice(&pkt[14 + 20..]);
    out[14] = 0x46;
    let len = u16::from_be_bytes([out[16], out[17]]) + 4;
    out[16..18].copy_from_slice(&len.to_be_bytes());
    fix_ipv4_checksum(&mut out, 14);
    out
}

/// Sets the IPv4 fragment fields (more-fragments flag, offset in 8-byte units).
pub fn as_fragment(pkt: &[u8], more: bool, offset: u16) -> Vec<u8> {
    let mut out = pkt.to_vec();
    let field = (if more { 0x2000 } else { 0 }) | offset;
    out[20..22].copy_from_slice(&field.to_be_bytes());
    fix_ipv4_checksum(&mut out, 14);
    out
}

/// A UDP datagram of `len` payload bytes from `src:sport` to `dst:dport` (IPv4 or IPv6),
/// cut into IP fragments of at most `chunk` bytes of IP payload (a multiple of 8) with
/// identification `id`, as a host's stack would send it.
pub fn udp_fragments(
    lb_mac: [u8; 6],
    (src, sport): (IpAddr, u16),
    (dst, dport): (IpAddr, u16),
    len: usize,
    chunk: usize,
    id: u32,
) -> Vec<Vec<u8>> {
    let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, lb_mac);
    let ip = if src.is_ipv4() {
        eth.ipv4(v4(src), v4(dst), 64)
    } else {
        eth.ipv6(v6(src), v6(dst), 64)
    };
    let mut whole = Vec::new();
    ip.udp(sport, dport).write(&mut whole, &payload).unwrap();
    let hlen = if src.is_ipv4() { 20 } else { 40 };
    let (head, body) = whole.split_at(14 + hlen);
    let pieces: Vec<&[u8]> = body.chunks(chunk).collect();
    pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let (offset, more) = ((i * chunk / 8) as u16, i + 1 < pieces.len());
            let mut out = head.to_vec();
            if src.is_ipv4() {
                out[16..18].copy_from_slice(&((20 + piece.len()) as u16).to_be_bytes());
                out[18..20].copy_from_slice(&(id as u16).to_be_bytes());
                let field = if more { 0x2000 } else { 0 } | offset;
                out[20..22].copy_from_slice(&field.to_be_bytes());
                fix_ipv4_checksum(&mut out, 14);
            } else {
                out[18..20].copy_from_slice(&((8 + piece.len()) as u16).to_be_bytes());
                out[20] = 44;
                out.extend_from_slice(&[17, 0]);
                out.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                out.extend_from_slice(&id.to_be_bytes());
            }
            out.extend_from_slice(piece);
            out
        })
        .collect()
}

/// Inserts an 8-byte IPv6 extension header of type `kind` in front of L4.
pub fn with_ipv6_ext(pkt: &[u8], kind: u8) -> Vec<u8> {
    let next = pkt[14 + 6];
    let mut out = pkt[..14 + 40].to_vec();
    out.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&pkt[14 + 40..]);
    out[14 + 6] = kind;
    let len = u16::from_be_bytes([out[18], out[19]]) + 8;
    out[18..20].copy_from_slice(&len.to_be_bytes());
    out
}

/// The IPIP packet the load balancer must emit for `input` (no VLAN): new MACs, an outer
/// IPv4 header from `src` to `dst`, the client's IP packet unchanged.
pub fn expect_ipip(
    input: &[u8],
    smac: [u8; 6],
    dmac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
) -> Vec<u8> {
    expect_ipip_at(input, 14, smac, dmac, src, dst)
}

pub fn expect_ipip_at(
    input: &[u8],
    l3: usize,
    smac: [u8; 6],
    dmac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
) -> Vec<u8> {
    let inner = &input[l3..];
    let inner_len = u16::from_be_bytes([inner[2], inner[3]]);
    let mut out = dmac.to_vec();
    out.extend_from_slice(&smac);
    out.extend_from_slice(&input[12..l3]);
    let mut outer = vec![0x45, inner[1]];
    outer.extend_from_slice(&(inner_len + 20).to_be_bytes());
    outer.extend_from_slice(&[0, 0, 0, 0, 64, 4, 0, 0]);
    outer.extend_from_slice(&src);
    outer.extend_from_slice(&dst);
    let sum = checksum(&outer);
    outer[10..12].copy_from_slice(&sum.to_be_bytes());
    out.extend_from_slice(&outer);
    out.extend_from_slice(inner);
    out
}

/// The IPv6-in-IPv6 packet for `input`: flow label from the flow hash.
pub fn expect_ip6ip6(
    input: &[u8],
    smac: [u8; 6],
    dmac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    hash: u32,
) -> Vec<u8> {
    expect_ip6ip6_at(input, 14, smac, dmac, src, dst, hash)
}

/// The same for an IPv6 header at `l3` (behind a VLAN tag, which stays).
pub fn expect_ip6ip6_at(
    input: &[u8],
    l3: usize,
    smac: [u8; 6],
    dmac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    hash: u32,
) -> Vec<u8> {
    let inner = &input[l3..];
    let payload = u16::from_be_bytes([inner[4], inner[5]]);
    let vtc = u32::from_be_bytes([inner[0], inner[1], inner[2], inner[3]]);
    let vtc = (vtc & 0xFFF0_0000) | (hash & 0x000F_FFFF);
    with_outer6(input, l3, (smac, dmac), (src, dst), vtc, payload + 40, 41)
}

/// `input`'s IP packet (at `l3`) behind a new L2 header (MACs, the input's VLAN tag if
/// any, EtherType IPv6) and an outer IPv6 header: `vtc` (version, class, flow label),
/// payload length, next header, hop limit 64, `src` to `dst`.
fn with_outer6(
    input: &[u8],
    l3: usize,
    (smac, dmac): ([u8; 6], [u8; 6]),
    (src, dst): ([u8; 16], [u8; 16]),
    vtc: u32,
    payload: u16,
    next: u8,
) -> Vec<u8> {
    let mut out = dmac.to_vec();
    out.extend_from_slice(&smac);
    out.extend_from_slice(&input[12..l3 - 2]);
    out.extend_from_slice(&[0x86, 0xDD]);
    out.extend_from_slice(&vtc.to_be_bytes());
    out.extend_from_slice(&payload.to_be_bytes());
    out.extend_from_slice(&[next, 64]);
    out.extend_from_slice(&src);
    out.extend_from_slice(&dst);
    out.extend_from_slice(&input[l3..]);
    out
}

/// `input` with only its MAC addresses rewritten (L2 direct server return).
pub fn expect_l2(input: &[u8], smac: [u8; 6], dmac: [u8; 6]) -> Vec<u8> {
    let mut out = input.to_vec();
    out[..6].copy_from_slice(&dmac);
    out[6..12].copy_from_slice(&smac);
    out
}

/// IPv4 outer source the load balancer derives from the flow hash.
pub fn encap_src4(base: [u8; 4], hash: u32) -> [u8; 4] {
    (u32::from_be_bytes(base) | (hash & 0xFFFF)).to_be_bytes()
}

/// IPv6 outer source: the base with its last word xor-ed with the hash.
pub fn encap_src6(base: Ipv6Addr, hash: u32) -> [u8; 16] {
    let mut octets = base.octets();
    // The data plane xors the last word as it sits in memory (native order).
    let last = u32::from_ne_bytes(octets[12..16].try_into().unwrap()) ^ hash;
    octets[12..16].copy_from_slice(&last.to_ne_bytes());
    octets
}

/// The IPv4-in-IPv6 packet for an IPv4 `input` (header at `l3`, behind a VLAN tag that
/// stays) to an IPv6 backend: EtherType IPv6, an outer header (traffic class = the inner
/// TOS, flow label from `hash`, next header 4, hop limit 64) from `src` to `dst`, the
/// client's IPv4 packet unchanged.
pub fn expect_4in6(
    input: &[u8],
    l3: usize,
    smac: [u8; 6],
    dmac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    hash: u32,
) -> Vec<u8> {
    let tot_len = u16::from_be_bytes([input[l3 + 2], input[l3 + 3]]);
    let vtc = (6 << 28) | (u32::from(input[l3 + 1]) << 20) | (hash & 0x000F_FFFF);
    with_outer6(input, l3, (smac, dmac), (src, dst), vtc, tot_len, 4)
}
