//! The daemon's handle on the XDP object: loading it with map sizes from the config,
//! attaching it, writing Vips, Backends and MaglevTables into its maps, and reading its
//! per-CPU counters back.

use std::{
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::Path,
};

use crate::bpf_sys::{
    BPF_MAP_DELETE_ELEM, BPF_MAP_UPDATE_BATCH, BPF_MAP_UPDATE_ELEM, BPF_PROG_TEST_RUN, BatchAttr,
    ENOTSUPP, LookupAttr, TestAttr, bpf,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, ArrayOfMaps, HashMap, MapData, MapError, PerCpuArray},
    programs::{ProgramError, TestRun as _, TestRunOptions, Xdp, XdpMode, xdp::XdpLinkId},
};
use lb_common::{
    conntrack::{self, Way},
    consts::{
        BPF_F_INNER_MAP, BPF_F_MMAPABLE, CONFIG_SLOTS, Counter, DECAP_PREFIXES,
        DEFAULT_CONNTRACK_ENTRIES, DEFAULT_CONNTRACK_IDLE, DEFAULT_FLOW_CACHE_ENTRIES,
        DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS, DecapCounter, NEXT_PROGRAM_SLOTS, flow_cache_slots,
        icmp_rate_slots, map_names as names, prog_names, table_entries,
    },
    hash::{Flow, addr_words, vip_filter_bit},
    maglev::MaglevTable,
    types::{
        Backend, ConntrackBucket, DecapConfig, GlobalConfig, IcmpRate, Prefix4, Prefix6,
        TrafficCounters, TunnelConfig, VipAddr, VipFilter, VipKey, VipState,
    },
};

/// Every map of the object (all of them are pinned by `load_pinned`).
const ALL_MAPS: [&str; 26] = [
    names::CONFIG,
    names::CONFIG_INDEX,
    names::VIP_ADDRS_V4,
    names::VIP_ADDRS_V6,
    names::VIPS,
    names::VIP_STATE,
    names::TABLES,
    names::BACKENDS,
    names::CONNTRACK,
    names::FLOW_CACHE_V4,
    names::FLOW_CACHE_V6,
    names::NEXT_HOPS,
    names::STATS,
    names::VIP_STATS,
    names::BACKEND_STATS,
    names::PREV_TABLES,
    names::VIP_CHAINED,
    names::BACKEND_CHAINED,
    names::DECAP_CONFIG,
    names::DECAP_STATS,
    names::ICMP_RATE,
    names::FRAGMENTS,
    // Pinned too: a program array loses its entries with its last file descriptor or pin,
    // and the next programs must keep running while the daemon is down.
    names::NEXT_PROGRAMS,
    names::NEXT_SLOTS,
    names::TUNNEL,
    // Pinned for the same reason: `lb_ingress` hands every new flow to `lb_full` there.
    names::FULL_PATH,
];

/// Map sizes that follow from the capacities.
fn map_sizes(caps: Capacities) -> Vec<(&'static str, u32)> {
    vec![
        // Fixed, but checked: a CONFIG pinned by a build without its ring has one slot.
        (names::CONFIG, CONFIG_SLOTS),
        (names::VIP_ADDRS_V4, caps.max_vips),
        (names::VIP_ADDRS_V6, caps.max_vips),
        (names::VIPS, caps.max_vips),
        (names::VIP_STATE, caps.max_vips),
        (names::TABLES, caps.max_vips),
        (names::PREV_TABLES, caps.max_vips),
        (names::VIP_STATS, caps.max_vips),
        (names::VIP_CHAINED, caps.max_vips),
        (names::BACKEND_CHAINED, caps.max_backends),
        (names::BACKENDS, caps.max_backends),
        (names::NEXT_HOPS, caps.max_backends),
        (names::BACKEND_STATS, caps.max_backends),
        // The buckets, then the element holding the table's seed.
        (names::CONNTRACK, caps.conntrack_buckets() + 1),
        (
            names::FLOW_CACHE_V4,
            flow_cache_slots(caps.flow_cache_entries),
        ),
        (
            names::FLOW_CACHE_V6,
            flow_cache_slots(caps.flow_cache_entries),
        ),
    ]
}

/// Kernel info of any map.
fn map_info(map: &aya::maps::Map) -> std::result::Result<aya::maps::MapInfo, MapError> {
    use aya::maps::Map;
    let data: &MapData = match map {
        Map::Array(m) | Map::PerCpuArray(m) | Map::HashMap(m) | Map::LruHashMap(m) => m,
        Map::ArrayOfMaps(m) => m,
        other => {
            return Err(MapError::InvalidName {
                name: format!("{other:?}"),
            });
        }
    };
    data.info()
}

/// `BPF_MAP_TYPE_ARRAY`, for the MaglevTable inner maps the daemon creates itself.
const BPF_MAP_TYPE_ARRAY: u32 = 2;

/// The compiled XDP object, built by build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Benchmark baselines (`lru_insert`), never loaded by the daemon.
pub static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench"));

/// Map sizes and connection-table settings, fixed when the program is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub max_vips: u32,
    pub max_backends: u32,
    /// Connection-table ways, both families (rounded up to a power of two of buckets).
    pub conntrack_entries: u32,
    /// Seconds without a packet before a connection-table entry may be reused.
    pub conntrack_idle: u32,
    /// Per-CPU flow-cache slots per family (rounded up to a power of two); 0 = no flow
    /// cache (a one-slot map the program never uses).
    pub flow_cache_entries: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            max_vips: DEFAULT_MAX_VIPS,
            max_backends: DEFAULT_MAX_BACKENDS,
            conntrack_entries: DEFAULT_CONNTRACK_ENTRIES,
            conntrack_idle: DEFAULT_CONNTRACK_IDLE,
            flow_cache_entries: DEFAULT_FLOW_CACHE_ENTRIES,
        }
    }
}

impl Capacities {
    /// Buckets of the connection table.
    pub fn conntrack_buckets(&self) -> u32 {
        conntrack::buckets(self.conntrack_entries)
    }
}

