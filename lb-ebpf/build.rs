//! Rebuilds when bpf-linker changes (it is tied to the pinned nightly's LLVM).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
