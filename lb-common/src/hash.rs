//! The flow hash. The kernel program and userspace (tests, `trace`, the simulator) call the
//! same functions on the same words, so a Flow's backend can be predicted exactly.
//!
//! Multiply-xorshift rounds over 64-bit words of the Flow as it sits in the packet
//! (network byte order, read as native integers): two 64-bit multiplies for an IPv4
//! Flow, five for IPv6. It is on every packet's path (flow cache slot, outer source
//! address), where MurmurHash3's 32-bit rounds cost about 15 ns more.

const K: u64 = 0x9E37_79B9_7F4A_7C15;

#[inline(always)]
const fn mix(h: u64, v: u64) -> u64 {
    let h = (h ^ v).wrapping_mul(K);
    h ^ (h >> 29)
}

#[inline(always)]
const fn finish(h: u64) -> u32 {
    let h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (h ^ (h >> 32)) as u32
}

#[inline(always)]
const fn pair(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

/// The port pair as one word: both ports in network byte order, source in the low half.
#[inline(always)]
pub const fn ports_word(sport_be: u16, dport_be: u16) -> u32 {
    (sport_be as u32) | ((dport_be as u32) << 16)
}

/// Hash of an IPv4 Flow. Addresses and ports in network byte order.
#[inline(always)]
pub const fn flow_hash_v4(src: u32, dst: u32, ports: u32, proto: u8, seed: u32) -> u32 {
    let h = mix(seed as u64 ^ K, pair(src, dst));
    finish(mix(h, pair(ports, proto as u32)))
}

/// Hash of an IPv6 Flow. Addresses and ports in network byte order.
#[inline(always)]
pub const fn flow_hash_v6(src: &[u32; 4], dst: &[u32; 4], ports: u32, proto: u8, seed: u32) -> u32 {
    let mut h = mix(seed as u64 ^ K, pair(src[0], src[1]));
    h = mix(h, pair(src[2], src[3]));
    h = mix(h, pair(dst[0], dst[1]));
    h = mix(h, pair(dst[2], dst[3]));
    finish(mix(h, pair(ports, proto as u32)))
}

/// What picks a new flow's MaglevTable slot, per Vip (its `vip_flags::HASH_*` bit). The
/// connection table, flow cache and outer source always use the whole 5-tuple: a mode
/// only decides which backend a flow the table has not seen goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HashMode {
    /// Source, destination, ports and protocol (the default).
    FiveTuple,
    /// The source address only: every connection of a client goes to one backend.
    SourceAddress,
    /// The destination port only: every flow to one port of an any-port Vip goes to
    /// one backend.
    DestinationPort,
}

impl HashMode {
    /// The mode a Vip's flags name (`HASH_SOURCE` wins should both be set).
    #[inline(always)]
    pub const fn of(vip_flags: u32) -> Self {
        if vip_flags & crate::consts::vip_flags::HASH_SOURCE != 0 {
            HashMode::SourceAddress
        } else if vip_flags & crate::consts::vip_flags::HASH_DPORT != 0 {
            HashMode::DestinationPort
        } else {
            HashMode::FiveTuple
        }
    }

    /// The `vip_flags` bit of the mode.
    pub const fn flag(self) -> u32 {
        match self {
            HashMode::FiveTuple => 0,
            HashMode::SourceAddress => crate::consts::vip_flags::HASH_SOURCE,
            HashMode::DestinationPort => crate::consts::vip_flags::HASH_DPORT,
        }
    }

    /// The config keyword: `5-tuple`, `source` or `dport`.
    pub const fn keyword(self) -> &'static str {
        match self {
            HashMode::FiveTuple => "5-tuple",
            HashMode::SourceAddress => "source",
            HashMode::DestinationPort => "dport",
        }
    }
}

/// Domain separators, so that a one-field hash never equals a 5-tuple one by construction.
const SOURCE_ONLY: u64 = 1;
const DPORT_ONLY: u64 = 2;

/// Slot hash of an IPv4 source address alone (`HashMode::SourceAddress`).
#[inline(always)]
pub const fn source_hash_v4(src: u32, seed: u32) -> u32 {
    finish(mix(seed as u64 ^ K ^ SOURCE_ONLY, src as u64))
}

/// Slot hash of an IPv6 source address alone.
#[inline(always)]
pub const fn source_hash_v6(src: &[u32; 4], seed: u32) -> u32 {
    let h = mix(seed as u64 ^ K ^ SOURCE_ONLY, pair(src[0], src[1]));
    finish(mix(h, pair(src[2], src[3])))
}

