//! Capacities, flag bits, counter indices and map names: one definition for the kernel
//! program, the daemon and the tests.

/// Backend id 0 is never assigned: a MaglevTable slot holding it means "no backend".
pub const EMPTY_BACKEND: u32 = 0;

/// Logical slot 0 of every MaglevTable inner map holds the table size `M`; slots `1..=M`
/// hold Backend ids. Keeping `M` inside the table makes a table swap (size included) atomic.
/// Two logical slots share one 8-byte array entry: slot `s` is `entry[s / 2][s % 2]`.
pub const TABLE_SLOTS_PER_ENTRY: u32 = 2;

/// Number of inner-array entries for a MaglevTable of `m` slots (header included).
pub const fn table_entries(m: u32) -> u32 {
    (m + 1).div_ceil(TABLE_SLOTS_PER_ENTRY)
}

/// Default MaglevTable size (prime), as in the Maglev paper.
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;

/// Compile-time placeholders for map sizes; the daemon sets the real sizes at load time
/// from its config, so memory grows with what is configured.
pub const DEFAULT_MAX_VIPS: u32 = 256;
pub const DEFAULT_MAX_BACKENDS: u32 = 4096;
/// Connection-table ways, both families together: 131,072 buckets of 7 ways, 8 MiB.
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 917_504;
/// Seconds without a packet after which a connection-table entry may be reused.
pub const DEFAULT_CONNTRACK_IDLE: u32 = 60;
/// Per-CPU flow-cache slots (each family): 16 KiB + 26 KiB per CPU, small enough to stay
/// in the CPU's L2. Decided by A/B in one `bench xdp` run (Intel Xeon, ns above empty,
/// 32,768 / 256 slots / none): established IPIP 36.5 / 33.4 / 51, IPv6 40.5 / 36.0 / 58,
/// 100,000 flows 310 / 225 / 231. A large cache adds a cache miss to every flow it
/// misses; with none, a hot flow reads three more maps.
pub const DEFAULT_FLOW_CACHE_ENTRIES: u32 = 256;

/// The Vip address pre-filter: a bitmap of this many 64-bit words (4096 bits), one bit
/// per Vip address hash. Non-Vip traffic pays one inlined array read instead of a hash
/// lookup; a false positive only costs the exact lookups behind it.
pub const VIP_FILTER_WORDS: usize = 64;

/// `CONFIG` is a ring of this many `GlobalConfig` slots; `CONFIG_INDEX` names the live one.
/// The daemon writes a slot no packet reads, then moves the index: a packet reads the index
/// once and sees one whole config, old or new. A slot is rewritten only after an RCU grace
/// period since it was last live (the daemon waits for one every `CONFIG_SLOTS - 1` writes).
pub const CONFIG_SLOTS: u32 = 64;
// A power of two (the program masks the index), at most 64 (the daemon tracks them in a u64).
const _: () = assert!(CONFIG_SLOTS.is_power_of_two() && CONFIG_SLOTS <= 64);

/// Per-CPU flow-cache slots for a configured `flow_cache_entries`: a power of two, at
/// least 1 (with 0 the map keeps one slot, unused), at most 2^20.
pub const fn flow_cache_slots(flow_cache_entries: u32) -> u32 {
    let mut n = 1;
    while n < flow_cache_entries && n < 1 << 20 {
        n *= 2;
    }
    n
}

/// `BPF_F_INNER_MAP`: lets inner MaglevTable arrays of different sizes share one outer map.
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// `BPF_F_MMAPABLE`: the daemon writes a new MaglevTable through mmap, not 65k syscalls.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// `BPF_F_NO_COMMON_LRU`: per-CPU LRU lists (the benchmark's kernel LRU baseline).
pub const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

/// Address families as stored in keys.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// IP protocol numbers.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_IPIP: u8 = 4;
pub const PROTO_IPV6: u8 = 41;

/// Entries of the `FRAGMENTS` LRU map: datagrams whose later fragments are awaited, as
/// Cilium sizes its own (8192); an entry is 44 bytes.
pub const FRAGMENT_ENTRIES: u32 = 8192;

/// `NEXT_PROGRAMS` slots: slot 0 is `lb_next` (while some interface has a next program;
/// the program itself when every interface has the same one), slots `1..` the
/// interfaces' next programs, so at most this many minus one interfaces can have one.
pub const NEXT_PROGRAM_SLOTS: u32 = 64;

