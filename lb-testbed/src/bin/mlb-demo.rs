//! `cargo xtask demo`: the real load balancer in front of three real HTTP backends, in
//! network namespaces it creates and removes (even on Ctrl-C). Traffic from a client to
//! the Vip, then one backend taken away and the traffic moving, then back.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use lb_testbed::{BACKEND_SERVER, testbed::Testbed};
use lb_userspace::{
    config::Config,
    dataplane::{Capacities, Dataplane},
};

const PIN_PATH: &str = "/sys/fs/bpf/mlb-demo";
const REQUESTS: usize = 600;

#[derive(Parser)]
#[command(about = "Run the mlb demo (root)")]
struct Args {
    /// The daemon's config (its interface must be eth0, its backends 10.100.0.11-13).
    #[arg(long, default_value = "config/demo.yaml")]
    config: PathBuf,
    /// The mlb binary to run.
    #[arg(long)]
    mlb: PathBuf,
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mlb-demo: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)).context("Ctrl-C handler")?;
    let result = Demo::new(&args).and_then(|mut demo| demo.run(&stop));
    if stop.load(Ordering::SeqCst) {
        println!("\ninterrupted: cleaned up");
        return Ok(());
    }
    result
}

/// Everything the demo creates; dropping it removes all of it.
struct Demo {
    bed: Testbed,
    _helpers: Dataplane,
    servers: Vec<Option<Child>>,
    daemon: Option<Child>,
    dir: PathBuf,
    mlb: PathBuf,
    vip: SocketAddr,
    names: Vec<String>,
    config: PathBuf,
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let _ = Command::new("kill").arg(daemon.id().to_string()).status();
            let _ = daemon.wait();
        }
        for server in self.servers.iter_mut().flatten() {
            let _ = server.kill();
            let _ = server.wait();
        }
        let _ = Command::new(&self.mlb)
            .args(["detach", "--pin-path", PIN_PATH])
            .output();
        // Pins, and the state and saved previous tables `detach` leaves under /run and
        // /var/lib.
        lb_testbed::testbed::remove_daemon_files(Path::new(PIN_PATH));
        let _ = std::fs::remove_dir_all(&self.dir);
        // The namespaces go with self.bed.
    }
}

fn step(what: &str) {
    print!("  {what} ... ");
    let _ = std::io::stdout().flush();
}

