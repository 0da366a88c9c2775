//! Patterns built from other patterns or from closures: union, intersection, per-head
//! lists, and `Fn(head, i, j) -> bool`.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use super::{BlockCover, Geometry, Pattern, StreamWindow};
use crate::error::{Result, SparseAttentionError, invalid};

/// A shared, type-erased pattern.
pub type DynPattern = Arc<dyn Pattern>;

/// Candidates of a part used inside a natural-order combination: a part with its own token
/// order speaks of other positions, so it contributes every block.
fn part_candidates(p: &dyn Pattern, head: usize, qb: usize, geom: Geometry, out: &mut Vec<usize>) {
    if p.reorders(geom.seq_len) {
        out.extend(0..geom.n_blocks());
    } else {
        p.candidate_blocks(head, qb, geom, out);
    }
}

fn part_cover(
    p: &dyn Pattern,
    head: usize,
    q: &Range<usize>,
    k: &Range<usize>,
    geom: Geometry,
) -> BlockCover {
    if p.reorders(geom.seq_len) {
        BlockCover::Scan
    } else {
        p.cover(head, q.clone(), k.clone(), geom)
    }
}

fn validate_parts(parts: &[DynPattern], seq_len: usize, heads: usize) -> Result<()> {
    parts.iter().try_for_each(|p| p.validate(seq_len, heads))
}

fn names(parts: &[DynPattern], sep: &str) -> String {
    parts.iter().map(|p| p.name()).collect::<Vec<_>>().join(sep)
}

fn non_empty(parts: Vec<DynPattern>, pattern: &'static str) -> Result<Vec<DynPattern>> {
    if parts.is_empty() {
        Err(invalid(pattern, "expected at least one pattern"))
    } else {
        Ok(parts)
    }
}

/// Pairs allowed by any part, always in natural token order.
#[derive(Debug, Clone)]
pub struct Union(Vec<DynPattern>);

impl Union {
    /// The union of `parts`.
    ///
    /// # Errors
    /// If `parts` is empty.
    pub fn new(parts: Vec<DynPattern>) -> Result<Self> {
        non_empty(parts, "union").map(Self)
    }
}

impl Pattern for Union {
    fn name(&self) -> String {
        format!("({})", names(&self.0, " | "))
    }
    fn allows(&self, head: usize, i: usize, j: usize) -> bool {
        self.0.iter().any(|p| p.allows(head, i, j))
    }
    fn head_dependent(&self) -> bool {
        self.0.iter().any(|p| p.head_dependent())
    }
    fn validate(&self, seq_len: usize, heads: usize) -> Result<()> {
        validate_parts(&self.0, seq_len, heads)
    }
    fn candidate_blocks(&self, head: usize, q_block: usize, geom: Geometry, out: &mut Vec<usize>) {
        for p in &self.0 {
            part_candidates(p.as_ref(), head, q_block, geom, out);
        }
    }
    fn cover(&self, head: usize, q: Range<usize>, k: Range<usize>, geom: Geometry) -> BlockCover {
        let mut only = None;
        for p in &self.0 {
            match part_cover(p.as_ref(), head, &q, &k, geom) {
                BlockCover::Empty => {}
                BlockCover::Full => return BlockCover::Full,
                c if only.is_none() => only = Some(c),
                _ => return BlockCover::Scan,
            }
        }
        only.unwrap_or(BlockCover::Empty)
    }
    fn stream_window(&self) -> Option<StreamWindow> {
        StreamWindow::of_all(self.0.iter().map(|p| p.stream_window()))
    }
}

/// Pairs allowed by every part, always in natural token order.
#[derive(Debug, Clone)]
pub struct Intersection(Vec<DynPattern>);

impl Intersection {
    /// The intersection of `parts`.
    ///
    /// # Errors
    /// If `parts` is empty.
    pub fn new(parts: Vec<DynPattern>) -> Result<Self> {
        non_empty(parts, "intersection").map(Self)
    }
}

