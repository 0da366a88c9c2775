//! Plain data shared by the block-sparse attention kernels of every backend: the problem's
//! shape ([`AttentionShape`]), the borrowed CSR view of a block layout ([`CsrLayout`], with
//! the [`FULL_BLOCK`] marker), the per-call options ([`KernelOptions`]) and the counter-based
//! dropout generator ([`DropoutMask`]) that every backend repeats bit for bit.
//!
//! The CPU kernels (`sparse-attn-ndarray`) and the CubeCL kernels (`sparse-attn-wgpu`) both
//! read these types, so a problem, a layout and an option mean one thing everywhere, and an
//! option added here reaches both kernel crates through one definition.

#![warn(missing_docs)]

pub mod dropout;
mod layout;
mod options;

pub use dropout::{DropoutMask, KEY_SPREAD, mix};
pub use layout::{AttentionShape, CsrLayout, FULL_BLOCK};
pub use options::KernelOptions;
