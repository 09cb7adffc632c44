//! The data plane's counters, read from its pinned per-CPU maps at scrape time: nothing
//! is copied between scrapes, and a scrape reads the global counters and the traffic
//! slots of the Vip and Backend ids in use, 1024 slots per `BPF_MAP_LOOKUP_BATCH` call
//! (never anything per table slot).

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

use aya::maps::{Map, MapData, PerCpuArray};
use lb_common::{
    consts::{Counter, map_names as names},
    types::TrafficCounters,
};

use super::text::{Family, labels};
use crate::bpf_sys::{
    BPF_MAP_LOOKUP_BATCH, BPF_MAP_LOOKUP_ELEM, BatchAttr, ENOTSUPP, LookupAttr, bpf,
};

/// The families of the global counters.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Passed,
    Dropped,
    Lookups,
    MissNonSyn,
    InsertFailures,
    Shared,
    IcmpToBackend,
    IcmpSent,
    FragmentsTracked,
    Forwarded,
    SecondChance,
}

/// Every family of the global counters: kind, name, help, label name (if any).
const FAMILIES: [(Kind, &str, &str, Option<&str>); 11] = [
    (
        Kind::Passed,
        "mlb_packets_passed_total",
        "Packets passed to the kernel untouched, by reason.",
        Some("reason"),
    ),
    (
        Kind::Dropped,
        "mlb_packets_dropped_total",
        "Packets dropped by the XDP program, by reason.",
        Some("reason"),
    ),
    (
        Kind::Lookups,
        "mlb_conntrack_lookups_total",
        "Connection-table lookups of packets to a Vip: hit (backend up), miss (backend chosen by \
         the Maglev table), resteer (hit on a backend that is down or gone, chosen again).",
        Some("result"),
    ),
    (
        Kind::MissNonSyn,
        "mlb_conntrack_miss_non_syn_total",
        "Connection-table misses on TCP packets without SYN (still forwarded by the table).",
        None,
    ),
    (
        Kind::InsertFailures,
        "mlb_conntrack_insert_failures_total",
        "Connection-table inserts that failed (the packet was still forwarded).",
        None,
    ),
    (
        Kind::Shared,
        "mlb_conntrack_shared_total",
        "New flows that found their connection-table way held by a live flow of the same Vip and followed its Backend (no flow evicted).",
        None,
    ),
    (
        Kind::IcmpToBackend,
        "mlb_icmp_to_backend_total",
        "ICMP fragmentation-needed and ICMPv6 packet-too-big messages steered to a flow's backend.",
        None,
    ),
    (
        Kind::IcmpSent,
        "mlb_icmp_sent_total",
        "ICMP messages the XDP program answered with itself, by type (echo_reply, too_big).",
        Some("type"),
    ),
    (
        Kind::FragmentsTracked,
        "mlb_fragments_tracked_total",
        "Fragments to Vips with fragments: track, steered by their datagram's ports.",
        None,
    ),
    (
        Kind::Forwarded,
        "mlb_packets_forwarded_total",
        "Packets forwarded to a backend, by XDP action (tx or redirect).",
        Some("action"),
    ),
    (
        Kind::SecondChance,
        "mlb_second_chance_packets_total",
        "TCP packets sent to their backend with the previous table's backend attached (second chance).",
        None,
    ),
];

/// The metric a data-plane counter is exported as: family name, and its label and value
/// within the family (`None` for a family of its own).
pub fn counter_metric(counter: Counter) -> (&'static str, Option<(&'static str, &'static str)>) {
    let (k, value) = kind(counter);
    let (_, family, _, label) = FAMILIES
        .iter()
        .find(|(f, ..)| *f == k)
        .expect("every kind has a family");
    (family, label.map(|l| (l, value)))
}

