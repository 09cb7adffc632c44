//! The soak test (root): the real daemon in the network-namespace testbed in front of real
//! backends, under continuous traffic and faults, for `--minutes N`:
//!
//! - **traffic**: long-lived connections (a line every 200 ms, each answer checked to come
//!   from the backend that greeted it): a steady set opened at the start that lives the
//!   whole run, and groups opened every few seconds that live 10–30 s; plus short
//!   connections (connect, greeting, close) every 20 ms;
//! - **a reload every second** (the file replaced by rename, then SIGHUP) alternating
//!   weights, every 7th adding or removing a backend, every 10th a broken config that must
//!   be refused with the running config staying in force (checked in `mlb status`);
//! - **a random backend killed** every few seconds and restarted 1.5 s later;
//! - **the daemon `kill -9`ed** and restarted every `--daemon-every` seconds.
//!
//! It asserts: zero broken long-lived connections to backends that stayed up and configured
//! for the connection's life; zero failed short connections outside the windows where a
//! backend was dead or being removed; every broken config refused; no daemon panic or
//! unexpected exit; the daemon's RSS, file descriptors and tasks flat (the first and the
//! last daemon compared at the same age, and each daemon's early and late windows).
//!
//! `cargo xtask soak [--minutes N] [--daemon-every SECS] [--json FILE]`

