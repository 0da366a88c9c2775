//! The `NdArray` and `Flex` impls: thin wrappers over the fused CPU kernels of
//! `sparse-attn-ndarray`.
//!
//! Inputs are read into row-major buffers (any strides: a non-contiguous tensor reads in
//! logical order), the kernel runs, and results come back in the input dtype. `f64` tensors
//! run the `f64` kernels; every other float dtype runs (and accumulates) in `f32`.

use std::borrow::Cow;

use rayon::prelude::*;

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, DType, Element, TensorData, TensorMetadata, read_sync};
use sparse_attn_ndarray::{AttentionShape, DecodeRows, DecodeShape, Real};

use crate::decode::DecodeParams;
use crate::layout::BlockLayout;
use crate::params::AttentionParams;

/// Zero-copy access to the float buffers of a CPU backend.
pub(crate) trait HostBuffers: Backend {
    /// The elements of `t` as a strided view of an `f32` buffer, if it is stored as one.
    fn f32_view(t: &FloatTensor<Self>) -> Option<HostView<'_, f32>>;
    /// The elements of `t` as a strided view of an `f64` buffer, if it is stored as one.
    fn f64_view(t: &FloatTensor<Self>) -> Option<HostView<'_, f64>>;
}

/// A backend's buffer seen as a 4-d tensor: element `[a, b, c, e]` is
/// `data[offset + a*s0 + b*s1 + c*s2 + e*s3]` (strides in elements, non-negative).
pub(crate) struct HostView<'a, T> {
    data: &'a [T],
    offset: usize,
    strides: [usize; 4],
}

impl<'a, T> HostView<'a, T> {
    /// `None` unless `strides` are 3 or 4 non-negative values (a rank-3 view is read as
    /// rank 4 with a last axis of one element).
    fn new(data: &'a [T], offset: usize, strides: &[isize]) -> Option<Self> {
        let strides: [isize; 4] = match *strides {
            [a, b, c] => [a, b, c, 1],
            [a, b, c, d] => [a, b, c, d],
            _ => return None,
        };
        if strides.iter().any(|&s| s < 0) {
            return None;
        }
        Some(Self {
            data,
            offset,
            strides: strides.map(|s| s as usize),
        })
    }

    /// The whole buffer when it already is row-major `shape` starting at offset 0.
    fn row_major(&self, shape: [usize; 4]) -> Option<&'a [T]> {
        let [_, d1, d2, d3] = shape;
        let dense = [d1 * d2 * d3, d2 * d3, d3, 1];
        let len = shape.iter().product::<usize>();
        let same = shape
            .iter()
            .zip(self.strides.iter().zip(dense))
            .all(|(&extent, (&s, want))| extent == 1 || s == want);
        (same && self.offset == 0 && self.data.len() >= len).then(|| &self.data[..len])
    }
}

#[cfg(feature = "ndarray")]
impl HostBuffers for burn::backend::NdArray {
    fn f32_view(t: &FloatTensor<Self>) -> Option<HostView<'_, f32>> {
        match t {
            burn::backend::ndarray::NdArrayTensor::F32(s) => {
                let view = s.view();
                HostView::new(view.to_slice_memory_order()?, 0, view.strides())
            }
            _ => None,
        }
    }
    fn f64_view(t: &FloatTensor<Self>) -> Option<HostView<'_, f64>> {
        match t {
            burn::backend::ndarray::NdArrayTensor::F64(s) => {
                let view = s.view();
                HostView::new(view.to_slice_memory_order()?, 0, view.strides())
            }
            _ => None,
        }
    }
}

#[cfg(feature = "flex")]
impl HostBuffers for burn::backend::Flex {
    fn f32_view(t: &FloatTensor<Self>) -> Option<HostView<'_, f32>> {
        let layout = t.layout();
        (t.dtype() == DType::F32).then_some(())?;
        HostView::new(t.storage::<f32>(), layout.start_offset(), layout.strides())
    }
    fn f64_view(t: &FloatTensor<Self>) -> Option<HostView<'_, f64>> {
        let layout = t.layout();
        (t.dtype() == DType::F64).then_some(())?;
        HostView::new(t.storage::<f64>(), layout.start_offset(), layout.strides())
    }
}

/// A kernel element type that can be read from a CPU backend's buffer.
pub(crate) trait HostElement: Real + Element {
    /// The tensor's buffer, when it holds `Self`.
    fn view<B: HostBuffers>(t: &FloatTensor<B>) -> Option<HostView<'_, Self>>;
}

impl HostElement for f32 {
    fn view<B: HostBuffers>(t: &FloatTensor<B>) -> Option<HostView<'_, Self>> {
        B::f32_view(t)
    }
}

impl HostElement for f64 {
    fn view<B: HostBuffers>(t: &FloatTensor<B>) -> Option<HostView<'_, Self>> {
        B::f64_view(t)
    }
}

