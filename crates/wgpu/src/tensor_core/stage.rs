//! Device-side pieces shared by the tensor-core kernels: the comptime configuration, the
//! launch scalars, staging rows into shared memory, fragments and row-wise plane reductions.

use cubecl::cmma;
use cubecl::prelude::*;

use crate::tensor_core::FRAG;
use crate::tiles::token;

/// Token slot of a staged row that is no key (past the end, or padded out).
pub(crate) const NO_TOKEN: u32 = u32::MAX;

/// What the tensor-core kernels are specialised on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TensorCoreConfig {
    /// Tokens per block (a multiple of 16); one plane per 16 rows.
    pub block: usize,
    /// Head dimension (a multiple of 16).
    pub head_dim: usize,
    /// Rows of the other side staged per tile (a power of two, a multiple of 16).
    pub tile: usize,
    /// Units per plane.
    pub plane: usize,
    /// Lanes per input vector.
    pub lanes: usize,
    /// 32-bit words per element mask.
    pub mask_words: usize,
    /// The layout carries a token order.
    pub permuted: bool,
    /// Key lengths per batch row are given.
    pub padded: bool,
    /// Dropout on the probabilities.
    pub dropout: bool,
    /// The `dK`/`dV` kernel computes `dK`.
    pub with_dk: bool,
    /// The `dK`/`dV` kernel computes `dV`.
    pub with_dv: bool,
}

impl TensorCoreConfig {
    /// Planes per cube.
    pub fn planes(&self) -> usize {
        self.block / FRAG
    }

    /// Lanes of a plane that share one row of a score tile.
    pub fn lanes_per_row(&self) -> usize {
        self.plane / FRAG
    }

    /// Score-tile columns each lane of a row handles.
    pub fn per_lane(&self) -> usize {
        self.tile / self.lanes_per_row()
    }

    /// Fragments across the head dim.
    pub fn chunks(&self) -> usize {
        self.head_dim / FRAG
    }

    /// Vectors per row.
    pub fn vecs(&self) -> usize {
        self.head_dim / self.lanes
    }
}

/// The scalars of one launch.
#[derive(CubeLaunch, CubeType)]
pub(crate) struct ProblemArgs {
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Blocks per sequence.
    pub n_blocks: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// 1 when all heads share the layout.
    pub shared_layout: u32,
    /// Cubes with work (the grid may have more).
    pub tasks: usize,
    /// Score scale.
    pub scale: f32,
    /// The log-sum-exp of an empty row.
    pub neg_inf: f32,
    /// Dropout seed, low half.
    pub seed_lo: u32,
    /// Dropout seed, high half.
    pub seed_hi: u32,
    /// Dropout threshold on the 32-bit hash.
    pub threshold: u32,
    /// Factor of kept probabilities.
    pub keep_scale: f32,
}

/// Where a unit works: its cube's task and its plane and lane.
#[derive(CubeType, Clone, Copy)]
pub(crate) struct PlaneTask {
    /// Index of the `(batch, head)` pair (or `(batch, kv head)` in the `dK`/`dV` pass).
    pub bh: usize,
    /// The cube's block.
    pub blk: usize,
    /// The unit's plane: rows `16 * plane ..` of the block.
    pub plane: usize,
    /// The unit's lane in its plane.
    pub lane: usize,
    /// The unit's index in the cube.
    pub unit: usize,
    /// The score-tile row of the unit (`lane % 16`).
    pub row: usize,
    /// Which of its row's lanes the unit is (`lane / 16`).
    pub part: usize,
}

/// Decodes the cube's task (block `task % n_blocks` of pair `task / n_blocks`); cubes past the
/// last task end here.
#[cube]
pub(crate) fn plane_task(n_blocks: usize, tasks: usize, #[comptime] plane: usize) -> PlaneTask {
    let task = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if task >= tasks {
        terminate!();
    }
    let lane = UNIT_POS_X as usize;
    let plane_idx = UNIT_POS_Y as usize;
    PlaneTask {
        bh: task / n_blocks,
        blk: task % n_blocks,
        plane: plane_idx,
        lane,
        unit: plane_idx * plane + lane,
        row: lane % FRAG,
        part: lane / FRAG,
    }
}

/// Stages layout positions `start .. start + len` (`len <= rows`) of `src` (rows of `vecs`
/// vectors from vector `base`) at vector `offset` of `stage`; rows `len .. rows` become zeros
/// (so that masked probabilities never meet stale values). The cube's units share the work;
/// callers synchronise the cube around it.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_rows<F: Float, N: Size>(
    src: &[Vector<F, N>],
    stage: &mut Shared<[Vector<F, N>]>,
    offset: usize,
    order: &[u32],
    base: usize,
    start: usize,
    len: usize,
    unit: usize,
    #[comptime] rows: usize,
    #[comptime] vecs: usize,
    #[comptime] units: usize,
    #[comptime] permuted: bool,
) {
    for idx in range_stepped(unit, rows * vecs, units) {
        let row = idx / vecs;
        stage[offset + idx] = if row < len {
            src[base + token(order, start + row, permuted) * vecs + idx % vecs]
        } else {
            Vector::<F, N>::new(F::from_int(0))
        };
    }
}

