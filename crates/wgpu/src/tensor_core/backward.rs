//! The tensor-core backward kernels. As in the FMA kernels, probabilities are recomputed from
//! the forward's log-sum-exp; `dQ` is a pass over the CSR rows (`S = Q Kᵀ`, `dP = dO Vᵀ`,
//! `dQ += dS K`), `dK`/`dV` a pass over the transposed lists (`Sᵀ = K Qᵀ`, `dV += Pᵀ dO`,
//! `dPᵀ = V dOᵀ`, `dK += dSᵀ Q`). Every output row has one writer: no atomics.

use cubecl::prelude::*;

use crate::options::{head_key, in_length, keep_factor, query_row, row_key};
use crate::tensor_core::FRAG;
use crate::tensor_core::stage::{
    NO_TOKEN, ProblemArgs, TensorCoreConfig, accumulate_product, key_live, load_block_fragments,
    new_a_fragments, new_accumulators, next_pair_tile, plane_task, row_sum, row_walk, scores_into,
    stage_rows, start_pair_walk, tile_column, write_rows,
};
use crate::tiles::{allowed, head_row, span, token};

/// Log-sum-exp staged for a padded-out query row in the `dK`/`dV` pass: `exp(s - LSE)` is 0.
const PADDED_LSE: f32 = 3.0e38;

