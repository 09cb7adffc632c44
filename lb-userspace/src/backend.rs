//! `mlb backend`: what a backend host runs. `lb_decap` on its NIC strips the outer IPIP /
//! IPv6-in-IPv6 header (or IP and UDP, for GUE) the load balancers add, accepts encapsulated packets only from the
//! load balancers' source prefixes, and makes second chance's decision for chained
//! packets (deliver here, or send on to the previous backend). The link and the two small
//! maps it needs are pinned, so it outlives the command.

use std::{fmt::Write as _, net::IpAddr, path::Path};

use anyhow::Context as _;
use lb_common::{
    consts::{DecapCounter, prog_names},
    types::TunnelConfig,
};

use crate::{
    attach,
    config::{Interface, XdpModeConfig},
    dataplane::{Capacities, Dataplane, enable_forwarding},
};

/// Default bpffs directory of a backend's pins.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/mlb-backend";

/// The backend needs none of the load balancer's tables: the smallest sizes.
fn capacities() -> Capacities {
    Capacities {
        max_vips: 1,
        max_backends: 2,
        conntrack_entries: 1024,
        flow_cache_entries: 0,
        ..Capacities::default()
    }
}

/// Attaches `lb_decap` to `interface` (or swaps the running one for this build's),
/// accepting encapsulated packets from `sources` only, GUE on UDP port `gue_port` (0:
/// none). Run again to change them: the counters and the attachment stay.
pub fn attach(
    interface: &str,
    sources: &[(IpAddr, u8)],
    gue_port: u16,
    xdp_mode: XdpModeConfig,
    pin_dir: &Path,
) -> anyhow::Result<String> {
    anyhow::ensure!(
        !sources.is_empty(),
        "give the load balancers' source prefixes (--lb-source, their encap_source_v4/v6): \
         lb_decap accepts encapsulated packets from nobody else"
    );
    crate::daemon::ensure_bpffs()?;
    let mut dataplane = Dataplane::load_pinned(capacities(), pin_dir)
        .with_context(|| format!("loading the XDP object pinned under {}", pin_dir.display()))?;
    dataplane
        .set_decap_sources(sources)
        .context("setting the load balancers' source prefixes")?;
    dataplane
        .set_tunnel(&TunnelConfig {
            gue_port: gue_port.to_be(),
            ..TunnelConfig::default()
        })
        .context("setting the GUE port")?;
    // Second chance sends chained packets on with `bpf_fib_lookup`, which answers only
    // for forwarding devices; the kernel forwards what it cannot resolve yet.
    enable_forwarding(interface)
        .with_context(|| format!("turning forwarding on for {interface}"))?;
    let target = Interface {
        name: interface.to_owned(),
        xdp_mode,
        next_program: None,
    };
    let mode = attach::attach_program(&mut dataplane, prog_names::LB_DECAP, &target, pin_dir)?;
    let sources: Vec<String> = sources.iter().map(|(a, l)| format!("{a}/{l}")).collect();
    let gue = match gue_port {
        0 => "no GUE".to_owned(),
        port => format!("GUE on UDP port {port}"),
    };
    Ok(format!(
        "lb_decap {} on {interface}, accepting encapsulated packets from {} ({gue})",
        mode.map_or("kept (program swapped in place)".to_owned(), |m| format!(
            "attached ({m})"
        )),
        sources.join(", ")
    ))
}

/// Detaches `lb_decap` from `interface` and removes the pins.
pub fn detach(interface: &str, pin_dir: &Path) -> anyhow::Result<String> {
    let removed = attach::detach(pin_dir, interface)
        .with_context(|| format!("removing the link pin of {interface}"))?;
    if pin_dir.exists() {
        std::fs::remove_dir_all(pin_dir)
            .with_context(|| format!("removing {}", pin_dir.display()))?;
    }
    Ok(if removed {
        format!("lb_decap detached from {interface}")
    } else {
        format!("lb_decap was not attached to {interface}")
    })
}

/// `lb_decap`'s counters: as text, or in the Prometheus text format (for node_exporter's
/// textfile collector, or any scraper of a file).
pub fn status(pin_dir: &Path, prometheus: bool) -> anyhow::Result<String> {
    let counters = crate::pinned::Pinned::open(pin_dir)
        .decap_counters()
        .context("is lb_decap attached (mlb backend attach)?")?;
    let mut out = String::new();
    if prometheus {
        writeln!(
            out,
            "# HELP mlb_decap_packets_total Encapsulated packets lb_decap handled on this backend, by result.\n\
             # TYPE mlb_decap_packets_total counter"
        )?;
        for c in DecapCounter::ALL {
            writeln!(
                out,
                "mlb_decap_packets_total{{result=\"{}\"}} {}",
                c.name(),
                counters[c as usize]
            )?;
        }
    } else {
        for c in DecapCounter::ALL {
            writeln!(out, "{:<28} {}", c.name(), counters[c as usize])?;
        }
    }
    Ok(out)
}
