//! The learnable relative-position bias of T5 (Raffel et al. 2020): a per-head table of
//! biases, one per bucket of the signed token distance `i - j`, added to the scores.
//!
//! Buckets follow T5's `_relative_position_bucket`: with `count` buckets (per direction half
//! of them when bidirectional), distances below `exact = count / 2` (of the half) get a
//! bucket each; longer ones share logarithmically wider buckets up to `max_distance`, past
//! which every distance falls in the last bucket. Causal buckets map keys after the query to
//! bucket 0; bidirectional ones give them the upper half. The kernels read the buckets from
//! a table over `i - j` clamped to `[-max_distance, max_distance]` ([`RelativeBuckets::map`]),
//! built once here, so every backend buckets a distance the same way.

use std::sync::Arc;

/// Most `max_distance` a [`RelativeBuckets`] takes (its map has `2 max_distance + 1`
/// entries).
pub const MAX_RELATIVE_DISTANCE: usize = 1 << 20;

/// Why a bucketing cannot be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketsError {
    /// Fewer than 2 buckets (4 bidirectional), or an odd count bidirectional.
    Count(usize),
    /// `max_distance` not above the exact range `count / 2` (of the half bidirectional), or
    /// above [`MAX_RELATIVE_DISTANCE`].
    MaxDistance {
        /// The distance asked for.
        got: usize,
        /// The smallest distance allowed.
        min: usize,
    },
}

impl std::fmt::Display for BucketsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Count(count) => write!(
                f,
                "{count} relative-position buckets: expected at least 2 (bidirectional: an even count of at least 4)"
            ),
            Self::MaxDistance { got, min } => write!(
                f,
                "relative-position max distance {got}: expected {min} to {MAX_RELATIVE_DISTANCE}"
            ),
        }
    }
}

impl std::error::Error for BucketsError {}

/// T5-style bucketing of the signed token distance `i - j` (query `i`, key `j`; token order,
/// also under a permuted layout). Invariants (checked by [`RelativeBuckets::new`]): `count >=
/// 2` (bidirectional: even and `>= 4`), `count / 2 < max_distance <=`
/// [`MAX_RELATIVE_DISTANCE`] (bidirectional: `count / 4 < max_distance`), and `map` holds
/// the bucket of each distance in `-max_distance..=max_distance`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelativeBuckets {
    count: usize,
    max_distance: usize,
    bidirectional: bool,
    map: Arc<[u32]>,
}

impl RelativeBuckets {
    /// `count` buckets up to `max_distance`; `bidirectional` gives keys after the query
    /// buckets of their own (T5's encoder), else they share bucket 0 (its decoder).
    ///
    /// # Errors
    /// The [`BucketsError`] of a count or distance outside the invariants.
    pub fn new(
        count: usize,
        max_distance: usize,
        bidirectional: bool,
    ) -> Result<Self, BucketsError> {
        let half = if bidirectional { count / 2 } else { count };
        if half < 2 || (bidirectional && !count.is_multiple_of(2)) {
            return Err(BucketsError::Count(count));
        }
        let exact = half / 2;
        if max_distance <= exact || max_distance > MAX_RELATIVE_DISTANCE {
            return Err(BucketsError::MaxDistance {
                got: max_distance,
                min: exact + 1,
            });
        }
        let bucket = |delta: i64| -> u32 {
            let (mut bucket, n) = if bidirectional {
                (
                    if delta < 0 { half } else { 0 },
                    delta.unsigned_abs() as usize,
                )
            } else {
                (0, delta.max(0) as usize)
            };
            bucket += if n < exact {
                n
            } else {
                let ratio =
                    (n as f64 / exact as f64).ln() / (max_distance as f64 / exact as f64).ln();
                (exact + (ratio * (half - exact) as f64) as usize).min(half - 1)
            };
            bucket as u32
        };
        let m = max_distance as i64;
        let map = (-m..=m).map(bucket).collect();
        Ok(Self {
            count,
            max_distance,
            bidirectional,
            map,
        })
    }

