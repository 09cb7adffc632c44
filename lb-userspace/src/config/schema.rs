//! The config as written: which keys each section has, read from the YAML tree into
//! structs that remember where each value came from.
//!
//! Everything wrong with one key or one value is reported here (unknown, repeated or
//! missing keys, wrong shapes, values that do not parse); rules that involve several
//! values are in `validate.rs`. Reading goes on after a problem, so that one run reports
//! them all.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::RangeInclusive,
    path::PathBuf,
    time::Duration,
};

use super::{
    Forwarding, HashMode, MIN_CHECK_INTERVAL, MIN_CONNTRACK_ENTRIES, Protocol, WhenNoBackend,
    XdpModeConfig,
    error::{Pos, Problem, quote, suggest},
    values::{self, Parsed},
    yaml::{Node, Value},
};

const TOP_KEYS: &[&str] = &["global", "interfaces", "announce", "vips", "pools"];
const ANNOUNCE_KEYS: &[&str] = &["table"];
const GLOBAL_KEYS: &[&str] = &[
    "hash_seed",
    "conntrack_entries",
    "conntrack_idle",
    "flow_cache_entries",
    "max_vips",
    "max_backends",
    "metrics_listen",
    "encap_source_v4",
    "encap_source_v6",
    "pin_path",
    "second_chance",
    "control_group",
    "icmp_echo",
    "icmp_rate",
    "gue_port",
];
const INTERFACE_KEYS: &[&str] = &["name", "xdp_mode", "next_program"];
const VIP_KEYS: &[&str] = &[
    "name",
    "address",
    "port",
    "protocol",
    "forwarding",
    "table_size",
    "pool",
    "when_no_backend",
    "icmp_echo",
    "hash",
    "fragments",
];
const POOL_KEYS: &[&str] = &["backends", "health_check"];
const BACKEND_KEYS: &[&str] = &["address", "weight", "name"];
const CHECK_KEYS: &[&str] = &[
    "kind", "port", "interval", "timeout", "rise", "fall", "jitter", "http", "udp",
];
const HTTP_KEYS: &[&str] = &["path", "host", "expect_status"];
const UDP_KEYS: &[&str] = &["send", "expect"];

const XDP_MODES: &[(&str, XdpModeConfig)] = &[
    ("native", XdpModeConfig::Native),
    ("generic", XdpModeConfig::Generic),
    ("auto", XdpModeConfig::Auto),
];
const PROTOCOLS: &[(&str, Protocol)] = &[("tcp", Protocol::Tcp), ("udp", Protocol::Udp)];
const FORWARDINGS: &[(&str, Forwarding)] = &[
    ("ipip", Forwarding::Ipip),
    ("l2_dsr", Forwarding::L2Dsr),
    ("gue", Forwarding::Gue),
];
const HASH_MODES: &[(&str, HashMode)] = &[
    (HashMode::FiveTuple.keyword(), HashMode::FiveTuple),
    (HashMode::SourceAddress.keyword(), HashMode::SourceAddress),
    (
        HashMode::DestinationPort.keyword(),
        HashMode::DestinationPort,
    ),
];
/// `fragments`: `track` is true.
const FRAGMENTS: &[(&str, bool)] = &[("drop", false), ("track", true)];
const BOOLEANS: &[(&str, bool)] = &[("true", true), ("false", false)];
const WHEN_NO_BACKEND: &[(&str, WhenNoBackend)] =
    &[("drop", WhenNoBackend::Drop), ("pass", WhenNoBackend::Pass)];
const CHECK_KINDS: &[(&str, Kind)] = &[
    ("tcp", Kind::Tcp),
    ("http", Kind::Http),
    ("udp", Kind::Udp),
    ("none", Kind::None),
];

/// A value and where it is written.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct At<T> {
    pub value: T,
    pub pos: Pos,
}

