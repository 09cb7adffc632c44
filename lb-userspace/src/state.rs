//! What the daemon leaves behind for its successor and for `mlb status`: id assignments
//! (so a restarted daemon keeps every flow's Backend id) and a status snapshot, written
//! atomically to `/run/mlb/<pin dir name>.json` next to the pinned maps.

use std::{
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::Config,
    dataplane::DataplaneError,
    reconcile::{Assignments, DataplaneOps, Reconciler, backend_key},
};

/// Where runtime state lives.
pub const RUN_DIR: &str = "/run/mlb";

/// The state file for the maps pinned under `pin_dir`.
pub fn state_path(pin_dir: &Path) -> PathBuf {
    let name = pin_dir
        .file_name()
        .map_or("mlb".into(), |n| n.to_string_lossy().into_owned());
    Path::new(RUN_DIR).join(format!("{name}.json"))
}

/// Where `mlb maintenance on` is remembered, across daemon restarts and reboots (unlike the
/// state under [`RUN_DIR`]): a drained box stays drained until an operator says `off`.
pub const LIB_DIR: &str = "/var/lib/mlb";

/// The maintenance flag file for the maps pinned under `pin_dir`.
pub fn maintenance_path(pin_dir: &Path) -> PathBuf {
    let name = pin_dir
        .file_name()
        .map_or("mlb".into(), |n| n.to_string_lossy().into_owned());
    Path::new(LIB_DIR).join(format!("{name}.maintenance"))
}

/// Whether the host is in maintenance.
pub fn in_maintenance(pin_dir: &Path) -> bool {
    maintenance_path(pin_dir).exists()
}

/// Puts the host in maintenance (`true`) or takes it out.
pub fn set_maintenance(pin_dir: &Path, on: bool) -> io::Result<()> {
    let path = maintenance_path(pin_dir);
    if on {
        std::fs::create_dir_all(LIB_DIR)?;
        std::fs::write(
            &path,
            b"maintenance: every vip withdrawn, forwarding goes on\n",
        )
    } else {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// The lock file of the daemon whose maps are pinned under `pin_dir`.
pub fn lock_path(pin_dir: &Path) -> PathBuf {
    state_path(pin_dir).with_extension("lock")
}

/// The lock one daemon per pin path holds for its whole life (`flock`, released by the
/// kernel however the process ends); it holds the daemon's pid.
pub struct DaemonLock {
    path: PathBuf,
    _file: std::fs::File,
}

impl DaemonLock {
    /// Takes the lock, or says which daemon holds it.
    pub fn take(pin_dir: &Path) -> Result<Self, String> {
        use std::{io::Write as _, os::fd::AsRawFd as _};
        let path = lock_path(pin_dir);
        let fail = |e: io::Error| format!("{}: {e}", path.display());
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(fail)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(fail)?;
        // SAFETY: a valid open file descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(format!(
                "another mlb daemon (pid {}) is running on pin path {}: stop it first, or give \
                 this one another global.pin_path",
                holder.trim(),
                pin_dir.display()
            ));
        }
        file.set_len(0).map_err(fail)?;
        writeln!(file, "{}", std::process::id()).map_err(fail)?;
        Ok(Self { path, _file: file })
    }
}

