//! The backward pass through the contribution store: the `dQ` pass also writes each
//! panel's `dK`/`dV` contributions, the `dK`/`dV` pass sums them per key block.

use std::ops::Range;

use rayon::prelude::*;

use super::panel::dq_block;
use super::{Grads, Plan, Problem, Slices};
use crate::layout::{AttentionShape, CsrLayout};
use crate::order::gather_into;
use crate::real::Real;
use crate::rows::PositionRows;
use crate::simd::avx2_dispatch;

/// Largest buffers of one task of the stored backward (its store and, under a permuted
/// layout, its key/value head's rows in positions) for which key/value groups run in parallel, each
/// concurrent task with buffers of its own; above it (permuted layouts at large `n`) groups
/// run one after another, so the scratch stays one task's worth. One head after another,
/// with only each head's blocks in parallel, waits at two barriers per column chunk: on a
/// 16-core host, groups in parallel ran the backward 1.3-1.9x faster (n = 8192 and 32768,
/// H = 8; neutral on 2 cores).
pub(super) const PARALLEL_TASK_BYTES: usize = 20 << 20;

/// The buffers of one task of the stored backward.
struct GroupScratch<T> {
    /// The contribution store.
    store: Vec<T>,
    /// A permuted layout's key/value head in positions: `k`, `v`.
    kv: [Vec<T>; 2],
}

/// The backward pass through the contribution store, one key/value group (its query heads
/// in order: dK and dV sum over them) per task; groups in parallel when each task's buffers
/// are small, else one after another (each head's blocks in parallel). A permuted layout's
/// key/value head is gathered to positions in the task's buffers once per group, its
/// query-side rows a block at a time by the dQ pass; its gradients are written block by
/// block straight to token order ([`PositionRows`]).
pub(super) fn stored<T: Real>(problem: Problem<'_, T>, (dq, dk, dv): Grads<'_, T>) {
    let Problem {
        inputs,
        shape,
        layout,
        scale,
        extras,
        plan,
    } = problem;
    let (n, d, group) = (shape.seq_len, shape.head_dim, shape.group());
    let order = layout.order;
    let scratch = || GroupScratch {
        store: plan.store::<T>(layout.block, d),
        kv: Default::default(),
    };
    type Group<'g, T> = (usize, ((&'g mut [T], &'g mut [T]), &'g mut [T]));
    let task = |scratch: &mut GroupScratch<T>, (bkv, ((dq_g, dk_g), dv_g)): Group<'_, T>| {
        let first = (bkv / shape.kv_heads) * shape.heads + (bkv % shape.kv_heads) * group;
        let GroupScratch { store, kv } = scratch;
        let (mut dk, mut dv) = (
            PositionRows::new(dk_g, d, order),
            PositionRows::new(dv_g, d, order),
        );
        if let Some(order) = order {
            let kv_rows = bkv * n * d..(bkv + 1) * n * d;
            gather_into(&inputs[1][kv_rows.clone()], order, d, &mut kv[0]);
            gather_into(&inputs[2][kv_rows], order, d, &mut kv[1]);
        }
        for (bh, dq_bh) in (first..).zip(dq_g.chunks_mut(n * d)) {
            let x = Slices::of(inputs, bh, shape, layout, extras);
            let x = match order {
                // Query-side rows stay in token order (the dQ pass gathers a block's);
                // keys and values come from the group's gathered head.
                Some(order) => Slices {
                    k: &kv[0],
                    v: &kv[1],
                    query_order: Some(order),
                    ..x
                },
                None => x,
            };
            let dq = PositionRows::new(dq_bh, d, order);
            let grads = (dq, &mut dk, &mut dv);
            let head = bh % shape.heads;
            stored_head(&x, head, shape, layout, scale, plan, store, grads);
        }
    };
    let per_task = std::mem::size_of::<T>()
        * (plan.store_len(layout.block, d) + if order.is_some() { 2 * n * d } else { 0 });
    let groups = dq
        .par_chunks_mut(group * n * d)
        .zip(dk.par_chunks_mut(n * d))
        .zip(dv.par_chunks_mut(n * d))
        .enumerate();
    if per_task <= plan.parallel_task_bytes {
        groups.for_each_init(scratch, task);
    } else {
        let mut scratch = scratch();
        groups
            .collect::<Vec<_>>()
            .into_iter()
            .for_each(|item| task(&mut scratch, item));
    }
}

