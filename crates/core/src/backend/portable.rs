//! The portable path: block-sparse attention written with Burn's tensor primitives.
//!
//! It gathers only the active key blocks of each query block (padded to the largest row
//! degree), so memory grows with the active blocks, never with a dense `n x n` matrix. It
//! runs on every backend and stays as the reference path behind the fused kernels.

use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};
use burn::backend::{Backend, TensorMetadata, get_or_init_device_settings};
use burn::tensor::{IndexingUpdateOp, Shape, Slice, TensorData};

use crate::layout::{BlockLayout, FULL};

/// Heads `[start, end)` that share layout head `lh`.
fn head_groups(layout: &BlockLayout, heads: usize) -> Vec<(usize, usize, usize)> {
    if layout.layout_heads() == 1 {
        vec![(0, heads, 0)]
    } else {
        (0..heads).map(|h| (h, h + 1, h)).collect()
    }
}

/// Gather plan of one layout head: block indices (padded to `degree` per row) and the
/// "disallowed" mask `[n_blocks, b, degree * b]`.
struct Plan {
    degree: usize,
    index: Vec<i64>,
    masked: Vec<bool>,
}

fn plan(layout: &BlockLayout, lh: usize) -> Plan {
    let (n, b, nb) = (layout.seq_len(), layout.block(), layout.n_blocks());
    let degree = (0..nb)
        .map(|r| layout.row(lh, r).count())
        .max()
        .unwrap_or(0)
        .max(1);
    let (_, _, _, _, _, _, bits, words) = layout.raw();
    let mut index = vec![0i64; nb * degree];
    let mut masked = vec![true; nb * b * degree * b];
    for r in 0..nb {
        let bq = (n - r * b).min(b);
        for (slot, (c, m)) in layout.row(lh, r).enumerate() {
            index[r * degree + slot] = c as i64;
            let bk = (n - c * b).min(b);
            for i in 0..bq {
                let row = ((r * b) + i) * degree * b + slot * b;
                for j in 0..bk {
                    let bit = i * b + j;
                    let allowed =
                        m == FULL || bits[m as usize * words + bit / 64] >> (bit % 64) & 1 == 1;
                    masked[row + j] = !allowed;
                }
            }
        }
    }
    Plan {
        degree,
        index,
        masked,
    }
}

fn dims<B: Backend>(t: &FloatTensor<B>) -> Vec<usize> {
    t.shape().to_vec()
}

fn reshape<B: Backend>(t: FloatTensor<B>, shape: &[usize]) -> FloatTensor<B> {
    B::float_reshape(t, Shape::from(shape.to_vec()))
}

/// Pads dim 2 of a `[B, H, n, d]` tensor with zeros up to `padded` rows.
fn pad_rows<B: Backend>(t: FloatTensor<B>, padded: usize) -> FloatTensor<B> {
    let s = dims::<B>(&t);
    if s[2] == padded {
        return t;
    }
    let zeros = B::float_zeros(
        Shape::from(vec![s[0], s[1], padded - s[2], s[3]]),
        &t.device(),
        t.dtype().into(),
    );
    B::float_cat(vec![t, zeros], 2)
}

fn slice_dim<B: Backend>(
    t: FloatTensor<B>,
    dim: usize,
    range: std::ops::Range<usize>,
) -> FloatTensor<B> {
    let rank = dims::<B>(&t).len();
    let slices: Vec<Slice> = (0..rank)
        .map(|d| {
            if d == dim {
                Slice::from(range.clone())
            } else {
                Slice::from(..)
            }
        })
        .collect();
    B::float_slice(t, &slices)
}

/// Everything of one head group that forward and backward share.
struct Gathered<B: Backend> {
    /// `[B, Hg, nb, b, d]`
    q: FloatTensor<B>,
    /// `[B, Hg, nb, degree * b, d]`
    k: FloatTensor<B>,
    /// `[B, Hg, nb, degree * b, d]`
    v: FloatTensor<B>,
    /// Masked scaled scores `[B, Hg, nb, b, degree * b]`.
    s: FloatTensor<B>,
    index: IntTensor<B>,
    degree: usize,
}

fn int_tensor<B: Backend>(values: Vec<i64>, device: &B::Device) -> IntTensor<B> {
    let dtype = get_or_init_device_settings::<B>(device).int_dtype;
    let len = values.len();
    B::int_from_data(
        TensorData::new(values, [len]).convert_dtype(dtype.into()),
        device,
    )
}

