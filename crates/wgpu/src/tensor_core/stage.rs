//! Device-side pieces shared by the tensor-core kernels: the comptime configuration, the
//! launch scalars, staging rows into shared memory, fragments and row-wise plane reductions.

use cubecl::cmma;
use cubecl::prelude::*;

use crate::options::in_length;
use crate::tensor_core::FRAG;
use crate::tiles::{span, token};

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
    /// Scores are soft-capped.
    pub softcap: bool,
    /// Scores carry ALiBi biases.
    pub alibi: bool,
    /// Scores carry a relative-position bias.
    pub relative: bool,
    /// The `dQ` kernel also sums the bias gradient per query block (`buckets` sums per unit).
    pub bias_grad: bool,
    /// Buckets of the relative-position bias (0 without one).
    pub buckets: usize,
    /// The `dK`/`dV` kernel computes `dK`.
    pub with_dk: bool,
    /// The `dK`/`dV` kernel computes `dV`.
    pub with_dv: bool,
}

/// Padding, in scalars, after each row of the shared-memory tiles: 8 scalars (16 bytes of a
/// 16-bit dtype) shift consecutive rows by four banks, so the eight 16-byte rows that a
/// fragment load or store touches at once hit distinct banks instead of one.
pub(crate) const TILE_PAD: usize = 8;

impl TensorCoreConfig {
    /// Planes per cube.
    pub fn planes(&self) -> usize {
        self.block / FRAG
    }

    /// Units per cube.
    pub fn units(&self) -> usize {
        self.planes() * self.plane
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

    /// Scalars from one staged row to the next (head dim plus padding).
    pub fn row_stride(&self) -> usize {
        self.head_dim + TILE_PAD
    }

    /// Vectors from one staged row to the next.
    pub fn row_vecs(&self) -> usize {
        self.row_stride() / self.lanes
    }

    /// Scalars from one row of a plane's score (or probability) tile to the next.
    pub fn tile_stride(&self) -> usize {
        self.tile + TILE_PAD
    }

    /// Scalars of one plane's score (or probability) tile.
    pub fn plane_tile(&self) -> usize {
        FRAG * self.tile_stride()
    }
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

/// Vectors of a `rows`-row tile that each of the cube's `units` units fetches.
pub(crate) fn per_unit(rows: usize, vecs: usize, units: usize) -> usize {
    (rows * vecs).div_ceil(units)
}

/// Where the `f`-th tile of a block row's flat tile sequence lies: its layout entry, the
/// layout position of its first row and its length (0 for the tiles past the end of a
/// short last block, which then stage as zeros and are masked whole).
#[derive(CubeType, Clone, Copy)]
pub(crate) struct TileAt {
    /// Index of the tile's layout entry.
    pub entry: usize,
    /// Layout position of the tile's first row.
    pub start: usize,
    /// Position of the tile inside its block.
    pub offset: usize,
    /// Rows of the tile that exist.
    pub len: usize,
}

/// The `f`-th tile of the blocks listed at `blocks[first ..]`, `block / tile` tiles per
/// block, in sequences of `n` tokens; a tile that does not `exist` (one past the last) has
/// length 0 and reads nothing.
#[cube]
pub(crate) fn tile_at(
    blocks: &[u32],
    first: usize,
    f: usize,
    n: usize,
    #[comptime] block: usize,
    #[comptime] tile: usize,
    exists: bool,
) -> TileAt {
    let per_block = comptime!(block / tile);
    let entry = first + f / per_block;
    let offset = (f % per_block) * tile;
    let block_start = if exists {
        blocks[entry] as usize * block
    } else {
        0usize
    };
    let block_len = span(n, block_start, block);
    let len = if exists && offset < block_len {
        span(block_len, offset, tile)
    } else {
        0usize
    };
    TileAt {
        entry,
        start: block_start + offset,
        offset,
        len,
    }
}

/// Reads this unit's share of layout positions `start .. start + len` (`len <= rows`) of
/// `src` (rows of `vecs` vectors from vector `base`) into `regs` ([`per_unit`] vectors);
/// rows `len .. rows` read as zeros (so that masked probabilities never meet stale values).
/// Issued a tile ahead, the loads overlap the products of the current tile.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn fetch_rows<F: Float, N: Size>(
    src: &[Vector<F, N>],
    regs: &mut Array<Vector<F, N>>,
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
    #[unroll]
    for i in 0..comptime!(per_unit(rows, vecs, units)) {
        let idx = unit + i * units;
        let row = idx / vecs;
        regs[i] = if row < len {
            src[base + token(order, start + row, permuted) * vecs + idx % vecs]
        } else {
            Vector::<F, N>::new(F::from_int(0))
        };
    }
}

/// Writes what [`fetch_rows`] read to vector `offset` of `stage`, rows `row_vecs` vectors
/// apart (the padding vectors are never read). Callers synchronise the cube around it.
#[cube]
pub(crate) fn store_rows<F: Float, N: Size>(
    regs: &Array<Vector<F, N>>,
    stage: &mut Shared<[Vector<F, N>]>,
    offset: usize,
    unit: usize,
    #[comptime] rows: usize,
    #[comptime] vecs: usize,
    #[comptime] row_vecs: usize,
    #[comptime] units: usize,
) {
    #[unroll]
    for i in 0..comptime!(per_unit(rows, vecs, units)) {
        let idx = unit + i * units;
        if comptime!((rows * vecs).is_multiple_of(units)) || idx < rows * vecs {
            stage[offset + (idx / vecs) * row_vecs + idx % vecs] = regs[i];
        }
    }
}

/// [`fetch_rows`] then [`store_rows`]: stages positions `start .. start + len` at vector
/// `offset` of `stage`.
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
    #[comptime] row_vecs: usize,
    #[comptime] units: usize,
    #[comptime] permuted: bool,
) {
    let mut regs = Array::<Vector<F, N>>::new(comptime!(per_unit(rows, vecs, units)));
    fetch_rows(
        src, &mut regs, order, base, start, len, unit, rows, vecs, units, permuted,
    );
    store_rows(&regs, stage, offset, unit, rows, vecs, row_vecs, units);
}

