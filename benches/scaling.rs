//! How the per-packet cost of `lb_ingress` grows with the work it is given, by
//! BPF_PROG_TEST_RUN the way DESIGN.md fixes it (one packet per call, averaged over many
//! calls, the empty XDP program `lb_pass` measured the same way in the same run, figures as
//! ns above it, in interleaved rounds):
//!
//! - **Vips**: 1 → 1,000 Vips (each its own address and 65,537-slot MaglevTable), 1,024
//!   established flows spread over them, cycled round-robin; and packets not for a Vip (to
//!   1,024 other addresses) as the Vip address pre-filter fills up;
//! - **backends per Vip**: 2 → 1,000 backends behind one Vip (table size as the daemon
//!   picks it), 4,096 established flows spread over them;
//! - **active flows**: 1 → 1,000,000 established flows of one Vip, cycled round-robin, so
//!   every call is a different flow: pressure on the connection table (an LRU hash with
//!   per-CPU lists, sized for the flows) and on the per-CPU flow cache in front of it.
//!
//! Flows are set up with a SYN each first; measured packets are ACKs of established flows.
//! The process is pinned to one CPU, so every flow lives in that CPU's LRU list and flow
//! cache. Every point checks that its calls were connection-table hits (misses are reported).
//! For each series the growth is judged from the figures: flat (the range within the noise:
//! max(5 ns, 15% of the mean, the rounds' spread), or no fit with R² ≥ 0.5), else
//! logarithmic or linear (a least-squares fit against log10(x) and against x, compared by
//! R²).
//!
//! `cargo xtask bench scaling [--json FILE]`; directly:
//! `cargo bench -p lb-userspace --bench scaling -- [--calls N] [--quick] [--json FILE]`
//! (root).

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr},
    process::Stdio,
    time::Instant,
};

use lb_common::{
    consts::{Counter, backend_flags, prog_names, vip_flags},
    hash::addr_words,
    maglev::{self, MaglevBackend, auto_table_size},
    types::{Backend, GlobalConfig, VipAddr, VipKey, VipState},
};
use lb_testbed::bench::{fit, pin, write_json};
use lb_testbed::{netns::Netns, packets::XDP_TX};
use lb_userspace::dataplane::{Capacities, Dataplane, enable_forwarding};
use serde_json::{Value, json};

const SEED: u32 = 0x5eed_1234;
const TABLE_SIZE: u32 = 65_537;
const ROUNDS: usize = 10;
const DEV: &str = "veth0";
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc1];
const VIP_SERIES: [usize; 4] = [1, 10, 100, 1000];
const BACKEND_SERIES: [usize; 4] = [2, 10, 100, 1000];
const FLOW_SERIES: [usize; 5] = [1, 100, 10_000, 100_000, 1_000_000];
/// Established flows of the Vip and backend series.
const VIP_SERIES_FLOWS: usize = 1024;
const BACKEND_SERIES_FLOWS: usize = 4096;
/// Backends of the Vip and flow series.
const FEW_BACKENDS: usize = 10;
const MAX_BACKENDS: usize = 1000;
/// Below this R² neither fit is a trend.
const MIN_R2: f64 = 0.5;

#[derive(clap::Parser)]
struct Options {
    /// Calls per point.
    #[arg(long, default_value_t = 200_000)]
    calls: usize,
    /// Fewer calls (at most 50,000) and flows (at most 100,000), for a look.
    #[arg(long)]
    quick: bool,
    /// Write the figures here as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn options() -> Options {
    let mut opts: Options = clap::Parser::parse();
    if opts.quick {
        opts.calls = opts.calls.min(50_000);
    }
    opts
}

/// One measured point of a series.
struct Point {
    x: usize,
    ns_per_call: f64,
    empty_ns: f64,
    above_empty: f64,
    /// Max minus min over rounds of (lb − empty).
    spread: f64,
    calls: usize,
    /// Connection-table misses among the measured calls (should be 0).
    misses: u64,
}

struct Series {
    name: &'static str,
    x_label: &'static str,
    path: String,
    points: Vec<Point>,
}

