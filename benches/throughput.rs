//! Forwarding throughput through the real data plane, against Linux's own alternatives in
//! the same run, in two network namespaces this process creates (root):
//!
//! - **xdp**: `lb_ingress` in native mode on the load balancer's veth, IPIP to 3 backends,
//!   sent back out with XDP_TX;
//! - **nft**: nftables DNAT with `jhash` over the same 3 backends (conntrack included);
//! - **plain**: plain IPv4 routing of the Vip to the same 3 backends (ECMP, L4 hash): no load
//!   balancing at all, the ceiling of the testbed for a kernel path.
//!
//! ```text
//!   ns wire: generator ─▶ wire0 ══ veth ══ eth0 ─▶ ns lb: XDP / nftables / routing
//!            sink      ◀─ wire0 ══ veth ══ eth0 ◀─     (to the backends' MACs)
//! ```
//!
//! - **Generator** (on the generator CPU): a small XDP program of this file run by
//!   BPF_PROG_TEST_RUN in live-frames mode as if a 60-byte frame arrived on `wire0`; it
//!   rewrites the frame, gives it a random source port out of `--flows` (UDP, or TCP ACK,
//!   client to Vip, checksum updated) and returns XDP_TX, so every copy really goes to the
//!   load balancer, at kernel speed. It offers more than the kernel paths forward; whatever
//!   the load balancer's receive ring cannot take is counted by the wire.
//! - **Reflector** (on the generator CPU): while a method runs, an XDP program on `wire0`
//!   turns every frame the load balancer forwards back into a fresh client-to-Vip frame
//!   (the generator's template and spread, cut to its length) and returns XDP_TX. The
//!   frames in flight circulate at the pace of the slower end, which is the load balancer
//!   (the reflector does a few stores), so it is saturated whatever primed the loop, also
//!   where live frames are refused and a packet socket offers less than XDP forwards.
//!   Sent into a veth without an XDP program, such frames were mostly lost here
//!   (`rx_queue_0_xdp_tx_errors`), so the kernel paths run behind an XDP_PASS program on
//!   the load balancer's veth (the frames reach the stack as from a NIC driver's pages; the
//!   program is ~1% of their time). veth counts what was reflected (`rx_queue_0_xdp_tx`)
//!   and dropped (`rx_queue_0_xdp_drops`, the sink between runs): the forwarded packets.
//!   The wire polls on a 20 µs timer while traffic flows, so the load balancer never pays
//!   a wake-up of it per packet it transmits.
//! - **The load balancer's work** is its veth's **threaded NAPI** thread (GRO on for the stack
//!   paths, as a physical NIC has; the XDP program for xdp), pinned to the *lb CPU* with
//!   SCHED_FIFO so that other processes do not take its CPU: that thread runs everything
//!   the load balancer does per packet — the XDP program and XDP_TX, or the kernel's whole
//!   path (GRO, conntrack, NAT, routing, transmit). Its CPU time is its run time
//!   (`/proc/PID/schedstat`, ns), cross-checked with the lb CPU's busy time in `/proc/stat`.
//!
//! Packets per second per core = forwarded packets / the load balancer's CPU seconds. A
//! thread busy less than 90% of the time was not saturated: its time then includes being
//! woken up, so its per-core figure is a lower bound. veth is a software NIC: its
//! per-packet driver work (frame to skb, ring handover) is in every figure, so absolute
//! rates are far below a physical NIC's; compare ratios.
//!
//! Each method runs `--seconds` per round, in `--rounds` interleaved rounds; bounded in time
//! and traffic, only inside its own namespaces, all removed at the end (Ctrl-C and panics
//! included).
//!
//! `MLB_BENCH_OBJECT=FILE` loads another build's `lb-ebpf` object instead of this one's
//! (an A/B across runs; its maps must be this build's).
//!
//! `cargo xtask bench throughput [--json FILE]`; directly:
//! `cargo bench -p lb-userspace --bench throughput -- [--seconds S] [--rounds R]
//! [--flows N] [--proto udp|tcp|both] [--json FILE]`

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    net::IpAddr,
    os::fd::OwnedFd,
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use aya::programs::{XdpMode, xdp::XdpLinkId};
use lb_common::{
    consts::{Counter, backend_flags, prog_names, vip_flags},
    hash::addr_words,
    maglev::{self, MaglevBackend},
    types::{Backend, GlobalConfig, VipAddr, VipKey, VipState},
};
use lb_testbed::bench::{pin, write_json};
use lb_testbed::netns::Netns;
use lb_userspace::dataplane::{Capacities, Dataplane, enable_forwarding};
use serde_json::{Value, json};

const VIP: &str = "10.200.0.1";
const UDP_PORT: u16 = 53;
const TCP_PORT: u16 = 80;
const BACKENDS: usize = 3;
const SEED: u32 = 0x5eed;
const TABLE_SIZE: u32 = 65_537;
const VIP_UDP: u32 = 0;
const VIP_TCP: u32 = 1;
/// The load balancer's NIC, and the other end of its wire.
const NIC: &str = "eth0";
const WIRE: &str = "wire0";
/// The load balancer's address on the segment, the client's (the packets' source), and the
/// backends' (they exist only as neighbour entries: frames to them end in the sink).
const LB_ADDR: &str = "10.100.0.1";
const CLIENT_ADDR: &str = "10.100.0.2";
const BACKEND_ADDRS: [&str; BACKENDS] = ["10.100.0.11", "10.100.0.12", "10.100.0.13"];
/// The nftables table of the nft method (in the load balancer's namespace only).
const NFT_TABLE: &str = "mlb_bench";
/// Frame size without FCS: Ethernet 14 + IPv4 20 + UDP 8 + 18 bytes of payload (TCP: 20 + 6).
const FRAME_BYTES: u32 = 60;
/// Traffic before the measured window (flows set up, rings filled).
const WARMUP: Duration = Duration::from_millis(500);
/// After the generator stops, before the last reading: the rings drain.
const DRAIN: Duration = Duration::from_millis(300);
/// The claim this benchmark checks: XDP forwards ≥ 3× nftables' packets per core.
const TARGET_XDP_OVER_NFT_PER_CORE: f64 = 3.0;
/// Below this share of its CPU the load balancer's thread is "not saturated".
const SATURATED: f64 = 0.9;
/// The generator's CPU (with everything else of this benchmark) and the load balancer's.
const GEN_CPU: usize = 0;
const LB_CPU: usize = 1;
/// The load balancer's connection table.
const CONNTRACK_ENTRIES: u32 = 1 << 16;

/// Set by Ctrl-C: every loop stops, the namespaces are removed.
static STOP: AtomicBool = AtomicBool::new(false);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Method {
    Xdp,
    Nft,
    Plain,
}

impl Method {
    const ALL: [Method; 3] = [Method::Xdp, Method::Nft, Method::Plain];

    fn name(self) -> &'static str {
        match self {
            Method::Xdp => "xdp",
            Method::Nft => "nft",
            Method::Plain => "plain",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Method::Xdp => "mlb XDP (native, IPIP, XDP_TX)",
            Method::Nft => "nftables DNAT, jhash",
            Method::Plain => "plain routing (ECMP), no LB",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Proto {
    Udp,
    Tcp,
    /// TCP SYNs from a random source address and port every frame: a SYN flood, every
    /// packet a new flow (mlb's XDP only).
    Syn,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
            Proto::Syn => "syn",
        }
    }
}

#[derive(clap::Parser)]
struct Args {
    /// Seconds per measured run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Rounds over every method and protocol.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Flows (source ports), a power of two up to 32768.
    #[arg(long, default_value_t = 4096)]
    flows: u32,
    /// Traffic kinds.
    #[arg(long, value_enum, default_value_t = ProtoArg::All)]
    proto: ProtoArg,
    /// Only these methods (xdp, nft, plain; comma-separated).
    #[arg(long, value_delimiter = ',')]
    methods: Vec<String>,
    /// Write the figures here as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ProtoArg {
    Udp,
    Tcp,
    Syn,
    /// udp and tcp.
    Both,
    All,
}

