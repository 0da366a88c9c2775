//! The Sparse Transformer's `strided` mode, in its regrouped token order.

use std::ops::Range;

use super::{BlockCover, Geometry, Pattern, band_cover};
use crate::error::{Result, invalid};

/// `(i - j) mod stride == 0` (and `j <= i` when causal): mode `strided`.
///
/// In natural order it touches every lower-triangular block, so its layout regroups the
/// tokens by `i mod stride` (the original code's "strided transpose"): position
/// `start(g) + t` holds token `g + t * stride`. In that order the pattern is causal-local
/// inside each residue group. For `seq_len` a multiple of `stride` this is exactly the
/// original reshape `[n/stride, stride] -> [stride, n/stride]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strided {
    stride: usize,
    causal: bool,
}

impl Strided {
    /// Causal strided pattern with period `stride` (`local_attn_ctx` in the original).
    ///
    /// # Errors
    /// If `stride` is 0.
    pub fn new(stride: usize) -> Result<Self> {
        Self::with_causality(stride, true)
    }

    /// Bidirectional strided pattern: every key of the same residue class.
    ///
    /// # Errors
    /// If `stride` is 0.
    pub fn bidirectional(stride: usize) -> Result<Self> {
        Self::with_causality(stride, false)
    }

    fn with_causality(stride: usize, causal: bool) -> Result<Self> {
        if stride == 0 {
            return Err(invalid(
                "strided",
                "local_attn_ctx (stride) must be at least 1, got 0",
            ));
        }
        Ok(Self { stride, causal })
    }

    /// Residue groups of `seq_len` tokens: `(quotient, remainder)` so that groups
    /// `0..rem` hold `quot + 1` tokens and the others `quot`.
    fn split(&self, seq_len: usize) -> (usize, usize) {
        (seq_len / self.stride, seq_len % self.stride)
    }

    /// First position of group `g`.
    fn group_start(&self, seq_len: usize, g: usize) -> usize {
        let (quot, rem) = self.split(seq_len);
        g * quot + g.min(rem)
    }

    /// Group of position `p`.
    fn group_of(&self, seq_len: usize, p: usize) -> usize {
        let (quot, rem) = self.split(seq_len);
        let big = rem * (quot + 1);
        if p < big {
            p / (quot + 1)
        } else {
            rem + (p - big) / quot.max(1)
        }
    }

    fn groups(&self, seq_len: usize, r: &Range<usize>) -> (usize, usize) {
        (
            self.group_of(seq_len, r.start),
            self.group_of(seq_len, r.end - 1),
        )
    }
}

impl Pattern for Strided {
    fn name(&self) -> String {
        let dir = if self.causal { "" } else { "_bidirectional" };
        format!("strided{dir}({})", self.stride)
    }
    fn allows(&self, _head: usize, i: usize, j: usize) -> bool {
        (!self.causal || j <= i) && i.abs_diff(j).is_multiple_of(self.stride)
    }
    fn order(&self, seq_len: usize) -> Option<Vec<usize>> {
        let groups = self.stride.min(seq_len);
        Some(
            (0..groups)
                .flat_map(|g| (g..seq_len).step_by(self.stride))
                .collect(),
        )
    }
    fn reorders(&self, _seq_len: usize) -> bool {
        true
    }
    fn candidate_blocks(&self, _head: usize, q_block: usize, geom: Geometry, out: &mut Vec<usize>) {
        let n = geom.seq_len;
        let q = geom.block_range(q_block);
        let (g0, g1) = self.groups(n, &q);
        let end = if self.causal {
            q.end
        } else {
            self.group_start(n, g1 + 1).min(n)
        };
        out.extend(geom.blocks_of(self.group_start(n, g0)..end));
    }
    fn cover(&self, _head: usize, q: Range<usize>, k: Range<usize>, geom: Geometry) -> BlockCover {
        let n = geom.seq_len;
        let (qg0, qg1) = self.groups(n, &q);
        let (kg0, kg1) = self.groups(n, &k);
        if qg1 < kg0 || kg1 < qg0 {
            BlockCover::Empty
        } else if qg0 == qg1 && kg0 == kg1 {
            if self.causal {
                band_cover(0, i64::MAX, &q, &k)
            } else {
                BlockCover::Full
            }
        } else {
            BlockCover::Scan
        }
    }
}
