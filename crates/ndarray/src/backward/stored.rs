//! The backward pass through the contribution store: the `dQ` pass also writes each
//! panel's `dK`/`dV` contributions, the `dK`/`dV` pass sums them per key block.

use std::ops::Range;

use rayon::prelude::*;

use super::panel::dq_block;
use super::{Plan, Slices};
use crate::extras::Extras;
use crate::layout::{AttentionShape, CsrLayout};
use crate::order::{gather, gather_into};
use crate::real::Real;
use crate::simd::avx2_dispatch;

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
pub(super) fn stored<T: Real>(
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
        match layout.order.zip(inverse.as_deref()) {
            Some((order, inverse)) => {
                let context = (shape, layout, scale, extras, plan);
                let kv_grads = (dk_g, dv_g);
                group_permuted(
                    inputs, order, inverse, bkv, heads, kv_grads, context, scratch,
                );
            }
            None => {
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
    let first_of_group = head.is_multiple_of(shape.group());
    let column = |c: usize| layout.column_entries(head, c).len();
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