/// Elements of a slice (of `lanes`-scalar vectors) that a 16 x 16 fragment with rows
/// `stride` scalars apart spans from its first element.
pub(crate) fn fragment_span(stride: usize, lanes: usize) -> usize {
    ((FRAG - 1) * stride + FRAG).div_ceil(lanes)
}

/// The token of key `unit` of a tile of `len` keys from layout position `start`, or
/// [`NO_TOKEN`] past the tile's end or its batch row's length.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn key_token(
    order: &[u32],
    lengths: &[u32],
    batch: usize,
    start: usize,
    len: usize,
    unit: usize,
    #[comptime] config: TensorCoreConfig,
) -> u32 {
    let exists = unit < len;
    let tok = if exists {
        token(order, start + unit, config.permuted)
    } else {
        0usize
    };
    if exists && in_length(lengths, batch, tok, config.padded) {
        tok as u32
    } else {
        NO_TOKEN
    }
}

/// Fetches this unit's share of the key/value tile `at_tile` (of `k` and `v`, rows of the
/// pair from vector `base`) into registers, and the unit's key token ([`key_token`]) into
/// `tok_reg[0]`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn fetch_pair<F: Float, N: Size>(
    k: &[Vector<F, N>],
    v: &[Vector<F, N>],
    k_regs: &mut Array<Vector<F, N>>,
    v_regs: &mut Array<Vector<F, N>>,
    tok_reg: &mut Array<u32>,
    order: &[u32],
    lengths: &[u32],
    batch: usize,
    base: usize,
    at_tile: &TileAt,
    at: &PlaneTask,
    #[comptime] config: TensorCoreConfig,
) {
    let units = comptime!(config.units());
    let (tile, vecs) = comptime!((config.tile, config.vecs()));
    #[rustfmt::skip]
    fetch_rows(k, k_regs, order, base, at_tile.start, at_tile.len, at.unit, tile, vecs, units, config.permuted);
    #[rustfmt::skip]
    fetch_rows(v, v_regs, order, base, at_tile.start, at_tile.len, at.unit, tile, vecs, units, config.permuted);
    tok_reg[0] = key_token(
        order,
        lengths,
        batch,
        at_tile.start,
        at_tile.len,
        at.unit,
        config,
    );
}

