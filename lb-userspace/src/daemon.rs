//! `mlb run`: load (or re-adopt) the data plane, apply the config, then react to reloads,
//! health transitions, control commands and signals until told to stop.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    announce::{self, Announcer, Decision},
    attach,
    config::Config,
    control::{self, Command, Reply},
    dataplane::{Capacities, Dataplane},
    health::{self, HealthEvent},
    metrics::{self, Metrics},
    netlink::Netlink,
    next_program,
    reconcile::{Reconciler, Report},
    second_chance,
    state::{self, Snapshot},
};

/// How often the config file is compared with what was applied. A change is applied
/// once two reads in a row agree (the file has settled: an editor or a `cp` mid-write is
/// never read half-written), so within 2 intervals.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);
/// Reads of a file that keeps changing while it is read, before the reload gives up.
const SETTLE_READS: usize = 10;
/// How often cached next hops are invalidated (routes or neighbours may have changed).
const NEXT_HOP_REFRESH: Duration = Duration::from_secs(5);

pub struct Options {
    pub config: PathBuf,
    /// On exit, detach the program and remove the pinned maps (drops every flow).
    pub detach_on_exit: bool,
}

/// The capacities the config asks for.
pub fn capacities(config: &Config) -> Capacities {
    Capacities {
        max_vips: config.global.max_vips,
        max_backends: config.global.max_backends,
        conntrack_entries: config.global.conntrack_entries,
        conntrack_idle: config.global.conntrack_idle,
        flow_cache_entries: config.global.flow_cache_entries,
    }
}