/// The rows of every `(batch, head)` slice of `view` gathered into a row-major buffer,
/// `width` elements per row, copied as one run when the row is contiguous. One task per
/// slice: the buffer's pages are first touched (and zeroed by the OS) by the threads that
/// fill them.
fn gather_rows<T: Copy + Send + Sync>(view: &HostView<'_, T>, shape: [usize; 4]) -> Vec<T> {
    let [d0, d1, rows, width] = shape;
    let [s0, s1, s2, s3] = view.strides;
    let (len, slice) = (d0 * d1 * rows * width, rows * width);
    let mut out = sparse_attn_ndarray::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(slice.max(1))
        .enumerate()
        .for_each(|(ab, dst)| {
            let (a, b) = (ab / d1, ab % d1);
            for (row, dst) in dst.chunks_mut(width).enumerate() {
                let start = view.offset + a * s0 + b * s1 + row * s2;
                if s3 == 1 || width == 1 {
                    for (x, &y) in dst.iter_mut().zip(&view.data[start..start + width]) {
                        x.write(y);
                    }
                } else {
                    for (e, x) in dst.iter_mut().enumerate() {
                        x.write(view.data[start + e * s3]);
                    }
                }
            }
        });
    // SAFETY: the tasks above wrote all `len` elements (every row of every slice).
    unsafe { out.set_len(len) };
    out
}

/// Kernel inputs, row-major `[batch, heads, n, width]` in token order (the kernels apply a
/// layout's token order themselves): borrowed when the backend's buffer already is that,
/// else gathered in one pass from its strided buffer (transposed views), else read through
/// `TensorData` (other dtypes, broadcast views).
fn host<'a, B: HostBuffers, T: HostElement>(t: &'a FloatTensor<B>) -> Cow<'a, [T]> {
    let dims = t.shape();
    let shape = match *dims.as_slice() {
        [a, b, c] => [a, b, c, 1],
        [a, b, c, e] => [a, b, c, e],
        _ => unreachable!("attention tensors are rank 3 or 4, got {dims:?}"),
    };
    if let Some(view) = T::view::<B>(t) {
        return match view.row_major(shape) {
            Some(slice) => Cow::Borrowed(slice),
            None => Cow::Owned(gather_rows(&view, shape)),
        };
    }
    let data = read_sync(B::float_into_data(t.clone())).expect("reading a CPU tensor cannot fail");
    Cow::Owned(
        data.convert::<T>()
            .try_into_vec::<T>()
            .expect("converted above"),
    )
}

/// The values of a relative-position bias table (`[heads, buckets]`), in f64.
pub(crate) fn table_values<B: Backend>(table: &FloatTensor<B>) -> Vec<f64> {
    let data =
        read_sync(B::float_into_data(table.clone())).expect("reading a CPU tensor cannot fail");
    data.convert::<f64>()
        .try_into_vec::<f64>()
        .expect("converted above")
}

fn write<B: Backend, T: Real + Element>(
    values: Vec<T>,
    shape: Vec<usize>,
    dtype: DType,
    device: &B::Device,
) -> FloatTensor<B> {
    B::float_from_data(TensorData::new(values, shape).convert_dtype(dtype), device)
}

fn shape_of<B: Backend>(q: &FloatTensor<B>, k: &FloatTensor<B>) -> AttentionShape {
    AttentionShape::of(q.shape().dims::<4>(), k.shape().dims::<4>())
}

/// Fused forward on a CPU backend, in `f64` for `f64` tensors, else in `f32`; `bias`: the
/// relative-position bias table of a biased call.
pub(crate) fn forward<B: HostBuffers>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    bias: Option<&FloatTensor<B>>,
    layout: &BlockLayout,
    params: &AttentionParams,
) -> (FloatTensor<B>, FloatTensor<B>) {
    if q.dtype() == DType::F64 {
        forward_in::<B, f64>(q, k, v, bias, layout, params)
    } else {
        forward_in::<B, f32>(q, k, v, bias, layout, params)
    }
}

fn forward_in<B: HostBuffers, T: HostElement>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    bias: Option<&FloatTensor<B>>,
    layout: &BlockLayout,
    params: &AttentionParams,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (shape, dtype, device) = (shape_of::<B>(&q, &k), q.dtype(), q.device());
    let (q, k, v) = (host::<B, T>(&q), host::<B, T>(&k), host::<B, T>(&v));
    let mut out = sparse_attn_ndarray::zeroed::<T>(shape.numel());
    let mut lse = vec![T::ZERO; shape.rows()];
    let table = bias.map(table_values::<B>);
    let (scale, options) = (
        T::from_f64(params.scale),
        params.kernel_options(table.as_deref()),
    );
    let view = layout.csr();
    sparse_attn_ndarray::forward(
        &q, &k, &v, shape, &view, scale, &options, &mut out, &mut lse,
    );
    let AttentionShape {
        batch,
        heads,
        seq_len,
        head_dim,
        ..
    } = shape;
    (
        write::<B, T>(out, vec![batch, heads, seq_len, head_dim], dtype, &device),
        // The log-sum-exp stays in the kernels' precision (f32, or f64 for f64 inputs).
        write::<B, T>(lse, vec![batch, heads, seq_len], T::dtype(), &device),
    )
}