/// `chunks` row-major `A` fragments (16 rows each, 16 columns apart) with no contents yet.
#[cube]
pub(crate) fn new_a_fragments<F: Float>(#[comptime] chunks: usize) -> Sequence<cmma::Matrix<F>> {
    let mut frags = Sequence::new();
    #[unroll]
    for _ in 0..chunks {
        frags.push(unsafe {
            cmma::Matrix::<F>::uninitialized(
                cmma::MatrixIdent::A,
                FRAG,
                FRAG,
                FRAG,
                cmma::MatrixLayout::RowMajor,
            )
        });
    }
    frags
}

/// `chunks` f32 accumulator fragments filled with zeros.
#[cube]
pub(crate) fn new_accumulators(#[comptime] chunks: usize) -> Sequence<cmma::Matrix<f32>> {
    let mut accs = Sequence::new();
    #[unroll]
    for _ in 0..chunks {
        accs.push(cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            FRAG,
            FRAG,
            FRAG,
            cmma::MatrixLayout::Undefined,
            0.0f32,
        ));
    }
    accs
}

/// Loads each plane's 16 rows of the cube's block of `src` into `frags` (one fragment per 16
/// columns), staging the block through `stage` (`2 * tile` rows at a time). Every unit of the
/// cube must call it.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn load_block_fragments<F: Float, N: Size>(
    src: &[Vector<F, N>],
    stage: &mut Shared<[Vector<F, N>]>,
    frags: &mut Sequence<cmma::Matrix<F>>,
    order: &[u32],
    base: usize,
    block_start: usize,
    block_len: usize,
    at: &PlaneTask,
    #[comptime] config: TensorCoreConfig,
) {
    let rows = comptime!(2 * config.tile);
    let vecs = config.vecs();
    let d = config.head_dim;
    let units = comptime!(config.planes() * config.plane);
    let stride = comptime!(config.head_dim as u32);
    let row0 = at.plane * FRAG;
    for r0 in range_stepped(0, config.block, rows) {
        let len = if block_len > r0 {
            crate::tiles::span(block_len, r0, rows)
        } else {
            0usize
        };
        sync_cube();
        stage_rows(
            src,
            stage,
            0,
            order,
            base,
            block_start + r0,
            len,
            at.unit,
            rows,
            vecs,
            units,
            config.permuted,
        );
        sync_cube();
        if row0 >= r0 && row0 < r0 + rows {
            #[unroll]
            for c in 0..config.chunks() {
                let first = ((row0 - r0) * d + c * FRAG) / config.lanes;
                let last = ((row0 - r0 + FRAG) * d) / config.lanes;
                cmma::load(&mut frags[c], &stage[first..last], stride);
            }
        }
    }
}

/// `S = A Bᵀ` for one plane: `a` holds the plane's 16 rows (one fragment per 16 columns of
/// the head dim), the staged tile at vector `offset` of `stage` the `tile` rows of `B`; the
/// 16 x tile f32 result goes row-major into `scores` from `scores_at`.
#[cube]
pub(crate) fn scores_into<F: Float, N: Size>(
    a: &Sequence<cmma::Matrix<F>>,
    stage: &Shared<[Vector<F, N>]>,
    offset: usize,
    scores: &mut Shared<[f32]>,
    scores_at: usize,
    #[comptime] config: TensorCoreConfig,
) {
    let d = config.head_dim;
    let stride = comptime!(config.head_dim as u32);
    let tile_stride = comptime!(config.tile as u32);
    #[unroll]
    for j in 0..comptime!(config.tile / FRAG) {
        let acc = cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            FRAG,
            FRAG,
            FRAG,
            cmma::MatrixLayout::Undefined,
            0.0f32,
        );
        #[unroll]
        for c in 0..config.chunks() {
            let first = offset + (j * FRAG * d + c * FRAG) / config.lanes;
            let last = offset + ((j + 1) * FRAG * d) / config.lanes;
            let mut b = unsafe {
                cmma::Matrix::<F>::uninitialized(
                    cmma::MatrixIdent::B,
                    FRAG,
                    FRAG,
                    FRAG,
                    cmma::MatrixLayout::ColMajor,
                )
            };
            cmma::load(&mut b, &stage[first..last], stride);
            cmma::execute(&a[c], &b, &acc, &acc);
        }
        let at = scores_at + j * FRAG;
        cmma::store(
            &mut scores[at..at + comptime!((FRAG - 1) * config.tile + FRAG)],
            &acc,
            tile_stride,
            cmma::MatrixLayout::RowMajor,
        );
    }
}

