//! `cargo xtask bench …`: each benchmark prints a table and can write JSON.

use std::{path::PathBuf, process::Command};

use anyhow::bail;

use crate::setup;

#[derive(clap::Subcommand)]
pub enum Bench {
    /// Per-packet cost of the XDP program (BPF_PROG_TEST_RUN), against an empty XDP
    /// program in the same run. Root.
    Xdp {
        /// Write the figures here as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Calls per path for the one-packet-per-call method.
        #[arg(long, default_value_t = 200_000)]
        calls: u32,
        /// Only the paths whose name contains this (and the baselines).
        #[arg(long)]
        only: Option<String>,
    },
    /// Kernel memory locked by the maps for 1, 16 and 256 Vips. Root.
    Memory {
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Failover on the real daemon in network namespaces: detection, detection to live
    /// table, failed connections per backend failure under load. Root.
    Failover {
        #[arg(long)]
        json: Option<PathBuf>,
        /// Vips sharing the failing backend's pool (the load goes to one of them).
        #[arg(long, default_value_t = 1)]
        vips: u32,
    },
    /// Forwarding throughput through the real data plane against nftables DNAT and plain
    /// routing in the same run, on veth in network namespaces; ratios per core. Root.
    Throughput {
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Per-packet cost as Vips, backends per Vip and active flows grow (BPF_PROG_TEST_RUN).
    /// Root.
    Scaling {
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Three load balancers behind a BGP/ECMP router in network namespaces, through a
    /// box lost, a box without backends, maintenance, a rolling restart and config skew:
    /// broken connections and convergence times. Root.
    Fleet {
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Every benchmark under a live display; JSON and one Markdown report with SVG plots
    /// in bench-results/. Root.
    All {
        /// Fewer calls, shorter runs: for a look, not for the record.
        #[arg(long)]
        quick: bool,
    },
    /// MaglevTable build time, balance and disruption.
    Maglev {
        #[arg(long)]
        json: Option<PathBuf>,
        /// Fewer repetitions, for a quick look.
        #[arg(long)]
        quick: bool,
    },
}

/// The crate holding every benchmark program (`benches/`).
pub const PACKAGE: &str = "mlb-benches";

pub fn run(bench: Bench) -> anyhow::Result<()> {
    if let Bench::All { quick } = bench {
        return crate::report::run(quick);
    }
    setup::run()?;
    // (bench target, why it needs root, its own arguments)
    let (name, root_for, args): (&str, Option<&str>, Vec<String>) = match bench {
        Bench::All { .. } => unreachable!("handled above"),
        Bench::Throughput { json } => (
            "throughput",
            Some("creates network namespaces and loads XDP programs"),
            json_arg(json),
        ),
        Bench::Scaling { json } => (
            "scaling",
            Some("loads the XDP program into the kernel"),
            json_arg(json),
        ),
        Bench::Xdp { json, calls, only } => {
            let mut args = vec!["--calls".to_owned(), calls.to_string()];
            if let Some(only) = only {
                args.extend(["--only".to_owned(), only]);
            }
            args.extend(json_arg(json));
            ("xdp", Some("loads the program into the kernel"), args)
        }
        Bench::Failover { json, vips } => {
            let mut args = vec!["--vips".to_owned(), vips.to_string()];
            args.extend(json_arg(json));
            (
                "failover",
                Some("builds network namespaces and runs the daemon"),
                args,
            )
        }
        Bench::Fleet { json } => (
            "fleet",
            Some("builds network namespaces and runs daemons"),
            json_arg(json),
        ),
        Bench::Memory { json } => ("memory", Some("creates BPF maps"), json_arg(json)),
        Bench::Maglev { json, quick } => {
            let mut args = json_arg(json);
            if quick {
                args.push("--quick".to_owned());
            }
            ("maglev", None, args)
        }
    };
    if let Some(why) = root_for
        && !setup::is_root()
    {
        bail!("the {name} benchmark {why}: run it as root");
    }
    // Only these run the daemon binary; the others load the data plane in-process.
    if matches!(name, "failover" | "fleet") {
        build_mlb(false)?;
    }
    let mut cargo = Command::new("cargo");
    cargo.args(["bench", "-p", PACKAGE, "--bench", name, "--"]);
    cargo.args(args);
    if !cargo.status()?.success() {
        bail!("benchmark failed");
    }
    Ok(())
}

fn json_arg(json: Option<PathBuf>) -> Vec<String> {
    json.map(|j| vec!["--json".to_owned(), j.display().to_string()])
        .unwrap_or_default()
}

/// Builds the `mlb` binary the daemon benchmarks run (`lb_testbed::mlb_bin` finds it
/// beside the bench executable): a bench crate gets no `CARGO_BIN_EXE_mlb`.
pub fn build_mlb(dev: bool) -> anyhow::Result<()> {
    let profile = if dev { "dev" } else { "release" };
    crate::status::run_with_status(
        &format!("building mlb ({profile})"),
        Command::new("cargo")
            .current_dir(setup::workspace_root())
            .args([
                "build",
                "-p",
                "lb-userspace",
                "--bin",
                "mlb",
                "--profile",
                profile,
            ]),
    )
}
