//! The fused backward kernels. Probabilities are recomputed from the forward's log-sum-exp;
//! `dQ` is a pass over the CSR rows (one unit per query row), `dK`/`dV` a pass over the
//! transposed lists (one unit per key row). Every output row is written by one unit, so
//! there are no atomics and results are the same from run to run.

use cubecl::prelude::*;

use crate::args::{FmaConfig, ProblemArgs};

use crate::options::{
    head_key, in_length, keep_factor, modify_score, query_row, relative_bucket, row_key,
    score_grad, score_mod,
};
use crate::tiles::{
    UNROLL_MAX, allowed, head_row, lane_sum, load_tiles, merge_sums, row_unit, span, token,
};

/// Log-sum-exp staged for a padded-out query row in the `dK`/`dV` pass: `exp(s - LSE)` is 0.
const PADDED_LSE: f32 = 3.0e38;

/// `dQ` kernel; also writes `delta_i = dO_i . O_i` (by token) for the `dK`/`dV` pass. With
/// `bias_grad`, also sums the relative-position bias gradient of the cube's query block:
/// each unit keeps one sum per bucket of the scores' gradients `P (dP - delta)` over its
/// keys, and the cube adds them up bucket by bucket in a fixed tree into `bias_sums[(bh *
/// n_blocks + block) * buckets + bucket]`.
#[cube(launch, launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn dq_kernel<F: Float, N: Size>(
    q: &[Vector<F, N>],
    k: &[Vector<F, N>],
    v: &[Vector<F, N>],
    out: &[Vector<F, N>],
    lse: &[f32],
    dout: &[Vector<F, N>],
    dq: &mut [Vector<F, N>],
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
    #[comptime] config: FmaConfig,
    #[define(F)] _dtype: ElemType,
) {
    let seq_len = args.seq_len;
    let heads = args.heads;
    let scale = args.scale;
    let seed_lo = args.seed_lo;
    let seed_hi = args.seed_hi;
    let threshold = args.threshold;
    let keep_scale = args.keep_scale;
    let block = config.block;
    let vecs = config.vecs;
    let key_tile = config.tile;
    let mask_words = config.mask_words;
    let permuted = config.permuted;
    let splits = config.splits;
    let padded = config.padded;
    let dropout = config.dropout;
    let n = seq_len;
    let at = row_unit(order, args.heads, &args, config);
    let (bh, row, u, lane, valid, base, tok) =
        (at.bh, at.list, at.u, at.lane, at.valid, at.base, at.tok);
    let unit = UNIT_POS_X as usize;
    let query = query_row(
        lengths, seed_lo, seed_hi, bh, heads, tok, valid, padded, dropout,
    );
    let (batch, row_ok, keys) = (query.batch, query.ok, query.key);
    let mods = score_mod(
        slopes,
        args.softcap,
        bh % heads,
        args.heads,
        config.alibi,
        config.relative,
    );

    let mut q_row = Array::<Vector<f32, N>>::new(vecs);
    let mut do_row = Array::<Vector<f32, N>>::new(vecs);
    let mut acc = Array::<Vector<f32, N>>::new(vecs);
    let mut delta_i = 0.0f32;
    let mut lse_i = 0.0f32;
    let mut delta_v = Vector::<f32, N>::new(0.0f32);
    #[unroll(vecs <= UNROLL_MAX)]
    for c in 0..vecs {
        let at = base + tok * vecs + c;
        q_row[c] = Vector::new(0.0f32);
        do_row[c] = Vector::new(0.0f32);
        if valid {
            q_row[c] = Vector::<f32, N>::cast_from(q[at]);
            do_row[c] = Vector::<f32, N>::cast_from(dout[at]);
            delta_v += do_row[c] * Vector::<f32, N>::cast_from(out[at]);
        }
        acc[c] = Vector::new(0.0f32);
    }
    if valid {
        delta_i = lane_sum(delta_v);
        lse_i = lse[bh * n + tok];
        if lane == 0 {
            delta[bh * n + tok] = delta_i;
        }
    }
    let mut k_tile = Shared::<[Vector<f32, N>]>::new_slice(key_tile * vecs);
    let mut v_tile = Shared::<[Vector<f32, N>]>::new_slice(key_tile * vecs);
    let buckets = comptime!(if config.bias_grad { config.buckets } else { 1 });
    let mut bucket_sums = Array::<f32>::new(buckets);
    for c in 0..buckets {
        bucket_sums[c] = 0.0f32;
    }

    let start = row_ptr[row] as usize;
    let end = row_ptr[row + 1] as usize;
    for e in start..end {
        let key_block = cols[e] as usize;
        let mask = masks[e];
        let key_start = key_block * block;
        let key_len = span(n, key_start, block);
        for t0 in range_stepped(0, key_len, key_tile) {
            let tile_len = span(key_len, t0, key_tile);
            sync_cube();
            load_tiles(
                k,
                v,
                &mut k_tile,
                &mut v_tile,
                order,
                at.kv_base,
                key_start + t0,
                tile_len,
                unit,
                key_tile,
                vecs,
                block * splits,
                permuted,
            );
            sync_cube();
            if row_ok {
                for jj in range_stepped(lane, tile_len, splits) {
                    let key_tok = token(order, key_start + t0 + jj, permuted);
                    let key_ok = in_length(lengths, batch, key_tok, padded);
                    if key_ok && allowed(mask_bits, mask, u, t0 + jj, block, mask_words) {
                        let mut s = Vector::<f32, N>::new(0.0f32);
                        let mut dp = Vector::<f32, N>::new(0.0f32);
                        #[unroll(vecs <= UNROLL_MAX)]
                        for c in 0..vecs {
                            s += q_row[c] * k_tile[jj * vecs + c];
                            dp += do_row[c] * v_tile[jj * vecs + c];
                        }
                        let raw = lane_sum(s) * scale;
                        let mut score = raw;
                        if comptime!(config.softcap || config.alibi || config.relative) {
                            #[rustfmt::skip]
                            let modified = modify_score(raw, tok, key_tok, &mods, slopes, config.softcap, config.alibi, config.relative);
                            score = modified;
                        }
                        let p = f32::exp(score - lse_i);
                        // Under dropout, dP of the kept, scaled probability.
                        let mut dp_i = lane_sum(dp);
                        if dropout {
                            dp_i *= keep_factor(keys, key_tok, threshold, keep_scale);
                        }
                        if config.bias_grad {
                            let bucket = relative_bucket(slopes, tok, key_tok, &mods);
                            bucket_sums[bucket] += p * (dp_i - delta_i);
                        }
                        let grad = score_grad(raw, &mods, config.softcap);
                        let ds = Vector::<f32, N>::new(p * (dp_i - delta_i) * grad);
                        #[unroll(vecs <= UNROLL_MAX)]
                        for c in 0..vecs {
                            acc[c] += ds * k_tile[jj * vecs + c];
                        }
                    }
                }
            }
        }
    }
    if config.bias_grad {
        let first = (bh * args.n_blocks + at.blk) * buckets;
        let units = comptime!(config.block * config.splits);
        let mut scratch = Shared::<[f32]>::new_slice(units);
        sum_buckets(
            &bucket_sums,
            &mut scratch,
            bias_sums,
            first,
            unit,
            units,
            buckets,
        );
    }
    if comptime!(splits > 1) {
        merge_sums(
            &mut acc,
            &mut k_tile,
            &mut v_tile,
            u,
            lane,
            key_tile,
            vecs,
            block,
            splits,
        );
    }
    if valid && lane == 0 {
        let sv = Vector::<f32, N>::new(scale);
        #[unroll(vecs <= UNROLL_MAX)]
        for c in 0..vecs {
            dq[base + tok * vecs + c] = Vector::<F, N>::cast_from(acc[c] * sv);
        }
    }
}

