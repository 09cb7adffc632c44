//! Outer headers: IPIP / IPv6-in-IPv6 to the backend from an RSS-spreading source, or an
//! L2 (MAC) rewrite for direct server return; shared by `forward`, the fast path, `chain`
//! and `mixed`.

use core::{hint::cold_path, mem::offset_of};

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    consts::{Counter, PROTO_IPIP, PROTO_IPV6},
    types::{GlobalConfig, Route},
};

use crate::{
    parse::{
        ETH_HLEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, EthHdr, IPV4_HLEN, IPV6_HLEN, Ipv4Hdr,
        Ipv6Hdr, L2, Verdict, VlanHdr, ptr_at,
    },
    route::Selection,
};

pub const OUTER_TTL: u8 = 64;

/// Writes the Route's MACs into the Ethernet header with 16-bit moves: a plain array
/// assignment from map memory to packet memory becomes a call to a byte-wise `memmove`.
#[inline(always)]
fn set_eth_macs(eth: *mut EthHdr, route: &Route) {
    // SAFETY: both MAC pairs are 2-aligned 12-byte runs (`Route` and `EthHdr` are repr(C)
    // with the MACs at even offsets); `eth` was bounds-checked by the caller.
    unsafe {
        let from = (route as *const Route as *const u8).add(offset_of!(Route, dmac)) as *const u16;
        let to = eth as *mut u16;
        for i in 0..6 {
            // `smac` follows `dmac` in both layouts.
            *to.add(i) = core::ptr::read_volatile(from.add(i));
        }
    }
}

/// L2 direct server return: the backend owns the Vip on a loopback; only the MACs change.
#[inline(always)]
pub fn set_macs(ctx: &XdpContext, hop: &Route) -> Result<(), Verdict> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Verdict::Drop(Counter::DropEncap))?;
    set_eth_macs(eth, hop);
    Ok(())
}

/// Grows the packet by `outer_len` in front and writes a fresh L2 header (same VLAN tag
/// as the packet arrived with) for the outer packet of EtherType `proto`.
#[inline(always)]
pub fn push_l2(
    ctx: &XdpContext,
    l2: &L2,
    hop: &Route,
    outer_len: usize,
    proto: u16,
) -> Result<(), Verdict> {
    let failed = Verdict::Drop(Counter::DropEncap);
    // SAFETY: the helper only moves data; every pointer is re-derived below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(outer_len as i32)) } != 0 {
        return Err(failed);
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(failed)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        set_eth_macs(eth, hop);
        match l2.vlan_tci {
            None => (*eth).proto = proto,
            Some(tci) => {
                cold_path();
                (*eth).proto = ETH_P_8021Q;
                let vlan: *mut VlanHdr = ptr_at(ctx, ETH_HLEN).ok_or(failed)?;
                (*vlan).tci = tci;
                (*vlan).proto = proto;
            }
        }
    }
    Ok(())
}

/// IPIP: outer IPv4 header from an RSS-spreading source to the backend.
#[inline(always)]
pub fn encap_ipv4(
    ctx: &XdpContext,
    l2: &L2,
    sel: &Selection,
    config: &GlobalConfig,
) -> Result<(), Verdict> {
    let failed = Verdict::Drop(Counter::DropEncap);
    let inner: *const Ipv4Hdr = ptr_at(ctx, l2.l3_off).ok_or(failed)?;
    // SAFETY: bounds checked by ptr_at.
    let (tos, inner_len) = unsafe { ((*inner).tos, u16::from_be((*inner).tot_len)) };
    let src = (config.encap_src4_base | (sel.hash & config.encap_src4_hostmask)).to_be();
    let dst = sel.backend_addr[0];
    let tot_len = (inner_len + IPV4_HLEN as u16).to_be();
    push_l2(ctx, l2, sel.route, IPV4_HLEN, ETH_P_IP)?;
    let outer: *mut Ipv4Hdr = ptr_at(ctx, l2.l3_off).ok_or(failed)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *outer = ipip_header(tos, tot_len, src, dst) };
    Ok(())
}

