//! What a table change does to flows: for a dry run ("this config change would move X% of
//! flows") and for logs when a new table is swapped in.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use super::MaglevTable;
use crate::consts::EMPTY_BACKEND;

/// How one backend's slots change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendDiff {
    pub id: u32,
    /// Slots it holds in the old table.
    pub old_slots: u32,
    /// Slots it holds in the new table.
    pub new_slots: u32,
    /// Slots it holds in the old table and not in the new one (its flows there move away).
    pub lost: u32,
    /// Slots it holds in the new table and not in the old one (flows move to it).
    pub gained: u32,
}

/// The difference between two tables of one Vip. Only flows the table steers are
/// concerned: flows in the connection table stay on their backend while it is up.
#[derive(Clone, Debug, PartialEq)]
pub struct TableDiff {
    pub old_size: u32,
    pub new_size: u32,
    /// Slots whose backend changes. When the sizes differ slots do not correspond, and
    /// this is `new_size`: every slot counts as changed.
    pub changed_slots: u32,
    /// Fraction of table-steered flows that would go to another backend: `changed_slots /
    /// M`; 1.0 when the sizes differ (`hash % M` changes for every flow, so every flow may
    /// move; which ones actually land on the same backend again is chance).
    pub moved_fraction: f64,
    /// Every backend id present in either table, ascending (`EMPTY_BACKEND` excluded;
    /// slots to or from it still count in `changed_slots`). When the sizes differ, `lost`
    /// is `old_slots` and `gained` is `new_slots`.
    pub backends: Vec<BackendDiff>,
}

impl TableDiff {
    /// True when the table size changes, so that every flow may move.
    pub fn size_changed(&self) -> bool {
        self.old_size != self.new_size
    }

    /// The change for one backend id, if it is in either table.
    pub fn backend(&self, id: u32) -> Option<&BackendDiff> {
        self.backends
            .binary_search_by_key(&id, |b| b.id)
            .ok()
            .map(|i| &self.backends[i])
    }

    /// Backends that had slots and have none now.
    pub fn removed(&self) -> impl Iterator<Item = &BackendDiff> {
        self.backends
            .iter()
            .filter(|b| b.old_slots > 0 && b.new_slots == 0)
    }

    /// Backends that had no slot and have some now.
    pub fn added(&self) -> impl Iterator<Item = &BackendDiff> {
        self.backends
            .iter()
            .filter(|b| b.old_slots == 0 && b.new_slots > 0)
    }
}

impl fmt::Display for TableDiff {
    /// One line, e.g. `448/65537 slots change, 0.68% of flows move: 1 backend loses all its
    /// slots, 0 gain their first, 430 others gain or lose some`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.size_changed() {
            return write!(
                f,
                "table size changes from {} to {}: every flow may move (100%)",
                self.old_size, self.new_size
            );
        }
        let removed = self.removed().count();
        let added = self.added().count();
        let others = self
            .backends
            .iter()
            .filter(|b| b.old_slots > 0 && b.new_slots > 0 && (b.lost > 0 || b.gained > 0))
            .count();
        write!(
            f,
            "{}/{} slots change, {:.2}% of flows move: {removed} {}, {added} {}, {others} {} some",
            self.changed_slots,
            self.new_size,
            self.moved_fraction * 100.0,
            if removed == 1 {
                "backend loses all its slots"
            } else {
                "backends lose all their slots"
            },
            if added == 1 {
                "gains its first"
            } else {
                "gain their first"
            },
            if others == 1 {
                "other gains or loses"
            } else {
                "others gain or lose"
            },
        )
    }
}

/// Compares two tables of one Vip; see [`TableDiff`].
pub fn diff(old: &MaglevTable, new: &MaglevTable) -> TableDiff {
    let (old_size, new_size) = (old.size(), new.size());
    let mut index = IdMap::default();
    let mut backends: Vec<BackendDiff> = Vec::new();
    let mut slot_of = |id: u32, backends: &mut Vec<BackendDiff>| -> usize {
        *index.entry(id).or_insert_with(|| {
            backends.push(BackendDiff {
                id,
                ..BackendDiff::default()
            });
            backends.len() - 1
        })
    };
    let changed_slots = if old_size == new_size {
        let mut changed = 0u32;
        for (&a, &b) in old.slots().iter().zip(new.slots()) {
            if a != EMPTY_BACKEND {
                let i = slot_of(a, &mut backends);
                backends[i].old_slots += 1;
                backends[i].lost += u32::from(a != b);
            }
            if b != EMPTY_BACKEND {
                let i = slot_of(b, &mut backends);
                backends[i].new_slots += 1;
                backends[i].gained += u32::from(a != b);
            }
            changed += u32::from(a != b);
        }
        changed
    } else {
        for &a in old.slots().iter().filter(|&&a| a != EMPTY_BACKEND) {
            let i = slot_of(a, &mut backends);
            backends[i].old_slots += 1;
            backends[i].lost += 1;
        }
        for &b in new.slots().iter().filter(|&&b| b != EMPTY_BACKEND) {
            let i = slot_of(b, &mut backends);
            backends[i].new_slots += 1;
            backends[i].gained += 1;
        }
        new_size
    };
    backends.sort_unstable_by_key(|b| b.id);
    let moved_fraction = if old_size != new_size {
        1.0
    } else if new_size == 0 {
        0.0
    } else {
        f64::from(changed_slots) / f64::from(new_size)
    };
    TableDiff {
        old_size,
        new_size,
        changed_slots,
        moved_fraction,
        backends,
    }
}

/// A map keyed by backend id with a one-multiply hash: counting slots by id is called once
/// per slot, where SipHash would dominate.
pub(super) type IdMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;

#[derive(Default)]
pub(super) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        // Fibonacci hashing; the fold puts high-quality bits at both ends.
        let h = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_counts_backends_that_only_lose_or_only_gain_as_others() {
        let b = |id, old_slots, new_slots, lost, gained| BackendDiff {
            id,
            old_slots,
            new_slots,
            lost,
            gained,
        };
        let diff = TableDiff {
            old_size: 7,
            new_size: 7,
            changed_slots: 4,
            moved_fraction: 4.0 / 7.0,
            backends: vec![
                b(1, 3, 1, 2, 0), // loses some
                b(2, 2, 3, 1, 2), // gains and loses
                b(3, 2, 0, 2, 0), // loses all
                b(4, 0, 2, 0, 2), // gains its first
                b(5, 0, 1, 0, 1), // gains its first
            ],
        };
        assert_eq!(
            diff.to_string(),
            "4/7 slots change, 57.14% of flows move: 1 backend loses all its slots, 2 gain \
             their first, 2 others gain or lose some"
        );
        // One that only gains.
        let diff = TableDiff {
            backends: vec![b(1, 1, 3, 0, 2), b(2, 3, 3, 0, 0)],
            changed_slots: 2,
            moved_fraction: 2.0 / 7.0,
            ..diff
        };
        assert_eq!(
            diff.to_string(),
            "2/7 slots change, 28.57% of flows move: 0 backends lose all their slots, 0 gain \
             their first, 1 other gains or loses some"
        );
    }
}
