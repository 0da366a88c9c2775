//! The plain-data view of a block layout and of a problem's shape that every kernel reads.

use std::ops::Range;

/// Marker stored in [`CsrLayout::masks`] for a block whose every element is allowed.
pub const FULL_BLOCK: u32 = u32::MAX;

/// Shape of one attention problem: `q` and the output are `[batch, heads, seq_len,
/// head_dim]` row-major, `k` and `v` are `[batch, kv_heads, seq_len, head_dim]`, the
/// log-sum-exp is `[batch, heads, seq_len]`.
///
/// With `kv_heads < heads` (grouped-query attention; multi-query for one), query head `h`
/// reads key/value head `h / (heads / kv_heads)`; `kv_heads` divides `heads`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Batch size.
    pub batch: usize,
    /// Number of (query) heads.
    pub heads: usize,
    /// Number of key/value heads (`heads` for plain multi-head attention).
    pub kv_heads: usize,
    /// Sequence length `n` (tokens), the same for queries and keys.
    pub seq_len: usize,
    /// Head dimension `d`.
    pub head_dim: usize,
}

impl AttentionShape {
    /// The problem of queries `[batch, heads, _, head_dim]` and keys/values `[batch,
    /// kv_heads, seq_len, head_dim]`: its length is the keys' (the queries' own in attention,
    /// the cache's capacity in decoding).
    pub fn of(q: [usize; 4], kv: [usize; 4]) -> Self {
        let [batch, heads, _, head_dim] = q;
        let [_, kv_heads, seq_len, _] = kv;
        Self {
            batch,
            heads,
            kv_heads,
            seq_len,
            head_dim,
        }
    }

    /// Number of elements of a `[batch, heads, seq_len, head_dim]` tensor.
    pub fn numel(&self) -> usize {
        self.batch * self.heads * self.seq_len * self.head_dim
    }

    /// Number of rows (`batch * heads * seq_len`), the length of the log-sum-exp.
    pub fn rows(&self) -> usize {
        self.batch * self.heads * self.seq_len
    }

    /// Number of elements of a `[batch, kv_heads, seq_len, head_dim]` tensor (`k`, `v`).
    pub fn kv_numel(&self) -> usize {
        self.batch * self.kv_heads * self.seq_len * self.head_dim
    }

    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }

    /// Index of the `(batch, kv head)` slice that `(batch, head)` slice `bh` reads.
    pub fn kv_slice(&self, bh: usize) -> usize {
        (bh / self.heads) * self.kv_heads + (bh % self.heads) / self.group()
    }
}

/// A borrowed view of a block layout in compressed sparse row form.
///
/// Tokens are grouped in blocks of `block` tokens; the last block holds
/// `seq_len - (n_blocks - 1) * block` tokens. For each *layout head* (one when all heads share
/// the layout, else one per head) and each query block `r`, the active key blocks are
/// `cols[row_ptr[lh * n_blocks + r] .. row_ptr[lh * n_blocks + r + 1]]`, sorted ascending.
///
/// # Invariants
/// The owner (`sparse_attn_core::BlockLayout`) checks them all when it builds the layout:
/// - `row_ptr` and `col_ptr` have `layout_heads * n_blocks + 1` non-decreasing entries,
///   starting at 0 and ending at `cols.len()`;
/// - `cols`, `masks` have one entry per active block; `t_rows`, `t_entries` are the
///   transpose: for key block `c`, `t_rows[col_ptr[..c]..]` are the query blocks (ascending)
///   and `t_entries` the index of the same block in `cols`;
/// - `masks[e]` is [`FULL_BLOCK`] or the index of a mask in `mask_bits`: mask `m` occupies
///   `mask_bits[m * mask_words .. (m + 1) * mask_words]`, bit `i * block + j` (word
///   `bit / 64`, bit `bit % 64`) is set when local query `i` may attend local key `j`.
#[derive(Debug, Clone, Copy)]
pub struct CsrLayout<'a> {
    /// Sequence length in tokens.
    pub seq_len: usize,
    /// Block size in tokens.
    pub block: usize,
    /// Number of blocks, `seq_len.div_ceil(block)`.
    pub n_blocks: usize,
    /// 1 when every head shares the layout, else the number of heads.
    pub layout_heads: usize,
    /// CSR row pointers, `layout_heads * n_blocks + 1` entries.
    pub row_ptr: &'a [u32],
    /// Key block of each active block.
    pub cols: &'a [u32],
    /// Mask index of each active block, or [`FULL_BLOCK`].
    pub masks: &'a [u32],
    /// Transposed pointers, `layout_heads * n_blocks + 1` entries.
    pub col_ptr: &'a [u32],
    /// Query block of each transposed entry.
    pub t_rows: &'a [u32],
    /// Index into `cols`/`masks` of each transposed entry.
    pub t_entries: &'a [u32],
    /// Mask bitmaps, `mask_words` words each.
    pub mask_bits: &'a [u64],
    /// Words per mask, `(block * block).div_ceil(64)`.
    pub mask_words: usize,
    /// Token at each layout position, when the layout reorders tokens: block `r` of the
    /// lists covers tokens `order[r * block..]`. The kernels take and return tensors in
    /// token order and apply it inside; dropout and padding are defined on tokens.
    pub order: Option<&'a [usize]>,
}