/// IPv6-in-IPv6: outer header to the backend; source and flow label vary with the flow.
#[inline(always)]
pub fn encap_ipv6(
    ctx: &XdpContext,
    l2: &L2,
    sel: &Selection,
    config: &GlobalConfig,
) -> Result<(), Verdict> {
    let failed = Verdict::Drop(Counter::DropEncap);
    let inner: *const Ipv6Hdr = ptr_at(ctx, l2.l3_off).ok_or(failed)?;
    // SAFETY: bounds checked by ptr_at.
    let (vtc_flow, inner_payload) =
        unsafe { ((*inner).vtc_flow, u16::from_be((*inner).payload_len)) };
    // Keep the traffic class, take the flow label from the flow hash.
    let vtc_flow = (u32::from_be(vtc_flow) & 0xFFF0_0000) | (sel.hash & 0x000F_FFFF);
    let payload_len = inner_payload + IPV6_HLEN as u16;
    push_outer6(ctx, l2, sel, config, vtc_flow, payload_len, PROTO_IPV6, 0)
}

/// Grows the packet by an outer IPv6 header and `extra` bytes after it (for the caller to
/// fill), and writes the header (`vtc_flow` in host order) from the RSS-spreading source
/// (the base with its last word xor-ed with the flow hash) to the backend.
#[expect(
    clippy::too_many_arguments,
    reason = "inlined; constants at every call"
)]
#[inline(always)]
pub(crate) fn push_outer6(
    ctx: &XdpContext,
    l2: &L2,
    sel: &Selection,
    config: &GlobalConfig,
    vtc_flow: u32,
    payload_len: u16,
    nexthdr: u8,
    extra: usize,
) -> Result<(), Verdict> {
    let base = &config.encap_src6_base;
    let src = [base[0], base[1], base[2], base[3] ^ sel.hash];
    push_l2(ctx, l2, sel.route, IPV6_HLEN + extra, ETH_P_IPV6)?;
    let outer: *mut Ipv6Hdr = ptr_at(ctx, l2.l3_off).ok_or(Verdict::Drop(Counter::DropEncap))?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        *outer = Ipv6Hdr {
            vtc_flow: vtc_flow.to_be(),
            payload_len: payload_len.to_be(),
            nexthdr,
            hop_limit: OUTER_TTL,
            src,
            dst: sel.backend_addr,
        };
    }
    Ok(())
}

/// An outer IPIP header (fields in network order), checksum included.
#[inline(always)]
pub fn ipip_header(tos: u8, tot_len: u16, src: u32, dst: u32) -> Ipv4Hdr {
    outer_ipv4(tos, tot_len, src, dst, PROTO_IPIP)
}

/// An outer IPv4 header carrying `proto` (fields in network order), checksum included.
#[inline(always)]
pub fn outer_ipv4(tos: u8, tot_len: u16, src: u32, dst: u32, proto: u8) -> Ipv4Hdr {
    Ipv4Hdr {
        vihl: 0x45,
        tos,
        tot_len,
        id: 0,
        frag_off: 0,
        ttl: OUTER_TTL,
        proto,
        check: ipv4_checksum(tos, tot_len, src, dst, proto),
        src,
        dst,
    }
}

/// RFC 1071 checksum of the outer IPv4 header (id, fragment offset and checksum zero),
/// from the field values rather than read back from the packet: reading 16-bit words over
/// stores of other widths stalls store forwarding. Fields are as stored (network order);
/// the one's-complement sum of 16-bit words is the same in either byte order.
#[inline(always)]
pub fn ipv4_checksum(tos: u8, tot_len_be: u16, src_be: u32, dst_be: u32, proto: u8) -> u16 {
    let first = u16::from_ne_bytes([0x45, tos]) as u32;
    let ttl_proto = u16::from_ne_bytes([OUTER_TTL, proto]) as u32;
    let mut sum = first
        + tot_len_be as u32
        + ttl_proto
        + (src_be & 0xFFFF)
        + (src_be >> 16)
        + (dst_be & 0xFFFF)
        + (dst_be >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    !(sum as u16)
}
