//! Time to load the XDP object (map creation and every program's verification), which is
//! most of a restarted daemon's time to serve again, and each program's size as the
//! kernel verified it. `MLB_BENCH_BASE_OBJECT=FILE` loads another build's object in the
//! same rounds (the A/B of a change to the data plane).
//!
//! `cargo bench -p mlb-benches --bench load [-- --rounds N]` (root).

use std::time::Instant;

use lb_common::consts::prog_names;
use lb_userspace::dataplane::{Capacities, Dataplane, OBJECT};

#[derive(clap::Parser)]
struct Args {
    /// Loads of each object, alternating.
    #[arg(long, default_value_t = 11)]
    rounds: usize,
    /// Accepted for `cargo bench`'s own argument.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let Args { rounds, .. } = clap::Parser::parse();
    let base = std::env::var("MLB_BENCH_BASE_OBJECT").ok().map(|path| {
        std::fs::read(&path).unwrap_or_else(|e| panic!("MLB_BENCH_BASE_OBJECT {path}: {e}"))
    });
    let mut objects: Vec<(&str, &[u8])> = vec![("this build", OBJECT)];
    if let Some(base) = &base {
        objects.push(("base", base));
    }
    // The daemon's default capacities: the maps it creates on a first start.
    let caps = Capacities::default();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); objects.len()];
    let mut sizes = vec![Vec::new(); objects.len()];
    for round in 0..rounds {
        for (i, (_, object)) in objects.iter().enumerate() {
            let started = Instant::now();
            let mut dataplane =
                Dataplane::load_object(caps, object).unwrap_or_else(|e| panic!("{e}"));
            times[i].push(started.elapsed().as_secs_f64() * 1e3);
            if round == 0 {
                for name in [prog_names::LB_INGRESS, prog_names::LB_DECAP] {
                    let info = dataplane.xdp(name).unwrap().info().unwrap();
                    sizes[i].push((
                        name,
                        info.verified_instruction_count().unwrap_or(0),
                        info.size_translated().unwrap_or(0) / 8,
                    ));
                }
            }
        }
    }
    for (i, (label, object)) in objects.iter().enumerate() {
        times[i].sort_by(f64::total_cmp);
        let median = times[i][times[i].len() / 2];
        println!(
            "{label}: object {} bytes; load {median:.0} ms median of {rounds} (min {:.0}, max {:.0})",
            object.len(),
            times[i][0],
            times[i][times[i].len() - 1]
        );
        for (name, verified, insns) in &sizes[i] {
            println!("  {name}: {insns} instructions, {verified} processed by the verifier");
        }
    }
}
