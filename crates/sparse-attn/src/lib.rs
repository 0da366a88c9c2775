//! Block-sparse multi-head attention for Burn: the crate users depend on.
//!
//! Re-exports the layout, the patterns, the tensor API and the original Sparse Transformer
//! API from [`sparse_attn_core`], and the layers from [`sparse_attn_nn`]. Backends are
//! switched by Cargo features (`ndarray` (default), `flex`, `wgpu`, `vulkan`, `cuda`,
//! `autodiff` (default), `fusion`); all can be on together, and the device chosen at run
//! time picks the backend.
//!
//! ```
//! use burn::tensor::{Device, Distribution, Tensor};
//! use sparse_attn::{AttnMode, ModeParams, SparseAttention};
//!
//! let attn = SparseAttention::new(4, AttnMode::Fixed, ModeParams {
//!     local_attn_ctx: Some(32), blocksize: 8, num_verts: 2, vertsize: 1,
//! }).unwrap();
//! let x = Tensor::<3>::random([2, 96, 64], Distribution::Normal(0.0, 1.0), &Device::ndarray());
//! let y = attn.forward(x.clone(), x.clone(), x).unwrap();
//! assert_eq!(y.dims(), [2, 96, 64]);
//! ```

#![warn(missing_docs)]

pub mod backends;

pub use sparse_attn_core::*;
pub use sparse_attn_nn as nn;