/// Runs the daemon until `shutdown` completes or SIGTERM/SIGINT arrives.
pub async fn run(options: Options, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // Read once: what is validated is what the watcher compares and the snapshot keeps.
    let bytes = std::fs::read(&options.config)
        .with_context(|| format!("reading {}", options.config.display()))?;
    let config = Config::from_bytes(&bytes, &options.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let pin_dir = config.global.pin_path.clone();
    // One daemon per pin path: a second one would overwrite the first one's maps.
    let _lock = state::DaemonLock::take(&pin_dir).map_err(anyhow::Error::msg)?;
    // Metrics: /healthz answers from here on, /readyz once the config is applied.
    let metrics = Arc::new(Metrics::new(&pin_dir));
    let metrics_server = metrics::Server::start(config.global.metrics_listen, Arc::clone(&metrics))
        .await
        .with_context(|| {
            format!(
                "{}: global.metrics_listen {addr} cannot be served (another process may hold \
                 the port: `ss -ltnp 'sport = :{port}'` names it): set global.metrics_listen to \
                 a free address and port, or port 0 for any",
                options.config.display(),
                addr = config.global.metrics_listen,
                port = config.global.metrics_listen.port(),
            )
        })?;
    info!(addr = %metrics_server.addr(), "metrics listening");
    ensure_bpffs()?;
    let mut dataplane = Dataplane::load_pinned(capacities(&config), &pin_dir)?;
    forward_data_plane_log(&mut dataplane);
    let previous = state::previous(&pin_dir)?;
    let adopting = previous.is_some();
    let (assignments, down, drained, previous_modes) = previous
        .map_or_else(Default::default, |p| {
            (p.assignments, p.down, p.drained, p.attached)
        });
    let mut reconciler = Reconciler::new(dataplane, assignments);
    // Backends the previous daemon had down stay down until their checks pass again, and
    // its drains stay; Backends a reload adds start down until their rise checks pass.
    reconciler.set_initially_down(&down);
    reconciler.set_initially_drained(&drained);
    reconciler.gate_new_backends_on_health();
    let saved = second_chance::path(&pin_dir);
    match second_chance::load(&saved, second_chance::now()) {
        Ok(tables) => {
            if !tables.is_empty() {
                info!(path = %saved.display(), vips = tables.len(), "second chance: previous tables restored");
            }
            reconciler.restore_previous(tables);
        }
        Err(e) => {
            warn!(path = %saved.display(), error = %e, "second chance: saved previous tables not read")
        }
    }
    // Before attaching: a first start it refuses leaves no program on the interfaces.
    next_program::install(reconciler.dataplane_mut(), &config.interfaces)?;
    let mut attached = BTreeMap::new();
    for interface in &config.interfaces {
        let mode = attach::attach(reconciler.dataplane_mut(), interface, &pin_dir)?;
        attached.insert(
            interface.name.clone(),
            adopted_mode(interface, mode, &previous_modes),
        );
    }
    metrics.set_attached(&attached);
    let program_id = reconciler
        .dataplane_mut()
        .xdp(lb_common::consts::prog_names::LB_INGRESS)
        .ok()
        .and_then(|p| p.info().ok())
        .map(|i| i.id());
    let started = Instant::now();
    let report = reconciler.apply(&config)?;
    metrics.reconciled(&reconciler, &report, started.elapsed());
    metrics.set_ready();
    log_report(
        if adopting {
            "adopted running state"
        } else {
            "applied config"
        },
        &report,
    );

    let netlink = Netlink::connect().context("opening a netlink socket")?;
    let errors = Arc::clone(&metrics);
    let announcer = Announcer::start(netlink.clone(), Arc::new(move || errors.announce.error()));
    let maintenance = state::in_maintenance(&pin_dir);
    if maintenance {
        warn!(
            path = %state::maintenance_path(&pin_dir).display(),
            "in maintenance: every vip stays withdrawn until `mlb maintenance off`"
        );
    }

    let (health_tx, mut health_rx) = mpsc::channel::<HealthEvent>(1024);
    let mut daemon = Daemon {
        program_id,
        attached,
        netlink,
        announcer,
        maintenance,
        decisions: BTreeMap::new(),
        checker: health::Checker::idle(),
        health_tx,
        running_text: String::from_utf8_lossy(&bytes).into_owned(),
        watched: bytes,
        pending: None,
        config_path: options.config.clone(),
        pin_dir: pin_dir.clone(),
        reconciler,
        metrics,
        retry: None,
        neighbours: BTreeSet::new(),
    };
    let down = daemon.reconciler.down_backends();
    daemon.start_checker(&config, down, health::HealthStats::new());
    daemon.after_apply(&config);

    let (control_tx, mut control_rx) =
        mpsc::channel::<(Command, tokio::sync::oneshot::Sender<Reply>)>(16);
    let group = config.global.control_group.as_ref().map(|(_, gid)| *gid);
    let _control = control::serve(&state::socket_path(&pin_dir), control_tx, group)?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut watch = tokio::time::interval(WATCH_INTERVAL);
    let mut refresh = tokio::time::interval(NEXT_HOP_REFRESH);
    tokio::pin!(shutdown);
    info!(config = %options.config.display(), pid = std::process::id(), "running");

    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = terminate.recv() => { info!("SIGTERM"); break }
            _ = interrupt.recv() => { info!("SIGINT"); break }
            _ = hangup.recv() => {
                info!("SIGHUP: reloading");
                daemon.reload();
            }
            _ = watch.tick() => daemon.watch(),
            _ = refresh.tick() => daemon.refresh(),
            Some(event) = health_rx.recv() => {
                // Take every transition already queued: one table rebuild per pool.
                let mut events = vec![event];
                while let Ok(more) = health_rx.try_recv() {
                    events.push(more);
                }
                daemon.on_health(&events);
            }
            Some((command, reply)) = control_rx.recv() => {
                let answer = daemon.on_command(command);
                let _ = reply.send(answer);
            }
        }
    }
    let Daemon {
        checker,
        reconciler,
        announcer,
        ..
    } = daemon;
    checker.stop();
    drop(metrics_server);
    if options.detach_on_exit {
        let config = reconciler.config().cloned();
        drop(reconciler);
        if let Some(announce) = config.as_ref().and_then(|c| c.announce) {
            announcer.withdraw_all(announce.table).await;
            info!(table = announce.table, "every vip withdrawn");
        }
        if let Some(config) = config {
            detach_all(
                &config.global.pin_path,
                config.interfaces.iter().map(|i| i.name.as_str()),
            )?;
        }
        info!("detached and removed pinned state");
    } else {
        info!("exiting; the program stays attached with the last applied state");
    }
    Ok(())
}

