//! The Prometheus metrics: exact per-Vip and per-Backend counts against traffic the test
//! sends, health gauges against a killed backend, `promtool` on a live scrape, a real
//! Prometheus server scraping the daemon, the Grafana dashboard's metric names, and the
//! cost of a scrape at 64 Vips x 100 Backends. Needs root (except the HTTP endpoint and
//! config-file tests).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{Map, MapData, PerCpuArray, PerCpuValues};
use lb_common::types::TrafficCounters;
use lb_testbed::daemon::DaemonBed;
use lb_userspace::{
    config::Config,
    daemon,
    dataplane::Dataplane,
    metrics::{Metrics, Server},
    reconcile::{Assignments, Reconciler},
};

const TIMEOUT: Duration = Duration::from_secs(3);
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/grafana-dashboard.json"
);
const SCRAPE_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus.yml");

/// The testbed tests share the two CPUs with the scrape-cost test: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------
// HTTP and the text format

/// `GET path` over HTTP/1.0 (the server closes; no chunking): status and body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"));
    let response = String::from_utf8(response).expect("UTF-8 response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end: {response:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    (status, body.to_owned())
}

/// One sample of the text format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse_samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("sample line {line:?}"));
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("value in {line:?}")),
            };
            let (name, labels) = match series.split_once('{') {
                None => (series.to_owned(), BTreeMap::new()),
                Some((name, rest)) => (
                    name.to_owned(),
                    parse_labels(rest.strip_suffix('}').expect("closing brace")),
                ),
            };
            Sample {
                name,
                labels,
                value,
            }
        })
        .collect()
}

/// `a="x",b="y\"z"` → map.
fn parse_labels(mut text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    while !text.is_empty() {
        let (key, rest) = text.split_once("=\"").expect("label=\"value\"");
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().expect("closing quote") {
                (_, '\\') => value.push(match chars.next().expect("escape").1 {
                    'n' => '\n',
                    c => c,
                }),
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.to_owned(), value);
        text = rest[end + 1..].trim_start_matches(',');
    }
    labels
}

/// The value of the sample `name` whose labels include `labels`; it must be unique.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<f64> = samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .collect();
    assert!(
        found.len() <= 1,
        "{name} {labels:?} matches {} samples",
        found.len()
    );
    found.first().copied()
}

fn must(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    value(samples, name, labels).unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
}

// ---------------------------------------------------------------------------------------
// The daemon in the testbed

const DNS_PAYLOAD_LEN: usize = 14;
/// Ethernet + IPv4 + UDP headers in front of each datagram's payload, as the XDP program
/// sees the frame.
const UDP_FRAME_OVERHEAD: usize = 14 + 20 + 8;

fn start(backends: usize) -> DaemonBed {
    let mut bed = DaemonBed::new(backends);
    let members: Vec<(usize, u32)> = (1..=backends).map(|i| (i, 1)).collect();
    let check = "    health_check:\n      kind: tcp\n      port: 80\n      interval: 200ms\n      \
                 timeout: 100ms\n      rise: 2\n      fall: 2\n";
    let pools = bed.pool_yaml("web", &members, check) + &bed.pool_yaml("dns", &members, check);
    let vips = "  - name: web\n    address: 10.200.0.1\n    port: 80\n    protocol: tcp\n    pool: web\n\
                \x20 - name: dns\n    address: 10.200.0.1\n    port: 53\n    protocol: udp\n    pool: dns\n";
    bed.write_config(&bed.config_yaml(vips, &pools));
    bed.start_daemon();
    bed
}

/// The metrics address from the daemon's log line `metrics listening addr=...`.
fn metrics_addr(bed: &DaemonBed) -> SocketAddr {
    let mut addr = None;
    bed.wait_for(
        "the metrics listening log line",
        Duration::from_secs(10),
        || {
            addr = bed.log_text().lines().find_map(|l| {
                let rest = l.split_once("metrics listening addr=")?.1;
                rest.split_whitespace().next()?.parse().ok()
            });
            addr.is_some()
        },
    );
    addr.expect("found")
}

