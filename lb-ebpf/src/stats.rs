//! Per-CPU counters: no atomics needed, the daemon sums the CPUs at scrape time.

use lb_common::consts::Counter;

use crate::maps::{BACKEND_STATS, STATS, VIP_STATS};

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
    if let Some(c) = VIP_STATS.get_ptr_mut(vip) {
        // SAFETY: as above.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend) {
        // SAFETY: as above.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}
