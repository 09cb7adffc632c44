//! Rules that involve more than one value (duplicates, references between Vips and pools,
//! address families, table sizes, capacities), and the defaults: the config as written
//! becomes a [`Config`].
//!
//! Every rule runs, each on the values it needs that were read without problems, so that a
//! refused config lists everything wrong with it at once. The [`Config`] built alongside is
//! only used when no problem at all was found.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::Duration,
};

use lb_common::{
    consts::NEXT_PROGRAM_SLOTS,
    maglev::{auto_table_size, check_table_size},
};

use super::{
    Announce, BackendConfig, CheckKind, Config, Forwarding, Global, HashMode, HealthCheck,
    Interface, Pool, Protocol, VipConfig, endpoint,
    error::{Pos, Problem, quote, suggest},
    schema::{self, At, CheckEntry, Document, Field, Kind, PoolEntry},
};

pub(crate) fn validate(document: &Document, out: &mut Vec<Problem>) -> Config {
    let global = global(&document.global);
    let interfaces = interfaces(document, out);
    let pools = pools(&document.pools, out);
    let vips = vips(document, global.icmp_echo, out);
    capacities(document, &global, out);
    Config {
        global,
        interfaces,
        vips,
        pools,
        announce: document
            .announce_table
            .as_ref()
            .map(|t| Announce { table: t.value }),
        source: PathBuf::new(),
    }
}

/// The value if given, else `default` (also when refused: the config is dropped then).
fn or<T: Clone>(field: &Field<T>, default: T) -> T {
    field.or(default.clone()).unwrap_or(default)
}

fn global(g: &schema::Global) -> Global {
    let d = Global::default();
    Global {
        hash_seed: or(&g.hash_seed, d.hash_seed),
        conntrack_entries: or(&g.conntrack_entries, d.conntrack_entries),
        conntrack_idle: or(&g.conntrack_idle, d.conntrack_idle),
        flow_cache_entries: or(&g.flow_cache_entries, d.flow_cache_entries),
        max_vips: or(&g.max_vips, d.max_vips),
        max_backends: or(&g.max_backends, d.max_backends),
        metrics_listen: or(&g.metrics_listen, d.metrics_listen),
        encap_source_v4: or(&g.encap_source_v4, d.encap_source_v4),
        encap_source_v6: or(&g.encap_source_v6, d.encap_source_v6),
        pin_path: or(&g.pin_path, d.pin_path),
        second_chance: or(&g.second_chance, d.second_chance),
        control_group: g.control_group.given().map(|at| at.value.clone()),
        icmp_echo: or(&g.icmp_echo, d.icmp_echo),
        icmp_rate: or(&g.icmp_rate, d.icmp_rate),
        gue_port: or(&g.gue_port, d.gue_port),
    }
}

fn interfaces(document: &Document, out: &mut Vec<Problem>) -> Vec<Interface> {
    let Some(At {
        value: entries,
        pos,
    }) = &document.interfaces
    else {
        return Vec::new();
    };
    if entries.is_empty() {
        out.push(Problem::new(
            *pos,
            "interfaces must list at least one interface",
        ));
    }
    let mut seen: HashMap<&str, Pos> = HashMap::new();
    let mut interfaces = Vec::new();
    let mut chained = 0;
    for entry in entries {
        let Some(name) = &entry.name else { continue };
        if let Some(first) = seen.get(name.value.as_str()) {
            out.push(Problem::new(
                name.pos,
                format!(
                    "duplicate interface {} (first defined at line {})",
                    quote(&name.value),
                    first.line
                ),
            ));
        } else {
            seen.insert(&name.value, name.pos);
        }
        let next_program = entry.next_program.given();
        if let Some(at) = next_program {
            chained += 1;
            if chained >= NEXT_PROGRAM_SLOTS {
                out.push(Problem::new(
                    at.pos,
                    format!(
                        "at most {} interfaces can have a next_program",
                        NEXT_PROGRAM_SLOTS - 1
                    ),
                ));
            }
        }
        interfaces.push(Interface {
            name: name.value.clone(),
            xdp_mode: or(&entry.xdp_mode, Default::default()),
            next_program: next_program.map(|at| at.value.clone()),
        });
    }
    interfaces
}

/// A Backend address's explicit name and where it was first given.
struct Named<'a> {
    name: &'a str,
    pool: &'a str,
    line: u32,
}

