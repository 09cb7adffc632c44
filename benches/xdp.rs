//! Per-packet cost of `lb_ingress` by BPF_PROG_TEST_RUN, the way DESIGN.md fixes it:
//! one packet per call, averaged over many calls, and the empty XDP program (`lb_pass`)
//! measured the same way in the same run; figures are reported as ns above it. Paths run
//! in interleaved rounds so that drift on a noisy machine hits all of them alike; the
//! figure is the median over rounds of (path mean - baseline mean), since interference
//! from other tenants only ever adds time. The thread is pinned to one CPU.
//!
//! A baseline path from the separate `lb-bench` object, "kernel LRU hash insert alone", is
//! measured in the same rounds: one LRU hash insert of a fresh key per call, what Katran
//! and Cilium pay per new flow; the new-flow figure is also given as a ratio to it.
//! Another, "one random line, conntrack-sized table", reads one random cache line of a
//! table as large as the connection table: the least any per-flow state of that size
//! costs a new flow on the machine (a TLB and a cache miss); the new-flow figure is also
//! given above it.
//!
//! `cargo xtask bench xdp [--calls N] [--only TEXT] [--json FILE]` (root);
//! `MLB_BENCH_CPU=N` pins to CPU N instead of the last one; `MLB_BENCH_BASE_OBJECT=FILE`
//! measures another build's `lb-ebpf` object beside this one, in the same rounds
//! (`MLB_BENCH_BASE_FIRST=1`: in the other order).

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr},
    time::Instant,
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use lb_common::consts::prog_names;
use lb_testbed::{
    bench::write_json,
    lab::Lab,
    packets::{XDP_PASS, tcp, udp},
};
use lb_userspace::dataplane::{BENCH_OBJECT, Capacities, Dataplane};
use serde_json::{Value, json};

const ROUNDS: usize = 20;
const REPEAT: u32 = 10_000;
const MANY_FLOWS: usize = 100_000;
const LRU_BASELINE: &str = "kernel LRU hash insert alone";
const LINE_BASELINE: &str = "one random line, conntrack-sized table";
const NEW_FLOW: &str = "new TCP flow (SYN, conntrack insert)";
const FRESH_EMPTY: &str = "empty program, a fresh packet per call";
const NOT_VIP: &str = "not for a Vip";

struct Path {
    name: &'static str,
    program: &'static str,
    /// Run on the second lab: no flow cache (the A/B of the flow cache), or with
    /// `MLB_BENCH_BASE_OBJECT` another build's object (the A/B of a change).
    second: bool,
    /// One packet per call; more than one means "a new flow on every call".
    packets: Vec<Vec<u8>>,
    /// DESIGN.md's target, ns above empty.
    target: Option<f64>,
    /// The packet is left unchanged, so `repeat` > 1 measures it truly.
    repeat_valid: bool,
}

struct Figure {
    name: &'static str,
    per_call_ns: f64,
    above_empty_ns: f64,
    round_spread_ns: f64,
    repeat_ns: Option<f64>,
    target: Option<f64>,
}

