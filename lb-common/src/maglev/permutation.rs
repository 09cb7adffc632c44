//! Each backend's permutation of the slots: `offset` and `skip` from two hashes of its
//! stable key (Maglev §3.4). The hash is fixed here, byte order included: changing it
//! changes every table, and load balancers running different builds would then disagree
//! about where flows go. `tests/maglev_properties.rs` pins it with table digests.

/// Stream constants that make the offset hash and the skip hash independent functions.
const OFFSET_STREAM: u64 = 0x6a09_e667_f3bc_c908;
const SKIP_STREAM: u64 = 0xbb67_ae85_84ca_a73b;
/// 2^64 / golden ratio: spreads the 32-bit seed over 64 bits.
const SEED_SPREAD: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's output function (Stafford's Mix13): a bijection on `u64` with full avalanche.
const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 64-bit hash of a backend key: the key is read as two little-endian `u64` words and
/// absorbed one word per `mix64` round into a state started from the seed and a stream
/// constant. Fixed forever; identical on every host and build.
pub(super) const fn key_hash(key: &[u8; 16], seed: u32, stream: u64) -> u64 {
    let [
        a0,
        a1,
        a2,
        a3,
        a4,
        a5,
        a6,
        a7,
        b0,
        b1,
        b2,
        b3,
        b4,
        b5,
        b6,
        b7,
    ] = *key;
    let lo = u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]);
    let hi = u64::from_le_bytes([b0, b1, b2, b3, b4, b5, b6, b7]);
    let h = mix64((seed as u64).wrapping_mul(SEED_SPREAD) ^ stream);
    let h = mix64(h ^ lo);
    mix64(h ^ hi)
}

/// `(offset, skip)` of the permutation `slot_j = (offset + j * skip) mod m`, with
/// `offset in 0..m` and `skip in 1..m` (or 1 when `m <= 2`).
///
/// For prime `m` every such skip visits every slot. For other `m` (not a valid table size,
/// but [`build`](super::build) must terminate anyway) `skip` is moved up to the next value
/// coprime with `m`, so the permutation still visits every slot.
pub(super) fn offset_skip(key: &[u8; 16], seed: u32, m: u32, m_is_prime: bool) -> (u32, u32) {
    debug_assert!(m >= 1);
    let m64 = u64::from(m);
    let offset = (key_hash(key, seed, OFFSET_STREAM) % m64) as u32;
    if m <= 2 {
        return (offset, 1);
    }
    let mut skip = (key_hash(key, seed, SKIP_STREAM) % (m64 - 1) + 1) as u32;
    if !m_is_prime {
        while gcd(skip, m) != 1 {
            skip = if skip + 1 == m { 1 } else { skip + 1 };
        }
    }
    (offset, skip)
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maglev::is_prime;

    #[test]
    fn key_hash_is_pinned() {
        // Changing these values changes every table on every host: don't, or bump a
        // documented algorithm version together with the digests in the property tests.
        assert_eq!(key_hash(&[0; 16], 0, OFFSET_STREAM), KEY_HASH_ZERO_OFFSET);
        assert_eq!(key_hash(&[0; 16], 0, SKIP_STREAM), KEY_HASH_ZERO_SKIP);
        let key: [u8; 16] = core::array::from_fn(|i| i as u8);
        assert_eq!(key_hash(&key, 7, OFFSET_STREAM), KEY_HASH_SEQ_SEED7);
    }

    #[test]
    fn a_composite_size_moves_skip_up_to_the_next_coprime_value() {
        // Not a valid table size (validation refuses it), but `build` must still fill the
        // table: the skip the hash gives is moved up to the next value coprime with `m`.
        let coprime =
            |s: u32, m: u32| (2..=s).all(|d| !s.is_multiple_of(d) || !m.is_multiple_of(d));
        for m in [4u32, 6, 12, 256, 1000] {
            for k in 0..50u8 {
                let key = [k; 16];
                let raw = (key_hash(&key, 3, SKIP_STREAM) % u64::from(m - 1) + 1) as u32;
                let want = (raw..m).find(|&s| coprime(s, m)).expect("m - 1 is coprime");
                assert_eq!(offset_skip(&key, 3, m, false).1, want, "m={m} raw={raw}");
            }
        }
        assert_eq!((gcd(12, 18), gcd(7, 12), gcd(5, 0)), (6, 1, 5));
    }

    // Computed by an independent Python implementation of the same definition.
    const KEY_HASH_ZERO_OFFSET: u64 = 0x3f49_3ec4_acf1_c698;
    const KEY_HASH_ZERO_SKIP: u64 = 0x82e9_7814_38e8_7bfd;
    const KEY_HASH_SEQ_SEED7: u64 = 0x2e96_852e_4738_f303;

    #[test]
    fn permutation_visits_every_slot_for_prime_and_composite_sizes() {
        for m in [1u32, 2, 3, 4, 6, 12, 251, 256, 1000, 1021] {
            for k in 0..20u8 {
                let key = [k; 16];
                let (offset, skip) = offset_skip(&key, 3, m, is_prime(m));
                assert!(
                    offset < m && (1..m.max(2)).contains(&skip),
                    "m={m} {offset} {skip}"
                );
                let mut seen = vec![false; m as usize];
                let mut pos = offset;
                for _ in 0..m {
                    seen[pos as usize] = true;
                    pos = ((u64::from(pos) + u64::from(skip)) % u64::from(m)) as u32;
                }
                assert!(seen.iter().all(|&s| s), "m={m} skip={skip}");
            }
        }
    }
}