/// An optional key.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) enum Field<T> {
    #[default]
    Absent,
    /// Given but refused (already reported): rules involving it are skipped.
    Invalid,
    Given(At<T>),
}

impl<T: Clone> Field<T> {
    /// The value, the default when absent, nothing when invalid.
    pub fn or(&self, default: T) -> Option<T> {
        match self {
            Field::Absent => Some(default),
            Field::Invalid => None,
            Field::Given(at) => Some(at.value.clone()),
        }
    }

    pub fn given(&self) -> Option<&At<T>> {
        match self {
            Field::Given(at) => Some(at),
            _ => None,
        }
    }
}

pub(crate) struct Document {
    pub global: Global,
    /// Absent or refused: `None` (already reported).
    pub interfaces: Option<At<Vec<InterfaceEntry>>>,
    pub vips: Vec<VipEntry>,
    /// In file order.
    pub pools: Vec<PoolEntry>,
    /// `announce.table`; `None` when the section is absent or refused.
    pub announce_table: Option<At<u32>>,
}

#[derive(Default)]
pub(crate) struct Global {
    pub hash_seed: Field<u32>,
    pub conntrack_entries: Field<u32>,
    pub conntrack_idle: Field<u32>,
    pub flow_cache_entries: Field<u32>,
    pub max_vips: Field<u32>,
    pub max_backends: Field<u32>,
    pub metrics_listen: Field<SocketAddr>,
    pub encap_source_v4: Field<(Ipv4Addr, u8)>,
    pub encap_source_v6: Field<(Ipv6Addr, u8)>,
    pub pin_path: Field<PathBuf>,
    pub second_chance: Field<Duration>,
    pub control_group: Field<(String, u32)>,
    pub icmp_echo: Field<bool>,
    pub icmp_rate: Field<u32>,
    pub gue_port: Field<u16>,
}

pub(crate) struct InterfaceEntry {
    pub name: Option<At<String>>,
    pub xdp_mode: Field<XdpModeConfig>,
    pub next_program: Field<PathBuf>,
}

pub(crate) struct VipEntry {
    pub pos: Pos,
    pub name: Field<String>,
    pub address: Option<At<IpAddr>>,
    pub port: Option<At<u16>>,
    pub protocol: Option<At<Protocol>>,
    pub forwarding: Field<Forwarding>,
    /// `None` inside: `auto`.
    pub table_size: Field<Option<u32>>,
    pub pool: Option<At<String>>,
    pub when_no_backend: Field<WhenNoBackend>,
    pub icmp_echo: Field<bool>,
    pub hash: Field<HashMode>,
    pub fragments: Field<bool>,
}

pub(crate) struct PoolEntry {
    pub name: At<String>,
    pub backends: Vec<BackendEntry>,
    /// Absent or refused: `None`.
    pub health_check: Option<CheckEntry>,
}

pub(crate) struct BackendEntry {
    pub address: Option<At<IpAddr>>,
    pub weight: Field<u32>,
    pub name: Field<String>,
}

/// The health-check kind as written; its sub-section is checked in `validate.rs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    None,
    Tcp,
    Http,
    Udp,
}

impl Kind {
    pub fn keyword(self) -> &'static str {
        CHECK_KINDS
            .iter()
            .find(|(_, kind)| *kind == self)
            .map_or("none", |(word, _)| word)
    }
}

pub(crate) struct CheckEntry {
    pub pos: Pos,
    pub kind: Option<At<Kind>>,
    pub port: Field<u16>,
    pub interval: Field<Duration>,
    pub timeout: Field<Duration>,
    pub rise: Field<u32>,
    pub fall: Field<u32>,
    pub jitter: Field<f64>,
    /// Position: the `http` key.
    pub http: Option<At<HttpEntry>>,
    /// Position: the `udp` key.
    pub udp: Option<At<UdpEntry>>,
}