/// One head of [`stored`]: adds its dQ to `dq` and its dK, dV to `dk`, `dv` (`[n, d]`
/// each, addressed by position), writing dK and dV instead when `head` is the first of
/// its key/value group.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn stored_head<T: Real>(
    x: &Slices<'_, T>,
    head: usize,
    shape: AttentionShape,
    layout: &CsrLayout<'_>,
    scale: T,
    plan: &Plan,
    store: &mut [T],
    (mut dq, dk, dv): (
        PositionRows<'_, T>,
        &mut PositionRows<'_, T>,
        &mut PositionRows<'_, T>,
    ),
) {
    let (d, b, nb) = (shape.head_dim, layout.block, layout.n_blocks);
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
        dq.par_blocks(b, 0..nb)
            .zip(rows.into_par_iter())
            .zip(slots.rows.par_iter())
            .enumerate()
            .for_each_init(
                || (plan.scratch(b), Vec::new()),
                |(scratch, staging), (r, ((dq_r, store), entries))| {
                    // dQ accumulates over the chunks; the first one writes it.
                    let fresh = c0 == 0;
                    dq_r.update(fresh, staging, |dq_r| {
                        let (entries, dq_r) = (entries.clone(), (dq_r, fresh));
                        dq_block(x, d, layout, r, entries, scale, dq_r, scratch, Some(store))
                    })
                },
            );
        let store = &store[..];
        dk.par_blocks(b, c0..c1)
            .zip(dv.par_blocks(b, c0..c1))
            .enumerate()
            .for_each_init(
                || (Vec::new(), Vec::new()),
                |(dk_staging, dv_staging), (i, (dk_c, dv_c))| {
                    // dK and dV accumulate over the query heads of a group; the first one
                    // writes them.
                    let fresh = first_of_group;
                    let sum = |dk_c: &mut [T], dv_c: &mut [T]| {
                        let c = c0 + i;
                        dkv_block_stored(x, d, layout, head, c, store, &slots, dk_c, dv_c, fresh)
                    };
                    dk_c.update(fresh, dk_staging, |dk_c| {
                        dv_c.update(fresh, dv_staging, |dv_c| sum(dk_c, dv_c))
                    })
                },
            );
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

/// Elements of a `dK`/`dV` block summed at a time over all its contributions: the partial
/// sum stays in L1 while the contributions stream from the store.
const SUM_CHUNK: usize = 256;

avx2_dispatch! {
/// Adds to `dK` and `dV` of key block `c` the contributions the `dQ` pass stored for it (in
/// `store`, slots in `slots`), in the order of the query blocks; with `fresh`, writes their
/// sum instead (whatever `dk` and `dv` held).
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
    fresh: bool,
) {
    let len = dk.len();
    // Where each contribution's dV block starts (its dK block is `dk_offset` further).
    let mut tiles = Vec::new();
    if !x.extras.block_past_end(c) {
        for t in layout.column_entries(head, c) {
            let r = layout.t_rows[t] as usize;
            if !x.extras.block_past_end(r) {
                tiles.push(slots.tile(layout, d, r, layout.t_entries[t] as usize));
            }
        }
    }
    for (grad, dk_part) in [(dv, false), (dk, true)] {
        for (start, chunk) in (0..len).step_by(SUM_CHUNK).zip(grad.chunks_mut(SUM_CHUNK)) {
            let mut added = !fresh;
            for &(at, dk_offset) in &tiles {
                let at = at + start + if dk_part { dk_offset } else { 0 };
                let part = &store[at..at + chunk.len()];
                if added {
                    for (g, &y) in chunk.iter_mut().zip(part) {
                        *g += y;
                    }
                } else {
                    chunk.copy_from_slice(part);
                    added = true;
                }
            }
            if !added {
                chunk.fill(T::ZERO);
            }
        }
    }
}
}
