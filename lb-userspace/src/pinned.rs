//! Read access to the maps a running (or stopped) daemon pinned: for `status` and
//! `trace`, which must show what the kernel really holds.

use std::path::{Path, PathBuf};

use aya::maps::{Array, ArrayOfMaps, HashMap, Map, MapData, PerCpuArray};
use lb_common::{
    conntrack::{self, Way},
    consts::{CONFIG_SLOTS, Counter, map_names as names},
    hash::Flow,
    types::{Backend, ConntrackBucket, GlobalConfig, TrafficCounters, VipKey, VipState},
};

#[derive(Debug, thiserror::Error)]
#[error("{path}: {error} (is the daemon's pin_path right, and has it run?)")]
pub struct PinnedError {
    path: PathBuf,
    error: String,
}

pub struct Pinned {
    dir: PathBuf,
}

impl Pinned {
    pub fn open(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    fn map(&self, name: &str) -> Result<Map, PinnedError> {
        let path = self.dir.join(name);
        let err = |error: String| PinnedError {
            path: path.clone(),
            error,
        };
        let data = MapData::from_pin(&path).map_err(|e| err(e.to_string()))?;
        Map::from_map_data(data).map_err(|e| err(e.to_string()))
    }

    fn fail(&self, name: &str, e: impl std::fmt::Display) -> PinnedError {
        PinnedError {
            path: self.dir.join(name),
            error: e.to_string(),
        }
    }

    /// The live config (the `CONFIG` slot that `CONFIG_INDEX` names).
    pub fn global(&self) -> Result<GlobalConfig, PinnedError> {
        let index: Array<_, u32> = Array::try_from(self.map(names::CONFIG_INDEX)?)
            .map_err(|e| self.fail(names::CONFIG_INDEX, e))?;
        let live = index
            .get(&0, 0)
            .map_err(|e| self.fail(names::CONFIG_INDEX, e))?
            % CONFIG_SLOTS;
        let map: Array<_, GlobalConfig> =
            Array::try_from(self.map(names::CONFIG)?).map_err(|e| self.fail(names::CONFIG, e))?;
        map.get(&live, 0).map_err(|e| self.fail(names::CONFIG, e))
    }

    pub fn vip_id(&self, key: &VipKey) -> Result<Option<u32>, PinnedError> {
        let map: HashMap<_, VipKey, u32> =
            HashMap::try_from(self.map(names::VIPS)?).map_err(|e| self.fail(names::VIPS, e))?;
        Ok(map.get(key, 0).ok())
    }

    pub fn vip_state(&self, id: u32) -> Result<VipState, PinnedError> {
        let map: Array<_, VipState> = Array::try_from(self.map(names::VIP_STATE)?)
            .map_err(|e| self.fail(names::VIP_STATE, e))?;
        map.get(&id, 0).map_err(|e| self.fail(names::VIP_STATE, e))
    }

    pub fn backend(&self, id: u32) -> Result<Backend, PinnedError> {
        let map: Array<_, Backend> = Array::try_from(self.map(names::BACKENDS)?)
            .map_err(|e| self.fail(names::BACKENDS, e))?;
        map.get(&id, 0).map_err(|e| self.fail(names::BACKENDS, e))
    }

    /// The connection-table way of `flow`, if any, found as the kernel finds it (the
    /// table's own seed, its two candidate buckets).
    pub fn conntrack(&self, flow: &Flow) -> Result<Option<Way>, PinnedError> {
        let name = names::CONNTRACK;
        let map: Array<_, ConntrackBucket> =
            Array::try_from(self.map(name)?).map_err(|e| self.fail(name, e))?;
        let buckets = map.len() - 1;
        let seed = map.get(&buckets, 0).map_err(|e| self.fail(name, e))?.ways[0];
        let place = conntrack::place(flow.conntrack_hash(seed), buckets - 1);
        for index in [place.first, place.second] {
            let mut bucket = map.get(&index, 0).map_err(|e| self.fail(name, e))?;
            // SAFETY: a bucket we own.
            if let Some((_, word)) = unsafe { conntrack::find(&mut bucket, place.tag) } {
                return Ok(Some(Way::unpack(word)));
            }
        }
        Ok(None)
    }

    /// The installed MaglevTable of Vip `id`: its size, the flow's slot and its Backend id.
    pub fn table_slot(
        &self,
        id: u32,
        flow_hash: u32,
    ) -> Result<Option<(u32, u32, u32)>, PinnedError> {
        self.slot_in(names::TABLES, id, flow_hash)
    }

    /// The same in Vip `id`'s previous table (second chance), if it has one.
    pub fn prev_table_slot(
        &self,
        id: u32,
        flow_hash: u32,
    ) -> Result<Option<(u32, u32, u32)>, PinnedError> {
        self.slot_in(names::PREV_TABLES, id, flow_hash)
    }

    /// Packets sent with a previous Backend attached, for Vip (`vips`) or previous
    /// Backend `id`, summed over CPUs.
    pub fn chained(&self, vips: bool, id: u32) -> Result<u64, PinnedError> {
        let name = if vips {
            names::VIP_CHAINED
        } else {
            names::BACKEND_CHAINED
        };
        let map: PerCpuArray<_, TrafficCounters> =
            PerCpuArray::try_from(self.map(name)?).map_err(|e| self.fail(name, e))?;
        let v = map.get(&id, 0).map_err(|e| self.fail(name, e))?;
        Ok(v.iter().map(|c| c.packets).sum())
    }

    fn slot_in(
        &self,
        name: &'static str,
        id: u32,
        flow_hash: u32,
    ) -> Result<Option<(u32, u32, u32)>, PinnedError> {
        let outer: ArrayOfMaps<_, MapData> =
            ArrayOfMaps::try_from(self.map(name)?).map_err(|e| self.fail(name, e))?;
        let Ok(inner) = outer.get(&id, 0) else {
            return Ok(None);
        };
        let inner: Array<_, [u32; 2]> =
            Array::try_from(Map::from_map_data(inner).map_err(|e| self.fail(name, e))?)
                .map_err(|e| self.fail(name, e))?;
        let size = inner.get(&0, 0).map_err(|e| self.fail(name, e))?[0];
        if size == 0 {
            return Ok(Some((0, 0, 0)));
        }
        let slot = 1 + lb_common::hash::table_slot(flow_hash, size);
        let entry = inner.get(&(slot / 2), 0).map_err(|e| self.fail(name, e))?;
        Ok(Some((size, slot - 1, entry[(slot & 1) as usize])))
    }

    /// `lb_decap`'s counters (on a backend) summed over CPUs, by `DecapCounter`.
    pub fn decap_counters(&self) -> Result<Vec<u64>, PinnedError> {
        let name = names::DECAP_STATS;
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.map(name)?).map_err(|e| self.fail(name, e))?;
        (0..lb_common::consts::DecapCounter::COUNT)
            .map(|i| {
                let v = map.get(&i, 0).map_err(|e| self.fail(name, e))?;
                Ok(v.iter().sum())
            })
            .collect()
    }

    /// Global counters summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, PinnedError> {
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(self.map(names::STATS)?)
            .map_err(|e| self.fail(names::STATS, e))?;
        Counter::ALL
            .iter()
            .map(|&c| {
                let v = map
                    .get(&(c as u32), 0)
                    .map_err(|e| self.fail(names::STATS, e))?;
                Ok((c, v.iter().sum()))
            })
            .collect()
    }

    /// Per-Vip or per-Backend traffic summed over CPUs.
    pub fn traffic(&self, vips: bool, id: u32) -> Result<TrafficCounters, PinnedError> {
        let name = if vips {
            names::VIP_STATS
        } else {
            names::BACKEND_STATS
        };
        let map: PerCpuArray<_, TrafficCounters> =
            PerCpuArray::try_from(self.map(name)?).map_err(|e| self.fail(name, e))?;
        let v = map.get(&id, 0).map_err(|e| self.fail(name, e))?;
        Ok(v.iter()
            .fold(TrafficCounters::default(), |a, c| TrafficCounters {
                packets: a.packets + c.packets,
                bytes: a.bytes + c.bytes,
            }))
    }
}
