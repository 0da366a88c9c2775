//! The `NdArray` and `Flex` impls: thin wrappers over the fused CPU kernels of
//! `sparse-attn-ndarray`.
//!
//! Inputs are read into row-major `f32` buffers (any dtype and any strides: a
//! non-contiguous tensor reads in logical order), the kernel runs, and results come back in
//! the input dtype. Accumulation is `f32` for every input dtype.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, DType, TensorData, TensorMetadata, read_sync};
use sparse_attn_ndarray::{AttentionShape, CsrLayout};

use crate::layout::BlockLayout;

fn read<B: Backend>(t: FloatTensor<B>) -> Vec<f32> {
    let data = read_sync(B::float_into_data(t)).expect("reading a CPU tensor cannot fail");
    data.convert::<f32>()
        .try_into_vec::<f32>()
        .expect("converted to f32 above")
}

fn write<B: Backend>(
    values: Vec<f32>,
    shape: Vec<usize>,
    dtype: DType,
    device: &B::Device,
) -> FloatTensor<B> {
    B::float_from_data(TensorData::new(values, shape).convert_dtype(dtype), device)
}

fn shape_of<B: Backend>(q: &FloatTensor<B>) -> AttentionShape {
    let [batch, heads, seq_len, head_dim] = q.shape().dims::<4>();
    AttentionShape {
        batch,
        heads,
        seq_len,
        head_dim,
    }
}

/// The kernels' view of a layout.
pub(crate) fn csr(layout: &BlockLayout) -> CsrLayout<'_> {
    let (row_ptr, cols, masks, col_ptr, t_rows, t_entries, mask_bits, mask_words) = layout.raw();
    CsrLayout {
        seq_len: layout.seq_len(),
        block: layout.block(),
        n_blocks: layout.n_blocks(),
        layout_heads: layout.layout_heads(),
        row_ptr,
        cols,
        masks,
        col_ptr,
        t_rows,
        t_entries,
        mask_bits,
        mask_words,
    }
}

/// Fused forward on a CPU backend.
pub(crate) fn forward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    layout: &BlockLayout,
    scale: f32,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (shape, dtype, device) = (shape_of::<B>(&q), q.dtype(), q.device());
    let (q, k, v) = (read::<B>(q), read::<B>(k), read::<B>(v));
    let mut out = vec![0.0f32; shape.numel()];
    let mut lse = vec![0.0f32; shape.rows()];
    sparse_attn_ndarray::forward(&q, &k, &v, shape, &csr(layout), scale, &mut out, &mut lse);
    let AttentionShape {
        batch,
        heads,
        seq_len,
        head_dim,
    } = shape;
    (
        write::<B>(out, vec![batch, heads, seq_len, head_dim], dtype, &device),
        write::<B>(lse, vec![batch, heads, seq_len], dtype, &device),
    )
}

/// Fused backward on a CPU backend.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    dout: FloatTensor<B>,
    layout: &BlockLayout,
    scale: f32,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let (shape, dtype, device) = (shape_of::<B>(&q), q.dtype(), q.device());
    let [q, k, v, out, lse, dout] = [q, k, v, out, lse, dout].map(read::<B>);
    let (mut dq, mut dk, mut dv) = (
        vec![0.0f32; shape.numel()],
        vec![0.0f32; shape.numel()],
        vec![0.0f32; shape.numel()],
    );
    sparse_attn_ndarray::backward(
        &q,
        &k,
        &v,
        &out,
        &lse,
        &dout,
        shape,
        &csr(layout),
        scale,
        &mut dq,
        &mut dk,
        &mut dv,
    );
    let AttentionShape {
        batch,
        heads,
        seq_len,
        head_dim,
    } = shape;
    let dims = vec![batch, heads, seq_len, head_dim];
    (
        write::<B>(dq, dims.clone(), dtype, &device),
        write::<B>(dk, dims.clone(), dtype, &device),
        write::<B>(dv, dims, dtype, &device),
    )
}
