//! The fused backward pass: `dQ` over the CSR rows, `dK`/`dV` over the transposed lists.
//!
//! `P` is recomputed from the saved log-sum-exp, so nothing of size `n x n` is stored, and
//! every gradient element is owned by one task: no atomics, deterministic results.
//!
//! The `dQ` pass works on row panels (a query block and up to [`PANEL_BLOCKS`] of its key
//! blocks): with `P` and `dS` of the panel in hand it also computes the panel's `dV` and
//! `dK` contributions (`Pᵀ dO` and `dSᵀ Q`, one GEMM each for the whole panel, while `P`,
//! `dS`, `Q` and `dO` are in cache) and stores them; the `dK`/`dV` pass then only sums the
//! contributions of each key block in a fixed order. 5 GEMMs per active block, as many as
//! flash attention's backward, but all of panel size. The store holds at most
//! [`TILE_CACHE_BYTES`]: each head is processed in chunks of key-block columns whose
//! contributions fit (the `dQ` pass accumulates over the chunks in a fixed order), so memory
//! stays bounded at any `n`; only a layout with a single column over the budget recomputes
//! `P` and `dS` in the `dK`/`dV` pass (7 GEMMs per block).

use std::ops::Range;

use rayon::prelude::*;

use crate::buffer::zeroed;
use crate::extras::{Extras, HeadExtras};
use crate::layout::{AttentionShape, CsrLayout};
use crate::order::{all_to_positions, all_to_tokens, gather, gather_into};
use crate::real::Real;
use crate::simd::avx2_dispatch;
use crate::tile::{gemm, mask_tile, probabilities, scores};