/// Default `global.icmp_rate`: ICMP messages each CPU may send per second, per kind.
pub const DEFAULT_ICMP_RATE: u32 = 1000;

/// Slots of the per-CPU `ICMP_RATE` map: one reply budget per kind of ICMP message the
/// data plane sends.
pub mod icmp_rate_slots {
    /// Echo replies for Vip addresses.
    pub const ECHO: u32 = 0;
    /// "Fragmentation needed" / "packet too big" to clients (`too_big.rs`).
    pub const TOO_BIG: u32 = 1;
    /// Number of slots.
    pub const COUNT: u32 = 2;
}

/// `VipState::flags` bits.
pub mod vip_flags {
    /// The Vip exists (a zeroed array slot does not).
    pub const ACTIVE: u32 = 1 << 0;
    /// IPv6 Vip (else IPv4).
    pub const IPV6: u32 = 1 << 1;
    /// Forward by rewriting the destination MAC (L2 DSR) instead of IPIP encapsulation.
    pub const L2_DSR: u32 = 1 << 2;
    /// With no usable backend, pass packets to the local stack instead of dropping them.
    pub const PASS_WHEN_EMPTY: u32 = 1 << 3;
    /// A new flow's MaglevTable slot comes from its source address alone
    /// (`hash::HashMode::SourceAddress`): a client sticks to one backend across ports.
    pub const HASH_SOURCE: u32 = 1 << 4;
    /// A new flow's slot comes from its destination port alone (Katran's
    /// `F_HASH_DPORT_ONLY`; `hash::HashMode::DestinationPort`).
    pub const HASH_DPORT: u32 = 1 << 5;
    /// Fragments are tracked (`fragments: track`): the first one's ports are remembered
    /// by (source, destination, IP id, protocol), and later ones follow it.
    pub const FRAGMENTS_TRACK: u32 = 1 << 6;
    /// Forward in UDP (`forwarding: gue`): outer IP and UDP headers, the client's packet
    /// right after the UDP header (GUE variant 1, as the kernel's `fou` and Katran).
    pub const GUE: u32 = 1 << 7;
}

/// Default `global.gue_port`: the UDP destination port of GUE packets. Katran's and
/// GLB's examples use it, so backends set up for them (`ip fou add port 6080 …`) work as
/// they are; IANA assigns no port to GUE.
pub const DEFAULT_GUE_PORT: u16 = 6080;

/// Bytes each forwarding mode puts in front of the client's IP packet.
pub mod encap_overhead {
    pub const IPIP: u32 = 20;
    pub const IPV6: u32 = 40;
    /// Outer IPv4 and UDP.
    pub const GUE_V4: u32 = 28;
    /// Outer IPv6 and UDP.
    pub const GUE_V6: u32 = 48;
}

/// Bits the data plane adds to `Route::vip_flags` (never set in `VipState::flags`).
pub mod route_flags {
    /// The backend's address family is not the Vip's: IPv4-in-IPv6 (or, in L2 DSR, only
    /// the next hop's family differs). Such routes stay out of the flow cache, so the fast
    /// path never meets them.
    pub const MIXED_FAMILY: u32 = 1 << 31;
}

/// `Backend::flags` bits.
pub mod backend_flags {
    /// Receives new flows and keeps its existing ones.
    pub const UP: u32 = 1 << 0;
    /// IPv6 address (else IPv4).
    pub const IPV6: u32 = 1 << 1;
}

