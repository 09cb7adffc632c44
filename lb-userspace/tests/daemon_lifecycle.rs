//! The real daemon in the testbed: reload under traffic, bad configs, restart without
//! dropping flows. Needs root.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    path::PathBuf,
    process::Command,
    time::Duration,
};

use lb_testbed::daemon::{DaemonBed, connect};

const TIMEOUT: Duration = Duration::from_secs(3);

/// Sends a line and returns who echoed it; an error means the connection broke.
fn echo(stream: &mut TcpStream, text: &str) -> std::io::Result<String> {
    writeln!(stream, "{text}")?;
    let mut line = String::new();
    BufReader::new(&*stream).read_line(&mut line)?;
    line.trim()
        .split_once(' ')
        .map(|(n, _)| n.to_owned())
        .ok_or_else(|| std::io::Error::other(format!("reply {line:?}")))
}

const VIPS: &str =
    "  - name: web\n    address: 10.200.0.1\n    port: 80\n    protocol: tcp\n    pool: web\n";

#[test]
fn daemon_serves_the_vip_and_status_shows_it() {
    let mut bed = DaemonBed::new(3);
    let pools = bed.pool_yaml("web", &[(1, 1), (2, 1), (3, 1)], "");
    bed.write_config(&bed.config_yaml(VIPS, &pools));
    bed.start_daemon();
    let names: Vec<String> = bed
        .bed
        .client
        .netns
        .enter(|| (0..90).map(|_| connect(bed.vip(80)).1).collect())
        .unwrap();
    for be in ["be1", "be2", "be3"] {
        assert!(names.iter().any(|n| n == be), "{be} got no flow: {names:?}");
    }
    let status = bed.mlb(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(text.contains("vip web 10.200.0.1:80/tcp"), "{text}");
    assert!(text.contains("be1: "), "{text}");
}

/// Opens `n` long-lived connections; returns them with their backend names.
fn open_many(bed: &DaemonBed, n: usize) -> Vec<(TcpStream, String)> {
    bed.bed
        .client
        .netns
        .enter(|| (0..n).map(|_| connect(bed.vip(80))).collect())
        .unwrap()
}

/// Echoes on every connection; returns the names, or which broke.
fn check_alive(
    bed: &DaemonBed,
    conns: &mut [(TcpStream, String)],
    tag: &str,
) -> Vec<Result<(), String>> {
    bed.bed
        .client
        .netns
        .enter(|| {
            conns
                .iter_mut()
                .enumerate()
                .map(
                    |(i, (stream, name))| match echo(stream, &format!("{tag}-{i}")) {
                        Ok(who) if who == *name => Ok(()),
                        Ok(who) => Err(format!("connection to {name} answered by {who}")),
                        Err(e) => Err(format!("connection to {name} broke: {e}")),
                    },
                )
                .collect()
        })
        .unwrap()
}

/// New connections' backends, `n` of them.
fn new_flows(bed: &DaemonBed, n: usize) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for (_, name) in open_many(bed, n) {
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

/// Background traffic: short connections in a loop until told to stop; counts failures.
struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<(usize, usize)>,
}

impl Traffic {
    fn start(bed: &DaemonBed) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let netns =
            std::fs::File::open(format!("/var/run/netns/{}", bed.bed.client.netns.name())).unwrap();
        let vip = bed.vip(80);
        let handle = std::thread::spawn(move || {
            use std::os::fd::AsRawFd as _;
            // SAFETY: this thread only.
            assert_eq!(
                unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let (mut ok, mut failed) = (0, 0);
            let started = std::time::Instant::now();
            while !flag.load(std::sync::atomic::Ordering::Relaxed)
                && started.elapsed() < Duration::from_secs(60)
            {
                match TcpStream::connect_timeout(&vip, TIMEOUT).and_then(|mut s| {
                    s.set_read_timeout(Some(TIMEOUT))?;
                    let mut line = String::new();
                    BufReader::new(&s).read_line(&mut line)?;
                    let who = line.trim().to_owned();
                    match echo(&mut s, "bg")? {
                        ref w if *w == who => Ok(()),
                        w => Err(std::io::Error::other(format!("answered by {w}"))),
                    }
                }) {
                    Ok(()) => ok += 1,
                    Err(_) => failed += 1,
                }
            }
            (ok, failed)
        });
        Self { stop, handle }
    }

    fn finish(self) -> (usize, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

fn applied(bed: &DaemonBed, marker: &str, count: usize) -> bool {
    bed.log_text().matches(marker).count() >= count
}

/// Reload under continuous traffic: adding a backend, changing a weight and removing a
/// backend leave established connections to staying backends intact; new flows follow
/// the new table.
#[test]
fn reload_under_traffic_keeps_established_connections_of_staying_backends() {
    let mut bed = DaemonBed::new(4);
    let config = |bed: &DaemonBed, members: &[(usize, u32)]| {
        bed.config_yaml(VIPS, &bed.pool_yaml("web", members, ""))
    };
    bed.write_config(&config(&bed, &[(1, 1), (2, 1), (3, 1)]));
    bed.start_daemon();
    let mut conns = open_many(&bed, 24);

    // 1. Add be4 (file change, picked up by the watcher).
    let traffic = Traffic::start(&bed);
    bed.write_config(&config(&bed, &[(1, 1), (2, 1), (3, 1), (4, 1)]));
    bed.wait_for("reload 1", Duration::from_secs(5), || {
        applied(&bed, "reloaded:", 1)
    });
    let (ok, failed) = traffic.finish();
    assert_eq!(
        failed,
        0,
        "{failed} of {} background connections failed while adding a backend",
        ok + failed
    );
    assert!(
        check_alive(&bed, &mut conns, "add")
            .iter()
            .all(Result::is_ok),
        "{:?}",
        check_alive(&bed, &mut conns, "add2")
    );
    let flows = new_flows(&bed, 200);
    assert!(
        flows.get("be4").is_some_and(|&n| n > 20),
        "new flows reach the new backend: {flows:?}"
    );

    // 2. Weight of be2 to 5 (SIGHUP).
    let traffic = Traffic::start(&bed);
    bed.write_config(&config(&bed, &[(1, 1), (2, 5), (3, 1), (4, 1)]));
    bed.signal("-HUP");
    bed.wait_for("reload 2", Duration::from_secs(5), || {
        applied(&bed, "reloaded:", 2)
    });
    let (ok, failed) = traffic.finish();
    assert_eq!(
        failed,
        0,
        "{failed} of {} background connections failed while changing a weight",
        ok + failed
    );
    let results = check_alive(&bed, &mut conns, "weight");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let flows = new_flows(&bed, 300);
    let be2 = *flows.get("be2").unwrap_or(&0) as f64 / 300.0;
    assert!(
        (be2 - 5.0 / 8.0).abs() < 0.1,
        "be2 should get ~5/8 of new flows: {flows:?}"
    );

    // 3. Remove be1: connections to the others survive; no new flow goes to be1.
    bed.write_config(&config(&bed, &[(2, 5), (3, 1), (4, 1)]));
    bed.wait_for("reload 3", Duration::from_secs(5), || {
        applied(&bed, "reloaded:", 3)
    });
    let results = check_alive(&bed, &mut conns, "remove");
    for ((_, name), result) in conns.iter().zip(&results) {
        if name != "be1" {
            assert!(result.is_ok(), "{result:?}");
        }
    }
    let flows = new_flows(&bed, 100);
    assert!(
        !flows.contains_key("be1"),
        "a new flow went to the removed backend: {flows:?}"
    );
}

/// A bad config by SIGHUP is refused with its errors logged; traffic is unaffected and the
/// running config stays in force.
#[test]
fn bad_config_on_sighup_is_refused_and_traffic_continues() {
    let mut bed = DaemonBed::new(2);
    bed.write_config(&bed.config_yaml(VIPS, &bed.pool_yaml("web", &[(1, 1), (2, 1)], "")));
    bed.start_daemon();
    let mut conns = open_many(&bed, 8);
    std::fs::write(
        &bed.config,
        "vips:\n  - name: web\n    adress: 10.200.0.1\n",
    )
    .unwrap();
    bed.signal("-HUP");
    bed.wait_for("the refusal in the log", Duration::from_secs(5), || {
        bed.log_text().contains("config refused")
    });
    let log = bed.log_text();
    assert!(
        log.contains("lb.yaml:3:5"),
        "the error names file, line and column:\n{log}"
    );
    assert!(
        check_alive(&bed, &mut conns, "after")
            .iter()
            .all(Result::is_ok)
    );
    let flows = new_flows(&bed, 40);
    assert_eq!(flows.values().sum::<usize>(), 40);
    let status = String::from_utf8_lossy(&bed.mlb(&["status"]).stdout).to_string();
    assert!(
        status.contains("vip web 10.200.0.1:80/tcp"),
        "the old config is in force:\n{status}"
    );
    // `plan` compares with the config in force, not with the refused file on disk.
    let next = bed.dir.join("next.yaml");
    std::fs::write(
        &next,
        bed.config_yaml(VIPS, &bed.pool_yaml("web", &[(1, 1)], "")),
    )
    .unwrap();
    let out = bed.mlb(&["plan", next.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("backends removed: web/10.100.0.12"), "{text}");
}

/// kill -9 of the daemon and a restart: open connections survive (the program stays
/// attached, the maps pinned) and the new daemon adopts the state.
#[test]
fn kill_9_and_restart_keep_open_connections() {
    let mut bed = DaemonBed::new(3);
    bed.write_config(&bed.config_yaml(VIPS, &bed.pool_yaml("web", &[(1, 1), (2, 1), (3, 1)], "")));
    bed.start_daemon();
    let mut conns = open_many(&bed, 12);
    let before = std::fs::read_to_string(lb_userspace::state::state_path(&bed.pin_dir)).unwrap();

    bed.stop_daemon("-KILL");
    let results = check_alive(&bed, &mut conns, "dead");
    assert!(
        results.iter().all(Result::is_ok),
        "with the daemon dead: {results:?}"
    );

    bed.start_daemon();
    assert!(
        bed.log_text().contains("re-adopted the attached program"),
        "{}",
        bed.log_text()
    );
    assert!(
        bed.log_text().contains("adopted running state"),
        "{}",
        bed.log_text()
    );
    let results = check_alive(&bed, &mut conns, "restarted");
    assert!(
        results.iter().all(Result::is_ok),
        "after the restart: {results:?}"
    );
    let after = std::fs::read_to_string(lb_userspace::state::state_path(&bed.pin_dir)).unwrap();
    let ids = |text: &str| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(text).unwrap()["assignments"]["backends"].clone()
    };
    assert_eq!(ids(&before), ids(&after), "backend ids survive the restart");
    assert_eq!(new_flows(&bed, 30).values().sum::<usize>(), 30);
}

/// What `mlb trace` says of the TCP flow `src:sport` to the Vip's port 80 (it must succeed).
fn trace(bed: &DaemonBed, src: std::net::IpAddr, sport: u16) -> String {
    let (src, sport) = (src.to_string(), sport.to_string());
    let args = [
        "trace",
        "--src",
        &src,
        "--sport",
        &sport,
        "--dst",
        "10.200.0.1",
        "--dport",
        "80",
    ];
    let out = bed.mlb(&args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// `mlb plan` and `mlb trace` against the live daemon.
#[test]
fn plan_and_trace_explain_the_live_state() {
    let mut bed = DaemonBed::new(3);
    bed.write_config(&bed.config_yaml(VIPS, &bed.pool_yaml("web", &[(1, 1), (2, 1), (3, 1)], "")));
    bed.start_daemon();
    let (stream, name) = bed.bed.client.netns.enter(|| connect(bed.vip(80))).unwrap();
    let local = stream.local_addr().unwrap();
    let text = trace(&bed, local.ip(), local.port());
    assert!(
        text.contains(&format!("connection table: entry -> {name}")),
        "{text}"
    );

    let next = bed.dir.join("next.yaml");
    std::fs::write(
        &next,
        bed.config_yaml(VIPS, &bed.pool_yaml("web", &[(1, 1), (2, 1)], "")),
    )
    .unwrap();
    let out = bed.mlb(&["plan", next.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("backends removed: web/10.100.0.13"), "{text}");
    assert!(text.contains("10.200.0.1:80/tcp"), "{text}");
}

/// `hash: source` on the real daemon: every connection of the client goes to one backend
/// (40 connections under the 5-tuple hash would all land on one of three by chance with
/// probability 3^-39), the one `mlb trace` names for any other port of the client, and
/// `trace` says which mode applied.
#[test]
fn source_hash_keeps_a_client_on_one_backend_and_trace_names_it() {
    let mut bed = DaemonBed::new(3);
    let vips = format!("{VIPS}    hash: source\n");
    bed.write_config(&bed.config_yaml(&vips, &bed.pool_yaml("web", &[(1, 1), (2, 1), (3, 1)], "")));
    bed.start_daemon();
    let conns = open_many(&bed, 40);
    let names: std::collections::BTreeSet<&str> = conns.iter().map(|(_, n)| n.as_str()).collect();
    let [name] = names.into_iter().collect::<Vec<_>>()[..] else {
        panic!(
            "one client, several backends: {:?}",
            conns.iter().map(|c| &c.1).collect::<Vec<_>>()
        )
    };
    let text = trace(&bed, conns[0].0.local_addr().unwrap().ip(), 1);
    assert!(text.contains("hash mode: source"), "{text}");
    assert!(text.contains(&format!("-> {name} ")), "{text}");
}

/// A test leaves nothing behind: a `kill -9`ed daemon leaves its control socket, lock,
/// state and pins, and dropping the bed removes them all.
#[test]
fn a_killed_daemon_leaves_nothing_once_its_bed_is_dropped() {
    let mut bed = DaemonBed::new(1);
    bed.write_config(&bed.config_yaml(VIPS, &bed.pool_yaml("web", &[(1, 1)], "")));
    bed.start_daemon();
    bed.stop_daemon("-KILL");
    let pin_dir = bed.pin_dir.clone();
    let left = [
        lb_userspace::state::socket_path(&pin_dir),
        lb_userspace::state::state_path(&pin_dir),
        lb_userspace::state::lock_path(&pin_dir),
        pin_dir.clone(),
    ];
    for path in &left {
        assert!(path.exists(), "a killed daemon left no {}", path.display());
    }
    drop(bed);
    for path in &left {
        assert!(!path.exists(), "{} is left behind", path.display());
    }
    let name = pin_dir.file_name().unwrap().to_str().unwrap().to_owned();
    let stray: Vec<String> = [lb_userspace::state::RUN_DIR, lb_userspace::state::LIB_DIR]
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flat_map(|entries| entries.flatten())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!("{name}.")))
        .collect();
    assert!(stray.is_empty(), "left behind: {stray:?}");
}

/// The load balancer's interface deleted and recreated between two daemon runs (a driver
/// reload, a VM or container restart): the daemon sees the pinned link is defunct,
/// attaches a fresh one, keeps the pinned maps, and open connections continue on their
/// backends.
#[test]
fn a_recreated_interface_gets_a_fresh_link_and_keeps_the_maps() {
    use lb_common::consts::prog_names;
    use lb_testbed::testbed::{NIC, SEGMENT_MTU};
    use lb_userspace::dataplane::{Capacities, Dataplane};
    let mut bed = DaemonBed::new(3);
    bed.write_config(&bed.config_yaml(VIPS, &bed.pool_yaml("web", &[(1, 1), (2, 1), (3, 1)], "")));
    bed.start_daemon();
    let mut conns = open_many(&bed, 12);
    assert!(
        check_alive(&bed, &mut conns, "before")
            .iter()
            .all(Result::is_ok)
    );
    let before = std::fs::read_to_string(lb_userspace::state::state_path(&bed.pin_dir)).unwrap();
    bed.stop_daemon("-TERM");

    // Delete the load balancer's veth and make it again, same name, MAC and addresses.
    let lb = &bed.bed.lb;
    let port = bed.bed.switch_port(lb);
    let mac = lb.netns.mac(NIC).unwrap();
    let mac = mac.map(|b| format!("{b:02x}")).join(":");
    let switch = &bed.bed.switch;
    switch.ip(&["link", "del", &port]).unwrap();
    lb_testbed::testbed::plug(switch, lb, SEGMENT_MTU).unwrap();
    lb.netns.ip(&["link", "set", NIC, "down"]).unwrap();
    lb.netns.ip(&["link", "set", NIC, "address", &mac]).unwrap();
    lb.netns.ip(&["link", "set", NIC, "up"]).unwrap();
    // XDP_TX out of the new veth needs a program on its new peer.
    let mut plumbing = Dataplane::load(Capacities {
        max_vips: 1,
        max_backends: 2,
        conntrack_entries: 1024,
        ..Default::default()
    })
    .unwrap();
    switch
        .enter(|| {
            plumbing
                .attach(prog_names::LB_PASS, &port, aya::programs::XdpMode::Driver)
                .map(|_| ())
        })
        .unwrap()
        .unwrap();

    bed.start_daemon();
    let log = bed.log_text();
    assert!(
        log.contains("the pinned link's interface is gone"),
        "the defunct link is seen:\n{log}"
    );
    assert!(log.contains("adopted running state"), "{log}");
    let results = check_alive(&bed, &mut conns, "after");
    assert!(
        results.iter().all(Result::is_ok),
        "connections continue on their backends: {results:?}"
    );
    let after = std::fs::read_to_string(lb_userspace::state::state_path(&bed.pin_dir)).unwrap();
    let ids = |text: &str| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(text).unwrap()["assignments"].clone()
    };
    assert_eq!(
        ids(&before)["backends"],
        ids(&after)["backends"],
        "ids kept"
    );
    assert_eq!(new_flows(&bed, 30).values().sum::<usize>(), 30);
}

/// A backend added by a reload gets no flow until its rise checks pass; a run-time drain
/// lasts across a reload and a daemon restart until `undrain`.
#[test]
fn an_added_backend_waits_for_its_checks_and_drains_last_until_undrain() {
    let mut bed = DaemonBed::new(3);
    let check = lb_testbed::daemon::check_yaml("tcp", 80, (100, 50), (3, 2), 0, "");
    let yaml = |bed: &DaemonBed, members: &[(usize, u32)]| {
        bed.config_yaml(VIPS, &bed.pool_yaml("web", members, &check))
    };
    bed.write_config(&yaml(&bed, &[(1, 1), (2, 1)]));
    bed.start_daemon();
    bed.wait_for_health("be2", "web", "up", Duration::from_secs(5));
    bed.kill_server(3);
    bed.write_config(&yaml(&bed, &[(1, 1), (2, 1), (3, 1)]));
    bed.wait_for("be3 listed", Duration::from_secs(5), || {
        bed.backend_health("be3", "web").is_some()
    });
    assert_eq!(
        bed.backend_health("be3", "web").as_deref(),
        Some("DOWN"),
        "not vouched for yet"
    );
    let flows = new_flows(&bed, 60);
    assert!(
        !flows.contains_key("be3"),
        "no flow to an unchecked backend: {flows:?}"
    );
    assert_eq!(flows.values().sum::<usize>(), 60, "{flows:?}");
    bed.restart_server(3);
    bed.wait_for_health("be3", "web", "up", Duration::from_secs(5));
    let flows = new_flows(&bed, 60);
    assert!(
        flows.get("be3").is_some_and(|n| *n > 0),
        "in once up: {flows:?}"
    );

    // Drain be1: it stays drained across a reload and a restart.
    let be1 = bed.bed.backends[0].addr4.to_string();
    assert!(bed.mlb(&["drain", &be1]).status.success());
    bed.write_config(&yaml(&bed, &[(1, 1), (2, 2), (3, 1)]));
    bed.wait_for("the reload", Duration::from_secs(5), || {
        bed.log_text().contains("reloaded")
    });
    assert_eq!(
        bed.backend_health("be1", "web").as_deref(),
        Some("up, drained")
    );
    bed.stop_daemon("-TERM");
    bed.start_daemon();
    assert_eq!(
        bed.backend_health("be1", "web").as_deref(),
        Some("up, drained")
    );
    let flows = new_flows(&bed, 60);
    assert!(!flows.contains_key("be1"), "drained: {flows:?}");
    assert!(bed.mlb(&["undrain", &be1]).status.success());
    assert_eq!(bed.backend_health("be1", "web").as_deref(), Some("up"));
}

/// A metrics port that another process holds stops the daemon at start, before it touches
/// the interface or the bpffs, with the file, the address and how to find the holder; it
/// leaves no lock behind.
#[test]
fn a_metrics_port_in_use_stops_the_daemon_with_what_to_change() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let dir = std::env::temp_dir().join(format!("mlb-test-port-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/mlb-test-port-{}", std::process::id()));
    let config = dir.join("lb.yaml");
    std::fs::write(
        &config,
        format!(
            "global:\n  metrics_listen: 127.0.0.1:{port}\n  pin_path: {}\ninterfaces:\n  - name: lo\n\
             vips:\n  - name: web\n    address: 10.200.0.1\n    port: 80\n    protocol: tcp\n    \
             pool: web\npools:\n  web:\n    backends:\n      - address: 10.100.0.11\n",
            pin_dir.display()
        ),
    )
    .unwrap();
    let output = Command::new(lb_testbed::mlb_bin())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("run mlb");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!output.status.success(), "the daemon started: {stderr}");
    for needle in [
        config.display().to_string(),
        format!("global.metrics_listen 127.0.0.1:{port} cannot be served"),
        format!("ss -ltnp 'sport = :{port}'"),
        "port 0 for any".to_owned(),
    ] {
        assert!(stderr.contains(&needle), "no {needle:?} in: {stderr}");
    }
    assert!(!pin_dir.exists(), "the bpffs was touched");
    assert!(
        !lb_userspace::state::lock_path(&pin_dir).exists(),
        "the lock is left behind"
    );
    drop(holder);
}
