//! The fast path: an untagged IPv4 TCP/UDP packet of a flow that this CPU's flow cache
//! holds, handled in a few cache lines of code. Per packet, the cost of the full program
//! is dominated by instruction-cache misses on its ~18 KB of JIT code, whose hot blocks
//! the compiler spreads out; this path keeps them together. Anything else — a SYN, a
//! cache miss, a VLAN tag, IP options, fragments, ICMP, IPv6, anything malformed — returns
//! `None` and takes the full path, which parses the packet again from the start and
//! decides exactly as if this path did not exist.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    consts::{Counter, PROTO_TCP, PROTO_UDP, vip_flags},
    hash::vip_filter_bit_v4,
    types::FlowV4,
};

use crate::{
    forward::{encap_ipv4, finish, set_macs},
    maps::CONFIG,
    parse::{
        ETH_HLEN, ETH_P_IP, EthHdr, IP_MF_OFFSET, IPV4_HLEN, Ipv4Hdr, L2, TCP_FLAG_SYN, TcpHdr,
        UdpHdr, Verdict, maybe_vip, ptr_at,
    },
    select::{Flow as _, cache_hit},
};

/// `Some` with the verdict when the fast path handled the packet.
#[inline(always)]
pub fn fast_path(ctx: &XdpContext) -> Option<Result<u32, Verdict>> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*eth).proto } != ETH_P_IP {
        return None;
    }
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
    let config = CONFIG.get(0)?;
    if !maybe_vip(vip_filter_bit_v4(dst)) {
        return Some(Err(Verdict::Pass(Counter::PassNotVip)));
    }
    if u16::from_be(frag_off) & IP_MF_OFFSET != 0 {
        return None;
    }
    let l4 = ETH_HLEN + IPV4_HLEN;
    let l3_end = ETH_HLEN + tot_len;
    let (sport, dport) = match proto {
        PROTO_TCP => {
            let tcp: *const TcpHdr = ptr_at(ctx, l4)?;
            // SAFETY: bounds checked by ptr_at.
            let (sport, dport, doff, flags) =
                unsafe { ((*tcp).sport, (*tcp).dport, (*tcp).doff, (*tcp).flags) };
            if doff >> 4 < 5 || l4 + size_of::<TcpHdr>() > l3_end || flags & TCP_FLAG_SYN != 0 {
                return None;
            }
            (sport, dport)
        }
        PROTO_UDP => {
            let udp: *const UdpHdr = ptr_at(ctx, l4)?;
            // SAFETY: bounds checked by ptr_at.
            let (sport, dport, len) = unsafe { ((*udp).sport, (*udp).dport, (*udp).len) };
            if (u16::from_be(len) as usize) < size_of::<UdpHdr>()
                || l4 + size_of::<UdpHdr>() > l3_end
            {
                return None;
            }
            (sport, dport)
        }
        _ => return None,
    };
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
    let selection = cache_hit(&flow, hash, config)?;
    let route = &selection.route;
    let done = if route.vip_flags & vip_flags::L2_DSR != 0 {
        set_macs(ctx, route)
    } else {
        let l2 = L2 {
            l3_off: ETH_HLEN,
            proto: ETH_P_IP,
            vlan_tci: None,
        };
        encap_ipv4(ctx, &l2, &selection, config)
    };
    Some(done.map(|()| finish(ctx, route, bytes)))
}

/// What `lb_ingress` returns for `result`, counting why when it does not forward.
#[inline(always)]
pub fn verdict(result: Result<u32, Verdict>) -> u32 {
    match result {
        Ok(action) => action,
        Err(Verdict::Pass(counter)) => {
            crate::stats::count(counter);
            xdp_action::XDP_PASS
        }
        Err(Verdict::Drop(counter)) => {
            crate::stats::count(counter);
            xdp_action::XDP_DROP
        }
    }
}
