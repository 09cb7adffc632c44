//! The few `bpf(2)` commands aya 0.14 does not wrap (batch operations, a per-CPU lookup
//! into a caller's buffer, a test run on a bare program fd, a pinned object of any kind,
//! a program array slot set from a bare fd): command numbers and attribute layouts from `union bpf_attr`
//! in linux/bpf.h.

use std::io;

pub const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
pub const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
pub const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
pub const BPF_OBJ_GET: libc::c_long = 7;
pub const BPF_PROG_TEST_RUN: libc::c_long = 10;
pub const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
pub const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The kernel's internal "not supported" errno, which bpf(2) can return.
pub const ENOTSUPP: i32 = 524;

/// `BPF_MAP_*_ELEM`.
#[repr(C)]
#[derive(Default)]
pub struct LookupAttr {
    pub map_fd: u32,
    pub _pad: u32,
    pub key: u64,
    pub value: u64,
    pub flags: u64,
}

/// `BPF_OBJ_GET`.
#[repr(C)]
#[derive(Default)]
pub struct ObjGetAttr {
    pub pathname: u64,
    pub bpf_fd: u32,
    pub file_flags: u32,
    pub path_fd: i32,
    pub _pad: u32,
}

/// `BPF_MAP_*_BATCH`.
#[repr(C)]
#[derive(Default)]
pub struct BatchAttr {
    pub in_batch: u64,
    pub out_batch: u64,
    pub keys: u64,
    pub values: u64,
    pub count: u32,
    pub map_fd: u32,
    pub elem_flags: u64,
    pub flags: u64,
}

/// `BPF_PROG_TEST_RUN` (the `test` member).
#[repr(C)]
#[derive(Default)]
pub struct TestAttr {
    pub prog_fd: u32,
    pub retval: u32,
    pub data_size_in: u32,
    pub data_size_out: u32,
    pub data_in: u64,
    pub data_out: u64,
    pub repeat: u32,
    pub duration: u32,
    pub ctx_size_in: u32,
    pub ctx_size_out: u32,
    pub ctx_in: u64,
    pub ctx_out: u64,
    pub flags: u32,
    pub cpu: u32,
    pub batch_size: u32,
    pub _pad: u32,
}

/// Runs `command` with `attr`. The caller makes every pointer in `attr` point at a live
/// buffer of the size the kernel will read or write.
pub fn bpf<T>(command: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is the #[repr(C)] layout the command expects; its pointers are the
    // caller's to keep valid (see above).
    let rc = unsafe { libc::syscall(libc::SYS_bpf, command, attr as *mut T, size_of::<T>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// [`bpf`] for a command that returns a new file descriptor.
pub fn bpf_fd<T>(command: libc::c_long, attr: &mut T) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: as in `bpf`.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, command, attr as *mut T, size_of::<T>()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor, ours alone.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(rc as i32) })
}
