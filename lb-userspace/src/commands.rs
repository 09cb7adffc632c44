//! The CLI's one-shot commands: check, plan, status, trace, drain, maintenance, detach.

use std::{fmt::Write as _, net::IpAddr, path::Path};

use anyhow::{Context as _, bail};
use lb_common::{
    consts::{FAMILY_V4, FAMILY_V6},
    hash::{Flow, HashMode, addr_words},
    types::VipKey,
};

use crate::{
    announce,
    config::{Config, describe},
    control::{self, Command, Reply},
    daemon,
    pinned::Pinned,
    reconcile::{Assignments, DryRun, Reconciler},
    state::{self, Snapshot},
};

/// `mlb check`: every file must validate. Prints what each would configure.
pub fn check(files: &[std::path::PathBuf]) -> anyhow::Result<()> {
    let mut failed = 0;
    for file in files {
        match Config::load(file) {
            Ok(config) => println!("{}: ok\n{}", file.display(), describe(&config)),
            Err(e) => {
                failed += 1;
                eprintln!("{e}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} config file(s) invalid", files.len());
    }
    Ok(())
}

/// `mlb plan`: what replacing the running (or `against`) config by `file` would change.
pub fn plan(file: &Path, against: Option<&Path>, pin_dir: &Path) -> anyhow::Result<String> {
    let new = Config::load(file).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (old, assignments) = match against {
        Some(path) => (
            Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?,
            Assignments::default(),
        ),
        None => {
            let snapshot = Snapshot::load(&state::state_path(pin_dir))
                .context("no running state to compare with (start the daemon, or use --against)")?;
            let old = Config::parse(
                &snapshot.config_text,
                &snapshot.config.display().to_string(),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            (old, snapshot.assignments)
        }
    };
    let mut reconciler = Reconciler::new(DryRun, assignments);
    reconciler.apply(&old)?;
    let report = reconciler.apply(&new)?;
    let mut out = String::new();
    writeln!(
        out,
        "plan: {} -> {}",
        old.source.display(),
        new.source.display()
    )?;
    for line in report.to_string().lines() {
        writeln!(out, "  {line}")?;
    }
    Ok(out)
}

/// The daemon's status: live over the control socket, else the state it left.
pub fn status_snapshot(pin_dir: &Path) -> anyhow::Result<(Snapshot, bool)> {
    match control::request(&state::socket_path(pin_dir), &Command::Status) {
        Ok(Reply::Status(snapshot)) => Ok((*snapshot, true)),
        Ok(Reply::Error(e)) => bail!("daemon: {e}"),
        Ok(Reply::Ok(_)) => bail!("daemon: unexpected reply"),
        Err(_) => {
            let path = state::state_path(pin_dir);
            let snapshot = Snapshot::load(&path).with_context(|| {
                format!("no daemon is running and no state at {}", path.display())
            })?;
            Ok((snapshot, false))
        }
    }
}

/// `mlb status`, as text.
pub fn status(pin_dir: &Path) -> anyhow::Result<String> {
    let (snapshot, live) = status_snapshot(pin_dir)?;
    let pinned = Pinned::open(pin_dir);
    let mut out = String::new();
    writeln!(
        out,
        "daemon: {} (pid {}), config {}",
        if live {
            "running"
        } else {
            "NOT running (last state shown; the program may still be attached)"
        },
        snapshot.pid,
        snapshot.config.display()
    )?;
    for i in &snapshot.interfaces {
        if i.attached_mode.is_empty() || i.attached_mode == i.xdp_mode {
            writeln!(out, "interface {} (xdp {})", i.name, i.xdp_mode)?;
        } else {
            writeln!(
                out,
                "interface {} (xdp {}, configured {})",
                i.name, i.attached_mode, i.xdp_mode
            )?;
        }
    }
    for vip in &snapshot.vips {
        let traffic = pinned.traffic(true, vip.id).ok().unwrap_or_default();
        writeln!(
            out,
            "vip {} {} [{}] pool {}: table {} slots, generation {}, {} packets {} bytes",
            vip.name,
            vip.endpoint,
            vip.forwarding,
            vip.pool,
            vip.table_size,
            vip.table_generation,
            traffic.packets,
            traffic.bytes
        )?;
        for (name, slots) in &vip.slots {
            writeln!(out, "    {name}: {slots} slots")?;
        }
        if vip.slots.is_empty() {
            writeln!(out, "    NO USABLE BACKEND")?;
        }
        let chained = pinned.chained(true, vip.id).unwrap_or(0);
        if let Some(p) = &vip.previous {
            let left = p.until.saturating_sub(crate::second_chance::now());
            let slots: Vec<String> = p.slots.iter().map(|(n, s)| format!("{n} {s}")).collect();
            writeln!(
                out,
                "    second chance: previous table ({}) for {left} s more, {chained} packets chained",
                slots.join(", ")
            )?;
        } else if chained > 0 {
            writeln!(
                out,
                "    second chance: no previous table, {chained} packets chained"
            )?;
        }
    }
    match snapshot.announce_table {
        Some(table) => {
            if snapshot.maintenance {
                writeln!(
                    out,
                    "MAINTENANCE: every vip withdrawn (mlb maintenance off to announce)"
                )?;
            }
            for a in &snapshot.announce {
                writeln!(
                    out,
                    "announce {} (table {table}): {} ({})",
                    a.address,
                    if a.announced {
                        "announced"
                    } else {
                        "WITHDRAWN"
                    },
                    a.reason
                )?;
            }
        }
        None if snapshot.maintenance => writeln!(out, "maintenance: on (announcing is off)")?,
        None => {}
    }
    for b in &snapshot.backends {
        let traffic = pinned.traffic(false, b.id).ok().unwrap_or_default();
        let health = match (b.up, b.drained) {
            (false, _) => "DOWN",
            (true, true) => "up, drained",
            (true, false) => "up",
        };
        let chained = match pinned.chained(false, b.id).unwrap_or(0) {
            0 => String::new(),
            n => format!(", {n} chained to it"),
        };
        writeln!(
            out,
            "backend {} {} pool {} weight {}: {health}, {} packets{chained}",
            b.name, b.address, b.pool, b.weight, traffic.packets
        )?;
    }
    for (key, r) in &snapshot.assignments.retired {
        let left = r.until.saturating_sub(crate::second_chance::now());
        let chained = pinned.chained(false, r.id).unwrap_or(0);
        writeln!(
            out,
            "backend {key} RETIRED (removed from the config; its connections are served for {left} s more), {chained} chained to it"
        )?;
    }
    if let Ok(counters) = pinned.counters() {
        let line: Vec<String> = counters
            .iter()
            .filter(|(_, v)| *v > 0)
            .map(|(c, v)| format!("{}={v}", c.name()))
            .collect();
        writeln!(out, "counters: {}", line.join(" "))?;
    }
    Ok(out)
}

/// `mlb trace`: where the kernel sends this flow, and why.
pub fn trace(flow: &Flow, pin_dir: &Path) -> anyhow::Result<String> {
    let pinned = Pinned::open(pin_dir);
    let global = pinned.global()?;
    let hash = flow.hash(global.hash_seed);
    let family = if flow.dst.is_ipv4() {
        FAMILY_V4
    } else {
        FAMILY_V6
    };
    let key = |port: u16| VipKey {
        addr: addr_words(flow.dst),
        port: port.to_be(),
        proto: flow.proto,
        family,
    };
    let mut out = String::new();
    let snapshot = status_snapshot(pin_dir).ok().map(|(s, _)| s);
    let (vip_id, via) = match pinned.vip_id(&key(flow.dport))? {
        Some(id) => (id, "exact"),
        None => match pinned.vip_id(&key(0))? {
            Some(id) => (id, "any-port"),
            None => {
                writeln!(
                    out,
                    "{} is not a Vip for this port/protocol: the packet is passed to the local stack",
                    flow.dst
                )?;
                return Ok(out);
            }
        },
    };
    let vip_name = snapshot
        .as_ref()
        .and_then(|s| s.vips.iter().find(|v| v.id == vip_id))
        .map_or_else(
            || format!("id {vip_id}"),
            |v| format!("{} ({})", v.name, v.endpoint),
        );
    writeln!(out, "vip: {vip_name}, matched {via}")?;
    writeln!(
        out,
        "flow hash (seed {:#x}): {hash:#010x}",
        global.hash_seed
    )?;
    // The slot of a new flow comes from the Vip's hash mode, as in the kernel.
    let mode = HashMode::of(pinned.vip_state(vip_id)?.flags);
    let slot_hash = flow.table_hash(mode, global.hash_seed);
    writeln!(
        out,
        "hash mode: {} (table slot hash {slot_hash:#010x})",
        mode.keyword()
    )?;
    let name_of = |id: u32| -> String {
        let addr = pinned.backend(id).ok().map(|b| ip_of(&b.addr, family));
        snapshot
            .as_ref()
            .and_then(|s| s.backends.iter().find(|b| b.id == id))
            .map_or_else(
                || format!("id {id} {addr:?}"),
                |b| format!("{} {} (id {id})", b.name, b.address),
            )
    };
    let entry = pinned.conntrack(flow)?;
    let table = pinned.table_slot(vip_id, slot_hash)?;
    if let Some(e) = entry {
        let backend = pinned.backend(e.backend)?;
        let vip = pinned.vip_state(e.vip)?;
        let valid = lb_common::conntrack::generation_digest(backend.generation, vip.generation)
            == e.generation
            && backend.flags & lb_common::consts::backend_flags::UP != 0;
        writeln!(
            out,
            "connection table: entry -> {}{}",
            name_of(e.backend),
            if valid {
                " (backend up: this is where the flow goes)"
            } else {
                " (backend down or gone: the table re-steers it)"
            }
        )?;
    } else {
        writeln!(
            out,
            "connection table: no entry (a new flow: the table decides)"
        )?;
    }
    // What a packet gets when the table names no backend, in words.
    let no_backend = || {
        let pass = snapshot
            .as_ref()
            .and_then(|s| s.vips.iter().find(|v| v.id == vip_id))
            .is_some_and(|v| v.when_no_backend == "pass");
        if pass {
            "no usable backend: the packet is passed to the local stack (when_no_backend: pass)"
        } else {
            "no usable backend: the packet is dropped (when_no_backend: drop)"
        }
    };
    match table {
        Some((0, _, _)) => writeln!(out, "table: empty, {}", no_backend())?,
        Some((size, slot, 0)) => writeln!(out, "table: slot {slot} of {size}: {}", no_backend())?,
        Some((size, slot, id)) => writeln!(out, "table: slot {slot} of {size} -> {}", name_of(id))?,
        None => writeln!(out, "table: none installed")?,
    }
    // Old pins (before second chance) have no PREV_TABLES: nothing to say then.
    if let (Some((_, _, now)), Ok(Some((_, slot, before)))) =
        (table, pinned.prev_table_slot(vip_id, slot_hash))
    {
        let state = pinned.vip_state(vip_id)?;
        let flag = |id: u32, bit: u32| pinned.backend(id).is_ok_and(|b| b.flags & bit != 0);
        let up = |id: u32| flag(id, lb_common::consts::backend_flags::UP);
        let vip_v6 = state.flags & lb_common::consts::vip_flags::IPV6 != 0;
        let other_family = |id: u32| flag(id, lb_common::consts::backend_flags::IPV6) != vip_v6;
        let why_not = if before == now || before == 0 {
            Some("the previous table names the same backend")
        } else if flow.proto != lb_common::consts::PROTO_TCP {
            Some("only TCP is chained")
        } else if state.flags & lb_common::consts::vip_flags::L2_DSR != 0 {
            Some("l2_dsr has no header to carry it")
        } else if !up(before) {
            Some("that backend is down")
        } else if other_family(now) || other_family(before) {
            Some("a backend of the other family than the Vip's (chained headers are the Vip's)")
        } else if entry.is_some() {
            Some("the connection-table entry decides")
        } else {
            None
        };
        match why_not {
            None => writeln!(
                out,
                "second chance: previous backend {} (slot {slot} of the previous table): a non-SYN packet goes to the table's backend with it attached",
                name_of(before)
            )?,
            Some(reason) => writeln!(
                out,
                "second chance: previous table slot {slot} -> {}; not chained: {reason}",
                name_of(before)
            )?,
        }
    }
    Ok(out)
}

fn ip_of(words: &[u32; 4], family: u8) -> IpAddr {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    if family == FAMILY_V4 {
        IpAddr::from(<[u8; 4]>::try_from(&bytes[..4]).expect("4 bytes"))
    } else {
        IpAddr::from(<[u8; 16]>::try_from(&bytes[..]).expect("16 bytes"))
    }
}

/// `mlb drain` / `mlb undrain`.
pub fn drain(address: IpAddr, drained: bool, pin_dir: &Path) -> anyhow::Result<String> {
    match control::request(
        &state::socket_path(pin_dir),
        &Command::Drain { address, drained },
    )
    .context("is the daemon running?")?
    {
        Reply::Ok(message) => Ok(message),
        Reply::Error(e) => bail!("{e}"),
        Reply::Status(_) => bail!("unexpected reply"),
    }
}

/// `mlb maintenance on|off`: through the daemon, or remembered for its next start.
pub fn maintenance(on: bool, pin_dir: &Path) -> anyhow::Result<String> {
    match control::request(&state::socket_path(pin_dir), &Command::Maintenance { on }) {
        Ok(Reply::Ok(message)) => Ok(message),
        Ok(Reply::Error(e)) => bail!("{e}"),
        Ok(Reply::Status(_)) => bail!("unexpected reply"),
        Err(_) => {
            state::set_maintenance(pin_dir, on).with_context(|| {
                format!("writing {}", state::maintenance_path(pin_dir).display())
            })?;
            Ok(format!(
                "maintenance {}: the daemon is not running; it takes effect when it starts",
                if on { "on" } else { "off" }
            ))
        }
    }
}

/// `mlb detach`: for a stopped daemon.
pub fn detach(pin_dir: &Path) -> anyhow::Result<String> {
    if control::request(&state::socket_path(pin_dir), &Command::Status).is_ok() {
        bail!("the daemon is running: stop it first (or run it with --detach-on-exit)");
    }
    let table = Snapshot::load(&state::state_path(pin_dir))
        .ok()
        .and_then(|s| s.announce_table);
    if let Some(table) = table {
        announce::withdraw_blocking(table)
            .with_context(|| format!("withdrawing the vip routes from table {table}"))?;
    }
    let interfaces: Vec<String> = std::fs::read_dir(pin_dir)
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_prefix("link_")
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    daemon::detach_all(pin_dir, interfaces.iter().map(String::as_str))?;
    Ok(format!(
        "detached from {} and removed {}",
        interfaces.join(", "),
        pin_dir.display()
    ))
}