use std::{
    io::{IsTerminal as _, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use clap::Parser;
use lb_testbed::bench::{cpu_model, median, write_json};
use lb_testbed::daemon::{DaemonBed, check_yaml};
use lb_testbed::fleet::{ConnectionReport, Connections, ShortLoad, TimedResult};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    /// How long to run.
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Seconds between `kill -9`s of the daemon.
    #[arg(long, default_value_t = 60)]
    daemon_every: u64,
    /// Seconds between backend kills.
    #[arg(long, default_value_t = 4.0)]
    backend_every: f64,
    /// Backends (be1 is never killed nor removed, so some connections live the whole run).
    #[arg(long, default_value_t = 5)]
    backends: usize,
    /// Seed of the fault schedule.
    #[arg(long, default_value_t = 14)]
    seed: u64,
    /// Write the summary here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

const POOL: &str = "web";
const VIPS: &str =
    "  - name: web\n    address: 10.200.0.1\n    port: 80\n    protocol: tcp\n    pool: web\n";
/// Long-lived connections: a line every this.
const EXCHANGE_EVERY: Duration = Duration::from_millis(200);
const STEADY_CONNECTIONS: usize = 16;
const GROUP_CONNECTIONS: usize = 4;
const GROUP_EVERY: Duration = Duration::from_secs(3);
const SHORT_EVERY: Duration = Duration::from_millis(20);
const SHORT_TIMEOUT: Duration = Duration::from_secs(1);
const RELOAD_EVERY: Duration = Duration::from_secs(1);
/// A killed backend's server comes back after this.
const BACKEND_DOWN_FOR: Duration = Duration::from_millis(1500);
/// New connections may fail for this long after a backend's server is killed: until the
/// health check takes it out (fall 2 × 200 ms + 100 ms timeout, then the table swap).
const DETECTION_BOUND: Duration = Duration::from_millis(1500);
/// A connection opened this long before its backend's fault still counts the fault as its
/// own (the reload that removes a backend is applied a little after the file is written).
const FAULT_SLACK: Duration = Duration::from_secs(2);
/// Tolerances of the resource checks.
const RSS_TOLERANCE: f64 = 0.10;
const RSS_SLACK_KIB: u64 = 2048;
const FD_SLACK: usize = 2;
const TASK_SLACK: usize = 2;

/// A backend killed, or removed from the config.
#[derive(Clone, Debug)]
struct Fault {
    backend: usize,
    at: Instant,
    /// Until when new connections may fail because of it.
    until: Instant,
}

#[derive(Clone, Copy)]
struct Sample {
    age: Duration,
    rss_kib: u64,
    fds: usize,
    tasks: usize,
}

struct Incarnation {
    pid: u32,
    started: Instant,
    start_took: Duration,
    samples: Vec<Sample>,
}

/// The config the soak wants in force: which backends, with which weights.
#[derive(Clone, Debug, PartialEq)]
struct Desired {
    members: Vec<(usize, u32)>,
}

struct Soak {
    bed: DaemonBed,
    rng: StdRng,
    started: Instant,
    backends: usize,
    desired: Desired,
    faults: Vec<Fault>,
    /// Backend killed, and when it comes back.
    dead: Option<(usize, Instant)>,
    incarnations: Vec<Incarnation>,
    reloads: u64,
    reloads_applied_checked: u64,
    reload_check_failures: Vec<String>,
    broken_sent: u64,
    broken_refused: u64,
    membership_changes: u64,
    /// The file holds a broken config (until the next reload): a daemon started now
    /// would refuse to start, rightly.
    file_broken: bool,
    added_while_dead: u64,
    backend_kills: u64,
    kills: Vec<Instant>,
    daemon_restarts: Vec<Instant>,
    daemon_kills: u64,
    unexpected_exits: Vec<String>,
    steady: Option<Connections>,
    groups: Vec<(Instant, Connections)>,
    finished: Vec<ConnectionReport>,
    failed_opens: Vec<(Instant, String)>,
    short: Option<ShortLoad>,
}

fn now_s(started: Instant, at: Instant) -> f64 {
    at.saturating_duration_since(started).as_secs_f64()
}

fn read_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn count_dir(path: &str) -> Option<usize> {
    Some(std::fs::read_dir(path).ok()?.count())
}

impl Soak {
    fn vip(&self) -> SocketAddr {
        self.bed.vip(80)
    }

    fn pools_yaml(&self, desired: &Desired) -> String {
        self.bed.pool_yaml(
            POOL,
            &desired.members,
            &check_yaml("tcp", 80, (200, 100), (2, 2), 10, ""),
        )
    }

    fn good_yaml(&self, desired: &Desired) -> String {
        self.bed.config_yaml(VIPS, &self.pools_yaml(desired))
    }

    /// A config the daemon must refuse, of one of several kinds.
    fn broken_yaml(&self, kind: u64) -> String {
        let good = self.good_yaml(&self.desired);
        match kind % 4 {
            0 => good.replacen("vips:\n", "vips:\n  - name: [unclosed\n", 1),
            1 => good.replacen("    pool: web\n", "    pool: web\n    pol: web\n", 1),
            2 => good.replacen("    pool: web\n", "    pool: nosuchpool\n", 1),
            _ => good.replacen(
                "    pool: web\n",
                "    pool: web\n    table_size: 65536\n",
                1,
            ),
        }
    }

    /// Replaces the config file atomically (write, then rename) and sends SIGHUP.
    fn install(&self, yaml: &str) {
        let tmp = self.bed.config.with_extension("yaml.new");
        std::fs::write(&tmp, yaml).expect("write config");
        std::fs::rename(&tmp, &self.bed.config).expect("rename config");
        if self.bed.daemon.is_some() {
            self.bed.signal("-HUP");
        }
    }

    /// The backends and weights `mlb status` shows in force.
    fn in_force(&self) -> Option<Desired> {
        let out = self.bed.mlb(&["status"]);
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut members: Vec<(usize, u32)> = text
            .lines()
            .filter_map(|l| {
                // backend NAME ADDR pool POOL weight W: health, N packets
                let rest = l.strip_prefix("backend be")?;
                let mut words = rest.split_whitespace();
                let index = words.next()?.parse().ok()?;
                let weight = rest
                    .split_once(" weight ")?
                    .1
                    .split(':')
                    .next()?
                    .parse()
                    .ok()?;
                Some((index, weight))
            })
            .collect();
        members.sort_unstable();
        Some(Desired { members })
    }

    /// Waits until `mlb status` shows `desired` in force.
    fn wait_in_force(&self, desired: &Desired, timeout: Duration) -> bool {
        let started = Instant::now();
        loop {
            if self.in_force().as_ref() == Some(desired) {
                return true;
            }
            if started.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn refusals_logged(&self) -> u64 {
        self.bed.log_text().matches("config refused").count() as u64
    }

    fn start_daemon(&mut self) {
        let started = Instant::now();
        self.bed.start_daemon();
        let pid = self.bed.daemon.as_ref().expect("started").id();
        self.incarnations.push(Incarnation {
            pid,
            started: Instant::now(),
            start_took: started.elapsed(),
            samples: Vec::new(),
        });
    }

    fn sample(&mut self) {
        let Some(inc) = self.incarnations.last_mut() else {
            return;
        };
        let pid = inc.pid;
        let (Some(rss_kib), Some(fds), Some(tasks)) = (
            read_rss_kib(pid),
            count_dir(&format!("/proc/{pid}/fd")),
            count_dir(&format!("/proc/{pid}/task")),
        ) else {
            return;
        };
        inc.samples.push(Sample {
            age: inc.started.elapsed(),
            rss_kib,
            fds,
            tasks,
        });
    }

    fn check_daemon_alive(&mut self) {
        let exited = self
            .bed
            .daemon
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        if let Some(status) = exited {
            let at = now_s(self.started, Instant::now());
            self.unexpected_exits.push(format!(
                "at {at:.1}s the daemon exited on its own: {status}"
            ));
            self.bed.daemon = None;
            self.start_daemon();
        }
    }

    fn reload(&mut self) {
        self.reloads += 1;
        let k = self.reloads;
        if k % 10 == 5 {
            let before = self.refusals_logged();
            self.broken_sent += 1;
            self.install(&self.broken_yaml(k / 10));
            self.file_broken = true;
            let started = Instant::now();
            while self.refusals_logged() == before && started.elapsed() < Duration::from_secs(3) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.refusals_logged() > before {
                self.broken_refused += 1;
            }
            // The running config stays.
            if self.in_force().as_ref() != Some(&self.desired) {
                self.reload_check_failures.push(format!(
                    "at {:.1}s after a broken config: in force {:?}, expected {:?}",
                    now_s(self.started, Instant::now()),
                    self.in_force(),
                    self.desired
                ));
            }
            return;
        }
        let mut next = self.desired.clone();
        if k % 7 == 3 {
            // Add or remove one backend other than be1.
            let candidate = self.rng.random_range(2..=self.backends);
            if let Some(pos) = next.members.iter().position(|(i, _)| *i == candidate) {
                if next.members.len() > 2 {
                    next.members.remove(pos);
                    self.faults.push(Fault {
                        backend: candidate,
                        at: Instant::now(),
                        until: Instant::now() + FAULT_SLACK,
                    });
                    self.membership_changes += 1;
                }
            } else {
                next.members.push((candidate, 1));
                next.members.sort_unstable();
                self.membership_changes += 1;
                if let Some((victim, back)) = self.dead
                    && victim == candidate
                {
                    // Added while its server is dead: until its checks take it out (or, had
                    // it no flows before its rise checks pass, not at all).
                    self.added_while_dead += 1;
                    self.faults.push(Fault {
                        backend: candidate,
                        at: Instant::now(),
                        until: back.max(Instant::now() + DETECTION_BOUND),
                    });
                }
            }
        }
        // Alternate weights: 1..=3 one way, then the other.
        for (i, weight) in &mut next.members {
            *weight = if k.is_multiple_of(2) {
                1 + (*i as u32 % 3)
            } else {
                3 - (*i as u32 % 3)
            };
        }
        self.install(&self.good_yaml(&next));
        self.file_broken = false;
        self.desired = next;
        if self.wait_in_force(&self.desired, Duration::from_secs(3)) {
            self.reloads_applied_checked += 1;
        } else {
            self.reload_check_failures.push(format!(
                "at {:.1}s a reload was not in force after 3 s: {:?}, expected {:?}",
                now_s(self.started, Instant::now()),
                self.in_force(),
                self.desired
            ));
        }
    }

    fn kill_backend(&mut self) {
        let victim = self.rng.random_range(2..=self.backends);
        self.bed.kill_server(victim);
        let back = Instant::now() + BACKEND_DOWN_FOR;
        self.faults.push(Fault {
            backend: victim,
            at: Instant::now(),
            until: Instant::now() + DETECTION_BOUND,
        });
        self.dead = Some((victim, back));
        self.kills.push(Instant::now());
        self.backend_kills += 1;
    }

    fn kill_daemon(&mut self) {
        self.daemon_restarts.push(Instant::now());
        self.bed.stop_daemon("-KILL");
        self.daemon_kills += 1;
        self.start_daemon();
        // The new daemon runs the file's config.
        if !self.wait_in_force(&self.desired, Duration::from_secs(5)) {
            self.reload_check_failures.push(format!(
                "at {:.1}s after a daemon restart: in force {:?}, expected {:?}",
                now_s(self.started, Instant::now()),
                self.in_force(),
                self.desired
            ));
        }
    }

    fn open_group(&mut self) {
        match Connections::open_to(
            &self.bed.bed.client.netns,
            self.vip(),
            GROUP_CONNECTIONS,
            EXCHANGE_EVERY,
        ) {
            Ok(conns) => {
                let life = Duration::from_millis(self.rng.random_range(10_000..30_000));
                self.groups.push((Instant::now() + life, conns));
            }
            Err(e) => self.failed_opens.push((Instant::now(), e.to_string())),
        }
    }

    fn close_due_groups(&mut self, all: bool) {
        let now = Instant::now();
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.groups)
            .into_iter()
            .partition(|(until, _)| all || *until <= now);
        self.groups = keep;
        for (_, conns) in due {
            self.finished.extend(conns.stop());
        }
    }

    fn all_reports(&self) -> Vec<ConnectionReport> {
        let mut reports = self.finished.clone();
        if let Some(steady) = &self.steady {
            reports.extend(steady.reports());
        }
        for (_, g) in &self.groups {
            reports.extend(g.reports());
        }
        reports
    }

    /// Whether backend `name`'s fault explains connection `r` breaking.
    fn excused(&self, r: &ConnectionReport) -> bool {
        let Some(index) = r
            .backend
            .strip_prefix("be")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            return false;
        };
        let broke = r.broken_at.unwrap_or_else(Instant::now);
        self.faults.iter().any(|f| {
            f.backend == index && f.at + FAULT_SLACK >= r.opened && f.at <= broke + EXCHANGE_EVERY
        })
    }

    /// Whether a new connection started at `at` may fail: a backend was dead or being
    /// removed then.
    fn in_fault_window(&self, at: Instant) -> bool {
        self.faults
            .iter()
            .any(|f| at + SHORT_TIMEOUT + Duration::from_millis(500) >= f.at && at <= f.until)
    }

    fn status_line(&self, total: Duration) -> String {
        let reports = self.all_reports();
        let live = self
            .steady
            .iter()
            .chain(self.groups.iter().map(|(_, g)| g))
            .flat_map(Connections::reports)
            .filter(|r| r.broken.is_none())
            .count();
        let broken: Vec<_> = reports.iter().filter(|r| r.broken.is_some()).collect();
        let unexpected = broken.iter().filter(|r| !self.excused(r)).count();
        let (short, short_failed) = self.short.as_ref().map_or((0, 0), ShortLoad::counts);
        let res = self
            .incarnations
            .iter()
            .rev()
            .find_map(|i| i.samples.last())
            .map_or_else(String::new, |s| {
                format!(
                    "rss {:.1} MiB fds {} tasks {}",
                    s.rss_kib as f64 / 1024.0,
                    s.fds,
                    s.tasks
                )
            });
        format!(
            "{:>5.0}/{:.0}s reloads {} ({} broken refused) kills {} daemon {} | conns {} open, {} broken ({} unexpected) of {} | short {} ({} failed) | {}",
            self.started.elapsed().as_secs_f64(),
            total.as_secs_f64(),
            self.reloads,
            self.broken_refused,
            self.backend_kills,
            self.daemon_kills,
            live,
            broken.len(),
            unexpected,
            reports.len(),
            short,
            short_failed,
            res
        )
    }
}

/// Median RSS, fewest fds and tasks of an incarnation's samples whose age lies in
/// `[from, to)` (fewest: the soak's own `mlb status` calls come and go as control-socket
/// connections; a leak raises the floor).
fn window(inc: &Incarnation, from: Duration, to: Duration) -> Option<(u64, usize, usize)> {
    let mut rss: Vec<u64> = Vec::new();
    let (mut fds, mut tasks) = (usize::MAX, usize::MAX);
    for s in inc.samples.iter().filter(|s| s.age >= from && s.age < to) {
        rss.push(s.rss_kib);
        fds = fds.min(s.fds);
        tasks = tasks.min(s.tasks);
    }
    if rss.is_empty() {
        return None;
    }
    rss.sort_unstable();
    Some((rss[rss.len() / 2], fds, tasks))
}

fn flat(what: &str, first: (u64, usize, usize), last: (u64, usize, usize)) -> Vec<String> {
    let mut problems = Vec::new();
    let rss_limit = (first.0 as f64 * (1.0 + RSS_TOLERANCE)) as u64 + RSS_SLACK_KIB;
    if last.0 > rss_limit {
        problems.push(format!(
            "{what}: RSS grew from {} KiB to {} KiB (limit {rss_limit})",
            first.0, last.0
        ));
    }
    if last.1 > first.1 + FD_SLACK {
        problems.push(format!(
            "{what}: file descriptors grew from {} to {}",
            first.1, last.1
        ));
    }
    if last.2 > first.2 + TASK_SLACK {
        problems.push(format!("{what}: tasks grew from {} to {}", first.2, last.2));
    }
    problems
}

fn triple(t: Option<(u64, usize, usize)>) -> Value {
    t.map_or(
        Value::Null,
        |(rss, fds, tasks)| json!({"rss_kib": rss, "fds": fds, "tasks": tasks}),
    )
}

fn leftovers(pin_dir: &Path) -> usize {
    let name = pin_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned();
    std::fs::read_dir(lb_userspace::state::RUN_DIR)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| n.starts_with(&format!("{name}.")))
                })
                .count()
        })
        .unwrap_or(0)
}

