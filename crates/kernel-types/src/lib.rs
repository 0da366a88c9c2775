//! Plain data shared by the block-sparse attention kernels of every backend: the problem's
//! shape ([`AttentionShape`]), the borrowed CSR view of a block layout ([`CsrLayout`], with
//! the [`FULL_BLOCK`] marker), the per-call options ([`KernelOptions`], with the score
//! modifiers [`ScoreMods`]) and the counter-based
//! dropout generator ([`DropoutMask`]) that every backend repeats bit for bit.
//!
//! The CPU kernels (`sparse-attn-ndarray`) and the CubeCL kernels (`sparse-attn-wgpu`) both
//! read these types, so a problem, a layout and an option mean one thing everywhere, and an
//! option added here reaches both kernel crates through one definition.

//!
//! # Example
//! A two-block layout of 6 tokens (blocks of 4): query block 0 reads key block 0 under an
//! element mask, query block 1 reads both key blocks in full.
//! ```
//! use sparse_attn_kernel_types::{CsrLayout, DropoutMask, FULL_BLOCK, KernelOptions};
//!
//! // Mask 0: causal within the block (bit i * 4 + j set for j <= i).
//! let causal: u64 = (0..4).flat_map(|i| (0..=i).map(move |j| 1u64 << (i * 4 + j))).sum();
//! let layout = CsrLayout {
//!     seq_len: 6,
//!     block: 4,
//!     n_blocks: 2,
//!     layout_heads: 1,
//!     row_ptr: &[0, 1, 3],
//!     cols: &[0, 0, 1],
//!     masks: &[0, FULL_BLOCK, FULL_BLOCK],
//!     col_ptr: &[0, 2, 3],
//!     t_rows: &[0, 1, 1],
//!     t_entries: &[0, 1, 2],
//!     mask_bits: &[causal],
//!     mask_words: 1,
//!     order: None,
//! };
//! assert_eq!(layout.row_entries(0, 1), 1..3);
//! assert_eq!(layout.block_range(1), (4, 6));
//! assert!(layout.mask_of(0).is_some() && layout.mask_of(1).is_none());
//!
//! // Options of a call with dropout 0.1 and the second batch row 5 tokens long.
//! let options = KernelOptions {
//!     key_lengths: Some(&[6, 5]),
//!     dropout: DropoutMask::new(0.1, 7),
//!     ..KernelOptions::default()
//! };
//! let mask = options.dropout.unwrap();
//! assert_eq!(mask.keeps_pair(0, 0, 3, 2), mask.keeps_pair(0, 0, 3, 2));
//! ```

#![warn(missing_docs)]

pub mod dropout;
mod layout;
mod options;
mod relative_bias;
mod score_mods;

pub use dropout::{DropoutMask, KEY_SPREAD, mix};
pub use layout::{AttentionShape, CsrLayout, FULL_BLOCK};
pub use options::KernelOptions;
pub use relative_bias::{BucketsError, MAX_RELATIVE_DISTANCE, RelativeBias, RelativeBuckets};
pub use score_mods::{ScoreMods, alibi_slopes};
