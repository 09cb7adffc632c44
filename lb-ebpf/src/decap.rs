//! `lb_decap`, for backends: strips the outer IPIP / IPv6-in-IPv6 header (or the outer IP
//! and UDP headers of GUE, to `TUNNEL`'s port) a load balancer added and hands the
//! client's packet to the kernel. (The kernel this project targets has no IPIP or FOU
//! module, so backends need this.)
//!
//! - Only load balancers may send encapsulated packets: an outer source outside
//!   `DECAP_CONFIG`'s prefixes is dropped and counted (with none configured, every
//!   encapsulated packet is).
//! - A chained packet (second chance, see `chain.rs`: a second header to the previous
//!   Backend) is delivered here if it is a SYN or a local socket has its flow (established,
//!   request or time-wait socket, or a listener that issued its SYN cookie); otherwise the
//!   outer header is stripped and the rest goes to the previous Backend.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_FIB_LKUP_RET_SUCCESS, bpf_sock, bpf_sock_tuple, xdp_action,
    },
    helpers::{
        bpf_redirect, bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_check_syncookie,
        bpf_xdp_adjust_head,
    },
    programs::XdpContext,
};
use lb_common::{
    consts::{DECAP_PREFIXES, DecapCounter, PROTO_IPIP, PROTO_IPV6, PROTO_TCP, PROTO_UDP},
    types::DecapConfig,
};

use crate::{
    gue::UDP_HLEN,
    maps::{DECAP_CONFIG, DECAP_STATS, FIB_SCRATCH, TUNNEL},
    parse::{
        ETH_P_IP, ETH_P_IPV6, EthHdr, IPV4_HLEN, IPV6_HLEN, Ipv4Hdr, Ipv6Hdr, TCP_FLAG_SYN, TcpHdr,
        UdpHdr, VlanHdr, parse_l2, ptr_at, read_addr6,
    },
    route::fib_lookup_to,
};

const TCP_LISTEN: u32 = 10;
const TCP_FLAG_ACK: u8 = 0x10;

#[inline(always)]
fn count(counter: DecapCounter) {
    if let Some(c) = DECAP_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn decap(ctx: &XdpContext) -> u32 {
    let Some(l2) = parse_l2(ctx) else {
        return xdp_action::XDP_PASS;
    };
    // Plain words, not `L2`: its `Option<u16>` has undefined bytes when `None`, and a
    // spill of them is refused by the verifier ("!read_ok").
    let l2 = Outer {
        l3_off: l2.l3_off,
        proto: l2.proto,
        vlan_tci: l2.vlan_tci.map_or(NO_VLAN, u32::from),
    };
    match l2.proto {
        ETH_P_IP => decap_ipv4(ctx, &l2),
        ETH_P_IPV6 => decap_ipv6(ctx, &l2),
        _ => xdp_action::XDP_PASS,
    }
}

/// Where the outer IP header starts, its EtherType, and the 802.1Q tag (or `NO_VLAN`).
struct Outer {
    l3_off: usize,
    proto: u16,
    vlan_tci: u32,
}

const NO_VLAN: u32 = u32::MAX;

/// The 20-byte IPIP header at `off`, if there is one (no options, protocol 4).
#[inline(always)]
fn ipip_at(ctx: &XdpContext, off: usize) -> Option<*const Ipv4Hdr> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, off)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { ((*ip).vihl == 0x45 && (*ip).proto == PROTO_IPIP).then_some(ip) }
}

/// The IPv6 header at `off` if IPv6-in-IPv6 follows it.
#[inline(always)]
fn ip6ip6_at(ctx: &XdpContext, off: usize) -> Option<*const Ipv6Hdr> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, off)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { ((*ip).nexthdr == PROTO_IPV6).then_some(ip) }
}

/// The load balancers' prefixes (read once per encapsulated packet).
#[inline(always)]
fn load_balancers() -> Option<&'static DecapConfig> {
    DECAP_CONFIG.get(0)
}

#[inline(always)]
fn from_lb_v4(c: &DecapConfig, src: u32) -> bool {
    let mut i = 0;
    while i < DECAP_PREFIXES {
        if i as u32 >= c.v4_count {
            break;
        }
        if src & c.v4[i].mask == c.v4[i].addr {
            return true;
        }
        i += 1;
    }
    false
}

#[inline(always)]
fn from_lb_v6(c: &DecapConfig, src: &[u32; 4]) -> bool {
    let mut i = 0;
    while i < DECAP_PREFIXES {
        if i as u32 >= c.v6_count {
            break;
        }
        let p = &c.v6[i];
        if src[0] & p.mask[0] == p.addr[0]
            && src[1] & p.mask[1] == p.addr[1]
            && src[2] & p.mask[2] == p.addr[2]
            && src[3] & p.mask[3] == p.addr[3]
        {
            return true;
        }
        i += 1;
    }
    false
}

