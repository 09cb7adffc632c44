//! Failover figures on the real daemon in the network-namespace testbed (root):
//!
//! - **detection**: from a backend's server being killed to the check that crosses the
//!   `fall` threshold (the checker's "health check: backend down" log line, its tracing
//!   timestamp);
//! - **detection to live**: from that check to the new MaglevTable being live in the
//!   kernel: a thread of this benchmark polls the daemon's pinned outer `TABLES` map
//!   (inner-map id per Vip slot) and timestamps the moment the slot points at a new table,
//!   which is the moment packets start using it. The daemon's `set_health` call returns
//!   later: the kernel waits for an RCU grace period after every map-in-map update (timed
//!   here in-process on a kernel data plane with the same config, for reference);
//! - **failed connections per backend failure** under a fixed load of short TCP
//!   connections from the client (one every 5 ms).
//!
//! `cargo xtask bench failover [--json FILE] [--rounds N]`

use std::{
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::maps::MapData;
use lb_common::consts::map_names;
use lb_testbed::bench::{median, write_json};
use lb_testbed::daemon::{Attempt, DaemonBed, check_yaml};
use lb_userspace::{
    config::Config,
    daemon::capacities,
    dataplane::Dataplane,
    reconcile::{Assignments, Reconciler},
};
use serde_json::{Value, json};

const BACKENDS: usize = 3;
const INTERVAL_MS: u64 = 100;
const TIMEOUT_MS: u64 = 50;
const RISE: u32 = 2;
const FALL: u32 = 3;
const JITTER_PERCENT: u32 = 10;
const LOAD_EVERY: Duration = Duration::from_millis(5);
/// Target for detection to live tables.
const TARGET_LIVE_US: f64 = 10_000.0;
/// In-process `set_health` calls timed (each direction).
const SWAP_SAMPLES: usize = 100;
/// Vip slots of the outer table map polled (the bed's `max_vips`).
const VIP_SLOTS: u32 = 16;

struct Round {
    backend: usize,
    address: IpAddr,
    kill_wall_us: i64,
    restart_wall_us: i64,
    killed: Instant,
    restarted: Instant,
    seen_down: Duration,
    seen_up: Duration,
}

struct Figures {
    backend: usize,
    detect_ms: f64,
    /// Checker line to the daemon loop's "health transition" line.
    hop_us: f64,
    /// Checker line to the new table in the outer map (down, then up).
    live_down_us: f64,
    live_up_us: f64,
    failed: usize,
    attempts: usize,
    failed_after_return: usize,
    seen_down_ms: f64,
    back_ms: f64,
}

#[derive(clap::Parser)]
struct Args {
    /// Backend kills.
    #[arg(long, default_value_t = 6)]
    rounds: usize,
    /// Vips sharing the pool (ports 80, 81, …; the load goes to port 80): every one's
    /// table is rebuilt at each failure.
    #[arg(long, default_value_t = 1)]
    vips: u32,
    /// Write the figures here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let Args {
        rounds, json, vips, ..
    } = clap::Parser::parse();
    // SAFETY: no arguments, no side effects.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "the failover benchmark builds network namespaces and runs the daemon: run it as root"
        );
        std::process::exit(1);
    }

    let mut bed = DaemonBed::new(BACKENDS);
    let check = check_yaml(
        "tcp",
        8080,
        (INTERVAL_MS, TIMEOUT_MS),
        (RISE, FALL),
        JITTER_PERCENT,
        "",
    );
    let members: Vec<(usize, u32)> = (1..=BACKENDS).map(|i| (i, 1)).collect();
    let pools = bed.pool_yaml("web", &members, &check);
    let vips_yaml: String = (0..vips)
        .map(|i| {
            format!(
                "  - name: web{i}\n    address: 10.200.0.1\n    port: {}\n    protocol: tcp\n    \
                 pool: web\n",
                80 + i
            )
        })
        .collect();
    let yaml = bed.config_yaml(&vips_yaml, &pools).replacen(
        "max_vips: 16",
        &format!("max_vips: {}", vips.max(16)),
        1,
    );
    bed.write_config(&yaml);
    bed.start_daemon();
    let config = Config::parse(&yaml, "failover bench").unwrap_or_else(|e| panic!("{e}"));

    let poller = TablePoller::start(&bed.pin_dir);
    let limit = Duration::from_secs(15 * rounds as u64 + 30);
    let load = bed.start_load(bed.vip(80), LOAD_EVERY, Duration::from_millis(300), limit);
    let origin = load.started;
    std::thread::sleep(Duration::from_secs(1));
    let mut plan = Vec::new();
    for r in 0..rounds {
        let backend = r % BACKENDS + 1;
        let name = format!("be{backend}");
        let (kill_wall_us, killed) = (wall_us(), Instant::now());
        bed.kill_server(backend);
        let seen_down = bed.wait_for_health(&name, "web", "DOWN", Duration::from_secs(10)) - killed;
        std::thread::sleep(Duration::from_millis(300));
        let (restart_wall_us, restarted) = (wall_us(), Instant::now());
        bed.restart_server(backend);
        let seen_up = bed.wait_for_health(&name, "web", "up", Duration::from_secs(10)) - restarted;
        std::thread::sleep(Duration::from_millis(500));
        plan.push(Round {
            backend,
            address: bed.bed.backends[backend - 1].addr4,
            kill_wall_us,
            restart_wall_us,
            killed,
            restarted,
            seen_down,
            seen_up,
        });
    }
    let attempts = load.stop();
    let swaps = poller.stop();
    let log = parse_log(&bed.log_text());
    let (swap_down, swap_up) = swap_in_process(&config);

    let figures: Vec<Figures> = plan
        .iter()
        .enumerate()
        .map(|(i, round)| {
            let end = plan.get(i + 1).map_or(Duration::MAX, |n| n.killed - origin);
            round_figures(round, &attempts, (origin, end), &log, &swaps).unwrap_or_else(|| {
                panic!("round {}: log lines missing:\n{}", i + 1, bed.log_text())
            })
        })
        .collect();
    let axis = vips_axis();
    report(
        &figures,
        &attempts,
        &swap_down,
        &swap_up,
        &axis,
        vips,
        json.as_deref(),
    );
}

