//! Window patterns with extra keys: Longformer (global tokens), BigBird (global + random
//! blocks), streaming (attention sinks), and variable windows.

use std::ops::Range;
use std::sync::Arc;

use super::random::choose;
use super::{
    BlockCover, Geometry, Pattern, StreamWindow, band_blocks, band_cover, saturating_offset,
};
use crate::error::{Result, SparseAttentionError, invalid};

/// Band offsets of a window of `window` keys: causal `0..window`, else `|i - j| < window`.
fn window_band(window: usize, causal: bool) -> (i64, i64) {
    let reach = saturating_offset(window) - 1;
    (if causal { 0 } else { -reach }, reach)
}

fn in_band((lo, hi): (i64, i64), i: usize, j: usize) -> bool {
    let off = i as i64 - j as i64;
    lo <= off && off <= hi
}

/// Sorted, deduplicated global tokens with range queries.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Globals(Vec<usize>);

impl Globals {
    fn new(mut tokens: Vec<usize>) -> Self {
        tokens.sort_unstable();
        tokens.dedup();
        Self(tokens)
    }
    fn contains(&self, t: usize) -> bool {
        self.0.binary_search(&t).is_ok()
    }
    fn any_in(&self, r: &Range<usize>) -> bool {
        let at = self.0.partition_point(|&t| t < r.start);
        self.0.get(at).is_some_and(|&t| t < r.end)
    }
    fn validate(&self, pattern: &'static str, seq_len: usize) -> Result<()> {
        match self.0.last() {
            Some(&t) if t >= seq_len => Err(invalid(
                pattern,
                format!(
                    "global token {t} is out of range: expected tokens below seq_len = {seq_len}"
                ),
            )),
            _ => Ok(()),
        }
    }
    /// Candidates contributed by global tokens for query positions `q`.
    fn candidates(&self, q: &Range<usize>, causal: bool, geom: Geometry, out: &mut Vec<usize>) {
        let limit = if causal { q.end } else { geom.seq_len };
        if self.any_in(q) {
            out.extend(geom.blocks_of(0..limit));
        } else {
            out.extend(
                self.0
                    .iter()
                    .take_while(|&&t| t < limit)
                    .map(|&t| t / geom.block),
            );
        }
    }
}

/// Longformer: a window plus global tokens that attend to, and are attended by, every token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Longformer {
    window: usize,
    globals: Globals,
    causal: bool,
}

impl Longformer {
    /// `window` keys on each side (the query included; one side when `causal`) plus the
    /// given global tokens.
    ///
    /// # Errors
    /// If `window` is 0.
    pub fn new(window: usize, global_tokens: Vec<usize>, causal: bool) -> Result<Self> {
        if window == 0 {
            return Err(invalid("longformer", "window must be at least 1, got 0"));
        }
        Ok(Self {
            window,
            globals: Globals::new(global_tokens),
            causal,
        })
    }
}

impl Pattern for Longformer {
    fn name(&self) -> String {
        format!(
            "longformer(w={}, globals={})",
            self.window,
            self.globals.0.len()
        )
    }
    fn allows(&self, _head: usize, i: usize, j: usize) -> bool {
        (!self.causal || j <= i)
            && (in_band(window_band(self.window, self.causal), i, j)
                || self.globals.contains(i)
                || self.globals.contains(j))
    }
    fn validate(&self, seq_len: usize, _heads: usize) -> Result<()> {
        self.globals.validate("longformer", seq_len)
    }
    fn candidate_blocks(&self, _head: usize, q_block: usize, geom: Geometry, out: &mut Vec<usize>) {
        let q = geom.block_range(q_block);
        let (lo, hi) = window_band(self.window, self.causal);
        out.extend(band_blocks(q.clone(), lo, hi, geom));
        self.globals.candidates(&q, self.causal, geom, out);
    }
    fn cover(&self, _head: usize, q: Range<usize>, k: Range<usize>, _geom: Geometry) -> BlockCover {
        if self.globals.any_in(&q) || self.globals.any_in(&k) {
            return BlockCover::Scan;
        }
        let (lo, hi) = window_band(self.window, self.causal);
        band_cover(lo, hi, &q, &k)
    }
}

/// BigBird: a window, global tokens, and `random` seeded random key blocks (of
/// `random_block` tokens) for every query block of `random_block` tokens.
///
/// The random blocks of query block `qb` are a pure function of `(seed, qb)`: the same
/// seed gives the same layout on every run and platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BigBird {
    window: usize,
    globals: Globals,
    random: usize,
    random_block: usize,
    seed: u64,
    causal: bool,
    seq_len: usize,
    /// The random key blocks of every query block, drawn once at construction.
    drawn: RandomBlocks,
}

