//! Health checks in the real daemon, with real backends and a real client in network
//! namespaces: a killed backend is taken out under load and comes back, an HTTP 500 fails
//! an http check but not a tcp one, a hanging backend is taken out by timeout, a flapping
//! backend is held down, and a Vip with no usable backend drops or passes. Needs root.
//!
//! Timing-sensitive: the tests take turns (one testbed at a time).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use lb_testbed::daemon::{Attempt, DaemonBed, check_yaml, short_connection};

const MS: Duration = Duration::from_millis(1);
const WAIT: Duration = Duration::from_secs(5);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn vip_yaml(name: &str, port: u16, pool: &str, when_no_backend: &str) -> String {
    format!(
        "  - name: {name}\n    address: 10.200.0.1\n    port: {port}\n    protocol: tcp\n    \
         pool: {pool}\n    when_no_backend: {when_no_backend}\n"
    )
}

/// Names answering from the client, `n` short connections.
fn answers(bed: &DaemonBed, addr: SocketAddr, n: usize) -> Vec<Result<String, String>> {
    bed.bed
        .client
        .netns
        .enter(|| (0..n).map(|_| short_connection(addr, 500 * MS)).collect())
        .unwrap()
}

/// An HTTP GET from the client: (status, body).
fn http_get(bed: &DaemonBed, addr: SocketAddr) -> (u16, String) {
    bed.bed
        .client
        .netns
        .enter(|| {
            let mut stream = TcpStream::connect_timeout(&addr, WAIT).unwrap();
            stream.set_read_timeout(Some(WAIT)).unwrap();
            write!(
                stream,
                "GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut reply = String::new();
            stream.read_to_string(&mut reply).unwrap();
            let status = reply.split(' ').nth(1).unwrap().parse().unwrap();
            (
                status,
                reply.rsplit("\r\n\r\n").next().unwrap().trim().to_owned(),
            )
        })
        .unwrap()
}

fn failures(attempts: &[Attempt]) -> Vec<&Attempt> {
    attempts.iter().filter(|a| a.result.is_err()).collect()
}

/// Daemon log lines of health transitions of `address`.
fn transitions(bed: &DaemonBed, address: &str) -> Vec<String> {
    bed.log_text()
        .lines()
        .filter(|l| {
            l.contains("health check: backend") && l.contains(&format!("backend={address} "))
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn killed_backend_is_taken_out_within_fall_checks_and_returns_after_rise_checks() {
    let _serial = serial();
    let mut bed = DaemonBed::new(3);
    let (interval, fall, jitter) = (100, 3, 10);
    // A TCP check of the HTTP port (the line-echo port's server prints a traceback for
    // every connection closed with its greeting unread).
    let check = check_yaml("tcp", 8080, (interval, 50), (2, fall), jitter, "");
    let pools = bed.pool_yaml("web", &[(1, 1), (2, 1), (3, 1)], &check);
    bed.write_config(&bed.config_yaml(&vip_yaml("web", 80, "web", "drop"), &pools));
    bed.start_daemon();
    let names = answers(&bed, bed.vip(80), 60);
    assert!(
        names.iter().any(|n| n.as_deref() == Ok("be1")),
        "be1 serves: {names:?}"
    );

    // One short connection every 5 ms (up to 200/s), bounded to 20 s.
    let load = bed.start_load(bed.vip(80), 5 * MS, 300 * MS, Duration::from_secs(20));
    let origin = load.started;
    std::thread::sleep(500 * MS);
    let killed = Instant::now();
    bed.kill_server(1);
    let seen_down = bed.wait_for_health("be1", "web", "DOWN", WAIT);
    std::thread::sleep(700 * MS);
    let restarted = Instant::now();
    bed.restart_server(1);
    let seen_up = bed.wait_for_health("be1", "web", "up", WAIT);
    std::thread::sleep(1000 * MS);
    let attempts = load.stop();

    let (kill_at, restart_at) = (killed - origin, restarted - origin);
    // Detection: `fall` failed checks, each at most interval × (1 + jitter) apart (the
    // first within one interval of the kill), plus scheduling slack.
    let detection = Duration::from_millis(fall as u64 * interval * (100 + jitter as u64) / 100);
    let bound = kill_at + detection + 250 * MS;
    let failed = failures(&attempts);
    let last_failure = failed.last().map(|a| a.at);
    let be1_back = attempts
        .iter()
        .find(|a| a.at > restart_at && a.result.as_deref() == Ok("be1"));
    println!(
        "{} connections, {} failed after the kill (last {:?} after it; fall {fall} × interval \
         {interval}ms = {}ms); status showed DOWN after {:?}; be1 up again {:?} after restart, \
         first flow {:?} after restart",
        attempts.len(),
        failed.len(),
        last_failure.map(|t| t.saturating_sub(kill_at)),
        fall as u64 * interval,
        seen_down - killed,
        seen_up - restarted,
        be1_back.map(|a| a.at - restart_at),
    );
    for a in &failed {
        assert!(
            a.at + 300 * MS >= kill_at && a.at <= bound,
            "failed connection outside the detection window ({kill_at:?}..{bound:?}): {a:?}"
        );
    }
    assert!(
        !failed.is_empty(),
        "connections to the killed backend failed until detection"
    );
    assert!(
        attempts
            .iter()
            .filter(|a| a.at > bound && a.at < restart_at)
            .all(|a| a.result.is_ok()),
        "after detection every connection succeeds"
    );
    assert!(
        attempts
            .iter()
            .filter(|a| a.at > bound && a.at < restart_at)
            .count()
            > 50
    );
    assert!(
        be1_back.is_some(),
        "be1 receives flows again after it came back"
    );
    let log = transitions(&bed, "10.100.0.11");
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(
        log[0].contains("state=down") && log[0].contains("connection refused"),
        "{log:?}"
    );
    assert!(
        log[1].contains("state=up") && log[1].contains("2 consecutive checks passed"),
        "{log:?}"
    );
    for other in ["10.100.0.12", "10.100.0.13"] {
        assert_eq!(transitions(&bed, other), Vec::<String>::new());
    }
}

#[test]
fn http_500_fails_an_http_check_but_passes_a_tcp_check_of_the_same_port() {
    let _serial = serial();
    let bed = &mut DaemonBed::new(2);
    let http = check_yaml(
        "http",
        8080,
        (100, 50),
        (2, 2),
        10,
        "      http:\n        path: /\n        expect_status: 200-399\n",
    );
    let tcp = check_yaml("tcp", 8080, (100, 50), (2, 2), 10, "");
    let pools = bed.pool_yaml("http", &[(1, 1), (2, 1)], &http)
        + &bed.pool_yaml("tcp", &[(1, 1), (2, 1)], &tcp);
    let vips = vip_yaml("web", 80, "http", "drop") + &vip_yaml("alt", 8080, "tcp", "drop");
    bed.write_config(&bed.config_yaml(&vips, &pools));
    bed.start_daemon();
    bed.fail_http(1, true);
    bed.wait_for_health("be1", "http", "DOWN", WAIT);
    std::thread::sleep(500 * MS);
    assert_eq!(bed.backend_health("be1", "tcp").as_deref(), Some("up"));
    assert_eq!(bed.backend_health("be2", "http").as_deref(), Some("up"));
    let log = transitions(bed, "10.100.0.11");
    assert_eq!(log.len(), 1, "{log:?}");
    assert!(
        log[0].contains("pool=http")
            && log[0].contains("state=down")
            && log[0].contains("reason=HTTP 500"),
        "{log:?}"
    );

    // The http-checked Vip avoids be1; the tcp-checked one still reaches it (its 500s).
    let web = answers(bed, bed.vip(80), 40);
    assert!(web.iter().all(|n| n.as_deref() == Ok("be2")), "{web:?}");
    let alt: Vec<(u16, String)> = (0..40).map(|_| http_get(bed, bed.vip(8080))).collect();
    assert!(alt.contains(&(500, "be1".into())), "{alt:?}");
    assert!(alt.contains(&(200, "be2".into())), "{alt:?}");

    bed.fail_http(1, false);
    bed.wait_for_health("be1", "http", "up", WAIT);
    let web = answers(bed, bed.vip(80), 60);
    assert!(web.iter().any(|n| n.as_deref() == Ok("be1")), "{web:?}");
}

#[test]
fn hanging_backend_is_taken_out_by_timeout_without_delaying_the_others() {
    let _serial = serial();
    let mut bed = DaemonBed::new(3);
    let (interval, timeout, fall) = (100, 60, 2);
    let check = check_yaml("http", 8080, (interval, timeout), (2, fall), 10, "");
    let pools = bed.pool_yaml("web", &[(1, 1), (2, 1), (3, 1)], &check);
    bed.write_config(&bed.config_yaml(&vip_yaml("web", 80, "web", "drop"), &pools));
    bed.start_daemon();
    std::thread::sleep(300 * MS);
    // be1 hangs (its kernel still accepts connections, the server never answers) and be2
    // dies at the same moment: be2's detection must not wait for be1's timeouts.
    let broken = Instant::now();
    bed.signal_server(1, "-STOP");
    bed.kill_server(2);
    let be2_down = bed.wait_for_health("be2", "web", "DOWN", WAIT) - broken;
    let be1_down = bed.wait_for_health("be1", "web", "DOWN", WAIT) - broken;
    println!("be1 (hanging) seen down after {be1_down:?}, be2 (killed) after {be2_down:?}");
    let bound = Duration::from_millis(u64::from(fall) * interval * 110 / 100 + timeout) + 400 * MS;
    assert!(
        be2_down < bound && be1_down < bound,
        "{be1_down:?} {be2_down:?} (bound {bound:?})"
    );
    let be1 = transitions(&bed, "10.100.0.11");
    assert!(
        be1.len() == 1 && be1[0].contains(&format!("reason=timeout after {timeout}ms")),
        "{be1:?}"
    );
    let be2 = transitions(&bed, "10.100.0.12");
    assert!(
        be2.len() == 1 && be2[0].contains("reason=connection refused"),
        "{be2:?}"
    );
    let names = answers(&bed, bed.vip(80), 30);
    assert!(names.iter().all(|n| n.as_deref() == Ok("be3")), "{names:?}");
    assert_eq!(transitions(&bed, "10.100.0.13"), Vec::<String>::new());

    bed.signal_server(1, "-CONT");
    bed.wait_for_health("be1", "web", "up", WAIT);
}

#[test]
fn flapping_backend_is_held_down_while_its_checks_pass() {
    let _serial = serial();
    let mut bed = DaemonBed::new(2);
    let check = check_yaml("http", 8080, (100, 50), (1, 1), 0, "");
    let pools = bed.pool_yaml("web", &[(1, 1), (2, 1)], &check);
    bed.write_config(&bed.config_yaml(&vip_yaml("web", 80, "web", "drop"), &pools));
    bed.start_daemon();
    // Four changes within the 30 s window are allowed; the fifth starts a 10 s hold.
    for (failing, health) in [
        (true, "DOWN"),
        (false, "up"),
        (true, "DOWN"),
        (false, "up"),
        (true, "DOWN"),
    ] {
        bed.fail_http(1, failing);
        bed.wait_for_health("be1", "web", health, WAIT);
    }
    bed.fail_http(1, false);
    let healthy = Instant::now();
    // With rise 1 and a 100 ms interval it would be up within ~0.2 s: it stays down.
    while healthy.elapsed() < 2 * Duration::from_secs(1) {
        assert_eq!(
            bed.backend_health("be1", "web").as_deref(),
            Some("DOWN"),
            "{}",
            bed.log_text()
        );
        std::thread::sleep(200 * MS);
    }
    let names = answers(&bed, bed.vip(80), 30);
    assert!(names.iter().all(|n| n.as_deref() == Ok("be2")), "{names:?}");
    let log = bed.log_text();
    let damped: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("flapping backend: held down"))
        .collect();
    assert_eq!(damped.len(), 1, "{log}");
    assert!(
        damped[0].contains("backend=10.100.0.11") && damped[0].contains("hold=10s"),
        "{}",
        damped[0]
    );
    assert_eq!(transitions(&bed, "10.100.0.11").len(), 5);
}

#[test]
fn vip_without_usable_backend_drops_or_passes_to_the_local_stack() {
    let _serial = serial();
    let mut bed = DaemonBed::new(2);
    let check = check_yaml("tcp", 8080, (100, 50), (2, 2), 10, "");
    let pools = bed.pool_yaml("web", &[(1, 1), (2, 1)], &check);
    let vips = vip_yaml("dropping", 80, "web", "drop") + &vip_yaml("passing", 81, "web", "pass");
    bed.write_config(&bed.config_yaml(&vips, &pools));
    // The load balancer's own stack owns the Vip address too, so passed packets have
    // somewhere to go.
    bed.bed
        .lb
        .netns
        .ip(&["addr", "add", "10.200.0.1/32", "dev", "lo"])
        .unwrap();
    bed.start_daemon();
    bed.kill_server(1);
    bed.kill_server(2);
    bed.wait_for_health("be1", "web", "DOWN", WAIT);
    bed.wait_for_health("be2", "web", "DOWN", WAIT);
    let status = bed.status_text();
    assert_eq!(status.matches("NO USABLE BACKEND").count(), 2, "{status}");
    assert!(bed.log_text().contains("vip has no usable backend"));

    // drop: the SYN goes nowhere (a backend would have refused it: its server is dead).
    let started = Instant::now();
    let dropped = answers(&bed, bed.vip(80), 1).remove(0);
    let waited = started.elapsed();
    assert!(
        dropped.is_err() && waited >= 450 * MS,
        "{dropped:?} after {waited:?}"
    );
    // pass: the load balancer's stack answers: refused while nothing listens there...
    let started = Instant::now();
    let refused = answers(&bed, bed.vip(81), 1).remove(0);
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("refused")),
        "{refused:?}"
    );
    assert!(started.elapsed() < 200 * MS);
    // ... and served by a listener on the load balancer itself.
    let listener = bed
        .bed
        .lb
        .netns
        .enter(|| TcpListener::bind("10.200.0.1:81"))
        .unwrap()
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.write_all(b"lb\n").unwrap();
    });
    assert_eq!(answers(&bed, bed.vip(81), 1), [Ok("lb".to_owned())]);
    server.join().unwrap();

    // A backend back: both Vips serve again.
    bed.restart_server(2);
    bed.wait_for_health("be2", "web", "up", WAIT);
    assert_eq!(bed.status_text().matches("NO USABLE BACKEND").count(), 0);
    assert_eq!(answers(&bed, bed.vip(80), 3), vec![Ok("be2".to_owned()); 3]);
}
