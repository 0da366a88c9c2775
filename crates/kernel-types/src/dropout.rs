//! Attention dropout from a counter-based generator: whether pair `(i, j)` of `(batch,
//! head)` is kept is a pure function of `(seed, batch, head, i, j)`, so the backward pass
//! regenerates the forward's mask instead of storing it, and every backend (the f64
//! reference, the portable path, these kernels, the CubeCL kernels) draws the same mask.
//!
//! The generator is a chain of 32-bit integer hashes (Wellons' `lowbias32`, a bijection
//! with good avalanche), chosen because it needs only 32-bit multiply, xor and shift: WGSL
//! has no 64-bit integers. The CubeCL kernels repeat [`mix`] and the key derivation below
//! operation for operation (with [`KEY_SPREAD`] from here); the conformance tests compare
//! both with the reference.

/// Wellons' `lowbias32` integer hash: a bijection of `u32` with near-ideal avalanche.
#[inline(always)]
pub fn mix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// Odd multiplier spreading consecutive key tokens before the last hash.
pub const KEY_SPREAD: u32 = 0x9e37_79b9;

/// A dropout mask: keep probability `1 - p`, kept probabilities scaled by `1 / (1 - p)`.
///
/// # Invariants
/// `threshold = round(p * 2^32)` (at most `u32::MAX`), `scale = 1 / (1 - p)` with `0 < p < 1`
/// checked by [`DropoutMask::new`]; a pair is dropped when its 32-bit hash is below
/// `threshold`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropoutMask {
    threshold: u32,
    seed: u64,
    scale: f64,
}

impl DropoutMask {
    /// The mask of drop probability `p` and `seed`; `None` unless `0 < p < 1` (`p = 0` is
    /// no dropout at all: the callers then run the plain kernels).
    pub fn new(p: f64, seed: u64) -> Option<Self> {
        (p > 0.0 && p < 1.0).then(|| Self {
            threshold: (p * 4_294_967_296.0).round().min(u32::MAX as f64) as u32,
            seed,
            scale: 1.0 / (1.0 - p),
        })
    }

    /// Hashes below this are dropped.
    pub fn threshold(&self) -> u32 {
        self.threshold
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// `1 / (1 - p)`, the factor of kept probabilities.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Key of one `(batch, head)` (the query head): `mix` chained over the seed's halves,
    /// the batch and the head.
    pub fn head_key(&self, batch: usize, head: usize) -> u32 {
        let h = mix(self.seed as u32);
        let h = mix(h ^ (self.seed >> 32) as u32);
        let h = mix(h ^ batch as u32);
        mix(h ^ head as u32)
    }

    /// Key of query token `i` under a head key.
    #[inline]
    pub fn row_key(head_key: u32, i: usize) -> u32 {
        mix(head_key ^ i as u32)
    }

    /// Whether key token `j` is kept in the row of `row_key`.
    #[inline(always)]
    pub fn keeps(&self, row_key: u32, j: usize) -> bool {
        mix(row_key ^ (j as u32).wrapping_mul(KEY_SPREAD)) >= self.threshold
    }

    /// Whether pair `(i, j)` of `(batch, head)` is kept.
    pub fn keeps_pair(&self, batch: usize, head: usize, i: usize, j: usize) -> bool {
        self.keeps(Self::row_key(self.head_key(batch, head), i), j)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_and_out_of_range_rates_are_not_masks() {
        for p in [0.0, 1.0, -0.1, 1.5, f64::NAN] {
            assert!(DropoutMask::new(p, 1).is_none(), "p = {p}");
        }
    }

    #[test]
    fn keep_rate_matches_one_minus_p() {
        for p in [0.1, 0.5, 0.9] {
            let mask = DropoutMask::new(p, 42).unwrap();
            let total = 512 * 512;
            let kept = (0..512)
                .flat_map(|i| (0..512).map(move |j| (i, j)))
                .filter(|&(i, j)| mask.keeps_pair(1, 3, i, j))
                .count();
            let rate = kept as f64 / total as f64;
            assert!((rate - (1.0 - p)).abs() < 0.01, "p = {p}: keep rate {rate}");
        }
    }

    #[test]
    fn seeds_heads_and_batches_give_different_masks() {
        let a = DropoutMask::new(0.5, 1).unwrap();
        let b = DropoutMask::new(0.5, 2).unwrap();
        let row = |m: &DropoutMask, batch, head| {
            (0..256)
                .map(|j| m.keeps_pair(batch, head, 7, j))
                .collect::<Vec<_>>()
        };
        assert_ne!(row(&a, 0, 0), row(&b, 0, 0));
        assert_ne!(row(&a, 0, 0), row(&a, 1, 0));
        assert_ne!(row(&a, 0, 0), row(&a, 0, 1));
        assert_eq!(row(&a, 0, 0), row(&a, 0, 0));
    }
}
