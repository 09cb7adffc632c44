//! `cargo xtask soak [--minutes N]`: the real daemon under traffic and faults for a while
//! (`benches/soak.rs`); `cargo xtask test` runs a short one.

use std::{path::PathBuf, process::Command};

use anyhow::bail;

use crate::setup;

#[derive(clap::Args)]
pub struct Args {
    /// How long to run.
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Seconds between `kill -9`s of the daemon.
    #[arg(long, default_value_t = 60)]
    daemon_every: u64,
    /// Write the summary here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Build with the dev profile instead of release: CI's short run reuses what `cargo
    /// test` built (a release build of everything would add ~6 minutes on 2 cores).
    #[arg(long)]
    dev: bool,
}

/// CI's short run: 90 s, the daemon killed every 20 s (four daemons, three full ones).
pub const SHORT: (f64, u64) = (1.5, 20);

pub fn run(args: Args) -> anyhow::Result<()> {
    setup::run()?;
    run_soak(&args)
}

/// Runs the soak (setup already done).
pub fn run_soak(args: &Args) -> anyhow::Result<()> {
    if !setup::is_root() {
        bail!("the soak test builds network namespaces and runs the daemon: run it as root");
    }
    crate::bench::build_mlb(args.dev)?;
    let mut cargo = Command::new("cargo");
    cargo.args(["bench", "-p", crate::bench::PACKAGE, "--bench", "soak"]);
    if args.dev {
        cargo.args(["--profile", "dev"]);
    }
    cargo.arg("--");
    cargo.args([
        "--minutes",
        &args.minutes.to_string(),
        "--daemon-every",
        &args.daemon_every.to_string(),
    ]);
    if let Some(json) = &args.json {
        cargo.arg("--json").arg(json);
    }
    if !cargo.status()?.success() {
        bail!("the soak test failed");
    }
    Ok(())
}

/// The short run `cargo xtask test` ends with.
pub fn short() -> Args {
    Args {
        minutes: SHORT.0,
        daemon_every: SHORT.1,
        json: None,
        dev: true,
    }
}
