//! The fill loop: backends take turns (scheduled by weight) and each takes the first empty
//! slot of its permutation. This is the hot part of [`build`](super::build).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::MaglevBackend;
use super::permutation::offset_skip;
use super::primes::is_prime;

/// Fills every slot of `slots` (zeroed, non-empty) from `live` (non-empty, weight > 0,
/// sorted by (weight descending, key, id)).
pub(super) fn fill(live: &[&MaglevBackend], slots: &mut [u32], seed: u32) {
    let m = slots.len() as u32;
    let m_is_prime = is_prime(m);
    let mut cursors: Vec<Cursor> = live
        .iter()
        .map(|b| {
            let (pos, skip) = offset_skip(&b.key, seed, m, m_is_prime);
            Cursor {
                pos,
                skip,
                id: b.id,
                inverse: UNKNOWN,
            }
        })
        .collect();

    // One entry per class of equal weight (a contiguous run of `live`).
    let mut classes = BinaryHeap::new();
    let mut start = 0;
    while start < live.len() {
        let weight = live[start].weight;
        let end = start
            + live[start..]
                .iter()
                .take_while(|b| b.weight == weight)
                .count();
        classes.push(ClassTurn {
            turn: 0,
            weight,
            class: classes.len() as u32,
            start: start as u32,
            end: end as u32,
        });
        start = end;
    }

    let mut table = Slots::new(slots);
    // Each pass is one turn of one class; the heap is never empty.
    while let Some(mut next) = classes.peek_mut() {
        for cursor in &mut cursors[next.start as usize..next.end as usize] {
            if table.take_next(cursor) {
                return;
            }
        }
        next.turn += 1;
    }
}

/// `Cursor::inverse` not computed yet (a real inverse is below `m <= 2^24`).
const UNKNOWN: u32 = u32::MAX;

/// Where one backend is in its permutation.
struct Cursor {
    /// Next slot to try, in `0..m`; every slot before it in the permutation is taken.
    pos: u32,
    skip: u32,
    id: u32,
    /// `skip^-1 mod m`, computed when first needed (the endgame), else [`UNKNOWN`].
    inverse: u32,
}

/// The next turn of a class of equal-weight backends, `cursors[start..end]`: at virtual
/// time `(2 * turn + 1) / (2 * weight)`. Ordered so that `BinaryHeap` (a max-heap) yields
/// the earliest turn first, the heavier class (lower index) first on equal times.
#[derive(PartialEq, Eq)]
struct ClassTurn {
    turn: u32,
    weight: u32,
    class: u32,
    start: u32,
    end: u32,
}

impl Ord for ClassTurn {
    fn cmp(&self, other: &Self) -> Ordering {
        // turn <= m <= 2^24 and weight < 2^32: the products fit in u64.
        let mine = (2 * u64::from(self.turn) + 1) * u64::from(other.weight);
        let theirs = (2 * u64::from(other.turn) + 1) * u64::from(self.weight);
        theirs.cmp(&mine).then_with(|| other.class.cmp(&self.class))
    }
}

impl PartialOrd for ClassTurn {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The table being filled.
///
/// Two regimes, with identical results. While many slots are empty a backend walks its
/// permutation over a map of taken slots (one byte per slot: a compare per probe, which
/// measured faster than a bitmap's shift and mask even though the bitmap fits in L1).
/// With `e` empty slots a walk costs about `m / e` probes, so the last few hundred empty
/// slots would cost about half of all probes (the walks total `m ln m`). From
/// `endgame_at` empty slots on, the empty slots are kept in a list instead, and a backend
/// takes the one that comes first in its permutation: the one with the smallest index
/// `(slot - pos) * skip^-1 mod m`, `e` multiplications instead of `m / e` probes.
struct Slots<'a> {
    slots: &'a mut [u32],
    m: u32,
    /// `taken[i]`: slot `i` is taken (walking regime).
    taken: Vec<bool>,
    empty: u32,
    endgame_at: u32,
    /// The empty slots, in no particular order (endgame).
    free: Vec<u32>,
    /// `floor((2^64 - 1) / m)`, for Barrett reduction modulo `m`.
    barrett: u64,
}

impl<'a> Slots<'a> {
    fn new(slots: &'a mut [u32]) -> Self {
        let m = slots.len() as u32;
        Self {
            taken: vec![false; slots.len()],
            slots,
            m,
            empty: m,
            // About where a list scan (a few cycles per empty slot) gets cheaper than the
            // expected walk (`m / e` probes of about one cycle each); tuned by benchmark.
            endgame_at: m.isqrt() * 2 / 3,
            free: Vec::new(),
            barrett: u64::MAX / u64::from(m),
        }
    }

