//! Trainable sparse-attention layers and models for Burn.
//!
//! - [`PatternConfig`]: a serializable choice among the built-in patterns (and per-head
//!   lists of them), what a model config stores;
//! - [`MultiHeadSparseAttention`]: multi-head self-attention whose attention runs through
//!   `sparse_attn_core::sparse_attention` (fused kernels, real backward), with attention
//!   dropout, key padding (lengths or a mask) and grouped-query attention; layouts are
//!   built once per `(pattern, sequence length, block, heads)` and shared process-wide;
//! - [`SparseTransformerBlock`]: pre-norm attention + MLP block (or Burn's dense attention
//!   in the same block, for comparison);
//! - [`SparseTransformer`]: a decoder-only language model of such blocks, with cached
//!   decoding ([`KvCache`], [`TransformerCache`]) and seeded generation
//!   ([`SparseTransformer::generate`]);
//! - with the `learner` feature, what burn-train's `Learner` needs: the model's train and
//!   validation steps, `TokenBatcher` and `BitsPerTokenMetric`; the layers keep nothing
//!   per device that a fork to another device (data-parallel replicas) does not carry
//!   (layouts are host data, uploaded per device; dropout seeds come per device).
//!
//! Every config is a Burn `Config` (saved as JSON with the model) and every layer a Burn
//! `Module` (saved and loaded with Burn's records).

#![warn(missing_docs)]

mod attention;
mod block;
mod dropout_seed;
mod generate;
mod kv_cache;
#[cfg(test)]
mod layer_fuzz;
#[cfg(feature = "learner")]
mod learner;
mod pattern_config;
mod transformer;

pub use attention::{MultiHeadSparseAttention, MultiHeadSparseAttentionConfig, RelativeBiasConfig};
pub use block::{SelfAttention, SparseTransformerBlock, SparseTransformerBlockConfig};
pub use dropout_seed::seed_attention_dropout;
pub use generate::{GenerateConfig, TransformerCache};
pub use kv_cache::KvCache;
#[cfg(feature = "learner")]
pub use learner::{BitsPerTokenInput, BitsPerTokenMetric, TokenBatch, TokenBatcher};
pub use pattern_config::{PatternConfig, PatternFactory, register_pattern};
pub use transformer::{PositionEncoding, Positions, SparseTransformer, SparseTransformerConfig};