/// Declares a counter enum (`#[repr(u32)]`, indices in declaration order) with its
/// `COUNT`, `ALL` (index order) and `name()` (a stable snake_case label for metrics and
/// tests) from one list, so that a new counter cannot miss its name or its place.
macro_rules! counters {
    (
        $(#[$outer:meta])*
        pub enum $name:ident {
            $($(#[$meta:meta])* $variant:ident => $label:literal,)+
        }
    ) => {
        $(#[$outer])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $($(#[$meta])* $variant,)+
        }

        impl $name {
            pub const COUNT: u32 = [$($label),+].len() as u32;

            /// Every counter, in index order.
            pub const ALL: [$name; $name::COUNT as usize] = [$($name::$variant),+];

            /// Stable snake_case name, used in metrics labels and test output.
            pub const fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }
        }
    };
}

counters! {
    /// Index of each global per-CPU counter in the `STATS` map.
    pub enum Counter {
        /// Not IPv4/IPv6 (ARP, LLDP, QinQ, ...): passed.
        PassNotIp => "pass_not_ip",
        /// IP, but not for any Vip: passed.
        PassNotVip => "pass_not_vip",
        /// Truncated or inconsistent L2/L3 header, destination unknown: passed (the kernel drops it).
        PassMalformed => "pass_malformed",
        /// Packet for a Vip address that no Vip serves (ICMP echo, other protocol/port): passed.
        PassVipOther => "pass_vip_other",
        /// No usable backend and the Vip is set to pass: passed.
        PassNoBackend => "pass_no_backend",
        /// Truncated or inconsistent L4 header to a Vip: dropped.
        DropMalformed => "drop_malformed",
        /// IPv4 fragment or IPv6 fragment header to a Vip: dropped.
        DropFragment => "drop_fragment",
        /// IPv6 extension headers in front of L4 to a Vip: dropped.
        DropIpv6Ext => "drop_ipv6_ext",
        /// MaglevTable empty (no healthy backend): dropped.
        DropNoBackend => "drop_no_backend",
        /// `bpf_fib_lookup` found no route or no neighbour for the backend: dropped.
        DropFib => "drop_fib",
        /// Could not grow the packet for encapsulation: dropped.
        DropEncap => "drop_encap",
        /// Connection-table hit on an up backend.
        ConntrackHit => "conntrack_hit",
        /// Connection-table miss: backend chosen by the MaglevTable.
        ConntrackMiss => "conntrack_miss",
        /// Connection-table miss on a TCP packet without SYN (another load balancer's flow,
        /// or an evicted entry); still forwarded by the table.
        ConntrackMissNonSyn => "conntrack_miss_non_syn",
        /// Connection-table hit whose backend is down or gone: re-steered by the table.
        ConntrackResteer => "conntrack_resteer",
        /// No room in the connection table: both candidate buckets full of active flows (the
        /// new flow is forwarded by its table without an entry; no active flow is evicted).
        ConntrackInsertFail => "conntrack_insert_fail",
        /// ICMP "fragmentation needed" / ICMPv6 "packet too big" steered to a flow's backend.
        IcmpToBackend => "icmp_to_backend",
        /// Forwarded with XDP_TX.
        Tx => "tx",
        /// Forwarded with XDP_REDIRECT (backend behind another interface).
        Redirect => "redirect",
        /// Second chance: a non-SYN TCP packet that missed the connection table, whose slot
        /// names another Backend in the Vip's previous MaglevTable, sent to the current
        /// Backend with the previous one attached (a second IPIP header).
        SecondChance => "second_chance",
        /// ICMP / ICMPv6 echo request to a Vip address answered from XDP (XDP_TX).
        IcmpEchoReply => "icmp_echo_reply",
        /// Echo request to a Vip address over this CPU's reply budget: dropped.
        IcmpEchoLimited => "icmp_echo_limited",
        /// A fragment to a Vip with `fragments: track`, steered by its datagram's ports.
        FragmentTracked => "fragment_tracked",
        /// A later fragment whose first fragment was not seen (lost, reordered, or its entry
        /// evicted): dropped.
        DropFragmentUnknown => "drop_fragment_unknown",
        /// A packet that would not fit the interface's MTU once encapsulated, answered with
        /// ICMP "fragmentation needed" (IPv4 with DF) / ICMPv6 "packet too big" (XDP_TX).
        IcmpTooBig => "icmp_too_big",
        /// Too big, over this CPU's budget of those ICMP messages: dropped.
        IcmpTooBigLimited => "icmp_too_big_limited",
        /// Too big and not answered: IPv4 without DF (XDP cannot fragment) or an ICMP
        /// error itself (never answered with another): dropped.
        DropTooBig => "drop_too_big",
        // New counters go last: an index is a slot of the pinned `STATS`, kept across
        // upgrades.
        /// A new flow whose bucket and tag a live flow of the same Vip already held (a
        /// retransmitted SYN, a reused port, or two flows alike in 21 bits of hash): it
        /// follows that way's Backend rather than taking the way from the other flow.
        ConntrackShared => "conntrack_shared",
    }
}

counters! {
    /// Index of each counter of `lb_decap` (on backends) in its `DECAP_STATS` map.
    pub enum DecapCounter {
        /// Encapsulated by a load balancer, decapsulated and delivered.
        Delivered => "delivered",
        /// Chained (second chance) and delivered here: a SYN, or a local socket has the flow.
        ChainedLocal => "chained_local",
        /// Chained, and no local socket has the flow: sent on to the previous Backend.
        ChainedForwarded => "chained_forwarded",
        /// Chained, to be sent on, but the kernel had no neighbour entry for the previous
        /// Backend yet: handed to the kernel's forwarding (which resolves it).
        ChainedForwardedByKernel => "chained_forwarded_by_kernel",
        /// Encapsulated, from a source outside the load balancers' prefixes: dropped.
        DropSource => "drop_source",
        /// Chained, but the packet inside is not the TCP segment a load balancer chains
        /// (truncated, options, another protocol): dropped.
        DropMalformed => "drop_malformed",
    }
}

/// Prefixes of each family `lb_decap` accepts encapsulated packets from.
pub const DECAP_PREFIXES: usize = 8;

/// Map names, shared by `#[btf_map]` statics (via the static's identifier) and the loader.
pub mod map_names {
    pub const CONFIG: &str = "CONFIG";
    pub const CONFIG_INDEX: &str = "CONFIG_INDEX";
    pub const VIP_ADDRS_V4: &str = "VIP_ADDRS_V4";
    pub const VIP_ADDRS_V6: &str = "VIP_ADDRS_V6";
    pub const VIPS: &str = "VIPS";
    pub const VIP_STATE: &str = "VIP_STATE";
    pub const TABLES: &str = "TABLES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const FLOW_CACHE_V4: &str = "FLOW_CACHE_V4";
    pub const FLOW_CACHE_V6: &str = "FLOW_CACHE_V6";
    pub const NEXT_HOPS: &str = "NEXT_HOPS";
    pub const STATS: &str = "STATS";
    pub const VIP_STATS: &str = "VIP_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const PREV_TABLES: &str = "PREV_TABLES";
    pub const VIP_CHAINED: &str = "VIP_CHAINED";
    pub const BACKEND_CHAINED: &str = "BACKEND_CHAINED";
    pub const DECAP_CONFIG: &str = "DECAP_CONFIG";
    pub const DECAP_STATS: &str = "DECAP_STATS";
    pub const ICMP_RATE: &str = "ICMP_RATE";
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const NEXT_PROGRAMS: &str = "NEXT_PROGRAMS";
    pub const NEXT_SLOTS: &str = "NEXT_SLOTS";
    pub const TUNNEL: &str = "TUNNEL";
    pub const FULL_PATH: &str = "FULL_PATH";
}

/// Program names in the eBPF object.
pub mod prog_names {
    /// The load balancer.
    pub const LB_INGRESS: &str = "lb_ingress";
    /// Decapsulation for backends (IPIP / IPv6-in-IPv6), then XDP_PASS.
    pub const LB_DECAP: &str = "lb_decap";
    /// XDP_PASS only: needed on a veth peer for XDP_TX to work, and the benchmark baseline.
    pub const LB_PASS: &str = "lb_pass";
    /// Tail-called by `lb_ingress` for packets not for a Vip while some interface has a
    /// next program: tail-calls the packet's interface's one.
    pub const LB_NEXT: &str = "lb_next";
    /// Tail-called by `lb_ingress` for every packet its fast path leaves: the full path.
    pub const LB_FULL: &str = "lb_full";
    /// In the separate `lb-bench` object: one kernel LRU hash insert of a fresh key per
    /// call, what Katran and Cilium pay per new flow (a benchmark baseline).
    pub const LRU_INSERT: &str = "lru_insert";
    /// In the `lb-bench` object: one read of a random line of a table as large as the
    /// connection table, the memory floor of a new flow (a benchmark baseline).
    pub const RANDOM_LINE: &str = "random_line";
    /// In the `lb-bench` object, for tests: counts the packets it sees and returns the
    /// verdict it was loaded with (a next program chained after `lb_ingress`).
    pub const COUNT_NEXT: &str = "count_next";
}
