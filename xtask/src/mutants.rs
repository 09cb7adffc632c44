//! `cargo xtask mutants [common|daemon|all] [--file F] [--re R]`: cargo-mutants over what
//! the tests must guard most closely — `lb-common`'s Maglev builder, flow hash and
//! connection-table rules, and the daemon's
//! reconcile and health-state modules (against the daemon's unit tests only: its integration
//! tests need root and minutes each). Not in CI: it rebuilds once per mutant. Scoped so that
//! each part finishes on two cores in well under an hour; `--file` narrows a part to one
//! file, `--re` to the mutants named (the survivors of a last run, say), so that a shared
//! machine re-tests only what changed. Results: `target/mutants/<part>/`. The survivors
//! that cannot be killed, and why: `docs/mutants.md`.

use std::process::Command;

use anyhow::{Context as _, bail};

/// The cargo-mutants release this is written against (installed if missing).
const CARGO_MUTANTS: &str = "27.1.0";

#[derive(clap::Args)]
pub struct Args {
    /// Which part: `common` (Maglev, hash, connection table), `daemon` (reconcile, health) or `all`.
    #[arg(default_value = "all")]
    part: String,
    /// Parallel build/test jobs (each is a full build tree).
    #[arg(long, default_value_t = 1)]
    jobs: u32,
    /// Only these of the part's files (repeatable; as listed in `PARTS`).
    #[arg(long)]
    file: Vec<String>,
    /// Only the mutants whose names match (repeatable; regexes over `cargo mutants --list`).
    #[arg(long)]
    re: Vec<String>,
}

struct Part {
    name: &'static str,
    package: &'static str,
    files: &'static [&'static str],
    /// Cargo features to build and test with.
    features: &'static [&'static str],
    /// Extra arguments of every cargo invocation (build and test alike).
    cargo_args: &'static [&'static str],
    /// Mutants not examined (regexes over the names `cargo mutants --list` shows).
    exclude: &'static [&'static str],
}

const PARTS: &[Part] = &[
    Part {
        name: "common",
        // Maglev, the flow hash and the connection table's rules (shared with the kernel).
        package: "lb-common",
        files: &[
            "lb-common/src/hash.rs",
            "lb-common/src/maglev/mod.rs",
            "lb-common/src/maglev/fill.rs",
            "lb-common/src/maglev/permutation.rs",
            "lb-common/src/maglev/primes.rs",
            "lb-common/src/maglev/diff.rs",
            "lb-common/src/conntrack.rs",
        ],
        features: &["user"],
        cargo_args: &[],
        exclude: &[],
    },
    Part {
        name: "daemon",
        package: "lb-userspace",
        files: &[
            // The decisions; probe.rs, task.rs and mod.rs do I/O that only the root
            // integration tests exercise.
            "lb-userspace/src/reconcile.rs",
            "lb-userspace/src/health/state.rs",
        ],
        features: &[],
        // The unit tests only: building every integration test costs each mutant ~100 s.
        cargo_args: &["--lib"],
        // One-line forwarders to the real data plane: the root tests exercise them.
        exclude: &["impl DataplaneOps for Dataplane"],
    },
];

fn ensure_installed() -> anyhow::Result<()> {
    let have = Command::new("cargo")
        .args(["mutants", "--version"])
        .output();
    if have.is_ok_and(|o| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_MUTANTS)
    }) {
        return Ok(());
    }
    println!("▶ cargo install cargo-mutants@{CARGO_MUTANTS} --locked");
    let status = Command::new("cargo")
        .args([
            "install",
            &format!("cargo-mutants@{CARGO_MUTANTS}"),
            "--locked",
        ])
        .status()
        .context("running cargo install")?;
    if !status.success() {
        bail!("installing cargo-mutants failed");
    }
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let parts: Vec<&Part> = PARTS
        .iter()
        .filter(|p| args.part == "all" || p.name == args.part)
        .collect();
    if parts.is_empty() {
        bail!("unknown part {:?}: common, daemon or all", args.part);
    }
    crate::setup::run()?;
    ensure_installed()?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the workspace root")?;
    let mut failed = Vec::new();
    for part in parts {
        let files: Vec<&str> = part
            .files
            .iter()
            .copied()
            .filter(|f| args.file.is_empty() || args.file.iter().any(|a| a == f))
            .collect();
        if files.is_empty() {
            continue;
        }
        let out = root.join("target/mutants").join(part.name);
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        println!("▶ cargo mutants: {} ({})", part.name, files.join(", "));
        let mut cargo = Command::new("cargo");
        cargo
            .args([
                "mutants",
                "--package",
                part.package,
                "--test-package",
                part.package,
            ])
            .args(["--jobs", &args.jobs.to_string()])
            .arg("--output")
            .arg(&out);
        for file in &files {
            cargo.args(["--file", file]);
        }
        for re in &args.re {
            cargo.args(["--re", re]);
        }
        for feature in part.features {
            cargo.args(["--features", feature]);
        }
        for arg in part.cargo_args {
            cargo.arg(format!("--cargo-arg={arg}"));
        }
        for re in part.exclude {
            cargo.args(["--exclude-re", re]);
        }
        // cargo-mutants exits non-zero when a mutant survives: report and go on.
        if !cargo.status()?.success() {
            failed.push(part.name);
        }
        println!(
            "  survivors: {}/mutants.out/missed.txt (caught.txt, unviable.txt, timeout.txt beside it)",
            out.display()
        );
    }
    if !failed.is_empty() {
        bail!(
            "mutants survived in: {} (see the lists above)",
            failed.join(", ")
        );
    }
    Ok(())
}
