//! `cargo xtask bench fleet [--json FILE]` (root): three load balancers behind a router
//! (BIRD over BGP, the kernel's ECMP with an L4 hash) under a steady load of long-lived
//! and short connections, through the events a fleet lives through: a load balancer lost,
//! one losing its backends, maintenance, a rolling restart, config skew. Each event runs
//! on a fresh fleet; the figures are what users see (broken connections, convergence).

use std::{path::PathBuf, time::Instant};

use clap::Parser;
use lb_testbed::{
    bench::write_json,
    fleet::{Fleet, HOLD_TIME, scenarios},
};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Write the figures here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn fleet() -> Fleet {
    let mut fleet = Fleet::new(&lb_testbed::mlb_bin(), 3, 4).expect("fleet");
    let pools = fleet.pool_yaml(&[1, 2, 3]);
    for i in 0..3 {
        fleet.write_config(i, &pools).expect("config");
        fleet.start_daemon(i).unwrap_or_else(|e| panic!("{e}"));
    }
    fleet
        .wait_for_next_hops(&[0, 1, 2], std::time::Duration::from_secs(20))
        .expect("the router learns the vip from all three");
    fleet
}

fn step<T>(what: &str, f: impl FnOnce() -> T) -> T {
    println!("▶ {what} …");
    let started = Instant::now();
    let result = f();
    println!("  done in {:.1?}", started.elapsed());
    result
}

fn main() {
    let args = Args::parse();
    println!(
        "Fleet: 3 load balancers (mlb + BIRD), router with ECMP (L4 hash), BGP hold {} s; {} long-lived connections (a line every {:?}) and short ones every 50 ms",
        HOLD_TIME.as_secs(),
        scenarios::CONNECTIONS,
        scenarios::EVERY
    );
    let spread = step("spread over the boxes", || {
        scenarios::spread(&fleet()).expect("spread")
    });
    let loss = step("a load balancer lost (link cut), then back", || {
        scenarios::lb_loss(&fleet(), 0).expect("lb loss")
    });
    let no_backend = step("one box loses its backends (checks blocked)", || {
        scenarios::no_backend(&fleet(), 1).expect("no backend")
    });
    let maintenance = step("maintenance on, then off", || {
        scenarios::maintenance(&fleet(), 2).expect("maintenance")
    });
    let rolling = step("rolling restart of the three daemons", || {
        scenarios::rolling_restart(&mut fleet()).expect("rolling restart")
    });
    let skew = step(
        "config skew: box 1 gets a backend first, then the others, then box 1 is lost",
        || scenarios::config_skew(&fleet(), 0, 4, true).expect("config skew"),
    );
    let skew_without = step("the same without second chance", || {
        scenarios::config_skew(&fleet(), 0, 4, false).expect("config skew")
    });

    println!();
    println!("{:<46} {:>10}", "event", "figure");
    let rows = [
        (
            "spread: packets per box",
            format!("{:?}", spread.packets_per_lb),
        ),
        (
            "spread: flows off the table's backend",
            spread.mispredicted.to_string(),
        ),
        (
            "lb lost: broken connections",
            loss.broken_connections.to_string(),
        ),
        (
            "lb lost: failed short connections",
            format!(
                "{}/{}",
                loss.failed_short_connections, loss.short_connections
            ),
        ),
        (
            "lb lost: cut to router updated (ms)",
            loss.converge_ms.to_string(),
        ),
        (
            "lb back: broken connections",
            loss.broken_on_return.to_string(),
        ),
        (
            "no backend: all down to route gone (ms)",
            no_backend.withdraw_no_backend_ms.to_string(),
        ),
        (
            "no backend: failed after convergence",
            format!(
                "{}/{}",
                no_backend.failed_after_convergence, no_backend.short_after_convergence
            ),
        ),
        (
            "no backend: broken connections",
            no_backend.broken_connections.to_string(),
        ),
        (
            "maintenance: broken connections",
            maintenance.broken_connections.to_string(),
        ),
        (
            "rolling restart: broken connections",
            rolling.broken_connections.to_string(),
        ),
        (
            "rolling restart: fewest next hops",
            rolling.min_next_hops.to_string(),
        ),
        (
            "config skew: broken connections",
            format!("{}/{}", skew.broken_connections, skew.connections_total),
        ),
        (
            "config skew: broken without second chance",
            format!(
                "{}/{}",
                skew_without.broken_connections, skew_without.connections_total
            ),
        ),
        (
            "config skew: packets chained",
            skew.chained_packets.to_string(),
        ),
    ];
    for (what, value) in rows {
        println!("{what:<46} {value:>10}");
    }

    if let Some(path) = args.json {
        let body = json!({
            "benchmark": "fleet",
            "hold_time_ms": HOLD_TIME.as_millis() as u64,
            "spread": spread,
            "lb_loss": loss,
            "withdraw_no_backend_ms": no_backend.withdraw_no_backend_ms,
            "no_backend": no_backend,
            "maintenance": maintenance,
            "rolling_restart": rolling,
            "config_skew": {
                "broken_connections": skew.broken_connections,
                "broken_without_second_chance": skew_without.broken_connections,
                "with_second_chance": skew,
                "without_second_chance": skew_without,
            },
        });
        write_json(&path, &body);
    }
}
