//! The YAML config: what the daemon balances (Vips, Pools of Backends, health checks) and
//! the few global settings, parsed and validated in one step.
//!
//! A config is accepted whole or refused whole: [`Config::load`] either returns a fully
//! validated [`Config`], with every default filled in and every automatic table size
//! resolved, or a [`ConfigError`] listing every problem as a `FILE:LINE:COLUMN: message`
//! line. The running daemon keeps its old config when a reload is refused.
//!
//! `config/lb.example.yaml` documents every key.
//!
//! Files: `yaml.rs` (YAML to a tree of positioned nodes), `schema.rs` (the keys of each
//! section, read from the tree), `values.rs` (the syntax of each kind of value),
//! `validate.rs` (rules across values, defaults, the final [`Config`]), `error.rs`,
//! `describe.rs` (the summary `mlb check` prints).

mod describe;
mod error;
mod schema;
mod validate;
mod values;
mod yaml;

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    ops::RangeInclusive,
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::consts::{
    DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS, PROTO_TCP, PROTO_UDP,
    vip_flags,
};
pub use lb_common::hash::HashMode;

pub use describe::describe;
pub use error::{ConfigError, Pos, Problem};

/// Default `global.metrics_listen`. Prometheus's exporter range (9100–9999) is fully
/// allocated, 9100 to node_exporter, which load balancers run too. 61100 is free by two
/// conventions: IANA never assigns 49152–65535, and Linux's ephemeral ports end at 60999,
/// so no outgoing connection takes it either.
pub const DEFAULT_METRICS_PORT: u16 = 61100;
pub const DEFAULT_METRICS_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(
    Ipv4Addr::new(127, 0, 0, 1),
    DEFAULT_METRICS_PORT,
));
/// Default `global.second_chance`: long enough for a rolling config change across a
/// fleet and a box's restart, short enough that a chain rarely outlives its connections'
/// idle gaps.
pub const DEFAULT_SECOND_CHANCE: Duration = Duration::from_secs(300);
/// Largest `global.second_chance`.
pub const MAX_SECOND_CHANCE: Duration = Duration::from_secs(86_400);

/// Default `global.encap_source_v4`.
pub const DEFAULT_ENCAP_SOURCE_V4: (Ipv4Addr, u8) = (Ipv4Addr::new(172, 16, 0, 0), 16);
/// Default `global.encap_source_v6`.
pub const DEFAULT_ENCAP_SOURCE_V6: (Ipv6Addr, u8) =
    (Ipv6Addr::new(0xfd00, 0xffff, 0, 0, 0, 0, 0, 0), 96);
/// Default `global.pin_path`.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/mlb";
/// Smallest `global.conntrack_entries`.
pub const MIN_CONNTRACK_ENTRIES: u32 = 1024;
/// Largest `global.conntrack_entries` (2^21 buckets of 7 ways).
pub const MAX_CONNTRACK_ENTRIES: u32 =
    lb_common::conntrack::MAX_BUCKETS * lb_common::conntrack::WAYS as u32;
/// Largest `global.conntrack_idle`, in seconds.
pub const MAX_CONNTRACK_IDLE: u32 = 86_400;
/// Largest `global.flow_cache_entries`.
pub const MAX_FLOW_CACHE_ENTRIES: u32 = 1 << 20;
/// Largest `global.icmp_rate`.
pub const MAX_ICMP_RATE: u32 = 1_000_000;
/// Shortest health-check interval.
pub const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(10);
/// Largest health-check jitter (a fraction of the interval).
pub const MAX_JITTER: f64 = 0.5;

/// A validated config.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub global: Global,
    pub interfaces: Vec<Interface>,
    /// In file order.
    pub vips: Vec<VipConfig>,
    /// By name. Pools no Vip refers to are kept (and reported by [`describe`]).
    pub pools: BTreeMap<String, Pool>,
    /// Route health injection: `None` = off.
    pub announce: Option<Announce>,
    /// Where the config came from: the path given to [`Config::load`], or the origin given
    /// to [`Config::parse`].
    pub source: PathBuf,
}

