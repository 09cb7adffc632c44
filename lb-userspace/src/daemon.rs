//! `mlb run`: load (or re-adopt) the data plane, apply the config, then react to reloads,
//! health transitions, control commands and signals until told to stop.

use std::{
    future::Future,
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
    attach,
    config::Config,
    control::{self, Command, Reply},
    dataplane::{Capacities, Dataplane},
    health::{self, HealthEvent},
    metrics::{self, Metrics},
    neighbors,
    reconcile::{Reconciler, Report},
    state::{self, Snapshot},
};

/// How often the config file is compared with what was applied.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
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
    }
}

/// Runs the daemon until `shutdown` completes or SIGTERM/SIGINT arrives.
pub async fn run(options: Options, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let config = Config::load(&options.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let pin_dir = config.global.pin_path.clone();
    // Metrics: /healthz answers from here on, /readyz once the config is applied.
    let metrics = Arc::new(Metrics::new(&pin_dir));
    let metrics_server = metrics::Server::start(config.global.metrics_listen, Arc::clone(&metrics))
        .await
        .with_context(|| format!("metrics_listen {}", config.global.metrics_listen))?;
    info!(addr = %metrics_server.addr(), "metrics listening");
    ensure_bpffs()?;
    let dataplane = Dataplane::load_pinned(capacities(&config), &pin_dir)?;
    let assignments = state::previous_assignments(&pin_dir)?;
    let adopting = !assignments.vips.is_empty() || !assignments.backends.is_empty();
    let mut reconciler = Reconciler::new(dataplane, assignments);
    for interface in &config.interfaces {
        attach::attach(reconciler.dataplane_mut(), interface, &pin_dir)?;
    }
    let started = Instant::now();
    let report = reconciler.apply(&config)?;
    metrics.reconciled(&reconciler, &report, started.elapsed());
    metrics.set_ready();
    log_report(if adopting { "adopted running state" } else { "applied config" }, &report);
    let mut applied_text = std::fs::read(&options.config).unwrap_or_default();
    after_apply(&reconciler, &config, &pin_dir);

    let (health_tx, mut health_rx) = mpsc::channel::<HealthEvent>(1024);
    let mut checker = health::Checker::start(&config, health_tx.clone());
    let (control_tx, mut control_rx) = mpsc::channel::<(Command, tokio::sync::oneshot::Sender<Reply>)>(16);
    let socket = state::socket_path(&pin_dir);
    let _control = control::serve(&socket, control_tx)?;

    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut watch = tokio::time::interval(WATCH_INTERVAL);
    let mut refresh = tokio::time::interval(NEXT_HOP_REFRESH);
    let mut reloads = Reloads::default();
    tokio::pin!(shutdown);
    info!(config = %options.config.display(), pid = std::process::id(), "running");

    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = terminate.recv() => { info!("SIGTERM"); break }
            _ = interrupt.recv() => { info!("SIGINT"); break }
            _ = hangup.recv() => {
                info!("SIGHUP: reloading");
                reload(&options.config, &mut reconciler, &mut checker, &health_tx, &mut applied_text, &mut reloads, &pin_dir, &metrics);
            }
            _ = watch.tick() => {
                if std::fs::read(&options.config).is_ok_and(|text| text != applied_text) {
                    info!("config file changed: reloading");
                    reload(&options.config, &mut reconciler, &mut checker, &health_tx, &mut applied_text, &mut reloads, &pin_dir, &metrics);
                }
            }
            _ = refresh.tick() => {
                if let Err(e) = reconciler.refresh_next_hops() {
                    warn!(error = %e, "refreshing next hops");
                }
            }
            Some(event) = health_rx.recv() => {
                on_health(&mut reconciler, &event, &pin_dir, &metrics);
            }
            Some((command, reply)) = control_rx.recv() => {
                let answer = on_command(&mut reconciler, command, &pin_dir, &metrics);
                let _ = reply.send(answer);
            }
        }
    }
    checker.stop();
    drop(metrics_server);
    if options.detach_on_exit {
        let config = reconciler.config().cloned();
        drop(reconciler);
        if let Some(config) = config {
            detach_all(&config.global.pin_path, config.interfaces.iter().map(|i| i.name.as_str()))?;
        }
        info!("detached and removed pinned state");
    } else {
        info!("exiting; the program stays attached with the last applied state");
    }
    Ok(())
}

/// Reload counters, for logs (and metrics).
#[derive(Default)]
pub struct Reloads {
    pub ok: u64,
    pub failed: u64,
}