/// The EtherType of the GUE payload at `off` (GUE variant 1: the IP version in the first
/// nibble), if the UDP header before it (at `off - 8`) is to the GUE port.
#[inline(always)]
fn gue_at(ctx: &XdpContext, off: usize) -> Option<u16> {
    let udp: *const UdpHdr = ptr_at(ctx, off - UDP_HLEN)?;
    let port = TUNNEL.get(0)?.gue_port;
    // SAFETY: bounds checked by ptr_at.
    if port == 0 || unsafe { (*udp).dport } != port {
        return None;
    }
    let version: *const u8 = ptr_at(ctx, off)?;
    // SAFETY: as above.
    match unsafe { *version } >> 4 {
        4 => Some(ETH_P_IP),
        6 => Some(ETH_P_IPV6),
        _ => None,
    }
}

/// GUE over IPv4 (the outer header at `l2.l3_off` carries UDP): from a load balancer, to
/// the GUE port, it is delivered as the packet inside; anything else is not ours.
#[inline(always)]
fn decap_gue_v4(ctx: &XdpContext, l2: &Outer) -> u32 {
    let Some(outer) = ptr_at::<Ipv4Hdr>(ctx, l2.l3_off) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at.
    let (vihl, proto, src) = unsafe { ((*outer).vihl, (*outer).proto, (*outer).src) };
    if vihl != 0x45 || proto != PROTO_UDP {
        return xdp_action::XDP_PASS;
    }
    const LEN: usize = IPV4_HLEN + UDP_HLEN;
    let Some(inner) = gue_at(ctx, l2.l3_off + LEN) else {
        return xdp_action::XDP_PASS;
    };
    if !load_balancers().is_some_and(|lbs| from_lb_v4(lbs, src)) {
        count(DecapCounter::DropSource);
        return xdp_action::XDP_DROP;
    }
    deliver(ctx, l2, LEN, inner, DecapCounter::Delivered)
}

/// GUE over IPv6, as `decap_gue_v4`.
#[inline(always)]
fn decap_gue_v6(ctx: &XdpContext, l2: &Outer) -> u32 {
    let Some(outer) = ptr_at::<Ipv6Hdr>(ctx, l2.l3_off) else {
        return xdp_action::XDP_PASS;
    };
    const LEN: usize = IPV6_HLEN + UDP_HLEN;
    let Some(inner) = gue_at(ctx, l2.l3_off + LEN) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at.
    let src = unsafe { read_addr6(&(*outer).src) };
    if !load_balancers().is_some_and(|lbs| from_lb_v6(lbs, &src)) {
        count(DecapCounter::DropSource);
        return xdp_action::XDP_DROP;
    }
    deliver(ctx, l2, LEN, inner, DecapCounter::Delivered)
}

