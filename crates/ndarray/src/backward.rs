//! The fused backward pass: `dQ` over the CSR rows, `dK`/`dV` over the transposed lists.
//!
//! `P` is recomputed from the saved log-sum-exp, so nothing of size `n x n` is stored, and
//! every gradient element is owned by one task: no atomics, deterministic results.
//!
//! The `dQ` pass keeps the `P` and `dS` tiles it computes and the `dK`/`dV` pass reads them
//! back: 5 tile GEMMs per active block instead of 7. The cache holds at most
//! [`TILE_CACHE_BYTES`]: each head is processed in chunks of key-block columns whose tiles
//! fit (the `dQ` pass accumulates over the chunks in a fixed order), so memory stays
//! bounded at any `n`; only a layout with a single column over the budget recomputes.

use std::ops::Range;

use rayon::prelude::*;

use crate::extras::{Extras, HeadExtras};
use crate::layout::{AttentionShape, CsrLayout};
use crate::real::Real;
use crate::simd::avx2_dispatch;
use crate::tile::{gemm, probabilities, scores};

/// Largest `P`/`dS` tile cache (bytes) the backward pass allocates: heads are processed in
/// column chunks whose tiles fit.
pub const TILE_CACHE_BYTES: usize = 32 << 20;

/// Inputs shared by every task of the backward pass, for one `(batch, head)` slice (`k`
/// and `v` of the key/value head it reads).
struct Slices<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    dout: &'a [T],
    lse: &'a [T],
    delta: &'a [T],
    extras: HeadExtras<'a>,
}

/// Block-sparse attention backward.
///
/// Given the forward inputs, the forward's `out` and `lse`, `dout` (the gradient of the
/// loss with respect to `out`) and the forward's `extras`, writes `dq` (`[batch, heads,
/// seq_len, head_dim]` row-major), `dk` and `dv` (`[batch, kv_heads, seq_len, head_dim]`,
/// summed over the query heads of each group). Dropout masks are regenerated, not stored.
///
/// # Panics
/// If a slice length disagrees with `shape` (the caller validates shapes).
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[T],
    dout: &[T],
    shape: AttentionShape,
    layout: &CsrLayout<'_>,
    scale: T,
    extras: &Extras<'_>,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    backward_with_tile_cache(
        q,
        k,
        v,
        out,
        lse,
        dout,
        shape,
        layout,
        scale,
        extras,
        dq,
        dk,
        dv,
        TILE_CACHE_BYTES,
    )
}

/// [`backward`] with an explicit tile-cache budget in bytes (0: always recompute).
///
/// Writes what [`backward`] writes, with an explicit tile-cache budget in bytes (0: always
/// recompute the tiles).
///
/// # Panics
/// If a slice length disagrees with `shape` (the caller validates shapes).
#[allow(clippy::too_many_arguments)]
pub fn backward_with_tile_cache<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[T],
    dout: &[T],
    shape: AttentionShape,
    layout: &CsrLayout<'_>,
    scale: T,
    extras: &Extras<'_>,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    tile_cache_bytes: usize,
) {
    assert_eq!(
        out.len(),
        shape.numel(),
        "backward: `out` has the wrong length"
    );
    assert_eq!(
        dout.len(),
        shape.numel(),
        "backward: `dout` has the wrong length"
    );
    let delta = row_deltas(out, dout, shape.head_dim);
    backward_with_deltas(
        q,
        k,
        v,
        &delta,
        lse,
        dout,
        shape,
        layout,
        scale,
        extras,
        dq,
        dk,
        dv,
        tile_cache_bytes,
    );
}

/// `delta_i = dout_i . out_i` of every row (rows of `d` elements): the softmax-backward row
/// correction, all the backward pass needs of the forward's output. Computing it first lets
/// a caller free `out` before the gradients are allocated.
pub fn row_deltas<T: Real>(out: &[T], dout: &[T], d: usize) -> Vec<T> {
    assert_eq!(
        out.len(),
        dout.len(),
        "row_deltas: `out` and `dout` differ in length"
    );
    let mut delta = vec![T::ZERO; out.len() / d.max(1)];
    delta
        .par_chunks_mut(4096)
        .enumerate()
        .for_each(|(chunk, dl)| {
            for (i, x) in dl.iter_mut().enumerate() {
                let at = (chunk * 4096 + i) * d;
                *x = dot(&dout[at..at + d], &out[at..at + d]);
            }
        });
    delta
}