fn bool_tensor<B: Backend>(
    values: Vec<bool>,
    shape: Vec<usize>,
    device: &B::Device,
) -> BoolTensor<B> {
    let dtype = get_or_init_device_settings::<B>(device).bool_dtype;
    B::bool_from_data(
        TensorData::new(values, shape).convert_dtype(dtype.into()),
        device,
    )
}

/// `[B, Hg, np, d]` -> gathered blocks `[B, Hg, nb, degree * b, d]`.
fn gather_blocks<B: Backend>(
    t: FloatTensor<B>,
    index: IntTensor<B>,
    nb: usize,
    b: usize,
    degree: usize,
) -> FloatTensor<B> {
    let s = dims::<B>(&t);
    let blocks = reshape::<B>(t, &[s[0], s[1], nb, b * s[3]]);
    let picked = B::float_select(blocks, 2, index);
    reshape::<B>(picked, &[s[0], s[1], nb, degree * b, s[3]])
}

#[allow(clippy::too_many_arguments)]
fn gather<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    layout: &BlockLayout,
    lh: usize,
    scale: f64,
) -> Gathered<B> {
    let (b, nb) = (layout.block(), layout.n_blocks());
    let device = q.device();
    let s = dims::<B>(&q);
    let (batch, hg, d) = (s[0], s[1], s[3]);
    let p = plan(layout, lh);
    let index = int_tensor::<B>(p.index, &device);
    let q = reshape::<B>(q, &[batch, hg, nb, b, d]);
    let k = gather_blocks::<B>(k, index.clone(), nb, b, p.degree);
    let v = gather_blocks::<B>(v, index.clone(), nb, b, p.degree);
    let scores = B::float_matmul(q.clone(), B::float_swap_dims(k.clone(), 3, 4));
    let scores = B::float_mul_scalar(scores, scale.into());
    let mask_shape = vec![1, 1, nb, b, p.degree * b];
    let mask = bool_tensor::<B>(p.masked, mask_shape, &device);
    let mask = B::bool_expand(mask, Shape::from(vec![batch, hg, nb, b, p.degree * b]));
    let s = B::float_mask_fill(scores, mask, f32::NEG_INFINITY.into());
    Gathered {
        q,
        k,
        v,
        s,
        index,
        degree: p.degree,
    }
}

/// Replaces `-inf` entries (rows with no allowed key) by 0.
fn finite_or_zero<B: Backend>(t: FloatTensor<B>) -> FloatTensor<B> {
    let dtype = get_or_init_device_settings::<B>(&t.device()).bool_dtype;
    let inf = B::float_equal_elem(t.clone(), f32::NEG_INFINITY.into(), dtype);
    B::float_mask_fill(t, inf, 0.0f32.into())
}

/// Selects rows (dim 2) of `t` by `index`: the layout's token order or its inverse.
fn reorder<B: Backend>(t: FloatTensor<B>, index: &[usize]) -> FloatTensor<B> {
    let device = t.device();
    let index = int_tensor::<B>(index.iter().map(|&x| x as i64).collect(), &device);
    B::float_select(t, 2, index)
}

/// Forward on `[B, H, n, d]` inputs in token order: `(out [B, H, n, d], lse [B, H, n])`.
pub fn forward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    layout: &BlockLayout,
    scale: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    match layout.order() {
        None => forward_positions::<B>(q, k, v, layout, scale),
        Some((order, inverse)) => {
            let (q, k, v) = (
                reorder::<B>(q, order),
                reorder::<B>(k, order),
                reorder::<B>(v, order),
            );
            let (out, lse) = forward_positions::<B>(q, k, v, layout, scale);
            (reorder::<B>(out, inverse), reorder::<B>(lse, inverse))
        }
    }
}