/// The kernel's tick rate (`CONFIG_HZ`, what `jiffies` counts), from /proc/config.gz; 1000
/// when unknown, the highest common value: a lower real rate only makes entries idle later.
pub fn kernel_hz() -> u32 {
    let config = std::process::Command::new("zcat")
        .arg("/proc/config.gz")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    config
        .lines()
        .find_map(|l| l.strip_prefix("CONFIG_HZ="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1000)
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "loading the XDP program failed: {0:#}\n  (verifier rejection: the log above names the \
         instruction; map creation failure: lower conntrack_entries or max_vips, or raise \
         RLIMIT_MEMLOCK / the cgroup memory limit)"
    )]
    Load(#[from] aya::EbpfError),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("map {0} is missing from the XDP object")]
    MissingMap(&'static str),
    #[error("program {0} is missing from the XDP object")]
    MissingProgram(&'static str),
    #[error("id {id} is beyond the capacity of {what} ({capacity}); raise it in the config")]
    Capacity {
        what: &'static str,
        id: u32,
        capacity: u32,
    },
    #[error("pinning under {path}: {error}")]
    Pin {
        path: std::path::PathBuf,
        error: String,
    },
    #[error(
        "map {name} pinned under {dir} holds {have} entries, the config asks for {want}: keep \
         the old capacity, or run `mlb detach` first (that drops the connection table)"
    )]
    PinnedSize {
        name: &'static str,
        have: u32,
        want: u32,
        dir: std::path::PathBuf,
    },
    #[error(
        "map {name} pinned under {dir} was made by another build of mlb (key and value of \
         {have:?} bytes, this build needs {want:?}): run `mlb detach` first (that drops the \
         connection table)"
    )]
    PinnedLayout {
        name: &'static str,
        have: (u32, u32),
        want: (u32, u32),
        dir: std::path::PathBuf,
    },
    #[error("{0}")]
    Os(std::io::Error),
    #[error("writing a MaglevTable through mmap: {0}")]
    Mmap(std::io::Error),
}

type Result<T> = std::result::Result<T, DataplaneError>;

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// The loaded XDP object and its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    caps: Capacities,
    /// `CONFIG` slots that were live since the last RCU grace period: a packet may still
    /// be reading them, so they are not rewritten before the next one.
    config_retired: u64,
}

impl Dataplane {
    /// Loads the object with map sizes from `caps` and loads (verifies) all its programs.
    /// The maps live as long as this value.
    pub fn load(caps: Capacities) -> Result<Self> {
        Self::load_with(caps, None, OBJECT)
    }

    /// Like [`Dataplane::load`], with another build's XDP object (the per-packet
    /// benchmark's A/B against a base commit). Maps this build added are absent from it.
    pub fn load_object(caps: Capacities, object: &[u8]) -> Result<Self> {
        Self::load_with(caps, None, object)
    }

    /// Like [`Dataplane::load`], but every map is pinned under `pin_dir` (a bpffs
    /// directory): maps already pinned there are reused, connection tables included, so a
    /// restarted daemon keeps every flow. Pinned maps of other sizes are refused.
    pub fn load_pinned(caps: Capacities, pin_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(pin_dir).map_err(|e| DataplaneError::Pin {
            path: pin_dir.to_owned(),
            error: e.to_string(),
        })?;
        check_pinned_layouts(pin_dir)?;
        replace_outgrown_stats(pin_dir)?;
        let dataplane = Self::load_with(caps, Some(pin_dir), OBJECT)?;
        for (name, want) in dataplane.map_sizes() {
            let map = dataplane.map(name)?;
            let have = map_info(map).map_err(map_err(name))?.max_entries();
            if have != want {
                return Err(DataplaneError::PinnedSize {
                    name,
                    have,
                    want,
                    dir: pin_dir.to_owned(),
                });
            }
        }
        Ok(dataplane)
    }

    fn load_with(caps: Capacities, pin_dir: Option<&Path>, object: &[u8]) -> Result<Self> {
        raise_memlock_limit();
        let sizes = map_sizes(caps);
        let mut loader = EbpfLoader::new();
        let (shift, idle) = conntrack::age_units(kernel_hz(), caps.conntrack_idle);
        let mask = caps.conntrack_buckets() - 1;
        let flow_cache_on = u32::from(caps.flow_cache_entries > 0);
        loader
            .override_global("CT_BUCKET_MASK", &mask, true)
            .override_global("CT_AGE_SHIFT", &shift, true)
            .override_global("CT_IDLE", &idle, true)
            .override_global("FLOW_CACHE_ON", &flow_cache_on, true);
        let paths: Vec<(&'static str, std::path::PathBuf)> = ALL_MAPS
            .iter()
            .filter_map(|name| pin_dir.map(|dir| (*name, dir.join(name))))
            .collect();
        for (name, size) in &sizes {
            loader.map_max_entries(name, *size);
        }
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let ebpf = loader.load(object)?;
        let mut dataplane = Self {
            ebpf,
            caps,
            // Pinned maps: another daemon may have just moved the index.
            config_retired: u64::MAX,
        };
        // A fresh table gets a random seed; an adopted one keeps its own.
        if dataplane.conntrack_seed()? == 0 {
            dataplane.set_conntrack_seed(random_seed())?;
        }
        for name in [
            prog_names::LB_INGRESS,
            prog_names::LB_DECAP,
            prog_names::LB_PASS,
        ] {
            dataplane
                .xdp(name)?
                .load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        // Absent from the objects of builds before them (the benchmark's A/B).
        if let Ok(next) = dataplane.xdp(prog_names::LB_NEXT) {
            next.load().map_err(|source| DataplaneError::Program {
                name: prog_names::LB_NEXT,
                source,
            })?;
        }
        if let Ok(full) = dataplane.xdp(prog_names::LB_FULL) {
            let name = prog_names::LB_FULL;
            full.load()
                .map_err(|source| DataplaneError::Program { name, source })?;
            let fd = full
                .fd()
                .map_err(|source| DataplaneError::Program { name, source })?
                .as_fd()
                .as_raw_fd() as u32;
            // Before anything is attached: `lb_ingress` tail-calls it for every packet
            // its fast path leaves.
            let slot = dataplane.map_fd(names::FULL_PATH)?;
            map_update(slot, 0, fd).map_err(next_err(names::FULL_PATH))?;
        }
        Ok(dataplane)
    }

    /// Every sized map and the size the capacities give it.
    fn map_sizes(&self) -> Vec<(&'static str, u32)> {
        map_sizes(self.caps)
    }

    pub fn capacities(&self) -> Capacities {
        self.caps
    }

    /// A reader of the data plane's rare-event log (aya-log's `AYA_LOGS` ring buffer),
    /// which hands its records to the `log` crate, and from there to tracing.
    pub fn logger(
        &mut self,
    ) -> std::result::Result<aya_log::EbpfLogger<&'static dyn log::Log>, aya_log::Error> {
        aya_log::EbpfLogger::init(&mut self.ebpf)
    }

    /// One of the object's XDP programs (`prog_names`).
    pub fn xdp(&mut self, name: &'static str) -> Result<&mut Xdp> {
        let program = self
            .ebpf
            .program_mut(name)
            .ok_or(DataplaneError::MissingProgram(name))?;
        program
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    /// Attaches program `name` to `interface`.
    pub fn attach(
        &mut self,
        name: &'static str,
        interface: &str,
        mode: XdpMode,
    ) -> Result<XdpLinkId> {
        self.xdp(name)?
            .attach(interface, mode)
            .map_err(|source| DataplaneError::Program { name, source })
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap(name))
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map> {
        self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))
    }

