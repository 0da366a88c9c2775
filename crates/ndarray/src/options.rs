//! The per-call options (key padding, attention dropout, the score modifiers) as they apply
//! to one `(batch, head)`: to score and probability tiles inside the kernels.

use std::ops::Range;

use sparse_attn_kernel_types::{CsrLayout, DropoutMask, KernelOptions, RelativeBuckets};

use crate::real::Real;
use crate::simd::avx2_dispatch;
use crate::tile::mask_tile;

/// The options as they apply to one `(batch, head)`: its valid length, dropout key, soft-cap,
/// ALiBi slope and relative-position bias row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadOptions<'a> {
    layout: CsrLayout<'a>,
    /// Valid length of this batch row, when it is shorter than the sequence.
    len: Option<usize>,
    dropout: Option<(DropoutMask, u32)>,
    softcap: Option<f64>,
    /// ALiBi slope of this head.
    slope: Option<f64>,
    /// The relative-position buckets and this head's row of the bias table.
    bias: Option<(&'a RelativeBuckets, &'a [f64])>,
}

impl<'a> HeadOptions<'a> {
    pub(crate) fn new(
        options: &KernelOptions<'a>,
        layout: &CsrLayout<'a>,
        batch: usize,
        head: usize,
    ) -> Self {
        Self {
            layout: *layout,
            len: options
                .key_lengths
                .map(|lengths| lengths[batch])
                .filter(|&len| len < layout.seq_len),
            dropout: options.dropout.map(|m| (m, m.head_key(batch, head))),
            softcap: options.mods.softcap,
            slope: options.mods.alibi.map(|slopes| slopes[head]),
            bias: options.mods.bias.map(|bias| {
                let count = bias.buckets.count();
                (bias.buckets, &bias.table[head * count..(head + 1) * count])
            }),
        }
    }

    /// The relative-position bias of query token `i` and key token `j` (0 without one).
    #[inline(always)]
    fn bias_of(&self, i: usize, j: usize) -> f64 {
        self.bias
            .map_or(0.0, |(buckets, row)| row[buckets.bucket(i, j)])
    }

    /// With a relative-position bias, adds to `sums` (one per bucket) the `dS` tiles of
    /// `entries` (laid out as in [`mask_tiles`](Self::mask_tiles); the gradient of the
    /// modified scores, before the soft-cap's derivative): the bias table's gradient, row
    /// by row and key by key in a fixed order.
    #[inline(always)]
    pub(crate) fn bias_grad_tiles<T: Real>(
        &self,
        entries: Range<usize>,
        ds: &[T],
        ld: usize,
        qs: usize,
        bq: usize,
        sums: &mut [f64],
    ) {
        let Some((buckets, _)) = self.bias else {
            return;
        };
        let (layout, e0) = (&self.layout, entries.start);
        for e in entries {
            let (ks, ke) = layout.block_range(layout.cols[e] as usize);
            let keys = self.key_tokens(ks, ke - ks);
            let tile = &ds[(e - e0) * layout.block..];
            for (i, row) in tile.chunks(ld).take(bq).enumerate() {
                let qi = layout.token(qs + i);
                for (j, &g) in row[..ke - ks].iter().enumerate() {
                    sums[buckets.bucket(qi, keys.get(j))] += g.to_f64();
                }
            }
        }
    }

    /// Applies the score modifiers to the scaled score tiles of `entries` (laid out as in
    /// [`mask_tiles`](Self::mask_tiles)): soft-capping, ALiBi, the relative bias. Call it before the masks
    /// (a capped `-inf` would no longer be `-inf`).
    #[inline(always)]
    pub(crate) fn modify_tiles<T: Real>(
        &self,
        entries: Range<usize>,
        s: &mut [T],
        ld: usize,
        qs: usize,
        bq: usize,
    ) {
        if self.softcap.is_none() && self.slope.is_none() && self.bias.is_none() {
            return;
        }
        self.each_tile(entries, s, |tile, _, ks, bk| {
            // The tile's key tokens as floats, once for all its rows (ALiBi's distances are
            // then one subtraction and an absolute value per score: exact below 2^24).
            let keys = self.key_tokens(ks, bk);
            let mut key_floats = [T::ZERO; 128];
            let key_floats = &mut key_floats[..bk];
            if self.slope.is_some() {
                for (j, x) in key_floats.iter_mut().enumerate() {
                    *x = T::from_usize(keys.get(j));
                }
            }
            for (i, row) in tile.chunks_mut(ld).take(bq).enumerate() {
                let qi = self.layout.token(qs + i);
                let row = &mut row[..bk];
                modify_row(row, self.softcap, self.slope, T::from_usize(qi), key_floats);
                if let Some((buckets, table)) = self.bias {
                    for (j, x) in row.iter_mut().enumerate() {
                        *x += T::from_f64(table[buckets.bucket(qi, keys.get(j))]);
                    }
                }
            }
        });
    }