#[derive(clap::Parser)]
struct Args {
    /// Calls per path for the one-packet-per-call method.
    #[arg(long, default_value_t = 200_000)]
    calls: usize,
    /// Just the paths whose name contains this (and the baseline), for profiling.
    #[arg(long)]
    only: Option<String>,
    /// Write the figures here as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let Args {
        calls, json, only, ..
    } = clap::Parser::parse();

    // `MLB_BENCH_BASE_OBJECT=FILE`: the second lab runs another build's object (e.g. the
    // base commit's `lb-ebpf`) with the same capacities instead, and the main paths are
    // measured on both in the same rounds: the A/B of a change. The first lab's maps see
    // more traffic (the 100,000-flow path), so the two places are not alike: with
    // `MLB_BENCH_BASE_FIRST=1` the objects trade places, and the two orders together
    // cancel that out.
    let base = std::env::var("MLB_BENCH_BASE_OBJECT").ok().map(|path| {
        std::fs::read(&path).unwrap_or_else(|e| panic!("MLB_BENCH_BASE_OBJECT {path}: {e}"))
    });
    let swap = base.is_some()
        && std::env::var("MLB_BENCH_BASE_FIRST").is_ok_and(|v| !v.is_empty() && v != "0");
    let mut lab = Lab::with_object(
        Capacities {
            max_vips: 16,
            max_backends: 64,
            // Room for every new flow of the run: inserts, not LRU evictions, are measured.
            conntrack_entries: conntrack_entries(calls),
            ..Default::default()
        },
        base.as_deref().filter(|_| swap),
    );
    // The same, but without the flow cache: every established packet reads the
    // connection table. Its packets run in the first lab's namespace, whose veth0 has the
    // same addresses and neighbours.
    let mut second = Lab::with_object(
        Capacities {
            max_vips: 16,
            max_backends: 64,
            conntrack_entries: conntrack_entries(calls),
            // `MLB_BENCH_FLOW_CACHE=N`: give the second lab N slots instead (other sizes' A/B).
            flow_cache_entries: match &base {
                Some(_) => lb_common::consts::DEFAULT_FLOW_CACHE_ENTRIES,
                None => std::env::var("MLB_BENCH_FLOW_CACHE")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            },
            ..Default::default()
        },
        base.as_deref().filter(|_| !swap),
    );
    let mut paths = paths(&mut lab, calls);
    let extra = match base {
        Some(_) if swap => {
            for p in paths
                .iter_mut()
                .filter(|p| p.program == prog_names::LB_INGRESS)
            {
                p.name = Box::leak(format!("{} [base]", p.name).into_boxed_str());
            }
            second_paths(&mut second, &paths, "[base]", "[this build]")
        }
        Some(_) => second_paths(&mut second, &paths, "", "[base]"),
        None => uncached_paths(&mut second, &paths),
    };
    // The second lab (this build's) also chains its packets not for a Vip to a next
    // program (`interfaces[].next_program`): `count_next`, which counts and passes.
    let next = base.is_none().then(|| {
        // One interface: the daemon's `set_next_program_everywhere` case (MLB_BENCH_NEXT_PER_INTERFACE=1: `lb_next` dispatching by interface).
        let next = lb_testbed::next::CountNext::load(XDP_PASS);
        let ifindex = lab.with_dataplane(|_, ifindex| ifindex);
        let set = match std::env::var_os("MLB_BENCH_NEXT_PER_INTERFACE") {
            Some(_) => second.dataplane.set_next_programs(&[(ifindex, next.fd())]),
            None => second.dataplane.set_next_program_everywhere(next.fd()),
        };
        set.expect("setting the next program");
        next
    });
    let mut extra = extra;
    if next.is_some() {
        let p = paths.iter().find(|p| p.name == NOT_VIP).expect("a path");
        extra.push(Path {
            name: "not for a Vip, to a next program (count_next)",
            program: p.program,
            second: true,
            packets: p.packets.clone(),
            target: None,
            repeat_valid: true,
        });
    }
    paths.extend(extra);
    if let Some(only) = &only {
        let mut i = 0;
        paths.retain(|p| {
            i += 1;
            i == 1 || p.name.contains(only.as_str())
        });
    }
    let per_round = calls / ROUNDS;
    let mut bench = load_bench_object(
        calls as u32 * 2,
        lb_common::conntrack::buckets(conntrack_entries(calls)),
    );
    pin_to_last_cpu();
    let started = Instant::now();
    let dp2 = &mut second.dataplane;
    let figures = lab
        .with_dataplane(|dp, ifindex| measure([dp, dp2], &mut bench, ifindex, &paths, per_round));
    eprintln!("\r{:60}", "");
    drop(next);
    report(&figures, calls, started.elapsed().as_secs_f64());
    if let Some(path) = json {
        write_figures(&path, &figures, calls);
    }
}

