//! Backend selection: the flow cache, then the connection table, then the Vip's MaglevTable.

use aya_ebpf::programs::XdpContext;
use core::{hint::cold_path, mem::MaybeUninit};
use lb_common::{
    consts::{
        Counter, EMPTY_BACKEND, FAMILY_V4, FAMILY_V6, FLOW_CACHE_REFRESH, PROTO_TCP, PROTO_UDP,
        backend_flags, vip_flags,
    },
    hash::{flow_hash_v4, flow_hash_v6, ports_word, table_slot},
    types::{
        Backend, ConntrackEntry, FlowV4, FlowV6, GlobalConfig, NextHop, Route, VipKey,
        vip_addr_flags,
    },
};

use crate::{
    forward::{cached_next_hop, next_hop},
    maps::{
        BACKENDS, CONNTRACK_V4, CONNTRACK_V6, FLOW_CACHE_V4, FLOW_CACHE_V6, TABLES, VIP_ADDRS_V4,
        VIP_ADDRS_V6, VIP_STATE, VIPS,
    },
    parse::{Parsed, Verdict, copy, zero},
    stats::count,
};

/// What a Flow's family contributes: its connection table, flow cache, hash and Vip key.
pub trait Flow {
    fn conntrack(&self) -> Option<ConntrackEntry>;
    fn remember(&self, entry: &ConntrackEntry) -> bool;
    /// This CPU's flow-cache Route at `slot`, if it holds this flow and is of `epoch`;
    /// counts the hit and says whether the LRU entry is due a refresh.
    fn cached(&self, slot: u32, epoch: u32, hash: u32) -> Option<(Selection<'static>, bool)>;
    fn cache(&self, slot: u32, epoch: u32, selection: &Selection);
    fn hash(&self, seed: u32) -> u32;
    fn vip_key(&self, port: u16) -> VipKey;
    /// `vip_addr_flags` of the destination, if it is a Vip address at all.
    fn vip_addr_flags(&self) -> Option<u32>;
    fn proto(&self) -> u8;
    fn dport(&self) -> u16;
}

/// The methods both families share, over their own maps. `$addr_in`/`$addr_out` convert
/// between the cache's backend address and the 4-word form.
macro_rules! flow_maps {
    ($conntrack:ident, $cache:ident, |$a:ident| $addr_in:expr, |$w:ident| $addr_out:expr) => {
        #[inline(always)]
        fn conntrack(&self) -> Option<ConntrackEntry> {
            // SAFETY: copied out at once, before any other map operation.
            unsafe { $conntrack.get(self).copied() }
        }
        #[inline(always)]
        fn remember(&self, entry: &ConntrackEntry) -> bool {
            $conntrack.insert(self, entry, 0).is_ok()
        }
        #[inline(always)]
        fn cached(&self, slot: u32, epoch: u32, hash: u32) -> Option<(Selection<'static>, bool)> {
            let c = $cache.get_ptr_mut(slot)?;
            // SAFETY: this CPU's slot; the Route is read in place, not copied: only this CPU
            // writes the slot, never while one of its packets is in flight, and map values
            // live as long as the program.
            unsafe {
                if (*c).epoch != epoch || !same(&(*c).flow, self) {
                    return None;
                }
                (*c).packets = (*c).packets.wrapping_add(1);
                let $a = (*c).backend_addr;
                let selection = Selection {
                    route: &(*c).route,
                    backend_addr: $addr_in,
                    hash,
                };
                Some((selection, (*c).packets % FLOW_CACHE_REFRESH == 0))
            }
        }
        #[inline(always)]
        fn cache(&self, slot: u32, epoch: u32, selection: &Selection) {
            if let Some(c) = $cache.get_ptr_mut(slot) {
                let $w = selection.backend_addr;
                // SAFETY: this CPU's slot.
                unsafe {
                    (*c).flow = *self;
                    copy(&mut (*c).route, selection.route);
                    (*c).backend_addr = $addr_out;
                    (*c).epoch = epoch;
                    (*c).packets = 0;
                }
            }
        }
        #[inline(always)]
        fn proto(&self) -> u8 {
            self.proto
        }
        #[inline(always)]
        fn dport(&self) -> u16 {
            self.dport
        }
    };
}

impl Flow for FlowV4 {
    flow_maps!(CONNTRACK_V4, FLOW_CACHE_V4, |a| [a, 0, 0, 0], |w| w[0]);

