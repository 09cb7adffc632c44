//! Backend selection: the flow cache, then the connection table, then the Vip's MaglevTable.

use aya_ebpf::programs::XdpContext;
use core::{hint::cold_path, mem::MaybeUninit};
use lb_common::{
    conntrack::{Way, generation_digest},
    consts::{
        Counter, EMPTY_BACKEND, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, backend_flags,
        route_flags, vip_flags,
    },
    hash::{
        HashMode, conntrack_hash_v4, conntrack_hash_v6, flow_hash_v4, flow_hash_v6, ports_word,
        table_slot,
    },
    types::{
        Backend, ConntrackEntry, FlowV4, FlowV6, GlobalConfig, NextHop, Route, VipKey, VipState,
        vip_addr_flags,
    },
};

use crate::{
    chain, conntrack,
    maps::{
        BACKENDS, FLOW_CACHE_V4, FLOW_CACHE_V6, TABLES, VIP_ADDRS_V4, VIP_ADDRS_V6, VIP_STATE, VIPS,
    },
    parse::{Parsed, Verdict, copy, zero},
    route::{Selection, cached_next_hop, next_hop},
    stats::count,
};

/// 1 when the per-CPU flow cache is in use (`flow_cache_entries` > 0), set by the loader
/// in frozen .rodata: with 0 the verifier sees the cache's code as dead.
#[unsafe(no_mangle)]
static FLOW_CACHE_ON: u32 = 1;

#[inline(always)]
fn flow_cache_on() -> bool {
    // SAFETY: a static; volatile so the compiler does not fold the placeholder in.
    unsafe { core::ptr::read_volatile(&FLOW_CACHE_ON) != 0 }
}