/// Which family a counter feeds, and its label value there.
fn kind(counter: Counter) -> (Kind, &'static str) {
    let name = counter.name();
    let strip = |prefix: &str| name.strip_prefix(prefix).unwrap_or(name);
    match counter {
        Counter::PassNotIp
        | Counter::PassNotVip
        | Counter::PassMalformed
        | Counter::PassVipOther
        | Counter::PassNoBackend => (Kind::Passed, strip("pass_")),
        Counter::DropMalformed
        | Counter::DropFragment
        | Counter::DropIpv6Ext
        | Counter::DropNoBackend
        | Counter::DropFib
        | Counter::DropEncap
        | Counter::DropFragmentUnknown
        | Counter::DropTooBig => (Kind::Dropped, strip("drop_")),
        Counter::IcmpEchoLimited | Counter::IcmpTooBigLimited => (Kind::Dropped, name),
        Counter::IcmpEchoReply | Counter::IcmpTooBig => (Kind::IcmpSent, strip("icmp_")),
        Counter::ConntrackHit | Counter::ConntrackMiss | Counter::ConntrackResteer => {
            (Kind::Lookups, strip("conntrack_"))
        }
        Counter::ConntrackMissNonSyn => (Kind::MissNonSyn, ""),
        Counter::ConntrackInsertFail => (Kind::InsertFailures, ""),
        Counter::ConntrackShared => (Kind::Shared, ""),
        Counter::IcmpToBackend => (Kind::IcmpToBackend, ""),
        Counter::FragmentTracked => (Kind::FragmentsTracked, ""),
        Counter::Tx | Counter::Redirect => (Kind::Forwarded, name),
        Counter::SecondChance => (Kind::SecondChance, ""),
    }
}

/// The three per-CPU counter maps, opened from their pins.
pub(super) struct Maps {
    stats: PerCpuArray<MapData, u64>,
    vips: TrafficMap,
    backends: TrafficMap,
    /// Second chance: packets sent with a previous Backend attached, per Vip and per
    /// previous Backend (`None` under pins of a build without them).
    chained: Option<(TrafficMap, TrafficMap)>,
}

impl Maps {
    pub(super) fn open(dir: &Path) -> Result<Self, String> {
        let data = |name: &str| {
            let path = dir.join(name);
            MapData::from_pin(&path).map_err(|e| format!("{}: {e}", path.display()))
        };
        let stats = Map::from_map_data(data(names::STATS)?)
            .map_err(|e| format!("{}: {e}", names::STATS))?;
        Ok(Self {
            stats: PerCpuArray::try_from(stats).map_err(|e| format!("{}: {e}", names::STATS))?,
            vips: TrafficMap::new(data(names::VIP_STATS)?)?,
            backends: TrafficMap::new(data(names::BACKEND_STATS)?)?,
            chained: match (data(names::VIP_CHAINED), data(names::BACKEND_CHAINED)) {
                (Ok(v), Ok(b)) => Some((TrafficMap::new(v)?, TrafficMap::new(b)?)),
                _ => None,
            },
        })
    }

    /// Slots `0..=last` of the second-chance map of Vips (`vip`) or previous Backends.
    pub(super) fn chained_upto(&self, vip: bool, last: u32) -> io::Result<Vec<TrafficCounters>> {
        match &self.chained {
            Some((vips, backends)) => if vip { vips } else { backends }.read_upto(last),
            None => Ok(Vec::new()),
        }
    }

    /// What slot `id` of the Vip (`vip`) or Backend traffic map holds, summed over CPUs.
    pub(super) fn traffic(&self, vip: bool, id: u32) -> io::Result<TrafficCounters> {
        if vip { &self.vips } else { &self.backends }.lookup(id)
    }

    /// Slots `0..=last` of the Vip (`vip`) or Backend traffic map, summed over CPUs.
    pub(super) fn traffic_upto(&self, vip: bool, last: u32) -> io::Result<Vec<TrafficCounters>> {
        if vip { &self.vips } else { &self.backends }.read_upto(last)
    }