pub(crate) struct HttpEntry {
    pub path: Field<String>,
    pub host: Field<String>,
    pub expect_status: Field<RangeInclusive<u16>>,
}

pub(crate) struct UdpEntry {
    pub send: Option<At<Vec<u8>>>,
    pub expect: Field<Vec<u8>>,
}

/// Reads the document; every problem found goes to `out`.
pub(crate) fn read(root: &Node, out: &mut Vec<Problem>) -> Document {
    let mut document = Document {
        global: Global::default(),
        interfaces: None,
        vips: Vec::new(),
        pools: Vec::new(),
        announce_table: None,
    };
    if !matches!(root.value, Value::Map(_) | Value::Null) {
        out.push(Problem::new(
            root.pos,
            format!(
                "expected a mapping with the keys {}, found {}",
                TOP_KEYS.join(", "),
                root.kind()
            ),
        ));
        return document;
    }
    let top = Section::new(root, "at the top level".to_owned(), TOP_KEYS, out);
    if let Some(global) = top.section("global", "in global".to_owned(), GLOBAL_KEYS, out) {
        document.global = read_global(&global, out);
    }
    if let Some(announce) = top.section("announce", "in announce".to_owned(), ANNOUNCE_KEYS, out) {
        document.announce_table = announce.required("table", out, values::route_table);
    }
    if let Some((pos, items)) = top.list("interfaces", out) {
        let interfaces = items
            .iter()
            .filter_map(|item| {
                Section::item(item, "interface", INTERFACE_KEYS, out)
                    .map(|s| read_interface(&s, out))
            })
            .collect();
        document.interfaces = Some(At {
            value: interfaces,
            pos,
        });
    }
    if let Some((_, items)) = top.list("vips", out) {
        document.vips = items
            .iter()
            .filter_map(|item| {
                Section::item(item, "vip", VIP_KEYS, out).map(|s| read_vip(item.pos, &s, out))
            })
            .collect();
    }
    if let Some(pools) = top.get("pools") {
        document.pools = read_pools(pools, out);
    }
    document
}

fn read_global(s: &Section<'_>, out: &mut Vec<Problem>) -> Global {
    Global {
        hash_seed: s.optional("hash_seed", out, values::hash_seed),
        conntrack_entries: s.optional("conntrack_entries", out, |t| {
            values::uint(t, MIN_CONNTRACK_ENTRIES..=super::MAX_CONNTRACK_ENTRIES)
        }),
        conntrack_idle: s.optional("conntrack_idle", out, |t| {
            values::uint(t, 1..=super::MAX_CONNTRACK_IDLE)
        }),
        flow_cache_entries: s.optional("flow_cache_entries", out, |t| {
            values::uint(t, 0..=super::MAX_FLOW_CACHE_ENTRIES)
        }),
        // The connection table's ways hold 10-bit Vip and 13-bit Backend ids.
        max_vips: s.optional("max_vips", out, |t| {
            values::uint(t, 1..=lb_common::conntrack::MAX_VIPS)
        }),
        max_backends: s.optional("max_backends", out, |t| {
            values::uint(t, 2..=lb_common::conntrack::MAX_BACKENDS)
        }),
        metrics_listen: s.optional("metrics_listen", out, values::socket_address),
        encap_source_v4: s.optional("encap_source_v4", out, values::prefix_v4),
        encap_source_v6: s.optional("encap_source_v6", out, values::prefix_v6),
        pin_path: s.optional("pin_path", out, values::absolute_path),
        second_chance: s.optional("second_chance", out, values::second_chance),
        control_group: s.optional("control_group", out, values::group),
        icmp_echo: s.optional("icmp_echo", out, |t| values::keyword(t, BOOLEANS)),
        icmp_rate: s.optional("icmp_rate", out, |t| {
            values::uint(t, 1..=super::MAX_ICMP_RATE)
        }),
        gue_port: s.optional("gue_port", out, values::check_port),
    }
}

