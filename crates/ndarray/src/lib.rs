//! Fused, multi-threaded CPU kernels for block-sparse attention.
//!
//! The kernels work on plain row-major `f32` or `f64` slices ([`Real`]) shaped `[batch, heads, seq_len, head_dim]`
//! and on a [`CsrLayout`], a borrowed, plain-data view of a block layout. They know nothing of
//! Burn: `sparse-attn-core` owns the layout type, validates every input and calls these
//! functions from its `NdArray` and `Flex` backend impls.
//!
//! The algorithm is the flash-attention one (DESIGN.md §5):
//! - [`forward`](forward()): for each `(batch, head, query block)`, walk the active key
//!   blocks, keep a running max and sum per row (online softmax), accumulate `P V`, write the
//!   output and the natural-log log-sum-exp of every row;
//! - [`backward`](backward()): recompute `P` from the saved log-sum-exp; `dQ` in a pass over
//!   the CSR rows, `dK`/`dV` in a pass over the transposed (key-block-major) lists. Every
//!   output element is written by exactly one task in a fixed order, so results are
//!   bit-identical run to run.
//!
//! Tiles go through the `gemm` crate's SIMD GEMM; the softmax, mask and dropout loops around
//! them run in AVX2 copies when the CPU has it (run-time dispatch); element masks are applied
//! to partial blocks only; work is spread over rayon's pool.
//!
//! Rows with no allowed key produce zeros and a log-sum-exp of `-inf`, never NaN.

mod backward;
mod buffer;
mod decode;
mod exp;
mod forward;
mod options;
mod order;
mod real;
mod rows;
mod simd;
mod tile;

pub use backward::{
    BackwardOutputs, TILE_CACHE_BYTES, backward, backward_with_deltas, backward_with_tile_cache,
    row_deltas,
};
pub use buffer::{with_capacity, zeroed};
pub use decode::{CHUNK_KEYS, DecodeRows, DecodeShape, decode};
pub use forward::forward;
pub use real::Real;
pub use sparse_attn_kernel_types::{
    AttentionShape, CsrLayout, DropoutMask, FULL_BLOCK, KernelOptions, RelativeBias,
    RelativeBuckets, ScoreMods,
};
