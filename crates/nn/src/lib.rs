//! Trainable sparse-attention layers for Burn.
//!
//! - [`PatternConfig`]: a serializable choice among the built-in patterns (and per-head
//!   lists of them), what a model config stores;
//! - [`MultiHeadSparseAttention`]: multi-head self-attention whose attention runs through
//!   `sparse_attn_core::sparse_attention` (fused kernels, real backward); layouts are built
//!   once per `(pattern, sequence length, block, heads)` and shared process-wide.

#![warn(missing_docs)]

mod attention;
mod pattern_config;

pub use attention::{MultiHeadSparseAttention, MultiHeadSparseAttentionConfig};
pub use pattern_config::PatternConfig;
