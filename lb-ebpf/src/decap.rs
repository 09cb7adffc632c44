//! `lb_decap`, for backends: strips the outer IPIP / IPv6-in-IPv6 header the load balancer
//! added, then hands the client's original packet to the kernel. (The kernel this project
//! targets has no IPIP module, so backends need this.)

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::consts::{PROTO_IPIP, PROTO_IPV6};

use crate::parse::{
    ETH_P_IP, ETH_P_IPV6, EthHdr, IPV4_HLEN, IPV6_HLEN, Ipv4Hdr, Ipv6Hdr, VlanHdr, parse_l2, ptr_at,
};

#[inline(always)]
pub fn decap(ctx: &XdpContext) -> u32 {
    let Some(l2) = parse_l2(ctx) else {
        return xdp_action::XDP_PASS;
    };
    let outer_len = match l2.proto {
        ETH_P_IP => match ptr_at::<Ipv4Hdr>(ctx, l2.l3_off) {
            // SAFETY: bounds checked by ptr_at.
            Some(ip) if unsafe { (*ip).vihl == 0x45 && (*ip).proto == PROTO_IPIP } => IPV4_HLEN,
            _ => return xdp_action::XDP_PASS,
        },
        ETH_P_IPV6 => match ptr_at::<Ipv6Hdr>(ctx, l2.l3_off) {
            // SAFETY: bounds checked by ptr_at.
            Some(ip) if unsafe { (*ip).nexthdr == PROTO_IPV6 } => IPV6_HLEN,
            _ => return xdp_action::XDP_PASS,
        },
        _ => return xdp_action::XDP_PASS,
    };
    // Move the L2 header up against the inner IP header, then drop the gap.
    let (Some(old), Some(new)) = (ptr_at::<EthHdr>(ctx, 0), ptr_at::<EthHdr>(ctx, outer_len))
    else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: both bounds checked; the regions do not overlap (outer_len >= 20 > 14).
    // Seven 16-bit moves: a [u8; 6] copy here would become an out-of-line memmove.
    unsafe {
        let (old, new) = (old as *const u16, new as *mut u16);
        for i in 0..size_of::<EthHdr>() / 2 {
            core::ptr::write_volatile(new.add(i), *old.add(i));
        }
    }
    if let Some(tci) = l2.vlan_tci {
        let Some(vlan) = ptr_at::<VlanHdr>(ctx, outer_len + size_of::<EthHdr>()) else {
            return xdp_action::XDP_PASS;
        };
        // SAFETY: bounds checked by ptr_at; the inner protocol equals the outer one.
        unsafe {
            (*vlan).tci = tci;
            (*vlan).proto = l2.proto;
        }
    }
    // SAFETY: shrinking by a length known to be inside the packet.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return xdp_action::XDP_DROP;
    }
    xdp_action::XDP_PASS
}
