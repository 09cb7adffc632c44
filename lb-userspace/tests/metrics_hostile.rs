//! The metrics endpoint against hostile clients, on loopback: methods other than GET/HEAD
//! get 405; a slowloris (request heads trickled byte by byte, many connections) does not
//! starve scrapes; connections are bounded per peer and overall. No privileges needed.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_userspace::metrics::{MAX_CONNECTIONS_PER_PEER, Metrics, Server};

const TIMEOUT: Duration = Duration::from_secs(5);

fn start() -> (tokio::runtime::Runtime, Server) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let metrics = Arc::new(Metrics::new("/nonexistent/mlb-pins"));
    let server = runtime
        .block_on(Server::start("127.0.0.1:0".parse().unwrap(), metrics))
        .expect("bind");
    (runtime, server)
}

/// One request from `from` (a loopback address); the status line and headers back.
fn request(addr: SocketAddr, from: &str, head: &str) -> String {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&format!("{from}:0").parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.connect_timeout(&addr.into(), TIMEOUT).unwrap();
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply
}

fn connect_from(addr: SocketAddr, from: &str) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&format!("{from}:0").parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.connect_timeout(&addr.into(), TIMEOUT).unwrap();
    socket.into()
}

#[test]
fn methods_other_than_get_and_head_get_405() {
    let (_runtime, server) = start();
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "BREW"] {
        let reply = request(
            server.addr(),
            "127.0.0.1",
            &format!(
                "{method} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
        );
        assert!(reply.starts_with("HTTP/1.1 405"), "{method}: {reply}");
        assert!(
            reply.to_ascii_lowercase().contains("allow: get, head"),
            "{method}: {reply}"
        );
    }
    let reply = request(
        server.addr(),
        "127.0.0.1",
        "HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "HEAD: {reply}");
    let reply = request(
        server.addr(),
        "127.0.0.1",
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "GET: {reply}");
}

#[test]
fn a_slowloris_does_not_starve_scrapes() {
    let (_runtime, server) = start();
    let addr = server.addr();
    let stop = AtomicBool::new(false);
    let head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nUser-Agent: slow\r\n";
    let (worst, scrapes, refused, mut times) = std::thread::scope(|scope| {
        // 3 attackers x 200 connections, each trickling one header byte every 50 ms.
        let attackers: Vec<_> = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
            .into_iter()
            .map(|from| {
                let stop = &stop;
                scope.spawn(move || {
                    let mut conns: Vec<TcpStream> =
                        (0..200).map(|_| connect_from(addr, from)).collect();
                    let mut refused = 0;
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        conns.retain_mut(|c| {
                            let alive = c.write_all(&head[i % head.len()..][..1]).is_ok();
                            refused += usize::from(!alive);
                            alive
                        });
                        i += 1;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    refused
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let (mut worst, mut scrapes, mut times) = (Duration::ZERO, 0, vec![]);
        while started.elapsed() < Duration::from_secs(3) {
            let t = Instant::now();
            let reply = request(
                addr,
                "127.0.0.1",
                "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            );
            assert!(
                reply.starts_with("HTTP/1.1 200"),
                "scrape under slowloris: {reply:?}"
            );
            worst = worst.max(t.elapsed());
            times.push(t.elapsed().as_millis());
            scrapes += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Relaxed);
        let refused: usize = attackers.into_iter().map(|a| a.join().unwrap()).sum();
        (worst, scrapes, refused, times)
    });
    eprintln!(
        "{scrapes} scrapes under slowloris, slowest {worst:?}; {refused} attacker connections closed"
    );
    // Every scrape answered; the worst may include one SYN retransmit (1 s) when the
    // attackers' connection bursts overflow the accept queue on a loaded machine.
    times.sort();
    let median = times[times.len() / 2];
    assert!(median < 50, "median scrape {median} ms: {times:?}");
    assert!(worst < Duration::from_secs(3), "a scrape took {worst:?}");
    // Each attacker got at most its per-peer share: the rest were closed at once.
    assert!(
        refused >= 3 * (200 - MAX_CONNECTIONS_PER_PEER),
        "only {refused} of 600 attacker connections were refused"
    );
}
