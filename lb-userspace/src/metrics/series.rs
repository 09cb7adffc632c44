//! The per-Vip and per-Backend series, kept in flat tables rebuilt after each reconcile
//! and written straight to the text format at scrape time (thousands of Backends cost a
//! few appends each, no registry lookups).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use lb_common::types::TrafficCounters;

use super::{
    dataplane::Maps,
    text::{Family, labels},
};
use crate::{
    config::Config,
    reconcile::{DataplaneOps, Reconciler, Report, backend_key},
};

/// Health-check latency bucket bounds, seconds, as written in `le` labels.
const CHECK_BOUNDS: [&str; 13] = [
    "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1",
    "2.5", "5",
];
/// The same, in nanoseconds.
const CHECK_BOUNDS_NS: [u64; 13] = [
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
];

/// A latency histogram fed from any thread.
#[derive(Default)]
pub(super) struct CheckHistogram {
    /// Per bucket, not cumulative; the last one is above every bound.
    counts: [AtomicU64; CHECK_BOUNDS.len() + 1],
    sum_ns: AtomicU64,
}

impl CheckHistogram {
    pub(super) fn observe(&self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        let bucket = CHECK_BOUNDS_NS
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(CHECK_BOUNDS_NS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    fn snapshot(&self) -> ([u64; CHECK_BOUNDS.len() + 1], f64) {
        let counts = std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed));
        (counts, self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9)
    }
}

/// Traffic counters of one map slot, and what to subtract from them.
#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    id: u32,
    /// Assignment generation of `id`: a new one means the slot now counts something else.
    generation: u32,
    /// What the slot held when `id` was assigned to this series (the kernel does not clear
    /// a slot when its id is reused).
    baseline: TrafficCounters,
}

/// A Backend of a pool.
pub(super) struct BackendSeries {
    pool: String,
    name: String,
    /// `pool="..",backend=".."`.
    labels: String,
    slot: Slot,
    up: bool,
    to_up: u64,
    to_down: u64,
    pub(super) checks: CheckHistogram,
    pub(super) failures: Mutex<BTreeMap<String, u64>>,
}

/// A Vip and its MaglevTable.
pub(super) struct VipSeries {
    name: String,
    endpoint: String,
    /// `vip=".."`.
    labels: String,
    slot: Slot,
    table_size: u32,
    table_generation: u64,
    rebuilds: u64,
    /// Per Backend of the Vip's pool: `vip="..",backend=".."` and its slots.
    slots: Vec<(String, u32)>,
    /// Slot counts by Backend id of table generation `.0` of size `.1` (counting is O(M)).
    slot_counts: (u64, u32, Vec<(u32, u32)>),
}

/// Every Vip and Backend of the applied config.
#[derive(Default)]
pub(super) struct Inventory {
    vips: Vec<VipSeries>,
    backends: Vec<BackendSeries>,
    by_name: HashMap<(String, String), usize>,
    by_address: HashMap<(String, IpAddr), usize>,
    /// Built from a reconcile at least once (before, slots are taken as they are: a
    /// restarted daemon continues its predecessor's counters).
    updated: bool,
}

impl Inventory {
    pub(super) fn backend(&self, pool: &str, name: &str) -> Option<&BackendSeries> {
        self.by_name
            .get(&(pool.to_owned(), name.to_owned()))
            .map(|&i| &self.backends[i])
    }

    pub(super) fn backend_at(&self, pool: &str, address: IpAddr) -> Option<&BackendSeries> {
        self.by_address
            .get(&(pool.to_owned(), address))
            .map(|&i| &self.backends[i])
    }

