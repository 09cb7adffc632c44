//! `cargo xtask demo --fleet`: three real load balancers (mlb + BIRD) behind a router
//! that spreads the Vip over them by ECMP, in front of three real TCP backends, all in
//! network namespaces it creates and removes (even on Ctrl-C). Live traffic per load
//! balancer and per backend; one load balancer taken away and the traffic continuing
//! through the other two; then back.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use lb_testbed::fleet::{Connections, Fleet, HOLD_TIME, ShortLoad};

#[derive(Parser)]
#[command(about = "Run the mlb fleet demo (root)")]
struct Args {
    /// The mlb binary to run.
    #[arg(long)]
    mlb: PathBuf,
}

const VICTIM: usize = 1;

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mlb-fleet-demo: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)).context("Ctrl-C handler")?;
    let result = demo(&args, &stop);
    if stop.load(Ordering::SeqCst) {
        println!("\ninterrupted: cleaned up");
        return Ok(());
    }
    result
}

fn step(what: &str) {
    print!("  {what} ... ");
    let _ = std::io::stdout().flush();
}

fn demo(args: &Args, stop: &AtomicBool) -> anyhow::Result<()> {
    println!(
        "mlb fleet demo: three XDP load balancers behind an ECMP router (BGP via BIRD), three TCP backends\n"
    );
    step("building the fleet: client, router, 3 load balancers, 3 backends in namespaces");
    let started = Instant::now();
    let mut fleet = Fleet::new(&args.mlb, 3, 3)?;
    println!("ok ({:.1?})", started.elapsed());
    let pools = fleet.pool_yaml(&[1, 2, 3]);
    for i in 0..3 {
        step(&format!("starting mlb and BIRD on lb{}", i + 1));
        fleet.write_config(i, &pools)?;
        fleet.start_daemon(i)?;
        println!("ok");
    }
    step("waiting for the router to learn the vip from every load balancer");
    let took = fleet
        .wait_for_next_hops(&[0, 1, 2], Duration::from_secs(20))
        .context("the router did not learn the vip")?;
    println!("ok ({took:.1?})");
    print_route(&fleet);

    let conns = fleet.open_connections(30, Duration::from_millis(100))?;
    let short = fleet.start_short(Duration::from_millis(20), Duration::from_secs(2))?;
    println!("\n30 long-lived connections (a line every 100 ms) and a new connection every 20 ms:");
    live(&fleet, &conns, &short, Duration::from_secs(5), stop)?;

    println!(
        "\nlb{} cut off the network (its link down): the router drops it after the BGP hold time ({} s)",
        VICTIM + 1,
        HOLD_TIME.as_secs()
    );
    fleet.set_link(VICTIM, false)?;
    let cut = Instant::now();
    let mut converged = None;
    let deadline = Duration::from_secs(8);
    while cut.elapsed() < deadline && !stop.load(Ordering::SeqCst) {
        if converged.is_none() && fleet.router_next_hops() == [0, 2] {
            converged = Some(cut.elapsed());
        }
        line(&fleet, &conns, &short);
        std::thread::sleep(Duration::from_millis(250));
    }
    println!();
    match converged {
        Some(t) => println!("  router updated {t:.1?} after the cut"),
        None => println!("  the router still lists lb{}", VICTIM + 1),
    }
    print_route(&fleet);

    println!("\nlb{} back on the network:", VICTIM + 1);
    fleet.set_link(VICTIM, true)?;
    let back = Instant::now();
    let mut announced = None;
    while back.elapsed() < Duration::from_secs(12) && !stop.load(Ordering::SeqCst) {
        if announced.is_none() && fleet.router_next_hops() == [0, 1, 2] {
            announced = Some(back.elapsed());
        }
        line(&fleet, &conns, &short);
        std::thread::sleep(Duration::from_millis(250));
    }
    println!();
    if let Some(t) = announced {
        println!("  announced again {t:.1?} after the link came back");
    }
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    let shorts = short.stop();
    let reports = conns.stop();
    let broken = reports.iter().filter(|r| r.broken.is_some()).count();
    let failed = shorts.iter().filter(|r| r.is_err()).count();
    println!(
        "\nlong-lived connections broken: {broken} of {}; short connections failed: {failed} of {}",
        reports.len(),
        shorts.len()
    );
    println!("removing the namespaces");
    Ok(())
}

/// The traffic so far, refreshed until `duration` has passed.
fn live(
    fleet: &Fleet,
    conns: &Connections,
    short: &ShortLoad,
    duration: Duration,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    while started.elapsed() < duration {
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        line(fleet, conns, short);
        std::thread::sleep(Duration::from_millis(250));
    }
    println!();
    Ok(())
}

/// One live status line: packets per load balancer, connections per backend, failures.
fn line(fleet: &Fleet, conns: &Connections, short: &ShortLoad) {
    let lbs: Vec<String> = (0..fleet.lbs.len())
        .map(|i| format!("lb{} {:>6}", i + 1, fleet.vip_packets(i)))
        .collect();
    let results = short.results();
    let mut per_backend: BTreeMap<&str, usize> = BTreeMap::new();
    for name in results.iter().flatten() {
        *per_backend.entry(name).or_default() += 1;
    }
    let backends: Vec<String> = per_backend
        .iter()
        .map(|(name, n)| format!("{name} {n:>4}"))
        .collect();
    let failed = results.iter().filter(|r| r.is_err()).count();
    let broken = conns
        .reports()
        .iter()
        .filter(|r| r.broken.is_some())
        .count();
    print!(
        "\r  packets: {}  | new connections: {}  failed {failed}  | long-lived broken {broken}   ",
        lbs.join("  "),
        backends.join("  ")
    );
    let _ = std::io::stdout().flush();
}

fn print_route(fleet: &Fleet) {
    let hops: Vec<String> = fleet
        .router_next_hops()
        .iter()
        .map(|i| format!("lb{}", i + 1))
        .collect();
    println!("  router: 10.200.0.1 via {}", hops.join(", "));
}
