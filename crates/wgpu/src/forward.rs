//! The fused forward kernel: one cube per `(batch x head, query block)`, one unit per query
//! row; key tiles staged in shared memory; online softmax in `f32`. Rows are read as vectors
//! of `N` lanes (`vecs = head_dim / N` per row).

use cubecl::prelude::*;

use crate::args::{FmaConfig, ProblemArgs};

use crate::options::{in_length, keep_factor, modify_score, query_row, score_mod};
use crate::tiles::{
    MASKED, UNROLL_MAX, allowed, lane_sum, load_tiles, merge_pair, row_unit, span, token,
};

/// Forward kernel. Unit `u` of cube `(r, bh)` owns layout position `r * block + u`; it keeps
/// its scaled query row and its output accumulator in registers, walks the active key blocks
/// of its query block tile by tile (the cube loads each `K`/`V` tile into shared memory once),
/// and writes its output row and log-sum-exp at its token's place.
///
/// `K`/`V` come from the unit's key/value head (grouped-query attention); with `padded`,
/// rows and keys at or past their batch row's length are masked; with `dropout`, each
/// probability enters the output times its keep factor (the sum `l` keeps them all); with
/// `softcap` / `alibi`, each score is modified before the softmax.
#[cube(launch, launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_kernel<F: Float, N: Size>(
    q: &[Vector<F, N>],
    k: &[Vector<F, N>],
    v: &[Vector<F, N>],
    out: &mut [Vector<F, N>],
    lse: &mut [f32],
    row_ptr: &[u32],
    cols: &[u32],
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
    let heads = args.heads;
    let scale = args.scale;
    let neg_inf = args.neg_inf;
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
    let mut acc = Array::<Vector<f32, N>>::new(vecs);
    #[unroll(vecs <= UNROLL_MAX)]
    for c in 0..vecs {
        q_row[c] = if valid {
            Vector::<f32, N>::cast_from(q[base + tok * vecs + c]) * Vector::new(scale)
        } else {
            Vector::new(0.0f32)
        };
        acc[c] = Vector::new(0.0f32);
    }
    let mut m = f32::new(MASKED);
    let mut l = 0.0f32;
    let per_lane = comptime!(key_tile / splits);
    let mut scores = Array::<f32>::new(per_lane);
    let mut k_tile = Shared::<[Vector<f32, N>]>::new_slice(key_tile * vecs);
    let mut v_tile = Shared::<[Vector<f32, N>]>::new_slice(key_tile * vecs);

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
                let mut tile_max = f32::new(MASKED);
                #[unroll]
                for t in 0..per_lane {
                    let jj = lane + t * splits;
                    let mut s = f32::new(MASKED);
                    let mut key_ok = jj < tile_len;
                    if padded && key_ok {
                        let key_tok = token(order, key_start + t0 + jj, permuted);
                        key_ok = in_length(lengths, batch, key_tok, padded);
                    }
                    if key_ok && allowed(mask_bits, mask, u, t0 + jj, block, mask_words) {
                        let mut dot = Vector::<f32, N>::new(0.0f32);
                        #[unroll(vecs <= UNROLL_MAX)]
                        for c in 0..vecs {
                            dot += q_row[c] * k_tile[jj * vecs + c];
                        }
                        s = lane_sum(dot);
                        if comptime!(config.softcap || config.alibi || config.relative) {
                            let key_tok = token(order, key_start + t0 + jj, permuted);
                            s = modify_score(
                                s,
                                tok,
                                key_tok,
                                &mods,
                                slopes,
                                config.softcap,
                                config.alibi,
                                config.relative,
                            );
                        }
                        tile_max = f32::max(tile_max, s);
                    }
                    scores[t] = s;
                }
                if tile_max != MASKED {
                    let m_new = f32::max(m, tile_max);
                    let alpha = f32::exp(m - m_new);
                    l *= alpha;
                    #[unroll(vecs <= UNROLL_MAX)]
                    for c in 0..vecs {
                        acc[c] *= Vector::new(alpha);
                    }
                    #[unroll]
                    for t in 0..per_lane {
                        let jj = lane + t * splits;
                        if scores[t] != MASKED {
                            let p = f32::exp(scores[t] - m_new);
                            l += p;
                            let mut kept = p;
                            if dropout {
                                let key_tok = token(order, key_start + t0 + jj, permuted);
                                kept = p * keep_factor(keys, key_tok, threshold, keep_scale);
                            }
                            let pv = Vector::<f32, N>::new(kept);
                            #[unroll(vecs <= UNROLL_MAX)]
                            for c in 0..vecs {
                                acc[c] += pv * v_tile[jj * vecs + c];
                            }
                        }
                    }
                    m = m_new;
                }
            }
        }
    }

    if splits > 1 {
        merge_softmax(
            &mut acc,
            &mut m,
            &mut l,
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
        // `l == 0` only for a row with no allowed key (the row's largest term is exp(0) = 1);
        // a NaN sum (a NaN input this row attends) must propagate, so no `l > 0` test.
        let inv = Vector::<f32, N>::new(if l == 0.0 { 0.0f32 } else { 1.0 / l });
        #[unroll(vecs <= UNROLL_MAX)]
        for c in 0..vecs {
            out[base + tok * vecs + c] = Vector::<F, N>::cast_from(acc[c] * inv);
        }
        lse[bh * n + tok] = if l == 0.0 { neg_inf } else { m + f32::ln(l) };
    }
}

/// Combines the online-softmax states `(m, l, acc)` of lanes `1 .. splits` of each row into
/// lane 0's: `m` becomes the max, `l` and `acc` the sums rescaled by `exp(m_lane - m)`.
/// `m` and `l` go through two small shared arrays, `acc` through [`merge_pair`]. Every unit
/// of the cube must call it.
#[cube]
#[allow(clippy::too_many_arguments)]
fn merge_softmax<N: Size>(
    acc: &mut Array<Vector<f32, N>>,
    m: &mut f32,
    l: &mut f32,
    stage_a: &mut Shared<[Vector<f32, N>]>,
    stage_b: &mut Shared<[Vector<f32, N>]>,
    row: usize,
    lane: usize,
    #[comptime] cap: usize,
    #[comptime] vecs: usize,
    #[comptime] block: usize,
    #[comptime] splits: usize,
) {
    let mut m_stage = Shared::<[f32]>::new_slice(comptime!(2 * block));
    let mut l_stage = Shared::<[f32]>::new_slice(block);
    for other in 1..splits {
        sync_cube();
        if lane == 0 {
            m_stage[row] = *m;
        }
        if lane == other {
            m_stage[block + row] = *m;
            l_stage[row] = *l;
        }
        sync_cube();
        let m_own = m_stage[row];
        let m_other = m_stage[block + row];
        let m_new = f32::max(m_own, m_other);
        // Each side rescales its own sum to the common max before lane 0 adds them.
        let alpha = if lane == 0 {
            f32::exp(m_own - m_new)
        } else {
            f32::exp(m_other - m_new)
        };
        if lane == 0 || lane == other {
            #[unroll(vecs <= UNROLL_MAX)]
            for c in 0..vecs {
                acc[c] *= Vector::new(alpha);
            }
        }
        if lane == 0 {
            *l = *l * alpha + l_stage[row] * f32::exp(m_other - m_new);
            *m = m_new;
        }
        merge_pair(acc, stage_a, stage_b, row, lane, other, cap, vecs, block);
    }
}