/// Adds up the cube's per-unit bucket sums `sums` (`buckets` of them in each of the cube's
/// `units` units) bucket by bucket, a tree over the units in `scratch` (at least `units`
/// entries, free for the call) the same for every run, and writes bucket `c`'s total to
/// `out[first + c]`.
#[cube]
pub(crate) fn sum_buckets(
    sums: &Array<f32>,
    scratch: &mut Shared<[f32]>,
    out: &mut [f32],
    first: usize,
    unit: usize,
    #[comptime] units: usize,
    #[comptime] buckets: usize,
) {
    let width = comptime!(units.next_power_of_two());
    let steps = comptime!(width.trailing_zeros() as usize);
    for c in 0..buckets {
        sync_cube();
        scratch[unit] = sums[c];
        sync_cube();
        for step in 0..steps {
            let stride = width >> (step + 1);
            if unit < stride && unit + stride < units {
                let x = scratch[unit] + scratch[unit + stride];
                scratch[unit] = x;
            }
            sync_cube();
        }
        if unit == 0 {
            out[first + c] = scratch[0];
        }
    }
    sync_cube();
}

/// The relative-position bias gradient `dbias[h, c]` from the per-block sums of the `dQ`
/// pass (`[batch, heads, n_blocks, buckets]`): one unit per `(head, bucket)` adds them over
/// batch rows and blocks in order.
#[cube(launch, launch_unchecked)]
pub(crate) fn bias_sum_kernel(
    sums: &[f32],
    dbias: &mut [f32],
    batch: usize,
    heads: usize,
    n_blocks: usize,
    buckets: usize,
) {
    let i = ABSOLUTE_POS;
    if i < heads * buckets {
        let (h, c) = (i / buckets, i % buckets);
        let mut total = 0.0f32;
        for b in 0..batch {
            for r in 0..n_blocks {
                total += sums[((b * heads + h) * n_blocks + r) * buckets + c];
            }
        }
        dbias[i] = total;
    }
}