    /// The inventory after a reconcile: series of removed Vips and Backends go, new ones
    /// start, up/down changes count as transitions, `report`'s table swaps as rebuilds.
    pub(super) fn rebuild<D: DataplaneOps>(
        self,
        reconciler: &Reconciler<D>,
        config: &Config,
        report: &Report,
        maps: Option<&Maps>,
    ) -> Inventory {
        let assignments = reconciler.assignments();
        let first = !self.updated;
        let slot = |vip: bool, old: Option<Slot>, id: u32, generation: u32| {
            let baseline = match old {
                Some(old) if old.id == id && old.generation == generation => old.baseline,
                // The first config of this process: the slots count this config's traffic
                // (a restarted daemon keeps its ids).
                _ if first => TrafficCounters::default(),
                // Assigned now: the slot may hold a former owner's counts.
                _ => maps
                    .and_then(|m| m.traffic(vip, id).ok())
                    .unwrap_or_default(),
            };
            Slot {
                id,
                generation,
                baseline,
            }
        };

        let mut old_backends: HashMap<(String, String), BackendSeries> = self
            .backends
            .into_iter()
            .map(|b| ((b.pool.clone(), b.name.clone()), b))
            .collect();
        let mut inventory = Inventory {
            updated: true,
            ..Inventory::default()
        };
        for (pool, p) in &config.pools {
            for b in &p.backends {
                let Some(a) = assignments.backends.get(&backend_key(pool, b.address)) else {
                    continue;
                };
                let up = reconciler.is_up(pool, b.address);
                let key = (pool.clone(), b.name.clone());
                let series = match old_backends.remove(&key) {
                    Some(mut old) => {
                        old.to_up += u64::from(up && !old.up);
                        old.to_down += u64::from(!up && old.up);
                        old.up = up;
                        old.slot = slot(false, Some(old.slot), a.id, a.generation);
                        old
                    }
                    None => BackendSeries {
                        labels: labels(&[("pool", pool), ("backend", &b.name)]),
                        pool: pool.clone(),
                        name: b.name.clone(),
                        slot: slot(false, None, a.id, a.generation),
                        up,
                        to_up: 0,
                        to_down: 0,
                        checks: CheckHistogram::default(),
                        failures: Mutex::new(BTreeMap::new()),
                    },
                };
                let index = inventory.backends.len();
                inventory.by_name.insert(key, index);
                inventory
                    .by_address
                    .insert((pool.clone(), b.address), index);
                inventory.backends.push(series);
            }
        }

        let mut old_vips: HashMap<String, VipSeries> =
            self.vips.into_iter().map(|v| (v.name.clone(), v)).collect();
        let tables = reconciler.tables();
        for vip in &config.vips {
            let endpoint = vip.endpoint();
            let Some(a) = assignments.vips.get(&endpoint) else {
                continue;
            };
            let mut series = match old_vips.remove(&vip.name) {
                Some(mut old) => {
                    old.slot = slot(true, Some(old.slot), a.id, a.generation);
                    if old.endpoint != endpoint {
                        old.endpoint = endpoint.clone();
                        old.slot_counts = (0, 0, Vec::new());
                    }
                    old
                }
                None => VipSeries {
                    labels: labels(&[("vip", &vip.name)]),
                    name: vip.name.clone(),
                    endpoint: endpoint.clone(),
                    slot: slot(true, None, a.id, a.generation),
                    table_size: 0,
                    table_generation: 0,
                    rebuilds: 0,
                    slots: Vec::new(),
                    slot_counts: (0, 0, Vec::new()),
                },
            };
            series.rebuilds += report.tables.iter().filter(|(e, _)| *e == endpoint).count() as u64;
            if let Some(installed) = tables.get(&endpoint) {
                let size = installed.table.size();
                series.table_size = size;
                series.table_generation = installed.generation;
                if (series.slot_counts.0, series.slot_counts.1) != (installed.generation, size) {
                    let mut counts = installed.table.slot_counts();
                    counts.sort_unstable();
                    series.slot_counts = (installed.generation, size, counts);
                }
                let counts = &series.slot_counts.2;
                series.slots = config
                    .pools
                    .get(&vip.pool)
                    .map_or(&[][..], |p| &p.backends[..])
                    .iter()
                    .map(|b| {
                        let id = assignments
                            .backends
                            .get(&backend_key(&vip.pool, b.address))
                            .map(|a| a.id);
                        let n = id
                            .and_then(|id| counts.binary_search_by_key(&id, |(i, _)| *i).ok())
                            .map_or(0, |i| counts[i].1);
                        (labels(&[("vip", &vip.name), ("backend", &b.name)]), n)
                    })
                    .collect();
            }
            inventory.vips.push(series);
        }
        inventory
    }

    /// Writes every per-Vip and per-Backend family. Traffic comes from `maps` (absent: the
    /// traffic families are left out); returns the first map read error.
    pub(super) fn render(&self, out: &mut String, maps: Option<&Maps>) -> Result<(), String> {
        let mut error = Ok(());
        if let Some(maps) = maps {
            error = error.and(self.render_traffic(out, maps));
        }
        let backends = &self.backends;
        let mut f = Family::new(
            out,
            "mlb_backend_up",
            "gauge",
            "Whether the Backend is up in its pool (1) or down (0) by its health checks.",
        );
        for b in backends {
            f.int(&b.labels, u64::from(b.up));
        }
        let mut f = Family::new(
            out,
            "mlb_backend_transitions_total",
            "counter",
            "Health transitions of a Backend in its pool, by the state it went to.",
        );
        for b in backends {
            f.int(&format!("{},to=\"up\"", b.labels), b.to_up);
            f.int(&format!("{},to=\"down\"", b.labels), b.to_down);
        }
        let mut f = Family::new(
            out,
            "mlb_health_check_duration_seconds",
            "histogram",
            "Health-check latency per Backend and pool (a timed-out check counts its timeout).",
        );
        for b in backends {
            let (counts, sum) = b.checks.snapshot();
            if counts.iter().any(|&c| c > 0) {
                f.histogram(&b.labels, &CHECK_BOUNDS, &counts, sum);
            }
        }
        let mut f = Family::new(
            out,
            "mlb_health_check_failures_total",
            "counter",
            "Failed health checks per Backend and pool, by reason.",
        );
        for b in backends {
            let failures = b.failures.lock().unwrap_or_else(PoisonError::into_inner);
            for (reason, count) in failures.iter() {
                f.int(
                    &format!("{},{}", b.labels, labels(&[("reason", reason)])),
                    *count,
                );
            }
        }

        let vips = &self.vips;
        let mut f = Family::new(
            out,
            "mlb_table_size",
            "gauge",
            "Slots of the Vip's MaglevTable (M).",
        );
        for v in vips {
            f.int(&v.labels, u64::from(v.table_size));
        }
        let mut f = Family::new(
            out,
            "mlb_table_generation",
            "gauge",
            "Table swaps of the Vip since the daemon started (1 = the first install).",
        );
        for v in vips {
            f.int(&v.labels, v.table_generation);
        }
        let mut f = Family::new(
            out,
            "mlb_table_rebuilds_total",
            "counter",
            "MaglevTables built and swapped into the data plane for the Vip (the first install counts).",
        );
        for v in vips {
            f.int(&v.labels, v.rebuilds);
        }
        let mut f = Family::new(
            out,
            "mlb_table_slots",
            "gauge",
            "Slots of the Vip's MaglevTable held by each Backend of its pool (0: down, drained or weight 0).",
        );
        for v in vips {
            for (set, n) in &v.slots {
                f.int(set, u64::from(*n));
            }
        }
        error
    }