fn paths(lab: &mut Lab, calls: usize) -> Vec<Path> {
    let mac = lab.lb_mac;
    let client: IpAddr = "10.50.0.7".parse().unwrap();
    let client6: IpAddr = "fd00:50::7".parse().unwrap();
    let vip: IpAddr = "10.200.0.1".parse().unwrap();
    let vip6: IpAddr = "fd00:200::1".parse().unwrap();
    let dsr: IpAddr = "10.200.0.2".parse().unwrap();
    let established = tcp(mac, client, 40000, vip, 80, false);
    let udp_flow = udp(mac, client, 5353, vip, 53);
    let established6 = tcp(mac, client6, 40000, vip6, 80, false);
    let established_dsr = tcp(mac, client, 40001, dsr, 443, false);
    // Prime the connection table so these are established flows.
    for pkt in [&established, &udp_flow, &established6, &established_dsr] {
        assert_eq!(lab.run(pkt).action, 3, "priming must forward");
    }
    let new_flows: Vec<Vec<u8>> = (0..calls)
        .map(|i| {
            let src = IpAddr::V4(Ipv4Addr::new(
                10,
                60 + (i >> 24) as u8,
                (i >> 16) as u8,
                (i >> 8) as u8,
            ));
            tcp(mac, src, 1024 + (i & 0xff) as u16 * 16 + 1, vip, 80, true)
        })
        .collect();
    // Established flows far more numerous than the flow cache's slots: most packets miss
    // it and take the connection table.
    let many: Vec<Vec<u8>> = (0..MANY_FLOWS)
        .map(|i| {
            let src = IpAddr::V4(Ipv4Addr::new(
                10,
                70 + (i >> 16) as u8,
                (i >> 8) as u8,
                i as u8,
            ));
            tcp(mac, src, 2000 + (i & 0x3ff) as u16, vip, 80, false)
        })
        .collect();
    for pkt in &many {
        assert_eq!(lab.run(pkt).action, 3, "priming must forward");
    }
    let not_vip = tcp(mac, client, 40002, "10.111.0.1".parse().unwrap(), 22, false);
    let (chained, decap) = second_chance_packets(lab, client, vip);
    let path = |name, program, packets: Vec<Vec<u8>>, target, repeat_valid| Path {
        name,
        program,
        second: false,
        packets,
        target,
        repeat_valid,
    };
    vec![
        path(
            "empty XDP program (baseline)",
            prog_names::LB_PASS,
            vec![established.clone()],
            None,
            true,
        ),
        path(
            "established TCP flow, IPIP",
            prog_names::LB_INGRESS,
            vec![established],
            Some(30.0),
            false,
        ),
        path(
            "established TCP flow, L2 DSR",
            prog_names::LB_INGRESS,
            vec![established_dsr],
            Some(30.0),
            true,
        ),
        path(
            "established UDP flow, IPIP",
            prog_names::LB_INGRESS,
            vec![udp_flow],
            Some(30.0),
            false,
        ),
        path(
            "established IPv6 TCP flow, IP6IP6",
            prog_names::LB_INGRESS,
            vec![established6],
            Some(30.0),
            false,
        ),
        path(
            "established, 100,000 flows (cache misses)",
            prog_names::LB_INGRESS,
            many,
            None,
            false,
        ),
        // The harness's own cost of a fresh packet per call (copied in from a cold buffer):
        // the new-flow path pays it, the LRU baseline (one packet, a key made inside) does not.
        path(
            FRESH_EMPTY,
            prog_names::LB_PASS,
            new_flows.clone(),
            None,
            false,
        ),
        path(
            NEW_FLOW,
            prog_names::LB_INGRESS,
            new_flows,
            Some(180.0),
            false,
        ),
        path(
            LRU_BASELINE,
            prog_names::LRU_INSERT,
            vec![not_vip.clone()],
            None,
            false,
        ),
        path(
            LINE_BASELINE,
            prog_names::RANDOM_LINE,
            vec![not_vip.clone()],
            None,
            false,
        ),
        path(
            NOT_VIP,
            prog_names::LB_INGRESS,
            vec![not_vip],
            Some(15.0),
            true,
        ),
        path(
            "second chance: chained TCP packet (LB side)",
            prog_names::LB_INGRESS,
            vec![chained],
            None,
            false,
        ),
        path(
            "lb_decap: deliver (IPIP)",
            prog_names::LB_DECAP,
            vec![decap.deliver],
            None,
            false,
        ),
        path(
            "lb_decap: chained, local socket (deliver)",
            prog_names::LB_DECAP,
            vec![decap.local],
            None,
            false,
        ),
        path(
            "lb_decap: chained, no socket (send on)",
            prog_names::LB_DECAP,
            vec![decap.forward],
            None,
            false,
        ),
    ]
}

/// The packets of `lb_decap`'s paths.
struct DecapPackets {
    deliver: Vec<u8>,
    local: Vec<u8>,
    forward: Vec<u8>,
}

