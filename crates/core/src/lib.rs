//! Block-sparse multi-head attention for Burn: layouts, patterns and the
//! [`SparseAttentionBackend`] extension.
//!
//! # Representation
//! A [`Pattern`] is a token predicate `allows(head, i, j)`. [`BlockLayout::build`] turns it
//! into per-head (or shared) CSR lists of active key blocks of `b` tokens, each full or
//! with an element mask (bit set = allowed), plus transposed lists for the backward pass
//! and, for patterns such as `strided`, a token order. Kernels walk only the active blocks:
//! memory is `O(batch * heads * n * d)`, never `n x n`.
//!
//! # Entry points
//! - [`sparse_attention`] on `[batch, heads, n, d]` with a [`BlockLayout`];
//! - [`sparse_attention_decode`]: new query rows against a key/value cache (generation);
//! - the original Sparse Transformer API: [`attention_impl`] (dense, masked),
//!   [`blocksparse_attention_impl`] and [`SparseAttention`] on `[batch, n_ctx, n_embd]`.
//!
//! Backends are chosen at run time by the device (`Device::ndarray()`, `Device::flex()`,
//! `Device::wgpu(..)`, `.autodiff()`), compiled in by the Cargo features `ndarray`, `flex`,
//! `wgpu`, `vulkan`, `cuda`, `autodiff`, `fusion`.
//!
//! ```
//! use burn::tensor::{Device, Distribution, Tensor};
//! use sparse_attn_core::{AttnMode, attention_impl, blocksparse_attention_impl};
//!
//! let device = Device::ndarray();
//! let x = Tensor::<3>::random([1, 64, 32], Distribution::Normal(0.0, 1.0), &device);
//! let sparse = blocksparse_attention_impl(x.clone(), x.clone(), x.clone(), 2, AttnMode::Strided, Some(8), 8, 1, 1).unwrap();
//! let dense = attention_impl(x.clone(), x.clone(), x, 2, AttnMode::Strided, Some(8)).unwrap();
//! let diff = (sparse - dense).abs().max().into_scalar::<f32>();
//! assert!(diff < 1e-5);
//! ```

#![warn(missing_docs)]

mod api;
pub mod backend;
mod cache;
mod decode;
mod device_copies;
mod error;
mod layout;
mod modes;
mod params;
pub mod pattern;
mod picture;
pub mod reference;

pub use api::{
    Alibi, AttentionOptions, RelativePositionBias, sparse_attention, sparse_attention_portable,
};
pub use backend::SparseAttentionBackend;
pub use cache::LayoutCache;
pub use decode::{
    DecodeParams, DecodeRows, sparse_attention_decode, sparse_attention_decode_portable,
    sparse_attention_decode_with,
};
pub use error::{Result, SparseAttentionError};
pub use layout::{BlockLayout, FULL, MAX_BLOCK, MIN_BLOCK};
pub use modes::{
    AttnMode, ModeParams, SparseAttention, attention_impl, blocksparse_attention_impl,
};
pub use params::{AttentionParams, DropoutMask, RelativeBuckets, ScoreModParams};
pub use pattern::{BlockCover, Geometry, Pattern, StreamWindow};
pub use picture::LayoutStats;
pub use sparse_attn_kernel_types::{
    BucketsError, MAX_RELATIVE_DISTANCE, RelativeBias, ScoreMods, alibi_slopes,
};

/// Which CubeCL kernels serve a GPU problem: the tensor-core kernels (f16/bf16 inputs on a
/// device with 16x16x16 cooperative matrices, blocks and head dims multiples of 16) or the
/// FMA kernels (everything else); process-wide counters of the passes each family ran, and
/// the environment variable that turns the tensor-core kernels off (`0`).
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod cubecl_kernels {
    pub use sparse_attn_wgpu::{KernelPath, LaunchCounts, TENSOR_CORES_VAR, launch_counts};
}