/// A scrape from inside the load balancer's namespace (where the daemon listens).
fn scrape(bed: &DaemonBed, addr: SocketAddr) -> String {
    let (status, body) = bed
        .bed
        .lb
        .netns
        .enter(|| http_get(addr, "/metrics"))
        .unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

/// `flows` UDP flows (one socket each) of `per_flow` datagrams to the dns Vip, each
/// answered; returns the datagrams each backend answered.
fn udp_flows(bed: &DaemonBed, flows: usize, per_flow: usize) -> BTreeMap<String, usize> {
    let vip = bed.vip(53);
    bed.bed
        .client
        .netns
        .enter(|| {
            let mut answered = BTreeMap::new();
            for f in 0..flows {
                let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
                socket.connect(vip).unwrap();
                socket.set_read_timeout(Some(TIMEOUT)).unwrap();
                for k in 0..per_flow {
                    let payload = format!("flow{f:04}-n{k:04}");
                    assert_eq!(payload.len(), DNS_PAYLOAD_LEN);
                    socket.send(payload.as_bytes()).unwrap();
                    let mut buf = [0u8; 256];
                    let n = socket
                        .recv(&mut buf)
                        .unwrap_or_else(|e| panic!("no answer to {payload}: {e}"));
                    let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let (who, echoed) = reply
                        .split_once(' ')
                        .unwrap_or_else(|| panic!("reply {reply:?}"));
                    assert_eq!(echoed, payload);
                    *answered.entry(who.to_owned()).or_insert(0) += 1;
                }
            }
            answered
        })
        .unwrap()
}

#[test]
fn vip_and_backend_counters_equal_the_datagrams_sent_and_health_gauges_follow_a_killed_backend() {
    let _serial = serial();
    let mut bed = start(3);
    let addr = metrics_addr(&bed);
    let before = parse_samples(&scrape(&bed, addr));
    assert_eq!(
        must(&before, "mlb_vip_packets_total", &[("vip", "dns")]),
        0.0
    );

    // With direct server return only client→Vip datagrams cross the load balancer: one
    // packet each. 30 flows of 3: 30 connection-table misses, then 60 hits.
    let (flows, per_flow) = (30, 3);
    let answered = udp_flows(&bed, flows, per_flow);
    let sent = flows * per_flow;
    let after = parse_samples(&scrape(&bed, addr));
    assert_eq!(
        must(&after, "mlb_vip_packets_total", &[("vip", "dns")]),
        sent as f64
    );
    assert_eq!(
        must(&after, "mlb_vip_bytes_total", &[("vip", "dns")]),
        (sent * (UDP_FRAME_OVERHEAD + DNS_PAYLOAD_LEN)) as f64
    );
    assert_eq!(
        must(&after, "mlb_vip_packets_total", &[("vip", "web")]),
        0.0
    );
    for be in ["be1", "be2", "be3"] {
        let got = answered.get(be).copied().unwrap_or(0);
        assert_eq!(
            got % per_flow,
            0,
            "a flow was split across backends: {answered:?}"
        );
        let labels = [("pool", "dns"), ("backend", be)];
        assert_eq!(
            must(&after, "mlb_backend_packets_total", &labels),
            got as f64,
            "{be}: {answered:?}"
        );
        assert_eq!(
            must(&after, "mlb_backend_bytes_total", &labels),
            (got * (UDP_FRAME_OVERHEAD + DNS_PAYLOAD_LEN)) as f64
        );
        assert_eq!(
            must(
                &after,
                "mlb_backend_packets_total",
                &[("pool", "web"), ("backend", be)]
            ),
            0.0
        );
    }
    assert_eq!(
        must(&after, "mlb_conntrack_lookups_total", &[("result", "miss")]),
        flows as f64
    );
    assert_eq!(
        must(&after, "mlb_conntrack_lookups_total", &[("result", "hit")]),
        (sent - flows) as f64
    );
    assert_eq!(
        must(
            &after,
            "mlb_conntrack_lookups_total",
            &[("result", "resteer")]
        ),
        0.0
    );
    assert_eq!(
        must(&after, "mlb_packets_forwarded_total", &[("action", "tx")]),
        sent as f64
    );
    let drops: f64 = after
        .iter()
        .filter(|s| s.name == "mlb_packets_dropped_total")
        .map(|s| s.value)
        .sum();
    assert_eq!(drops, 0.0);
    for be in ["be1", "be2", "be3"] {
        assert_eq!(
            must(
                &after,
                "mlb_backend_up",
                &[("pool", "dns"), ("backend", be)]
            ),
            1.0
        );
    }

    // be2's server dies: its health checks fail, it goes down in both pools and loses
    // every slot; the others stay up.
    bed.kill_server(2);
    let mut samples = Vec::new();
    bed.wait_for("be2 down in the metrics", Duration::from_secs(15), || {
        samples = parse_samples(&scrape(&bed, addr));
        value(
            &samples,
            "mlb_backend_up",
            &[("pool", "dns"), ("backend", "be2")],
        ) == Some(0.0)
            && value(
                &samples,
                "mlb_backend_up",
                &[("pool", "web"), ("backend", "be2")],
            ) == Some(0.0)
    });
    for pool in ["web", "dns"] {
        for be in ["be1", "be3"] {
            assert_eq!(
                must(
                    &samples,
                    "mlb_backend_up",
                    &[("pool", pool), ("backend", be)]
                ),
                1.0
            );
        }
        let down = [("pool", pool), ("backend", "be2"), ("to", "down")];
        assert_eq!(must(&samples, "mlb_backend_transitions_total", &down), 1.0);
        let up = [("pool", pool), ("backend", "be2"), ("to", "up")];
        assert_eq!(must(&samples, "mlb_backend_transitions_total", &up), 0.0);
    }
    assert_eq!(
        must(
            &samples,
            "mlb_table_slots",
            &[("vip", "dns"), ("backend", "be2")]
        ),
        0.0
    );
    let size = must(&samples, "mlb_table_size", &[("vip", "dns")]);
    let held: f64 = ["be1", "be3"]
        .iter()
        .map(|be| {
            must(
                &samples,
                "mlb_table_slots",
                &[("vip", "dns"), ("backend", be)],
            )
        })
        .sum();
    assert_eq!(held, size, "the two up backends hold every slot");
    assert_eq!(
        must(&samples, "mlb_table_generation", &[("vip", "dns")]),
        2.0
    );
    assert_eq!(
        must(&samples, "mlb_table_rebuilds_total", &[("vip", "dns")]),
        2.0
    );

    // And back.
    bed.restart_server(2);
    bed.wait_for(
        "be2 up again in the metrics",
        Duration::from_secs(15),
        || {
            samples = parse_samples(&scrape(&bed, addr));
            value(
                &samples,
                "mlb_backend_up",
                &[("pool", "dns"), ("backend", "be2")],
            ) == Some(1.0)
        },
    );
    let up = [("pool", "dns"), ("backend", "be2"), ("to", "up")];
    assert_eq!(must(&samples, "mlb_backend_transitions_total", &up), 1.0);
    assert!(
        must(
            &samples,
            "mlb_table_slots",
            &[("vip", "dns"), ("backend", "be2")]
        ) > 0.0
    );
}

#[test]
fn promtool_accepts_a_live_scrape_and_the_shipped_scrape_config() {
    let _serial = serial();
    let mut bed = start(2);
    let addr = metrics_addr(&bed);
    udp_flows(&bed, 4, 2);
    // A backend failing its checks, so that every family has samples.
    bed.kill_server(2);
    let mut text = String::new();
    bed.wait_for("be2 down", Duration::from_secs(15), || {
        text = scrape(&bed, addr);
        value(
            &parse_samples(&text),
            "mlb_backend_up",
            &[("pool", "dns"), ("backend", "be2")],
        ) == Some(0.0)
    });
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup installs the Debian package prometheus)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics:\n{report}\n--- scrape ---\n{text}"
    );

    let out = Command::new("promtool")
        .args(["check", "config", SCRAPE_CONFIG])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn healthz_answers_while_running_and_readyz_once_the_config_is_applied() {
    // The endpoints themselves, without a data plane: not ready until told.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let metrics = Arc::new(Metrics::new("/nonexistent/mlb-pins"));
    let server = runtime
        .block_on(Server::start(
            "127.0.0.1:0".parse().unwrap(),
            Arc::clone(&metrics),
        ))
        .expect("bind");
    let addr = server.addr();
    assert_ne!(addr.port(), 0, "the bound port is reported");
    assert_eq!(http_get(addr, "/healthz").0, 200);
    assert_eq!(http_get(addr, "/readyz").0, 503);
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200);
    assert!(
        body.contains("mlb_config_reloads_total{result=\"failure\"} 0"),
        "{body}"
    );
    assert_eq!(http_get(addr, "/nope").0, 404);
    metrics.set_ready();
    assert_eq!(http_get(addr, "/readyz").0, 200);
    metrics.set_apply_failed(true);
    assert_eq!(http_get(addr, "/readyz").0, 503, "the last apply failed");
    metrics.set_apply_failed(false);
    metrics.set_detached(true);
    assert_eq!(
        http_get(addr, "/readyz").0,
        503,
        "the program is not attached"
    );
    metrics.set_detached(false);
    assert_eq!(http_get(addr, "/readyz").0, 200);
    metrics.reload(true);
    metrics.reload(false);
    let samples = parse_samples(&http_get(addr, "/metrics").1);
    assert_eq!(
        must(
            &samples,
            "mlb_config_reloads_total",
            &[("result", "success")]
        ),
        1.0
    );
    assert_eq!(
        must(
            &samples,
            "mlb_config_reloads_total",
            &[("result", "failure")]
        ),
        1.0
    );
    assert!(
        must(
            &samples,
            "mlb_config_last_reload_success_timestamp_seconds",
            &[]
        ) > 1.7e9
    );
    drop(server);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        TcpStream::connect_timeout(&addr, TIMEOUT).is_err(),
        "the server stops when dropped"
    );
}

