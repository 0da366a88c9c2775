//! The tensor-core backward kernels. As in the FMA kernels, probabilities are recomputed from
//! the forward's log-sum-exp; `dQ` is a pass over the CSR rows (`S = Q Kᵀ`, `dP = dO Vᵀ`,
//! `dQ += dS K`), `dK`/`dV` a pass over the transposed lists (`Sᵀ = K Qᵀ`, `dV += Pᵀ dO`,
//! `dPᵀ = V dOᵀ`, `dK += dSᵀ Q`). Every output row has one writer: no atomics.

use cubecl::prelude::*;

use crate::args::ProblemArgs;

use crate::backward::sum_buckets;
use crate::options::{
    ScoreMod, head_key, in_length, keep_factor, modify_score, query_row, relative_bucket, row_key,
    score_grad, score_mod,
};
use crate::tensor_core::FRAG;
use crate::tensor_core::stage::{
    NO_TOKEN, PlaneTask, TensorCoreConfig, TileAt, accumulate_product, fetch_rows, key_live,
    load_block_fragments, new_a_fragments, new_accumulators, next_pair_tile, per_unit, plane_task,
    row_sum, row_walk, scores_into, start_pair_walk, store_rows, tile_at, tile_column, write_rows,
};
use crate::tiles::{FULL, allowed, head_row, span, token};

/// Log-sum-exp staged for a padded-out query row in the `dK`/`dV` pass: `exp(s - LSE)` is 0.
const PADDED_LSE: f32 = 3.0e38;

