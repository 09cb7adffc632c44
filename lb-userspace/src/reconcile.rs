//! Desired state (config + health) to data-plane state.
//!
//! The reconciler keeps ids stable: a Vip keeps its id while its `(address, port,
//! protocol)` stays in the config, a Backend keeps its id while its `(pool, address)`
//! does, across reloads and daemon restarts (the assignments are persisted). Every new
//! assignment gets a fresh generation, so connection-table entries of anything removed are
//! never trusted again. Order of writes: Backends before the tables that name them, tables
//! before the Vips that use them, and removals last.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use lb_common::{
    consts::{FAMILY_V4, FAMILY_V6, backend_flags, icmp_rate_slots},
    hash::addr_words,
    maglev::{self, MaglevBackend, MaglevTable},
    types::{Backend, GlobalConfig, TunnelConfig, VipAddr, VipKey, VipState, vip_addr_flags},
};
use serde::{Deserialize, Serialize};

use crate::{
    config::{CheckKind, Config, Protocol, VipConfig},
    dataplane::{Dataplane, DataplaneError},
    second_chance::{self, PreviousTable, Retired, SavedMember, SavedTable},
};

/// The writes the reconciler makes; the real [`Dataplane`] or a recorder for dry runs.
pub trait DataplaneOps {
    fn set_global(&mut self, config: &GlobalConfig) -> Result<(), DataplaneError>;
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), DataplaneError>;
    fn set_vip_filter(&mut self, addrs: &[IpAddr]) -> Result<(), DataplaneError>;
    fn set_vip_addr(&mut self, addr: IpAddr, value: Option<VipAddr>) -> Result<(), DataplaneError>;
    fn set_vip(&mut self, id: u32, key: &VipKey, state: &VipState) -> Result<(), DataplaneError>;
    fn remove_vip(&mut self, id: u32, key: &VipKey) -> Result<(), DataplaneError>;
    fn install_table(&mut self, id: u32, table: &MaglevTable) -> Result<(), DataplaneError>;
    /// Several Vips' previous tables (second chance), in one batch like `install_tables`.
    fn install_prev_tables(
        &mut self,
        _tables: &[(u32, &MaglevTable)],
    ) -> Result<(), DataplaneError> {
        Ok(())
    }
    /// Vip `id` keeps no previous table.
    fn remove_prev_table(&mut self, _id: u32) -> Result<(), DataplaneError> {
        Ok(())
    }
    /// The table the data plane serves for Vip `id` (a restarted daemon's predecessor's).
    fn table(&self, _id: u32) -> Option<MaglevTable> {
        None
    }
    /// The previous table the data plane holds for Vip `id`.
    fn prev_table(&self, _id: u32) -> Option<MaglevTable> {
        None
    }
    /// Several Vips' tables at once (each swap atomic; the real data plane makes it one
    /// syscall, one RCU grace period).
    fn install_tables(&mut self, tables: &[(u32, &MaglevTable)]) -> Result<(), DataplaneError> {
        for (id, table) in tables {
            self.install_table(*id, table)?;
        }
        Ok(())
    }
    /// Zeroes the traffic counters of a Vip (`vip`) or Backend id given to something new.
    fn reset_traffic(&mut self, vip: bool, id: u32) -> Result<(), DataplaneError>;
    /// Sets every CPU's budget of ICMP messages of one kind (`icmp_rate_slots`).
    fn set_icmp_rate(&mut self, _slot: u32, _per_second: u32) -> Result<(), DataplaneError> {
        Ok(())
    }
    /// Sets the GUE port and the interfaces' MTU.
    fn set_tunnel(&mut self, _tunnel: &TunnelConfig) -> Result<(), DataplaneError> {
        Ok(())
    }
}

impl DataplaneOps for Dataplane {
    fn set_global(&mut self, config: &GlobalConfig) -> Result<(), DataplaneError> {
        Dataplane::set_global(self, config)
    }
    fn set_icmp_rate(&mut self, slot: u32, per_second: u32) -> Result<(), DataplaneError> {
        Dataplane::set_icmp_rate(self, slot, per_second)
    }
    fn set_tunnel(&mut self, tunnel: &TunnelConfig) -> Result<(), DataplaneError> {
        Dataplane::set_tunnel(self, tunnel)
    }
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), DataplaneError> {
        Dataplane::set_backend(self, id, backend)
    }
    fn set_vip_filter(&mut self, addrs: &[IpAddr]) -> Result<(), DataplaneError> {
        Dataplane::set_vip_filter(self, addrs.iter().copied())
    }
    fn set_vip_addr(&mut self, addr: IpAddr, value: Option<VipAddr>) -> Result<(), DataplaneError> {
        Dataplane::set_vip_addr(self, addr, value)
    }
    fn set_vip(&mut self, id: u32, key: &VipKey, state: &VipState) -> Result<(), DataplaneError> {
        Dataplane::set_vip(self, id, key, state)
    }
    fn remove_vip(&mut self, id: u32, key: &VipKey) -> Result<(), DataplaneError> {
        Dataplane::remove_vip(self, id, key)
    }
    fn install_table(&mut self, id: u32, table: &MaglevTable) -> Result<(), DataplaneError> {
        Dataplane::install_table(self, id, table)
    }
    fn install_tables(&mut self, tables: &[(u32, &MaglevTable)]) -> Result<(), DataplaneError> {
        Dataplane::install_tables(self, tables)
    }
    fn install_prev_tables(
        &mut self,
        tables: &[(u32, &MaglevTable)],
    ) -> Result<(), DataplaneError> {
        Dataplane::install_prev_tables(self, tables)
    }
    fn remove_prev_table(&mut self, id: u32) -> Result<(), DataplaneError> {
        Dataplane::remove_prev_table(self, id)
    }
    fn table(&self, id: u32) -> Option<MaglevTable> {
        let (_, slots) = Dataplane::table(self, id).ok()??;
        Some(MaglevTable::from_slots(slots))
    }
    fn prev_table(&self, id: u32) -> Option<MaglevTable> {
        let (_, slots) = Dataplane::prev_table(self, id).ok()??;
        Some(MaglevTable::from_slots(slots))
    }
    fn reset_traffic(&mut self, vip: bool, id: u32) -> Result<(), DataplaneError> {
        Dataplane::reset_traffic(self, vip, id)
    }
}

/// Accepts every write and keeps nothing: `plan` runs the reconciler against it.
#[derive(Default)]
pub struct DryRun;

impl DataplaneOps for DryRun {
    fn set_global(&mut self, _: &GlobalConfig) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn set_backend(&mut self, _: u32, _: &Backend) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn set_vip_filter(&mut self, _: &[IpAddr]) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn set_vip_addr(&mut self, _: IpAddr, _: Option<VipAddr>) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn set_vip(&mut self, _: u32, _: &VipKey, _: &VipState) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn remove_vip(&mut self, _: u32, _: &VipKey) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn install_table(&mut self, _: u32, _: &MaglevTable) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn reset_traffic(&mut self, _: bool, _: u32) -> Result<(), DataplaneError> {
        Ok(())
    }
}

/// An id and the generation it was given with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assigned {
    pub id: u32,
    pub generation: u32,
}

/// Id assignments, persisted next to the pinned maps so a restarted daemon keeps them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignments {
    /// By Vip endpoint (`10.200.0.1:80/tcp`).
    pub vips: BTreeMap<String, Assigned>,
    /// By `pool/address`.
    pub backends: BTreeMap<String, Assigned>,
    /// Last generation handed out; generations are never reused.
    pub generation: u32,
    /// Last next-hop cache generation written to the data plane.
    pub fib_generation: u32,
    /// Backends removed from the config whose connections second chance still serves, by
    /// `pool/address`. Their ids are not given to anything else meanwhile.
    #[serde(default)]
    pub retired: BTreeMap<String, Retired>,
}

impl Assignments {
    fn assign(
        slots: &mut BTreeMap<String, Assigned>,
        key: &str,
        first_id: u32,
        reserved: &BTreeSet<u32>,
        generation: &mut dyn FnMut() -> u32,
    ) -> (Assigned, bool) {
        if let Some(a) = slots.get(key) {
            return (*a, false);
        }
        let mut used: BTreeSet<u32> = slots.values().map(|a| a.id).collect();
        used.extend(reserved);
        let id = (first_id..)
            .find(|id| !used.contains(id))
            .expect("ids left");
        let assigned = Assigned {
            id,
            generation: generation(),
        };
        slots.insert(key.to_owned(), assigned);
        (assigned, true)
    }
}

pub fn backend_key(pool: &str, addr: IpAddr) -> String {
    format!("{pool}/{addr}")
}

/// The address of a `pool/address` key.
fn address_of(key: &str) -> Option<IpAddr> {
    key.rsplit_once('/')?.1.parse().ok()
}

/// One Vip's table as installed, and what it was built from.
#[derive(Clone, Debug)]
pub struct InstalledTable {
    /// Shared by the Vips built from the same inputs (256 Vips of one pool hold one).
    pub table: Arc<MaglevTable>,
    /// Swaps so far (1 = the first install).
    pub generation: u64,
    /// Backend ids holding slots, with their names.
    pub members: Vec<(u32, String)>,
    /// What it was built from (Backends with their effective weights, size, seed): a Vip
    /// whose inputs did not change is not rebuilt.
    inputs: TableInputs,
    /// The table before the last change, while second chance keeps it.
    pub previous: Option<PreviousTable>,
}

type TableInputs = (Vec<MaglevBackend>, u32, u32);

/// A table to swap in.
struct Planned {
    id: u32,
    endpoint: String,
    table: Arc<MaglevTable>,
    inputs: TableInputs,
    names: Vec<(u32, String)>,
}

/// What one reconcile changed, for logs, `plan` and metrics.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub vips_added: Vec<String>,
    pub vips_removed: Vec<String>,
    pub vips_changed: Vec<String>,
    pub backends_added: Vec<String>,
    pub backends_removed: Vec<String>,
    /// Per Vip whose table was swapped: the diff against the previous table.
    pub tables: Vec<(String, maglev::TableDiff)>,
    /// Vips left with no usable backend.
    pub empty_vips: Vec<String>,
}

impl Report {
    pub fn is_empty(&self) -> bool {
        self.vips_added.is_empty()
            && self.vips_removed.is_empty()
            && self.vips_changed.is_empty()
            && self.backends_added.is_empty()
            && self.backends_removed.is_empty()
            && self.tables.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return writeln!(f, "no change");
        }
        let list = |f: &mut fmt::Formatter<'_>, what: &str, items: &[String]| {
            if items.is_empty() {
                Ok(())
            } else {
                writeln!(f, "{what}: {}", items.join(", "))
            }
        };
        list(f, "vips added", &self.vips_added)?;
        list(f, "vips removed", &self.vips_removed)?;
        list(f, "vips changed", &self.vips_changed)?;
        list(f, "backends added", &self.backends_added)?;
        list(f, "backends removed", &self.backends_removed)?;
        for (vip, diff) in &self.tables {
            writeln!(f, "table {vip}: {diff}")?;
        }
        list(f, "vips with no usable backend", &self.empty_vips)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("{0}")]
    Capacity(String),
}

/// Turns desired state into data-plane state.
pub struct Reconciler<D: DataplaneOps> {
    dataplane: D,
    assignments: Assignments,
    config: Option<Config>,
    /// Health per `pool/address`; absent = up (no check, or not checked yet).
    down: BTreeSet<String>,
    /// Backends drained at run time (`pool/address`): weight 0 until the next reload.
    drained: BTreeSet<String>,
    tables: BTreeMap<String, InstalledTable>,
    /// A write failed midway: `tables` may not be what the data plane holds, so the next
    /// write swaps every table in, changed or not.
    force_tables: bool,
    /// See [`Reconciler::gate_new_backends_on_health`].
    health_gated: bool,
    /// `global.second_chance` of the config being written, in seconds (0: off).
    second_chance: u64,
    /// Previous tables a former daemon saved, by Vip endpoint: rebuilt at each Vip's
    /// first install (see [`Reconciler::restore_previous`]).
    restore: BTreeMap<String, SavedTable>,
    /// Unix seconds (a field so that tests can move time).
    clock: fn() -> u64,
}