/// Forwards the data plane's rare-event records (aya-log) into the daemon's log.
fn forward_data_plane_log(dataplane: &mut Dataplane) {
    let logger = match dataplane.logger() {
        Ok(logger) => logger,
        Err(e) => return warn!(error = %e, "the data plane's log is not read"),
    };
    // SAFETY: the logger owns its ring buffer's fd for as long as the AsyncFd holds it.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut logger = match registered {
        Ok(fd) => fd,
        Err(e) => return warn!(error = %e, "the data plane's log is not read"),
    };
    tokio::spawn(async move {
        while let Ok(mut ready) = logger.readable_mut().await {
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    });
}

/// The running daemon's state, between events.
struct Daemon {
    config_path: PathBuf,
    pin_dir: PathBuf,
    reconciler: Reconciler<Dataplane>,
    checker: health::Checker,
    health_tx: mpsc::Sender<HealthEvent>,
    metrics: Arc<Metrics>,
    /// The file content last tried, so the watcher reloads on change only.
    watched: Vec<u8>,
    /// A changed content the watcher saw once: applied when the next tick sees it again.
    pending: Option<Vec<u8>>,
    /// The text of the config in force (for `mlb plan` against the running state).
    running_text: String,
    /// A valid config (and its text) whose apply failed in the kernel: retried on the
    /// refresh timer.
    retry: Option<(Config, String)>,
    /// Backend addresses that already have a managed neighbour entry.
    neighbours: BTreeSet<IpAddr>,
    /// Per interface, the XDP mode the program is attached in.
    attached: BTreeMap<String, String>,
    /// The id of the loaded `lb_ingress`, to check it is still what the interfaces run.
    program_id: Option<u32>,
    netlink: Netlink,
    /// Keeps the announce table in line with `decisions`.
    announcer: Announcer,
    /// `mlb maintenance on`: every Vip withdrawn, forwarding goes on.
    maintenance: bool,
    /// Per Vip address: announced or not, and why (empty while announcing is off).
    decisions: BTreeMap<IpAddr, Decision>,
}

impl Daemon {
    /// One refused reload (counted once), with each of its problems logged.
    fn refused_all(&self, problems: &[String]) {
        self.metrics.reload(false);
        for problem in problems {
            error!(%problem, "config refused; the running config stays in force");
        }
    }

    fn refused(&self, problem: &dyn std::fmt::Display) {
        self.refused_all(&[problem.to_string()]);
    }

    /// The file watcher: reloads a changed file once it has settled (the same content on
    /// two ticks in a row). Write-then-rename is seen like an edit in place: the path is
    /// read afresh every time.
    fn watch(&mut self) {
        let Ok(text) = std::fs::read(&self.config_path) else {
            return;
        };
        if text == self.watched {
            self.pending = None;
        } else if self.pending.as_ref() == Some(&text) {
            info!("config file changed: reloading");
            self.pending = None;
            self.reload();
        } else {
            self.pending = Some(text);
        }
    }

    /// The config file's content, read until two reads in a row agree.
    fn read_settled(&self) -> std::io::Result<Vec<u8>> {
        let mut last = std::fs::read(&self.config_path)?;
        for _ in 0..SETTLE_READS {
            std::thread::sleep(Duration::from_millis(5));
            let again = std::fs::read(&self.config_path)?;
            if again == last {
                return Ok(last);
            }
            last = again;
        }
        Err(std::io::Error::other(format!(
            "still changing after {SETTLE_READS} reads"
        )))
    }

