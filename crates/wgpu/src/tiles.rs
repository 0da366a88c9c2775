//! Device-side helpers shared by the kernels, and the host-side choice of tile sizes.

use cubecl::prelude::*;

use crate::args::{FmaConfig, ProblemArgs};

/// Score of a disallowed pair inside the kernels: finite (WGSL has no infinity literal),
/// far below any real score.
pub(crate) const MASKED: f32 = -3.0e38;

/// Loops over the vectors of a row are unrolled (rows kept in registers) up to this many
/// vectors; longer rows loop (and compile in reasonable time on software Vulkan).
pub(crate) const UNROLL_MAX: usize = 32;

/// Sum of the lanes of `x`.
#[cube]
pub(crate) fn lane_sum<N: Size>(x: Vector<f32, N>) -> f32 {
    let mut sum = 0.0f32;
    #[unroll]
    for l in 0..N::value() {
        sum += x.extract(l);
    }
    sum
}

pub(crate) use sparse_attn_kernel_types::FULL_BLOCK as FULL;

/// CSR row index of query (or key) block `r` for the `bh`-th `(batch, head)` pair.
#[cube]
pub(crate) fn head_row(
    bh: usize,
    r: usize,
    heads: usize,
    n_blocks: usize,
    shared_layout: u32,
) -> usize {
    let lh = if shared_layout == 1 {
        0usize
    } else {
        bh % heads
    };
    lh * n_blocks + r
}

/// Where a unit works: its cube's `(batch x head)` pair and block, and its row in the block.
#[derive(CubeType, Clone, Copy)]
pub(crate) struct RowUnit {
    /// Index of the `(batch, head)` pair.
    pub bh: usize,
    /// The cube's block.
    pub blk: usize,
    /// CSR row (or transposed column) of the cube's block for this head.
    pub list: usize,
    /// The unit's row in the block.
    pub u: usize,
    /// Which of the row's units this is (`0 .. splits`).
    pub lane: usize,
    /// Whether the row exists (the last block may be short).
    pub valid: bool,
    /// First vector of this `(batch, head)` pair in the `[B, H, n, d]` buffers.
    pub base: usize,
    /// First vector of the `(batch, kv head)` pair it reads in the `[B, H_kv, n, d]` buffers.
    pub kv_base: usize,
    /// Token of the unit's row (0 for a row past the end).
    pub tok: usize,
}

/// Decodes the cube's task (block `task % n_blocks` of pair `task / n_blocks`, the pairs of
/// `heads` heads per batch row: the query heads, or the key/value heads of the dK/dV pass)
/// and the unit's row and lane; cubes past the last task end here. Query head `h` reads key/value head
/// `h / (heads / kv_heads)`.
#[cube]
pub(crate) fn row_unit(
    order: &[u32],
    heads: usize,
    args: &ProblemArgs,
    #[comptime] config: FmaConfig,
) -> RowUnit {
    let (block, vecs) = (config.block, config.vecs);
    let task = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if task >= args.tasks {
        terminate!();
    }
    let blk = task % args.n_blocks;
    let bh = task / args.n_blocks;
    let unit = UNIT_POS_X as usize;
    let u = unit % block;
    let pos = blk * block + u;
    let valid = pos < args.seq_len;
    let kv_heads = args.kv_heads;
    let kv = (bh / heads) * kv_heads + (bh % heads) / (heads / kv_heads);
    RowUnit {
        bh,
        blk,
        list: head_row(bh, blk, heads, args.n_blocks, args.shared_layout),
        u,
        lane: unit / block,
        valid,
        base: bh * args.seq_len * vecs,
        kv_base: kv * args.seq_len * vecs,
        tok: if valid {
            token(order, pos, config.permuted)
        } else {
            0usize
        },
    }
}

/// Token held by layout position `pos`.
#[cube]
pub(crate) fn token(order: &[u32], pos: usize, #[comptime] permuted: bool) -> usize {
    if permuted { order[pos] as usize } else { pos }
}

