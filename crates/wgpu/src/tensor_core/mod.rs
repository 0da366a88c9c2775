//! Tensor-core kernels: the tile products of the forward and backward passes on the
//! device's cooperative-matrix instructions (`cubecl::cmma`, 16x16x16, f16 or bf16 operands,
//! f32 accumulators), for devices that report such a configuration (NVIDIA through
//! `VK_KHR_cooperative_matrix` with the `vulkan` feature). Everything else runs the FMA
//! kernels of the parent module.
//!
//! One cube serves one `(batch x head, block)` task, as in the FMA kernels, but with one
//! *plane* per 16 rows of the block instead of one unit per row:
//! - the plane keeps its 16 rows of `Q` (forward, `dQ`; `dO` too in `dQ`) or of `K`/`V`
//!   (`dK`/`dV`) as `A` fragments for the whole kernel and its output rows as f32
//!   accumulator fragments, so the head dim never lives in one unit's registers;
//! - the cube stages each tile of the other side (`K`/`V`, or `Q`/`dO`) in shared memory in
//!   the input dtype, every plane reading it as `B` fragments; the loads of the next tile
//!   are issued into registers before the current tile's products, so their latency
//!   overlaps the work;
//! - a score-tile row of a full tile in a full block (no element mask, every key present)
//!   skips the per-element tests;
//! - every shared-memory row (staged tiles, score and probability tiles) is padded by 16
//!   bytes, so the eight rows that one fragment load or store touches at a time fall in
//!   different banks (unpadded, 64- and 128-element rows put them all in one bank, and
//!   every fragment access would serialise eight ways);
//! - score tiles (`S`, `dP`) are stored from their accumulators into a per-plane f32 tile
//!   where each row's lanes apply the scale, the element masks, key lengths and dropout and
//!   run the (online) softmax; the probabilities (or `dS`) go back to shared memory in the
//!   input dtype as the `A` operand of the next product;
//! - the forward rescales its output accumulators by the online-softmax factor through the
//!   same per-plane tile, and only when some row's maximum rose by more than a slack (up to
//!   8, bounded so that `exp(slack)` times the dropout factor stays far below the 16-bit
//!   dtype's largest value): the unnormalised probabilities may then exceed 1, the final
//!   division by the row sum (kept against the same maximum) makes the result exact, and
//!   almost every tile skips the rescale's round trip through shared memory.
//!
//! The log-sum-exp and `delta` are computed and kept in f32 inside the kernels; a layout's
//! token order is applied by index when tiles are staged; the last block may be short (its
//! missing rows are staged as zeros and masked).

mod backward;
mod forward;
mod launch;
mod stage;

pub(crate) use launch::{backward, forward};

use cubecl::client::Client;
use cubecl::ir::features::{MmaConfig, Plane};
use cubecl::ir::{ElemType, FloatKind};

/// Side of the cooperative-matrix tiles (`m = n = k = 16`).
pub(crate) const FRAG: usize = 16;

/// Largest head dimension of the tensor-core kernels.
const MAX_HEAD_DIM: usize = 256;

/// Largest block: one plane per 16 rows, at most 8 planes per cube.
const MAX_BLOCK: usize = 128;

/// Rows of the other side (keys and values, or queries and output gradients) staged per
/// tile in every kernel: one fragment. Small tiles keep the per-plane score tiles and the
/// staged rows small, so that more cubes share a multiprocessor and each lane's score array
/// stays in few registers; the extra synchronisation of more, shorter tiles costs less than
/// that gains over head dims 64 and 128 and blocks 64 and 128 (the README's GPU benchmark
/// section has the measurements).
const TILE: usize = FRAG;

/// The environment variable that turns the tensor-core kernels off (`0`), for comparisons
/// with the FMA kernels on the same device.
pub const DISABLE_VAR: &str = "SPARSE_ATTN_TENSOR_CORES";

/// Tile sizes of the tensor-core kernels for one problem on one device.
///
/// # Invariants
/// `block` and `head_dim` are multiples of [`FRAG`]; each tile is a power of two, a multiple
/// of [`FRAG`], at most `block` (today [`TILE`]), and the kernel's shared memory at that tile
/// fits the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TensorCorePlan {
    /// Units per plane (the device's fixed plane size).
    pub plane: usize,
    /// Keys per staged tile in the forward kernel.
    pub forward_tile: usize,
    /// Keys per staged tile in the `dQ` kernel.
    pub dq_tile: usize,
    /// Queries per staged tile in the `dK`/`dV` kernel.
    pub dkdv_tile: usize,
}

