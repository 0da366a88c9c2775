//! The fused decode kernels: a few new query rows against a key/value cache, split across
//! key blocks so that one query row keeps the device busy (split-K with a final
//! log-sum-exp merge).
//!
//! - [`decode_partials_kernel`]: one cube per `(query row, chunk of the row's active key
//!   blocks)`, `units` units per cube; unit `u` takes keys `u, u + units, ...` of the chunk,
//!   keeps its own running maximum, sum and output (`f32`) in registers, and writes them as
//!   one partial;
//! - [`decode_merge_kernel`]: one unit per `(query row, output vector)`, merging the row's
//!   partials through their maxima and writing the normalised output in the input dtype.
//!
//! The number of partials per row is fixed by the layout and the launch (not by timing), so
//! results are the same from run to run.

use cubecl::client::Client;
use cubecl::ir::ElemType;
use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::device_layout::{DeviceLayout, upload};
use crate::error::KernelError;
use sparse_attn_kernel_types::{AttentionShape, ScoreMods};

use crate::launch::{arg, check_mods, grid_count, launch_kernel, mods_buffer, tensor};
use crate::options::{modify_score, score_mod};
use crate::tiles::{MASKED, UNROLL_MAX, allowed, head_row, lane_sum, span, token};

/// Marks a query row that is padding (no token): its output is zero.
pub const NO_QUERY: u32 = u32::MAX;

/// Keys per chunk of a query row (rounded down to whole blocks, at least one block).
const CHUNK_KEYS: usize = 1024;

/// Below this many units a launch gives each task more units (up to [`MAX_UNITS`]).
const FILL_UNITS: usize = 16384;

/// Most units per decode task.
const MAX_UNITS: usize = 64;

/// Which rows a decode call serves, on the host: for each batch row `b` and new row `i`,
/// the layout position of its token (`positions[b * queries + i]`, [`NO_QUERY`] for a
/// padding row), each batch row's cached length after the call, and the most active key
/// blocks of any of these rows' layout rows.
#[derive(Debug, Clone, Copy)]
pub struct DecodeQueries<'a> {
    /// New rows per batch row.
    pub queries: usize,
    /// Layout position of each new row's token, or [`NO_QUERY`].
    pub positions: &'a [u32],
    /// Tokens cached per batch row (keys at or past it are not read).
    pub lengths: &'a [u32],
    /// Largest number of active key blocks among the rows' layout rows (an upper bound is
    /// fine).
    pub max_blocks: usize,
}

/// Partial states of one query row's share of keys. Unit `u` of cube `task` (row `task /
/// chunks`, chunk `task % chunks`) walks entries `chunk * per_chunk ..` of the row's CSR
/// list and writes partial `task * units + u`: `stats[2p]` its maximum, `stats[2p + 1]` its
/// sum, `acc[p * vecs ..]` its unnormalised output.
#[cube(launch, launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_partials_kernel<F: Float, N: Size>(
    q: &[Vector<F, N>],
    k: &[Vector<F, N>],
    v: &[Vector<F, N>],
    stats: &mut [f32],
    acc_out: &mut [Vector<f32, N>],
    row_ptr: &[u32],
    cols: &[u32],
    masks: &[u32],
    mask_bits: &[u32],
    order: &[u32],
    positions: &[u32],
    lengths: &[u32],
    slopes: &[f32],
    args: DecodeArgs,
    #[comptime] config: DecodeConfig,
    #[define(F)] _dtype: ElemType,
) {
    let task = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if task >= args.tasks {
        terminate!();
    }
    let u = UNIT_POS_X as usize;
    let vecs = config.vecs;
    let block = config.block;
    let row = task / args.chunks;
    let chunk = task % args.chunks;
    let bh = row / args.queries;
    let i = row % args.queries;
    let b = bh / args.heads;
    let kv = b * args.kv_heads + (bh % args.heads) / (args.heads / args.kv_heads);
    let pos = positions[b * args.queries + i];
    let len = lengths[b] as usize;

    let mut acc = Array::<Vector<f32, N>>::new(vecs);
    let mut q_row = Array::<Vector<f32, N>>::new(vecs);
    #[unroll(vecs <= UNROLL_MAX)]
    for c in 0..vecs {
        acc[c] = Vector::new(0.0f32);
        q_row[c] = Vector::new(0.0f32);
    }
    let mut m = f32::new(MASKED);
    let mut l = 0.0f32;
    if pos != NO_QUERY {
        let pos = pos as usize;
        #[unroll(vecs <= UNROLL_MAX)]
        for c in 0..vecs {
            q_row[c] = Vector::<f32, N>::cast_from(q[row * vecs + c]) * Vector::new(args.scale);
        }
        let list = head_row(
            bh,
            pos / block,
            args.heads,
            args.n_blocks,
            args.shared_layout,
        );
        let start = row_ptr[list] as usize;
        let end = row_ptr[list + 1] as usize;
        let first = start + chunk * args.per_chunk;
        let last = if first + args.per_chunk < end {
            first + args.per_chunk
        } else {
            end
        };
        let local = pos % block;
        let kv_base = kv * args.capacity * vecs;
        let qtok = token(order, pos, config.permuted);
        let mods = score_mod(
            slopes,
            args.softcap,
            bh % args.heads,
            args.heads,
            config.alibi,
            config.relative,
        );
        for e in first..last {
            let key_start = cols[e] as usize * block;
            let mask = masks[e];
            let key_len = span(args.capacity, key_start, block);
            for j in range_stepped(u, key_len, config.units) {
                let tok = token(order, key_start + j, config.permuted);
                if tok < len && allowed(mask_bits, mask, local, j, block, config.mask_words) {
                    let mut dot = Vector::<f32, N>::new(0.0f32);
                    #[unroll(vecs <= UNROLL_MAX)]
                    for c in 0..vecs {
                        dot += q_row[c] * Vector::<f32, N>::cast_from(k[kv_base + tok * vecs + c]);
                    }
                    let s = modify_score(
                        lane_sum(dot),
                        qtok,
                        tok,
                        &mods,
                        slopes,
                        config.softcap,
                        config.alibi,
                        config.relative,
                    );
                    let m_new = f32::max(m, s);
                    let alpha = f32::exp(m - m_new);
                    let p = f32::exp(s - m_new);
                    l = l * alpha + p;
                    #[unroll(vecs <= UNROLL_MAX)]
                    for c in 0..vecs {
                        acc[c] = acc[c] * Vector::new(alpha)
                            + Vector::new(p)
                                * Vector::<f32, N>::cast_from(v[kv_base + tok * vecs + c]);
                    }
                    m = m_new;
                }
            }
        }
    }
    let p = task * config.units + u;
    stats[2 * p] = m;
    stats[2 * p + 1] = l;
    #[unroll(vecs <= UNROLL_MAX)]
    for c in 0..vecs {
        acc_out[p * vecs + c] = acc[c];
    }
}

