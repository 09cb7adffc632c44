//! `cargo xtask demo`: builds mlb and runs the demo (root).

use std::process::Command;

use anyhow::bail;

use crate::{setup, status::run_with_status};

#[derive(clap::Args)]
pub struct Args {
    /// Three load balancers behind an ECMP router (BGP via BIRD) instead of one.
    #[arg(long)]
    fleet: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    setup::run()?;
    if !setup::is_root() {
        bail!("the demo creates network namespaces and loads XDP programs: run it as root");
    }
    run_with_status(
        "building mlb and the demo",
        Command::new("cargo").args(["build", "-p", "lb-userspace", "-p", "lb-testbed", "--bins"]),
    )?;
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let mlb = format!("{target}/debug/mlb");
    let status = if args.fleet {
        Command::new(format!("{target}/debug/mlb-fleet-demo"))
            .args(["--mlb", &mlb])
            .status()?
    } else {
        Command::new(format!("{target}/debug/mlb-demo"))
            .args(["--mlb", &mlb, "--config", "config/demo.yaml"])
            .status()?
    };
    if !status.success() {
        bail!("the demo failed");
    }
    Ok(())
}
