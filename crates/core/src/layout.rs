//! The block layout: which key blocks each query block attends, and how.
//!
//! # Representation
//! Tokens are cut into blocks of `block` tokens (the last one may be shorter). For every
//! *layout head* (one if all heads share the pattern, else one per head) and query block
//! `r`, a CSR row lists the active key blocks in ascending order. Each active block is
//! *full* (every pair allowed) or *partial*, pointing to a bitmap of `block x block` bits
//! (bit `i * block + j` set = local query `i` may attend local key `j`; "set means
//! allowed" everywhere in this crate). Bitmaps are deduplicated. The transposed,
//! key-block-major lists serve the `dK`/`dV` pass.
//!
//! A layout may carry a token order (a permutation): position `p` of the layout holds
//! token `order[p]`. The public API applies it to `q`, `k`, `v` and undoes it on the
//! output, so kernels only ever see layout positions.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use crate::device_copies::DeviceCopies;
use crate::error::{Result, SparseAttentionError};
use crate::pattern::{BlockCover, Geometry, Pattern};

/// Smallest supported block size.
pub const MIN_BLOCK: usize = 1;
/// Largest supported block size.
pub const MAX_BLOCK: usize = 128;
/// Marker of a full block in the mask list.
pub const FULL: u32 = sparse_attn_kernel_types::FULL_BLOCK;

/// A validated, immutable block layout; cloning is cheap (shared).
///
/// # Invariants
/// Checked once, when the layout is built:
/// - `1 <= block <= 128`, `seq_len >= 1`, `heads >= 1`, `layout_heads` is 1 or `heads`;
/// - `row_ptr`, `col_ptr` have `layout_heads * n_blocks + 1` non-decreasing entries from 0
///   to the number of active blocks (which fits in `u32`);
/// - every CSR row is strictly increasing; the transposed lists are its exact transpose;
/// - every mask index is [`FULL`] or below the number of bitmaps;
/// - the order, if any, is a permutation of `0..seq_len`, stored with its inverse.
///
/// The layout covers its pattern exactly: a pair is allowed by the layout iff the pattern
/// allows it (property-tested for every built-in pattern).
#[derive(Clone)]
pub struct BlockLayout(Arc<Inner>);

struct Inner {
    name: String,
    seq_len: usize,
    block: usize,
    heads: usize,
    layout_heads: usize,
    n_blocks: usize,
    row_ptr: Vec<u32>,
    cols: Vec<u32>,
    masks: Vec<u32>,
    col_ptr: Vec<u32>,
    t_rows: Vec<u32>,
    t_entries: Vec<u32>,
    mask_bits: Vec<u64>,
    mask_words: usize,
    order: Option<(Vec<usize>, Vec<usize>)>,
    /// What backends made of the layout for their devices (uploaded arrays).
    device_copies: DeviceCopies,
}

impl std::fmt::Debug for BlockLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockLayout")
            .field("pattern", &self.0.name)
            .field("seq_len", &self.0.seq_len)
            .field("block", &self.0.block)
            .field("heads", &self.0.heads)
            .field("layout_heads", &self.0.layout_heads)
            .field("active_blocks", &self.0.cols.len())
            .field(
                "masks",
                &(self.0.mask_bits.len() / self.0.mask_words.max(1)),
            )
            .field("permuted", &self.0.order.is_some())
            .finish()
    }
}

/// Accumulates masks, deduplicated by content.
struct MaskTable {
    block: usize,
    words: usize,
    bits: Vec<u64>,
    by_content: HashMap<Vec<u64>, u32>,
    by_band: HashMap<(i64, i64), u32>,
    by_columns: HashMap<(usize, usize), u32>,
    /// The bitmap being scanned (reused block after block: a new mask allocates, a scan
    /// does not).
    scratch: Vec<u64>,
}

impl MaskTable {
    /// The index of the bitmap in `scratch`, added if new.
    fn intern_scratch(&mut self) -> u32 {
        if let Some(&id) = self.by_content.get(self.scratch.as_slice()) {
            return id;
        }
        let id = (self.bits.len() / self.words) as u32;
        self.bits.extend_from_slice(&self.scratch);
        self.by_content.insert(self.scratch.clone(), id);
        id
    }

