//! The fast path: an untagged IPv4 or IPv6 TCP/UDP packet of an established flow, found
//! in this CPU's flow cache or else in the connection table, handled in a few cache lines
//! of code with fixed header offsets. It does not reuse `parse_ipv4`/`parse_ipv6`, whose
//! IP options, ICMP and VLAN cases it leaves to the full path (and which, while both paths
//! were one program, needed more stack than the verifier allowed: 552 of 512 bytes). It
//! runs inline in `lb_ingress`; the full path is `lb_full`. Anything else — a SYN, an
//! unknown flow, a re-steer, a VLAN tag, IP options, IPv6 extension headers, fragments,
//! ICMP, anything malformed — is `NOT_HANDLED` and takes the full path, which parses the
//! packet again from the start and decides exactly as if this path did not exist. A packet that would not fit the MTU
//! once encapsulated is answered here with the ICMP error, as the full path does.

use core::{hint::cold_path, mem::MaybeUninit};

use aya_ebpf::programs::XdpContext;
use lb_common::{
    consts::{Counter, vip_flags},
    hash::{vip_filter_bit_v4, vip_filter_bit_v6},
    types::{FlowV4, FlowV6, GlobalConfig, Route},
};

use crate::{
    encap::{encap_ipv4, encap_ipv6, set_macs},
    forward::finish,
    gue::encap_gue,
    maps::config,
    parse::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, EthHdr, IP_MF_OFFSET, IPV4_HLEN, IPV6_HLEN, Ipv4Hdr,
        Ipv6Hdr, L2, Verdict, parse_l4, ptr_at, read_addr6,
    },
    route::Selection,
    select::{Flow as _, cache_hit, table_hit},
    too_big,
};

/// Returned by the fast path for a packet it leaves to the full path.
pub const NOT_HANDLED: u32 = u32::MAX;

/// The XDP action for the packet, or `NOT_HANDLED`.
#[inline(always)]
pub fn fast_path(ctx: &XdpContext) -> u32 {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return NOT_HANDLED;
    };
    // One scratch Route for both families: a smaller stack frame.
    let mut scratch = MaybeUninit::uninit();
    // SAFETY: bounds checked by ptr_at.
    match unsafe { (*eth).proto } {
        ETH_P_IP => fast_ipv4(ctx, &mut scratch).map_or(NOT_HANDLED, verdict),
        ETH_P_IPV6 => fast_ipv6(ctx, &mut scratch).map_or(NOT_HANDLED, verdict),
        _ => NOT_HANDLED,
    }
}

#[inline(always)]
fn fast_ipv4(ctx: &XdpContext, scratch: &mut MaybeUninit<Route>) -> Option<Result<u32, Verdict>> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at.
    let (vihl, tot_len, frag_off, proto, src, dst) = unsafe {
        (
            (*ip).vihl,
            (*ip).tot_len,
            (*ip).frag_off,
            (*ip).proto,
            (*ip).src,
            (*ip).dst,
        )
    };
    let tot_len = u16::from_be(tot_len) as usize;
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    if vihl != 0x45 || tot_len < IPV4_HLEN || ETH_HLEN + tot_len > bytes as usize {
        return None;
    }
    let config = config()?;
    if !config.vip_filter.contains(vip_filter_bit_v4(dst)) {
        return Some(Err(Verdict::NotVip(Counter::PassNotVip)));
    }
    if u16::from_be(frag_off) & IP_MF_OFFSET != 0 {
        return None;
    }
    let (sport, dport) = ports(ctx, proto, ETH_HLEN + IPV4_HLEN, ETH_HLEN + tot_len)?;
    let flow = FlowV4 {
        src,
        dst,
        sport,
        dport,
        proto,
        _pad0: 0,
        _pad1: 0,
    };
    let hash = flow.hash(config.hash_seed);
    let selection = match cache_hit(&flow, hash, config) {
        Some(selection) => selection,
        None => table_hit(&flow, hash, config, scratch)?,
    };
    Some(send(ctx, ETH_P_IP, &selection, bytes, config))
}

#[inline(always)]
fn fast_ipv6(ctx: &XdpContext, scratch: &mut MaybeUninit<Route>) -> Option<Result<u32, Verdict>> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at.
    let (vtc_flow, payload_len, nexthdr, dst) =
        unsafe { ((*ip).vtc_flow, (*ip).payload_len, (*ip).nexthdr, (*ip).dst) };
    let l3_end = ETH_HLEN + IPV6_HLEN + u16::from_be(payload_len) as usize;
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    if u32::from_be(vtc_flow) >> 28 != 6 || l3_end > bytes as usize {
        return None;
    }
    let config = config()?;
    if !config.vip_filter.contains(vip_filter_bit_v6(&dst)) {
        return Some(Err(Verdict::NotVip(Counter::PassNotVip)));
    }
    let (sport, dport) = ports(ctx, nexthdr, ETH_HLEN + IPV6_HLEN, l3_end)?;
    let flow = FlowV6 {
        // SAFETY: bounds checked by ptr_at.
        src: read_addr6(unsafe { &raw const (*ip).src }),
        dst,
        sport,
        dport,
        proto: nexthdr,
        _pad0: 0,
        _pad1: 0,
    };
    let hash = flow.hash(config.hash_seed);
    let selection = match cache_hit(&flow, hash, config) {
        Some(selection) => selection,
        None => table_hit(&flow, hash, config, scratch)?,
    };
    Some(send(ctx, ETH_P_IPV6, &selection, bytes, config))
}

/// Ports of a well-formed TCP (not SYN) or UDP header at `l4`; `None` for anything else.
#[inline(always)]
fn ports(ctx: &XdpContext, proto: u8, l4: usize, l3_end: usize) -> Option<(u16, u16)> {
    match parse_l4(ctx, proto, l4, l3_end) {
        Ok((ports, false)) => Some((ports.sport, ports.dport)),
        _ => None,
    }
}

/// Rewrites or encapsulates an untagged packet of EtherType `proto` along its Route: the
/// steps of `forward::forward` for the packets this path takes (no VLAN tag, no
/// mixed-family Route), with the packet's family known here.
#[inline(always)]
fn send(
    ctx: &XdpContext,
    proto: u16,
    selection: &Selection,
    bytes: u64,
    config: &GlobalConfig,
) -> Result<u32, Verdict> {
    let route = selection.route;
    let l2 = L2 {
        l3_off: ETH_HLEN,
        proto,
        vlan_tci: None,
    };
    // A packet that will not fit the MTU once encapsulated: the ICMP error in its place.
    too_big::check(ctx, &l2, selection, bytes)?;
    if route.vip_flags & vip_flags::L2_DSR != 0 {
        set_macs(ctx, route)?;
    } else if route.vip_flags & vip_flags::GUE != 0 {
        cold_path();
        // Mixed-family Routes are never cached: the packet's family is both.
        let v6 = proto == ETH_P_IPV6;
        encap_gue(ctx, &l2, selection, config, (v6, v6))?;
    } else if proto == ETH_P_IPV6 {
        encap_ipv6(ctx, &l2, selection, config)?;
    } else {
        encap_ipv4(ctx, &l2, selection, config)?;
    }
    Ok(finish(ctx, route, bytes))
}

/// What `lb_ingress` returns for `result`, counting why when it does not forward.
#[inline(always)]
pub fn verdict(result: Result<u32, Verdict>) -> u32 {
    match result {
        Ok(action) => action,
        Err(verdict) => {
            let (action, counter) = verdict.action();
            crate::stats::count(counter);
            action
        }
    }
}
