//! The `NdArray` and `Flex` impls: thin wrappers over the fused CPU kernels of
//! `sparse-attn-ndarray`.
//!
//! Inputs are read into row-major buffers (any strides: a non-contiguous tensor reads in
//! logical order), the kernel runs, and results come back in the input dtype. `f64` tensors
//! run the `f64` kernels; every other float dtype runs (and accumulates) in `f32`.

use std::borrow::Cow;

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, DType, Element, TensorData, TensorMetadata, read_sync};
use sparse_attn_ndarray::{AttentionShape, CsrLayout, Real};

use crate::layout::BlockLayout;

/// Zero-copy access to the float buffers of a CPU backend.
pub(crate) trait HostBuffers: Backend {
    /// The elements of `t` as a row-major `f32` slice, if it is stored as one.
    fn f32_slice(t: &FloatTensor<Self>) -> Option<&[f32]>;
    /// The elements of `t` as a row-major `f64` slice, if it is stored as one.
    fn f64_slice(t: &FloatTensor<Self>) -> Option<&[f64]>;
}

#[cfg(feature = "ndarray")]
impl HostBuffers for burn::backend::NdArray {
    fn f32_slice(t: &FloatTensor<Self>) -> Option<&[f32]> {
        match t {
            burn::backend::ndarray::NdArrayTensor::F32(s) => s.view().to_slice(),
            _ => None,
        }
    }
    fn f64_slice(t: &FloatTensor<Self>) -> Option<&[f64]> {
        match t {
            burn::backend::ndarray::NdArrayTensor::F64(s) => s.view().to_slice(),
            _ => None,
        }
    }
}

#[cfg(feature = "flex")]
impl HostBuffers for burn::backend::Flex {
    fn f32_slice(t: &FloatTensor<Self>) -> Option<&[f32]> {
        t.as_slice::<f32>()
    }
    fn f64_slice(t: &FloatTensor<Self>) -> Option<&[f64]> {
        t.as_slice::<f64>()
    }
}

/// A kernel element type that can be borrowed from a CPU backend's buffer.
pub(crate) trait HostElement: Real + Element {
    /// Borrowed when the tensor already is a row-major buffer of `Self`.
    fn borrow<B: HostBuffers>(t: &FloatTensor<B>) -> Option<&[Self]>;
}

impl HostElement for f32 {
    fn borrow<B: HostBuffers>(t: &FloatTensor<B>) -> Option<&[Self]> {
        B::f32_slice(t)
    }
}

impl HostElement for f64 {
    fn borrow<B: HostBuffers>(t: &FloatTensor<B>) -> Option<&[Self]> {
        B::f64_slice(t)
    }
}

/// Rows of every `(batch, head)` slice reordered: row `p` of the result is row `index[p]`
/// of `src` (`width` elements per row, `rows` rows per slice).
fn reorder_rows<T: Copy>(src: &[T], rows: usize, width: usize, index: &[usize]) -> Vec<T> {
    let mut out = Vec::with_capacity(src.len());
    for slice in src.chunks(rows * width) {
        for &i in index {
            out.extend_from_slice(&slice[i * width..(i + 1) * width]);
        }
    }
    out
}

/// Kernel inputs in layout positions: `t` read as [`host`] does, then reordered by the
/// layout's token order, if it has one.
fn positions<'a, B: HostBuffers, T: HostElement>(
    t: &'a FloatTensor<B>,
    layout: &BlockLayout,
    width: usize,
) -> Cow<'a, [T]> {
    let buffer = host::<B, T>(t);
    match layout.order() {
        None => buffer,
        Some((order, _)) => Cow::Owned(reorder_rows(&buffer, layout.seq_len(), width, order)),
    }
}

/// Kernel outputs back in token order.
fn tokens<T: Copy>(values: Vec<T>, layout: &BlockLayout, width: usize) -> Vec<T> {
    match layout.order() {
        None => values,
        Some((_, inverse)) => reorder_rows(&values, layout.seq_len(), width, inverse),
    }
}

