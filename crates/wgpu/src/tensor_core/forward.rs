//! The tensor-core forward kernel: `S = Q Kᵀ` and `O += P V` on cooperative matrices, the
//! online softmax row-wise on a per-plane f32 tile.

use cubecl::cmma;
use cubecl::prelude::*;

use crate::args::ProblemArgs;

use crate::options::{keep_factor, modify_score, query_row, score_mod};
use crate::tensor_core::FRAG;
use crate::tensor_core::stage::{
    NO_TOKEN, PlaneTask, TensorCoreConfig, accumulate_product, fragment_span, key_live,
    load_block_fragments, new_a_fragments, new_accumulators, next_pair_tile, plane_task, row_max,
    row_sum, row_walk, scores_into, start_pair_walk, tile_column, write_rows,
};
use crate::tiles::{FULL, MASKED, allowed, head_row, span, token};

/// Forward kernel. Plane `p` of cube `(block r, pair bh)` owns layout positions `r * block +
/// 16 p ..` (16 rows); it walks the active key blocks of its query block tile by tile (the
/// cube stages each `K`/`V` tile once), and writes its output rows and f32 log-sum-exp at
/// their tokens' places.
#[cube(launch, launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn tc_forward_kernel<F: Float, N: Size>(
    q: &[Vector<F, N>],
    k: &[Vector<F, N>],
    v: &[Vector<F, N>],
    out: &mut [F],
    lse: &mut [f32],
    row_ptr: &[u32],
    cols: &[u32],
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

    // The unit's score-tile row: query position `block_start + 16 * plane + row`.
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

    let mut stage = Shared::<[Vector<F, N>]>::new_slice(comptime!(2 * tile * config.row_vecs()));
    let mut scratch = Shared::<[f32]>::new_slice(comptime!(block * config.tile_stride()));
    let mut probs = Shared::<[F]>::new_slice(comptime!(block * config.tile_stride()));
    let mut key_toks = Shared::<[u32]>::new_slice(tile);
    let plane_at = at.plane * comptime!(config.plane_tile());

    let mut q_frags = new_a_fragments::<F>(config.chunks());
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
    let mut o_acc = new_accumulators(config.chunks());
    let mods = score_mod(
        slopes,
        args.softcap,
        bh % args.heads,
        args.heads,
        config.alibi,
        config.relative,
    );
    let modified = comptime!(config.softcap || config.alibi || config.relative);
    let mut m = f32::new(MASKED);
    let mut l = 0.0f32;
    let mut scores = Array::<f32>::new(comptime!(config.per_lane()));

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
        let mut tile_max = f32::new(MASKED);
        // A full tile of a full block (every key exists and is allowed) needs no test per
        // element.
        let plain = comptime!(!config.padded) && query.ok && mask == FULL && cur.len == tile;
        let row_at = plane_at + at.row * ts;
        if plain {
            #[unroll]
            for i in 0..comptime!(config.per_lane()) {
                let col = tile_column(i, at.row, at.part, lpr, tile);
                let mut s = scratch[row_at + col] * args.scale;
                if modified {
                    let key_tok = key_toks[col] as usize;
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
                scores[i] = s;
                tile_max = f32::max(tile_max, s);
            }
        } else {
            #[unroll]
            for i in 0..comptime!(config.per_lane()) {
                let col = tile_column(i, at.row, at.part, lpr, tile);
                let mut s = f32::new(MASKED);
                if query.ok
                    && key_live(&key_toks, col, cur.len, config)
                    && allowed(mask_bits, mask, local, t0 + col, block, config.mask_words)
                {
                    s = scratch[row_at + col] * args.scale;
                    if modified {
                        let key_tok = key_toks[col] as usize;
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
                }
                scores[i] = s;
                tile_max = f32::max(tile_max, s);
            }
        }
        tile_max = row_max(tile_max, lpr);
        // The running maximum moves only when the tile's passes it by more than the
        // slack: the probabilities stay below exp(slack), and most tiles skip the
        // rescale (`exp(m - m_new)` is 1). A first allowed key always moves it.
        let fresh = m == MASKED;
        let m_new = if tile_max > m + args.rescale_slack {
            tile_max
        } else {
            m
        };
        let alpha = f32::exp(m - m_new);
        l *= alpha;
        #[unroll]
        for i in 0..comptime!(config.per_lane()) {
            let col = tile_column(i, at.row, at.part, lpr, tile);
            let mut p = 0.0f32;
            if scores[i] != MASKED {
                p = f32::exp(scores[i] - m_new);
            }
            l += p;
            if config.dropout {
                let key_tok = key_toks[col];
                if key_tok != NO_TOKEN {
                    p *= keep_factor(query.key, key_tok as usize, args.threshold, args.keep_scale);
                }
            }
            probs[plane_at + at.row * ts + col] = F::cast_from(p);
        }
        m = m_new;
        sync_plane();
        // Rows with nothing accumulated yet (`fresh`) hold zeros: no rescale.
        if !plane_all(alpha == 1.0f32 || fresh) {
            rescale_rows(&mut o_acc, alpha, &mut scratch, plane_at, &at, config);
        }

        accumulate_product(
            &probs,
            plane_at,
            &stage,
            comptime!(tile * config.row_vecs()),
            &mut o_acc,
            config,
        );
    }

    // `l == 0` only for a row with no allowed key (its largest term is exp(0) = 1); a NaN sum
    // (a NaN input this row attends) must propagate, so no `l > 0` test.
    let l = row_sum(l, lpr);
    let inv = if l == 0.0 { 0.0f32 } else { 1.0 / l };
    let dst_row = if valid { tok as u32 } else { NO_TOKEN };
    write_rows(
        &o_acc,
        out,
        bh * n * d,
        dst_row,
        inv,
        &mut scratch,
        plane_at,
        at.lane,
        config,
    );
    if valid && at.part == 0 {
        lse[bh * n + tok] = if l == 0.0 {
            args.neg_inf
        } else {
            m + f32::ln(l)
        };
    }
}

/// Multiplies row `r` of the plane's accumulators by the `factor` of lane `r`, through the
/// plane's f32 tile.
#[cube]
fn rescale_rows(
    acc: &mut Sequence<cmma::Matrix<f32>>,
    factor: f32,
    scratch: &mut Shared<[f32]>,
    scratch_at: usize,
    at: &PlaneTask,
    #[comptime] config: TensorCoreConfig,
) {
    let frag_stride = comptime!(config.tile_stride() as u32);
    let ts = comptime!(config.tile_stride());
    let frag_len = comptime!(fragment_span(config.tile_stride(), 1));
    let per_lane = comptime!(FRAG * FRAG / config.plane);
    #[unroll]
    for c in 0..config.chunks() {
        cmma::store(
            &mut scratch[scratch_at..scratch_at + frag_len],
            &acc[c],
            frag_stride,
            cmma::MatrixLayout::RowMajor,
        );
        sync_plane();
        #[unroll]
        for i in 0..per_lane {
            let e = at.lane + i * config.plane;
            let f = plane_shuffle(factor, (e / FRAG) as u32);
            scratch[scratch_at + (e / FRAG) * ts + e % FRAG] *= f;
        }
        sync_plane();
        cmma::load_with_layout(
            &mut acc[c],
            &scratch[scratch_at..scratch_at + frag_len],
            frag_stride,
            cmma::MatrixLayout::RowMajor,
        );
        sync_plane();
    }
}
