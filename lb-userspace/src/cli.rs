//! The command line: `mlb <command>`.

use std::{net::IpAddr, path::PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

/// Default bpffs directory of the pinned maps and links (the config's `global.pin_path`).
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/mlb";

#[derive(Parser)]
#[command(
    name = "mlb",
    version,
    about = "A Maglev load balancer with an XDP data plane",
    long_about = "mlb balances TCP and UDP flows for virtual IPs across pools of backends: an \
                  XDP program steers each packet by consistent (Maglev) hashing; this daemon \
                  health-checks backends, builds the tables and serves Prometheus metrics."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon: attach to the config's interfaces, apply the config, reload on
    /// SIGHUP or file change. SIGTERM leaves the program attached with its state, so a
    /// restart drops no flow.
    Run {
        /// The YAML config.
        #[arg(long, short)]
        config: PathBuf,
        /// On exit, detach the program and remove its pinned maps (drops every flow).
        #[arg(long)]
        detach_on_exit: bool,
    },
    /// Validate config files and print what they would configure; non-zero exit on error.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Dry run: per Vip, which backends change and the share of flows that would move if
    /// FILE replaced the running config (or the config given with --against).
    Plan {
        file: PathBuf,
        /// Compare with this config instead of the running daemon's.
        #[arg(long)]
        against: Option<PathBuf>,
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// Vips, backends, health, table sizes and generations, from the running daemon (or,
    /// if it is not running, from the state it left).
    Status {
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Which Vip and backend a flow goes to, and why (connection-table entry or table
    /// slot), read from the live data plane and computed as the kernel does.
    Trace {
        #[arg(long)]
        src: IpAddr,
        #[arg(long)]
        sport: u16,
        #[arg(long)]
        dst: IpAddr,
        #[arg(long)]
        dport: u16,
        #[arg(long, value_enum, default_value_t = Proto::Tcp)]
        proto: Proto,
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// Stop sending new flows to a backend (in every pool) without editing the config;
    /// its existing flows continue. Undone by `undrain` or the next reload.
    Drain {
        address: IpAddr,
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// Undo `drain`.
    Undrain {
        address: IpAddr,
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// Maintenance: `on` withdraws every Vip this host announces (forwarding goes on, so
    /// traffic drains to the other load balancers); `off` announces again. Remembered
    /// across daemon restarts and reboots until turned off.
    Maintenance {
        #[arg(value_enum)]
        state: OnOff,
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// Detach the program from the interfaces and remove the pinned maps and state
    /// (drops every flow) and withdraw its Vip routes. For a stopped daemon.
    Detach {
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// On a backend host: `lb_decap`, which takes off the load balancers' encapsulation
    /// (and decides second chance's chained packets).
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (mlb.1 and one per command) into DIR: for packaging.
    #[command(hide = true)]
    Man { dir: PathBuf },
}

#[derive(Subcommand)]
pub enum BackendCommand {
    /// Attach `lb_decap` to an interface (or update its source prefixes): encapsulated
    /// packets are accepted from the load balancers' source prefixes only. Stays attached
    /// after the command (pinned).
    Attach {
        #[arg(long)]
        interface: String,
        /// A load balancers' source prefix (their `encap_source_v4` / `encap_source_v6`),
        /// e.g. 172.16.0.0/16; repeat for more (at most 8 per family).
        #[arg(long = "lb-source", required = true, value_parser = parse_prefix)]
        lb_sources: Vec<(IpAddr, u8)>,
        /// The load balancers' `gue_port`: UDP to it from their source prefixes is GUE,
        /// taken off like IPIP; 0 = take no GUE off.
        #[arg(long, default_value_t = lb_common::consts::DEFAULT_GUE_PORT)]
        gue_port: u16,
        /// native, generic or auto.
        #[arg(long, default_value = "auto", value_parser = parse_xdp_mode)]
        xdp_mode: crate::config::XdpModeConfig,
        #[arg(long, default_value = crate::backend::DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// `lb_decap`'s counters: delivered, chained and kept, chained and sent on, dropped.
    Status {
        /// In the Prometheus text format (for node_exporter's textfile collector).
        #[arg(long)]
        prometheus: bool,
        #[arg(long, default_value = crate::backend::DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// Detach `lb_decap` and remove its pins.
    Detach {
        #[arg(long)]
        interface: String,
        #[arg(long, default_value = crate::backend::DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
}

fn parse_prefix(text: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = text
        .split_once('/')
        .ok_or_else(|| format!("{text}: expected ADDRESS/LENGTH, e.g. 172.16.0.0/16"))?;
    let addr: IpAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= max)
        .ok_or_else(|| format!("{len}: a prefix length from 0 to {max}"))?;
    Ok((addr, len))
}

fn parse_xdp_mode(text: &str) -> Result<crate::config::XdpModeConfig, String> {
    use crate::config::XdpModeConfig;
    match text {
        "native" => Ok(XdpModeConfig::Native),
        "generic" => Ok(XdpModeConfig::Generic),
        "auto" => Ok(XdpModeConfig::Auto),
        _ => Err(format!("{text}: native, generic or auto")),
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => lb_common::consts::PROTO_TCP,
            Proto::Udp => lb_common::consts::PROTO_UDP,
        }
    }
}
