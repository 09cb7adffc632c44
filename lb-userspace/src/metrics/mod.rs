//! Prometheus metrics: the data plane's per-CPU counters, read from the pinned maps at
//! scrape time (`dataplane.rs`), and what the daemon knows — Backend health, health
//! checks, MaglevTables, reloads, build info — updated by the daemon after every
//! reconcile. The per-Vip and per-Backend series (`series.rs`) are written straight to
//! the text format (`text.rs`), so a scrape of thousands of Backends stays cheap;
//! `server.rs` serves everything over HTTP with `/healthz` and `/readyz`.
//!
//! Label vocabulary: `vip` (the Vip's name), `pool`, `backend` (the Backend's name in its
//! pool), `reason`, `result`, `action`, `interface`.

mod announce;
mod dataplane;
mod series;
mod server;
mod text;

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

pub use dataplane::counter_metric;
use prometheus::{
    Encoder as _, Gauge, Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
pub use server::{MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER, Server};
use tracing::warn;

use self::{dataplane::Maps, series::Inventory};
use crate::{
    config::Config,
    reconcile::{DataplaneOps, Reconciler, Report},
};

/// The daemon's version, and the git commit it was built from if the build recorded it
/// (`MLB_GIT_COMMIT` at compile time), for `mlb_build_info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_COMMIT: &str = match option_env!("MLB_GIT_COMMIT") {
    Some(commit) => commit,
    None => "unknown",
};

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Table rebuild buckets, seconds (one 65537-slot table builds in about a millisecond).
const REBUILD_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Every metric of the daemon. The per-Vip and per-Backend series live in an
/// [`Inventory`] written straight to the text format; the few others in a `prometheus`
/// registry.
pub struct Metrics {
    ready: AtomicBool,
    apply_failed: AtomicBool,
    detached: AtomicBool,
    pin_dir: PathBuf,
    /// The data plane's counter maps, opened at the first scrape or reconcile after the
    /// daemon pinned them.
    maps: Mutex<Option<Arc<Maps>>>,
    /// Whether reading the maps failed last time (to warn once per streak).
    maps_failing: AtomicBool,
    inventory: RwLock<Inventory>,
    registry: Registry,
    table_rebuild_duration: Histogram,
    reloads: IntCounterVec,
    last_reload_success: Gauge,
    build_info: IntGaugeVec,
    xdp_attached: IntGaugeVec,
    info: Mutex<Info>,
    /// Route health injection.
    pub announce: announce::AnnounceMetrics,
    no_usable_backend: IntGaugeVec,
    /// Vip names with a `no_usable_backend` series now.
    empty_vips: Mutex<Vec<String>>,
    /// The health checker's counters (flap damping), read at scrape time.
    health: Mutex<Option<crate::health::HealthStats>>,
    /// Interface → the XDP mode attached.
    attached: Mutex<std::collections::BTreeMap<String, String>>,
    damping_holds: prometheus::IntCounter,
    backends_held: prometheus::IntGauge,
}

/// Label values of `build_info` and `xdp_attached` now set.
#[derive(Default)]
struct Info {
    build: Vec<String>,
    /// (interface, XDP mode).
    interfaces: Vec<(String, String)>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The running kernel's release (`uname -r`).
fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |r| r.trim().to_owned())
}