    #[inline(always)]
    fn hash(&self, seed: u32) -> u32 {
        flow_hash_v4(
            self.src,
            self.dst,
            ports_word(self.sport, self.dport),
            self.proto,
            seed,
        )
    }
    #[inline(always)]
    fn vip_key(&self, port: u16) -> VipKey {
        let mut key = VipKey::default();
        zero(&mut key);
        key.addr[0] = self.dst;
        key.port = port;
        key.proto = self.proto;
        key.family = FAMILY_V4;
        key
    }
    #[inline(always)]
    fn vip_addr_flags(&self) -> Option<u32> {
        // SAFETY: copied out at once.
        unsafe { VIP_ADDRS_V4.get(self.dst) }.map(|a| a.flags)
    }
}

impl Flow for FlowV6 {
    flow_maps!(CONNTRACK_V6, FLOW_CACHE_V6, |a| a, |w| w);

    #[inline(always)]
    fn hash(&self, seed: u32) -> u32 {
        flow_hash_v6(
            &self.src,
            &self.dst,
            ports_word(self.sport, self.dport),
            self.proto,
            seed,
        )
    }
    #[inline(always)]
    fn vip_key(&self, port: u16) -> VipKey {
        VipKey {
            addr: self.dst,
            port,
            proto: self.proto,
            family: FAMILY_V6,
        }
    }
    #[inline(always)]
    fn vip_addr_flags(&self) -> Option<u32> {
        // SAFETY: copied out at once.
        unsafe { VIP_ADDRS_V6.get(self.dst) }.map(|a| a.flags)
    }
}

/// Where a packet goes: its Route (in the flow cache, or in the full path's scratch space)
/// and the backend's address.
pub struct Selection<'a> {
    pub route: &'a Route,
    /// Network byte order; IPv4 in word 0.
    pub backend_addr: [u32; 4],
    /// The flow hash, reused for the encapsulation source.
    pub hash: u32,
}

#[inline(always)]
fn usable(backend: &Backend) -> bool {
    backend.flags & backend_flags::UP != 0
}

/// Whether a connection-table entry still holds: its Vip and Backend ids still name what
/// they named when it was made, and the Backend is up. `Ok` with the Vip's flags and the
/// Backend; `Err(true)` when only the Backend failed (re-steer), `Err(false)` otherwise.
#[inline(always)]
fn established(entry: &ConntrackEntry) -> Result<(u32, Backend), bool> {
    let Some(vip) = VIP_STATE.get(entry.vip) else {
        return Err(false);
    };
    if vip.generation != entry.vip_generation || vip.flags & vip_flags::ACTIVE == 0 {
        return Err(false);
    }
    match BACKENDS.get(entry.backend) {
        Some(backend) if backend.generation == entry.backend_generation && usable(backend) => {
            Ok((vip.flags, *backend))
        }
        // The Vip holds but its Backend went down or away: re-steer (invariant 2).
        _ => Err(true),
    }
}

/// The whole Route for `entry` to `backend`, next hop included, built in `scratch`.
#[inline(always)]
fn route<'a>(
    ctx: &XdpContext,
    entry: ConntrackEntry,
    vip_flags: u32,
    backend: &Backend,
    hash: u32,
    fib_generation: u32,
    scratch: &'a mut MaybeUninit<Route>,
) -> Result<Selection<'a>, Verdict> {
    let v6 = vip_flags & vip_flags::IPV6 != 0;
    if v6 != (backend.flags & backend_flags::IPV6 != 0) {
        // The daemon refuses such configs; never emit a half-right packet.
        cold_path();
        return Err(Verdict::Drop(Counter::DropEncap));
    }
    let hop = next_hop(ctx, entry.backend, backend, v6, fib_generation)?;
    Ok(selection(entry, vip_flags, backend, hop, hash, scratch))
}

/// The Selection of `entry` to `backend` through `hop`, its Route built in `scratch`.
#[inline(always)]
fn selection<'a>(
    entry: ConntrackEntry,
    vip_flags: u32,
    backend: &Backend,
    hop: NextHop,
    hash: u32,
    scratch: &'a mut MaybeUninit<Route>,
) -> Selection<'a> {
    Selection {
        route: scratch.write(Route {
            entry,
            dmac: hop.dmac,
            smac: hop.smac,
            ifindex: hop.ifindex,
            vip_flags,
        }),
        backend_addr: backend.addr,
        hash,
    }
}