fn main() {
    let opts = options();
    // Every call on the same CPU: one LRU list and one flow cache hold all the flows.
    let cpu = std::thread::available_parallelism().map_or(1, |n| n.get()) - 1;
    pin(0, cpu);
    let rig = Rig::new();
    let started = Instant::now();
    let max_flows = if opts.quick { 100_000 } else { usize::MAX };
    let mut series = Vec::new();
    let (vips, not_vip) = vip_series(&rig, &opts);
    series.push(vips);
    series.push(not_vip);
    series.push(backend_series(&rig, &opts));
    series.push(flow_series(&rig, &opts, max_flows));
    progress("");
    eprintln!();
    report(&series, &opts, cpu, started.elapsed().as_secs_f64());
    if let Some(path) = &opts.json {
        let body = json_report(&series, &opts, cpu);
        write_json(path, &body);
    }
}

fn progress(line: &str) {
    eprint!("\r{line:<72}");
    let _ = std::io::stderr().flush();
}

/// Possible CPUs: the kernel splits an LRU map with per-CPU lists evenly among them.
fn possible_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .map(|r| match r.split_once('-') {
                    Some((a, b)) => Some(b.parse::<usize>().ok()? - a.parse::<usize>().ok()? + 1),
                    None => r.parse::<usize>().ok().map(|_| 1),
                })
                .sum::<Option<usize>>()
        })
        .unwrap_or(1)
}

fn backend_addr(id: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a6f_000a + id as u32)) // 10.111.0.11 …
}

fn vip_addr(index: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0ac8_0000 + index as u32)) // 10.200.0.0 …
}

fn client_addr(flow: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a40_0000 + flow as u32)) // 10.64.0.0 …
}

/// A TCP packet from client `flow` to `dst:80`, SYN or ACK.
fn tcp(lb_mac: [u8; 6], flow: usize, dst: IpAddr, syn: bool) -> Vec<u8> {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (client_addr(flow), dst) else {
        unreachable!("IPv4 only")
    };
    let tcp = etherparse::PacketBuilder::ethernet2(CLIENT_MAC, lb_mac)
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(40_000, 80, 1000, 64240);
    let tcp = if syn { tcp.syn() } else { tcp.ack(1) };
    let mut out = Vec::with_capacity(64);
    tcp.write(&mut out, b"scaling").expect("packet");
    out
}

/// A namespace with the veth the packets pretend to arrive on, and a permanent neighbour
/// entry for every backend address any series uses (`bpf_fib_lookup` needs them).
struct Rig {
    netns: Netns,
    ifindex: u32,
    mac: [u8; 6],
}

