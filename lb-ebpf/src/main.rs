//! The XDP programs: `lb_ingress` (the load balancer), `lb_next` (its packets not for a
//! Vip to the interface's next program), `lb_decap` (for backends) and `lb_pass` (a no-op
//! for veth peers and the benchmark baseline).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod chain;
mod conntrack;
mod decap;
mod encap;
mod fast;
mod forward;
mod fragments;
mod gue;
mod icmp;
mod icmp_echo;
mod maps;
mod mixed;
mod next;
mod parse;
mod route;
mod select;
mod stats;
mod too_big;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use core::mem::MaybeUninit;
use lb_common::consts::Counter;

use lb_common::types::{GlobalConfig, Route};
use parse::{ETH_P_IP, ETH_P_IPV6, Parsed, Verdict, parse_ipv4, parse_ipv6, parse_l2};
use route::Selection;
use select::{Flow, select};

/// The fast path, inlined; every packet it leaves goes on to `lb_full` by a tail call.
/// The two are programs of their own, not subprograms of one: the verifier allows 512
/// bytes of stack down one chain of calls, and the full path with the connection-table
/// insert under it needs 304 + 64, the fast path 216. As subprograms, every packet paid
/// a call and a return, which cost ~16 ns on CPUs with SRSO return thunks (AMD EPYC);
/// a tail call with a constant index is a direct jump.
#[xdp]
pub fn lb_ingress(ctx: XdpContext) -> u32 {
    let action = match fast::fast_path(&ctx) {
        fast::NOT_HANDLED => to_full_path(&ctx),
        action => action,
    };
    // Here, not in the paths: a tail call from the entry function leaves the verifier's
    // stack limits of subprograms alone.
    if action == next::NOT_VIP {
        return next::not_for_a_vip(&ctx);
    }
    action
}

/// Tail-calls `lb_full`; only a load balancer whose daemon left the slot empty gets past
/// it (the daemon fills it before attaching, and it is pinned).
#[inline(always)]
fn to_full_path(ctx: &XdpContext) -> u32 {
    // SAFETY: a tail call does not return when it succeeds; nothing is held across it.
    unsafe { maps::FULL_PATH.tail_call(ctx, 0) };
    aya_log_ebpf::error!(ctx, "FULL_PATH slot 0 is empty: packet passed");
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

/// Every packet the fast path leaves: the full path. Inlined into the program's entry:
/// the `xdp` macro's wrapper otherwise calls it as a subprogram, and every packet here
/// paid a call and a return.
#[xdp]
#[inline(always)]
pub fn lb_full(ctx: XdpContext) -> u32 {
    let action = fast::verdict(try_lb_ingress(&ctx));
    if action == next::NOT_VIP {
        return next::not_for_a_vip(&ctx);
    }
    action
}

#[inline(always)]
fn try_lb_ingress(ctx: &XdpContext) -> Result<u32, Verdict> {
    let l2 = parse_l2(ctx).ok_or(Verdict::NotVip(Counter::PassMalformed))?;
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    // Read once, passed down: map lookups are not merged by the compiler.
    let Some(config) = maps::config() else {
        // CONFIG_INDEX and CONFIG are arrays the loader creates: the lookup cannot fail.
        aya_log_ebpf::error!(ctx, "no live CONFIG slot");
        return Err(Verdict::NotVip(Counter::PassNotVip));
    };
    // Both families meet in one `forward`, so its code exists once in the program.
    let mut scratch = MaybeUninit::uninit();
    let selection = match l2.proto {
        ETH_P_IP => steer(
            ctx,
            parse_ipv4(ctx, l2.l3_off, &config.vip_filter)?,
            config,
            &mut scratch,
        )?,
        ETH_P_IPV6 => steer(
            ctx,
            parse_ipv6(ctx, l2.l3_off, &config.vip_filter)?,
            config,
            &mut scratch,
        )?,
        _ => return Err(Verdict::NotVip(Counter::PassNotIp)),
    };
    forward::forward(ctx, &l2, &selection, bytes, config)
}

#[inline(always)]
fn steer<'a, F: Flow>(
    ctx: &XdpContext,
    pkt: Parsed<F>,
    config: &GlobalConfig,
    scratch: &'a mut MaybeUninit<Route>,
) -> Result<Selection<'a>, Verdict> {
    let selection = select(ctx, &pkt, config, scratch)?;
    if pkt.icmp_error {
        stats::count(Counter::IcmpToBackend);
    }
    Ok(selection)
}

#[xdp]
pub fn lb_next(ctx: XdpContext) -> u32 {
    next::dispatch(&ctx)
}

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    decap::decap(&ctx)
}

#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