    fn reload(&mut self) {
        let bytes = match self.read_settled() {
            Ok(bytes) => bytes,
            Err(e) => return self.refused(&format!("{}: {e}", self.config_path.display())),
        };
        self.watched = bytes.clone();
        let config = match Config::from_bytes(&bytes, &self.config_path) {
            Ok(config) => config,
            Err(e) => return self.refused_all(&e.lines()),
        };
        let Some(running) = self.reconciler.config().cloned() else {
            return self.refused(&"no config in force to reload over");
        };
        if let Some(problem) = needs_restart(&running, &config) {
            return self.refused(&problem);
        }
        // First, as it can fail on its own: nothing else has changed yet when it does.
        if let Err(e) = next_program::install(self.reconciler.dataplane_mut(), &config.interfaces) {
            // A program the kernel refused may follow others already in place.
            let dataplane = self.reconciler.dataplane_mut();
            if let Err(e) = next_program::install(dataplane, &running.interfaces) {
                warn!(error = %e, "restoring the next programs in force");
            }
            return self.refused(&e);
        }
        for interface in config.interfaces.iter().filter(|i| {
            !running
                .interfaces
                .iter()
                .any(|r| r.name == i.name && r.xdp_mode == i.xdp_mode)
        }) {
            match attach::attach(self.reconciler.dataplane_mut(), interface, &self.pin_dir) {
                Ok(mode) => {
                    let mode = adopted_mode(interface, mode, &[]);
                    self.attached.insert(interface.name.clone(), mode);
                    self.metrics.set_attached(&self.attached);
                }
                Err(e) => {
                    // Back to the running config's next programs, which installed before.
                    let dataplane = self.reconciler.dataplane_mut();
                    if let Err(e) = next_program::install(dataplane, &running.interfaces) {
                        warn!(error = %e, "restoring the next programs in force");
                    }
                    return self.refused(&e);
                }
            }
        }
        for interface in running
            .interfaces
            .iter()
            .filter(|i| !config.interfaces.iter().any(|n| n.name == i.name))
        {
            if let Err(e) = attach::detach(&self.pin_dir, &interface.name) {
                warn!(interface = %interface.name, error = %e, "detaching");
            }
        }
        self.apply(
            config,
            String::from_utf8_lossy(&bytes).into_owned(),
            "reloaded",
        );
    }

    fn apply(&mut self, config: Config, text: String, what: &str) {
        let started = Instant::now();
        match self.reconciler.apply(&config) {
            Ok(report) => {
                self.retry = None;
                self.running_text = text;
                self.metrics.reload(true);
                self.metrics.set_apply_failed(false);
                self.metrics
                    .reconciled(&self.reconciler, &report, started.elapsed());
                log_report(what, &report);
                let old = std::mem::replace(&mut self.checker, health::Checker::idle());
                // The reconciler's view: the old checker's downs plus the new Backends,
                // which start down until their rise checks pass.
                let down = self.reconciler.down_backends();
                let stats = old.stats();
                old.stop();
                self.start_checker(&config, down, stats);
                self.after_apply(&config);
            }
            Err(e) => {
                self.metrics.reload(false);
                self.metrics.set_apply_failed(true);
                error!(error = %e, "applying the config failed in the kernel; the config in force stays; retrying every {}s", NEXT_HOP_REFRESH.as_secs());
                self.retry = Some((config, text));
            }
        }
    }