/// What a Flow's family contributes: its flow cache, hashes and Vip key.
pub trait Flow {
    /// This CPU's flow-cache Route at `slot`, if it holds this flow and is of `epoch`; and
    /// whether its connection-table way is due a refresh (not touched in age unit `now`).
    fn cached(
        &self,
        slot: u32,
        epoch: u32,
        hash: u32,
        now: u32,
    ) -> Option<(Selection<'static>, bool)>;
    fn cache(&self, slot: u32, epoch: u32, selection: &Selection, now: u32);
    fn hash(&self, seed: u32) -> u32;
    /// The hash that picks a new flow's MaglevTable slot under `mode` (`five_tuple`: its
    /// `hash`), lb-common's function as `mlb trace` and the tests use it.
    fn table_hash(&self, mode: HashMode, seed: u32, five_tuple: u32) -> u32;
    /// The connection table's hash of the flow, under the table's seed `key`.
    fn conntrack_hash(&self, key: u64) -> u64;
    fn vip_key(&self, port: u16) -> VipKey;
    /// `vip_addr_flags` of the destination, if it is a Vip address at all.
    fn vip_addr_flags(&self) -> Option<u32>;
    fn proto(&self) -> u8;
    fn dport(&self) -> u16;
}

/// The methods both families share, over their own maps. `$addr_in`/`$addr_out` convert
/// between the cache's backend address and the 4-word form.
macro_rules! flow_maps {
    ($flow:ty, $cache:ident, |$a:ident| $addr_in:expr, |$w:ident| $addr_out:expr) => {
        #[inline(always)]
        fn cached(
            &self,
            slot: u32,
            epoch: u32,
            hash: u32,
            now: u32,
        ) -> Option<(Selection<'static>, bool)> {
            if !flow_cache_on() {
                return None;
            }
            let c = $cache.get_ptr_mut(slot)?;
            // SAFETY: this CPU's slot; the Route is read in place, not copied: only this CPU
            // writes the slot, never while one of its packets is in flight, and map values
            // live as long as the program.
            unsafe {
                if (*c).epoch != epoch || !same(&(*c).flow, self) {
                    return None;
                }
                let refresh = (*c).seen != now;
                if refresh {
                    (*c).seen = now;
                }
                let $a = (*c).backend_addr;
                let selection = Selection {
                    route: &(*c).route,
                    backend_addr: $addr_in,
                    hash,
                    previous: EMPTY_BACKEND,
                };
                Some((selection, refresh))
            }
        }
        #[inline(always)]
        fn cache(&self, slot: u32, epoch: u32, selection: &Selection, now: u32) {
            if !flow_cache_on() {
                return;
            }
            if let Some(c) = $cache.get_ptr_mut(slot) {
                let $w = selection.backend_addr;
                // SAFETY: this CPU's slot.
                unsafe {
                    (*c).flow = *self;
                    copy(&mut (*c).route, selection.route);
                    (*c).backend_addr = $addr_out;
                    (*c).epoch = epoch;
                    (*c).seen = now;
                }
            }
        }
        #[inline(always)]
        fn table_hash(&self, mode: HashMode, seed: u32, five_tuple: u32) -> u32 {
            <$flow>::table_hash(self, mode, seed, five_tuple)
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
    flow_maps!(FlowV4, FLOW_CACHE_V4, |a| [a, 0, 0, 0], |w| w[0]);

    #[inline(always)]
    fn conntrack_hash(&self, key: u64) -> u64 {
        conntrack_hash_v4(
            self.src,
            self.dst,
            ports_word(self.sport, self.dport),
            self.proto,
            key,
        )
    }

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
    flow_maps!(FlowV6, FLOW_CACHE_V6, |a| a, |w| w);

    #[inline(always)]
    fn conntrack_hash(&self, key: u64) -> u64 {
        conntrack_hash_v6(
            &self.src,
            &self.dst,
            ports_word(self.sport, self.dport),
            self.proto,
            key,
        )
    }

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

#[inline(always)]
fn usable(backend: &Backend) -> bool {
    backend.flags & backend_flags::UP != 0
}

/// Whether a connection-table way still holds: its Vip and Backend ids still name what
/// they named when it was made (the generation digest), and the Backend is up. `Ok` with
/// the whole entry, the Vip's flags and the Backend; `Err(Some(vip))` when the way names
/// an active Vip but no longer holds (the Backend went down, or an id was given to
/// something else): the caller looks the packet's Vip up and re-steers;
/// `Err(None)` when its Vip is gone.
#[inline(always)]
fn established(way: &Way) -> Result<(ConntrackEntry, u32, Backend), Option<u32>> {
    let (vip, backend) = holding(way)?;
    let entry = ConntrackEntry {
        backend: way.backend,
        backend_generation: backend.generation,
        vip: way.vip,
        vip_generation: vip.generation,
    };
    Ok((entry, vip.flags, *backend))
}

/// [`established`]'s test, giving the Vip's state and the Backend in their maps.
#[inline(always)]
fn holding(way: &Way) -> Result<(&'static VipState, &'static Backend), Option<u32>> {
    let Some(vip) = VIP_STATE.get(way.vip) else {
        return Err(None);
    };
    if vip.flags & vip_flags::ACTIVE == 0 {
        return Err(None);
    }
    match BACKENDS.get(way.backend) {
        Some(backend)
            if usable(backend)
                && generation_digest(backend.generation, vip.generation) == way.generation =>
        {
            Ok((vip, backend))
        }
        // Its Backend went down or away: re-steer (invariant 2).
        _ => Err(Some(way.vip)),
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
    let backend_v6 = backend.flags & backend_flags::IPV6 != 0;
    let mut vip_flags = vip_flags;
    if (vip_flags & vip_flags::IPV6 != 0) != backend_v6 {
        cold_path();
        // IPv6 in IPv4 has no decapsulation: the daemon refuses it; never emit it.
        if backend_v6 || vip_flags & vip_flags::L2_DSR != 0 {
            vip_flags |= route_flags::MIXED_FAMILY;
        } else {
            return Err(Verdict::Drop(Counter::DropEncap));
        }
    }
    let hop = next_hop(ctx, entry.backend, backend, backend_v6, fib_generation)?;
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
        previous: EMPTY_BACKEND,
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

/// What the connection table knows of a flow.
enum Known {
    /// Its entry holds: the Vip's flags and the Backend.
    Holds(ConntrackEntry, u32, Backend),
    /// It named this Vip, but no longer holds: re-steer by the Vip's table.
    Resteer(u32),
}

/// The connection table's word on a flow; `None` for a flow it does not know. A hit that
/// holds marks the way active (an ICMP error is not the flow's own traffic).
#[inline(always)]
fn known<F: Flow>(pkt: &Parsed<F>, ct_hash: u64, now: u64) -> Option<Known> {
    let found = conntrack::lookup(ct_hash)?;
    match established(&found.way()) {
        Ok((entry, vip_flags, backend)) => {
            if !pkt.icmp_error {
                conntrack::touch(&found, now);
            }
            Some(Known::Holds(entry, vip_flags, backend))
        }
        Err(Some(vip)) => Some(Known::Resteer(vip)),
        Err(None) => None,
    }
}

/// The flow's Route from this CPU's flow cache, counted as a connection-table hit.
#[inline(always)]
pub fn cache_hit<F: Flow>(
    flow: &F,
    hash: u32,
    config: &GlobalConfig,
) -> Option<Selection<'static>> {
    let now = conntrack::now();
    let (selection, refresh) = flow.cached(
        hash & config.flow_cache_mask,
        config.cache_epoch,
        hash,
        now as u32,
    )?;
    count(Counter::ConntrackHit);
    // Once per age unit: keep the flow's way active (and back, if it was lost to a race).
    if refresh {
        cold_path();
        if let Some(key) = conntrack::seed() {
            conntrack::refresh(flow.conntrack_hash(key), &selection.route.entry, now);
        }
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
    let found = conntrack::lookup(flow.conntrack_hash(conntrack::seed()?))?;
    let (entry, vip_flags, backend) = established(&found.way()).ok()?;
    if (vip_flags & vip_flags::IPV6 != 0) != (backend.flags & backend_flags::IPV6 != 0) {
        return None;
    }
    let hop = cached_next_hop(entry.backend, config.fib_generation)?;
    let now = conntrack::now();
    conntrack::touch(&found, now);
    let selection = selection(entry, vip_flags, &backend, hop, hash, scratch);
    count(Counter::ConntrackHit);
    flow.cache(
        hash & config.flow_cache_mask,
        config.cache_epoch,
        &selection,
        now as u32,
    );
    Some(selection)
}

/// Picks the backend for a parsed packet: this CPU's flow cache, then the connection
/// table, then the Vip's MaglevTable. A TCP SYN starts a new connection, so it goes
/// straight to the table (as in Katran); if its insert finds its way held by a live flow
/// (its own from an earlier SYN, or another's with the same tag), it follows that way.
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
    let key = conntrack::seed().unwrap_or(0);
    let ct_hash = flow.conntrack_hash(key);
    let now = conntrack::now();
    let known = if pkt.syn {
        // A SYN's insert comes last: its bucket loads meanwhile.
        conntrack::prefetch(ct_hash);
        None
    } else {
        known(pkt, ct_hash, now)
    };
    let vip = match known {
        Some(Known::Holds(entry, vip_flags, backend)) => {
            let fib = config.fib_generation;
            let selection = route(ctx, entry, vip_flags, &backend, hash, fib, scratch)?;
            if !pkt.icmp_error {
                count(Counter::ConntrackHit);
                cache_unless_mixed(flow, slot, config.cache_epoch, &selection, now);
            }
            return Ok(selection);
        }
        Some(Known::Resteer(named)) => {
            // The way names a Vip id; the packet's own Vip decides (the id may have been
            // given to another Vip since).
            let vip = lookup_vip(&pkt.flow)?;
            if !pkt.icmp_error {
                count(if vip == named {
                    Counter::ConntrackResteer
                } else {
                    Counter::ConntrackMiss
                });
            }
            vip
        }
        None => {
            let vip = lookup_vip(&pkt.flow)?;
            if !pkt.icmp_error {
                count(Counter::ConntrackMiss);
                if flow.proto() == PROTO_TCP && !pkt.syn {
                    count(Counter::ConntrackMissNonSyn);
                }
            }
            vip
        }
    };
    from_table(ctx, pkt, vip, hash, slot, ct_hash, now, config, scratch)
}

/// Caches `selection` for `flow` unless its backend is of the other family: the fast path
/// sends by the packet's family and must never meet such a Route.
#[inline(always)]
fn cache_unless_mixed<F: Flow>(flow: &F, slot: u32, epoch: u32, selection: &Selection, now: u64) {
    if selection.route.vip_flags & route_flags::MIXED_FAMILY == 0 {
        flow.cache(slot, epoch, selection, now as u32);
    }
}

/// The Vip id for the flow's (address, port, protocol), falling back to the any-port Vip.
#[inline(always)]
pub fn lookup_vip<F: Flow>(flow: &F) -> Result<u32, Verdict> {
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
        .ok_or(Verdict::NotVip(Counter::PassNotVip))?;
    if addr_flags & any_port != 0
        && let Some(id) = unsafe { VIPS.get(flow.vip_key(0)) }
    {
        return Ok(*id);
    }
    Err(Verdict::NotVip(Counter::PassVipOther))
}

/// Slot `1 + table_slot(h, M)` of the Vip's MaglevTable (slot 0 holds M), `h` the hash
/// of the Vip's `HashMode`, remembered in the connection table (and the flow cache, but
/// for a SYN) unless the packet is an ICMP error.
#[expect(
    clippy::too_many_arguments,
    reason = "inlined; all computed once by select"
)]
#[inline(always)]
fn from_table<'a, F: Flow>(
    ctx: &XdpContext,
    pkt: &Parsed<F>,
    vip_id: u32,
    hash: u32,
    cache_slot: u32,
    ct_hash: u64,
    now: u64,
    config: &GlobalConfig,
    scratch: &'a mut MaybeUninit<Route>,
) -> Result<Selection<'a>, Verdict> {
    let vip = VIP_STATE
        .get(vip_id)
        .ok_or(Verdict::NotVip(Counter::PassVipOther))?;
    if vip.flags & vip_flags::ACTIVE == 0 {
        return Err(Verdict::NotVip(Counter::PassVipOther));
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
    // The Vip's hash mode picks the slot; the flow keeps its 5-tuple hash for everything
    // else (connection table, flow cache, outer source).
    let slot_hash = pkt
        .flow
        .table_hash(HashMode::of(vip.flags), config.hash_seed, hash);
    let slot = 1 + table_slot(slot_hash, size);
    let backend_id = table.get(slot / 2).ok_or(no_backend)?[(slot & 1) as usize];
    if backend_id == EMPTY_BACKEND {
        return Err(no_backend);
    }
    let Some(mut backend) = BACKENDS.get(backend_id) else {
        // The daemon sizes BACKENDS for every id it puts in a table.
        aya_log_ebpf::error!(
            ctx,
            "vip {} table names backend {} beyond BACKENDS",
            vip_id,
            backend_id
        );
        return Err(no_backend);
    };
    if !usable(backend) {
        return Err(no_backend);
    }
    let mut entry = ConntrackEntry {
        backend: backend_id,
        backend_generation: backend.generation,
        vip: vip_id,
        vip_generation: vip.generation,
    };
    // Second chance: only a TCP packet that is not a SYN can belong to a connection that
    // started under the previous table; L2 DSR has no header to carry the previous hop,
    // GUE Vips are not chained (`lb_decap` chains by IPIP headers only), and chaining
    // builds headers of the Vip's family (an IPv4 Vip's IPv6 Backend gets none).
    let previous = if pkt.syn
        || pkt.icmp_error
        || pkt.flow.proto() != PROTO_TCP
        || vip.flags & (vip_flags::L2_DSR | vip_flags::GUE) != 0
        || (backend.flags & backend_flags::IPV6 != 0) != (vip.flags & vip_flags::IPV6 != 0)
    {
        EMPTY_BACKEND
    } else {
        chain::previous_backend(vip_id, slot_hash, backend_id, vip.flags)
    };
    // No entry for a chained packet: each is judged again, and stops being chained when
    // the previous table expires. An entry would send it to the current Backend alone.
    let remember = previous == EMPTY_BACKEND && !pkt.icmp_error;
    if remember {
        match conntrack::insert(ct_hash, &entry, now) {
            conntrack::Insert::Done => {}
            conntrack::Insert::Full => count(Counter::ConntrackInsertFail),
            conntrack::Insert::Held(found) => {
                cold_path();
                let held = found.way();
                match holding(&held) {
                    // A live flow of this Vip holds the way: follow its Backend, so that
                    // neither flow moves (a flood cannot take ways from live flows).
                    Ok((_, b)) if held.vip == vip_id => {
                        count(Counter::ConntrackShared);
                        entry.backend = held.backend;
                        entry.backend_generation = b.generation;
                        backend = b;
                    }
                    // Another Vip's live flow: it keeps its way; this one goes without.
                    Ok(_) => count(Counter::ConntrackInsertFail),
                    // Its Backend went down or away: the way is free to take.
                    Err(_) => conntrack::take(&found, &entry, now),
                }
            }
        }
    }
    let mut selection = route(
        ctx,
        entry,
        vip.flags,
        backend,
        hash,
        config.fib_generation,
        scratch,
    )?;
    if previous != EMPTY_BACKEND {
        cold_path();
        selection.previous = previous;
        return Ok(selection);
    }
    // A SYN is cached by its flow's next packet, from the connection table: SYN floods and
    // scans that never complete do not evict established flows from the cache.
    if remember && !pkt.syn {
        cache_unless_mixed(&pkt.flow, cache_slot, config.cache_epoch, &selection, now);
    }
    Ok(selection)
}