#[inline(always)]
fn decap_ipv4(ctx: &XdpContext, l2: &Outer) -> u32 {
    let Some(outer) = ipip_at(ctx, l2.l3_off) else {
        return decap_gue_v4(ctx, l2);
    };
    let Some(lbs) = load_balancers() else {
        count(DecapCounter::DropSource);
        return xdp_action::XDP_DROP;
    };
    // SAFETY: bounds checked by ipip_at.
    if !from_lb_v4(lbs, unsafe { (*outer).src }) {
        count(DecapCounter::DropSource);
        return xdp_action::XDP_DROP;
    }
    let Some(middle) = ipip_at(ctx, l2.l3_off + IPV4_HLEN) else {
        return deliver(ctx, l2, IPV4_HLEN, l2.proto, DecapCounter::Delivered);
    };
    // SAFETY: bounds checked by ipip_at.
    let (middle_src, previous) = unsafe { ((*middle).src, (*middle).dst) };
    if !from_lb_v4(lbs, middle_src) {
        count(DecapCounter::DropSource);
        return xdp_action::XDP_DROP;
    }
    match local_v4(ctx, l2.l3_off + 2 * IPV4_HLEN) {
        Some(true) => deliver(ctx, l2, 2 * IPV4_HLEN, l2.proto, DecapCounter::ChainedLocal),
        Some(false) => forward_on(ctx, l2, IPV4_HLEN, &[previous, 0, 0, 0], false),
        None => {
            count(DecapCounter::DropMalformed);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn decap_ipv6(ctx: &XdpContext, l2: &Outer) -> u32 {
    let Some(outer) = ip6ip6_at(ctx, l2.l3_off) else {
        return decap_4in6(ctx, l2);
    };
    let Some(lbs) = load_balancers() else {
        count(DecapCounter::DropSource);
        return xdp_action::XDP_DROP;
    };
    // SAFETY: bounds checked by ip6ip6_at.
    if !from_lb_v6(lbs, &unsafe { read_addr6(&(*outer).src) }) {
        count(DecapCounter::DropSource);
        return xdp_action::XDP_DROP;
    }
    let Some(middle) = ip6ip6_at(ctx, l2.l3_off + IPV6_HLEN) else {
        return deliver(ctx, l2, IPV6_HLEN, l2.proto, DecapCounter::Delivered);
    };
    // SAFETY: bounds checked by ip6ip6_at.
    let (middle_src, previous) =
        unsafe { (read_addr6(&(*middle).src), read_addr6(&(*middle).dst)) };
    if !from_lb_v6(lbs, &middle_src) {
        count(DecapCounter::DropSource);
        return xdp_action::XDP_DROP;
    }
    match local_v6(ctx, l2.l3_off + 2 * IPV6_HLEN) {
        Some(true) => deliver(ctx, l2, 2 * IPV6_HLEN, l2.proto, DecapCounter::ChainedLocal),
        Some(false) => forward_on(ctx, l2, IPV6_HLEN, &previous, true),
        None => {
            count(DecapCounter::DropMalformed);
            xdp_action::XDP_DROP
        }
    }
}

/// IPv4-in-IPv6 (an IPv4 Vip with IPv6 backends, never chained): delivered as IPv4.
#[inline(always)]
fn decap_4in6(ctx: &XdpContext, l2: &Outer) -> u32 {
    let Some(outer) = ptr_at::<Ipv6Hdr>(ctx, l2.l3_off) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at.
    match unsafe { (*outer).nexthdr } {
        PROTO_IPIP => {}
        PROTO_UDP => return decap_gue_v6(ctx, l2),
        _ => return xdp_action::XDP_PASS,
    }
    let Some(lbs) = load_balancers() else {
        count(DecapCounter::DropSource);
        return xdp_action::XDP_DROP;
    };
    // SAFETY: as above.
    if !from_lb_v6(lbs, &unsafe { read_addr6(&(*outer).src) }) {
        count(DecapCounter::DropSource);
        return xdp_action::XDP_DROP;
    }
    deliver(ctx, l2, IPV6_HLEN, ETH_P_IP, DecapCounter::Delivered)
}

/// Whether the IPv4 TCP segment at `off` is this host's: a SYN, or a local socket has its
/// flow. `None` if it is not an IPv4 TCP segment.
#[inline(always)]
fn local_v4(ctx: &XdpContext, off: usize) -> Option<bool> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, off)?;
    // SAFETY: bounds checked by ptr_at.
    let (vihl, proto) = unsafe { ((*ip).vihl, (*ip).proto) };
    if vihl >> 4 != 4 || vihl & 0x0F < 5 || proto != PROTO_TCP {
        return None;
    }
    let ihl = ((vihl & 0x0F) as usize) * 4;
    let tcp: *mut TcpHdr = ptr_at(ctx, off + ihl)?;
    // SAFETY: bounds checked by ptr_at.
    let flags = unsafe { (*tcp).flags };
    if flags & TCP_FLAG_SYN != 0 && flags & TCP_FLAG_ACK == 0 {
        return Some(true);
    }
    // SAFETY: a zeroed plain C struct.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    // SAFETY: bounds checked above; the union's IPv4 member is written whole.
    unsafe {
        let t = &mut tuple.__bindgen_anon_1.ipv4;
        t.saddr = (*ip).src;
        t.daddr = (*ip).dst;
        t.sport = (*tcp).sport;
        t.dport = (*tcp).dport;
    }
    let size = size_of::<[u32; 3]>() as u32;
    Some(socket_has_flow(
        ctx,
        &mut tuple,
        size,
        ip as *mut c_void,
        IPV4_HLEN,
        tcp,
    ))
}

/// Whether the IPv6 TCP segment at `off` is this host's (no extension headers: the load
/// balancer never chains a packet that has them).
#[inline(always)]
fn local_v6(ctx: &XdpContext, off: usize) -> Option<bool> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, off)?;
    // SAFETY: bounds checked by ptr_at.
    let (version, nexthdr) = unsafe { (*(ip as *const u8) >> 4, (*ip).nexthdr) };
    if version != 6 || nexthdr != PROTO_TCP {
        return None;
    }
    let tcp: *mut TcpHdr = ptr_at(ctx, off + IPV6_HLEN)?;
    // SAFETY: bounds checked by ptr_at.
    let flags = unsafe { (*tcp).flags };
    if flags & TCP_FLAG_SYN != 0 && flags & TCP_FLAG_ACK == 0 {
        return Some(true);
    }
    // SAFETY: a zeroed plain C struct.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    // SAFETY: bounds checked above; the union's IPv6 member is written whole.
    unsafe {
        let t = &mut tuple.__bindgen_anon_1.ipv6;
        t.saddr = read_addr6(&(*ip).src);
        t.daddr = read_addr6(&(*ip).dst);
        t.sport = (*tcp).sport;
        t.dport = (*tcp).dport;
    }
    let size = size_of::<[u32; 9]>() as u32;
    Some(socket_has_flow(
        ctx,
        &mut tuple,
        size,
        ip as *mut c_void,
        IPV6_HLEN,
        tcp,
    ))
}

