//! GUE (`forwarding: gue`), as Katran, GLB and Unimog forward: the client's packet in UDP,
//! `Eth | outer IP (proto 17) | UDP | the client's IP packet`. Variant 1 of GUE (RFC draft
//! `draft-ietf-intarea-gue`): no GUE header, the first nibble of what follows the UDP
//! header is the inner IP version, exactly what the kernel's `fou` with `ipproto 4` / `41`
//! and Katran send. The UDP source port comes from the flow hash, so a backend NIC's RSS
//! (which hashes the UDP ports) spreads the flows of one load balancer over its queues.
//!
//! The outer UDP checksum is 0 in both families: over IPv4 it is optional; over IPv6,
//! RFC 6935 allows it for tunnels and RFC 6936 §5 says when: the inner packet carries its
//! own checksums (TCP, UDP, ICMP, the inner IPv4 header's), so a corrupted payload is still
//! caught end to end, and a corrupted outer header at worst reaches a host that drops it
//! (`lb_decap` takes GUE only from the load balancers' prefixes, on the configured port).
//! Computing it would mean summing the whole packet for every one of them.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    consts::{Counter, PROTO_UDP, route_flags, vip_flags},
    types::GlobalConfig,
};

use crate::{
    encap::{outer_ipv4, push_l2, push_outer6},
    maps::TUNNEL,
    parse::{ETH_P_IP, IPV4_HLEN, IPV6_HLEN, Ipv4Hdr, Ipv6Hdr, L2, UdpHdr, Verdict, ptr_at},
    route::Selection,
};

pub const UDP_HLEN: usize = 8;

/// Source ports from the dynamic range (49152–65535), 14 bits of the flow hash: what RFC
/// 7510 and RFC 8086 ask of tunnels whose source port carries entropy.
const SPORT_BASE: u16 = 0xC000;
const SPORT_MASK: u16 = 0x3FFF;

/// Whether the outer header of a GUE Route is IPv6 (an IPv6 Vip, or an IPv4 Vip with an
/// IPv6 backend).
#[inline(always)]
pub fn outer_v6(flags: u32) -> bool {
    flags & (vip_flags::IPV6 | route_flags::MIXED_FAMILY) != 0
}

/// Puts the client's packet (IPv6 if `inner_v6`) in UDP over IPv6 (`outer_v6`) or IPv4 to
/// the backend's GUE port. The families are arguments so that the fast path, which knows
/// them, carries only its own case.
#[inline(always)]
pub fn encap_gue(
    ctx: &XdpContext,
    l2: &L2,
    sel: &Selection,
    config: &GlobalConfig,
    (inner_v6, outer_v6): (bool, bool),
) -> Result<(), Verdict> {
    let failed = Verdict::Drop(Counter::DropEncap);
    let dport = TUNNEL.get(0).ok_or(failed)?.gue_port;
    // The inner packet's traffic class and length.
    let (tos, inner_len) = if inner_v6 {
        let inner: *const Ipv6Hdr = ptr_at(ctx, l2.l3_off).ok_or(failed)?;
        // SAFETY: bounds checked by ptr_at.
        let (vtc_flow, payload) = unsafe { ((*inner).vtc_flow, (*inner).payload_len) };
        (
            (u32::from_be(vtc_flow) >> 20) as u8,
            u16::from_be(payload).wrapping_add(IPV6_HLEN as u16),
        )
    } else {
        let inner: *const Ipv4Hdr = ptr_at(ctx, l2.l3_off).ok_or(failed)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { ((*inner).tos, u16::from_be((*inner).tot_len)) }
    };
    let udp_len = inner_len.wrapping_add(UDP_HLEN as u16);
    let udp_off = if outer_v6 {
        let vtc_flow = (6 << 28) | ((tos as u32) << 20) | (sel.hash & 0x000F_FFFF);
        push_outer6(ctx, l2, sel, config, vtc_flow, udp_len, PROTO_UDP, UDP_HLEN)?;
        l2.l3_off + IPV6_HLEN
    } else {
        let src = (config.encap_src4_base | (sel.hash & config.encap_src4_hostmask)).to_be();
        let tot_len = udp_len.wrapping_add(IPV4_HLEN as u16).to_be();
        push_l2(ctx, l2, sel.route, IPV4_HLEN + UDP_HLEN, ETH_P_IP)?;
        let outer: *mut Ipv4Hdr = ptr_at(ctx, l2.l3_off).ok_or(failed)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { *outer = outer_ipv4(tos, tot_len, src, sel.backend_addr[0], PROTO_UDP) };
        l2.l3_off + IPV4_HLEN
    };
    let udp: *mut UdpHdr = ptr_at(ctx, udp_off).ok_or(failed)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        *udp = UdpHdr {
            sport: (SPORT_BASE | (sel.hash as u16 & SPORT_MASK)).to_be(),
            dport,
            len: udp_len.to_be(),
            check: 0,
        };
    }
    Ok(())
}