    /// Bitmap of `lo <= i - j <= hi` in local coordinates.
    fn band(&mut self, lo: i64, hi: i64) -> u32 {
        if let Some(&id) = self.by_band.get(&(lo, hi)) {
            return id;
        }
        self.bitmap(|i, j| {
            let off = i as i64 - j as i64;
            lo <= off && off <= hi
        });
        let id = self.intern_scratch();
        self.by_band.insert((lo, hi), id);
        id
    }

    /// Bitmap of `start <= j < end` in local coordinates.
    fn columns(&mut self, start: usize, end: usize) -> u32 {
        if let Some(&id) = self.by_columns.get(&(start, end)) {
            return id;
        }
        self.bitmap(|_, j| start <= j && j < end);
        let id = self.intern_scratch();
        self.by_columns.insert((start, end), id);
        id
    }

    /// Fills `scratch` with the bitmap of `allowed` in local coordinates.
    fn bitmap(&mut self, mut allowed: impl FnMut(usize, usize) -> bool) {
        let b = self.block;
        self.scratch.clear();
        self.scratch.resize(self.words, 0);
        for i in 0..b {
            for j in 0..b {
                if allowed(i, j) {
                    let bit = i * b + j;
                    self.scratch[bit / 64] |= 1 << (bit % 64);
                }
            }
        }
    }
}

/// Classification of one block after resolving a [`BlockCover`].
enum Resolved {
    Skip,
    Mask(u32),
}

impl BlockLayout {
    /// Builds the layout of `pattern` for `seq_len` tokens, blocks of `block` tokens and
    /// `heads` heads.
    ///
    /// Built-in patterns enumerate their active blocks directly (time proportional to the
    /// active blocks); a pattern without [`Pattern::candidate_blocks`] is scanned.
    ///
    /// # Errors
    /// Block size outside `1..=128`, `seq_len` or `heads` zero, pattern parameters that do
    /// not fit the problem ([`Pattern::validate`]), a token order that is not a permutation,
    /// or more active blocks than `u32` can index.
    pub fn build(
        pattern: &dyn Pattern,
        seq_len: usize,
        block: usize,
        heads: usize,
    ) -> Result<Self> {
        if !(MIN_BLOCK..=MAX_BLOCK).contains(&block) {
            return Err(SparseAttentionError::BlockSize {
                got: block,
                min: MIN_BLOCK,
                max: MAX_BLOCK,
            });
        }
        if seq_len == 0 {
            return Err(SparseAttentionError::Zero { name: "seq_len" });
        }
        if heads == 0 {
            return Err(SparseAttentionError::Zero { name: "heads" });
        }
        pattern.validate(seq_len, heads)?;
        let order = pattern
            .order(seq_len)
            .map(|o| checked_order(&pattern.name(), o, seq_len))
            .transpose()?;
        let geom = Geometry { seq_len, block };
        let n_blocks = geom.n_blocks();
        let layout_heads = if pattern.head_dependent() { heads } else { 1 };
        let words = (block * block).div_ceil(64);
        let mut table = MaskTable {
            block,
            words,
            bits: Vec::new(),
            by_content: HashMap::new(),
            by_band: HashMap::new(),
            by_columns: HashMap::new(),
            scratch: Vec::new(),
        };
        let mut row_ptr = Vec::with_capacity(layout_heads * n_blocks + 1);
        row_ptr.push(0u32);
        let (mut cols, mut masks) = (Vec::new(), Vec::new());
        let mut cand = Vec::new();
        let token = |p: usize| order.as_ref().map_or(p, |(o, _)| o[p]);
        for h in 0..layout_heads {
            for r in 0..n_blocks {
                cand.clear();
                pattern.candidate_blocks(h, r, geom, &mut cand);
                cand.sort_unstable();
                cand.dedup();
                let q = geom.block_range(r);
                for &c in cand.iter().filter(|&&c| c < n_blocks) {
                    let k = geom.block_range(c);
                    let cover = pattern.cover(h, q.clone(), k.clone(), geom);
                    if let Resolved::Mask(m) = resolve(cover, &q, &k, &mut table, |i, j| {
                        pattern.allows(h, token(i), token(j))
                    }) {
                        cols.push(c as u32);
                        masks.push(m);
                    }
                }
                let len =
                    u32::try_from(cols.len()).map_err(|_| SparseAttentionError::TooManyBlocks {
                        blocks: cols.len(),
                        max: u32::MAX as usize,
                    })?;
                row_ptr.push(len);
            }
        }
        let (col_ptr, t_rows, t_entries) = transpose(&row_ptr, &cols, n_blocks, layout_heads);
        Ok(Self(Arc::new(Inner {
            name: pattern.name(),
            seq_len,
            block,
            heads,
            layout_heads,
            n_blocks,
            row_ptr,
            cols,
            masks,
            col_ptr,
            t_rows,
            t_entries,
            mask_bits: table.bits,
            mask_words: words,
            order,
            device_copies: DeviceCopies::default(),
        })))
    }