    fn check(&self, what: &'static str, id: u32, capacity: u32) -> Result<()> {
        if id >= capacity {
            return Err(DataplaneError::Capacity { what, id, capacity });
        }
        Ok(())
    }

    /// The connection table's hash seed (0 before one is set).
    pub fn conntrack_seed(&self) -> Result<u64> {
        Ok(self.conntrack_bucket(self.caps.conntrack_buckets())?.ways[0])
    }

    /// Empties the connection table and gives it hash seed `seed` (non-zero). For tests
    /// that need a known placement; a running data plane loses every flow's entry.
    pub fn set_conntrack_seed(&mut self, seed: u64) -> Result<()> {
        let name = names::CONNTRACK;
        let buckets = self.caps.conntrack_buckets();
        let mut map: Array<_, ConntrackBucket> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for index in 0..buckets {
            map.set(index, ConntrackBucket::default(), 0)
                .map_err(map_err(name))?;
        }
        let mut cell = ConntrackBucket::default();
        cell.ways[0] = seed;
        map.set(buckets, cell, 0).map_err(map_err(name))
    }

    /// Bucket `index` of the connection table.
    pub fn conntrack_bucket(&self, index: u32) -> Result<ConntrackBucket> {
        let name = names::CONNTRACK;
        let map: Array<_, ConntrackBucket> =
            Array::try_from(self.map(name)?).map_err(map_err(name))?;
        map.get(&index, 0).map_err(map_err(name))
    }

    /// Writes bucket `index` of the connection table (tests that stage a bucket).
    pub fn set_conntrack_bucket(&mut self, index: u32, bucket: &ConntrackBucket) -> Result<()> {
        let name = names::CONNTRACK;
        let mut map: Array<_, ConntrackBucket> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        map.set(index, bucket, 0).map_err(map_err(name))
    }

    /// The connection-table way of `flow`, if any, as the kernel would find it.
    pub fn conntrack(&self, flow: &Flow) -> Result<Option<Way>> {
        let seed = self.conntrack_seed()?;
        let place = conntrack::place(flow.conntrack_hash(seed), self.caps.conntrack_buckets() - 1);
        for index in [place.first, place.second] {
            let mut bucket = self.conntrack_bucket(index)?;
            // SAFETY: a bucket we own.
            if let Some((_, word)) = unsafe { conntrack::find(&mut bucket, place.tag) } {
                return Ok(Some(Way::unpack(word)));
            }
        }
        Ok(None)
    }