impl Drop for DaemonLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The control socket of the daemon whose maps are pinned under `pin_dir`.
pub fn socket_path(pin_dir: &Path) -> PathBuf {
    state_path(pin_dir).with_extension("sock")
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub pid: u32,
    pub config: PathBuf,
    /// The applied config's text, for `mlb plan` against the running state.
    #[serde(default)]
    pub config_text: String,
    /// Seconds since the Unix epoch.
    pub updated: u64,
    pub interfaces: Vec<InterfaceStatus>,
    pub vips: Vec<VipStatus>,
    pub backends: Vec<BackendStatus>,
    pub assignments: Assignments,
    /// `announce.table`, if announcing is on.
    #[serde(default)]
    pub announce_table: Option<u32>,
    #[serde(default)]
    pub maintenance: bool,
    /// Per Vip address: announced or not, and why.
    #[serde(default)]
    pub announce: Vec<AnnounceStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AnnounceStatus {
    pub address: IpAddr,
    pub announced: bool,
    pub reason: String,
    pub vips: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    /// As configured (`auto` included).
    pub xdp_mode: String,
    /// The mode the program is attached in (`native`, `generic`; `unknown` for a link
    /// re-adopted from a daemon that did not record it).
    #[serde(default)]
    pub attached_mode: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VipStatus {
    pub name: String,
    pub endpoint: String,
    pub id: u32,
    pub forwarding: String,
    pub pool: String,
    pub table_size: u32,
    /// Table swaps since the daemon started (1 = first install).
    pub table_generation: u64,
    /// Backends holding slots: (name, slots).
    pub slots: Vec<(String, u32)>,
    /// `drop` or `pass`: what a packet gets when no backend is usable.
    #[serde(default)]
    pub when_no_backend: String,
    /// The table before the last change, while second chance keeps it.
    #[serde(default)]
    pub previous: Option<PreviousStatus>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PreviousStatus {
    /// Unix time (seconds) when it is dropped.
    pub until: u64,
    /// Backends holding slots in it: (name, slots).
    pub slots: Vec<(String, u32)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendStatus {
    pub pool: String,
    pub name: String,
    pub address: IpAddr,
    pub id: u32,
    pub weight: u32,
    pub up: bool,
    pub drained: bool,
}

impl Snapshot {
    /// The snapshot of a running reconciler.
    pub fn of<D: DataplaneOps>(
        reconciler: &Reconciler<D>,
        config: &Config,
        config_text: &str,
    ) -> Self {
        let assignments = reconciler.assignments().clone();
        let tables = reconciler.tables();
        let vips = config
            .vips
            .iter()
            .map(|vip| {
                let endpoint = vip.endpoint();
                let installed = tables.get(&endpoint);
                let slots = installed.map_or_else(Vec::new, |t| {
                    let counts = t.table.slot_counts();
                    t.members
                        .iter()
                        .map(|(id, name)| {
                            let n = counts.iter().find(|(i, _)| i == id).map_or(0, |(_, n)| *n);
                            (name.clone(), n)
                        })
                        .collect()
                });
                let previous = installed.and_then(|t| t.previous.as_ref()).map(|p| {
                    let counts = p.table.slot_counts();
                    PreviousStatus {
                        until: p.until,
                        slots: p
                            .members
                            .iter()
                            .map(|(id, name)| {
                                let n = counts.iter().find(|(i, _)| i == id).map_or(0, |c| c.1);
                                (name.clone(), n)
                            })
                            .collect(),
                    }
                });
                VipStatus {
                    previous,
                    name: vip.name.clone(),
                    id: assignments.vips.get(&endpoint).map_or(0, |a| a.id),
                    endpoint,
                    forwarding: vip.forwarding.to_string(),
                    pool: vip.pool.clone(),
                    table_size: vip.table_size,
                    table_generation: installed.map_or(0, |t| t.generation),
                    slots,
                    when_no_backend: vip.when_no_backend.to_string(),
                }
            })
            .collect();
        let backends = config
            .pools
            .iter()
            .flat_map(|(pool, p)| p.backends.iter().map(move |b| (pool.clone(), b.clone())))
            .map(|(pool, b)| {
                let key = backend_key(&pool, b.address);
                BackendStatus {
                    id: assignments.backends.get(&key).map_or(0, |a| a.id),
                    up: reconciler.is_up(&pool, b.address),
                    drained: reconciler.is_drained(&pool, b.address),
                    pool,
                    name: b.name.clone(),
                    address: b.address,
                    weight: b.weight,
                }
            })
            .collect();
        Self {
            pid: std::process::id(),
            config: config.source.clone(),
            config_text: config_text.to_owned(),
            updated: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            interfaces: config
                .interfaces
                .iter()
                .map(|i| InterfaceStatus {
                    name: i.name.clone(),
                    xdp_mode: i.xdp_mode.to_string(),
                    attached_mode: String::new(),
                })
                .collect(),
            vips,
            backends,
            assignments,
            announce_table: config.announce.map(|a| a.table),
            maintenance: false,
            announce: Vec::new(),
        }
    }

    /// With the XDP mode each interface is attached in.
    pub fn with_attached(mut self, modes: &std::collections::BTreeMap<String, String>) -> Self {
        for i in &mut self.interfaces {
            if let Some(mode) = modes.get(&i.name) {
                i.attached_mode = mode.clone();
            }
        }
        self
    }

    /// With the announce decisions (and maintenance) of the daemon.
    pub fn with_announce(
        mut self,
        maintenance: bool,
        decisions: &std::collections::BTreeMap<IpAddr, crate::announce::Decision>,
    ) -> Self {
        self.maintenance = maintenance;
        if self.announce_table.is_some() {
            self.announce = decisions
                .iter()
                .map(|(address, d)| AnnounceStatus {
                    address: *address,
                    announced: d.announced,
                    reason: d.reason.to_string(),
                    vips: d.vips.clone(),
                })
                .collect();
        }
        self
    }

    /// Writes atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).map_err(io::Error::other)?,
        )?;
        std::fs::rename(&tmp, path)
    }

    pub fn load(path: &Path) -> io::Result<Self> {
        let bytes = std::fs::read(path)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })
    }
}

/// What a previous daemon left for the maps under `pin_dir`.
pub struct Previous {
    pub assignments: Assignments,
    /// `(pool, address)` of the Backends it had down.
    pub down: Vec<(String, IpAddr)>,
    /// `(pool, address)` of the Backends drained at run time (`mlb drain`).
    pub drained: Vec<(String, IpAddr)>,
    /// (interface, the XDP mode it was attached in).
    pub attached: Vec<(String, String)>,
}

/// The state a previous daemon left for the maps under `pin_dir`, if any.
pub fn previous(pin_dir: &Path) -> Result<Option<Previous>, DataplaneError> {
    match Snapshot::load(&state_path(pin_dir)) {
        Ok(snapshot) => Ok(Some(Previous {
            attached: snapshot
                .interfaces
                .iter()
                .filter(|i| !i.attached_mode.is_empty())
                .map(|i| (i.name.clone(), i.attached_mode.clone()))
                .collect(),
            drained: snapshot
                .backends
                .iter()
                .filter(|b| b.drained)
                .map(|b| (b.pool.clone(), b.address))
                .collect(),
            down: snapshot
                .backends
                .iter()
                .filter(|b| !b.up)
                .map(|b| (b.pool.clone(), b.address))
                .collect(),
            assignments: snapshot.assignments,
        })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(DataplaneError::Pin {
            path: state_path(pin_dir),
            error: e.to_string(),
        }),
    }
}
