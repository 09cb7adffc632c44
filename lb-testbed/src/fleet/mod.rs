//! A fleet in network namespaces, for the fleet tests, `bench fleet` and `demo --fleet`:
//! a client behind a router that spreads a Vip over several load balancers by ECMP, each
//! load balancer running the real `mlb` daemon and a real BIRD that announces what mlb
//! puts in its announce table, and backends running real TCP servers.
//!
//! ```text
//!  client ── router ──┐ (bridge br0 in namespace "sw", 10.100.0.0/24)
//!  10.99.0.2  BIRD    ├── lb1..N  (.21..)  mlb + BIRD, XDP on eth0
//!            ECMP L4  └── be1..M  (.11..)  Vip on lo, lb_decap on eth0, replies via router
//! ```
//! The router learns the Vip over BGP from every load balancer that announces it and
//! installs one route with a next hop per load balancer (`merge paths`), hashing flows on
//! the 5-tuple (`fib_multipath_hash_policy=1`). The BIRD configs are the ones shipped in
//! `deploy/bird/`, with only their addresses filled in.

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::programs::XdpMode;
use lb_common::consts::prog_names;

pub mod scenarios;

use lb_userspace::dataplane::{Capacities, Dataplane};

use crate::{
    BACKEND_SERVER,
    netns::Netns,
    testbed::{self, Host, NIC, SEGMENT_MTU},
};

pub const VIP: &str = "10.200.0.1";
pub const VIP_PORT: u16 = 80;
/// The announce table every load balancer uses.
pub const TABLE: u32 = 200;
pub const ROUTER_AS: u32 = 65000;
pub const LB_AS: u32 = 65100;
/// The BGP hold time of the shipped configs: a vanished load balancer is withdrawn after it.
pub const HOLD_TIME: Duration = Duration::from_secs(3);
const ROUTER_ADDR: &str = "10.100.0.1";
const CLIENT_ADDR: &str = "10.99.0.2";
const CLIENT_GATEWAY: &str = "10.99.0.1";
const BIRD_LB: &str = include_str!("../../../deploy/bird/lb.conf");
const BIRD_ROUTER: &str = include_str!("../../../deploy/bird/router.conf");

/// A load balancer of the fleet.
pub struct LbBox {
    pub host: Host,
    pub pin_dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub daemon: Option<Child>,
    pub bird: Option<Child>,
    bird_conf: PathBuf,
    bird_ctl: PathBuf,
}

pub struct Fleet {
    pub switch: Netns,
    pub router: Host,
    pub client: Netns,
    pub lbs: Vec<LbBox>,
    pub backends: Vec<Host>,
    pub servers: Vec<Option<Child>>,
    router_bird: Option<Child>,
    router_ctl: PathBuf,
    /// Holds `lb_pass` on the switch ports facing the load balancers and `lb_decap` on
    /// the backends.
    _plumbing: Dataplane,
    pub dir: PathBuf,
    mlb: PathBuf,
    script: PathBuf,
}

fn sysctl(netns: &Netns, settings: &[(&str, &str)]) -> io::Result<()> {
    for (key, value) in settings {
        netns.exec("sysctl", &["-qw", &format!("{key}={value}")])?;
    }
    Ok(())
}

fn fill(template: &str, values: &[(&str, String)]) -> String {
    values
        .iter()
        .fold(template.to_owned(), |text, (key, value)| {
            text.replace(&format!("@{key}@"), value)
        })
}