/// Settings of the whole load balancer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Global {
    /// Flow hash seed; must be the same on every load balancer of a fleet.
    pub hash_seed: u32,
    /// Connection-table capacity (entries, both address families together).
    pub conntrack_entries: u32,
    /// Seconds without a packet after which a flow's connection-table entry may be reused.
    pub conntrack_idle: u32,
    /// Per-CPU flow-cache slots per address family.
    pub flow_cache_entries: u32,
    /// Vip map capacity (at least the number of configured Vips).
    pub max_vips: u32,
    /// Backend map capacity (more than the number of distinct Backend addresses: id 0 is
    /// reserved).
    pub max_backends: u32,
    /// Where the Prometheus metrics are served.
    pub metrics_listen: SocketAddr,
    /// Outer IPv4 source prefix of IPIP packets: source = prefix | (flow hash & host bits).
    pub encap_source_v4: (Ipv4Addr, u8),
    /// Outer IPv6 source prefix of IPv6-in-IPv6 packets: the last 32 bits vary with the
    /// flow hash.
    pub encap_source_v6: (Ipv6Addr, u8),
    /// bpffs directory the maps are pinned under.
    pub pin_path: PathBuf,
    /// How long each Vip keeps its previous MaglevTable after a change (second chance);
    /// zero turns it off.
    pub second_chance: Duration,
    /// A group whose members may use the control socket (name, gid); `None`: root and
    /// the daemon's user only.
    pub control_group: Option<(String, u32)>,
    /// Default of `vips[].icmp_echo`: answer pings to Vip addresses from XDP.
    pub icmp_echo: bool,
    /// ICMP messages each CPU may send per second, per kind (echo replies, "too big").
    pub icmp_rate: u32,
    /// UDP destination port of GUE packets (`forwarding: gue`).
    pub gue_port: u16,
}

impl Default for Global {
    fn default() -> Self {
        Self {
            hash_seed: 0,
            conntrack_entries: DEFAULT_CONNTRACK_ENTRIES,
            conntrack_idle: lb_common::consts::DEFAULT_CONNTRACK_IDLE,
            flow_cache_entries: lb_common::consts::DEFAULT_FLOW_CACHE_ENTRIES,
            max_vips: DEFAULT_MAX_VIPS,
            max_backends: DEFAULT_MAX_BACKENDS,
            metrics_listen: DEFAULT_METRICS_LISTEN,
            encap_source_v4: DEFAULT_ENCAP_SOURCE_V4,
            encap_source_v6: DEFAULT_ENCAP_SOURCE_V6,
            pin_path: PathBuf::from(DEFAULT_PIN_PATH),
            second_chance: DEFAULT_SECOND_CHANCE,
            control_group: None,
            icmp_echo: true,
            icmp_rate: lb_common::consts::DEFAULT_ICMP_RATE,
            gue_port: lb_common::consts::DEFAULT_GUE_PORT,
        }
    }
}

/// Route health injection: one host route per servable Vip address in a kernel routing
/// table that a BGP daemon (BIRD, FRR, GoBGP via zebra) exports to the routers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Announce {
    /// The kernel routing table the routes go to (never main, local or default).
    pub table: u32,
}

/// An interface the XDP program is attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub xdp_mode: XdpModeConfig,
    /// A pinned XDP program that gets this interface's packets not for a Vip (else the
    /// kernel does).
    pub next_program: Option<PathBuf>,
}

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum XdpModeConfig {
    /// In the driver (fastest; the driver must support XDP).
    Native,
    /// In the generic network stack (works everywhere, slow; for tests).
    Generic,
    /// Native if the driver supports it, else generic.
    #[default]
    Auto,
}

