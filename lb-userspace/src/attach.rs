//! Attaching `lb_ingress` to the configured interfaces so that it outlives the daemon: the
//! XDP link is pinned under the pin directory, and a restarted daemon swaps its freshly
//! loaded program into the pinned link (one atomic `bpf_link_update`) instead of
//! detaching and re-attaching.

use std::path::{Path, PathBuf};

use aya::{
    programs::{
        ProgramError, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
    sys::SyscallError,
};
use lb_common::consts::prog_names;
use tracing::{info, warn};

use crate::{
    config::{Interface, XdpModeConfig},
    dataplane::{Dataplane, enable_forwarding},
};

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(
        "attaching to {interface} ({mode}) failed: {error}\n  (EBUSY: another XDP program is \
         attached, remove it with `ip link set dev {interface} xdp off`; EOPNOTSUPP with \
         native mode: the driver has no XDP, use xdp_mode: generic or auto)"
    )]
    Attach {
        interface: String,
        mode: XdpModeConfig,
        error: String,
    },
    #[error("interface {interface}: {error}")]
    Interface { interface: String, error: String },
    #[error("pinned link {path}: {error}")]
    Pin { path: PathBuf, error: String },
}

/// The pin of the XDP link on `interface`.
pub fn link_pin(pin_dir: &Path, interface: &str) -> PathBuf {
    pin_dir.join(format!("link_{interface}"))
}

/// Attaches (or re-adopts) `lb_ingress` on `interface`; returns the XDP mode it attached
/// in (`native` or `generic`), or `None` when it re-adopted an existing attachment (which
/// keeps the mode it was made with).
pub fn attach(
    dataplane: &mut Dataplane,
    interface: &Interface,
    pin_dir: &Path,
) -> Result<Option<&'static str>, AttachError> {
    attach_program(dataplane, prog_names::LB_INGRESS, interface, pin_dir)
}

/// [`attach`] for any of the object's programs (`lb_decap` on a backend).
pub fn attach_program(
    dataplane: &mut Dataplane,
    program_name: &'static str,
    interface: &Interface,
    pin_dir: &Path,
) -> Result<Option<&'static str>, AttachError> {
    let name = &interface.name;
    enable_forwarding(name).map_err(|e| AttachError::Interface {
        interface: name.clone(),
        error: e.to_string(),
    })?;
    let pin = link_pin(pin_dir, name);
    let program = dataplane
        .xdp(program_name)
        .map_err(|e| AttachError::Interface {
            interface: name.clone(),
            error: e.to_string(),
        })?;
    if pin.exists() {
        let pinned = PinnedLink::from_pin(&pin).map_err(|e| AttachError::Pin {
            path: pin.clone(),
            error: e.to_string(),
        })?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| AttachError::Pin {
            path: pin.clone(),
            error: e.to_string(),
        })?;
        match program.attach_to_link(link) {
            Ok(_) => {
                info!(interface = %name, "re-adopted the attached program (atomic replace)");
                return Ok(None);
            }
            // The interface the link was made on is gone (deleted and recreated: a driver
            // reload, a VM or container restart): the kernel keeps the link but it is
            // attached to nothing. The pinned maps stay; a fresh link goes on the
            // interface that now has this name.
            Err(ProgramError::SyscallError(SyscallError { io_error, .. }))
                if io_error.raw_os_error() == Some(libc::ENOLINK) =>
            {
                warn!(
                    interface = %name,
                    pin = %pin.display(),
                    "the pinned link's interface is gone (recreated?): attaching a fresh link, keeping the maps"
                );
                std::fs::remove_file(&pin).map_err(|e| AttachError::Pin {
                    path: pin.clone(),
                    error: format!("removing the defunct link: {e}"),
                })?;
            }
            Err(e) => {
                return Err(AttachError::Pin {
                    path: pin.clone(),
                    error: format!(
                        "{e}\n  (to start afresh: `mlb detach`, which drops the connection table)"
                    ),
                });
            }
        }
    }
    let attach_error = |e: &dyn std::fmt::Display| AttachError::Attach {
        interface: name.clone(),
        mode: interface.xdp_mode,
        error: e.to_string(),
    };
    let (link_id, mode) = match interface.xdp_mode {
        XdpModeConfig::Native => (
            program
                .attach(name, XdpMode::Driver)
                .map_err(|e| attach_error(&e))?,
            "native",
        ),
        XdpModeConfig::Generic => (
            program
                .attach(name, XdpMode::Skb)
                .map_err(|e| attach_error(&e))?,
            "generic",
        ),
        XdpModeConfig::Auto => match program.attach(name, XdpMode::Driver) {
            Ok(id) => (id, "native"),
            Err(native) => {
                info!(interface = %name, error = %native, "native XDP unavailable, using generic");
                let id = program
                    .attach(name, XdpMode::Skb)
                    .map_err(|e| attach_error(&e))?;
                (id, "generic")
            }
        },
    };
    let link = program.take_link(link_id).map_err(|e| AttachError::Pin {
        path: pin.clone(),
        error: e.to_string(),
    })?;
    let fd_link = FdLink::try_from(link).map_err(|e| AttachError::Pin {
        path: pin.clone(),
        error: e.to_string(),
    })?;
    fd_link.pin(&pin).map_err(|e| AttachError::Pin {
        path: pin.clone(),
        error: e.to_string(),
    })?;
    info!(interface = %name, configured = %interface.xdp_mode, mode, "attached");
    Ok(Some(mode))
}

/// Detaches from `interface` by removing its link pin (the kernel detaches when the last
/// reference goes).
pub fn detach(pin_dir: &Path, interface: &str) -> std::io::Result<bool> {
    let pin = link_pin(pin_dir, interface);
    match std::fs::remove_file(&pin) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}
