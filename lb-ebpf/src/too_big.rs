//! ICMP "fragmentation needed" (IPv4, type 3 code 4) and ICMPv6 "packet too big" (type 2)
//! for packets that would not fit the interface's MTU once encapsulated (Katran's
//! `ICMP_TOOBIG_GENERATION`). Without them path MTU discovery blackholes the connection:
//! the packet would be sent and dropped by the driver, and the client never told.
//!
//! The packet is turned into the error in place and sent back with XDP_TX: the MACs
//! swapped, a new IP header from the Vip to the client, the ICMP header with the MTU the
//! client may use (the interface's less the encapsulation), then the start of the
//! client's packet, cut to a fixed length (a fixed length keeps the checksum one helper
//! call): 68 bytes in IPv4 (RFC 792's IP header and 64 bits of data, with the longest IP
//! options), 200 in IPv6 (RFC 4443 asks for as much as fits in 1280 bytes, of which the
//! receiver needs 48). IPv4 packets without DF are dropped and counted: XDP
//! cannot fragment them. No error answers an ICMP error. Rate-limited per CPU
//! (`icmp_rate_slots::TOO_BIG`, `global.icmp_rate`).

use core::hint::cold_path;

use aya_ebpf::{
    bindings::xdp_md,
    helpers::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::consts::{
    Counter, PROTO_ICMP, PROTO_ICMPV6, encap_overhead, icmp_rate_slots, route_flags, vip_flags,
};

use crate::{
    encap::outer_ipv4,
    gue,
    icmp::within_rate,
    maps::TUNNEL,
    parse::{
        ETH_HLEN, EthHdr, ICMP_HLEN, IPV4_HLEN, IPV6_HLEN, Ipv4Hdr, Ipv6Hdr, L2, Verdict, ptr_at,
    },
    route::Selection,
};

/// Bytes of the client's packet quoted, from its IP header.
const QUOTE_V4: usize = 68;
const QUOTE_V6: usize = 200;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// IPv4 DF flag in `frag_off` (host order).
const IP_DF: u16 = 0x4000;
/// TOS of our ICMP errors: precedence "internetwork control", as Linux's own.
const ERROR_TOS: u8 = 0xC0;

/// Bytes the Route's forwarding puts in front of the client's IP packet.
#[inline(always)]
fn overhead(sel: &Selection) -> u32 {
    let flags = sel.route.vip_flags;
    let one = if flags & vip_flags::L2_DSR != 0 {
        return 0;
    } else if flags & vip_flags::GUE != 0 {
        if gue::outer_v6(flags) {
            encap_overhead::GUE_V6
        } else {
            encap_overhead::GUE_V4
        }
    } else if flags & (vip_flags::IPV6 | route_flags::MIXED_FAMILY) != 0 {
        encap_overhead::IPV6
    } else {
        encap_overhead::IPIP
    };
    // Second chance adds a second header of the same size.
    if sel.previous != lb_common::consts::EMPTY_BACKEND {
        2 * one
    } else {
        one
    }
}

/// The most any Route adds: a chained IPv6 packet's two headers.
const MAX_OVERHEAD: u32 = 2 * encap_overhead::IPV6;

/// `Ok` if the packet (`bytes` long, IP header at `l2.l3_off`) fits the interfaces' MTU
/// once encapsulated along `sel`; else the verdict for it: the ICMP error in its place
/// (`Verdict::Tx`), or a drop. Inlined where packets are sent, the fast path included, so
/// it costs those one map read and one compare: a packet below the MTU by more than any
/// encapsulation adds fits whatever its Route (an unknown MTU, 0, wraps to the largest);
/// the rest is decided, and answered, out of line.
#[inline(always)]
pub fn check(ctx: &XdpContext, l2: &L2, sel: &Selection, bytes: u64) -> Result<(), Verdict> {
    let Some(tunnel) = TUNNEL.get(0) else {
        return Ok(());
    };
    let l3_len = bytes as u32 - l2.l3_off as u32;
    if l3_len + MAX_OVERHEAD - 1 <= tunnel.mtu.wrapping_sub(1) {
        return Ok(());
    }
    cold_path();
    let overhead = overhead(sel);
    let mtu = tunnel.mtu;
    if l3_len + overhead <= mtu {
        return Ok(());
    }
    let v6 = sel.route.vip_flags & vip_flags::IPV6 != 0;
    let answer = answer(ctx.ctx, l2.l3_off, l3_len, mtu.saturating_sub(overhead), v6);
    Err(match answer {
        ANSWERED => Verdict::Tx(Counter::IcmpTooBig),
        LIMITED => Verdict::Drop(Counter::IcmpTooBigLimited),
        _ => Verdict::Drop(Counter::DropTooBig),
    })
}

const ANSWERED: u32 = 0;
const LIMITED: u32 = 1;
const NOT_ANSWERED: u32 = 2;

/// Turns the packet (IP header at `l3_off`, `l3_len` bytes) into its ICMP error with MTU
/// `allowed`: `ANSWERED`, `LIMITED` (over the rate) or `NOT_ANSWERED`. A BPF subprogram
/// of its own, so that its code stays out of the fast path's way; plain scalars only
/// cross the call.
#[inline(never)]
fn answer(ctx: *mut xdp_md, l3_off: usize, l3_len: u32, allowed: u32, v6: bool) -> u32 {
    let ctx = XdpContext::new(ctx);
    let verdict = if v6 {
        too_big_v6(&ctx, l3_off, l3_len, allowed)
    } else {
        frag_needed_v4(&ctx, l3_off, l3_len, allowed)
    };
    match verdict {
        Verdict::Tx(_) => ANSWERED,
        Verdict::Drop(Counter::IcmpTooBigLimited) => LIMITED,
        _ => NOT_ANSWERED,
    }
}

/// Grows the packet by `grow` bytes in front and moves the L2 header (and its VLAN tag,
/// when the IP header is at `l3` > 14) there with the MACs swapped: the answer goes back
/// where the packet came from.
#[inline(always)]
fn turn_around(ctx: &XdpContext, l3: usize, grow: usize) -> Option<()> {
    // SAFETY: the helper only moves data; every pointer is re-derived below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) } != 0 {
        return None;
    }
    let new: *mut EthHdr = ptr_at(ctx, 0)?;
    let old: *const EthHdr = ptr_at(ctx, grow)?;
    // SAFETY: both bounds checked; they do not overlap (grow >= 28 > 18). 16-bit moves: a
    // [u8; 6] copy would become an out-of-line memmove.
    unsafe {
        let (new, old) = (new as *mut u16, old as *const u16);
        for i in 0..3 {
            core::ptr::write_volatile(new.add(i), *old.add(i + 3));
            core::ptr::write_volatile(new.add(i + 3), *old.add(i));
        }
        *new.add(6) = *old.add(6);
    }
    if l3 > ETH_HLEN {
        let new: *mut [u16; 2] = ptr_at(ctx, ETH_HLEN)?;
        let old: *const [u16; 2] = ptr_at(ctx, grow + ETH_HLEN)?;
        // SAFETY: as above.
        unsafe { *new = *old };
    }
    Some(())
}

