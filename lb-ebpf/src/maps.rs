//! The data plane's maps. Sizes here are placeholders: the daemon sets each map's real
//! size at load time from its config (`EbpfLoader::map_max_entries`), so memory grows with
//! what is configured. Names must match `lb_common::consts::map_names`.

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    btf_maps::{Array, ArrayOfMaps, HashMap, LruHashMap, PerCpuArray, ProgramArray},
    macros::btf_map,
};
use lb_common::{
    conntrack::buckets,
    consts::{
        BPF_F_INNER_MAP, BPF_F_MMAPABLE, CONFIG_SLOTS, Counter, DEFAULT_CONNTRACK_ENTRIES,
        DEFAULT_FLOW_CACHE_ENTRIES, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS, DecapCounter,
        FRAGMENT_ENTRIES, NEXT_PROGRAM_SLOTS, icmp_rate_slots,
    },
    types::{
        Backend, ConntrackBucket, DecapConfig, FlowCacheV4, FlowCacheV6, FragmentKey,
        FragmentPorts, GlobalConfig, IcmpRate, NextHop, TrafficCounters, TunnelConfig, VipAddr,
        VipKey, VipState,
    },
};

const VIPS_MAX: usize = DEFAULT_MAX_VIPS as usize;
const BACKENDS_MAX: usize = DEFAULT_MAX_BACKENDS as usize;
const CONNTRACK_MAX: usize = buckets(DEFAULT_CONNTRACK_ENTRIES) as usize + 1;
const TABLE_FLAGS: usize = (BPF_F_INNER_MAP | BPF_F_MMAPABLE) as usize;
const MMAPABLE: usize = BPF_F_MMAPABLE as usize;
const FLOW_CACHE_MAX: usize = DEFAULT_FLOW_CACHE_ENTRIES as usize;

/// Hash seed, next-hop cache generation, encapsulation source prefixes, cache epoch and
/// the Vip address pre-filter: a ring of slots, the live one named by `CONFIG_INDEX`, so
/// that a packet never reads a config the daemon is rewriting.
#[btf_map]
pub static CONFIG: Array<GlobalConfig, { CONFIG_SLOTS as usize }> = Array::new();

/// The live `CONFIG` slot (one entry).
#[btf_map]
pub static CONFIG_INDEX: Array<u32, 1> = Array::new();

/// The live config: the index is read once, so the whole packet uses one slot.
#[inline(always)]
pub fn config() -> Option<&'static GlobalConfig> {
    let index = *CONFIG_INDEX.get(0)?;
    CONFIG.get(index & (CONFIG_SLOTS - 1))
}

/// Every IPv4 address that some Vip uses, with its wildcard flags: confirms the filter on
/// the rare paths (fragments, ICMP, malformed L4, unknown port).
#[btf_map]
pub static VIP_ADDRS_V4: HashMap<u32, VipAddr, VIPS_MAX> = HashMap::new();

/// Every IPv6 address that some Vip uses.
#[btf_map]
pub static VIP_ADDRS_V6: HashMap<[u32; 4], VipAddr, VIPS_MAX> = HashMap::new();

/// (address, port, protocol) to Vip id.
#[btf_map]
pub static VIPS: HashMap<VipKey, u32, VIPS_MAX> = HashMap::new();

/// Flags and generation of each Vip id.
#[btf_map]
pub static VIP_STATE: Array<VipState, VIPS_MAX> = Array::new();

/// Each Vip id's MaglevTable, an inner array swapped whole by the daemon. Logical slot 0
/// holds the size M, slots 1..=M Backend ids; two slots share each 8-byte entry (the
/// kernel rounds array values up to 8 bytes). BPF_F_INNER_MAP lets inner arrays differ in
/// size; BPF_F_MMAPABLE lets the daemon fill a new table with one memcpy.
#[btf_map]
pub static TABLES: ArrayOfMaps<Array<[u32; 2], 1, TABLE_FLAGS>, VIPS_MAX> = ArrayOfMaps::new();

/// Each Vip id's previous MaglevTable (second chance), as the daemon swapped it out, kept
/// for `second_chance` after the change, then deleted. Same layout as `TABLES`.
#[btf_map]
pub static PREV_TABLES: ArrayOfMaps<Array<[u32; 2], 1, TABLE_FLAGS>, VIPS_MAX> = ArrayOfMaps::new();

/// Backend id to address, flags and generation (id 0 unused).
#[btf_map]
pub static BACKENDS: Array<Backend, BACKENDS_MAX> = Array::new();