/// The gradients of a backward call: `dq`, `dk`, `dv`, and the bias table's of a biased one.
pub(crate) type BackwardGrads<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    Option<FloatTensor<B>>,
);

/// Fused backward on a CPU backend, in `f64` for `f64` tensors, else in `f32`; with the
/// relative-position `bias` table of a biased call, also its gradient (in its dtype).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<B: HostBuffers>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    bias: Option<&FloatTensor<B>>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    dout: FloatTensor<B>,
    layout: &BlockLayout,
    params: &AttentionParams,
) -> BackwardGrads<B> {
    if q.dtype() == DType::F64 {
        backward_in::<B, f64>(q, k, v, bias, out, lse, dout, layout, params)
    } else {
        backward_in::<B, f32>(q, k, v, bias, out, lse, dout, layout, params)
    }
}

#[allow(clippy::too_many_arguments)]
fn backward_in<B: HostBuffers, T: HostElement>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    bias: Option<&FloatTensor<B>>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    dout: FloatTensor<B>,
    layout: &BlockLayout,
    params: &AttentionParams,
) -> BackwardGrads<B> {
    let (shape, dtype, device) = (shape_of::<B>(&q, &k), q.dtype(), q.device());
    let table = bias.map(table_values::<B>);
    let bias_meta = bias.map(|t| (t.shape().dims::<2>(), t.dtype()));
    let d = shape.head_dim;
    let (q, k, v) = (host::<B, T>(&q), host::<B, T>(&k), host::<B, T>(&v));
    let dout = host::<B, T>(&dout);
    // The forward's output is only needed for the row deltas: compute them and free it
    // (when the autodiff graph held the last reference) before the gradients exist.
    let delta = sparse_attn_ndarray::row_deltas(&host::<B, T>(&out), &dout, d);
    drop(out);
    let lse = host::<B, T>(&lse);
    let mut dq = sparse_attn_ndarray::zeroed::<T>(shape.numel());
    let (mut dk, mut dv) = (
        sparse_attn_ndarray::zeroed::<T>(shape.kv_numel()),
        sparse_attn_ndarray::zeroed::<T>(shape.kv_numel()),
    );
    let mut dbias = table.as_ref().map(|t| vec![T::ZERO; t.len()]);
    let (scale, options) = (
        T::from_f64(params.scale),
        params.kernel_options(table.as_deref()),
    );
    let view = &layout.csr();
    let grads = (&mut dq[..], &mut dk[..], &mut dv[..], dbias.as_deref_mut());
    sparse_attn_ndarray::backward_with_deltas(
        &q,
        &k,
        &v,
        &delta,
        &lse,
        &dout,
        shape,
        view,
        scale,
        &options,
        grads,
        sparse_attn_ndarray::TILE_CACHE_BYTES,
    );
    let AttentionShape {
        batch,
        heads,
        kv_heads,
        seq_len,
        head_dim,
    } = shape;
    let (q_dims, kv_dims) = (
        vec![batch, heads, seq_len, head_dim],
        vec![batch, kv_heads, seq_len, head_dim],
    );
    let dbias = dbias
        .zip(bias_meta)
        .map(|(g, (dims, dtype))| write::<B, T>(g, dims.to_vec(), dtype, &device));
    (
        write::<B, T>(dq, q_dims, dtype, &device),
        write::<B, T>(dk, kv_dims.clone(), dtype, &device),
        write::<B, T>(dv, kv_dims, dtype, &device),
        dbias,
    )
}

/// Fused decode on a CPU backend, in `f64` for `f64` tensors, else in `f32`.
pub(crate) fn decode<B: HostBuffers>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    layout: &BlockLayout,
    params: &DecodeParams,
) -> FloatTensor<B> {
    if q.dtype() == DType::F64 {
        decode_in::<B, f64>(q, k, v, layout, params)
    } else {
        decode_in::<B, f32>(q, k, v, layout, params)
    }
}

fn decode_in<B: HostBuffers, T: HostElement>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    layout: &BlockLayout,
    params: &DecodeParams,
) -> FloatTensor<B> {
    let [batch, heads, queries, head_dim] = q.shape().dims::<4>();
    let (dtype, device) = (q.dtype(), q.device());
    let cache = shape_of::<B>(&q, &k);
    let shape = DecodeShape { cache, queries };
    let (q, k, v) = (host::<B, T>(&q), host::<B, T>(&k), host::<B, T>(&v));
    let mut out = sparse_attn_ndarray::zeroed::<T>(shape.q_numel());
    let rows = DecodeRows {
        first: &params.first,
        valid: &params.valid,
    };
    let positions = layout.order().map(|(_, inverse)| inverse);
    let scale = T::from_f64(params.scale);
    sparse_attn_ndarray::decode(
        &q,
        &k,
        &v,
        shape,
        &layout.csr(),
        positions,
        rows,
        scale,
        params.mods.view(params.bias_table.as_deref()),
        &mut out,
    );
    write::<B, T>(out, vec![batch, heads, queries, head_dim], dtype, &device)
}
