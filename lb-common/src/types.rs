//! `#[repr(C)]` map keys and values. Addresses and ports are kept in network byte order,
//! exactly as they sit in the packet, so the kernel copies them without swapping; an IPv4
//! address in a 16-byte field uses word 0 and leaves words 1..3 zero.

use crate::consts::VIP_FILTER_WORDS;

/// Key of the `VIPS` map: one Vip. `port == 0` is the any-port Vip of that address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    /// Network byte order; IPv4 in word 0.
    pub addr: [u32; 4],
    /// Network byte order; 0 = every port.
    pub port: u16,
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
}

/// Value of `VIP_ADDRS_V4` / `VIP_ADDRS_V6`: which wildcard Vips an address has.
/// Presence alone means "some Vip uses this address", the pre-filter for all traffic.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipAddr {
    /// `vip_addr_flags` bits.
    pub flags: u32,
}

pub mod vip_addr_flags {
    /// A port-0 TCP Vip exists on this address.
    pub const ANY_PORT_TCP: u32 = 1 << 0;
    /// A port-0 UDP Vip exists on this address.
    pub const ANY_PORT_UDP: u32 = 1 << 1;
    /// Answer ICMP / ICMPv6 echo requests to this address from XDP.
    pub const ICMP_ECHO: u32 = 1 << 2;
    /// Some Vip on this address tracks fragments: a later fragment is looked up (with
    /// none, every fragment to the address is dropped, as before tracking existed).
    pub const FRAGMENTS: u32 = 1 << 3;
}

/// Value of `VIP_STATE`, indexed by Vip id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipState {
    /// `vip_flags` bits.
    pub flags: u32,
    /// Bumped whenever the id is given to a different Vip, so stale connection-table
    /// entries of a removed Vip are never trusted.
    pub generation: u32,
}

/// Value of `BACKENDS`, indexed by Backend id (id 0 is `EMPTY_BACKEND`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Network byte order; IPv4 in word 0.
    pub addr: [u32; 4],
    /// `backend_flags` bits.
    pub flags: u32,
    /// Bumped whenever the id is given to a different Backend.
    pub generation: u32,
}

/// An IPv4 Flow as it arrives (client to Vip). 8-aligned so the flow cache compares it in
/// two words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowV4 {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad0: u8,
    pub _pad1: u16,
}

/// An IPv6 Flow as it arrives (client to Vip).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowV6 {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad0: u8,
    pub _pad1: u16,
}

/// Where a Flow goes, and the generations that make it valid: what a connection-table way
/// stands for (the way keeps the ids and a digest of the generations, see `conntrack`),
/// and what a flow-cache Route was built from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackEntry {
    pub backend: u32,
    pub backend_generation: u32,
    pub vip: u32,
    pub vip_generation: u32,
}

/// Value of `CONNTRACK`: one cache line of 7 ways (`conntrack::Way`, packed) and a word
/// that holds nothing. The last element of the map is not a bucket: its word 0 holds the
/// table's hash seed, so that the seed lives and dies with the entries it placed (restart
/// adoption keeps both).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackBucket {
    pub ways: [u64; crate::conntrack::WAYS],
    /// Written, never read: a new flow's store here starts loading the line before its
    /// insert reads it. A table pinned by a build of 8 ways keeps its value size; an
    /// entry such a build left in this word is overwritten, and its flow steered by its
    /// table (an eighth way filled only in buckets nearly full).
    pub prefetch: u64,
}

/// Value of the per-CPU `NEXT_HOPS` cache, indexed by Backend id: the result of
/// `bpf_fib_lookup` for the backend, valid while `generation == GlobalConfig::fib_generation`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub ifindex: u32,
    pub generation: u32,
}