/// Largest store of `dK`/`dV` contributions (bytes) the backward pass allocates: heads are
/// processed in column chunks whose contributions fit. Small enough to stay in a server
/// CPU's last-level cache between the `dQ` pass that writes it and the `dK`/`dV` pass that
/// reads it (on the 2-core development machine, with 32 MiB of L3, 4 and 8 MiB ran the
/// backward 2-4% faster than 32 MiB; 2 MiB, with many more chunks, 15% slower).
pub const TILE_CACHE_BYTES: usize = 8 << 20;

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
    let (n, d) = (shape.seq_len, shape.head_dim);
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
    let inputs = [q, k, v, delta, lse, dout];
    let plan = Plan::new(shape, layout, tile_cache_bytes, std::mem::size_of::<T>());
    match (layout.order, plan.budget) {
        (_, Some(_)) => stored(inputs, shape, layout, scale, extras, &plan, dq, dk, dv),
        (None, None) => recompute(inputs, shape, layout, scale, extras, &plan, (dq, dk, dv)),
        (Some(order), None) => {
            // Inputs gathered to positions once, gradients scattered back.
            let widths = [d, d, d, 1, 1, d];
            let [q, k, v, delta, lse, dout] =
                std::array::from_fn(|i| all_to_positions(inputs[i], order, widths[i]));
            let [mut dq_p, mut dk_p, mut dv_p] = [numel, kv_numel, kv_numel].map(zeroed::<T>);
            let grads = (&mut dq_p[..], &mut dk_p[..], &mut dv_p[..]);
            let inputs = [&q[..], &k, &v, &delta, &lse, &dout];
            recompute(inputs, shape, layout, scale, extras, &plan, grads);
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
        extras: &Extras<'_>,
    ) -> Self {
        let (n, d, heads) = (shape.seq_len, shape.head_dim, shape.heads);
        let (base, rows, kv_base) = (bh * n * d, bh * n, shape.kv_slice(bh) * n * d);
        Self {
            q: &q[base..base + n * d],
            k: &k[kv_base..kv_base + n * d],
            v: &v[kv_base..kv_base + n * d],
            dout: &dout[base..base + n * d],
            lse: &lse[rows..rows + n],
            delta: &delta[rows..rows + n],
            extras: HeadExtras::new(extras, layout, bh / heads, bh % heads),
        }
    }

    /// The inputs of slice `bh` given as one head's rows (`[q, k, v, delta, lse, dout]`,
    /// already cut to `bh` and its key/value head).
    fn head(
        [q, k, v, delta, lse, dout]: [&'a [T]; 6],
        bh: usize,
        shape: AttentionShape,
        layout: &CsrLayout<'a>,
        extras: &Extras<'_>,
    ) -> Self {
        let heads = shape.heads;
        Self {
            q,
            k,
            v,
            delta,
            lse,
            dout,
            extras: HeadExtras::new(extras, layout, bh / heads, bh % heads),
        }
    }
}

/// Memory of all tasks' buffers below which the stored backward runs its key/value groups
/// in parallel (when a head's contributions also fit the store at once), instead of one
/// head after another with only each head's blocks in parallel: small problems (few blocks
/// per head, permuted layouts with their per-head gathers) otherwise spend their time
/// waiting at each head's barriers.
const PARALLEL_GROUPS_BYTES: usize = 32 << 20;

/// The buffers of one task of the stored backward.
struct GroupScratch<T> {
    /// The contribution store.
    store: Vec<T>,
    /// A permuted layout's head in positions: `q`, `k`, `v`, `delta`, `lse`, `dout`.
    inputs: [Vec<T>; 6],
    /// A permuted layout's gradients in positions: dQ of a head, dK and dV of its group.
    grads: [Vec<T>; 3],
}

/// The backward pass through the contribution store, one key/value group (its query heads
/// in order: dK and dV sum over them) per task; groups in parallel when each task's buffers
/// are small, else one after another (each head's blocks in parallel). A permuted layout's
/// heads are gathered to positions in the task's buffers (the key/value head once per
/// group) and their gradients scattered back.
#[allow(clippy::too_many_arguments)]
fn stored<T: Real>(
    inputs: [&[T]; 6],
    shape: AttentionShape,
    layout: &CsrLayout<'_>,
    scale: T,
    extras: &Extras<'_>,
    plan: &Plan,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    let (n, d, group) = (shape.seq_len, shape.head_dim, shape.group());
    let inverse = layout.order.map(|order| {
        let mut inverse = vec![0; n];
        for (p, &t) in order.iter().enumerate() {
            inverse[t] = p;
        }
        inverse
    });
    let scratch = || GroupScratch {
        store: plan.store::<T>(layout.block, d),
        inputs: Default::default(),
        grads: Default::default(),
    };
    type Group<'g, T> = (usize, ((&'g mut [T], &'g mut [T]), &'g mut [T]));
    let task = |scratch: &mut GroupScratch<T>, (bkv, ((dq_g, dk_g), dv_g)): Group<'_, T>| {
        let first = (bkv / shape.kv_heads) * shape.heads + (bkv % shape.kv_heads) * group;
        let heads = (first..).zip(dq_g.chunks_mut(n * d));
        match (layout.order, &inverse) {
            (Some(order), Some(inverse)) => {
                let dq_dk_dv = (dk_g, dv_g);
                let context = (shape, layout, scale, extras, plan);
                group_permuted(
                    inputs, order, inverse, bkv, heads, dq_dk_dv, context, scratch,
                );
            }
            _ => {
                for (bh, dq_bh) in heads {
                    let x = Slices::of(inputs, bh, shape, layout, extras);
                    let head = bh % shape.heads;
                    let grads = (dq_bh, &mut *dk_g, &mut *dv_g);
                    stored_head(
                        &x,
                        head,
                        shape,
                        layout,
                        scale,
                        plan,
                        &mut scratch.store,
                        grads,
                    );
                }
            }
        }
    };
    let per_task = std::mem::size_of::<T>()
        * (plan.store_len(layout.block, d) + if layout.order.is_some() { 7 * n * d } else { 0 });
    let groups = dq
        .par_chunks_mut(group * n * d)
        .zip(dk.par_chunks_mut(n * d))
        .zip(dv.par_chunks_mut(n * d))
        .enumerate();
    // Small problems: a head's contributions fit the store at once, and every task's
    // buffers together stay small.
    let one_chunk = plan.budget.is_some_and(|budget| budget >= plan.total);
    if one_chunk && per_task * rayon::current_num_threads() <= PARALLEL_GROUPS_BYTES {
        groups.for_each_init(scratch, task);
    } else {
        let mut scratch = scratch();
        groups
            .collect::<Vec<_>>()
            .into_iter()
            .for_each(|item| task(&mut scratch, item));
    }
}

