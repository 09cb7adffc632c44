//! Counters of the health checks, for the metrics exporter: a cloneable handle read at
//! scrape time, and an observer called after every probe (to feed a latency histogram).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use super::{probe::Failure, state::Step};

/// One probe's result, as passed to an [`Observer`].
#[derive(Clone, Copy, Debug)]
pub struct Observation<'a> {
    /// Every pool this probe's result counts for (one probe serves all pools that check
    /// this address the same way).
    pub pools: &'a [String],
    pub address: IpAddr,
    pub port: u16,
    /// `tcp`, `http` or `udp`.
    pub kind: &'static str,
    /// From the first connect to the verdict (the timeout itself for a timeout).
    pub latency: Duration,
    pub result: Result<(), &'a Failure>,
}

/// Called after every probe, on the probe's task: keep it short and non-blocking.
pub type Observer = Arc<dyn Fn(&Observation<'_>) + Send + Sync>;

/// The counters of one Backend in one pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub up: bool,
    /// Held down by flap damping right now.
    pub held: bool,
    /// Checks whose result counted for this pool (shared probes count once per pool).
    pub checks: u64,
    pub failures: u64,
    pub transitions: u64,
    /// Flap-damping holds started.
    pub damped: u64,
    pub last_latency: Option<Duration>,
    /// Reason of the last failed check.
    pub last_failure: Option<String>,
}

#[derive(Default)]
struct Inner {
    backends: BTreeMap<(String, IpAddr), BackendStats>,
    /// Failed probes by [`Failure::kind`] (each probe once, however many pools share it).
    failures: BTreeMap<&'static str, u64>,
    /// Probes sent.
    probes: u64,
}

/// A shared, cloneable view of the checks' counters. Hand the same handle to every
/// [`super::Checker`] of a daemon (reloads) so counters keep growing.
#[derive(Clone, Default)]
pub struct HealthStats {
    inner: Arc<Mutex<Inner>>,
}

impl HealthStats {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every Backend of the running config, by (pool, address).
    pub fn backends(&self) -> BTreeMap<(String, IpAddr), BackendStats> {
        self.lock().backends.clone()
    }

    pub fn backend(&self, pool: &str, address: IpAddr) -> Option<BackendStats> {
        self.lock()
            .backends
            .get(&(pool.to_owned(), address))
            .cloned()
    }

    /// Failed probes by reason label ([`Failure::KINDS`]); every label present.
    pub fn failures_by_reason(&self) -> BTreeMap<&'static str, u64> {
        let inner = self.lock();
        Failure::KINDS
            .iter()
            .map(|&kind| (kind, inner.failures.get(kind).copied().unwrap_or(0)))
            .collect()
    }

    /// Probes sent so far (a probe shared by several pools counts once).
    pub fn probes(&self) -> u64 {
        self.lock().probes
    }

    /// The (pool, address) pairs currently down.
    pub fn down(&self) -> Vec<(String, IpAddr)> {
        self.lock()
            .backends
            .iter()
            .filter(|(_, s)| !s.up)
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Keeps exactly `backends` (with their counters if already known), in the given
    /// state.
    pub(super) fn reset(&self, backends: impl IntoIterator<Item = ((String, IpAddr), bool)>) {
        let mut inner = self.lock();
        let mut old = std::mem::take(&mut inner.backends);
        for (key, up) in backends {
            let mut stats = old.remove(&key).unwrap_or_default();
            stats.up = up;
            stats.held = false;
            inner.backends.insert(key, stats);
        }
    }

    pub(super) fn record_probe(&self, result: Result<(), &Failure>) {
        let mut inner = self.lock();
        inner.probes += 1;
        if let Err(failure) = result {
            *inner.failures.entry(failure.kind()).or_default() += 1;
        }
    }

    /// One check result counted for `pool`, with what it did (`step`) and the state after
    /// it (`up`, `held`).
    pub(super) fn record_check(
        &self,
        pool: &str,
        address: IpAddr,
        latency: Duration,
        result: Result<(), &Failure>,
        (up, held): (bool, bool),
        step: &Step,
    ) {
        let mut inner = self.lock();
        let stats = inner
            .backends
            .entry((pool.to_owned(), address))
            .or_default();
        stats.checks += 1;
        stats.last_latency = Some(latency);
        if let Err(failure) = result {
            stats.failures += 1;
            stats.last_failure = Some(failure.to_string());
        }
        stats.up = up;
        stats.held = held;
        stats.transitions += u64::from(step.transition.is_some());
        stats.damped += u64::from(step.hold_started.is_some());
    }
}