    /// Gives `cursor` its next slot; true when that filled the table.
    #[inline(always)]
    fn take_next(&mut self, cursor: &mut Cursor) -> bool {
        let step = Step::new(cursor.skip, self.m);
        let slot = if self.empty > self.endgame_at {
            let mut pos = cursor.pos;
            while self.taken[pos as usize] {
                pos = step.next(pos);
            }
            self.taken[pos as usize] = true;
            pos
        } else {
            self.take_in_endgame(cursor)
        };
        self.slots[slot as usize] = cursor.id;
        cursor.pos = step.next(slot);
        self.empty -= 1;
        if self.empty == self.endgame_at && self.empty > 0 {
            self.free = (0..self.m).filter(|&i| !self.taken[i as usize]).collect();
        }
        self.empty == 0
    }

    /// Removes and returns the empty slot that comes first in `cursor`'s permutation.
    #[inline(never)]
    fn take_in_endgame(&mut self, cursor: &mut Cursor) -> u32 {
        if cursor.inverse == UNKNOWN {
            cursor.inverse = inverse_mod(cursor.skip, self.m);
        }
        let (m, m64, inverse, pos) = (
            self.m,
            u64::from(self.m),
            u64::from(cursor.inverse),
            cursor.pos,
        );
        let mut best = (u64::MAX, 0);
        for (i, &slot) in self.free.iter().enumerate() {
            // (slot - pos) mod m, without a branch on the order of the two.
            let distance = slot.wrapping_sub(pos);
            let distance = distance.min(distance.wrapping_add(m));
            // Its index in the permutation: distance * skip^-1 mod m (< 2^48, so Barrett's
            // quotient is off by at most one).
            let product = u64::from(distance) * inverse;
            let quotient = ((u128::from(product) * u128::from(self.barrett)) >> 64) as u64;
            let index = product - quotient * m64;
            let index = index.min(index.wrapping_sub(m64));
            if index < best.0 {
                best = (index, i);
            }
        }
        self.free.swap_remove(best.1)
    }
}

/// `a^-1 mod m` for `a` coprime with `m` (extended Euclid); 0 when `m == 1`.
fn inverse_mod(a: u32, m: u32) -> u32 {
    let (mut r0, mut r1) = (i64::from(m), i64::from(a));
    let (mut t0, mut t1) = (0i64, 1i64);
    while r1 != 0 {
        let q = r0 / r1;
        (r0, r1) = (r1, r0 - q * r1);
        (t0, t1) = (t1, t0 - q * t1);
    }
    t0.rem_euclid(i64::from(m)) as u32
}

/// `pos -> (pos + skip) mod m` for `pos < m`, `skip <= m`, without a division: an add, a
/// compare and a conditional move.
#[derive(Clone, Copy)]
struct Step {
    skip: u32,
    /// `skip - m` (mod 2^32): the step when it wraps.
    skip_wrapped: u32,
    /// `pos >= wrap_from` exactly when `pos + skip >= m`.
    wrap_from: u32,
}

impl Step {
    #[inline(always)]
    fn new(skip: u32, m: u32) -> Self {
        Self {
            skip,
            skip_wrapped: skip.wrapping_sub(m),
            wrap_from: m - skip,
        }
    }

    #[inline(always)]
    fn next(self, pos: u32) -> u32 {
        if pos >= self.wrap_from {
            pos.wrapping_add(self.skip_wrapped)
        } else {
            pos + self.skip
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maglev::MAX_TABLE_SIZE;

    #[test]
    fn step_adds_modulo_m() {
        for (m, skip) in [
            (7, 4),
            (7, 6),
            (1, 1),
            (2, 1),
            (MAX_TABLE_SIZE, MAX_TABLE_SIZE - 1),
        ] {
            let step = Step::new(skip, m);
            for pos in (0..m.min(100)).chain(m.saturating_sub(100)..m) {
                let expected = (u64::from(pos) + u64::from(skip)) % u64::from(m);
                assert_eq!(
                    u64::from(step.next(pos)),
                    expected,
                    "m={m} skip={skip} pos={pos}"
                );
            }
        }
    }

    #[test]
    fn inverse_mod_inverts() {
        for (a, m) in [
            (1, 2),
            (3, 7),
            (65_536, 65_537),
            (12_345, MAX_TABLE_SIZE),
            (7, 12),
        ] {
            let inv = inverse_mod(a, m);
            assert!(inv < m);
            assert_eq!(
                u64::from(a) * u64::from(inv) % u64::from(m),
                1,
                "{a} mod {m}"
            );
        }
        assert_eq!(inverse_mod(1, 1), 0);
    }

    #[test]
    fn heavier_class_turns_first_on_equal_times() {
        let turn = |turn, weight, class| ClassTurn {
            turn,
            weight,
            class,
            start: 0,
            end: 0,
        };
        // Both at time 1/4: class 0 first (greater in the max-heap).
        assert_eq!(turn(0, 2, 0).cmp(&turn(1, 6, 1)), Ordering::Greater);
        // Time 1/2 after 1/4.
        assert_eq!(turn(0, 1, 2).cmp(&turn(0, 2, 0)), Ordering::Less);
    }
}
