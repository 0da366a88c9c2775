//! The `dQ` pass's row panels: a query block and up to [`PANEL_BLOCKS`] of its key blocks,
//! `S`, `P`, `dP`, `dS` and `dQ` with one GEMM per run of consecutive key blocks, and the
//! panel's `dK`/`dV` contributions when the store takes them.

use std::ops::Range;

use super::{RowStaging, Slices};
use crate::real::Real;
use crate::simd::avx2_dispatch;
use crate::tile::{gemm, probabilities};
use sparse_attn_kernel_types::CsrLayout;

/// Most key blocks of one `dQ` panel (its scratch is two `b x PANEL_BLOCKS * b` tiles).
const PANEL_BLOCKS: usize = 16;

/// Scratch of one task of the `dQ` pass: `P` and `dS` of a panel, and the query block's
/// rows when they need gathering.
pub(super) struct PanelScratch<T> {
    p: Vec<T>,
    ds: Vec<T>,
    rows: RowStaging<T>,
}

impl<T: Real> PanelScratch<T> {
    /// Scratch for panels of up to `blocks` (at most [`PANEL_BLOCKS`]) blocks of `block`.
    pub(super) fn new(block: usize, blocks: usize) -> Self {
        let len = block * blocks.min(PANEL_BLOCKS) * block;
        Self {
            p: vec![T::ZERO; len],
            ds: vec![T::ZERO; len],
            rows: RowStaging::default(),
        }
    }
}

/// Adds to `dQ` of query block `r` the sum over its `entries` (key blocks) of `dS K * scale`,
/// panel by panel of at most [`PANEL_BLOCKS`] blocks; with `fresh`, writes the sum instead
/// (whatever `dq` held: the first GEMM overwrites it, or zeros). With a `store` (the row's
/// slots: `[width, d]` of `dV` contributions then `[width, d]` of `dK` ones, width the
/// entries' keys), also writes there each panel's `Pᵀ dO` and `dSᵀ Q * scale`. With
/// `bias_sums` (one per bucket), also adds there the block's relative-position bias
/// gradient. The query block's rows are gathered into the scratch when `x` holds them in
/// token order.
#[allow(clippy::too_many_arguments)]
pub(super) fn dq_block<T: Real>(
    x: &Slices<'_, T>,
    d: usize,
    layout: &CsrLayout<'_>,
    r: usize,
    entries: Range<usize>,
    scale: T,
    (dq, fresh): (&mut [T], bool),
    scratch: &mut PanelScratch<T>,
    mut store: Option<&mut [T]>,
    mut bias_sums: Option<&mut [f64]>,
) {
    // Rows past the valid length (no token order): P = 0, nothing to add or store.
    if entries.is_empty() || x.extras.block_past_end(r) {
        if fresh {
            dq.fill(T::ZERO);
        }
        return;
    }
    let (qs, qe) = layout.block_range(r);
    let bq = qe - qs;
    let width = layout.width(entries.clone());
    let PanelScratch { p, ds, rows } = scratch;
    let x = &x.block_rows(qs, qe, d, rows);
    let mut done = 0;
    for lo in entries.clone().step_by(PANEL_BLOCKS) {
        let part = lo..(lo + PANEL_BLOCKS).min(entries.end);
        let w = layout.width(part.clone());
        let (p, ds) = (&mut p[..bq * w], &mut ds[..bq * w]);
        let contributions = store.as_deref_mut().map(|store| {
            let (dv, dk) = store.split_at_mut(width * d);
            (
                &mut dv[done * d..(done + w) * d],
                &mut dk[done * d..(done + w) * d],
            )
        });
        let fresh = fresh && done == 0;
        dq_panel(
            x,
            d,
            layout,
            r,
            part,
            scale,
            dq,
            fresh,
            p,
            ds,
            contributions,
            bias_sums.as_deref_mut(),
        );
        done += w;
    }
}

