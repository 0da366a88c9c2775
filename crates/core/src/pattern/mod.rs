//! Sparsity patterns: token predicates that know how to enumerate their own blocks.
//!
//! A pattern is first of all a token predicate [`Pattern::allows`]`(head, i, j)` in natural
//! token order (query `i`, key `j`, 0-based). The block layout is derived from it and covers
//! it exactly: blocks the predicate touches only partly carry an element mask.
//!
//! To build layouts in time proportional to the number of active blocks, a pattern may also
//! say which key blocks can be active for a query block ([`Pattern::candidate_blocks`]) and
//! how a block is covered in closed form ([`Pattern::cover`]). Both have correct defaults
//! (every block; scan the predicate), so a user pattern needs only `allows` and `name`.
//!
//! A pattern may ask for its tokens to be regrouped before the kernel runs
//! ([`Pattern::order`]): the strided pattern is block-sparse only after regrouping tokens by
//! `i mod L`. `candidate_blocks` and `cover` then speak of *layout positions*, while `allows`
//! always speaks of tokens.

mod band;
mod combine;
mod fixed;
mod global;
mod matrix;
mod random;
mod strided;

pub use band::{Band, Dilated};
pub use combine::{DynPattern, FnPattern, Intersection, PerHead, Union};
pub use fixed::Fixed;
pub use global::{BigBird, BigBirdConfig, Longformer, Streaming, VariableWindows};
pub use matrix::BlockMatrix;
pub use strided::Strided;

use std::fmt::Debug;
use std::ops::Range;

use crate::error::Result;

/// Sizes a pattern is asked about: sequence length and block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Sequence length in tokens.
    pub seq_len: usize,
    /// Block size in tokens.
    pub block: usize,
}

impl Geometry {
    /// Number of blocks (the last one may be shorter).
    pub fn n_blocks(&self) -> usize {
        self.seq_len.div_ceil(self.block)
    }

    /// Positions `[start, end)` of block `blk`.
    pub fn block_range(&self, blk: usize) -> Range<usize> {
        let start = blk * self.block;
        start..(start + self.block).min(self.seq_len)
    }

    /// Blocks overlapping positions `[start, end)` (clipped to the sequence).
    pub fn blocks_of(&self, positions: Range<usize>) -> Range<usize> {
        let end = positions.end.min(self.seq_len);
        if positions.start >= end {
            return 0..0;
        }
        positions.start / self.block..end.div_ceil(self.block)
    }
}

/// How a pattern covers one `(query block, key block)` pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockCover {
    /// No allowed pair.
    Empty,
    /// Every pair allowed.
    Full,
    /// Pair `(p, q)` of layout positions allowed iff `lo <= p - q <= hi`.
    Band {
        /// Smallest allowed `query - key` offset.
        lo: i64,
        /// Largest allowed `query - key` offset.
        hi: i64,
    },
    /// Pair `(p, q)` of layout positions allowed iff `start <= q < end`, for every query
    /// `p` of the block (a set of key columns, as summary tokens of fixed patterns).
    Columns {
        /// First allowed key position.
        start: usize,
        /// End of the allowed key positions.
        end: usize,
    },
    /// No closed form: the layout builder scans [`Pattern::allows`] over the block.
    Scan,
}

impl BlockCover {
    /// The causal cover (`key <= query`).
    pub const CAUSAL: BlockCover = BlockCover::Band {
        lo: 0,
        hi: i64::MAX,
    };
}

/// A sparsity pattern. Implement [`name`](Pattern::name) and [`allows`](Pattern::allows) to
/// add one; override the other methods to make layouts build fast.
///
/// ```
/// use sparse_attn_core::{BlockLayout, Pattern};
///
/// /// Each token sees itself and the token 8 before it.
/// #[derive(Debug)]
/// struct EchoEight;
///
/// impl Pattern for EchoEight {
///     fn name(&self) -> String {
///         "echo8".into()
///     }
///     fn allows(&self, _head: usize, i: usize, j: usize) -> bool {
///         i == j || i == j + 8
///     }
/// }
///
/// let layout = BlockLayout::build(&EchoEight, 64, 8, 1).unwrap();
/// assert_eq!(layout.active_blocks(0).unwrap(), 8 + 7);
/// ```
pub trait Pattern: Debug + Send + Sync {
    /// A short name, used in pictures and error messages.
    fn name(&self) -> String;

    /// Whether query token `i` may attend key token `j` in head `head` (natural order).
    fn allows(&self, head: usize, i: usize, j: usize) -> bool;

    /// Whether heads differ (then the layout holds one CSR per head). Default: `false`.
    fn head_dependent(&self) -> bool {
        false
    }

    /// Checks parameters that depend on the problem (`seq_len`, `heads`). Default: accept.
    ///
    /// # Errors
    /// [`SparseAttentionError::InvalidPattern`](crate::SparseAttentionError::InvalidPattern)
    /// naming what was expected.
    fn validate(&self, seq_len: usize, heads: usize) -> Result<()> {
        let _ = (seq_len, heads);
        Ok(())
    }

    /// Token order of the layout: position `p` holds token `order[p]`. `None` (default)
    /// means natural order. Must be a permutation of `0..seq_len`.
    fn order(&self, seq_len: usize) -> Option<Vec<usize>> {
        let _ = seq_len;
        None
    }

