//! What the ICMP messages the program sends itself share: a per-CPU budget per kind, and
//! the incremental checksum update of a rewritten header.

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;

use crate::maps::ICMP_RATE;

const NS_PER_SEC: u64 = 1_000_000_000;

/// Whether this CPU may send one more message of kind `slot` (`icmp_rate_slots`) in the
/// current one-second window, and if so takes it from the budget. Per CPU, so no atomics:
/// the whole box sends at most `limit` times its CPUs per second.
#[inline(always)]
pub fn within_rate(slot: u32) -> bool {
    let Some(rate) = ICMP_RATE.get_ptr_mut(slot) else {
        return false;
    };
    // SAFETY: a helper without arguments; this CPU's slot, written by no other CPU (the
    // daemon's rare write of `limit` replaces it whole, which at worst restarts a window).
    unsafe {
        let now = bpf_ktime_get_coarse_ns();
        if now.wrapping_sub((*rate).window_start) >= NS_PER_SEC {
            (*rate).window_start = now;
            (*rate).sent = 0;
        }
        if (*rate).sent >= (*rate).limit {
            return false;
        }
        (*rate).sent += 1;
    }
    true
}

/// The Internet checksum `check` after one 16-bit word of what it covers changed from
/// `old` to `new` (RFC 1624, eqn. 3). Words as they sit in memory: the one's-complement
/// sum is the same in either byte order.
#[inline(always)]
pub fn csum_replace(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!check) as u32 + (!old) as u32 + new as u32;
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    !(sum as u16)
}

/// Swaps the destination and source MACs in place, with 16-bit moves (a plain array swap
/// becomes a byte-wise `memmove` call in BPF).
#[inline(always)]
pub fn swap_macs(eth: *mut crate::parse::EthHdr) {
    let words = eth as *mut u16;
    for i in 0..3 {
        // SAFETY: the caller bounds-checked the 14-byte Ethernet header; MACs are 2-aligned.
        unsafe {
            let (d, s) = (words.add(i), words.add(i + 3));
            let (a, b) = (core::ptr::read_volatile(d), core::ptr::read_volatile(s));
            *d = b;
            *s = a;
        }
    }
}
