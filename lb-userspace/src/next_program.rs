//! `interfaces[].next_program`: another XDP program, pinned by its owner, that gets the
//! packets not for a Vip arriving on that interface (a tail call from `lb_ingress`, see
//! lb-ebpf's `next.rs`). Set on start and on every reload; a pin that is missing or not
//! an XDP program refuses the config, and the one in force stays.

use std::{
    ffi::CString,
    os::{fd::AsFd as _, fd::AsRawFd as _, fd::OwnedFd, unix::ffi::OsStrExt as _},
    path::{Path, PathBuf},
};

use crate::{
    bpf_sys::{BPF_OBJ_GET, ObjGetAttr, bpf_fd},
    config::Interface,
    dataplane::Dataplane,
};

/// `BPF_PROG_TYPE_XDP` in linux/bpf.h.
const BPF_PROG_TYPE_XDP: u32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum NextProgramError {
    #[error("interface {interface}: next_program {path}: {problem}")]
    Program {
        interface: String,
        path: PathBuf,
        problem: String,
    },
    #[error("interface {interface}: {error}")]
    Interface { interface: String, error: String },
    #[error(
        "next programs: {0}\n  (the kernel refuses a program lb_ingress cannot tail-call, such \
         as one loaded with frags, xdp.frags)"
    )]
    Install(String),
}

/// Opens each interface's next program and hands them to the data plane: all or none.
pub fn install(
    dataplane: &mut Dataplane,
    interfaces: &[Interface],
) -> Result<(), NextProgramError> {
    let mut next = Vec::new();
    for interface in interfaces {
        let Some(path) = &interface.next_program else {
            continue;
        };
        let program = open(path).map_err(|problem| NextProgramError::Program {
            interface: interface.name.clone(),
            path: path.clone(),
            problem,
        })?;
        let ifindex = ifindex(&interface.name).map_err(|e| NextProgramError::Interface {
            interface: interface.name.clone(),
            error: e.to_string(),
        })?;
        next.push((ifindex, program));
    }
    // Every interface the same program (one NIC, most often): no choice per interface to
    // make, so it takes `lb_next`'s place and the packet skips one tail call and a lookup.
    let first = interfaces.first().and_then(|i| i.next_program.as_ref());
    let everywhere = first.is_some() && interfaces.iter().all(|i| i.next_program.as_ref() == first);
    let result = match (everywhere, next.first()) {
        (true, Some((_, fd))) => dataplane.set_next_program_everywhere(fd.as_fd()),
        _ => {
            let fds: Vec<_> = next.iter().map(|(i, fd)| (*i, fd.as_fd())).collect();
            dataplane.set_next_programs(&fds)
        }
    };
    result.map_err(|e| NextProgramError::Install(e.to_string()))
}

/// The XDP program pinned at `path`, or why it is not one.
pub fn open(path: &Path) -> Result<OwnedFd, String> {
    let name = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let mut attr = ObjGetAttr {
        pathname: name.as_ptr() as u64,
        ..ObjGetAttr::default()
    };
    // `name` outlives the call.
    let fd = bpf_fd(BPF_OBJ_GET, &mut attr).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) => "nothing is pinned there".to_owned(),
        _ => format!("not a pinned BPF object ({e})"),
    })?;
    // fdinfo says what the object is: only programs have a `prog_type`.
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
        .map_err(|e| e.to_string())?;
    let prog_type = info
        .lines()
        .find_map(|l| l.strip_prefix("prog_type:"))
        .map(|t| t.trim().parse::<u32>().unwrap_or(u32::MAX));
    match prog_type {
        Some(BPF_PROG_TYPE_XDP) => Ok(fd),
        Some(t) => Err(format!(
            "a BPF program of type {t}, not XDP ({BPF_PROG_TYPE_XDP})"
        )),
        None => Err("a pinned BPF map or link, not a program".to_owned()),
    }
}

fn ifindex(name: &str) -> std::io::Result<u32> {
    let c = CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: a valid C string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(std::io::Error::last_os_error()),
        i => Ok(i),
    }
}
