//! Test scaffolding for `mlb`, never shipped: network namespaces ([`netns`]), the
//! client / load balancer / backends topology ([`testbed`]) and the real daemon in it
//! ([`daemon`]), a fleet behind an ECMP router ([`fleet`]), the BPF_PROG_TEST_RUN lab with
//! its packet builders and model ([`lab`], [`packets`], [`model`]), a next program to chain
//! after `lb_ingress` ([`next`]), and what the
//! benchmarks share ([`bench`]: CPU pinning, fit, JSON). Used by `lb-userspace`'s tests, `benches/` and the demos.

pub mod bench;
pub mod daemon;
pub mod fleet;
pub mod lab;
pub mod model;
pub mod netns;
pub mod next;
pub mod packets;
pub mod testbed;

use std::path::PathBuf;

/// A data-plane counter from `mlb status` text (its `counters:` line lists the non-zero
/// ones as `name=value`); 0 when absent.
pub fn status_counter(status: &str, name: &str) -> u64 {
    let prefix = format!("{name}=");
    status
        .lines()
        .find(|l| l.starts_with("counters:"))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|c| c.strip_prefix(prefix.as_str()))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The backend test server (TCP, HTTP and UDP, with a fail switch) the testbeds run.
pub const BACKEND_SERVER: &str = include_str!("backend_server.py");

/// The `mlb` binary the tests and benchmarks run: `$MLB_BIN`, else the one cargo built
/// beside the running test or bench executable (`target/<profile>/deps/X` →
/// `target/<profile>/mlb`), which is where `CARGO_BIN_EXE_mlb` points for lb-userspace's
/// own tests. Benches of another crate get no `CARGO_BIN_EXE_mlb`; xtask builds mlb first.
pub fn mlb_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("MLB_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("a test executable lives in target/<profile>/deps");
    let bin = profile_dir.join("mlb");
    assert!(
        bin.exists(),
        "{} is missing: build it (`cargo build -p lb-userspace --bin mlb` with the same \
         profile) or set MLB_BIN",
        bin.display()
    );
    bin
}
