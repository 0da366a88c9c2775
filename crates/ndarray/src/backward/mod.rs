//! The fused backward pass: `dQ` over the CSR rows, `dK`/`dV` over the transposed lists.
//!
//! `P` is recomputed from the saved log-sum-exp, so nothing of size `n x n` is stored, and
//! every gradient element is owned by one task: no atomics, deterministic results.
//!
//! The `dQ` pass works on row panels (a query block and up to 16 of its key blocks, in
//! [`panel`]): with `P` and `dS` of the panel in hand it also computes the panel's `dV` and
//! `dK` contributions (`Pᵀ dO` and `dSᵀ Q`, one GEMM each for the whole panel, while `P`,
//! `dS`, `Q` and `dO` are in cache) and stores them; the `dK`/`dV` pass then only sums the
//! contributions of each key block in a fixed order ([`stored`](mod@stored)). 5 GEMMs per active
//! block, as many as flash attention's backward, but all of panel size. The store holds at
//! most [`TILE_CACHE_BYTES`]: each head is processed in chunks of key-block columns whose
//! contributions fit (the `dQ` pass accumulates over the chunks in a fixed order), so
//! memory stays bounded at any `n`; only a layout with a single column over the budget
//! recomputes `P` and `dS` in the `dK`/`dV` pass ([`recompute`](mod@recompute), 7 GEMMs per block).

mod panel;
mod recompute;
mod stored;

use rayon::prelude::*;

use crate::buffer::zeroed;
use sparse_attn_kernel_types::KernelOptions;

use crate::options::HeadOptions;
use crate::order::{all_to_positions, all_to_tokens, extend_rows};
use crate::real::Real;
use panel::PanelScratch;
use recompute::recompute;
use sparse_attn_kernel_types::{AttentionShape, CsrLayout};
use stored::stored;

/// Largest store of `dK`/`dV` contributions (bytes) the backward pass allocates: heads are
/// processed in column chunks whose contributions fit. Small enough to stay in a server
/// CPU's last-level cache between the `dQ` pass that writes it and the `dK`/`dV` pass that
/// reads it (on the 2-core development machine, with 32 MiB of L3, 4 and 8 MiB ran the
/// backward 2-4% faster than 32 MiB; 2 MiB, with many more chunks, 15% slower).
pub const TILE_CACHE_BYTES: usize = 8 << 20;

/// Inputs shared by every task of the backward pass, for one `(batch, head)` slice (`k`
/// and `v` of the key/value head it reads, in layout positions).
///
/// The query-side rows (`q`, `dout`, `lse`, `delta`) hold positions `first_row..` in
/// position order, or, with a `query_order`, the head's rows in token order: the `dQ` pass
/// reads one query block at a time, so [`Slices::block_rows`] gathers just that block.
struct Slices<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    dout: &'a [T],
    lse: &'a [T],
    delta: &'a [T],
    /// Position of the first query-side row (0 for a whole head).
    first_row: usize,
    /// The layout's token order when the query-side rows are in token order.
    query_order: Option<&'a [usize]>,
    extras: HeadOptions<'a>,
}

/// Buffers one task gathers a query block's rows into ([`Slices::block_rows`]).
pub(super) struct RowStaging<T> {
    q: Vec<T>,
    dout: Vec<T>,
    lse: Vec<T>,
    delta: Vec<T>,
}

impl<T> Default for RowStaging<T> {
    fn default() -> Self {
        Self {
            q: Vec::new(),
            dout: Vec::new(),
            lse: Vec::new(),
            delta: Vec::new(),
        }
    }
}

/// Block-sparse attention backward.
///
/// Given the forward inputs, the forward's `out` and `lse`, `dout` (the gradient of the
/// loss with respect to `out`) and the forward's `extras`, writes `dq` (`[batch, heads,
/// seq_len, head_dim]` row-major), `dk` and `dv` (`[batch, kv_heads, seq_len, head_dim]`,
/// summed over the query heads of each group). Dropout masks are regenerated, not stored.
/// Every tensor is in token order, as in [`forward`](crate::forward()).
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
    extras: &KernelOptions<'_>,
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

/// [`backward`] with an explicit budget in bytes for the store of `dK`/`dV` contributions
/// ([`TILE_CACHE_BYTES`] in [`backward`]).
///
/// Writes what [`backward`] writes. With a budget of 0 (or under one key-block column's
/// contributions) the `dK`/`dV` pass recomputes `P` and `dS` instead.
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
    extras: &KernelOptions<'_>,
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
        (dq, dk, dv, None),
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

/// What [`backward_with_deltas`] writes: `(dq, dk, dv, dbias)`.
pub type BackwardOutputs<'g, T> = (&'g mut [T], &'g mut [T], &'g mut [T], Option<&'g mut [T]>);