fn read_interface(s: &Section<'_>, out: &mut Vec<Problem>) -> InterfaceEntry {
    InterfaceEntry {
        name: s.required("name", out, values::interface_name),
        xdp_mode: s.optional("xdp_mode", out, |t| values::keyword(t, XDP_MODES)),
        next_program: s.optional("next_program", out, values::absolute_path),
    }
}

fn read_vip(pos: Pos, s: &Section<'_>, out: &mut Vec<Problem>) -> VipEntry {
    VipEntry {
        pos,
        name: s.optional("name", out, values::name),
        address: s.required("address", out, values::unicast_address),
        port: s.required("port", out, values::port),
        protocol: s.required("protocol", out, |t| values::keyword(t, PROTOCOLS)),
        forwarding: s.optional("forwarding", out, |t| values::keyword(t, FORWARDINGS)),
        table_size: s.optional("table_size", out, values::table_size),
        pool: s.required("pool", out, values::name),
        when_no_backend: s.optional("when_no_backend", out, |t| {
            values::keyword(t, WHEN_NO_BACKEND)
        }),
        icmp_echo: s.optional("icmp_echo", out, |t| values::keyword(t, BOOLEANS)),
        hash: s.optional("hash", out, |t| values::keyword(t, HASH_MODES)),
        fragments: s.optional("fragments", out, |t| values::keyword(t, FRAGMENTS)),
    }
}

fn read_pools(node: &Node, out: &mut Vec<Problem>) -> Vec<PoolEntry> {
    let entries = match &node.value {
        Value::Null => return Vec::new(),
        Value::Map(entries) => entries,
        _ => {
            out.push(Problem::new(
                node.pos,
                format!(
                    "invalid pools at the top level: expected a mapping of pool names to pools, found {}",
                    node.kind()
                ),
            ));
            return Vec::new();
        }
    };
    let mut pools: Vec<PoolEntry> = Vec::new();
    for (key, value) in entries {
        let Value::Scalar(text) = &key.value else {
            out.push(Problem::new(
                key.pos,
                format!("invalid pool name: expected a name, found {}", key.kind()),
            ));
            continue;
        };
        let name = match values::name(text) {
            Ok(name) => name,
            Err(reason) => {
                out.push(Problem::new(
                    key.pos,
                    format!("invalid pool name {}: {reason}", quote(text)),
                ));
                continue;
            }
        };
        if let Some(first) = pools.iter().find(|p| p.name.value == name) {
            out.push(Problem::new(
                key.pos,
                format!(
                    "duplicate pool {} (first defined at line {})",
                    quote(&name),
                    first.name.pos.line
                ),
            ));
            continue;
        }
        let ctx = format!("in pool {}", quote(&name));
        if !matches!(value.value, Value::Map(_) | Value::Null) {
            out.push(Problem::new(
                value.pos,
                format!(
                    "invalid pool {}: expected a mapping, found {}",
                    quote(&name),
                    value.kind()
                ),
            ));
            continue;
        }
        let s = Section::new(value, ctx, POOL_KEYS, out);
        pools.push(read_pool(
            At {
                value: name,
                pos: key.pos,
            },
            &s,
            out,
        ));
    }
    pools
}

fn read_pool(name: At<String>, s: &Section<'_>, out: &mut Vec<Problem>) -> PoolEntry {
    let backends = s
        .list("backends", out)
        .map(|(_, items)| {
            items
                .iter()
                .filter_map(|item| {
                    Section::item(item, "backend", BACKEND_KEYS, out).map(|b| read_backend(&b, out))
                })
                .collect()
        })
        .unwrap_or_default();
    let health_check = s
        .section(
            "health_check",
            "in health_check".to_owned(),
            CHECK_KEYS,
            out,
        )
        .map(|c| read_check(&c, out));
    PoolEntry {
        name,
        backends,
        health_check,
    }
}