    /// The value of type `T` a backend made of this layout for device `key`, made by `make`
    /// on first use and dropped with the layout (every clone shares it).
    #[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(dead_code))]
    pub(crate) fn device_copy<K, T, E>(
        &self,
        key: &K,
        make: impl FnOnce() -> std::result::Result<T, E>,
    ) -> std::result::Result<Arc<T>, E>
    where
        K: PartialEq + Clone + Send + Sync + 'static,
        T: Send + Sync + 'static,
    {
        self.0.device_copies.get_or_try_make(key, make)
    }

    /// Name of the pattern the layout was built from.
    pub fn pattern_name(&self) -> &str {
        &self.0.name
    }
    /// Sequence length in tokens.
    pub fn seq_len(&self) -> usize {
        self.0.seq_len
    }
    /// Block size in tokens.
    pub fn block(&self) -> usize {
        self.0.block
    }
    /// Number of heads the layout was built for.
    pub fn heads(&self) -> usize {
        self.0.heads
    }
    /// 1 if every head shares the layout, else `heads`.
    pub fn layout_heads(&self) -> usize {
        self.0.layout_heads
    }
    /// Number of blocks per side, `seq_len.div_ceil(block)`.
    pub fn n_blocks(&self) -> usize {
        self.0.n_blocks
    }
    /// Token order (position `p` holds token `order[p]`) and its inverse, if permuted.
    pub fn order(&self) -> Option<(&[usize], &[usize])> {
        self.0
            .order
            .as_ref()
            .map(|(o, inv)| (o.as_slice(), inv.as_slice()))
    }
    /// Active blocks of `head` (all layout heads are the same when shared).
    ///
    /// # Errors
    /// [`SparseAttentionError::OutOfRange`] for a head beyond the layout's heads.
    pub fn active_blocks(&self, head: usize) -> Result<usize> {
        self.check_head(head)?;
        let lh = self.layout_head(head);
        let nb = self.0.n_blocks;
        Ok((self.0.row_ptr[(lh + 1) * nb] - self.0.row_ptr[lh * nb]) as usize)
    }
    /// Total active blocks over the layout heads.
    pub fn total_active_blocks(&self) -> usize {
        self.0.cols.len()
    }
    /// Layout head of attention head `head` (`0` when the heads share the layout).
    pub fn layout_head(&self, head: usize) -> usize {
        if self.0.layout_heads == 1 { 0 } else { head }
    }
    /// `head` as an error unless it is one of the layout's heads.
    pub(crate) fn check_head(&self, head: usize) -> Result<()> {
        if head < self.0.heads {
            Ok(())
        } else {
            Err(SparseAttentionError::OutOfRange {
                what: "head",
                got: head,
                len: self.0.heads,
            })
        }
    }
    /// Index of the CSR (or transposed) list of `block` in `head`, if both are in range.
    fn list(&self, head: usize, block: usize) -> Option<usize> {
        (head < self.0.heads && block < self.0.n_blocks)
            .then(|| self.layout_head(head) * self.0.n_blocks + block)
    }
    /// Active key blocks of query block `q_block` of `head`, with their mask index
    /// ([`FULL`] for a full block); none for a head or block outside the layout.
    pub fn row(&self, head: usize, q_block: usize) -> impl Iterator<Item = (usize, u32)> + '_ {
        let range = self.list(head, q_block).map_or(0..0, |r| {
            self.0.row_ptr[r] as usize..self.0.row_ptr[r + 1] as usize
        });
        range.map(|e| (self.0.cols[e] as usize, self.0.masks[e]))
    }
    /// Query blocks attending key block `k_block` of `head` (the transposed list); none for
    /// a head or block outside the layout.
    pub fn column(&self, head: usize, k_block: usize) -> impl Iterator<Item = usize> + '_ {
        let range = self.list(head, k_block).map_or(0..0, |c| {
            self.0.col_ptr[c] as usize..self.0.col_ptr[c + 1] as usize
        });
        range.map(|t| self.0.t_rows[t] as usize)
    }
    /// Whether the layout allows layout positions `(p, q)` in `head`; `false` for a head
    /// or position outside the layout.
    pub fn allows_position(&self, head: usize, p: usize, q: usize) -> bool {
        let b = self.0.block;
        p < self.0.seq_len
            && q < self.0.seq_len
            && self
                .row(head, p / b)
                .any(|(c, m)| c == q / b && (m == FULL || self.mask_bit(m, p % b, q % b)))
    }
    /// Whether the layout allows query token `i` to attend key token `j` in `head`; `false`
    /// for a head or token outside the layout.
    pub fn allows(&self, head: usize, i: usize, j: usize) -> bool {
        let n = self.0.seq_len;
        match &self.0.order {
            Some(_) if i >= n || j >= n => false,
            Some((_, inv)) => self.allows_position(head, inv[i], inv[j]),
            None => self.allows_position(head, i, j),
        }
    }

    /// The key tokens below `len` that query token `i` of `head` may attend, in layout order
    /// (ascending tokens for a layout without a token order); none for a head or token outside
    /// the layout. This is the row a decode step reads from a cache holding `len` tokens.
    pub fn allowed_keys(
        &self,
        head: usize,
        i: usize,
        len: usize,
    ) -> impl Iterator<Item = usize> + '_ {
        let (n, b) = (self.0.seq_len, self.0.block);
        let inner = &self.0;
        let p = (i < n).then(|| inner.order.as_ref().map_or(i, |(_, inv)| inv[i]));
        let row = p.and_then(|p| self.list(head, p / b).map(|r| (p % b, r)));
        let entries = row.map_or(0..0, |(_, r)| {
            inner.row_ptr[r] as usize..inner.row_ptr[r + 1] as usize
        });
        let local = row.map_or(0, |(local, _)| local);
        entries.flat_map(move |e| {
            let (c, m) = (inner.cols[e] as usize, inner.masks[e]);
            let keys = c * b..((c + 1) * b).min(n);
            keys.filter_map(move |q| {
                let tok = inner.order.as_ref().map_or(q, |(o, _)| o[q]);
                (tok < len && (m == FULL || self.mask_bit(m, local, q - c * b))).then_some(tok)
            })
        })
    }

    fn mask_bit(&self, m: u32, i: usize, j: usize) -> bool {
        let bit = i * self.0.block + j;
        let words = &self.0.mask_bits[m as usize * self.0.mask_words..];
        words[bit / 64] >> (bit % 64) & 1 == 1
    }

    /// The plain-data view that every kernel reads (`sparse_attn_kernel_types::CsrLayout`):
    /// the CSR arrays of [`raw`](Self::raw), the sizes and the token order.
    pub fn csr(&self) -> sparse_attn_kernel_types::CsrLayout<'_> {
        let (row_ptr, cols, masks, col_ptr, t_rows, t_entries, mask_bits, mask_words) = self.raw();
        sparse_attn_kernel_types::CsrLayout {
            seq_len: self.seq_len(),
            block: self.block(),
            n_blocks: self.n_blocks(),
            layout_heads: self.layout_heads(),
            row_ptr,
            cols,
            masks,
            col_ptr,
            t_rows,
            t_entries,
            mask_bits,
            mask_words,
            order: self.order().map(|(order, _)| order),
        }
    }

    /// Raw CSR arrays for kernels: `(row_ptr, cols, masks, col_ptr, t_rows, t_entries,
    /// mask_bits, mask_words)`.
    #[allow(clippy::type_complexity)]
    pub fn raw(
        &self,
    ) -> (
        &[u32],
        &[u32],
        &[u32],
        &[u32],
        &[u32],
        &[u32],
        &[u64],
        usize,
    ) {
        let i = &self.0;
        (
            &i.row_ptr,
            &i.cols,
            &i.masks,
            &i.col_ptr,
            &i.t_rows,
            &i.t_entries,
            &i.mask_bits,
            i.mask_words,
        )
    }

    /// Whether two handles share the same built layout.
    pub fn ptr_eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

