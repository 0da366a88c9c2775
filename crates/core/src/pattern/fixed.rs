//! The Sparse Transformer's `fixed` mode: local chunks plus per-head summary columns.

use std::ops::Range;

use super::{BlockCover, Geometry, Pattern, band_cover};
use crate::error::{Result, SparseAttentionError, invalid};

/// Mode `fixed`: with `l = local_ctx`, `c = summary`, `g = head mod num_verts`, key `j` is
/// allowed for query `i` iff `j <= i` (when causal) and `i` and `j` share a chunk of `l`
/// tokens (`floor(j / l) == floor(i / l)`) or `j` is one of the `c` summary tokens of head
/// group `g` in its chunk: `l - (g + 1) c <= j mod l < l - g c`.
///
/// In the original code `c = vertsize * blocksize` ([`Fixed::sparse_transformer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fixed {
    local_ctx: usize,
    num_verts: usize,
    summary: usize,
    causal: bool,
}

impl Fixed {
    /// Causal `fixed` pattern with chunks of `local_ctx` tokens, `num_verts` head groups
    /// and `summary` summary tokens per group and chunk.
    ///
    /// # Errors
    /// If a count is 0 or `num_verts * summary > local_ctx` (the summary columns of all
    /// groups must fit in one chunk).
    pub fn new(local_ctx: usize, num_verts: usize, summary: usize) -> Result<Self> {
        Self::with_causality(local_ctx, num_verts, summary, true)
    }

    /// The bidirectional variant (no `j <= i`).
    ///
    /// # Errors
    /// As [`Fixed::new`].
    pub fn bidirectional(local_ctx: usize, num_verts: usize, summary: usize) -> Result<Self> {
        Self::with_causality(local_ctx, num_verts, summary, false)
    }

    /// The original parameterisation: `summary = vertsize * blocksize`.
    ///
    /// # Errors
    /// As [`Fixed::new`]; in the original terms, `num_verts * vertsize` must not exceed
    /// `local_attn_ctx / blocksize`.
    pub fn sparse_transformer(
        local_attn_ctx: usize,
        num_verts: usize,
        vertsize: usize,
        blocksize: usize,
    ) -> Result<Self> {
        Self::new(local_attn_ctx, num_verts, vertsize * blocksize)
    }

    fn with_causality(
        local_ctx: usize,
        num_verts: usize,
        summary: usize,
        causal: bool,
    ) -> Result<Self> {
        if local_ctx == 0 || num_verts == 0 || summary == 0 {
            return Err(invalid(
                "fixed",
                format!(
                    "local_attn_ctx, num_verts and the summary length (vertsize * blocksize) must \
                     be at least 1, got {local_ctx}, {num_verts} and {summary}"
                ),
            ));
        }
        if num_verts * summary > local_ctx {
            return Err(invalid(
                "fixed",
                format!(
                    "num_verts * summary = {num_verts} * {summary} = {} exceeds local_attn_ctx = \
                     {local_ctx}: expected at most {local_ctx} summary tokens per chunk",
                    num_verts * summary
                ),
            ));
        }
        Ok(Self {
            local_ctx,
            num_verts,
            summary,
            causal,
        })
    }

    /// Summary offsets `[lo, hi)` (within a chunk) of `head`.
    fn summary_range(&self, head: usize) -> (usize, usize) {
        let g = head % self.num_verts;
        (
            self.local_ctx - (g + 1) * self.summary,
            self.local_ctx - g * self.summary,
        )
    }

    fn chunk(&self, p: usize) -> usize {
        p / self.local_ctx
    }
}

impl Pattern for Fixed {
    fn name(&self) -> String {
        let dir = if self.causal { "" } else { "_bidirectional" };
        format!(
            "fixed{dir}(l={}, verts={}, c={})",
            self.local_ctx, self.num_verts, self.summary
        )
    }
    fn allows(&self, head: usize, i: usize, j: usize) -> bool {
        let (lo, hi) = self.summary_range(head);
        let jm = j % self.local_ctx;
        (!self.causal || j <= i) && (self.chunk(i) == self.chunk(j) || (lo <= jm && jm < hi))
    }
    fn head_dependent(&self) -> bool {
        self.num_verts > 1
    }
    fn validate(&self, _seq_len: usize, heads: usize) -> Result<()> {
        if !heads.is_multiple_of(self.num_verts) {
            return Err(SparseAttentionError::InvalidPattern {
                pattern: "fixed",
                reason: format!(
                    "heads = {heads} is not a multiple of num_verts = {}: expected heads to be a \
                     multiple of num_verts",
                    self.num_verts
                ),
            });
        }
        Ok(())
    }
    fn candidate_blocks(&self, head: usize, q_block: usize, geom: Geometry, out: &mut Vec<usize>) {
        let (n, l) = (geom.seq_len, self.local_ctx);
        let q = geom.block_range(q_block);
        let (c0, c1) = (self.chunk(q.start), self.chunk(q.end - 1));
        let own_end = if self.causal { q.end } else { (c1 + 1) * l };
        out.extend(geom.blocks_of(c0 * l..own_end));
        let (lo, hi) = self.summary_range(head);
        let limit = if self.causal { q.end } else { n };
        for m in 0..n.div_ceil(l) {
            let start = m * l + lo;
            if start >= limit {
                break;
            }
            out.extend(geom.blocks_of(start..(m * l + hi).min(limit)));
        }
    }
    fn cover(&self, head: usize, q: Range<usize>, k: Range<usize>, _geom: Geometry) -> BlockCover {
        let causal = |q: &Range<usize>, k: &Range<usize>| {
            if self.causal {
                band_cover(0, i64::MAX, q, k)
            } else {
                BlockCover::Full
            }
        };
        if self.causal && k.start > q.end - 1 {
            return BlockCover::Empty;
        }
        let (qc0, qc1) = (self.chunk(q.start), self.chunk(q.end - 1));
        let (kc0, kc1) = (self.chunk(k.start), self.chunk(k.end - 1));
        if qc0 == qc1 && kc0 == kc1 && qc0 == kc0 {
            return causal(&q, &k);
        }
        let (lo, hi) = self.summary_range(head);
        let (ks, ke) = (k.start % self.local_ctx, (k.end - 1) % self.local_ctx);
        let all_summary = kc0 == kc1 && lo <= ks && ke < hi;
        if all_summary {
            return causal(&q, &k);
        }
        let other_chunk = kc0 == kc1 && (qc1 < kc0 || kc1 < qc0);
        let no_summary = kc0 == kc1 && (ke < lo || ks >= hi);
        if no_summary && other_chunk {
            return BlockCover::Empty;
        }
        // Keys of one chunk that no query of the block shares (causal: an earlier chunk, so
        // before every query): exactly its summary columns, whatever the query.
        if other_chunk {
            let base = kc0 * self.local_ctx;
            return BlockCover::Columns {
                start: base + lo,
                end: base + hi,
            };
        }
        BlockCover::Scan
    }
}