impl Fleet {
    /// Builds the topology with `boxes` load balancers and `backends` backends (servers
    /// started, BIRD running everywhere, no mlb yet). `mlb` is the binary to run.
    pub fn new(mlb: &Path, boxes: usize, backends: usize) -> io::Result<Self> {
        let switch = Netns::new("mlb-fsw")?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "mtu", SEGMENT_MTU, "up"])?;
        let router = testbed::host(&switch, "frt", 1, SEGMENT_MTU)?;
        let client = Netns::new("mlb-fcl")?;
        router.netns.ip(&[
            "link",
            "add",
            "c0",
            "type",
            "veth",
            "peer",
            "name",
            NIC,
            "netns",
            client.name(),
        ])?;
        router
            .netns
            .ip(&["addr", "add", &format!("{CLIENT_GATEWAY}/24"), "dev", "c0"])?;
        router.netns.ip(&["link", "set", "c0", "up"])?;
        client.ip(&["addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", NIC])?;
        client.ip(&["link", "set", NIC, "up"])?;
        client.ip(&["route", "add", "default", "via", CLIENT_GATEWAY])?;
        // XDP-touched packets lose veth checksum offload state: full checksums from here.
        client.exec("ethtool", &["-K", NIC, "tx", "off"])?;
        router.netns.exec("ethtool", &["-K", "c0", "tx", "off"])?;
        router.netns.exec("ethtool", &["-K", NIC, "tx", "off"])?;
        sysctl(
            &router.netns,
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.fib_multipath_hash_policy", "1"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.eth0.rp_filter", "0"),
            ],
        )?;

        let id = format!(
            "{}-{}",
            std::process::id(),
            switch.name().rsplit('-').next().unwrap_or("0")
        );
        let dir = std::env::temp_dir().join(format!("mlb-fleet-{id}"));
        std::fs::create_dir_all(&dir)?;
        let script = dir.join("backend_server.py");
        std::fs::write(&script, BACKEND_SERVER)?;

        let backends = (0..backends)
            .map(|i| testbed::host(&switch, &format!("fbe{}", i + 1), 11 + i as u8, SEGMENT_MTU))
            .collect::<io::Result<Vec<_>>>()?;
        for b in &backends {
            b.netns
                .ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            b.netns
                .ip(&["route", "add", "default", "via", ROUTER_ADDR])?;
            sysctl(
                &b.netns,
                &[
                    ("net.ipv4.conf.all.arp_ignore", "1"),
                    ("net.ipv4.conf.all.arp_announce", "2"),
                    ("net.ipv4.conf.all.rp_filter", "0"),
                    ("net.ipv4.conf.eth0.rp_filter", "0"),
                    ("net.ipv4.conf.lo.rp_filter", "0"),
                ],
            )?;
        }
        let lbs = (0..boxes)
            .map(|i| {
                let host =
                    testbed::host(&switch, &format!("flb{}", i + 1), 21 + i as u8, SEGMENT_MTU)?;
                let name = format!("lb{}", i + 1);
                Ok(LbBox {
                    pin_dir: PathBuf::from(format!("/sys/fs/bpf/mlb-fleet-{id}-{name}")),
                    config: dir.join(format!("{name}.yaml")),
                    log: dir.join(format!("{name}.log")),
                    bird_conf: dir.join(format!("bird-{name}.conf")),
                    bird_ctl: dir.join(format!("bird-{name}.ctl")),
                    host,
                    daemon: None,
                    bird: None,
                })
            })
            .collect::<io::Result<Vec<_>>>()?;

        let mut plumbing = Dataplane::load(Capacities {
            max_vips: 1,
            max_backends: 2,
            conntrack_entries: 1024,
            ..Default::default()
        })
        .map_err(io::Error::other)?;
        let attach = |dataplane: &mut Dataplane, netns: &Netns, program, dev: &str| {
            netns
                .enter(|| dataplane.attach(program, dev, XdpMode::Driver).map(|_| ()))?
                .map_err(io::Error::other)
        };
        for lb in &lbs {
            attach(
                &mut plumbing,
                &switch,
                prog_names::LB_PASS,
                &format!("p-{}", lb.host.name),
            )?;
        }
        for b in &backends {
            testbed::backend_decap(&mut plumbing, &switch, b)?;
        }

        let mut fleet = Self {
            router_ctl: dir.join("bird-router.ctl"),
            switch,
            router,
            client,
            lbs,
            servers: Vec::new(),
            backends,
            router_bird: None,
            _plumbing: plumbing,
            dir,
            mlb: mlb.to_owned(),
            script,
        };
        fleet.servers = (0..fleet.backends.len())
            .map(|i| fleet.start_server(i).map(Some))
            .collect::<io::Result<Vec<_>>>()?;
        fleet.start_router_bird()?;
        for i in 0..fleet.lbs.len() {
            fleet.start_bird(i)?;
        }
        Ok(fleet)
    }

    fn start_server(&self, i: usize) -> io::Result<Child> {
        let name = format!("be{}", i + 1);
        let mut child = self.backends[i]
            .netns
            .command("python3")
            .arg(&self.script)
            .args(["--name", &name, "--tcp", "80", "--vip", VIP])
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("piped")).read_line(&mut line)?;
        if line.trim() != "ready" {
            return Err(io::Error::other(format!(
                "backend server {name} did not start"
            )));
        }
        Ok(child)
    }

    fn start_router_bird(&mut self) -> io::Result<()> {
        let conf = self.dir.join("bird-router.conf");
        std::fs::write(
            &conf,
            fill(
                BIRD_ROUTER,
                &[
                    ("ROUTER_ID", ROUTER_ADDR.into()),
                    ("LOCAL_AS", ROUTER_AS.to_string()),
                    ("LB_RANGE", format!("{}.0/24", testbed::SUBNET4)),
                    ("LB_AS", LB_AS.to_string()),
                ],
            ),
        )?;
        self.router_bird = Some(bird(&self.router.netns, &conf, &self.router_ctl)?);
        Ok(())
    }

    /// Starts BIRD on load balancer `i` (0-based) with the shipped config.
    pub fn start_bird(&mut self, i: usize) -> io::Result<()> {
        let lb = &self.lbs[i];
        std::fs::write(
            &lb.bird_conf,
            fill(
                BIRD_LB,
                &[
                    ("ROUTER_ID", lb.host.addr4.to_string()),
                    ("LOCAL_AS", LB_AS.to_string()),
                    ("ROUTER_ADDR", ROUTER_ADDR.into()),
                    ("ROUTER_AS", ROUTER_AS.to_string()),
                    ("TABLE", TABLE.to_string()),
                ],
            ),
        )?;
        let child = bird(&lb.host.netns, &lb.bird_conf, &lb.bird_ctl)?;
        self.lbs[i].bird = Some(child);
        Ok(())
    }

    /// Kills BIRD on load balancer `i` with `signal` (`-TERM` withdraws at once, `-KILL`
    /// leaves the router to notice after the hold time).
    pub fn stop_bird(&mut self, i: usize, signal: &str) {
        if let Some(mut child) = self.lbs[i].bird.take() {
            kill(&mut child, signal);
        }
    }

    /// The config of every load balancer: the same YAML but for its pin path. `pools` is
    /// the YAML of the pools section; the one Vip uses pool `web`.
    pub fn config_yaml(&self, i: usize, pools: &str) -> String {
        format!(
            "global:\n  hash_seed: 0x5eed\n  conntrack_entries: 65536\n  max_vips: 4\n  \
             max_backends: 16\n  metrics_listen: 127.0.0.1:0\n  pin_path: {}\n\
             interfaces:\n  - name: {NIC}\n    xdp_mode: native\nannounce:\n  table: {TABLE}\n\
             vips:\n  - name: web\n    address: {VIP}\n    port: {VIP_PORT}\n    protocol: tcp\n    \
             pool: web\npools:\n{pools}",
            self.lbs[i].pin_dir.display()
        )
    }

    /// A `web` pool of the given backends (1-based), TCP-checked on port 80 every 200 ms.
    pub fn pool_yaml(&self, members: &[usize]) -> String {
        let mut yaml = "  web:\n    backends:\n".to_owned();
        for i in members {
            yaml += &format!(
                "      - address: {}\n        name: be{i}\n",
                self.backends[i - 1].addr4
            );
        }
        yaml += "    health_check:\n      kind: tcp\n      port: 80\n      interval: 200ms\n      \
                 timeout: 100ms\n      rise: 2\n      fall: 2\n";
        yaml
    }

    /// Writes load balancer `i`'s config with `pools`.
    pub fn write_config(&self, i: usize, pools: &str) -> io::Result<()> {
        std::fs::write(&self.lbs[i].config, self.config_yaml(i, pools))
    }

    /// Like [`Fleet::write_config`], with `global` (one `key: value` line) added to the
    /// global section.
    pub fn write_config_with(&self, i: usize, pools: &str, global: &str) -> io::Result<()> {
        let yaml =
            self.config_yaml(i, pools)
                .replacen("global:\n", &format!("global:\n  {global}\n"), 1);
        std::fs::write(&self.lbs[i].config, yaml)
    }

    /// Starts `mlb run` on load balancer `i` and waits until it serves its status.
    pub fn start_daemon(&mut self, i: usize) -> io::Result<()> {
        let lb = &self.lbs[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&lb.log)?;
        let child = lb
            .host
            .netns
            .command_net_only(&self.mlb)
            .args(["run", "--config"])
            .arg(&lb.config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.lbs[i].daemon = Some(child);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if self
                .status(i)
                .is_ok_and(|s| s.starts_with("daemon: running"))
            {
                return Ok(());
            }
            if let Some(status) = self.lbs[i].daemon.as_mut().and_then(|c| c.try_wait().ok()?) {
                return Err(io::Error::other(format!(
                    "mlb on lb{} exited ({status}):\n{}",
                    i + 1,
                    self.log_text(i)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(io::Error::other(format!(
            "mlb on lb{} did not come up:\n{}",
            i + 1,
            self.log_text(i)
        )))
    }

    /// Stops load balancer `i`'s daemon with `signal` (`-TERM`: leaves program and routes).
    pub fn stop_daemon(&mut self, i: usize, signal: &str) {
        if let Some(mut child) = self.lbs[i].daemon.take() {
            kill(&mut child, signal);
        }
    }

    /// `mlb ARGS --pin-path <its pin path>` on load balancer `i`.
    pub fn mlb(&self, i: usize, args: &[&str]) -> io::Result<std::process::Output> {
        self.lbs[i]
            .host
            .netns
            .command_net_only(&self.mlb)
            .args(args)
            .arg("--pin-path")
            .arg(&self.lbs[i].pin_dir)
            .output()
    }

    /// `mlb status` on load balancer `i`.
    pub fn status(&self, i: usize) -> io::Result<String> {
        let out = self.mlb(i, &["status"])?;
        if !out.status.success() {
            return Err(io::Error::other(
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Packets load balancer `i` forwarded for the Vip (from `mlb status`).
    pub fn vip_packets(&self, i: usize) -> u64 {
        self.status(i)
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("vip web "))?;
                let (_, rest) = line.rsplit_once(", ")?;
                rest.split_whitespace().next()?.parse().ok()
            })
            .unwrap_or(0)
    }

    /// Packets load balancer `i` sent with a previous backend attached (second chance).
    pub fn second_chance_packets(&self, i: usize) -> u64 {
        self.status(i)
            .map_or(0, |s| crate::status_counter(&s, "second_chance"))
    }

    pub fn log_text(&self, i: usize) -> String {
        std::fs::read_to_string(&self.lbs[i].log).unwrap_or_default()
    }

    /// Cuts load balancer `i` off the segment (`false`) or plugs it back in.
    pub fn set_link(&self, i: usize, up: bool) -> io::Result<()> {
        self.switch.ip(&[
            "link",
            "set",
            &format!("p-{}", self.lbs[i].host.name),
            if up { "up" } else { "down" },
        ])
    }

    /// Blocks (`true`) or unblocks load balancer `i`'s own traffic to the backends' port
    /// 80 (its health checks; XDP-forwarded packets never meet netfilter).
    pub fn block_checks(&self, i: usize, blocked: bool) -> io::Result<()> {
        let netns = &self.lbs[i].host.netns;
        if blocked {
            netns.exec("nft", &["add", "table", "inet", "mlbtest"])?;
            netns.exec(
                "nft",
                &["add chain inet mlbtest out { type filter hook output priority 0 ; }"],
            )?;
            netns.exec("nft", &["add rule inet mlbtest out tcp dport 80 drop"])
        } else {
            netns.exec("nft", &["delete", "table", "inet", "mlbtest"])
        }
    }

    /// The load balancers (by index) the router's route to the Vip names as next hops.
    pub fn router_next_hops(&self) -> Vec<usize> {
        let mut lbs: Vec<usize> = vip_gateways(self.router.netns.name())
            .iter()
            .filter_map(|g| {
                self.lbs
                    .iter()
                    .position(|lb| lb.host.addr4.to_string() == *g)
            })
            .collect();
        lbs.sort_unstable();
        lbs
    }

    /// Waits until the router's next hops are exactly `lbs`; how long that took.
    pub fn wait_for_next_hops(&self, lbs: &[usize], timeout: Duration) -> Option<Duration> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if self.router_next_hops() == lbs {
                return Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// `birdc show route VIP/32 all` on the router.
    pub fn router_birdc_route(&self) -> String {
        self.birdc(None, &["show", "route", &format!("{VIP}/32"), "all"])
    }

    /// `birdc ARGS` on load balancer `lb`, or on the router (`None`).
    pub fn birdc(&self, lb: Option<usize>, args: &[&str]) -> String {
        let (netns, ctl) = match lb {
            Some(i) => (&self.lbs[i].host.netns, &self.lbs[i].bird_ctl),
            None => (&self.router.netns, &self.router_ctl),
        };
        netns
            .command("birdc")
            .arg("-s")
            .arg(ctl)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// The routes load balancer `i`'s kernel has in the announce table.
    pub fn announced_routes(&self, i: usize) -> String {
        self.lbs[i]
            .host
            .netns
            .command("ip")
            .args(["route", "show", "table", &TABLE.to_string()])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Opens `count` long-lived connections from the client to the Vip; each says hello
    /// every `every` and checks the answer comes from the backend it first reached.
    pub fn open_connections(&self, count: usize, every: Duration) -> io::Result<Connections> {
        Connections::open(&self.client, count, every)
    }

    /// Starts short connections from the client to the Vip, one every `every`.
    pub fn start_short(&self, every: Duration, timeout: Duration) -> io::Result<ShortLoad> {
        ShortLoad::start(&self.client, every, timeout)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for i in 0..self.lbs.len() {
            self.stop_daemon(i, "-KILL");
            self.stop_bird(i, "-KILL");
        }
        if let Some(mut child) = self.router_bird.take() {
            kill(&mut child, "-KILL");
        }
        for server in self.servers.iter_mut().flatten() {
            let _ = server.kill();
            let _ = server.wait();
        }
        for lb in &self.lbs {
            // A killed daemon leaves its control socket behind.
            testbed::remove_daemon_files(&lb.pin_dir);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The next-hop addresses of the route to the Vip in the namespace named `netns` (a
/// name, not a [`Netns`], so that a watcher thread can hold it).
pub fn vip_gateways(netns: &str) -> Vec<String> {
    let Ok(out) = Command::new("ip")
        .args(["-n", netns, "-j", "route", "show", &format!("{VIP}/32")])
        .output()
    else {
        return Vec::new();
    };
    let routes: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    let mut gateways = Vec::new();
    for route in routes.as_array().into_iter().flatten() {
        if let Some(hops) = route["nexthops"].as_array() {
            gateways.extend(hops.iter().filter_map(|h| h["gateway"].as_str()));
        } else if let Some(g) = route["gateway"].as_str() {
            gateways.push(g);
        }
    }
    gateways.into_iter().map(str::to_owned).collect()
}

fn bird(netns: &Netns, conf: &Path, ctl: &Path) -> io::Result<Child> {
    let pid = ctl.with_extension("pid");
    netns
        .command("bird")
        .arg("-f")
        .arg("-c")
        .arg(conf)
        .arg("-s")
        .arg(ctl)
        .arg("-P")
        .arg(pid)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

fn kill(child: &mut Child, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// Runs `f` on a thread inside `netns` (namespaces are per thread).
fn spawn_in<T: Send + 'static>(
    netns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<JoinHandle<T>> {
    let file = std::fs::File::open(format!("/var/run/netns/{}", netns.name()))?;
    Ok(std::thread::spawn(move || {
        // SAFETY: setns on this thread only.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns"
        );
        f()
    }))
}

fn vip_addr() -> SocketAddr {
    SocketAddr::new(VIP.parse::<IpAddr>().expect("valid"), VIP_PORT)
}

/// One long-lived connection's fate.
#[derive(Clone, Debug)]
pub struct ConnectionReport {
    pub local_port: u16,
    /// The backend that greeted it.
    pub backend: String,
    pub exchanges: u64,
    /// What broke it, if anything did (reset, a timeout, another backend answering).
    pub broken: Option<String>,
    /// When it was greeted, and when it broke.
    pub opened: Instant,
    pub broken_at: Option<Instant>,
}

/// Long-lived connections, exercised round-robin by one thread in the client's namespace.
pub struct Connections {
    stop: Arc<AtomicBool>,
    reports: Arc<Mutex<Vec<ConnectionReport>>>,
    thread: Option<JoinHandle<()>>,
}

/// How long a connection may go unanswered before it counts as broken: longer than a
/// router's convergence plus TCP's retransmission backoff.
const BROKEN_AFTER: Duration = Duration::from_secs(15);

impl Connections {
    fn open(client: &Netns, count: usize, every: Duration) -> io::Result<Self> {
        Self::open_to(client, vip_addr(), count, every)
    }

    /// Opens `count` long-lived connections from `client` (a namespace with a route to
    /// it) to `addr`, a backend test server's TCP port behind a Vip.
    pub fn open_to(
        client: &Netns,
        addr: SocketAddr,
        count: usize,
        every: Duration,
    ) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let reports = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (flag, shared) = (Arc::clone(&stop), Arc::clone(&reports));
        let thread = spawn_in(client, move || {
            let mut conns = Vec::new();
            for _ in 0..count {
                match hello(addr) {
                    Ok((stream, reader, backend)) => {
                        let local_port = stream.local_addr().map_or(0, |a| a.port());
                        shared.lock().expect("reports").push(ConnectionReport {
                            local_port,
                            backend,
                            exchanges: 0,
                            broken: None,
                            opened: Instant::now(),
                            broken_at: None,
                        });
                        conns.push(Some((stream, reader)));
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                }
            }
            let _ = ready_tx.send(Ok(()));
            while !flag.load(Ordering::SeqCst) {
                let round = Instant::now();
                for (i, slot) in conns.iter_mut().enumerate() {
                    let Some((stream, reader)) = slot else {
                        continue;
                    };
                    let expected = shared.lock().expect("reports")[i].backend.clone();
                    let result = exchange(stream, reader, &expected);
                    let mut reports = shared.lock().expect("reports");
                    match result {
                        Ok(()) => reports[i].exchanges += 1,
                        Err(e) => {
                            reports[i].broken = Some(e);
                            reports[i].broken_at = Some(Instant::now());
                            *slot = None;
                        }
                    }
                }
                if let Some(wait) = every.checked_sub(round.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        })?;
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| io::Error::other("opening connections timed out"))?
            .map_err(|e| io::Error::other(format!("opening a connection: {e}")))?;
        Ok(Self {
            stop,
            reports,
            thread: Some(thread),
        })
    }

    /// The reports so far.
    pub fn reports(&self) -> Vec<ConnectionReport> {
        self.reports.lock().expect("reports").clone()
    }

    /// Exchanges done so far, over all connections.
    pub fn exchanges(&self) -> u64 {
        self.reports().iter().map(|r| r.exchanges).sum()
    }

    /// Waits until every live connection completed `more` further exchanges (so a
    /// connection that would break has had its chance to).
    pub fn settle(&self, more: u64, timeout: Duration) {
        let target: Vec<u64> = self.reports().iter().map(|r| r.exchanges + more).collect();
        let started = Instant::now();
        while started.elapsed() < timeout {
            let done = self
                .reports()
                .iter()
                .zip(&target)
                .all(|(r, t)| r.broken.is_some() || r.exchanges >= *t);
            if done {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops and returns every connection's report.
    pub fn stop(mut self) -> Vec<ConnectionReport> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.reports()
    }
}

impl Drop for Connections {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn hello(addr: SocketAddr) -> Result<(TcpStream, BufReader<TcpStream>, String), String> {
    let stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(BROKEN_AFTER))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    match line.trim() {
        "" => Err("closed without a greeting".into()),
        name => Ok((stream, reader, name.to_owned())),
    }
}

fn exchange(
    stream: &mut TcpStream,
    reader: &mut BufReader<TcpStream>,
    backend: &str,
) -> Result<(), String> {
    stream.write_all(b"ping\n").map_err(|e| e.to_string())?;
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => Err("closed".into()),
        Ok(_) if line.trim() == format!("{backend} ping") => Ok(()),
        Ok(_) => Err(format!("answered by another backend: {:?}", line.trim())),
        Err(e) => Err(e.to_string()),
    }
}

/// A short connection's start and outcome: the backend that answered, or the error.
pub type TimedResult = (Instant, Result<String, String>);

/// Short connections: connect, read the greeting, close.
pub struct ShortLoad {
    stop: Arc<AtomicBool>,
    results: Arc<Mutex<Vec<TimedResult>>>,
    thread: Option<JoinHandle<()>>,
}

impl ShortLoad {
    fn start(client: &Netns, every: Duration, timeout: Duration) -> io::Result<Self> {
        // Bounded: at most 10 minutes of load.
        Self::start_to(client, vip_addr(), every, timeout, Duration::from_secs(600))
    }

    /// Short connections from `client` to `addr` (a backend test server's TCP port behind
    /// a Vip), one every `every`, for at most `limit`.
    pub fn start_to(
        client: &Netns,
        addr: SocketAddr,
        every: Duration,
        timeout: Duration,
        limit: Duration,
    ) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(Vec::new()));
        let (flag, shared) = (Arc::clone(&stop), Arc::clone(&results));
        let thread = spawn_in(client, move || {
            let started = Instant::now();
            while !flag.load(Ordering::SeqCst) && started.elapsed() < limit {
                let at = Instant::now();
                let result = TcpStream::connect_timeout(&addr, timeout)
                    .map_err(|e| e.to_string())
                    .and_then(|s| {
                        s.set_read_timeout(Some(timeout))
                            .map_err(|e| e.to_string())?;
                        let mut line = String::new();
                        BufReader::new(s)
                            .read_line(&mut line)
                            .map_err(|e| e.to_string())?;
                        match line.trim() {
                            "" => Err("closed without a greeting".to_owned()),
                            name => Ok(name.to_owned()),
                        }
                    });
                shared.lock().expect("results").push((at, result));
                if let Some(wait) = every.checked_sub(at.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        })?;
        Ok(Self {
            stop,
            results,
            thread: Some(thread),
        })
    }

    /// Every attempt so far: the backend that answered, or the error.
    pub fn results(&self) -> Vec<Result<String, String>> {
        let results = self.results.lock().expect("results");
        results.iter().map(|(_, r)| r.clone()).collect()
    }

    /// Attempts so far and how many of them failed, without copying them.
    pub fn counts(&self) -> (usize, usize) {
        let results = self.results.lock().expect("results");
        let failed = results.iter().filter(|(_, r)| r.is_err()).count();
        (results.len(), failed)
    }

    /// Stops; every attempt's result.
    pub fn stop(self) -> Vec<Result<String, String>> {
        self.stop_timed().into_iter().map(|(_, r)| r).collect()
    }

    /// Stops; every attempt with when it started.
    pub fn stop_timed(mut self) -> Vec<TimedResult> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        std::mem::take(&mut *self.results.lock().expect("results"))
    }
}

impl Drop for ShortLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