/// Whether local query `i` may attend local key `j` in a block with mask index `mask`.
#[cube]
pub(crate) fn allowed(
    bits: &[u32],
    mask: u32,
    i: usize,
    j: usize,
    #[comptime] block: usize,
    #[comptime] mask_words: usize,
) -> bool {
    if mask == FULL {
        true
    } else {
        let bit = i * block + j;
        let word = bits[mask as usize * mask_words + bit / 32];
        (word >> (bit % 32) as u32) & 1 == 1
    }
}

/// `min(total - start, cap)`: the length of the block or tile starting at `start`.
#[cube]
pub(crate) fn span(total: usize, start: usize, #[comptime] cap: usize) -> usize {
    if total - start < cap {
        total - start
    } else {
        cap
    }
}

/// Loads layout positions `start .. start + len` (`len <= cap`) of `a` and `b` (rows of
/// `vecs` vectors from `base`) into `a_tile` and `b_tile`, converted to `f32`; the `units`
/// units of the cube share the work. Callers synchronise the cube around it.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn load_tiles<F: Float, N: Size>(
    a: &[Vector<F, N>],
    b: &[Vector<F, N>],
    a_tile: &mut Shared<[Vector<f32, N>]>,
    b_tile: &mut Shared<[Vector<f32, N>]>,
    order: &[u32],
    base: usize,
    start: usize,
    len: usize,
    unit: usize,
    #[comptime] cap: usize,
    #[comptime] vecs: usize,
    #[comptime] units: usize,
    #[comptime] permuted: bool,
) {
    for idx in range_stepped(unit, cap * vecs, units) {
        let row = idx / vecs;
        if row < len {
            let src = base + token(order, start + row, permuted) * vecs + idx % vecs;
            a_tile[idx] = Vector::<f32, N>::cast_from(a[src]);
            b_tile[idx] = Vector::<f32, N>::cast_from(b[src]);
        }
    }
}

/// Adds lane `other`'s `acc` of each row into lane 0's, through the two shared tiles (`2 *
/// cap` rows of `vecs` vectors, reused once the main loop is done), `2 * cap` rows at a time.
/// Every unit of the cube must call it.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn merge_pair<N: Size>(
    acc: &mut Array<Vector<f32, N>>,
    stage_a: &mut Shared<[Vector<f32, N>]>,
    stage_b: &mut Shared<[Vector<f32, N>]>,
    row: usize,
    lane: usize,
    other: usize,
    #[comptime] cap: usize,
    #[comptime] vecs: usize,
    #[comptime] block: usize,
) {
    for r0 in range_stepped(0, block, 2 * cap) {
        let here = row >= r0 && row < r0 + 2 * cap;
        let slot = if here { row - r0 } else { 0usize };
        sync_cube();
        if here && lane == other {
            #[unroll(vecs <= UNROLL_MAX)]
            for c in 0..vecs {
                if slot < cap {
                    stage_a[slot * vecs + c] = acc[c];
                } else {
                    stage_b[(slot - cap) * vecs + c] = acc[c];
                }
            }
        }
        sync_cube();
        if here && lane == 0 {
            #[unroll(vecs <= UNROLL_MAX)]
            for c in 0..vecs {
                if slot < cap {
                    acc[c] += stage_a[slot * vecs + c];
                } else {
                    acc[c] += stage_b[(slot - cap) * vecs + c];
                }
            }
        }
    }
}

/// Adds the `acc` of lanes `1 .. splits` of each row into lane 0's ([`merge_pair`] per lane).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn merge_sums<N: Size>(
    acc: &mut Array<Vector<f32, N>>,
    stage_a: &mut Shared<[Vector<f32, N>]>,
    stage_b: &mut Shared<[Vector<f32, N>]>,
    row: usize,
    lane: usize,
    #[comptime] cap: usize,
    #[comptime] vecs: usize,
    #[comptime] block: usize,
    #[comptime] splits: usize,
) {
    for other in 1..splits {
        merge_pair(acc, stage_a, stage_b, row, lane, other, cap, vecs, block);
    }
}
