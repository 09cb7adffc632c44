//! The connection table's layout and rules: one definition for the kernel program, the
//! daemon (`trace`, restart adoption) and the tests' reference model.
//!
//! The table is an array of 64-byte buckets (one cache line each: the map is mmap-able, so
//! the kernel page-aligns its values): 7 ways of one 8-byte word, then one word that holds
//! nothing (`ConntrackBucket::prefetch`: a new flow writes it to start loading the line
//! early, since a store waits for no cache miss and a load does; see `lb-ebpf`'s
//! `conntrack::prefetch`, measured there). A Flow has
//! two candidate buckets and a tag, all from one seeded 64-bit hash of its 5-tuple; it
//! lives in whichever of the two had room when it was inserted. Every way is read once
//! and written with one aligned 8-byte store, so a reader on another CPU sees the old word
//! or the new one, never half of each; there are no locks. A race between two inserts
//! into one way loses one of them, and that flow is steered by its Maglev table like any
//! miss.
//!
//! A way, bit by bit (low to high):
//! - `0..21` tag (never 0: an all-zero way is empty);
//! - `21..34` Backend id (13 bits: `max_backends` ≤ 8192);
//! - `34..44` Vip id (10 bits: `max_vips` ≤ 1024);
//! - `44..52` generation digest of the Backend's and the Vip's generations (8 bits);
//! - `52..64` age: the coarse clock (`AGE_BITS`, wrapping) when the flow last sent a packet.
//!
//! False matches. A flow is known by (bucket, tag); a flow not in the table matches some
//! other flow's way with probability ≤ (valid ways in its two buckets) / 2^21 ≤ 14 / 2^21
//! ≈ 6.7e-6 per lookup. A non-SYN packet of an unknown flow then goes to that way's
//! backend. A new flow never takes such a way from a live flow: it follows the way's
//! Backend if the flow is of its Vip, else goes without an entry (`lb-ebpf`'s
//! `conntrack::Insert::Held`); a flood of fresh SYNs meets live flows' tags at that rate,
//! and taking their ways would move them. The generation digest wraps after 256
//! generations, but only an entry idle that long can meet its wrap, and idle entries are
//! the first reused.

use crate::types::ConntrackBucket;

/// Ways per bucket (the bucket's eighth word is its prefetch word).
pub const WAYS: usize = 7;

pub const TAG_BITS: u32 = 21;
pub const BACKEND_BITS: u32 = 13;
pub const VIP_BITS: u32 = 10;
pub const GENERATION_BITS: u32 = 8;
pub const AGE_BITS: u32 = 12;

const BACKEND_SHIFT: u32 = TAG_BITS;
const VIP_SHIFT: u32 = BACKEND_SHIFT + BACKEND_BITS;
const GENERATION_SHIFT: u32 = VIP_SHIFT + VIP_BITS;
const AGE_SHIFT: u32 = GENERATION_SHIFT + GENERATION_BITS;
const _: () = assert!(AGE_SHIFT + AGE_BITS == 64);

pub const TAG_MASK: u64 = (1 << TAG_BITS) - 1;
pub const AGE_MASK: u64 = (1 << AGE_BITS) - 1;

/// Largest Backend id and Vip id a way can hold, plus one: the limits of `max_backends`
/// and `max_vips`.
pub const MAX_BACKENDS: u32 = 1 << BACKEND_BITS;
pub const MAX_VIPS: u32 = 1 << VIP_BITS;

/// Bucket-index bits of each candidate: the tag is taken from bits the indices do not use,
/// so two flows that share a bucket still have independent tags.
pub const INDEX_BITS: u32 = 21;
/// Most buckets a table can have (14,680,064 entries).
pub const MAX_BUCKETS: u32 = 1 << INDEX_BITS;

/// An idle threshold is this many age units at most: the 12-bit age then wraps only after
/// 32 idle periods, so an entry left for dead looks active again only 1/32 of the time.
pub const MAX_IDLE_UNITS: u32 = 127;

/// Buckets of a table of `entries` ways: a power of two, at least 2, at most `MAX_BUCKETS`.
pub const fn buckets(entries: u32) -> u32 {
    let want = entries.div_ceil(WAYS as u32);
    let mut n = 2;
    while n < want && n < MAX_BUCKETS {
        n *= 2;
    }
    n
}

/// Where a Flow of conntrack hash `h` may live in a table of `mask + 1` buckets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    pub first: u32,
    pub second: u32,
    pub tag: u64,
}

#[inline(always)]
pub const fn place(h: u64, mask: u32) -> Place {
    let first = h as u32 & mask;
    let mut second = (h >> INDEX_BITS) as u32 & mask;
    if second == first {
        second ^= 1;
    }
    let tag = h >> (64 - TAG_BITS);
    Place {
        first,
        second,
        tag: if tag == 0 { 1 } else { tag },
    }
}

