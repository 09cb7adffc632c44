//! What happens to connections when the fleet changes: each scenario drives a [`Fleet`]
//! of three announcing load balancers and measures what users see (broken long-lived
//! connections, failed short ones, convergence times). The fleet tests assert on these
//! figures; `cargo xtask bench fleet` reports them as JSON.

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{ConnectionReport, Fleet, HOLD_TIME, VIP, VIP_PORT};

/// Long-lived connections per scenario, each exchanging a line every [`EVERY`].
pub const CONNECTIONS: usize = 60;
pub const EVERY: Duration = Duration::from_millis(100);
/// Short connections: one every 50 ms, 2 s to connect and be greeted.
const SHORT_EVERY: Duration = Duration::from_millis(50);
const SHORT_TIMEOUT: Duration = Duration::from_secs(2);
/// Exchanges every surviving connection must complete after an event before it is judged.
const SETTLE_EXCHANGES: u64 = 5;
const SETTLE_TIMEOUT: Duration = Duration::from_secs(40);
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(20);

fn other(what: impl Into<String>) -> io::Error {
    io::Error::other(what.into())
}

fn broken(reports: &[ConnectionReport]) -> Vec<&ConnectionReport> {
    reports.iter().filter(|r| r.broken.is_some()).collect()
}

/// All boxes but `victim`.
fn others(fleet: &Fleet, victim: usize) -> Vec<usize> {
    (0..fleet.lbs.len()).filter(|i| *i != victim).collect()
}

fn all(fleet: &Fleet) -> Vec<usize> {
    (0..fleet.lbs.len()).collect()
}

