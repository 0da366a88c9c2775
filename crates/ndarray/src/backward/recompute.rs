//! The backward pass without a store, for layouts with a key-block column whose
//! contributions exceed the budget: `dK`/`dV` recompute `P` and `dS` (7 GEMMs per block).

use rayon::prelude::*;

use super::panel::{dq_block, softmax_grad};
use super::{Grads, Problem, Slices, split_sums};
use crate::real::Real;
use crate::simd::avx2_dispatch;
use crate::tile::{gemm, probabilities};
use sparse_attn_kernel_types::CsrLayout;

/// The backward pass without a store (a key-block column's contributions exceed the
/// budget): dQ over the rows, then dK and dV over the columns recomputing `P` and `dS`.
pub(super) fn recompute<T: Real>(problem: Problem<'_, T>, (dq, dk, dv, sums): Grads<'_, T>) {
    let Problem {
        inputs,
        shape,
        layout,
        scale,
        extras,
        plan,
    } = problem;
    let (n, d, b, heads, group) = (
        shape.seq_len,
        shape.head_dim,
        layout.block,
        shape.heads,
        shape.group(),
    );
    let slices = |bh: usize| Slices::of(inputs, bh, shape, layout, extras);
    let nb = layout.n_blocks;
    dq.par_chunks_mut(n * d)
        .zip(split_sums(sums, shape.batch * heads))
        .enumerate()
        .for_each(|(bh, (dq_bh, sums_bh))| {
            let x = slices(bh);
            dq_bh
                .par_chunks_mut(b * d)
                .zip(split_sums(sums_bh, nb))
                .enumerate()
                .for_each_init(
                    || plan.scratch(b),
                    |scratch, (r, (dq_r, sums_r))| {
                        let entries = layout.row_entries(bh % heads, r);
                        dq_block(
                            &x,
                            d,
                            layout,
                            r,
                            entries,
                            scale,
                            (dq_r, true),
                            scratch,
                            None,
                            sums_r,
                        );
                    },
                );
        });
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
                .for_each_init(
                    // One task's probability and dS tiles, reused over its key blocks.
                    || [(); 2].map(|_| vec![T::ZERO; b * b]),
                    |[p, dp], (c, (dk_c, dv_c))| {
                        dk_c.fill(T::ZERO);
                        dv_c.fill(T::ZERO);
                        for (bh, x) in (first..).zip(&xs) {
                            let tiles = (&mut p[..], &mut dp[..]);
                            dkv_block(x, d, layout, bh % heads, c, scale, dk_c, dv_c, tiles);
                        }
                    },
                );
        });
}

avx2_dispatch! {
/// Adds to `dK` and `dV` of key block `c` the sums over the query blocks of `head` that
/// attend it; `tiles` are two `block x block` scratch tiles (`P` and `dS`).
#[allow(clippy::too_many_arguments)]
fn dkv_block<T: Real>(
    x: &Slices<'_, T>,
    d: usize,
    layout: &CsrLayout<'_>,
    head: usize,
    c: usize,
    scale: T,
    dk: &mut [T],
    dv: &mut [T],
    tiles: (&mut [T], &mut [T]),
) {
    let (p, dp) = tiles;
    let (ks, ke) = layout.block_range(c);
    let bk = ke - ks;
    let column = layout.column_entries(head, c);
    let (k, v) = (&x.k[ks * d..ke * d], &x.v[ks * d..ke * d]);
    for t in column {
        let r = layout.t_rows[t] as usize;
        if x.extras.block_past_end(r) || x.extras.block_past_end(c) {
            continue;
        }
        let (qs, qe) = layout.block_range(r);
        let bq = qe - qs;
        let (p, dp) = (&mut p[..bq * bk], &mut dp[..bq * bk]);
        let [q, dout, lse, delta] = x.query_rows(qs, qe, d);
        let entry = layout.t_entries[t] as usize;
        let tile = entry..entry + 1;
        gemm(bq, d, bk, scale, (q, d, 1), (k, 1, d), T::ZERO, p, bk);
        x.extras.modify_tiles(tile.clone(), p, bk, qs, bq);
        x.extras.mask_tiles(tile.clone(), p, bk, qs, bq);
        probabilities(p, lse, bk);
        // dP = dO Vᵀ (times the keep factor under dropout), dS = P (dP - delta)
        gemm(bq, d, bk, T::ONE, (dout, d, 1), (v, 1, d), T::ZERO, dp, bk);
        x.extras.drop_tiles(tile.clone(), dp, bk, qs, bq);
        softmax_grad(p, dp, delta, bk);
        x.extras
            .softcap_grad_tiles(tile.clone(), p, dp, lse, bk, qs, bq);
        // dV += Pᵀ dO, P after dropout
        x.extras.drop_tiles(tile, p, bk, qs, bq);
        gemm(bk, bq, d, T::ONE, (p, 1, bk), (dout, d, 1), T::ONE, dv, d);
        // dK += dSᵀ Q * scale
        gemm(bk, bq, d, scale, (dp, 1, bk), (q, d, 1), T::ONE, dk, d);
    }
}
}
