//! Mixed families: an IPv4 Vip served by IPv6 backends, for IPv6-only backend networks
//! (Katran's "v4 VIP and v6 real"). The client's IPv4 packet goes inside an IPv6 header
//! (next header 4, IPv4-in-IPv6), its source and flow label varied with the flow hash as
//! for IPv6-in-IPv6. (In L2 DSR only the next hop's family differs: nothing to do here.)

use aya_ebpf::programs::XdpContext;
use lb_common::{
    consts::{Counter, PROTO_IPIP},
    types::GlobalConfig,
};

use crate::{
    encap::push_outer6,
    parse::{Ipv4Hdr, L2, Verdict, ptr_at},
    route::Selection,
};

/// IPv4-in-IPv6: outer IPv6 header to the backend, traffic class from the inner TOS.
#[inline(always)]
pub fn encap_4in6(
    ctx: &XdpContext,
    l2: &L2,
    sel: &Selection,
    config: &GlobalConfig,
) -> Result<(), Verdict> {
    let inner: *const Ipv4Hdr = ptr_at(ctx, l2.l3_off).ok_or(Verdict::Drop(Counter::DropEncap))?;
    // SAFETY: bounds checked by ptr_at.
    let (tos, inner_len) = unsafe { ((*inner).tos, u16::from_be((*inner).tot_len)) };
    let vtc_flow = (6 << 28) | ((tos as u32) << 20) | (sel.hash & 0x000F_FFFF);
    push_outer6(ctx, l2, sel, config, vtc_flow, inner_len, PROTO_IPIP, 0)
}