/// Forward on inputs already in layout positions.
fn forward_positions<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    layout: &BlockLayout,
    scale: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let s = dims::<B>(&q);
    let (batch, heads, n, d) = (s[0], s[1], s[2], s[3]);
    let (b, nb) = (layout.block(), layout.n_blocks());
    let np = nb * b;
    let (q, k, v) = (
        pad_rows::<B>(q, np),
        pad_rows::<B>(k, np),
        pad_rows::<B>(v, np),
    );
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for (h0, h1, lh) in head_groups(layout, heads) {
        let part = |t: &FloatTensor<B>| slice_dim::<B>(t.clone(), 1, h0..h1);
        let g = gather::<B>(part(&q), part(&k), part(&v), layout, lh, scale);
        let max = finite_or_zero::<B>(B::float_max_dim(g.s.clone(), 4));
        let e = B::float_exp(B::float_sub(g.s, max.clone()));
        let sum = B::float_sum_dim(e.clone(), 4);
        let bool_dtype = get_or_init_device_settings::<B>(&sum.device()).bool_dtype;
        let empty = B::float_equal_elem(sum.clone(), 0.0f32.into(), bool_dtype);
        let safe_sum = B::float_mask_fill(sum.clone(), empty, 1.0f32.into());
        let out = B::float_div(B::float_matmul(e, g.v), safe_sum);
        let lse = B::float_add(max, B::float_log(sum));
        let hg = h1 - h0;
        outs.push(reshape::<B>(out, &[batch, hg, np, d]));
        lses.push(reshape::<B>(lse, &[batch, hg, np]));
    }
    let out = slice_dim::<B>(B::float_cat(outs, 1), 2, 0..n);
    let lse = slice_dim::<B>(B::float_cat(lses, 1), 2, 0..n);
    (out, lse)
}

/// Backward: `(dq, dk, dv)` of `sum(out * dout)`, recomputing probabilities from `lse`;
/// everything in token order.
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    dout: FloatTensor<B>,
    layout: &BlockLayout,
    scale: f64,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let Some((order, inverse)) = layout.order() else {
        return backward_positions::<B>(q, k, v, out, lse, dout, layout, scale);
    };
    let [q, k, v, out, lse, dout] = [q, k, v, out, lse, dout].map(|t| reorder::<B>(t, order));
    let (dq, dk, dv) = backward_positions::<B>(q, k, v, out, lse, dout, layout, scale);
    (
        reorder::<B>(dq, inverse),
        reorder::<B>(dk, inverse),
        reorder::<B>(dv, inverse),
    )
}

/// Backward on tensors already in layout positions.
#[allow(clippy::too_many_arguments)]
fn backward_positions<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    dout: FloatTensor<B>,
    layout: &BlockLayout,
    scale: f64,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let s = dims::<B>(&q);
    let (batch, heads, n, d) = (s[0], s[1], s[2], s[3]);
    let (b, nb) = (layout.block(), layout.n_blocks());
    let np = nb * b;
    let pad = |t: FloatTensor<B>| pad_rows::<B>(t, np);
    let (q, k, v, out, dout) = (pad(q), pad(k), pad(v), pad(out), pad(dout));
    let lse = pad_rows::<B>(reshape::<B>(lse, &[batch, heads, n, 1]), np);
    let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
    for (h0, h1, lh) in head_groups(layout, heads) {
        let hg = h1 - h0;
        let part = |t: &FloatTensor<B>| slice_dim::<B>(t.clone(), 1, h0..h1);
        let g = gather::<B>(part(&q), part(&k), part(&v), layout, lh, scale);
        let blocks = |t: FloatTensor<B>, w: usize| reshape::<B>(t, &[batch, hg, nb, b, w]);
        let lse = finite_or_zero::<B>(blocks(part(&lse), 1));
        let p = B::float_exp(B::float_sub(g.s, lse));
        let dout = blocks(part(&dout), d);
        let delta = B::float_sum_dim(B::float_mul(dout.clone(), blocks(part(&out), d)), 4);
        let dv_g = B::float_matmul(B::float_swap_dims(p.clone(), 3, 4), dout.clone());
        let dp = B::float_matmul(dout, B::float_swap_dims(g.v, 3, 4));
        let ds = B::float_mul_scalar(B::float_mul(p, B::float_sub(dp, delta)), scale.into());
        let dq = B::float_matmul(ds.clone(), g.k);
        let dk_g = B::float_matmul(B::float_swap_dims(ds, 3, 4), g.q);
        let scatter = |grad: FloatTensor<B>| {
            let src = reshape::<B>(grad, &[batch, hg, nb * g.degree, b * d]);
            let zeros = B::float_zeros(
                Shape::from(vec![batch, hg, nb, b * d]),
                &src.device(),
                src.dtype().into(),
            );
            let summed =
                B::float_select_assign(zeros, 2, g.index.clone(), src, IndexingUpdateOp::Add);
            reshape::<B>(summed, &[batch, hg, np, d])
        };
        dqs.push(reshape::<B>(dq, &[batch, hg, np, d]));
        dks.push(scatter(dk_g));
        dvs.push(scatter(dv_g));
    }
    let finish = |parts: Vec<FloatTensor<B>>| slice_dim::<B>(B::float_cat(parts, 1), 2, 0..n);
    (finish(dqs), finish(dks), finish(dvs))
}
