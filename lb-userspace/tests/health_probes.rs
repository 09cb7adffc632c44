//! Health probes and the check state machine against real servers this test opens on
//! loopback addresses (127.0.0.0/8): TCP, HTTP (answering, failing, hanging), UDP; rise
//! and fall thresholds, jitter, flap damping, de-duplication. No root needed.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use lb_userspace::{
    config::{BackendConfig, CheckKind, Config, Global, HealthCheck, Pool},
    health::{
        Checker, Damping, Failure, HealthEvent, Observation, Observer, Options, Probe, jittered,
    },
};
use rand::{SeedableRng as _, rngs::StdRng};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, UdpSocket},
    sync::mpsc,
    task::JoinHandle,
};

const MS: Duration = Duration::from_millis(1);

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn check(kind: CheckKind, port: u16, interval_ms: u64, timeout_ms: u64) -> HealthCheck {
    HealthCheck {
        kind,
        port,
        interval: Duration::from_millis(interval_ms),
        timeout: Duration::from_millis(timeout_ms),
        rise: 2,
        fall: 3,
        jitter: 0.0,
    }
}

fn http_kind(host: Option<&str>) -> CheckKind {
    CheckKind::Http {
        path: "/healthz".into(),
        host: host.map(str::to_owned),
        status: 200..=399,
    }
}

/// A config of just pools: `(name, backend addresses, check)`.
fn config(pools: &[(&str, &[IpAddr], HealthCheck)]) -> Config {
    let pools = pools
        .iter()
        .map(|(name, addresses, health_check)| {
            let backends = addresses
                .iter()
                .map(|&address| BackendConfig {
                    address,
                    weight: 1,
                    name: address.to_string(),
                })
                .collect();
            let pool = Pool {
                backends,
                health_check: health_check.clone(),
            };
            (name.to_string(), pool)
        })
        .collect();
    Config {
        global: Global::default(),
        interfaces: Vec::new(),
        vips: Vec::new(),
        pools,
        announce: None,
        source: PathBuf::from("test"),
    }
}

/// A TCP server counting accepted connections (each closed at once); `close` and `open`
/// toggle its listener on the same address.
struct TcpServer {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    task: Option<JoinHandle<()>>,
}

impl TcpServer {
    /// Listens on `address`, some free port.
    async fn start(address: &str) -> Self {
        let listener = TcpListener::bind((ip(address), 0)).await.unwrap();
        let mut server = Self {
            addr: listener.local_addr().unwrap(),
            accepts: Arc::default(),
            task: None,
        };
        server.serve(listener);
        server
    }

    fn serve(&mut self, listener: TcpListener) {
        let accepts = Arc::clone(&self.accepts);
        self.task = Some(tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepts.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        }));
    }

    async fn open(&mut self) {
        assert!(self.task.is_none());
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    async fn close(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

/// An HTTP/1.1 server answering every request with `status` (0: never answers, holding the
/// connection open); keeps the last request head it read.
struct HttpServer {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    last_request: Arc<Mutex<String>>,
    _task: JoinHandle<()>,
}

impl HttpServer {
    async fn start(address: &str, status: u16) -> Self {
        let listener = TcpListener::bind((ip(address), 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(status));
        let last_request = Arc::new(Mutex::new(String::new()));
        let (s, r) = (Arc::clone(&status), Arc::clone(&last_request));
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (status, last_request) = (Arc::clone(&s), Arc::clone(&r));
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0; 1024];
                    while !head.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    *last_request.lock().unwrap() = String::from_utf8_lossy(&head).into_owned();
                    let status = status.load(Ordering::SeqCst);
                    if status == 0 {
                        // Hang: keep the connection, never answer.
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return;
                    }
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                    );
                    let _ = stream.write_all(reply.as_bytes()).await;
                });
            }
        });
        Self {
            addr,
            status,
            last_request,
            _task: task,
        }
    }

    fn last_request(&self) -> String {
        self.last_request.lock().unwrap().clone()
    }
}

/// A UDP server answering every datagram with `reply` (`None`: never answers).
async fn udp_server(reply: Option<&'static [u8]>) -> (SocketAddr, JoinHandle<()>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = [0; 2048];
        while let Ok((_, from)) = socket.recv_from(&mut buf).await {
            if let Some(reply) = reply {
                let _ = socket.send_to(reply, from).await;
            }
        }
    });
    (addr, task)
}

/// (address, start, latency, passed)
type ProbeLog = Vec<(IpAddr, Instant, Duration, bool)>;