    /// With soft-capping, multiplies the `dS` tiles of `entries` (laid out as in
    /// [`mask_tiles`](Self::mask_tiles)) by the cap's derivative `1 - tanh²(s / cap)`, which
    /// it recovers from the probabilities `p` (before dropout) and the rows' log-sum-exps:
    /// `cap * tanh(s / cap) = ln p + lse + slope * |i - j| - bias(i, j)`. Pairs with `p = 0`
    /// have `dS = 0` already.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn softcap_grad_tiles<T: Real>(
        &self,
        entries: Range<usize>,
        p: &[T],
        ds: &mut [T],
        lse: &[T],
        ld: usize,
        qs: usize,
        bq: usize,
    ) {
        let Some(cap) = self.softcap else { return };
        let inv_cap = T::from_f64(1.0 / cap);
        let slope = T::from_f64(self.slope.unwrap_or(0.0));
        let e0 = entries.start;
        self.each_tile(entries, ds, |ds_tile, e, ks, bk| {
            let p_tile = &p[(e - e0) * self.layout.block..];
            let keys = self.key_tokens(ks, bk);
            for (i, &row_lse) in lse.iter().enumerate().take(bq) {
                let qi = self.layout.token(qs + i);
                let row = i * ld;
                let (p_row, ds_row) = (&p_tile[row..row + bk], &mut ds_tile[row..row + bk]);
                for (j, (&pr, g)) in p_row.iter().zip(ds_row.iter_mut()).enumerate() {
                    if pr != T::ZERO {
                        let kj = keys.get(j);
                        let dist = T::from_usize(qi.abs_diff(kj));
                        let bias = T::from_f64(self.bias_of(qi, kj));
                        let t = (pr.ln() + row_lse + slope * dist - bias) * inv_cap;
                        *g *= T::ONE - t * t;
                    }
                }
            }
        });
    }

    /// The key tokens of the tile at key positions `ks..ks + bk`.
    fn key_tokens(&self, ks: usize, bk: usize) -> KeyTokens<'a> {
        match self.layout.order {
            None => KeyTokens::From(ks),
            Some(order) => KeyTokens::Order(&order[ks..ks + bk]),
        }
    }

    /// Whether no query of block `r` is valid (only known cheaply without a token order).
    pub(crate) fn block_past_end(&self, r: usize) -> bool {
        self.layout.order.is_none() && self.len.is_some_and(|len| r * self.layout.block >= len)
    }

    /// Sets the disallowed scores of the tiles of `entries` to `-inf`: each block's element
    /// mask, then the padding. The tiles lie side by side in `s` (row `i` at `s[i * ld..]`,
    /// entry `e` from column `(e - entries.start) * block` on), for query positions
    /// `qs..qs + bq`.
    #[inline(always)]
    pub(crate) fn mask_tiles<T: Real>(
        &self,
        entries: Range<usize>,
        s: &mut [T],
        ld: usize,
        qs: usize,
        bq: usize,
    ) {
        self.each_tile(entries, s, |tile, e, ks, bk| {
            if let Some(bits) = self.layout.mask_of(e) {
                mask_tile(tile, ld, bq, bk, bits, self.layout.block);
            }
            self.mask_padding(tile, ld, qs, bq, ks, bk);
        });
    }

    /// Applies dropout to the probability tiles of `entries`, laid out as in
    /// [`mask_tiles`](Self::mask_tiles): dropped pairs become 0, kept ones are multiplied by
    /// `1 / (1 - p)`.
    #[inline(always)]
    pub(crate) fn drop_tiles<T: Real>(
        &self,
        entries: Range<usize>,
        t: &mut [T],
        ld: usize,
        qs: usize,
        bq: usize,
    ) {
        self.each_tile(entries, t, |tile, _, ks, bk| {
            self.drop(tile, ld, qs, bq, ks, bk)
        });
    }

    /// Calls `f(tile, e, ks, bk)` for each entry `e` of a panel laid out as in
    /// [`mask_tiles`](Self::mask_tiles): `tile` starts at the entry's first column, its keys
    /// are positions `ks..ks + bk`.
    #[inline(always)]
    fn each_tile<T: Real>(
        &self,
        entries: Range<usize>,
        panel: &mut [T],
        mut f: impl FnMut(&mut [T], usize, usize, usize),
    ) {
        let (layout, e0) = (&self.layout, entries.start);
        for e in entries {
            let (ks, ke) = layout.block_range(layout.cols[e] as usize);
            f(&mut panel[(e - e0) * layout.block..], e, ks, ke - ks);
        }
    }

    /// Sets the scores of invalid query rows and key columns of the tile (query positions
    /// `qs..qs + bq`, key positions `ks..ks + bk`; row `i` at `s[i * ld..]`) to `-inf`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn mask_padding<T: Real>(
        &self,
        s: &mut [T],
        ld: usize,
        qs: usize,
        bq: usize,
        ks: usize,
        bk: usize,
    ) {
        let Some(len) = self.len else { return };
        // Without a token order, a tile inside the valid prefix needs nothing.
        if self.layout.order.is_none() && qs + bq <= len && ks + bk <= len {
            return;
        }
        let valid = |p: usize| self.layout.token(p) < len;
        // Columns' validity once per tile (blocks hold at most 128 tokens).
        let mut columns = [true; 128];
        let columns = &mut columns[..bk];
        columns
            .iter_mut()
            .enumerate()
            .for_each(|(j, c)| *c = valid(ks + j));
        let all_columns = columns.iter().all(|&c| c);
        for (i, row) in s.chunks_mut(ld).take(bq).enumerate() {
            let row = &mut row[..bk];
            if !valid(qs + i) {
                row.fill(T::NEG_INFINITY);
            } else if !all_columns {
                for (x, &ok) in row.iter_mut().zip(columns.iter()) {
                    if !ok {
                        *x = T::NEG_INFINITY;
                    }
                }
            }
        }
    }

    /// Applies dropout to a probability-shaped tile in place (row `i` at `t[i * ld..]`).
    #[allow(clippy::too_many_arguments)]
    fn drop<T: Real>(&self, t: &mut [T], ld: usize, qs: usize, bq: usize, ks: usize, bk: usize) {
        let Some((mask, head_key)) = self.dropout else {
            return;
        };
        let scale = T::from_f64(mask.scale());
        let keys = self.key_tokens(ks, bk);
        for (i, row) in t.chunks_mut(ld).take(bq).enumerate() {
            let row_key = DropoutMask::row_key(head_key, self.layout.token(qs + i));
            drop_row(&mut row[..bk], &mask, row_key, keys, scale);
        }
    }
}