/// Stores what [`fetch_pair`] fetched: keys at vector 0 of `stage`, values after them, the
/// key tokens in `key_toks`. Callers synchronise the cube around it.
#[cube]
pub(crate) fn store_pair<F: Float, N: Size>(
    k_regs: &Array<Vector<F, N>>,
    v_regs: &Array<Vector<F, N>>,
    stage: &mut Shared<[Vector<F, N>]>,
    key_toks: &mut Shared<[u32]>,
    tok_reg: &Array<u32>,
    at: &PlaneTask,
    #[comptime] config: TensorCoreConfig,
) {
    let units = comptime!(config.units());
    let (tile, vecs, row_vecs) = comptime!((config.tile, config.vecs(), config.row_vecs()));
    store_rows(k_regs, stage, 0, at.unit, tile, vecs, row_vecs, units);
    store_rows(
        v_regs,
        stage,
        comptime!(tile * row_vecs),
        at.unit,
        tile,
        vecs,
        row_vecs,
        units,
    );
    if at.unit < tile {
        key_toks[at.unit] = tok_reg[0];
    }
}

/// Whether key `col` of the current tile (of `len` keys) exists for the masks: inside the
/// tile and, with key lengths, inside its batch row (`key_toks` holds [`NO_TOKEN`] there).
#[cube]
pub(crate) fn key_live(
    key_toks: &Shared<[u32]>,
    col: usize,
    len: usize,
    #[comptime] config: TensorCoreConfig,
) -> bool {
    if config.padded {
        key_toks[col] != NO_TOKEN
    } else {
        col < len
    }
}

/// Registers of a key/value tile fetched ahead of its use.
#[derive(CubeType)]
pub(crate) struct PairRegs<F: Float, N: Size> {
    /// This unit's share of the keys.
    pub k: Array<Vector<F, N>>,
    /// This unit's share of the values.
    pub v: Array<Vector<F, N>>,
    /// This unit's key token (`[0]`).
    pub tok: Array<u32>,
}

/// The key/value tile walk of the forward and `dQ` kernels over the active blocks
/// `cols[first .. first + tiles / (block / tile)]` (in rows `kv_base ..` of `k` and `v`).
/// [`start_pair_walk`] fetches the first tile; each [`next_pair_tile`] stores the fetched
/// tile into `stage` and `key_toks`, issues the loads of the one after it (they overlap the
/// products of this one) and returns where this one lies.
#[derive(CubeType, Clone, Copy)]
pub(crate) struct PairWalk {
    /// Index of the first layout entry.
    pub first: usize,
    /// Tiles in the walk.
    pub tiles: usize,
    /// Tokens per sequence.
    pub n: usize,
    /// Batch row (for key lengths).
    pub batch: usize,
    /// Vector of the pair's first row in `k` and `v`.
    pub base: usize,
}

/// The walk over the key/value tiles of CSR row `list` (`row_ptr[list] ..
/// row_ptr[list + 1]`), for a query row of batch row `batch`, keys and values from vector
/// `base`.
#[cube]
pub(crate) fn row_walk(
    row_ptr: &[u32],
    list: usize,
    n: usize,
    batch: usize,
    base: usize,
    #[comptime] config: TensorCoreConfig,
) -> PairWalk {
    let start = row_ptr[list] as usize;
    let end = row_ptr[list + 1] as usize;
    PairWalk {
        first: start,
        tiles: (end - start) * comptime!(config.block / config.tile),
        n,
        batch,
        base,
    }
}

/// Fetches the first tile of `walk` into new registers.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn start_pair_walk<F: Float, N: Size>(
    k: &[Vector<F, N>],
    v: &[Vector<F, N>],
    cols: &[u32],
    order: &[u32],
    lengths: &[u32],
    walk: &PairWalk,
    at: &PlaneTask,
    #[comptime] config: TensorCoreConfig,
) -> PairRegs<F, N> {
    let units = comptime!(config.units());
    let per = comptime!(per_unit(config.tile, config.vecs(), units));
    let mut regs = PairRegs::<F, N> {
        k: Array::new(per),
        v: Array::new(per),
        tok: Array::new(1usize),
    };
    let first = tile_at(
        cols,
        walk.first,
        0,
        walk.n,
        config.block,
        config.tile,
        walk.tiles > 0,
    );
    #[rustfmt::skip]
    fetch_pair(k, v, &mut regs.k, &mut regs.v, &mut regs.tok, order, lengths, walk.batch, walk.base, &first, at, config);
    regs
}