    /// The kernel's clock in age units, as the program reads it: jiffies (from
    /// /proc/timer_list) shifted by the age unit. `None` when it cannot be read.
    pub fn conntrack_now(&self) -> Option<u64> {
        let (shift, _) = conntrack::age_units(kernel_hz(), self.caps.conntrack_idle);
        let text = std::fs::read_to_string("/proc/timer_list").ok()?;
        let jiffies: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("jiffies:"))?
            .trim()
            .parse()
            .ok()?;
        Some((jiffies >> shift) & conntrack::AGE_MASK)
    }

    /// Writes the global entry; the flow-cache mask comes from the capacities, the cache
    /// epoch moves on (next hops may have changed) and the Vip filter stays as it is.
    pub fn set_global(&mut self, config: &GlobalConfig) -> Result<()> {
        let current = self.global()?;
        self.write_global(&GlobalConfig {
            flow_cache_mask: flow_cache_slots(self.caps.flow_cache_entries) - 1,
            cache_epoch: next_epoch(current.cache_epoch),
            vip_filter: current.vip_filter,
            ..*config
        })
    }

    /// Writes `config` as given (flow-cache mask, epoch and Vip filter included) into the
    /// next `CONFIG` slot, then makes it the live one: a packet reads the index once, so it
    /// sees the old config or the new one, never a mix.
    pub fn write_global(&mut self, config: &GlobalConfig) -> Result<()> {
        let live = self.config_index()?;
        let next = (live + 1) % CONFIG_SLOTS;
        if self.config_retired & (1u64 << next) != 0 {
            wait_for_running_programs().map_err(DataplaneError::Os)?;
            self.config_retired = 0;
        }
        let mut map: Array<_, GlobalConfig> =
            Array::try_from(self.map_mut(names::CONFIG)?).map_err(map_err(names::CONFIG))?;
        map.set(next, config, 0).map_err(map_err(names::CONFIG))?;
        let mut index: Array<_, u32> = Array::try_from(self.map_mut(names::CONFIG_INDEX)?)
            .map_err(map_err(names::CONFIG_INDEX))?;
        index
            .set(0, next, 0)
            .map_err(map_err(names::CONFIG_INDEX))?;
        self.config_retired |= 1u64 << live;
        Ok(())
    }

    fn config_index(&self) -> Result<u32> {
        let index: Array<_, u32> = Array::try_from(self.map(names::CONFIG_INDEX)?)
            .map_err(map_err(names::CONFIG_INDEX))?;
        let live = index.get(&0, 0).map_err(map_err(names::CONFIG_INDEX))?;
        Ok(live % CONFIG_SLOTS)
    }

    /// Invalidates every CPU's flow cache: called after each change to a Vip or Backend,
    /// so no cached Route outlives the state it was built from.
    fn bump_cache_epoch(&mut self) -> Result<()> {
        let config = self.global()?;
        self.write_global(&GlobalConfig {
            cache_epoch: next_epoch(config.cache_epoch),
            ..config
        })
    }

    /// The live config.
    pub fn global(&self) -> Result<GlobalConfig> {
        let live = self.config_index()?;
        let map: Array<_, GlobalConfig> =
            Array::try_from(self.map(names::CONFIG)?).map_err(map_err(names::CONFIG))?;
        map.get(&live, 0).map_err(map_err(names::CONFIG))
    }

    pub fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.check("max_backends", id, self.caps.max_backends)?;
        let mut map: Array<_, Backend> =
            Array::try_from(self.map_mut(names::BACKENDS)?).map_err(map_err(names::BACKENDS))?;
        map.set(id, backend, 0).map_err(map_err(names::BACKENDS))?;
        self.bump_cache_epoch()
    }

    pub fn backend(&self, id: u32) -> Result<Backend> {
        let map: Array<_, Backend> =
            Array::try_from(self.map(names::BACKENDS)?).map_err(map_err(names::BACKENDS))?;
        map.get(&id, 0).map_err(map_err(names::BACKENDS))
    }

    /// Marks `addr` as used by some Vip (`Some`) or by none (`None`).
    pub fn set_vip_addr(&mut self, addr: IpAddr, value: Option<VipAddr>) -> Result<()> {
        match addr {
            IpAddr::V4(_) => {
                let name = names::VIP_ADDRS_V4;
                let mut map: HashMap<_, u32, VipAddr> =
                    HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
                let key = addr_words(addr)[0];
                match value {
                    Some(v) => map.insert(key, v, 0).map_err(map_err(name)),
                    None => ignore_missing(map.remove(&key)).map_err(map_err(name)),
                }
            }
            IpAddr::V6(_) => {
                let name = names::VIP_ADDRS_V6;
                let mut map: HashMap<_, [u32; 4], VipAddr> =
                    HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
                let key = addr_words(addr);
                match value {
                    Some(v) => map.insert(key, v, 0).map_err(map_err(name)),
                    None => ignore_missing(map.remove(&key)).map_err(map_err(name)),
                }
            }
        }
    }

    /// Sets the Vip address pre-filter to exactly `addrs`. One array update, so a packet
    /// sees the old or the new bitmap word by word; when Vips are both added and removed,
    /// write the union first so no Vip is ever missing from it.
    pub fn set_vip_filter(&mut self, addrs: impl IntoIterator<Item = IpAddr>) -> Result<()> {
        let mut filter = VipFilter::default();
        for addr in addrs {
            let bit = vip_filter_bit(addr) as usize;
            filter.words[bit / 64] |= 1 << (bit % 64);
        }
        let config = self.global()?;
        self.write_global(&GlobalConfig {
            vip_filter: filter,
            ..config
        })
    }

    /// Publishes Vip `id` under `key`. Install its table first: a Vip without one drops
    /// (or passes) its traffic as having no backend.
    pub fn set_vip(&mut self, id: u32, key: &VipKey, state: &VipState) -> Result<()> {
        self.check("max_vips", id, self.caps.max_vips)?;
        let mut states: Array<_, VipState> =
            Array::try_from(self.map_mut(names::VIP_STATE)?).map_err(map_err(names::VIP_STATE))?;
        states
            .set(id, state, 0)
            .map_err(map_err(names::VIP_STATE))?;
        let mut vips: HashMap<_, VipKey, u32> =
            HashMap::try_from(self.map_mut(names::VIPS)?).map_err(map_err(names::VIPS))?;
        vips.insert(key, id, 0).map_err(map_err(names::VIPS))?;
        self.bump_cache_epoch()
    }

    /// Unpublishes a Vip key; its id's state is cleared so conntrack entries die with it.
    pub fn remove_vip(&mut self, id: u32, key: &VipKey) -> Result<()> {
        let mut vips: HashMap<_, VipKey, u32> =
            HashMap::try_from(self.map_mut(names::VIPS)?).map_err(map_err(names::VIPS))?;
        ignore_missing(vips.remove(key)).map_err(map_err(names::VIPS))?;
        let mut states: Array<_, VipState> =
            Array::try_from(self.map_mut(names::VIP_STATE)?).map_err(map_err(names::VIP_STATE))?;
        states
            .set(id, VipState::default(), 0)
            .map_err(map_err(names::VIP_STATE))?;
        self.bump_cache_epoch()
    }

    /// Builds a new inner array holding `table` and swaps it in for Vip `id` in one map
    /// update: a packet sees the old table or the new one, never a mix (invariant 3).
    pub fn install_table(&mut self, id: u32, table: &MaglevTable) -> Result<()> {
        self.install_one(names::TABLES, id, table)
    }

    fn install_one(&mut self, name: &'static str, id: u32, table: &MaglevTable) -> Result<()> {
        self.check("max_vips", id, self.caps.max_vips)?;
        let inner = inner_table(table)?;
        let mut outer: ArrayOfMaps<_, MapData> =
            ArrayOfMaps::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        outer.set(id, &inner, 0).map_err(map_err(name))
    }

    /// Swaps several Vips' tables in with one `BPF_MAP_UPDATE_BATCH` on the outer map: the
    /// kernel waits for one RCU grace period per syscall that writes an array-of-maps
    /// (~13 ms here), so 256 single swaps took 3.3 s and one batch takes one wait. Each
    /// Vip's swap stays atomic (one pointer store). Equal tables share one inner map (the
    /// data plane never writes a table, and a change always installs a new map). Falls
    /// back to one swap per table where the kernel has no batch update for the map type.
    pub fn install_tables(&mut self, tables: &[(u32, &MaglevTable)]) -> Result<()> {
        self.install_batch(names::TABLES, tables)
    }

    /// Like [`Dataplane::install_tables`], for the Vips' previous tables (second chance).
    pub fn install_prev_tables(&mut self, tables: &[(u32, &MaglevTable)]) -> Result<()> {
        self.install_batch(names::PREV_TABLES, tables)
    }

    /// Vip `id` has no previous table any more: nothing of it is chained.
    pub fn remove_prev_table(&mut self, id: u32) -> Result<()> {
        let fd = self.outer_fd(names::PREV_TABLES)?;
        let mut attr = LookupAttr {
            map_fd: fd,
            key: &id as *const u32 as u64,
            ..LookupAttr::default()
        };
        // `key` points at a live u32 for the call.
        match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(DataplaneError::Pin {
                path: names::PREV_TABLES.into(),
                error: format!("delete {id}: {e}"),
            }),
        }
    }

    /// Vip `id`'s table as the data plane holds it: `(size, slots)`.
    pub fn table(&self, id: u32) -> Result<Option<(u32, Vec<u32>)>> {
        read_table(self.map(names::TABLES)?, names::TABLES, id)
    }

    /// Vip `id`'s previous table as the data plane holds it: `(size, slots)`.
    pub fn prev_table(&self, id: u32) -> Result<Option<(u32, Vec<u32>)>> {
        read_table(self.map(names::PREV_TABLES)?, names::PREV_TABLES, id)
    }

    fn outer_fd(&self, name: &'static str) -> Result<u32> {
        match self.map(name)? {
            aya::maps::Map::ArrayOfMaps(data) => Ok(data.fd().as_fd().as_raw_fd() as u32),
            _ => Err(DataplaneError::MissingMap(name)),
        }
    }

    fn install_batch(&mut self, name: &'static str, tables: &[(u32, &MaglevTable)]) -> Result<()> {
        for (id, _) in tables {
            self.check("max_vips", *id, self.caps.max_vips)?;
        }
        let mut inners: Vec<(&MaglevTable, MapData)> = Vec::new();
        let mut keys = Vec::with_capacity(tables.len());
        let mut fds = Vec::with_capacity(tables.len());
        for (id, table) in tables {
            // Same allocation first: the reconciler hands one table to every Vip it shares.
            let index = match inners
                .iter()
                .position(|(t, _)| std::ptr::eq(*t, *table) || *t == *table)
            {
                Some(index) => index,
                None => {
                    inners.push((table, inner_table(table)?));
                    inners.len() - 1
                }
            };
            keys.push(*id);
            fds.push(inners[index].1.fd().as_fd().as_raw_fd() as u32);
        }
        if keys.is_empty() {
            return Ok(());
        }
        let outer_fd = self.outer_fd(name)?;
        match update_batch(outer_fd, &keys, &fds) {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(ENOTSUPP)) => {
                for (id, table) in tables {
                    self.install_one(name, *id, table)?;
                }
                Ok(())
            }
            Err(e) => Err(DataplaneError::Pin {
                path: name.into(),
                error: format!("batch table swap: {e}"),
            }),
        }
    }

    /// The load balancers' source prefixes `lb_decap` accepts encapsulated packets from
    /// (on a backend); at most `DECAP_PREFIXES` of each family.
    pub fn set_decap_sources(&mut self, prefixes: &[(IpAddr, u8)]) -> Result<()> {
        let config = decap_config(prefixes).ok_or(DataplaneError::Capacity {
            what: "decap source prefixes per family",
            id: prefixes.len() as u32,
            capacity: DECAP_PREFIXES as u32,
        })?;
        let mut map: Array<_, DecapConfig> = Array::try_from(self.map_mut(names::DECAP_CONFIG)?)
            .map_err(map_err(names::DECAP_CONFIG))?;
        map.set(0, config, 0).map_err(map_err(names::DECAP_CONFIG))
    }

    /// `lb_decap`'s counters, summed over CPUs, indexed by `DecapCounter`.
    pub fn decap_counters(&self) -> Result<Vec<u64>> {
        per_cpu_sums(
            self.map(names::DECAP_STATS)?,
            names::DECAP_STATS,
            0..DecapCounter::COUNT,
        )
    }

    /// Packets sent with a previous Backend attached, per Vip id (`vip`) or per previous
    /// Backend id, for ids `0..count`.
    pub fn chained(&self, vip: bool, count: u32) -> Result<Vec<u64>> {
        let name = if vip {
            names::VIP_CHAINED
        } else {
            names::BACKEND_CHAINED
        };
        (0..count)
            .map(|id| Ok(self.traffic(name, id)?.packets))
            .collect()
    }

    /// Kernel memory charged to the data plane's maps, per map name, inner MaglevTables
    /// included (summed under "MaglevTables"), as `/proc/<pid>/fdinfo` reports it.
    pub fn locked_memory(&mut self) -> Result<Vec<(String, u64)>> {
        let name = prog_names::LB_INGRESS;
        let info = self
            .xdp(name)?
            .info()
            .map_err(|source| DataplaneError::Program { name, source })?;
        let ids = info
            .map_ids()
            .map_err(|source| DataplaneError::Program { name, source })?
            .unwrap_or_default();
        let mut usage = Vec::new();
        for id in ids {
            let map = MapData::from_id(id).map_err(map_err("by id"))?;
            let info = map.info().map_err(map_err("info"))?;
            let label = info.name_as_str().unwrap_or("?").to_owned();
            usage.push((label, fd_memlock(map.fd().as_fd())));
        }
        let outer: ArrayOfMaps<_, MapData> =
            ArrayOfMaps::try_from(self.map(names::TABLES)?).map_err(map_err(names::TABLES))?;
        let mut tables = 0;
        for index in 0..self.caps.max_vips {
            if let Ok(inner) = outer.get(&index, 0) {
                tables += fd_memlock(inner.fd().as_fd());
            }
        }
        usage.push(("MaglevTables".to_owned(), tables));
        Ok(usage)
    }

    /// The global counters, summed over CPUs, indexed by `Counter`.
    pub fn counters(&self) -> Result<Vec<u64>> {
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.map(names::STATS)?).map_err(map_err(names::STATS))?;
        Counter::ALL
            .iter()
            .map(|&c| {
                Ok(map
                    .get(&(c as u32), 0)
                    .map_err(map_err(names::STATS))?
                    .iter()
                    .sum())
            })
            .collect()
    }

    /// One counter, read alone (so it also reads an older object's smaller `STATS`).
    pub fn counter(&self, counter: Counter) -> Result<u64> {
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.map(names::STATS)?).map_err(map_err(names::STATS))?;
        Ok(map
            .get(&(counter as u32), 0)
            .map_err(map_err(names::STATS))?
            .iter()
            .sum())
    }

    /// Zeroes the per-CPU traffic counters of Vip (`vip`) or Backend `id`: an id given to
    /// something new starts from zero.
    pub fn reset_traffic(&mut self, vip: bool, id: u32) -> Result<()> {
        let name = if vip {
            names::VIP_STATS
        } else {
            names::BACKEND_STATS
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Os(e))?;
        let mut map: PerCpuArray<_, TrafficCounters> =
            PerCpuArray::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        let zeros = aya::maps::PerCpuValues::try_from(vec![TrafficCounters::default(); cpus])
            .map_err(|e| DataplaneError::Os(std::io::Error::other(e)))?;
        map.set(id, zeros, 0).map_err(map_err(name))
    }

    /// Sets every CPU's budget of ICMP messages of kind `slot` (`icmp_rate_slots`) to
    /// `per_second`, starting a fresh window.
    pub fn set_icmp_rate(&mut self, slot: u32, per_second: u32) -> Result<()> {
        let name = names::ICMP_RATE;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Os(e))?;
        let mut map: PerCpuArray<_, IcmpRate> =
            PerCpuArray::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        let rate = IcmpRate {
            limit: per_second,
            ..IcmpRate::default()
        };
        let values = aya::maps::PerCpuValues::try_from(vec![rate; cpus])
            .map_err(|e| DataplaneError::Os(std::io::Error::other(e)))?;
        map.set(slot, values, 0).map_err(map_err(name))
    }

    /// Writes the GUE port and the interfaces' MTU (`TUNNEL`).
    pub fn set_tunnel(&mut self, tunnel: &TunnelConfig) -> Result<()> {
        let mut map: Array<_, TunnelConfig> =
            Array::try_from(self.map_mut(names::TUNNEL)?).map_err(map_err(names::TUNNEL))?;
        map.set(0, tunnel, 0).map_err(map_err(names::TUNNEL))
    }

    pub fn vip_traffic(&self, id: u32) -> Result<TrafficCounters> {
        self.traffic(names::VIP_STATS, id)
    }

    pub fn backend_traffic(&self, id: u32) -> Result<TrafficCounters> {
        self.traffic(names::BACKEND_STATS, id)
    }

    fn traffic(&self, name: &'static str, id: u32) -> Result<TrafficCounters> {
        let map: PerCpuArray<_, TrafficCounters> =
            PerCpuArray::try_from(self.map(name)?).map_err(map_err(name))?;
        let per_cpu = map.get(&id, 0).map_err(map_err(name))?;
        Ok(per_cpu
            .iter()
            .fold(TrafficCounters::default(), |sum, c| TrafficCounters {
                packets: sum.packets + c.packets,
                bytes: sum.bytes + c.bytes,
            }))
    }

    /// Sends the packets not for a Vip that arrive on each `(ifindex, program)`'s
    /// interface to its program (a tail call); every other interface's to the kernel.
    /// Programs are in place before `lb_next` is, and `lb_next` goes first when none is
    /// left, so a packet meets either the old or the new choice of its interface. The
    /// kernel refuses a program `lb_ingress` cannot tail-call (another type, or XDP with
    /// frags).
    pub fn set_next_programs(&mut self, next: &[(u32, BorrowedFd<'_>)]) -> Result<()> {
        self.check(
            "interfaces with a next program",
            next.len() as u32,
            NEXT_PROGRAM_SLOTS,
        )?;
        let programs = self.map_fd(names::NEXT_PROGRAMS)?;
        let slots = self.map_fd(names::NEXT_SLOTS)?;
        let dispatch = self
            .xdp(prog_names::LB_NEXT)?
            .fd()
            .map_err(|source| DataplaneError::Program {
                name: prog_names::LB_NEXT,
                source,
            })?
            .as_fd()
            .as_raw_fd() as u32;
        if next.is_empty() {
            map_delete(programs, 0).map_err(next_err(names::NEXT_PROGRAMS))?;
        }
        for (slot, (ifindex, fd)) in (1..).zip(next) {
            map_update(programs, slot, fd.as_raw_fd() as u32)
                .map_err(next_err(names::NEXT_PROGRAMS))?;
            map_update(slots, *ifindex, slot).map_err(next_err(names::NEXT_SLOTS))?;
        }
        let keep: Vec<u32> = next.iter().map(|(ifindex, _)| *ifindex).collect();
        self.clear_next_slots(&keep, next.len() as u32 + 1)?;
        if !next.is_empty() {
            map_update(programs, 0, dispatch).map_err(next_err(names::NEXT_PROGRAMS))?;
        }
        Ok(())
    }

    /// Sends the packets not for a Vip of every interface to `program`: it goes straight
    /// into slot 0 (the one tail call `lb_ingress` makes), then the per-interface entries
    /// go.
    pub fn set_next_program_everywhere(&mut self, program: BorrowedFd<'_>) -> Result<()> {
        let programs = self.map_fd(names::NEXT_PROGRAMS)?;
        map_update(programs, 0, program.as_raw_fd() as u32)
            .map_err(next_err(names::NEXT_PROGRAMS))?;
        self.clear_next_slots(&[], 1)
    }

    /// Removes every interface's `NEXT_SLOTS` entry but those of `keep`, and the
    /// `NEXT_PROGRAMS` slots from `first` on.
    fn clear_next_slots(&self, keep: &[u32], first: u32) -> Result<()> {
        let programs = self.map_fd(names::NEXT_PROGRAMS)?;
        let slots = self.map_fd(names::NEXT_SLOTS)?;
        let map = self.map(names::NEXT_SLOTS)?;
        let stale: Vec<u32> = HashMap::<_, u32, u32>::try_from(map)
            .map_err(map_err(names::NEXT_SLOTS))?
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !keep.contains(k))
            .collect();
        for ifindex in stale {
            map_delete(slots, ifindex).map_err(next_err(names::NEXT_SLOTS))?;
        }
        for slot in first..NEXT_PROGRAM_SLOTS {
            map_delete(programs, slot).map_err(next_err(names::NEXT_PROGRAMS))?;
        }
        Ok(())
    }

    /// The file descriptor of map `name`, for the raw `bpf(2)` calls.
    fn map_fd(&self, name: &'static str) -> Result<u32> {
        use aya::maps::Map;
        match self.map(name)? {
            Map::HashMap(data) | Map::ProgramArray(data) => {
                Ok(data.fd().as_fd().as_raw_fd() as u32)
            }
            _ => Err(DataplaneError::MissingMap(name)),
        }
    }

    /// Runs program `name` once on `packet` with BPF_PROG_TEST_RUN. `ingress_ifindex`
    /// (0 = loopback) is the device the packet pretends to arrive on, which is where
    /// `bpf_fib_lookup` starts. Returns the action and the packet as the program left it.
    pub fn test_run(
        &mut self,
        name: &'static str,
        packet: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> Result<TestRunOutcome> {
        let mut out = vec![0u8; packet.len() + 256];
        let ctx = xdp_md(ingress_ifindex, packet.len() as u32);
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = Some(&mut out);
        if ingress_ifindex != 0 {
            opts.ctx_in = Some(&ctx);
        }
        opts.repeat = repeat;
        let result = self
            .xdp(name)?
            .test_run(opts)
            .map_err(|source| DataplaneError::Program { name, source })?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutcome {
            action: result.return_value,
            packet: out,
            duration: result.duration,
        })
    }
}