    fn render_traffic(&self, out: &mut String, maps: &Maps) -> Result<(), String> {
        // Ids are handed out lowest-free, so the slots in use are dense from the start.
        let read = |vip: bool,
                    slots: &mut dyn Iterator<Item = &Slot>|
         -> Result<Vec<TrafficCounters>, String> {
            let slots: Vec<&Slot> = slots.collect();
            let last = slots.iter().map(|s| s.id).max().unwrap_or(0);
            let now = maps
                .traffic_upto(vip, last)
                .map_err(|e| format!("traffic map: {e}"))?;
            Ok(slots
                .iter()
                .map(|s| {
                    let now = now.get(s.id as usize).copied().unwrap_or_default();
                    TrafficCounters {
                        packets: now.packets.saturating_sub(s.baseline.packets),
                        bytes: now.bytes.saturating_sub(s.baseline.bytes),
                    }
                })
                .collect())
        };
        let vip_traffic = read(true, &mut self.vips.iter().map(|v| &v.slot))?;
        let backend_traffic = read(false, &mut self.backends.iter().map(|b| &b.slot))?;
        // Second chance, by the same ids (no baseline: an id given to something new starts
        // from what its slot held; chaining is rare and short-lived).
        let chained = |vip: bool, ids: Vec<u32>| -> Result<Vec<u64>, String> {
            let last = ids.iter().copied().max().unwrap_or(0);
            let now = maps
                .chained_upto(vip, last)
                .map_err(|e| format!("second-chance map: {e}"))?;
            Ok(ids
                .iter()
                .map(|id| now.get(*id as usize).map_or(0, |t| t.packets))
                .collect())
        };
        let vip_chained = chained(true, self.vips.iter().map(|v| v.slot.id).collect())?;
        let backend_chained = chained(false, self.backends.iter().map(|b| b.slot.id).collect())?;
        let vips: Vec<_> = self
            .vips
            .iter()
            .map(|v| &v.labels)
            .zip(vip_traffic)
            .collect();
        let backends: Vec<_> = self
            .backends
            .iter()
            .map(|b| &b.labels)
            .zip(backend_traffic)
            .collect();
        for (series, name, help) in [
            (
                &vips,
                "mlb_vip_packets_total",
                "Packets forwarded for a Vip (client to Vip).",
            ),
            (
                &backends,
                "mlb_backend_packets_total",
                "Packets forwarded to a Backend of a pool.",
            ),
        ] {
            let mut f = Family::new(out, name, "counter", help);
            for (set, t) in series {
                f.int(set, t.packets);
            }
        }
        for (labels, values, name, help) in [
            (
                self.vips.iter().map(|v| &v.labels).collect::<Vec<_>>(),
                vip_chained,
                "mlb_vip_second_chance_packets_total",
                "TCP packets of a Vip sent to their backend with the previous table's backend attached (second chance).",
            ),
            (
                self.backends.iter().map(|b| &b.labels).collect(),
                backend_chained,
                "mlb_backend_second_chance_packets_total",
                "TCP packets sent with this Backend attached as the previous one (second chance keeps its connections).",
            ),
        ] {
            let mut f = Family::new(out, name, "counter", help);
            for (set, n) in labels.into_iter().zip(values) {
                f.int(set, n);
            }
        }
        for (series, name, help) in [
            (
                &vips,
                "mlb_vip_bytes_total",
                "Bytes forwarded for a Vip (Ethernet frames as received).",
            ),
            (
                &backends,
                "mlb_backend_bytes_total",
                "Bytes forwarded to a Backend of a pool (Ethernet frames as received, before encapsulation).",
            ),
        ] {
            let mut f = Family::new(out, name, "counter", help);
            for (set, t) in series {
                f.int(set, t.bytes);
            }
        }
        Ok(())
    }
}

impl BackendSeries {
    pub(super) fn observe(&self, latency: Duration, result: Result<(), &str>) {
        self.checks.observe(latency);
        if let Err(reason) = result {
            let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
            match failures.get_mut(reason) {
                Some(n) => *n += 1,
                None => {
                    failures.insert(reason.to_owned(), 1);
                }
            }
        }
    }
}
