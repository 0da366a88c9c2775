//! The fused forward pass: online softmax over the active key blocks of each query block.

use rayon::prelude::*;

use sparse_attn_kernel_types::KernelOptions;

use crate::options::HeadOptions;
use crate::order::gather_into;
use crate::real::Real;
use crate::rows::PositionRows;
use crate::simd::avx2_dispatch;
use crate::tile::{exp_shifted_sum, gemm, row_max};
use sparse_attn_kernel_types::{AttentionShape, CsrLayout};

/// Block-sparse attention forward.
///
/// `q` and `out` are `[batch, heads, seq_len, head_dim]` row-major, `k` and `v` `[batch,
/// kv_heads, seq_len, head_dim]`, `lse` is `[batch, heads, seq_len]`; `out[b, h, i] =
/// sum_j softmax_j(scale * q_i . k_j) v_j` over the keys the layout allows (and the valid
/// keys of `extras.key_lengths`; with dropout, each term times the pair's keep factor), and
/// `lse[b, h, i]` is the natural log of the softmax denominator (before dropout). A row with
/// no allowed key gets zeros and `-inf`. Rows are tokens: with a token order in the layout
/// (`layout.order`), each head's inputs are gathered to layout positions in scratch the task
/// reuses, and its results written block by block to their tokens' rows.
///
/// # Panics
/// If a slice length disagrees with `shape`, the layout's sequence length differs from
/// `shape.seq_len` or `extras.key_lengths` does not have `batch` entries (the caller
/// validates all three).
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    shape: AttentionShape,
    layout: &CsrLayout<'_>,
    scale: T,
    extras: &KernelOptions<'_>,
    out: &mut [T],
    lse: &mut [T],
) {
    let AttentionShape {
        heads,
        seq_len: n,
        head_dim: d,
        ..
    } = shape;
    for (name, len, want) in [
        ("q", q.len(), shape.numel()),
        ("k", k.len(), shape.kv_numel()),
        ("v", v.len(), shape.kv_numel()),
        ("out", out.len(), shape.numel()),
    ] {
        assert_eq!(len, want, "forward: `{name}` has the wrong length");
    }
    if let Some(lengths) = extras.key_lengths {
        assert_eq!(
            lengths.len(),
            shape.batch,
            "forward: one key length per batch row"
        );
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
    out.par_chunks_mut(n * d)
        .zip(lse.par_chunks_mut(n))
        .enumerate()
        .for_each_init(HeadScratch::default, |scratch, (bh, (out_bh, lse_bh))| {
            let head = bh % heads;
            let (base, kv_base) = (bh * n * d, shape.kv_slice(bh) * n * d);
            let (q_bh, k_bh, v_bh) = (
                &q[base..base + n * d],
                &k[kv_base..kv_base + n * d],
                &v[kv_base..kv_base + n * d],
            );
            let x = HeadOptions::new(extras, layout, bh / heads, head);
            let order = layout.order;
            let (out, lse) = (
                PositionRows::new(out_bh, d, order),
                PositionRows::new(lse_bh, 1, order),
            );
            let Some(order) = order else {
                return head_blocks([q_bh, k_bh, v_bh], d, layout, head, scale, &x, out, lse);
            };
            // A permuted layout: this head's inputs in position order, in scratch the task
            // reuses for its next head; results written block by block to token order.
            let HeadScratch { q, k, v } = scratch;
            for (src, dst) in [(q_bh, &mut *q), (k_bh, &mut *k), (v_bh, &mut *v)] {
                gather_into(src, order, d, dst);
            }
            head_blocks([q, k, v], d, layout, head, scale, &x, out, lse);
        });
}

/// Reused buffers of one forward task for heads of a permuted layout (empty until used):
/// `q`, `k`, `v` of a head in position order.
struct HeadScratch<T> {
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
}

impl<T> Default for HeadScratch<T> {
    fn default() -> Self {
        Self {
            q: Vec::new(),
            k: Vec::new(),
            v: Vec::new(),
        }
    }
}

/// Every query block of one `(batch, head)` whose `q`, `k`, `v` (`[n, d]`, positions of the
/// layout) are `qkv`: writes `out_bh` (`[n, d]`) and `lse_bh` (`n`), addressed by position.
#[allow(clippy::too_many_arguments)]
fn head_blocks<T: Real>(
    [q, k, v]: [&[T]; 3],
    d: usize,
    layout: &CsrLayout<'_>,
    head: usize,
    scale: T,
    x: &HeadOptions<'_>,
    mut out_bh: PositionRows<'_, T>,
    mut lse_bh: PositionRows<'_, T>,
) {
    let (b, nb) = (layout.block, layout.n_blocks);
    // One score panel of scratch per rayon job, not per query block (and staging for the
    // blocks of a permuted layout).
    out_bh
        .par_blocks(b, 0..nb)
        .zip(lse_bh.par_blocks(b, 0..nb))
        .enumerate()
        .for_each_init(
            || (vec![T::ZERO; b * PANEL_BLOCKS * b], Vec::new(), Vec::new()),
            |(s, o_staging, l_staging), (r, (o, l))| {
                o.update(true, o_staging, |o| {
                    l.update(true, l_staging, |l| {
                        query_block(q, (k, v), d, layout, head, r, scale, x, o, l, s)
                    })
                })
            },
        );
}

/// Most key blocks of one forward panel (a run of consecutive blocks scored by one GEMM).
const PANEL_BLOCKS: usize = 8;

avx2_dispatch! {
/// One query block `r` of one `(batch, head)`: `o` is its `[bq, d]` output, `l` its `bq`
/// log-sum-exps; `kv` the keys and values of its key/value head; `s` scratch for a panel of
/// scores (`b x PANEL_BLOCKS * b`).
fn query_block<T: Real>(
    q: &[T],
    kv: (&[T], &[T]),
    d: usize,
    layout: &CsrLayout<'_>,
    head: usize,
    r: usize,
    scale: T,
    x: &HeadOptions<'_>,
    o: &mut [T],
    l: &mut [T],
    s: &mut [T],
) {
    let (k, v) = kv;
    let (qs, qe) = layout.block_range(r);
    let bq = qe - qs;
    if x.block_past_end(r) {
        o.fill(T::ZERO);
        l.fill(T::NEG_INFINITY);
        return;
    }
    // Key blocks past the valid length (no token order) sort last: drop them.
    let mut entries = layout.row_entries(head, r);
    while !entries.is_empty() && x.block_past_end(layout.cols[entries.end - 1] as usize) {
        entries.end -= 1;
    }

    let mut max = vec![T::NEG_INFINITY; bq];
    let mut sum = vec![T::ZERO; bq];
    o.fill(T::ZERO);
    let q_tile = &q[qs * d..qe * d];
    // One panel per run of consecutive key blocks: one GEMM for its scores, one for P V.
    for run in layout.runs(entries, PANEL_BLOCKS) {
        let (ks, ke) = layout.run_range(&run);
        let w = ke - ks;
        let s = &mut s[..bq * w];
        gemm(bq, d, w, scale, (q_tile, d, 1), (&k[ks * d..ke * d], 1, d), T::ZERO, s, w);
        x.modify_tiles(run.clone(), s, w, qs, bq);
        x.mask_tiles(run.clone(), s, w, qs, bq);
        for i in 0..bq {
            let srow = &mut s[i * w..(i + 1) * w];
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
        // Dropout acts on the probabilities after the softmax sum: the normaliser keeps
        // every allowed term, the output only the kept ones (scaled by 1 / (1 - p)).
        x.drop_tiles(run, s, w, qs, bq);
        gemm(bq, w, d, T::ONE, (s, w, 1), (&v[ks * d..ke * d], d, 1), T::ONE, o, d);
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
}