impl<D: DataplaneOps> Reconciler<D> {
    /// A reconciler continuing from `assignments` (empty for a first start).
    pub fn new(dataplane: D, assignments: Assignments) -> Self {
        Self {
            dataplane,
            assignments,
            config: None,
            down: BTreeSet::new(),
            drained: BTreeSet::new(),
            tables: BTreeMap::new(),
            force_tables: false,
            health_gated: false,
            second_chance: 0,
            restore: BTreeMap::new(),
            clock: second_chance::now,
        }
    }

    /// Previous tables saved by a former daemon (`second_chance::load`): each Vip's is
    /// installed again at its first install if it has not expired, with Backends that are
    /// no longer configured brought back as retired.
    pub fn restore_previous(&mut self, saved: BTreeMap<String, SavedTable>) {
        self.restore = saved;
    }

    /// The previous tables as they are to be saved, by Vip endpoint.
    pub fn saved_previous(&self) -> BTreeMap<String, SavedTable> {
        self.tables
            .iter()
            .filter_map(|(e, t)| Some((e.clone(), t.previous.as_ref()?.saved.clone())))
            .collect()
    }

    /// For tests: the clock second chance reads.
    pub fn set_clock(&mut self, clock: fn() -> u64) {
        self.clock = clock;
    }

    /// Drops the previous tables and retired Backends whose time is up (all of them when
    /// second chance is off). Returns whether anything was dropped.
    pub fn expire_second_chance(&mut self) -> Result<bool, ReconcileError> {
        let now = (self.clock)();
        let off = self.second_chance == 0;
        let mut dropped = false;
        let endpoints: Vec<String> = self
            .tables
            .iter()
            .filter(|(_, t)| t.previous.as_ref().is_some_and(|p| off || p.until <= now))
            .map(|(e, _)| e.clone())
            .collect();
        for endpoint in endpoints {
            if let Some(vip) = self.assignments.vips.get(&endpoint) {
                self.dataplane.remove_prev_table(vip.id)?;
            }
            if let Some(t) = self.tables.get_mut(&endpoint) {
                t.previous = None;
            }
            dropped = true;
        }
        let retired: Vec<String> = self
            .assignments
            .retired
            .iter()
            .filter(|(_, r)| off || r.until <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in retired {
            if let Some(r) = self.assignments.retired.get(&key) {
                self.dataplane.set_backend(r.id, &Backend::default())?;
            }
            self.assignments.retired.remove(&key);
            dropped = true;
        }
        Ok(dropped)
    }

    pub fn dataplane(&self) -> &D {
        &self.dataplane
    }

    pub fn dataplane_mut(&mut self) -> &mut D {
        &mut self.dataplane
    }

    pub fn assignments(&self) -> &Assignments {
        &self.assignments
    }

    pub fn config(&self) -> Option<&Config> {
        self.config.as_ref()
    }

    pub fn tables(&self) -> &BTreeMap<String, InstalledTable> {
        &self.tables
    }

    /// Backends to treat as down from the start (those a previous daemon had down), until
    /// health events say otherwise.
    pub fn set_initially_down(&mut self, down: &[(String, IpAddr)]) {
        self.down
            .extend(down.iter().map(|(pool, addr)| backend_key(pool, *addr)));
    }

    /// Backends drained at run time by a previous daemon stay drained.
    pub fn set_initially_drained(&mut self, drained: &[(String, IpAddr)]) {
        self.drained
            .extend(drained.iter().map(|(pool, addr)| backend_key(pool, *addr)));
    }

    /// Backends a reload adds start down until their health checks pass (`rise` checks),
    /// in pools that have checks: no flow goes to a Backend nothing has vouched for. At a
    /// first start Backends start up, as Envoy and HAProxy do: there is no traffic to
    /// protect yet, the first checks run at once and `fall` failures take a dead one out.
    /// Off for dry runs (`mlb plan` shows the tables the config asks for).
    pub fn gate_new_backends_on_health(&mut self) {
        self.health_gated = true;
    }

    /// `(pool, address)` of the configured Backends considered down.
    pub fn down_backends(&self) -> Vec<(String, IpAddr)> {
        let Some(config) = &self.config else {
            return Vec::new();
        };
        config
            .pools
            .iter()
            .flat_map(|(pool, p)| p.backends.iter().map(move |b| (pool, b.address)))
            .filter(|(pool, addr)| self.down.contains(&backend_key(pool, *addr)))
            .map(|(pool, addr)| (pool.clone(), addr))
            .collect()
    }

    /// Whether `pool/address` is drained at run time.
    pub fn is_drained(&self, pool: &str, addr: IpAddr) -> bool {
        self.drained.contains(&backend_key(pool, addr))
    }

    /// Whether `pool/address` is considered up.
    pub fn is_up(&self, pool: &str, addr: IpAddr) -> bool {
        !self.down.contains(&backend_key(pool, addr))
    }

    /// Applies a validated config, whole or not at all: on a capacity error nothing is
    /// written (ids are checked first); when a map write fails midway, the config in force
    /// before is written back whole (every table included, as the data plane may hold
    /// some of the new ones) and stays in force, and the error is returned for the caller
    /// to report and retry. Should the rollback fail too, the old config still counts as
    /// in force and the next apply rewrites every table.
    pub fn apply(&mut self, config: &Config) -> Result<Report, ReconcileError> {
        self.check_capacity(config)?;
        let old = self.config.clone();
        let drained = self.drained.clone();
        match self.write(config, old.as_ref()) {
            Ok(report) => {
                // Run-time drains last until `undrain` (reloads and restarts included),
                // for the Backends still configured.
                let live: BTreeSet<&String> = self.assignments.backends.keys().collect();
                self.drained.retain(|k| live.contains(k));
                self.config = Some(config.clone());
                Ok(report)
            }
            Err(error) => {
                // The data plane may hold any of the new tables: write every one back.
                self.force_tables = true;
                self.drained = drained;
                if let Some(old) = &old
                    && let Err(again) = self.write(old, Some(config))
                {
                    tracing::error!(error = %again, "rolling back to the config in force failed too");
                    self.force_tables = true;
                }
                self.config = old;
                Err(error)
            }
        }
    }

    /// Writes `config` over the data plane state of `old` (`None`: an empty data plane).
    fn write(&mut self, config: &Config, old: Option<&Config>) -> Result<Report, ReconcileError> {
        let mut report = Report::default();
        self.second_chance = config.global.second_chance.as_secs();

        // 1. Global settings; bump the next-hop generation so routes are looked up afresh.
        self.assignments.fib_generation = self.assignments.fib_generation.wrapping_add(1).max(1);
        self.dataplane
            .set_global(&global_config(config, self.assignments.fib_generation))?;
        for slot in [icmp_rate_slots::ECHO, icmp_rate_slots::TOO_BIG] {
            self.dataplane
                .set_icmp_rate(slot, config.global.icmp_rate)?;
        }
        self.dataplane.set_tunnel(&tunnel_config(config))?;

        // 2. Backends (new ones before any table names them).
        self.make_room_for_new_backends(config)?;
        let mut live_backends = BTreeSet::new();
        for (pool_name, pool) in &config.pools {
            for b in &pool.backends {
                let key = backend_key(pool_name, b.address);
                // A retired Backend configured again takes its id back.
                if let Some(r) = self.assignments.retired.remove(&key) {
                    let assigned = Assigned {
                        id: r.id,
                        generation: r.generation,
                    };
                    self.assignments.backends.insert(key.clone(), assigned);
                }
                let (assigned, new) = self.assign_backend(&key);
                if new {
                    self.dataplane.reset_traffic(false, assigned.id)?;
                    report.backends_added.push(format!("{} ({key})", b.name));
                    if self.health_gated
                        && old.is_some()
                        && pool.health_check.kind != CheckKind::None
                    {
                        self.down.insert(key.clone());
                    }
                }
                let mut flags = if self.down.contains(&key) {
                    0
                } else {
                    backend_flags::UP
                };
                if b.address.is_ipv6() {
                    flags |= backend_flags::IPV6;
                }
                let backend = Backend {
                    addr: addr_words(b.address),
                    flags,
                    generation: assigned.generation,
                };
                self.dataplane.set_backend(assigned.id, &backend)?;
                live_backends.insert(key);
            }
        }

        // 3. Vip addresses: the filter grows first (union), so no live Vip is ever missed.
        let old_addrs: BTreeSet<IpAddr> = old
            .iter()
            .flat_map(|c| c.vips.iter().map(|v| v.address))
            .collect();
        let new_addrs = vip_addr_flags_of(config);
        let union: Vec<IpAddr> = old_addrs
            .iter()
            .copied()
            .chain(new_addrs.keys().copied())
            .collect();
        self.dataplane.set_vip_filter(&union)?;
        for (addr, flags) in &new_addrs {
            self.dataplane
                .set_vip_addr(*addr, Some(VipAddr { flags: *flags }))?;
        }

        // 4. Vips: table first, then the Vip itself.
        let mut live_vips = BTreeSet::new();
        for vip in &config.vips {
            let endpoint = vip.endpoint();
            let (assigned, new) = {
                let assignments = &mut self.assignments;
                let mut next = Assignments::next_generation_fn(&mut assignments.generation);
                let none = BTreeSet::new();
                Assignments::assign(&mut assignments.vips, &endpoint, 0, &none, &mut next)
            };
            let old_vip = old.and_then(|c| c.vips.iter().find(|v| v.endpoint() == endpoint));
            if new {
                self.dataplane.reset_traffic(true, assigned.id)?;
                report.vips_added.push(endpoint.clone());
            } else if old_vip.is_some_and(|o| o != vip) {
                report.vips_changed.push(endpoint.clone());
            }
            live_vips.insert(endpoint);
        }
        let vips: Vec<(&VipConfig, Assigned)> = config
            .vips
            .iter()
            .map(|v| (v, self.assignments.vips[&v.endpoint()]))
            .collect();
        let planned = self.plan_tables(config, vips.iter().map(|(v, a)| (*v, a.id)));
        self.install_planned(planned, &mut report, true)?;
        for (vip, assigned) in &vips {
            let state = VipState {
                flags: vip.flags(),
                generation: assigned.generation,
            };
            self.dataplane.set_vip(
                assigned.id,
                &vip_key(vip.address, vip.port, vip.protocol),
                &state,
            )?;
        }

        // 5. Removals, now that no table names a removed Backend.
        if let Some(old) = old {
            for vip in &old.vips {
                let endpoint = vip.endpoint();
                if live_vips.contains(&endpoint) {
                    continue;
                }
                if let Some(assigned) = self.assignments.vips.remove(&endpoint) {
                    self.dataplane
                        .remove_vip(assigned.id, &vip_key(vip.address, vip.port, vip.protocol))?;
                    self.dataplane.remove_prev_table(assigned.id)?;
                }
                self.tables.remove(&endpoint);
                report.vips_removed.push(endpoint);
            }
        }
        let gone: Vec<String> = self
            .assignments
            .backends
            .keys()
            .filter(|k| !live_backends.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(assigned) = self.assignments.backends.remove(&key) {
                // With second chance, a removed Backend keeps its entry (and so its open
                // connections) until the previous tables that name it expire.
                match address_of(&key) {
                    Some(address) if self.second_chance > 0 => {
                        let retired = Retired {
                            id: assigned.id,
                            generation: assigned.generation,
                            address,
                            until: (self.clock)() + self.second_chance,
                        };
                        self.assignments.retired.insert(key.clone(), retired);
                    }
                    _ => self
                        .dataplane
                        .set_backend(assigned.id, &Backend::default())?,
                }
                self.down.remove(&key);
                self.drained.remove(&key);
                report.backends_removed.push(key);
            }
        }
        for addr in old_addrs.iter().filter(|a| !new_addrs.contains_key(a)) {
            self.dataplane.set_vip_addr(*addr, None)?;
        }
        let exact: Vec<IpAddr> = new_addrs.keys().copied().collect();
        self.dataplane.set_vip_filter(&exact)?;
        self.expire_second_chance()?;
        self.force_tables = false;
        Ok(report)
    }

    /// Records health transitions of `(pool, address, up)` and re-steers: the affected
    /// pools' Vip tables, rebuilt once however many of their Backends changed and swapped
    /// in one batch (one RCU grace period for all, ~14 ms here, instead of one per Vip),
    /// and each Backend's flag (so its connection-table entries re-steer). Transitions of
    /// Backends the config no longer has are ignored.
    pub fn set_health(
        &mut self,
        transitions: &[(String, IpAddr, bool)],
    ) -> Result<Report, ReconcileError> {
        let mut report = Report::default();
        let mut pools = BTreeSet::new();
        let (mut ups, mut downs) = (Vec::new(), Vec::new());
        for (pool, addr, up) in transitions {
            let key = backend_key(pool, *addr);
            if !self.assignments.backends.contains_key(&key) {
                continue;
            }
            let changed = if *up {
                self.down.remove(&key)
            } else {
                self.down.insert(key.clone())
            };
            if !changed {
                continue;
            }
            if !*up {
                // A new generation voids every connection entry (the LRU table's and every
                // CPU's flow cache) made while it was up: its flows are re-steered, and
                // when it comes back, re-steered flows stay where they went.
                let generation =
                    Assignments::next_generation_fn(&mut self.assignments.generation)();
                if let Some(a) = self.assignments.backends.get_mut(&key) {
                    a.generation = generation;
                }
            }
            let assigned = self.assignments.backends[&key];
            let mut flags = if *up { backend_flags::UP } else { 0 };
            if addr.is_ipv6() {
                flags |= backend_flags::IPV6;
            }
            let backend = Backend {
                addr: addr_words(*addr),
                flags,
                generation: assigned.generation,
            };
            if *up {
                ups.push((assigned.id, backend));
            } else {
                downs.push((assigned.id, backend));
            }
            pools.insert(pool.clone());
        }
        // A Backend coming up is flagged before a table names it; one going down is
        // flagged after the tables without it are live, so that no new or re-steered flow
        // meets a table slot whose Backend is already flagged down (dropped).
        for (id, backend) in &ups {
            self.dataplane.set_backend(*id, backend)?;
        }
        self.rebuild_pools(&pools, &mut report, !ups.is_empty())?;
        for (id, backend) in &downs {
            self.dataplane.set_backend(*id, backend)?;
        }
        Ok(report)
    }

    /// Drains (or undrains) `address` in every pool at run time: no new flows, existing
    /// ones keep their Backend. Returns the pools it was found in.
    pub fn set_drained(
        &mut self,
        addr: IpAddr,
        drained: bool,
    ) -> Result<(Vec<String>, Report), ReconcileError> {
        let pools: Vec<String> = self
            .config
            .as_ref()
            .map(|c| {
                c.pools
                    .iter()
                    .filter(|(_, p)| p.backends.iter().any(|b| b.address == addr))
                    .map(|(name, _)| name.clone())
                    .collect()
            })
            .unwrap_or_default();
        let mut report = Report::default();
        for pool in &pools {
            let key = backend_key(pool, addr);
            if drained {
                self.drained.insert(key);
            } else {
                self.drained.remove(&key);
            }
        }
        let affected: BTreeSet<String> = pools.iter().cloned().collect();
        self.rebuild_pools(&affected, &mut report, true)?;
        Ok((pools, report))
    }

    /// Bumps the next-hop cache generation: every CPU looks its backends' routes up again.
    pub fn refresh_next_hops(&mut self) -> Result<(), ReconcileError> {
        if let Some(config) = &self.config {
            self.assignments.fib_generation =
                self.assignments.fib_generation.wrapping_add(1).max(1);
            self.dataplane
                .set_global(&global_config(config, self.assignments.fib_generation))?;
            // An interface's MTU may have changed too.
            self.dataplane.set_tunnel(&tunnel_config(config))?;
        }
        Ok(())
    }

    fn rebuild_pools(
        &mut self,
        pools: &BTreeSet<String>,
        report: &mut Report,
        new_previous: bool,
    ) -> Result<(), ReconcileError> {
        let Some(config) = self.config.clone() else {
            return Ok(());
        };
        let vips = config.vips.iter().filter(|v| pools.contains(&v.pool));
        let vips = vips.filter_map(|v| Some((v, self.assignments.vips.get(&v.endpoint())?.id)));
        let vips: Vec<(&VipConfig, u32)> = vips.collect();
        let planned = self.plan_tables(&config, vips.into_iter());
        self.install_planned(planned, report, new_previous)
    }

    /// The tables of `vips` whose inputs changed (all of them after a failed write),
    /// each distinct table built once: Vips sharing a pool share their table.
    fn plan_tables<'c>(
        &self,
        config: &Config,
        vips: impl Iterator<Item = (&'c VipConfig, u32)>,
    ) -> Vec<Planned> {
        let mut built: Vec<(TableInputs, Arc<MaglevTable>)> = Vec::new();
        let mut planned = Vec::new();
        for (vip, id) in vips {
            let pool = &config.pools[&vip.pool];
            let mut members = Vec::new();
            let mut names = Vec::new();
            for b in &pool.backends {
                let key = backend_key(&vip.pool, b.address);
                let Some(assigned) = self.assignments.backends.get(&key) else {
                    continue;
                };
                let weight = if self.down.contains(&key) || self.drained.contains(&key) {
                    0
                } else {
                    b.weight
                };
                if weight > 0 {
                    names.push((assigned.id, b.name.clone()));
                }
                members.push(MaglevBackend::new(assigned.id, b.address, weight));
            }
            let inputs = (members, vip.table_size, config.global.hash_seed);
            let endpoint = vip.endpoint();
            let installed = self.tables.get(&endpoint);
            if !self.force_tables && installed.is_some_and(|t| t.inputs == inputs) {
                continue;
            }
            let table = match built.iter().find(|(i, _)| *i == inputs) {
                Some((_, table)) => Arc::clone(table),
                None => {
                    let table = Arc::new(maglev::build(&inputs.0, inputs.1, inputs.2));
                    built.push((inputs.clone(), Arc::clone(&table)));
                    table
                }
            };
            if !self.force_tables && installed.is_some_and(|t| *t.table == *table) {
                continue;
            }
            planned.push(Planned {
                id,
                endpoint,
                table,
                inputs,
                names,
            });
        }
        planned
    }

    /// Swaps the planned tables in, in one batch, and records them. With second chance, each
    /// Vip's table before the change goes into `PREV_TABLES` first, so that no packet meets
    /// the new table without the previous one behind it.
    ///
    /// `new_previous: false` (Backends only going down): each Vip keeps the previous table
    /// it has. The slots that move go away from Backends that are down, which chaining
    /// never tries, and swapping previous tables in first would hold the new tables back
    /// by one more RCU grace period (~15 ms) where a failover is measured.
    fn install_planned(
        &mut self,
        planned: Vec<Planned>,
        report: &mut Report,
        new_previous: bool,
    ) -> Result<(), ReconcileError> {
        let mut kept_previous = BTreeMap::new();
        if self.second_chance > 0 {
            let until = (self.clock)() + self.second_chance;
            // Previous tables to swap in: new ones, or all of them after a failed write.
            let mut changed = BTreeSet::new();
            for p in &planned {
                let kept = match self.tables.get(&p.endpoint) {
                    Some(t) if new_previous && !t.table.is_empty() && *t.table != *p.table => {
                        changed.insert(p.endpoint.clone());
                        Some(self.previous_of(t, until))
                    }
                    // Unchanged (a forced rewrite), from no backend, or only Backends
                    // going down: keep what it had.
                    Some(t) => {
                        if self.force_tables && t.previous.is_some() {
                            changed.insert(p.endpoint.clone());
                        }
                        t.previous.clone()
                    }
                    // This daemon's first install: what its predecessor saved, else the
                    // table the data plane still serves (a restart with a new config).
                    None => {
                        changed.insert(p.endpoint.clone());
                        match self.restored(p.id, &p.endpoint, &p.table)? {
                            Some(restored) => Some(restored),
                            None => self.adopted(p.id, &p.table, until),
                        }
                    }
                };
                if let Some(kept) = kept {
                    kept_previous.insert(p.endpoint.clone(), kept);
                }
            }
            let batch: Vec<(u32, &MaglevTable)> = planned
                .iter()
                .filter(|p| changed.contains(&p.endpoint))
                .filter_map(|p| Some((p.id, &*kept_previous.get(&p.endpoint)?.table)))
                .collect();
            if !batch.is_empty() {
                self.dataplane.install_prev_tables(&batch)?;
            }
        }
        let batch: Vec<(u32, &MaglevTable)> = planned.iter().map(|p| (p.id, &*p.table)).collect();
        self.dataplane.install_tables(&batch)?;
        // Vips sharing a pool share their diff too (256 diffs of 65537 slots cost ~20 ms).
        let mut diffs: Vec<(Option<TableInputs>, TableInputs, maglev::TableDiff)> = Vec::new();
        for p in planned {
            let previous = self.tables.get(&p.endpoint);
            let key = previous.map(|t| t.inputs.clone());
            let diff = match diffs.iter().find(|(o, n, _)| *o == key && *n == p.inputs) {
                Some((_, _, diff)) => diff.clone(),
                None => {
                    let empty;
                    let old = match previous {
                        Some(t) => &t.table,
                        None => {
                            empty = maglev::build(&[], p.table.size(), 0);
                            &empty
                        }
                    };
                    let diff = maglev::diff(old, &p.table);
                    diffs.push((key, p.inputs.clone(), diff.clone()));
                    diff
                }
            };
            if p.table.is_empty() {
                report.empty_vips.push(p.endpoint.clone());
            }
            let generation = previous.map_or(1, |t| t.generation + 1);
            report.tables.push((p.endpoint.clone(), diff));
            let kept = kept_previous.remove(&p.endpoint);
            // None to keep: drop what the data plane has (also a predecessor's, expired).
            if kept.is_none() && previous.is_none_or(|t| t.previous.is_some()) {
                self.dataplane.remove_prev_table(p.id)?;
            }
            self.tables.insert(
                p.endpoint,
                InstalledTable {
                    table: p.table,
                    generation,
                    members: p.names,
                    inputs: p.inputs,
                    previous: kept,
                },
            );
        }
        Ok(())
    }

    /// `t` as a previous table kept until `until`.
    fn previous_of(&self, t: &InstalledTable, until: u64) -> PreviousTable {
        let (members, size, seed) = &t.inputs;
        let names: BTreeMap<u32, &String> = t.members.iter().map(|(id, n)| (*id, n)).collect();
        let saved = members
            .iter()
            .filter(|m| m.weight > 0)
            .filter_map(|m| {
                let key = self.backend_key_of(m.id)?;
                Some(SavedMember {
                    address: address_of(&key)?,
                    name: names.get(&m.id).map_or_else(String::new, |n| (*n).clone()),
                    key,
                    weight: m.weight,
                })
            })
            .collect();
        PreviousTable {
            table: Arc::clone(&t.table),
            members: t.members.clone(),
            until,
            saved: SavedTable {
                size: *size,
                seed: *seed,
                members: saved,
                until,
            },
        }
    }

    /// The table the data plane serves for Vip `id` before this daemon's first install, as
    /// a previous table until `until`, if it differs from `current`. Its weights are not
    /// known: it is saved without members, which tells a successor to take it from the
    /// maps (`PREV_TABLES`), and it is lost with them.
    fn adopted(&self, id: u32, current: &MaglevTable, until: u64) -> Option<PreviousTable> {
        let table = self.dataplane.table(id)?;
        if table.is_empty() || table == *current {
            return None;
        }
        let saved = SavedTable {
            size: table.size(),
            seed: 0,
            members: Vec::new(),
            until,
        };
        Some(self.held_by_maps(table, saved))
    }

    /// A previous table only the maps hold (its weights unknown), named by this daemon's
    /// assignments, kept until `saved.until`.
    fn held_by_maps(&self, table: MaglevTable, saved: SavedTable) -> PreviousTable {
        let members = table
            .slot_counts()
            .into_iter()
            .map(|(id, _)| (id, self.backend_key_of(id).unwrap_or_default()))
            .collect();
        PreviousTable {
            table: Arc::new(table),
            members,
            until: saved.until,
            saved,
        }
    }

    /// The `pool/address` Backend id `id` stands for (configured or retired).
    fn backend_key_of(&self, id: u32) -> Option<String> {
        let assignments = &self.assignments;
        let configured = assignments.backends.iter().find(|(_, a)| a.id == id);
        let retired = || assignments.retired.iter().find(|(_, r)| r.id == id);
        configured
            .map(|(k, _)| k.clone())
            .or_else(|| retired().map(|(k, _)| k.clone()))
    }

    /// The previous table a former daemon saved for `endpoint`, built again with this
    /// daemon's ids (Backends no longer configured come back retired), unless it expired or
    /// equals `current`.
    fn restored(
        &mut self,
        id: u32,
        endpoint: &str,
        current: &MaglevTable,
    ) -> Result<Option<PreviousTable>, ReconcileError> {
        let now = (self.clock)();
        let Some(saved) = self.restore.remove(endpoint).filter(|s| s.until > now) else {
            return Ok(None);
        };
        if saved.members.is_empty() {
            // Adopted by the predecessor from its own predecessor's maps: only the maps
            // hold it.
            let table = self.dataplane.prev_table(id).filter(|t| t != current);
            return Ok(table.map(|table| self.held_by_maps(table, saved)));
        }
        let mut members = Vec::new();
        let mut names = Vec::new();
        for m in &saved.members {
            let id = match (
                self.assignments.backends.get(&m.key),
                self.assignments.retired.get(&m.key),
            ) {
                (Some(a), _) => a.id,
                (None, Some(r)) => r.id,
                (None, None) => self.retire_saved(m, saved.until)?,
            };
            members.push(MaglevBackend::new(id, m.address, m.weight));
            names.push((id, m.name.clone()));
        }
        let table = maglev::build(&members, saved.size, saved.seed);
        if table == *current {
            return Ok(None);
        }
        Ok(Some(PreviousTable {
            table: Arc::new(table),
            members: names,
            until: saved.until,
            saved,
        }))
    }

    /// A Backend of a saved previous table that this daemon does not have: a fresh id,
    /// retired until `until`, up in the data plane.
    fn retire_saved(&mut self, m: &SavedMember, until: u64) -> Result<u32, ReconcileError> {
        let mut reserved: BTreeSet<u32> = self.assignments.retired.values().map(|r| r.id).collect();
        reserved.extend(self.assignments.backends.values().map(|a| a.id));
        let id = (1..).find(|id| !reserved.contains(id)).expect("ids left");
        let generation = Assignments::next_generation_fn(&mut self.assignments.generation)();
        let mut flags = backend_flags::UP;
        if m.address.is_ipv6() {
            flags |= backend_flags::IPV6;
        }
        let backend = Backend {
            addr: addr_words(m.address),
            flags,
            generation,
        };
        self.dataplane.reset_traffic(false, id)?;
        self.dataplane.set_backend(id, &backend)?;
        let retired = Retired {
            id,
            generation,
            address: m.address,
            until,
        };
        self.assignments.retired.insert(m.key.clone(), retired);
        Ok(id)
    }

    /// Retired Backends hold ids; when the new ones would not fit under `max_backends`,
    /// the retirements that end soonest end now (their connections lose second chance
    /// early, which beats refusing the config).
    fn make_room_for_new_backends(&mut self, config: &Config) -> Result<(), ReconcileError> {
        let wanted: BTreeSet<String> = config
            .pools
            .iter()
            .flat_map(|(pool, p)| p.backends.iter().map(move |b| backend_key(pool, b.address)))
            .collect();
        let new = wanted
            .iter()
            .filter(|k| {
                !self.assignments.backends.contains_key(*k)
                    && !self.assignments.retired.contains_key(*k)
            })
            .count();
        // Id 0 is reserved.
        let capacity = config.global.max_backends.saturating_sub(1) as usize;
        while self.assignments.backends.len() + self.assignments.retired.len() + new > capacity {
            let Some(key) = self
                .assignments
                .retired
                .iter()
                .min_by_key(|(_, r)| r.until)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            let r = self.assignments.retired.remove(&key).expect("listed");
            tracing::warn!(backend = %key, "second chance: retirement ended early to make room for new backends (max_backends)");
            self.dataplane.set_backend(r.id, &Backend::default())?;
        }
        Ok(())
    }

    /// A Backend id for `key` (`pool/address`), not one a retired Backend still holds;
    /// `true` if it is new.
    fn assign_backend(&mut self, key: &str) -> (Assigned, bool) {
        let reserved: BTreeSet<u32> = self.assignments.retired.values().map(|r| r.id).collect();
        let assignments = &mut self.assignments;
        let mut next = Assignments::next_generation_fn(&mut assignments.generation);
        Assignments::assign(&mut assignments.backends, key, 1, &reserved, &mut next)
    }

    fn check_capacity(&self, config: &Config) -> Result<(), ReconcileError> {
        let members: usize = config.pools.values().map(|p| p.backends.len()).sum();
        let max_backends = config.global.max_backends as usize;
        if members + 1 > max_backends {
            return Err(ReconcileError::Capacity(format!(
                "{members} pool members need max_backends >= {} (it is {max_backends})",
                members + 1
            )));
        }
        if config.vips.len() > config.global.max_vips as usize {
            return Err(ReconcileError::Capacity(format!(
                "{} vips exceed max_vips {}",
                config.vips.len(),
                config.global.max_vips
            )));
        }
        Ok(())
    }
}

impl Assignments {
    fn next_generation_fn(generation: &mut u32) -> impl FnMut() -> u32 + '_ {
        move || {
            *generation = generation.wrapping_add(1).max(1);
            *generation
        }
    }
}

