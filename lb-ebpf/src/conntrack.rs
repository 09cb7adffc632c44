//! The connection table: lookups and inserts over `CONNTRACK`'s one-cache-line buckets.
//! The layout and the rules (which way an insert takes, what counts as idle) are
//! `lb_common::conntrack`'s, shared with `mlb trace` and the tests' reference model.

use aya_ebpf::helpers::generated::bpf_jiffies64;
use lb_common::{
    conntrack::{
        AGE_MASK, TAG_MASK, Way, age_of, choose, find, generation_digest, place, reusable,
        same_but_age, store, way_at, with_age,
    },
    types::{ConntrackBucket, ConntrackEntry},
};

use crate::maps::CONNTRACK;

// Set by the loader from the capacities and the config (`EbpfLoader::override_global`). They
// live in .rodata, which the loader freezes, so the verifier treats them as constants.
/// Buckets - 1 (a power of two minus one); the seed element follows the last bucket.
#[unsafe(no_mangle)]
static CT_BUCKET_MASK: u32 = 1;
/// log2 of the age unit in jiffies.
#[unsafe(no_mangle)]
static CT_AGE_SHIFT: u32 = 8;
/// Age units without a packet after which a way may be reused (`conntrack_idle`).
#[unsafe(no_mangle)]
static CT_IDLE: u32 = 60;

#[inline(always)]
fn constant(v: &'static u32) -> u32 {
    // SAFETY: a static; volatile so the compiler does not fold the placeholder in.
    unsafe { core::ptr::read_volatile(v) }
}

/// The coarse clock in age units. `bpf_jiffies64` costs no call: the verifier inlines it
/// into one load of `jiffies` (kernel/bpf/verifier.c, do_misc_fixups, since 5.5).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper without arguments.
    (unsafe { bpf_jiffies64() } >> constant(&CT_AGE_SHIFT)) & AGE_MASK
}

/// The table's hash seed.
#[inline(always)]
pub fn seed() -> Option<u64> {
    let c = CONNTRACK.get_ptr(constant(&CT_BUCKET_MASK) + 1)?;
    // SAFETY: a map value; written once by the daemon before the program is attached.
    Some(unsafe { (*c).ways[0] })
}

#[inline(always)]
fn bucket(index: u32) -> Option<*mut ConntrackBucket> {
    CONNTRACK.get_ptr_mut(index & constant(&CT_BUCKET_MASK))
}

/// Starts loading the first bucket of conntrack hash `h`, for an insert that reads it
/// later. A load would stall the packet for the whole miss (the table is far larger than
/// the caches: ~120 ns on AMD EPYC here, most of a new flow's insert); a store waits for
/// nothing, and the line is on its way while the packet's Vip and table are looked up.
/// BPF has no prefetch instruction. Measured (`cargo xtask bench xdp`, A/B in one run,
/// AMD EPYC): a new flow 60–75 ns cheaper; a load in its place saved nothing.
#[inline(always)]
pub fn prefetch(h: u64) {
    let p = place(h, constant(&CT_BUCKET_MASK));
    if let Some(b) = bucket(p.first) {
        // SAFETY: a map value; the word is never read, any CPU may write it.
        unsafe { core::ptr::write_volatile(&raw mut (*b).prefetch, 0) };
    }
}

/// A flow's way: where it is and what it held when read.
pub struct Found {
    way: *mut u64,
    pub word: u64,
}

impl Found {
    pub fn way(&self) -> Way {
        Way::unpack(self.word)
    }
}

/// The way of the flow of conntrack hash `h`: its first bucket, then its second.
#[inline(always)]
pub fn lookup(h: u64) -> Option<Found> {
    let p = place(h, constant(&CT_BUCKET_MASK));
    // SAFETY: map values, live while the program runs.
    let found = unsafe { find(bucket(p.first)?, p.tag) };
    let (way, word) = match found {
        Some(f) => f,
        None => unsafe { find(bucket(p.second)?, p.tag) }?,
    };
    Some(Found { way, word })
}

/// Marks a found flow as active now. Stores only when the age unit changed, so the
/// bucket's cache line is written about once per unit per flow, not per packet.
#[inline(always)]
pub fn touch(found: &Found, now: u64) {
    if age_of(found.word) != now {
        // SAFETY: a way returned by `find`.
        unsafe { store(found.way, with_age(found.word, now)) };
    }
}

/// Keeps the way of the flow of conntrack hash `h` active at `now`; puts it back where
/// `entry` says if it was lost (a race between two inserts, or a full table since freed).
/// A subprogram of its own: it runs about once per age unit per flow, so its code (an
/// insert, inlined) stays out of the fast path's way.
#[inline(never)]
pub fn refresh(h: u64, entry: &ConntrackEntry, now: u64) {
    match lookup(h) {
        Some(found) => touch(&found, now),
        None => {
            insert(h, entry, now);
        }
    }
}

/// What [`insert`] did.
pub enum Insert {
    Done,
    /// Both buckets full of active flows: nothing written, none evicted.
    Full,
    /// The way of the flow's tag is active and names another Backend or Vip: nothing
    /// written. It is another flow's (tags are 21 bits) or this flow's own from before (a
    /// retransmitted SYN, a reused port); the caller follows it, keeps it or [`take`]s it.
    Held(Found),
}

/// The way word of the flow at `p` going where `entry` says, active at `now`.
#[inline(always)]
fn word_of(tag: u64, entry: &ConntrackEntry, now: u64) -> u64 {
    Way {
        tag,
        backend: entry.backend,
        vip: entry.vip,
        generation: generation_digest(entry.backend_generation, entry.vip_generation),
        age: now,
    }
    .pack()
}

/// Records that the flow of conntrack hash `h` goes where `entry` says, unless both of its
/// buckets are full of active flows or an active way of its tag says otherwise (see
/// [`Insert`]). Inlined: in `lb_full`, a program of its own, the stack has room for it,
/// and as a subprogram every new flow paid a call and a return (measured, A/B in one run,
/// both orders twice, AMD EPYC with SRSO return thunks: a new flow 5.8 ns cheaper inlined).
#[inline(always)]
pub fn insert(h: u64, entry: &ConntrackEntry, now: u64) -> Insert {
    let p = place(h, constant(&CT_BUCKET_MASK));
    let (Some(first), Some(second)) = (bucket(p.first), bucket(p.second)) else {
        return Insert::Full;
    };
    let word = word_of(p.tag, entry, now);
    let idle = constant(&CT_IDLE) as u64;
    // SAFETY: map values, live while the program runs.
    let Some(index) = (unsafe { choose(first, second, p.tag, now, idle) }) else {
        return Insert::Full;
    };
    // SAFETY: the way `choose` named; read once.
    let way = unsafe { way_at(first, second, index) };
    let old = unsafe { core::ptr::read_volatile(way) };
    if old & TAG_MASK == p.tag && !same_but_age(old, word) && !reusable(old, now, idle) {
        return Insert::Held(Found { way, word: old });
    }
    // SAFETY: as above.
    unsafe { store(way, word) };
    Insert::Done
}

/// Makes a way [`insert`] found `Held` say what `entry` says, for a flow of its tag (the
/// flow that held it no longer holds).
#[inline(always)]
pub fn take(held: &Found, entry: &ConntrackEntry, now: u64) {
    // SAFETY: a way returned by `insert`.
    unsafe { store(held.way, word_of(held.word & TAG_MASK, entry, now)) }
}
