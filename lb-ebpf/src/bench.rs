//! Benchmark baselines, in an object of their own so that the daemon never loads them:
//! `lru_insert` does only what a kernel LRU hash connection table costs a new flow (what
//! Katran and Cilium pay, and what mlb paid before its own table): one
//! `bpf_map_update_elem` of a fresh key per call; `random_line` what any per-flow state
//! of a given size costs a new flow on the machine at the least: one read of a random
//! cache line of a table that large. And, for tests, `count_next`: a next program to
//! chain after `lb_ingress` (`interfaces[].next_program`).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, LruHashMap, PerCpuArray},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use lb_common::{
    consts::BPF_F_NO_COMMON_LRU,
    types::{ConntrackEntry, FlowV4},
};

/// mlb's former connection table, as it was: FlowV4 to ConntrackEntry, per-CPU LRU lists.
/// Sized by the benchmark (`EbpfLoader::map_max_entries`).
#[btf_map]
static LRU: LruHashMap<FlowV4, ConntrackEntry, 65_536, { BPF_F_NO_COMMON_LRU as usize }> =
    LruHashMap::new();

/// Cache lines (the size of a connection-table bucket), as many as the connection table
/// under measurement has buckets. Sized by the benchmark (`EbpfLoader::map_max_entries`).
#[btf_map]
static LINES: Array<[u64; 8], 2> = Array::new();

/// Lines - 1 (a power of two minus one), set at load (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
static LINES_MASK: u32 = 1;

/// Per-CPU call counter: the fresh key of each call.
#[btf_map]
static CALLS: PerCpuArray<u64, 1> = PerCpuArray::new();

/// The verdict `count_next` returns, set at load (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
static NEXT_VERDICT: u32 = xdp_action::XDP_PASS;

/// Packets `count_next` saw, per CPU.
#[btf_map]
static COUNTED: PerCpuArray<u64, 1> = PerCpuArray::new();

/// Counts the packet and returns `NEXT_VERDICT`.
#[xdp]
pub fn count_next(_ctx: XdpContext) -> u32 {
    if let Some(n) = COUNTED.get_ptr_mut(0) {
        // SAFETY: this CPU's slot.
        unsafe { *n += 1 };
    }
    // SAFETY: a global the loader may have set; read it as such, not as a constant.
    unsafe { core::ptr::read_volatile(&NEXT_VERDICT) }
}

#[xdp]
pub fn lru_insert(_ctx: XdpContext) -> u32 {
    let Some(calls) = CALLS.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: this CPU's slot.
    let n = unsafe {
        *calls += 1;
        *calls
    };
    let key = FlowV4 {
        src: n as u32,
        dst: (n >> 32) as u32,
        sport: 80,
        dport: 80,
        proto: 6,
        _pad0: 0,
        _pad1: 0,
    };
    let entry = ConntrackEntry {
        backend: 1,
        backend_generation: 1,
        vip: 0,
        vip_generation: 1,
    };
    if LRU.insert(key, entry, 0).is_err() {
        return xdp_action::XDP_ABORTED;
    }
    xdp_action::XDP_PASS
}

/// Reads one word of a line picked by a fresh hash per call, and returns by it, so that
/// the call ends only when the line has arrived: the memory floor of a new flow's lookup
/// or insert in a table of that size (a TLB and a cache miss when the table is larger
/// than the caches), with nothing else.
#[xdp]
pub fn random_line(_ctx: XdpContext) -> u32 {
    let Some(calls) = CALLS.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: this CPU's slot.
    let n = unsafe {
        *calls += 1;
        *calls
    };
    // SAFETY: a global the loader sets; read it as such, not as a constant.
    let mask = unsafe { core::ptr::read_volatile(&LINES_MASK) };
    // A full mixer (murmur3's finalizer): a multiplicative hash of a counter walks the
    // table by a near-constant stride, and its pages then stay in the TLB.
    let mut x = n;
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    x = x.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    x ^= x >> 33;
    let index = x as u32 & mask;
    match LINES.get(index) {
        // The lines are zero: PASS, but only once the word is read.
        Some(line) if line[0] != u64::MAX => xdp_action::XDP_PASS,
        _ => xdp_action::XDP_ABORTED,
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
