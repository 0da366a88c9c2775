//! Fused CubeCL kernels for block-sparse attention, forward and backward, for every CubeCL
//! runtime (wgpu: Vulkan, Metal, WebGPU; Vulkan through CubeCL's SPIR-V compiler; CUDA).
//!
//! The algorithm is the one of DESIGN.md §5, as on the CPU:
//! - forward: one cube per `(batch x head, query block)` and one unit per query row; the
//!   cube walks the row's active key blocks tile by tile, staging each `K`/`V` tile in shared
//!   memory once for all its units; each unit keeps its scaled query and its output in
//!   registers and runs the online softmax in `f32`, whatever the input dtype;
//! - backward: a `dQ` pass over the CSR rows (which also writes `delta = rowsum(dO * O)`) and
//!   a `dK`/`dV` pass over the transposed lists, one unit per key row, with `Q`, `dO`, the
//!   log-sum-exp and `delta` staged per tile. No atomics: each output row has one writer.
//!
//! Grouped-query attention (`k`/`v` with fewer heads), key padding (valid lengths per batch
//! row) and attention dropout (a counter-based generator, regenerated in the backward pass)
//! run inside the same kernels, selected at compile time so plain attention pays nothing.
//!
//! Element masks are read only for partial blocks; a layout's token order is applied by
//! index inside the kernels (no gather copies); the last block may be short.
//!
//! This crate knows nothing of Burn: it takes a CubeCL [`Client`](cubecl::client::Client),
//! buffer [`Handle`](cubecl::server::Handle)s of contiguous `[batch, heads, seq_len,
//! head_dim]` tensors and a [`DeviceLayout`]: a plain-data [`CsrLayout`] of the layout, checked
//! and uploaded once per device. `sparse-attn-core` calls it from its `CubeBackend` impl.
//! Every handle is checked against the shape before a launch, and release builds launch
//! without per-index bounds checks (debug builds, or [`CHECKED_VAR`], keep them). Tile sizes come from the device's limits read at run time
//! ([`TilePlan::for_device`]): a device with little shared memory gets smaller tiles, never
//! a failure; what no tile size can serve is a typed [`KernelError`].

mod args;
mod backward;
mod decode;
mod device_layout;
mod error;
mod forward;
mod launch;
mod options;
mod plan;
mod tensor_core;
mod tiles;

pub use decode::{DecodeQueries, NO_QUERY, decode};
pub use device_layout::DeviceLayout;
pub use error::KernelError;
pub use launch::MAX_BIAS_BUCKETS;
pub use launch::{
    CHECKED_VAR, KernelPath, LaunchCounts, backward, check_problem, forward, launch_counts,
};
pub use plan::{MAX_HEAD_DIM, TilePlan};
pub use sparse_attn_kernel_types::{AttentionShape, CsrLayout, DropoutMask, KernelOptions};
pub use tensor_core::DISABLE_VAR as TENSOR_CORES_VAR;