/// Cuts `cut` bytes off the end of the packet (computed from lengths known beforehand:
/// the verifier refuses arithmetic on the packet's end pointer).
#[inline(always)]
fn cut(ctx: &XdpContext, cut: u32) -> Option<()> {
    // SAFETY: shrinks only (the caller checked the packet is longer).
    (unsafe { bpf_xdp_adjust_tail(ctx.ctx, -(cut as i32)) } == 0).then_some(())
}

/// The one's-complement sum (not folded) of the `N` bytes at `off`, added to `seed`.
#[inline(always)]
fn sum<const N: usize>(ctx: &XdpContext, off: usize, seed: u32) -> Option<u32> {
    let from: *mut [u8; N] = ptr_at(ctx, off)?;
    // SAFETY: bounds checked by ptr_at; N is a multiple of 4, at most 512.
    let s = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, from as *mut u32, N as u32, seed) };
    (s >= 0).then_some(s as u32)
}

#[inline(always)]
fn fold(sum: u32) -> u16 {
    let mut s = (sum & 0xFFFF) + (sum >> 16);
    s = (s & 0xFFFF) + (s >> 16);
    !(s as u16)
}

/// ICMP "fragmentation needed" with next-hop MTU `allowed`, in place of the IPv4 packet.
#[inline(always)]
fn frag_needed_v4(ctx: &XdpContext, l3: usize, l3_len: u32, allowed: u32) -> Verdict {
    let failed = Verdict::Drop(Counter::DropTooBig);
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3) else {
        return failed;
    };
    // SAFETY: bounds checked by ptr_at.
    let (frag_off, proto, client, vip) =
        unsafe { ((*ip).frag_off, (*ip).proto, (*ip).src, (*ip).dst) };
    if u16::from_be(frag_off) & IP_DF == 0 || proto == PROTO_ICMP || (l3_len as usize) < QUOTE_V4 {
        return failed;
    }
    if !within_rate(icmp_rate_slots::TOO_BIG) {
        return Verdict::Drop(Counter::IcmpTooBigLimited);
    }
    const GROW: usize = IPV4_HLEN + ICMP_HLEN;
    if turn_around(ctx, l3, GROW).is_none() || cut(ctx, l3_len - QUOTE_V4 as u32).is_none() {
        return failed;
    }
    let (Some(ip), Some(icmp)) = (
        ptr_at::<Ipv4Hdr>(ctx, l3),
        ptr_at::<[u32; 2]>(ctx, l3 + IPV4_HLEN),
    ) else {
        return failed;
    };
    let tot_len = ((GROW + QUOTE_V4) as u16).to_be();
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        *ip = outer_ipv4(ERROR_TOS, tot_len, vip, client, PROTO_ICMP);
        // Type, code, checksum 0 for now; then 16 unused bits and the next-hop MTU.
        (*icmp)[0] = u32::from_be_bytes([ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0]).to_be();
        (*icmp)[1] = (allowed.min(0xFFFF)).to_be();
    }
    let Some(s) = sum::<{ ICMP_HLEN + QUOTE_V4 }>(ctx, l3 + IPV4_HLEN, 0) else {
        return failed;
    };
    let Some(check) = ptr_at::<u16>(ctx, l3 + IPV4_HLEN + 2) else {
        return failed;
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe { *check = fold(s) };
    Verdict::Tx(Counter::IcmpTooBig)
}