    /// Writes the global counters' families.
    pub(super) fn render_counters(&self, out: &mut String) -> Result<(), String> {
        let mut values = Vec::with_capacity(Counter::ALL.len());
        for counter in Counter::ALL {
            let per_cpu = self
                .stats
                .get(&(counter as u32), 0)
                .map_err(|e| e.to_string())?;
            values.push((counter, per_cpu.iter().sum::<u64>()));
        }
        for (family_kind, name, help, label) in FAMILIES {
            let mut family = Family::new(out, name, "counter", help);
            for &(counter, value) in &values {
                let (k, label_value) = kind(counter);
                if k == family_kind {
                    let set = label.map_or_else(String::new, |l| labels(&[(l, label_value)]));
                    family.int(&set, value);
                }
            }
        }
        Ok(())
    }
}

/// Slots read per `BPF_MAP_LOOKUP_BATCH` call.
const BATCH: usize = 1024;

/// A per-CPU array of [`TrafficCounters`] (Vip or Backend traffic).
struct TrafficMap {
    data: MapData,
    max_entries: u32,
    cpus: usize,
}

impl TrafficMap {
    fn new(data: MapData) -> Result<Self, String> {
        let max_entries = data.info().map_err(|e| e.to_string())?.max_entries();
        let cpus = aya::util::nr_cpus().map_err(|(path, e)| format!("{path}: {e}"))?;
        Ok(Self {
            data,
            max_entries,
            cpus,
        })
    }

    fn fd(&self) -> u32 {
        self.data.fd().as_fd().as_raw_fd() as u32
    }

    fn sum(per_cpu: &[TrafficCounters]) -> TrafficCounters {
        per_cpu
            .iter()
            .fold(TrafficCounters::default(), |sum, c| TrafficCounters {
                packets: sum.packets + c.packets,
                bytes: sum.bytes + c.bytes,
            })
    }

    fn lookup(&self, id: u32) -> io::Result<TrafficCounters> {
        // TrafficCounters is 16 bytes: per-CPU values need no padding to 8.
        let mut values = vec![TrafficCounters::default(); self.cpus];
        let mut attr = LookupAttr {
            map_fd: self.fd(),
            key: &id as *const u32 as u64,
            value: values.as_mut_ptr() as u64,
            ..LookupAttr::default()
        };
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr)?;
        Ok(Self::sum(&values))
    }

    /// Slots `0..=last` (at most the map's size): in batches, or one by one where the
    /// kernel has no batch lookup (before 5.6).
    fn read_upto(&self, last: u32) -> io::Result<Vec<TrafficCounters>> {
        let wanted = (last.min(self.max_entries.saturating_sub(1)) as usize + 1)
            .min(self.max_entries as usize);
        let mut out = vec![TrafficCounters::default(); wanted];
        let chunk = BATCH.min(wanted.max(1));
        let mut keys = vec![0u32; chunk];
        let mut values = vec![TrafficCounters::default(); chunk * self.cpus];
        let (mut next, mut read) = (0u32, 0usize);
        while read < wanted {
            let mut attr = BatchAttr {
                in_batch: if read == 0 {
                    0
                } else {
                    &next as *const u32 as u64
                },
                out_batch: &mut next as *mut u32 as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: chunk.min(wanted - read) as u32,
                map_fd: self.fd(),
                ..BatchAttr::default()
            };
            let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
            let got = attr.count as usize;
            for (i, &key) in keys[..got].iter().enumerate() {
                if let Some(slot) = out.get_mut(key as usize) {
                    *slot = Self::sum(&values[i * self.cpus..(i + 1) * self.cpus]);
                }
            }
            read += got;
            match result {
                Ok(()) if got > 0 => {}
                Ok(()) => break,
                // The end of the array.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
                Err(e)
                    if read == 0
                        && matches!(
                            e.raw_os_error(),
                            Some(libc::EINVAL | ENOTSUPP | libc::EOPNOTSUPP)
                        ) =>
                {
                    return (0..wanted as u32).map(|id| self.lookup(id)).collect();
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}