/// Whether two plain-data values (multiple of 8 bytes, 8-aligned) are bitwise equal.
#[inline(always)]
fn same<T>(a: &T, b: &T) -> bool {
    const { assert!(size_of::<T>().is_multiple_of(8) && align_of::<T>() >= 8) };
    let (a, b) = (a as *const T as *const u64, b as *const T as *const u64);
    let mut i = 0;
    while i < size_of::<T>() / 8 {
        // SAFETY: in bounds, aligned.
        if unsafe { *a.add(i) != *b.add(i) } {
            return false;
        }
        i += 1;
    }
    true
}

/// What the LRU connection table knows of a flow.
enum Known {
    /// Its entry holds: the Vip's flags and the Backend.
    Holds(ConntrackEntry, u32, Backend),
    /// Its Vip holds but its Backend went down or away: re-steer by the Vip's table.
    Resteer(u32),
}

/// The LRU connection table's word on a flow; `None` for a flow it does not know.
#[inline(always)]
fn known<F: Flow>(pkt: &Parsed<F>) -> Option<Known> {
    let entry = pkt.flow.conntrack()?;
    match established(&entry) {
        Ok((vip_flags, backend)) => Some(Known::Holds(entry, vip_flags, backend)),
        Err(true) => {
            if !pkt.icmp_error {
                count(Counter::ConntrackResteer);
            }
            Some(Known::Resteer(entry.vip))
        }
        Err(false) => None,
    }
}

/// The flow's Route from this CPU's flow cache, counted as a connection-table hit.
#[inline(always)]
pub fn cache_hit<F: Flow>(
    flow: &F,
    hash: u32,
    config: &GlobalConfig,
) -> Option<Selection<'static>> {
    let (selection, refresh) =
        flow.cached(hash & config.flow_cache_mask, config.cache_epoch, hash)?;
    count(Counter::ConntrackHit);
    // Keep the LRU entry recent (and back, if it was evicted) for long-lived flows.
    if refresh && flow.conntrack().is_none() {
        flow.remember(&selection.route.entry);
    }
    Some(selection)
}

/// For a flow the flow cache missed: its Route from the connection table, when the entry
/// holds and its next hop is cached; then it is counted as a hit and cached. `None` leaves
/// every other case (unknown flow, re-steer, next hop to look up) to `select`, with
/// nothing counted.
#[inline(always)]
pub fn table_hit<'a, F: Flow>(
    flow: &F,
    hash: u32,
    config: &GlobalConfig,
    scratch: &'a mut MaybeUninit<Route>,
) -> Option<Selection<'a>> {
    let entry = flow.conntrack()?;
    let (vip_flags, backend) = established(&entry).ok()?;
    if (vip_flags & vip_flags::IPV6 != 0) != (backend.flags & backend_flags::IPV6 != 0) {
        return None;
    }
    let hop = cached_next_hop(entry.backend, config.fib_generation)?;
    let selection = selection(entry, vip_flags, &backend, hop, hash, scratch);
    count(Counter::ConntrackHit);
    flow.cache(
        hash & config.flow_cache_mask,
        config.cache_epoch,
        &selection,
    );
    Some(selection)
}

/// Picks the backend for a parsed packet: this CPU's flow cache, then the LRU connection
/// table, then the Vip's MaglevTable. A TCP SYN starts a new connection, so it goes
/// straight to the table (as in Katran): the lookups it skips would miss on cold memory.
#[inline(always)]
pub fn select<'a, F: Flow>(
    ctx: &XdpContext,
    pkt: &Parsed<F>,
    config: &GlobalConfig,
    scratch: &'a mut MaybeUninit<Route>,
) -> Result<Selection<'a>, Verdict> {
    let flow = &pkt.flow;
    let hash = flow.hash(config.hash_seed);
    let slot = hash & config.flow_cache_mask;
    if !pkt.syn
        && !pkt.icmp_error
        && let Some(selection) = cache_hit(flow, hash, config)
    {
        return Ok(selection);
    }
    // Established packets rarely get here: the flow cache holds them.
    cold_path();
    let lru = if pkt.syn { None } else { known(pkt) };
    let vip = match lru {
        Some(Known::Holds(entry, vip_flags, backend)) => {
            let fib = config.fib_generation;
            let selection = route(ctx, entry, vip_flags, &backend, hash, fib, scratch)?;
            if !pkt.icmp_error {
                count(Counter::ConntrackHit);
                flow.cache(slot, config.cache_epoch, &selection);
            }
            return Ok(selection);
        }
        Some(Known::Resteer(vip)) => vip,
        None => {
            let vip = lookup_vip(pkt)?;
            if !pkt.icmp_error {
                count(Counter::ConntrackMiss);
                if flow.proto() == PROTO_TCP && !pkt.syn {
                    count(Counter::ConntrackMissNonSyn);
                }
            }
            vip
        }
    };
    from_table(ctx, pkt, vip, hash, slot, config, scratch)
}