impl CsrLayout<'_> {
    /// Layout head used by attention head `head`.
    pub fn layout_head(&self, head: usize) -> usize {
        if self.layout_heads == 1 { 0 } else { head }
    }

    /// Indices into `cols`/`masks` of the active blocks of query block `r` of `head`.
    pub fn row_entries(&self, head: usize, r: usize) -> std::ops::Range<usize> {
        let row = self.layout_head(head) * self.n_blocks + r;
        self.row_ptr[row] as usize..self.row_ptr[row + 1] as usize
    }

    /// Indices into `t_rows`/`t_entries` of the query blocks attending key block `c` of
    /// `head`.
    pub fn column_entries(&self, head: usize, c: usize) -> std::ops::Range<usize> {
        let col = self.layout_head(head) * self.n_blocks + c;
        self.col_ptr[col] as usize..self.col_ptr[col + 1] as usize
    }

    /// Token range `[start, end)` of block `blk`.
    pub fn block_range(&self, blk: usize) -> (usize, usize) {
        let start = blk * self.block;
        (start, (start + self.block).min(self.seq_len))
    }

    /// Token at layout position `pos`.
    #[inline]
    pub fn token(&self, pos: usize) -> usize {
        self.order.map_or(pos, |order| order[pos])
    }

    /// Keys of the blocks of `entries`.
    pub fn width(&self, entries: Range<usize>) -> usize {
        entries
            .map(|e| {
                let (ks, ke) = self.block_range(self.cols[e] as usize);
                ke - ks
            })
            .sum()
    }

    /// Token range `[start, end)` of a run of consecutive key blocks (entries `run`).
    pub fn run_range(&self, run: &Range<usize>) -> (usize, usize) {
        let (start, _) = self.block_range(self.cols[run.start] as usize);
        let (_, end) = self.block_range(self.cols[run.end - 1] as usize);
        (start, end)
    }

    /// Runs of at most `max_blocks` consecutive key blocks among `entries` (ranges of
    /// entries): each run's keys are contiguous rows of `K` and `V`, so one GEMM serves it.
    pub fn runs(
        &self,
        entries: Range<usize>,
        max_blocks: usize,
    ) -> impl Iterator<Item = Range<usize>> + '_ {
        let mut next = entries.start;
        std::iter::from_fn(move || {
            (next < entries.end).then(|| {
                let start = next;
                next += 1;
                while next < entries.end
                    && next - start < max_blocks
                    && self.cols[next] == self.cols[next - 1] + 1
                {
                    next += 1;
                }
                start..next
            })
        })
    }

    /// The bitmap of entry `e`, or `None` for a full block.
    pub fn mask_of(&self, entry: usize) -> Option<&[u64]> {
        let m = self.masks[entry];
        (m != FULL_BLOCK).then(|| {
            let m = m as usize;
            &self.mask_bits[m * self.mask_words..(m + 1) * self.mask_words]
        })
    }
}
