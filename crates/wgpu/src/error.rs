//! What the kernels cannot run, said in terms a caller can act on.

use cubecl::ir::ElemType;

/// Why a problem cannot run on a device through these kernels.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// The head dimension is beyond what the kernels keep in registers.
    #[error("head dim {head_dim} is not supported by the CubeCL kernels: expected 1..={max}")]
    HeadDim {
        /// The head dimension asked for.
        head_dim: usize,
        /// The largest supported head dimension.
        max: usize,
    },
    /// The block size needs more units per cube than the device allows.
    #[error("block size {block} needs {block} units per cube, but the device allows at most {max}")]
    Block {
        /// The layout's block size.
        block: usize,
        /// The device's limit on units per cube.
        max: usize,
    },
    /// Not even a one-row tile fits in the device's shared memory.
    #[error(
        "head dim {head_dim} needs {needed} bytes of shared memory per cube, the device has {available}"
    )]
    SharedMemory {
        /// The head dimension asked for.
        head_dim: usize,
        /// Bytes the smallest tile needs.
        needed: usize,
        /// Bytes the device offers per cube.
        available: usize,
    },
    /// The input dtype is not a float the device supports (f32, f16, bf16).
    #[error(
        "dtype {dtype:?} is not supported on this device: expected f32, or f16/bf16 where the device has them"
    )]
    Dtype {
        /// The element type asked for.
        dtype: ElemType,
    },
    /// A tensor has more elements than the kernels' 32-bit indexing reaches.
    #[error(
        "a tensor of {elements} elements is beyond the kernels' 32-bit indexing (at most {max})"
    )]
    TooLarge {
        /// Elements of the largest tensor.
        elements: usize,
        /// The largest supported element count.
        max: usize,
    },
    /// The layout's arrays break an invariant of [`crate::DeviceLayout`].
    #[error("inconsistent layout: {reason}")]
    Layout {
        /// Which array is wrong and what was expected.
        reason: String,
    },
    /// The problem's shape does not fit the layout or the kernels.
    #[error("shape not served: {reason}")]
    Shape {
        /// What differs and what was expected.
        reason: String,
    },
    /// A device buffer is smaller than its tensor.
    #[error("buffer `{name}` holds {bytes} bytes, but its tensor needs {needed}")]
    Buffer {
        /// The tensor's name (`q`, `k`, `dout`...).
        name: &'static str,
        /// Bytes the handle holds.
        bytes: u64,
        /// Bytes the shape needs.
        needed: u64,
    },
}
