//! The real `mlb` daemon in the testbed: started as a process inside the load balancer's
//! namespace on a config file the test writes, with real backend servers.

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use lb_userspace::dataplane::{Capacities, Dataplane};

use crate::{
    netns::Netns,
    testbed::{self, Testbed},
};

pub const VIP: &str = "10.200.0.1";
pub const VIP6: &str = "fd00:200::1";
pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/backend_server.py");

pub struct DaemonBed {
    pub bed: Testbed,
    /// Holds lb_pass on the switch port and lb_decap on the backends (not the daemon's).
    _helpers: Dataplane,
    pub servers: Vec<Option<Child>>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub pin_dir: PathBuf,
    pub daemon: Option<Child>,
    pub log: PathBuf,
}

fn start_server(netns: &Netns, name: &str, fail_file: &std::path::Path) -> Child {
    let mut child = netns
        .command("python3")
        .args([
            SCRIPT, "--name", name, "--tcp", "80", "--http", "8080", "--udp", "53",
        ])
        .args(["--vip", VIP, "--vip", VIP6, "--fail-file"])
        .arg(fail_file)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start backend server");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "backend server {name} did not start");
    child
}

impl DaemonBed {
    /// A testbed with `backends` backends running servers; the daemon is not started.
    pub fn new(backends: usize) -> Self {
        let bed = Testbed::new(backends, &[VIP.parse().unwrap(), VIP6.parse().unwrap()]).unwrap();
        let id = format!(
            "{}-{}",
            std::process::id(),
            bed.lb.netns.name().rsplit('-').next().unwrap()
        );
        let dir = std::env::temp_dir().join(format!("mlb-test-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let servers = (0..backends)
            .map(|i| {
                let name = format!("be{}", i + 1);
                Some(start_server(
                    &bed.backends[i].netns,
                    &name,
                    &dir.join(format!("{name}.fail")),
                ))
            })
            .collect();
        let mut helpers = Dataplane::load(Capacities {
            max_vips: 1,
            max_backends: 2,
            conntrack_entries: 1024,
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
        bed.attach_plumbing(&mut helpers).unwrap();
        Self {
            bed,
            _helpers: helpers,
            servers,
            config: dir.join("lb.yaml"),
            log: dir.join("daemon.log"),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/mlb-test-{id}")),
            dir,
            daemon: None,
        }
    }

    /// A config for this bed: `vips` is the YAML of the vips list, `pools` of the pools.
    pub fn config_yaml(&self, vips: &str, pools: &str) -> String {
        format!(
            "global:\n  hash_seed: 0x5eed\n  conntrack_entries: 65536\n  max_vips: 16\n  \
             max_backends: 64\n  metrics_listen: 127.0.0.1:0\n  pin_path: {}\n\
             interfaces:\n  - name: eth0\n    xdp_mode: native\nvips:\n{vips}\npools:\n{pools}\n",
            self.pin_dir.display()
        )
    }

    /// `name: [backend indexes 1-based]` → a pools YAML block (TCP check on port 80 unless
    /// `check` says otherwise).
    pub fn pool_yaml(&self, name: &str, members: &[(usize, u32)], check: &str) -> String {
        let mut yaml = format!("  {name}:\n    backends:\n");
        for (i, weight) in members {
            yaml += &format!(
                "      - address: {}\n        name: be{i}\n        weight: {weight}\n",
                self.bed.backends[i - 1].addr4
            );
        }
        yaml += check;
        yaml
    }

    pub fn write_config(&self, yaml: &str) {
        std::fs::write(&self.config, yaml).unwrap();
    }

    /// Starts `mlb run` in the load balancer's namespace and waits until it serves status.
    pub fn start_daemon(&mut self) {
        self.start_daemon_under(&[]);
    }

    /// Starts the daemon through `wrapper` (a command that execs its arguments, such as
    /// `setpriv …`), so that the daemon is the wrapper's pid.
    pub fn start_daemon_under(&mut self, wrapper: &[&str]) {
        assert!(self.daemon.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mlb = crate::mlb_bin();
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = self.bed.lb.netns.command_net_only(program);
                command.args(args).arg(mlb);
                command
            }
            None => self.bed.lb.netns.command_net_only(mlb),
        };
        let child = command
            .args(["run", "--config"])
            .arg(&self.config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start mlb");
        self.daemon = Some(child);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            let status = self.mlb(&["status"]);
            if status.status.success() && status.stdout.starts_with(b"daemon: running") {
                return;
            }
            if let Some(status) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
                panic!("mlb exited ({status}) at start:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("mlb did not come up:\n{}", self.log_text());
    }

    /// Sends `signal` to the daemon and waits for it to exit.
    pub fn stop_daemon(&mut self, signal: &str) {
        if let Some(mut child) = self.daemon.take() {
            let _ = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.daemon.as_ref().expect("daemon running").id();
        assert!(
            Command::new("kill")
                .args([signal, &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Runs `mlb ARGS --pin-path <ours>` in the load balancer's namespace.
    pub fn mlb(&self, args: &[&str]) -> Output {
        let mut command = self.bed.lb.netns.command_net_only(crate::mlb_bin());
        command.args(args);
        if args[0] != "check" {
            command.arg("--pin-path").arg(&self.pin_dir);
        }
        command.output().expect("run mlb")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `f` holds (polling), panicking with the daemon log after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "timed out waiting for {what}\n--- daemon log ---\n{}",
            self.log_text()
        );
    }

    pub fn vip(&self, port: u16) -> SocketAddr {
        SocketAddr::new(VIP.parse::<IpAddr>().unwrap(), port)
    }

    /// `lb_decap`'s counters on the backends (one map for all of them), by
    /// `DecapCounter`.
    pub fn decap_counters(&self) -> Vec<u64> {
        self._helpers.decap_counters().unwrap()
    }

    /// Kills backend `i` (1-based)'s server.
    pub fn kill_server(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i - 1].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart_server(&mut self, i: usize) {
        let name = format!("be{i}");
        let fail = self.dir.join(format!("{name}.fail"));
        self.servers[i - 1] = Some(start_server(&self.bed.backends[i - 1].netns, &name, &fail));
    }
}

impl Drop for DaemonBed {
    fn drop(&mut self) {
        self.stop_daemon("-KILL");
        for server in self.servers.iter_mut().flatten() {
            let _ = server.kill();
        }
        // Pins live in the (global) bpffs: remove them, and what the daemon left in the
        // run directory (a killed daemon leaves its control socket).
        testbed::remove_daemon_files(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// --- Health-check and failover helpers -------------------------------------------------

/// A `health_check:` block for [`DaemonBed::pool_yaml`]: `kind` on `port`, durations in
/// milliseconds, jitter in percent; `extra` is appended (an `http:` or `udp:` section).
pub fn check_yaml(
    kind: &str,
    port: u16,
    (interval_ms, timeout_ms): (u64, u64),
    (rise, fall): (u32, u32),
    jitter_percent: u32,
    extra: &str,
) -> String {
    format!(
        "    health_check:\n      kind: {kind}\n      port: {port}\n      interval: {interval_ms}ms\n      \
         timeout: {timeout_ms}ms\n      rise: {rise}\n      fall: {fall}\n      jitter: {jitter_percent}%\n{extra}"
    )
}

/// One attempt of [`short_connection`]: when it started (since the load began), who
/// answered (or the error), how long it took.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub at: Duration,
    pub result: Result<String, String>,
    pub took: Duration,
}

/// A long-lived connection to `addr` and the greeting line of the backend that took it
/// (its name); panics if it cannot connect within 3 s.
pub fn connect(addr: SocketAddr) -> (std::net::TcpStream, String) {
    let timeout = Duration::from_secs(3);
    let stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(timeout)).unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    (stream, line.trim().to_owned())
}

/// A short TCP connection to a backend test server: connect, read its name line, close.
pub fn short_connection(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let stream = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    match line.trim() {
        "" => Err("closed without a greeting".into()),
        name => Ok(name.to_owned()),
    }
}

/// Short connections to `addr`, one every `every`, until `stop` is set or `limit` passes;
/// runs on its own thread inside the client's namespace.
pub struct Load {
    pub started: Instant,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Attempt>>>,
}

impl Load {
    pub fn stop(mut self) -> Vec<Attempt> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.take().unwrap().join().expect("load thread")
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl DaemonBed {
    /// `mlb status` (panics with the daemon log if it fails).
    pub fn status_text(&self) -> String {
        let out = self.mlb(&["status"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "mlb status: {}{}\n--- daemon log ---\n{}",
            text,
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        text
    }

    /// The health `mlb status` shows for backend `name` in `pool`: "up", "DOWN",
    /// "up, drained"; `None` if not listed.
    pub fn backend_health(&self, name: &str, pool: &str) -> Option<String> {
        let status = self.status_text();
        let prefix = format!("backend {name} ");
        let in_pool = format!(" pool {pool} ");
        status
            .lines()
            .filter(|l| l.starts_with(&prefix) && l.contains(&in_pool))
            .find_map(|l| {
                let (_, rest) = l.split_once(": ")?;
                Some(
                    rest.rsplit_once(", ")
                        .map_or(rest, |(health, _packets)| health)
                        .to_owned(),
                )
            })
    }

    /// Waits until backend `name` in `pool` shows `health` ("up" or "DOWN"); returns when.
    pub fn wait_for_health(
        &self,
        name: &str,
        pool: &str,
        health: &str,
        timeout: Duration,
    ) -> Instant {
        self.wait_for(&format!("{name} in {pool} to be {health}"), timeout, || {
            self.backend_health(name, pool).as_deref() == Some(health)
        });
        Instant::now()
    }

    /// Makes backend `i` (1-based)'s HTTP server answer 500 (`true`) or 200 again.
    pub fn fail_http(&self, i: usize, failing: bool) {
        let path = self.dir.join(format!("be{i}.fail"));
        if failing {
            std::fs::write(&path, b"").unwrap();
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }

    /// Sends `signal` (`-STOP`, `-CONT`, ...) to backend `i` (1-based)'s server: a stopped
    /// server still completes TCP handshakes (in the kernel) but never answers.
    pub fn signal_server(&self, i: usize, signal: &str) {
        let pid = self.servers[i - 1].as_ref().expect("server running").id();
        assert!(
            Command::new("kill")
                .args([signal, &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Starts short connections to `addr` from the client, one every `every`, for at most
    /// `limit` (each connect and read bounded by `timeout`).
    pub fn start_load(
        &self,
        addr: SocketAddr,
        every: Duration,
        timeout: Duration,
        limit: Duration,
    ) -> Load {
        let netns = std::fs::File::open(format!("/var/run/netns/{}", self.bed.client.netns.name()))
            .expect("client namespace");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            use std::os::fd::AsRawFd as _;
            // SAFETY: setns on this thread only, which lives only for the load.
            assert_eq!(
                unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let mut attempts = Vec::new();
            let mut next = started;
            while !flag.load(std::sync::atomic::Ordering::SeqCst) && started.elapsed() < limit {
                let at = Instant::now();
                let result = short_connection(addr, timeout);
                attempts.push(Attempt {
                    at: at - started,
                    result,
                    took: at.elapsed(),
                });
                next += every;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                } else {
                    next = Instant::now();
                }
            }
            attempts
        });
        Load {
            started,
            stop,
            thread: Some(thread),
        }
    }
}