/// Second chance in `lab`: Vip 0's previous table (backends 1 and 2; 3 was added since)
/// and `lb_decap`'s load-balancer prefix. Returns a packet of a moved flow that
/// `lb_ingress` chains, and packets for `lb_decap`'s paths; the lab's namespace keeps an
/// established connection (10.111.0.1:8080) for the chained packet a local socket has.
fn second_chance_packets(lab: &mut Lab, client: IpAddr, vip: IpAddr) -> (Vec<u8>, DecapPackets) {
    use lb_common::hash::Flow;
    let mac = lab.lb_mac;
    let previous = install_previous_table(lab);
    let sport = (1024..u16::MAX)
        .find(|sport| {
            let flow = Flow {
                src: client,
                dst: vip,
                sport: *sport,
                dport: 80,
                proto: lb_common::consts::PROTO_TCP,
            };
            let hash = flow.hash(lb_testbed::lab::SEED);
            lab.tables[&lb_testbed::lab::VIP_TCP].lookup(hash) != previous.lookup(hash)
        })
        .expect("a moved flow");
    let chained = tcp(mac, client, sport, vip, 80, false);
    // One counter, not all: an older object (the A/B's base, first) has fewer.
    let chained_count = |lab: &Lab| {
        lab.dataplane
            .counter(lb_common::consts::Counter::SecondChance)
            .unwrap()
    };
    let before = chained_count(lab);
    assert_eq!(lab.run(&chained).action, 3, "chaining must forward");
    assert_eq!(chained_count(lab), before + 1, "the packet must be chained");

    lab.dataplane
        .set_decap_sources(&[("172.16.0.0".parse().unwrap(), 16)])
        .expect("decap sources");
    let (lb, me, prev) = ([172, 16, 0, 9], [10, 111, 0, 1], [10, 111, 0, 12]);
    let wrap = |inner: &[u8], dst| {
        lb_testbed::packets::expect_ipip(inner, [2, 0, 0, 0, 0, 1], mac, lb, dst)
    };
    // A connection this "backend" has, so that the socket lookup finds it.
    let listener = lab
        .netns
        .enter(|| std::net::TcpListener::bind("10.111.0.1:8080"))
        .unwrap()
        .expect("listen");
    let client_side = lab
        .netns
        .enter(|| std::net::TcpStream::connect("10.111.0.1:8080"))
        .unwrap()
        .expect("connect");
    let (server_side, peer) = listener.accept().expect("accept");
    let here: IpAddr = "10.111.0.1".parse().unwrap();
    let established = tcp(mac, peer.ip(), peer.port(), here, 8080, false);
    let stray = tcp(mac, client, 40_003, here, 9090, false);
    // Keep the connection for the whole run.
    std::mem::forget((listener, client_side, server_side));
    let packets = DecapPackets {
        deliver: wrap(&established, me),
        local: wrap(&wrap(&established, prev), me),
        forward: wrap(&wrap(&stray, prev), me),
    };
    (chained, packets)
}

/// The established paths again on `lab` (no flow cache), primed there.
fn uncached_paths(lab: &mut Lab, paths: &[Path]) -> Vec<Path> {
    let pick = |name: &str, label: &'static str| {
        let p = paths.iter().find(|p| p.name == name).expect("a path");
        Path {
            name: label,
            program: p.program,
            second: true,
            packets: p.packets.clone(),
            target: p.target,
            repeat_valid: false,
        }
    };
    let out = vec![
        pick(
            "established TCP flow, IPIP",
            "established TCP flow, IPIP, no flow cache",
        ),
        pick(
            "established IPv6 TCP flow, IP6IP6",
            "established IPv6 TCP, IP6IP6, no flow cache",
        ),
        pick(
            "established, 100,000 flows (cache misses)",
            "established, 100,000 flows, no flow cache",
        ),
    ];
    for p in &out {
        for pkt in &p.packets {
            assert_eq!(lab.run(pkt).action, 3, "priming must forward");
        }
    }
    out
}

/// Vip 0's previous table in `lab`: backends 1 and 2 (3 was added since).
fn install_previous_table(lab: &mut Lab) -> lb_common::maglev::MaglevTable {
    use lb_common::maglev;
    let members: Vec<maglev::MaglevBackend> = [1, 2]
        .iter()
        .map(|id| maglev::MaglevBackend::new(*id, lab.backend(*id).addr, 1))
        .collect();
    let previous = maglev::build(&members, lb_testbed::lab::TABLE_SIZE, lb_testbed::lab::SEED);
    lab.dataplane
        .install_prev_tables(&[(lb_testbed::lab::VIP_TCP, &previous)])
        .expect("previous table");
    previous
}

