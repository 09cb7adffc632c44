//! Header layouts and bounds-checked access to packet bytes.
//!
//! Fields are naturally aligned so that an address is one 32-bit load; IP headers sit at
//! 2-byte alignment behind Ethernet, which the JIT handles on architectures with efficient
//! unaligned access (the verifier only enforces alignment where they lack it).
//! Multi-byte fields are in network byte order.

use core::hint::cold_path;

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    consts::Counter,
    hash::{vip_filter_bit_v4, vip_filter_bit_v6},
    types::{FlowV4, FlowV6, VipFilter},
};

use crate::{
    fragments, icmp_echo,
    maps::{VIP_ADDRS_V4, VIP_ADDRS_V6},
};

pub const ETH_P_IP: u16 = 0x0800u16.to_be();
pub const ETH_P_IPV6: u16 = 0x86DDu16.to_be();
pub const ETH_P_8021Q: u16 = 0x8100u16.to_be();

pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const ICMP_HLEN: usize = 8;

/// `frag_off` bits (host order) that mark a fragment: more-fragments or an offset.
pub const IP_MF_OFFSET: u16 = 0x3FFF;
pub const TCP_FLAG_SYN: u8 = 0x02;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: u16,
}

#[repr(C)]
pub struct VlanHdr {
    pub tci: u16,
    pub proto: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub src: u32,
    pub dst: u32,
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub vtc_flow: u32,
    pub payload_len: u16,
    pub nexthdr: u8,
    pub hop_limit: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
}

#[repr(C)]
pub struct TcpHdr {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack_seq: u32,
    /// Data offset (in 32-bit words) in the high 4 bits.
    pub doff: u8,
    pub flags: u8,
    pub window: u16,
    pub check: u16,
    pub urg_ptr: u16,
}

#[repr(C)]
pub struct UdpHdr {
    pub sport: u16,
    pub dport: u16,
    pub len: u16,
    pub check: u16,
}

/// Source and destination port, common to TCP and UDP (and all an ICMP error quotes).
#[repr(C)]
pub struct Ports {
    pub sport: u16,
    pub dport: u16,
}

#[repr(C)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: u16,
    pub rest: u32,
}

