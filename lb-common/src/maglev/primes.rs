//! Table sizes: primality, validation of a configured size, and the automatic size.

use std::fmt;

use crate::consts::DEFAULT_TABLE_SIZE;

/// Smallest table size [`check_table_size`] accepts. Smaller tables still build, but they
/// cannot express weights finer than 1/251 and leave little room for a pool to grow.
pub const MIN_TABLE_SIZE: u32 = 251;

/// Largest table size [`check_table_size`] accepts and [`build`](super::build) supports:
/// the largest prime below 2^24 (64 MiB of slots). The builder's `u32` position arithmetic
/// needs `2 * M < 2^32`; this cap also keeps one table's memory sane.
pub const MAX_TABLE_SIZE: u32 = 16_777_213;

/// Slots per backend that [`auto_table_size`] aims for: with `M >= 100 * N` every backend's
/// share is within 1% of its weight share (Maglev §3.4, §5.3).
pub const AUTO_SLOTS_PER_BACKEND: u64 = 100;

/// The sizes [`auto_table_size`] chooses from, ascending, all prime.
///
/// The list starts at [`DEFAULT_TABLE_SIZE`] (65537, the Maglev paper's and Katran's
/// default) rather than at a small prime because changing `M` remaps every flow the table
/// steers (`hash % M` changes), so an automatic size must change rarely: with this floor it
/// changes only when a pool grows past 655 backends. A 65537-slot table costs 256 KiB per
/// Vip and resolves weights to 1/65537. Above 65537 the list holds the paper's 655373 and
/// the largest prime below each power of two up to [`MAX_TABLE_SIZE`].
pub const AUTO_TABLE_SIZES: &[u32] = &[
    DEFAULT_TABLE_SIZE, // 2^16 + 1
    131_071,            // 2^17 - 1
    262_139,            // 2^18 - 5
    524_287,            // 2^19 - 1
    655_373,            // the Maglev paper's large table
    1_048_573,          // 2^20 - 3
    2_097_143,          // 2^21 - 9
    4_194_301,          // 2^22 - 3
    8_388_593,          // 2^23 - 15
    MAX_TABLE_SIZE,     // 2^24 - 3
];

/// The table size for a pool of `backends` backends: the smallest size in
/// [`AUTO_TABLE_SIZES`] with at least [`AUTO_SLOTS_PER_BACKEND`] slots per backend, so never
/// below 65537. Pools of more than 167,772 backends get [`MAX_TABLE_SIZE`], which is then
/// fewer than 100 slots per backend: balance degrades gradually past that point (the
/// daemon's backend capacity is far below it).
///
/// Count every configured backend, draining or down ones included, so that the size, and
/// with it every flow's slot, does not change when health changes.
pub fn auto_table_size(backends: usize) -> u32 {
    let wanted = (backends as u64).saturating_mul(AUTO_SLOTS_PER_BACKEND);
    AUTO_TABLE_SIZES
        .iter()
        .copied()
        .find(|&m| u64::from(m) >= wanted)
        .unwrap_or(MAX_TABLE_SIZE)
}

/// Why a configured table size is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableSizeError {
    /// Below [`MIN_TABLE_SIZE`].
    TooSmall { size: u32 },
    /// Above [`MAX_TABLE_SIZE`].
    TooLarge { size: u32 },
    /// Not prime: some backends' permutations would not visit every slot.
    NotPrime { size: u32, below: u32, above: u32 },
    /// Fewer slots than backends: some backends could get no slot at all.
    FewerSlotsThanBackends { size: u32, backends: usize },
}

impl fmt::Display for TableSizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::TooSmall { size } => {
                write!(
                    f,
                    "table size {size} is too small; the minimum is {MIN_TABLE_SIZE}"
                )
            }
            Self::TooLarge { size } => {
                write!(
                    f,
                    "table size {size} is too large; the maximum is {MAX_TABLE_SIZE}"
                )
            }
            Self::NotPrime { size, below, above } => write!(
                f,
                "table size {size} is not prime; nearest primes are {below} and {above}"
            ),
            Self::FewerSlotsThanBackends { size, backends } => write!(
                f,
                "table size {size} is smaller than the number of backends ({backends}); \
                 use a prime of at least 100 slots per backend (auto size: {})",
                auto_table_size(backends)
            ),
        }
    }
}

impl std::error::Error for TableSizeError {}