/// [`backward_with_tile_cache`] from the [`row_deltas`] instead of the forward's output.
///
/// # Panics
/// If a slice length disagrees with `shape` (the caller validates shapes).
#[allow(clippy::too_many_arguments)]
pub fn backward_with_deltas<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    delta: &[T],
    lse: &[T],
    dout: &[T],
    shape: AttentionShape,
    layout: &CsrLayout<'_>,
    scale: T,
    extras: &Extras<'_>,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    tile_cache_bytes: usize,
) {
    let AttentionShape {
        heads,
        seq_len: n,
        head_dim: d,
        ..
    } = shape;
    let (numel, kv_numel) = (shape.numel(), shape.kv_numel());
    for (name, len, want) in [
        ("q", q.len(), numel),
        ("k", k.len(), kv_numel),
        ("v", v.len(), kv_numel),
        ("dout", dout.len(), numel),
        ("dq", dq.len(), numel),
        ("dk", dk.len(), kv_numel),
        ("dv", dv.len(), kv_numel),
    ] {
        assert_eq!(len, want, "backward: `{name}` has the wrong length");
    }
    if let Some(lengths) = extras.key_lengths {
        assert_eq!(
            lengths.len(),
            shape.batch,
            "backward: one key length per batch row"
        );
    }
    for (name, len) in [("lse", lse.len()), ("delta", delta.len())] {
        assert_eq!(len, shape.rows(), "backward: `{name}` has the wrong length");
    }
    assert_eq!(
        layout.seq_len, n,
        "backward: layout built for another sequence length"
    );
    if shape.numel() == 0 {
        return;
    }
    // Every gradient is accumulated: dQ over column chunks, dK and dV over the query heads
    // of a group.
    for g in [&mut *dq, &mut *dk, &mut *dv] {
        g.par_iter_mut().for_each(|x| *x = T::ZERO);
    }
    let b = layout.block;
    let slices = |bh: usize| {
        let (base, rows, kv_base) = (bh * n * d, bh * n, shape.kv_slice(bh) * n * d);
        Slices {
            q: &q[base..base + n * d],
            k: &k[kv_base..kv_base + n * d],
            v: &v[kv_base..kv_base + n * d],
            dout: &dout[base..base + n * d],
            lse: &lse[rows..rows + n],
            delta: &delta[rows..rows + n],
            extras: HeadExtras::new(extras, layout, bh / heads, bh % heads),
        }
    };
    let nb = layout.n_blocks;
    let column = |lh: usize, c: usize| {
        (layout.col_ptr[lh * nb + c + 1] - layout.col_ptr[lh * nb + c]) as usize
    };
    let tile = 2 * b * b;
    let budget = tile_cache_bytes / (tile * std::mem::size_of::<T>());
    let widest = (0..layout.layout_heads)
        .flat_map(|lh| (0..nb).map(move |c| (lh, c)))
        .map(|(lh, c)| column(lh, c))
        .max()
        .unwrap_or(0);
    if widest > 0 && widest <= budget {
        let total = layout.cols.len();
        let mut cache = vec![T::ZERO; budget.min(total) * tile];
        for bh in 0..shape.batch * heads {
            let x = slices(bh);
            let (head, lh) = (bh % heads, layout.layout_head(bh % heads));
            let dq_bh = &mut dq[bh * n * d..(bh + 1) * n * d];
            let kv = shape.kv_slice(bh) * n * d..(shape.kv_slice(bh) + 1) * n * d;
            let (dk_bh, dv_bh) = (&mut dk[kv.clone()], &mut dv[kv]);
            let mut c0 = 0;
            while c0 < nb {
                // The widest run of columns whose tiles fit (at least one: widest <= budget).
                let (mut c1, mut count) = (c0, 0);
                while c1 < nb && count + column(lh, c1) <= budget {
                    count += column(lh, c1);
                    c1 += 1;
                }
                let slots = ChunkSlots::new(layout, head, c0..c1);
                let mut rows = Vec::with_capacity(nb);
                let mut rest = &mut cache[..];
                for r in 0..nb {
                    let (mine, tail) = rest.split_at_mut(slots.rows[r].len() * tile);
                    rows.push(mine);
                    rest = tail;
                }
                dq_bh
                    .par_chunks_mut(b * d)
                    .zip(rows.into_par_iter())
                    .zip(slots.rows.par_iter())
                    .enumerate()
                    .for_each(|(r, ((dq_r, tiles), entries))| {
                        dq_block(&x, d, layout, r, entries.clone(), scale, dq_r, Some(tiles))
                    });
                let cache = &cache[..];
                let end = (c1 * b).min(n) * d;
                dk_bh[c0 * b * d..end]
                    .par_chunks_mut(b * d)
                    .zip(dv_bh[c0 * b * d..end].par_chunks_mut(b * d))
                    .enumerate()
                    .for_each(|(i, (dk_c, dv_c))| {
                        dkv_block_cached(
                            &x,
                            d,
                            layout,
                            head,
                            c0 + i,
                            scale,
                            cache,
                            &slots,
                            dk_c,
                            dv_c,
                        )
                    });
                c0 = c1;
            }
        }
        return;
    }
    dq.par_chunks_mut(n * d)
        .enumerate()
        .for_each(|(bh, dq_bh)| {
            let x = slices(bh);
            dq_bh
                .par_chunks_mut(b * d)
                .enumerate()
                .for_each(|(r, dq_r)| {
                    let entries = layout.row_entries(bh % heads, r);
                    dq_block(&x, d, layout, r, entries, scale, dq_r, None);
                });
        });
    let group = shape.group();
    dk.par_chunks_mut(n * d)
        .zip(dv.par_chunks_mut(n * d))
        .enumerate()
        .for_each(|(bkv, (dk_bkv, dv_bkv))| {
            // The query heads reading this key/value head, in order (deterministic sums).
            let first = (bkv / shape.kv_heads) * heads + (bkv % shape.kv_heads) * group;
            let xs: Vec<_> = (first..first + group).map(slices).collect();
            dk_bkv
                .par_chunks_mut(b * d)
                .zip(dv_bkv.par_chunks_mut(b * d))
                .enumerate()
                .for_each(|(c, (dk_c, dv_c))| {
                    for (bh, x) in (first..).zip(&xs) {
                        dkv_block(x, d, layout, bh % heads, c, scale, dk_c, dv_c);
                    }
                });
        });
}

fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).map(|(&x, &y)| x * y).sum()
}

/// `ds = p * (dp - delta_i)`, in place in `dp`.
#[inline(always)]
fn softmax_grad<T: Real>(p: &[T], dp: &mut [T], delta: &[T], bk: usize) {
    for ((dp_row, p_row), &dl) in dp.chunks_mut(bk).zip(p.chunks(bk)).zip(delta) {
        for (g, &pr) in dp_row.iter_mut().zip(p_row) {
            *g = pr * (*g - dl);
        }
    }
}

/// Where the `dQ` pass of one chunk of key-block columns caches its tiles: row `r`'s
/// entries in the chunk are `rows[r]` (a sub-range of its CSR row, columns being sorted),
/// cached in order from slot `starts[r]` on.
struct ChunkSlots {
    rows: Vec<Range<usize>>,
    starts: Vec<usize>,
}

impl ChunkSlots {
    fn new(layout: &CsrLayout<'_>, head: usize, columns: Range<usize>) -> Self {
        let nb = layout.n_blocks;
        let (mut rows, mut starts, mut next) = (Vec::with_capacity(nb), Vec::with_capacity(nb), 0);
        for r in 0..nb {
            let all = layout.row_entries(head, r);
            let cols = &layout.cols[all.clone()];
            let lo = all.start + cols.partition_point(|&c| (c as usize) < columns.start);
            let hi = all.start + cols.partition_point(|&c| (c as usize) < columns.end);
            rows.push(lo..hi);
            starts.push(next);
            next += hi - lo;
        }
        Self { rows, starts }
    }

    /// Cache slot of entry `e` of row `r`.
    fn slot(&self, r: usize, e: usize) -> usize {
        self.starts[r] + (e - self.rows[r].start)
    }
}

avx2_dispatch! {
/// Adds to `dQ` of query block `r` the sum over its `entries` (key blocks) of `dS K * scale`;
/// with a cache, stores each entry's `P` (after dropout) and `dS` tiles in order.
fn dq_block<T: Real>(
    x: &Slices<'_, T>,
    d: usize,
    layout: &CsrLayout<'_>,
    r: usize,
    entries: Range<usize>,
    scale: T,
    dq: &mut [T],
    cache: Option<&mut [T]>,
) {
    let mut cache = cache;
    let b = layout.block;
    let (qs, qe) = layout.block_range(r);
    let bq = qe - qs;
    let e0 = entries.start;
    // Without a cache the tiles live in scratch buffers; with one, directly in their slots.
    let cached = cache.is_some();
    let scratch_len = if cached { 0 } else { bq * b };
    let (mut p_scratch, mut dp_scratch) = (vec![T::ZERO; scratch_len], vec![T::ZERO; scratch_len]);
    for e in entries {
        // Padded-out tiles (without a token order) have P = 0: skipped, cache slot unused.
        let c = layout.cols[e] as usize;
        if x.extras.block_past_end(r) || x.extras.block_past_end(c) {
            continue;
        }
        let (ks, ke) = layout.block_range(c);
        let bk = ke - ks;
        let (p, dp) = match cache.as_deref_mut() {
            Some(cache) => {
                let slot = &mut cache[(e - e0) * 2 * b * b..(e - e0 + 1) * 2 * b * b];
                let (p, dp) = slot.split_at_mut(b * b);
                (&mut p[..bq * bk], &mut dp[..bq * bk])
            }
            None => (&mut p_scratch[..bq * bk], &mut dp_scratch[..bq * bk]),
        };
        let (q, k, v) = (
            &x.q[qs * d..qe * d],
            &x.k[ks * d..ke * d],
            &x.v[ks * d..ke * d],
        );
        scores(q, k, bq, bk, d, scale, layout.mask_of(e), b, p);
        x.extras.mask_padding(p, bk, qs, bq, ks, bk);
        probabilities(p, &x.lse[qs..qe], bk);
        gemm(
            bq,
            d,
            bk,
            T::ONE,
            (&x.dout[qs * d..qe * d], d, 1),
            (v, 1, d),
            T::ZERO,
            dp,
            bk,
        );
        // With dropout, dP of the kept (scaled) probabilities: dO Vᵀ times the keep factor.
        x.extras.drop(dp, bk, qs, bq, ks, bk);
        softmax_grad(p, dp, &x.delta[qs..qe], bk);
        gemm(bq, bk, d, scale, (dp, bk, 1), (k, d, 1), T::ONE, dq, d);
        if cached {
            // dV needs the probabilities as the forward used them: after dropout.
            x.extras.drop(p, bk, qs, bq, ks, bk);
        }
    }
}
}

