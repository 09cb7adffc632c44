//! Kernel memory locked by the data plane's maps for 1, 16 and 256 Vips of 65537-slot
//! MaglevTables (with 1,000 backends and the default connection table), as the kernel
//! accounts it; the connection table's bytes per tracked flow, against a kernel LRU hash
//! of the same capacity (what mlb used before); and the per-CPU maps' memory as the CPU
//! count grows. `cargo xtask bench memory [--json FILE]` (root).

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use lb_common::{
    consts::{DEFAULT_CONNTRACK_ENTRIES, DEFAULT_FLOW_CACHE_ENTRIES, DEFAULT_TABLE_SIZE},
    maglev::{MaglevBackend, build},
};
use lb_testbed::bench::write_json;
use lb_userspace::dataplane::{BENCH_OBJECT, Capacities, Dataplane};
use serde_json::json;

/// The data plane's per-CPU maps (their memory is per CPU).
const PER_CPU: [&str; 7] = [
    "FLOW_CACHE_V4",
    "FLOW_CACHE_V6",
    "NEXT_HOPS",
    "FIB_SCRATCH",
    "STATS",
    "VIP_STATS",
    "BACKEND_STATS",
];

fn mib(bytes: f64) -> f64 {
    bytes / (1 << 20) as f64
}

#[derive(clap::Parser)]
struct Args {
    /// Write the figures here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let Args { json, .. } = clap::Parser::parse();
    let backends: Vec<MaglevBackend> = (1..=1000)
        .map(|i| MaglevBackend::new(i, IpAddr::V4(Ipv4Addr::from(0x0a64_0000 + i)), 1))
        .collect();
    let table = build(&backends, DEFAULT_TABLE_SIZE, 0);
    println!(
        "Locked kernel memory of the data plane (MiB), 1,000 backends, {DEFAULT_TABLE_SIZE}-slot tables"
    );
    println!(
        "{:>6} {:>14} {:>14} {:>10} {:>10}",
        "vips", "MaglevTables", "conntrack", "other", "total"
    );
    let mut rows = Vec::new();
    for vips in [1u32, 16, 256] {
        let mut dataplane = Dataplane::load(Capacities {
            max_vips: vips,
            max_backends: 1024,
            conntrack_entries: DEFAULT_CONNTRACK_ENTRIES,
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
        for id in 0..vips {
            dataplane.install_table(id, &table).unwrap();
        }
        let usage = dataplane.locked_memory().unwrap();
        let sum = |f: &dyn Fn(&str) -> bool| -> f64 {
            usage
                .iter()
                .filter(|(n, _)| f(n))
                .map(|(_, b)| *b as f64)
                .sum::<f64>()
                / (1 << 20) as f64
        };
        let tables = sum(&|n| n == "MaglevTables");
        let conntrack = sum(&|n| n.starts_with("CONNTRACK"));
        let total = sum(&|_| true);
        let other = total - tables - conntrack;
        println!("{vips:>6} {tables:>14.1} {conntrack:>14.1} {other:>10.1} {total:>10.1}");
        rows.push(json!({
            "vips": vips, "tables_mib": tables, "conntrack_mib": conntrack,
            "other_mib": other, "total_mib": total,
        }));
    }
    println!(
        "(conntrack: one table of {DEFAULT_CONNTRACK_ENTRIES} entries for both families; set by conntrack_entries)"
    );

    // Bytes per tracked flow: the table against a kernel LRU hash of as many entries.
    let dataplane = Dataplane::load(Capacities::default()).unwrap_or_else(|e| panic!("{e}"));
    let ways =
        dataplane.capacities().conntrack_buckets() as f64 * lb_common::conntrack::WAYS as f64;
    let mut dataplane = dataplane;
    let usage = dataplane.locked_memory().unwrap();
    let table_bytes: f64 = usage
        .iter()
        .filter(|(n, _)| n == "CONNTRACK")
        .map(|(_, b)| *b as f64)
        .sum();
    let lru_bytes = lru_memlock(DEFAULT_CONNTRACK_ENTRIES) as f64;
    let per_flow = table_bytes / ways;
    let lru_per_flow = lru_bytes / DEFAULT_CONNTRACK_ENTRIES as f64;
    println!(
        "\nconnection table: {:.1} MiB for {ways:.0} flows = {per_flow:.1} bytes per flow \
         ({:.1} at 90% full); a kernel LRU hash of {DEFAULT_CONNTRACK_ENTRIES} (FlowV4 -> 16 B, \
         per-CPU lists): {:.1} MiB = {lru_per_flow:.1} bytes per flow",
        mib(table_bytes),
        per_flow / 0.9,
        mib(lru_bytes),
    );

    // Per-CPU maps: measured on this machine, then per CPU count.
    let cpus = aya::util::nr_cpus().expect("CPU count") as f64;
    let per_cpu = |usage: &[(String, u64)]| -> f64 {
        usage
            .iter()
            .filter(|(n, _)| PER_CPU.contains(&n.as_str()))
            .map(|(_, b)| *b as f64)
            .sum::<f64>()
            / cpus
    };
    let now = per_cpu(&usage);
    let mut old = Dataplane::load(Capacities {
        flow_cache_entries: 32_768,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let before = per_cpu(&old.locked_memory().unwrap());
    let shared = usage
        .iter()
        .filter(|(n, _)| !PER_CPU.contains(&n.as_str()))
        .map(|(_, b)| *b as f64)
        .sum::<f64>();
    println!(
        "\nper-CPU maps (flow caches, next hops, counters) at the default capacities, by CPU count:"
    );
    println!(
        "{:>6} {:>22} {:>26} {:>16}",
        "CPUs", "flow cache 256 (MiB)", "flow cache 32,768 (MiB)", "shared maps"
    );
    let mut cpu_rows = Vec::new();
    for n in [cpus, 16.0, 64.0, 256.0] {
        println!(
            "{n:>6} {:>22.1} {:>26.1} {:>16.1}",
            mib(now * n),
            mib(before * n),
            mib(shared)
        );
        cpu_rows.push(json!({
            "cpus": n,
            "per_cpu_maps_mib": mib(now * n),
            "per_cpu_maps_old_flow_cache_mib": mib(before * n),
            "shared_maps_mib": mib(shared),
        }));
    }
    println!(
        "(measured on {cpus} CPUs, scaled: {:.2} MiB per CPU with flow_cache_entries {DEFAULT_FLOW_CACHE_ENTRIES}, {:.2} with 32,768)",
        mib(now),
        mib(before)
    );
    if let Some(path) = json {
        write_json(
            &path,
            &json!({
                "benchmark": "memory",
                "conntrack_bytes_per_flow": per_flow,
                "lru_hash_bytes_per_flow": lru_per_flow,
                "per_cpu": cpu_rows,
                "rows": rows,
            }),
        );
    }
}

/// Locked memory of the benchmark object's kernel LRU hash with `entries` entries.
fn lru_memlock(entries: u32) -> u64 {
    let bench = aya::EbpfLoader::new()
        .map_max_entries("LRU", entries)
        .load(BENCH_OBJECT)
        .expect("loading lb-bench");
    let map = bench.map("LRU").expect("the LRU map");
    let fd = match map {
        aya::maps::Map::LruHashMap(data) => data.fd(),
        other => panic!("unexpected map {other:?}"),
    };
    use std::os::fd::{AsFd as _, AsRawFd as _};
    std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd()))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .expect("memlock in fdinfo")
}
