//! The tensor-level entry point: validated block-sparse attention on `[batch, heads, n, d]`.

use burn::backend::Dispatch;
use burn::tensor::Tensor;

use crate::backend::SparseAttentionBackend;
use crate::error::{Result, SparseAttentionError};
use crate::layout::BlockLayout;

/// Options of [`sparse_attention`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AttentionOptions {
    /// Softmax scale; `None` (default) means `1 / sqrt(head_dim)`.
    pub scale: Option<f64>,
}

impl AttentionOptions {
    /// Options with an explicit scale.
    pub fn with_scale(scale: f64) -> Self {
        Self { scale: Some(scale) }
    }
}

/// Block-sparse multi-head attention: `out[b, h, i] = sum_j softmax_j(scale q_i . k_j) v_j`
/// over the keys `j` that `layout` allows for query `i` in head `h`.
///
/// Differentiable (under an autodiff device its backward runs the backend's sparse
/// backward op); never allocates an `n x n` matrix. A row with no allowed key returns zeros.
///
/// # Shapes
/// `q`, `k`, `v`: `[batch, heads, n, d]`, `n == layout.seq_len()`,
/// `heads == layout.heads()`; output `[batch, heads, n, d]`.
///
/// # Errors
/// Shapes that differ or are empty, a layout built for another `n` or head count, inputs on
/// different devices, a scale that is not finite and positive, a head dim beyond the
/// kernels of the device ([`DeviceLimit`](SparseAttentionError::DeviceLimit): above 256 on
/// CubeCL devices), a dtype the device's kernels do not run (f64 on CubeCL devices).
///
/// # Example
/// ```
/// use burn::tensor::{Device, Distribution, Tensor};
/// use sparse_attn_core::{AttentionOptions, BlockLayout, pattern::Band, sparse_attention};
///
/// let device = Device::ndarray();
/// let layout = BlockLayout::build(&Band::sliding_window(16).unwrap(), 64, 16, 2).unwrap();
/// let q = Tensor::<4>::random([1, 2, 64, 8], Distribution::Normal(0.0, 1.0), &device);
/// let out = sparse_attention(q.clone(), q.clone(), q, &layout, AttentionOptions::default()).unwrap();
/// assert_eq!(out.dims(), [1, 2, 64, 8]);
/// ```
pub fn sparse_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    layout: &BlockLayout,
    options: AttentionOptions,
) -> Result<Tensor<4>> {
    let scale = validate(&q, &k, &v, layout, options)?;
    check_device_limits(&q, q.dims()[3])?;
    Ok(raw_attention(q, k, v, layout, scale))
}

/// [`sparse_attention`] through the portable path: Burn tensor operations over the
/// gathered active key blocks of each query block (padded to the largest row degree), on
/// any backend, differentiated by Burn's autodiff op by op.
///
/// This is what a backend without fused kernels runs; it is exposed to compare against
/// (`bench_cpu` times it next to the fused kernels) and to debug a backend. Memory grows
/// with the active blocks, never with `n x n`, but is larger than the fused kernels'.
///
/// # Errors
/// As [`sparse_attention`], without the device limits of fused kernels.
pub fn sparse_attention_portable(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    layout: &BlockLayout,
    options: AttentionOptions,
) -> Result<Tensor<4>> {
    let scale = validate(&q, &k, &v, layout, options)?;
    let (out, _lse) = crate::backend::portable::forward::<Dispatch>(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        layout,
        scale,
    );
    Ok(Tensor::from_dispatch(out))
}

/// Checks shapes, devices, layout and scale; returns the scale to use.
fn validate(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    layout: &BlockLayout,
    options: AttentionOptions,
) -> Result<f64> {
    let dims = q.dims();
    let [_, heads, n, d] = dims;
    if let Some(name) = ["batch", "heads", "seq_len", "head_dim"]
        .iter()
        .zip(dims)
        .find_map(|(name, x)| (x == 0).then_some(*name))
    {
        return Err(SparseAttentionError::Zero { name });
    }
    for (name, t) in [("k", k), ("v", v)] {
        if t.dims() != dims {
            return Err(SparseAttentionError::Shape {
                name,
                got: t.dims().to_vec(),
                expected: format!("{dims:?}, the shape of `q`"),
            });
        }
        if t.device() != q.device() {
            return Err(SparseAttentionError::DeviceMismatch {
                name,
                got: format!("{:?}", t.device()),
                expected: format!("{:?}", q.device()),
            });
        }
    }
    check_layout(layout, n, heads)?;
    let scale = options.scale.unwrap_or(1.0 / (d as f64).sqrt());
    if !(scale.is_finite() && scale > 0.0) {
        return Err(SparseAttentionError::Scale(scale));
    }
    Ok(scale)
}

/// Checks the limits of the kernels that will run on `q`'s device: CubeCL devices (those
/// that report an identity) serve f32, f16 and bf16 inputs and head dims up to
/// [`sparse_attn_wgpu::MAX_HEAD_DIM`].
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn check_device_limits(q: &Tensor<4>, head_dim: usize) -> Result<()> {
    use burn::tensor::DType;
    if q.device().identity().is_none() {
        return Ok(());
    }
    let max = sparse_attn_wgpu::MAX_HEAD_DIM;
    if head_dim > max {
        return Err(SparseAttentionError::DeviceLimit {
            what: "head dim",
            got: head_dim,
            max,
            backend: "CubeCL",
        });
    }
    if !matches!(q.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        return Err(SparseAttentionError::DType {
            got: format!("{:?}", q.dtype()),
            expected: "f32, f16 or bf16 on CubeCL devices",
        });
    }
    Ok(())
}

/// CPU backends have no limit beyond those of the input's validity.
#[cfg(not(any(feature = "wgpu", feature = "cuda")))]
fn check_device_limits(_q: &Tensor<4>, _head_dim: usize) -> Result<()> {
    Ok(())
}

/// Checks that `layout` was built for `n` tokens and `heads` heads.
pub(crate) fn check_layout(layout: &BlockLayout, n: usize, heads: usize) -> Result<()> {
    if layout.seq_len() != n {
        return Err(SparseAttentionError::LayoutMismatch {
            what: "seq_len",
            layout: layout.seq_len(),
            input: n,
        });
    }
    if layout.heads() != heads {
        return Err(SparseAttentionError::LayoutMismatch {
            what: "heads",
            layout: layout.heads(),
            input: heads,
        });
    }
    Ok(())
}

/// The backend op on validated tensors (token order; the backend applies the layout's order).
fn raw_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    layout: &BlockLayout,
    scale: f64,
) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as SparseAttentionBackend>::sparse_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        layout.clone(),
        scale,
    ))
}