avx2_dispatch! {
/// Adds to `dK` and `dV` of key block `c` from the `P` and `dS` tiles the `dQ` pass cached
/// for the chunk holding `c` (slots in `slots`).
fn dkv_block_cached<T: Real>(
    x: &Slices<'_, T>,
    d: usize,
    layout: &CsrLayout<'_>,
    head: usize,
    c: usize,
    scale: T,
    cache: &[T],
    slots: &ChunkSlots,
    dk: &mut [T],
    dv: &mut [T],
) {
    let b = layout.block;
    let (ks, ke) = layout.block_range(c);
    let bk = ke - ks;
    let column = layout.column_entries(head, c);
    for t in column {
        let r = layout.t_rows[t] as usize;
        if x.extras.block_past_end(r) || x.extras.block_past_end(c) {
            continue;
        }
        let (qs, qe) = layout.block_range(r);
        let bq = qe - qs;
        let slot = &cache[slots.slot(r, layout.t_entries[t] as usize) * 2 * b * b..];
        let (p, ds) = (&slot[..bq * bk], &slot[b * b..b * b + bq * bk]);
        gemm(
            bk,
            bq,
            d,
            T::ONE,
            (p, 1, bk),
            (&x.dout[qs * d..qe * d], d, 1),
            T::ONE,
            dv,
            d,
        );
        gemm(
            bk,
            bq,
            d,
            scale,
            (ds, 1, bk),
            (&x.q[qs * d..qe * d], d, 1),
            T::ONE,
            dk,
            d,
        );
    }
}
}

avx2_dispatch! {
/// Adds to `dK` and `dV` of key block `c` the sums over the query blocks of `head` that
/// attend it.
fn dkv_block<T: Real>(
    x: &Slices<'_, T>,
    d: usize,
    layout: &CsrLayout<'_>,
    head: usize,
    c: usize,
    scale: T,
    dk: &mut [T],
    dv: &mut [T],
) {
    let b = layout.block;
    let (ks, ke) = layout.block_range(c);
    let bk = ke - ks;
    let column = layout.column_entries(head, c);
    let (mut p, mut dp) = (vec![T::ZERO; b * bk], vec![T::ZERO; b * bk]);
    let (k, v) = (&x.k[ks * d..ke * d], &x.v[ks * d..ke * d]);
    for t in column {
        let r = layout.t_rows[t] as usize;
        if x.extras.block_past_end(r) || x.extras.block_past_end(c) {
            continue;
        }
        let (qs, qe) = layout.block_range(r);
        let bq = qe - qs;
        let (p, dp) = (&mut p[..bq * bk], &mut dp[..bq * bk]);
        let (q, dout) = (&x.q[qs * d..qe * d], &x.dout[qs * d..qe * d]);
        let entry = layout.t_entries[t] as usize;
        scores(q, k, bq, bk, d, scale, layout.mask_of(entry), b, p);
        x.extras.mask_padding(p, bk, qs, bq, ks, bk);
        probabilities(p, &x.lse[qs..qe], bk);
        // dP = dO Vᵀ (times the keep factor under dropout), dS = P (dP - delta)
        gemm(bq, d, bk, T::ONE, (dout, d, 1), (v, 1, d), T::ZERO, dp, bk);
        x.extras.drop(dp, bk, qs, bq, ks, bk);
        softmax_grad(p, dp, &x.delta[qs..qe], bk);
        // dV += Pᵀ dO, P after dropout
        x.extras.drop(p, bk, qs, bq, ks, bk);
        gemm(bk, bq, d, T::ONE, (p, 1, bk), (dout, d, 1), T::ONE, dv, d);
        // dK += dSᵀ Q * scale
        gemm(bk, bq, d, scale, (dp, 1, bk), (q, d, 1), T::ONE, dk, d);
    }
}
}
