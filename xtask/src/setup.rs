//! Bootstrap of a fresh machine, idempotent and quick when everything is present:
//! the pinned eBPF nightly (with rust-src), bpf-linker built against that nightly's own
//! libLLVM (Debian has no LLVM 22), and the Debian packages the tests use.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::status::run_with_status;

/// The nightly that builds the eBPF crate; keep in step with lb-userspace/build.rs.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";

/// Commands the tests and the demo run, and the Debian package that provides each.
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("ping", "iputils-ping"),
    ("sysctl", "procps"),
    ("nsenter", "util-linux"),
    ("python3", "python3"),
    ("promtool", "prometheus"),
    ("nft", "nftables"),
    ("bird", "bird2"),
];

/// Where bpf-linker and its LLVM prefix live: `$MLB_CACHE_DIR`, else `~/.cache/mlb`
/// (the same rule as lb-userspace/build.rs).
/// The workspace's root directory (xtask's parent).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

pub fn cache_dir() -> PathBuf {
    env::var_os("MLB_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| "/root".into())
                .join(".cache/mlb")
        })
}

pub fn run() -> anyhow::Result<()> {
    ensure_toolchain()?;
    ensure_bpf_linker()?;
    ensure_packages(PACKAGES)?;
    Ok(())
}

fn sysroot() -> anyhow::Result<Option<PathBuf>> {
    let out = Command::new("rustc")
        .arg(format!("+{EBPF_TOOLCHAIN}"))
        .args(["--print", "sysroot"])
        .output();
    match out {
        Ok(out) if out.status.success() => {
            Ok(Some(PathBuf::from(String::from_utf8(out.stdout)?.trim())))
        }
        _ => Ok(None),
    }
}

fn ensure_toolchain() -> anyhow::Result<()> {
    if let Some(sysroot) = sysroot()?
        && sysroot.join("lib/rustlib/src/rust/library/core").exists()
    {
        println!("✓ eBPF toolchain {EBPF_TOOLCHAIN} with rust-src (present)");
        return Ok(());
    }
    run_with_status(
        &format!("installing eBPF toolchain {EBPF_TOOLCHAIN} with rust-src"),
        Command::new("rustup").args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]),
    )
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    let cache = cache_dir();
    let root = cache.join("bpf-linker");
    let stamp = root.join("stamp");
    let want = format!("bpf-linker {BPF_LINKER_VERSION} for {EBPF_TOOLCHAIN}");
    if root.join("bin/bpf-linker").exists() && fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        println!("✓ {want} (present)");
        return Ok(());
    }
    let prefix = llvm_prefix(&cache)?;
    run_with_status(
        &format!("building {want} (about a minute)"),
        Command::new("cargo")
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                BPF_LINKER_LLVM_FEATURE,
                "--root",
            ])
            .arg(&root)
            .env("LLVM_PREFIX", &prefix),
    )?;
    fs::write(&stamp, want)?;
    Ok(())
}

/// A directory whose `lib/` holds the nightly's libLLVM under the names bpf-linker links
/// against (`libLLVM.so`) and loads at run time (its soname). It must stay in place.
fn llvm_prefix(cache: &Path) -> anyhow::Result<PathBuf> {
    let sysroot = sysroot()?.context("the eBPF toolchain is not installed")?;
    let lib = sysroot.join("lib");
    let llvm = fs::read_dir(&lib)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let prefix = cache.join(format!("llvm-{EBPF_TOOLCHAIN}"));
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for name in [
        Path::new("libLLVM.so"),
        Path::new(llvm.file_name().expect("file name")),
    ] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        symlink(&llvm, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(prefix)
}

fn have(command: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs the Debian packages of any missing command.
pub fn ensure_packages(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(command, _)| !have(command))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        println!(
            "✓ Debian packages {} (present)",
            packages
                .iter()
                .map(|(_, p)| *p)
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}: install them or run as root",
            missing.join(" ")
        );
    }
    run_with_status(
        "apt-get update",
        Command::new("apt-get").args(["update", "-q"]),
    )?;
    run_with_status(
        &format!("installing {}", missing.join(" ")),
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}