struct Options {
    seconds: f64,
    rounds: usize,
    flows: u32,
    protos: Vec<Proto>,
    json: Option<std::path::PathBuf>,
    methods: Vec<String>,
}

fn options() -> Options {
    let args: Args = clap::Parser::parse();
    let opts = Options {
        seconds: args.seconds,
        rounds: args.rounds,
        flows: args.flows,
        protos: match args.proto {
            ProtoArg::Udp => vec![Proto::Udp],
            ProtoArg::Tcp => vec![Proto::Tcp],
            ProtoArg::Syn => vec![Proto::Syn],
            ProtoArg::Both => vec![Proto::Udp, Proto::Tcp],
            ProtoArg::All => vec![Proto::Udp, Proto::Tcp, Proto::Syn],
        },
        json: args.json,
        methods: args.methods,
    };
    assert!(
        opts.flows.is_power_of_two() && opts.flows <= 32_768,
        "--flows must be a power of two up to 32768 (source ports)"
    );
    assert!(
        opts.seconds > 0.0 && opts.seconds <= 30.0,
        "--seconds must be in (0, 30]"
    );
    assert!((1..=10).contains(&opts.rounds), "--rounds must be 1..=10");
    opts
}

fn main() {
    let opts = options();
    for tool in ["nft", "ethtool"] {
        if !have(tool) {
            eprintln!("throughput: `{tool}` is missing (`cargo xtask setup` installs it)");
            std::process::exit(2);
        }
    }
    if std::thread::available_parallelism().map_or(1, |n| n.get()) <= LB_CPU {
        eprintln!("throughput: needs 2 CPUs (one for the generator, one for the load balancer)");
        std::process::exit(2);
    }
    ctrlc::set_handler(|| STOP.store(true, Ordering::SeqCst)).expect("Ctrl-C handler");
    // This process, the threads it starts and the commands it runs stay off the load
    // balancer's CPU.
    pin(0, GEN_CPU);

    let started = Instant::now();
    let mut bench = Bench::new(opts.flows);
    // The SYN flood measures mlb's new-flow rate, not a comparison.
    let methods = |proto: Proto| {
        Method::ALL
            .into_iter()
            .filter(move |&m| proto != Proto::Syn || m == Method::Xdp)
            .filter(|m| opts.methods.is_empty() || opts.methods.iter().any(|n| n == m.name()))
    };
    let total = opts.rounds
        * opts
            .protos
            .iter()
            .map(|&p| methods(p).count())
            .sum::<usize>();
    let mut runs = Vec::new();
    'rounds: for round in 1..=opts.rounds {
        for &proto in &opts.protos {
            for method in methods(proto) {
                if STOP.load(Ordering::SeqCst) {
                    break 'rounds;
                }
                progress(&format!(
                    "[{}/{total}] round {round}: {} {} for {:.0} s",
                    runs.len() + 1,
                    method.name(),
                    proto.name(),
                    opts.seconds
                ));
                runs.push(bench.run(method, proto, opts.seconds, round));
            }
        }
    }
    progress("");
    eprintln!();
    drop(bench);
    if STOP.load(Ordering::SeqCst) {
        eprintln!("interrupted: namespaces removed, nothing written");
        std::process::exit(130);
    }
    let summary = summarise(&runs, &opts.protos);
    report(&summary, &opts, started.elapsed());
    if let Some(path) = &opts.json {
        let body = json_report(&summary, &runs, &opts);
        write_json(path, &body);
    }
}

fn progress(line: &str) {
    eprint!("\r{line:<70}");
    let _ = std::io::stderr().flush();
}