#[test]
fn the_live_daemon_is_ready_and_reports_build_info_and_reloads() {
    let _serial = serial();
    let bed = start(2);
    let addr = metrics_addr(&bed);
    let (healthz, readyz) = bed
        .bed
        .lb
        .netns
        .enter(|| (http_get(addr, "/healthz").0, http_get(addr, "/readyz").0))
        .unwrap();
    assert_eq!((healthz, readyz), (200, 200));
    let samples = parse_samples(&scrape(&bed, addr));
    let info = samples
        .iter()
        .find(|s| s.name == "mlb_build_info")
        .expect("mlb_build_info");
    assert_eq!(info.value, 1.0);
    assert_eq!(info.labels["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info.labels["xdp_mode"], "native");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(info.labels["kernel"], release.trim());
    assert_eq!(
        must(
            &samples,
            "mlb_xdp_attached",
            &[("interface", "eth0"), ("xdp_mode", "native")]
        ),
        1.0
    );
    assert_eq!(
        must(
            &samples,
            "mlb_config_reloads_total",
            &[("result", "success")]
        ),
        0.0
    );

    // A bad config is refused, a good one applied (the daemon watches the file).
    let good = std::fs::read_to_string(&bed.config).unwrap();
    bed.write_config("vips: [");
    bed.wait_for("a failed reload", Duration::from_secs(10), || {
        value(
            &parse_samples(&scrape(&bed, addr)),
            "mlb_config_reloads_total",
            &[("result", "failure")],
        )
        .is_some_and(|n| n >= 1.0)
    });
    // A refusal by SIGHUP counts once, like the watcher's, however many problems it has
    // (the watcher does not count the same content again).
    bed.write_config("vips:\n  - adress: 10.200.0.1\n    prot: 80\n");
    let failures = || {
        value(
            &parse_samples(&scrape(&bed, addr)),
            "mlb_config_reloads_total",
            &[("result", "failure")],
        )
        .unwrap_or(0.0)
    };
    bed.wait_for("the watcher's refusal", Duration::from_secs(10), || {
        failures() >= 2.0
    });
    let before = failures();
    bed.signal("-HUP");
    bed.wait_for("the SIGHUP refusal", Duration::from_secs(10), || {
        failures() == before + 1.0
    });
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(failures(), before + 1.0, "one refusal, counted once");
    bed.write_config(&good.replace("weight: 1", "weight: 2"));
    bed.wait_for("a successful reload", Duration::from_secs(10), || {
        value(
            &parse_samples(&scrape(&bed, addr)),
            "mlb_config_reloads_total",
            &[("result", "success")],
        ) == Some(1.0)
    });
}

/// A Prometheus server, killed on drop.
struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Prometheus's answer to an instant query: the result vector, or None while it is not
/// answering yet.
fn prom_query(bed: &DaemonBed, api: SocketAddr, query: &str) -> Option<Vec<serde_json::Value>> {
    let path = format!("/api/v1/query?query={}", encode(query));
    let (status, body) = bed
        .bed
        .lb
        .netns
        .enter(|| {
            TcpStream::connect_timeout(&api, TIMEOUT)
                .is_ok()
                .then(|| http_get(api, &path))
        })
        .ok()??;
    if status != 200 {
        return None;
    }
    let json: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    json["data"]["result"].as_array().cloned()
}

/// Every Grafana panel's PromQL (deploy/grafana-dashboard.json) as Grafana would send it:
/// `$vip` and `$pool` as "All", `$__rate_interval` as `window`. (title, query) pairs.
fn dashboard_queries(window: &str) -> Vec<(String, String)> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| {
            let title = panel["title"].as_str().unwrap_or("?").to_owned();
            panel["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(move |t| {
                    let expr = t["expr"].as_str()?;
                    Some((
                        title.clone(),
                        expr.replace("$__rate_interval", window)
                            .replace("$vip", ".*")
                            .replace("$pool", ".*"),
                    ))
                })
        })
        .collect()
}

