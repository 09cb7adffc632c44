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

    const KNOWN_V4_0: u32 = 3_387_779_994;
    const KNOWN_V4_1: u32 = 3_346_875_151;
    const KNOWN_V6_42: u32 = 920_100_098;
}