fn have(command: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// SCHED_FIFO for task `pid`: the load balancer's thread is not preempted by other
/// processes on its CPU, and the sink always keeps up with it (it only ever runs when there
/// are packets, and the kernel keeps 5% of each CPU for others).
fn realtime(pid: i32) {
    let param = libc::sched_param { sched_priority: 50 };
    // SAFETY: plain syscall with a valid parameter block.
    let ok = unsafe { libc::sched_setscheduler(pid, libc::SCHED_FIFO, &param) } == 0;
    assert!(
        ok,
        "SCHED_FIFO for task {pid}: {}",
        std::io::Error::last_os_error()
    );
}

/// Runs `program args` in `netns`; panics with its stderr on failure.
fn sh(netns: &Netns, program: &str, args: &[&str]) -> String {
    let out = netns
        .command(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} in {}: {}",
        netns.name(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Feeds `script` to `nft -f -` in `netns`.
fn nft(netns: &Netns, script: &str) {
    let mut child = netns
        .command("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nft");
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .expect("write to nft");
    let out = child.wait_with_output().expect("nft");
    assert!(
        out.status.success(),
        "nft in {}: {}\n{script}",
        netns.name(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// `ethtool -S dev` in `netns`, as name → value.
fn ethtool_stats(netns: &Netns, dev: &str) -> BTreeMap<String, u64> {
    sh(netns, "ethtool", &["-S", dev])
        .lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(':')?;
            Some((name.trim().to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// `/sys/class/net/DEV/statistics/NAME` read inside `netns`.
fn link_counter(netns: &Netns, dev: &str, name: &str) -> u64 {
    sh(
        netns,
        "cat",
        &[&format!("/sys/class/net/{dev}/statistics/{name}")],
    )
    .trim()
    .parse()
    .expect("interface counter")
}

/// Kernel threads named `napi/…`: (pid, name).
fn napi_threads() -> BTreeSet<(i32, String)> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            comm.starts_with("napi/")
                .then(|| (pid, comm.trim().to_owned()))
        })
        .collect()
}

/// Turns on threaded NAPI for `dev` in `netns` and returns the kernel thread it got.
fn threaded_napi(netns: &Netns, dev: &str) -> i32 {
    let before = napi_threads();
    sh(
        netns,
        "sh",
        &["-c", &format!("echo 1 > /sys/class/net/{dev}/threaded")],
    );
    let prefix = format!("napi/{dev}-");
    let new: Vec<(i32, String)> = napi_threads()
        .difference(&before)
        .filter(|(_, name)| name.starts_with(&prefix))
        .cloned()
        .collect();
    assert_eq!(
        new.len(),
        1,
        "expected one new NAPI thread for {dev} in {}, found {new:?} (does the kernel support \
         threaded NAPI on veth?)",
        netns.name()
    );
    new[0].0
}

/// Run time of task `pid` in ns (`/proc/PID/schedstat`, first field).
fn task_ns(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no schedstat for task {pid}"))
}

/// `/proc/stat` line of `cpu`: user nice system idle iowait irq softirq steal, in ticks.
fn cpu_ticks(cpu: usize) -> [u64; 8] {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let line = stat
        .lines()
        .find(|l| l.starts_with(&format!("cpu{cpu} ")))
        .unwrap_or_else(|| panic!("no cpu{cpu} in /proc/stat"));
    let mut out = [0u64; 8];
    for (slot, v) in out.iter_mut().zip(line.split_whitespace().skip(1)) {
        *slot = v.parse().expect("tick count");
    }
    out
}

fn ticks_per_second() -> f64 {
    // SAFETY: plain sysconf.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn backend_mac(i: usize) -> [u8; 6] {
    [0x02, 0, 0, 0, 0xbe, i as u8 + 1]
}

/// The few bpf(2) calls the generator and the sink need, on XDP programs assembled here:
/// they are not part of the load balancer, so they are not in its object file.
mod bpf {
    use std::{
        io,
        os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    };

    use super::Spread;

    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_LINK_UPDATE: libc::c_long = 29;
    const BPF_PROG_TYPE_XDP: u32 = 6;
    const BPF_XDP: u32 = 37;
    const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
    const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
    // The XDP actions as instruction immediates.
    pub const XDP_DROP: i32 = lb_testbed::packets::XDP_DROP as i32;
    pub const XDP_PASS: i32 = lb_testbed::packets::XDP_PASS as i32;
    pub const XDP_TX: i32 = lb_testbed::packets::XDP_TX as i32;
    const HELPER_GET_PRANDOM_U32: i32 = 7;
    const HELPER_XDP_ADJUST_HEAD: i32 = 44;

    /// The attribute block, zero-padded (the kernel accepts a larger block if the tail is 0).
    type Attr = [u32; 32];

    fn call(command: libc::c_long, attr: &Attr) -> io::Result<i64> {
        // SAFETY: bpf(2) with an initialised attribute block whose pointers (if any) the
        // caller keeps alive for the call.
        let r = unsafe { libc::syscall(libc::SYS_bpf, command, attr.as_ptr(), size_of::<Attr>()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r)
    }

    fn set_u64(attr: &mut Attr, word: usize, value: u64) {
        attr[word] = value as u32;
        attr[word + 1] = (value >> 32) as u32;
    }

    /// One instruction: opcode, registers, offset, immediate.
    const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
        code as u64
            | ((dst | (src << 4)) as u64) << 8
            | (off as u16 as u64) << 16
            | (imm as u32 as u64) << 32
    }

    /// `return action`.
    pub fn returning(action: i32) -> Vec<u64> {
        vec![insn(0xb7, 0, 0, 0, action), insn(0x95, 0, 0, 0, 0)]
    }

    /// The generator's program: writes the whole `template` frame (pages come back to the
    /// generator's pool after the load balancer rewrote them), varies it as `spread` says
    /// (`flows` a power of two; the template has source port 0, the checksum is updated
    /// for the port), and returns XDP_TX. A shorter frame: XDP_DROP. The random source
    /// address of `src_at` is not covered by the checksums, which the load balancer does
    /// not check and the sink does not care about.
    pub fn port_spreader(template: &[u8], spread: &Spread) -> Vec<u64> {
        let flows = spread.flows;
        assert!(flows.is_power_of_two());
        assert!(template.len().is_multiple_of(4));
        let (sport_at, csum_at) = (spread.sport_at as i16, spread.csum_at as i16);
        let not_csum = i32::from(!u16::from_le_bytes([
            template[spread.csum_at],
            template[spread.csum_at + 1],
        ]));
        let mut p = vec![
            insn(0x61, 2, 1, 0, 0),                     // r2 = ctx->data
            insn(0x61, 3, 1, 4, 0),                     // r3 = ctx->data_end
            insn(0xbf, 6, 2, 0, 0),                     // r6 = r2
            insn(0xbf, 4, 2, 0, 0),                     // r4 = r2
            insn(0x07, 4, 0, 0, template.len() as i32), // r4 += len
            0,                                          // if r4 > r3 goto drop (below)
        ];
        let check = p.len() - 1;
        // *(u32 *)(r6 + 4i) = template word i
        for (i, word) in template.chunks(4).enumerate() {
            let imm = i32::from_le_bytes(word.try_into().expect("4 bytes"));
            p.push(insn(0x62, 6, 0, (4 * i) as i16, imm));
        }
        if let Some(src_at) = spread.src_at {
            p.extend([
                insn(0x85, 0, 0, 0, HELPER_GET_PRANDOM_U32),
                insn(0x63, 6, 0, src_at as i16, 0), // *(u32 *)(r6 + src_at) = r0
            ]);
        }
        p.extend([
            insn(0x85, 0, 0, 0, HELPER_GET_PRANDOM_U32),
            insn(0x57, 0, 0, 0, flows as i32 - 1), // r0 &= flows - 1
            insn(0x07, 0, 0, 0, 1024),             // r0 += 1024
            insn(0xdc, 0, 0, 0, 16),               // r0 = htobe16(r0)
            insn(0x6b, 6, 0, sport_at, 0),         // *(u16 *)(r6 + sport_at) = r0
            insn(0x07, 0, 0, 0, not_csum),         // r0 += ~csum
            insn(0xbf, 1, 0, 0, 0),                // fold: r0 = (r0 & 0xffff) + (r0 >> 16)
            insn(0x77, 1, 0, 0, 16),
            insn(0x57, 0, 0, 0, 0xffff),
            insn(0x0f, 0, 1, 0, 0),
            insn(0xbf, 1, 0, 0, 0), // fold again
            insn(0x77, 1, 0, 0, 16),
            insn(0x0f, 0, 1, 0, 0),
            insn(0xa7, 0, 0, 0, 0xffff),  // r0 = ~r0
            insn(0x6b, 6, 0, csum_at, 0), // *(u16 *)(r6 + csum_at) = r0
            insn(0xb7, 0, 0, 0, XDP_TX),
            insn(0x95, 0, 0, 0, 0),
        ]);
        let drop = p.len();
        p[check] = insn(0x2d, 4, 3, (drop - check - 1) as i16, 0);
        p.extend([insn(0xb7, 0, 0, 0, XDP_DROP), insn(0x95, 0, 0, 0, 0)]);
        p
    }

    /// The reflector: the sink end of the wire turned into a second generator. Every frame
    /// the load balancer forwards comes back as a fresh client-to-Vip frame of the
    /// template (cut to its length, then as `port_spreader` writes it), sent back with
    /// XDP_TX. The frames in flight then circulate at the rate of the slower end, and the
    /// load balancer's end is the slower (its program does more than a few stores), so it
    /// stays saturated whichever generator primed the loop: a generator alone offers what
    /// one CPU can produce, which on a packet socket is less than XDP forwards.
    pub fn reflector(template: &[u8], spread: &Spread) -> Vec<u64> {
        let len = template.len() as i32;
        let mut p = vec![
            insn(0xbf, 7, 1, 0, 0),   // r7 = ctx
            insn(0x61, 2, 1, 0, 0),   // r2 = ctx->data
            insn(0x61, 3, 1, 4, 0),   // r3 = ctx->data_end
            insn(0x1f, 3, 2, 0, 0),   // r3 -= r2: the frame's length
            insn(0xb5, 3, 0, 4, len), // if r3 <= len goto trimmed
            insn(0x17, 3, 0, 0, len), // r2 = r3 - len: what to take off the front
            insn(0xbf, 2, 3, 0, 0),
            // r0 = adjust_head(ctx, r2): from the front, so that the headroom the load
            // balancer's encapsulation took comes back (cut from the tail, a frame would
            // lose 20 bytes of headroom a lap until its encapsulation failed).
            insn(0x85, 0, 0, 0, HELPER_XDP_ADJUST_HEAD),
            0,                      // if r0 != 0 goto drop (below)
            insn(0xbf, 1, 7, 0, 0), // trimmed: r1 = ctx
        ];
        let failed = p.len() - 2;
        let body = port_spreader(template, spread);
        let drop = p.len() + body.len() - 2;
        p[failed] = insn(0x55, 0, 0, (drop - failed - 1) as i16, 0);
        p.extend(body);
        p
    }

    /// Loads an XDP program; a verifier rejection carries the verifier's log.
    pub fn load(instructions: &[u64]) -> io::Result<OwnedFd> {
        let license = c"GPL";
        let mut log = vec![0u8; 1 << 16];
        let mut attr: Attr = [0; 32];
        attr[0] = BPF_PROG_TYPE_XDP;
        attr[1] = instructions.len() as u32;
        set_u64(&mut attr, 2, instructions.as_ptr() as u64);
        set_u64(&mut attr, 4, license.as_ptr() as u64);
        attr[6] = 1; // log_level
        attr[7] = log.len() as u32;
        set_u64(&mut attr, 8, log.as_mut_ptr() as u64);
        attr[17] = BPF_XDP; // expected_attach_type
        match call(BPF_PROG_LOAD, &attr) {
            // SAFETY: a new file descriptor the kernel just returned.
            Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
            Err(e) => {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                Err(io::Error::new(
                    e.kind(),
                    format!("{e}: {}", String::from_utf8_lossy(&log[..end])),
                ))
            }
        }
    }

    /// Attaches `program` in native mode to `ifindex` of the calling thread's network
    /// namespace; detached when the returned link is closed.
    pub fn attach(program: &OwnedFd, ifindex: u32) -> io::Result<OwnedFd> {
        let mut attr: Attr = [0; 32];
        attr[0] = program.as_raw_fd() as u32;
        attr[1] = ifindex;
        attr[2] = BPF_XDP;
        attr[3] = XDP_FLAGS_DRV_MODE;
        let fd = call(BPF_LINK_CREATE, &attr)?;
        // SAFETY: a new file descriptor the kernel just returned.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// Makes `link` run `program` instead of its current one.
    pub fn update_link(link: &OwnedFd, program: &OwnedFd) -> io::Result<()> {
        let mut attr: Attr = [0; 32];
        attr[0] = link.as_raw_fd() as u32;
        attr[1] = program.as_raw_fd() as u32;
        call(BPF_LINK_UPDATE, &attr).map(|_| ())
    }

    /// Runs `program` `repeat` times on `frame` in live-frames mode, as if the frame
    /// arrived on `ifindex` (of the calling thread's namespace): what it returns XDP_TX for
    /// is really transmitted out of that interface.
    pub fn run_live(program: &OwnedFd, frame: &[u8], ifindex: u32, repeat: u32) -> io::Result<()> {
        // xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let ctx: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
        let mut attr: Attr = [0; 32];
        attr[0] = program.as_raw_fd() as u32;
        attr[2] = frame.len() as u32;
        set_u64(&mut attr, 4, frame.as_ptr() as u64);
        attr[8] = repeat;
        attr[10] = size_of::<[u32; 6]>() as u32;
        set_u64(&mut attr, 12, ctx.as_ptr() as u64);
        attr[16] = BPF_F_TEST_XDP_LIVE_FRAMES;
        call(BPF_PROG_TEST_RUN, &attr).map(|_| ())
    }
}

/// Loads `program` and attaches it in native mode to `ifindex` of `netns`: the program and
/// its link (`what` names it in a failure).
fn attach(netns: &Netns, ifindex: u32, program: &[u64], what: &str) -> (OwnedFd, OwnedFd) {
    netns
        .enter(|| {
            let program = bpf::load(program)?;
            let link = bpf::attach(&program, ifindex)?;
            std::io::Result::Ok((program, link))
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("attaching {what}: {e}"))
}

/// Two namespaces joined by one veth pair, every method's pieces in place; methods are
/// switched on and off around their runs.
struct Bench {
    dataplane: Dataplane,
    /// The program at the wire's end and its link: the XDP_DROP sink, or while a method
    /// runs, the reflector.
    sink: std::sync::Mutex<Option<(OwnedFd, OwnedFd)>>,
    wire: Netns,
    lb: Netns,
    lb_mac: [u8; 6],
    wire_mac: [u8; 6],
    wire_ifindex: u32,
    lb_napi: i32,
    wire_napi: i32,
    xdp_link: Option<XdpLinkId>,
    /// The kernel paths' XDP_PASS program on the load balancer's NIC, and its link.
    pass_link: Option<(OwnedFd, OwnedFd)>,
    flows: u32,
}

#[derive(Clone, Debug)]
struct Snapshot {
    at: Instant,
    sent: u64,
    lb_rx: u64,
    lb_tx: u64,
    sink: u64,
    wire_stats: BTreeMap<String, u64>,
    lb_stats: BTreeMap<String, u64>,
    xdp_backend: Vec<u64>,
    counters: Vec<u64>,
    lb_ns: u64,
    wire_ns: u64,
    lb_cpu: [u64; 8],
    gen_cpu: [u64; 8],
}

#[derive(Clone, Debug)]
struct Run {
    method: Method,
    proto: Proto,
    round: usize,
    /// From the first reading to the generator's stop: rates are per this time.
    seconds: f64,
    /// From the first reading to the last (the drain included).
    window_s: f64,
    /// Frames the wire carried to the load balancer.
    sent: u64,
    lb_rx: u64,
    /// What the load balancer itself says it sent on: XDP's per-backend counters, or its
    /// interface's transmit counter.
    lb_forwarded: u64,
    /// What reached the sink: the forwarded packets.
    forwarded: u64,
    /// XDP's own per-backend counts (xdp only).
    per_backend: Vec<u64>,
    lb_cpu_s: f64,
    /// The lb CPU's busy seconds over the window (every task), per /proc/stat.
    lb_cpu_busy_s: f64,
    lb_cpu_softirq_s: f64,
    gen_cpu_busy_s: f64,
    sink_cpu_s: f64,
    /// Non-zero `ethtool -S` deltas of both ends of the wire.
    wire_stats: BTreeMap<String, u64>,
    lb_stats: BTreeMap<String, u64>,
    xdp_counters: Vec<(&'static str, u64)>,
}

impl Bench {
    fn new(flows: u32) -> Self {
        let wire = Netns::new("mlb-tp-wire").expect("namespace");
        let lb = Netns::new("mlb-tp-lb").expect("namespace");
        wire.ip(&[
            "link",
            "add",
            WIRE,
            "type",
            "veth",
            "peer",
            "name",
            NIC,
            "netns",
            lb.name(),
        ])
        .expect("veth pair");
        wire.ip(&["link", "set", WIRE, "up"]).unwrap();
        lb.ip(&["link", "set", NIC, "up"]).unwrap();
        lb.ip(&["addr", "add", &format!("{LB_ADDR}/24"), "dev", NIC])
            .unwrap();
        let caps = Capacities {
            max_vips: 8,
            max_backends: 16,
            conntrack_entries: CONNTRACK_ENTRIES,
            ..Default::default()
        };
        // `MLB_BENCH_OBJECT=FILE`: another build's `lb-ebpf` object (an A/B across runs).
        let dataplane = match std::env::var_os("MLB_BENCH_OBJECT") {
            Some(path) => {
                let object = std::fs::read(&path)
                    .unwrap_or_else(|e| panic!("MLB_BENCH_OBJECT {}: {e}", path.display()));
                Dataplane::load_object(caps, &object)
            }
            None => Dataplane::load(caps),
        }
        .unwrap_or_else(|e| panic!("{e}"));

        // The load balancer: forwarding on, no redirects (one-armed), ECMP by L4 hash for
        // the plain method, GRO on so that its veth has NAPI without an XDP program, its
        // backends' MACs known.
        lb.enter(|| enable_forwarding(NIC))
            .unwrap()
            .expect("forwarding");
        for kv in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.eth0.send_redirects=0",
            "net.ipv4.fib_multipath_hash_policy=1",
        ] {
            sh(&lb, "sysctl", &["-qw", kv]);
        }
        sh(&lb, "ethtool", &["-K", NIC, "gro", "on"]);
        for (i, addr) in BACKEND_ADDRS.iter().enumerate() {
            lb.ip(&[
                "neigh",
                "replace",
                addr,
                "lladdr",
                &format_mac(&backend_mac(i)),
                "dev",
                NIC,
                "nud",
                "permanent",
            ])
            .unwrap();
        }

        // The wire's end: the sink (an XDP program there is also what lets XDP_TX out of
        // the load balancer's veth work), and no TSO so that the stack paths' packets take
        // the load balancer's NAPI path too.
        let wire_ifindex = wire.ifindex(WIRE).expect("wire ifindex");
        let sink = attach(
            &wire,
            wire_ifindex,
            &bpf::returning(bpf::XDP_DROP),
            "the sink",
        );
        sh(&wire, "ethtool", &["-K", WIRE, "tso", "off"]);

        // Threaded NAPI: the load balancer's receive on its own CPU, the sink's on the
        // generator's.
        let lb_napi = threaded_napi(&lb, NIC);
        let wire_napi = threaded_napi(&wire, WIRE);
        pin(lb_napi, LB_CPU);
        pin(wire_napi, GEN_CPU);
        // The sink polls on a 20 µs timer while traffic flows instead of being woken by an
        // inter-processor interrupt for every packet the stack transmits (XDP_TX
        // transmits a batch at a time): the load balancer's thread pays no such wake-ups,
        // whichever method runs.
        sh(
            &wire,
            "sh",
            &[
                "-c",
                &format!(
                    "echo 1000000 > /sys/class/net/{WIRE}/napi_defer_hard_irqs && \
                     echo 20000 > /sys/class/net/{WIRE}/gro_flush_timeout"
                ),
            ],
        );
        realtime(lb_napi);
        realtime(wire_napi);

        let mut bench = Self {
            lb_mac: lb.mac(NIC).expect("lb MAC"),
            wire_mac: wire.mac(WIRE).expect("wire MAC"),
            dataplane,
            sink: std::sync::Mutex::new(Some(sink)),
            wire,
            lb,
            wire_ifindex,
            lb_napi,
            wire_napi,
            xdp_link: None,
            pass_link: None,
            flows,
        };
        bench.configure_dataplane();
        bench
    }

    /// Puts `program` at the wire's end in place of what was there, in the same link (a
    /// veth without a program would stop its NAPI thread, which is pinned).
    fn set_sink(&self, program: &[u64]) {
        let mut sink = self.sink.lock().unwrap();
        let (old, link) = sink.take().expect("a sink");
        let new = bpf::load(program).unwrap_or_else(|e| panic!("loading the wire's sink: {e}"));
        bpf::update_link(&link, &new).unwrap_or_else(|e| panic!("replacing the wire's sink: {e}"));
        drop(old);
        *sink = Some((new, link));
    }

    fn configure_dataplane(&mut self) {
        let dp = &mut self.dataplane;
        dp.set_global(&GlobalConfig {
            hash_seed: SEED,
            fib_generation: 1,
            encap_src4_base: u32::from_be_bytes([172, 16, 0, 0]),
            encap_src4_hostmask: 0xFFFF,
            encap_src6_base: addr_words("fd00:ffff::".parse().unwrap()),
            flow_cache_mask: 0,             // set by Dataplane::set_global
            cache_epoch: 0,                 // set by Dataplane::set_global
            vip_filter: Default::default(), // set by Dataplane::set_vip_filter
        })
        .unwrap();
        let mut members = Vec::new();
        for (i, addr) in BACKEND_ADDRS.iter().enumerate() {
            let id = i as u32 + 1;
            let addr: IpAddr = addr.parse().unwrap();
            dp.set_backend(
                id,
                &Backend {
                    addr: addr_words(addr),
                    flags: backend_flags::UP,
                    generation: 1,
                },
            )
            .unwrap();
            members.push(MaglevBackend::new(id, addr, 1));
        }
        let vip: IpAddr = VIP.parse().unwrap();
        dp.set_vip_filter([vip]).unwrap();
        dp.set_vip_addr(vip, Some(VipAddr { flags: 0 })).unwrap();
        let table = maglev::build(&members, TABLE_SIZE, SEED);
        for (id, port, proto) in [(VIP_UDP, UDP_PORT, 17u8), (VIP_TCP, TCP_PORT, 6u8)] {
            dp.install_table(id, &table).unwrap();
            let key = VipKey {
                addr: addr_words(vip),
                port: port.to_be(),
                proto,
                family: 4,
            };
            dp.set_vip(
                id,
                &key,
                &VipState {
                    flags: vip_flags::ACTIVE,
                    generation: 1,
                },
            )
            .unwrap();
        }
    }

    fn enable(&mut self, method: Method) {
        let lb = &self.lb;
        if method != Method::Xdp {
            // The kernel paths take their frames through an XDP_PASS program, so that the
            // reflector's XDP_TX frames are accepted (a veth without an XDP program lost
            // most of them here), as a NIC's driver hands pages to the stack.
            let nic = lb.ifindex(NIC).expect("lb ifindex");
            let pass = attach(lb, nic, &bpf::returning(bpf::XDP_PASS), "XDP_PASS");
            self.pass_link = Some(pass);
        }
        match method {
            Method::Xdp => {
                let dp = &mut self.dataplane;
                let link = lb
                    .enter(|| dp.attach(prog_names::LB_INGRESS, NIC, XdpMode::Driver))
                    .unwrap()
                    .unwrap_or_else(|e| panic!("{e}"));
                self.xdp_link = Some(link);
            }
            Method::Nft => {
                let map = |n: usize| {
                    BACKEND_ADDRS
                        .iter()
                        .enumerate()
                        .map(|(i, a)| format!("{i} : {a}"))
                        .take(n)
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let n = BACKENDS;
                let rule = |l4: &str, port: u16| {
                    format!(
                        "    ip daddr {VIP} {l4} dport {port} dnat to jhash ip saddr . {l4} sport \
                         mod {n} seed {SEED:#x} map {{ {} }}\n",
                        map(n)
                    )
                };
                nft(
                    lb,
                    &format!(
                        "table ip {NFT_TABLE} {{\n  chain prerouting {{\n    type nat hook \
                         prerouting priority dstnat; policy accept;\n{}{}  }}\n}}\n",
                        rule("udp", UDP_PORT),
                        rule("tcp", TCP_PORT)
                    ),
                );
            }
            Method::Plain => {
                let mut args = vec![
                    "route".to_owned(),
                    "replace".to_owned(),
                    format!("{VIP}/32"),
                ];
                for a in BACKEND_ADDRS {
                    args.extend(["nexthop".to_owned(), "via".to_owned(), a.to_owned()]);
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                sh(lb, "ip", &args);
            }
        }
    }

    fn disable(&mut self, method: Method) {
        let lb = &self.lb;
        self.pass_link = None;
        match method {
            Method::Xdp => {
                if let Some(link) = self.xdp_link.take() {
                    let dp = &mut self.dataplane;
                    lb.enter(|| dp.xdp(prog_names::LB_INGRESS).unwrap().detach(link))
                        .unwrap()
                        .expect("detach lb_ingress");
                }
            }
            Method::Nft => {
                sh(lb, "nft", &["delete", "table", "ip", NFT_TABLE]);
            }
            Method::Plain => {
                sh(lb, "ip", &["route", "del", &format!("{VIP}/32")]);
            }
        }
    }

    /// The generator's template frame (client to Vip, source port 0) and its program,
    /// which gives every copy a random source port out of the flows.
    /// And the reflector of the same frames.
    fn generator(&self, proto: Proto) -> (Vec<u8>, Vec<u64>, Vec<u64>, Spread) {
        let client: std::net::Ipv4Addr = CLIENT_ADDR.parse().unwrap();
        let vip: std::net::Ipv4Addr = VIP.parse().unwrap();
        let ip = etherparse::PacketBuilder::ethernet2(self.wire_mac, self.lb_mac).ipv4(
            client.octets(),
            vip.octets(),
            64,
        );
        let mut frame = Vec::with_capacity(FRAME_BYTES as usize);
        // Ethernet 14 + IPv4 20: the L4 header starts at 34.
        let csum_at = match proto {
            Proto::Udp => {
                ip.udp(0, UDP_PORT)
                    .write(&mut frame, &[0u8; 18])
                    .expect("UDP frame");
                34 + 6
            }
            Proto::Tcp => {
                ip.tcp(0, TCP_PORT, 1000, 64240)
                    .ack(1)
                    .write(&mut frame, &[0u8; 6])
                    .expect("TCP frame");
                34 + 16
            }
            Proto::Syn => {
                ip.tcp(0, TCP_PORT, 1000, 64240)
                    .syn()
                    .write(&mut frame, &[0u8; 6])
                    .expect("TCP frame");
                34 + 16
            }
        };
        assert_eq!(frame.len(), FRAME_BYTES as usize);
        // A SYN flood: the source address too, at 14 + 12.
        let src_at = (proto == Proto::Syn).then_some(26);
        let spread = Spread {
            flows: self.flows,
            sport_at: 34,
            csum_at,
            src_at,
        };
        let program = bpf::port_spreader(&frame, &spread);
        let reflector = bpf::reflector(&frame, &spread);
        (frame, program, reflector, spread)
    }

    fn snapshot(&self) -> Snapshot {
        let at = Instant::now();
        let lb_ns = task_ns(self.lb_napi);
        let wire_ns = task_ns(self.wire_napi);
        let lb_cpu = cpu_ticks(LB_CPU);
        let gen_cpu = cpu_ticks(GEN_CPU);
        let wire_stats = ethtool_stats(&self.wire, WIRE);
        // What came back from the load balancer: dropped by the sink, or reflected.
        let sink = [
            "rx_queue_0_xdp_drops",
            "rx_queue_0_xdp_tx",
            "rx_queue_0_xdp_tx_errors",
        ]
        .iter()
        .map(|k| {
            *wire_stats
                .get(*k)
                .unwrap_or_else(|| panic!("veth counter {k}"))
        })
        .sum();
        Snapshot {
            at,
            // Frames the wire took towards the load balancer, and those its ring refused.
            sent: if PACKET_SOCKET.load(Ordering::Relaxed) {
                link_counter(&self.wire, WIRE, "tx_packets")
                    + link_counter(&self.wire, WIRE, "tx_dropped")
            } else {
                wire_stats["tx_queue_0_xdp_xmit"] + wire_stats["tx_queue_0_xdp_xmit_errors"]
            },
            lb_rx: link_counter(&self.lb, NIC, "rx_packets"),
            lb_tx: link_counter(&self.lb, NIC, "tx_packets"),
            sink,
            wire_stats,
            lb_stats: ethtool_stats(&self.lb, NIC),
            xdp_backend: (1..=BACKENDS as u32)
                .map(|id| self.dataplane.backend_traffic(id).unwrap().packets)
                .collect(),
            counters: self.dataplane.counters().unwrap(),
            lb_ns,
            wire_ns,
            lb_cpu,
            gen_cpu,
        }
    }

    fn run(&mut self, method: Method, proto: Proto, seconds: f64, round: usize) -> Run {
        self.enable(method);
        std::thread::sleep(Duration::from_millis(100));
        let (frame, program, reflector, spread) = self.generator(proto);
        self.set_sink(&reflector);
        let thread = AtomicU64::new(0);
        let done = AtomicBool::new(false);
        let this = &*self;
        let (before, after, stopped) = std::thread::scope(|scope| {
            let sender = scope.spawn(|| {
                let _done = SetOnDrop(&done);
                this.wire.enter(|| {
                    let program = bpf::load(&program)?;
                    generate(&program, &frame, &spread, this.wire_ifindex, &thread)
                })
            });
            // Stops the generator however this scope is left, a panic included: the scope
            // waits for the generator, whose call would otherwise run for minutes.
            let interrupt = Interrupt {
                thread: &thread,
                done: &done,
            };
            sleep_unless_stopped(WARMUP);
            if sender.is_finished() {
                panic!("the generator stopped: {:?}", sender.join());
            }
            let before = this.snapshot();
            sleep_unless_stopped(Duration::from_secs_f64(seconds));
            drop(interrupt);
            // The loop ends when the wire drops what comes back.
            this.set_sink(&bpf::returning(bpf::XDP_DROP));
            let stopped = Instant::now();
            sender
                .join()
                .expect("generator thread")
                .expect("entering the wire namespace")
                .unwrap_or_else(|e| panic!("generator: {e}"));
            std::thread::sleep(DRAIN);
            (before, this.snapshot(), stopped)
        });
        self.disable(method);
        std::thread::sleep(Duration::from_millis(100));

        let d = |f: fn(&Snapshot) -> u64| f(&after) - f(&before);
        let per_backend: Vec<u64> = after
            .xdp_backend
            .iter()
            .zip(&before.xdp_backend)
            .map(|(a, b)| a - b)
            .collect();
        let ticks = ticks_per_second();
        let busy = |a: &[u64; 8], b: &[u64; 8]| {
            let idle = (a[3] - b[3]) + (a[4] - b[4]);
            let all: u64 = a.iter().sum::<u64>() - b.iter().sum::<u64>();
            (all - idle) as f64 / ticks
        };
        let stat_deltas = |a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>| {
            a.iter()
                .filter_map(|(k, v)| {
                    let d = v.saturating_sub(*b.get(k).unwrap_or(&0));
                    (d != 0).then(|| (k.clone(), d))
                })
                .collect::<BTreeMap<_, _>>()
        };
        Run {
            method,
            proto,
            round,
            seconds: (stopped - before.at).as_secs_f64(),
            window_s: (after.at - before.at).as_secs_f64(),
            sent: d(|s| s.sent),
            lb_rx: d(|s| s.lb_rx),
            lb_forwarded: if method == Method::Xdp {
                per_backend.iter().sum()
            } else {
                d(|s| s.lb_tx)
            },
            forwarded: d(|s| s.sink),
            per_backend: if method == Method::Xdp {
                per_backend
            } else {
                Vec::new()
            },
            lb_cpu_s: d(|s| s.lb_ns) as f64 / 1e9,
            lb_cpu_busy_s: busy(&after.lb_cpu, &before.lb_cpu),
            lb_cpu_softirq_s: (after.lb_cpu[6] - before.lb_cpu[6]) as f64 / ticks,
            gen_cpu_busy_s: busy(&after.gen_cpu, &before.gen_cpu),
            sink_cpu_s: d(|s| s.wire_ns) as f64 / 1e9,
            wire_stats: stat_deltas(&after.wire_stats, &before.wire_stats),
            lb_stats: stat_deltas(&after.lb_stats, &before.lb_stats),
            xdp_counters: Counter::ALL
                .iter()
                .filter_map(|&c| {
                    let v = after.counters[c as usize] - before.counters[c as usize];
                    (v != 0).then_some((c.name(), v))
                })
                .collect(),
        }
    }
}

/// The generator: runs its program in live-frames mode, as if the template arrived on the
/// wire, so that every copy (with its own source port) is transmitted to the load balancer
/// at kernel speed — more than any method forwards, so the load balancer is saturated and
/// its receive ring overflows (the wire counts both). One long call: each call sets up and
/// tears down a page pool, which waits for RCU; `stop_generator` interrupts it.
fn generate(
    program: &OwnedFd,
    frame: &[u8],
    spread: &Spread,
    ifindex: u32,
    thread: &AtomicU64,
) -> std::io::Result<()> {
    INTERRUPTED.store(false, Ordering::SeqCst);
    // SAFETY: pthread_self has no preconditions.
    thread.store(unsafe { libc::pthread_self() } as u64, Ordering::SeqCst);
    while !STOP.load(Ordering::Relaxed) {
        match bpf::run_live(program, frame, ifindex, u32::MAX) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                if !PACKET_SOCKET.swap(true, Ordering::SeqCst) {
                    eprintln!(
                        "\rlive frames refused here (EPERM): generating from an AF_PACKET \
                         socket instead, which offers far less; figures are lower bounds"
                    );
                }
                return packet_socket::generate(frame, spread, ifindex);
            }
            other => other?,
        }
    }
    Ok(())
}

/// How the generator varies the template: a source port out of `flows` from 1024 up at
/// `sport_at`, the L4 checksum at `csum_at` updated for it, and with `src_at` a random
/// IPv4 source address there (a new flow every frame).
struct Spread {
    flows: u32,
    sport_at: usize,
    csum_at: usize,
    src_at: Option<usize>,
}

/// Set once the kernel refused live frames and the generator sends from a packet socket.
static PACKET_SOCKET: AtomicBool = AtomicBool::new(false);

/// Set by the generator's signal handler: the packet-socket generator's calls do not block,
/// so a signal rarely interrupts one; it checks this between batches.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The generator where the kernel refuses live frames (EPERM: some sandboxes forbid
/// `BPF_F_TEST_XDP_LIVE_FRAMES`; measured so on AMD EPYC machines of this project's kind):
/// the same frames, 64 at a time by `sendmmsg` on an AF_PACKET socket bound to the wire,
/// past the qdisc. It costs the generator CPU far more per frame (a syscall per batch, an
/// skb per frame), so it offers less: the load balancer's figures are then lower bounds.
mod packet_socket {
    use super::{INTERRUPTED, STOP, Spread};
    use std::{io, sync::atomic::Ordering};

    const BATCH: usize = 64;

    pub fn generate(template: &[u8], spread: &Spread, ifindex: u32) -> io::Result<()> {
        // SAFETY: plain syscalls on a socket this function owns and closes.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let result = send_batches(fd, template, spread, ifindex);
        // SAFETY: the socket opened above.
        unsafe { libc::close(fd) };
        result
    }

    fn send_batches(fd: i32, template: &[u8], spread: &Spread, ifindex: u32) -> io::Result<()> {
        // SAFETY: a zeroed sockaddr_ll, filled in; setsockopt with an int.
        unsafe {
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
            addr.sll_ifindex = ifindex as i32;
            let len = size_of::<libc::sockaddr_ll>() as u32;
            if libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len) != 0 {
                return Err(io::Error::last_os_error());
            }
            let one: i32 = 1;
            libc::setsockopt(
                fd,
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                &one as *const _ as *const libc::c_void,
                size_of::<i32>() as u32,
            );
        }
        let mut frames = vec![template.to_vec(); BATCH];
        let not_csum =
            !u16::from_be_bytes([template[spread.csum_at], template[spread.csum_at + 1]]);
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        // One set of headers for the whole run: the frames are rewritten in place.
        let mut iovecs: Vec<libc::iovec> = frames
            .iter_mut()
            .map(|f| libc::iovec {
                iov_base: f.as_mut_ptr().cast(),
                iov_len: f.len(),
            })
            .collect();
        // SAFETY: zeroed headers, each naming one iovec of a live frame.
        let mut headers: Vec<libc::mmsghdr> = iovecs
            .iter_mut()
            .map(|iov| {
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_iov = iov;
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        while !STOP.load(Ordering::Relaxed) && !INTERRUPTED.load(Ordering::Relaxed) {
            for frame in &mut frames {
                // xorshift64*: any spread will do, as the XDP generator's prandom does.
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
                let sport = 1024 + (r as u32 & (spread.flows - 1)) as u16;
                frame[spread.sport_at..spread.sport_at + 2].copy_from_slice(&sport.to_be_bytes());
                // RFC 1624: the template's checksum, with the port added (it had 0).
                let mut sum = u32::from(not_csum) + u32::from(sport);
                sum = (sum & 0xffff) + (sum >> 16);
                sum = (sum & 0xffff) + (sum >> 16);
                let csum = !(sum as u16);
                frame[spread.csum_at..spread.csum_at + 2].copy_from_slice(&csum.to_be_bytes());
                if let Some(at) = spread.src_at {
                    frame[at..at + 4].copy_from_slice(&((r >> 32) as u32).to_ne_bytes());
                }
            }
            // SAFETY: BATCH valid headers.
            let sent = unsafe { libc::sendmmsg(fd, headers.as_mut_ptr(), BATCH as u32, 0) };
            if sent < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    // A full ring or a signal: go on (or stop, above).
                    Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR) => continue,
                    _ => return Err(e),
                }
            }
        }
        Ok(())
    }
}

/// Sets its flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// When dropped, interrupts the generator until it is done.
struct Interrupt<'a> {
    thread: &'a AtomicU64,
    done: &'a AtomicBool,
}

impl Drop for Interrupt<'_> {
    fn drop(&mut self) {
        while !self.done.load(Ordering::SeqCst) {
            let thread = self.thread.load(Ordering::SeqCst);
            if thread != 0 {
                stop_generator(thread);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Interrupts the generator's call (a signal makes the kernel end the run early) or its
/// loop (the handler's flag).
fn stop_generator(thread: u64) {
    extern "C" fn interrupted(_: libc::c_int) {
        INTERRUPTED.store(true, Ordering::SeqCst);
    }
    // SAFETY: installs a handler that does nothing (no SA_RESTART, so the bpf call returns
    // EINTR), then signals a thread of this process that is still running.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = interrupted as extern "C" fn(libc::c_int) as usize;
        libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut());
        libc::pthread_kill(thread as libc::pthread_t, libc::SIGUSR1);
    }
}

fn sleep_unless_stopped(total: Duration) {
    let end = Instant::now() + total;
    while !STOP.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// Per method and protocol, over all rounds.
struct Summary {
    method: Method,
    proto: Proto,
    seconds: f64,
    window_s: f64,
    sent: u64,
    forwarded: u64,
    lb_forwarded: u64,
    lb_cpu_s: f64,
    lb_cpu_busy_s: f64,
    gen_cpu_busy_s: f64,
}

impl Summary {
    fn mpps(&self) -> f64 {
        self.forwarded as f64 / self.seconds / 1e6
    }
    fn sent_mpps(&self) -> f64 {
        self.sent as f64 / self.seconds / 1e6
    }
    /// Share of the generator's time the load balancer's thread ran.
    fn lb_util(&self) -> f64 {
        (self.lb_cpu_s / self.seconds).min(1.0)
    }
    /// Share of the window the lb CPU ran anything else.
    fn lb_cpu_other(&self) -> f64 {
        (self.lb_cpu_busy_s - self.lb_cpu_s).max(0.0) / self.window_s
    }
    fn ns_per_packet(&self) -> f64 {
        self.lb_cpu_s * 1e9 / self.forwarded.max(1) as f64
    }
    fn mpps_per_core(&self) -> f64 {
        self.forwarded as f64 / self.lb_cpu_s.max(1e-9) / 1e6
    }
    fn loss(&self) -> f64 {
        1.0 - self.forwarded as f64 / self.sent.max(1) as f64
    }
    fn saturated(&self) -> bool {
        self.lb_util() >= SATURATED
    }
}

fn summarise(runs: &[Run], protos: &[Proto]) -> Vec<Summary> {
    let mut out = Vec::new();
    for &proto in protos {
        for method in Method::ALL {
            let rs: Vec<&Run> = runs
                .iter()
                .filter(|r| r.method == method && r.proto == proto)
                .collect();
            if rs.is_empty() {
                continue;
            }
            let sum = |f: fn(&Run) -> f64| rs.iter().map(|r| f(r)).sum::<f64>();
            let sumu = |f: fn(&Run) -> u64| rs.iter().map(|r| f(r)).sum::<u64>();
            out.push(Summary {
                method,
                proto,
                seconds: sum(|r| r.seconds),
                window_s: sum(|r| r.window_s),
                sent: sumu(|r| r.sent),
                forwarded: sumu(|r| r.forwarded),
                lb_forwarded: sumu(|r| r.lb_forwarded),
                lb_cpu_s: sum(|r| r.lb_cpu_s),
                lb_cpu_busy_s: sum(|r| r.lb_cpu_busy_s),
                gen_cpu_busy_s: sum(|r| r.gen_cpu_busy_s),
            });
        }
    }
    out
}

fn find(summary: &[Summary], method: Method, proto: Proto) -> Option<&Summary> {
    summary
        .iter()
        .find(|s| s.method == method && s.proto == proto)
}

/// XDP over `other` for `proto`: per core, and in packets per second.
/// Whether XDP's and nftables' figures for `proto` both come from a saturated CPU.
fn comparable(summary: &[Summary], proto: Proto) -> bool {
    [Method::Xdp, Method::Nft]
        .iter()
        .all(|&m| find(summary, m, proto).is_some_and(Summary::saturated))
}

fn ratios(summary: &[Summary], proto: Proto, other: Method) -> Option<(f64, f64)> {
    let x = find(summary, Method::Xdp, proto)?;
    let o = find(summary, other, proto)?;
    (o.forwarded > 0 && x.lb_cpu_s > 0.0)
        .then(|| (x.mpps_per_core() / o.mpps_per_core(), x.mpps() / o.mpps()))
}

fn report(summary: &[Summary], opts: &Options, elapsed: Duration) {
    let unsaturated: Vec<String> = summary
        .iter()
        .filter(|s| !s.saturated())
        .map(|s| format!("{} {}", s.method.name(), s.proto.name()))
        .collect();
    if !unsaturated.is_empty() {
        println!(
            "\nNOT A COMPARISON: the load balancer's CPU was not saturated in {} (below {:.0}% \
             busy), so those figures are lower bounds and ratios with them say little.",
            unsaturated.join(", "),
            SATURATED * 100.0
        );
    }
    println!(
        "\nForwarding throughput on veth, {FRAME_BYTES}-byte frames, {} flows, {} × {:.0} s per \
         method in interleaved rounds ({:.0} s in all); generator on CPU {GEN_CPU}, the load \
         balancer's NAPI thread on CPU {LB_CPU}",
        opts.flows,
        opts.rounds,
        opts.seconds,
        elapsed.as_secs_f64()
    );
    println!(
        "{:<32} {:>5} {:>9} {:>9} {:>6} {:>7} {:>9} {:>9} {:>9}",
        "method",
        "proto",
        "sent Mpps",
        "fwd Mpps",
        "loss",
        "lb CPU",
        "lb ns/pkt",
        "Mpps/core",
        "other CPU"
    );
    for s in summary {
        println!(
            "{:<32} {:>5} {:>9.3} {:>9.3} {:>5.1}% {:>6.0}%{} {:>9.0} {:>9.3} {:>8.0}%",
            s.method.describe(),
            s.proto.name(),
            s.sent_mpps(),
            s.mpps(),
            s.loss() * 100.0,
            s.lb_util() * 100.0,
            if s.saturated() { " " } else { "*" },
            s.ns_per_packet(),
            s.mpps_per_core(),
            s.lb_cpu_other() * 100.0,
        );
    }
    println!(
        "sent: offered to the load balancer (what its ring refused included); fwd: counted at \
         the sink; lb CPU: run time of the load balancer's NAPI thread (* = below {:.0}%: not \
         saturated, its time includes wake-ups, so Mpps/core is a lower bound); other CPU: the \
         lb CPU busy with anything else.",
        SATURATED * 100.0
    );
    for &proto in &opts.protos {
        if let (Some((core_nft, pps_nft)), Some((core_plain, pps_plain))) = (
            ratios(summary, proto, Method::Nft),
            ratios(summary, proto, Method::Plain),
        ) {
            println!(
                "{}: XDP / nftables: {core_nft:.2}× per core (target ≥ {TARGET_XDP_OVER_NFT_PER_CORE:.0}×: {}), \
                 {pps_nft:.2}× pps; XDP / plain routing: {core_plain:.2}× per core, {pps_plain:.2}× pps",
                proto.name(),
                if !comparable(summary, proto) {
                    "not a comparison: not saturated"
                } else if core_nft >= TARGET_XDP_OVER_NFT_PER_CORE {
                    "met"
                } else {
                    "NOT met"
                }
            );
        }
    }
    if let Some(s) = find(summary, Method::Xdp, Proto::Syn) {
        println!(
            "SYN flood (a fresh source address and port every packet): {:.3} M new flows per \
             second per core{} (the {}-entry connection table fills within the first \
             second; from then on every SYN reads both candidate buckets, finds them full of \
             active flows and is forwarded by its table without an entry)",
            s.mpps_per_core(),
            if s.saturated() {
                ""
            } else {
                " (lower bound: not saturated)"
            },
            CONNTRACK_ENTRIES
        );
    }
    for s in summary {
        if s.forwarded == 0 {
            println!(
                "WARNING: {} {}: nothing reached the sink",
                s.method.name(),
                s.proto.name()
            );
        } else if s.ns_per_packet() < 20.0 {
            println!(
                "WARNING: {} {}: {:.0} ns of lb CPU per packet is implausibly low: its work did \
                 not run in its NAPI thread",
                s.method.name(),
                s.proto.name(),
                s.ns_per_packet()
            );
        }
    }
}

fn json_report(summary: &[Summary], runs: &[Run], opts: &Options) -> Value {
    let summary_rows: Vec<Value> = summary
        .iter()
        .map(|s| {
            json!({
                "method": s.method.name(),
                "describe": s.method.describe(),
                "proto": s.proto.name(),
                "seconds": s.seconds,
                "sent": s.sent,
                "forwarded": s.forwarded,
                "lb_forwarded": s.lb_forwarded,
                "sent_mpps": s.sent_mpps(),
                "mpps": s.mpps(),
                "loss": s.loss(),
                "lb_cpu_s": s.lb_cpu_s,
                "lb_cpu_util": s.lb_util(),
                "lb_saturated": s.saturated(),
                "lb_cpu_other_util": s.lb_cpu_other(),
                "gen_cpu_busy_util": s.gen_cpu_busy_s / s.window_s,
                "lb_ns_per_packet": s.ns_per_packet(),
                "mpps_per_core": s.mpps_per_core(),
            })
        })
        .collect();
    let run_rows: Vec<Value> = runs
        .iter()
        .map(|r| {
            json!({
                "method": r.method.name(),
                "proto": r.proto.name(),
                "round": r.round,
                "seconds": r.seconds,
                "window_s": r.window_s,
                "sent": r.sent,
                "lb_rx": r.lb_rx,
                "lb_forwarded": r.lb_forwarded,
                "forwarded": r.forwarded,
                "xdp_per_backend": r.per_backend,
                "lb_cpu_s": r.lb_cpu_s,
                "lb_cpu_busy_s": r.lb_cpu_busy_s,
                "lb_cpu_softirq_s": r.lb_cpu_softirq_s,
                "gen_cpu_busy_s": r.gen_cpu_busy_s,
                "sink_napi_cpu_s": r.sink_cpu_s,
                "wire_ethtool": r.wire_stats,
                "lb_ethtool": r.lb_stats,
                "xdp_counters": r.xdp_counters.iter().map(|(n, v)| (n.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    let ratio_rows: Vec<Value> = opts
        .protos
        .iter()
        .filter_map(|&proto| {
            let (core_nft, pps_nft) = ratios(summary, proto, Method::Nft)?;
            let (core_plain, pps_plain) = ratios(summary, proto, Method::Plain)?;
            Some(json!({
                "proto": proto.name(),
                "xdp_over_nft_per_core": core_nft,
                "xdp_over_nft_pps": pps_nft,
                "xdp_over_plain_per_core": core_plain,
                "xdp_over_plain_pps": pps_plain,
                "target_xdp_over_nft_per_core": TARGET_XDP_OVER_NFT_PER_CORE,
                "met": comparable(summary, proto) && core_nft >= TARGET_XDP_OVER_NFT_PER_CORE,
                "saturated": comparable(summary, proto),
            }))
        })
        .collect();
    json!({
        "benchmark": "throughput",
        // "af_packet": live frames were refused here; the reflector keeps the load
        // balancer saturated all the same.
        "generator": if PACKET_SOCKET.load(Ordering::Relaxed) { "af_packet" } else { "live_frames" },
        "method": "generator: an XDP program run by BPF_PROG_TEST_RUN in live-frames mode on the \
                   load balancer's wire (random source port per frame, XDP_TX), on the generator \
                   CPU (or an AF_PACKET socket where live frames are refused); a reflector on \
                   the wire sends every forwarded frame back as a fresh one (XDP_TX), so the \
                   load balancer stays saturated; the kernel paths behind an XDP_PASS program \
                   (to take those frames); the load balancer's veth with threaded NAPI, its \
                   thread pinned to the lb CPU with \
                   SCHED_FIFO; forwarded packets counted at the wire (veth rx_queue_0_xdp_tx + \
                   xdp_drops); lb CPU = run time of that NAPI thread (/proc/PID/schedstat); per \
                   core = forwarded / lb CPU seconds",
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "generator_cpu": GEN_CPU,
        "lb_cpu": LB_CPU,
        "frame_bytes": FRAME_BYTES,
        "flows": opts.flows,
        "backends": BACKENDS,
        "seconds_per_run": opts.seconds,
        "rounds": opts.rounds,
        "saturated_above": SATURATED,
        "summary": summary_rows,
        "ratios": ratio_rows,
        "runs": run_rows,
    })
}