/// The random key blocks of each query block of a [`BigBird`] pattern, drawn once so that
/// `allows` and the layout builder allocate nothing per call. A query block that may pick
/// every one of its `limit` candidate blocks (`random >= limit`) stores nothing: it has
/// them all.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RandomBlocks {
    /// Row `qb`'s blocks are `blocks[offsets[qb]..offsets[qb + 1]]`, sorted.
    offsets: Arc<[usize]>,
    blocks: Arc<[usize]>,
}

/// Parameters of a [`BigBird`] pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BigBirdConfig {
    /// Window width in keys (each side, the query included; one side when causal).
    pub window: usize,
    /// Global tokens.
    pub global_tokens: Vec<usize>,
    /// Random key blocks per query block.
    pub random_blocks: usize,
    /// Size in tokens of the blocks that random attention picks.
    pub random_block: usize,
    /// Seed of the random choice.
    pub seed: u64,
    /// Causal (`j <= i`) or bidirectional.
    pub causal: bool,
}

impl BigBird {
    /// A BigBird pattern for sequences of `seq_len` tokens (random blocks are drawn from the
    /// blocks of that sequence).
    ///
    /// # Errors
    /// If `window`, `random_block` or `seq_len` is 0.
    pub fn new(config: BigBirdConfig, seq_len: usize) -> Result<Self> {
        if config.window == 0 || config.random_block == 0 || seq_len == 0 {
            return Err(invalid(
                "bigbird",
                format!(
                    "window, random_block and seq_len must be at least 1, got {}, {} and {seq_len}",
                    config.window, config.random_block
                ),
            ));
        }
        let (rows, causal) = (seq_len.div_ceil(config.random_block), config.causal);
        let limit = |qb| random_limit(causal, qb, rows);
        Ok(Self {
            window: config.window,
            globals: Globals::new(config.global_tokens),
            random: config.random_blocks,
            random_block: config.random_block,
            seed: config.seed,
            causal: config.causal,
            seq_len,
            drawn: RandomBlocks::draw(config.seed, config.random_blocks, rows, limit),
        })
    }

    /// Key blocks (of `random_block` tokens) that query block `qb` may pick at random.
    fn limit(&self, qb: usize) -> usize {
        random_limit(self.causal, qb, self.seq_len.div_ceil(self.random_block))
    }

    /// Random key blocks (of `random_block` tokens) of query block `qb`, ascending.
    fn random_of(&self, qb: usize) -> impl Iterator<Item = usize> + '_ {
        let limit = self.limit(qb);
        let all = if self.random >= limit { 0..limit } else { 0..0 };
        all.chain(self.drawn.of(qb).iter().copied())
    }

    /// Whether query block `qb` picked key block `kb` at random.
    fn picked(&self, qb: usize, kb: usize) -> bool {
        let limit = self.limit(qb);
        if self.random >= limit {
            kb < limit
        } else {
            self.drawn.of(qb).binary_search(&kb).is_ok()
        }
    }
}

/// Key blocks that query block `qb` of `rows` may pick at random: those up to itself when
/// `causal`, else all.
fn random_limit(causal: bool, qb: usize, rows: usize) -> usize {
    if causal { qb + 1 } else { rows }
}

impl RandomBlocks {
    /// `random` blocks drawn from `0..limit(qb)` for each of the `rows` query blocks, with
    /// `seed` ([`choose`]); nothing for a block that has all of its candidates.
    fn draw(seed: u64, random: usize, rows: usize, limit: impl Fn(usize) -> usize) -> Self {
        let (mut offsets, mut blocks) = (Vec::with_capacity(rows + 1), Vec::new());
        offsets.push(0);
        for qb in 0..rows {
            let limit = limit(qb);
            if random < limit {
                blocks.extend(choose(seed, qb, random, limit));
            }
            offsets.push(blocks.len());
        }
        Self {
            offsets: offsets.into(),
            blocks: blocks.into(),
        }
    }

    /// The blocks drawn for query block `qb` (none past the last row).
    fn of(&self, qb: usize) -> &[usize] {
        match self.offsets.get(qb..qb + 2) {
            Some(&[start, end]) => &self.blocks[start..end],
            _ => &[],
        }
    }
}

impl Pattern for BigBird {
    fn name(&self) -> String {
        format!(
            "bigbird(w={}, r={}, seed={})",
            self.window, self.random, self.seed
        )
    }
    fn allows(&self, _head: usize, i: usize, j: usize) -> bool {
        (!self.causal || j <= i)
            && (in_band(window_band(self.window, self.causal), i, j)
                || self.globals.contains(i)
                || self.globals.contains(j)
                || self.picked(i / self.random_block, j / self.random_block))
    }
    fn validate(&self, seq_len: usize, _heads: usize) -> Result<()> {
        if seq_len != self.seq_len {
            return Err(SparseAttentionError::LayoutMismatch {
                what: "seq_len (BigBird pattern)",
                layout: self.seq_len,
                input: seq_len,
            });
        }
        self.globals.validate("bigbird", seq_len)
    }
    fn candidate_blocks(&self, _head: usize, q_block: usize, geom: Geometry, out: &mut Vec<usize>) {
        let q = geom.block_range(q_block);
        let (lo, hi) = window_band(self.window, self.causal);
        out.extend(band_blocks(q.clone(), lo, hi, geom));
        self.globals.candidates(&q, self.causal, geom, out);
        let rb = self.random_block;
        for qb in q.start / rb..=(q.end - 1) / rb {
            for kb in self.random_of(qb) {
                out.extend(geom.blocks_of(kb * rb..(kb + 1) * rb));
            }
        }
    }
    fn cover(&self, _head: usize, q: Range<usize>, k: Range<usize>, _geom: Geometry) -> BlockCover {
        let (lo, hi) = window_band(self.window, self.causal);
        match band_cover(lo, hi, &q, &k) {
            BlockCover::Full => BlockCover::Full,
            _ => BlockCover::Scan,
        }
    }
}

