//! Fragments to Vips with `fragments: track`, as Cilium handles them: only a datagram's
//! first fragment carries its ports, so it records them in the `FRAGMENTS` LRU map by
//! (source, destination, IP id, protocol), and each later fragment takes them from there.
//! Every piece then has the flow of its unfragmented siblings, reaches the same backend,
//! and the backend's kernel reassembles the datagram. A later fragment whose first was not
//! seen (lost, reordered, evicted) is dropped and counted. Addresses with no tracking Vip
//! drop every fragment, as before this existed, so no datagram is split across backends.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    consts::{Counter, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, vip_flags},
    types::{FlowV4, FlowV6, FragmentKey, FragmentPorts, vip_addr_flags},
};

use crate::{
    maps::{FRAGMENTS, VIP_STATE},
    parse::{Parsed, UdpHdr, Verdict, parse_l4, ptr_at},
    select::{Flow, lookup_vip},
    stats::count,
};

/// `frag_off` bits (host order) of the IPv4 fragment offset.
const IP_OFFSET: u16 = 0x1FFF;

/// The IPv6 fragment header.
#[repr(C)]
struct FragHdr {
    nexthdr: u8,
    _reserved: u8,
    /// Offset in 8-byte units in the top 13 bits, more-fragments in bit 0.
    frag_off: u16,
    id: u32,
}

/// An IPv4 fragment (the IP header's `frag_off` in host order, L4 or payload at `l4`),
/// to an address with `addr_flags`.
#[expect(
    clippy::too_many_arguments,
    reason = "inlined; the fields parse_ipv4 read"
)]
#[inline(always)]
pub fn parse_v4(
    ctx: &XdpContext,
    l4: usize,
    l3_end: usize,
    (src, dst): (u32, u32),
    id: u16,
    proto: u8,
    frag_off: u16,
    addr_flags: Option<u32>,
) -> Result<Parsed<FlowV4>, Verdict> {
    tracked(addr_flags)?;
    let key = FragmentKey {
        src: [src, 0, 0, 0],
        dst: [dst, 0, 0, 0],
        id: id as u32,
        proto,
        family: FAMILY_V4,
        _pad: 0,
    };
    let first = frag_off & IP_OFFSET == 0;
    steer(ctx, &key, first, false, l4, l3_end, |sport, dport| FlowV4 {
        src,
        dst,
        sport,
        dport,
        proto,
        _pad0: 0,
        _pad1: 0,
    })
}

/// An IPv6 packet whose fragment header is at `l4`, to an address with `addr_flags`.
#[inline(always)]
pub fn parse_v6(
    ctx: &XdpContext,
    l4: usize,
    l3_end: usize,
    (src, dst): ([u32; 4], [u32; 4]),
    addr_flags: Option<u32>,
) -> Result<Parsed<FlowV6>, Verdict> {
    tracked(addr_flags)?;
    let malformed = Verdict::Drop(Counter::DropMalformed);
    let hdr: *const FragHdr = ptr_at(ctx, l4).ok_or(malformed)?;
    if l4 + size_of::<FragHdr>() > l3_end {
        return Err(malformed);
    }
    // SAFETY: bounds checked by ptr_at.
    let (proto, frag_off, id) =
        unsafe { ((*hdr).nexthdr, u16::from_be((*hdr).frag_off), (*hdr).id) };
    let key = FragmentKey {
        src,
        dst,
        id,
        proto,
        family: FAMILY_V6,
        _pad: 0,
    };
    let (first, last) = (frag_off & 0xFFF8 == 0, frag_off & 1 == 0);
    let l4 = l4 + size_of::<FragHdr>();
    steer(ctx, &key, first, last, l4, l3_end, |sport, dport| FlowV6 {
        src,
        dst,
        sport,
        dport,
        proto,
        _pad0: 0,
        _pad1: 0,
    })
}

/// The Flow of a fragment of datagram `key`: from its own L4 header at `l4` for the
/// first fragment (recorded unless it is also the `last`), else from the map.
/// Fragments to an address with no tracking Vip (`addr_flags`; `None`: no Vip at all)
/// are dropped whatever they hold, as before tracking existed.
#[inline(always)]
fn tracked(addr_flags: Option<u32>) -> Result<(), Verdict> {
    match addr_flags {
        Some(f) if f & vip_addr_flags::FRAGMENTS != 0 => Ok(()),
        _ => Err(Verdict::Drop(Counter::DropFragment)),
    }
}

#[inline(always)]
fn steer<F: Flow>(
    ctx: &XdpContext,
    key: &FragmentKey,
    first: bool,
    last: bool,
    l4: usize,
    l3_end: usize,
    flow: impl FnOnce(u16, u16) -> F,
) -> Result<Parsed<F>, Verdict> {
    let dropped = Verdict::Drop(Counter::DropFragment);
    if key.proto != PROTO_TCP && key.proto != PROTO_UDP {
        return Err(dropped);
    }
    if !first {
        // SAFETY: copied out at once.
        let ports = unsafe { FRAGMENTS.get(key) }
            .copied()
            .ok_or(Verdict::Drop(Counter::DropFragmentUnknown))?;
        count(Counter::FragmentTracked);
        return Ok(Parsed {
            flow: flow(ports.sport, ports.dport),
            syn: false,
            icmp_error: false,
        });
    }
    let (sport, dport, syn) = first_ports(ctx, key.proto, l4, l3_end)?;
    let flow = flow(sport, dport);
    // The address tracks for some Vip; this port's must too.
    let vip = lookup_vip(&flow)?;
    if VIP_STATE
        .get(vip)
        .is_none_or(|v| v.flags & vip_flags::FRAGMENTS_TRACK == 0)
    {
        return Err(dropped);
    }
    // A failed insert only costs the later fragments (dropped as unknown).
    if !last {
        let _ = FRAGMENTS.insert(key, FragmentPorts { sport, dport }, 0);
    }
    count(Counter::FragmentTracked);
    Ok(Parsed {
        flow,
        syn,
        icmp_error: false,
    })
}

/// Ports (network order) and SYN of the TCP or UDP header at the start of a first
/// fragment: the header must be whole inside it; a UDP length that runs past it is the
/// datagram's, not an error.
#[inline(always)]
fn first_ports(
    ctx: &XdpContext,
    proto: u8,
    l4: usize,
    l3_end: usize,
) -> Result<(u16, u16, bool), Verdict> {
    let malformed = Verdict::Drop(Counter::DropMalformed);
    if proto == PROTO_TCP {
        let (ports, syn) = parse_l4(ctx, proto, l4, l3_end)?;
        return Ok((ports.sport, ports.dport, syn));
    }
    let udp: *const UdpHdr = ptr_at(ctx, l4).ok_or(malformed)?;
    if l4 + size_of::<UdpHdr>() > l3_end {
        return Err(malformed);
    }
    // SAFETY: bounds checked by ptr_at.
    Ok(unsafe { ((*udp).sport, (*udp).dport, false) })
}