impl Metrics {
    /// Metrics of a daemon whose data-plane maps are (or will be) pinned under `pin_dir`.
    pub fn new(pin_dir: impl Into<PathBuf>) -> Self {
        let registry = Registry::new();
        let register = |c: Box<dyn prometheus::core::Collector>| {
            registry.register(c).expect("unique metric names")
        };
        let table_rebuild_duration = Histogram::with_opts(
            HistogramOpts::new(
                "mlb_table_rebuild_duration_seconds",
                "Time of one reconcile that rebuilt MaglevTables: building and swapping in every table it changed.",
            )
            .buckets(REBUILD_BUCKETS.to_vec()),
        )
        .expect("valid");
        register(Box::new(table_rebuild_duration.clone()));
        let reloads = IntCounterVec::new(
            Opts::new(
                "mlb_config_reloads_total",
                "Config reloads (SIGHUP or file change), by result.",
            ),
            &["result"],
        )
        .expect("valid");
        register(Box::new(reloads.clone()));
        for result in ["success", "failure"] {
            reloads.with_label_values(&[result]);
        }
        let last_reload_success = Gauge::new(
            "mlb_config_last_reload_success_timestamp_seconds",
            "When the running config was last loaded successfully (start or reload), seconds since the Unix epoch.",
        )
        .expect("valid");
        register(Box::new(last_reload_success.clone()));
        let build_info = IntGaugeVec::new(
            Opts::new(
                "mlb_build_info",
                "Always 1: the daemon's version, git commit, kernel release and XDP mode(s).",
            ),
            &["version", "git_commit", "kernel", "xdp_mode"],
        )
        .expect("valid");
        register(Box::new(build_info.clone()));
        let xdp_attached = IntGaugeVec::new(
            Opts::new(
                "mlb_xdp_attached",
                "1 for each interface the XDP program is attached to, with its mode.",
            ),
            &["interface", "xdp_mode"],
        )
        .expect("valid");
        register(Box::new(xdp_attached.clone()));
        let announce = announce::AnnounceMetrics::new(&registry);
        let no_usable_backend = IntGaugeVec::new(
            Opts::new(
                "mlb_vip_no_usable_backend",
                "1 while the Vip's table has no usable backend (its packets are dropped or passed, per when_no_backend), else 0.",
            ),
            &["vip"],
        )
        .expect("valid");
        register(Box::new(no_usable_backend.clone()));
        let damping_holds = prometheus::IntCounter::new(
            "mlb_health_damping_holds_total",
            "Flap-damping holds started (a backend held down while its checks pass).",
        )
        .expect("valid");
        register(Box::new(damping_holds.clone()));
        let backends_held = prometheus::IntGauge::new(
            "mlb_health_backends_held",
            "Backends held down by flap damping right now.",
        )
        .expect("valid");
        register(Box::new(backends_held.clone()));
        Self {
            health: Mutex::new(None),
            attached: Mutex::new(Default::default()),
            damping_holds,
            backends_held,
            announce,
            no_usable_backend,
            empty_vips: Mutex::new(Vec::new()),
            ready: AtomicBool::new(false),
            apply_failed: AtomicBool::new(false),
            detached: AtomicBool::new(false),
            pin_dir: pin_dir.into(),
            maps: Mutex::new(None),
            maps_failing: AtomicBool::new(false),
            inventory: RwLock::new(Inventory::default()),
            registry,
            table_rebuild_duration,
            reloads,
            last_reload_success,
            build_info,
            xdp_attached,
            info: Mutex::new(Info::default()),
        }
    }

    /// The program is attached and the first config applied: `/readyz` answers 200 from
    /// now on, and the config's load time is recorded.
    pub fn set_ready(&self) {
        self.last_reload_success.set(now_seconds());
        self.ready.store(true, Ordering::Release);
    }

    /// The XDP mode each interface is attached in, for `mlb_xdp_attached` and
    /// `mlb_build_info` (instead of the configured one, which may be `auto`).
    pub fn set_attached(&self, modes: &std::collections::BTreeMap<String, String>) {
        *lock(&self.attached) = modes.clone();
    }

    /// The health checker's counters to export (flap damping); the same handle across
    /// reloads.
    pub fn set_health_stats(&self, stats: crate::health::HealthStats) {
        *lock(&self.health) = Some(stats);
    }

    /// The last apply failed in the kernel (retried): `/readyz` answers 503 until one
    /// succeeds.
    pub fn set_apply_failed(&self, failed: bool) {
        self.apply_failed.store(failed, Ordering::Release);
    }