/// One slot of `CONFIG` (the live one is `CONFIG_INDEX`'s).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalConfig {
    /// Seed of the flow hash; the same on every load balancer of a fleet.
    pub hash_seed: u32,
    /// Bumped by the daemon to invalidate every cached `NextHop` (routes or neighbours changed).
    pub fib_generation: u32,
    /// Outer IPv4 source = `encap_src4_base | (flow_hash & encap_src4_hostmask)`, host order:
    /// varying the source lets the backend's RSS spread flows over its queues.
    pub encap_src4_base: u32,
    pub encap_src4_hostmask: u32,
    /// Outer IPv6 source: these words with the last one xor-ed with the flow hash.
    /// Network byte order.
    pub encap_src6_base: [u32; 4],
    /// Per-CPU flow cache slot of a flow: `flow_hash & flow_cache_mask` (size - 1, a power
    /// of two). Set by the loader from the capacities, not by the config.
    pub flow_cache_mask: u32,
    /// Flow-cache entries are valid only while theirs equals this. The loader bumps it on
    /// every change to a Vip, a Backend or the next hops, so a cached Route never outlives
    /// what it was built from. Never 0 (the value of an empty slot).
    pub cache_epoch: u32,
    /// Pre-filter of Vip addresses, set by `Dataplane::set_vip_filter`. Kept in this entry
    /// so that a packet reads one map value, not two.
    pub vip_filter: VipFilter,
}

/// Pre-filter of Vip addresses: bit `vip_filter_bit_*(dst)` is set for every Vip address
/// (false positives possible, no false negatives).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipFilter {
    pub words: [u64; VIP_FILTER_WORDS],
}

impl Default for VipFilter {
    fn default() -> Self {
        Self {
            words: [0; VIP_FILTER_WORDS],
        }
    }
}

impl VipFilter {
    /// Whether `bit` is set.
    #[inline(always)]
    pub fn contains(&self, bit: u32) -> bool {
        self.words[(bit >> 6) as usize & (VIP_FILTER_WORDS - 1)] & (1 << (bit & 63)) != 0
    }
}

/// A forwarding decision as the flow cache keeps it: everything an established packet
/// needs, so that it touches no Vip, Backend or next-hop map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Route {
    /// The connection-table entry behind it.
    pub entry: ConntrackEntry,
    /// Next hop towards the backend, as `bpf_fib_lookup` gave it.
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub ifindex: u32,
    /// `vip_flags` of the Vip.
    pub vip_flags: u32,
}

/// Value of `FLOW_CACHE_V4` (per CPU): a direct-mapped cache of whole Routes in front of
/// the connection table, indexed by flow hash; one cache line. `seen` is the age unit in
/// which this CPU last refreshed the flow's connection-table way: a hit in a later unit
/// refreshes it again, so a flow served from the cache never looks idle.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCacheV4 {
    pub flow: FlowV4,
    pub route: Route,
    /// Network byte order.
    pub backend_addr: u32,
    /// `GlobalConfig::cache_epoch` when the entry was written.
    pub epoch: u32,
    pub seen: u32,
}

/// Value of `FLOW_CACHE_V6` (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCacheV6 {
    pub flow: FlowV6,
    pub route: Route,
    /// Network byte order.
    pub backend_addr: [u32; 4],
    pub epoch: u32,
    pub seen: u32,
}

/// An IPv4 prefix as `lb_decap` matches it: `src & mask == addr`. Network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prefix4 {
    pub addr: u32,
    pub mask: u32,
}

/// An IPv6 prefix: `src[i] & mask[i] == addr[i]` for every word. Network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prefix6 {
    pub addr: [u32; 4],
    pub mask: [u32; 4],
}

/// Value of `DECAP_CONFIG` (one entry), on backends: the outer sources `lb_decap` accepts
/// encapsulated packets from (the load balancers). With none, it accepts none.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapConfig {
    pub v4: [Prefix4; crate::consts::DECAP_PREFIXES],
    pub v6: [Prefix6; crate::consts::DECAP_PREFIXES],
    /// Prefixes in use at the front of `v4` / `v6`.
    pub v4_count: u32,
    pub v6_count: u32,
}