/// The main paths again on the second `lab` (the A/B's other object), their `old` label
/// suffix replaced by `new`; its established flows primed there.
fn second_paths(lab: &mut Lab, paths: &[Path], old: &str, new: &str) -> Vec<Path> {
    // The chained packet is chained here too.
    install_previous_table(lab);
    let out: Vec<Path> = paths
        .iter()
        .filter(|p| p.program == prog_names::LB_INGRESS && !p.name.contains("100,000"))
        .map(|p| Path {
            name: Box::leak(
                format!(
                    "{} {new}",
                    p.name.strip_suffix(old).unwrap_or(p.name).trim_end()
                )
                .into_boxed_str(),
            ),
            program: p.program,
            second: true,
            packets: p.packets.clone(),
            target: p.target,
            repeat_valid: p.repeat_valid,
        })
        .collect();
    for p in out.iter().filter(|p| p.name.starts_with("established")) {
        for pkt in &p.packets {
            assert_eq!(lab.run(pkt).action, 3, "priming must forward");
        }
    }
    out
}

/// Connection-table entries of the labs: room for every new flow of the run, so that
/// inserts, not evictions, are measured.
fn conntrack_entries(calls: usize) -> u32 {
    (calls as u32 * 2).max(1 << 16)
}

/// The `lb-bench` object's baseline programs.
const BASELINES: [&str; 2] = [prog_names::LRU_INSERT, prog_names::RANDOM_LINE];

/// The `lb-bench` object with its LRU hash sized `entries` (room for every insert of the
/// run, as the connection table has: inserts, not evictions, are measured; the LRU has
/// per-CPU lists, as mlb's connection table had) and `lines` lines (a power of two, the
/// connection table's buckets).
fn load_bench_object(entries: u32, lines: u32) -> Ebpf {
    let mask = lines - 1;
    let mut bench = EbpfLoader::new()
        .map_max_entries("LRU", entries)
        .map_max_entries("LINES", lines)
        .override_global("LINES_MASK", &mask, true)
        .load(BENCH_OBJECT)
        .expect("loading lb-bench");
    for name in BASELINES {
        let program: &mut Xdp = bench
            .program_mut(name)
            .expect(name)
            .try_into()
            .expect("an XDP program");
        program
            .load()
            .unwrap_or_else(|e| panic!("verifying {name}: {e}"));
    }
    bench
}