/// `dQ` kernel; also writes `delta_i = dO_i . O_i` (f32, by token) for the `dK`/`dV` pass.
/// Plane `p` of cube `(block r, pair bh)` owns query positions `r * block + 16 p ..`. With
/// `bias_grad`, each unit also sums the scores' gradients `P (dP - delta)` of its elements
/// per bucket of the relative-position bias, and the cube adds them up in a fixed tree into
/// `bias_sums[(bh * n_blocks + r) * buckets + bucket]` (no atomics).
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
    slopes: &[f32],
    bias_sums: &mut [f32],
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
    let mods = score_mod(
        slopes,
        args.softcap,
        bh % args.heads,
        args.heads,
        config.alibi,
        config.relative,
    );
    let buckets = comptime!(if config.bias_grad { config.buckets } else { 1 });
    let mut bucket_sums = Array::<f32>::new(buckets);
    for c in 0..buckets {
        bucket_sums[c] = 0.0f32;
    }
    // The soft-cap's derivative of each score, kept from the score pass to the dS pass.
    let mut cap_grads = Array::<f32>::new(comptime!(if config.softcap {
        config.per_lane()
    } else {
        1
    }));

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
        let row_at = plane_at + at.row * ts;
        // A full tile of a full block needs no test per element.
        if comptime!(!config.padded) && query.ok && mask == FULL && cur.len == tile {
            #[unroll]
            for i in 0..comptime!(config.per_lane()) {
                let col = tile_column(i, at.row, at.part, lpr, tile);
                let raw = scratch[row_at + col] * args.scale;
                let key_tok = staged_key_token(&key_toks, col, config);
                #[rustfmt::skip]
                let p = recomputed_prob(raw, lse_i, tok, key_tok, &mods, slopes, &mut cap_grads, i, config);
                probs[i] = p;
            }
        } else {
            #[unroll]
            for i in 0..comptime!(config.per_lane()) {
                let col = tile_column(i, at.row, at.part, lpr, tile);
                let mut p = 0.0f32;
                if query.ok
                    && key_live(&key_toks, col, cur.len, config)
                    && allowed(mask_bits, mask, local, t0 + col, block, config.mask_words)
                {
                    let raw = scratch[row_at + col] * args.scale;
                    let key_tok = staged_key_token(&key_toks, col, config);
                    #[rustfmt::skip]
                    let prob = recomputed_prob(raw, lse_i, tok, key_tok, &mods, slopes, &mut cap_grads, i, config);
                    p = prob;
                }
                probs[i] = p;
            }
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
            let mut ds = probs[i] * (dp - delta_i);
            if config.bias_grad {
                // The bias is added last: its gradient is dS before the cap's derivative.
                let key_tok = staged_key_token(&key_toks, col, config);
                bucket_sums[relative_bucket(slopes, tok, key_tok, &mods)] += ds;
            }
            if config.softcap {
                ds *= cap_grads[i];
            }
            grads[at_col] = F::cast_from(ds);
        }
        sync_plane();
        accumulate_product(&grads, plane_at, &stage, 0, &mut dq_acc, config);
    }
    if config.bias_grad {
        // `scratch` (block x tile stride f32) is free once the last tile's products are in.
        sync_cube();
        let first = (bh * args.n_blocks + at.blk) * buckets;
        #[rustfmt::skip]
        sum_buckets(&bucket_sums, &mut scratch, bias_sums, first, at.unit, comptime!(config.units()), buckets);
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
    slopes: &[f32],
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
    let mut cap_grads = Array::<f32>::new(comptime!(if config.softcap {
        config.per_lane()
    } else {
        1
    }));

    for g in 0..group {
        let h = (bkv % args.kv_heads) * group + g;
        let bh = batch * args.heads + h;
        let q_base = bh * n * vecs;
        let col_list = head_row(bh, at.blk, args.heads, args.n_blocks, args.shared_layout);
        let mut hkey = 0u32;
        if config.dropout {
            hkey = head_key(args.seed_lo, args.seed_hi, batch, h);
        }
        let mods = score_mod(
            slopes,
            args.softcap,
            h,
            args.heads,
            config.alibi,
            config.relative,
        );
        let start = col_ptr[col_list] as usize;
        let end = col_ptr[col_list + 1] as usize;
        let tiles = (end - start) * comptime!(block / tile);
        let mut regs = QueryTileRegs::<F, N>::new(config);
        let first = tile_at(t_rows, start, 0, n, block, tile, tiles > 0);
        #[rustfmt::skip]
        fetch_query_tile(q, dout, lse, delta, lengths, order, &mut regs, q_base, bh * n, batch, hkey, &first, &at, config);
        for f in 0..tiles {
            let cur = tile_at(t_rows, start, f, n, block, tile, true);
            let mask = masks[t_entries[cur.entry] as usize];
            let t0 = cur.offset;
            let tile_len = cur.len;
            sync_cube();
            store_rows(&regs.q, &mut stage, 0, at.unit, tile, vecs, row_vecs, units);
            store_rows(
                &regs.dout,
                &mut stage,
                comptime!(tile * config.row_vecs()),
                at.unit,
                tile,
                vecs,
                row_vecs,
                units,
            );
            if at.unit < tile {
                lse_t[at.unit] = regs.lse[0];
                delta_t[at.unit] = regs.delta[0];
                keys_t[at.unit] = regs.key[0];
            }
            sync_cube();
            let next = tile_at(t_rows, start, f + 1, n, block, tile, f + 1 < tiles);
            #[rustfmt::skip]
            fetch_query_tile(q, dout, lse, delta, lengths, order, &mut regs, q_base, bh * n, batch, hkey, &next, &at, config);

            scores_into(&k_frags, &stage, 0, &mut scratch, plane_at, config);
            sync_plane();
            // Padded-out queries have `PADDED_LSE`: a full tile of a full block needs no
            // test per element.
            if key_ok && mask == FULL && tile_len == tile {
                #[unroll]
                for i in 0..comptime!(config.per_lane()) {
                    let col = tile_column(i, at.row, at.part, lpr, tile);
                    let raw = scratch[plane_at + at.row * ts + col] * args.scale;
                    let qtok = query_token(order, cur.start + col, config);
                    #[rustfmt::skip]
                    let p = recomputed_prob(raw, lse_t[col], qtok, tok, &mods, slopes, &mut cap_grads, i, config);
                    probs[i] = p;
                }
            } else {
                #[unroll]
                for i in 0..comptime!(config.per_lane()) {
                    let col = tile_column(i, at.row, at.part, lpr, tile);
                    let mut p = 0.0f32;
                    if key_ok
                        && col < tile_len
                        && allowed(mask_bits, mask, t0 + col, local, block, config.mask_words)
                    {
                        let raw = scratch[plane_at + at.row * ts + col] * args.scale;
                        let qtok = query_token(order, cur.start + col, config);
                        #[rustfmt::skip]
                        let prob = recomputed_prob(raw, lse_t[col], qtok, tok, &mods, slopes, &mut cap_grads, i, config);
                        p = prob;
                    }
                    probs[i] = p;
                }
            }
            #[unroll]
            for i in 0..comptime!(config.per_lane()) {
                let col = tile_column(i, at.row, at.part, lpr, tile);
                let at_col = plane_at + at.row * ts + col;
                let p = probs[i];
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
                    let mut ds = probs[i] * (dp - delta_t[col]);
                    if config.softcap {
                        ds *= cap_grads[i];
                    }
                    grads[at_col] = F::cast_from(ds);
                }
                sync_plane();
                accumulate_product(&grads, plane_at, &stage, 0, &mut dk_acc, config);
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

/// The probability `exp(s - lse)` of the scaled score `raw` of query token `qtok` and key
/// token `ktok`, `s` the modified score; with soft-capping, the cap's derivative at `raw` is
/// kept in `cap_grads[i]` for the `dS` pass.
#[cube]
#[allow(clippy::too_many_arguments)]
fn recomputed_prob(
    raw: f32,
    lse: f32,
    qtok: usize,
    ktok: usize,
    mods: &ScoreMod,
    data: &[f32],
    cap_grads: &mut Array<f32>,
    i: usize,
    #[comptime] config: TensorCoreConfig,
) -> f32 {
    let mut s = raw;
    if comptime!(config.softcap || config.alibi || config.relative) {
        #[rustfmt::skip]
        let modified = modify_score(raw, qtok, ktok, mods, data, config.softcap, config.alibi, config.relative);
        s = modified;
    }
    if config.softcap {
        cap_grads[i] = score_grad(raw, mods, config.softcap);
    }
    f32::exp(s - lse)
}

/// The token of staged key `col`, read only where ALiBi or a relative bias needs it (0 otherwise).
#[cube]
fn staged_key_token(
    key_toks: &Shared<[u32]>,
    col: usize,
    #[comptime] config: TensorCoreConfig,
) -> usize {
    let mut tok = 0usize;
    if comptime!(config.alibi || config.relative) {
        tok = key_toks[col] as usize;
    }
    tok
}

/// The token of staged query position `pos`, read only where ALiBi or a relative bias needs it (0 otherwise).
#[cube]
fn query_token(order: &[u32], pos: usize, #[comptime] config: TensorCoreConfig) -> usize {
    let mut tok = 0usize;
    if comptime!(config.alibi || config.relative) {
        tok = token(order, pos, config.permuted);
    }
    tok
}

/// Registers of a query tile of the `dK`/`dV` pass fetched ahead of its use: this unit's
/// share of the `Q` and `dO` rows and, for units below the tile size, its query's
/// log-sum-exp, `delta` and dropout row key.
#[derive(CubeType)]
struct QueryTileRegs<F: Float, N: Size> {
    q: Array<Vector<F, N>>,
    dout: Array<Vector<F, N>>,
    lse: Array<f32>,
    delta: Array<f32>,
    key: Array<u32>,
}

#[cube]
impl<F: Float, N: Size> QueryTileRegs<F, N> {
    fn new(#[comptime] config: TensorCoreConfig) -> Self {
        let per = comptime!(per_unit(config.tile, config.vecs(), config.units()));
        QueryTileRegs::<F, N> {
            q: Array::new(per),
            dout: Array::new(per),
            lse: Array::new(1usize),
            delta: Array::new(1usize),
            key: Array::new(1usize),
        }
    }
}

/// Fetches query tile `at_tile` (rows of the pair from vector `q_base` of `q` and `dout`;
/// its log-sum-exp and `delta` from `row_base`) into `regs`. A padded-out or missing query
/// gets [`PADDED_LSE`] (its probabilities are 0) and `delta` 0.
#[cube]
#[allow(clippy::too_many_arguments)]
fn fetch_query_tile<F: Float, N: Size>(
    q: &[Vector<F, N>],
    dout: &[Vector<F, N>],
    lse: &[f32],
    delta: &[f32],
    lengths: &[u32],
    order: &[u32],
    regs: &mut QueryTileRegs<F, N>,
    q_base: usize,
    row_base: usize,
    batch: usize,
    head_key: u32,
    at_tile: &TileAt,
    at: &PlaneTask,
    #[comptime] config: TensorCoreConfig,
) {
    let units = comptime!(config.units());
    let (tile, vecs) = comptime!((config.tile, config.vecs()));
    #[rustfmt::skip]
    fetch_rows(q, &mut regs.q, order, q_base, at_tile.start, at_tile.len, at.unit, tile, vecs, units, config.permuted);
    #[rustfmt::skip]
    fetch_rows(dout, &mut regs.dout, order, q_base, at_tile.start, at_tile.len, at.unit, tile, vecs, units, config.permuted);
    if at.unit < tile {
        let mut lse_u = f32::new(PADDED_LSE);
        let mut delta_u = 0.0f32;
        let mut key_u = 0u32;
        if at.unit < at_tile.len {
            let qtok = token(order, at_tile.start + at.unit, config.permuted);
            if in_length(lengths, batch, qtok, config.padded) {
                lse_u = lse[row_base + qtok];
            }
            delta_u = delta[row_base + qtok];
            if config.dropout {
                key_u = row_key(head_key, qtok);
            }
        }
        regs.lse[0] = lse_u;
        regs.delta[0] = delta_u;
        regs.key[0] = key_u;
    }
}