fn read_backend(s: &Section<'_>, out: &mut Vec<Problem>) -> BackendEntry {
    BackendEntry {
        address: s.required("address", out, values::unicast_address),
        weight: s.optional("weight", out, |t| values::uint(t, 0..=u32::MAX)),
        name: s.optional("name", out, values::name),
    }
}

fn read_check(s: &Section<'_>, out: &mut Vec<Problem>) -> CheckEntry {
    let http = s
        .section("http", "in health_check.http".to_owned(), HTTP_KEYS, out)
        .map(|h| At {
            pos: s.key_pos("http"),
            value: HttpEntry {
                path: h.optional("path", out, values::http_path),
                host: h.optional("host", out, values::http_host),
                expect_status: h.optional("expect_status", out, values::status_range),
            },
        });
    let udp = s
        .section("udp", "in health_check.udp".to_owned(), UDP_KEYS, out)
        .map(|u| At {
            pos: s.key_pos("udp"),
            value: UdpEntry {
                send: u.required("send", out, values::payload),
                expect: u.optional("expect", out, values::payload),
            },
        });
    CheckEntry {
        pos: s.pos,
        kind: s.required("kind", out, |t| values::keyword(t, CHECK_KINDS)),
        port: s.optional("port", out, values::check_port),
        interval: s.optional("interval", out, |t| values::duration(t, MIN_CHECK_INTERVAL)),
        timeout: s.optional("timeout", out, |t| {
            values::duration(t, Duration::from_millis(1))
        }),
        rise: s.optional("rise", out, |t| values::uint(t, 1..=u32::MAX)),
        fall: s.optional("fall", out, |t| values::uint(t, 1..=u32::MAX)),
        jitter: s.optional("jitter", out, |t| values::percent(t, 50)),
        http,
        udp,
    }
}

/// A mapping with a fixed set of keys, checked when opened: unknown and repeated keys are
/// reported once, then values are looked up by key.
struct Section<'a> {
    /// Where the section is, for missing keys.
    pos: Pos,
    /// "in vip", "at the top level": where the section is, in words.
    ctx: String,
    /// The first entry of each known key.
    entries: Vec<(&'a str, &'a Node, &'a Node)>,
    /// Keys suggested for unknown ones: not reported again as missing.
    suggested: Vec<&'static str>,
}