impl Pattern for Intersection {
    fn name(&self) -> String {
        format!("({})", names(&self.0, " & "))
    }
    fn allows(&self, head: usize, i: usize, j: usize) -> bool {
        self.0.iter().all(|p| p.allows(head, i, j))
    }
    fn head_dependent(&self) -> bool {
        self.0.iter().any(|p| p.head_dependent())
    }
    fn validate(&self, seq_len: usize, heads: usize) -> Result<()> {
        validate_parts(&self.0, seq_len, heads)
    }
    fn candidate_blocks(&self, head: usize, q_block: usize, geom: Geometry, out: &mut Vec<usize>) {
        part_candidates(self.0[0].as_ref(), head, q_block, geom, out);
    }
    fn cover(&self, head: usize, q: Range<usize>, k: Range<usize>, geom: Geometry) -> BlockCover {
        let mut only = None;
        for p in &self.0 {
            match part_cover(p.as_ref(), head, &q, &k, geom) {
                BlockCover::Empty => return BlockCover::Empty,
                BlockCover::Full => {}
                c if only.is_none() => only = Some(c),
                _ => return BlockCover::Scan,
            }
        }
        only.unwrap_or(BlockCover::Full)
    }
    fn stream_window(&self) -> Option<StreamWindow> {
        StreamWindow::of_all(self.0.iter().map(|p| p.stream_window()))
    }
}

/// One pattern per head: head `h` uses `patterns[h]` (natural token order).
#[derive(Debug, Clone)]
pub struct PerHead(Vec<DynPattern>);

impl PerHead {
    /// Head `h` follows `patterns[h]`; the layout must have exactly `patterns.len()` heads.
    ///
    /// # Errors
    /// If `patterns` is empty.
    pub fn new(patterns: Vec<DynPattern>) -> Result<Self> {
        non_empty(patterns, "per_head").map(Self)
    }
}

impl Pattern for PerHead {
    fn name(&self) -> String {
        format!("per_head[{}]", names(&self.0, ", "))
    }
    fn allows(&self, head: usize, i: usize, j: usize) -> bool {
        self.0[head].allows(head, i, j)
    }
    fn head_dependent(&self) -> bool {
        true
    }
    fn validate(&self, seq_len: usize, heads: usize) -> Result<()> {
        if heads != self.0.len() {
            return Err(SparseAttentionError::LayoutMismatch {
                what: "heads (per-head pattern list)",
                layout: self.0.len(),
                input: heads,
            });
        }
        validate_parts(&self.0, seq_len, heads)
    }
    fn candidate_blocks(&self, head: usize, q_block: usize, geom: Geometry, out: &mut Vec<usize>) {
        part_candidates(self.0[head].as_ref(), head, q_block, geom, out);
    }
    fn cover(&self, head: usize, q: Range<usize>, k: Range<usize>, geom: Geometry) -> BlockCover {
        part_cover(self.0[head].as_ref(), head, &q, &k, geom)
    }
    fn stream_window(&self) -> Option<StreamWindow> {
        StreamWindow::of_all(self.0.iter().map(|p| p.stream_window()))
    }
}

/// A pattern given by a closure over `(head, i, j)`. Building its layout scans every
/// block pair (`O(n^2)` predicate calls): fine for exploring, implement [`Pattern`] for
/// long sequences.
#[derive(Clone)]
pub struct FnPattern<F> {
    name: String,
    head_dependent: bool,
    f: F,
}

impl<F: Fn(usize, usize, usize) -> bool + Send + Sync> FnPattern<F> {
    /// A pattern named `name`; `head_dependent` says whether `f` looks at the head.
    pub fn new(name: impl Into<String>, head_dependent: bool, f: F) -> Self {
        Self {
            name: name.into(),
            head_dependent,
            f,
        }
    }
}

impl<F> fmt::Debug for FnPattern<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnPattern")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<F: Fn(usize, usize, usize) -> bool + Send + Sync> Pattern for FnPattern<F> {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn allows(&self, head: usize, i: usize, j: usize) -> bool {
        (self.f)(head, i, j)
    }
    fn head_dependent(&self) -> bool {
        self.head_dependent
    }
}