/// Slot hash of a destination port alone (network byte order), either family.
#[inline(always)]
pub const fn dport_hash(dport_be: u16, seed: u32) -> u32 {
    finish(mix(seed as u64 ^ K ^ DPORT_ONLY, dport_be as u64))
}

impl crate::types::FlowV4 {
    /// The hash that picks this flow's MaglevTable slot under `mode`; `five_tuple` is its
    /// `flow_hash_v4`, already computed for every packet.
    #[inline(always)]
    pub const fn table_hash(&self, mode: HashMode, seed: u32, five_tuple: u32) -> u32 {
        match mode {
            HashMode::FiveTuple => five_tuple,
            HashMode::SourceAddress => source_hash_v4(self.src, seed),
            HashMode::DestinationPort => dport_hash(self.dport, seed),
        }
    }
}

impl crate::types::FlowV6 {
    /// As `FlowV4::table_hash`.
    #[inline(always)]
    pub const fn table_hash(&self, mode: HashMode, seed: u32, five_tuple: u32) -> u32 {
        match mode {
            HashMode::FiveTuple => five_tuple,
            HashMode::SourceAddress => source_hash_v6(&self.src, seed),
            HashMode::DestinationPort => dport_hash(self.dport, seed),
        }
    }
}

/// The connection table's hash of an IPv4 Flow: the same rounds as `flow_hash_v4`, keyed
/// by the table's own secret 64-bit seed (not the fleet-wide `hash_seed`), all 64 bits
/// kept, so that no one outside can aim flows at one bucket. Not a cryptographic MAC: the
/// seed is random per table and never leaves the host.
#[inline(always)]
pub const fn conntrack_hash_v4(src: u32, dst: u32, ports: u32, proto: u8, key: u64) -> u64 {
    let h = mix(key ^ K, pair(src, dst));
    finish64(mix(h, pair(ports, proto as u32)) ^ key)
}

/// The connection table's hash of an IPv6 Flow.
#[inline(always)]
pub const fn conntrack_hash_v6(
    src: &[u32; 4],
    dst: &[u32; 4],
    ports: u32,
    proto: u8,
    key: u64,
) -> u64 {
    let mut h = mix(key ^ K, pair(src[0], src[1]));
    h = mix(h, pair(src[2], src[3]));
    h = mix(h, pair(dst[0], dst[1]));
    h = mix(h, pair(dst[2], dst[3]));
    finish64(mix(h, pair(ports, proto as u32)) ^ key)
}

#[inline(always)]
const fn finish64(h: u64) -> u64 {
    let h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let h = (h ^ (h >> 31)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 29)
}

/// The MaglevTable slot (0-based) of a flow hash in a table of `m` slots: the hash scaled
/// onto `0..m` by a multiply and a shift (Lemire's reduction) rather than `hash % m`: as
/// uniform for a 32-bit hash, and a 64-bit division costs the data plane ~15 ns.
#[inline(always)]
pub const fn table_slot(hash: u32, m: u32) -> u32 {
    ((hash as u64 * m as u64) >> 32) as u32
}

/// Bit of an IPv4 Vip address in the pre-filter bitmap (Fibonacci hashing to 12 bits).
#[inline(always)]
pub const fn vip_filter_bit_v4(addr: u32) -> u32 {
    addr.wrapping_mul(0x9E37_79B1) >> 20
}

/// Bit of an IPv6 Vip address in the pre-filter bitmap.
#[inline(always)]
pub const fn vip_filter_bit_v6(addr: &[u32; 4]) -> u32 {
    vip_filter_bit_v4(
        addr[0] ^ addr[1].rotate_left(8) ^ addr[2].rotate_left(16) ^ addr[3].rotate_left(24),
    )
}

#[cfg(feature = "user")]
mod user {
    use std::net::IpAddr;

    use super::*;
    use crate::types::{FlowV4, FlowV6};