    /// Buckets (the table's columns).
    pub fn count(&self) -> usize {
        self.count
    }

    /// Distance from which every distance shares the last bucket (of its direction).
    pub fn max_distance(&self) -> usize {
        self.max_distance
    }

    /// Whether keys after the query have buckets of their own.
    pub fn bidirectional(&self) -> bool {
        self.bidirectional
    }

    /// The bucket of each distance `i - j` in `-max_distance..=max_distance`, at index `i -
    /// j + max_distance`.
    pub fn map(&self) -> &[u32] {
        &self.map
    }

    /// The bucket of query token `i` and key token `j`.
    pub fn bucket(&self, i: usize, j: usize) -> usize {
        let m = self.max_distance;
        let index = if i >= j {
            m + (i - j).min(m)
        } else {
            m - (j - i).min(m)
        };
        self.map[index] as usize
    }
}

/// A relative-position bias as the kernels read it: the buckets and the `[heads, count]`
/// table (row-major, one row per query head).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RelativeBias<'a> {
    /// The bucketing of the distances.
    pub buckets: &'a RelativeBuckets,
    /// `[heads, buckets.count()]` biases.
    pub table: &'a [f64],
}

impl RelativeBias<'_> {
    /// The bias of query token `i` and key token `j` in query head `head`.
    pub fn value(&self, head: usize, i: usize, j: usize) -> f64 {
        self.table[head * self.buckets.count() + self.buckets.bucket(i, j)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// T5's reference implementation, on one signed relative position `j - i`.
    fn t5_bucket(relative: i64, bidirectional: bool, count: usize, max_distance: usize) -> usize {
        let (mut ret, mut count, mut n) = (0usize, count, -relative);
        if bidirectional {
            count /= 2;
            if n < 0 {
                ret += count;
            }
            n = n.abs();
        } else {
            n = n.max(0);
        }
        let max_exact = count / 2;
        let n = n as usize;
        if n < max_exact {
            ret + n
        } else {
            let large = max_exact
                + ((n as f64 / max_exact as f64).ln()
                    / (max_distance as f64 / max_exact as f64).ln()
                    * (count - max_exact) as f64) as usize;
            ret + large.min(count - 1)
        }
    }

    #[test]
    fn buckets_follow_t5() {
        for (count, max_distance, bidirectional) in [
            (32, 128, true),
            (32, 128, false),
            (8, 20, false),
            (6, 9, true),
        ] {
            let b = RelativeBuckets::new(count, max_distance, bidirectional).unwrap();
            for i in 0..300usize {
                for j in [0, 1, 2, 5, 17, 64, 127, 128, 129, 250, 299] {
                    let want = t5_bucket(j as i64 - i as i64, bidirectional, count, max_distance);
                    assert_eq!(b.bucket(i, j), want, "{count} {max_distance} {i} {j}");
                    assert!(b.bucket(i, j) < count);
                }
            }
        }
        let causal = RelativeBuckets::new(8, 20, false).unwrap();
        assert_eq!((causal.bucket(3, 3), causal.bucket(3, 9)), (0, 0));
        assert_eq!(causal.bucket(1000, 0), 7);
    }

    #[test]
    fn bad_buckets_are_refused() {
        assert_eq!(
            RelativeBuckets::new(1, 8, false),
            Err(BucketsError::Count(1))
        );
        assert_eq!(
            RelativeBuckets::new(5, 8, true),
            Err(BucketsError::Count(5))
        );
        assert_eq!(
            RelativeBuckets::new(2, 8, true),
            Err(BucketsError::Count(2))
        );
        assert_eq!(
            RelativeBuckets::new(8, 4, false),
            Err(BucketsError::MaxDistance { got: 4, min: 5 })
        );
        assert!(RelativeBuckets::new(8, MAX_RELATIVE_DISTANCE + 1, false).is_err());
    }
}