    /// Starts the health checks of `config`, carrying states and counters over, each probe
    /// feeding the metrics.
    fn start_checker(
        &mut self,
        config: &Config,
        initial_down: Vec<(String, IpAddr)>,
        stats: health::HealthStats,
    ) {
        let metrics = Arc::clone(&self.metrics);
        let observer: health::Observer = Arc::new(move |o: &health::Observation<'_>| {
            for pool in o.pools {
                metrics.observe_check_at(
                    pool,
                    o.address,
                    o.latency,
                    o.result.map_err(|f| f.kind()),
                );
            }
        });
        self.metrics.set_health_stats(stats.clone());
        let options = health::Options {
            initial_down,
            stats,
            observer: Some(observer),
            ..Default::default()
        };
        self.checker = health::Checker::start_with_options(config, self.health_tx.clone(), options);
    }

    /// Timer: re-resolve next hops; retry a config the kernel refused.
    fn refresh(&mut self) {
        if let Some((config, text)) = self.retry.take() {
            info!("retrying the config the kernel refused");
            self.apply(config, text, "applied on retry");
        }
        if let Err(e) = self.reconciler.refresh_next_hops() {
            warn!(error = %e, "refreshing next hops");
        }
        match self.reconciler.expire_second_chance() {
            Ok(true) => {
                info!("second chance: expired previous tables and retired backends dropped");
                self.save_snapshot();
            }
            Ok(false) => {}
            Err(e) => warn!(error = %e, "second chance: dropping expired previous tables"),
        }
        self.check_attached();
    }

    /// Checks, off the loop, that every configured interface still runs the program:
    /// `/readyz` answers 503 while one does not (its interface deleted, its link removed).
    fn check_attached(&self) {
        let (Some(config), Some(program)) = (self.reconciler.config(), self.program_id) else {
            return;
        };
        let interfaces: Vec<String> = config.interfaces.iter().map(|i| i.name.clone()).collect();
        let (netlink, metrics) = (self.netlink.clone(), Arc::clone(&self.metrics));
        tokio::spawn(async move {
            let mut detached = Vec::new();
            for name in interfaces {
                match netlink.xdp_prog_id(&name).await {
                    Ok(Some(id)) if id == program => {}
                    Ok(other) => detached.push((name, other)),
                    Err(e) => warn!(interface = %name, error = %e, "checking the attachment"),
                }
            }
            for (name, other) in &detached {
                error!(
                    interface = %name,
                    running = ?other,
                    "the program is not attached to this interface (gone or replaced?): not ready; restart mlb to attach again"
                );
            }
            metrics.set_detached(!detached.is_empty());
        });
    }

    fn on_health(&mut self, events: &[HealthEvent]) {
        let transitions: Vec<(String, IpAddr, bool)> = events
            .iter()
            .map(|e| (e.pool.clone(), e.address, e.up))
            .collect();
        let started = Instant::now();
        match self.reconciler.set_health(&transitions) {
            Ok(report) => {
                for e in events {
                    let state = if e.up { "up" } else { "down" };
                    info!(pool = %e.pool, backend = %e.address, %state, reason = %e.reason, "health transition applied");
                }
                self.metrics
                    .reconciled(&self.reconciler, &report, started.elapsed());
                for (vip, diff) in &report.tables {
                    info!(%vip, %diff, "table swapped after health transition");
                }
                for vip in &report.empty_vips {
                    warn!(%vip, "vip has no usable backend");
                }
                self.announce();
                self.save_snapshot();
            }
            Err(e) => error!(error = %e, "applying health transitions"),
        }
    }

    fn on_command(&mut self, command: Command) -> Reply {
        let started = Instant::now();
        let Some(config) = self.reconciler.config().cloned() else {
            return Reply::Error("no config applied".into());
        };
        match command {
            Command::Status => Reply::Status(Box::new(
                Snapshot::of(&self.reconciler, &config, &self.running_text)
                    .with_announce(self.maintenance, &self.decisions)
                    .with_attached(&self.attached),
            )),
            Command::Maintenance { on } => {
                if let Err(e) = state::set_maintenance(&self.pin_dir, on) {
                    return Reply::Error(format!(
                        "{}: {e}",
                        state::maintenance_path(&self.pin_dir).display()
                    ));
                }
                self.maintenance = on;
                info!(
                    maintenance = on,
                    "maintenance {}",
                    if on { "on" } else { "off" }
                );
                self.announce();
                self.save_snapshot();
                let announced = self.decisions.values().filter(|d| d.announced).count();
                Reply::Ok(match (on, config.announce) {
                    (true, Some(_)) => {
                        "maintenance on: every vip withdrawn; forwarding goes on".into()
                    }
                    (false, Some(_)) => {
                        format!("maintenance off: {announced} vip address(es) announced")
                    }
                    (_, None) => format!(
                        "maintenance {}: remembered, but announcing is off in the config (no `announce:` section)",
                        if on { "on" } else { "off" }
                    ),
                })
            }
            Command::Drain { address, drained } => {
                match self.reconciler.set_drained(address, drained) {
                    Ok((pools, _)) if pools.is_empty() => {
                        Reply::Error(format!("{address} is in no pool"))
                    }
                    Ok((pools, report)) => {
                        self.metrics
                            .reconciled(&self.reconciler, &report, started.elapsed());
                        let verb = if drained { "drained" } else { "undrained" };
                        info!(backend = %address, pools = ?pools, "{verb}");
                        log_report(verb, &report);
                        self.announce();
                        self.save_snapshot();
                        Reply::Ok(format!("{address} {verb} in pools {}", pools.join(", ")))
                    }
                    Err(e) => Reply::Error(e.to_string()),
                }
            }
        }
    }

    /// Managed neighbour entries for backends new to this daemon (on a task: netlink never
    /// holds up the loop); announcements; the snapshot.
    fn after_apply(&mut self, config: &Config) {
        let new: Vec<IpAddr> = config
            .backend_addresses()
            .into_iter()
            .filter(|a| !self.neighbours.contains(a))
            .collect();
        let netlink = self.netlink.clone();
        let addresses = new.clone();
        tokio::spawn(async move {
            for backend in addresses {
                if let Err(e) = netlink.manage_neighbour(backend).await {
                    warn!(%backend, error = %e, "could not set up a managed neighbour entry");
                }
            }
        });
        self.neighbours.extend(new);
        self.announce();
        self.save_snapshot();
    }

    /// Decides which Vip addresses to announce from the config in force, its tables and
    /// maintenance; logs every change with its reason; hands the routes to the announcer.
    fn announce(&mut self) {
        let Some(config) = self.reconciler.config() else {
            return;
        };
        let tables = self.reconciler.tables();
        let empty: BTreeSet<String> = config
            .vips
            .iter()
            .map(|v| v.endpoint())
            .filter(|e| tables.get(e).is_none_or(|t| t.table.is_empty()))
            .collect();
        let Some(announce) = config.announce else {
            if !self.decisions.is_empty() {
                info!("announcing turned off: every vip route removed");
            }
            self.decisions.clear();
            self.announcer.set(None, BTreeSet::new());
            self.metrics.announce.set(None, self.maintenance, &[]);
            return;
        };
        let decisions = announce::decide(config, &empty, self.maintenance);
        let mut changed = Vec::new();
        for (addr, d) in &decisions {
            if self.decisions.get(addr).map(|o| o.announced) == Some(d.announced) {
                continue;
            }
            if d.announced {
                info!(vip = %addr, table = announce.table, reason = %d.reason, "announcing");
            } else {
                warn!(vip = %addr, table = announce.table, reason = %d.reason, "withdrawing");
            }
            changed.extend(d.vips.iter().map(|v| (v.clone(), d.announced)));
        }
        for addr in self.decisions.keys().filter(|a| !decisions.contains_key(a)) {
            info!(vip = %addr, table = announce.table, reason = "no longer configured", "withdrawing");
        }
        let routes = decisions
            .iter()
            .filter(|(_, d)| d.announced)
            .map(|(a, _)| *a)
            .collect();
        self.announcer.set(Some(announce.table), routes);
        self.metrics
            .announce
            .set(Some(&decisions), self.maintenance, &changed);
        self.decisions = decisions;
    }

    fn save_snapshot(&self) {
        let Some(config) = self.reconciler.config() else {
            return;
        };
        let saved = second_chance::path(&self.pin_dir);
        if let Err(e) = second_chance::save(&saved, &self.reconciler.saved_previous()) {
            warn!(path = %saved.display(), error = %e, "second chance: saving previous tables");
        }
        let path = state::state_path(&self.pin_dir);
        if let Err(e) = Snapshot::of(&self.reconciler, config, &self.running_text)
            .with_announce(self.maintenance, &self.decisions)
            .with_attached(&self.attached)
            .save(&path)
        {
            warn!(path = %path.display(), error = %e, "saving state");
        }
    }
}