    /// A Flow as userspace writes it: host-order ports, std addresses.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Flow {
        pub src: IpAddr,
        pub dst: IpAddr,
        pub sport: u16,
        pub dport: u16,
        pub proto: u8,
    }

    /// Words of an address as the kernel reads them from the packet.
    pub fn addr_words(addr: IpAddr) -> [u32; 4] {
        match addr {
            IpAddr::V4(a) => [u32::from_ne_bytes(a.octets()), 0, 0, 0],
            IpAddr::V6(a) => {
                let o = a.octets();
                core::array::from_fn(|i| {
                    u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
                })
            }
        }
    }

    /// The pre-filter bit of a Vip address.
    pub fn vip_filter_bit(addr: IpAddr) -> u32 {
        match addr {
            IpAddr::V4(_) => vip_filter_bit_v4(addr_words(addr)[0]),
            IpAddr::V6(_) => vip_filter_bit_v6(&addr_words(addr)),
        }
    }

    impl Flow {
        /// The connection-table hash the kernel computes for this Flow under table seed `key`.
        pub fn conntrack_hash(&self, key: u64) -> u64 {
            let ports = ports_word(self.sport.to_be(), self.dport.to_be());
            match (self.src, self.dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => conntrack_hash_v4(
                    u32::from_ne_bytes(s.octets()),
                    u32::from_ne_bytes(d.octets()),
                    ports,
                    self.proto,
                    key,
                ),
                (s, d) => conntrack_hash_v6(&addr_words(s), &addr_words(d), ports, self.proto, key),
            }
        }

        /// The hash that picks this Flow's MaglevTable slot under `mode`: the kernel's own
        /// function on the kernel's own Flow (mixed families as v6, as `hash`).
        pub fn table_hash(&self, mode: HashMode, seed: u32) -> u32 {
            let five_tuple = self.hash(seed);
            let (sport, dport) = (self.sport.to_be(), self.dport.to_be());
            let (src, dst) = (addr_words(self.src), addr_words(self.dst));
            match (self.src, self.dst) {
                (IpAddr::V4(_), IpAddr::V4(_)) => FlowV4 {
                    src: src[0],
                    dst: dst[0],
                    sport,
                    dport,
                    proto: self.proto,
                    ..FlowV4::default()
                }
                .table_hash(mode, seed, five_tuple),
                _ => FlowV6 {
                    src,
                    dst,
                    sport,
                    dport,
                    proto: self.proto,
                    ..FlowV6::default()
                }
                .table_hash(mode, seed, five_tuple),
            }
        }

        /// The hash the kernel computes for this Flow's packets. Mixed families hash as v6.
        pub fn hash(&self, seed: u32) -> u32 {
            let ports = ports_word(self.sport.to_be(), self.dport.to_be());
            match (self.src, self.dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => flow_hash_v4(
                    u32::from_ne_bytes(s.octets()),
                    u32::from_ne_bytes(d.octets()),
                    ports,
                    self.proto,
                    seed,
                ),
                (s, d) => flow_hash_v6(&addr_words(s), &addr_words(d), ports, self.proto, seed),
            }
        }
    }
}

#[cfg(feature = "user")]
pub use user::{Flow, addr_words, vip_filter_bit};

