//! The control socket against hostile clients, on the real daemon: garbage, a line that
//! never ends, 20 MB without a newline, many clients at once, another user. The daemon
//! keeps answering `mlb status`, its memory stays put, and its health checks keep running
//! (a backend killed meanwhile is taken out). Needs root.

use std::{
    io::{Read as _, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream, process::CommandExt as _},
    path::Path,
    time::{Duration, Instant},
};

use lb_testbed::daemon::{DaemonBed, check_yaml};

const NOBODY: u32 = 65534;

/// Sends `bytes` (as much as the daemon takes) and returns what it answers.
fn exchange(path: &Path, bytes: &[u8]) -> String {
    let mut stream = UnixStream::connect(path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    for chunk in bytes.chunks(64 * 1024) {
        if stream.write_all(chunk).is_err() {
            break; // the daemon stopped reading: what it said is still there
        }
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A Python client running as `uid`: connects, sends a status request, prints the reply
/// or the error.
fn as_user(uid: u32, path: &Path) -> String {
    let script = "import socket,sys\n\
        s=socket.socket(socket.AF_UNIX)\n\
        try:\n  s.connect(sys.argv[1])\n\
        except OSError as e:\n  print('error', e.errno); sys.exit()\n\
        try:\n  s.sendall(b'{\"command\":\"status\"}\\n')\n\
        except OSError:\n  pass\n\
        print(s.recv(65536).decode())\n";
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(path)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn control_socket_withstands_hostile_clients_while_the_daemon_serves() {
    let mut bed = DaemonBed::new(2);
    let vips = "  - name: web\n    address: 10.200.0.1\n    port: 80\n    protocol: tcp\n    \
                pool: web\n";
    let check = check_yaml("tcp", 80, (200, 100), (2, 2), 0, "");
    let pools = bed.pool_yaml("web", &[(1, 1), (2, 1)], &check);
    bed.write_config(&bed.config_yaml(vips, &pools));
    bed.start_daemon();
    bed.wait_for_health("be2", "web", "up", Duration::from_secs(10));
    let sock = lb_userspace::state::socket_path(&bed.pin_dir);
    let pid = bed.daemon.as_ref().unwrap().id();

    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");

    // Garbage, and a valid JSON value that is not a command: refused with an answer.
    let reply = exchange(&sock, b"\x00\xff\xfe not json at all\n");
    assert!(
        reply.contains("bad request"),
        "{reply:?}\n{}",
        bed.log_text()
    );
    let reply = exchange(&sock, b"{\"command\":\"format_disk\"}\n");
    assert!(reply.contains("bad request"), "{reply}");

    // 20 MB without a newline: refused after the limit, memory stays put.
    let before = rss_kib(pid);
    let reply = exchange(&sock, &vec![b'x'; 20 << 20]);
    let after = rss_kib(pid);
    assert!(
        after < before + 4096,
        "RSS grew from {before} to {after} KiB"
    );
    assert!(reply.is_empty() || reply.contains("longer than"), "{reply}");

    // 100 clients that never finish their line, held open, and a backend killed: status
    // still answers (after the stalled clients are timed out at the latest) and the health
    // checks take the backend out meanwhile.
    let stalled: Vec<UnixStream> = (0..100)
        .map(|_| {
            let mut s = UnixStream::connect(&sock).unwrap();
            // Past the connection limit the daemon may have answered and closed already.
            let _ = s.write_all(b"{\"command\":");
            s
        })
        .collect();
    bed.kill_server(2);
    // From the log: `mlb status` may well be refused "busy" while the clients stall.
    bed.wait_for(
        "be2 taken out while the clients stall",
        Duration::from_secs(10),
        || bed.log_text().contains("name=be2 state=down"),
    );
    let started = Instant::now();
    bed.wait_for(
        "status while clients stall",
        Duration::from_secs(10),
        || bed.mlb(&["status"]).stdout.starts_with(b"daemon: running"),
    );
    eprintln!(
        "status answered {:?} after the stalled clients",
        started.elapsed()
    );
    for mut s in stalled {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        assert!(
            reply.contains("no complete line") || reply.contains("busy"),
            "a stalled client got {reply:?}"
        );
    }

    // 200 clients at once, each asking for the status: every one gets an answer.
    let answers: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..200)
            .map(|_| scope.spawn(|| exchange(&sock, b"{\"command\":\"status\"}\n")))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let served = answers
        .iter()
        .filter(|a| a.contains("\"reply\":\"status\""))
        .count();
    let busy = answers.iter().filter(|a| a.contains("busy")).count();
    assert_eq!(served + busy, 200, "{answers:?}");
    assert!(served >= 32, "only {served} of 200 served");

    // Another user: the file mode keeps it out; with the mode opened up, the peer check.
    let reply = as_user(NOBODY, &sock);
    assert!(
        reply.starts_with("error 13"),
        "uid {NOBODY} through mode 0600: {reply}"
    );
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let reply = as_user(NOBODY, &sock);
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(
        reply.contains("permission denied") && !reply.contains("\"status\""),
        "uid {NOBODY} past the mode: {reply}"
    );

    // A group the config names (nogroup, nobody's): its members get in through a socket
    // of mode 0660 (takes a restart: the socket is made at start).
    let yaml = bed.config_yaml(vips, &pools).replacen(
        "global:\n",
        "global:\n  control_group: nogroup\n",
        1,
    );
    bed.write_config(&yaml);
    bed.stop_daemon("-TERM");
    bed.start_daemon();
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), NOBODY);
    let reply = as_user(NOBODY, &sock);
    assert!(
        reply.contains("\"reply\":\"status\""),
        "a member of control_group: {reply}"
    );

    // Still serving, still checking: the backend comes back.
    bed.restart_server(2);
    bed.wait_for_health("be2", "web", "up", Duration::from_secs(10));
    assert!(bed.mlb(&["status"]).status.success());
}