/// The mode `interface` is attached in: `mode` for a fresh attach; for a re-adopted link,
/// the mode its maker recorded. A configured mode that re-adoption cannot honour (the link
/// keeps the mode it was made with) is logged.
fn adopted_mode(
    interface: &crate::config::Interface,
    mode: Option<&'static str>,
    previous: &[(String, String)],
) -> String {
    if let Some(mode) = mode {
        return mode.to_owned();
    }
    let recorded = previous
        .iter()
        .find(|(name, _)| *name == interface.name)
        .map(|(_, m)| m.clone());
    let wanted = match interface.xdp_mode {
        crate::config::XdpModeConfig::Native => Some("native"),
        crate::config::XdpModeConfig::Generic => Some("generic"),
        crate::config::XdpModeConfig::Auto => None,
    };
    if let (Some(wanted), Some(recorded)) = (wanted, &recorded)
        && wanted != recorded
    {
        warn!(
            interface = %interface.name,
            configured = wanted,
            attached = %recorded,
            "xdp_mode changed, but the re-adopted link keeps the mode it was attached in: \
             `mlb detach` and start again to change it (drops the connection table)"
        );
    }
    recorded.unwrap_or_else(|| "unknown".to_owned())
}

/// What a live reload cannot change.
fn needs_restart(running: &Config, new: &Config) -> Option<String> {
    let (r, n) = (&running.global, &new.global);
    let mut changed = Vec::new();
    if r.max_vips != n.max_vips {
        changed.push("max_vips");
    }
    if r.max_backends != n.max_backends {
        changed.push("max_backends");
    }
    if r.conntrack_entries != n.conntrack_entries {
        changed.push("conntrack_entries");
    }
    if r.conntrack_idle != n.conntrack_idle {
        changed.push("conntrack_idle");
    }
    if r.flow_cache_entries != n.flow_cache_entries {
        changed.push("flow_cache_entries");
    }
    if r.pin_path != n.pin_path {
        changed.push("pin_path");
    }
    if r.metrics_listen != n.metrics_listen {
        changed.push("metrics_listen");
    }
    if r.control_group != n.control_group {
        changed.push("control_group");
    }
    (!changed.is_empty()).then(|| {
        format!(
            "{} cannot change while running: restart the daemon",
            changed.join(", ")
        )
    })
}