impl<'a> Section<'a> {
    /// `node` as a section; a null node is an empty one. The caller has checked that
    /// `node` is a mapping or null.
    fn new(node: &'a Node, ctx: String, keys: &[&'static str], out: &mut Vec<Problem>) -> Self {
        let mut section = Section {
            pos: node.pos,
            ctx,
            entries: Vec::new(),
            suggested: Vec::new(),
        };
        let Value::Map(entries) = &node.value else {
            return section;
        };
        for (key, value) in entries {
            let Value::Scalar(name) = &key.value else {
                out.push(Problem::new(
                    key.pos,
                    format!(
                        "invalid key {}: expected a name, found {}",
                        section.ctx,
                        key.kind()
                    ),
                ));
                continue;
            };
            if let Some(&(_, first, _)) = section.entries.iter().find(|(k, ..)| k == name) {
                out.push(Problem::new(
                    key.pos,
                    format!(
                        "duplicate key {} {} (first defined at line {})",
                        quote(name),
                        section.ctx,
                        first.pos.line
                    ),
                ));
            } else if let Some(&known) = keys.iter().find(|k| *k == name) {
                section.entries.push((known, key, value));
            } else {
                let message = match suggest(name, keys.iter().copied()) {
                    Some(close) => {
                        section.suggested.push(close);
                        format!(
                            "unknown key {} {}, did you mean {}?",
                            quote(name),
                            section.ctx,
                            quote(close)
                        )
                    }
                    None => format!(
                        "unknown key {} {}; valid keys are {}",
                        quote(name),
                        section.ctx,
                        keys.join(", ")
                    ),
                };
                out.push(Problem::new(key.pos, message));
            }
        }
        section
    }

    /// A list item that must be a mapping (`noun`: what the item is).
    fn item(
        node: &'a Node,
        noun: &str,
        keys: &[&'static str],
        out: &mut Vec<Problem>,
    ) -> Option<Self> {
        if let Value::Map(_) = node.value {
            Some(Section::new(node, format!("in {noun}"), keys, out))
        } else {
            out.push(Problem::new(
                node.pos,
                format!("invalid {noun}: expected a mapping, found {}", node.kind()),
            ));
            None
        }
    }

    fn get(&self, key: &str) -> Option<&'a Node> {
        self.entries
            .iter()
            .find(|(k, ..)| *k == key)
            .map(|&(_, _, value)| value)
    }

    /// Where `key` is written (the section's position if it is not).
    fn key_pos(&self, key: &str) -> Pos {
        self.entries
            .iter()
            .find(|(k, ..)| *k == key)
            .map_or(self.pos, |(_, k, _)| k.pos)
    }

    fn wrong_shape(&self, key: &str, expected: &str, node: &Node, out: &mut Vec<Problem>) {
        out.push(Problem::new(
            node.pos,
            format!(
                "invalid {key} {}: expected {expected}, found {}",
                self.ctx,
                node.kind()
            ),
        ));
    }

    /// The sub-section `key`, if present (null counts as empty).
    fn section(
        &self,
        key: &str,
        ctx: String,
        keys: &[&'static str],
        out: &mut Vec<Problem>,
    ) -> Option<Section<'a>> {
        let node = self.get(key)?;
        if let Value::Map(_) | Value::Null = node.value {
            Some(Section::new(node, ctx, keys, out))
        } else {
            self.wrong_shape(key, "a mapping", node, out);
            None
        }
    }

    /// The required list `key` and the position of the key; null counts as empty.
    fn list(&self, key: &str, out: &mut Vec<Problem>) -> Option<(Pos, &'a [Node])> {
        let Some(node) = self.get(key) else {
            self.missing(key, out);
            return None;
        };
        match &node.value {
            Value::Seq(items) => Some((self.key_pos(key), items.as_slice())),
            Value::Null => Some((self.key_pos(key), &[])),
            _ => {
                self.wrong_shape(key, "a sequence", node, out);
                None
            }
        }
    }

    fn missing(&self, key: &str, out: &mut Vec<Problem>) {
        if self.suggested.contains(&key) {
            return;
        }
        out.push(Problem::new(
            self.pos,
            format!("missing key {} {}", quote(key), self.ctx),
        ));
    }

    /// The value of `key`, parsed; problems reported.
    fn optional<T>(
        &self,
        key: &str,
        out: &mut Vec<Problem>,
        parse: impl FnOnce(&str) -> Parsed<T>,
    ) -> Field<T> {
        let Some(node) = self.get(key) else {
            return Field::Absent;
        };
        let Value::Scalar(text) = &node.value else {
            self.wrong_shape(key, "a single value", node, out);
            return Field::Invalid;
        };
        match parse(text) {
            Ok(value) => Field::Given(At {
                value,
                pos: node.pos,
            }),
            Err(reason) => {
                out.push(Problem::new(
                    node.pos,
                    format!("invalid {key} {} {}: {reason}", quote(text), self.ctx),
                ));
                Field::Invalid
            }
        }
    }

    /// Like [`optional`](Self::optional), and reported as missing when absent.
    fn required<T>(
        &self,
        key: &str,
        out: &mut Vec<Problem>,
        parse: impl FnOnce(&str) -> Parsed<T>,
    ) -> Option<At<T>> {
        match self.optional(key, out, parse) {
            Field::Given(at) => Some(at),
            Field::Invalid => None,
            Field::Absent => {
                self.missing(key, out);
                None
            }
        }
    }
}
