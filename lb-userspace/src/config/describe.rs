//! The human summary `mlb check` prints for a valid config.

use std::{fmt::Write as _, time::Duration};

use super::{CheckKind, Config, HashMode, HealthCheck};

/// What the config sets up: interfaces, each Vip with its forwarding, table size and pool,
/// each pool with its Backends and health check; pools no Vip uses are pointed out.
pub fn describe(config: &Config) -> String {
    let mut s = String::new();
    let backends: usize = config.pools.values().map(|p| p.backends.len()).sum();
    let _ = writeln!(
        s,
        "{}: {}, {}, {}, {}",
        config.source.display(),
        count(config.interfaces.len(), "interface"),
        count(config.vips.len(), "vip"),
        count(config.pools.len(), "pool"),
        count(backends, "backend"),
    );

    let g = &config.global;
    let _ = writeln!(s, "global:");
    let _ = writeln!(
        s,
        "  hash_seed {:#010x}, conntrack_entries {}, max_vips {}, max_backends {}",
        g.hash_seed, g.conntrack_entries, g.max_vips, g.max_backends
    );
    let _ = writeln!(
        s,
        "  encap sources {}/{} (IPv4), {}/{} (IPv6)",
        g.encap_source_v4.0, g.encap_source_v4.1, g.encap_source_v6.0, g.encap_source_v6.1
    );
    let _ = writeln!(
        s,
        "  metrics on {}, maps pinned under {}",
        g.metrics_listen,
        g.pin_path.display()
    );
    match config.announce {
        Some(a) => {
            let _ = writeln!(
                s,
                "  announce: a route per servable Vip address in table {}",
                a.table
            );
        }
        None => {
            let _ = writeln!(s, "  announce: off");
        }
    }

    let _ = writeln!(s, "interfaces:");
    for interface in &config.interfaces {
        let _ = write!(s, "  {}  xdp {}", interface.name, interface.xdp_mode);
        if let Some(next) = &interface.next_program {
            let _ = write!(s, "  not for a Vip: {}", next.display());
        }
        let _ = writeln!(s);
    }

    let _ = writeln!(s, "vips:");
    if config.vips.is_empty() {
        let _ = writeln!(s, "  (none)");
    }
    let width = config.vips.iter().map(|v| v.name.len()).max().unwrap_or(0);
    for vip in &config.vips {
        let endpoint = vip.endpoint();
        let name = if vip.name == endpoint {
            String::new()
        } else {
            format!("{:width$}  ", vip.name)
        };
        let _ = writeln!(
            s,
            "  {name}{endpoint}  {}, table {} ({}), pool {}, no backend: {}{}{}{}",
            vip.forwarding,
            vip.table_size,
            if vip.table_size_auto {
                "auto"
            } else {
                "explicit"
            },
            vip.pool,
            vip.when_no_backend,
            if vip.hash == HashMode::FiveTuple {
                String::new()
            } else {
                format!(", hash {}", vip.hash.keyword())
            },
            if vip.icmp_echo {
                ""
            } else {
                ", pings to the local stack"
            },
            if vip.track_fragments {
                ", fragments tracked"
            } else {
                ""
            },
        );
    }

    let _ = writeln!(s, "pools:");
    if config.pools.is_empty() {
        let _ = writeln!(s, "  (none)");
    }
    let unused = config.unused_pools();
    for (name, pool) in &config.pools {
        let usage = if unused.contains(&name.as_str()) {
            "  (unused: no vip refers to it)"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "  {name}: {}; health check {}{usage}",
            count(pool.backends.len(), "backend"),
            check(&pool.health_check)
        );
        let width = pool
            .backends
            .iter()
            .map(|b| b.name.len())
            .max()
            .unwrap_or(0);
        for backend in &pool.backends {
            let address = backend.address.to_string();
            let name = if backend.name == address {
                String::new()
            } else {
                format!("{:width$}  ", backend.name)
            };
            let draining = if backend.weight == 0 {
                " (draining)"
            } else {
                ""
            };
            let _ = writeln!(
                s,
                "    {name}{address}  weight {}{draining}",
                backend.weight
            );
        }
    }
    s
}

fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

fn check(h: &HealthCheck) -> String {
    let what = match &h.kind {
        CheckKind::None => return "none (backends always up)".to_owned(),
        CheckKind::Tcp => format!("tcp connect to port {}", h.port),
        CheckKind::Http { path, host, status } => {
            let host = host
                .as_ref()
                .map(|h| format!(" Host {h}"))
                .unwrap_or_default();
            format!(
                "http GET {path}{host} on port {}, status {}-{}",
                h.port,
                status.start(),
                status.end()
            )
        }
        CheckKind::Udp { send, expect } => {
            let expect = expect.as_ref().map_or_else(
                || "any reply".to_owned(),
                |e| format!("a reply starting with {}", bytes(e)),
            );
            format!("udp {} to port {}, {expect}", bytes(send), h.port)
        }
    };
    format!(
        "{what}, every {} (timeout {}, jitter {}%), up after {}, down after {}",
        duration(h.interval),
        duration(h.timeout),
        h.jitter * 100.0,
        count(h.rise as usize, "success").replace("successs", "successes"),
        count(h.fall as usize, "failure"),
    )
}

fn duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A payload as a quoted string, non-printable bytes escaped.
fn bytes(b: &[u8]) -> String {
    format!("\"{}\"", b.escape_ascii())
}