/// One key/value group `bkv` of a permuted layout in [`stored`]: its key/value head
/// gathered to positions once, each query head's rows gathered in turn, gradients scattered
/// back to token order (`dq` per head, `dk` and `dv` once the group is done).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn group_permuted<'a, T: Real>(
    [q, k, v, delta, lse, dout]: [&[T]; 6],
    order: &[usize],
    inverse: &[usize],
    bkv: usize,
    heads: impl Iterator<Item = (usize, &'a mut [T])>,
    (dk, dv): (&mut [T], &mut [T]),
    (shape, layout, scale, extras, plan): (AttentionShape, &CsrLayout<'_>, T, &Extras<'_>, &Plan),
    scratch: &mut GroupScratch<T>,
) {
    let (n, d) = (shape.seq_len, shape.head_dim);
    let GroupScratch {
        store,
        inputs: pos,
        grads,
    } = scratch;
    for g in grads.iter_mut() {
        // Fully written by every head (dQ) or group (dK, dV): zero-filled once per task.
        g.resize(n * d, T::ZERO);
    }
    let kv = bkv * n * d..(bkv + 1) * n * d;
    gather_into(&k[kv.clone()], order, d, &mut pos[1]);
    gather_into(&v[kv], order, d, &mut pos[2]);
    for (bh, dq_bh) in heads {
        let (rows, cols) = (bh * n..(bh + 1) * n, bh * n * d..(bh + 1) * n * d);
        gather_into(&q[cols.clone()], order, d, &mut pos[0]);
        gather_into(&delta[rows.clone()], order, 1, &mut pos[3]);
        gather_into(&lse[rows], order, 1, &mut pos[4]);
        gather_into(&dout[cols], order, d, &mut pos[5]);
        let x = Slices::head(pos.each_ref().map(|x| &x[..]), bh, shape, layout, extras);
        let [dq_p, dk_p, dv_p] = grads;
        let head_grads = (&mut dq_p[..], &mut dk_p[..], &mut dv_p[..]);
        stored_head(
            &x,
            bh % shape.heads,
            shape,
            layout,
            scale,
            plan,
            store,
            head_grads,
        );
        gather(dq_p, inverse, d, dq_bh);
    }
    gather(&grads[1], inverse, d, dk);
    gather(&grads[2], inverse, d, dv);
}

/// One head of [`stored`]: adds its dQ to `dq` and its dK, dV to `dk`, `dv` (`[n, d]`
/// each), zeroing dK and dV first when `head` is the first of its key/value group.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn stored_head<T: Real>(
    x: &Slices<'_, T>,
    head: usize,
    shape: AttentionShape,
    layout: &CsrLayout<'_>,
    scale: T,
    plan: &Plan,
    store: &mut [T],
    (dq, dk, dv): (&mut [T], &mut [T], &mut [T]),
) {
    let (n, d, b, nb) = (shape.seq_len, shape.head_dim, layout.block, layout.n_blocks);
    let (lh, first_of_group) = (layout.layout_head(head), head.is_multiple_of(shape.group()));
    let column =
        |c: usize| (layout.col_ptr[lh * nb + c + 1] - layout.col_ptr[lh * nb + c]) as usize;
    let (budget, tile) = (plan.budget.unwrap_or(0), 2 * b * d);
    let mut c0 = 0;
    while c0 < nb {
        // The widest run of columns whose contributions fit (at least one: the plan checked
        // the widest column).
        let (mut c1, mut count) = (c0, 0);
        while c1 < nb && count + column(c1) <= budget {
            count += column(c1);
            c1 += 1;
        }
        let slots = ChunkSlots::new(layout, head, c0..c1);
        let mut rows = Vec::with_capacity(nb);
        let mut rest = &mut store[..];
        for r in 0..nb {
            let (mine, tail) = rest.split_at_mut(slots.rows[r].len() * tile);
            rows.push(mine);
            rest = tail;
        }
        dq.par_chunks_mut(b * d)
            .zip(rows.into_par_iter())
            .zip(slots.rows.par_iter())
            .enumerate()
            .for_each_init(
                || plan.scratch(b),
                |scratch, (r, ((dq_r, store), entries))| {
                    // dQ accumulates over the chunks, from zero.
                    if c0 == 0 {
                        dq_r.fill(T::ZERO);
                    }
                    let entries = entries.clone();
                    dq_block(x, d, layout, r, entries, scale, dq_r, scratch, Some(store))
                },
            );
        let store = &store[..];
        let end = (c1 * b).min(n) * d;
        dk[c0 * b * d..end]
            .par_chunks_mut(b * d)
            .zip(dv[c0 * b * d..end].par_chunks_mut(b * d))
            .enumerate()
            .for_each(|(i, (dk_c, dv_c))| {
                // dK and dV accumulate over the query heads of a group, from zero.
                if first_of_group {
                    dk_c.fill(T::ZERO);
                    dv_c.fill(T::ZERO);
                }
                dkv_block_stored(x, d, layout, head, c0 + i, store, &slots, dk_c, dv_c)
            });
        c0 = c1;
    }
}