/// Stages tile `f` of `walk` (fetched by the previous call or [`start_pair_walk`]) and
/// fetches tile `f + 1`; returns where tile `f` lies. Every unit of the cube calls it.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn next_pair_tile<F: Float, N: Size>(
    k: &[Vector<F, N>],
    v: &[Vector<F, N>],
    cols: &[u32],
    order: &[u32],
    lengths: &[u32],
    regs: &mut PairRegs<F, N>,
    stage: &mut Shared<[Vector<F, N>]>,
    key_toks: &mut Shared<[u32]>,
    walk: &PairWalk,
    f: usize,
    at: &PlaneTask,
    #[comptime] config: TensorCoreConfig,
) -> TileAt {
    let (block, tile) = comptime!((config.block, config.tile));
    let cur = tile_at(cols, walk.first, f, walk.n, block, tile, true);
    sync_cube();

    store_pair(&regs.k, &regs.v, stage, key_toks, &regs.tok, at, config);

    sync_cube();

    let next = tile_at(
        cols,
        walk.first,
        f + 1,
        walk.n,
        block,
        tile,
        f + 1 < walk.tiles,
    );
    #[rustfmt::skip]
        fetch_pair(k, v, &mut regs.k, &mut regs.v, &mut regs.tok, order, lengths, walk.batch, walk.base, &next, at, config);

    cur
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
    let row_vecs = comptime!(config.row_vecs());
    let d = comptime!(config.row_stride());
    let units = comptime!(config.units());
    let stride = comptime!(config.row_stride() as u32);
    let frag_len = comptime!(fragment_span(config.row_stride(), config.lanes));
    let row0 = at.plane * FRAG;
    for r0 in range_stepped(0, config.block, rows) {
        let len = if block_len > r0 {
            span(block_len, r0, rows)
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
            row_vecs,
            units,
            config.permuted,
        );
        sync_cube();
        if row0 >= r0 && row0 < r0 + rows {
            #[unroll]
            for c in 0..config.chunks() {
                let first = ((row0 - r0) * d + c * FRAG) / config.lanes;
                cmma::load(&mut frags[c], &stage[first..first + frag_len], stride);
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
    let d = comptime!(config.row_stride());
    let stride = comptime!(config.row_stride() as u32);
    let frag_len = comptime!(fragment_span(config.row_stride(), config.lanes));
    let tile_stride = comptime!(config.tile_stride() as u32);
    let tile_frag_len = comptime!(fragment_span(config.tile_stride(), 1));
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
            let mut b = unsafe {
                cmma::Matrix::<F>::uninitialized(
                    cmma::MatrixIdent::B,
                    FRAG,
                    FRAG,
                    FRAG,
                    cmma::MatrixLayout::ColMajor,
                )
            };
            cmma::load(&mut b, &stage[first..first + frag_len], stride);
            cmma::execute(&a[c], &b, &acc, &acc);
        }
        let at = scores_at + j * FRAG;
        cmma::store(
            &mut scores[at..at + tile_frag_len],
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
    let d = comptime!(config.row_stride());
    let stride = comptime!(config.row_stride() as u32);
    let frag_len = comptime!(fragment_span(config.row_stride(), config.lanes));
    let tile_stride = comptime!(config.tile_stride() as u32);
    let tile_frag_len = comptime!(fragment_span(config.tile_stride(), 1));
    #[unroll]
    for j in 0..comptime!(config.tile / FRAG) {
        let at = probs_at + j * FRAG;
        let p = cmma::Matrix::<F>::from_slice(
            cmma::MatrixIdent::A,
            FRAG,
            FRAG,
            FRAG,
            cmma::MatrixLayout::RowMajor,
            &probs[at..at + tile_frag_len],
            tile_stride,
        );
        #[unroll]
        for c in 0..config.chunks() {
            let first = offset + (j * FRAG * d + c * FRAG) / config.lanes;
            let mut b = unsafe {
                cmma::Matrix::<F>::uninitialized(
                    cmma::MatrixIdent::B,
                    FRAG,
                    FRAG,
                    FRAG,
                    cmma::MatrixLayout::RowMajor,
                )
            };
            cmma::load(&mut b, &stage[first..first + frag_len], stride);
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
/// `scratch` (from `scratch_at`, 16 rows of the padded tile stride). Rows with `dst_row == NO_TOKEN` are
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
    let frag_stride = comptime!(config.tile_stride() as u32);
    let ts = comptime!(config.tile_stride());
    let frag_len = comptime!(fragment_span(config.tile_stride(), 1));
    let per_lane = comptime!(FRAG * FRAG / config.plane);
    #[unroll]
    for c in 0..config.chunks() {
        sync_plane();
        cmma::store(
            &mut scratch[scratch_at..scratch_at + frag_len],
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
                    F::cast_from(scratch[scratch_at + (e / FRAG) * ts + e % FRAG] * f);
            }
        }
    }
}
