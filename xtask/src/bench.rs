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

pub fn run(bench: Bench) -> anyhow::Result<()> {
    if let Bench::All { quick } = bench {
        return crate::report::run(quick);
    }
    setup::run()?;
    let mut cargo = Command::new("cargo");
    match bench {
        Bench::All { .. } => unreachable!("handled above"),
        Bench::Throughput { json } => {
            if !setup::is_root() {
                bail!(
                    "the throughput benchmark creates network namespaces and loads XDP programs: \
                     run it as root"
                );
            }
            cargo.args(["bench", "-p", "lb-userspace", "--bench", "throughput", "--"]);
            if let Some(json) = json {
                cargo.arg("--json").arg(json);
            }
        }
        Bench::Scaling { json } => {
            if !setup::is_root() {
                bail!(
                    "the scaling benchmark loads the XDP program into the kernel: run it as root"
                );
            }
            cargo.args(["bench", "-p", "lb-userspace", "--bench", "scaling", "--"]);
            if let Some(json) = json {
                cargo.arg("--json").arg(json);
            }
        }
        Bench::Xdp { json, calls, only } => {
            if !setup::is_root() {
                bail!("the XDP benchmark loads the program into the kernel: run it as root");
            }
            cargo.args([
                "bench",
                "-p",
                "lb-userspace",
                "--bench",
                "xdp",
                "--",
                "--calls",
            ]);
            cargo.arg(calls.to_string());
            if let Some(only) = only {
                cargo.arg("--only").arg(only);
            }
            if let Some(json) = json {
                cargo.arg("--json").arg(json);
            }
        }
        Bench::Failover { json } => {
            if !setup::is_root() {
                bail!(
                    "the failover benchmark builds network namespaces and runs the daemon: run it as root"
                );
            }
            cargo.args(["bench", "-p", "lb-userspace", "--bench", "failover", "--"]);
            if let Some(json) = json {
                cargo.arg("--json").arg(json);
            }
        }
        Bench::Fleet { json } => {
            if !setup::is_root() {
                bail!(
                    "the fleet benchmark builds network namespaces and runs daemons: run it as root"
                );
            }
            cargo.args(["bench", "-p", "lb-userspace", "--bench", "fleet", "--"]);
            if let Some(json) = json {
                cargo.arg("--json").arg(json);
            }
        }
        Bench::Memory { json } => {
            if !setup::is_root() {
                bail!("the memory benchmark creates BPF maps: run it as root");
            }
            cargo.args(["bench", "-p", "lb-userspace", "--bench", "memory", "--"]);
            if let Some(json) = json {
                cargo.arg("--json").arg(json);
            }
        }
        Bench::Maglev { json, quick } => {
            cargo.args([
                "bench",
                "-p",
                "lb-common",
                "--features",
                "user",
                "--bench",
                "maglev",
                "--",
            ]);
            if let Some(json) = json {
                cargo.arg("--json").arg(json);
            }
            if quick {
                cargo.arg("--quick");
            }
        }
    }
    if !cargo.status()?.success() {
        bail!("benchmark failed");
    }
    Ok(())
}