/// One point of the Vips axis: N Vips sharing the failing backend's pool.
struct AxisPoint {
    vips: u32,
    /// `set_health` (a backend down) returning: every affected table live, in one batch.
    batched_us: f64,
    /// The same tables swapped one Vip at a time, as before the batch (one RCU grace
    /// period each).
    one_by_one_us: f64,
}

/// In-process on a kernel data plane: 1, 16 and 256 Vips sharing one pool of 3 backends.
fn vips_axis() -> Vec<AxisPoint> {
    let mut points = Vec::new();
    for vips in [1u32, 16, 256] {
        let mut yaml = format!(
            "global:\n  max_vips: {vips}\n  max_backends: 16\n  conntrack_entries: 65536\n\
             interfaces:\n  - name: eth0\nvips:\n"
        );
        for v in 0..vips {
            yaml += &format!(
                "  - name: v{v}\n    address: 10.200.{}.{}\n    port: 80\n    protocol: tcp\n    pool: web\n",
                v / 250,
                1 + v % 250
            );
        }
        yaml += "pools:\n  web:\n    backends:\n      - address: 10.100.0.11\n      \
                 - address: 10.100.0.12\n      - address: 10.100.0.13\n";
        let config = Config::parse(&yaml, "axis").unwrap_or_else(|e| panic!("{e}"));
        let dataplane = Dataplane::load(capacities(&config)).unwrap_or_else(|e| panic!("{e}"));
        let mut reconciler = Reconciler::new(dataplane, Assignments::default());
        reconciler.apply(&config).unwrap_or_else(|e| panic!("{e}"));
        let address: IpAddr = "10.100.0.11".parse().expect("address");
        let samples = if vips > 16 { 3 } else { 10 };
        let (mut batched, mut one_by_one) = (Vec::new(), Vec::new());
        for _ in 0..samples {
            let started = Instant::now();
            reconciler
                .set_health(&[("web".into(), address, false)])
                .unwrap_or_else(|e| panic!("{e}"));
            batched.push(started.elapsed().as_secs_f64() * 1e6);
            reconciler
                .set_health(&[("web".into(), address, true)])
                .unwrap_or_else(|e| panic!("{e}"));
            let tables: Vec<(u32, lb_common::maglev::MaglevTable)> = reconciler
                .tables()
                .values()
                .zip(0..)
                .map(|(t, id)| (id, (*t.table).clone()))
                .collect();
            let started = Instant::now();
            for (id, table) in &tables {
                reconciler
                    .dataplane_mut()
                    .install_table(*id, table)
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            one_by_one.push(started.elapsed().as_secs_f64() * 1e6);
        }
        points.push(AxisPoint {
            vips,
            batched_us: median(&batched),
            one_by_one_us: median(&one_by_one),
        });
    }
    points
}

/// One round's figures from the attempts, the daemon log and the table swaps seen.
fn round_figures(
    round: &Round,
    attempts: &[Attempt],
    (origin, end): (Instant, Duration),
    log: &[(i64, String)],
    swaps: &[i64],
) -> Option<Figures> {
    let (kill_at, restart_at) = (round.killed - origin, round.restarted - origin);
    let field = format!("backend={} ", round.address);
    let checker = |after: i64, what: &str| {
        log.iter()
            .find(|(t, l)| *t >= after && l.contains(what) && l.contains(&field))
            .map(|(t, _)| *t)
    };
    let down_us = checker(round.kill_wall_us, "health check: backend down")?;
    let up_us = checker(round.restart_wall_us, "health check: backend up")?;
    let daemon_us = log
        .iter()
        .find(|(t, l)| {
            *t >= down_us && l.contains("health transition applied") && l.contains(&field)
        })
        .map(|(t, _)| *t)?;
    let live_after = |t0: i64| {
        swaps
            .iter()
            .find(|&&t| t >= t0)
            .map_or(f64::NAN, |t| (t - t0) as f64)
    };
    let window =
        |from: Duration, to: Duration| attempts.iter().filter(move |a| a.at >= from && a.at < to);
    Some(Figures {
        backend: round.backend,
        detect_ms: (down_us - round.kill_wall_us) as f64 / 1000.0,
        hop_us: (daemon_us - down_us) as f64,
        live_down_us: live_after(down_us),
        live_up_us: live_after(up_us),
        failed: window(kill_at, restart_at)
            .filter(|a| a.result.is_err())
            .count(),
        attempts: window(kill_at, restart_at).count(),
        failed_after_return: window(restart_at, end)
            .filter(|a| a.result.is_err())
            .count(),
        seen_down_ms: round.seen_down.as_secs_f64() * 1000.0,
        back_ms: round.seen_up.as_secs_f64() * 1000.0,
    })
}

fn report(
    figures: &[Figures],
    attempts: &[Attempt],
    swap_down: &[f64],
    swap_up: &[f64],
    axis: &[AxisPoint],
    vips: u32,
    json: Option<&Path>,
) {
    let rate = attempts.len() as f64 / attempts.last().map_or(1.0, |a| a.at.as_secs_f64());
    let live: Vec<f64> = figures.iter().map(|f| f.live_down_us).collect();
    let live_up: Vec<f64> = figures.iter().map(|f| f.live_up_us).collect();
    let failed: Vec<f64> = figures.iter().map(|f| f.failed as f64).collect();
    let failed_mean = failed.iter().sum::<f64>() / failed.len() as f64;
    println!(
        "Failover: {BACKENDS} backends, tcp check every {INTERVAL_MS}ms ±{JITTER_PERCENT}%, timeout \
         {TIMEOUT_MS}ms, fall {FALL}, rise {RISE}; {vips} Vip(s) sharing the pool; load {rate:.0} \
         short connections/s; {} kills",
        figures.len()
    );
    println!(
        "{:>5} {:>7} {:>10} {:>11} {:>15} {:>13} {:>7} {:>9} {:>13} {:>11}",
        "round",
        "backend",
        "detect ms",
        "to loop µs",
        "down→live µs",
        "up→live µs",
        "failed",
        "of conns",
        "failed after",
        "back up ms"
    );
    for (i, f) in figures.iter().enumerate() {
        println!(
            "{:>5} {:>7} {:>10.1} {:>11.0} {:>15.0} {:>13.0} {:>7} {:>9} {:>13} {:>11.0}",
            i + 1,
            format!("be{}", f.backend),
            f.detect_ms,
            f.hop_us,
            f.live_down_us,
            f.live_up_us,
            f.failed,
            f.attempts,
            f.failed_after_return,
            f.back_ms
        );
    }
    println!(
        "detection to live table (down): median {:.0} µs, max {:.0} µs (target ≤ {TARGET_LIVE_US:.0} µs); \
         up: median {:.0} µs",
        median(&live),
        max(&live),
        median(&live_up)
    );
    println!(
        "set_health returns after: median {:.0} µs down, {:.0} µs up, max {:.0} µs (in-process, kernel \
         data plane; includes the kernel's RCU wait after the map-in-map update)",
        median(swap_down),
        median(swap_up),
        max(swap_down).max(max(swap_up))
    );
    println!(
        "failed connections per backend failure at {rate:.0}/s: mean {failed_mean:.1}, max {:.0}; \
         detection median {:.0} ms",
        max(&failed),
        median(&figures.iter().map(|f| f.detect_ms).collect::<Vec<_>>())
    );
    println!("Vips sharing the failing backend's pool (in-process, kernel data plane):");
    println!(
        "{:>6} {:>22} {:>26}",
        "vips", "all tables swapped µs", "one swap per vip µs (old)"
    );
    for p in axis {
        println!(
            "{:>6} {:>22.0} {:>26.0}",
            p.vips, p.batched_us, p.one_by_one_us
        );
    }
    let Some(path) = json else { return };
    let axis_rows: Vec<Value> = axis
        .iter()
        .map(|p| {
            json!({
                "vips": p.vips,
                "set_health_batched_us": p.batched_us,
                "one_swap_per_vip_us": p.one_by_one_us,
            })
        })
        .collect();
    let rows: Vec<Value> = figures
        .iter()
        .map(|f| {
            json!({
                "backend": format!("be{}", f.backend),
                "detect_ms": f.detect_ms,
                "checker_to_loop_us": f.hop_us,
                "detect_to_live_us": json_number(f.live_down_us),
                "up_to_live_us": json_number(f.live_up_us),
                "failed": f.failed,
                "connections": f.attempts,
                "failed_after_return": f.failed_after_return,
                "status_down_ms": f.seen_down_ms,
                "back_up_ms": f.back_ms,
            })
        })
        .collect();
    write_json(
        path,
        &json!({
            "benchmark": "failover",
            "check": {
                "kind": "tcp", "interval_ms": INTERVAL_MS, "timeout_ms": TIMEOUT_MS,
                "rise": RISE, "fall": FALL, "jitter_percent": JITTER_PERCENT,
            },
            "backends": BACKENDS,
            "vips_sharing_pool": vips,
            "load_connections_per_s": rate,
            "rounds": rows,
            "detect_to_live_us": {
                "median": json_number(median(&live)),
                "max": json_number(max(&live)),
                "target": TARGET_LIVE_US,
            },
            "set_health_return_us": {
                "down_median": json_number(median(swap_down)),
                "up_median": json_number(median(swap_up)),
            },
            "failed_per_failure": {"mean": failed_mean, "max": max(&failed)},
            "vips_axis": axis_rows,
        }),
    );
}

/// Watches the daemon's pinned outer table map from a thread: the wall-clock time (µs)
/// of every change of any Vip slot's inner table.
struct TablePoller {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<i64>>,
}

impl TablePoller {
    fn start(pin_dir: &Path) -> Self {
        let outer = MapData::from_pin(pin_dir.join(map_names::TABLES))
            .unwrap_or_else(|e| panic!("open the pinned {}: {e}", map_names::TABLES));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let fd = outer.fd().as_fd().as_raw_fd();
            let read = || {
                (0..VIP_SLOTS)
                    .map(|slot| inner_map_id(fd, slot))
                    .collect::<Vec<_>>()
            };
            let mut last = read();
            let mut changes = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let now = read();
                if now != last {
                    changes.push(wall_us());
                    last = now;
                }
                std::thread::sleep(Duration::from_micros(20));
            }
            changes
        });
        Self { stop, thread }
    }

    fn stop(self) -> Vec<i64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("poller")
    }
}

