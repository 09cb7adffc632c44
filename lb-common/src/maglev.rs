//! MaglevTable builder (Maglev, NSDI 2016, §3.4). Placeholder: equal weights only; the
//! table-engine issue replaces the algorithm behind this same API.

use std::net::IpAddr;

use crate::consts::EMPTY_BACKEND;

/// A Backend as the table builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// The id written into the table's slots (never `EMPTY_BACKEND`).
    pub id: u32,
    /// Stable key the permutation is derived from: the backend's address, so every host
    /// builds the same table whatever order the config lists backends in.
    pub key: [u8; 16],
    /// 0 = draining (no slots).
    pub weight: u32,
}

impl MaglevBackend {
    pub fn new(id: u32, addr: IpAddr, weight: u32) -> Self {
        let key = match addr {
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => a.octets(),
        };
        Self { id, key, weight }
    }
}

/// A built table: `size` slots of Backend ids (`EMPTY_BACKEND` everywhere when no backend
/// has weight).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    slots: Vec<u32>,
}

impl MaglevTable {
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }

    pub fn size(&self) -> u32 {
        self.slots.len() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(|&s| s == EMPTY_BACKEND)
    }

    /// The Backend id for a flow hash, as the kernel picks it.
    pub fn lookup(&self, flow_hash: u32) -> u32 {
        self.slots[(flow_hash % self.size()) as usize]
    }
}

fn fnv1a(seed: u64, key: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in key {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Builds the table of `size` slots (`size` must be prime).
pub fn build(backends: &[MaglevBackend], size: u32, seed: u32) -> MaglevTable {
    let m = size as u64;
    let mut live: Vec<&MaglevBackend> = backends.iter().filter(|b| b.weight > 0).collect();
    live.sort_by_key(|b| b.key);
    let mut slots = vec![EMPTY_BACKEND; size as usize];
    if live.is_empty() {
        return MaglevTable { slots };
    }
    let perms: Vec<(u64, u64)> = live
        .iter()
        .map(|b| {
            let offset = fnv1a(seed as u64, &b.key) % m;
            let skip = fnv1a(!(seed as u64), &b.key) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; live.len()];
    let mut filled = 0u64;
    'outer: loop {
        for (i, b) in live.iter().enumerate() {
            let (offset, skip) = perms[i];
            loop {
                let c = ((offset + next[i] * skip) % m) as usize;
                next[i] += 1;
                if slots[c] == EMPTY_BACKEND {
                    slots[c] = b.id;
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                break 'outer;
            }
        }
    }
    MaglevTable { slots }
}
