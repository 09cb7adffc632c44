//! A next program to chain after `lb_ingress` (`interfaces[].next_program`): `count_next`
//! from the `lb-bench` object, which counts the packets it gets and returns the verdict
//! it was loaded with.

use std::{
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{Ebpf, EbpfLoader, maps::PerCpuArray, programs::Xdp};
use lb_common::consts::prog_names;
use lb_userspace::dataplane::BENCH_OBJECT;

pub struct CountNext {
    ebpf: Ebpf,
    pin: Option<PathBuf>,
}

impl CountNext {
    /// Loads (verifies) `count_next` returning `verdict`.
    pub fn load(verdict: u32) -> Self {
        let mut ebpf = EbpfLoader::new()
            // The LRU baseline beside it is never used here.
            .map_max_entries("LRU", 1)
            .override_global("NEXT_VERDICT", &verdict, true)
            .load(BENCH_OBJECT)
            .expect("loading lb-bench");
        ebpf.program_mut(prog_names::COUNT_NEXT)
            .map(|p| <&mut Xdp>::try_from(p).expect("an XDP program"))
            .expect("count_next")
            .load()
            .expect("verifying count_next");
        Self { ebpf, pin: None }
    }

    fn program(&self) -> &Xdp {
        self.ebpf
            .program(prog_names::COUNT_NEXT)
            .map(|p| <&Xdp>::try_from(p).expect("an XDP program"))
            .expect("count_next")
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.program().fd().expect("loaded").as_fd()
    }

    /// Pins the program at `path` (bpffs), unpinned again on drop.
    pub fn pin(&mut self, path: &Path) {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(prog_names::COUNT_NEXT)
            .expect("count_next")
            .try_into()
            .expect("an XDP program");
        program.pin(path).expect("pinning count_next");
        self.pin = Some(path.to_owned());
    }

    /// Packets it got, all CPUs.
    pub fn count(&self) -> u64 {
        let map = self.ebpf.map("COUNTED").expect("COUNTED");
        let counted: PerCpuArray<_, u64> = PerCpuArray::try_from(map).expect("a per-CPU array");
        counted.get(&0, 0).expect("slot 0").iter().sum()
    }
}

impl Drop for CountNext {
    fn drop(&mut self) {
        if let Some(pin) = &self.pin {
            let _ = std::fs::remove_file(pin);
        }
    }
}
