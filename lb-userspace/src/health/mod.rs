//! Health checks: TCP connect, HTTP/1.1 `GET`, UDP exchange, or none, per pool; Backends
//! go down after `fall` consecutive failed checks and up after `rise` passed ones, and a
//! flapping Backend is held down (flap damping).
//!
//! Checks run as tokio tasks on the daemon's runtime, never on its loop: one task per
//! distinct probe target (address + check settings: a Backend in several pools with the
//! same check is probed once and the result counts for every such pool), each probe
//! bounded by its own timeout, and no limit on probes in flight but one per target (so
//! no probe ever waits for a slot: 100 hanging Backends delay nobody; the daemon raises
//! its open-files limit for the sockets), so a hanging Backend cannot stall the others. Only state changes are sent to the daemon, as
//! [`HealthEvent`]s; Backends start up (or as given by [`Options::initial_down`]).
//!
//! Files: `plan.rs` (which probes to run), `probe.rs` (one probe), `state.rs` (rise/fall
//! and flap damping), `task.rs` (the loop of one target), `stats.rs` (counters for the
//! metrics exporter).

mod plan;
mod probe;
mod state;
mod stats;
mod task;

use std::{net::IpAddr, sync::Arc, time::Instant};

use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinHandle,
};
use tracing::info;

pub use plan::{Member, Plan, Target};
pub use probe::{Failure, Probe, ProbeKind, default_host};
pub use state::{BackendHealth, Damping, Step, Transition};
pub use stats::{BackendStats, HealthStats, Observation, Observer};
pub use task::jittered;

use crate::config::Config;

/// Probes in flight at once, across every pool, by default: no limit but the number of
/// targets (each has at most one probe in flight). A lower limit makes probes wait for a
/// slot, which would delay checks behind hanging ones.
pub const MAX_IN_FLIGHT: usize = Semaphore::MAX_PERMITS;

/// A Backend of a pool changed state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthEvent {
    pub pool: String,
    pub address: IpAddr,
    pub up: bool,
    /// Why: "timeout after 100ms", "connection refused", "HTTP 500", "2 consecutive
    /// checks passed", ...
    pub reason: String,
    /// When the check that crossed the threshold finished (detection-to-swap latency is
    /// measured from here).
    pub detected_at: Instant,
}

/// How a [`Checker`] starts.
#[derive(Clone)]
pub struct Options {
    /// (pool, address) pairs that start down (carried over from the previous checker on a
    /// reload): they need `rise` passed checks to come up. Others start up.
    pub initial_down: Vec<(String, IpAddr)>,
    /// Where the counters go; pass the previous checker's [`Checker::stats`] on a reload.
    pub stats: HealthStats,
    /// Called after every probe (e.g. to feed a latency histogram).
    pub observer: Option<Observer>,
    pub damping: Damping,
    /// Probes in flight at once.
    pub max_in_flight: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            initial_down: Vec::new(),
            stats: HealthStats::new(),
            observer: None,
            damping: Damping::DEFAULT,
            max_in_flight: MAX_IN_FLIGHT,
        }
    }
}

/// The running checks of one config. Dropping it stops them too.
pub struct Checker {
    tasks: Vec<JoinHandle<()>>,
    stats: HealthStats,
}

impl Checker {
    /// Starts checking every Backend of `config` (inside a tokio runtime); transitions
    /// arrive on `events`. Backends start up.
    pub fn start(config: &Config, events: mpsc::Sender<HealthEvent>) -> Self {
        Self::start_with_options(config, events, Options::default())
    }

    /// [`Checker::start`], with the (pool, address) pairs of `initial_down` starting down
    /// (no event for them until they change).
    pub fn start_with(
        config: &Config,
        events: mpsc::Sender<HealthEvent>,
        initial_down: &[(String, IpAddr)],
    ) -> Self {
        Self::start_with_options(
            config,
            events,
            Options {
                initial_down: initial_down.to_vec(),
                ..Options::default()
            },
        )
    }

    /// [`Checker::start`] with every option. A Backend listed in `initial_down` whose pool
    /// has no check (`kind: none`) comes up at once, with an event.
    pub fn start_with_options(
        config: &Config,
        events: mpsc::Sender<HealthEvent>,
        options: Options,
    ) -> Self {
        let plan = Plan::new(config, &options.initial_down);
        options.stats.reset(plan.backends());
        let mut tasks = Vec::new();
        let revived: Vec<HealthEvent> = plan
            .unchecked
            .iter()
            .filter(|(_, m)| !m.up)
            .map(|(address, m)| HealthEvent {
                pool: m.pool.clone(),
                address: *address,
                up: true,
                reason: "no health check".into(),
                detected_at: Instant::now(),
            })
            .collect();
        if !revived.is_empty() {
            let events = events.clone();
            tasks.push(tokio::spawn(async move {
                for event in revived {
                    let _ = events.send(event).await;
                }
            }));
        }
        info!(
            probes = plan.targets.len(),
            unchecked = plan.unchecked.len(),
            down = plan
                .targets
                .iter()
                .flat_map(|t| &t.members)
                .filter(|m| !m.up)
                .count(),
            "health checks started"
        );
        let shared = Arc::new(task::Shared {
            semaphore: Semaphore::new(options.max_in_flight.max(1)),
            stats: options.stats.clone(),
            observer: options.observer,
            events,
            damping: options.damping,
        });
        tasks.extend(
            plan.targets
                .into_iter()
                .map(|target| tokio::spawn(task::run(target, Arc::clone(&shared)))),
        );
        Self {
            tasks,
            stats: options.stats,
        }
    }

    /// A checker that checks nothing.
    pub fn idle() -> Self {
        Self {
            tasks: Vec::new(),
            stats: HealthStats::new(),
        }
    }

    /// The counters (a handle: it stays live while the checks run).
    pub fn stats(&self) -> HealthStats {
        self.stats.clone()
    }

    /// The (pool, address) pairs this checker holds down now: what a reload passes to the
    /// next checker as `initial_down`.
    pub fn down_backends(&self) -> Vec<(String, IpAddr)> {
        self.stats.down()
    }

    /// Stops every check.
    pub fn stop(self) {}
}

impl Drop for Checker {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
