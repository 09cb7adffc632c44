//! Kernel memory locked by the data plane's maps for 1, 16 and 256 Vips of 65537-slot
//! MaglevTables (with 1,000 backends and the default 262,144-entry connection tables),
//! as the kernel accounts it. `cargo xtask bench memory [--json FILE]` (root).

use std::net::{IpAddr, Ipv4Addr};

use lb_common::{
    consts::{DEFAULT_CONNTRACK_ENTRIES, DEFAULT_TABLE_SIZE},
    maglev::{MaglevBackend, build},
};
use lb_userspace::dataplane::{Capacities, Dataplane};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .cloned();
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
        rows.push(format!(
            "    {{\"vips\": {vips}, \"tables_mib\": {tables:.2}, \"conntrack_mib\": {conntrack:.2}, \"other_mib\": {other:.2}, \"total_mib\": {total:.2}}}"
        ));
    }
    println!(
        "(conntrack: IPv4 and IPv6 tables of {DEFAULT_CONNTRACK_ENTRIES} entries each; set by conntrack_entries)"
    );
    if let Some(path) = json {
        let body = format!(
            "{{\n  \"benchmark\": \"memory\",\n  \"rows\": [\n{}\n  ]\n}}\n",
            rows.join(",\n")
        );
        std::fs::write(&path, body).expect("write JSON");
        println!("JSON written to {path}");
    }
}
