//! Sending a packet to its backend, the last step of `parse → select → route → forward`:
//! the encapsulation its Route asks for (`encap`, or `chain`'s two headers, `gue`'s UDP, or
//! `mixed`'s IPv4-in-IPv6), then XDP_TX or XDP_REDIRECT; or, if it would not fit the MTU
//! once encapsulated, the ICMP error in its place (`too_big`).

use core::hint::cold_path;

use aya_ebpf::{bindings::xdp_action, helpers::bpf_redirect, programs::XdpContext};
use lb_common::{
    consts::{Counter, EMPTY_BACKEND, route_flags, vip_flags},
    types::{GlobalConfig, Route},
};

use crate::{
    chain,
    encap::{encap_ipv4, encap_ipv6, set_macs},
    parse::{L2, Verdict},
    route::Selection,
    stats::{count, count_forwarded},
    too_big,
};

/// Forwards the packet along `sel`'s Route; `bytes` is what the client sent.
#[inline(always)]
pub fn forward(
    ctx: &XdpContext,
    l2: &L2,
    sel: &Selection,
    bytes: u64,
    config: &GlobalConfig,
) -> Result<u32, Verdict> {
    let route = sel.route;
    too_big::check(ctx, l2, sel, bytes)?;
    if route.vip_flags & vip_flags::L2_DSR != 0 {
        set_macs(ctx, route)?;
    } else if sel.previous != EMPTY_BACKEND {
        cold_path();
        chain::encap_chained(ctx, l2, sel, bytes, config)?;
    } else if route.vip_flags & vip_flags::GUE != 0 {
        cold_path();
        let flags = route.vip_flags;
        let families = (flags & vip_flags::IPV6 != 0, crate::gue::outer_v6(flags));
        crate::gue::encap_gue(ctx, l2, sel, config, families)?;
    } else if route.vip_flags & route_flags::MIXED_FAMILY != 0 {
        cold_path();
        crate::mixed::encap_4in6(ctx, l2, sel, config)?;
    } else if route.vip_flags & vip_flags::IPV6 != 0 {
        encap_ipv6(ctx, l2, sel, config)?;
    } else {
        encap_ipv4(ctx, l2, sel, config)?;
    }
    Ok(finish(ctx, route, bytes))
}

/// Counts a forwarded packet and sends it: back out of its own device, or redirected.
#[inline(always)]
pub fn finish(ctx: &XdpContext, route: &Route, bytes: u64) -> u32 {
    count_forwarded(route.entry.vip, route.entry.backend, bytes);
    if route.ifindex == ctx.ingress_ifindex() as u32 {
        count(Counter::Tx);
        xdp_action::XDP_TX
    } else {
        cold_path();
        count(Counter::Redirect);
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(route.ifindex, 0) as u32 }
    }
}