/// Zeroes `*dst` in place with volatile 32-bit stores: LLVM merges plain zero stores into
/// a `memset` call, which in BPF is an out-of-line byte loop.
#[inline(always)]
pub fn zero<T>(dst: *mut T) {
    const { assert!(size_of::<T>().is_multiple_of(4) && align_of::<T>() >= 4) };
    let words = dst as *mut u32;
    for i in 0..size_of::<T>() / 4 {
        // SAFETY: in bounds of `*dst`, which is 4-aligned; all-zero is valid for the
        // plain-data types used here.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
}

/// Copies `*src` to `*dst` with volatile 32-bit loads: LLVM turns a plain struct copy
/// between two pointers into a call to `memmove`, a byte loop in BPF.
#[inline(always)]
pub fn copy<T>(dst: *mut T, src: &T) {
    const { assert!(size_of::<T>().is_multiple_of(4) && align_of::<T>() >= 4) };
    let (to, from) = (dst as *mut u32, src as *const T as *const u32);
    for i in 0..size_of::<T>() / 4 {
        // SAFETY: both in bounds of a `T` and 4-aligned; plain data.
        unsafe { *to.add(i) = core::ptr::read_volatile(from.add(i)) };
    }
}

/// An IPv6 address read from packet memory with four 32-bit loads (a plain array copy
/// between pointers may become a call to `memmove`).
#[inline(always)]
pub fn read_addr6(addr: *const [u32; 4]) -> [u32; 4] {
    let words = addr as *const u32;
    // SAFETY: the caller bounds-checked the 16 bytes.
    unsafe { core::array::from_fn(|i| core::ptr::read_volatile(words.add(i))) }
}

/// A pointer to a `T` at `offset`, if the whole `T` lies inside the packet.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        cold_path();
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Where the L3 header starts and what the L2 header held.
#[derive(Clone, Copy)]
pub struct L2 {
    /// Offset of the IP header: 14, or 18 behind one 802.1Q tag.
    pub l3_off: usize,
    /// EtherType of the IP header (network order).
    pub proto: u16,
    /// The 802.1Q tag, if any (network order), kept on forwarded packets.
    pub vlan_tci: Option<u16>,
}

/// Parses Ethernet and at most one 802.1Q tag. `None` if truncated.
#[inline(always)]
pub fn parse_l2(ctx: &XdpContext) -> Option<L2> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let proto = unsafe { (*eth).proto };
    if proto != ETH_P_8021Q {
        return Some(L2 {
            l3_off: ETH_HLEN,
            proto,
            vlan_tci: None,
        });
    }
    let vlan: *const VlanHdr = ptr_at(ctx, ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at.
    let (tci, proto) = unsafe { ((*vlan).tci, (*vlan).proto) };
    Some(L2 {
        l3_off: ETH_HLEN + VLAN_HLEN,
        proto,
        vlan_tci: Some(tci),
    })
}

/// What the program does with a packet it does not forward, and the counter it bumps.
/// Each variant's discriminant is its XDP action, so that turning a verdict into the
/// action is one load, with no branch per variant.
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Verdict {
    Drop(Counter) = xdp_action::XDP_DROP,
    /// A Vip's packet for the local stack (a Vip without backends that passes).
    Pass(Counter) = xdp_action::XDP_PASS,
    /// Not for a Vip: to the interface's next program if it has one, else the kernel.
    NotVip(Counter) = crate::next::NOT_VIP,
    /// The program rewrote the packet into its own answer (an ICMP echo reply).
    Tx(Counter) = xdp_action::XDP_TX,
}

impl Verdict {
    /// The XDP action and the counter.
    #[inline(always)]
    pub fn action(self) -> (u32, Counter) {
        match self {
            Verdict::Drop(c) => (xdp_action::XDP_DROP, c),
            Verdict::Pass(c) => (xdp_action::XDP_PASS, c),
            Verdict::NotVip(c) => (crate::next::NOT_VIP, c),
            Verdict::Tx(c) => (xdp_action::XDP_TX, c),
        }
    }
}

/// A packet for a Vip address, parsed down to its Flow.
pub struct Parsed<F> {
    /// The Flow as the client sent it (for an ICMP error: the quoted flow, reversed).
    pub flow: F,
    /// TCP SYN set: a new connection, so a conntrack miss is expected.
    pub syn: bool,
    /// An ICMP "fragmentation needed" / "packet too big" about `flow`: steer it to the
    /// flow's backend, but never create a connection-table entry for it.
    pub icmp_error: bool,
}

const PROTO_TCP: u8 = lb_common::consts::PROTO_TCP;
const PROTO_UDP: u8 = lb_common::consts::PROTO_UDP;

/// Reads ports (and SYN) of the TCP or UDP header at `l4` that must end by `l3_end`.
#[inline(always)]
pub fn parse_l4(
    ctx: &XdpContext,
    proto: u8,
    l4: usize,
    l3_end: usize,
) -> Result<(Ports, bool), Verdict> {
    let malformed = Verdict::Drop(Counter::DropMalformed);
    match proto {
        PROTO_TCP => {
            let tcp: *const TcpHdr = ptr_at(ctx, l4).ok_or(malformed)?;
            // SAFETY: bounds checked by ptr_at.
            let (sport, dport, doff, flags) =
                unsafe { ((*tcp).sport, (*tcp).dport, (*tcp).doff, (*tcp).flags) };
            // The header, options included, must end inside the IP payload.
            let hlen = ((doff >> 4) as usize) * 4;
            if hlen < size_of::<TcpHdr>() || l4 + hlen > l3_end {
                return Err(malformed);
            }
            Ok((Ports { sport, dport }, flags & TCP_FLAG_SYN != 0))
        }
        PROTO_UDP => {
            let udp: *const UdpHdr = ptr_at(ctx, l4).ok_or(malformed)?;
            // SAFETY: bounds checked by ptr_at.
            let (sport, dport, len) = unsafe { ((*udp).sport, (*udp).dport, (*udp).len) };
            // The datagram must fit the IP payload (shorter is fine: trailing padding).
            let len = u16::from_be(len) as usize;
            if len < size_of::<UdpHdr>() || l4 + len > l3_end {
                return Err(malformed);
            }
            Ok((Ports { sport, dport }, false))
        }
        _ => Err(Verdict::NotVip(Counter::PassVipOther)),
    }
}

/// Parses an IPv4 packet to its Flow. Packets not for a Vip address come back as
/// `Verdict::NotVip` before anything past the IP header is read.
#[inline(always)]
pub fn parse_ipv4(
    ctx: &XdpContext,
    l3: usize,
    filter: &VipFilter,
) -> Result<Parsed<FlowV4>, Verdict> {
    let bad_l3 = Verdict::NotVip(Counter::PassMalformed);
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3).ok_or(bad_l3)?;
    // SAFETY: bounds checked by ptr_at.
    let (vihl, tot_len, id, frag_off, proto, src, dst) = unsafe {
        (
            (*ip).vihl,
            (*ip).tot_len,
            (*ip).id,
            (*ip).frag_off,
            (*ip).proto,
            (*ip).src,
            (*ip).dst,
        )
    };
    let ihl = ((vihl & 0x0F) as usize) * 4;
    let tot_len = u16::from_be(tot_len) as usize;
    if vihl >> 4 != 4
        || ihl < IPV4_HLEN
        || tot_len < ihl
        || ctx.data() + l3 + tot_len > ctx.data_end()
    {
        return Err(bad_l3);
    }
    if !filter.contains(vip_filter_bit_v4(dst)) {
        return Err(Verdict::NotVip(Counter::PassNotVip));
    }
    // Past the filter, decisions that drop are confirmed against the exact address set.
    let confirm = |verdict: Verdict| match verdict {
        // SAFETY: presence check only.
        Verdict::Drop(_) | Verdict::NotVip(Counter::PassVipOther)
            if unsafe { VIP_ADDRS_V4.get(dst) }.is_none() =>
        {
            Verdict::NotVip(Counter::PassNotVip)
        }
        other => other,
    };
    let l4 = l3 + ihl;
    let l3_end = l3 + tot_len;
    let frag_off = u16::from_be(frag_off);
    if frag_off & IP_MF_OFFSET != 0 {
        cold_path();
        // SAFETY: copied out at once.
        let addr_flags = unsafe { VIP_ADDRS_V4.get(dst) }.map(|a| a.flags);
        let (src_dst, id) = ((src, dst), u16::from_be(id));
        return fragments::parse_v4(ctx, l4, l3_end, src_dst, id, proto, frag_off, addr_flags)
            .map_err(confirm);
    }
    if proto == PROTO_ICMP {
        cold_path();
        return parse_icmpv4_error(ctx, l3, l4, l3_end, dst).map_err(confirm);
    }
    let (ports, syn) = parse_l4(ctx, proto, l4, l3_end).map_err(confirm)?;
    let flow = FlowV4 {
        src,
        dst,
        sport: ports.sport,
        dport: ports.dport,
        proto,
        _pad0: 0,
        _pad1: 0,
    };
    Ok(Parsed {
        flow,
        syn,
        icmp_error: false,
    })
}