fn checked_order(
    name: &str,
    order: Vec<usize>,
    seq_len: usize,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let bad = || SparseAttentionError::InvalidPattern {
        pattern: "order",
        reason: format!(
            "pattern `{name}` returned a token order that is not a permutation of 0..{seq_len}"
        ),
    };
    if order.len() != seq_len {
        return Err(bad());
    }
    let mut inv = vec![usize::MAX; seq_len];
    for (p, &t) in order.iter().enumerate() {
        if t >= seq_len || inv[t] != usize::MAX {
            return Err(bad());
        }
        inv[t] = p;
    }
    Ok((order, inv))
}

/// Turns a cover into "skip" or a mask index, scanning the predicate when needed.
fn resolve(
    cover: BlockCover,
    q: &Range<usize>,
    k: &Range<usize>,
    table: &mut MaskTable,
    allows: impl Fn(usize, usize) -> bool,
) -> Resolved {
    match cover {
        BlockCover::Empty => Resolved::Skip,
        BlockCover::Full => Resolved::Mask(FULL),
        BlockCover::Band { lo, hi } => {
            // Shift to local coordinates: p - q = (i - j) + (q.start - k.start).
            let shift = q.start as i64 - k.start as i64;
            let (lo, hi) = (lo.saturating_sub(shift), hi.saturating_sub(shift));
            let (bq, bk) = (q.len() as i64, k.len() as i64);
            if lo <= -(bk - 1) && hi >= bq - 1 {
                Resolved::Mask(FULL)
            } else if hi < -(bk - 1) || lo > bq - 1 {
                Resolved::Skip
            } else {
                Resolved::Mask(
                    table.band(lo.max(-(table.block as i64)), hi.min(table.block as i64)),
                )
            }
        }
        BlockCover::Columns { start, end } => {
            let local = |x: usize| x.saturating_sub(k.start).min(k.len());
            let (start, end) = (local(start), local(end));
            if start >= end {
                Resolved::Skip
            } else if start == 0 && end == k.len() {
                Resolved::Mask(FULL)
            } else {
                Resolved::Mask(table.columns(start, end))
            }
        }
        BlockCover::Scan => {
            let (mut any, mut all) = (false, true);
            table.bitmap(|i, j| {
                if i >= q.len() || j >= k.len() {
                    return false;
                }
                let a = allows(q.start + i, k.start + j);
                any |= a;
                all &= a;
                a
            });
            if !any {
                Resolved::Skip
            } else if all {
                Resolved::Mask(FULL)
            } else {
                Resolved::Mask(table.intern_scratch())
            }
        }
    }
}

