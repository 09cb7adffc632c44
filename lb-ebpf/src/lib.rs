//! Empty: the programs are in the `lb-ebpf` binary. This target only lets `lb-userspace`
//! list the crate as a build-dependency, so cargo rebuilds it when the programs change.
#![no_std]
