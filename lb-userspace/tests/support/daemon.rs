//! The real `mlb` daemon in the testbed: started as a process inside the load balancer's
//! namespace on a config file the test writes, with real backend servers.

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use aya::programs::XdpMode;
use lb_common::consts::prog_names;
use lb_userspace::{
    dataplane::{Capacities, Dataplane},
    netns::Netns,
    testbed::{NIC, Testbed},
};

pub const VIP: &str = "10.200.0.1";
pub const VIP6: &str = "fd00:200::1";
pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/backend_server.py");

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
        .args([SCRIPT, "--name", name, "--tcp", "80", "--http", "8080", "--udp", "53"])
        .args(["--vip", VIP, "--vip", VIP6, "--fail-file"])
        .arg(fail_file)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start backend server");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "backend server {name} did not start");
    child
}

impl DaemonBed {
    /// A testbed with `backends` backends running servers; the daemon is not started.
    pub fn new(backends: usize) -> Self {
        let bed = Testbed::new(backends, &[VIP.parse().unwrap(), VIP6.parse().unwrap()]).unwrap();
        let id = format!("{}-{}", std::process::id(), bed.lb.netns.name().rsplit('-').next().unwrap());
        let dir = std::env::temp_dir().join(format!("mlb-test-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let servers = (0..backends)
            .map(|i| {
                let name = format!("be{}", i + 1);
                Some(start_server(&bed.backends[i].netns, &name, &dir.join(format!("{name}.fail"))))
            })
            .collect();
        let mut helpers = Dataplane::load(Capacities { max_vips: 1, max_backends: 2, conntrack_entries: 1024 })
            .unwrap_or_else(|e| panic!("{e}"));
        let port = bed.switch_port(&bed.lb);
        bed.switch.enter(|| helpers.attach(prog_names::LB_PASS, &port, XdpMode::Driver).unwrap()).unwrap();
        for b in &bed.backends {
            b.netns.enter(|| helpers.attach(prog_names::LB_DECAP, NIC, XdpMode::Driver).unwrap()).unwrap();
        }
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
        assert!(self.daemon.is_none());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = self
            .bed
            .lb
            .netns
            .command_net_only(env!("CARGO_BIN_EXE_mlb"))
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
            let _ = Command::new("kill").args([signal, &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.daemon.as_ref().expect("daemon running").id();
        assert!(Command::new("kill").args([signal, &pid.to_string()]).status().unwrap().success());
    }

    /// Runs `mlb ARGS --pin-path <ours>` in the load balancer's namespace.
    pub fn mlb(&self, args: &[&str]) -> Output {
        let mut command = self.bed.lb.netns.command_net_only(env!("CARGO_BIN_EXE_mlb"));
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
        panic!("timed out waiting for {what}\n--- daemon log ---\n{}", self.log_text());
    }

    pub fn vip(&self, port: u16) -> SocketAddr {
        SocketAddr::new(VIP.parse::<IpAddr>().unwrap(), port)
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
        // Pins live in the (global) bpffs: remove them, and the state the daemon left.
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_file(lb_userspace::state::state_path(&self.pin_dir));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