/// `dK`/`dV` kernel: unit `u` of cube `(c, bh)` owns key position `c * block + u` and walks
/// the query blocks that attend key block `c` (the transposed lists), staging `Q`, `dO`, the
/// log-sum-exp and `delta` of each query tile in shared memory.
///
/// With grouped-query attention the cube's key/value head walks the lists of each query
/// head of its group in turn, summing their contributions. Padded-out query rows are
/// staged with a log-sum-exp that makes their probabilities 0; padded-out key rows stay 0.
///
/// `with_dk` / `with_dv` choose the gradients of this launch: both at once for short rows;
/// for long rows one launch each, so that a unit keeps two or three rows in registers
/// instead of four (which would spill) at the price of recomputing the scores.
#[cube(launch, launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn dkdv_kernel<F: Float, N: Size>(
    q: &[Vector<F, N>],
    k: &[Vector<F, N>],
    v: &[Vector<F, N>],
    lse: &[f32],
    dout: &[Vector<F, N>],
    delta: &[f32],
    dk: &mut [Vector<F, N>],
    dv: &mut [Vector<F, N>],
    col_ptr: &[u32],
    t_rows: &[u32],
    t_entries: &[u32],
    masks: &[u32],
    mask_bits: &[u32],
    order: &[u32],
    lengths: &[u32],
    slopes: &[f32],
    args: ProblemArgs,
    #[comptime] config: FmaConfig,
    #[define(F)] _dtype: ElemType,
) {
    let seq_len = args.seq_len;
    let n_blocks = args.n_blocks;
    let heads = args.heads;
    let kv_heads = args.kv_heads;
    let shared_layout = args.shared_layout;
    let scale = args.scale;
    let seed_lo = args.seed_lo;
    let seed_hi = args.seed_hi;
    let threshold = args.threshold;
    let keep_scale = args.keep_scale;
    let block = config.block;
    let vecs = config.vecs;
    let query_tile = config.tile;
    let mask_words = config.mask_words;
    let permuted = config.permuted;
    let splits = config.splits;
    let with_dk = config.with_dk;
    let with_dv = config.with_dv;
    let padded = config.padded;
    let dropout = config.dropout;
    let n = seq_len;
    // Tasks walk `(batch, kv head)` pairs: `at.bh` is the key/value pair, `at.base` its rows.
    let at = row_unit(order, args.kv_heads, &args, config);
    let (bkv, u, lane, base, tok) = (at.bh, at.u, at.lane, at.base, at.tok);
    let unit = UNIT_POS_X as usize;
    let group = heads / kv_heads;
    let batch = bkv / kv_heads;
    let valid = at.valid;
    // A padded-out key row gets no contribution (its dK and dV are written as zeros).
    let key_ok = valid && in_length(lengths, batch, tok, padded);

    let mut k_row = Array::<Vector<f32, N>>::new(vecs);
    let mut v_row = Array::<Vector<f32, N>>::new(vecs);
    let mut dk_acc = Array::<Vector<f32, N>>::new(vecs);
    let mut dv_acc = Array::<Vector<f32, N>>::new(vecs);
    #[unroll(vecs <= UNROLL_MAX)]
    for c in 0..vecs {
        let at = base + tok * vecs + c;
        k_row[c] = Vector::new(0.0f32);
        v_row[c] = Vector::new(0.0f32);
        if valid {
            k_row[c] = Vector::<f32, N>::cast_from(k[at]);
            if with_dk {
                v_row[c] = Vector::<f32, N>::cast_from(v[at]);
            }
        }
        dk_acc[c] = Vector::new(0.0f32);
        dv_acc[c] = Vector::new(0.0f32);
    }
    let mut q_tile = Shared::<[Vector<f32, N>]>::new_slice(query_tile * vecs);
    let mut do_tile = Shared::<[Vector<f32, N>]>::new_slice(query_tile * vecs);
    let mut lse_tile = Shared::<[f32]>::new_slice(query_tile);
    let mut delta_tile = Shared::<[f32]>::new_slice(query_tile);
    let mut key_tile = Shared::<[u32]>::new_slice(comptime!(if dropout { query_tile } else { 1 }));

    for g in 0..group {
        let h = (bkv % kv_heads) * group + g;
        let bh = batch * heads + h;
        let q_base = bh * seq_len * vecs;
        let col = head_row(bh, at.blk, heads, n_blocks, shared_layout);
        let mut hkey = 0u32;
        if dropout {
            hkey = head_key(seed_lo, seed_hi, batch, h);
        }
        let mods = score_mod(
            slopes,
            args.softcap,
            h,
            args.heads,
            config.alibi,
            config.relative,
        );
        let start = col_ptr[col] as usize;
        let end = col_ptr[col + 1] as usize;
        for te in start..end {
            let query_block = t_rows[te] as usize;
            let mask = masks[t_entries[te] as usize];
            let query_start = query_block * block;
            let query_len = span(n, query_start, block);
            for t0 in range_stepped(0, query_len, query_tile) {
                let tile_len = span(query_len, t0, query_tile);
                sync_cube();
                load_tiles(
                    q,
                    dout,
                    &mut q_tile,
                    &mut do_tile,
                    order,
                    q_base,
                    query_start + t0,
                    tile_len,
                    unit,
                    query_tile,
                    vecs,
                    block * splits,
                    permuted,
                );
                if unit < tile_len {
                    let qtok = token(order, query_start + t0 + unit, permuted);
                    lse_tile[unit] = if in_length(lengths, batch, qtok, padded) {
                        lse[bh * n + qtok]
                    } else {
                        f32::new(PADDED_LSE)
                    };
                    delta_tile[unit] = delta[bh * n + qtok];
                    if dropout {
                        key_tile[unit] = row_key(hkey, qtok);
                    }
                }
                sync_cube();
                if key_ok {
                    for ii in range_stepped(lane, tile_len, splits) {
                        if allowed(mask_bits, mask, t0 + ii, u, block, mask_words) {
                            let mut s = Vector::<f32, N>::new(0.0f32);
                            let mut dp = Vector::<f32, N>::new(0.0f32);
                            #[unroll(vecs <= UNROLL_MAX)]
                            for c in 0..vecs {
                                s += q_tile[ii * vecs + c] * k_row[c];
                                if with_dk {
                                    dp += do_tile[ii * vecs + c] * v_row[c];
                                }
                            }
                            let raw = lane_sum(s) * scale;
                            let mut score = raw;
                            if comptime!(config.softcap || config.alibi || config.relative) {
                                let qtok = token(order, query_start + t0 + ii, permuted);
                                #[rustfmt::skip]
                                let modified = modify_score(raw, qtok, tok, &mods, slopes, config.softcap, config.alibi, config.relative);
                                score = modified;
                            }
                            let p = f32::exp(score - lse_tile[ii]);
                            let mut keep = 1.0f32;
                            if dropout {
                                keep = keep_factor(key_tile[ii], tok, threshold, keep_scale);
                            }
                            if with_dv {
                                let pv = Vector::<f32, N>::new(p * keep);
                                #[unroll(vecs <= UNROLL_MAX)]
                                for c in 0..vecs {
                                    dv_acc[c] += pv * do_tile[ii * vecs + c];
                                }
                            }
                            if with_dk {
                                let grad = score_grad(raw, &mods, config.softcap);
                                let ds = Vector::<f32, N>::new(
                                    p * (lane_sum(dp) * keep - delta_tile[ii]) * grad,
                                );
                                #[unroll(vecs <= UNROLL_MAX)]
                                for c in 0..vecs {
                                    dk_acc[c] += ds * q_tile[ii * vecs + c];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    if splits > 1 {
        if with_dk {
            merge_sums(
                &mut dk_acc,
                &mut q_tile,
                &mut do_tile,
                u,
                lane,
                query_tile,
                vecs,
                block,
                splits,
            );
        }
        if with_dv {
            merge_sums(
                &mut dv_acc,
                &mut q_tile,
                &mut do_tile,
                u,
                lane,
                query_tile,
                vecs,
                block,
                splits,
            );
        }
    }
    if valid && lane == 0 {
        let sv = Vector::<f32, N>::new(scale);
        #[unroll(vecs <= UNROLL_MAX)]
        for c in 0..vecs {
            if with_dk {
                dk[base + tok * vecs + c] = Vector::<F, N>::cast_from(dk_acc[c] * sv);
            }
            if with_dv {
                dv[base + tok * vecs + c] = Vector::<F, N>::cast_from(dv_acc[c]);
            }
        }
    }
}
