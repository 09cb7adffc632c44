//! Builds the XDP object (`lb-ebpf`) with the pinned nightly and bpf-linker that
//! `cargo xtask setup` installs, and embeds it into the binary.

use std::{env, path::PathBuf};

use anyhow::{Context as _, anyhow};

/// The eBPF toolchain; keep in step with xtask's `toolchain.rs`.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    // bpf-linker lives in xtask's cache dir; put it on PATH for the nested cargo build.
    let home = env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    let cache = env::var_os("MLB_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or(home.join(".cache/mlb"));
    let linker_bin = cache.join("bpf-linker/bin");
    println!("cargo:rerun-if-env-changed=MLB_CACHE_DIR");
    println!(
        "cargo:rerun-if-changed={}",
        linker_bin.join("bpf-linker").display()
    );
    if env::var_os("AYA_BUILD_SKIP").is_none() && !linker_bin.join("bpf-linker").exists() {
        return Err(anyhow!(
            "bpf-linker not found in {}: run `cargo xtask setup` first",
            linker_bin.display()
        ));
    }
    let path = env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![linker_bin];
    paths.extend(env::split_paths(&path));
    // SAFETY: build scripts are single-threaded.
    unsafe { env::set_var("PATH", env::join_paths(paths)?) };

    // The commit, for mlb_build_info (absent outside a git checkout).
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if let Some(commit) = commit {
        println!("cargo:rustc-env=MLB_GIT_COMMIT={commit}");
    }
    println!("cargo:rerun-if-changed=../.git/HEAD");
    println!("cargo:rerun-if-changed=../.git/refs/heads");

    let metadata = cargo_metadata()?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: &metadata,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
    .context("building the XDP program (lb-ebpf)")
}

fn cargo_metadata() -> anyhow::Result<String> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.parent().context("workspace root")?.join("lb-ebpf");
    Ok(root.to_str().context("utf-8 path")?.to_owned())
}
