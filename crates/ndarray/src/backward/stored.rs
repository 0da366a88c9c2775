//! The backward pass through the contribution store: the `dQ` pass also writes each
//! panel's `dK`/`dV` contributions, the `dK`/`dV` pass sums them per key block.

use std::ops::Range;

use rayon::prelude::*;

use super::panel::dq_block;
use super::{Grads, Plan, Problem, Slices, split_sums};
use crate::order::gather_into;
use crate::real::Real;
use crate::rows::PositionRows;
use crate::simd::avx2_dispatch;
use sparse_attn_kernel_types::{AttentionShape, CsrLayout};

/// Largest buffers of one task of the stored backward (its store and, under a permuted
/// layout, its key/value head's rows in positions) for which key/value groups run in parallel, each
/// concurrent task with buffers of its own; above it (permuted layouts at large `n`) groups
/// run one after another, so the scratch stays one task's worth. One head after another,
/// with only each head's blocks in parallel, waits at two barriers per column chunk, which
/// leaves cores idle when there are many of them.
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
pub(super) fn stored<T: Real>(problem: Problem<'_, T>, (dq, dk, dv, sums): Grads<'_, T>) {
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
    type Group<'g, T> = (
        usize,
        (
            ((&'g mut [T], &'g mut [T]), &'g mut [T]),
            Option<&'g mut [f64]>,
        ),
    );
    let task = |scratch: &mut GroupScratch<T>,
                (bkv, (((dq_g, dk_g), dv_g), sums_g)): Group<'_, T>| {
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
        let sums_g = split_sums(sums_g, group);
        for ((bh, dq_bh), sums_bh) in (first..).zip(dq_g.chunks_mut(n * d)).zip(sums_g) {
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
            let grads = (dq, &mut dk, &mut dv, sums_bh);
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
        .zip(split_sums(sums, shape.batch * shape.kv_heads))
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
/// its key/value group; adds its bias gradient's partial sums to the last (one row of
/// buckets per query block).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn stored_head<T: Real>(
    x: &Slices<'_, T>,
    head: usize,
    shape: AttentionShape,
    layout: &CsrLayout<'_>,
    scale: T,
    plan: &Plan,
    store: &mut [T],
    (mut dq, dk, dv, mut sums): (
        PositionRows<'_, T>,
        &mut PositionRows<'_, T>,
        &mut PositionRows<'_, T>,
        Option<&mut [f64]>,
    ),
) {
    let (d, b, nb) = (shape.head_dim, layout.block, layout.n_blocks);
    let first_of_group = head.is_multiple_of(shape.group());
    let column = |c: usize| layout.column_entries(head, c).len();
    let (budget, tile) = (plan.budget.unwrap_or(0), 2 * b * d);
    let mut slots = ChunkSlots::new(nb);
    let mut c0 = 0;
    while c0 < nb {
        // The widest run of columns whose contributions fit (at least one: the plan checked
        // the widest column).
        let (mut c1, mut count) = (c0, 0);
        while c1 < nb && count + column(c1) <= budget {
            count += column(c1);
            c1 += 1;
        }
        // dQ accumulates over the chunks; the first one writes every row, the others visit
        // only the rows with entries in their columns.
        let fresh = c0 == 0;
        slots.fill(layout, head, c0..c1, fresh);
        let mut stores = Vec::with_capacity(slots.touched.len());
        let mut rest = &mut store[..];
        for row in &slots.rows {
            let (mine, tail) = rest.split_at_mut(row.len() * tile);
            stores.push(mine);
            rest = tail;
        }
        let touched = |r: &usize| slots.index[*r] != UNTOUCHED;
        let blocks: Vec<_> = dq
            .par_blocks(b, 0..nb)
            .enumerate()
            .filter(|(r, _)| touched(r))
            .map(|(_, block)| block)
            .collect();
        let block_sums: Vec<_> = split_sums(sums.as_deref_mut(), nb)
            .into_iter()
            .enumerate()
            .filter(|(r, _)| touched(r))
            .map(|(_, s)| s)
            .collect();
        blocks
            .into_par_iter()
            .zip(stores.into_par_iter().zip(block_sums))
            .zip(slots.touched.par_iter().zip(slots.rows.par_iter()))
            .for_each_init(
                || (plan.scratch(b), Vec::new()),
                |(scratch, staging), ((dq_r, (store, sums_r)), (&r, entries))| {
                    dq_r.update(fresh, staging, |dq_r| {
                        let (entries, dq_r) = (entries.clone(), (dq_r, fresh));
                        let store = Some(store);
                        dq_block(
                            x, d, layout, r, entries, scale, dq_r, scratch, store, sums_r,
                        )
                    })
                },
            );
        let store = &store[..];
        dk.par_blocks(b, c0..c1)
            .zip(dv.par_blocks(b, c0..c1))
            .enumerate()
            .for_each_init(
                || (Vec::new(), Vec::new(), Vec::new()),
                |(dk_staging, dv_staging, tiles), (i, (dk_c, dv_c))| {
                    // dK and dV accumulate over the query heads of a group; the first one
                    // writes them.
                    let fresh = first_of_group;
                    let mut sum = |dk_c: &mut [T], dv_c: &mut [T]| {
                        let c = c0 + i;
                        let (grads, slots) = ((dk_c, dv_c), (&slots, &mut *tiles));
                        dkv_block_stored(x, d, layout, head, c, store, slots, grads, fresh)
                    };
                    dk_c.update(fresh, dk_staging, |dk_c| {
                        dv_c.update(fresh, dv_staging, |dv_c| sum(dk_c, dv_c))
                    })
                },
            );
        slots.clear();
        c0 = c1;
    }
}

/// Marks a query block with no entries in the current chunk.
const UNTOUCHED: usize = usize::MAX;

/// Where the `dQ` pass of one chunk of key-block columns stores its contributions: the
/// query blocks with entries in the chunk are `touched` (ascending); the `i`-th one's
/// entries are `rows[i]` (a sub-range of its CSR row, columns being sorted), stored in order
/// from slot `starts[i]` on (a slot is `2 * block * d` elements). Built from the transposed
/// lists, so a chunk costs what its entries cost, not the number of query blocks; reused
/// from chunk to chunk of a head.
struct ChunkSlots {
    touched: Vec<usize>,
    /// Index into `touched` of each query block, [`UNTOUCHED`] for the others.
    index: Vec<usize>,
    rows: Vec<Range<usize>>,
    starts: Vec<usize>,
    /// Keys of each touched block's entries in the chunk.
    widths: Vec<usize>,
}

impl ChunkSlots {
    /// Empty slots for a layout of `n_blocks` query blocks.
    fn new(n_blocks: usize) -> Self {
        Self {
            touched: Vec::new(),
            index: vec![UNTOUCHED; n_blocks],
            rows: Vec::new(),
            starts: Vec::new(),
            widths: Vec::new(),
        }
    }

    /// The slots of the key-block `columns` of `head`, for every query block when `all`
    /// (the first chunk, which writes every `dQ` row), else for those with entries there.
    fn fill(&mut self, layout: &CsrLayout<'_>, head: usize, columns: Range<usize>, all: bool) {
        if all {
            self.touched.extend(0..layout.n_blocks);
        } else {
            for c in columns.clone() {
                let rows = &layout.t_rows[layout.column_entries(head, c)];
                self.touched.extend(rows.iter().map(|&r| r as usize));
            }
            self.touched.sort_unstable();
            self.touched.dedup();
        }
        let mut next = 0;
        for (i, &r) in self.touched.iter().enumerate() {
            let all = layout.row_entries(head, r);
            let cols = &layout.cols[all.clone()];
            let lo = all.start + cols.partition_point(|&c| (c as usize) < columns.start);
            let hi = all.start + cols.partition_point(|&c| (c as usize) < columns.end);
            self.index[r] = i;
            self.rows.push(lo..hi);
            self.starts.push(next);
            self.widths.push(layout.width(lo..hi));
            next += hi - lo;
        }
    }

    /// Forgets the chunk (in time proportional to its touched blocks).
    fn clear(&mut self) {
        for &r in &self.touched {
            self.index[r] = UNTOUCHED;
        }
        self.touched.clear();
        self.rows.clear();
        self.starts.clear();
        self.widths.clear();
    }

    /// Where the contributions of entry `e` of row `r` are: its `dV` contribution is the
    /// `[bk, d]` block at the returned offset, its `dK` contribution the one `width * d`
    /// further (row `r` stores all its `dV` contributions, then all its `dK` ones).
    fn tile(&self, layout: &CsrLayout<'_>, d: usize, r: usize, e: usize) -> (usize, usize) {
        let b = layout.block;
        // Only the last key block can be partial, and it sorts last: every block before
        // `e` has `b` keys.
        let i = self.index[r];
        let keys_before = (e - self.rows[i].start) * b;
        (
            self.starts[i] * 2 * b * d + keys_before * d,
            self.widths[i] * d,
        )
    }
}

/// Elements of a `dK`/`dV` block summed at a time over all its contributions: the partial
/// sum stays in L1 while the contributions stream from the store.
const SUM_CHUNK: usize = 256;

avx2_dispatch! {
/// Adds to `dK` and `dV` of key block `c` the contributions the `dQ` pass stored for it (in
/// `store`, slots in `slots`; `tiles` is scratch for their offsets), in the order of the
/// query blocks; with `fresh`, writes their sum instead (whatever `dk` and `dv` held).
fn dkv_block_stored<T: Real>(
    x: &Slices<'_, T>,
    d: usize,
    layout: &CsrLayout<'_>,
    head: usize,
    c: usize,
    store: &[T],
    slots: (&ChunkSlots, &mut Vec<(usize, usize)>),
    grads: (&mut [T], &mut [T]),
    fresh: bool,
) {
    let ((slots, tiles), (dk, dv)) = (slots, grads);
    let len = dk.len();
    // Where each contribution's dV block starts (its dK block is `dk_offset` further).
    tiles.clear();
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
            for &(at, dk_offset) in tiles.iter() {
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