    /// Whether [`Pattern::order`] gives a token order for `seq_len` tokens, answered without
    /// building it: combinators ask it for every block pair they resolve. Default: builds the
    /// order and drops it; a pattern that has an order should answer directly.
    fn reorders(&self, seq_len: usize) -> bool {
        self.order(seq_len).is_some()
    }

    /// Appends to `out` the key blocks (layout positions) that may hold an allowed pair for
    /// query block `q_block` of `head`. A superset is fine; order and duplicates do not
    /// matter. Default: every block.
    fn candidate_blocks(&self, head: usize, q_block: usize, geom: Geometry, out: &mut Vec<usize>) {
        let _ = (head, q_block);
        out.extend(0..geom.n_blocks());
    }

    /// Closed-form cover of the block with query positions `q` and key positions `k` (in a
    /// layout of geometry `geom`). Default: [`BlockCover::Scan`].
    fn cover(&self, head: usize, q: Range<usize>, k: Range<usize>, geom: Geometry) -> BlockCover {
        let _ = (head, q, k, geom);
        BlockCover::Scan
    }

    /// How far back the pattern reads, when it is a causal window (with sinks) that a
    /// bounded key/value cache can serve: see [`StreamWindow`] for what a pattern promises
    /// by answering. Default: `None` (a cache keeps every token).
    fn stream_window(&self) -> Option<StreamWindow> {
        None
    }
}

/// What a bounded key/value cache must keep for a window-like pattern: the first `sinks`
/// tokens and the last `reach - 1` before the query.
///
/// A pattern that answers [`Pattern::stream_window`] promises, for every head, query `i`
/// and key `j` (natural order, no [`Pattern::order`]):
/// - `allows(head, i, j)` is false for `j > i` (causal);
/// - for `j >= sinks`, it depends only on `i - j`, and is false from `i - j >= reach` on;
/// - for `j < sinks`, it is the same for every `i >= sinks + reach - 1`.
///
/// So a query reads only the sinks and the `reach - 1` keys before it, and the pattern
/// reads the same when every key from `sinks` on moves down by the same number of slots:
/// a cache may drop the keys no future query reads and renumber the rest (the layer's
/// window cache does; see `KvCache` in `sparse-attn-nn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamWindow {
    /// Tokens at the start that every later query may read (attention sinks).
    pub sinks: usize,
    /// Keys a query reads back from itself, itself included (at least 1).
    pub reach: usize,
}

impl StreamWindow {
    /// The window that serves both `self` and `other` (the larger sinks and reach).
    pub fn cover(self, other: Self) -> Self {
        Self {
            sinks: self.sinks.max(other.sinks),
            reach: self.reach.max(other.reach),
        }
    }

    /// The window that serves every part, or `None` when one part has none.
    pub fn of_all(parts: impl IntoIterator<Item = Option<Self>>) -> Option<Self> {
        parts
            .into_iter()
            .try_fold(None, |acc: Option<Self>, w| {
                let w = w?;
                Some(Some(acc.map_or(w, |a| a.cover(w))))
            })
            .flatten()
    }
}

impl<P: Pattern + ?Sized> Pattern for std::sync::Arc<P> {
    fn name(&self) -> String {
        (**self).name()
    }
    fn allows(&self, head: usize, i: usize, j: usize) -> bool {
        (**self).allows(head, i, j)
    }
    fn head_dependent(&self) -> bool {
        (**self).head_dependent()
    }
    fn validate(&self, seq_len: usize, heads: usize) -> Result<()> {
        (**self).validate(seq_len, heads)
    }
    fn order(&self, seq_len: usize) -> Option<Vec<usize>> {
        (**self).order(seq_len)
    }
    fn reorders(&self, seq_len: usize) -> bool {
        (**self).reorders(seq_len)
    }
    fn candidate_blocks(&self, head: usize, q_block: usize, geom: Geometry, out: &mut Vec<usize>) {
        (**self).candidate_blocks(head, q_block, geom, out)
    }
    fn cover(&self, head: usize, q: Range<usize>, k: Range<usize>, geom: Geometry) -> BlockCover {
        (**self).cover(head, q, k, geom)
    }
    fn stream_window(&self) -> Option<StreamWindow> {
        (**self).stream_window()
    }
}

/// `x` as a token offset; a width beyond `i64::MAX` tokens reaches every token anyway.
pub(crate) fn saturating_offset(x: usize) -> i64 {
    i64::try_from(x).unwrap_or(i64::MAX)
}

/// Key blocks whose positions intersect `[q.start - hi, q.end - 1 - lo]`: the candidates of a
/// band `lo <= p - q <= hi` for the query positions `q`.
pub(crate) fn band_blocks(q: Range<usize>, lo: i64, hi: i64, geom: Geometry) -> Range<usize> {
    let first = (q.start as i64).saturating_sub(hi).max(0);
    let last = (q.end as i64 - 1).saturating_sub(lo);
    if last < 0 || first > last {
        return 0..0;
    }
    geom.blocks_of(first as usize..(last as usize).saturating_add(1))
}

/// The cover of a band restricted to one block pair: `Full`, `Empty` or the band itself.
pub(crate) fn band_cover(lo: i64, hi: i64, q: &Range<usize>, k: &Range<usize>) -> BlockCover {
    let min_off = q.start as i64 - (k.end as i64 - 1);
    let max_off = q.end as i64 - 1 - k.start as i64;
    if lo <= min_off && max_off <= hi {
        BlockCover::Full
    } else if hi < min_off || lo > max_off {
        BlockCover::Empty
    } else {
        BlockCover::Band { lo, hi }
    }
}
