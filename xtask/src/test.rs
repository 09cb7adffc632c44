//! `cargo xtask test`: the whole suite on the real kernel.

use std::process::Command;

use anyhow::bail;

use crate::{package, setup, soak};

#[derive(clap::Args)]
pub struct Args {
    /// Only run tests whose name contains this.
    filter: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    setup::run()?;
    if !setup::is_root() {
        bail!("the tests load XDP programs and create network namespaces: run them as root");
    }
    // The benchmark programs make the README's figures: build them all, so none can rot.
    println!("▶ cargo test --workspace --benches --no-run (every benchmark program builds)");
    if !Command::new("cargo")
        .args(["test", "--workspace", "--benches", "--no-run"])
        .status()?
        .success()
    {
        bail!("a benchmark program does not build");
    }
    println!("▶ cargo test --workspace (unit, BPF_PROG_TEST_RUN fixtures, network namespaces)");
    let mut cargo = Command::new("cargo");
    cargo.args(["test", "--workspace", "--no-fail-fast"]);
    if let Some(filter) = &args.filter {
        cargo.arg(filter);
    }
    if !cargo.status()?.success() {
        bail!("tests failed");
    }
    if args.filter.is_none() {
        println!("▶ cargo xtask package, then dpkg -i, mlb check, man -l, dpkg --purge");
        package::check(&package::build()?)?;
        let (minutes, daemon_every) = soak::SHORT;
        println!(
            "▶ cargo xtask soak --minutes {minutes} --daemon-every {daemon_every} (the short soak)"
        );
        soak::run_soak(&soak::short())?;
    }
    Ok(())
}