#[test]
fn a_prometheus_server_sees_a_rate_per_backend_and_data_in_every_dashboard_panel() {
    let _serial = serial();
    let mut bed = start(3);
    let addr = metrics_addr(&bed);
    let dir = bed.dir.join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: mlb\n    \
             scrape_timeout: 1s\n    static_configs:\n      - targets: ['{addr}']\n"
        ),
    )
    .unwrap();
    // A free port inside the load balancer's namespace for Prometheus's own API.
    let api: SocketAddr = bed
        .bed
        .lb
        .netns
        .enter(|| {
            TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        })
        .unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let _prometheus = Prometheus(
        bed.bed
            .lb
            .netns
            .command("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={api}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus (cargo xtask setup installs the Debian package prometheus)"),
    );

    // Traffic all along: new UDP flows to the dns Vip, spread over the backends.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let traffic = {
        let (stop, seen) = (Arc::clone(&stop), Arc::clone(&seen));
        let netns =
            std::fs::File::open(format!("/var/run/netns/{}", bed.bed.client.netns.name())).unwrap();
        let vip = bed.vip(53);
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd as _;
            // SAFETY: this thread only.
            assert_eq!(
                unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(150) {
                let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
                socket.connect(vip).unwrap();
                socket
                    .set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                let _ = socket.send(b"rate-probe");
                let mut buf = [0u8; 64];
                if let Ok(n) = socket.recv(&mut buf) {
                    let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if let Some((who, _)) = reply.split_once(' ') {
                        seen.lock().unwrap().insert(who.to_owned());
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let query = "sum by (backend) (rate(mlb_backend_packets_total{pool=\"dns\"}[5s]))";
    let started = Instant::now();
    let mut last = Vec::new();
    let mut rates: BTreeMap<String, f64> = BTreeMap::new();
    while started.elapsed() < Duration::from_secs(45) {
        std::thread::sleep(Duration::from_millis(500));
        let Some(result) = prom_query(&bed, api, query) else {
            continue;
        };
        rates = result
            .iter()
            .filter_map(|r| {
                let backend = r["metric"]["backend"].as_str()?.to_owned();
                let rate: f64 = r["value"][1].as_str()?.parse().ok()?;
                Some((backend, rate))
            })
            .collect();
        last = result;
        if rates.len() == 3 && rates.values().all(|r| *r > 0.0) {
            break;
        }
    }
    let rates_seen = rates.len() == 3 && rates.values().all(|r| *r > 0.0);

    // Every dashboard panel, evaluated by the real server while traffic flows, after a
    // backend failed (transitions, check failures, table rebuilds): each must return a
    // series with a number, not an empty result or only NaN.
    let mut empty = Vec::new();
    if rates_seen {
        bed.kill_server(3);
        // A window longer than the wait below: the failure stays in every range.
        let queries = dashboard_queries("1m");
        assert!(queries.len() >= 25, "{queries:?}");
        let started = Instant::now();
        loop {
            empty = queries
                .iter()
                .filter(|(_, q)| {
                    !prom_query(&bed, api, q).is_some_and(|result| {
                        result.iter().any(|r| {
                            r["value"][1]
                                .as_str()
                                .and_then(|v| v.parse::<f64>().ok())
                                .is_some_and(f64::is_finite)
                        })
                    })
                })
                .cloned()
                .collect::<Vec<_>>();
            if empty.is_empty() || started.elapsed() > Duration::from_secs(40) {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        BTreeSet::from(["be1".to_owned(), "be2".to_owned(), "be3".to_owned()]),
        "backends that answered"
    );
    let busy: BTreeSet<String> = rates
        .iter()
        .filter(|(_, r)| **r > 0.0)
        .map(|(b, _)| b.clone())
        .collect();
    assert_eq!(
        busy,
        seen,
        "per-backend rates from Prometheus: {rates:?}\nlast answer: {last:?}\n--- prometheus log ---\n{}",
        std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
    );
    assert!(
        empty.is_empty(),
        "dashboard panels without data from Prometheus: {empty:#?}"
    );
}

#[test]
fn every_metric_the_grafana_dashboard_uses_is_in_a_live_scrape() {
    let _serial = serial();
    let dashboard = std::fs::read_to_string(DASHBOARD).unwrap();
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(
        json["panels"].as_array().is_some_and(|p| p.len() > 10),
        "the dashboard has panels"
    );
    let mut names = BTreeSet::new();
    let mut rest = dashboard.as_str();
    while let Some(at) = rest.find("mlb_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    assert!(names.len() >= 20, "{names:?}");

    // Traffic, and a backend that fails its checks, so that every series has appeared.
    let mut bed = start(2);
    let addr = metrics_addr(&bed);
    udp_flows(&bed, 6, 2);
    bed.kill_server(2);
    let mut scraped = BTreeSet::new();
    bed.wait_for("be2 down", Duration::from_secs(15), || {
        let samples = parse_samples(&scrape(&bed, addr));
        scraped = samples.iter().map(|s| s.name.clone()).collect();
        value(
            &samples,
            "mlb_backend_up",
            &[("pool", "dns"), ("backend", "be2")],
        ) == Some(0.0)
    });
    let missing: Vec<&String> = names.difference(&scraped).collect();
    assert!(
        missing.is_empty(),
        "dashboard metrics missing from the scrape: {missing:?}\nscraped: {scraped:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Cost of a scrape

const SCALE_VIPS: usize = 64;
const SCALE_BACKENDS: usize = 100;
const SCRAPE_BUDGET: Duration = Duration::from_millis(50);

fn scale_config(pin_dir: &Path) -> String {
    let mut yaml = format!(
        "global:\n  max_vips: {SCALE_VIPS}\n  max_backends: 8192\n  conntrack_entries: 65536\n  \
         pin_path: {}\ninterfaces:\n  - name: eth0\nvips:\n",
        pin_dir.display()
    );
    for v in 0..SCALE_VIPS {
        yaml += &format!(
            "  - name: v{v}\n    address: 10.200.0.{}\n    port: 80\n    protocol: tcp\n    pool: p{v}\n",
            v + 1
        );
    }
    yaml += "pools:\n";
    for v in 0..SCALE_VIPS {
        yaml += &format!("  p{v}:\n    backends:\n");
        for b in 0..SCALE_BACKENDS {
            yaml += &format!(
                "      - address: 10.{}.{v}.{}\n        name: b{v}-{b}\n",
                1 + b / 250,
                1 + b % 250
            );
        }
    }
    yaml
}

const VIP_STATS: &str = "VIP_STATS";
const BACKEND_STATS: &str = "BACKEND_STATS";

/// Writes `id * (cpu + 1)` packets and a thousand times that in bytes into slot `id` of
/// the pinned per-CPU traffic map `name`, on every CPU.
fn write_traffic(pin_dir: &Path, name: &str, ids: impl Iterator<Item = u32>) {
    let data = MapData::from_pin(pin_dir.join(name)).unwrap();
    let mut map: PerCpuArray<MapData, TrafficCounters> =
        PerCpuArray::try_from(Map::from_map_data(data).unwrap()).unwrap();
    let cpus = aya::util::nr_cpus().unwrap() as u64;
    for id in ids {
        let values: Vec<TrafficCounters> = (1..=cpus)
            .map(|c| TrafficCounters {
                packets: u64::from(id) * c,
                bytes: u64::from(id) * c * 1000,
            })
            .collect();
        map.set(id, PerCpuValues::try_from(values).unwrap(), 0)
            .unwrap();
    }
}

/// Removes a bpffs pin directory on drop.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The data plane and metrics of 64 Vips of 100 Backends each, pinned under a directory
/// of this test's own.
struct Scale {
    reconciler: Reconciler<Dataplane>,
    metrics: Arc<Metrics>,
    pins: Pins,
}

fn scale(name: &str) -> Scale {
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/mlb-test-metrics-{name}-{}",
        std::process::id()
    )));
    let config =
        Config::parse(&scale_config(&pins.0), "scale.yaml").unwrap_or_else(|e| panic!("{e}"));
    let dataplane = Dataplane::load_pinned(daemon::capacities(&config), &pins.0)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut reconciler = Reconciler::new(dataplane, Assignments::default());
    let started = Instant::now();
    let report = reconciler.apply(&config).unwrap_or_else(|e| panic!("{e}"));
    let applied = started.elapsed();
    let metrics = Arc::new(Metrics::new(&pins.0));
    let inventory = Instant::now();
    metrics.reconciled(&reconciler, &report, applied);
    // README's design notes weigh ahash against these (its maps are keyed here).
    eprintln!(
        "first apply of {SCALE_VIPS} x {SCALE_BACKENDS}: {applied:?}; metrics inventory \
         rebuilt in {:?}",
        inventory.elapsed()
    );
    metrics.set_ready();
    Scale {
        reconciler,
        metrics,
        pins,
    }
}

/// The daemon's runtime (two workers, shared by the health probes and the metrics
/// server) serving `metrics` on a free port.
fn serve(metrics: &Arc<Metrics>) -> (tokio::runtime::Runtime, Server) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime
        .block_on(Server::start(
            "127.0.0.1:0".parse().unwrap(),
            Arc::clone(metrics),
        ))
        .unwrap();
    (runtime, server)
}

#[test]
fn a_scrape_of_64_vips_with_100_backends_each_takes_under_50ms() {
    let _serial = serial();
    let Scale {
        reconciler,
        metrics,
        pins,
    } = scale("scale");
    // Known traffic in every slot, different on each CPU: slot `id` holds `id * (cpu + 1)`
    // packets and a thousand times that in bytes.
    let per_cpu_sum = |id: u32| -> (f64, f64) {
        let cpus = aya::util::nr_cpus().unwrap() as u64;
        let n = u64::from(id) * cpus * (cpus + 1) / 2;
        (n as f64, (n * 1000) as f64)
    };
    let assignments = reconciler.assignments().clone();
    write_traffic(&pins.0, VIP_STATS, assignments.vips.values().map(|a| a.id));
    write_traffic(
        &pins.0,
        BACKEND_STATS,
        assignments.backends.values().map(|a| a.id),
    );

    let (_runtime, server) = serve(&metrics);
    let mut times = Vec::new();
    let mut body = String::new();
    for _ in 0..7 {
        let started = Instant::now();
        let (status, text) = http_get(server.addr(), "/metrics");
        times.push(started.elapsed());
        assert_eq!(status, 200);
        body = text;
    }
    let samples = parse_samples(&body);
    let count = |name: &str| samples.iter().filter(|s| s.name == name).count();
    assert_eq!(count("mlb_vip_packets_total"), SCALE_VIPS);
    assert_eq!(
        count("mlb_backend_packets_total"),
        SCALE_VIPS * SCALE_BACKENDS
    );
    assert_eq!(count("mlb_backend_up"), SCALE_VIPS * SCALE_BACKENDS);
    assert_eq!(count("mlb_table_slots"), SCALE_VIPS * SCALE_BACKENDS);
    for v in 0..SCALE_VIPS {
        let vip = format!("v{v}");
        let id = assignments.vips[&format!("10.200.0.{}:80/tcp", v + 1)].id;
        let (packets, bytes) = per_cpu_sum(id);
        assert_eq!(
            must(&samples, "mlb_vip_packets_total", &[("vip", &vip)]),
            packets,
            "{vip}"
        );
        assert_eq!(
            must(&samples, "mlb_vip_bytes_total", &[("vip", &vip)]),
            bytes,
            "{vip}"
        );
        for b in 0..SCALE_BACKENDS {
            let (pool, backend) = (format!("p{v}"), format!("b{v}-{b}"));
            let id =
                assignments.backends[&format!("{pool}/10.{}.{v}.{}", 1 + b / 250, 1 + b % 250)].id;
            let labels = [("pool", pool.as_str()), ("backend", backend.as_str())];
            assert_eq!(
                must(&samples, "mlb_backend_packets_total", &labels),
                per_cpu_sum(id).0,
                "{labels:?}"
            );
            assert_eq!(
                must(&samples, "mlb_backend_bytes_total", &labels),
                per_cpu_sum(id).1,
                "{labels:?}"
            );
        }
    }
    let size = must(&samples, "mlb_table_size", &[("vip", "v0")]);
    let slots: f64 = samples
        .iter()
        .filter(|s| s.name == "mlb_table_slots" && s.labels["vip"] == "v0")
        .map(|s| s.value)
        .sum();
    assert_eq!(slots, size, "v0's backends hold every slot of its table");
    times.sort();
    let median = times[times.len() / 2];
    eprintln!(
        "scrape of {SCALE_VIPS} vips x {SCALE_BACKENDS} backends ({} bytes, {} samples, tables of {size} slots): \
         median {median:?}, all {times:?}",
        body.len(),
        samples.len()
    );
    let (hand, with_crate) = encoder_against_the_crate(&metrics, &samples);
    eprintln!(
        "encoding the same {} samples: the hand encoder (Metrics::encode, counters read from \
         the maps included) median {hand:?}; the prometheus crate (values set on pre-resolved \
         handles, gather, TextEncoder) median {with_crate:?}",
        samples.len()
    );
    assert!(
        median < SCRAPE_BUDGET,
        "median scrape {median:?} (all {times:?}) exceeds {SCRAPE_BUDGET:?}"
    );
}

/// Scrapes in a tight loop, four at once, on the daemon's two-worker runtime at 64 × 100:
/// an HTTP health check of 100 ms timeout on the same runtime never fails and never takes
/// a backend down. Encoding runs off the workers; on them, the probes wait behind it (measured
/// with it on them, a 30 ms timeout: 13 of 26 probes failed, up to 255 ms; off them: the
/// slowest 28–53 ms with two other builds on the machine).
#[test]
fn scrapes_in_a_tight_loop_never_fail_a_health_check() {
    let _serial = serial();
    let Scale {
        reconciler: _reconciler,
        metrics,
        pins: _pins,
    } = scale("storm");
    // A backend that answers every check at once.
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in backend.incoming().flatten() {
            let mut stream = stream;
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let checked = Config::parse(
        &format!(
            "interfaces:\n  - name: eth0\nvips:\n  - name: v\n    address: 10.200.0.1\n    \
             port: 80\n    protocol: tcp\n    pool: p\npools:\n  p:\n    backends:\n      \
             - address: 127.0.0.1\n    health_check:\n      kind: http\n      port: {}\n      \
             interval: 150ms\n      timeout: 100ms\n      rise: 1\n      fall: 1\n      \
             jitter: 0%\n      http:\n        path: /\n",
            backend_addr.port()
        ),
        "checked.yaml",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (runtime, server) = serve(&metrics);
    let probes = Arc::new(Mutex::new(Vec::new()));
    let (events_tx, mut events) = tokio::sync::mpsc::channel(64);
    let observed = Arc::clone(&probes);
    let checker = runtime.block_on(async {
        lb_userspace::health::Checker::start_with_options(
            &checked,
            events_tx,
            lb_userspace::health::Options {
                observer: Some(Arc::new(
                    move |o: &lb_userspace::health::Observation<'_>| {
                        observed.lock().unwrap().push((o.latency, o.result.is_ok()));
                    },
                )),
                ..Default::default()
            },
        )
    });
    let stop = Arc::new(AtomicBool::new(false));
    let addr = server.addr();
    let scrapers: Vec<_> = (0..4)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut scrapes = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(http_get(addr, "/metrics").0, 200);
                    scrapes += 1;
                }
                scrapes
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::Relaxed);
    let scrapes: u32 = scrapers.into_iter().map(|t| t.join().unwrap()).sum();
    drop(checker);
    let probes = probes.lock().unwrap().clone();
    let failed = probes.iter().filter(|(_, ok)| !ok).count();
    let slowest = probes.iter().map(|(l, _)| *l).max().unwrap_or_default();
    eprintln!(
        "{scrapes} scrapes in 4 s by 4 clients; {} probes, {failed} failed, slowest {slowest:?}",
        probes.len()
    );
    assert!(scrapes >= 8, "the scrapers ran ({scrapes} scrapes)");
    assert!(
        probes.len() >= 15,
        "the checks ran ({} probes)",
        probes.len()
    );
    assert_eq!(failed, 0, "probes failed during the scrapes: {probes:?}");
    // A late poll can still pass (the answer is there by then): no probe may come near its
    // timeout at all.
    assert!(
        slowest < Duration::from_millis(100),
        "a probe took {slowest:?}, its timeout is 100 ms: {probes:?}"
    );
    let mut downs = Vec::new();
    while let Ok(event) = events.try_recv() {
        if !event.up {
            downs.push(event);
        }
    }
    assert!(downs.is_empty(), "false transitions: {downs:?}");
}

/// The scrape-cost figure beside `metrics/text.rs`: medians of 15 encodings of the same
/// samples by `Metrics::encode` and by the prometheus crate (one GaugeVec per name, each
/// sample's handle resolved once, values set at every scrape as fresh map counters would
/// be, then gather and TextEncoder: the crate's best case).
fn encoder_against_the_crate(metrics: &Metrics, samples: &[Sample]) -> (Duration, Duration) {
    let registry = prometheus::Registry::new();
    let mut families: BTreeMap<(String, Vec<String>), prometheus::GaugeVec> = BTreeMap::new();
    let mut handles = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        let names: Vec<String> = s.labels.keys().cloned().collect();
        let family = families
            .entry((s.name.clone(), names.clone()))
            .or_insert_with(|| {
                // Same name, other label names (never in practice): a name of its own.
                let name = format!("{}_{i}", s.name);
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                let vec =
                    prometheus::GaugeVec::new(prometheus::Opts::new(name, "help"), &names).unwrap();
                registry.register(Box::new(vec.clone())).unwrap();
                vec
            });
        let values: Vec<&str> = s.labels.values().map(String::as_str).collect();
        handles.push((family.with_label_values(&values), s.value));
    }
    let median = |f: &mut dyn FnMut() -> usize| {
        let mut times: Vec<Duration> = (0..15)
            .map(|_| {
                let started = Instant::now();
                std::hint::black_box(f());
                started.elapsed()
            })
            .collect();
        times.sort();
        times[times.len() / 2]
    };
    let hand = median(&mut || metrics.encode().len());
    let with_crate = median(&mut || {
        for (gauge, value) in &handles {
            gauge.set(*value);
        }
        let mut out = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&registry.gather(), &mut out)
            .unwrap();
        out.len()
    });
    (hand, with_crate)
}

/// A config with one Vip whose pool holds the backends at `10.1.0.<n>` for `members`.
/// Without second chance: a removed backend's id is freed at once (with it, the backend
/// stays retired, and its id taken, until the previous tables expire).
fn small_config(pin_dir: &Path, members: &[u8]) -> Config {
    let mut yaml = format!(
        "global:\n  pin_path: {}\n  conntrack_entries: 65536\n  second_chance: 0\ninterfaces:\n  - name: eth0\nvips:\n  - name: web\n    \
         address: 10.200.0.1\n    port: 80\n    protocol: tcp\n    pool: p\npools:\n  p:\n    backends:\n",
        pin_dir.display()
    );
    for n in members {
        yaml += &format!("      - address: 10.1.0.{n}\n        name: b{n}\n");
    }
    Config::parse(&yaml, "small.yaml").unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_backend_given_a_freed_id_counts_from_zero_and_kept_backends_keep_their_counts() {
    let _serial = serial();
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/mlb-test-metrics-reuse-{}",
        std::process::id()
    )));
    let config = small_config(&pins.0, &[1, 2]);
    let dataplane = Dataplane::load_pinned(daemon::capacities(&config), &pins.0)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut reconciler = Reconciler::new(dataplane, Assignments::default());
    let metrics = Metrics::new(&pins.0);
    let apply = |reconciler: &mut Reconciler<Dataplane>, config: &Config| {
        let report = reconciler.apply(config).unwrap_or_else(|e| panic!("{e}"));
        metrics.reconciled(reconciler, &report, Duration::ZERO);
    };
    let packets = |backend: &str| {
        let text = String::from_utf8(metrics.encode()).unwrap();
        value(
            &parse_samples(&text),
            "mlb_backend_packets_total",
            &[("pool", "p"), ("backend", backend)],
        )
    };
    let id = |reconciler: &Reconciler<Dataplane>, n: u8| {
        reconciler.assignments().backends[&format!("p/10.1.0.{n}")].id
    };
    let cpus = aya::util::nr_cpus().unwrap() as f64;
    // Slot `id` then holds id * (1 + 2 + .. + cpus) packets.
    let expected = |id: u32| f64::from(id) * cpus * (cpus + 1.0) / 2.0;

    apply(&mut reconciler, &config);
    let (id1, id2) = (id(&reconciler, 1), id(&reconciler, 2));
    write_traffic(&pins.0, BACKEND_STATS, [id1, id2].into_iter());
    assert_eq!(packets("b1"), Some(expected(id1)));
    assert_eq!(packets("b2"), Some(expected(id2)));

    // b2 leaves: its series goes; b1 keeps counting.
    apply(&mut reconciler, &small_config(&pins.0, &[1]));
    assert_eq!(packets("b2"), None);
    assert_eq!(packets("b1"), Some(expected(id1)));

    // b3 arrives and is given b2's id, whose slot still holds b2's packets.
    apply(&mut reconciler, &small_config(&pins.0, &[1, 3]));
    assert_eq!(
        id(&reconciler, 3),
        id2,
        "precondition: the freed id is reused"
    );
    assert_eq!(packets("b3"), Some(0.0), "b3 inherits none of b2's packets");
    assert_eq!(packets("b1"), Some(expected(id1)));
}

/// The load balancer's interface deleted under a running daemon: `/readyz` turns 503.
#[test]
fn readyz_turns_503_when_the_program_is_no_longer_attached() {
    let _serial = serial();
    let mut bed = start(2);
    let addr = metrics_addr(&bed);
    let readyz = |bed: &DaemonBed| {
        bed.bed
            .lb
            .netns
            .enter(|| http_get(addr, "/readyz").0)
            .unwrap()
    };
    assert_eq!(readyz(&bed), 200);
    let port = bed.bed.switch_port(&bed.bed.lb);
    bed.bed.switch.ip(&["link", "del", &port]).unwrap();
    bed.wait_for("/readyz 503", Duration::from_secs(10), || {
        readyz(&bed) == 503
    });
    assert!(
        bed.log_text()
            .contains("the program is not attached to this interface"),
        "{}",
        bed.log_text()
    );
    bed.stop_daemon("-KILL");
}