/// The data plane's global entry for `config`.
pub fn global_config(config: &Config, fib_generation: u32) -> GlobalConfig {
    let (v4, len4) = config.global.encap_source_v4;
    let (v6, _) = config.global.encap_source_v6;
    let hostmask = if len4 >= 32 { 0 } else { u32::MAX >> len4 };
    GlobalConfig {
        hash_seed: config.global.hash_seed,
        fib_generation,
        encap_src4_base: u32::from(v4) & !hostmask,
        encap_src4_hostmask: hostmask,
        encap_src6_base: addr_words(IpAddr::V6(v6)),
        flow_cache_mask: 0,             // set by Dataplane::set_global
        cache_epoch: 0,                 // set by Dataplane::set_global
        vip_filter: Default::default(), // set by Dataplane::set_vip_filter
    }
}

/// The data plane's `TUNNEL` entry for `config`: its GUE port, and the smallest MTU of
/// its interfaces as the kernel has them now (0, no "too big" check, if none can be read).
pub fn tunnel_config(config: &Config) -> TunnelConfig {
    let mtu = config
        .interfaces
        .iter()
        .filter_map(|i| crate::dataplane::interface_mtu(&i.name))
        .min()
        .unwrap_or(0);
    TunnelConfig {
        mtu,
        gue_port: config.global.gue_port.to_be(),
        _pad: 0,
    }
}

