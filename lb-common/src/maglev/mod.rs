//! The MaglevTable builder: Maglev (NSDI 2016, §3.4) with exact integer weights.
//!
//! # Algorithm
//! Each live backend (weight > 0) has a permutation of the `M` slots,
//! `slot_j = (offset + j * skip) mod M`, where `offset` and `skip` come from two fixed
//! 64-bit hashes of its stable key and the seed (see [`MaglevBackend::permutation`]).
//! Backends take turns; on its turn a backend walks its permutation to the first empty
//! slot and takes it. The table is done when every slot is taken, so there are never holes
//! while at least one backend is live.
//!
//! # Weights
//! Turns are scheduled by weight, not by repeating a backend `w` times per round: the
//! backend's `k`-th turn (from 0) happens at virtual time `(2k + 1) / (2w)`, and turns run
//! in order of time (an earliest-deadline-first merge; Sainte-Laguë's divisors). Every turn
//! takes exactly one slot, so over the `M` turns a backend takes its weight share of `M`,
//! rounded: within 1.5 slots of `T * w` for the common stopping time `T`. The property
//! tests check every share against `M * w / W` within 1% plus 2 slots when `M >= 100 * N`.
//! Equal
//! weights reduce exactly to the paper's round robin, so each backend gets `⌊M/N⌋` or
//! `⌈M/N⌉` slots. A backend's turn times depend on its own weight only, so adding or
//! removing one backend never reorders the others' turns: disruption stays minimal.
//! Weight 0 (draining) means no turns and no slots.
//!
//! Backends of equal weight form a class whose members share every turn time; ties are
//! broken by class (heavier first), then by key. The scheduler is a heap over the
//! classes, so the cost is one heap operation per class turn, `O(M log D)` at worst for
//! `D` distinct weights and nothing measurable when all weights are equal.
//!
//! # Determinism
//! Live backends are sorted by `(weight descending, key, id)`, so the table depends only on
//! the set of backends, their weights, `M` and the seed, never on input order. Keys must be
//! unique (two backends with one key get one permutation; that is the caller's error, see
//! [`try_build`], but the result is still deterministic). The key hash is fixed
//! (`permutation.rs`), and table digests in the property tests pin it.
//!
//! # Cost
//! Memory `O(N + M)`: per backend `(position, skip, id)`, one byte per slot marking it
//! taken, a list of the last `~0.67 √M` empty slots and the slots themselves; never an
//! `N × M` permutation matrix. Time: about `M ln M` probes (an add, a conditional move and
//! a byte compare each, no `%`), of which the endgame list in `fill.rs` replaces the most
//! expensive ones. About 0.9 ms for `N = 1000`, `M = 65537` and 11 ms for `M = 655373` on
//! one core (`benches/maglev.rs`).

mod diff;
mod fill;
mod permutation;
mod primes;

use std::fmt;
use std::net::IpAddr;

pub use diff::{BackendDiff, TableDiff, diff};
pub use primes::{
    AUTO_SLOTS_PER_BACKEND, AUTO_TABLE_SIZES, MAX_TABLE_SIZE, MIN_TABLE_SIZE, TableSizeError,
    auto_table_size, check_table_size, is_prime,
};

use crate::consts::EMPTY_BACKEND;

/// A Backend as the table builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaglevBackend {
    /// The id written into the table's slots (never `EMPTY_BACKEND`).
    pub id: u32,
    /// Stable key the permutation is derived from: the backend's address, so every host
    /// builds the same table whatever order the config lists backends in.
    pub key: [u8; 16],
    /// Relative share of slots; 0 = draining (no slots).
    pub weight: u32,
}

impl MaglevBackend {
    /// A backend keyed by its address (IPv4 as its v4-mapped IPv6 form).
    pub fn new(id: u32, addr: IpAddr, weight: u32) -> Self {
        let key = match addr {
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => a.octets(),
        };
        Self { id, key, weight }
    }

    /// `(offset, skip)` of this backend's permutation in a table of `size` slots with
    /// `seed`: it tries slots `offset, offset + skip, offset + 2 * skip, ...` (mod `size`).
    pub fn permutation(&self, size: u32, seed: u32) -> (u32, u32) {
        permutation::offset_skip(&self.key, seed, size.max(1), is_prime(size))
    }
}

/// A built table: `size` slots of Backend ids (`EMPTY_BACKEND` everywhere when no backend
/// has weight).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    slots: Vec<u32>,
}

impl MaglevTable {
    /// A table as the data plane holds it (read back from its map).
    pub fn from_slots(slots: Vec<u32>) -> Self {
        Self { slots }
    }