/// Every probe a checker runs.
#[derive(Clone, Default)]
struct Probes(Arc<Mutex<ProbeLog>>);

impl Probes {
    fn observer(&self) -> Observer {
        let log = Arc::clone(&self.0);
        Arc::new(move |o: &Observation<'_>| {
            let start = Instant::now() - o.latency;
            log.lock()
                .unwrap()
                .push((o.address, start, o.latency, o.result.is_ok()));
        })
    }

    fn of(&self, address: IpAddr) -> Vec<(Instant, Duration, bool)> {
        let log = self.0.lock().unwrap();
        log.iter()
            .filter(|p| p.0 == address)
            .map(|p| (p.1, p.2, p.3))
            .collect()
    }
}

fn start(config: &Config, options: Options) -> (Checker, mpsc::Receiver<HealthEvent>) {
    let (tx, rx) = mpsc::channel(64);
    (Checker::start_with_options(config, tx, options), rx)
}

async fn next_event(events: &mut mpsc::Receiver<HealthEvent>, within: Duration) -> HealthEvent {
    tokio::time::timeout(within, events.recv())
        .await
        .unwrap_or_else(|_| panic!("no health event within {within:?}"))
        .expect("checker alive")
}

/// Waits `d`, failing if any event arrives meanwhile.
async fn no_event_for(events: &mut mpsc::Receiver<HealthEvent>, d: Duration) {
    if let Ok(Some(event)) = tokio::time::timeout(d, events.recv()).await {
        panic!("unexpected event {event:?}");
    }
}

#[tokio::test]
async fn tcp_probe_passes_while_listening_and_is_refused_once_closed() {
    let mut server = TcpServer::start("127.0.0.1").await;
    let probe = Probe::new(
        &check(CheckKind::Tcp, server.addr.port(), 100, 50),
        ip("127.0.0.1"),
    )
    .unwrap();
    assert_eq!(probe.run().await, Ok(()));
    server.close().await;
    let result = probe.run().await;
    assert_eq!(result, Err(Failure::Refused));
    assert_eq!(result.unwrap_err().to_string(), "connection refused");
}

#[tokio::test]
async fn http_probe_sends_path_and_host_and_judges_the_status() {
    let server = HttpServer::start("127.0.0.1", 200).await;
    let port = server.addr.port();
    let default_host =
        Probe::new(&check(http_kind(None), port, 500, 400), ip("127.0.0.1")).unwrap();
    assert_eq!(default_host.run().await, Ok(()));
    let head = server.last_request().to_ascii_lowercase();
    assert!(head.starts_with("get /healthz http/1.1\r\n"), "{head}");
    assert!(
        head.contains(&format!("\r\nhost: 127.0.0.1:{port}\r\n")),
        "{head}"
    );

    let named = Probe::new(
        &check(http_kind(Some("example.org")), port, 500, 400),
        ip("127.0.0.1"),
    )
    .unwrap();
    server.status.store(302, Ordering::SeqCst);
    assert_eq!(named.run().await, Ok(()), "302 is within 200-399");
    assert!(
        server
            .last_request()
            .to_ascii_lowercase()
            .contains("\r\nhost: example.org\r\n")
    );

    server.status.store(500, Ordering::SeqCst);
    let result = named.run().await;
    assert_eq!(result, Err(Failure::HttpStatus(500)));
    assert_eq!(result.unwrap_err().to_string(), "HTTP 500");
}

#[tokio::test]
async fn http_probe_times_out_on_a_server_that_never_answers() {
    let server = HttpServer::start("127.0.0.1", 0).await;
    let probe = Probe::new(
        &check(http_kind(None), server.addr.port(), 500, 100),
        ip("127.0.0.1"),
    )
    .unwrap();
    let started = Instant::now();
    let result = probe.run().await;
    let took = started.elapsed();
    assert_eq!(result, Err(Failure::Timeout(100 * MS)));
    assert_eq!(result.unwrap_err().to_string(), "timeout after 100ms");
    assert!(took >= 100 * MS && took < 300 * MS, "took {took:?}");
    assert!(
        !server.last_request().is_empty(),
        "the request reached the server"
    );
}

