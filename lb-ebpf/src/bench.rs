//! Benchmark baselines, in an object of their own so that the daemon never loads them:
//! `lru_insert` does only what a kernel LRU hash connection table costs a new flow (what
//! Katran and Cilium pay, and what mlb paid before its own table): one
//! `bpf_map_update_elem` of a fresh key per call. And, for tests, `count_next`: a next
//! program to chain after `lb_ingress` (`interfaces[].next_program`).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{LruHashMap, PerCpuArray},
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