/// Streaming attention: `sinks` first tokens seen by everyone plus a causal window of
/// `window` keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Streaming {
    sinks: usize,
    window: usize,
}

impl Streaming {
    /// Attention sinks and a causal window.
    ///
    /// # Errors
    /// If `window` is 0.
    pub fn new(sinks: usize, window: usize) -> Result<Self> {
        if window == 0 {
            return Err(invalid("streaming", "window must be at least 1, got 0"));
        }
        Ok(Self { sinks, window })
    }
}

impl Pattern for Streaming {
    fn name(&self) -> String {
        format!("streaming(sinks={}, w={})", self.sinks, self.window)
    }
    fn allows(&self, _head: usize, i: usize, j: usize) -> bool {
        j <= i && (j < self.sinks || i - j < self.window)
    }
    fn candidate_blocks(&self, _head: usize, q_block: usize, geom: Geometry, out: &mut Vec<usize>) {
        let q = geom.block_range(q_block);
        out.extend(geom.blocks_of(0..self.sinks.min(q.end)));
        out.extend(band_blocks(q, 0, saturating_offset(self.window) - 1, geom));
    }
    fn cover(&self, _head: usize, q: Range<usize>, k: Range<usize>, _geom: Geometry) -> BlockCover {
        if k.end <= self.sinks {
            band_cover(0, i64::MAX, &q, &k)
        } else if k.start >= self.sinks {
            band_cover(0, saturating_offset(self.window) - 1, &q, &k)
        } else {
            BlockCover::Scan
        }
    }
    fn stream_window(&self) -> Option<StreamWindow> {
        Some(StreamWindow {
            sinks: self.sinks,
            reach: self.window,
        })
    }
}

/// Variable windows (DeepSpeed's variable sparsity): the sequence is cut into consecutive
/// windows of the given sizes (the last size repeats) and tokens attend within their
/// window (causally or not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VariableWindows {
    sizes: Vec<usize>,
    causal: bool,
}

impl VariableWindows {
    /// Windows of `sizes[0]`, `sizes[1]`, ... tokens, then `sizes.last()` repeated.
    ///
    /// # Errors
    /// If `sizes` is empty or holds a 0.
    pub fn new(sizes: Vec<usize>, causal: bool) -> Result<Self> {
        if sizes.is_empty() || sizes.contains(&0) {
            return Err(invalid(
                "variable_windows",
                format!("expected a non-empty list of positive window sizes, got {sizes:?}"),
            ));
        }
        Ok(Self { sizes, causal })
    }

    /// Window `[start, end)` holding token `t`.
    fn window_of(&self, t: usize) -> Range<usize> {
        let mut start = 0;
        for &s in &self.sizes {
            if t < start + s {
                return start..start + s;
            }
            start += s;
        }
        let last = *self
            .sizes
            .last()
            .expect("sizes is non-empty (checked in new)");
        let k = (t - start) / last;
        start + k * last..start + (k + 1) * last
    }
}

impl Pattern for VariableWindows {
    fn name(&self) -> String {
        format!("variable_windows({:?})", self.sizes)
    }
    fn allows(&self, _head: usize, i: usize, j: usize) -> bool {
        (!self.causal || j <= i) && self.window_of(i).contains(&j)
    }
    fn candidate_blocks(&self, _head: usize, q_block: usize, geom: Geometry, out: &mut Vec<usize>) {
        let q = geom.block_range(q_block);
        let first = self.window_of(q.start).start;
        let end = if self.causal {
            q.end
        } else {
            self.window_of(q.end - 1).end
        };
        out.extend(geom.blocks_of(first..end));
    }
    fn cover(&self, _head: usize, q: Range<usize>, k: Range<usize>, _geom: Geometry) -> BlockCover {
        let (wq0, wq1) = (self.window_of(q.start), self.window_of(q.end - 1));
        let (wk0, wk1) = (self.window_of(k.start), self.window_of(k.end - 1));
        if wq1.end <= wk0.start || wk1.end <= wq0.start {
            BlockCover::Empty
        } else if wq0 == wq1 && wk0 == wk1 && wq0 == wk0 {
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