fn log_report(what: &str, report: &Report) {
    if report.is_empty() {
        info!("{what}: no change");
        return;
    }
    for line in report.to_string().lines() {
        info!("{what}: {line}");
    }
}

/// Removes the link pins (detaching the program), the pinned maps and the state file.
pub fn detach_all<'a>(
    pin_dir: &Path,
    interfaces: impl IntoIterator<Item = &'a str>,
) -> anyhow::Result<()> {
    for interface in interfaces {
        attach::detach(pin_dir, interface).with_context(|| format!("detaching {interface}"))?;
    }
    if pin_dir.exists() {
        for entry in std::fs::read_dir(pin_dir)? {
            let path = entry?.path();
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        std::fs::remove_dir(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    }
    let _ = std::fs::remove_file(state::state_path(pin_dir));
    Ok(())
}

/// Mounts bpffs on /sys/fs/bpf if nothing is mounted there (pinning needs it).
pub(crate) fn ensure_bpffs() -> anyhow::Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let path = std::ffi::CString::new("/sys/fs/bpf").expect("no NUL");
    // SAFETY: valid path, zeroed out-struct.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } == 0 && stat.f_type as i64 == BPF_FS_MAGIC
    {
        return Ok(());
    }
    let fstype = std::ffi::CString::new("bpf").expect("no NUL");
    // SAFETY: valid C strings.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            path.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        anyhow::bail!(
            "mounting bpffs on /sys/fs/bpf: {}",
            std::io::Error::last_os_error()
        );
    }
    info!("mounted bpffs on /sys/fs/bpf");
    Ok(())
}