/// The connection table, both families: buckets of 7 one-word ways (`lb_common::conntrack`),
/// shared by every CPU, then one element holding the table's hash seed. Mmap-able, so the
/// kernel page-aligns the values and every bucket is exactly one cache line.
#[btf_map]
pub static CONNTRACK: Array<ConntrackBucket, CONNTRACK_MAX, MMAPABLE> = Array::new();

/// Per-CPU direct-mapped cache of IPv4 Routes, by flow hash: an established flow costs one
/// inlined array read instead of the connection table's and the Vip, Backend and next-hop
/// reads behind it.
#[btf_map]
pub static FLOW_CACHE_V4: PerCpuArray<FlowCacheV4, FLOW_CACHE_MAX> = PerCpuArray::new();

/// Per-CPU flow cache for IPv6.
#[btf_map]
pub static FLOW_CACHE_V6: PerCpuArray<FlowCacheV6, FLOW_CACHE_MAX> = PerCpuArray::new();

/// Per-CPU cache of `bpf_fib_lookup` results per Backend id.
#[btf_map]
pub static NEXT_HOPS: PerCpuArray<NextHop, BACKENDS_MAX> = PerCpuArray::new();

/// Scratch space for `bpf_fib_lookup`'s parameters (one per CPU): on the stack they
/// would push the full path past the verifier's 512 bytes for the whole call chain.
#[btf_map]
pub static FIB_SCRATCH: PerCpuArray<bpf_fib_lookup, 1> = PerCpuArray::new();

/// Global counters, indexed by `Counter`.
#[btf_map]
pub static STATS: PerCpuArray<u64, { Counter::COUNT as usize }> = PerCpuArray::new();

/// Packets and bytes forwarded per Vip id.
#[btf_map]
pub static VIP_STATS: PerCpuArray<TrafficCounters, VIPS_MAX> = PerCpuArray::new();

/// Packets and bytes forwarded per Backend id.
#[btf_map]
pub static BACKEND_STATS: PerCpuArray<TrafficCounters, BACKENDS_MAX> = PerCpuArray::new();

/// Packets and bytes sent with a previous Backend attached (second chance), per Vip id.
#[btf_map]
pub static VIP_CHAINED: PerCpuArray<TrafficCounters, VIPS_MAX> = PerCpuArray::new();

/// Packets sent with a previous Backend attached, per previous Backend id (the Backend
/// whose connections they keep).
#[btf_map]
pub static BACKEND_CHAINED: PerCpuArray<TrafficCounters, BACKENDS_MAX> = PerCpuArray::new();

/// On backends: the load balancers' source prefixes `lb_decap` accepts (one entry).
#[btf_map]
pub static DECAP_CONFIG: Array<DecapConfig, 1> = Array::new();

/// On backends: `lb_decap`'s counters, indexed by `DecapCounter`.
#[btf_map]
pub static DECAP_STATS: PerCpuArray<u64, { DecapCounter::COUNT as usize }> = PerCpuArray::new();

/// Per-CPU budgets of the ICMP messages the program sends itself (`icmp_rate_slots`): a
/// map of its own, so that no other map's layout changes with it.
#[btf_map]
pub static ICMP_RATE: PerCpuArray<IcmpRate, { icmp_rate_slots::COUNT as usize }> =
    PerCpuArray::new();

/// The ports of fragmented datagrams to Vips with `fragments: track`, by (source,
/// destination, IP id, protocol): written by a first fragment, read by the later ones
/// (Cilium's fragment map). LRU: a datagram whose pieces never all come is forgotten.
#[btf_map]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentPorts, { FRAGMENT_ENTRIES as usize }> =
    LruHashMap::new();

/// Next XDP programs for packets not for a Vip (`next`): slot 0 `lb_next` while some
/// interface has one, the others each such interface's program.
#[btf_map]
pub static NEXT_PROGRAMS: ProgramArray<{ NEXT_PROGRAM_SLOTS as usize }> = ProgramArray::new();

/// Slot 0: `lb_full`, the full path, which `lb_ingress` tail-calls for every packet its
/// fast path leaves (see `main.rs`).
#[btf_map]
pub static FULL_PATH: ProgramArray<1> = ProgramArray::new();

/// Interface index to its `NEXT_PROGRAMS` slot, for the interfaces that have a next program.
#[btf_map]
pub static NEXT_SLOTS: HashMap<u32, u32, { NEXT_PROGRAM_SLOTS as usize }> = HashMap::new();

/// The GUE destination port and the largest frame the interfaces send (one entry): read by
/// GUE packets and by packets large enough to be near the MTU.
#[btf_map]
pub static TUNNEL: Array<TunnelConfig, 1> = Array::new();