pub fn vip_key(addr: IpAddr, port: u16, protocol: Protocol) -> VipKey {
    VipKey {
        addr: addr_words(addr),
        port: port.to_be(),
        proto: protocol.number(),
        family: if addr.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 },
    }
}

/// Every Vip address with its wildcard (port 0) flags.
fn vip_addr_flags_of(config: &Config) -> BTreeMap<IpAddr, u32> {
    let mut flags = BTreeMap::new();
    for vip in &config.vips {
        let entry = flags.entry(vip.address).or_insert(0);
        if vip.icmp_echo {
            *entry |= vip_addr_flags::ICMP_ECHO;
        }
        if vip.track_fragments {
            *entry |= vip_addr_flags::FRAGMENTS;
        }
        if vip.port == 0 {
            *entry |= match vip.protocol {
                Protocol::Tcp => vip_addr_flags::ANY_PORT_TCP,
                Protocol::Udp => vip_addr_flags::ANY_PORT_UDP,
            };
        }
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every write, in order.
    #[derive(Clone, Default)]
    struct Recorder {
        ops: Vec<String>,
        /// The next-hop generation of each `set_global`, in order.
        fib_generations: Vec<u32>,
        backends: BTreeMap<u32, Backend>,
        tables: BTreeMap<u32, MaglevTable>,
        prev: BTreeMap<u32, MaglevTable>,
    }

    impl DataplaneOps for Recorder {
        fn set_global(&mut self, config: &GlobalConfig) -> Result<(), DataplaneError> {
            self.fib_generations.push(config.fib_generation);
            Ok(())
        }
        fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), DataplaneError> {
            self.ops
                .push(format!("backend {id} flags {}", backend.flags));
            self.backends.insert(id, *backend);
            Ok(())
        }
        fn set_vip_filter(&mut self, _: &[IpAddr]) -> Result<(), DataplaneError> {
            Ok(())
        }
        fn set_vip_addr(&mut self, _: IpAddr, _: Option<VipAddr>) -> Result<(), DataplaneError> {
            Ok(())
        }
        fn set_vip(&mut self, id: u32, _: &VipKey, _: &VipState) -> Result<(), DataplaneError> {
            self.ops.push(format!("vip {id}"));
            Ok(())
        }
        fn remove_vip(&mut self, id: u32, _: &VipKey) -> Result<(), DataplaneError> {
            self.ops.push(format!("remove vip {id}"));
            Ok(())
        }
        fn install_table(&mut self, id: u32, table: &MaglevTable) -> Result<(), DataplaneError> {
            self.ops.push(format!("table {id}"));
            self.tables.insert(id, table.clone());
            Ok(())
        }
        fn reset_traffic(&mut self, _: bool, _: u32) -> Result<(), DataplaneError> {
            Ok(())
        }
        fn install_prev_tables(
            &mut self,
            tables: &[(u32, &MaglevTable)],
        ) -> Result<(), DataplaneError> {
            for (id, table) in tables {
                self.ops.push(format!("prev {id}"));
                self.prev.insert(*id, (*table).clone());
            }
            Ok(())
        }
        fn remove_prev_table(&mut self, id: u32) -> Result<(), DataplaneError> {
            if self.prev.remove(&id).is_some() {
                self.ops.push(format!("remove prev {id}"));
            }
            Ok(())
        }
        fn table(&self, id: u32) -> Option<MaglevTable> {
            self.tables.get(&id).cloned()
        }
        fn prev_table(&self, id: u32) -> Option<MaglevTable> {
            self.prev.get(&id).cloned()
        }
    }

    thread_local! {
        static NOW: std::cell::Cell<u64> = const { std::cell::Cell::new(1_000) };
    }

    fn test_clock() -> u64 {
        NOW.with(|n| n.get())
    }

    fn advance(seconds: u64) {
        NOW.with(|n| n.set(n.get() + seconds));
    }

    /// Which address each slot of `table` names, by the ids `r` assigned (configured or
    /// retired): tables of two daemons compare by address, not id.
    fn by_address(r: &Reconciler<Recorder>, table: &MaglevTable) -> Vec<Option<IpAddr>> {
        let a = r.assignments();
        let address = |id: u32| {
            a.backends
                .iter()
                .find(|(_, x)| x.id == id)
                .and_then(|(k, _)| address_of(k))
                .or_else(|| a.retired.values().find(|x| x.id == id).map(|x| x.address))
        };
        table.slots().iter().map(|id| address(*id)).collect()
    }

    #[test]
    fn a_table_change_installs_the_previous_table_before_the_new_one() {
        let mut r = Reconciler::new(Recorder::default(), Assignments::default());
        r.set_clock(test_clock);
        r.apply(&config_sc(&[
            ("10.0.0.1", 1),
            ("10.0.0.2", 1),
            ("10.0.0.3", 1),
        ]))
        .unwrap();
        assert!(
            r.dataplane().prev.is_empty(),
            "a first table has no previous one"
        );
        let first = r.dataplane().tables[&0].clone();
        r.dataplane_mut().ops.clear();
        r.apply(&config_sc(&[
            ("10.0.0.1", 1),
            ("10.0.0.2", 1),
            ("10.0.0.3", 1),
            ("10.0.0.4", 1),
        ]))
        .unwrap();
        assert_eq!(r.dataplane().prev[&0], first);
        let ops = &r.dataplane().ops;
        let at = |op: &str| {
            ops.iter()
                .position(|o| o == op)
                .unwrap_or_else(|| panic!("{op} in {ops:?}"))
        };
        assert!(at("prev 0") < at("table 0"), "{ops:?}");
        let kept = r.tables()["10.200.0.1:80/tcp"].previous.as_ref().unwrap();
        assert_eq!(kept.until, test_clock() + 300);
        assert_eq!(kept.saved.members.len(), 3);
    }

    #[test]
    fn a_removed_backend_stays_retired_until_second_chance_ends() {
        let mut r = Reconciler::new(Recorder::default(), Assignments::default());
        r.set_clock(test_clock);
        r.apply(&config_sc(&[
            ("10.0.0.1", 1),
            ("10.0.0.2", 1),
            ("10.0.0.3", 1),
        ]))
        .unwrap();
        let removed = ids(&r)["web/10.0.0.3"];
        r.apply(&config_sc(&[("10.0.0.1", 1), ("10.0.0.2", 1)]))
            .unwrap();
        // Still up in the data plane, named by the previous table, its id held.
        assert_eq!(
            r.dataplane().backends[&removed].flags & backend_flags::UP,
            backend_flags::UP
        );
        assert!(r.dataplane().prev[&0].slots().contains(&removed));
        assert!(!r.dataplane().tables[&0].slots().contains(&removed));
        r.apply(&config_sc(&[
            ("10.0.0.1", 1),
            ("10.0.0.2", 1),
            ("10.0.0.5", 1),
        ]))
        .unwrap();
        assert_ne!(
            ids(&r)["web/10.0.0.5"],
            removed,
            "a retired id is not given away"
        );
        advance(299);
        assert!(!r.expire_second_chance().unwrap());
        advance(2);
        assert!(r.expire_second_chance().unwrap());
        assert_eq!(r.dataplane().backends[&removed], Backend::default());
        assert!(r.dataplane().prev.is_empty());
        assert!(r.assignments().retired.is_empty());
        assert!(r.tables()["10.200.0.1:80/tcp"].previous.is_none());
    }

    #[test]
    fn a_backend_going_down_swaps_no_previous_table_and_one_coming_up_does_first() {
        let backends = [("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)];
        let mut r = Reconciler::new(Recorder::default(), Assignments::default());
        r.set_clock(test_clock);
        r.apply(&config_sc(&backends[..2])).unwrap();
        r.apply(&config_sc(&backends)).unwrap();
        let kept = r.dataplane().prev[&0].clone();
        let addr: IpAddr = "10.0.0.3".parse().unwrap();
        r.dataplane_mut().ops.clear();
        r.set_health(&[("web".into(), addr, false)]).unwrap();
        // The failover waits for no previous-table swap; the previous table stays.
        let ops = r.dataplane().ops.clone();
        assert!(ops.iter().all(|o| !o.starts_with("prev")), "{ops:?}");
        assert_eq!(r.dataplane().prev[&0], kept);
        r.dataplane_mut().ops.clear();
        r.set_health(&[("web".into(), addr, true)]).unwrap();
        let ops = &r.dataplane().ops;
        let at = |op: &str| {
            ops.iter()
                .position(|o| o == op)
                .unwrap_or_else(|| panic!("{op}: {ops:?}"))
        };
        assert!(at("prev 0") < at("table 0"), "{ops:?}");
    }

    #[test]
    fn retirements_end_early_when_new_backends_need_their_ids() {
        let mut r = Reconciler::new(Recorder::default(), Assignments::default());
        r.set_clock(test_clock);
        let small = |backends: &[(&str, u32)]| {
            let mut c = config_sc(backends);
            c.global.max_backends = 4; // ids 1..=3
            c
        };
        r.apply(&small(&[("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)]))
            .unwrap();
        r.apply(&small(&[("10.0.0.1", 1)])).unwrap();
        assert_eq!(r.assignments().retired.len(), 2);
        // A reload that adds nothing ends no retirement.
        r.apply(&small(&[("10.0.0.1", 1)])).unwrap();
        assert_eq!(r.assignments().retired.len(), 2);
        advance(1);
        r.apply(&small(&[("10.0.0.1", 1), ("10.0.0.4", 1)]))
            .unwrap();
        // One retirement ended to make room; the other stays.
        assert_eq!(r.assignments().retired.len(), 1);
        let ids: BTreeSet<u32> = r
            .assignments()
            .backends
            .values()
            .map(|a| a.id)
            .chain(r.assignments().retired.values().map(|x| x.id))
            .collect();
        assert_eq!(ids, BTreeSet::from([1, 2, 3]));
    }

    #[test]
    fn a_retired_backend_configured_again_takes_its_id_back() {
        let mut r = Reconciler::new(Recorder::default(), Assignments::default());
        r.set_clock(test_clock);
        r.apply(&config_sc(&[("10.0.0.1", 1), ("10.0.0.2", 1)]))
            .unwrap();
        let id = ids(&r)["web/10.0.0.2"];
        r.apply(&config_sc(&[("10.0.0.1", 1)])).unwrap();
        r.apply(&config_sc(&[("10.0.0.1", 1), ("10.0.0.2", 1)]))
            .unwrap();
        assert_eq!(ids(&r)["web/10.0.0.2"], id);
        assert!(r.assignments().retired.is_empty());
    }

    #[test]
    fn second_chance_off_keeps_no_previous_table_and_no_retired_backend() {
        let off = |backends: &[(&str, u32)]| {
            let mut c = config_sc(backends);
            c.global.second_chance = std::time::Duration::ZERO;
            c
        };
        let mut r = Reconciler::new(Recorder::default(), Assignments::default());
        r.set_clock(test_clock);
        r.apply(&config_sc(&[("10.0.0.1", 1), ("10.0.0.2", 1)]))
            .unwrap();
        r.apply(&config_sc(&[
            ("10.0.0.1", 1),
            ("10.0.0.2", 1),
            ("10.0.0.3", 1),
        ]))
        .unwrap();
        assert!(!r.dataplane().prev.is_empty());
        // Turned off by a reload: what second chance held goes at once.
        r.apply(&off(&[("10.0.0.1", 1), ("10.0.0.3", 1)])).unwrap();
        assert!(r.dataplane().prev.is_empty());
        assert!(r.assignments().retired.is_empty());
        assert!(r.tables().values().all(|t| t.previous.is_none()));
    }

    #[test]
    fn a_restart_with_a_new_config_keeps_the_table_the_data_plane_served_as_previous() {
        let old = [("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)];
        let new = [
            ("10.0.0.1", 1),
            ("10.0.0.2", 1),
            ("10.0.0.3", 1),
            ("10.0.0.4", 1),
        ];
        let mut first = Reconciler::new(Recorder::default(), Assignments::default());
        first.set_clock(test_clock);
        first.apply(&config_sc(&old)).unwrap();
        let served = first.dataplane().tables[&0].clone();
        // The daemon stops; the maps and the assignments stay; it starts on a new config.
        let mut second = Reconciler::new(first.dataplane().clone(), first.assignments().clone());
        second.set_clock(test_clock);
        second.apply(&config_sc(&new)).unwrap();
        assert_eq!(second.dataplane().prev[&0], served);
        assert_ne!(second.dataplane().tables[&0], served);
        // Its weights are unknown: saved without members, to be taken from the maps.
        let saved = second.saved_previous();
        assert!(saved["10.200.0.1:80/tcp"].members.is_empty());
        // A third start on the same config keeps it, from the maps, until its time.
        let restart = |before: &Reconciler<Recorder>, saved| {
            let mut r = Reconciler::new(before.dataplane().clone(), before.assignments().clone());
            r.set_clock(test_clock);
            r.restore_previous(saved);
            r.apply(&config_sc(&new)).unwrap();
            r
        };
        let third = restart(&second, saved.clone());
        assert_eq!(third.dataplane().prev[&0], served);
        // Past its time, or with nothing saved, the maps' previous table is dropped.
        advance(301);
        let fourth = restart(&third, saved);
        assert!(
            fourth.dataplane().prev.is_empty(),
            "{:?}",
            fourth.dataplane().ops
        );
    }

    #[test]
    fn a_previous_table_from_the_maps_names_a_retired_backend_by_its_key() {
        let old = [("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)];
        let new = [("10.0.0.1", 1), ("10.0.0.2", 1)];
        let mut first = Reconciler::new(Recorder::default(), Assignments::default());
        first.set_clock(test_clock);
        first.apply(&config_sc(&old)).unwrap();
        let id3 = ids(&first)["web/10.0.0.3"];
        // Restarted on a config without 10.0.0.3: it is retired, the served table kept.
        let restart = |before: &Reconciler<Recorder>, saved| {
            let mut r = Reconciler::new(before.dataplane().clone(), before.assignments().clone());
            r.set_clock(test_clock);
            r.restore_previous(saved);
            r.apply(&config_sc(&new)).unwrap();
            r
        };
        let second = restart(&first, BTreeMap::new());
        assert!(second.assignments().retired.contains_key("web/10.0.0.3"));
        // Started again: the previous table comes from the maps, 10.0.0.3 by its key.
        let third = restart(&second, second.saved_previous());
        let previous = third.tables()["10.200.0.1:80/tcp"].previous.as_ref();
        let members = &previous.expect("kept from the maps").members;
        assert!(
            members.contains(&(id3, "web/10.0.0.3".to_owned())),
            "{members:?}"
        );
    }

    #[test]
    fn a_daemon_with_fresh_maps_rebuilds_the_saved_previous_table() {
        let old = [("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)];
        let new = [("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.4", 1)];
        let mut first = Reconciler::new(Recorder::default(), Assignments::default());
        first.set_clock(test_clock);
        first.apply(&config_sc(&old)).unwrap();
        first.apply(&config_sc(&new)).unwrap();
        let saved = first.saved_previous();
        let want = by_address(&first, &first.dataplane().prev[&0]);
        // Fresh maps, fresh ids: only the new config and the saved file.
        let mut second = Reconciler::new(Recorder::default(), Assignments::default());
        second.set_clock(test_clock);
        second.restore_previous(saved.clone());
        second.apply(&config_sc(&new)).unwrap();
        assert_eq!(by_address(&second, &second.dataplane().prev[&0]), want);
        // 10.0.0.3 is in no pool any more: back as retired, up, until the saved time.
        let retired = &second.assignments().retired["web/10.0.0.3"];
        assert_eq!(retired.until, saved["10.200.0.1:80/tcp"].until);
        assert_eq!(
            second.dataplane().backends[&retired.id].flags & backend_flags::UP,
            1
        );
        // An expired save is not restored.
        let mut third = Reconciler::new(Recorder::default(), Assignments::default());
        third.set_clock(test_clock);
        advance(301);
        third.restore_previous(saved);
        third.apply(&config_sc(&new)).unwrap();
        assert!(third.dataplane().prev.is_empty());
    }

    #[test]
    fn a_saved_previous_table_keeps_its_slot_holders_by_key_until_its_time() {
        let old = [("10.0.0.1", 1), ("10.0.0.2", 0), ("fd00::3", 1)];
        let new = [("10.0.0.1", 1), ("10.0.0.2", 0), ("10.0.0.4", 1)];
        let mut first = Reconciler::new(Recorder::default(), Assignments::default());
        first.set_clock(test_clock);
        first.apply(&config_sc(&old)).unwrap();
        first.apply(&config_sc(&new)).unwrap();
        assert_eq!(first.tables()["10.200.0.1:80/tcp"].generation, 2);
        let saved = first.saved_previous();
        let table = &saved["10.200.0.1:80/tcp"];
        // The drained 10.0.0.2 held no slot; the removed fd00::3 is named by its key.
        let members: Vec<(&str, IpAddr)> = table
            .members
            .iter()
            .map(|m| (m.key.as_str(), m.address))
            .collect();
        assert_eq!(
            members,
            [
                ("web/10.0.0.1", addr("10.0.0.1")),
                ("web/fd00::3", addr("fd00::3"))
            ]
        );
        // A successor restores it while its time is not up, and not from its time on.
        for (now, restored) in [(table.until - 1, true), (table.until, false)] {
            NOW.with(|n| n.set(now));
            let mut next = Reconciler::new(Recorder::default(), Assignments::default());
            next.set_clock(test_clock);
            next.restore_previous(saved.clone());
            next.apply(&config_sc(&new)).unwrap();
            assert_eq!(!next.dataplane().prev.is_empty(), restored, "at {now}");
            // Expired, it is never written, not even until the write's end drops it.
            let written = next.dataplane().ops.iter().any(|o| o.starts_with("prev"));
            assert_eq!(written, restored, "at {now}");
            if restored {
                // Back as retired, up, with its family.
                let id = next.assignments().retired["web/fd00::3"].id;
                let flags = next.dataplane().backends[&id].flags;
                assert_eq!(flags, backend_flags::UP | backend_flags::IPV6);
            }
        }
        NOW.with(|n| n.set(1_000));
    }

    #[test]
    fn each_vip_reports_the_diff_of_its_own_tables() {
        // Two Vips of one pool, with table sizes of their own.
        let two = |backends: &[(&str, u32)], sizes: [u32; 2]| {
            let mut c = config(backends);
            c.vips[0].table_size = sizes[0];
            let mut other = c.vips[0].clone();
            other.port = 81;
            other.table_size = sizes[1];
            c.vips.push(other);
            c
        };
        let old = [("10.0.0.1", 1), ("10.0.0.2", 1)];
        let new = [("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)];
        // The same tables before and different ones after; then different ones before and
        // the same one after: neither Vip may take the other's diff.
        for (before, after) in [([251, 251], [251, 257]), ([251, 257], [257, 257])] {
            let mut r = Reconciler::new(Recorder::default(), Assignments::default());
            r.apply(&two(&old, before)).unwrap();
            let old_tables = r.dataplane().tables.clone();
            let report = r.apply(&two(&new, after)).unwrap();
            assert_eq!(report.tables.len(), 2);
            for (endpoint, diff) in &report.tables {
                let id = r.assignments().vips[endpoint].id;
                let want = maglev::diff(&old_tables[&id], &r.dataplane().tables[&id]);
                assert_eq!(*diff, want, "{endpoint}: {before:?} then {after:?}");
            }
        }
    }

    fn addr(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn web(address: &str) -> (String, IpAddr) {
        ("web".to_owned(), addr(address))
    }

    /// The ids holding slots in Vip 0's table, as the data plane has it.
    fn members(r: &Reconciler<Recorder>) -> BTreeSet<u32> {
        r.dataplane().tables[&0].slots().iter().copied().collect()
    }

    fn up(r: &Reconciler<Recorder>, id: u32) -> bool {
        r.dataplane().backends[&id].flags & backend_flags::UP != 0
    }

    #[test]
    fn a_report_is_empty_only_without_changes_and_says_what_changed() {
        let empty = Report::default();
        assert!(empty.is_empty());
        assert_eq!(empty.to_string(), "no change\n");
        // A Vip left without backends is not a change by itself.
        let only_empty_vips = Report {
            empty_vips: vec!["v".into()],
            ..Report::default()
        };
        assert!(only_empty_vips.is_empty());
        let diff = maglev::diff(
            &maglev::build(&[], 7, 0),
            &maglev::build(&[MaglevBackend::new(1, addr("10.0.0.1"), 1)], 7, 0),
        );
        let each: [fn(&mut Report, &maglev::TableDiff); 6] = [
            |r, _| r.vips_added.push("va".into()),
            |r, _| r.vips_removed.push("vr".into()),
            |r, _| r.vips_changed.push("vc".into()),
            |r, _| r.backends_added.push("ba".into()),
            |r, _| r.backends_removed.push("br".into()),
            |r, d| r.tables.push(("vt".into(), d.clone())),
        ];
        let mut all = Report::default();
        for (i, add) in each.iter().enumerate() {
            let mut one = Report::default();
            add(&mut one, &diff);
            assert!(!one.is_empty(), "change {i}");
            add(&mut all, &diff);
        }
        all.empty_vips.push("ve".into());
        assert_eq!(
            all.to_string(),
            format!(
                "vips added: va\nvips removed: vr\nvips changed: vc\nbackends added: ba\n\
                 backends removed: br\ntable vt: {diff}\nvips with no usable backend: ve\n"
            )
        );
    }

    #[test]
    fn a_run_time_drain_empties_its_slots_keeps_it_up_and_lasts_until_undrained() {
        let mut r = Reconciler::new(Recorder::default(), Assignments::default());
        let backends = [("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)];
        r.apply(&config(&backends)).unwrap();
        let id2 = ids(&r)["web/10.0.0.2"];
        assert!(!r.is_drained("web", addr("10.0.0.2")));

        let (pools, report) = r.set_drained(addr("10.0.0.2"), true).unwrap();
        assert_eq!(pools, ["web"]);
        assert_eq!(report.tables.len(), 1);
        assert!(
            !members(&r).contains(&id2),
            "no new flow to a drained backend"
        );
        assert!(up(&r, id2), "its connections keep it");
        assert!(r.is_drained("web", addr("10.0.0.2")));
        assert!(!r.is_drained("web", addr("10.0.0.1")));
        assert_eq!(members(&r).len(), 2);

        // A reload keeps the drain.
        r.apply(&config(&backends)).unwrap();
        assert!(!members(&r).contains(&id2));
        // An address no pool has: nothing to drain.
        let (pools, report) = r.set_drained(addr("10.9.9.9"), true).unwrap();
        assert!(pools.is_empty() && report.is_empty());

        let (pools, _) = r.set_drained(addr("10.0.0.2"), false).unwrap();
        assert_eq!(pools, ["web"]);
        assert!(members(&r).contains(&id2));
        assert!(!r.is_drained("web", addr("10.0.0.2")));

        // A drained backend removed from the config comes back undrained.
        r.set_drained(addr("10.0.0.3"), true).unwrap();
        r.apply(&config(&backends[..2])).unwrap();
        r.apply(&config(&backends)).unwrap();
        assert!(!r.is_drained("web", addr("10.0.0.3")));
        assert!(members(&r).contains(&ids(&r)["web/10.0.0.3"]));
    }

    #[test]
    fn backends_a_former_daemon_had_down_or_drained_start_so() {
        let mut r = Reconciler::new(Recorder::default(), Assignments::default());
        r.set_initially_down(&[web("10.0.0.1")]);
        r.set_initially_drained(&[web("10.0.0.2")]);
        assert!(r.down_backends().is_empty(), "no config yet");
        r.apply(&config(&[
            ("10.0.0.1", 1),
            ("10.0.0.2", 1),
            ("10.0.0.3", 1),
        ]))
        .unwrap();
        let ids = ids(&r);
        let (id1, id2, id3) = (
            ids["web/10.0.0.1"],
            ids["web/10.0.0.2"],
            ids["web/10.0.0.3"],
        );
        assert_eq!(members(&r), BTreeSet::from([id3]));
        assert!(!up(&r, id1) && up(&r, id2) && up(&r, id3));
        assert_eq!(r.down_backends(), [web("10.0.0.1")]);
        assert!(!r.is_up("web", addr("10.0.0.1")));
        assert!(r.is_up("web", addr("10.0.0.2")));
        assert!(r.is_drained("web", addr("10.0.0.2")));
        // Health says it is back: it gets its slots again.
        r.set_health(&[("web".into(), addr("10.0.0.1"), true)])
            .unwrap();
        assert!(members(&r).contains(&id1) && up(&r, id1));
        assert!(r.down_backends().is_empty());
    }

    #[test]
    fn backends_a_reload_adds_to_checked_pools_start_down_once_gated() {
        let checked = |backends: &[(&str, u32)]| {
            let mut c = config(backends);
            c.pools.get_mut("web").unwrap().health_check.kind = CheckKind::Tcp;
            c
        };
        for gated in [false, true] {
            let mut r = Reconciler::new(Recorder::default(), Assignments::default());
            if gated {
                r.gate_new_backends_on_health();
            }
            // At a first start, every backend starts up.
            r.apply(&checked(&[("10.0.0.1", 1)])).unwrap();
            assert!(r.down_backends().is_empty());
            r.apply(&checked(&[("10.0.0.1", 1), ("10.0.0.2", 1)]))
                .unwrap();
            let id2 = ids(&r)["web/10.0.0.2"];
            assert_eq!(up(&r, id2), !gated, "gated {gated}");
            assert_eq!(members(&r).contains(&id2), !gated, "gated {gated}");
            // A pool without checks has nothing to wait for.
            r.apply(&config(&[
                ("10.0.0.1", 1),
                ("10.0.0.2", 1),
                ("10.0.0.3", 1),
            ]))
            .unwrap();
            assert!(up(&r, ids(&r)["web/10.0.0.3"]), "gated {gated}");
        }
    }

    #[test]
    fn refreshing_next_hops_writes_a_new_fib_generation() {
        let mut r = Reconciler::new(Recorder::default(), Assignments::default());
        r.refresh_next_hops().unwrap();
        assert!(r.dataplane().fib_generations.is_empty(), "no config yet");
        r.apply(&config(&[("10.0.0.1", 1)])).unwrap();
        let first = *r.dataplane().fib_generations.last().unwrap();
        r.refresh_next_hops().unwrap();
        r.refresh_next_hops().unwrap();
        assert_eq!(r.dataplane().fib_generations[1..], [first + 1, first + 2]);
        assert_eq!(r.assignments().fib_generation, first + 2);
        // It never wraps to 0 (the data plane's "never looked up").
        r.assignments.fib_generation = u32::MAX;
        r.refresh_next_hops().unwrap();
        assert_eq!(r.dataplane().fib_generations.last(), Some(&1));
    }

    #[test]
    fn backends_are_flagged_with_their_family() {
        let mut r = Reconciler::new(Recorder::default(), Assignments::default());
        r.apply(&config(&[("10.0.0.1", 1), ("fd00::1", 1)]))
            .unwrap();
        let ids = ids(&r);
        let flags = |r: &Reconciler<Recorder>, key: &str| r.dataplane().backends[&ids[key]].flags;
        assert_eq!(flags(&r, "web/10.0.0.1"), backend_flags::UP);
        let v6 = backend_flags::IPV6;
        assert_eq!(flags(&r, "web/fd00::1"), backend_flags::UP | v6);
        // Health transitions keep the family.
        for up in [false, true] {
            r.set_health(&[("web".into(), addr("fd00::1"), up)])
                .unwrap();
            let want = if up { backend_flags::UP } else { 0 };
            assert_eq!(flags(&r, "web/fd00::1"), want | v6, "up {up}");
        }
    }

    #[test]
    fn an_installed_table_names_exactly_the_backends_holding_slots() {
        let mut r = Reconciler::new(Recorder::default(), Assignments::default());
        let mut c = config(&[("10.0.0.1", 1), ("10.0.0.2", 0), ("10.0.0.3", 2)]);
        for (i, b) in c
            .pools
            .get_mut("web")
            .unwrap()
            .backends
            .iter_mut()
            .enumerate()
        {
            b.name = format!("be{}", i + 1);
        }
        r.apply(&c).unwrap();
        let ids = ids(&r);
        let named = &r.tables()["10.200.0.1:80/tcp"].members;
        assert_eq!(
            *named,
            [
                (ids["web/10.0.0.1"], "be1".to_owned()),
                (ids["web/10.0.0.3"], "be3".to_owned())
            ]
        );
        let holding: BTreeSet<u32> = named.iter().map(|(id, _)| *id).collect();
        assert_eq!(holding, members(&r));
    }

    #[test]
    fn a_reload_reports_the_vips_whose_settings_changed_and_only_those() {
        let two = |echo: bool| {
            let mut c = config(&[("10.0.0.1", 1)]);
            let mut other = c.vips[0].clone();
            other.port = 81;
            other.icmp_echo = echo;
            c.vips.push(other);
            c
        };
        let mut r = Reconciler::new(Recorder::default(), Assignments::default());
        let report = r.apply(&two(true)).unwrap();
        assert_eq!(report.vips_added.len(), 2);
        assert!(report.vips_changed.is_empty());
        let report = r.apply(&two(true)).unwrap();
        assert!(
            report.vips_changed.is_empty() && report.is_empty(),
            "{report}"
        );
        let report = r.apply(&two(false)).unwrap();
        assert_eq!(report.vips_changed, ["10.200.0.1:81/tcp"]);
        assert!(report.vips_added.is_empty());
    }

    #[test]
    fn a_config_over_capacity_is_refused_before_anything_is_written() {
        let backends = [("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)];
        let with = |max_backends: u32, max_vips: u32| {
            let mut c = config(&backends);
            c.global.max_backends = max_backends;
            c.global.max_vips = max_vips;
            c
        };
        // Three members and id 0 reserved: four ids; one Vip.
        for (max_backends, max_vips, fits) in [(4, 1, true), (3, 1, false), (4, 0, false)] {
            let mut r = Reconciler::new(Recorder::default(), Assignments::default());
            match r.apply(&with(max_backends, max_vips)) {
                Ok(_) => assert!(fits, "{max_backends} {max_vips}"),
                Err(ReconcileError::Capacity(message)) => {
                    assert!(!fits, "{max_backends} {max_vips}: {message}");
                    assert!(r.dataplane().ops.is_empty());
                    assert!(r.dataplane().fib_generations.is_empty());
                    assert!(r.config().is_none());
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn config(backends: &[(&str, u32)]) -> Config {
        let mut yaml = String::from(
            "interfaces:\n  - name: eth0\nvips:\n  - address: 10.200.0.1\n    port: 80\n    \
             protocol: tcp\n    table_size: 251\n    pool: web\npools:\n  web:\n    backends:\n",
        );
        for (addr, weight) in backends {
            yaml += &format!("      - address: {addr}\n        weight: {weight}\n");
        }
        let mut config = Config::parse(&yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
        // The tests of second chance turn it on; the others test what happens without.
        config.global.second_chance = std::time::Duration::ZERO;
        config
    }

    /// `config` with second chance on, as by default (5 minutes).
    fn config_sc(backends: &[(&str, u32)]) -> Config {
        let mut config = config(backends);
        config.global.second_chance = crate::config::DEFAULT_SECOND_CHANCE;
        config
    }

    fn ids(r: &Reconciler<Recorder>) -> BTreeMap<String, u32> {
        r.assignments()
            .backends
            .iter()
            .map(|(k, a)| (k.clone(), a.id))
            .collect()
    }

    #[test]
    fn ids_stay_stable_when_other_backends_come_and_go() {
        let mut r = Reconciler::new(Recorder::default(), Assignments::default());
        r.apply(&config(&[
            ("10.0.0.1", 1),
            ("10.0.0.2", 1),
            ("10.0.0.3", 1),
        ]))
        .unwrap();
        let before = ids(&r);
        r.apply(&config(&[
            ("10.0.0.2", 1),
            ("10.0.0.3", 1),
            ("10.0.0.4", 1),
        ]))
        .unwrap();
        let after = ids(&r);
        for key in ["web/10.0.0.2", "web/10.0.0.3"] {
            assert_eq!(before[key], after[key], "{key} kept its id");
        }
        assert!(!after.contains_key("web/10.0.0.1"));
        // The new backend is assigned before the old one is released: a fresh id.
        assert!(
            !before.values().any(|&id| id == after["web/10.0.0.4"]),
            "{before:?} {after:?}"
        );
        let generations: BTreeSet<u32> = r
            .assignments()
            .backends
            .values()
            .map(|a| a.generation)
            .collect();
        assert_eq!(
            generations.len(),
            3,
            "every assignment has its own generation"
        );
    }

    #[test]
    fn a_removed_backend_is_cleared_only_after_the_table_no_longer_names_it() {
        let mut r = Reconciler::new(Recorder::default(), Assignments::default());
        r.apply(&config(&[("10.0.0.1", 1), ("10.0.0.2", 1)]))
            .unwrap();
        let removed = ids(&r)["web/10.0.0.1"];
        r.dataplane_mut().ops.clear();
        r.apply(&config(&[("10.0.0.2", 1)])).unwrap();
        let ops = &r.dataplane().ops;
        let table = ops
            .iter()
            .position(|o| o.starts_with("table"))
            .expect("table swapped");
        let cleared = ops
            .iter()
            .position(|o| *o == format!("backend {removed} flags 0"))
            .expect("cleared");
        assert!(
            table < cleared,
            "table swap before the backend is cleared: {ops:?}"
        );
        assert!(!r.dataplane().tables[&0].slots().contains(&removed));
    }

    #[test]
    fn down_backend_leaves_the_table_and_gets_a_new_generation_draining_keeps_it_up() {
        let mut r = Reconciler::new(Recorder::default(), Assignments::default());
        r.apply(&config(&[
            ("10.0.0.1", 1),
            ("10.0.0.2", 1),
            ("10.0.0.3", 0),
        ]))
        .unwrap();
        let id1 = ids(&r)["web/10.0.0.1"];
        let id3 = ids(&r)["web/10.0.0.3"];
        assert!(
            !r.dataplane().tables[&0].slots().contains(&id3),
            "weight 0 holds no slot"
        );
        assert_eq!(
            r.dataplane().backends[&id3].flags & backend_flags::UP,
            backend_flags::UP,
            "draining stays up"
        );
        let generation = r.dataplane().backends[&id1].generation;

        let report = r
            .set_health(&[("web".into(), "10.0.0.1".parse().unwrap(), false)])
            .unwrap();
        assert_eq!(report.tables.len(), 1, "one table rebuilt");
        assert!(!r.dataplane().tables[&0].slots().contains(&id1));
        assert_eq!(r.dataplane().backends[&id1].flags & backend_flags::UP, 0);
        assert_ne!(
            r.dataplane().backends[&id1].generation,
            generation,
            "old entries voided"
        );

        r.set_health(&[("web".into(), "10.0.0.1".parse().unwrap(), true)])
            .unwrap();
        assert!(
            r.dataplane().tables[&0].slots().contains(&id1),
            "back in the table"
        );
        // Transitions of backends that are not configured are ignored.
        let report = r
            .set_health(&[("web".into(), "10.9.9.9".parse().unwrap(), false)])
            .unwrap();
        assert!(report.is_empty());
    }

    #[test]
    fn a_dry_run_reports_the_share_of_flows_that_move() {
        let mut r = Reconciler::new(DryRun, Assignments::default());
        r.apply(&config(&[
            ("10.0.0.1", 1),
            ("10.0.0.2", 1),
            ("10.0.0.3", 1),
            ("10.0.0.4", 1),
        ]))
        .unwrap();
        let report = r
            .apply(&config(&[
                ("10.0.0.1", 1),
                ("10.0.0.2", 1),
                ("10.0.0.3", 1),
            ]))
            .unwrap();
        let (_, diff) = &report.tables[0];
        assert!(
            (0.24..0.30).contains(&diff.moved_fraction),
            "about a quarter moves: {diff}"
        );
        assert_eq!(report.backends_removed, vec!["web/10.0.0.4".to_string()]);
    }

    /// A data plane that keeps what a packet would see and fails its `fail_at`th write
    /// (counting from 0) once, or every write from then on when `stuck`.
    #[derive(Default)]
    struct Faulty {
        writes: usize,
        fail_at: Option<usize>,
        stuck: bool,
        backends: BTreeMap<u32, Backend>,
        vips: BTreeMap<u32, (VipKey, VipState)>,
        tables: BTreeMap<u32, MaglevTable>,
        addrs: BTreeMap<IpAddr, u32>,
        filter: Vec<IpAddr>,
    }

    impl Faulty {
        fn write(&mut self) -> Result<(), DataplaneError> {
            let n = self.writes;
            self.writes += 1;
            match self.fail_at {
                Some(at) if n == at || (self.stuck && n >= at) => Err(DataplaneError::Pin {
                    path: "/injected".into(),
                    error: format!("injected failure of write {n}"),
                }),
                _ => Ok(()),
            }
        }

        /// What packets see, without ids or generations: per Vip key, its flags and its
        /// table as backend addresses; the live backends; Vip address flags; the filter.
        fn view(&self) -> String {
            let addr_of = |id: u32| {
                self.backends
                    .get(&id)
                    .map(|b| format!("{:?}/{}", b.addr, b.flags))
                    .unwrap_or_else(|| format!("MISSING {id}"))
            };
            let mut out = String::new();
            for (id, (key, state)) in &self.vips {
                let table: Vec<String> = self
                    .tables
                    .get(id)
                    .map(|t| t.slots().iter().map(|b| addr_of(*b)).collect())
                    .unwrap_or_default();
                out += &format!("vip {key:?} flags {} table {table:?}\n", state.flags);
            }
            let mut live: Vec<String> = self
                .backends
                .values()
                .filter(|b| *b != &Backend::default())
                .map(|b| format!("{:?}/{}", b.addr, b.flags))
                .collect();
            live.sort();
            out += &format!("backends {live:?}\naddrs {:?}\n", self.addrs);
            let mut filter = self.filter.clone();
            filter.sort();
            out += &format!("filter {filter:?}\n");
            out
        }
    }

    impl DataplaneOps for Faulty {
        fn set_global(&mut self, _: &GlobalConfig) -> Result<(), DataplaneError> {
            self.write()
        }
        fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), DataplaneError> {
            self.write()?;
            self.backends.insert(id, *backend);
            Ok(())
        }
        fn set_vip_filter(&mut self, addrs: &[IpAddr]) -> Result<(), DataplaneError> {
            self.write()?;
            self.filter = addrs.to_vec();
            Ok(())
        }
        fn set_vip_addr(
            &mut self,
            addr: IpAddr,
            value: Option<VipAddr>,
        ) -> Result<(), DataplaneError> {
            self.write()?;
            match value {
                Some(v) => self.addrs.insert(addr, v.flags),
                None => self.addrs.remove(&addr),
            };
            Ok(())
        }
        fn set_vip(
            &mut self,
            id: u32,
            key: &VipKey,
            state: &VipState,
        ) -> Result<(), DataplaneError> {
            self.write()?;
            self.vips.insert(id, (*key, *state));
            Ok(())
        }
        fn remove_vip(&mut self, id: u32, _: &VipKey) -> Result<(), DataplaneError> {
            self.write()?;
            self.vips.remove(&id);
            self.tables.remove(&id);
            Ok(())
        }
        fn install_table(&mut self, id: u32, table: &MaglevTable) -> Result<(), DataplaneError> {
            self.write()?;
            self.tables.insert(id, table.clone());
            Ok(())
        }
        fn reset_traffic(&mut self, _: bool, _: u32) -> Result<(), DataplaneError> {
            self.write()
        }
    }

    /// Two configs that differ in every way a reload can: a Vip added and one removed,
    /// backends added, removed and reweighted, a Vip address gone.
    fn before_and_after() -> (Config, Config) {
        let parse = |yaml: &str| Config::parse(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
        let head = "interfaces:\n  - name: eth0\nvips:\n";
        let vip = |addr: &str, port: u16, pool: &str| {
            format!(
                "  - address: {addr}\n    port: {port}\n    protocol: tcp\n    table_size: 251\n    pool: {pool}\n"
            )
        };
        let pool = |name: &str, members: &[(&str, u32)]| {
            let mut yaml = format!("  {name}:\n    backends:\n");
            for (addr, weight) in members {
                yaml += &format!("      - address: {addr}\n        weight: {weight}\n");
            }
            yaml
        };
        let before = format!(
            "{head}{}{}pools:\n{}{}",
            vip("10.200.0.1", 80, "web"),
            vip("10.200.0.9", 80, "old"),
            pool("web", &[("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)]),
            pool("old", &[("10.0.0.9", 1)]),
        );
        let after = format!(
            "{head}{}{}pools:\n{}{}",
            vip("10.200.0.1", 80, "web"),
            vip("10.200.0.2", 443, "new"),
            pool("web", &[("10.0.0.2", 3), ("10.0.0.3", 1), ("10.0.0.4", 1)]),
            pool("new", &[("10.0.0.5", 1), ("10.0.0.6", 1)]),
        );
        // Without second chance: with it, a Backend the failed config added stays retired
        // (it may have had flows), so the data plane is not the old config's alone.
        let (mut before, mut after) = (parse(&before), parse(&after));
        before.global.second_chance = std::time::Duration::ZERO;
        after.global.second_chance = std::time::Duration::ZERO;
        (before, after)
    }

    #[test]
    fn a_reload_that_fails_at_any_write_leaves_the_old_config_whole_then_retries() {
        let (before, after) = before_and_after();
        let view_of = |config: &Config| {
            let mut r = Reconciler::new(Faulty::default(), Assignments::default());
            r.apply(config).unwrap();
            r.dataplane().view()
        };
        let (old_view, new_view) = (view_of(&before), view_of(&after));
        let writes = {
            let mut r = Reconciler::new(Faulty::default(), Assignments::default());
            r.apply(&before).unwrap();
            let start = r.dataplane().writes;
            r.apply(&after).unwrap();
            r.dataplane().writes - start
        };
        assert!(writes > 10, "a reload makes many writes: {writes}");
        for n in 0..writes {
            let mut r = Reconciler::new(Faulty::default(), Assignments::default());
            r.apply(&before).unwrap();
            r.dataplane_mut().fail_at = Some(r.dataplane().writes + n);
            assert!(r.apply(&after).is_err(), "write {n} fails the reload");
            assert_eq!(
                r.dataplane().view(),
                old_view,
                "after a failure at write {n}: the old config whole"
            );
            assert_eq!(r.config(), Some(&before), "the old config stays in force");
            // Health transitions still rebuild tables meanwhile.
            let report = r
                .set_health(&[("web".into(), "10.0.0.1".parse().unwrap(), false)])
                .unwrap();
            assert_eq!(report.tables.len(), 1, "write {n}: {report}");
            r.set_health(&[("web".into(), "10.0.0.1".parse().unwrap(), true)])
                .unwrap();
            // The retry applies the new config whole.
            r.dataplane_mut().fail_at = None;
            r.apply(&after).unwrap();
            assert_eq!(r.dataplane().view(), new_view, "the retry after write {n}");
        }
    }

    #[test]
    fn a_data_plane_that_keeps_failing_never_panics_and_recovers() {
        let (before, after) = before_and_after();
        let mut r = Reconciler::new(Faulty::default(), Assignments::default());
        r.apply(&before).unwrap();
        r.dataplane_mut().fail_at = Some(r.dataplane().writes + 3);
        r.dataplane_mut().stuck = true;
        for _ in 0..3 {
            assert!(r.apply(&after).is_err());
            assert_eq!(r.config(), Some(&before));
        }
        // A health transition while the kernel refuses writes is reported, not lost.
        assert!(
            r.set_health(&[("web".into(), "10.0.0.2".parse().unwrap(), false)])
                .is_err()
        );
        r.dataplane_mut().fail_at = None;
        r.apply(&after).unwrap();
        let mut fresh = Reconciler::new(Faulty::default(), Assignments::default());
        fresh.apply(&after).unwrap();
        fresh
            .set_health(&[("web".into(), "10.0.0.2".parse().unwrap(), false)])
            .unwrap();
        assert_eq!(r.dataplane().view(), fresh.dataplane().view());
    }

    #[test]
    fn a_backend_going_down_is_flagged_after_its_tables_swap_and_one_coming_up_before() {
        let mut r = Reconciler::new(Recorder::default(), Assignments::default());
        r.apply(&config(&[("10.0.0.1", 1), ("10.0.0.2", 1)]))
            .unwrap();
        let id = ids(&r)["web/10.0.0.1"];
        r.dataplane_mut().ops.clear();
        r.set_health(&[("web".into(), "10.0.0.1".parse().unwrap(), false)])
            .unwrap();
        assert_eq!(
            r.dataplane().ops,
            ["table 0".to_owned(), format!("backend {id} flags 0")],
            "down: the table without it first"
        );
        r.dataplane_mut().ops.clear();
        r.set_health(&[("web".into(), "10.0.0.1".parse().unwrap(), true)])
            .unwrap();
        assert_eq!(
            r.dataplane().ops,
            [
                format!("backend {id} flags {}", backend_flags::UP),
                "table 0".to_owned()
            ],
            "up: flagged before a table names it"
        );
    }

    #[test]
    fn a_reload_rebuilds_only_the_vips_whose_inputs_changed() {
        let yaml = |web2: u32| {
            format!(
                "interfaces:\n  - name: eth0\nvips:\n  - address: 10.200.0.1\n    port: 80\n    \
                 protocol: tcp\n    table_size: 251\n    pool: a\n  - address: 10.200.0.2\n    \
                 port: 80\n    protocol: tcp\n    table_size: 251\n    pool: b\npools:\n  a:\n    \
                 backends:\n      - address: 10.0.0.1\n  b:\n    backends:\n      - address: 10.0.0.2\n      \
                 - address: 10.0.0.3\n        weight: {web2}\n"
            )
        };
        let parse = |y: &str| Config::parse(y, "t.yaml").unwrap_or_else(|e| panic!("{e}"));
        let mut r = Reconciler::new(Recorder::default(), Assignments::default());
        r.apply(&parse(&yaml(1))).unwrap();
        r.dataplane_mut().ops.clear();
        let report = r.apply(&parse(&yaml(2))).unwrap();
        let tables: Vec<&String> = r
            .dataplane()
            .ops
            .iter()
            .filter(|o| o.starts_with("table"))
            .collect();
        assert_eq!(tables, ["table 1"], "only pool b's vip: {report}");
        assert_eq!(report.tables.len(), 1);
    }
}

/// The pure pieces of what reconcile writes (mutants of each survived the other tests).
#[cfg(test)]
mod written_values {
    use super::*;

    fn parse(extra_global: &str, vips: &str) -> Config {
        let yaml = format!(
            "global:\n  hash_seed: 77\n{extra_global}interfaces:\n  - name: eth0\nvips:\n{vips}\
             pools:\n  web:\n    backends: []\n"
        );
        Config::parse(&yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"))
    }

    const ONE_VIP: &str =
        "  - address: 10.200.0.1\n    port: 80\n    protocol: tcp\n    pool: web\n";

    #[test]
    fn global_config_takes_seed_and_encapsulation_prefixes() {
        let c = parse(
            "  encap_source_v4: 172.16.0.0/12\n  encap_source_v6: fd00:ffff::/96\n",
            ONE_VIP,
        );
        let g = global_config(&c, 9);
        assert_eq!((g.hash_seed, g.fib_generation), (77, 9));
        assert_eq!(g.encap_src4_hostmask, 0x000F_FFFF);
        assert_eq!(g.encap_src4_base, 0xAC10_0000);
        let v6: IpAddr = "fd00:ffff::".parse().unwrap();
        assert_eq!(g.encap_src6_base, addr_words(v6));
        let host = parse("  encap_source_v4: 172.16.0.9/32\n", ONE_VIP);
        let g = global_config(&host, 1);
        assert_eq!((g.encap_src4_base, g.encap_src4_hostmask), (0xAC10_0009, 0));
    }

    #[test]
    fn vip_keys_and_wildcard_flags() {
        let key = vip_key("10.200.0.1".parse().unwrap(), 80, Protocol::Tcp);
        assert_eq!(
            (key.port, key.proto, key.family),
            (80u16.to_be(), 6, FAMILY_V4)
        );
        assert_eq!(key.addr, addr_words("10.200.0.1".parse().unwrap()));
        let key6 = vip_key("fd00::1".parse().unwrap(), 53, Protocol::Udp);
        assert_eq!((key6.proto, key6.family), (17, FAMILY_V6));

        let c = parse(
            "",
            "  - address: 10.200.0.1\n    port: 80\n    protocol: tcp\n    pool: web\n\
             \x20 - address: 10.200.0.2\n    port: 0\n    protocol: tcp\n    pool: web\n\
             \x20 - address: 10.200.0.2\n    port: 0\n    protocol: udp\n    pool: web\n    icmp_echo: false\n\
             \x20 - address: 10.200.0.3\n    port: 80\n    protocol: tcp\n    pool: web\n    icmp_echo: false\n    fragments: track\n",
        );
        let flags = vip_addr_flags_of(&c);
        let a1: IpAddr = "10.200.0.1".parse().unwrap();
        let a2: IpAddr = "10.200.0.2".parse().unwrap();
        let a3: IpAddr = "10.200.0.3".parse().unwrap();
        assert_eq!(flags.len(), 3);
        assert_eq!(flags[&a1], vip_addr_flags::ICMP_ECHO);
        // One Vip of the address answering pings is enough.
        assert_eq!(
            flags[&a2],
            vip_addr_flags::ANY_PORT_TCP | vip_addr_flags::ANY_PORT_UDP | vip_addr_flags::ICMP_ECHO
        );
        assert_eq!(flags[&a3], vip_addr_flags::FRAGMENTS);
    }
}
