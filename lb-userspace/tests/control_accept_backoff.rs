//! The control socket out of file descriptors: accept fails with EMFILE while clients wait
//! in the backlog. The server must back off (not spin a core) and serve again once
//! descriptors are free. Its own binary: it lowers this process's RLIMIT_NOFILE.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use lb_userspace::control::{self, Limits, Reply};
use tokio::sync::mpsc;

/// User plus system CPU time of this process, from `/proc/self/stat` opened beforehand
/// (no descriptor is left to open it when it matters).
fn cpu(stat: &std::fs::File) -> Duration {
    use std::os::unix::fs::FileExt as _;
    let mut buf = vec![0u8; 4096];
    let n = stat.read_at(&mut buf, 0).unwrap();
    let stat = String::from_utf8_lossy(&buf[..n]).into_owned();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: plain libc call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

#[test]
fn accept_errors_back_off_and_serving_resumes() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let path = std::env::temp_dir().join(format!("mlb-accept-{}.sock", std::process::id()));
    let (tx, mut rx) = mpsc::channel::<(control::Command, tokio::sync::oneshot::Sender<Reply>)>(4);
    let limits = Limits {
        timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    let server = runtime
        .block_on(async { control::serve_with(&path, tx, limits) })
        .unwrap();
    runtime.spawn(async move {
        while let Some((_, reply)) = rx.recv().await {
            let _ = reply.send(Reply::Ok("ok".into()));
        }
    });

    // 40 clients in another process (started before the limit drops, which it inherits),
    // that connect on a word from us and send nothing.
    let script = "import socket,sys\n\
        sys.stdin.readline()\n\
        ss=[socket.socket(socket.AF_UNIX) for _ in range(40)]\n\
        [s.connect(sys.argv[1]) for s in ss]\n\
        print('connected', flush=True)\n\
        sys.stdin.read()\n";
    let mut clients = Command::new("python3")
        .args(["-c", script])
        .arg(&path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stat = std::fs::File::open("/proc/self/stat").unwrap();
    // Room for 5 more descriptors in this process.
    let limit = open_fds() + 5;
    let rlimit = libc::rlimit {
        rlim_cur: limit,
        rlim_max: libc::RLIM_INFINITY,
    };
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointers to rlimit structs.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut old);
        let rlimit = libc::rlimit {
            rlim_max: old.rlim_max,
            ..rlimit
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit), 0);
    }
    clients.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let mut line = String::new();
    BufReader::new(clients.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "connected");
    std::thread::sleep(Duration::from_millis(300));

    let (cpu0, t0) = (cpu(&stat), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let (used, wall) = (cpu(&stat) - cpu0, t0.elapsed());
    eprintln!("{used:?} of CPU in {wall:?} with accept failing");
    assert!(
        used < wall / 10,
        "the accept loop spun: {used:?} of CPU in {wall:?}"
    );

    // The clients go away, descriptors come back: a new request is served.
    drop(clients.stdin.take());
    let _ = clients.wait();
    // SAFETY: valid pointer.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &old) };
    let started = Instant::now();
    let reply = loop {
        let attempt = UnixStream::connect(&path).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"{\"command\":\"status\"}\n")?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            Ok(line)
        });
        match attempt {
            Ok(line) if !line.is_empty() => break line,
            _ if started.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(100))
            }
            other => panic!("not served again: {other:?}"),
        }
    };
    assert!(reply.contains("\"ok\""), "{reply}");
    drop(server);
    let _ = std::fs::remove_file(&path);
}