/// The key tokens of a tile's columns.
#[derive(Clone, Copy)]
enum KeyTokens<'a> {
    /// `first, first + 1, ...` (no token order).
    From(usize),
    /// The layout's order over the tile's positions.
    Order(&'a [usize]),
}

impl KeyTokens<'_> {
    /// The token of column `j`.
    #[inline(always)]
    fn get(&self, j: usize) -> usize {
        match *self {
            KeyTokens::From(first) => first + j,
            KeyTokens::Order(tokens) => tokens[j],
        }
    }
}

avx2_dispatch! {
/// The score modifiers on one row of scaled scores of query token `query` (as a float) over
/// keys of tokens `keys`: `cap * tanh(s / cap)`, then `- slope * |query - key|`; branch-free
/// loops that vectorise.
fn modify_row<T: Real>(
    row: &mut [T],
    softcap: Option<f64>,
    slope: Option<f64>,
    query: T,
    keys: &[T],
) {
    if let Some(cap) = softcap {
        let (cap, inv) = (T::from_f64(cap), T::from_f64(1.0 / cap));
        row.iter_mut().for_each(|x| *x = cap * (*x * inv).tanh());
    }
    if let Some(slope) = slope {
        let slope = T::from_f64(slope);
        for (x, &key) in row.iter_mut().zip(keys) {
            *x = *x - slope * (query - key).abs();
        }
    }
}
}

avx2_dispatch! {
/// Dropout of one row: branch-free loops of 32-bit hashes that the compiler vectorises;
/// with AVX2 (detected at run time) eight hashes per instruction.
fn drop_row<T: Real>(
    row: &mut [T],
    mask: &DropoutMask,
    row_key: u32,
    keys: KeyTokens<'_>,
    scale: T,
) {
    let apply = |x: &mut T, tok: usize| {
        *x = if mask.keeps(row_key, tok) {
            *x * scale
        } else {
            T::ZERO
        };
    };
    match keys {
        KeyTokens::From(first) => {
            for (j, x) in row.iter_mut().enumerate() {
                apply(x, first + j);
            }
        }
        KeyTokens::Order(tokens) => {
            for (x, &tok) in row.iter_mut().zip(tokens) {
                apply(x, tok);
            }
        }
    }
}
}
