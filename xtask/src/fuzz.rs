//! `cargo xtask fuzz xdp --minutes N` / `fuzz config|control --cases N`: the fuzz targets of
//! the test suite (`lb-userspace/tests/{xdp,config,control}_fuzz.rs`) with a longer budget
//! than `cargo xtask test` gives them.

use std::process::Command;

use anyhow::bail;

use crate::setup;

/// Read by the fuzz test: its budget in seconds, and its random seed.
const FUZZ_SECONDS: &str = "MLB_FUZZ_SECONDS";
const FUZZ_SEED: &str = "MLB_FUZZ_SEED";
const FUZZ_CASES: &str = "MLB_FUZZ_CASES";

#[derive(clap::Subcommand)]
pub enum Fuzz {
    /// BPF_PROG_TEST_RUN on the real program against the userspace model (root).
    Xdp {
        /// How long to fuzz.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// Random seed (default: from the clock; printed either way).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// The YAML loader and validator (proptest; no privileges).
    Config {
        #[arg(long, default_value_t = 100_000)]
        cases: u64,
    },
    /// The control-socket protocol against the real server (proptest; no privileges).
    Control {
        #[arg(long, default_value_t = 20_000)]
        cases: u64,
    },
}

pub fn run(fuzz: Fuzz) -> anyhow::Result<()> {
    let (target, cases) = match fuzz {
        Fuzz::Xdp { minutes, seed } => return xdp(minutes, seed),
        Fuzz::Config { cases } => ("config_fuzz", cases),
        Fuzz::Control { cases } => ("control_fuzz", cases),
    };
    println!("▶ {target}: {cases} cases per property");
    let status = Command::new("cargo")
        .args(["test", "-p", "lb-userspace", "--test", target])
        .args(["--", "--nocapture"])
        .env(FUZZ_CASES, cases.to_string())
        .status()?;
    if !status.success() {
        bail!(
            "{target} failed: the shrunk input is printed above (and its seed kept in tests/{target}.regressions)"
        );
    }
    Ok(())
}

fn xdp(minutes: u64, seed: Option<u64>) -> anyhow::Result<()> {
    setup::run()?;
    if !setup::is_root() {
        bail!("the XDP fuzzer loads the program and creates a network namespace: run it as root");
    }
    println!("▶ xdp fuzz for {minutes} min (cargo test -p lb-userspace --test xdp_fuzz)");
    let mut cargo = Command::new("cargo");
    cargo
        .args(["test", "-p", "lb-userspace", "--test", "xdp_fuzz"])
        .args(["--", "--nocapture"])
        .env(FUZZ_SECONDS, (minutes * 60).to_string());
    if let Some(seed) = seed {
        cargo.env(FUZZ_SEED, seed.to_string());
    }
    if !cargo.status()?.success() {
        bail!("the XDP fuzzer found frames where the program and its model disagree");
    }
    Ok(())
}