/// The backward pass without a store (a key-block column's contributions exceed the
/// budget): dQ over the rows, then dK and dV over the columns recomputing `P` and `dS`.
#[allow(clippy::type_complexity)]
fn recompute<T: Real>(
    inputs: [&[T]; 6],
    shape: AttentionShape,
    layout: &CsrLayout<'_>,
    scale: T,
    extras: &Extras<'_>,
    plan: &Plan,
    (dq, dk, dv): (&mut [T], &mut [T], &mut [T]),
) {
    let (n, d, b, heads, group) = (
        shape.seq_len,
        shape.head_dim,
        layout.block,
        shape.heads,
        shape.group(),
    );
    let slices = |bh: usize| Slices::of(inputs, bh, shape, layout, extras);
    dq.par_chunks_mut(n * d)
        .enumerate()
        .for_each(|(bh, dq_bh)| {
            let x = slices(bh);
            dq_bh.par_chunks_mut(b * d).enumerate().for_each_init(
                || plan.scratch(b),
                |scratch, (r, dq_r)| {
                    dq_r.fill(T::ZERO);
                    let entries = layout.row_entries(bh % heads, r);
                    dq_block(&x, d, layout, r, entries, scale, dq_r, scratch, None);
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
                .for_each(|(c, (dk_c, dv_c))| {
                    dk_c.fill(T::ZERO);
                    dv_c.fill(T::ZERO);
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

/// Where the `dQ` pass of one chunk of key-block columns stores its contributions: row
/// `r`'s entries in the chunk are `rows[r]` (a sub-range of its CSR row, columns being
/// sorted), stored in order from slot `starts[r]` on (a slot is `2 * block * d` elements).
struct ChunkSlots {
    rows: Vec<Range<usize>>,
    starts: Vec<usize>,
    /// Keys of each row's entries in the chunk.
    widths: Vec<usize>,
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
        let widths = rows.iter().map(|row| layout.width(row.clone())).collect();
        Self {
            rows,
            starts,
            widths,
        }
    }

    /// Where the contributions of entry `e` of row `r` are: its `dV` contribution is the
    /// `[bk, d]` block at the returned offset, its `dK` contribution the one `width * d`
    /// further (row `r` stores all its `dV` contributions, then all its `dK` ones).
    fn tile(&self, layout: &CsrLayout<'_>, d: usize, r: usize, e: usize) -> (usize, usize) {
        let b = layout.block;
        // Only the last key block can be partial, and it sorts last: every block before
        // `e` has `b` keys.
        let keys_before = (e - self.rows[r].start) * b;
        (
            self.starts[r] * 2 * b * d + keys_before * d,
            self.widths[r] * d,
        )
    }
}

/// Most key blocks of one `dQ` panel (its scratch is two `b x PANEL_BLOCKS * b` tiles).
const PANEL_BLOCKS: usize = 16;

/// Scratch of one task of the `dQ` pass: `P` and `dS` of a panel.
struct PanelScratch<T> {
    p: Vec<T>,
    ds: Vec<T>,
}

impl<T: Real> PanelScratch<T> {
    /// Scratch for panels of up to `blocks` (at most [`PANEL_BLOCKS`]) blocks of `block`.
    fn new(block: usize, blocks: usize) -> Self {
        let len = block * blocks.min(PANEL_BLOCKS) * block;
        Self {
            p: vec![T::ZERO; len],
            ds: vec![T::ZERO; len],
        }
    }
}

/// Adds to `dQ` of query block `r` the sum over its `entries` (key blocks) of `dS K * scale`,
/// panel by panel of at most [`PANEL_BLOCKS`] blocks. With a `store` (the row's slots:
/// `[width, d]` of `dV` contributions then `[width, d]` of `dK` ones, width the entries'
/// keys), also writes there each panel's `Pᵀ dO` and `dSᵀ Q * scale`.
#[allow(clippy::too_many_arguments)]
fn dq_block<T: Real>(
    x: &Slices<'_, T>,
    d: usize,
    layout: &CsrLayout<'_>,
    r: usize,
    entries: Range<usize>,
    scale: T,
    dq: &mut [T],
    scratch: &mut PanelScratch<T>,
    mut store: Option<&mut [T]>,
) {
    // Rows past the valid length (no token order): P = 0, nothing to add or store.
    if entries.is_empty() || x.extras.block_past_end(r) {
        return;
    }
    let (qs, qe) = layout.block_range(r);
    let bq = qe - qs;
    let width = layout.width(entries.clone());
    let mut done = 0;
    for lo in entries.clone().step_by(PANEL_BLOCKS) {
        let part = lo..(lo + PANEL_BLOCKS).min(entries.end);
        let w = layout.width(part.clone());
        let (p, ds) = (&mut scratch.p[..bq * w], &mut scratch.ds[..bq * w]);
        let contributions = store.as_deref_mut().map(|store| {
            let (dv, dk) = store.split_at_mut(width * d);
            (
                &mut dv[done * d..(done + w) * d],
                &mut dk[done * d..(done + w) * d],
            )
        });
        dq_panel(x, d, layout, r, part, scale, dq, p, ds, contributions);
        done += w;
    }
}

avx2_dispatch! {
/// The `dQ` work of one panel: `P` and `dS` of `entries` as `[bq x width]` panels in `p` and
/// `ds` (row stride `width`), with a GEMM per run of consecutive key blocks for the scores,
/// for `dP` and for `dQ`. With `contributions` (`[width, d]` each), also the panel's `dV`
/// and `dK` contributions: `Pᵀ dO` (`P` after dropout) and `dSᵀ Q * scale`.
fn dq_panel<T: Real>(
    x: &Slices<'_, T>,
    d: usize,
    layout: &CsrLayout<'_>,
    r: usize,
    entries: Range<usize>,
    scale: T,
    dq: &mut [T],
    p: &mut [T],
    ds: &mut [T],
    contributions: Option<(&mut [T], &mut [T])>,
) {
    let b = layout.block;
    let (qs, qe) = layout.block_range(r);
    let bq = qe - qs;
    let width = p.len() / bq;
    let e0 = entries.start;
    let (q, dout) = (&x.q[qs * d..qe * d], &x.dout[qs * d..qe * d]);
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
    // Masks and padding per tile; P over whole rows.
    for e in entries.clone() {
        let (ks, ke) = layout.block_range(layout.cols[e] as usize);
        let off = (e - e0) * b;
        if let Some(bits) = layout.mask_of(e) {
            mask_tile(&mut p[off..], width, bq, ke - ks, bits, b);
        }
        x.extras.mask_padding(&mut p[off..], width, qs, bq, ks, ke - ks);
    }
    probabilities(p, &x.lse[qs..qe], width);
    // With dropout, dP of the kept (scaled) probabilities: dO Vᵀ times the keep factor.
    for e in entries.clone() {
        let (ks, ke) = layout.block_range(layout.cols[e] as usize);
        x.extras.drop(&mut ds[(e - e0) * b..], width, qs, bq, ks, ke - ks);
    }
    softmax_grad(p, ds, &x.delta[qs..qe], width);
    // dQ += dS K * scale, one GEMM per run.
    for run in layout.runs(entries.clone(), usize::MAX) {
        let (off, ks, ke) = keys(&run);
        let k = &x.k[ks * d..ke * d];
        gemm(bq, ke - ks, d, scale, (&ds[off..], width, 1), (k, d, 1), T::ONE, dq, d);
    }
    if let Some((dv, dk)) = contributions {
        // dV needs the probabilities as the forward used them: after dropout.
        for e in entries {
            let (ks, ke) = layout.block_range(layout.cols[e] as usize);
            x.extras.drop(&mut p[(e - e0) * b..], width, qs, bq, ks, ke - ks);
        }
        gemm(width, bq, d, T::ONE, (p, 1, width), (dout, d, 1), T::ZERO, dv, d);
        gemm(width, bq, d, scale, (ds, 1, width), (q, d, 1), T::ZERO, dk, d);
    }
}
}

avx2_dispatch! {
/// Adds to `dK` and `dV` of key block `c` the contributions the `dQ` pass stored for it (in
/// `store`, slots in `slots`), in the order of the query blocks.
fn dkv_block_stored<T: Real>(
    x: &Slices<'_, T>,
    d: usize,
    layout: &CsrLayout<'_>,
    head: usize,
    c: usize,
    store: &[T],
    slots: &ChunkSlots,
    dk: &mut [T],
    dv: &mut [T],
) {
    if x.extras.block_past_end(c) {
        return;
    }
    let len = dk.len();
    for t in layout.column_entries(head, c) {
        let r = layout.t_rows[t] as usize;
        if x.extras.block_past_end(r) {
            continue;
        }
        let (at, dk_offset) = slots.tile(layout, d, r, layout.t_entries[t] as usize);
        for (g, &y) in dv.iter_mut().zip(&store[at..at + len]) {
            *g += y;
        }
        for (g, &y) in dk.iter_mut().zip(&store[at + dk_offset..at + dk_offset + len]) {
            *g += y;
        }
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
