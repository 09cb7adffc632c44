//! Per-CPU counters: no atomics needed, the daemon sums the CPUs at scrape time.

use lb_common::consts::Counter;

use lb_common::types::TrafficCounters;

use crate::maps::{BACKEND_CHAINED, BACKEND_STATS, STATS, VIP_CHAINED, VIP_STATS};

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(c) = STATS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
}

/// Accounts one forwarded packet of `bytes` to its Vip and Backend.
#[inline(always)]
pub fn count_forwarded(vip: u32, backend: u32, bytes: u64) {
    add(VIP_STATS.get_ptr_mut(vip), bytes);
    add(BACKEND_STATS.get_ptr_mut(backend), bytes);
}

/// Accounts one chained packet of `bytes` to its Vip and its previous Backend.
#[inline(always)]
pub fn count_chained(vip: u32, previous: u32, bytes: u64) {
    count(Counter::SecondChance);
    add(VIP_CHAINED.get_ptr_mut(vip), bytes);
    add(BACKEND_CHAINED.get_ptr_mut(previous), bytes);
}

#[inline(always)]
fn add(slot: Option<*mut TrafficCounters>, bytes: u64) {
    if let Some(c) = slot {
        // SAFETY: a per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}