impl TensorCorePlan {
    /// The plan for `dtype` inputs with blocks of `block` tokens and head dim `head_dim`, or
    /// `None` where the tensor-core kernels cannot serve the problem: a dtype other than
    /// f16/bf16, no 16x16x16 cooperative matrix of that dtype with f32 accumulators, a plane
    /// size that is not fixed or not 16, 32 or 64, no plane operations, block or head dim
    /// not a multiple of 16 (or above 128 / 256), or too little shared memory.
    pub fn for_device(
        client: &Client,
        dtype: ElemType,
        block: usize,
        head_dim: usize,
    ) -> Option<Self> {
        if std::env::var(DISABLE_VAR).is_ok_and(|v| v == "0") {
            return None;
        }
        if !matches!(dtype, ElemType::Float(FloatKind::F16 | FloatKind::BF16)) {
            return None;
        }
        let props = client.properties();
        let f32_acc = ElemType::Float(FloatKind::F32);
        let wanted = MmaConfig {
            a_type: dtype,
            b_type: dtype,
            cd_type: f32_acc,
            m: FRAG as u32,
            n: FRAG as u32,
            k: FRAG as u32,
        };
        if !props.features.matmul.cmma.contains(&wanted) {
            return None;
        }
        let hw = &props.hardware;
        let plane = hw.plane_size_max as usize;
        let plane_ok = hw.plane_size_min == hw.plane_size_max
            && (FRAG..=4 * FRAG).contains(&plane)
            && plane.is_multiple_of(FRAG)
            && props.features.plane.contains(Plane::Ops)
            && props.features.plane.contains(Plane::Sync);
        let shape_ok = block.is_multiple_of(FRAG)
            && (FRAG..=MAX_BLOCK).contains(&block)
            && head_dim.is_multiple_of(FRAG)
            && (FRAG..=MAX_HEAD_DIM).contains(&head_dim);
        let units = block / FRAG * plane;
        if !plane_ok || !shape_ok || units > hw.max_units_per_cube as usize {
            return None;
        }
        let available = hw.max_shared_memory_size;
        let fits =
            |bytes: fn(usize, usize, usize) -> usize| bytes(TILE, block, head_dim) <= available;
        (fits(forward_bytes) && fits(dkdv_bytes)).then_some(Self {
            plane,
            forward_tile: TILE,
            dq_tile: TILE,
            dkdv_tile: TILE,
        })
    }
}

/// Bytes of a 16-bit element.
const HALF: usize = 2;

/// Shared memory of the forward and `dQ` kernels: two staged tiles of `tile` rows plus, per
/// plane, an f32 score tile, a 16-bit probability tile (every row padded by
/// [`stage::TILE_PAD`]), and the key tokens of the tile.
pub(crate) fn forward_bytes(tile: usize, block: usize, head_dim: usize) -> usize {
    let pad = stage::TILE_PAD;
    2 * tile * (head_dim + pad) * HALF + block * (tile + pad) * (4 + HALF) + tile * 4
}

/// Shared memory of the `dK`/`dV` kernel: [`forward_bytes`] plus the staged queries'
/// log-sum-exp, `delta` and dropout row keys.
pub(crate) fn dkdv_bytes(tile: usize, block: usize, head_dim: usize) -> usize {
    forward_bytes(tile, block, head_dim) + 3 * tile * 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_one_fragment_tile_fits_48_kib_for_every_block_and_head_dim() {
        let kib48 = 48 * 1024;
        for block in (FRAG..=MAX_BLOCK).step_by(FRAG) {
            for head_dim in (FRAG..=MAX_HEAD_DIM).step_by(FRAG) {
                assert!(
                    forward_bytes(TILE, block, head_dim) <= kib48,
                    "{block} {head_dim}"
                );
                assert!(
                    dkdv_bytes(TILE, block, head_dim) <= kib48,
                    "{block} {head_dim}"
                );
            }
        }
        // Shared memory grows with the tile: a 64-key tile at block 128 no longer fits.
        assert!(forward_bytes(64, 128, 64) > kib48);
    }
}