/// A Vip: `(address, port, protocol)` and how its traffic is balanced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipConfig {
    /// Unique; defaults to [`VipConfig::endpoint`].
    pub name: String,
    pub address: IpAddr,
    /// 0 = every port of this address and protocol.
    pub port: u16,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    /// MaglevTable size `M` (prime), already resolved when the config said `auto`.
    pub table_size: u32,
    /// The config said `auto` (or nothing): the size follows the pool's size.
    pub table_size_auto: bool,
    /// Name of its pool (a key of [`Config::pools`]).
    pub pool: String,
    pub when_no_backend: WhenNoBackend,
    /// Fragments tracked (`true`, `fragments: track`) or dropped.
    pub track_fragments: bool,
    /// What picks a new flow's table slot: the 5-tuple, the source address or the
    /// destination port.
    pub hash: HashMode,
    /// Pings to its address are answered from XDP (for an address shared by several
    /// Vips: when any of them says so).
    pub icmp_echo: bool,
}

impl VipConfig {
    /// `address:port/protocol`, IPv6 addresses in brackets: `10.200.0.1:80/tcp`,
    /// `[fd00::1]:443/tcp`.
    pub fn endpoint(&self) -> String {
        endpoint(self.address, self.port, self.protocol)
    }

    /// The `VipState::flags` bits this Vip's settings call for (`ACTIVE` included).
    pub fn flags(&self) -> u32 {
        let mut flags = vip_flags::ACTIVE;
        if self.address.is_ipv6() {
            flags |= vip_flags::IPV6;
        }
        match self.forwarding {
            Forwarding::Ipip => {}
            Forwarding::L2Dsr => flags |= vip_flags::L2_DSR,
            Forwarding::Gue => flags |= vip_flags::GUE,
        }
        if self.when_no_backend == WhenNoBackend::Pass {
            flags |= vip_flags::PASS_WHEN_EMPTY;
        }
        if self.track_fragments {
            flags |= vip_flags::FRAGMENTS_TRACK;
        }
        flags | self.hash.flag()
    }
}

pub(crate) fn endpoint(address: IpAddr, port: u16, protocol: Protocol) -> String {
    match address {
        IpAddr::V4(a) => format!("{a}:{port}/{protocol}"),
        IpAddr::V6(a) => format!("[{a}]:{port}/{protocol}"),
    }
}

/// L4 protocol of a Vip.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }
}

/// How packets reach the Backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Forwarding {
    /// Encapsulated: IPIP for IPv4, IPv6-in-IPv6 for IPv6. Backends may be anywhere routed.
    #[default]
    Ipip,
    /// Destination MAC rewritten (L2 direct server return): Backends on the same L2 segment,
    /// with the Vip on a loopback interface.
    L2Dsr,
    /// Encapsulated in UDP (GUE variant 1: outer IP and UDP to `global.gue_port`, the
    /// source port from the flow hash), for backends whose NICs spread flows by UDP ports.
    Gue,
}

/// What a Vip does with a new flow when no Backend is up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WhenNoBackend {
    #[default]
    Drop,
    /// Hand the packet to the local network stack.
    Pass,
}

/// A named set of Backends and how they are health-checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Pool {
    /// In file order.
    pub backends: Vec<BackendConfig>,
    pub health_check: HealthCheck,
}

/// A Backend in a pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    pub address: IpAddr,
    /// Relative share of the table; 0 = draining (keeps its flows, gets no new ones).
    pub weight: u32,
    /// The same for this address in every pool: the name given in the config, else the
    /// address.
    pub name: String,
}

/// How the Backends of a pool are checked.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthCheck {
    pub kind: CheckKind,
    /// Port checked on each Backend (0 with [`CheckKind::None`]).
    pub port: u16,
    pub interval: Duration,
    /// Always shorter than `interval`.
    pub timeout: Duration,
    /// Consecutive successes for a down Backend to go up.
    pub rise: u32,
    /// Consecutive failures for an up Backend to go down.
    pub fall: u32,
    /// Random spread of each interval, as a fraction of it: `0.0..=0.5`.
    pub jitter: f64,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            kind: CheckKind::None,
            port: 0,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 3,
            jitter: 0.1,
        }
    }
}

