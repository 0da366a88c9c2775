//! The fused forward pass: online softmax over the active key blocks of each query block.

use rayon::prelude::*;

use crate::layout::{AttentionShape, CsrLayout};
use crate::real::Real;
use crate::tile::{exp_shifted_sum, gemm, row_max, scores};

/// Block-sparse attention forward.
///
/// `q`, `k`, `v` and `out` are `[batch, heads, seq_len, head_dim]` row-major, `lse` is
/// `[batch, heads, seq_len]`; `out[b, h, i] = sum_j softmax_j(scale * q_i . k_j) v_j` over the
/// keys the layout allows, and `lse[b, h, i]` is the natural log of the softmax denominator
/// (including the max shift). A row with no allowed key gets zeros and `-inf`.
///
/// # Panics
/// If a slice length disagrees with `shape` or the layout's sequence length differs
/// from `shape.seq_len` (the caller validates both).
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    shape: AttentionShape,
    layout: &CsrLayout<'_>,
    scale: T,
    out: &mut [T],
    lse: &mut [T],
) {
    let AttentionShape {
        heads,
        seq_len: n,
        head_dim: d,
        ..
    } = shape;
    for (name, len) in [
        ("q", q.len()),
        ("k", k.len()),
        ("v", v.len()),
        ("out", out.len()),
    ] {
        assert_eq!(len, shape.numel(), "forward: `{name}` has the wrong length");
    }
    assert_eq!(
        lse.len(),
        shape.rows(),
        "forward: `lse` has the wrong length"
    );
    assert_eq!(
        layout.seq_len, n,
        "forward: layout built for another sequence length"
    );
    if shape.numel() == 0 {
        lse.fill(T::NEG_INFINITY);
        return;
    }
    let b = layout.block;
    out.par_chunks_mut(n * d)
        .zip(lse.par_chunks_mut(n))
        .enumerate()
        .for_each(|(bh, (out_bh, lse_bh))| {
            let head = bh % heads;
            let base = bh * n * d;
            let (q_bh, k_bh, v_bh) = (
                &q[base..base + n * d],
                &k[base..base + n * d],
                &v[base..base + n * d],
            );
            out_bh
                .par_chunks_mut(b * d)
                .zip(lse_bh.par_chunks_mut(b))
                .enumerate()
                .for_each(|(r, (o, l))| {
                    query_block(q_bh, k_bh, v_bh, d, layout, head, r, scale, o, l);
                });
        });
}

/// One query block `r` of one `(batch, head)`: `o` is its `[bq, d]` output, `l` its `bq`
/// log-sum-exps.
#[allow(clippy::too_many_arguments)]
fn query_block<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    d: usize,
    layout: &CsrLayout<'_>,
    head: usize,
    r: usize,
    scale: T,
    o: &mut [T],
    l: &mut [T],
) {
    let b = layout.block;
    let (qs, qe) = layout.block_range(r);
    let bq = qe - qs;
    let entries = layout.row_entries(head, r);

    let mut max = vec![T::NEG_INFINITY; bq];
    let mut sum = vec![T::ZERO; bq];
    o.fill(T::ZERO);
    let mut s = vec![T::ZERO; bq * b];
    let q_tile = &q[qs * d..qe * d];
    for e in entries {
        let (ks, ke) = layout.block_range(layout.cols[e] as usize);
        let bk = ke - ks;
        let s = &mut s[..bq * bk];
        scores(
            q_tile,
            &k[ks * d..ke * d],
            bq,
            bk,
            d,
            scale,
            layout.mask_of(e),
            b,
            s,
        );
        for i in 0..bq {
            let srow = &mut s[i * bk..(i + 1) * bk];
            let tile_max = row_max(srow);
            let new_max = max[i].max(tile_max);
            if new_max == T::NEG_INFINITY {
                srow.fill(T::ZERO);
                continue;
            }
            let correction = (max[i] - new_max).exp();
            let row_sum = exp_shifted_sum(srow, new_max);
            sum[i] = sum[i] * correction + row_sum;
            if correction != T::ONE {
                o[i * d..(i + 1) * d]
                    .iter_mut()
                    .for_each(|x| *x *= correction);
            }
            max[i] = new_max;
        }
        gemm(
            bq,
            bk,
            d,
            T::ONE,
            (s, bk, 1),
            (&v[ks * d..ke * d], d, 1),
            T::ONE,
            o,
            d,
        );
    }
    for i in 0..bq {
        // `max` stays -inf only for rows without any allowed key; a NaN sum (NaN input)
        // must reach the output, not be mistaken for an empty row.
        if max[i] != T::NEG_INFINITY {
            let inv = sum[i].recip();
            o[i * d..(i + 1) * d].iter_mut().for_each(|x| *x *= inv);
            l[i] = max[i] + sum[i].ln();
        } else {
            o[i * d..(i + 1) * d].fill(T::ZERO);
            l[i] = T::NEG_INFINITY;
        }
    }
}
