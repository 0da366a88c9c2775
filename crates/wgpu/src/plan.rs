//! Tile sizes, chosen per device from the limits it reports at run time.

use cubecl::client::Client;
use cubecl::ir::{ElemType, FloatKind};

use crate::error::KernelError;

/// Largest head dimension the kernels serve (rows are kept in registers).
pub const MAX_HEAD_DIM: usize = 256;

/// Largest key (or query) tile staged in shared memory at once: the forward keeps one score
/// per tile row in registers.
const MAX_TILE: usize = 32;

/// Tile sizes of one problem on one device.
///
/// # Invariants
/// `1 <= tile <= min(block, 32)`, and the shared memory of every kernel at this tile size
/// fits the device: [`TilePlan::shared_bytes`]`(tile, head_dim) <= max_shared_memory_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TilePlan {
    /// Rows of `K`/`V` (forward, `dQ`) or of `Q`/`dO` (`dK`/`dV`) per shared-memory tile.
    pub tile: usize,
    /// Units per cube: one per row of a block.
    pub units: usize,
}

impl TilePlan {
    /// Bytes of shared memory the most demanding kernel (`dK`/`dV`) needs for `tile` rows of
    /// head dim `head_dim`: two `f32` row tiles plus the tile's log-sum-exp and `delta`.
    pub fn shared_bytes(tile: usize, head_dim: usize) -> usize {
        (2 * tile * head_dim + 2 * tile) * size_of::<f32>()
    }

    /// The largest tile (a power of two, at most `min(block, 32)`) that fits the device's
    /// shared memory.
    ///
    /// # Errors
    /// A head dim outside `1..=256`, a block size above the device's units per cube, a dtype
    /// other than f32/f16/bf16 or one the device lacks, or a device whose shared memory
    /// cannot hold even one-row tiles.
    pub fn for_device(
        client: &Client,
        dtype: ElemType,
        block: usize,
        head_dim: usize,
    ) -> Result<Self, KernelError> {
        if head_dim == 0 || head_dim > MAX_HEAD_DIM {
            return Err(KernelError::HeadDim {
                head_dim,
                max: MAX_HEAD_DIM,
            });
        }
        let props = client.properties();
        let float = matches!(
            dtype,
            ElemType::Float(FloatKind::F32 | FloatKind::F16 | FloatKind::BF16)
        );
        if !float || !props.supports_type(dtype) {
            return Err(KernelError::Dtype { dtype });
        }
        let max_units = props.hardware.max_units_per_cube as usize;
        if block > max_units {
            return Err(KernelError::Block {
                block,
                max: max_units,
            });
        }
        let available = props.hardware.max_shared_memory_size;
        let mut tile = block.min(MAX_TILE).next_power_of_two();
        if tile > block {
            tile /= 2;
        }
        while tile > 1 && Self::shared_bytes(tile, head_dim) > available {
            tile /= 2;
        }
        let needed = Self::shared_bytes(tile, head_dim);
        if needed > available {
            return Err(KernelError::SharedMemory {
                head_dim,
                needed,
                available,
            });
        }
        Ok(Self { tile, units: block })
    }
}