/// `bpf_skc_lookup_tcp` on the flow: an established, request or time-wait socket has it; a
/// listener has it only if the segment carries a SYN cookie it issued.
#[inline(always)]
fn socket_has_flow(
    ctx: &XdpContext,
    tuple: &mut bpf_sock_tuple,
    size: u32,
    ip: *mut c_void,
    ip_len: usize,
    tcp: *mut TcpHdr,
) -> bool {
    // SAFETY: helper calls with a valid tuple and packet pointers bounds-checked by the
    // callers; the socket is released on every path.
    unsafe {
        let sk = bpf_skc_lookup_tcp(
            ctx.ctx as *mut c_void,
            tuple,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        );
        if sk.is_null() {
            return false;
        }
        let mine = if (*(sk as *const bpf_sock)).state == TCP_LISTEN {
            bpf_tcp_check_syncookie(
                sk as *mut c_void,
                ip,
                ip_len as u32,
                tcp as *mut _,
                size_of::<TcpHdr>() as u32,
            ) == 0
        } else {
            true
        };
        bpf_sk_release(sk as *mut c_void);
        mine
    }
}

/// Strips `len` bytes of outer headers and passes the packet to the kernel.
#[inline(always)]
fn deliver(ctx: &XdpContext, l2: &Outer, len: usize, inner: u16, counter: DecapCounter) -> u32 {
    if !strip(ctx, l2, len, inner) {
        return xdp_action::XDP_DROP;
    }
    count(counter);
    xdp_action::XDP_PASS
}

/// Removes `len` bytes after the L2 header: moves the L2 header up against what follows,
/// with EtherType `inner` (network order) for what is left, then drops the gap.
#[inline(always)]
fn strip(ctx: &XdpContext, l2: &Outer, len: usize, inner: u16) -> bool {
    let (Some(old), Some(new)) = (ptr_at::<EthHdr>(ctx, 0), ptr_at::<EthHdr>(ctx, len)) else {
        return false;
    };
    // SAFETY: both bounds checked; the regions do not overlap (len >= 20 > 14).
    // Seven 16-bit moves: a [u8; 6] copy here would become an out-of-line memmove.
    unsafe {
        let (old, new) = (old as *const u16, new as *mut u16);
        for i in 0..size_of::<EthHdr>() / 2 {
            core::ptr::write_volatile(new.add(i), *old.add(i));
        }
    }
    if l2.vlan_tci == NO_VLAN {
        // SAFETY: bounds checked above.
        unsafe { (*new).proto = inner };
    } else {
        let tci = l2.vlan_tci as u16;
        let Some(vlan) = ptr_at::<VlanHdr>(ctx, len + size_of::<EthHdr>()) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            (*vlan).tci = tci;
            (*vlan).proto = inner;
        }
    }
    // SAFETY: shrinking by a length known to be inside the packet.
    unsafe { bpf_xdp_adjust_head(ctx.ctx, len as i32) == 0 }
}

/// Sends a chained packet on to its previous Backend: the outer header (`len` bytes) goes,
/// what is left is an IPIP packet from a load balancer to `previous`. Out through the
/// kernel's next hop (`bpf_fib_lookup`); without a neighbour entry yet, the kernel forwards
/// it (and resolves the neighbour for the next packets).
#[inline(always)]
fn forward_on(ctx: &XdpContext, l2: &Outer, len: usize, previous: &[u32; 4], v6: bool) -> u32 {
    if !strip(ctx, l2, len, l2.proto) {
        return xdp_action::XDP_DROP;
    }
    let Some(params) = FIB_SCRATCH.get_ptr_mut(0) else {
        return xdp_action::XDP_DROP;
    };
    if fib_lookup_to(ctx, params, previous, v6) != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        count(DecapCounter::ChainedForwardedByKernel);
        return xdp_action::XDP_PASS;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: bounds checked by ptr_at; `params` is this CPU's scratch entry, which
    // `fib_lookup_to` filled. dmac then smac, as in the Ethernet header.
    let ifindex = unsafe {
        let to = eth as *mut u8;
        for i in 0..6 {
            *to.add(i) = (*params).dmac[i];
            *to.add(6 + i) = (*params).smac[i];
        }
        (*params).ifindex
    };
    count(DecapCounter::ChainedForwarded);
    if ifindex == ctx.ingress_ifindex() as u32 {
        xdp_action::XDP_TX
    } else {
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    }
}