impl Dataplane {
    /// A file descriptor of program `name` of its own, for callers that run it from
    /// several threads at once ([`test_run_fd`]).
    pub fn program_fd(&mut self, name: &'static str) -> Result<std::os::fd::OwnedFd> {
        let fd = self
            .xdp(name)?
            .fd()
            .map_err(|source| DataplaneError::Program { name, source })?
            .try_clone()
            .map_err(DataplaneError::Os)?;
        fd.as_fd().try_clone_to_owned().map_err(DataplaneError::Os)
    }
}

/// BPF_PROG_TEST_RUN of the program behind `fd`, once, on the calling thread's CPU (and
/// in its network namespace): the action and the packet as the program left it. For
/// tests that race two CPUs; [`Dataplane::test_run`] otherwise.
pub fn test_run_fd(
    fd: std::os::fd::BorrowedFd<'_>,
    packet: &[u8],
    ingress_ifindex: u32,
) -> std::io::Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; packet.len() + 256];
    let ctx = xdp_md(ingress_ifindex, packet.len() as u32);
    let mut attr = TestAttr {
        prog_fd: fd.as_raw_fd() as u32,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        ..Default::default()
    };
    if ingress_ifindex != 0 {
        attr.ctx_size_in = ctx.len() as u32;
        attr.ctx_in = ctx.as_ptr() as u64;
    }
    // The buffers outlive the call.
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    out.truncate(attr.data_size_out as usize);
    Ok((attr.retval, out))
}