/// What a health check does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    /// No check: every Backend is always up.
    None,
    /// A TCP connect.
    Tcp,
    /// An HTTP/1.1 `GET path`; up when the status is in `status`.
    Http {
        path: String,
        host: Option<String>,
        status: RangeInclusive<u16>,
    },
    /// A UDP datagram `send`; up on a reply (starting with `expect`, if given).
    Udp {
        send: Vec<u8>,
        expect: Option<Vec<u8>>,
    },
}

impl CheckKind {
    /// The config keyword: `none`, `tcp`, `http` or `udp`.
    pub fn keyword(&self) -> &'static str {
        match self {
            CheckKind::None => "none",
            CheckKind::Tcp => "tcp",
            CheckKind::Http { .. } => "http",
            CheckKind::Udp { .. } => "udp",
        }
    }
}

impl Config {
    /// Reads, parses and validates the config at `path`; positions in errors name `path` as
    /// given.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let bytes = std::fs::read(path).map_err(|e| {
            ConfigError::new(
                &path.display().to_string(),
                vec![Problem::new(Pos::NONE, format!("cannot read: {e}"))],
            )
        })?;
        Config::from_bytes(&bytes, path)
    }

    /// Parses and validates the bytes of the file at `path` (already read, so a caller
    /// that keeps the bytes validates exactly what it kept).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let text = String::from_utf8(bytes.to_vec()).map_err(|e| {
            let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
            let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            let column = String::from_utf8_lossy(&valid[line_start..])
                .chars()
                .count()
                + 1;
            let pos = Pos::new(
                u32::try_from(line).unwrap_or(u32::MAX),
                u32::try_from(column).unwrap_or(u32::MAX),
            );
            ConfigError::new(
                &origin,
                vec![Problem::new(pos, "the file is not valid UTF-8")],
            )
        })?;
        let mut config = Config::parse(&text, &origin)?;
        config.source = path.to_path_buf();
        Ok(config)
    }

    /// Parses and validates `text`; `origin` names it in errors (usually the file name).
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let tree = yaml::parse(text).map_err(|problem| ConfigError::new(origin, vec![problem]))?;
        let mut problems = Vec::new();
        let document = schema::read(&tree, &mut problems);
        let config = validate::validate(&document, &mut problems);
        if problems.is_empty() {
            Ok(Config {
                source: PathBuf::from(origin),
                ..config
            })
        } else {
            Err(ConfigError::new(origin, problems))
        }
    }

    /// Names of the pools no Vip refers to.
    pub fn unused_pools(&self) -> Vec<&str> {
        self.pools
            .keys()
            .filter(|name| !self.vips.iter().any(|vip| &vip.pool == *name))
            .map(String::as_str)
            .collect()
    }

    /// Every distinct Backend address, sorted: the Backends the data plane needs ids for.
    pub fn backend_addresses(&self) -> Vec<IpAddr> {
        let mut addresses: Vec<IpAddr> = self
            .pools
            .values()
            .flat_map(|pool| pool.backends.iter().map(|b| b.address))
            .collect();
        addresses.sort_unstable();
        addresses.dedup();
        addresses
    }
}

impl fmt::Display for XdpModeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XdpModeConfig::Native => "native",
            XdpModeConfig::Generic => "generic",
            XdpModeConfig::Auto => "auto",
        })
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

impl fmt::Display for Forwarding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Forwarding::Ipip => "ipip",
            Forwarding::L2Dsr => "l2_dsr",
            Forwarding::Gue => "gue",
        })
    }
}

impl fmt::Display for WhenNoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WhenNoBackend::Drop => "drop",
            WhenNoBackend::Pass => "pass",
        })
    }
}