/// Checks a configured table size `m` for a pool of `backends` backends (count every
/// configured backend, so that validity does not depend on health): prime, within
/// [`MIN_TABLE_SIZE`]..=[`MAX_TABLE_SIZE`], and at least one slot per backend. Sizes with
/// fewer than 100 slots per backend pass but balance worse than 1%.
pub fn check_table_size(m: u32, backends: usize) -> Result<(), TableSizeError> {
    if m < MIN_TABLE_SIZE {
        return Err(TableSizeError::TooSmall { size: m });
    }
    if m > MAX_TABLE_SIZE {
        return Err(TableSizeError::TooLarge { size: m });
    }
    if !is_prime(m) {
        // Both exist: MIN_TABLE_SIZE and MAX_TABLE_SIZE are prime and m lies between them.
        let below = (MIN_TABLE_SIZE..m)
            .rev()
            .find(|&p| is_prime(p))
            .unwrap_or(MIN_TABLE_SIZE);
        let above = (m..=MAX_TABLE_SIZE)
            .find(|&p| is_prime(p))
            .unwrap_or(MAX_TABLE_SIZE);
        return Err(TableSizeError::NotPrime {
            size: m,
            below,
            above,
        });
    }
    if backends > m as usize {
        return Err(TableSizeError::FewerSlotsThanBackends { size: m, backends });
    }
    Ok(())
}

/// Whether `n` is prime. Deterministic Miller–Rabin with bases 2, 7 and 61, which is exact
/// for every `n < 4,759,123,141` (so for all of `u32`).
pub fn is_prime(n: u32) -> bool {
    const SMALL: [u32; 12] = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37];
    if n < 2 {
        return false;
    }
    for p in SMALL {
        if n.is_multiple_of(p) {
            return n == p;
        }
    }
    if n < 37 * 37 {
        return true;
    }
    let n = u64::from(n);
    let s = (n - 1).trailing_zeros();
    let d = (n - 1) >> s;
    'bases: for a in [2u64, 7, 61] {
        let mut x = pow_mod(a, d, n);
        if x == 1 || x == n - 1 {
            continue;
        }
        for _ in 1..s {
            x = x * x % n;
            if x == n - 1 {
                continue 'bases;
            }
        }
        return false;
    }
    true
}

/// `base^exp mod m` for `m < 2^32` (products fit in `u64`).
fn pow_mod(base: u64, mut exp: u64, m: u64) -> u64 {
    let mut base = base % m;
    let mut acc = 1;
    while exp > 0 {
        if exp & 1 == 1 {
            acc = acc * base % m;
        }
        base = base * base % m;
        exp >>= 1;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_prime_matches_a_sieve_below_200_000() {
        const LIMIT: usize = 200_000;
        let mut composite = vec![false; LIMIT];
        for i in 2..LIMIT {
            if !composite[i] {
                for j in (i * i..LIMIT).step_by(i) {
                    composite[j] = true;
                }
            }
            assert_eq!(is_prime(i as u32), !composite[i], "{i}");
        }
        assert!(!is_prime(0) && !is_prime(1));
    }

    #[test]
    fn carmichael_numbers_beyond_the_sieve_are_composite() {
        // Fermat pseudoprimes to every base coprime with them, with no factor the trial
        // division knows: only the strong test (Miller–Rabin's squarings) rejects them.
        for (n, factors) in [
            (410_041, [41, 73, 137]),
            (1_152_271, [43, 127, 211]),
            (10_024_561, [71, 271, 521]),
        ] {
            assert_eq!(factors.iter().product::<u32>(), n);
            assert!(!is_prime(n), "{n}");
        }
        // And primes of table sizes well past the sieve still are.
        assert!(is_prime(655_373) && is_prime(4_294_967_291));
    }

    #[test]
    fn is_prime_is_exact_on_known_large_values() {
        // Largest u32 prime, strong pseudoprimes to single bases, Carmichael numbers.
        assert!(is_prime(4_294_967_291));
        for n in [
            4_294_967_295u32,
            3_215_031_751,
            2_152_302_898,
            25_326_001,
            561,
            41_041,
        ] {
            assert!(!is_prime(n), "{n}");
        }
    }

    #[test]
    fn auto_sizes_are_ascending_primes_within_limits() {
        assert!(AUTO_TABLE_SIZES.windows(2).all(|w| w[0] < w[1]));
        for &m in AUTO_TABLE_SIZES {
            assert!(is_prime(m), "{m}");
            assert_eq!(check_table_size(m, 0), Ok(()));
        }
        assert_eq!(AUTO_TABLE_SIZES.last(), Some(&MAX_TABLE_SIZE));
        assert!(is_prime(MIN_TABLE_SIZE));
        // MAX_TABLE_SIZE is the largest prime below 2^24.
        assert!(((MAX_TABLE_SIZE + 1)..(1 << 24)).all(|n| !is_prime(n)));
    }
}