/// Key-block-major lists: `(col_ptr, t_rows, t_entries)`, rows ascending within a column.
fn transpose(
    row_ptr: &[u32],
    cols: &[u32],
    n_blocks: usize,
    layout_heads: usize,
) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut col_ptr = vec![0u32; layout_heads * n_blocks + 1];
    for h in 0..layout_heads {
        let entries = row_ptr[h * n_blocks] as usize..row_ptr[(h + 1) * n_blocks] as usize;
        for e in entries {
            col_ptr[h * n_blocks + cols[e] as usize + 1] += 1;
        }
    }
    for i in 0..layout_heads * n_blocks {
        col_ptr[i + 1] += col_ptr[i];
    }
    let mut next = col_ptr.clone();
    let (mut t_rows, mut t_entries) = (vec![0u32; cols.len()], vec![0u32; cols.len()]);
    for h in 0..layout_heads {
        for r in 0..n_blocks {
            let row = h * n_blocks + r;
            for e in row_ptr[row] as usize..row_ptr[row + 1] as usize {
                let slot = &mut next[h * n_blocks + cols[e] as usize];
                t_rows[*slot as usize] = r as u32;
                t_entries[*slot as usize] = e as u32;
                *slot += 1;
            }
        }
    }
    (col_ptr, t_rows, t_entries)
}
