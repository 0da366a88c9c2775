//! The `CubeBackend` impl: a thin wrapper over the fused CubeCL kernels of
//! `sparse-attn-wgpu` (every CubeCL runtime: wgpu, Vulkan, CUDA).
//!
//! Inputs are made contiguous (a no-op for contiguous tensors), outputs are allocated in the
//! input dtype on the same device, and the kernels apply the layout's token order by index.
//! The public API has already validated every input and asked the device whether it can run
//! the problem ([`sparse_attn_wgpu::check_problem`], before any launch); each layout is
//! checked and uploaded once per device ([`DeviceLayout`], kept with the layout). A kernel
//! error here would be a bug in this crate, and panics with its message.

use burn::backend::TensorMetadata;
use burn::backend::cubecl::dtype_to_elem_type;
use burn::backend::tensor::FloatTensor;
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use std::sync::Arc;

use sparse_attn_wgpu::{AttentionShape, DecodeQueries, DeviceLayout, NO_QUERY};

use crate::decode::DecodeParams;
use crate::layout::BlockLayout;
use crate::params::AttentionParams;

/// `layout` on `tensor`'s device: checked and uploaded on first use there, then shared by
/// every call (and every clone of the layout) on that device.
fn on_device(layout: &BlockLayout, tensor: &CubeTensor) -> Arc<DeviceLayout> {
    layout
        .device_copy(&tensor.device, || {
            DeviceLayout::upload(&tensor.client, &layout.csr())
        })
        // A `BlockLayout` is built with the invariants `DeviceLayout` checks.
        .unwrap_or_else(|e| panic!("a built layout failed the kernels' layout check: {e}"))
}

fn shape_of(q: &CubeTensor, k: &CubeTensor) -> AttentionShape {
    AttentionShape::of(q.shape().dims::<4>(), k.shape().dims::<4>())
}

/// An uninitialised contiguous tensor of `dims` shaped like `like` (same device and dtype).
fn empty_like(like: &CubeTensor, dims: Vec<usize>) -> CubeTensor {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        burn::tensor::Shape::from(dims),
        like.dtype,
    )
}

/// The kernels' options of a call; a biased call's table stays on the device (the kernels
/// read it from the handle, so the options carry an empty host table).
fn kernel_options(params: &AttentionParams, biased: bool) -> sparse_attn_wgpu::KernelOptions<'_> {
    params.kernel_options(biased.then_some(&[][..]))
}

/// Fused forward: `(out, lse)`, the log-sum-exp in f32; `bias`: a biased call's
/// relative-position bias table.
pub(crate) fn forward(
    q: FloatTensor<CubeBackend>,
    k: FloatTensor<CubeBackend>,
    v: FloatTensor<CubeBackend>,
    bias: Option<FloatTensor<CubeBackend>>,
    layout: &BlockLayout,
    params: &AttentionParams,
) -> (FloatTensor<CubeBackend>, FloatTensor<CubeBackend>) {
    let [q, k, v] = [q, k, v].map(into_contiguous);
    let bias = bias.map(into_contiguous);
    let shape = shape_of(&q, &k);
    let out = empty_like(&q, q.shape().to_vec());
    let lse = empty_device_contiguous_dtype(
        q.client.clone(),
        q.device.clone(),
        burn::tensor::Shape::from(vec![shape.batch, shape.heads, shape.seq_len]),
        burn::tensor::DType::F32,
    );
    sparse_attn_wgpu::forward(
        &q.client,
        dtype_to_elem_type(q.dtype),
        shape,
        &on_device(layout, &q),
        params.scale as f32,
        &kernel_options(params, bias.is_some()),
        [&q.handle, &k.handle, &v.handle, &out.handle, &lse.handle],
        bias.as_ref().map(|t| &t.handle),
    )
    .unwrap_or_else(|e| panic!("sparse attention forward on a CubeCL device: {e}"));
    (out, lse)
}