    /// The program is not attached to some configured interface (its interface gone, its
    /// link removed): `/readyz` answers 503 while so.
    pub fn set_detached(&self, detached: bool) {
        self.detached.store(detached, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && !self.apply_failed.load(Ordering::Acquire)
            && !self.detached.load(Ordering::Acquire)
    }

    /// One config reload, successful (`true`) or refused.
    pub fn reload(&self, ok: bool) {
        self.reloads
            .with_label_values(&[if ok { "success" } else { "failure" }])
            .inc();
        if ok {
            self.last_reload_success.set(now_seconds());
        }
    }

    /// One health check of `backend` (its name) in `pool`: how long it took, and whether it
    /// passed (`Err` carries a short, stable reason label such as `timeout` or `refused`).
    /// Ignored for a Backend not in the applied config (a check that finished after a
    /// reload removed it). Cheap and non-blocking: callable from every probe.
    pub fn observe_check(
        &self,
        pool: &str,
        backend: &str,
        latency: Duration,
        result: Result<(), &str>,
    ) {
        let inventory = self
            .inventory
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(series) = inventory.backend(pool, backend) {
            series.observe(latency, result);
        }
    }

    /// [`Metrics::observe_check`] for a Backend given by its address in `pool`.
    pub fn observe_check_at(
        &self,
        pool: &str,
        address: IpAddr,
        latency: Duration,
        result: Result<(), &str>,
    ) {
        let inventory = self
            .inventory
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(series) = inventory.backend_at(pool, address) {
            series.observe(latency, result);
        }
    }

    /// After a reconcile (config applied, health transition, drain) that took `elapsed`:
    /// counts the tables it swapped, and brings every Vip, Backend and table series in
    /// line with the reconciler (new ones appear, removed ones go, up/down changes count
    /// as transitions).
    pub fn reconciled<D: DataplaneOps>(
        &self,
        reconciler: &Reconciler<D>,
        report: &Report,
        elapsed: Duration,
    ) {
        let Some(config) = reconciler.config() else {
            return;
        };
        if !report.tables.is_empty() {
            self.table_rebuild_duration.observe(elapsed.as_secs_f64());
        }
        {
            let tables = reconciler.tables();
            let mut names = lock(&self.empty_vips);
            let now: Vec<(String, bool)> = config
                .vips
                .iter()
                .map(|v| {
                    let empty = tables.get(&v.endpoint()).is_none_or(|t| t.table.is_empty());
                    (v.name.clone(), empty)
                })
                .collect();
            for gone in names.iter().filter(|n| !now.iter().any(|(v, _)| v == *n)) {
                let _ = self.no_usable_backend.remove_label_values(&[gone]);
            }
            for (vip, empty) in &now {
                self.no_usable_backend
                    .with_label_values(&[vip])
                    .set(i64::from(*empty));
            }
            *names = now.into_iter().map(|(v, _)| v).collect();
        }
        let maps = self.maps();
        {
            let mut inventory = self
                .inventory
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let old = std::mem::take(&mut *inventory);
            *inventory = old.rebuild(reconciler, config, report, maps.as_deref());
        }
        self.update_info(config);
    }

    fn update_info(&self, config: &Config) {
        let attached = lock(&self.attached).clone();
        let mode_of = |i: &crate::config::Interface| {
            attached
                .get(&i.name)
                .cloned()
                .unwrap_or_else(|| i.xdp_mode.to_string())
        };
        let mut info = lock(&self.info);
        let Info { build, interfaces } = &mut *info;
        let mut modes: Vec<String> = config.interfaces.iter().map(mode_of).collect();
        modes.sort();
        modes.dedup();
        let values = vec![
            VERSION.to_owned(),
            GIT_COMMIT.to_owned(),
            kernel_release(),
            modes.join(","),
        ];
        if values != *build {
            if !build.is_empty() {
                let old: Vec<&str> = build.iter().map(String::as_str).collect();
                let _ = self.build_info.remove_label_values(&old);
            }
            let new: Vec<&str> = values.iter().map(String::as_str).collect();
            self.build_info.with_label_values(&new).set(1);
            *build = values;
        }
        let now: Vec<(String, String)> = config
            .interfaces
            .iter()
            .map(|i| (i.name.clone(), mode_of(i)))
            .collect();
        for (name, mode) in interfaces.iter().filter(|i| !now.contains(i)) {
            let _ = self.xdp_attached.remove_label_values(&[name, mode]);
        }
        for (name, mode) in &now {
            self.xdp_attached.with_label_values(&[name, mode]).set(1);
        }
        *interfaces = now;
    }

    /// The counter maps, opened on first use.
    fn maps(&self) -> Option<Arc<Maps>> {
        let mut maps = lock(&self.maps);
        if maps.is_none() {
            match Maps::open(&self.pin_dir) {
                Ok(opened) => *maps = Some(Arc::new(opened)),
                Err(e) => self.failing(Err(e)),
            }
        }
        maps.clone()
    }

    /// Warns on the first failure of a streak.
    fn failing(&self, result: Result<(), String>) {
        match result {
            Ok(()) => self.maps_failing.store(false, Ordering::Relaxed),
            Err(e) => {
                if !self.maps_failing.swap(true, Ordering::Relaxed) {
                    warn!(error = %e, "metrics: cannot read the data plane's counters");
                }
            }
        }
    }

    /// Every metric in the Prometheus text format (what `/metrics` serves).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = String::with_capacity(256 * 1024);
        let maps = self.maps();
        if let Some(maps) = &maps {
            let result = maps.render_counters(&mut out);
            self.failing(result);
        }
        {
            let inventory = self
                .inventory
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            let result = inventory.render(&mut out, maps.as_deref());
            if maps.is_some() {
                self.failing(result);
            }
        }
        if let Some(stats) = lock(&self.health).as_ref() {
            let backends = stats.backends();
            let holds: u64 = backends.values().map(|b| b.damped).sum();
            let seen = self.damping_holds.get();
            self.damping_holds.inc_by(holds.saturating_sub(seen));
            self.backends_held
                .set(backends.values().filter(|b| b.held).count() as i64);
        }
        let mut buffer = out.into_bytes();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding into memory does not fail");
        buffer
    }
}
