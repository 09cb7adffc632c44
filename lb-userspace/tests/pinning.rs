//! Maps pinned by another build of mlb are refused by name, before the kernel's verifier
//! fails on them with no word about why. Needs root.

use std::path::{Path, PathBuf};

use aya::maps::MapData;
use lb_userspace::dataplane::{Capacities, Dataplane};

/// `BPF_MAP_TYPE_ARRAY`.
const ARRAY: u32 = 2;

/// Removes a bpffs pin directory on drop.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ensure_bpffs() {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("reading /proc/mounts");
    if !mounts.lines().any(|l| l.contains(" /sys/fs/bpf bpf ")) {
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .expect("running mount");
        assert!(status.success(), "mounting bpffs");
    }
}

fn pin_array(dir: &Path, name: &str, value_size: u32) {
    let definition = aya_obj::Map::new_from_params(ARRAY, 4, value_size, 1, 0);
    let map = MapData::create(definition, name, None).unwrap_or_else(|e| panic!("{e}"));
    map.pin(dir.join(name)).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn maps_pinned_by_another_build_are_refused_by_name() {
    ensure_bpffs();
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/mlb-test-layout-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&pins.0).unwrap();
    // CONFIG as the build before the Vip filter moved into it laid it out: 40 bytes.
    pin_array(&pins.0, "CONFIG", 40);
    let error = match Dataplane::load_pinned(Capacities::default(), &pins.0) {
        Ok(_) => panic!("a CONFIG map of another layout was reused"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("map CONFIG"), "{error}");
    assert!(error.contains("another build"), "{error}");
    assert!(error.contains(&pins.0.display().to_string()), "{error}");
    assert!(error.contains("mlb detach"), "{error}");

    // The same directory with the layout of this build loads.
    std::fs::remove_file(pins.0.join("CONFIG")).unwrap();
    Dataplane::load_pinned(Capacities::default(), &pins.0).unwrap_or_else(|e| panic!("{e}"));
}

/// The kernel LRU connection tables of a build before mlb's own table are refused by name,
/// not left pinned beside the new one with every flow's entry lost.
#[test]
fn lru_connection_tables_of_an_older_build_are_refused() {
    ensure_bpffs();
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/mlb-test-legacy-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&pins.0).unwrap();
    /// `BPF_MAP_TYPE_LRU_HASH`, FlowV4 (16 bytes) to a 16-byte entry, as they were.
    const LRU_HASH: u32 = 9;
    let definition = aya_obj::Map::new_from_params(LRU_HASH, 16, 16, 1024, 0);
    let map = MapData::create(definition, "CONNTRACK_V4", None).unwrap_or_else(|e| panic!("{e}"));
    map.pin(pins.0.join("CONNTRACK_V4"))
        .unwrap_or_else(|e| panic!("{e}"));
    let error = match Dataplane::load_pinned(Capacities::default(), &pins.0) {
        Ok(_) => panic!("adopted around the old LRU connection table"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("map CONNTRACK_V4"), "{error}");
    assert!(error.contains("mlb detach"), "{error}");
}

/// A `STATS` pinned by a build with fewer counters is replaced by one with room for all
/// of them (its counts restart), not adopted: the load goes on, flows are kept.
#[test]
fn a_smaller_stats_map_of_an_older_build_is_replaced() {
    ensure_bpffs();
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/mlb-test-stats-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&pins.0).unwrap();
    /// `BPF_MAP_TYPE_PERCPU_ARRAY` of u64, 19 counters as before issue 16's.
    const PERCPU_ARRAY: u32 = 6;
    let definition = aya_obj::Map::new_from_params(PERCPU_ARRAY, 4, 8, 19, 0);
    let map = MapData::create(definition, "STATS", None).unwrap_or_else(|e| panic!("{e}"));
    map.pin(pins.0.join("STATS"))
        .unwrap_or_else(|e| panic!("{e}"));
    let dataplane =
        Dataplane::load_pinned(Capacities::default(), &pins.0).unwrap_or_else(|e| panic!("{e}"));
    let stats = MapData::from_pin(pins.0.join("STATS")).unwrap();
    assert_eq!(
        stats.info().unwrap().max_entries(),
        lb_common::consts::Counter::COUNT
    );
    assert_eq!(
        dataplane.counters().unwrap().len(),
        lb_common::consts::Counter::ALL.len()
    );
}

/// An `ICMP_RATE` pinned by a build with fewer kinds of ICMP message (echo replies only,
/// before "too big") is replaced likewise: the new kind gets its budget.
#[test]
fn a_smaller_icmp_rate_map_of_an_older_build_is_replaced() {
    ensure_bpffs();
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/mlb-test-icmp-rate-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&pins.0).unwrap();
    const PERCPU_ARRAY: u32 = 6;
    let value = size_of::<lb_common::types::IcmpRate>() as u32;
    let definition = aya_obj::Map::new_from_params(PERCPU_ARRAY, 4, value, 1, 0);
    let map = MapData::create(definition, "ICMP_RATE", None).unwrap_or_else(|e| panic!("{e}"));
    map.pin(pins.0.join("ICMP_RATE"))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut dataplane =
        Dataplane::load_pinned(Capacities::default(), &pins.0).unwrap_or_else(|e| panic!("{e}"));
    let rate = MapData::from_pin(pins.0.join("ICMP_RATE")).unwrap();
    assert_eq!(
        rate.info().unwrap().max_entries(),
        lb_common::consts::icmp_rate_slots::COUNT
    );
    dataplane
        .set_icmp_rate(lb_common::consts::icmp_rate_slots::TOO_BIG, 10)
        .unwrap();
}
