//! Sharing the NIC: a packet not for a Vip goes on to its interface's next XDP program
//! (`interfaces[].next_program`), by a tail call, else to the kernel (`XDP_PASS`).
//!
//! `lb_ingress` tail-calls slot 0 of `NEXT_PROGRAMS` with a constant index: the kernel
//! makes that a direct jump, patched when the slot changes, so with no next program
//! configured the empty slot costs a jump that falls through. When every interface has
//! the same next program the daemon puts it in slot 0 itself. Otherwise, while some
//! interface has one, slot 0 holds `lb_next`: it finds the packet's interface in
//! `NEXT_SLOTS` and tail-calls that interface's slot. One object serves every
//! interface, so the choice per interface is made here, not by attaching.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};

use crate::maps::{NEXT_PROGRAMS, NEXT_SLOTS};

/// What the paths return for a packet not for a Vip (`Verdict::NotVip`): not an XDP
/// action, and not `fast::NOT_HANDLED`.
pub const NOT_VIP: u32 = u32::MAX - 1;

/// `NEXT_PROGRAMS`' slot of `lb_next`.
const DISPATCH: u32 = 0;

/// Hands a packet not for a Vip on; `XDP_PASS` when no program takes it.
#[inline(always)]
pub fn not_for_a_vip(ctx: &XdpContext) -> u32 {
    // SAFETY: a tail call does not return when it succeeds; nothing is held across it.
    unsafe { NEXT_PROGRAMS.tail_call(ctx, DISPATCH) };
    xdp_action::XDP_PASS
}

/// `lb_next`: the packet's interface's next program, if it has one.
#[inline(always)]
pub fn dispatch(ctx: &XdpContext) -> u32 {
    let ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: the value is copied out at once.
    if let Some(slot) = unsafe { NEXT_SLOTS.get(ifindex) }.copied() {
        // SAFETY: as above.
        unsafe { NEXT_PROGRAMS.tail_call(ctx, slot) };
        // Only the daemon's own mistake gets here: it fills a slot before naming it.
        aya_log_ebpf::error!(
            ctx,
            "interface {} names empty next program slot {}",
            ifindex,
            slot
        );
    }
    xdp_action::XDP_PASS
}