/// [`backward_with_tile_cache`] from the [`row_deltas`] instead of the forward's output
/// (`delta` in token order, like every other tensor), writing `(dq, dk, dv, dbias)`: with
/// `dbias` (`[heads, buckets]`, for the relative-position bias of `extras`), also the bias
/// table's gradient, summed in a fixed order (per query block over its key blocks, then
/// over batch rows and query blocks), so the same call gives the same bits on any thread
/// count.
///
/// # Panics
/// If a slice length disagrees with `shape` (the caller validates shapes), or `dbias` is
/// given without a relative-position bias in `extras`.
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
    extras: &KernelOptions<'_>,
    (dq, dk, dv, dbias): BackwardOutputs<'_, T>,
    tile_cache_bytes: usize,
) {
    let n = shape.seq_len;
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
    let buckets = dbias.as_ref().map(|dbias| {
        let bias = extras
            .mods
            .bias
            .expect("backward: `dbias` without a relative-position bias");
        let count = bias.buckets.count();
        assert_eq!(
            dbias.len(),
            shape.heads * count,
            "backward: `dbias` has the wrong length"
        );
        count
    });
    if shape.numel() == 0 {
        if let Some(dbias) = dbias {
            dbias.fill(T::ZERO);
        }
        return;
    }
    let inputs = [q, k, v, delta, lse, dout];
    let plan = Plan::new(shape, layout, tile_cache_bytes, std::mem::size_of::<T>());
    let problem = Problem {
        inputs,
        shape,
        layout,
        scale,
        extras,
        plan: &plan,
    };
    // The bias gradient's partial sums, one row of buckets per (batch, head, query block).
    let query_blocks = shape.batch * shape.heads * layout.n_blocks;
    let mut sums = buckets.map(|count| vec![0.0f64; query_blocks * count]);
    run(problem, (dq, dk, dv, sums.as_deref_mut()));
    if let (Some(dbias), Some(sums), Some(count)) = (dbias, sums, buckets) {
        sum_bias_grads(&sums, shape, layout.n_blocks, count, dbias);
    }
}

/// `dbias[h, c]`: the partial sums `[batch, heads, query blocks, buckets]` summed over batch
/// rows and query blocks, in that order.
fn sum_bias_grads<T: Real>(
    sums: &[f64],
    shape: AttentionShape,
    n_blocks: usize,
    count: usize,
    dbias: &mut [T],
) {
    let mut total = vec![0.0f64; shape.heads * count];
    for (bh, head_sums) in sums.chunks(n_blocks * count).enumerate() {
        let h = bh % shape.heads;
        for row in head_sums.chunks(count) {
            for (t, &x) in total[h * count..(h + 1) * count].iter_mut().zip(row) {
                *t += x;
            }
        }
    }
    for (g, t) in dbias.iter_mut().zip(total) {
        *g = T::from_f64(t);
    }
}

/// Splits the bias gradient's partial sums into `parts` equal runs (`None`s without them).
fn split_sums(sums: Option<&mut [f64]>, parts: usize) -> Vec<Option<&mut [f64]>> {
    match sums {
        Some(sums) if parts > 0 => {
            let len = sums.len() / parts;
            sums.chunks_mut(len.max(1)).map(Some).collect()
        }
        _ => (0..parts).map(|_| None).collect(),
    }
}

/// One validated backward problem, as every pass reads it.
#[derive(Clone, Copy)]
struct Problem<'a, T> {
    /// `[q, k, v, delta, lse, dout]`, in token order.
    inputs: [&'a [T]; 6],
    shape: AttentionShape,
    layout: &'a CsrLayout<'a>,
    scale: T,
    extras: &'a KernelOptions<'a>,
    plan: &'a Plan,
}

/// The gradients `(dq, dk, dv)` a pass writes, and the partial sums of the bias gradient it
/// adds to (`[batch, heads, query blocks, buckets]`) with a relative-position bias.
type Grads<'g, T> = (&'g mut [T], &'g mut [T], &'g mut [T], Option<&'g mut [f64]>);

