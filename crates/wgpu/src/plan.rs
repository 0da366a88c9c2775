//! Tile sizes, chosen per device from the limits it reports at run time.

use cubecl::client::Client;
use cubecl::ir::{ElemType, FloatKind};

use crate::error::KernelError;

/// Largest head dimension the kernels serve (rows are kept in registers).
pub const MAX_HEAD_DIM: usize = 256;

/// Largest key (or query) tile staged in shared memory at once: the forward keeps one score
/// per tile row in registers.
const MAX_TILE: usize = 32;

/// `f32`s of shared memory the forward's merge of split rows adds (`m` of two lanes and `l`
/// per row of the largest block).
const MERGE_FLOATS: usize = 3 * 128;

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
    /// Bytes of shared memory the most demanding kernel needs for `tile` rows of head dim
    /// `head_dim`: two `f32` row tiles plus the tile's log-sum-exp and `delta` (`dK`/`dV`) or
    /// the merge of split rows (forward).
    pub fn shared_bytes(tile: usize, head_dim: usize) -> usize {
        (2 * tile * head_dim + 2 * tile + MERGE_FLOATS) * size_of::<f32>()
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
        let tile =
            Self::largest_tile(block, head_dim, available).ok_or(KernelError::SharedMemory {
                head_dim,
                needed: Self::shared_bytes(1, head_dim),
                available,
            })?;
        Ok(Self { tile, units: block })
    }

    /// The largest power of two `<= min(block, 32)` whose tiles fit in `available` bytes.
    fn largest_tile(block: usize, head_dim: usize, available: usize) -> Option<usize> {
        let mut tile = block.clamp(1, MAX_TILE).next_power_of_two();
        if tile > block.max(1) {
            tile /= 2;
        }
        while tile > 1 && Self::shared_bytes(tile, head_dim) > available {
            tile /= 2;
        }
        (Self::shared_bytes(tile, head_dim) <= available).then_some(tile)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_shrink_to_fit_small_shared_memories() {
        // 48 KiB (NVIDIA under Vulkan), 32 KiB (lavapipe), 16 KiB (WebGPU's default).
        assert_eq!(TilePlan::largest_tile(64, 64, 48 * 1024), Some(32));
        assert_eq!(TilePlan::largest_tile(64, 64, 16 * 1024), Some(16));
        assert_eq!(TilePlan::largest_tile(128, 256, 32 * 1024), Some(8));
        assert_eq!(TilePlan::largest_tile(128, 256, 16 * 1024), Some(4));
        // Never more rows than a block holds; any block size, not only powers of two.
        assert_eq!(TilePlan::largest_tile(5, 8, 16 * 1024), Some(4));
        assert_eq!(TilePlan::largest_tile(1, 8, 16 * 1024), Some(1));
        // Every tile fits what it was chosen for.
        for block in 1..=128 {
            for head_dim in [1, 3, 64, 100, 256] {
                for kib in [16, 32, 48] {
                    let tile = TilePlan::largest_tile(block, head_dim, kib * 1024).unwrap();
                    assert!(tile <= block.min(MAX_TILE));
                    assert!(TilePlan::shared_bytes(tile, head_dim) <= kib * 1024);
                }
            }
        }
        // A device with almost no shared memory is refused, not crashed.
        assert_eq!(TilePlan::largest_tile(64, 256, 1024), None);
    }
}