/// Value of `TUNNEL` (one entry): what encapsulation needs beyond `GlobalConfig`, in a
/// map of its own so that no pinned map's layout changes with it. On backends `lb_decap`
/// reads `gue_port` from it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelConfig {
    /// The smallest MTU of the interfaces the program is attached to, as the daemon last
    /// read it: a packet whose IP packet would outgrow it once encapsulated is answered
    /// with ICMP "too big". 0 = unknown, no check.
    pub mtu: u32,
    /// UDP destination port of GUE packets, network byte order (0 on a backend: GUE is
    /// not taken off).
    pub gue_port: u16,
    pub _pad: u16,
}

/// Key of the `FRAGMENTS` LRU map: one fragmented datagram, as every fragment of it
/// carries it. Network byte order; IPv4 addresses in word 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// The IPv4 identification (16 bits) or the IPv6 fragment header's (32 bits).
    pub id: u32,
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: u16,
}

/// Value of the `FRAGMENTS` map: the ports the datagram's first fragment carried.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentPorts {
    /// Network byte order.
    pub sport: u16,
    pub dport: u16,
}

/// Value of the per-CPU `ICMP_RATE` map: one CPU's budget of one kind of ICMP message.
/// The daemon writes `limit` (and zeroes the rest); the program keeps the window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IcmpRate {
    /// Messages per second this CPU may send; 0 = none.
    pub limit: u32,
    /// Messages sent in the current window.
    pub sent: u32,
    /// Start of the current one-second window (`bpf_ktime_get_coarse_ns`).
    pub window_start: u64,
}

/// Value of `VIP_STATS` and `BACKEND_STATS` (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub packets: u64,
    pub bytes: u64,
}

const _: () = {
    assert!(size_of::<VipKey>() == 20);
    assert!(size_of::<VipAddr>() == 4);
    assert!(size_of::<VipState>() == 8);
    assert!(size_of::<Backend>() == 24);
    assert!(size_of::<FlowV4>() == 16);
    assert!(size_of::<FlowV6>() == 40);
    assert!(size_of::<ConntrackEntry>() == 16);
    assert!(size_of::<ConntrackBucket>() == 64);
    assert!(size_of::<NextHop>() == 20);
    assert!(size_of::<GlobalConfig>() == 40 + 8 * VIP_FILTER_WORDS);
    assert!(size_of::<Route>() == 36);
    // The data plane copies both MACs in one run of 16-bit moves.
    assert!(core::mem::offset_of!(Route, dmac).is_multiple_of(2));
    assert!(core::mem::offset_of!(Route, smac) == core::mem::offset_of!(Route, dmac) + 6);
    assert!(size_of::<FlowCacheV4>() == 64);
    assert!(size_of::<FlowCacheV6>() == 104);
    assert!(size_of::<TrafficCounters>() == 16);
    assert!(size_of::<DecapConfig>() == 8 + 8 * 8 + 32 * 8);
    assert!(size_of::<TunnelConfig>() == 8);
    assert!(size_of::<IcmpRate>() == 16);
    assert!(size_of::<FragmentKey>() == 40);
    assert!(size_of::<FragmentPorts>() == 4);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipAddr {}
    unsafe impl aya::Pod for VipState {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowV4 {}
    unsafe impl aya::Pod for FlowV6 {}
    unsafe impl aya::Pod for ConntrackEntry {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for ConntrackBucket {}
    unsafe impl aya::Pod for GlobalConfig {}
    unsafe impl aya::Pod for TrafficCounters {}
    unsafe impl aya::Pod for Route {}
    unsafe impl aya::Pod for FlowCacheV4 {}
    unsafe impl aya::Pod for FlowCacheV6 {}
    unsafe impl aya::Pod for DecapConfig {}
    unsafe impl aya::Pod for IcmpRate {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for FragmentPorts {}
    unsafe impl aya::Pod for TunnelConfig {}
}