/// What one BPF_PROG_TEST_RUN call returned.
#[derive(Debug)]
pub struct TestRunOutcome {
    pub action: u32,
    pub packet: Vec<u8>,
    /// Mean time per repetition, as the kernel measured it.
    pub duration: std::time::Duration,
}

/// An `xdp_md` context for BPF_PROG_TEST_RUN: the packet spans `0..len` (the kernel
/// insists), and it arrives on `ingress_ifindex`.
fn xdp_md(ingress_ifindex: u32, len: u32) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&len.to_ne_bytes());
    ctx[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    ctx
}

/// Writes `table` into an mmap-able inner array of `entries` 8-byte entries.
/// A new inner array (the outer map's template: mmapable, slot 0 the size) holding
/// `table`.
fn inner_table(table: &MaglevTable) -> Result<MapData> {
    let entries = table_entries(table.size());
    let definition = aya_obj::Map::new_from_params(
        BPF_MAP_TYPE_ARRAY,
        size_of::<u32>() as u32,
        size_of::<[u32; 2]>() as u32,
        entries,
        BPF_F_INNER_MAP | BPF_F_MMAPABLE,
    );
    let inner = MapData::create(definition, "mlb_table", None).map_err(map_err("MaglevTable"))?;
    write_table(inner.fd().as_fd(), entries, table)?;
    Ok(inner)
}