#[cfg(all(test, feature = "user"))]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_every_field_and_seed() {
        let base = Flow {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            sport: 1000,
            dport: 80,
            proto: 6,
        };
        let h = base.hash(7);
        assert_ne!(h, base.hash(8), "seed");
        assert_ne!(
            h,
            Flow {
                src: "10.0.0.3".parse().unwrap(),
                ..base
            }
            .hash(7),
            "src"
        );
        assert_ne!(
            h,
            Flow {
                dst: "10.0.0.3".parse().unwrap(),
                ..base
            }
            .hash(7),
            "dst"
        );
        assert_ne!(
            h,
            Flow {
                sport: 1001,
                ..base
            }
            .hash(7),
            "sport"
        );
        assert_ne!(h, Flow { dport: 81, ..base }.hash(7), "dport");
        assert_ne!(h, Flow { proto: 17, ..base }.hash(7), "proto");
        // Swapping ports must not collide (the word keeps them apart).
        assert_ne!(
            h,
            Flow {
                sport: 80,
                dport: 1000,
                ..base
            }
            .hash(7),
            "port order"
        );
    }

    #[test]
    fn hash_spreads_sequential_ports_evenly() {
        // 60k flows that differ only in source port, over 13 buckets: each within 5% of mean.
        let m = 13u32;
        let mut buckets = [0u32; 13];
        for sport in 0..60_000u16 {
            let f = Flow {
                src: "192.0.2.1".parse().unwrap(),
                dst: "198.51.100.1".parse().unwrap(),
                sport,
                dport: 443,
                proto: 6,
            };
            buckets[(f.hash(0) % m) as usize] += 1;
        }
        let mean = 60_000.0 / m as f64;
        for b in buckets {
            assert!((b as f64 - mean).abs() / mean < 0.05, "{buckets:?}");
        }
    }

    #[test]
    fn known_vectors_stay_fixed() {
        // Cross-host agreement: if this changes, every fleet re-shuffles its flows.
        let f = Flow {
            src: "10.1.2.3".parse().unwrap(),
            dst: "10.9.8.7".parse().unwrap(),
            sport: 40000,
            dport: 80,
            proto: 6,
        };
        let g = Flow {
            src: "2001:db8::1".parse().unwrap(),
            dst: "2001:db8::2".parse().unwrap(),
            sport: 5353,
            dport: 53,
            proto: 17,
        };
        assert_eq!((f.hash(0), f.hash(0xdead_beef)), (KNOWN_V4_0, KNOWN_V4_1));
        assert_eq!(g.hash(42), KNOWN_V6_42);
    }

    #[test]
    fn known_v6_vectors_with_seeds_that_share_bits_with_the_constant() {
        // Seed 42 shares no bit with K's low bits, so `seed ^ K` and `seed | K` agree on it;
        // these seeds tell them apart.
        let g = Flow {
            src: "2001:db8::1".parse().unwrap(),
            dst: "2001:db8::2".parse().unwrap(),
            sport: 5353,
            dport: 53,
            proto: 17,
        };
        assert_eq!(
            (g.hash(0), g.hash(0xdead_beef)),
            (513_018_050, 2_566_861_098)
        );
    }

    #[test]
    fn vip_filter_bits_stay_fixed_and_spread() {
        // The kernel reads the bitmap userspace writes: both use these functions, and a
        // filter that maps many addresses to few bits passes nothing by and costs the exact
        // lookups on every packet.
        let bits: Vec<u32> = ["10.200.0.1", "192.0.2.77", "2001:db8::1", "fd00:200::1"]
            .iter()
            .map(|a| vip_filter_bit(a.parse().unwrap()))
            .collect();
        assert_eq!(bits, [867, 3487, 3755, 3230]);
        // Every word of an IPv6 address counts (the ones above have zero middle words).
        let full = vip_filter_bit("2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff".parse().unwrap());
        assert_eq!(full, 2813);
        for v6 in [false, true] {
            let distinct: std::collections::HashSet<u32> = (0..2000u32)
                .map(|i| {
                    let addr: std::net::IpAddr = if v6 {
                        std::net::Ipv6Addr::new(
                            0xfd00,
                            0x200,
                            0,
                            0,
                            0,
                            0,
                            (i >> 8) as u16,
                            i as u16,
                        )
                        .into()
                    } else {
                        std::net::Ipv4Addr::from(0x0ac8_0000 + i).into()
                    };
                    vip_filter_bit(addr)
                })
                .collect();
            // 2000 random draws from 4096 bits give ~1580 distinct ones.
            assert!(
                distinct.len() > 1400,
                "v6 {v6}: {} distinct bits",
                distinct.len()
            );
            assert!(distinct.iter().all(|&b| b < 4096));
        }
    }

    fn client_flow(src: &str, sport: u16, dst: &str, dport: u16) -> Flow {
        Flow {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport,
            dport,
            proto: 6,
        }
    }

    #[test]
    fn source_mode_keeps_a_client_on_one_hash_and_spreads_clients() {
        for (a, b, vip) in [
            ("192.0.2.1", "192.0.2.2", "198.51.100.1"),
            ("2001:db8::1", "2001:db8::2", "2001:db8:100::1"),
        ] {
            let mode = HashMode::SourceAddress;
            let h = client_flow(a, 1000, vip, 80).table_hash(mode, 7);
            // Any port, either way round: the same hash.
            for (sport, dport) in [(1001, 80), (40000, 443), (5, 0)] {
                assert_eq!(client_flow(a, sport, vip, dport).table_hash(mode, 7), h);
            }
            assert_ne!(client_flow(b, 1000, vip, 80).table_hash(mode, 7), h);
            assert_ne!(client_flow(a, 1000, vip, 80).table_hash(mode, 8), h, "seed");
            assert_ne!(client_flow(a, 1000, vip, 80).hash(7), h, "not the 5-tuple");
        }
        // 13 backends' worth of slots, 26,000 clients: each within 5% of the mean.
        let mut buckets = [0u32; 13];
        for i in 0..26_000u32 {
            let src = std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string();
            let h = client_flow(&src, 1, "198.51.100.1", 80).table_hash(HashMode::SourceAddress, 0);
            buckets[table_slot(h, 13) as usize] += 1;
        }
        for b in buckets {
            assert!((b as f64 - 2000.0).abs() / 2000.0 < 0.05, "{buckets:?}");
        }
    }

    #[test]
    fn dport_mode_hashes_the_destination_port_alone() {
        let mode = HashMode::DestinationPort;
        let h = client_flow("192.0.2.1", 1000, "198.51.100.1", 443).table_hash(mode, 7);
        assert_eq!(
            client_flow("203.0.113.9", 2, "198.51.100.1", 443).table_hash(mode, 7),
            h
        );
        // The same port in IPv6 picks the same slot: only the port counts.
        assert_eq!(
            client_flow("2001:db8::1", 3, "2001:db8:100::1", 443).table_hash(mode, 7),
            h
        );
        assert_ne!(
            client_flow("192.0.2.1", 1000, "198.51.100.1", 444).table_hash(mode, 7),
            h
        );
        let distinct: std::collections::HashSet<u32> = (0..1000u16)
            .map(|p| {
                table_slot(
                    client_flow("192.0.2.1", 1, "198.51.100.1", p).table_hash(mode, 0),
                    3,
                )
            })
            .collect();
        assert_eq!(distinct.len(), 3, "ports spread over every backend");
    }

    #[test]
    fn hash_modes_round_trip_through_vip_flags() {
        for mode in [
            HashMode::FiveTuple,
            HashMode::SourceAddress,
            HashMode::DestinationPort,
        ] {
            assert_eq!(
                HashMode::of(mode.flag() | crate::consts::vip_flags::ACTIVE),
                mode
            );
        }
        // The five-tuple mode's table hash is the flow hash itself.
        let f = client_flow("10.1.2.3", 40000, "10.9.8.7", 80);
        assert_eq!(f.table_hash(HashMode::FiveTuple, 5), f.hash(5));
        // Pinned: every box of a fleet must pick the same slots.
        assert_eq!(
            (
                f.table_hash(HashMode::SourceAddress, 0),
                f.table_hash(HashMode::DestinationPort, 0)
            ),
            (KNOWN_SOURCE_0, KNOWN_DPORT_0)
        );
    }

    #[test]
    fn one_field_and_connection_table_hashes_stay_fixed() {
        // Seeds and keys that share bits with the constants they are mixed with, so that
        // `^` and `|` disagree. The one-field hashes must agree across a fleet's builds
        // (as the flow hash); the connection table's across an upgrade that keeps the
        // pinned table, or every entry is lost.
        let f = client_flow("10.1.2.3", 40000, "10.9.8.7", 80);
        let g = client_flow("2001:db8::1", 5353, "2001:db8::2", 53);
        let modes = |flow: &Flow, seed| {
            (
                flow.table_hash(HashMode::SourceAddress, seed),
                flow.table_hash(HashMode::DestinationPort, seed),
            )
        };
        let got = [
            modes(&f, 0xdead_beef),
            modes(&f, u32::MAX),
            modes(&g, 0xdead_beef),
            modes(&g, u32::MAX),
            modes(&g, 0),
        ];
        assert_eq!(got, KNOWN_MODES);
        let keys = [0x5eed_c0ff_ee00_1234, u64::MAX];
        let got = keys.map(|k| (f.conntrack_hash(k), g.conntrack_hash(k)));
        assert_eq!(got, KNOWN_CONNTRACK);
        assert_eq!(
            [
                HashMode::FiveTuple.keyword(),
                HashMode::SourceAddress.keyword(),
                HashMode::DestinationPort.keyword()
            ],
            ["5-tuple", "source", "dport"],
            "the config's words"
        );
    }

    const KNOWN_MODES: [(u32, u32); 5] = [
        (1644414815, 1061975086),
        (2817116721, 2295132091),
        (2404969393, 727976684),
        (1059963599, 1302634715),
        (1192561312, 2296187967),
    ];
    const KNOWN_CONNTRACK: [(u64, u64); 2] = [
        (4887310144621212683, 13318899554788811975),
        (9136678045348699516, 2546805123783563241),
    ];
    const KNOWN_SOURCE_0: u32 = 75_322_443;
    const KNOWN_DPORT_0: u32 = 3_148_850_587;
    const KNOWN_V4_0: u32 = 3_387_779_994;
    const KNOWN_V4_1: u32 = 3_346_875_151;
    const KNOWN_V6_42: u32 = 920_100_098;
}