/// The elements of `t` in `T`: borrowed without a copy when possible, else read through
/// `TensorData` (other dtypes, non-contiguous views).
fn host<B: HostBuffers, T: HostElement>(t: &FloatTensor<B>) -> Cow<'_, [T]> {
    match T::borrow::<B>(t) {
        Some(slice) => Cow::Borrowed(slice),
        None => {
            let data =
                read_sync(B::float_into_data(t.clone())).expect("reading a CPU tensor cannot fail");
            Cow::Owned(
                data.convert::<T>()
                    .try_into_vec::<T>()
                    .expect("converted above"),
            )
        }
    }
}

fn write<B: Backend, T: Real + Element>(
    values: Vec<T>,
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

/// Fused forward on a CPU backend, in `f64` for `f64` tensors, else in `f32`.
pub(crate) fn forward<B: HostBuffers>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    layout: &BlockLayout,
    scale: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    if q.dtype() == DType::F64 {
        forward_in::<B, f64>(q, k, v, layout, scale)
    } else {
        forward_in::<B, f32>(q, k, v, layout, scale)
    }
}

fn forward_in<B: HostBuffers, T: HostElement>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    layout: &BlockLayout,
    scale: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (shape, dtype, device) = (shape_of::<B>(&q), q.dtype(), q.device());
    let d = shape.head_dim;
    let (q, k, v) = (
        positions::<B, T>(&q, layout, d),
        positions::<B, T>(&k, layout, d),
        positions::<B, T>(&v, layout, d),
    );
    let mut out = vec![T::ZERO; shape.numel()];
    let mut lse = vec![T::ZERO; shape.rows()];
    let scale = T::from_f64(scale);
    sparse_attn_ndarray::forward(&q, &k, &v, shape, &csr(layout), scale, &mut out, &mut lse);
    let AttentionShape {
        batch,
        heads,
        seq_len,
        head_dim,
    } = shape;
    let (out, lse) = (tokens(out, layout, head_dim), tokens(lse, layout, 1));
    (
        write::<B, T>(out, vec![batch, heads, seq_len, head_dim], dtype, &device),
        write::<B, T>(lse, vec![batch, heads, seq_len], dtype, &device),
    )
}

/// Fused backward on a CPU backend, in `f64` for `f64` tensors, else in `f32`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<B: HostBuffers>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    dout: FloatTensor<B>,
    layout: &BlockLayout,
    scale: f64,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    if q.dtype() == DType::F64 {
        backward_in::<B, f64>(q, k, v, out, lse, dout, layout, scale)
    } else {
        backward_in::<B, f32>(q, k, v, out, lse, dout, layout, scale)
    }
}

#[allow(clippy::too_many_arguments)]
fn backward_in<B: HostBuffers, T: HostElement>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    dout: FloatTensor<B>,
    layout: &BlockLayout,
    scale: f64,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let (shape, dtype, device) = (shape_of::<B>(&q), q.dtype(), q.device());
    let d = shape.head_dim;
    let (q, k, v) = (
        positions::<B, T>(&q, layout, d),
        positions::<B, T>(&k, layout, d),
        positions::<B, T>(&v, layout, d),
    );
    let (out, dout) = (
        positions::<B, T>(&out, layout, d),
        positions::<B, T>(&dout, layout, d),
    );
    let lse = positions::<B, T>(&lse, layout, 1);
    let zeros = || vec![T::ZERO; shape.numel()];
    let (mut dq, mut dk, mut dv) = (zeros(), zeros(), zeros());
    let scale = T::from_f64(scale);
    let (view, grads) = (&csr(layout), (&mut dq[..], &mut dk[..], &mut dv[..]));
    sparse_attn_ndarray::backward(
        &q, &k, &v, &out, &lse, &dout, shape, view, scale, grads.0, grads.1, grads.2,
    );
    let AttentionShape {
        batch,
        heads,
        seq_len,
        head_dim,
    } = shape;
    let dims = vec![batch, heads, seq_len, head_dim];
    let [dq, dk, dv] = [dq, dk, dv].map(|g| tokens(g, layout, head_dim));
    (
        write::<B, T>(dq, dims.clone(), dtype, &device),
        write::<B, T>(dk, dims.clone(), dtype, &device),
        write::<B, T>(dv, dims, dtype, &device),
    )
}