/// ICMP "fragmentation needed" to a Vip quotes a packet the backend sent (Vip to client):
/// its reversed tuple is the client's Flow. Other ICMP to a Vip goes to the local stack.
#[inline(always)]
fn parse_icmpv4_error(
    ctx: &XdpContext,
    l3: usize,
    l4: usize,
    l3_end: usize,
    dst: u32,
) -> Result<Parsed<FlowV4>, Verdict> {
    let malformed = Verdict::Drop(Counter::DropMalformed);
    let icmp: *const IcmpHdr = ptr_at(ctx, l4).ok_or(malformed)?;
    // SAFETY: bounds checked by ptr_at.
    let (kind, code) = unsafe { ((*icmp).kind, (*icmp).code) };
    if kind == icmp_echo::ICMP_ECHO_REQUEST {
        return Err(icmp_echo::reply_v4(ctx, l3, l4, l3_end, dst));
    }
    if kind != ICMP_DEST_UNREACH || code != ICMP_FRAG_NEEDED {
        return Err(Verdict::NotVip(Counter::PassVipOther));
    }
    let inner_l3 = l4 + ICMP_HLEN;
    let inner: *const Ipv4Hdr = ptr_at(ctx, inner_l3).ok_or(malformed)?;
    let ports: *const Ports = ptr_at(ctx, inner_l3 + IPV4_HLEN).ok_or(malformed)?;
    // SAFETY: bounds checked by ptr_at.
    let (vihl, proto, src, dst, sport, dport) = unsafe {
        (
            (*inner).vihl,
            (*inner).proto,
            (*inner).src,
            (*inner).dst,
            (*ports).sport,
            (*ports).dport,
        )
    };
    if vihl != 0x45 || inner_l3 + IPV4_HLEN + size_of::<Ports>() > l3_end {
        return Err(malformed);
    }
    let flow = FlowV4 {
        src: dst,
        dst: src,
        sport: dport,
        dport: sport,
        proto,
        _pad0: 0,
        _pad1: 0,
    };
    Ok(Parsed {
        flow,
        syn: false,
        icmp_error: true,
    })
}

