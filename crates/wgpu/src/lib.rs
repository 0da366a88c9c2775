//! CubeCL kernels for block-sparse attention (wgpu: Vulkan, Metal, WebGPU; CUDA).
//!
//! This crate is where the fused CubeCL forward and backward kernels live (tracked in the
//! project's CubeCL issue). Until they land, `sparse-attn-core` serves every CubeCL
//! runtime through its portable path (Burn tensor primitives over the gathered active
//! blocks, never a dense `n x n` computation), which the conformance suite checks on
//! lavapipe in CI. The crate already exists so that the workspace layout, features and
//! dependency direction (kernels know nothing of Burn's dispatch) are fixed.
