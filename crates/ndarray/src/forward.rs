//! The fused forward pass: online softmax over the active key blocks of each query block.

use rayon::prelude::*;

use crate::layout::{AttentionShape, CsrLayout};
use crate::tile::{gemm, scores};

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
pub fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    layout: &CsrLayout<'_>,
    scale: f32,
    out: &mut [f32],
    lse: &mut [f32],
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
        lse.fill(f32::NEG_INFINITY);
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
fn query_block(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: usize,
    layout: &CsrLayout<'_>,
    head: usize,
    r: usize,
    scale: f32,
    o: &mut [f32],
    l: &mut [f32],
) {
    let b = layout.block;
    let (qs, qe) = layout.block_range(r);
    let bq = qe - qs;
    let row = layout.layout_head(head) * layout.n_blocks + r;
    let (e0, e1) = (
        layout.row_ptr[row] as usize,
        layout.row_ptr[row + 1] as usize,
    );

    let mut max = vec![f32::NEG_INFINITY; bq];
    let mut sum = vec![0.0f32; bq];
    o.fill(0.0);
    let mut s = vec![0.0f32; bq * b];
    let q_tile = &q[qs * d..qe * d];
    for e in e0..e1 {
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
            let tile_max = srow.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let new_max = max[i].max(tile_max);
            if new_max == f32::NEG_INFINITY {
                srow.fill(0.0);
                continue;
            }
            let correction = crate::exp::exp(max[i] - new_max);
            srow.iter_mut()
                .for_each(|x| *x = crate::exp::exp(*x - new_max));
            let row_sum: f32 = srow.iter().sum();
            sum[i] = sum[i] * correction + row_sum;
            if correction != 1.0 {
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
            1.0,
            (s, bk, 1),
            (&v[ks * d..ke * d], d, 1),
            1.0,
            o,
            d,
        );
    }
    for i in 0..bq {
        if sum[i] > 0.0 {
            let inv = 1.0 / sum[i];
            o[i * d..(i + 1) * d].iter_mut().for_each(|x| *x *= inv);
            l[i] = max[i] + sum[i].ln();
        } else {
            o[i * d..(i + 1) * d].fill(0.0);
            l[i] = f32::NEG_INFINITY;
        }
    }
}