/// Fused backward: `(dq, dk, dv)`, and with a biased call's `bias` table its gradient (in
/// the table's dtype).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    q: FloatTensor<CubeBackend>,
    k: FloatTensor<CubeBackend>,
    v: FloatTensor<CubeBackend>,
    bias: Option<FloatTensor<CubeBackend>>,
    out: FloatTensor<CubeBackend>,
    lse: FloatTensor<CubeBackend>,
    dout: FloatTensor<CubeBackend>,
    layout: &BlockLayout,
    params: &AttentionParams,
) -> (
    FloatTensor<CubeBackend>,
    FloatTensor<CubeBackend>,
    FloatTensor<CubeBackend>,
    Option<FloatTensor<CubeBackend>>,
) {
    let [q, k, v, out, lse, dout] = [q, k, v, out, lse, dout].map(into_contiguous);
    let bias = bias.map(into_contiguous);
    let shape = shape_of(&q, &k);
    let dq = empty_like(&q, q.shape().to_vec());
    let [dk, dv] = [(); 2].map(|_| empty_like(&q, k.shape().to_vec()));
    // The bias gradient comes out of the kernels in f32.
    let dbias = bias.as_ref().map(|t| {
        empty_device_contiguous_dtype(
            q.client.clone(),
            q.device.clone(),
            t.shape(),
            burn::tensor::DType::F32,
        )
    });
    sparse_attn_wgpu::backward(
        &q.client,
        dtype_to_elem_type(q.dtype),
        shape,
        &on_device(layout, &q),
        params.scale as f32,
        &kernel_options(params, bias.is_some()),
        [
            &q.handle,
            &k.handle,
            &v.handle,
            &out.handle,
            &lse.handle,
            &dout.handle,
        ],
        [&dq.handle, &dk.handle, &dv.handle],
        (
            bias.as_ref().map(|t| &t.handle),
            dbias.as_ref().map(|t| &t.handle),
        ),
    )
    .unwrap_or_else(|e| panic!("sparse attention backward on a CubeCL device: {e}"));
    let dbias = dbias
        .zip(bias)
        .map(|(g, t)| cast::<CubeBackend>(g, t.dtype));
    (dq, dk, dv, dbias)
}

/// `t` in `dtype`.
fn cast<B: burn::backend::Backend>(
    t: FloatTensor<B>,
    dtype: burn::tensor::DType,
) -> FloatTensor<B> {
    B::float_cast(t, dtype.into())
}

/// Fused decode: `[B, H, m, d]` from the new rows `q` and the caches `k`, `v`.
pub(crate) fn decode(
    q: FloatTensor<CubeBackend>,
    k: FloatTensor<CubeBackend>,
    v: FloatTensor<CubeBackend>,
    layout: &BlockLayout,
    params: &DecodeParams,
) -> FloatTensor<CubeBackend> {
    let [q, k, v] = [q, k, v].map(into_contiguous);
    let [batch, _, queries, _] = q.shape().dims::<4>();
    let cache = shape_of(&q, &k);
    // The layout position of each new row's token, and the longest layout row they read.
    let inverse = layout.order().map(|(_, inverse)| inverse);
    let (row_ptr, block, nb) = (layout.raw().0, layout.block(), layout.n_blocks());
    let mut max_blocks = 0;
    let mut positions = vec![NO_QUERY; batch * queries];
    for b in 0..batch {
        for i in 0..params.valid[b] {
            let tok = params.first[b] + i;
            let pos = inverse.map_or(tok, |inv| inv[tok]);
            positions[b * queries + i] = pos as u32;
            for lh in 0..layout.layout_heads() {
                let r = lh * nb + pos / block;
                max_blocks = max_blocks.max((row_ptr[r + 1] - row_ptr[r]) as usize);
            }
        }
    }
    let lengths: Vec<u32> = params
        .first
        .iter()
        .zip(params.valid.iter())
        .map(|(f, v)| (f + v) as u32)
        .collect();
    let rows = DecodeQueries {
        queries,
        positions: &positions,
        lengths: &lengths,
        max_blocks,
    };
    let out = empty_like(&q, q.shape().to_vec());
    sparse_attn_wgpu::decode(
        &q.client,
        dtype_to_elem_type(q.dtype),
        cache,
        &on_device(layout, &q),
        params.scale as f32,
        params.mods.view(params.bias_table.as_deref()),
        &rows,
        [&q.handle, &k.handle, &v.handle, &out.handle],
    )
    .unwrap_or_else(|e| panic!("sparse attention decode on a CubeCL device: {e}"));
    out
}