/// The `DECAP_CONFIG` entry for `prefixes`; `None` if a family has too many.
pub fn decap_config(prefixes: &[(IpAddr, u8)]) -> Option<DecapConfig> {
    let mut config = DecapConfig::default();
    for (addr, len) in prefixes {
        match addr {
            IpAddr::V4(a) => {
                let i = config.v4_count as usize;
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(*len).min(32))
                    .unwrap_or(0);
                *config.v4.get_mut(i)? = Prefix4 {
                    addr: (u32::from(*a) & mask).to_be(),
                    mask: mask.to_be(),
                };
                config.v4_count += 1;
            }
            IpAddr::V6(a) => {
                let i = config.v6_count as usize;
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(*len).min(128))
                    .unwrap_or(0);
                let words = |v: u128| addr_words(IpAddr::V6(v.into()));
                *config.v6.get_mut(i)? = Prefix6 {
                    addr: words(u128::from(*a) & mask),
                    mask: words(mask),
                };
                config.v6_count += 1;
            }
        }
    }
    Some(config)
}

/// Slots `ids` of a per-CPU `u64` array, each summed over CPUs.
fn per_cpu_sums(
    map: &aya::maps::Map,
    name: &'static str,
    ids: std::ops::Range<u32>,
) -> Result<Vec<u64>> {
    let map: PerCpuArray<_, u64> = PerCpuArray::try_from(map).map_err(map_err(name))?;
    ids.map(|id| Ok(map.get(&id, 0).map_err(map_err(name))?.iter().sum()))
        .collect()
}

/// Vip `id`'s table in the outer map `map`: `(size, slots)`, or `None` if it has none.
fn read_table(
    map: &aya::maps::Map,
    name: &'static str,
    id: u32,
) -> Result<Option<(u32, Vec<u32>)>> {
    let outer: ArrayOfMaps<_, MapData> = ArrayOfMaps::try_from(map).map_err(map_err(name))?;
    let inner = match outer.get(&id, 0) {
        Ok(inner) => inner,
        Err(MapError::KeyNotFound) => return Ok(None),
        Err(e) => return Err(map_err(name)(e)),
    };
    let inner: Array<_, [u32; 2]> =
        Array::try_from(aya::maps::Map::Array(inner)).map_err(map_err(name))?;
    let entries: Vec<[u32; 2]> = inner
        .iter()
        .collect::<std::result::Result<_, _>>()
        .map_err(map_err(name))?;
    let words: Vec<u32> = entries.iter().flatten().copied().collect();
    let Some((&size, rest)) = words.split_first() else {
        return Ok(None);
    };
    Ok(Some((
        size,
        rest[..(size as usize).min(rest.len())].to_vec(),
    )))
}

/// `BPF_MAP_UPDATE_BATCH`: `keys[i]` gets `values[i]`, in one syscall.
fn update_batch(map_fd: u32, keys: &[u32], values: &[u32]) -> std::io::Result<()> {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd,
        ..BatchAttr::default()
    };
    // keys and values hold `count` u32 each and outlive the call.
    bpf(BPF_MAP_UPDATE_BATCH, &mut attr)
}

fn write_table(fd: std::os::fd::BorrowedFd<'_>, entries: u32, table: &MaglevTable) -> Result<()> {
    let len = entries as usize * 8;
    // SAFETY: a shared mapping of a BPF array we own; unmapped before returning.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(DataplaneError::Mmap(std::io::Error::last_os_error()));
    }
    // SAFETY: the mapping is `len` bytes, u32-aligned (page-aligned).
    let words = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u32, len / 4) };
    words[0] = table.size();
    words[1..=table.slots().len()].copy_from_slice(table.slots());
    words[table.slots().len() + 1..].fill(0);
    // SAFETY: mapped above.
    unsafe { libc::munmap(ptr, len) };
    Ok(())
}

/// One `u32` → `u32` element (a program array's value is the program's file descriptor).
fn map_update(map_fd: u32, key: u32, value: u32) -> std::io::Result<()> {
    let mut attr = LookupAttr {
        map_fd,
        key: &key as *const u32 as u64,
        value: &value as *const u32 as u64,
        ..LookupAttr::default()
    };
    // `key` and `value` are live u32s for the call.
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr)
}

/// Deletes `key`; a missing one is no error.
fn map_delete(map_fd: u32, key: u32) -> std::io::Result<()> {
    let mut attr = LookupAttr {
        map_fd,
        key: &key as *const u32 as u64,
        ..LookupAttr::default()
    };
    // `key` is a live u32 for the call.
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(e),
        _ => Ok(()),
    }
}

fn next_err(name: &'static str) -> impl FnOnce(std::io::Error) -> DataplaneError {
    move |io_error| DataplaneError::Map {
        name,
        source: MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_update_elem",
            io_error,
        }),
    }
}

fn ignore_missing(result: std::result::Result<(), MapError>) -> std::result::Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

/// The MTU of interface `name` in this network namespace (`SIOCGIFMTU`: sysfs shows the
/// namespace it was mounted in, not necessarily ours).
pub fn interface_mtu(name: &str) -> Option<u32> {
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    use std::os::fd::FromRawFd as _;
    // SAFETY: a plain socket, closed by OwnedFd; `ifreq` is zeroed plain data with a
    // NUL-terminated name, and SIOCGIFMTU fills its `ifru_mtu`.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in name.bytes().enumerate() {
            req.ifr_name[i] = b as libc::c_char;
        }
        if libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFMTU, &mut req) != 0 {
            return None;
        }
        u32::try_from(req.ifr_ifru.ifru_mtu).ok()
    }
}

