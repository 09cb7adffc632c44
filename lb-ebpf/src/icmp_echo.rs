//! Echo replies for Vip addresses, as Katran gives them: an ICMP / ICMPv6 echo request to
//! an address whose Vips allow it (`vip_addr_flags::ICMP_ECHO`) is turned into its reply
//! in place (MACs and addresses swapped, type changed, checksums updated) and sent back
//! with XDP_TX, so a ping tells which load balancer answers for a Vip even though the
//! address is on no local interface. Rate-limited per CPU (`icmp_rate_slots::ECHO`).

use aya_ebpf::programs::XdpContext;
use lb_common::{
    consts::{Counter, icmp_rate_slots},
    types::vip_addr_flags,
};

use crate::{
    icmp::{csum_replace, swap_macs, within_rate},
    maps::{VIP_ADDRS_V4, VIP_ADDRS_V6},
    parse::{EthHdr, ICMP_HLEN, IcmpHdr, Ipv4Hdr, Ipv6Hdr, Verdict, ptr_at},
};

pub const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// TTL / hop limit of a reply: a fresh packet of ours, not the request's remaining TTL.
const REPLY_TTL: u8 = 64;

/// The verdict for an echo request with ICMP header at `l4` in an IP packet ending at
/// `l3_end`, to an address with `flags` (`None`: no Vip uses it); `swap_ip` turns the IP
/// header into the reply's. Not answered here, it gets the local stack's verdict, as before
/// this option existed. Each header is checked right before it is written: checked
/// together, the compiler keeps only the farthest check, which the verifier does not carry
/// over to the other pointers.
#[inline(always)]
fn reply(
    ctx: &XdpContext,
    flags: Option<u32>,
    l4: usize,
    l3_end: usize,
    (request, reply): (u8, u8),
    swap_ip: impl FnOnce() -> Option<()>,
) -> Verdict {
    let malformed = Verdict::Drop(Counter::DropMalformed);
    match flags {
        None => return Verdict::NotVip(Counter::PassNotVip),
        Some(f) if f & vip_addr_flags::ICMP_ECHO == 0 => {
            return Verdict::NotVip(Counter::PassVipOther);
        }
        Some(_) => {}
    }
    if l4 + ICMP_HLEN > l3_end {
        return malformed;
    }
    if !within_rate(icmp_rate_slots::ECHO) {
        return Verdict::Drop(Counter::IcmpEchoLimited);
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return malformed;
    };
    swap_macs(eth);
    if swap_ip().is_none() {
        return malformed;
    }
    let Some(icmp) = ptr_at::<IcmpHdr>(ctx, l4) else {
        return malformed;
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        let code = (*icmp).code;
        (*icmp).kind = reply;
        (*icmp).check = csum_replace(
            (*icmp).check,
            u16::from_ne_bytes([request, code]),
            u16::from_ne_bytes([reply, code]),
        );
    }
    Verdict::Tx(Counter::IcmpEchoReply)
}

/// The verdict for an ICMP echo request (IPv4 header at `l3`, ICMP at `l4`, IP packet
/// ending at `l3_end`) to `dst`; the packet is the reply when it is `Verdict::Tx`.
#[inline(always)]
pub fn reply_v4(ctx: &XdpContext, l3: usize, l4: usize, l3_end: usize, dst: u32) -> Verdict {
    // SAFETY: copied out at once.
    let flags = unsafe { VIP_ADDRS_V4.get(dst) }.map(|a| a.flags);
    reply(
        ctx,
        flags,
        l4,
        l3_end,
        (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY),
        || {
            let ip = ptr_at::<Ipv4Hdr>(ctx, l3)?;
            // SAFETY: bounds checked by ptr_at. Swapping the addresses changes no checksum
            // (the ICMPv4 one covers no pseudo-header anyway).
            unsafe {
                let (src, dst) = ((*ip).src, (*ip).dst);
                (*ip).src = dst;
                (*ip).dst = src;
                let proto = (*ip).proto;
                let old = u16::from_ne_bytes([(*ip).ttl, proto]);
                (*ip).ttl = REPLY_TTL;
                (*ip).check =
                    csum_replace((*ip).check, old, u16::from_ne_bytes([REPLY_TTL, proto]));
            }
            Some(())
        },
    )
}

/// As `reply_v4`, for an ICMPv6 echo request (IPv6 header at `l3`).
#[inline(always)]
pub fn reply_v6(ctx: &XdpContext, l3: usize, l4: usize, l3_end: usize, dst: [u32; 4]) -> Verdict {
    // SAFETY: copied out at once.
    let flags = unsafe { VIP_ADDRS_V6.get(dst) }.map(|a| a.flags);
    reply(
        ctx,
        flags,
        l4,
        l3_end,
        (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY),
        || {
            let ip = ptr_at::<Ipv6Hdr>(ctx, l3)?;
            // SAFETY: bounds checked by ptr_at. The pseudo-header's sum does not change when
            // its two addresses trade places; the hop limit is not covered.
            unsafe {
                let words = &raw mut (*ip).src as *mut u32;
                for i in 0..4 {
                    let (s, d) = (words.add(i), words.add(i + 4));
                    let (a, b) = (core::ptr::read_volatile(s), core::ptr::read_volatile(d));
                    *s = b;
                    *d = a;
                }
                (*ip).hop_limit = REPLY_TTL;
            }
            Some(())
        },
    )
}