/// ICMPv6 "packet too big" with MTU `allowed`, in place of the IPv6 packet.
#[inline(always)]
fn too_big_v6(ctx: &XdpContext, l3: usize, l3_len: u32, allowed: u32) -> Verdict {
    let failed = Verdict::Drop(Counter::DropTooBig);
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, l3) else {
        return failed;
    };
    // SAFETY: bounds checked by ptr_at.
    let (nexthdr, client, vip) = unsafe { ((*ip).nexthdr, (*ip).src, (*ip).dst) };
    if nexthdr == PROTO_ICMPV6 || (l3_len as usize) < QUOTE_V6 {
        return failed;
    }
    if !within_rate(icmp_rate_slots::TOO_BIG) {
        return Verdict::Drop(Counter::IcmpTooBigLimited);
    }
    const GROW: usize = IPV6_HLEN + ICMP_HLEN;
    const MESSAGE: usize = ICMP_HLEN + QUOTE_V6;
    if turn_around(ctx, l3, GROW).is_none() || cut(ctx, l3_len - QUOTE_V6 as u32).is_none() {
        return failed;
    }
    let (Some(ip), Some(icmp)) = (
        ptr_at::<Ipv6Hdr>(ctx, l3),
        ptr_at::<[u32; 2]>(ctx, l3 + IPV6_HLEN),
    ) else {
        return failed;
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        *ip = Ipv6Hdr {
            vtc_flow: (6u32 << 28).to_be(),
            payload_len: (MESSAGE as u16).to_be(),
            nexthdr: PROTO_ICMPV6,
            hop_limit: crate::encap::OUTER_TTL,
            src: vip,
            dst: client,
        };
        (*icmp)[0] = u32::from_be_bytes([ICMPV6_PACKET_TOO_BIG, 0, 0, 0]).to_be();
        (*icmp)[1] = allowed.to_be();
    }
    // The pseudo-header: both addresses, the length and the next header, as 32-bit words
    // in packet order (the one's-complement sum is the same in either byte order).
    let mut pseudo: u64 = (MESSAGE as u32).to_be() as u64 + (PROTO_ICMPV6 as u32).to_be() as u64;
    for i in 0..4 {
        pseudo += client[i] as u64 + vip[i] as u64;
    }
    pseudo = (pseudo & 0xFFFF_FFFF) + (pseudo >> 32);
    pseudo = (pseudo & 0xFFFF_FFFF) + (pseudo >> 32);
    let Some(s) = sum::<MESSAGE>(ctx, l3 + IPV6_HLEN, pseudo as u32) else {
        return failed;
    };
    let Some(check) = ptr_at::<u16>(ctx, l3 + IPV6_HLEN + 2) else {
        return failed;
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe { *check = fold(s) };
    Verdict::Tx(Counter::IcmpTooBig)
}