    /// The slots, as written to the data plane.
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }

    /// `M`, the number of slots.
    pub fn size(&self) -> u32 {
        self.slots.len() as u32
    }

    /// True when every slot is `EMPTY_BACKEND` (no live backend): the data plane treats
    /// the Vip as having no backend.
    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(|&s| s == EMPTY_BACKEND)
    }

    /// The Backend id for a flow hash, as the kernel picks it:
    /// `slots[table_slot(flow_hash, size)]`.
    pub fn lookup(&self, flow_hash: u32) -> u32 {
        self.slots[crate::hash::table_slot(flow_hash, self.size()) as usize]
    }

    /// `(backend id, slots held)` for every id in the table, by ascending id
    /// (`EMPTY_BACKEND` excluded).
    pub fn slot_counts(&self) -> Vec<(u32, u32)> {
        let mut counts = diff::IdMap::default();
        for &id in &self.slots {
            if id != EMPTY_BACKEND {
                *counts.entry(id).or_insert(0u32) += 1;
            }
        }
        let mut counts: Vec<(u32, u32)> = counts.into_iter().collect();
        counts.sort_unstable();
        counts
    }
}

/// Builds the table of `size` slots.
///
/// `size` should pass [`check_table_size`] (prime, 251..=16777213, at least one slot per
/// backend); see [`auto_table_size`]. Any `size` from 1 to [`MAX_TABLE_SIZE`] still builds
/// a complete table (a non-prime size cannot make the fill loop forever), but non-prime
/// sizes balance poorly. Backends with weight 0, or with the reserved id `EMPTY_BACKEND` (which
/// no slot could tell apart from "no backend"), get no slots. [`try_build`] checks all of
/// this and refuses what is wrong.
///
/// # Panics
/// If `size` is 0 or above [`MAX_TABLE_SIZE`].
pub fn build(backends: &[MaglevBackend], size: u32, seed: u32) -> MaglevTable {
    assert!(
        (1..=MAX_TABLE_SIZE).contains(&size),
        "Maglev table size {size} is outside 1..={MAX_TABLE_SIZE}; validate it with check_table_size"
    );
    let mut slots = vec![EMPTY_BACKEND; size as usize];
    let mut live: Vec<&MaglevBackend> = backends
        .iter()
        .filter(|b| b.weight > 0 && b.id != EMPTY_BACKEND)
        .collect();
    if live.is_empty() {
        return MaglevTable { slots };
    }
    live.sort_unstable_by(|a, b| {
        b.weight
            .cmp(&a.weight)
            .then_with(|| a.key.cmp(&b.key))
            .then_with(|| a.id.cmp(&b.id))
    });
    fill::fill(&live, &mut slots, seed);
    MaglevTable { slots }
}

/// Why [`try_build`] refuses a pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BuildError {
    /// The table size is not valid for this pool.
    TableSize(TableSizeError),
    /// A backend uses the id reserved for empty slots.
    ReservedId { key: [u8; 16] },
    /// Two backends share a key, so they would share a permutation.
    DuplicateKey { key: [u8; 16], ids: (u32, u32) },
    /// Two backends share an id, so their slots could not be told apart.
    DuplicateId { id: u32 },
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TableSize(e) => e.fmt(f),
            Self::ReservedId { key } => write!(
                f,
                "backend {} uses id {EMPTY_BACKEND}, which is reserved for empty slots",
                key_to_addr(key)
            ),
            Self::DuplicateKey { key, ids } => write!(
                f,
                "backends {} and {} have the same address {}",
                ids.0,
                ids.1,
                key_to_addr(key)
            ),
            Self::DuplicateId { id } => write!(f, "two backends have the same id {id}"),
        }
    }
}

impl std::error::Error for BuildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::TableSize(e) => Some(e),
            _ => None,
        }
    }
}

impl From<TableSizeError> for BuildError {
    fn from(e: TableSizeError) -> Self {
        Self::TableSize(e)
    }
}

/// The address a key was made from (v4-mapped keys shown as IPv4).
fn key_to_addr(key: &[u8; 16]) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(*key);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// [`build`], after checking the pool: the size with [`check_table_size`] (counting every
/// backend, draining ones included), no reserved id, no duplicate key or id.
pub fn try_build(
    backends: &[MaglevBackend],
    size: u32,
    seed: u32,
) -> Result<MaglevTable, BuildError> {
    check_table_size(size, backends.len())?;
    if let Some(b) = backends.iter().find(|b| b.id == EMPTY_BACKEND) {
        return Err(BuildError::ReservedId { key: b.key });
    }
    let mut by_key: Vec<&MaglevBackend> = backends.iter().collect();
    by_key.sort_unstable_by_key(|b| (b.key, b.id));
    if let Some(w) = by_key.windows(2).find(|w| w[0].key == w[1].key) {
        return Err(BuildError::DuplicateKey {
            key: w[0].key,
            ids: (w[0].id, w[1].id),
        });
    }
    let mut ids: Vec<u32> = backends.iter().map(|b| b.id).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(BuildError::DuplicateId { id: w[0] });
    }
    Ok(build(backends, size, seed))
}
