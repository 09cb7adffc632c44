//! The systemd unit's capability set, checked for real: the daemon run as root with
//! exactly the unit's `CapabilityBoundingSet` (`setpriv`, nothing inheritable) attaches,
//! forwards and reloads; with CAP_NET_ADMIN taken away it does not start, so the
//! restriction is real. CAP_SYS_RESOURCE is not in the set: the kernel charges BPF maps
//! to the memory cgroup (since 5.11), not RLIMIT_MEMLOCK, and the daemon's attempt to raise
//! that limit may fail harmlessly. Needs root.

use std::{
    io::{BufRead as _, BufReader},
    net::TcpStream,
    time::Duration,
};

use lb_testbed::daemon::DaemonBed;

const UNIT: &str = include_str!("../../deploy/mlb.service");
const VIPS: &str =
    "  - name: web\n    address: 10.200.0.1\n    port: 80\n    protocol: tcp\n    pool: web\n";

/// The unit's `CapabilityBoundingSet`, as `setpriv` names them (`bpf`, `net_admin`, …).
fn unit_caps() -> Vec<String> {
    let line = UNIT
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet");
    line.split_whitespace()
        .map(|c| {
            c.strip_prefix("CAP_")
                .expect("CAP_ names")
                .to_ascii_lowercase()
        })
        .collect()
}

/// `setpriv` with exactly `caps` in the bounding set: root's permitted and effective sets
/// become that set at exec; nothing inheritable or ambient. Under a 64 KiB RLIMIT_MEMLOCK
/// that it cannot raise without CAP_SYS_RESOURCE: the maps take megabytes, so a kernel
/// that charged them to the rlimit would refuse them.
fn setpriv(caps: &[String]) -> Vec<String> {
    let set: String = caps.iter().map(|c| format!(",+{c}")).collect();
    vec![
        "prlimit".into(),
        "--memlock=65536:65536".into(),
        "setpriv".into(),
        format!("--bounding-set=-all{set}"),
        "--inh-caps=-all".into(),
        "--ambient-caps=-all".into(),
    ]
}

/// Capability bit numbers (linux/capability.h) of the names the unit uses.
fn bit(name: &str) -> u32 {
    match name {
        "net_admin" => 12,
        "sys_admin" => 21,
        "sys_resource" => 24,
        "perfmon" => 38,
        "bpf" => 39,
        other => panic!("add {other} to bit()"),
    }
}

fn cap_eff(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap()
}

fn greeting(bed: &DaemonBed) -> String {
    bed.bed
        .client
        .netns
        .enter(|| {
            let stream = TcpStream::connect_timeout(&bed.vip(80), Duration::from_secs(3))?;
            stream.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line)?;
            Ok::<_, std::io::Error>(line.trim().to_owned())
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("no answer through the Vip: {e}\n{}", bed.log_text()))
}

#[test]
fn the_daemon_runs_with_exactly_the_units_capabilities() {
    let caps = unit_caps();
    assert!(
        !caps.iter().any(|c| c == "sys_resource" || c == "sys_admin"),
        "the unit should not need {caps:?}"
    );
    let mut bed = DaemonBed::new(2);
    bed.write_config(&bed.config_yaml(VIPS, &bed.pool_yaml("web", &[(1, 1), (2, 1)], "")));
    let wrapper = setpriv(&caps);
    bed.start_daemon_under(&wrapper.iter().map(String::as_str).collect::<Vec<_>>());

    let pid = bed.daemon.as_ref().unwrap().id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits.lines().any(|l| l.starts_with("Max locked memory")
            && l.split_whitespace().filter(|w| *w == "65536").count() == 2),
        "{limits}"
    );
    let want: u64 = caps.iter().map(|c| 1u64 << bit(c)).sum();
    assert_eq!(
        cap_eff(pid),
        want,
        "the daemon's effective set is the unit's {caps:?}"
    );
    let names: Vec<String> = (0..20).map(|_| greeting(&bed)).collect();
    assert!(
        names.iter().any(|n| n == "be1") && names.iter().any(|n| n == "be2"),
        "both backends serve: {names:?}"
    );
    // A reload (new table, map writes) works with the same set.
    bed.write_config(&bed.config_yaml(VIPS, &bed.pool_yaml("web", &[(1, 1)], "")));
    bed.signal("-HUP");
    // (It stays retired for second chance, named by the previous table: it is no longer
    // a configured backend.)
    bed.wait_for("be2 removed by the reload", Duration::from_secs(10), || {
        !bed.status_text()
            .lines()
            .any(|l| l.starts_with("backend be2 "))
    });
    let names: Vec<String> = (0..10).map(|_| greeting(&bed)).collect();
    assert!(names.iter().all(|n| n == "be1"), "{names:?}");
    assert!(
        !bed.log_text().contains("ERROR"),
        "errors logged:\n{}",
        bed.log_text()
    );
}

#[test]
fn without_net_admin_the_daemon_does_not_start() {
    let caps: Vec<String> = unit_caps()
        .into_iter()
        .filter(|c| c != "net_admin")
        .collect();
    let mut bed = DaemonBed::new(1);
    bed.write_config(&bed.config_yaml(VIPS, &bed.pool_yaml("web", &[(1, 1)], "")));
    let wrapper = setpriv(&caps);
    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        bed.start_daemon_under(&wrapper.iter().map(String::as_str).collect::<Vec<_>>())
    }));
    assert!(
        started.is_err(),
        "the daemon started without CAP_NET_ADMIN: the capability check proves nothing"
    );
}