impl Rig {
    fn new() -> Self {
        let netns = Netns::new("mlb-scale").expect("namespace");
        netns
            .ip(&["link", "add", DEV, "type", "veth", "peer", "name", "veth1"])
            .unwrap();
        for dev in [DEV, "veth1"] {
            netns.ip(&["link", "set", dev, "up"]).unwrap();
        }
        netns
            .ip(&["addr", "add", "10.111.0.1/16", "dev", DEV])
            .unwrap();
        let batch: String = (1..=MAX_BACKENDS)
            .map(|id| {
                format!(
                    "neigh replace {} lladdr 02:00:00:be:{:02x}:{:02x} dev {DEV} nud permanent\n",
                    backend_addr(id),
                    id >> 8,
                    id & 0xff
                )
            })
            .collect();
        let mut ip = std::process::Command::new("ip")
            .args(["-n", netns.name(), "-batch", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("ip -batch");
        ip.stdin
            .take()
            .expect("piped")
            .write_all(batch.as_bytes())
            .expect("write to ip");
        assert!(ip.wait().expect("ip").success(), "neighbour entries");
        netns
            .enter(|| enable_forwarding(DEV))
            .unwrap()
            .expect("forwarding");
        Self {
            ifindex: netns.ifindex(DEV).unwrap(),
            mac: netns.mac(DEV).unwrap(),
            netns,
        }
    }

    /// A freshly loaded data plane with backends 1..=`backends` up.
    fn dataplane(&self, caps: Capacities, backends: usize) -> Dataplane {
        let mut dp = Dataplane::load(caps).unwrap_or_else(|e| panic!("{e}"));
        dp.set_global(&GlobalConfig {
            hash_seed: SEED,
            fib_generation: 1,
            encap_src4_base: u32::from_be_bytes([172, 16, 0, 0]),
            encap_src4_hostmask: 0xFFFF,
            encap_src6_base: addr_words("fd00:ffff::".parse().unwrap()),
            flow_cache_mask: 0,             // set by Dataplane::set_global
            cache_epoch: 0,                 // set by Dataplane::set_global
            vip_filter: Default::default(), // set by Dataplane::set_vip_filter
        })
        .unwrap();
        for id in 1..=backends {
            dp.set_backend(
                id as u32,
                &Backend {
                    addr: addr_words(backend_addr(id)),
                    flags: backend_flags::UP,
                    generation: 1,
                },
            )
            .unwrap();
        }
        dp
    }

    /// Vips 0..`vips` (port 80/TCP, IPIP), all with the same table over `backends`.
    fn add_vips(&self, dp: &mut Dataplane, vips: usize, backends: usize) {
        let members: Vec<MaglevBackend> = (1..=backends)
            .map(|id| MaglevBackend::new(id as u32, backend_addr(id), 1))
            .collect();
        let size = auto_table_size(backends).max(TABLE_SIZE);
        let table = maglev::build(&members, size, SEED);
        dp.set_vip_filter((0..vips).map(vip_addr)).unwrap();
        for i in 0..vips {
            let addr = vip_addr(i);
            dp.set_vip_addr(addr, Some(VipAddr { flags: 0 })).unwrap();
            dp.install_table(i as u32, &table).unwrap();
            let key = VipKey {
                addr: addr_words(addr),
                port: 80u16.to_be(),
                proto: 6,
                family: 4,
            };
            dp.set_vip(
                i as u32,
                &key,
                &VipState {
                    flags: vip_flags::ACTIVE,
                    generation: 1,
                },
            )
            .unwrap();
        }
    }

    /// Sets up `flows` flows (a SYN each, which must be forwarded) unless `prime` is false,
    /// then measures: `calls` calls of `lb_ingress` cycling over the flows' packets, and
    /// the empty program on the same packets, in interleaved rounds.
    #[expect(
        clippy::too_many_arguments,
        reason = "one call per series point; a struct would only rename them"
    )]
    fn measure(
        &self,
        dp: &mut Dataplane,
        label: &str,
        x: usize,
        flows: usize,
        calls: usize,
        packet: &(dyn Fn(usize, bool) -> Vec<u8> + Sync),
        prime: bool,
    ) -> Point {
        let ifindex = self.ifindex;
        self.netns
            .enter(|| {
                if prime {
                    for flow in 0..flows {
                        if flow % 4096 == 0 {
                            progress(&format!("{label}: setting up flows {flow}/{flows}"));
                        }
                        let out = dp
                            .test_run(prog_names::LB_INGRESS, &packet(flow, true), ifindex, 1)
                            .expect("test run");
                        assert_eq!(out.action, XDP_TX, "{label}: a SYN must be forwarded");
                    }
                }
                let before = dp.counters().unwrap();
                let lb_calls = calls.max(if prime { flows } else { 0 });
                let lb_per_round = lb_calls.div_ceil(ROUNDS);
                let empty_per_round = calls.div_ceil(ROUNDS);
                let mut lb = Vec::new();
                let mut empty = Vec::new();
                let mut cursor = 0usize;
                let mut empty_cursor = 0usize;
                for round in 0..ROUNDS {
                    progress(&format!("{label}: round {}/{ROUNDS}", round + 1));
                    let mut run = |program, n: usize, cursor: &mut usize| {
                        let mut total = 0u128;
                        for _ in 0..n {
                            let p = packet(*cursor % flows, false);
                            *cursor += 1;
                            total += dp
                                .test_run(program, &p, ifindex, 1)
                                .expect("test run")
                                .duration
                                .as_nanos();
                        }
                        total as f64 / n as f64
                    };
                    empty.push(run(prog_names::LB_PASS, empty_per_round, &mut empty_cursor));
                    lb.push(run(prog_names::LB_INGRESS, lb_per_round, &mut cursor));
                }
                let after = dp.counters().unwrap();
                let delta = |c: Counter| after[c as usize] - before[c as usize];
                let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
                let diffs: Vec<f64> = lb.iter().zip(&empty).map(|(a, b)| a - b).collect();
                let spread = diffs.iter().copied().fold(f64::MIN, f64::max)
                    - diffs.iter().copied().fold(f64::MAX, f64::min);
                Point {
                    x,
                    ns_per_call: mean(&lb),
                    empty_ns: mean(&empty),
                    above_empty: mean(&lb) - mean(&empty),
                    spread,
                    calls: lb_per_round * ROUNDS,
                    misses: if prime {
                        delta(Counter::ConntrackMiss) + delta(Counter::ConntrackMissNonSyn)
                    } else {
                        0
                    },
                }
            })
            .unwrap()
    }
}