/// Merges the `per_row` partials of each query row: unit `(row, c)` writes output vector `c`
/// of the row (zeros for a row that saw no key).
#[cube(launch, launch_unchecked)]
pub(crate) fn decode_merge_kernel<F: Float, N: Size>(
    stats: &[f32],
    acc: &[Vector<f32, N>],
    out: &mut [Vector<F, N>],
    items: usize,
    per_row: usize,
    #[comptime] vecs: usize,
    #[define(F)] _dtype: ElemType,
) {
    let idx = ((CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X) as usize;
    if idx >= items {
        terminate!();
    }
    let row = idx / vecs;
    let c = idx % vecs;
    let first = row * per_row;
    let mut m = f32::new(MASKED);
    for p in first..first + per_row {
        m = f32::max(m, stats[2 * p]);
    }
    let mut sum = 0.0f32;
    let mut total = Vector::<f32, N>::new(0.0f32);
    if m != MASKED {
        for p in first..first + per_row {
            let w = f32::exp(stats[2 * p] - m);
            sum += stats[2 * p + 1] * w;
            total += acc[p * vecs + c] * Vector::new(w);
        }
    }
    let inv = if sum == 0.0 { 0.0f32 } else { 1.0 / sum };
    out[row * vecs + c] = Vector::<F, N>::cast_from(total * Vector::new(inv));
}

/// The scalars of one decode launch.
#[derive(CubeLaunch, CubeType)]
pub(crate) struct DecodeArgs {
    /// Cache positions per batch row (the layout's sequence length).
    pub capacity: usize,
    /// Blocks of the layout.
    pub n_blocks: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// 1 when all heads share the layout.
    pub shared_layout: u32,
    /// New rows per batch row.
    pub queries: usize,
    /// Chunks per query row.
    pub chunks: usize,
    /// Layout entries per chunk.
    pub per_chunk: usize,
    /// Cubes with work.
    pub tasks: usize,
    /// Score scale.
    pub scale: f32,
    /// Soft-capping bound (read only with the config's `softcap`).
    pub softcap: f32,
}

/// What the partials kernel is specialised on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct DecodeConfig {
    /// Tokens per block.
    pub block: usize,
    /// Vectors per row.
    pub vecs: usize,
    /// Units per task.
    pub units: usize,
    /// 32-bit words per element mask.
    pub mask_words: usize,
    /// The layout carries a token order.
    pub permuted: bool,
    /// Scores are soft-capped.
    pub softcap: bool,
    /// Scores carry ALiBi biases.
    pub alibi: bool,
    /// Scores carry a relative-position bias.
    pub relative: bool,
}

