//! Where a packet goes once its backend is chosen: the Selection that `select` makes and
//! `forward` consumes, and the backend's next hop from `bpf_fib_lookup`, cached per CPU.

use core::{ffi::c_void, hint::cold_path};

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
};
use lb_common::{
    consts::Counter,
    types::{Backend, NextHop, Route},
};

use crate::{
    maps::{FIB_SCRATCH, NEXT_HOPS},
    parse::{Verdict, zero},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Where a packet goes: its Route (in the flow cache, or in the full path's scratch space)
/// and the backend's address.
pub struct Selection<'a> {
    pub route: &'a Route,
    /// Network byte order; IPv4 in word 0.
    pub backend_addr: [u32; 4],
    /// The flow hash, reused for the encapsulation source.
    pub hash: u32,
    /// Second chance: the Backend id the Vip's previous table named, attached to the
    /// packet (`EMPTY_BACKEND`: none).
    pub previous: u32,
}

/// This CPU's cached `bpf_fib_lookup` result for Backend `id`, if still of `generation`.
#[inline(always)]
pub fn cached_next_hop(id: u32, generation: u32) -> Option<NextHop> {
    let cached = NEXT_HOPS.get_ptr_mut(id)?;
    // SAFETY: per-CPU slot, only this CPU touches it.
    unsafe { ((*cached).generation == generation && (*cached).ifindex != 0).then(|| *cached) }
}

/// The backend's next hop: this CPU's cached `bpf_fib_lookup` result while the daemon's
/// generation is unchanged, else a fresh lookup (routes and neighbours are the kernel's).
#[inline(always)]
pub fn next_hop(
    ctx: &XdpContext,
    id: u32,
    backend: &Backend,
    v6: bool,
    generation: u32,
) -> Result<NextHop, Verdict> {
    let no_route = Verdict::Drop(Counter::DropFib);
    if let Some(hop) = cached_next_hop(id, generation) {
        return Ok(hop);
    }
    let cached = NEXT_HOPS.get_ptr_mut(id).ok_or(no_route)?;
    cold_path();
    // The kernel answers only if forwarding is on for the ingress device (the daemon
    // turns it on where it attaches).
    let params = FIB_SCRATCH.get_ptr_mut(0).ok_or(no_route)?;
    let rc = lookup_route(ctx, params, backend, v6);
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return Err(no_route);
    }
    // SAFETY: lookup_route filled this CPU's scratch entry.
    let hop = unsafe {
        NextHop {
            dmac: (*params).dmac,
            smac: (*params).smac,
            ifindex: (*params).ifindex,
            generation,
        }
    };
    // SAFETY: as above.
    unsafe { *cached = hop };
    Ok(hop)
}

#[inline(always)]
fn lookup_route(ctx: &XdpContext, params: *mut bpf_fib_lookup, backend: &Backend, v6: bool) -> i64 {
    fib_lookup_to(ctx, params, &backend.addr, v6)
}

/// `bpf_fib_lookup` towards `addr` (network order; IPv4 in word 0) into `params`.
#[inline(always)]
pub fn fib_lookup_to(
    ctx: &XdpContext,
    params: *mut bpf_fib_lookup,
    addr: &[u32; 4],
    v6: bool,
) -> i64 {
    zero(params);
    // SAFETY: zeroed just above, a valid bpf_fib_lookup.
    let params = unsafe { &mut *params };
    params.ifindex = ctx.ingress_ifindex() as u32;
    if v6 {
        params.family = AF_INET6;
        params.__bindgen_anon_4.ipv6_dst = *addr;
    } else {
        params.family = AF_INET;
        params.__bindgen_anon_4.ipv4_dst = addr[0];
    }
    // SAFETY: params is a valid, sized struct in this CPU's scratch entry.
    unsafe {
        fib_lookup(
            ctx.ctx as *mut c_void,
            params as *mut bpf_fib_lookup,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    }
}
