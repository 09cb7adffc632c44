//! The real daemon in the testbed: reload under traffic, bad configs, restart without
//! dropping flows. Needs root.

mod support;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use support::daemon::DaemonBed;

const TIMEOUT: Duration = Duration::from_secs(3);

fn connect(addr: SocketAddr) -> (TcpStream, String) {
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    (stream, line.trim().to_owned())
}

/// Sends a line and returns who echoed it; an error means the connection broke.
fn echo(stream: &mut TcpStream, text: &str) -> std::io::Result<String> {
    writeln!(stream, "{text}")?;
    let mut line = String::new();
    BufReader::new(&*stream).read_line(&mut line)?;
    line.trim().split_once(' ').map(|(n, _)| n.to_owned()).ok_or_else(|| std::io::Error::other(format!("reply {line:?}")))
}

const VIPS: &str = "  - name: web\n    address: 10.200.0.1\n    port: 80\n    protocol: tcp\n    pool: web\n";

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
    assert!(status.status.success(), "{text}{}", String::from_utf8_lossy(&status.stderr));
    assert!(text.contains("vip web 10.200.0.1:80/tcp"), "{text}");
    assert!(text.contains("be1: "), "{text}");
}