fn vip_series(rig: &Rig, opts: &Options) -> (Series, Series) {
    let mut established = Vec::new();
    let mut not_vip = Vec::new();
    for &vips in &VIP_SERIES {
        let mut dp = rig.dataplane(
            Capacities {
                max_vips: 1024,
                max_backends: 16,
                conntrack_entries: 1 << 16,
                ..Default::default()
            },
            FEW_BACKENDS,
        );
        rig.add_vips(&mut dp, vips, FEW_BACKENDS);
        let mac = rig.mac;
        let packet = move |flow: usize, syn: bool| tcp(mac, flow, vip_addr(flow % vips), syn);
        established.push(rig.measure(
            &mut dp,
            &format!("{vips} Vips"),
            vips,
            VIP_SERIES_FLOWS,
            opts.calls,
            &packet,
            true,
        ));
        // 10.150.x.y: never a Vip; how often the pre-filter lets one through grows with
        // the Vips it holds.
        let other = move |i: usize, _: bool| {
            tcp(
                mac,
                i,
                IpAddr::V4(Ipv4Addr::from(0x0a96_0000 + i as u32)),
                false,
            )
        };
        not_vip.push(rig.measure(
            &mut dp,
            &format!("{vips} Vips, not for a Vip"),
            vips,
            1024,
            opts.calls,
            &other,
            false,
        ));
    }
    (
        Series {
            name: "vips",
            x_label: "Vips",
            path: format!(
                "established TCP flow, {VIP_SERIES_FLOWS} flows spread over the Vips, \
                 {FEW_BACKENDS} backends each"
            ),
            points: established,
        },
        Series {
            name: "vips_not_vip",
            x_label: "Vips",
            path: "packet not for a Vip (1,024 other addresses)".to_owned(),
            points: not_vip,
        },
    )
}

fn backend_series(rig: &Rig, opts: &Options) -> Series {
    let mut points = Vec::new();
    for &backends in &BACKEND_SERIES {
        let mut dp = rig.dataplane(
            Capacities {
                max_vips: 4,
                max_backends: MAX_BACKENDS as u32 + 1,
                conntrack_entries: 1 << 16,
                ..Default::default()
            },
            backends,
        );
        rig.add_vips(&mut dp, 1, backends);
        let mac = rig.mac;
        let packet = move |flow: usize, syn: bool| tcp(mac, flow, vip_addr(0), syn);
        points.push(rig.measure(
            &mut dp,
            &format!("{backends} backends"),
            backends,
            BACKEND_SERIES_FLOWS,
            opts.calls,
            &packet,
            true,
        ));
    }
    Series {
        name: "backends",
        x_label: "backends per Vip",
        path: format!("established TCP flow, {BACKEND_SERIES_FLOWS} flows over the backends"),
        points,
    }
}

fn flow_series(rig: &Rig, opts: &Options, max_flows: usize) -> Series {
    let mut points = Vec::new();
    for &flows in FLOW_SERIES.iter().filter(|&&f| f <= max_flows) {
        // Room for every flow in this CPU's share of the LRU (a quarter spare): inserts
        // and hits are measured, not evictions.
        let entries = (flows * possible_cpus() * 5 / 4).max(1 << 16) as u32;
        let mut dp = rig.dataplane(
            Capacities {
                max_vips: 4,
                max_backends: 16,
                conntrack_entries: entries,
                ..Default::default()
            },
            FEW_BACKENDS,
        );
        rig.add_vips(&mut dp, 1, FEW_BACKENDS);
        let mac = rig.mac;
        let packet = move |flow: usize, syn: bool| tcp(mac, flow, vip_addr(0), syn);
        points.push(rig.measure(
            &mut dp,
            &format!("{flows} flows"),
            flows,
            flows,
            opts.calls,
            &packet,
            true,
        ));
    }
    Series {
        name: "flows",
        x_label: "active flows",
        path: format!(
            "established TCP flow, every call a different flow of the set, {FEW_BACKENDS} backends"
        ),
        points,
    }
}