impl Demo {
    fn new(args: &Args) -> anyhow::Result<Self> {
        let config = Config::load(&args.config).map_err(|e| anyhow::anyhow!("{e}"))?;
        let vip = config.vips.first().context("the demo config needs a vip")?;
        let vip_addr = SocketAddr::new(vip.address, vip.port);
        let pool = &config.pools[&vip.pool];
        let names: Vec<String> = pool.backends.iter().map(|b| b.name.clone()).collect();
        println!(
            "mlb demo: a real XDP load balancer in front of {} real HTTP backends\n",
            names.len()
        );

        step("building the testbed: client, load balancer and backends in network namespaces");
        let started = Instant::now();
        let bed = Testbed::new(names.len(), &[vip.address])?;
        for (b, cfg) in bed.backends.iter().zip(&pool.backends) {
            if b.addr4 != cfg.address {
                bail!(
                    "{} expects backend {} at {}, the testbed has {}",
                    args.config.display(),
                    cfg.name,
                    cfg.address,
                    b.addr4
                );
            }
        }
        println!("ok ({:.1?})", started.elapsed());

        let dir = std::env::temp_dir().join(format!("mlb-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let script = dir.join("backend_server.py");
        std::fs::write(&script, BACKEND_SERVER)?;
        step("starting the backends' HTTP servers");
        let mut servers = Vec::new();
        for (b, name) in bed.backends.iter().zip(&names) {
            servers.push(Some(start_server(&b.netns, &script, name, vip.port)?));
        }
        println!("ok");

        // Veth plumbing the daemon does not own: XDP_TX needs a program on the switch
        // port, and IPIP backends need the decapsulation program.
        let mut helpers = Dataplane::load(Capacities {
            max_vips: 1,
            max_backends: 2,
            conntrack_entries: 1024,
            ..Default::default()
        })?;
        bed.attach_plumbing(&mut helpers)?;

        let mut demo = Self {
            bed,
            _helpers: helpers,
            servers,
            daemon: None,
            dir,
            mlb: args.mlb.clone(),
            vip: vip_addr,
            names,
            config: args.config.clone(),
        };
        demo.start_daemon(&args.config)?;
        Ok(demo)
    }

    fn start_daemon(&mut self, config: &Path) -> anyhow::Result<()> {
        // The demo's own pin path, so it never touches a real deployment's state.
        let text = std::fs::read_to_string(config)?;
        let text = if text.contains("\nglobal:\n") || text.starts_with("global:\n") {
            text.replacen(
                "global:\n",
                &format!("global:\n  pin_path: {PIN_PATH}\n"),
                1,
            )
        } else {
            format!("global:\n  pin_path: {PIN_PATH}\n{text}")
        };
        let demo_config = self.dir.join("demo.yaml");
        std::fs::write(&demo_config, text)?;
        let log_path = self.dir.join("mlb.log");
        let log = std::fs::File::create(&log_path)?;
        step(&format!("starting mlb run --config {}", config.display()));
        let child = self
            .bed
            .lb
            .netns
            .command_net_only(self.mlb.to_str().context("utf-8 path")?)
            .args(["run", "--config"])
            .arg(&demo_config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.daemon = Some(child);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            let status = self.mlb_status()?;
            if status.starts_with("daemon: running") {
                println!("ok (log: {})", log_path.display());
                return Ok(());
            }
            if let Some(exit) = self
                .daemon
                .as_mut()
                .and_then(|d| d.try_wait().ok().flatten())
            {
                bail!(
                    "mlb exited ({exit}):\n{}",
                    std::fs::read_to_string(&log_path)?
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "mlb did not come up:\n{}",
            std::fs::read_to_string(&log_path)?
        )
    }

    fn mlb_status(&self) -> anyhow::Result<String> {
        let out = self
            .bed
            .lb
            .netns
            .command_net_only(self.mlb.to_str().context("utf-8 path")?)
            .args(["status", "--pin-path", PIN_PATH])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn run(&mut self, stop: &AtomicBool) -> anyhow::Result<()> {
        let victim = self.names[1].clone();
        println!(
            "\nphase 1: every backend up: {REQUESTS} HTTP requests from the client to http://{}/",
            self.vip
        );
        self.traffic(stop)?;

        println!("\nphase 2: {victim}'s HTTP server is stopped; the health check takes it out");
        self.kill_server(1);
        let took = self.wait_for_state(&victim, "DOWN", stop)?;
        println!("  mlb marked {victim} DOWN {took:.1?} after the stop");
        self.traffic(stop)?;
        // Long-lived (keep-alive) connections opened while the victim is out: phase 4
        // comes back to them.
        let mut kept = self.open_kept(KEPT)?;

        println!("\nphase 3: {victim} is back; after its rise checks it gets flows again");
        let server = start_server(
            &self.bed.backends[1].netns,
            &self.dir.join("backend_server.py"),
            &victim,
            self.vip.port(),
        )?;
        self.servers[1] = Some(server);
        let took = self.wait_for_state(&victim, "up", stop)?;
        println!("  mlb marked {victim} up {took:.1?} after the restart");
        self.traffic(stop)?;

        println!(
            "\nphase 4: the load balancer loses every map (stop, mlb detach, start); the {KEPT} \
             keep-alive connections opened in phase 2 ask again"
        );
        self.lose_maps()?;
        let before = self.chained();
        let (kept_ok, moved) = self.ask_kept(&mut kept)?;
        println!(
            "  {kept_ok} of {KEPT} kept their backend ({moved} of them were chained to it by second \
             chance: {} packets with the previous backend attached)",
            self.chained() - before
        );

        println!("\nmlb status:");
        for line in self.mlb_status()?.lines() {
            println!("  {line}");
        }
        println!("\ncleaning up the namespaces, the daemon and its pinned state");
        Ok(())
    }

    fn kill_server(&mut self, index: usize) {
        if let Some(mut server) = self.servers[index].take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }

    /// Waits until `mlb status` shows `name` in `state` ("DOWN" or "up").
    fn wait_for_state(
        &self,
        name: &str,
        state: &str,
        stop: &AtomicBool,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(15) && !stop.load(Ordering::SeqCst) {
            let status = self.mlb_status()?;
            let line = status
                .lines()
                .find(|l| l.starts_with(&format!("backend {name} ")));
            if line.is_some_and(|l| l.contains(&format!(": {state}"))) {
                return Ok(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        bail!("{name} did not become {state} within 15 s")
    }

    /// `REQUESTS` HTTP requests, one connection each, with a live line; then a bar chart.
    fn traffic(&self, stop: &AtomicBool) -> anyhow::Result<()> {
        let vip = self.vip;
        let names = self.names.clone();
        let (counts, failed) = self.bed.client.netns.enter(|| {
            let mut counts: BTreeMap<String, usize> =
                names.iter().map(|n| (n.clone(), 0)).collect();
            let mut failed = 0;
            for i in 1..=REQUESTS {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                match http_get(vip) {
                    Ok(name) => *counts.entry(name).or_insert(0) += 1,
                    Err(_) => failed += 1,
                }
                if i % 20 == 0 || i == REQUESTS {
                    let live: Vec<String> =
                        counts.iter().map(|(n, c)| format!("{n} {c:>3}")).collect();
                    print!(
                        "\r  requests {i:>3}/{REQUESTS}: {}  failed {failed}   ",
                        live.join("  ")
                    );
                    let _ = std::io::stdout().flush();
                }
            }
            (counts, failed)
        })?;
        println!();
        let total: usize = counts.values().sum::<usize>().max(1);
        for (name, n) in &counts {
            let bar = "█".repeat(n * 40 / total);
            println!(
                "  {name:<6} {bar:<40} {n:>4} ({:>3.0}%)",
                *n as f64 * 100.0 / total as f64
            );
        }
        println!("  failed {failed}");
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        Ok(())
    }
}

fn start_server(
    netns: &lb_testbed::netns::Netns,
    script: &Path,
    name: &str,
    port: u16,
) -> anyhow::Result<Child> {
    let mut child = netns
        .command("python3")
        .arg(script)
        .args(["--name", name, "--http", &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting python3")?;
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().context("stdout")?).read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("backend server {name} did not start");
    }
    Ok(child)
}

/// Connections phase 4 comes back to.
const KEPT: usize = 30;

impl Demo {
    /// `n` keep-alive connections to the Vip, each with the backend that answered it.
    fn open_kept(&self, n: usize) -> anyhow::Result<Vec<(TcpStream, String)>> {
        let vip = self.vip;
        self.bed.client.netns.enter(|| {
            (0..n)
                .map(|_| {
                    let mut stream = TcpStream::connect_timeout(&vip, Duration::from_secs(1))?;
                    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
                    let name = keep_alive_get(&mut stream, vip)?;
                    Ok((stream, name))
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })?
    }

    /// Asks again on every kept connection: how many the same backend answered, and how
    /// many of those the table now sends elsewhere (kept by second chance).
    fn ask_kept(&self, kept: &mut [(TcpStream, String)]) -> anyhow::Result<(usize, usize)> {
        let vip = self.vip;
        let answers: Vec<bool> = self.bed.client.netns.enter(|| {
            kept.iter_mut()
                .map(|(stream, name)| keep_alive_get(stream, vip).is_ok_and(|n| n == *name))
                .collect()
        })?;
        let moved = kept
            .iter()
            .zip(&answers)
            .filter(|((stream, name), ok)| {
                **ok && stream
                    .local_addr()
                    .is_ok_and(|local| self.traced(local.port()).is_some_and(|b| b != *name))
            })
            .count();
        Ok((answers.iter().filter(|ok| **ok).count(), moved))
    }

    /// The backend `mlb trace` says the table gives the client's flow from `port`.
    fn traced(&self, port: u16) -> Option<String> {
        let out = self
            .bed
            .lb
            .netns
            .command_net_only(self.mlb.to_str()?)
            .args([
                "trace",
                "--src",
                &self.bed.client.addr4.to_string(),
                "--sport",
            ])
            .arg(port.to_string())
            .args(["--dst", &self.vip.ip().to_string(), "--dport"])
            .arg(self.vip.port().to_string())
            .args(["--pin-path", PIN_PATH])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text.lines().find(|l| l.starts_with("table: slot "))?;
        Some(
            line.split("-> ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .to_owned(),
        )
    }

    /// Stops the daemon, removes every map (`mlb detach`), starts it again.
    fn lose_maps(&mut self) -> anyhow::Result<()> {
        if let Some(mut daemon) = self.daemon.take() {
            Command::new("kill").arg(daemon.id().to_string()).status()?;
            daemon.wait()?;
        }
        step("mlb detach (every map and the connection table gone)");
        let out = self
            .bed
            .lb
            .netns
            .command_net_only(self.mlb.to_str().context("utf-8 path")?)
            .args(["detach", "--pin-path", PIN_PATH])
            .output()?;
        if !out.status.success() {
            bail!("mlb detach: {}", String::from_utf8_lossy(&out.stderr));
        }
        println!("ok");
        let config = self.config.clone();
        self.start_daemon(&config)
    }

    /// Packets sent with a previous backend attached, from `mlb status`.
    fn chained(&self) -> u64 {
        self.mlb_status()
            .map_or(0, |s| lb_testbed::status_counter(&s, "second_chance"))
    }
}

/// One GET on a keep-alive connection; returns the body (the backend's name).
fn keep_alive_get(stream: &mut TcpStream, vip: SocketAddr) -> std::io::Result<String> {
    write!(stream, "GET / HTTP/1.1\r\nHost: {vip}\r\n\r\n")?;
    let mut reader = BufReader::new(&*stream);
    let mut length = 0;
    let mut status = String::new();
    reader.read_line(&mut status)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("closed"));
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    if !status.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other("not 200"));
    }
    Ok(String::from_utf8_lossy(&body).trim().to_owned())
}

/// One HTTP/1.1 GET on a new connection; returns the body (the backend's name).
fn http_get(vip: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&vip, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {vip}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    if !response.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other("not 200"));
    }
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    Ok(body.trim().to_owned())
}