/// `dQ` kernel; also writes `delta_i = dO_i . O_i` (f32, by token) for the `dK`/`dV` pass.
/// Plane `p` of cube `(block r, pair bh)` owns query positions `r * block + 16 p ..`.
#[cube(launch, launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn tc_dq_kernel<F: Float, N: Size>(
    q: &[Vector<F, N>],
    k: &[Vector<F, N>],
    v: &[Vector<F, N>],
    out: &[Vector<F, N>],
    lse: &[f32],
    dout: &[Vector<F, N>],
    dq: &mut [F],
    delta: &mut [f32],
    row_ptr: &[u32],
    cols: &[u32],
    masks: &[u32],
    mask_bits: &[u32],
    order: &[u32],
    lengths: &[u32],
    args: ProblemArgs,
    #[comptime] config: TensorCoreConfig,
    #[define(F)] _dtype: ElemType,
) {
    let n = args.seq_len;
    let at = plane_task(args.n_blocks, args.tasks, config.plane);
    let block = config.block;
    let d = config.head_dim;
    let vecs = comptime!(config.vecs());
    let tile = config.tile;
    let lpr = comptime!(config.lanes_per_row());
    let ts = comptime!(config.tile_stride());
    let bh = at.bh;
    let kv = (bh / args.heads) * args.kv_heads + (bh % args.heads) / (args.heads / args.kv_heads);
    let base = bh * n * vecs;
    let kv_base = kv * n * vecs;
    let block_start = at.blk * block;
    let block_len = span(n, block_start, block);

    let local = at.plane * FRAG + at.row;
    let pos = block_start + local;
    let valid = pos < n;
    let tok = if valid {
        token(order, pos, config.permuted)
    } else {
        0usize
    };
    let query = query_row(
        lengths,
        args.seed_lo,
        args.seed_hi,
        bh,
        args.heads,
        tok,
        valid,
        config.padded,
        config.dropout,
    );

    // delta = rowsum(dO * O), the row's lanes splitting its vectors.
    let mut delta_part = 0.0f32;
    if valid {
        for c in range_stepped(at.part, vecs, lpr) {
            let idx = base + tok * vecs + c;
            let prod =
                Vector::<f32, N>::cast_from(dout[idx]) * Vector::<f32, N>::cast_from(out[idx]);
            #[unroll]
            for x in 0..N::value() {
                delta_part += prod.extract(x);
            }
        }
    }
    let delta_i = row_sum(delta_part, lpr);
    let mut lse_i = 0.0f32;
    if valid {
        lse_i = lse[bh * n + tok];
        if at.part == 0 {
            delta[bh * n + tok] = delta_i;
        }
    }

    let mut stage = Shared::<[Vector<F, N>]>::new_slice(comptime!(2 * tile * config.row_vecs()));
    let mut scratch = Shared::<[f32]>::new_slice(comptime!(block * config.tile_stride()));
    let mut grads = Shared::<[F]>::new_slice(comptime!(block * config.tile_stride()));
    let mut key_toks = Shared::<[u32]>::new_slice(tile);
    let plane_at = at.plane * comptime!(config.plane_tile());

    let mut q_frags = new_a_fragments::<F>(config.chunks());
    let mut do_frags = new_a_fragments::<F>(config.chunks());
    load_block_fragments(
        q,
        &mut stage,
        &mut q_frags,
        order,
        base,
        block_start,
        block_len,
        &at,
        config,
    );
    load_block_fragments(
        dout,
        &mut stage,
        &mut do_frags,
        order,
        base,
        block_start,
        block_len,
        &at,
        config,
    );
    let mut dq_acc = new_accumulators(config.chunks());
    let mut probs = Array::<f32>::new(comptime!(config.per_lane()));

    let list = head_row(bh, at.blk, args.heads, args.n_blocks, args.shared_layout);
    let walk = row_walk(row_ptr, list, n, query.batch, kv_base, config);
    let mut regs = start_pair_walk(k, v, cols, order, lengths, &walk, &at, config);
    for f in 0..walk.tiles {
        #[rustfmt::skip]
        let cur = next_pair_tile(k, v, cols, order, lengths, &mut regs, &mut stage, &mut key_toks, &walk, f, &at, config);
        let mask = masks[cur.entry];
        let t0 = cur.offset;

        scores_into(&q_frags, &stage, 0, &mut scratch, plane_at, config);
        sync_plane();
        #[unroll]
        for i in 0..comptime!(config.per_lane()) {
            let col = tile_column(i, at.row, at.part, lpr, tile);
            let mut p = 0.0f32;
            if query.ok
                && key_live(&key_toks, col, cur.len, config)
                && allowed(mask_bits, mask, local, t0 + col, block, config.mask_words)
            {
                p = f32::exp(scratch[plane_at + at.row * ts + col] * args.scale - lse_i);
            }
            probs[i] = p;
        }
        sync_plane();
        scores_into(
            &do_frags,
            &stage,
            comptime!(tile * config.row_vecs()),
            &mut scratch,
            plane_at,
            config,
        );
        sync_plane();
        #[unroll]
        for i in 0..comptime!(config.per_lane()) {
            let col = tile_column(i, at.row, at.part, lpr, tile);
            let at_col = plane_at + at.row * ts + col;
            // Under dropout, dP of the kept, scaled probability.
            let mut dp = scratch[at_col];
            if config.dropout {
                let key_tok = key_toks[col];
                if key_tok != NO_TOKEN {
                    dp *= keep_factor(query.key, key_tok as usize, args.threshold, args.keep_scale);
                }
            }
            grads[at_col] = F::cast_from(probs[i] * (dp - delta_i));
        }
        sync_plane();
        accumulate_product(&grads, plane_at, &stage, 0, &mut dq_acc, config);
    }
    let dst_row = if valid { tok as u32 } else { NO_TOKEN };
    write_rows(
        &dq_acc,
        dq,
        bh * n * d,
        dst_row,
        args.scale,
        &mut scratch,
        plane_at,
        at.lane,
        config,
    );
}