/// Parses an IPv6 packet to its Flow; extension headers in front of L4 are not walked.
#[inline(always)]
pub fn parse_ipv6(
    ctx: &XdpContext,
    l3: usize,
    filter: &VipFilter,
) -> Result<Parsed<FlowV6>, Verdict> {
    let bad_l3 = Verdict::NotVip(Counter::PassMalformed);
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3).ok_or(bad_l3)?;
    // SAFETY: bounds checked by ptr_at.
    let (vtc_flow, payload_len, nexthdr) =
        unsafe { ((*ip).vtc_flow, (*ip).payload_len, (*ip).nexthdr) };
    let l3_end = l3 + IPV6_HLEN + u16::from_be(payload_len) as usize;
    if u32::from_be(vtc_flow) >> 28 != 6 || ctx.data() + l3_end > ctx.data_end() {
        return Err(bad_l3);
    }
    // SAFETY: bounds checked by ptr_at; the map value is copied out at once.
    let dst = unsafe { (*ip).dst };
    if !filter.contains(vip_filter_bit_v6(&dst)) {
        return Err(Verdict::NotVip(Counter::PassNotVip));
    }
    let confirm = |verdict: Verdict| match verdict {
        // SAFETY: presence check only.
        Verdict::Drop(_) | Verdict::NotVip(Counter::PassVipOther)
            if unsafe { VIP_ADDRS_V6.get(dst) }.is_none() =>
        {
            Verdict::NotVip(Counter::PassNotVip)
        }
        other => other,
    };
    let l4 = l3 + IPV6_HLEN;
    match nexthdr {
        NEXTHDR_FRAGMENT => {
            // SAFETY: bounds checked by ptr_at; the map value is copied out at once.
            let (src, addr_flags) = unsafe { ((*ip).src, VIP_ADDRS_V6.get(dst).map(|a| a.flags)) };
            return fragments::parse_v6(ctx, l4, l3_end, (src, dst), addr_flags).map_err(confirm);
        }
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_MOBILITY
        | NEXTHDR_HIP | NEXTHDR_SHIM6 => return Err(confirm(Verdict::Drop(Counter::DropIpv6Ext))),
        PROTO_ICMPV6 => return parse_icmpv6_error(ctx, l3, l4, l3_end, dst).map_err(confirm),
        _ => {}
    }
    let (ports, syn) = parse_l4(ctx, nexthdr, l4, l3_end).map_err(confirm)?;
    // SAFETY: bounds checked by ptr_at.
    let src = unsafe { (*ip).src };
    let flow = FlowV6 {
        src,
        dst,
        sport: ports.sport,
        dport: ports.dport,
        proto: nexthdr,
        _pad0: 0,
        _pad1: 0,
    };
    Ok(Parsed {
        flow,
        syn,
        icmp_error: false,
    })
}

/// ICMPv6 "packet too big" to a Vip: as for IPv4, the quoted packet's reversed tuple.
#[inline(always)]
fn parse_icmpv6_error(
    ctx: &XdpContext,
    l3: usize,
    l4: usize,
    l3_end: usize,
    dst: [u32; 4],
) -> Result<Parsed<FlowV6>, Verdict> {
    let malformed = Verdict::Drop(Counter::DropMalformed);
    let icmp: *const IcmpHdr = ptr_at(ctx, l4).ok_or(malformed)?;
    // SAFETY: bounds checked by ptr_at.
    let kind = unsafe { (*icmp).kind };
    if kind == icmp_echo::ICMPV6_ECHO_REQUEST {
        return Err(icmp_echo::reply_v6(ctx, l3, l4, l3_end, dst));
    }
    if kind != ICMPV6_PKT_TOOBIG {
        return Err(Verdict::NotVip(Counter::PassVipOther));
    }
    let inner_l3 = l4 + ICMP_HLEN;
    let inner: *const Ipv6Hdr = ptr_at(ctx, inner_l3).ok_or(malformed)?;
    let ports: *const Ports = ptr_at(ctx, inner_l3 + IPV6_HLEN).ok_or(malformed)?;
    if inner_l3 + IPV6_HLEN + size_of::<Ports>() > l3_end {
        return Err(malformed);
    }
    // SAFETY: bounds checked by ptr_at.
    let (proto, src, dst, sport, dport) = unsafe {
        (
            (*inner).nexthdr,
            (*inner).src,
            (*inner).dst,
            (*ports).sport,
            (*ports).dport,
        )
    };
    let flow = FlowV6 {
        src: dst,
        dst: src,
        sport: dport,
        dport: sport,
        proto,
        _pad0: 0,
        _pad1: 0,
    };
    Ok(Parsed {
        flow,
        syn: false,
        icmp_error: true,
    })
}

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const PROTO_ICMP: u8 = lb_common::consts::PROTO_ICMP;
const PROTO_ICMPV6: u8 = lb_common::consts::PROTO_ICMPV6;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
const NEXTHDR_MOBILITY: u8 = 135;
const NEXTHDR_HIP: u8 = 139;
const NEXTHDR_SHIM6: u8 = 140;