/// The 8-bit digest of a Backend's and a Vip's generations that a way keeps: either one
/// changing (the id given to something else, the Backend taken down) voids the entry.
#[inline(always)]
pub const fn generation_digest(backend_generation: u32, vip_generation: u32) -> u64 {
    let h = (backend_generation as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (vip_generation as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h >> (64 - GENERATION_BITS)
}

/// A way as its fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Way {
    pub tag: u64,
    pub backend: u32,
    pub vip: u32,
    pub generation: u64,
    pub age: u64,
}

impl Way {
    #[inline(always)]
    pub const fn pack(&self) -> u64 {
        (self.tag & TAG_MASK)
            | ((self.backend as u64 & (MAX_BACKENDS as u64 - 1)) << BACKEND_SHIFT)
            | ((self.vip as u64 & (MAX_VIPS as u64 - 1)) << VIP_SHIFT)
            | ((self.generation & ((1 << GENERATION_BITS) - 1)) << GENERATION_SHIFT)
            | ((self.age & AGE_MASK) << AGE_SHIFT)
    }

    #[inline(always)]
    pub const fn unpack(word: u64) -> Self {
        Self {
            tag: word & TAG_MASK,
            backend: ((word >> BACKEND_SHIFT) & (MAX_BACKENDS as u64 - 1)) as u32,
            vip: ((word >> VIP_SHIFT) & (MAX_VIPS as u64 - 1)) as u32,
            generation: (word >> GENERATION_SHIFT) & ((1 << GENERATION_BITS) - 1),
            age: word >> AGE_SHIFT,
        }
    }
}

/// The age field of a word.
#[inline(always)]
pub const fn age_of(word: u64) -> u64 {
    word >> AGE_SHIFT
}

/// `word` with its age set to `now`.
#[inline(always)]
pub const fn with_age(word: u64, now: u64) -> u64 {
    (word & !(AGE_MASK << AGE_SHIFT)) | ((now & AGE_MASK) << AGE_SHIFT)
}

/// Age units since `age`, on the wrapping clock. An age up to `FUTURE` units ahead of
/// `now` (another CPU's store, read after this CPU read the clock) counts as 0, not as
/// nearly a whole wrap.
#[inline(always)]
pub const fn idle_for(age: u64, now: u64) -> u64 {
    let d = now.wrapping_sub(age) & AGE_MASK;
    if d > AGE_MASK - FUTURE { 0 } else { d }
}

/// See [`idle_for`].
pub const FUTURE: u64 = 4;

/// Whether two words name the same flow going to the same place, whenever last seen.
#[inline(always)]
pub const fn same_but_age(a: u64, b: u64) -> bool {
    (a ^ b) & !(AGE_MASK << AGE_SHIFT) == 0
}

/// Whether a way may be reused: empty, or idle for more than `idle` units.
#[inline(always)]
pub const fn reusable(word: u64, now: u64, idle: u64) -> bool {
    word == 0 || idle_for(age_of(word), now) > idle
}

/// The way of `bucket` holding `tag`, and its word.
///
/// # Safety
/// `bucket` points to a live bucket (a map value, or memory the caller owns).
#[inline(always)]
pub unsafe fn find(bucket: *mut ConntrackBucket, tag: u64) -> Option<(*mut u64, u64)> {
    let ways = bucket as *mut u64;
    let mut i = 0;
    while i < WAYS {
        // SAFETY: in bounds; read once, so a concurrent store is seen whole or not at all.
        let (way, word) = unsafe {
            let way = ways.add(i);
            (way, core::ptr::read_volatile(way))
        };
        if word != 0 && word & TAG_MASK == tag {
            return Some((way, word));
        }
        i += 1;
    }
    None
}

/// One pass over `bucket`: the index of the way holding `tag` (or `WAYS`), and of its
/// first empty way (or `WAYS`). Ways fill from the front, so the second is also about
/// how full the bucket is.
///
/// # Safety
/// As for [`find`].
#[inline(always)]
unsafe fn scan(bucket: *mut ConntrackBucket, tag: u64) -> (usize, usize) {
    let ways = bucket as *mut u64;
    let mut empty = WAYS;
    let mut i = 0;
    while i < WAYS {
        // SAFETY: in bounds; read once.
        let word = unsafe { core::ptr::read_volatile(ways.add(i)) };
        if word == 0 {
            if empty == WAYS {
                empty = i;
            }
        } else if word & TAG_MASK == tag {
            return (i, empty);
        }
        i += 1;
    }
    (WAYS, empty)
}

/// A first bucket whose first empty way is at most this index takes the new entry without
/// the second bucket being read: most inserts then cost one cache line (measured in one
/// sitting: a new flow 271 ns above empty reading both, 248 reading one), and the choice
/// between the two only starts once five of the first's seven ways are used, where it matters.
pub const ONE_LINE_FILL: usize = WAYS - 3;

/// The way a new entry of `tag` goes to, across its two buckets, as an index (`0..WAYS`
/// in `first`, `WAYS..2 * WAYS` in `second`): the way already holding `tag` (the caller
/// decides whether to take it from a live flow); else the first empty way of the first
/// bucket while it is not nearly full (`ONE_LINE_FILL`),
/// else of the emptier bucket; else the way idle longest, if it has been idle more than
/// `idle` units; else `None` (every way is an active flow: the new flow is steered
/// without an entry rather than evicting one).
///
/// A way of `tag` in the second bucket is not looked for when the first has room: the
/// callers look the flow up in both before they insert, but a SYN (which is not looked
/// up) may then leave its flow's older way behind in the second bucket, shadowed by the
/// new one and reused once idle.
///
/// Written for the verifier: each pass keeps at most two indices and returns early, so
/// the paths it explores grow with the ways, not with their combinations (a single pass
/// that tracked the empty and the oldest way of both buckets at once exceeded its
/// 1M-instruction limit).
///
/// # Safety
/// As for [`find`], for both buckets.
#[inline(always)]
pub unsafe fn choose(
    first: *mut ConntrackBucket,
    second: *mut ConntrackBucket,
    tag: u64,
    now: u64,
    idle: u64,
) -> Option<usize> {
    // SAFETY: the caller's buckets throughout.
    unsafe {
        let (m1, e1) = scan(first, tag);
        if m1 < WAYS {
            return Some(m1);
        }
        if e1 <= ONE_LINE_FILL {
            return Some(e1);
        }
        let (m2, e2) = scan(second, tag);
        if m2 < WAYS {
            return Some(WAYS + m2);
        }
        if e2 < e1 {
            return Some(WAYS + e2);
        }
        if e1 < WAYS {
            return Some(e1);
        }
        let mut best = 2 * WAYS;
        let mut best_idle = idle;
        let mut i = 0;
        while i < 2 * WAYS {
            let ways = if i < WAYS { first } else { second } as *mut u64;
            let word = core::ptr::read_volatile(ways.add(i % WAYS));
            let d = idle_for(age_of(word), now);
            if d > best_idle {
                best_idle = d;
                best = i;
            }
            i += 1;
        }
        (best < 2 * WAYS).then_some(best)
    }
}

/// The way `choose` named.
///
/// # Safety
/// As for [`choose`]; `index < 2 * WAYS`.
#[inline(always)]
pub unsafe fn way_at(
    first: *mut ConntrackBucket,
    second: *mut ConntrackBucket,
    index: usize,
) -> *mut u64 {
    let bucket = if index < WAYS { first } else { second };
    // SAFETY: in bounds of the bucket.
    unsafe { (bucket as *mut u64).add(index % WAYS) }
}

/// Stores `word` in `way` with one aligned 8-byte store.
///
/// # Safety
/// `way` is a way returned by [`find`] or [`choose`].
#[inline(always)]
pub unsafe fn store(way: *mut u64, word: u64) {
    // SAFETY: aligned, in a live bucket.
    unsafe { core::ptr::write_volatile(way, word) }
}

/// The age-unit shift and idle threshold for a clock of `hz` ticks per second (the kernel's
/// jiffies) and an idle time of `idle_secs`: the unit is the smallest power of two of
/// ticks that keeps the threshold within `MAX_IDLE_UNITS`, rounded up so that an entry is
/// never reusable before `idle_secs`.
pub const fn age_units(hz: u32, idle_secs: u32) -> (u32, u32) {
    let ticks = hz as u64 * idle_secs as u64;
    let mut shift = 0;
    while ticks.div_ceil(1 << shift) > MAX_IDLE_UNITS as u64 && shift < 40 {
        shift += 1;
    }
    (shift, ticks.div_ceil(1 << shift) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn way_round_trips() {
        let w = Way {
            tag: 0x1F_FFFF,
            backend: 8191,
            vip: 1023,
            generation: 0xAB,
            age: 0xFFF,
        };
        assert_eq!(Way::unpack(w.pack()), w);
        let w = Way {
            tag: 5,
            backend: 3,
            vip: 2,
            generation: 1,
            age: 7,
        };
        assert_eq!(Way::unpack(w.pack()), w);
        assert_eq!(Way::unpack(with_age(w.pack(), 9)).age, 9);
    }

    #[test]
    fn places_are_distinct_and_tags_nonzero() {
        for h in [0u64, 1, u64::MAX, 0x1234_5678_9abc_def0] {
            let p = place(h, 127);
            assert_ne!(p.first, p.second);
            assert!(p.first <= 127 && p.second <= 127);
            assert_ne!(p.tag, 0);
        }
    }

    #[test]
    fn buckets_are_the_power_of_two_that_holds_the_entries_within_bounds() {
        // (entries, buckets): 7 ways a bucket, at least 2 buckets, at most MAX_BUCKETS.
        for (entries, want) in [
            (0, 2),
            (14, 2),
            (15, 4),
            (40, 8),
            (57_344, 8192),
            (57_345, 16_384),
            (7 << 21, 1 << 21),
            (u32::MAX, 1 << 21),
        ] {
            assert_eq!(buckets(entries), want, "{entries} entries");
        }
        assert_eq!(MAX_BUCKETS, 1 << 21);
    }

    #[test]
    fn a_generation_step_always_changes_the_eight_bit_digest() {
        // The daemon voids a Backend's (or a Vip's) entries by bumping its generation by
        // one: the digest a way keeps must change then, whatever the other generation.
        for g in 0..300 {
            for v in 0..300 {
                let d = generation_digest(g, v);
                assert!(d < 1 << GENERATION_BITS, "{g} {v}: {d:#x}");
                assert_ne!(d, generation_digest(g + 1, v), "backend {g}, vip {v}");
                assert_ne!(d, generation_digest(g, v + 1), "backend {g}, vip {v}");
            }
        }
    }

    #[test]
    fn idle_time_wraps_with_the_clock_and_a_few_units_ahead_count_as_now() {
        assert_eq!(idle_for(100, 100), 0);
        assert_eq!(idle_for(90, 100), 10);
        // Across the wrap of the 12-bit clock.
        assert_eq!(idle_for(AGE_MASK - 5, 5), 11);
        // Another CPU's store read after this CPU read the clock: up to FUTURE ahead.
        for ahead in 1..=FUTURE {
            assert_eq!(idle_for(100 + ahead, 100), 0, "{ahead} ahead");
        }
        // Further ahead is a whole wrap ago, less that.
        assert_eq!(idle_for(100 + FUTURE + 1, 100), AGE_MASK - FUTURE);
    }

    #[test]
    fn a_way_is_reusable_when_empty_or_idle_past_the_threshold() {
        let word = |age| {
            Way {
                tag: 1,
                backend: 1,
                vip: 0,
                generation: 0,
                age,
            }
            .pack()
        };
        assert!(reusable(0, 50, 5), "empty");
        assert!(!reusable(word(50), 50, 5), "active now");
        assert!(!reusable(word(45), 50, 5), "idle exactly the threshold");
        assert!(reusable(word(44), 50, 5), "idle one unit more");
    }

    #[test]
    fn a_first_bucket_with_room_takes_the_entry_until_five_of_its_seven_ways_are_used() {
        let filled = |n: usize| {
            let mut b = ConntrackBucket::default();
            for (i, way) in b.ways.iter_mut().take(n).enumerate() {
                *way = Way {
                    tag: 100 + i as u64,
                    backend: 1,
                    age: 10,
                    ..Way::default()
                }
                .pack();
            }
            b
        };
        // (ways used in the first bucket, in the second, the way chosen).
        for (first, second, want) in [
            (0, 0, 0),
            (3, 0, 3),
            (ONE_LINE_FILL, 0, ONE_LINE_FILL),
            (ONE_LINE_FILL + 1, 0, WAYS),
            (ONE_LINE_FILL + 1, ONE_LINE_FILL + 1, ONE_LINE_FILL + 1),
            (WAYS, 2, WAYS + 2),
        ] {
            let (mut a, mut b) = (filled(first), filled(second));
            // SAFETY: buckets we own.
            let got = unsafe { choose(&mut a, &mut b, 7, 10, 100) };
            assert_eq!(got, Some(want), "{first} and {second} used");
        }
        assert_eq!(ONE_LINE_FILL, 4);
    }

    #[test]
    fn age_units_never_expire_early() {
        for (hz, idle) in [(250, 60), (1000, 60), (100, 1), (250, 3600), (1000, 1)] {
            let (shift, units) = age_units(hz, idle);
            assert!(units <= MAX_IDLE_UNITS);
            assert!((units as u64) << shift >= hz as u64 * idle as u64);
        }
        // The smallest unit that fits: a threshold of exactly MAX_IDLE_UNITS ticks needs
        // no shift, one more tick does.
        assert_eq!(age_units(MAX_IDLE_UNITS, 1), (0, MAX_IDLE_UNITS));
        assert_eq!(age_units(MAX_IDLE_UNITS + 1, 1), (1, 64));
        assert_eq!(age_units(1000, 60), (9, 118));
        // The search is bounded, whatever it is given.
        assert!(age_units(u32::MAX, u32::MAX).0 <= 40);
    }
}