/// The backend load balancer `lb`'s table gives the client's flow from `port` (its
/// `mlb trace`), and whether `lb` has a connection-table entry for it.
pub fn trace(fleet: &Fleet, lb: usize, port: u16) -> io::Result<(String, bool)> {
    let out = fleet.mlb(
        lb,
        &[
            "trace",
            "--src",
            super::CLIENT_ADDR,
            "--sport",
            &port.to_string(),
            "--dst",
            VIP,
            "--dport",
            &VIP_PORT.to_string(),
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let backend = text
        .lines()
        .find_map(|l| l.strip_prefix("table: slot ")?.split_once("-> "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .ok_or_else(|| other(format!("mlb trace on lb{}: {text}", lb + 1)))?;
    let seen = text.contains("connection table: entry");
    Ok((backend.to_owned(), seen))
}

/// Flows spread over the boxes, each on the backend the shared table predicts.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Spread {
    pub connections: usize,
    /// Vip packets each box forwarded for them.
    pub packets_per_lb: Vec<u64>,
    /// Connections whose backend is not the one every box's table names.
    pub mispredicted: usize,
    /// Connections each box has a connection-table entry for.
    pub seen_per_lb: Vec<usize>,
}

pub fn spread(fleet: &Fleet) -> io::Result<Spread> {
    let before: Vec<u64> = all(fleet).iter().map(|i| fleet.vip_packets(*i)).collect();
    let conns = fleet.open_connections(CONNECTIONS, EVERY)?;
    conns.settle(SETTLE_EXCHANGES, SETTLE_TIMEOUT);
    let reports = conns.stop();
    let mut result = Spread {
        connections: reports.len(),
        seen_per_lb: vec![0; fleet.lbs.len()],
        ..Spread::default()
    };
    result.packets_per_lb = all(fleet)
        .iter()
        .map(|i| fleet.vip_packets(*i) - before[*i])
        .collect();
    for r in &reports {
        for lb in all(fleet) {
            let (predicted, seen) = trace(fleet, lb, r.local_port)?;
            if predicted != r.backend {
                result.mispredicted += 1;
            }
            result.seen_per_lb[lb] += usize::from(seen);
        }
    }
    Ok(result)
}

/// A load balancer lost: its link cut under load, then back.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LbLoss {
    pub connections: usize,
    /// Long-lived connections that had crossed the lost box.
    pub crossed_lost_lb: usize,
    pub broken_connections: usize,
    pub short_connections: usize,
    pub failed_short_connections: usize,
    /// Cut to the router's route without the box.
    pub converge_ms: u64,
    /// The box plugged back in: broken connections when flows move back to it.
    pub broken_on_return: usize,
}

pub fn lb_loss(fleet: &Fleet, victim: usize) -> io::Result<LbLoss> {
    let conns = fleet.open_connections(CONNECTIONS, EVERY)?;
    let short = fleet.start_short(SHORT_EVERY, SHORT_TIMEOUT)?;
    conns.settle(2, SETTLE_TIMEOUT);
    let mut crossed = 0;
    for r in conns.reports() {
        crossed += usize::from(trace(fleet, victim, r.local_port)?.1);
    }
    fleet.set_link(victim, false)?;
    let converge = fleet
        .wait_for_next_hops(&others(fleet, victim), CONVERGE_TIMEOUT)
        .ok_or_else(|| other("the router kept the lost load balancer"))?;
    conns.settle(SETTLE_EXCHANGES, SETTLE_TIMEOUT);
    let lost = broken(&conns.reports()).len();
    let shorts = short.stop();
    fleet.set_link(victim, true)?;
    fleet
        .wait_for_next_hops(&all(fleet), CONVERGE_TIMEOUT + HOLD_TIME)
        .ok_or_else(|| other("the load balancer did not come back"))?;
    conns.settle(SETTLE_EXCHANGES, SETTLE_TIMEOUT);
    let reports = conns.stop();
    Ok(LbLoss {
        connections: reports.len(),
        crossed_lost_lb: crossed,
        broken_connections: lost,
        broken_on_return: broken(&reports).len() - lost,
        short_connections: shorts.len(),
        failed_short_connections: shorts.iter().filter(|r| r.is_err()).count(),
        converge_ms: converge.as_millis() as u64,
    })
}

/// One box loses its backends (its health checks blocked).
#[derive(Clone, Debug, Default, Serialize)]
pub struct NoBackend {
    /// Every backend marked down on the box to the router's route without it.
    pub withdraw_no_backend_ms: u64,
    /// New connections after convergence that failed.
    pub failed_after_convergence: usize,
    pub short_after_convergence: usize,
    pub broken_connections: usize,
    pub connections: usize,
}

pub fn no_backend(fleet: &Fleet, victim: usize) -> io::Result<NoBackend> {
    let conns = fleet.open_connections(CONNECTIONS, EVERY)?;
    fleet.block_checks(victim, true)?;
    let started = Instant::now();
    let all_down = loop {
        let status = fleet.status(victim)?;
        let backends: Vec<&str> = status
            .lines()
            .filter(|l| l.starts_with("backend "))
            .collect();
        if !backends.is_empty() && backends.iter().all(|l| l.contains(": DOWN")) {
            break Instant::now();
        }
        if started.elapsed() > CONVERGE_TIMEOUT {
            return Err(other(format!("backends never went down:\n{status}")));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    fleet
        .wait_for_next_hops(&others(fleet, victim), CONVERGE_TIMEOUT)
        .ok_or_else(|| other("the box without backends stayed announced"))?;
    let withdraw = all_down.elapsed();
    let short = fleet.start_short(SHORT_EVERY, SHORT_TIMEOUT)?;
    std::thread::sleep(Duration::from_secs(2));
    let shorts = short.stop();
    conns.settle(SETTLE_EXCHANGES, SETTLE_TIMEOUT);
    fleet.block_checks(victim, false)?;
    fleet
        .wait_for_next_hops(&all(fleet), CONVERGE_TIMEOUT)
        .ok_or_else(|| other("the box did not announce again"))?;
    conns.settle(SETTLE_EXCHANGES, SETTLE_TIMEOUT);
    let reports = conns.stop();
    Ok(NoBackend {
        withdraw_no_backend_ms: withdraw.as_millis() as u64,
        failed_after_convergence: shorts.iter().filter(|r| r.is_err()).count(),
        short_after_convergence: shorts.len(),
        broken_connections: broken(&reports).len(),
        connections: reports.len(),
    })
}

/// `mlb maintenance on`, then `off`, on one box under load.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Maintenance {
    pub connections: usize,
    pub broken_connections: usize,
    /// `on` to the router's route without the box.
    pub withdraw_ms: u64,
    /// `off` to the router's route with it again.
    pub announce_ms: u64,
}

pub fn maintenance(fleet: &Fleet, victim: usize) -> io::Result<Maintenance> {
    let conns = fleet.open_connections(CONNECTIONS, EVERY)?;
    conns.settle(2, SETTLE_TIMEOUT);
    let mlb = |state: &str| -> io::Result<()> {
        let out = fleet.mlb(victim, &["maintenance", state])?;
        if out.status.success() {
            Ok(())
        } else {
            Err(other(String::from_utf8_lossy(&out.stderr).into_owned()))
        }
    };
    mlb("on")?;
    let withdraw = fleet
        .wait_for_next_hops(&others(fleet, victim), CONVERGE_TIMEOUT)
        .ok_or_else(|| other("maintenance on did not withdraw the box"))?;
    conns.settle(SETTLE_EXCHANGES, SETTLE_TIMEOUT);
    mlb("off")?;
    let announce = fleet
        .wait_for_next_hops(&all(fleet), CONVERGE_TIMEOUT)
        .ok_or_else(|| other("maintenance off did not announce the box again"))?;
    conns.settle(SETTLE_EXCHANGES, SETTLE_TIMEOUT);
    let reports = conns.stop();
    Ok(Maintenance {
        connections: reports.len(),
        broken_connections: broken(&reports).len(),
        withdraw_ms: withdraw.as_millis() as u64,
        announce_ms: announce.as_millis() as u64,
    })
}

/// Every daemon restarted in turn under load.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RollingRestart {
    pub connections: usize,
    pub broken_connections: usize,
    pub short_connections: usize,
    pub failed_short_connections: usize,
    /// The fewest next hops the router had for the Vip meanwhile (polled every 10 ms).
    pub min_next_hops: usize,
}

pub fn rolling_restart(fleet: &mut Fleet) -> io::Result<RollingRestart> {
    let conns = fleet.open_connections(CONNECTIONS, EVERY)?;
    let short = fleet.start_short(SHORT_EVERY, SHORT_TIMEOUT)?;
    conns.settle(2, SETTLE_TIMEOUT);
    // Watch the router from a thread of its own while the daemons restart.
    let min = Arc::new(AtomicUsize::new(usize::MAX));
    let router = fleet.router.netns.name().to_owned();
    let watch_done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (min, done) = (Arc::clone(&min), Arc::clone(&watch_done));
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                min.fetch_min(super::vip_gateways(&router).len(), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let mut result = Ok(());
    for i in 0..fleet.lbs.len() {
        fleet.stop_daemon(i, "-TERM");
        if let Err(e) = fleet.start_daemon(i) {
            result = Err(e);
            break;
        }
        conns.settle(2, SETTLE_TIMEOUT);
    }
    watch_done.store(true, Ordering::SeqCst);
    let _ = watcher.join();
    result?;
    conns.settle(SETTLE_EXCHANGES, SETTLE_TIMEOUT);
    let shorts = short.stop();
    let reports = conns.stop();
    Ok(RollingRestart {
        connections: reports.len(),
        broken_connections: broken(&reports).len(),
        short_connections: shorts.len(),
        failed_short_connections: shorts.iter().filter(|r| r.is_err()).count(),
        min_next_hops: min.load(Ordering::SeqCst),
    })
}

/// Config skew during a rollout: box `skewed` gets a new backend before the others, then
/// the others get it too, then box `skewed` is lost and its flows move to boxes that never
/// saw them. Connections that started under the old table and crossed `skewed` have no
/// entry on the others, whose table now sends some of them elsewhere: without second
/// chance those break; with it, the others chain them to their previous backend.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConfigSkew {
    pub second_chance: bool,
    pub connections_total: usize,
    pub broken_connections: usize,
    /// Broken connections whose backend the others' old table named but their new one does
    /// not (the ones a table change on a box that never saw them breaks).
    pub broken_explained: usize,
    /// Connections whose backend the others' new table does not name.
    pub moved: usize,
    /// Packets the others sent with a previous backend attached.
    pub chained_packets: u64,
}

pub fn config_skew(
    fleet: &Fleet,
    skewed: usize,
    new_backend: usize,
    second_chance: bool,
) -> io::Result<ConfigSkew> {
    let setting = if second_chance { "5m" } else { "0" };
    let write = |i: usize, members: &[usize]| {
        fleet.write_config_with(
            i,
            &fleet.pool_yaml(members),
            &format!("second_chance: {setting}"),
        )
    };
    let old: Vec<usize> = (1..=3).collect();
    for i in all(fleet) {
        write(i, &old)?;
    }
    // The watcher applies a settled file within two of its 250 ms ticks.
    std::thread::sleep(Duration::from_millis(1500));
    let before = fleet.open_connections(CONNECTIONS, EVERY)?;
    let members: Vec<usize> = old.iter().copied().chain([new_backend]).collect();
    let name = format!("be{new_backend}");
    let took = |i: usize| -> io::Result<()> {
        let started = Instant::now();
        while !fleet
            .status(i)?
            .lines()
            .any(|l| l.trim_start().starts_with(&format!("{name}: ")) && l.contains("slots"))
        {
            if started.elapsed() > CONVERGE_TIMEOUT {
                return Err(other(format!("lb{} never took {name}", i + 1)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    };
    write(skewed, &members)?;
    took(skewed)?;
    let after = fleet.open_connections(CONNECTIONS, EVERY)?;
    before.settle(2, SETTLE_TIMEOUT);
    after.settle(2, SETTLE_TIMEOUT);
    let witness = others(fleet, skewed)[0];
    let mut old_table = Vec::new();
    for r in before.reports().iter().chain(&after.reports()) {
        old_table.push(trace(fleet, witness, r.local_port)?.0);
    }
    for i in others(fleet, skewed) {
        write(i, &members)?;
        took(i)?;
    }
    let mut new_table = Vec::new();
    for r in before.reports().iter().chain(&after.reports()) {
        new_table.push(trace(fleet, witness, r.local_port)?.0);
    }
    let chained_before: u64 = others(fleet, skewed)
        .iter()
        .map(|i| fleet.second_chance_packets(*i))
        .sum();
    fleet.set_link(skewed, false)?;
    fleet
        .wait_for_next_hops(&others(fleet, skewed), CONVERGE_TIMEOUT)
        .ok_or_else(|| other("the router kept the lost load balancer"))?;
    before.settle(SETTLE_EXCHANGES, SETTLE_TIMEOUT);
    after.settle(SETTLE_EXCHANGES, SETTLE_TIMEOUT);
    let reports: Vec<ConnectionReport> = before.stop().into_iter().chain(after.stop()).collect();
    let mut result = ConfigSkew {
        second_chance,
        connections_total: reports.len(),
        chained_packets: others(fleet, skewed)
            .iter()
            .map(|i| fleet.second_chance_packets(*i))
            .sum::<u64>()
            - chained_before,
        ..ConfigSkew::default()
    };
    for ((r, old), new) in reports.iter().zip(&old_table).zip(&new_table) {
        let moved = r.backend != *new;
        result.moved += usize::from(moved);
        if r.broken.is_some() {
            result.broken_connections += 1;
            result.broken_explained += usize::from(moved && r.backend == *old);
        }
    }
    fleet.set_link(skewed, true)?;
    Ok(result)
}