/// The backward pass of `problem` as its plan says.
fn run<T: Real>(problem: Problem<'_, T>, (dq, dk, dv, sums): Grads<'_, T>) {
    let Problem {
        inputs,
        shape,
        layout,
        plan,
        ..
    } = problem;
    let (d, numel, kv_numel) = (shape.head_dim, shape.numel(), shape.kv_numel());
    match (layout.order, plan.budget) {
        (_, Some(_)) => stored(problem, (dq, dk, dv, sums)),
        (None, None) => recompute(problem, (dq, dk, dv, sums)),
        (Some(order), None) => {
            // Inputs gathered to positions once, gradients scattered back.
            let widths = [d, d, d, 1, 1, d];
            let [q, k, v, delta, lse, dout] =
                std::array::from_fn(|i| all_to_positions(inputs[i], order, widths[i]));
            let [mut dq_p, mut dk_p, mut dv_p] = [numel, kv_numel, kv_numel].map(zeroed::<T>);
            let grads = (&mut dq_p[..], &mut dk_p[..], &mut dv_p[..], sums);
            let inputs = [&q[..], &k, &v, &delta, &lse, &dout];
            recompute(Problem { inputs, ..problem }, grads);
            for (g, dst) in [(&dq_p, dq), (&dk_p, dk), (&dv_p, dv)] {
                all_to_tokens(g, order, d, dst);
            }
        }
    }
}

/// How one backward call runs: the panel scratch size and, when every key-block column's
/// contributions fit the store, the store's size in slots.
struct Plan {
    /// Blocks of the longest row (the widest panel the dQ pass needs scratch for).
    longest: usize,
    /// Slots (one block's dK and dV contributions, `2 * block * d` elements) of the store,
    /// `None` to recompute instead.
    budget: Option<usize>,
    /// Active blocks of the layout (the most slots a chunk can need).
    total: usize,
    /// Largest buffers of one task for which the stored pass runs key/value groups in
    /// parallel ([`stored::PARALLEL_TASK_BYTES`]).
    parallel_task_bytes: usize,
}

impl Plan {
    fn new(shape: AttentionShape, layout: &CsrLayout<'_>, bytes: usize, elem: usize) -> Self {
        let nb = layout.n_blocks;
        let count = |ptr: &[u32], i: usize| (ptr[i + 1] - ptr[i]) as usize;
        let rows = 0..layout.layout_heads * nb;
        let longest = rows.clone().map(|i| count(layout.row_ptr, i)).max();
        let widest = rows.map(|i| count(layout.col_ptr, i)).max().unwrap_or(0);
        let budget = bytes / (2 * layout.block * shape.head_dim * elem);
        Self {
            longest: longest.unwrap_or(0),
            budget: (widest > 0 && widest <= budget).then_some(budget),
            total: layout.cols.len(),
            parallel_task_bytes: stored::PARALLEL_TASK_BYTES,
        }
    }

    fn scratch<T: Real>(&self, block: usize) -> PanelScratch<T> {
        PanelScratch::new(block, self.longest)
    }

    /// Elements of the contribution store (none without a budget).
    fn store_len(&self, block: usize, d: usize) -> usize {
        self.budget.map_or(0, |budget| budget.min(self.total)) * 2 * block * d
    }

    /// The contribution store.
    fn store<T: Real>(&self, block: usize, d: usize) -> Vec<T> {
        zeroed(self.store_len(block, d))
    }
}

impl<'a, T: Real> Slices<'a, T> {
    /// Slice `bh` of the problem's inputs `[q, k, v, delta, lse, dout]` (`k`, `v` of its
    /// key/value head).
    fn of(
        [q, k, v, delta, lse, dout]: [&'a [T]; 6],
        bh: usize,
        shape: AttentionShape,
        layout: &CsrLayout<'a>,
        extras: &KernelOptions<'a>,
    ) -> Self {
        let (n, d) = (shape.seq_len, shape.head_dim);
        let (rows, kv) = (bh * n..(bh + 1) * n, shape.kv_slice(bh));
        let (cols, kv_cols) = (bh * n * d..(bh + 1) * n * d, kv * n * d..(kv + 1) * n * d);
        Self {
            q: &q[cols.clone()],
            k: &k[kv_cols.clone()],
            v: &v[kv_cols],
            dout: &dout[cols],
            lse: &lse[rows.clone()],
            delta: &delta[rows],
            first_row: 0,
            query_order: None,
            extras: HeadOptions::new(extras, layout, bh / shape.heads, bh % shape.heads),
        }
    }

    /// `q`, `dout` (`[qe - qs, d]`), `lse` and `delta` of positions `qs..qe`, which these
    /// slices hold in position order.
    fn query_rows(&self, qs: usize, qe: usize, d: usize) -> [&'a [T]; 4] {
        debug_assert!(self.query_order.is_none() && qs >= self.first_row);
        let (s, e) = (qs - self.first_row, qe - self.first_row);
        [
            &self.q[s * d..e * d],
            &self.dout[s * d..e * d],
            &self.lse[s..e],
            &self.delta[s..e],
        ]
    }

    /// These slices with the query-side rows cut to positions `qs..qe` (gathered into
    /// `staging` under a query order).
    fn block_rows<'s>(
        &'s self,
        qs: usize,
        qe: usize,
        d: usize,
        staging: &'s mut RowStaging<T>,
    ) -> Slices<'s, T> {
        let [q, dout, lse, delta] = match self.query_order {
            None => self.query_rows(qs, qe, d),
            Some(order) => {
                let tokens = &order[qs..qe];
                let RowStaging {
                    q,
                    dout,
                    lse,
                    delta,
                } = staging;
                extend_rows(self.q, tokens, d, q);
                extend_rows(self.dout, tokens, d, dout);
                extend_rows(self.lse, tokens, 1, lse);
                extend_rows(self.delta, tokens, 1, delta);
                [&q[..], &dout[..], &lse[..], &delta[..]]
            }
        };
        Slices {
            q,
            k: self.k,
            v: self.v,
            dout,
            lse,
            delta,
            first_row: qs,
            query_order: None,
            extras: self.extras,
        }
    }
}

fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).map(|(&x, &y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::{Plan, Problem, row_deltas, run};
    use sparse_attn_kernel_types::KernelOptions;
    use sparse_attn_kernel_types::{AttentionShape, CsrLayout, FULL_BLOCK};

    /// The stored pass gives the same bits with key/value groups in parallel (each task its
    /// own store) and one after another (one shared store, each head's blocks in
    /// parallel), with and without a token order, over two column chunks per head.
    #[test]
    fn groups_in_parallel_or_in_turn_agree_bit_for_bit() {
        let (n, b, d) = (40, 8, 3);
        let nb = n / b;
        // Every block of every row (the `all` pattern); column c lists rows in order.
        let row_ptr: Vec<u32> = (0..=nb as u32).map(|r| r * nb as u32).collect();
        let cols: Vec<u32> = (0..nb * nb).map(|e| (e % nb) as u32).collect();
        let masks = vec![FULL_BLOCK; nb * nb];
        let t_rows: Vec<u32> = (0..nb * nb).map(|t| (t % nb) as u32).collect();
        let t_entries: Vec<u32> = (0..nb * nb)
            .map(|t| ((t % nb) * nb + t / nb) as u32)
            .collect();
        let order: Vec<usize> = (0..n).map(|p| (p * 7) % n).collect();
        let shape = AttentionShape {
            batch: 2,
            heads: 4,
            kv_heads: 2,
            seq_len: n,
            head_dim: d,
        };
        let mut seed = 5u64;
        let mut random = |len: usize| -> Vec<f64> {
            (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
                })
                .collect()
        };
        let (q, k, v, dout) = (
            random(shape.numel()),
            random(shape.kv_numel()),
            random(shape.kv_numel()),
            random(shape.numel()),
        );
        for order in [None, Some(&order[..])] {
            let layout = CsrLayout {
                seq_len: n,
                block: b,
                n_blocks: nb,
                layout_heads: 1,
                row_ptr: &row_ptr,
                cols: &cols,
                masks: &masks,
                col_ptr: &row_ptr,
                t_rows: &t_rows,
                t_entries: &t_entries,
                mask_bits: &[],
                mask_words: 0,
                order,
            };
            let extras = KernelOptions::default();
            let (mut out, mut lse) = (vec![0.0; shape.numel()], vec![0.0; shape.rows()]);
            crate::forward(&q, &k, &v, shape, &layout, 0.5, &extras, &mut out, &mut lse);
            let delta = row_deltas(&out, &dout, d);
            // Three columns' contributions per chunk: two chunks per head.
            let bytes = 3 * nb * 2 * b * d * std::mem::size_of::<f64>();
            let grads = |parallel_task_bytes: usize| {
                let mut plan = Plan::new(shape, &layout, bytes, std::mem::size_of::<f64>());
                plan.parallel_task_bytes = parallel_task_bytes;
                // Garbage in the gradients: every element must be written.
                let mut dq = vec![f64::NAN; shape.numel()];
                let (mut dk, mut dv) =
                    (dq[..shape.kv_numel()].to_vec(), vec![1e9; shape.kv_numel()]);
                let problem = Problem {
                    inputs: [&q[..], &k, &v, &delta, &lse, &dout],
                    shape,
                    layout: &layout,
                    scale: 0.5,
                    extras: &extras,
                    plan: &plan,
                };
                run(problem, (&mut dq[..], &mut dk[..], &mut dv[..], None));
                [dq, dk, dv].map(|g| g.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
            };
            let (parallel, in_turn) = (grads(usize::MAX), grads(0));
            assert!(parallel[0].iter().all(|&x| f64::from_bits(x).is_finite()));
            assert_eq!(parallel, in_turn, "order {:?}", order.is_some());
        }
    }
}