/// The Vip id for the packet's (address, port, protocol), falling back to the any-port Vip.
#[inline(always)]
fn lookup_vip<F: Flow>(pkt: &Parsed<F>) -> Result<u32, Verdict> {
    let flow = &pkt.flow;
    // SAFETY: values copied out at once.
    if let Some(id) = unsafe { VIPS.get(flow.vip_key(flow.dport())) } {
        return Ok(*id);
    }
    let any_port = match flow.proto() {
        PROTO_TCP => vip_addr_flags::ANY_PORT_TCP,
        PROTO_UDP => vip_addr_flags::ANY_PORT_UDP,
        _ => 0,
    };
    // The pre-filter can be wrong; the exact address set is not.
    let addr_flags = flow
        .vip_addr_flags()
        .ok_or(Verdict::Pass(Counter::PassNotVip))?;
    if addr_flags & any_port != 0
        && let Some(id) = unsafe { VIPS.get(flow.vip_key(0)) }
    {
        return Ok(*id);
    }
    Err(Verdict::Pass(Counter::PassVipOther))
}

/// Slot `1 + table_slot(hash, M)` of the Vip's MaglevTable (slot 0 holds M), remembered in the
/// connection table (and the flow cache, but for a SYN) unless the packet is an ICMP error.
#[inline(always)]
fn from_table<'a, F: Flow>(
    ctx: &XdpContext,
    pkt: &Parsed<F>,
    vip_id: u32,
    hash: u32,
    cache_slot: u32,
    config: &GlobalConfig,
    scratch: &'a mut MaybeUninit<Route>,
) -> Result<Selection<'a>, Verdict> {
    let vip = VIP_STATE
        .get(vip_id)
        .ok_or(Verdict::Pass(Counter::PassVipOther))?;
    if vip.flags & vip_flags::ACTIVE == 0 {
        return Err(Verdict::Pass(Counter::PassVipOther));
    }
    let no_backend = if vip.flags & vip_flags::PASS_WHEN_EMPTY != 0 {
        Verdict::Pass(Counter::PassNoBackend)
    } else {
        Verdict::Drop(Counter::DropNoBackend)
    };
    let table = TABLES.get(vip_id).ok_or(no_backend)?;
    let size = table.get(0).ok_or(no_backend)?[0];
    if size == 0 {
        return Err(no_backend);
    }
    let slot = 1 + table_slot(hash, size);
    let backend_id = table.get(slot / 2).ok_or(no_backend)?[(slot & 1) as usize];
    if backend_id == EMPTY_BACKEND {
        return Err(no_backend);
    }
    let backend = BACKENDS.get(backend_id).ok_or(no_backend)?;
    if !usable(backend) {
        return Err(no_backend);
    }
    let entry = ConntrackEntry {
        backend: backend_id,
        backend_generation: backend.generation,
        vip: vip_id,
        vip_generation: vip.generation,
    };
    let selection = route(
        ctx,
        entry,
        vip.flags,
        backend,
        hash,
        config.fib_generation,
        scratch,
    )?;
    if !pkt.icmp_error {
        if !pkt.flow.remember(&entry) {
            count(Counter::ConntrackInsertFail);
        }
        // A SYN is cached by its flow's next packet, from the connection table: SYN floods
        // and scans that never complete do not evict established flows from the cache.
        if !pkt.syn {
            pkt.flow.cache(cache_slot, config.cache_epoch, &selection);
        }
    }
    Ok(selection)
}