fn pools(entries: &[PoolEntry], out: &mut Vec<Problem>) -> BTreeMap<String, Pool> {
    // One name per address and one address per name, across all pools.
    let mut name_of: HashMap<IpAddr, Named<'_>> = HashMap::new();
    let mut address_of: HashMap<&str, (IpAddr, &str, u32)> = HashMap::new();
    for pool in entries {
        let pool_name = pool.name.value.as_str();
        let mut seen: HashMap<IpAddr, u32> = HashMap::new();
        for backend in &pool.backends {
            let Some(address) = &backend.address else {
                continue;
            };
            if let Some(first_line) = seen.get(&address.value) {
                out.push(Problem::new(
                    address.pos,
                    format!(
                        "duplicate backend {} in pool {} (first defined at line {first_line})",
                        address.value,
                        quote(pool_name)
                    ),
                ));
                continue;
            }
            seen.insert(address.value, address.pos.line);
            let Some(name) = backend.name.given() else {
                continue;
            };
            match name_of.get(&address.value) {
                Some(first) if first.name != name.value => out.push(Problem::new(
                    name.pos,
                    format!(
                        "pool {} has backend {} named {} here but {} in pool {} (line {})",
                        quote(pool_name),
                        address.value,
                        quote(&name.value),
                        quote(first.name),
                        quote(first.pool),
                        first.line
                    ),
                )),
                Some(_) => {}
                None => {
                    name_of.insert(
                        address.value,
                        Named {
                            name: &name.value,
                            pool: pool_name,
                            line: name.pos.line,
                        },
                    );
                }
            }
            match address_of.get(name.value.as_str()) {
                Some(&(other, other_pool, line)) if other != address.value => {
                    out.push(Problem::new(
                        name.pos,
                        format!(
                            "backend name {} is used for {} here and for {other} in pool {} (line {line})",
                            quote(&name.value),
                            address.value,
                            quote(other_pool)
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    address_of.insert(&name.value, (address.value, pool_name, name.pos.line));
                }
            }
        }
    }

    let mut pools = BTreeMap::new();
    for pool in entries {
        let backends = pool
            .backends
            .iter()
            .filter_map(|backend| {
                let address = backend.address.as_ref()?.value;
                let name = match backend.name.given() {
                    Some(name) => name.value.clone(),
                    None => name_of
                        .get(&address)
                        .map_or_else(|| address.to_string(), |n| n.name.to_owned()),
                };
                Some(BackendConfig {
                    address,
                    weight: or(&backend.weight, 1),
                    name,
                })
            })
            .collect();
        let health_check = pool
            .health_check
            .as_ref()
            .map(|check| health_check(check, out))
            .unwrap_or_default();
        pools.insert(
            pool.name.value.clone(),
            Pool {
                backends,
                health_check,
            },
        );
    }
    pools
}

fn health_check(check: &CheckEntry, out: &mut Vec<Problem>) -> HealthCheck {
    let d = HealthCheck::default();
    let kind = check.kind.as_ref().map(|k| k.value);
    let keyword = kind.map_or("none", Kind::keyword);
    let active = !matches!(kind, Some(Kind::None) | None);

    if active && check.port == Field::Absent {
        out.push(Problem::new(
            check.pos,
            format!("missing key \"port\" in health_check (needed for kind {keyword})"),
        ));
    }
    if let Some(http) = &check.http
        && kind.is_some_and(|k| k != Kind::Http)
    {
        out.push(Problem::new(
            http.pos,
            format!(
                "http section in health_check is only valid with kind http (kind is {keyword})"
            ),
        ));
    }
    if let Some(udp) = &check.udp
        && kind.is_some_and(|k| k != Kind::Udp)
    {
        out.push(Problem::new(
            udp.pos,
            format!("udp section in health_check is only valid with kind udp (kind is {keyword})"),
        ));
    }
    if kind == Some(Kind::Udp) && check.udp.is_none() {
        out.push(Problem::new(
            check.pos,
            "missing key \"udp\" in health_check (kind udp needs a payload to send)",
        ));
    }
    if active
        && let (Some(interval), Some(timeout)) =
            (check.interval.or(d.interval), check.timeout.or(d.timeout))
        && timeout >= interval
    {
        out.push(timeout_problem(check, interval, timeout));
    }

    let kind = match kind {
        None | Some(Kind::None) => CheckKind::None,
        Some(Kind::Tcp) => CheckKind::Tcp,
        Some(Kind::Http) => {
            let http = check.http.as_ref().map(|h| &h.value);
            CheckKind::Http {
                path: http.map_or_else(|| "/".to_owned(), |h| or(&h.path, "/".to_owned())),
                host: http.and_then(|h| h.host.given()).map(|h| h.value.clone()),
                status: http.map_or(200..=399, |h| or(&h.expect_status, 200..=399)),
            }
        }
        Some(Kind::Udp) => {
            let udp = check.udp.as_ref().map(|u| &u.value);
            CheckKind::Udp {
                send: udp
                    .and_then(|u| u.send.as_ref())
                    .map(|s| s.value.clone())
                    .unwrap_or_default(),
                expect: udp.and_then(|u| u.expect.given()).map(|e| e.value.clone()),
            }
        }
    };
    HealthCheck {
        kind,
        port: or(&check.port, d.port),
        interval: or(&check.interval, d.interval),
        timeout: or(&check.timeout, d.timeout),
        rise: or(&check.rise, d.rise),
        fall: or(&check.fall, d.fall),
        jitter: or(&check.jitter, d.jitter),
    }
}

/// `timeout >= interval`: reported at whichever of the two is written (the timeout if both).
fn timeout_problem(check: &CheckEntry, interval: Duration, timeout: Duration) -> Problem {
    let show = |d: Duration| humantime::format_duration(d).to_string();
    match (check.timeout.given(), check.interval.given()) {
        (Some(t), given_interval) => Problem::new(
            t.pos,
            format!(
                "timeout {} in health_check must be shorter than interval {}{}",
                show(timeout),
                show(interval),
                if given_interval.is_some() {
                    ""
                } else {
                    " (the default)"
                }
            ),
        ),
        (None, Some(i)) => Problem::new(
            i.pos,
            format!(
                "interval {} in health_check must be longer than timeout {} (the default); set a shorter timeout",
                show(interval),
                show(timeout)
            ),
        ),
        // Both defaults: 500ms < 1s, never here.
        (None, None) => Problem::new(check.pos, "timeout must be shorter than interval"),
    }
}

/// `icmp_echo`: `global.icmp_echo`, the default of each Vip's.
fn vips(document: &Document, icmp_echo: bool, out: &mut Vec<Problem>) -> Vec<VipConfig> {
    let mut endpoints: HashMap<(IpAddr, u16, Protocol), u32> = HashMap::new();
    let mut names: HashMap<String, u32> = HashMap::new();
    let mut vips = Vec::new();
    for entry in &document.vips {
        let address = entry.address.as_ref().map(|a| a.value);
        let port = entry.port.as_ref().map(|p| p.value);
        let protocol = entry.protocol.as_ref().map(|p| p.value);
        let default_name = match (address, port, protocol) {
            (Some(a), Some(p), Some(proto)) => {
                if let Some(first) = endpoints.get(&(a, p, proto)) {
                    out.push(Problem::new(
                        entry.pos,
                        format!(
                            "duplicate vip {} (first defined at line {first})",
                            endpoint(a, p, proto)
                        ),
                    ));
                } else {
                    endpoints.insert((a, p, proto), entry.pos.line);
                }
                Some(endpoint(a, p, proto))
            }
            _ => None,
        };
        let (name, name_pos) = match (entry.name.given(), default_name) {
            (Some(given), _) => (Some(given.value.clone()), given.pos),
            (None, default) => (default, entry.pos),
        };
        if let Some(name) = &name {
            if let Some(first) = names.get(name) {
                out.push(Problem::new(
                    name_pos,
                    format!(
                        "duplicate vip name {} (first defined at line {first})",
                        quote(name)
                    ),
                ));
            } else {
                names.insert(name.clone(), name_pos.line);
            }
        }
        // How messages name this vip.
        let label = name
            .as_deref()
            .map_or_else(|| "vip".to_owned(), |n| format!("vip {}", quote(n)));

        let pool = entry.pool.as_ref().and_then(|pool| {
            let found = document.pools.iter().find(|p| p.name.value == pool.value);
            if found.is_none() {
                out.push(unknown_pool(document, &label, pool));
            }
            found
        });
        if let (Some(pool), Some(address)) = (pool, &entry.address)
            && or(&entry.forwarding, Forwarding::Ipip) != Forwarding::L2Dsr
        {
            family_check(&label, address, pool, out);
        }
        if let (Some(At { value: mode, pos }), Some(port)) = (entry.hash.given(), port)
            && *mode == HashMode::DestinationPort
            && port != 0
        {
            out.push(Problem::new(
                *pos,
                format!(
                    "{label} has port {port}: hash dport would send every flow to one backend; \
                     it is for any-port vips (port 0)"
                ),
            ));
        }
        let backends = pool.map_or(0, |p| p.backends.len());
        let (table_size, table_size_auto) = match entry.table_size.given() {
            Some(At {
                value: Some(size),
                pos,
            }) => {
                if let Err(e) = check_table_size(*size, backends) {
                    out.push(Problem::new(*pos, e.to_string()));
                }
                (*size, false)
            }
            _ => (auto_table_size(backends), true),
        };
        vips.push(VipConfig {
            name: name.unwrap_or_default(),
            address: address.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            port: port.unwrap_or_default(),
            protocol: protocol.unwrap_or(Protocol::Tcp),
            forwarding: or(&entry.forwarding, Default::default()),
            table_size,
            table_size_auto,
            pool: entry
                .pool
                .as_ref()
                .map(|p| p.value.clone())
                .unwrap_or_default(),
            when_no_backend: or(&entry.when_no_backend, Default::default()),
            icmp_echo: or(&entry.icmp_echo, icmp_echo),
            hash: or(&entry.hash, HashMode::FiveTuple),
            track_fragments: or(&entry.fragments, false),
        });
    }
    vips
}

/// `vip`: the vip as messages name it.
fn unknown_pool(document: &Document, vip: &str, pool: &At<String>) -> Problem {
    let names = || document.pools.iter().map(|p| p.name.value.as_str());
    let hint = match suggest(&pool.value, names()) {
        Some(close) => format!(", did you mean {}?", quote(close)),
        None if document.pools.is_empty() => "; no pools are defined".to_owned(),
        None => format!(
            "; pools are {}",
            names().map(quote).collect::<Vec<_>>().join(", ")
        ),
    };
    Problem::new(
        pool.pos,
        format!("{vip} uses unknown pool {}{hint}", quote(&pool.value)),
    )
}

/// A Vip forwards to Backends of its own address family only (`vip`: as messages name it).
/// The one mix IPIP and GUE forwarding cannot carry: an IPv6 Vip's packets to an IPv4
/// backend (IPv6-in-IPv4 has no decapsulation here: `lb_decap` and this kernel lack it).
/// An IPv4 Vip may have IPv6 backends (IPv4-in-IPv6, Katran's "v4 VIP and v6 real"; in
/// GUE, IPv4 in UDP over IPv6), and L2 DSR rewrites only MACs, so it takes any mix.
fn family_check(vip: &str, address: &At<IpAddr>, pool: &PoolEntry, out: &mut Vec<Problem>) {
    let other = pool
        .backends
        .iter()
        .filter_map(|b| b.address.as_ref())
        .find(|b| address.value.is_ipv6() && b.value.is_ipv4());
    if let Some(backend) = other {
        out.push(Problem::new(
            address.pos,
            format!(
                "{vip} is IPv6 but pool {} has IPv4 backend {} (line {}): IPIP and GUE cannot \
                 carry IPv6 in IPv4; use IPv6 backends, or forwarding l2_dsr",
                quote(&pool.name.value),
                backend.value,
                backend.pos.line
            ),
        ));
    }
}

/// The map capacities hold what is configured.
fn capacities(document: &Document, global: &Global, out: &mut Vec<Problem>) {
    let given = |field: &Field<u32>| field.given().map(|f| f.pos);
    let note = |pos: Option<Pos>| if pos.is_some() { "" } else { " (the default)" };

    let vips = document.vips.len();
    let max_vips = global.max_vips as usize;
    if vips > max_vips {
        let pos = given(&document.global.max_vips);
        out.push(Problem::new(
            pos.or_else(|| document.vips.get(max_vips).map(|v| v.pos))
                .unwrap_or_default(),
            format!("{vips} vips do not fit in max_vips {max_vips}{}", note(pos)),
        ));
    }

    // Every pool member takes a backend id of its own (a Backend is a pool and an
    // address: its health and drain are per pool), as the reconciler assigns them.
    let members: Vec<&At<IpAddr>> = document
        .pools
        .iter()
        .flat_map(|p| p.backends.iter().filter_map(|b| b.address.as_ref()))
        .collect();
    let max_backends = global.max_backends as usize;
    if members.len() >= max_backends {
        let pos = given(&document.global.max_backends);
        out.push(Problem::new(
            pos.or_else(|| members.get(max_backends.saturating_sub(1)).map(|a| a.pos))
                .unwrap_or_default(),
            format!(
                "{} pool members need max_backends of at least {} (id 0 is reserved), but it is {max_backends}{}",
                members.len(),
                members.len() + 1,
                note(pos)
            ),
        ));
    }
}