/// Flat if the whole range stays within max(5 ns, 15% of the mean, the points' mean
/// round-to-round spread), or if neither fit explains at least half the variance: no growth
/// that the noise could not explain. Otherwise the better (by R²) of a fit against log10(x)
/// and against x.
fn growth(points: &[Point]) -> Value {
    let xs: Vec<f64> = points.iter().map(|p| p.x as f64).collect();
    let ys: Vec<f64> = points.iter().map(|p| p.above_empty).collect();
    let min = ys.iter().copied().fold(f64::MAX, f64::min);
    let max = ys.iter().copied().fold(f64::MIN, f64::max);
    let mean = ys.iter().sum::<f64>() / ys.len().max(1) as f64;
    let logs: Vec<f64> = xs.iter().map(|x| x.log10()).collect();
    let (_, b_log, r2_log) = fit(&logs, &ys);
    let (_, b_lin, r2_lin) = fit(&xs, &ys);
    let noise = points.iter().map(|p| p.spread).sum::<f64>() / points.len().max(1) as f64;
    let band = (0.15 * mean.abs()).max(5.0).max(noise);
    let (model, summary) = if points.len() < 2 || max - min <= band {
        (
            "flat",
            format!(
                "flat: {min:.0}–{max:.0} ns from {} to {} (within {band:.0} ns, the noise band)",
                xs[0],
                xs[xs.len() - 1]
            ),
        )
    } else if r2_lin.max(r2_log) < MIN_R2 {
        (
            "flat",
            format!(
                "flat: {min:.0}–{max:.0} ns from {} to {}, no consistent trend (R² {:.2} \
                 against log10, {:.2} against x)",
                xs[0],
                xs[xs.len() - 1],
                r2_log,
                r2_lin
            ),
        )
    } else if r2_lin > r2_log {
        (
            "linear",
            format!(
                "linear: {:+.2} ns per 1,000 more (R² {r2_lin:.2}; against log10: R² {r2_log:.2})",
                b_lin * 1000.0
            ),
        )
    } else {
        (
            "log",
            format!("logarithmic: {b_log:+.1} ns per 10× (R² {r2_log:.2}; linear: R² {r2_lin:.2})"),
        )
    };
    json!({
        "model": model,
        "summary": summary,
        "ns_per_decade": b_log,
        "r2_log": r2_log,
        "ns_per_unit": b_lin,
        "r2_linear": r2_lin,
        "min_ns": min,
        "max_ns": max,
    })
}

fn report(series: &[Series], opts: &Options, cpu: usize, seconds: f64) {
    println!(
        "\nPer-packet cost as the work grows: BPF_PROG_TEST_RUN, one packet per call, ≥{} calls \
         per point in {ROUNDS} rounds interleaved with the empty program, on CPU {cpu} ({seconds:.0} s)",
        opts.calls
    );
    for s in series {
        println!("\n{} — {}", s.x_label, s.path);
        println!(
            "{:>10} {:>10} {:>12} {:>10} {:>9} {:>8}",
            s.x_label.split(' ').next().unwrap_or("x"),
            "ns/call",
            "ns > empty",
            "± rounds",
            "calls",
            "misses"
        );
        for p in &s.points {
            println!(
                "{:>10} {:>10.1} {:>12.1} {:>10.1} {:>9} {:>8}",
                p.x,
                p.ns_per_call,
                p.above_empty,
                p.spread / 2.0,
                p.calls,
                p.misses
            );
        }
        println!(
            "growth: {}",
            growth(&s.points)["summary"].as_str().unwrap_or("")
        );
    }
}

fn json_report(series: &[Series], opts: &Options, cpu: usize) -> Value {
    json!({
        "benchmark": "scaling",
        "method": "BPF_PROG_TEST_RUN, one packet per call, mean over calls, minus the empty XDP \
                   program measured in the same rounds; established TCP flows (set up by a SYN \
                   each), cycled round-robin",
        "calls": opts.calls,
        "rounds": ROUNDS,
        "quick": opts.quick,
        "cpu": cpu,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "series": series.iter().map(|s| json!({
            "name": s.name,
            "x_label": s.x_label,
            "path": s.path,
            "points": s.points.iter().map(|p| json!({
                "x": p.x,
                "ns_per_call": p.ns_per_call,
                "empty_ns": p.empty_ns,
                "ns_above_empty": p.above_empty,
                "round_spread_ns": p.spread,
                "calls": p.calls,
                "conntrack_misses": p.misses,
            })).collect::<Vec<_>>(),
            "growth": growth(&s.points),
        })).collect::<Vec<_>>(),
    })
}