/// The id of the inner map in `slot` of an array-of-maps (0 if empty), by a raw
/// BPF_MAP_LOOKUP_ELEM (cheaper than opening the inner map each time).
fn inner_map_id(fd: i32, slot: u32) -> u32 {
    #[repr(C)]
    struct LookupAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    let mut id = 0u32;
    let attr = LookupAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: &slot as *const u32 as u64,
        value: &mut id as *mut u32 as u64,
        flags: 0,
    };
    // SAFETY: the attribute points at live locals of the sizes the map declares (u32 key,
    // u32 inner-map id for a lookup from user space).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_ELEM,
            &attr as *const LookupAttr,
            size_of::<LookupAttr>(),
        )
    };
    if rc == 0 { id } else { 0 }
}

/// `set_health` down and up, timed, on an unattached kernel data plane holding `config`.
fn swap_in_process(config: &Config) -> (Vec<f64>, Vec<f64>) {
    let dataplane = Dataplane::load(capacities(config)).unwrap_or_else(|e| panic!("{e}"));
    let mut reconciler = Reconciler::new(dataplane, Assignments::default());
    reconciler.apply(config).unwrap_or_else(|e| panic!("{e}"));
    let (pool, backend) = config.pools.iter().next().expect("a pool");
    let address = backend.backends[0].address;
    let (mut down, mut up) = (Vec::new(), Vec::new());
    for _ in 0..SWAP_SAMPLES {
        for (up_now, samples) in [(false, &mut down), (true, &mut up)] {
            let started = Instant::now();
            reconciler
                .set_health(&[(pool.clone(), address, up_now)])
                .unwrap_or_else(|e| panic!("{e}"));
            samples.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    (down, up)
}

fn wall_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// The daemon log's lines with their timestamps (µs since the epoch), ANSI colours removed.
fn parse_log(text: &str) -> Vec<(i64, String)> {
    text.lines()
        .map(strip_ansi)
        .filter_map(|line| {
            let stamp = line.split_whitespace().next()?;
            Some((parse_rfc3339_us(stamp)?, line))
        })
        .collect()
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters final-byte (a letter).
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `2026-05-20T10:11:12.123456Z` → µs since the epoch.
fn parse_rfc3339_us(stamp: &str) -> Option<i64> {
    let stamp = stamp.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>());
    let (h, min, s) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let micros: i64 = format!("{frac:0<6}")[..6].parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + h * 3600 + min * 60 + s) * 1_000_000) + micros)
}

fn max(values: &[f64]) -> f64 {
    values
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f64::NAN, f64::max)
}

fn json_number(x: f64) -> f64 {
    if x.is_finite() { x } else { -1.0 }
}