/// `dK`/`dV` kernel: plane `p` of cube `(key block c, pair (batch, kv head))` owns key
/// positions `c * block + 16 p ..` and walks the query blocks that attend key block `c`
/// (the transposed lists) of every query head of its group, staging `Q`, `dO`, the
/// log-sum-exp, `delta` (and the dropout row keys) of each query tile.
///
/// `with_dk` / `with_dv` choose the gradients of this launch: both at once for head dims up
/// to 64, else one launch each so that a plane keeps two rows of fragments instead of four.
#[cube(launch, launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn tc_dkdv_kernel<F: Float, N: Size>(
    q: &[Vector<F, N>],
    k: &[Vector<F, N>],
    v: &[Vector<F, N>],
    lse: &[f32],
    dout: &[Vector<F, N>],
    delta: &[f32],
    dk: &mut [F],
    dv: &mut [F],
    col_ptr: &[u32],
    t_rows: &[u32],
    t_entries: &[u32],
    masks: &[u32],
    mask_bits: &[u32],
    order: &[u32],
    lengths: &[u32],
    args: ProblemArgs,
    #[comptime] config: TensorCoreConfig,
    #[define(F)] _dtype: ElemType,
) {
    let n = args.seq_len;
    // Tasks walk `(batch, kv head)` pairs.
    let at = plane_task(args.n_blocks, args.tasks, config.plane);
    let block = config.block;
    let d = config.head_dim;
    let vecs = comptime!(config.vecs());
    let tile = config.tile;
    let lpr = comptime!(config.lanes_per_row());
    let units = comptime!(config.units());
    let row_vecs = comptime!(config.row_vecs());
    let ts = comptime!(config.tile_stride());
    let bkv = at.bh;
    let group = args.heads / args.kv_heads;
    let batch = bkv / args.kv_heads;
    let kv_base = bkv * n * vecs;
    let block_start = at.blk * block;
    let block_len = span(n, block_start, block);

    let local = at.plane * FRAG + at.row;
    let pos = block_start + local;
    let valid = pos < n;
    let tok = if valid {
        token(order, pos, config.permuted)
    } else {
        0usize
    };
    // A padded-out key row gets no contribution (its dK and dV are written as zeros).
    let key_ok = valid && in_length(lengths, batch, tok, config.padded);

    let mut stage = Shared::<[Vector<F, N>]>::new_slice(comptime!(2 * tile * config.row_vecs()));
    let mut scratch = Shared::<[f32]>::new_slice(comptime!(block * config.tile_stride()));
    let mut grads = Shared::<[F]>::new_slice(comptime!(block * config.tile_stride()));
    let mut lse_t = Shared::<[f32]>::new_slice(tile);
    let mut delta_t = Shared::<[f32]>::new_slice(tile);
    let mut keys_t = Shared::<[u32]>::new_slice(tile);
    let plane_at = at.plane * comptime!(config.plane_tile());

    let mut k_frags = new_a_fragments::<F>(config.chunks());
    load_block_fragments(
        k,
        &mut stage,
        &mut k_frags,
        order,
        kv_base,
        block_start,
        block_len,
        &at,
        config,
    );
    let mut v_frags =
        new_a_fragments::<F>(comptime!(if config.with_dk { config.chunks() } else { 0 }));
    if config.with_dk {
        load_block_fragments(
            v,
            &mut stage,
            &mut v_frags,
            order,
            kv_base,
            block_start,
            block_len,
            &at,
            config,
        );
    }
    let mut dk_acc = new_accumulators(comptime!(if config.with_dk { config.chunks() } else { 0 }));
    let mut dv_acc = new_accumulators(comptime!(if config.with_dv { config.chunks() } else { 0 }));
    let mut probs = Array::<f32>::new(comptime!(config.per_lane()));

    for g in 0..group {
        let h = (bkv % args.kv_heads) * group + g;
        let bh = batch * args.heads + h;
        let q_base = bh * n * vecs;
        let col_list = head_row(bh, at.blk, args.heads, args.n_blocks, args.shared_layout);
        let mut hkey = 0u32;
        if config.dropout {
            hkey = head_key(args.seed_lo, args.seed_hi, batch, h);
        }
        let start = col_ptr[col_list] as usize;
        let end = col_ptr[col_list + 1] as usize;
        for te in start..end {
            let query_start = t_rows[te] as usize * block;
            let mask = masks[t_entries[te] as usize];
            let query_len = span(n, query_start, block);
            for t0 in range_stepped(0, query_len, tile) {
                let tile_len = span(query_len, t0, tile);
                sync_cube();
                stage_rows(
                    q,
                    &mut stage,
                    0,
                    order,
                    q_base,
                    query_start + t0,
                    tile_len,
                    at.unit,
                    tile,
                    vecs,
                    row_vecs,
                    units,
                    config.permuted,
                );
                stage_rows(
                    dout,
                    &mut stage,
                    comptime!(tile * config.row_vecs()),
                    order,
                    q_base,
                    query_start + t0,
                    tile_len,
                    at.unit,
                    tile,
                    vecs,
                    row_vecs,
                    units,
                    config.permuted,
                );
                if at.unit < tile {
                    let mut lse_u = f32::new(PADDED_LSE);
                    let mut delta_u = 0.0f32;
                    let mut key_u = 0u32;
                    if at.unit < tile_len {
                        let qtok = token(order, query_start + t0 + at.unit, config.permuted);
                        if in_length(lengths, batch, qtok, config.padded) {
                            lse_u = lse[bh * n + qtok];
                        }
                        delta_u = delta[bh * n + qtok];
                        if config.dropout {
                            key_u = row_key(hkey, qtok);
                        }
                    }
                    lse_t[at.unit] = lse_u;
                    delta_t[at.unit] = delta_u;
                    keys_t[at.unit] = key_u;
                }
                sync_cube();

                scores_into(&k_frags, &stage, 0, &mut scratch, plane_at, config);
                sync_plane();
                #[unroll]
                for i in 0..comptime!(config.per_lane()) {
                    let col = tile_column(i, at.row, at.part, lpr, tile);
                    let at_col = plane_at + at.row * ts + col;
                    let mut p = 0.0f32;
                    if key_ok
                        && col < tile_len
                        && allowed(mask_bits, mask, t0 + col, local, block, config.mask_words)
                    {
                        p = f32::exp(scratch[at_col] * args.scale - lse_t[col]);
                    }
                    probs[i] = p;
                    if config.with_dv {
                        let mut kept = p;
                        if config.dropout {
                            kept *= keep_factor(keys_t[col], tok, args.threshold, args.keep_scale);
                        }
                        grads[at_col] = F::cast_from(kept);
                    }
                }
                sync_plane();
                if config.with_dv {
                    accumulate_product(
                        &grads,
                        plane_at,
                        &stage,
                        comptime!(tile * config.row_vecs()),
                        &mut dv_acc,
                        config,
                    );
                }
                if config.with_dk {
                    scores_into(
                        &v_frags,
                        &stage,
                        comptime!(tile * config.row_vecs()),
                        &mut scratch,
                        plane_at,
                        config,
                    );
                    sync_plane();
                    #[unroll]
                    for i in 0..comptime!(config.per_lane()) {
                        let col = tile_column(i, at.row, at.part, lpr, tile);
                        let at_col = plane_at + at.row * ts + col;
                        let mut dp = scratch[at_col];
                        if config.dropout {
                            dp *= keep_factor(keys_t[col], tok, args.threshold, args.keep_scale);
                        }
                        grads[at_col] = F::cast_from(probs[i] * (dp - delta_t[col]));
                    }
                    sync_plane();
                    accumulate_product(&grads, plane_at, &stage, 0, &mut dk_acc, config);
                }
            }
        }
    }
    let dst_row = if valid { tok as u32 } else { NO_TOKEN };
    if config.with_dk {
        write_rows(
            &dk_acc,
            dk,
            bkv * n * d,
            dst_row,
            args.scale,
            &mut scratch,
            plane_at,
            at.lane,
            config,
        );
    }
    if config.with_dv {
        write_rows(
            &dv_acc,
            dv,
            bkv * n * d,
            dst_row,
            1.0f32,
            &mut scratch,
            plane_at,
            at.lane,
            config,
        );
    }
}