avx2_dispatch! {
/// The `dQ` work of one panel: `P` and `dS` of `entries` as `[bq x width]` panels in `p` and
/// `ds` (row stride `width`), with a GEMM per run of consecutive key blocks for the scores,
/// for `dP` and for `dQ` (the first of which overwrites `dq` when `fresh`, else adds to
/// it). With `contributions` (`[width, d]` each), also the panel's `dV` and `dK`
/// contributions: `Pᵀ dO` (`P` after dropout) and `dSᵀ Q * scale`; with `bias_sums`, adds
/// the panel's relative-position bias gradient there.
fn dq_panel<T: Real>(
    x: &Slices<'_, T>,
    d: usize,
    layout: &CsrLayout<'_>,
    r: usize,
    entries: Range<usize>,
    scale: T,
    dq: &mut [T],
    fresh: bool,
    p: &mut [T],
    ds: &mut [T],
    contributions: Option<(&mut [T], &mut [T])>,
    bias_sums: Option<&mut [f64]>,
) {
    let b = layout.block;
    let (qs, qe) = layout.block_range(r);
    let bq = qe - qs;
    let width = p.len() / bq;
    let e0 = entries.start;
    let [q, dout, lse, delta] = x.query_rows(qs, qe, d);
    let keys = |run: &Range<usize>| {
        let (ks, ke) = layout.run_range(run);
        ((run.start - e0) * b, ks, ke)
    };
    // S = Q Kᵀ * scale and dP = dO Vᵀ, one GEMM each per run.
    for run in layout.runs(entries.clone(), usize::MAX) {
        let (off, ks, ke) = keys(&run);
        let (k, v) = (&x.k[ks * d..ke * d], &x.v[ks * d..ke * d]);
        gemm(bq, d, ke - ks, scale, (q, d, 1), (k, 1, d), T::ZERO, &mut p[off..], width);
        gemm(bq, d, ke - ks, T::ONE, (dout, d, 1), (v, 1, d), T::ZERO, &mut ds[off..], width);
    }
    // Score modifiers, masks and padding per tile; P over whole rows.
    x.extras.modify_tiles(entries.clone(), p, width, qs, bq);
    x.extras.mask_tiles(entries.clone(), p, width, qs, bq);
    probabilities(p, lse, width);
    // With dropout, dP of the kept (scaled) probabilities: dO Vᵀ times the keep factor.
    x.extras.drop_tiles(entries.clone(), ds, width, qs, bq);
    softmax_grad(p, ds, delta, width);
    if let Some(sums) = bias_sums {
        x.extras.bias_grad_tiles(entries.clone(), ds, width, qs, bq, sums);
    }
    x.extras
        .softcap_grad_tiles(entries.clone(), p, ds, lse, width, qs, bq);
    // dQ += dS K * scale, one GEMM per run.
    for (i, run) in layout.runs(entries.clone(), usize::MAX).enumerate() {
        let (off, ks, ke) = keys(&run);
        let k = &x.k[ks * d..ke * d];
        let beta = if fresh && i == 0 { T::ZERO } else { T::ONE };
        gemm(bq, ke - ks, d, scale, (&ds[off..], width, 1), (k, d, 1), beta, dq, d);
    }
    if let Some((dv, dk)) = contributions {
        // dV needs the probabilities as the forward used them: after dropout.
        x.extras.drop_tiles(entries, p, width, qs, bq);
        gemm(width, bq, d, T::ONE, (p, 1, width), (dout, d, 1), T::ZERO, dv, d);
        gemm(width, bq, d, scale, (ds, 1, width), (q, d, 1), T::ZERO, dk, d);
    }
}
}

/// `ds = p * (dp - delta_i)`, in place in `dp`.
#[inline(always)]
pub(super) fn softmax_grad<T: Real>(p: &[T], dp: &mut [T], delta: &[T], bk: usize) {
    for ((dp_row, p_row), &dl) in dp.chunks_mut(bk).zip(p.chunks(bk)).zip(delta) {
        for (g, &pr) in dp_row.iter_mut().zip(p_row) {
            *g = pr * (*g - dl);
        }
    }
}