/// One call of the baseline `name` on `packet`: the kernel's time for it.
fn run_bench(bench: &mut Ebpf, name: &str, packet: &[u8]) -> std::time::Duration {
    let program: &mut Xdp = bench
        .program_mut(name)
        .expect(name)
        .try_into()
        .expect("an XDP program");
    let mut out = vec![0u8; packet.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    opts.data_out = Some(&mut out);
    opts.repeat = 1;
    let result = program.test_run(opts).expect("test run");
    assert_eq!(result.return_value, XDP_PASS, "{name} failed");
    result.duration
}

fn measure(
    mut dps: [&mut Dataplane; 2],
    bench: &mut Ebpf,
    ifindex: u32,
    paths: &[Path],
    per_round: usize,
) -> Vec<Figure> {
    let mut rounds: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut cursor = vec![0usize; paths.len()];
    for round in 0..ROUNDS {
        for (i, path) in paths.iter().enumerate() {
            eprint!("\rround {}/{ROUNDS}: {:<45}", round + 1, path.name);
            let _ = std::io::stderr().flush();
            let mut total_ns = 0u128;
            for _ in 0..per_round {
                let packet = &path.packets[cursor[i] % path.packets.len()];
                cursor[i] += 1;
                let duration = if BASELINES.contains(&path.program) {
                    run_bench(bench, path.program, packet)
                } else {
                    dps[path.second as usize]
                        .test_run(path.program, packet, ifindex, 1)
                        .expect("test run")
                        .duration
                };
                total_ns += duration.as_nanos();
            }
            rounds[i].push(total_ns as f64 / per_round as f64);
        }
    }
    let repeat: Vec<Option<f64>> = paths
        .iter()
        .map(|p| {
            p.repeat_valid.then(|| {
                let out = dps[p.second as usize]
                    .test_run(p.program, &p.packets[0], ifindex, REPEAT)
                    .expect("test run");
                out.duration.as_nanos() as f64
            })
        })
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let baseline_repeat = repeat[0];
    paths
        .iter()
        .zip(&rounds)
        .zip(repeat)
        .map(|((p, r), rep)| {
            let mut diffs: Vec<f64> = r.iter().zip(&rounds[0]).map(|(a, b)| a - b).collect();
            diffs.sort_by(f64::total_cmp);
            let quantile = |q: f64| diffs[((diffs.len() - 1) as f64 * q).round() as usize];
            Figure {
                name: p.name,
                per_call_ns: mean(r),
                above_empty_ns: quantile(0.5),
                // Half the interquartile range of the per-round differences.
                round_spread_ns: quantile(0.75) - quantile(0.25),
                repeat_ns: rep.map(|x| x - baseline_repeat.unwrap_or(0.0)),
                target: p.target,
            }
        })
        .collect()
}

/// CPUs online (not this pinned thread's affinity).
fn online_cpus() -> i64 {
    // SAFETY: plain libc query.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }
}

/// Pins this thread to the last CPU, so that every call runs on one CPU's caches.
fn pin_to_last_cpu() {
    let cpu = std::env::var("MLB_BENCH_CPU")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(std::thread::available_parallelism().map_or(1, |n| n.get()) - 1);
    lb_testbed::bench::pin(0, cpu);
}

fn report(figures: &[Figure], calls: usize, seconds: f64) {
    println!(
        "\nXDP per-packet cost, BPF_PROG_TEST_RUN, one packet per call, {calls} calls per path \
         in {ROUNDS} interleaved rounds ({seconds:.1} s); ns > empty is the median over rounds"
    );
    println!(
        "{:<40} {:>10} {:>12} {:>10} {:>14} {:>8}",
        "path", "ns/call", "ns > empty", "± IQR/2", "repeat > empty", "target"
    );
    for f in figures {
        let target = f.target.map_or("-".into(), |t| {
            format!(
                "{} {t:.0}",
                if f.above_empty_ns <= t {
                    "✓ ≤"
                } else {
                    "✗ ≤"
                }
            )
        });
        println!(
            "{:<40} {:>10.1} {:>12.1} {:>10.1} {:>14} {:>8}",
            f.name,
            f.per_call_ns,
            f.above_empty_ns,
            f.round_spread_ns / 2.0,
            f.repeat_ns.map_or("n/a".into(), |r| format!("{r:.1}")),
            target
        );
    }
    println!(
        "repeat > empty: one call with repeat={REPEAT}, only for paths that leave the packet \
         unchanged (the kernel does not restore it between repetitions)."
    );
    if let Some(ratio) = new_flow_ratio(figures) {
        println!("new TCP flow / {LRU_BASELINE}: {ratio:.2}× (same run, ns above empty)");
    }
    if let Some(above) = new_flow_above_line(figures) {
        println!("new TCP flow - {LINE_BASELINE}: {above:.1} ns (same run)");
    }
}

/// The new-flow figure less its memory floor: what the path itself adds.
fn new_flow_above_line(figures: &[Figure]) -> Option<f64> {
    Some(above_empty(figures, NEW_FLOW)? - above_empty(figures, LINE_BASELINE)?)
}

/// Path `name`'s ns above empty, if it ran.
fn above_empty(figures: &[Figure], name: &str) -> Option<f64> {
    Some(figures.iter().find(|f| f.name == name)?.above_empty_ns)
}

/// The new-flow figure as a ratio to the kernel LRU hash insert alone.
fn new_flow_ratio(figures: &[Figure]) -> Option<f64> {
    Some(above_empty(figures, NEW_FLOW)? / above_empty(figures, LRU_BASELINE)?)
}

fn write_figures(path: &std::path::Path, figures: &[Figure], calls: usize) {
    let rows: Vec<Value> = figures
        .iter()
        .map(|f| {
            json!({
                "path": f.name,
                "ns_per_call": f.per_call_ns,
                "ns_above_empty": f.above_empty_ns,
                "round_iqr_ns": f.round_spread_ns,
                "repeat_ns_above_empty": f.repeat_ns,
                "target_ns": f.target,
                "met": f.target.map(|t| f.above_empty_ns <= t),
            })
        })
        .collect();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    write_json(
        path,
        &json!({
            "benchmark": "xdp",
            "method": "BPF_PROG_TEST_RUN, one packet per call, mean over calls per round, \
                       minus the empty XDP program in the same round, median over rounds",
            "calls": calls,
            "rounds": ROUNDS,
            "kernel": kernel.trim(),
            "cpus": online_cpus(),
            "new_flow_over_lru_insert": new_flow_ratio(figures),
            "new_flow_above_random_line_ns": new_flow_above_line(figures),
            "paths": rows,
        }),
    );
}