/// `acc += P B` for one plane: `probs` holds the plane's 16 x tile `P` (row-major, 16-bit,
/// from `probs_at`), the staged tile at vector `offset` of `stage` the `tile` rows of `B`
/// (row-major); `acc` one accumulator per 16 columns of the head dim.
#[cube]
pub(crate) fn accumulate_product<F: Float, N: Size>(
    probs: &Shared<[F]>,
    probs_at: usize,
    stage: &Shared<[Vector<F, N>]>,
    offset: usize,
    acc: &mut Sequence<cmma::Matrix<f32>>,
    #[comptime] config: TensorCoreConfig,
) {
    let d = config.head_dim;
    let stride = comptime!(config.head_dim as u32);
    let tile_stride = comptime!(config.tile as u32);
    #[unroll]
    for j in 0..comptime!(config.tile / FRAG) {
        let at = probs_at + j * FRAG;
        let p = cmma::Matrix::<F>::from_slice(
            cmma::MatrixIdent::A,
            FRAG,
            FRAG,
            FRAG,
            cmma::MatrixLayout::RowMajor,
            &probs[at..at + comptime!((FRAG - 1) * config.tile + FRAG)],
            tile_stride,
        );
        #[unroll]
        for c in 0..config.chunks() {
            let first = offset + (j * FRAG * d + c * FRAG) / config.lanes;
            let last = offset + ((j + 1) * FRAG * d) / config.lanes;
            let mut b = unsafe {
                cmma::Matrix::<F>::uninitialized(
                    cmma::MatrixIdent::B,
                    FRAG,
                    FRAG,
                    FRAG,
                    cmma::MatrixLayout::RowMajor,
                )
            };
            cmma::load(&mut b, &stage[first..last], stride);
            cmma::execute(&p, &b, &acc[c], &acc[c]);
        }
    }
}

/// Column of a score tile that the `i`-th step of lane part `part` of row `row` visits: the
/// row's lanes interleave, and each row starts at its own offset, so the 16 rows hit 16
/// different shared-memory banks.
#[cube]
pub(crate) fn tile_column(
    i: usize,
    row: usize,
    part: usize,
    #[comptime] lanes_per_row: usize,
    #[comptime] tile: usize,
) -> usize {
    (part + lanes_per_row * (i + row)) % tile
}

/// Max of `x` over the lanes of one score-tile row (lanes `row + 16 * k`, `k <
/// lanes_per_row <= 4`).
#[cube]
pub(crate) fn row_max(x: f32, #[comptime] lanes_per_row: usize) -> f32 {
    let mut out = x;
    if comptime!(lanes_per_row >= 2) {
        out = f32::max(out, plane_shuffle_xor(out, 16u32));
    }
    if comptime!(lanes_per_row >= 4) {
        out = f32::max(out, plane_shuffle_xor(out, 32u32));
    }
    out
}

/// Sum of `x` over the lanes of one score-tile row (as [`row_max`]).
#[cube]
pub(crate) fn row_sum(x: f32, #[comptime] lanes_per_row: usize) -> f32 {
    let mut out = x;
    if comptime!(lanes_per_row >= 2) {
        out += plane_shuffle_xor(out, 16u32);
    }
    if comptime!(lanes_per_row >= 4) {
        out += plane_shuffle_xor(out, 32u32);
    }
    out
}

/// Writes the plane's accumulators (its 16 rows) to `dst` in the input dtype, times
/// `factor` of each row (held by lane `row` of the plane), through the plane's f32 tile
/// `scratch` (from `scratch_at`, at least 256 values). Rows with `dst_row == NO_TOKEN` are
/// not written; `dst_row` (the token, held by lane `row` too) selects the destination row
/// `dst_base + token * head_dim`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_rows<F: Float>(
    acc: &Sequence<cmma::Matrix<f32>>,
    dst: &mut [F],
    dst_base: usize,
    dst_row: u32,
    factor: f32,
    scratch: &mut Shared<[f32]>,
    scratch_at: usize,
    lane: usize,
    #[comptime] config: TensorCoreConfig,
) {
    let d = config.head_dim;
    let frag_stride = comptime!(FRAG as u32);
    let per_lane = comptime!(FRAG * FRAG / config.plane);
    #[unroll]
    for c in 0..config.chunks() {
        sync_plane();
        cmma::store(
            &mut scratch[scratch_at..scratch_at + FRAG * FRAG],
            &acc[c],
            frag_stride,
            cmma::MatrixLayout::RowMajor,
        );
        sync_plane();
        #[unroll]
        for i in 0..per_lane {
            let e = lane + i * config.plane;
            let r = (e / FRAG) as u32;
            let tok = plane_shuffle(dst_row, r);
            let f = plane_shuffle(factor, r);
            if tok != NO_TOKEN {
                dst[dst_base + tok as usize * d + c * FRAG + e % FRAG] =
                    F::cast_from(scratch[scratch_at + e] * f);
            }
        }
    }
}