/// Decode: writes `out` (`[B, H, queries, d]`, like `q`) from the new rows `q` and the caches
/// `k`, `v` (`[B, H_kv, capacity, d]`, `capacity = layout.seq_len`) as
/// `sparse_attn_core::sparse_attention_decode` defines it: row `i` of batch row `b` attends
/// the keys its layout row allows among cache tokens `0 .. rows.lengths[b]`, each score
/// changed by the score modifiers `mods`.
///
/// Buffers are contiguous, of `dtype`, in token order; they are checked against the shape
/// before anything is launched.
///
/// # Errors
/// A shape the layout was not built for, rows that do not match the shape, or a handle
/// smaller than its tensor ([`KernelError::Shape`], [`KernelError::Buffer`]); what
/// [`check_problem`](crate::check_problem) refuses.
#[allow(clippy::too_many_arguments)]
pub fn decode(
    client: &Client,
    dtype: ElemType,
    cache: AttentionShape,
    layout: &DeviceLayout,
    scale: f32,
    mods: ScoreMods<'_>,
    rows: &DecodeQueries<'_>,
    [q, k, v, out]: [&Handle; 4],
) -> Result<(), KernelError> {
    let shape_error = |reason: String| Err(KernelError::Shape { reason });
    let queries = rows.queries;
    let q_shape = AttentionShape {
        seq_len: queries,
        ..cache
    };
    if rows.positions.len() != cache.batch * queries || rows.lengths.len() != cache.batch {
        return shape_error(format!(
            "{} query positions and {} lengths for a batch of {} with {queries} new rows",
            rows.positions.len(),
            rows.lengths.len(),
            cache.batch
        ));
    }
    if let Some(&p) = rows
        .positions
        .iter()
        .find(|&&p| p != NO_QUERY && p as usize >= cache.seq_len)
    {
        return shape_error(format!(
            "query position {p} past the cache of {}",
            cache.seq_len
        ));
    }
    if let Some(&len) = rows.lengths.iter().find(|&&l| l as usize > cache.seq_len) {
        return shape_error(format!(
            "cached length {len} past the cache of {}",
            cache.seq_len
        ));
    }
    crate::check_problem(client, dtype, &cache, layout.block)?;
    let bytes = dtype.size();
    let buffers = [
        ("q", q, q_shape.numel(), bytes),
        ("k", k, cache.kv_numel(), bytes),
        ("v", v, cache.kv_numel(), bytes),
        ("out", out, q_shape.numel(), bytes),
    ];
    crate::launch::check_buffers(&cache, layout, &Default::default(), &buffers)?;
    if q_shape.numel() == 0 {
        return Ok(());
    }
    let lanes = [4, 2, 1]
        .into_iter()
        .find(|l| cache.head_dim.is_multiple_of(*l))
        .unwrap_or(1);
    let vecs = cache.head_dim / lanes;
    let per_chunk = (CHUNK_KEYS / layout.block).max(1);
    let chunks = rows.max_blocks.div_ceil(per_chunk).max(1);
    let tasks = cache.batch * cache.heads * queries * chunks;
    let max_units = (client.properties().hardware.max_units_per_cube as usize).min(MAX_UNITS);
    let mut units = 1;
    while units * 2 <= max_units && tasks * units < FILL_UNITS {
        units *= 2;
    }
    let partials = tasks * units;
    let stats = client.empty(2 * partials * size_of::<f32>());
    let acc = client.empty(partials * cache.head_dim * size_of::<f32>());
    let positions = upload(client, rows.positions);
    let lengths = upload(client, rows.lengths);
    if let Err(reason) = check_mods(&mods, cache.heads) {
        return shape_error(reason);
    }
    let data = mods_buffer(&mods, cache.heads);
    let slopes = (client.create_from_slice(f32::as_bytes(&data)), data.len());
    let config = DecodeConfig {
        block: layout.block,
        vecs,
        units,
        mask_words: 2 * layout.mask_words.max(1),
        permuted: layout.permuted,
        softcap: mods.softcap.is_some(),
        alibi: mods.alibi.is_some(),
        relative: mods.bias.is_some(),
    };
    let args = DecodeArgsLaunch::new(
        cache.seq_len,
        layout.n_blocks,
        cache.heads,
        cache.kv_heads,
        u32::from(layout.layout_heads == 1),
        queries,
        chunks,
        per_chunk,
        tasks,
        scale,
        mods.softcap.map_or(1.0, |c| c as f32),
    );
    let (q_vecs, kv_vecs) = (q_shape.numel() / lanes, cache.kv_numel() / lanes);
    launch_kernel!(decode_partials_kernel(
        client,
        grid_count(client, tasks),
        CubeDim::new_1d(units as u32),
        lanes,
        tensor(q, q_vecs),
        tensor(k, kv_vecs),
        tensor(v, kv_vecs),
        arg(&(stats.clone(), 2 * partials)),
        arg(&(acc.clone(), partials * vecs)),
        arg(&layout.row_ptr),
        arg(&layout.cols),
        arg(&layout.masks),
        arg(&layout.mask_bits),
        arg(&layout.order),
        arg(&positions),
        arg(&lengths),
        arg(&slopes),
        args,
        config,
        dtype,
    ));
    let items = q_shape.rows() * vecs;
    let per_cube = 256usize;
    let cubes = items.div_ceil(per_cube);
    launch_kernel!(decode_merge_kernel(
        client,
        grid_count(client, cubes),
        CubeDim::new_1d(per_cube as u32),
        lanes,
        arg(&(stats, 2 * partials)),
        arg(&(acc, partials * vecs)),
        tensor(out, q_vecs),
        items,
        chunks * units,
        vecs,
        dtype,
    ));
    Ok(())
}
