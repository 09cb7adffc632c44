//! Second chance, the daemon's side: each Vip keeps the MaglevTable it had before its last
//! change for `global.second_chance`, in the data plane's `PREV_TABLES`, so that a
//! connection that started under it survives on a box that never saw it (see
//! `lb-ebpf/src/chain.rs`). The previous tables are also saved, by Backend address, to
//! `/var/lib/mlb/<name>.second-chance.json`: a daemon that starts with fresh maps (after
//! `mlb detach`, a reboot, a crash that lost the pins) rebuilds them until they expire.

use std::{
    collections::BTreeMap,
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use lb_common::maglev::MaglevTable;
use serde::{Deserialize, Serialize};

use crate::state::LIB_DIR;

/// A Vip's table before its last change, live in `PREV_TABLES` until `until`.
#[derive(Clone, Debug)]
pub struct PreviousTable {
    pub table: Arc<MaglevTable>,
    /// Backend ids holding slots, with their names.
    pub members: Vec<(u32, String)>,
    /// Unix time (seconds) when it is dropped.
    pub until: u64,
    /// What it was built from, by Backend address (what is saved).
    pub saved: SavedTable,
}

/// A previous table as saved: enough to build it again with other Backend ids.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedTable {
    pub size: u32,
    pub seed: u32,
    pub members: Vec<SavedMember>,
    /// Unix time (seconds) when it is dropped.
    pub until: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedMember {
    /// `pool/address`, as the reconciler keys Backends.
    pub key: String,
    pub name: String,
    pub address: IpAddr,
    pub weight: u32,
}

/// A Backend removed from the config while second chance is on: it keeps its id and its
/// data-plane entry (still up) until `until`, so its open connections keep reaching it,
/// through this box's connection table and other boxes' chained packets alike.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retired {
    pub id: u32,
    pub generation: u32,
    pub address: IpAddr,
    pub until: u64,
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where the previous tables of the maps pinned under `pin_dir` are saved. Under
/// `/var/lib`, not `/run`: `mlb detach` and reboots remove the state under `/run`.
pub fn path(pin_dir: &Path) -> PathBuf {
    let name = pin_dir
        .file_name()
        .map_or("mlb".into(), |n| n.to_string_lossy().into_owned());
    Path::new(LIB_DIR).join(format!("{name}.second-chance.json"))
}

/// Saves `tables` (by Vip endpoint) atomically; an empty set removes the file.
pub fn save(path: &Path, tables: &BTreeMap<String, SavedTable>) -> io::Result<()> {
    if tables.is_empty() {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(tables).map_err(io::Error::other)?,
    )?;
    std::fs::rename(&tmp, path)
}

/// The saved previous tables that have not expired at `now`; none if there is no file or
/// it cannot be read (logged by the caller: second chance is a best effort after a loss).
pub fn load(path: &Path, now: u64) -> io::Result<BTreeMap<String, SavedTable>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e),
    };
    let mut tables: BTreeMap<String, SavedTable> =
        serde_json::from_slice(&bytes).map_err(io::Error::other)?;
    tables.retain(|_, t| t.until > now);
    Ok(tables)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_tables_round_trip_and_expired_ones_are_dropped() {
        let dir = std::env::temp_dir().join(format!("mlb-sc-{}", std::process::id()));
        let path = dir.join("x.second-chance.json");
        let member = SavedMember {
            key: "web/10.0.0.1".into(),
            name: "be1".into(),
            address: "10.0.0.1".parse().unwrap(),
            weight: 1,
        };
        let table = |until| SavedTable {
            size: 251,
            seed: 7,
            members: vec![member.clone()],
            until,
        };
        let tables = BTreeMap::from([("a".to_owned(), table(100)), ("b".to_owned(), table(200))]);
        save(&path, &tables).unwrap();
        let loaded = load(&path, 150).unwrap();
        assert_eq!(loaded.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(loaded["b"], table(200));
        save(&path, &BTreeMap::new()).unwrap();
        assert!(!path.exists());
        assert!(load(&path, 0).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }
}