fn main() {
    let args = Args::parse();
    assert!(args.backends >= 3, "--backends: at least 3");
    let total = Duration::from_secs_f64(args.minutes * 60.0);
    let daemon_every = Duration::from_secs(args.daemon_every.max(5));
    let backend_every = Duration::from_secs_f64(args.backend_every.max(2.0));
    let cpu = cpu_model();
    println!(
        "Soak: {:.1} min on {cpu}; {} backends (be1 never faulted); a reload every {:?} \
         (weights, every 7th a backend added or removed, every 10th broken), a backend killed \
         every {:?} for {:?}, the daemon kill -9ed every {:?}",
        args.minutes, args.backends, RELOAD_EVERY, backend_every, BACKEND_DOWN_FOR, daemon_every
    );

    let bed = DaemonBed::new(args.backends);
    let desired = Desired {
        members: (1..=args.backends).map(|i| (i, 1)).collect(),
    };
    let mut soak = Soak {
        bed,
        rng: StdRng::seed_from_u64(args.seed),
        started: Instant::now(),
        backends: args.backends,
        desired,
        faults: Vec::new(),
        dead: None,
        incarnations: Vec::new(),
        reloads: 0,
        reloads_applied_checked: 0,
        reload_check_failures: Vec::new(),
        broken_sent: 0,
        broken_refused: 0,
        membership_changes: 0,
        file_broken: false,
        added_while_dead: 0,
        backend_kills: 0,
        kills: Vec::new(),
        daemon_restarts: Vec::new(),
        daemon_kills: 0,
        unexpected_exits: Vec::new(),
        steady: None,
        groups: Vec::new(),
        finished: Vec::new(),
        failed_opens: Vec::new(),
        short: None,
    };
    soak.bed.write_config(&soak.good_yaml(&soak.desired));
    soak.start_daemon();
    for i in 1..=args.backends {
        soak.bed
            .wait_for_health(&format!("be{i}"), POOL, "up", Duration::from_secs(20));
    }
    soak.steady = Some(
        Connections::open_to(
            &soak.bed.bed.client.netns,
            soak.vip(),
            STEADY_CONNECTIONS,
            EXCHANGE_EVERY,
        )
        .unwrap_or_else(|e| panic!("opening the steady connections: {e}")),
    );
    soak.short = Some(
        ShortLoad::start_to(
            &soak.bed.bed.client.netns,
            soak.vip(),
            SHORT_EVERY,
            SHORT_TIMEOUT,
            total + Duration::from_secs(60),
        )
        .expect("short load"),
    );

    soak.started = Instant::now();
    let tty = std::io::stdout().is_terminal();
    let (mut next_reload, mut next_kill, mut next_daemon, mut next_group, mut next_sample) = (
        soak.started + RELOAD_EVERY,
        soak.started + backend_every,
        soak.started + daemon_every,
        soak.started,
        soak.started,
    );
    let mut next_line = soak.started;
    while soak.started.elapsed() < total {
        let now = Instant::now();
        soak.check_daemon_alive();
        if let Some((victim, back)) = soak.dead
            && now >= back
        {
            soak.bed.restart_server(victim);
            soak.dead = None;
        }
        if now >= next_sample {
            soak.sample();
            next_sample += Duration::from_secs(1);
        }
        if now >= next_reload {
            soak.reload();
            next_reload = Instant::now().max(next_reload + RELOAD_EVERY);
        }
        if now >= next_kill && soak.dead.is_none() {
            soak.kill_backend();
            next_kill = now + backend_every;
        }
        // Never with a backend dead (its detection needs a running daemon), nor with a
        // broken config in the file (a daemon does not start on one).
        if now >= next_daemon && soak.dead.is_none() && !soak.file_broken {
            soak.kill_daemon();
            next_daemon = Instant::now() + daemon_every;
        }
        if now >= next_group {
            soak.open_group();
            next_group = now + GROUP_EVERY;
        }
        soak.close_due_groups(false);
        if now >= next_line {
            let line = soak.status_line(total);
            if tty {
                print!("\r\x1b[2K{line}");
                let _ = std::io::stdout().flush();
                next_line = now + Duration::from_secs(1);
            } else {
                println!("{line}");
                next_line = now + Duration::from_secs(10);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if tty {
        println!();
    }
    let elapsed = soak.started.elapsed();

    // Let every live connection exchange once more after the last fault.
    if let Some((victim, _)) = soak.dead.take() {
        soak.bed.restart_server(victim);
    }
    std::thread::sleep(Duration::from_secs(1));
    soak.sample();
    soak.close_due_groups(true);
    let steady = soak
        .steady
        .take()
        .map(Connections::stop)
        .unwrap_or_default();
    let short = soak
        .short
        .take()
        .map(ShortLoad::stop_timed)
        .unwrap_or_default();
    let mut reports = std::mem::take(&mut soak.finished);
    let steady_count = steady.len();
    let steady_survived: Vec<&ConnectionReport> =
        steady.iter().filter(|r| r.broken.is_none()).collect();
    let steady_survived_exchanges: u64 = steady_survived.iter().map(|r| r.exchanges).sum();
    let steady_survived_count = steady_survived.len();
    reports.extend(steady);

    let broken: Vec<&ConnectionReport> = reports.iter().filter(|r| r.broken.is_some()).collect();
    let unexpected: Vec<String> = broken
        .iter()
        .filter(|r| !soak.excused(r))
        .map(|r| {
            format!(
                "connection :{} to {} opened at {:.1}s broke at {:.1}s after {} exchanges: {}",
                r.local_port,
                r.backend,
                now_s(soak.started, r.opened),
                now_s(soak.started, r.broken_at.expect("broken")),
                r.exchanges,
                r.broken.as_deref().unwrap_or_default()
            )
        })
        .collect();
    let short_failed: Vec<&TimedResult> = short.iter().filter(|(_, r)| r.is_err()).collect();
    let short_unexcused: Vec<String> = short_failed
        .iter()
        .filter(|(at, _)| !soak.in_fault_window(*at))
        .map(|(at, r)| {
            let nearest = |events: &[Instant]| {
                events
                    .iter()
                    .map(|e| now_s(soak.started, *at) - now_s(soak.started, *e))
                    .min_by(|a, b| a.abs().total_cmp(&b.abs()))
                    .map_or("-".to_owned(), |d| format!("{d:+.2}s"))
            };
            format!(
                "short connection at {:.2}s: {} (from the nearest daemon kill -9 {}, backend kill {})",
                now_s(soak.started, *at),
                r.as_ref().err().map_or("", String::as_str),
                nearest(&soak.daemon_restarts),
                nearest(&soak.kills)
            )
        })
        .chain(
            soak.failed_opens
                .iter()
                .filter(|(at, _)| !soak.in_fault_window(*at))
                .map(|(at, e)| format!("opening a group at {:.2}s: {e}", now_s(soak.started, *at))),
        )
        .collect();

    // Resources: the first and the last daemon that lived a whole period, compared in
    // the same age window; and within the first and last daemon, early against late.
    let full: Vec<&Incarnation> = soak
        .incarnations
        .iter()
        .filter(|i| {
            i.samples
                .last()
                .is_some_and(|s| s.age + Duration::from_secs(3) >= daemon_every)
        })
        .collect();
    let mut problems: Vec<String> = Vec::new();
    let late = (daemon_every / 2, daemon_every + Duration::from_secs(5));
    let (first_late, last_late) = match (full.first(), full.last()) {
        (Some(first), Some(last)) => (window(first, late.0, late.1), window(last, late.0, late.1)),
        _ => (None, None),
    };
    if let (Some(first), Some(last)) = (first_late, last_late)
        && full.len() > 1
    {
        problems.extend(flat("first vs last daemon at the same age", first, last));
    }
    let within = |inc: &Incarnation| {
        let end = inc.samples.last().map_or(Duration::ZERO, |s| s.age);
        (
            window(inc, end / 4, end / 2),
            window(inc, end * 3 / 4, end + Duration::from_secs(1)),
        )
    };
    let mut within_json = Vec::new();
    for (what, inc) in [
        ("first daemon", soak.incarnations.first()),
        ("last daemon", soak.incarnations.last()),
    ] {
        let Some(inc) = inc else { continue };
        let (early, late) = within(inc);
        if let (Some(e), Some(l)) = (early, late) {
            problems.extend(flat(&format!("{what}: early vs late"), e, l));
        }
        within_json.push(
            json!({"daemon": what, "pid": inc.pid, "early": triple(early), "late": triple(late)}),
        );
    }
    let log = soak.bed.log_text();
    if log.contains("panicked") {
        problems.push("the daemon panicked (see its log)".into());
    }
    problems.extend(soak.unexpected_exits.iter().cloned());
    problems.extend(soak.reload_check_failures.iter().cloned());
    if soak.broken_refused < soak.broken_sent {
        problems.push(format!(
            "{} of {} broken configs were not refused",
            soak.broken_sent - soak.broken_refused,
            soak.broken_sent
        ));
    }
    problems.extend(unexpected.iter().cloned());
    problems.extend(short_unexcused.iter().cloned());
    let leftover = leftovers(&soak.bed.pin_dir);
    if leftover > 3 {
        problems.push(format!("{leftover} files of the daemon in /run/mlb"));
    }
    if soak.reloads == 0 || soak.backend_kills == 0 {
        problems.push("the run was too short for any fault".into());
    }

    // Per backend kill: the failed short connections around it, and the last one's delay.
    let per_kill: Vec<(usize, f64)> = soak
        .kills
        .iter()
        .map(|k| {
            let near: Vec<f64> = short_failed
                .iter()
                .filter(|(at, _)| *at + Duration::from_secs(2) >= *k && *at <= *k + DETECTION_BOUND)
                .map(|(at, _)| at.saturating_duration_since(*k).as_secs_f64() * 1000.0)
                .collect();
            (near.len(), near.iter().copied().fold(0.0, f64::max))
        })
        .collect();
    let failed_per_kill =
        per_kill.iter().map(|p| p.0).sum::<usize>() as f64 / per_kill.len().max(1) as f64;
    let last_failure_ms = per_kill.iter().map(|p| p.1).fold(0.0, f64::max);
    let starts: Vec<f64> = soak
        .incarnations
        .iter()
        .map(|i| i.start_took.as_secs_f64() * 1000.0)
        .collect();
    let all_samples: Vec<&Sample> = soak.incarnations.iter().flat_map(|i| &i.samples).collect();
    let max_rss = all_samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let max_fds = all_samples.iter().map(|s| s.fds).max().unwrap_or(0);
    let max_tasks = all_samples.iter().map(|s| s.tasks).max().unwrap_or(0);
    let short_ok = short.len() - short_failed.len();

    println!(
        "\nSoak summary ({:.1} min, {cpu})",
        elapsed.as_secs_f64() / 60.0
    );
    let row = |k: &str, v: String| println!("  {k:<52} {v}");
    row(
        "reloads (checked in force / broken refused / sent)",
        format!(
            "{} ({} / {} / {})",
            soak.reloads, soak.reloads_applied_checked, soak.broken_refused, soak.broken_sent
        ),
    );
    row(
        "backends added or removed by reload",
        soak.membership_changes.to_string(),
    );
    row(
        "  of which re-added while their server was dead",
        soak.added_while_dead.to_string(),
    );
    row(
        "backend servers killed and restarted",
        soak.backend_kills.to_string(),
    );
    row(
        "  failed short connections per kill (last after)",
        format!("{failed_per_kill:.1} ({last_failure_ms:.0} ms)"),
    );
    row(
        "daemon kill -9 and restart (start ms median / max)",
        format!(
            "{} ({:.0} / {:.0})",
            soak.daemon_kills,
            median(&starts),
            starts.iter().copied().fold(0.0, f64::max)
        ),
    );
    row(
        "long-lived connections (broken: expected / UNEXPECTED)",
        format!(
            "{} ({} / {})",
            reports.len(),
            broken.len() - unexpected.len(),
            unexpected.len()
        ),
    );
    row(
        "  steady ones alive the whole run (exchanges)",
        format!("{steady_survived_count} of {steady_count} ({steady_survived_exchanges})"),
    );
    row(
        "short connections (failed in fault windows / OUTSIDE)",
        format!(
            "{} ok of {} ({} / {})",
            short_ok,
            short.len(),
            short_failed.len() + soak.failed_opens.len() - short_unexcused.len(),
            short_unexcused.len()
        ),
    );
    row(
        "daemon RSS / fds / tasks (max over the run)",
        format!(
            "{:.1} MiB / {max_fds} / {max_tasks}",
            max_rss as f64 / 1024.0
        ),
    );
    let show = |t: Option<(u64, usize, usize)>| {
        t.map_or("-".into(), |(r, f, k)| {
            format!("{:.1} MiB / {f} / {k}", r as f64 / 1024.0)
        })
    };
    row(
        &format!(
            "first vs last full daemon, age {:?}..{:?}",
            late.0, daemon_every
        ),
        format!("{} → {}", show(first_late), show(last_late)),
    );
    for w in &within_json {
        let parse = |v: &Value| {
            v.as_object().map(|o| {
                (
                    o["rss_kib"].as_u64().unwrap_or(0),
                    o["fds"].as_u64().unwrap_or(0) as usize,
                    o["tasks"].as_u64().unwrap_or(0) as usize,
                )
            })
        };
        row(
            &format!(
                "{} (pid {}): early vs late",
                w["daemon"].as_str().unwrap_or(""),
                w["pid"]
            ),
            format!("{} → {}", show(parse(&w["early"])), show(parse(&w["late"]))),
        );
    }
    if problems.is_empty() {
        println!("  PASS");
    } else {
        println!("  FAIL:");
        for p in problems.iter().take(40) {
            println!("    {p}");
        }
    }

    if let Some(path) = &args.json {
        let body = json!({
            "benchmark": "soak",
            "cpu": cpu,
            "minutes": elapsed.as_secs_f64() / 60.0,
            "seed": args.seed,
            "backends": args.backends,
            "daemon_every_s": daemon_every.as_secs(),
            "backend_every_s": backend_every.as_secs_f64(),
            "reloads": soak.reloads,
            "reloads_checked_in_force": soak.reloads_applied_checked,
            "broken_configs_sent": soak.broken_sent,
            "broken_configs_refused": soak.broken_refused,
            "membership_changes": soak.membership_changes,
            "added_while_dead": soak.added_while_dead,
            "short_failed_per_kill": failed_per_kill,
            "short_last_failure_after_kill_ms": last_failure_ms,
            "backend_kills": soak.backend_kills,
            "daemon_kills": soak.daemon_kills,
            "daemon_start_ms": starts,
            "long_lived": {
                "total": reports.len(),
                "broken_expected": broken.len() - unexpected.len(),
                "broken_unexpected": unexpected,
                "steady": steady_count,
                "steady_survived": steady_survived_count,
                "steady_survived_exchanges": steady_survived_exchanges,
            },
            "short": {
                "attempts": short.len(),
                "ok": short_ok,
                "failed": short_failed.len(),
                "failed_group_opens": soak.failed_opens.len(),
                "failed_outside_fault_windows": short_unexcused,
            },
            "resources": {
                "max": {"rss_kib": max_rss, "fds": max_fds, "tasks": max_tasks},
                "first_full_daemon_late": triple(first_late),
                "last_full_daemon_late": triple(last_late),
                "full_daemons": full.len(),
                "within": within_json,
                "samples": soak.incarnations.iter().map(|i| json!({
                    "pid": i.pid,
                    "samples": i.samples.iter().map(|s| [s.age.as_secs_f64(), s.rss_kib as f64, s.fds as f64, s.tasks as f64]).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            },
            "problems": problems,
            "pass": problems.is_empty(),
        });
        write_json(path, &body);
    }
    drop(soak);
    if !problems.is_empty() {
        std::process::exit(1);
    }
}
