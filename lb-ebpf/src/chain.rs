//! Second chance, load-balancer side. A TCP packet that is not a SYN, misses the
//! connection table, and whose slot names another Backend in the Vip's previous MaglevTable
//! may belong to a connection that started under that table (on a box that never saw the
//! change, or before this box lost its state). It goes to its current Backend with the
//! previous one attached, as a second IPIP (IPv6-in-IPv6) header:
//!
//! ```text
//! Eth | IP lb→current, proto 4 | IP lb→previous, proto 4 | the client's packet
//! ```
//!
//! The current Backend's `lb_decap` delivers it if a local socket has the flow, else strips
//! the outer header and sends the rest on: an ordinary encapsulated packet from a load
//! balancer to the previous Backend. One extra hop at most, never back.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    consts::{Counter, EMPTY_BACKEND, PROTO_IPV6, backend_flags, vip_flags},
    hash::table_slot,
    types::GlobalConfig,
};

use crate::{
    encap::{OUTER_TTL, ipip_header, push_l2},
    maps::{BACKENDS, PREV_TABLES},
    parse::{ETH_P_IP, ETH_P_IPV6, IPV4_HLEN, IPV6_HLEN, Ipv4Hdr, Ipv6Hdr, L2, Verdict, ptr_at},
    route::Selection,
    stats::count_chained,
};

/// The Backend id the Vip's previous table gives the flow of `hash`, when there is one, it
/// differs from `current`, is up (a drained or removed Backend keeps its flag while its
/// connections last) and is of the Vip's family; else `EMPTY_BACKEND`.
#[inline(always)]
pub fn previous_backend(vip_id: u32, hash: u32, current: u32, vip_flags: u32) -> u32 {
    let Some(table) = PREV_TABLES.get(vip_id) else {
        return EMPTY_BACKEND;
    };
    let Some(size) = table.get(0).map(|e| e[0]) else {
        return EMPTY_BACKEND;
    };
    if size == 0 {
        return EMPTY_BACKEND;
    }
    let slot = 1 + table_slot(hash, size);
    let Some(id) = table.get(slot / 2).map(|e| e[(slot & 1) as usize]) else {
        return EMPTY_BACKEND;
    };
    if id == EMPTY_BACKEND || id == current {
        return EMPTY_BACKEND;
    }
    match BACKENDS.get(id) {
        Some(b)
            if b.flags & backend_flags::UP != 0
                && (b.flags & backend_flags::IPV6 != 0) == (vip_flags & vip_flags::IPV6 != 0) =>
        {
            id
        }
        _ => EMPTY_BACKEND,
    }
}

/// Encapsulates the packet twice: to `sel`'s Backend, and inside that to its previous one.
#[inline(always)]
pub fn encap_chained(
    ctx: &XdpContext,
    l2: &L2,
    sel: &Selection,
    bytes: u64,
    config: &GlobalConfig,
) -> Result<(), Verdict> {
    let failed = Verdict::Drop(Counter::DropEncap);
    let previous = BACKENDS.get(sel.previous).ok_or(failed)?.addr;
    if sel.route.vip_flags & vip_flags::IPV6 != 0 {
        encap_ipv6(ctx, l2, sel, &previous, config)?;
    } else {
        encap_ipv4(ctx, l2, sel, previous[0], config)?;
    }
    count_chained(sel.route.entry.vip, sel.previous, bytes);
    Ok(())
}

#[inline(always)]
fn encap_ipv4(
    ctx: &XdpContext,
    l2: &L2,
    sel: &Selection,
    previous: u32,
    config: &GlobalConfig,
) -> Result<(), Verdict> {
    let failed = Verdict::Drop(Counter::DropEncap);
    let inner: *const Ipv4Hdr = ptr_at(ctx, l2.l3_off).ok_or(failed)?;
    // SAFETY: bounds checked by ptr_at.
    let (tos, inner_len) = unsafe { ((*inner).tos, u16::from_be((*inner).tot_len)) };
    let src = (config.encap_src4_base | (sel.hash & config.encap_src4_hostmask)).to_be();
    let middle_len = inner_len.wrapping_add(IPV4_HLEN as u16).to_be();
    let outer_len = inner_len.wrapping_add(2 * IPV4_HLEN as u16).to_be();
    push_l2(ctx, l2, sel.route, 2 * IPV4_HLEN, ETH_P_IP)?;
    let outer: *mut Ipv4Hdr = ptr_at(ctx, l2.l3_off).ok_or(failed)?;
    let middle: *mut Ipv4Hdr = ptr_at(ctx, l2.l3_off + IPV4_HLEN).ok_or(failed)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        *outer = ipip_header(tos, outer_len, src, sel.backend_addr[0]);
        *middle = ipip_header(tos, middle_len, src, previous);
    }
    Ok(())
}

#[inline(always)]
fn encap_ipv6(
    ctx: &XdpContext,
    l2: &L2,
    sel: &Selection,
    previous: &[u32; 4],
    config: &GlobalConfig,
) -> Result<(), Verdict> {
    let failed = Verdict::Drop(Counter::DropEncap);
    let inner: *const Ipv6Hdr = ptr_at(ctx, l2.l3_off).ok_or(failed)?;
    // SAFETY: bounds checked by ptr_at.
    let (vtc_flow, inner_payload) =
        unsafe { ((*inner).vtc_flow, u16::from_be((*inner).payload_len)) };
    let base = &config.encap_src6_base;
    let src = [base[0], base[1], base[2], base[3] ^ sel.hash];
    let vtc_flow = ((u32::from_be(vtc_flow) & 0xFFF0_0000) | (sel.hash & 0x000F_FFFF)).to_be();
    push_l2(ctx, l2, sel.route, 2 * IPV6_HLEN, ETH_P_IPV6)?;
    let outer: *mut Ipv6Hdr = ptr_at(ctx, l2.l3_off).ok_or(failed)?;
    let middle: *mut Ipv6Hdr = ptr_at(ctx, l2.l3_off + IPV6_HLEN).ok_or(failed)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        *outer = Ipv6Hdr {
            vtc_flow,
            payload_len: inner_payload.wrapping_add(2 * IPV6_HLEN as u16).to_be(),
            nexthdr: PROTO_IPV6,
            hop_limit: OUTER_TTL,
            src,
            dst: sel.backend_addr,
        };
        *middle = Ipv6Hdr {
            vtc_flow,
            payload_len: inner_payload.wrapping_add(IPV6_HLEN as u16).to_be(),
            nexthdr: PROTO_IPV6,
            hop_limit: OUTER_TTL,
            src,
            dst: *previous,
        };
    }
    Ok(())
}