#[tokio::test]
async fn udp_probe_checks_the_reply_prefix_and_times_out_without_a_reply() {
    let (pong, _a) = udp_server(Some(b"pong from be1")).await;
    let (silent, _b) = udp_server(None).await;
    let udp = |addr: SocketAddr, expect: Option<&[u8]>| {
        let kind = CheckKind::Udp {
            send: b"ping".to_vec(),
            expect: expect.map(<[u8]>::to_vec),
        };
        Probe::new(&check(kind, addr.port(), 500, 100), addr.ip()).unwrap()
    };
    assert_eq!(udp(pong, Some(b"pong")).run().await, Ok(()));
    assert_eq!(
        udp(pong, None).run().await,
        Ok(()),
        "any reply passes without expect"
    );
    let wrong = udp(pong, Some(b"PONG")).run().await;
    assert_eq!(wrong, Err(Failure::UnexpectedReply));
    assert_eq!(wrong.unwrap_err().to_string(), "unexpected UDP reply");
    assert_eq!(
        udp(silent, None).run().await,
        Err(Failure::Timeout(100 * MS))
    );
    // Nobody on the port: ICMP port unreachable comes back as refused.
    let closed = {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap()
    };
    assert_eq!(udp(closed, None).run().await, Err(Failure::Refused));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_backends_do_not_delay_checks_of_another() {
    let hanging = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
    let mut hang_servers = Vec::new();
    for address in hanging {
        hang_servers.push(HttpServer::start(address, 0).await);
    }
    let good = HttpServer::start("127.0.0.1", 200).await;
    // One pool per server (each on its own port); interval 50 ms, timeout 45 ms: checked
    // one after the other, the good backend would wait ~3 × 45 ms between checks.
    let pools: Vec<(String, Vec<IpAddr>, HealthCheck)> = hang_servers
        .iter()
        .chain([&good])
        .enumerate()
        .map(|(i, s)| {
            (
                format!("p{i}"),
                vec![s.addr.ip()],
                check(http_kind(None), s.addr.port(), 50, 45),
            )
        })
        .collect();
    let pools: Vec<(&str, &[IpAddr], HealthCheck)> = pools
        .iter()
        .map(|(n, a, c)| (n.as_str(), a.as_slice(), c.clone()))
        .collect();
    let probes = Probes::default();
    let (checker, mut events) = start(
        &config(&pools),
        Options {
            observer: Some(probes.observer()),
            ..Options::default()
        },
    );
    let mut down = Vec::new();
    for _ in 0..hanging.len() {
        let event = next_event(&mut events, Duration::from_secs(2)).await;
        assert!(!event.up);
        assert_eq!(event.reason, "timeout after 45ms");
        down.push(event.address);
    }
    down.sort();
    assert_eq!(down, hanging.map(ip));
    // Nothing else changes: the good backend stays up.
    no_event_for(&mut events, Duration::from_secs(1)).await;
    checker.stop();
    let good_probes = probes.of(good.addr.ip());
    let gaps: Vec<Duration> = good_probes.windows(2).map(|w| w[1].0 - w[0].0).collect();
    let max_gap = gaps.iter().max().copied().unwrap_or_default();
    let max_latency = good_probes.iter().map(|p| p.1).max().unwrap_or_default();
    println!(
        "good backend: {} checks, longest gap {max_gap:?} (interval 50ms), slowest check {max_latency:?}; \
         {} checks of hanging backends",
        good_probes.len(),
        hanging
            .iter()
            .map(|a| probes.of(ip(a)).len())
            .sum::<usize>()
    );
    assert!(
        good_probes.iter().all(|p| p.2),
        "the good backend always passed"
    );
    assert!(good_probes.len() >= 20, "{} checks", good_probes.len());
    assert!(
        max_gap < 85 * MS,
        "longest gap between checks of the good backend {max_gap:?}"
    );
}

#[tokio::test]
async fn backend_goes_down_exactly_on_the_fall_th_failure_and_up_on_the_rise_th_success() {
    let mut server = TcpServer::start("127.0.0.1").await;
    let address = server.addr.ip();
    let mut tcp = check(CheckKind::Tcp, server.addr.port(), 100, 50);
    (tcp.fall, tcp.rise) = (3, 2);
    let probes = Probes::default();
    let options = Options {
        observer: Some(probes.observer()),
        ..Options::default()
    };
    let stats = options.stats.clone();
    let (_checker, mut events) = start(&config(&[("web", &[address], tcp)]), options);
    no_event_for(&mut events, 350 * MS).await;
    server.close().await;
    let down = next_event(&mut events, Duration::from_secs(2)).await;
    // The run of results that ends at the event: exactly `fall` failures.
    let results: Vec<bool> = probes.of(address).iter().map(|p| p.2).collect();
    let trailing = results.iter().rev().take_while(|ok| !**ok).count();
    assert_eq!(
        (down.up, down.reason.as_str(), trailing),
        (false, "connection refused", 3),
        "{results:?}"
    );
    assert!(
        results.len() > trailing,
        "passed checks before: {results:?}"
    );

    server.open().await;
    let up = next_event(&mut events, Duration::from_secs(2)).await;
    let results: Vec<bool> = probes.of(address).iter().map(|p| p.2).collect();
    let trailing = results.iter().rev().take_while(|ok| **ok).count();
    assert_eq!(
        (up.up, up.reason.as_str(), trailing),
        (true, "2 consecutive checks passed", 2),
        "{results:?}"
    );
    let backend = stats.backend("web", address).unwrap();
    assert!(backend.up);
    assert_eq!(backend.transitions, 2);
    assert_eq!(backend.last_failure.as_deref(), Some("connection refused"));
    assert!(backend.checks >= 8 && backend.failures >= 3, "{backend:?}");
    assert!(stats.failures_by_reason()["refused"] >= 3);
}

#[tokio::test]
async fn jitter_keeps_each_wait_within_interval_times_one_plus_or_minus_jitter() {
    let mut rng = StdRng::seed_from_u64(7);
    let interval = 100 * MS;
    let waits: Vec<Duration> = (0..100_000)
        .map(|_| jittered(interval, 0.5, &mut rng))
        .collect();
    let (min, max) = (*waits.iter().min().unwrap(), *waits.iter().max().unwrap());
    assert!(min >= 50 * MS && max <= 150 * MS, "{min:?}..{max:?}");
    assert!(
        min < 51 * MS && max > 149 * MS,
        "the whole range is used: {min:?}..{max:?}"
    );
    let mean = waits.iter().sum::<Duration>() / waits.len() as u32;
    assert!(mean > 99 * MS && mean < 101 * MS, "mean {mean:?}");
    assert!((0..100).all(|_| jittered(interval, 0.0, &mut rng) == interval));

    // And the checker's real spacing: interval 40 ms, jitter 50 %.
    let server = TcpServer::start("127.0.0.1").await;
    let mut tcp = check(CheckKind::Tcp, server.addr.port(), 40, 20);
    tcp.jitter = 0.5;
    let probes = Probes::default();
    let (checker, _events) = start(
        &config(&[("web", &[server.addr.ip()], tcp)]),
        Options {
            observer: Some(probes.observer()),
            ..Options::default()
        },
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    checker.stop();
    let starts: Vec<Instant> = probes.of(server.addr.ip()).iter().map(|p| p.0).collect();
    let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    let (min, max) = (*gaps.iter().min().unwrap(), *gaps.iter().max().unwrap());
    println!(
        "{} gaps between checks: {min:?}..{max:?} (bounds 20ms..60ms)",
        gaps.len()
    );
    assert!(gaps.len() >= 20);
    // Never early (timers do not fire early; allow for the clock read around the probe).
    assert!(min >= 19 * MS, "{min:?}");
    assert!(max <= 60 * MS + 25 * MS, "{max:?}");
    assert!(max - min > 10 * MS, "waits vary: {min:?}..{max:?}");
}

#[tokio::test]
async fn flapping_backend_is_held_down_then_released_after_the_hold() {
    let mut server = TcpServer::start("127.0.0.1").await;
    let address = server.addr.ip();
    let mut tcp = check(CheckKind::Tcp, server.addr.port(), 30, 20);
    (tcp.fall, tcp.rise) = (1, 1);
    let damping = Damping {
        max_transitions: 4,
        window: Duration::from_secs(10),
        hold: 800 * MS,
        max_hold: Duration::from_secs(5),
    };
    let probes = Probes::default();
    let options = Options {
        damping,
        observer: Some(probes.observer()),
        ..Options::default()
    };
    let stats = options.stats.clone();
    let (_checker, mut events) = start(&config(&[("web", &[address], tcp)]), options);
    // Four changes are allowed: down, up, down, up.
    for up in [false, true, false, true] {
        if up {
            server.open().await;
        } else {
            server.close().await;
        }
        let event = next_event(&mut events, Duration::from_secs(2)).await;
        assert_eq!(event.up, up, "{event:?}");
        assert!(!event.reason.contains("flapping"), "{event:?}");
    }
    // The fifth goes down and starts the hold.
    server.close().await;
    let held = next_event(&mut events, Duration::from_secs(2)).await;
    assert!(!held.up);
    assert_eq!(
        held.reason,
        "connection refused; flapping: held down for 800ms"
    );
    server.open().await;
    tokio::time::sleep(400 * MS).await;
    let backend = stats.backend("web", address).unwrap();
    assert!(
        !backend.up && backend.held && backend.damped == 1,
        "{backend:?}"
    );
    let passed_while_held = probes
        .of(address)
        .iter()
        .filter(|p| p.0 > held.detected_at && p.2)
        .count();
    assert!(
        passed_while_held >= 5,
        "checks kept running and passing: {passed_while_held}"
    );
    let up = next_event(&mut events, Duration::from_secs(2)).await;
    let held_for = up.detected_at - held.detected_at;
    println!("held down for {held_for:?} (hold 800ms)");
    assert!(up.up);
    assert!(held_for >= 800 * MS && held_for < 1000 * MS, "{held_for:?}");
    assert_eq!(stats.backend("web", address).unwrap().transitions, 6);
}

#[tokio::test]
async fn backend_in_two_pools_with_the_same_check_is_probed_once_and_both_pools_get_events() {
    let mut server = TcpServer::start("127.0.0.1").await;
    let address = server.addr.ip();
    let tcp = check(CheckKind::Tcp, server.addr.port(), 50, 20);
    let options = Options::default();
    let stats = options.stats.clone();
    let (checker, mut events) = start(
        &config(&[("a", &[address], tcp.clone()), ("b", &[address], tcp)]),
        options,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let accepts = server.accepts();
    println!("{accepts} connections in 1 s at a 50 ms interval, 2 pools");
    assert!(
        (12..=24).contains(&accepts),
        "one probe stream (~20/s): {accepts}"
    );
    assert_eq!(stats.probes() as usize, accepts);
    server.close().await;
    let mut pools = Vec::new();
    for _ in 0..2 {
        let event = next_event(&mut events, Duration::from_secs(2)).await;
        assert!(!event.up);
        pools.push(event.pool);
    }
    pools.sort();
    assert_eq!(pools, ["a", "b"]);
    let a = stats.backend("a", address).unwrap();
    assert_eq!(
        (a.up, a.checks),
        (false, stats.backend("b", address).unwrap().checks)
    );
    checker.stop();
}

#[tokio::test]
async fn backend_in_two_pools_with_different_checks_is_probed_by_each() {
    let server = TcpServer::start("127.0.0.1").await;
    let address = server.addr.ip();
    let tcp = check(CheckKind::Tcp, server.addr.port(), 50, 20);
    let mut other = tcp.clone();
    other.fall = 2;
    let (checker, _events) = start(
        &config(&[("a", &[address], tcp), ("b", &[address], other)]),
        Options::default(),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    checker.stop();
    let accepts = server.accepts();
    assert!(
        (30..=44).contains(&accepts),
        "two probe streams (~40/s): {accepts}"
    );
}

#[tokio::test]
async fn backend_starting_down_needs_rise_checks_and_sends_no_down_event() {
    let server = TcpServer::start("127.0.0.1").await;
    let address = server.addr.ip();
    let (tx, mut events) = mpsc::channel(8);
    let tcp = check(CheckKind::Tcp, server.addr.port(), 50, 20);
    let config = config(&[
        ("a", &[address], tcp),
        ("none", &[address], check(CheckKind::None, 0, 50, 20)),
    ]);
    let down = [("a".to_owned(), address), ("none".to_owned(), address)];
    let checker = Checker::start_with(&config, tx, &down);
    assert_eq!(
        checker.down_backends(),
        [("a".to_owned(), address)],
        "unchecked pools are up"
    );
    let first = next_event(&mut events, Duration::from_secs(1)).await;
    assert_eq!(
        (first.pool.as_str(), first.up, first.reason.as_str()),
        ("none", true, "no health check")
    );
    let second = next_event(&mut events, Duration::from_secs(1)).await;
    assert_eq!(
        (second.pool.as_str(), second.up, second.reason.as_str()),
        ("a", true, "2 consecutive checks passed")
    );
    assert!(server.accepts() >= 2);
    assert!(checker.down_backends().is_empty());
    no_event_for(&mut events, 200 * MS).await;
}

#[tokio::test]
async fn stopping_the_checker_stops_probing() {
    let server = TcpServer::start("127.0.0.1").await;
    let tcp = check(CheckKind::Tcp, server.addr.port(), 20, 10);
    let (checker, _events) = start(
        &config(&[("a", &[server.addr.ip()], tcp)]),
        Options::default(),
    );
    tokio::time::sleep(300 * MS).await;
    assert!(server.accepts() >= 5);
    checker.stop();
    tokio::time::sleep(50 * MS).await;
    let after_stop = server.accepts();
    tokio::time::sleep(300 * MS).await;
    assert_eq!(server.accepts(), after_stop);
}