#[expect(clippy::too_many_arguments, reason = "the daemon loop's state, passed piecewise")]
fn reload(
    path: &Path,
    reconciler: &mut Reconciler<Dataplane>,
    checker: &mut health::Checker,
    health_tx: &mpsc::Sender<HealthEvent>,
    applied_text: &mut Vec<u8>,
    reloads: &mut Reloads,
    pin_dir: &Path,
    metrics: &Metrics,
) {
    let text = std::fs::read(path).unwrap_or_default();
    *applied_text = text;
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            reloads.failed += 1;
            metrics.reload(false);
            for line in e.lines() {
                error!(problem = %line, "config refused; the running config stays in force");
            }
            return;
        }
    };
    let running = reconciler.config().cloned().expect("applied at start");
    if let Some(problem) = needs_restart(&running, &config) {
        reloads.failed += 1;
        metrics.reload(false);
        error!(%problem, "config refused; the running config stays in force");
        return;
    }
    for interface in config.interfaces.iter().filter(|i| !running.interfaces.contains(i)) {
        if let Err(e) = attach::attach(reconciler.dataplane_mut(), interface, pin_dir) {
            reloads.failed += 1;
            metrics.reload(false);
            error!(error = %e, "config refused; the running config stays in force");
            return;
        }
    }
    for interface in running.interfaces.iter().filter(|i| !config.interfaces.iter().any(|n| n.name == i.name)) {
        if let Err(e) = attach::detach(pin_dir, &interface.name) {
            warn!(interface = %interface.name, error = %e, "detaching");
        }
    }
    let started = Instant::now();
    match reconciler.apply(&config) {
        Ok(report) => {
            reloads.ok += 1;
            metrics.reload(true);
            metrics.reconciled(reconciler, &report, started.elapsed());
            log_report("reloaded", &report);
            *checker = {
                let old = std::mem::replace(checker, health::Checker::idle());
                old.stop();
                health::Checker::start(&config, health_tx.clone())
            };
            after_apply(reconciler, &config, pin_dir);
        }
        Err(e) => {
            reloads.failed += 1;
            metrics.reload(false);
            error!(error = %e, "reload failed; the running config stays in force");
        }
    }
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
    if r.pin_path != n.pin_path {
        changed.push("pin_path");
    }
    if r.metrics_listen != n.metrics_listen {
        changed.push("metrics_listen");
    }
    (!changed.is_empty()).then(|| {
        format!("{} cannot change while running: restart the daemon", changed.join(", "))
    })
}

fn on_health(reconciler: &mut Reconciler<Dataplane>, event: &HealthEvent, pin_dir: &Path, metrics: &Metrics) {
    let state = if event.up { "up" } else { "down" };
    info!(pool = %event.pool, backend = %event.address, %state, reason = %event.reason, "health transition");
    let started = Instant::now();
    match reconciler.set_health(&[(event.pool.clone(), event.address, event.up)]) {
        Ok(report) => {
            metrics.reconciled(reconciler, &report, started.elapsed());
            for vip in &report.empty_vips {
                warn!(%vip, "vip has no usable backend");
            }
            if let Some(config) = reconciler.config().cloned() {
                save_snapshot(reconciler, &config, pin_dir);
            }
        }
        Err(e) => error!(error = %e, "applying a health transition"),
    }
}

fn on_command(reconciler: &mut Reconciler<Dataplane>, command: Command, pin_dir: &Path, metrics: &Metrics) -> Reply {
    let started = Instant::now();
    let Some(config) = reconciler.config().cloned() else {
        return Reply::Error("no config applied".into());
    };
    match command {
        Command::Status => Reply::Status(Box::new(Snapshot::of(reconciler, &config))),
        Command::Drain { address, drained } => match reconciler.set_drained(address, drained) {
            Ok((pools, _)) if pools.is_empty() => Reply::Error(format!("{address} is in no pool")),
            Ok((pools, report)) => {
                metrics.reconciled(reconciler, &report, started.elapsed());
                let verb = if drained { "drained" } else { "undrained" };
                info!(backend = %address, pools = ?pools, "{verb}");
                log_report(verb, &report);
                save_snapshot(reconciler, &config, pin_dir);
                Reply::Ok(format!("{address} {verb} in pools {}", pools.join(", ")))
            }
            Err(e) => Reply::Error(e.to_string()),
        },
    }
}

fn after_apply(reconciler: &Reconciler<Dataplane>, config: &Config, pin_dir: &Path) {
    for problem in neighbors::manage(&config.backend_addresses()) {
        warn!(%problem, "could not set up a managed neighbour entry");
    }
    save_snapshot(reconciler, config, pin_dir);
}

fn save_snapshot(reconciler: &Reconciler<Dataplane>, config: &Config, pin_dir: &Path) {
    let path = state::state_path(pin_dir);
    if let Err(e) = Snapshot::of(reconciler, config).save(&path) {
        warn!(path = %path.display(), error = %e, "saving state");
    }
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
pub fn detach_all<'a>(pin_dir: &Path, interfaces: impl IntoIterator<Item = &'a str>) -> anyhow::Result<()> {
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
fn ensure_bpffs() -> anyhow::Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let path = std::ffi::CString::new("/sys/fs/bpf").expect("no NUL");
    // SAFETY: valid path, zeroed out-struct.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } == 0 && stat.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    let fstype = std::ffi::CString::new("bpf").expect("no NUL");
    // SAFETY: valid C strings.
    let rc = unsafe {
        libc::mount(fstype.as_ptr(), path.as_ptr(), fstype.as_ptr(), 0, std::ptr::null())
    };
    if rc != 0 {
        anyhow::bail!("mounting bpffs on /sys/fs/bpf: {}", std::io::Error::last_os_error());
    }
    info!("mounted bpffs on /sys/fs/bpf");
    Ok(())
}
