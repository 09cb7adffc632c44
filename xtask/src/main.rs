//! `cargo xtask`: everything beyond `cargo build`, each step installing what it needs.

mod bench;
mod chart;
mod demo;
mod fuzz;
mod mutants;
mod package;
mod report;
mod setup;
mod soak;
mod status;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test, demo and benchmark the mlb load balancer", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The demo: the real load balancer in front of three real HTTP backends in network
    /// namespaces; traffic, one backend taken away, then back. `--fleet`: three load
    /// balancers behind an ECMP router, one taken away. Root.
    Demo(demo::Args),
    /// Install what building and testing need: the pinned eBPF nightly with rust-src,
    /// bpf-linker built against it, Debian packages. Quick when all is there.
    Setup,
    /// The whole test suite: unit tests, BPF_PROG_TEST_RUN fixtures on the real XDP
    /// program, network-namespace tests (root). Runs `setup` first.
    Test(test::Args),
    /// Benchmarks; figures are printed and written as JSON.
    #[command(subcommand)]
    Bench(bench::Bench),
    /// The soak test: the real daemon in network namespaces under continuous traffic, a
    /// reload every second, backends and the daemon killed; asserts zero broken
    /// connections to healthy backends and flat memory, fds and tasks. Root.
    Soak(soak::Args),
    /// Fuzzers with a longer budget than the test suite gives them.
    #[command(subcommand)]
    Fuzz(fuzz::Fuzz),
    /// cargo-mutants over the Maglev builder, the flow hash, the connection-table rules, reconcile and health (long;
    /// not in CI).
    Mutants(mutants::Args),
    /// The Debian package: mlb, its systemd unit, /etc/mlb/lb.yaml (a conffile), shell
    /// completions and man pages, into target/debian/ (cargo-deb, installed first).
    Package(package::Args),
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Demo(args) => demo::run(args),
        Command::Setup => setup::run(),
        Command::Test(args) => test::run(args),
        Command::Bench(bench) => bench::run(bench),
        Command::Soak(args) => soak::run(args),
        Command::Fuzz(fuzz) => fuzz::run(fuzz),
        Command::Mutants(args) => mutants::run(args),
        Command::Package(args) => package::run(args),
    }
}