/// Turns on IPv4 and IPv6 forwarding for `interface` in the calling thread's network
/// namespace: `bpf_fib_lookup`, which finds each backend's next hop, answers only for
/// devices that forward.
pub fn enable_forwarding(interface: &str) -> std::io::Result<()> {
    for family in ["ipv4", "ipv6"] {
        let path = format!("/proc/sys/net/{family}/conf/{interface}/forwarding");
        std::fs::write(&path, "1")
            .map_err(|e| std::io::Error::new(e.kind(), format!("writing 1 to {path}: {e}")))?;
    }
    Ok(())
}

/// The `memlock:` line of a BPF map fd's fdinfo: the bytes the kernel charges for it.
fn fd_memlock(fd: std::os::fd::BorrowedFd<'_>) -> u64 {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Older kernels charge BPF maps to RLIMIT_MEMLOCK; newer ones to the cgroup. Raising it
/// is harmless either way.
fn raise_memlock_limit() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) };
}

/// Key and value sizes of every map as this build lays them out (per CPU for per-CPU maps).
fn map_layouts() -> [(&'static str, usize, usize); ALL_MAPS.len()] {
    use lb_common::types::{FlowCacheV4, FlowCacheV6, NextHop};
    [
        (names::CONFIG, 4, size_of::<GlobalConfig>()),
        (names::CONFIG_INDEX, 4, 4),
        (names::VIP_ADDRS_V4, 4, size_of::<VipAddr>()),
        (names::VIP_ADDRS_V6, 16, size_of::<VipAddr>()),
        (names::VIPS, size_of::<VipKey>(), 4),
        (names::VIP_STATE, 4, size_of::<VipState>()),
        (names::TABLES, 4, 4),
        (names::BACKENDS, 4, size_of::<Backend>()),
        (names::CONNTRACK, 4, size_of::<ConntrackBucket>()),
        (names::FLOW_CACHE_V4, 4, size_of::<FlowCacheV4>()),
        (names::FLOW_CACHE_V6, 4, size_of::<FlowCacheV6>()),
        (names::NEXT_HOPS, 4, size_of::<NextHop>()),
        (names::STATS, 4, 8),
        (names::VIP_STATS, 4, size_of::<TrafficCounters>()),
        (names::BACKEND_STATS, 4, size_of::<TrafficCounters>()),
        (names::PREV_TABLES, 4, 4),
        (names::VIP_CHAINED, 4, size_of::<TrafficCounters>()),
        (names::BACKEND_CHAINED, 4, size_of::<TrafficCounters>()),
        (names::DECAP_CONFIG, 4, size_of::<DecapConfig>()),
        (names::DECAP_STATS, 4, 8),
        (names::ICMP_RATE, 4, size_of::<IcmpRate>()),
        (
            names::FRAGMENTS,
            size_of::<lb_common::types::FragmentKey>(),
            size_of::<lb_common::types::FragmentPorts>(),
        ),
        (names::NEXT_PROGRAMS, 4, 4),
        (names::NEXT_SLOTS, 4, 4),
        (names::TUNNEL, 4, size_of::<TunnelConfig>()),
        (names::FULL_PATH, 4, 4),
    ]
}

/// Refuses maps pinned under `dir` by a build that laid them out differently: the
/// program would otherwise fail verification with no word about why.
fn check_pinned_layouts(dir: &Path) -> Result<()> {
    // The kernel LRU connection tables of builds before the table of our own: adopting
    // around them would leave them pinned (54 MiB) and every flow without its entry.
    for name in ["CONNTRACK_V4", "CONNTRACK_V6"] {
        let path = dir.join(name);
        if let Ok(map) = MapData::from_pin(&path) {
            let info = map.info().map_err(map_err(name))?;
            return Err(DataplaneError::PinnedLayout {
                name,
                have: (info.key_size(), info.value_size()),
                want: (4, size_of::<ConntrackBucket>() as u32),
                dir: dir.to_owned(),
            });
        }
    }
    for (name, key, value) in map_layouts() {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let map = MapData::from_pin(&path).map_err(map_err(name))?;
        let info = map.info().map_err(map_err(name))?;
        let have = (info.key_size(), info.value_size());
        let want = (key as u32, value as u32);
        if have != want {
            return Err(DataplaneError::PinnedLayout {
                name,
                have,
                want,
                dir: dir.to_owned(),
            });
        }
    }
    Ok(())
}

/// `STATS` grows when a build adds counters. A smaller one pinned under `dir` by an older
/// build is unpinned, not adopted: the new program would count nothing past its end, and
/// every scrape would fail reading there. Its counts restart from zero (a counter reset,
/// which Prometheus handles); the connection table and every flow stay.
fn replace_outgrown_stats(dir: &Path) -> Result<()> {
    // `ICMP_RATE` likewise grows with the kinds of ICMP message the program sends; its
    // budgets are written again by every reconcile.
    for (name, entries) in [
        (names::STATS, Counter::COUNT),
        (names::ICMP_RATE, icmp_rate_slots::COUNT),
    ] {
        let path = dir.join(name);
        let Ok(map) = MapData::from_pin(&path) else {
            continue;
        };
        if map.info().map_err(map_err(name))?.max_entries() != entries {
            std::fs::remove_file(&path).map_err(|e| DataplaneError::Pin {
                path: path.clone(),
                error: e.to_string(),
            })?;
        }
    }
    Ok(())
}

/// A random non-zero 64-bit seed, from the kernel's generator.
fn random_seed() -> u64 {
    let mut bytes = [0u8; 8];
    loop {
        // SAFETY: a valid buffer of its length.
        let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
        let seed = u64::from_ne_bytes(bytes);
        if n == 8 && seed != 0 {
            return seed;
        }
    }
}

/// Returns once every XDP program run that started before the call has ended:
/// `membarrier(MEMBARRIER_CMD_GLOBAL)` is `synchronize_rcu()`, and XDP runs inside an RCU
/// read-side section. Then a retired `CONFIG` slot has no reader left.
fn wait_for_running_programs() -> std::io::Result<()> {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: plain syscall, no pointers.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc == 0 {
        return Ok(());
    }
    // Refused on nohz_full kernels: no program run lasts anywhere near this long.
    std::thread::sleep(std::time::Duration::from_millis(50));
    Ok(())
}

/// The cache epoch after `epoch`; 0 is skipped, it marks an empty flow-cache slot.
fn next_epoch(epoch: u32) -> u32 {
    epoch.wrapping_add(1).max(1)
}
