//! The portable path: block-sparse attention written with Burn's tensor primitives.
//!
//! It gathers only the active key blocks of each query block. Query blocks are bucketed by
//! their degree (the power of two at or above their count of active key blocks), and each
//! bucket pads its rows to its own largest degree: memory is at most twice the active
//! blocks' `block²` scores per head, also when some rows are dense (causal `all`, global
//! tokens) and the rest are not. It runs on every backend and stays as the reference path
//! behind the fused kernels.
//!
//! The options are plain tensor operations too: grouped key/value heads are expanded to the
//! query heads (their gradients summed back), key padding is one more mask on the gathered
//! scores, and dropout multiplies the gathered probabilities by a factor tensor drawn
//! on the host from the same counter-based generator as the kernels.

use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};
use burn::backend::{Backend, TensorMetadata, get_or_init_device_settings};
use burn::tensor::{IndexingUpdateOp, Shape, Slice, TensorData};

use crate::layout::{BlockLayout, FULL};
use crate::params::{AttentionParams, DropoutMask};

/// Heads `[start, end)` that share layout head `lh`.
pub(super) fn head_groups(layout: &BlockLayout, heads: usize) -> Vec<(usize, usize, usize)> {
    if layout.layout_heads() == 1 {
        vec![(0, heads, 0)]
    } else {
        (0..heads).map(|h| (h, h + 1, h)).collect()
    }
}

/// Gather plan of one bucket of query blocks of one layout head: the blocks, their key
/// block indices (padded to `degree` per row with fully masked slots) and the "disallowed"
/// mask `[rows, b, degree * b]`.
struct Plan {
    rows: Vec<usize>,
    degree: usize,
    index: Vec<i64>,
    masked: Vec<bool>,
}

/// The bucket of a query block with `degree` active key blocks: the power of two at or
/// above it (an empty row counts as degree 1, one fully masked slot).
fn bucket(degree: usize) -> usize {
    degree.max(1).next_power_of_two()
}

/// The gather plans of layout head `lh`, one per degree bucket, in increasing degree. Each
/// row's padded degree is below twice its own, so the gathered slots are fewer than twice
/// the active blocks (plus one per empty row).
fn plans(layout: &BlockLayout, lh: usize) -> Vec<Plan> {
    let mut buckets = std::collections::BTreeMap::<usize, Vec<usize>>::new();
    for r in 0..layout.n_blocks() {
        buckets
            .entry(bucket(layout.row(lh, r).count()))
            .or_default()
            .push(r);
    }
    buckets
        .into_values()
        .map(|rows| plan(layout, lh, rows))
        .collect()
}

fn plan(layout: &BlockLayout, lh: usize, rows: Vec<usize>) -> Plan {
    let (n, b) = (layout.seq_len(), layout.block());
    let degree = rows
        .iter()
        .map(|&r| layout.row(lh, r).count())
        .max()
        .unwrap_or(0)
        .max(1);
    let (_, _, _, _, _, _, bits, words) = layout.raw();
    let mut index = vec![0i64; rows.len() * degree];
    let mut masked = vec![true; rows.len() * b * degree * b];
    for (at, &r) in rows.iter().enumerate() {
        let bq = (n - r * b).min(b);
        for (slot, (c, m)) in layout.row(lh, r).enumerate() {
            index[at * degree + slot] = c as i64;
            let bk = (n - c * b).min(b);
            for i in 0..bq {
                let row = ((at * b) + i) * degree * b + slot * b;
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
        rows,
        degree,
        index,
        masked,
    }
}

fn dims<B: Backend>(t: &FloatTensor<B>) -> Vec<usize> {
    t.shape().to_vec()
}

pub(super) fn reshape<B: Backend>(t: FloatTensor<B>, shape: &[usize]) -> FloatTensor<B> {
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

pub(super) fn slice_dim<B: Backend>(
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

/// Token at layout position `pos`, or `None` for a padding position past the sequence.
fn token_at(layout: &BlockLayout, pos: usize) -> Option<usize> {
    (pos < layout.seq_len()).then(|| layout.order().map_or(pos, |(order, _)| order[pos]))
}

/// Layout positions of the gathered key columns of the plan's `at`-th query block:
/// `degree * b` entries.
fn key_positions(p: &Plan, b: usize, at: usize) -> impl Iterator<Item = usize> + '_ {
    p.index[at * p.degree..(at + 1) * p.degree]
        .iter()
        .flat_map(move |&c| (0..b).map(move |j| c as usize * b + j))
}

/// The padding mask of the gathered scores, `[B, 1, rows, b, degree * b]`: true where the
/// query or the key is past its batch row's valid length.
fn padding_mask(layout: &BlockLayout, p: &Plan, lengths: &[usize]) -> Vec<bool> {
    let b = layout.block();
    let mut out = Vec::with_capacity(lengths.len() * p.rows.len() * b * p.degree * b);
    for &len in lengths {
        let valid = |pos| token_at(layout, pos).is_some_and(|t| t < len);
        for (at, &r) in p.rows.iter().enumerate() {
            for i in 0..b {
                let row_valid = valid(r * b + i);
                out.extend(key_positions(p, b, at).map(|pos| !(row_valid && valid(pos))));
            }
        }
    }
    out
}

/// Dropout factors of the gathered probabilities, `[B, Hg, rows, b, degree * b]`:
/// `1 / (1 - p)` for kept pairs, 0 for dropped ones, heads `h0 ..` of `hg`.
fn dropout_factors(
    layout: &BlockLayout,
    p: &Plan,
    mask: &DropoutMask,
    batch: usize,
    heads: std::ops::Range<usize>,
) -> Vec<f64> {
    let b = layout.block();
    let mut out = Vec::with_capacity(batch * heads.len() * p.rows.len() * b * p.degree * b);
    for bb in 0..batch {
        for h in heads.clone() {
            let head_key = mask.head_key(bb, h);
            for (at, &r) in p.rows.iter().enumerate() {
                for i in 0..b {
                    let row_key =
                        token_at(layout, r * b + i).map(|t| DropoutMask::row_key(head_key, t));
                    out.extend(key_positions(p, b, at).map(|pos| {
                        match (row_key, token_at(layout, pos)) {
                            (Some(rk), Some(t)) if mask.keeps(rk, t) => mask.scale(),
                            _ => 0.0,
                        }
                    }));
                }
            }
        }
    }
    out
}

/// The ALiBi biases of the gathered scores, `[1, Hg, rows, b, degree * b]`: `slope_h * |i -
/// j|` for query token `i` and key token `j` (0 for padding positions, which are masked).
fn alibi_biases(
    layout: &BlockLayout,
    p: &Plan,
    slopes: &[f64],
    heads: std::ops::Range<usize>,
) -> Vec<f64> {
    let b = layout.block();
    let mut out = Vec::with_capacity(heads.len() * p.rows.len() * b * p.degree * b);
    for h in heads {
        for (at, &r) in p.rows.iter().enumerate() {
            for i in 0..b {
                let query = token_at(layout, r * b + i);
                out.extend(key_positions(p, b, at).map(|pos| {
                    match (query, token_at(layout, pos)) {
                        (Some(i), Some(j)) => slopes[h] * i.abs_diff(j) as f64,
                        _ => 0.0,
                    }
                }));
            }
        }
    }
    out
}

/// The flat indices into a `[H, buckets]` relative-position bias table of the gathered
/// scores, `[Hg, rows, b, degree * b]`: `h * buckets + bucket(i, j)` for query token `i` and
/// key token `j` of head `h` (bucket 0 for padding positions, which are masked).
fn bias_indices(
    layout: &BlockLayout,
    p: &Plan,
    buckets: &crate::params::RelativeBuckets,
    heads: std::ops::Range<usize>,
) -> Vec<i64> {
    let (b, count) = (layout.block(), buckets.count());
    let mut out = Vec::with_capacity(heads.len() * p.rows.len() * b * p.degree * b);
    for h in heads {
        for (at, &r) in p.rows.iter().enumerate() {
            for i in 0..b {
                let query = token_at(layout, r * b + i);
                out.extend(key_positions(p, b, at).map(|pos| {
                    let bucket = match (query, token_at(layout, pos)) {
                        (Some(i), Some(j)) => buckets.bucket(i, j),
                        _ => 0,
                    };
                    (h * count + bucket) as i64
                }));
            }
        }
    }
    out
}

/// Everything of one bucket of one head group that forward and backward share.
struct Gathered<B: Backend> {
    /// `[B, Hg, rows, b, d]`
    q: FloatTensor<B>,
    /// `[B, Hg, rows, degree * b, d]`
    k: FloatTensor<B>,
    /// `[B, Hg, rows, degree * b, d]`
    v: FloatTensor<B>,
    /// Masked, modified scaled scores `[B, Hg, rows, b, degree * b]`.
    s: FloatTensor<B>,
    /// With soft-capping, the derivative of the modified scores by the scaled ones,
    /// `1 - tanh²(s / cap)`, shaped like `s`.
    cap_grad: Option<FloatTensor<B>>,
    /// Dropout factors shaped like `s`, if dropout is on.
    keep: Option<FloatTensor<B>>,
    /// With a relative-position bias, the flat table index of each gathered score
    /// ([`bias_indices`], batch row 0's: the table has no batch dim).
    bias_index: Option<IntTensor<B>>,
    /// The bucket's query blocks.
    rows: IntTensor<B>,
    /// Their key blocks, `degree` per row.
    index: IntTensor<B>,
    /// Key blocks gathered per row.
    degree: usize,
}

pub(super) fn int_tensor<B: Backend>(values: Vec<i64>, device: &B::Device) -> IntTensor<B> {
    let dtype = get_or_init_device_settings::<B>(device).int_dtype;
    let len = values.len();
    B::int_from_data(
        TensorData::new(values, [len]).convert_dtype(dtype.into()),
        device,
    )
}

pub(super) fn bool_tensor<B: Backend>(
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

/// `[B, Hg, nb * b, d]` -> the blocks listed in `index`, `[B, Hg, rows, per * b, d]` (`per`
/// blocks per row).
fn gather_blocks<B: Backend>(
    t: FloatTensor<B>,
    index: IntTensor<B>,
    (nb, b): (usize, usize),
    rows: usize,
    per: usize,
) -> FloatTensor<B> {
    let s = dims::<B>(&t);
    let blocks = reshape::<B>(t, &[s[0], s[1], nb, b * s[3]]);
    let picked = B::float_select(blocks, 2, index);
    reshape::<B>(picked, &[s[0], s[1], rows, per * b, s[3]])
}

/// Gathers the query blocks of plan `p` (heads `heads`), their key and value blocks and
/// their masked scores (`bias`: a relative-position bias table, flat `[H * buckets]`).
fn gather<B: Backend>(
    (q, k, v): (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>),
    bias: Option<&FloatTensor<B>>,
    layout: &BlockLayout,
    (heads, p): (std::ops::Range<usize>, Plan),
    params: &AttentionParams,
) -> Gathered<B> {
    let (b, nb) = (layout.block(), layout.n_blocks());
    let device = q.device();
    let s = dims::<B>(&q);
    let (batch, hg) = (s[0], s[1]);
    let nr = p.rows.len();
    let rows = int_tensor::<B>(p.rows.iter().map(|&r| r as i64).collect(), &device);
    let index = int_tensor::<B>(p.index.clone(), &device);
    let q = gather_blocks::<B>(q, rows.clone(), (nb, b), nr, 1);
    let k = gather_blocks::<B>(k, index.clone(), (nb, b), nr, p.degree);
    let v = gather_blocks::<B>(v, index.clone(), (nb, b), nr, p.degree);
    let scores = B::float_matmul(q.clone(), B::float_swap_dims(k.clone(), 3, 4));
    let mut scores = B::float_mul_scalar(scores, params.scale.into());
    let full = Shape::from(vec![batch, hg, nr, b, p.degree * b]);
    let mut cap_grad = None;
    if let Some(cap) = params.mods.softcap {
        let t = B::float_tanh(B::float_div_scalar(scores, cap.into()));
        let t2 = B::float_mul(t.clone(), t.clone());
        cap_grad = Some(B::float_add_scalar(B::float_neg(t2), 1.0f32.into()));
        scores = B::float_mul_scalar(t, cap.into());
    }
    if let Some(slopes) = &params.mods.alibi {
        let biases = alibi_biases(layout, &p, slopes, heads.clone());
        let shape = vec![1, hg, nr, b, p.degree * b];
        let data = TensorData::new(biases, shape).convert_dtype(q.dtype());
        let biases = B::float_expand(B::float_from_data(data, &device), full.clone());
        scores = B::float_sub(scores, biases);
    }
    let mut bias_index = None;
    if let (Some(table), Some(buckets)) = (bias, &params.mods.relative) {
        let index = bias_indices(layout, &p, buckets, heads.clone());
        let index = int_tensor::<B>(index, &device);
        let biases = B::float_select(table.clone(), 0, index.clone());
        let biases = reshape::<B>(biases, &[1, hg, nr, b, p.degree * b]);
        scores = B::float_add(scores, B::float_expand(biases, full.clone()));
        bias_index = Some(index);
    }
    let keep = params.dropout.as_ref().map(|mask| {
        let factors = dropout_factors(layout, &p, mask, batch, heads);
        let data = TensorData::new(factors, full.clone()).convert_dtype(q.dtype());
        B::float_from_data(data, &device)
    });
    let padding = params.key_lengths.as_ref().map(|lengths| {
        let shape = vec![batch, 1, nr, b, p.degree * b];
        B::bool_expand(
            bool_tensor::<B>(padding_mask(layout, &p, lengths), shape, &device),
            full.clone(),
        )
    });
    let mask_shape = vec![1, 1, nr, b, p.degree * b];
    let mask = bool_tensor::<B>(p.masked, mask_shape, &device);
    let mask = B::bool_expand(mask, full);
    let mut s = B::float_mask_fill(scores, mask, f32::NEG_INFINITY.into());
    if let Some(padding) = padding {
        s = B::float_mask_fill(s, padding, f32::NEG_INFINITY.into());
    }
    Gathered {
        q,
        k,
        v,
        s,
        cap_grad,
        keep,
        bias_index,
        rows,
        index,
        degree: p.degree,
    }
}

/// Per-bucket results `[B, Hg, rows, w]` (the buckets' query blocks listed in `order`, in
/// the same sequence) -> `[B, Hg, nb, w]` in block order.
fn in_block_order<B: Backend>(parts: Vec<FloatTensor<B>>, order: &[usize]) -> FloatTensor<B> {
    let mut inverse = vec![0; order.len()];
    for (at, &r) in order.iter().enumerate() {
        inverse[r] = at;
    }
    reorder::<B>(B::float_cat(parts, 2), &inverse)
}

/// Replaces `-inf` entries (rows with no allowed key) by 0.
pub(super) fn finite_or_zero<B: Backend>(t: FloatTensor<B>) -> FloatTensor<B> {
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

/// `[B, H_kv, n, d]` -> `[B, H, n, d]`, each key/value head repeated for its `H / H_kv`
/// query heads (a view; under autodiff its gradient sums over the group).
pub(super) fn repeat_kv<B: Backend>(t: FloatTensor<B>, heads: usize) -> FloatTensor<B> {
    let s = dims::<B>(&t);
    if s[1] == heads {
        return t;
    }
    let group = heads / s[1];
    let t = reshape::<B>(t, &[s[0], s[1], 1, s[2], s[3]]);
    let t = B::float_expand(t, Shape::from(vec![s[0], s[1], group, s[2], s[3]]));
    reshape::<B>(t, &[s[0], heads, s[2], s[3]])
}

/// `[B, H, n, d]` gradients -> `[B, H_kv, n, d]`, summed over each group's query heads.
fn sum_groups<B: Backend>(t: FloatTensor<B>, kv_heads: usize) -> FloatTensor<B> {
    let s = dims::<B>(&t);
    if s[1] == kv_heads {
        return t;
    }
    let t = reshape::<B>(t, &[s[0], kv_heads, s[1] / kv_heads, s[2], s[3]]);
    reshape::<B>(B::float_sum_dim(t, 2), &[s[0], kv_heads, s[2], s[3]])
}

/// Forward on inputs in token order (`q` `[B, H, n, d]`, `k`/`v` `[B, H_kv, n, d]`):
/// `(out [B, H, n, d], lse [B, H, n])`.
pub fn forward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    layout: &BlockLayout,
    params: &AttentionParams,
) -> (FloatTensor<B>, FloatTensor<B>) {
    forward_biased::<B>(q, k, v, None, layout, params)
}

/// [`forward`] with the relative-position bias table `bias` (`[H, buckets]`, the bucketing
/// in `params.mods.relative`) of a biased call; differentiable op by op.
pub fn forward_biased<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    layout: &BlockLayout,
    params: &AttentionParams,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let heads = dims::<B>(&q)[1];
    let lse_dtype = lse_dtype(q.dtype());
    let (k, v) = (repeat_kv::<B>(k, heads), repeat_kv::<B>(v, heads));
    let bias = bias.map(|t| flat_table::<B>(t, q.dtype()));
    let bias = bias.as_ref();
    let (out, lse) = match layout.order() {
        None => forward_positions::<B>(q, k, v, bias, layout, params),
        Some((order, inverse)) => {
            let (q, k, v) = (
                reorder::<B>(q, order),
                reorder::<B>(k, order),
                reorder::<B>(v, order),
            );
            let (out, lse) = forward_positions::<B>(q, k, v, bias, layout, params);
            (reorder::<B>(out, inverse), reorder::<B>(lse, inverse))
        }
    };
    (out, B::float_cast(lse, lse_dtype))
}

/// A `[H, buckets]` bias table flat, `[H * buckets]`, in the inputs' `dtype`.
fn flat_table<B: Backend>(table: FloatTensor<B>, dtype: burn::tensor::DType) -> FloatTensor<B> {
    let len = dims::<B>(&table).iter().product::<usize>();
    B::float_cast(reshape::<B>(table, &[len]), dtype.into())
}

/// The dtype of the log-sum-exp for inputs of `dtype` on every backend: f64 for f64
/// inputs, else f32.
pub(crate) fn lse_dtype(dtype: burn::tensor::DType) -> burn::tensor::FloatDType {
    if dtype == burn::tensor::DType::F64 {
        burn::tensor::FloatDType::F64
    } else {
        burn::tensor::FloatDType::F32
    }
}

/// Forward on inputs already in layout positions.
fn forward_positions<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    bias: Option<&FloatTensor<B>>,
    layout: &BlockLayout,
    params: &AttentionParams,
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
        let hg = h1 - h0;
        let part = |t: &FloatTensor<B>| slice_dim::<B>(t.clone(), 1, h0..h1);
        let (mut bucket_outs, mut bucket_lses, mut order) = (Vec::new(), Vec::new(), Vec::new());
        for p in plans(layout, lh) {
            let nr = p.rows.len();
            order.extend_from_slice(&p.rows);
            let inputs = (part(&q), part(&k), part(&v));
            let g = gather::<B>(inputs, bias, layout, (h0..h1, p), params);
            let max = finite_or_zero::<B>(B::float_max_dim(g.s.clone(), 4));
            let e = B::float_exp(B::float_sub(g.s, max.clone()));
            let sum = B::float_sum_dim(e.clone(), 4);
            let bool_dtype = get_or_init_device_settings::<B>(&sum.device()).bool_dtype;
            let empty = B::float_equal_elem(sum.clone(), 0.0f32.into(), bool_dtype);
            let safe_sum = B::float_mask_fill(sum.clone(), empty, 1.0f32.into());
            // Dropout after the normaliser: the sum keeps every allowed term.
            let e = match g.keep {
                Some(keep) => B::float_mul(e, keep),
                None => e,
            };
            let out = B::float_div(B::float_matmul(e, g.v), safe_sum);
            let lse = B::float_add(max, B::float_log(sum));
            bucket_outs.push(reshape::<B>(out, &[batch, hg, nr, b * d]));
            bucket_lses.push(reshape::<B>(lse, &[batch, hg, nr, b]));
        }
        let out = in_block_order::<B>(bucket_outs, &order);
        let lse = in_block_order::<B>(bucket_lses, &order);
        outs.push(reshape::<B>(out, &[batch, hg, np, d]));
        lses.push(reshape::<B>(lse, &[batch, hg, np]));
    }
    let out = slice_dim::<B>(B::float_cat(outs, 1), 2, 0..n);
    let lse = slice_dim::<B>(B::float_cat(lses, 1), 2, 0..n);
    (out, lse)
}

/// Backward: `(dq, dk, dv)` of `sum(out * dout)`, recomputing probabilities from `lse`;
/// everything in token order, `dk`/`dv` shaped like `k`/`v`.
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    dout: FloatTensor<B>,
    layout: &BlockLayout,
    params: &AttentionParams,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let (dq, dk, dv, _) = backward_with::<B>(q, k, v, None, out, lse, dout, layout, params);
    (dq, dk, dv)
}

/// [`backward`] of a biased call: also the gradient of the bias table (`[H, buckets]`,
/// in its dtype).
#[allow(clippy::too_many_arguments)]
pub fn backward_biased<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    bias: FloatTensor<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    dout: FloatTensor<B>,
    layout: &BlockLayout,
    params: &AttentionParams,
) -> (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
) {
    let (table_dims, table_dtype) = (dims::<B>(&bias), bias.dtype());
    let (dq, dk, dv, dbias) =
        backward_with::<B>(q, k, v, Some(bias), out, lse, dout, layout, params);
    let dbias = dbias.expect("a bias table gives a bias gradient");
    let dbias = B::float_cast(reshape::<B>(dbias, &table_dims), table_dtype.into());
    (dq, dk, dv, dbias)
}

/// The backward of [`backward`] and [`backward_biased`]: the bias gradient flat.
#[allow(clippy::too_many_arguments)]
fn backward_with<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    dout: FloatTensor<B>,
    layout: &BlockLayout,
    params: &AttentionParams,
) -> (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    Option<FloatTensor<B>>,
) {
    let (heads, kv_heads) = (dims::<B>(&q)[1], dims::<B>(&k)[1]);
    let (k, v) = (repeat_kv::<B>(k, heads), repeat_kv::<B>(v, heads));
    // The tensor ops below run in the inputs' dtype.
    let lse = B::float_cast(lse, q.dtype().into());
    let bias = bias.map(|t| flat_table::<B>(t, q.dtype()));
    let bias = bias.as_ref();
    let (dq, dk, dv, dbias) = match layout.order() {
        None => backward_positions::<B>(q, k, v, bias, out, lse, dout, layout, params),
        Some((order, inverse)) => {
            let [q, k, v, out, lse, dout] =
                [q, k, v, out, lse, dout].map(|t| reorder::<B>(t, order));
            let (dq, dk, dv, dbias) =
                backward_positions::<B>(q, k, v, bias, out, lse, dout, layout, params);
            (
                reorder::<B>(dq, inverse),
                reorder::<B>(dk, inverse),
                reorder::<B>(dv, inverse),
                dbias,
            )
        }
    };
    (
        dq,
        sum_groups::<B>(dk, kv_heads),
        sum_groups::<B>(dv, kv_heads),
        dbias,
    )
}

/// Backward on tensors already in layout positions (`bias`: a flat bias table).
#[allow(clippy::too_many_arguments)]
fn backward_positions<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    bias: Option<&FloatTensor<B>>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    dout: FloatTensor<B>,
    layout: &BlockLayout,
    params: &AttentionParams,
) -> (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    Option<FloatTensor<B>>,
) {
    let s = dims::<B>(&q);
    let (batch, heads, n, d) = (s[0], s[1], s[2], s[3]);
    let (b, nb) = (layout.block(), layout.n_blocks());
    let np = nb * b;
    let pad = |t: FloatTensor<B>| pad_rows::<B>(t, np);
    let (q, k, v, out, dout) = (pad(q), pad(k), pad(v), pad(out), pad(dout));
    let lse = pad_rows::<B>(reshape::<B>(lse, &[batch, heads, n, 1]), np);
    let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
    let mut dbias = bias.map(|t| B::float_zeros(t.shape(), &t.device(), t.dtype().into()));
    for (h0, h1, lh) in head_groups(layout, heads) {
        let hg = h1 - h0;
        let part = |t: &FloatTensor<B>| slice_dim::<B>(t.clone(), 1, h0..h1);
        let zeros = || {
            B::float_zeros(
                Shape::from(vec![batch, hg, nb, b * d]),
                &q.device(),
                q.dtype().into(),
            )
        };
        let (mut bucket_dqs, mut order) = (Vec::new(), Vec::new());
        let (mut dk, mut dv) = (zeros(), zeros());
        for p in plans(layout, lh) {
            let nr = p.rows.len();
            order.extend_from_slice(&p.rows);
            let inputs = (part(&q), part(&k), part(&v));
            let g = gather::<B>(inputs, bias, layout, (h0..h1, p), params);
            let rows =
                |t: &FloatTensor<B>| gather_blocks::<B>(part(t), g.rows.clone(), (nb, b), nr, 1);
            let lse = finite_or_zero::<B>(rows(&lse));
            let probs = B::float_exp(B::float_sub(g.s, lse));
            let dout = rows(&dout);
            let delta = B::float_sum_dim(B::float_mul(dout.clone(), rows(&out)), 4);
            let dp = B::float_matmul(dout.clone(), B::float_swap_dims(g.v, 3, 4));
            // Dropout: dV takes the kept probabilities, dP the kept (scaled) products.
            let (dropped, dp) = match g.keep {
                Some(keep) => (
                    B::float_mul(probs.clone(), keep.clone()),
                    B::float_mul(dp, keep),
                ),
                None => (probs.clone(), dp),
            };
            let dv_g = B::float_matmul(B::float_swap_dims(dropped, 3, 4), dout);
            let mut ds = B::float_mul(probs, B::float_sub(dp, delta));
            // The bias adds to the modified scores: its gradient is dS before the cap's
            // derivative, summed over the batch and into each score's table entry.
            if let (Some(acc), Some(index)) = (dbias.take(), g.bias_index) {
                let len = hg * nr * b * g.degree * b;
                let summed = reshape::<B>(B::float_sum_dim(ds.clone(), 0), &[len]);
                dbias = Some(B::float_select_assign(
                    acc,
                    0,
                    index,
                    summed,
                    IndexingUpdateOp::Add,
                ));
            }
            if let Some(cap_grad) = g.cap_grad {
                ds = B::float_mul(ds, cap_grad);
            }
            let ds = B::float_mul_scalar(ds, params.scale.into());
            let dq = B::float_matmul(ds.clone(), g.k);
            let dk_g = B::float_matmul(B::float_swap_dims(ds, 3, 4), g.q);
            // Each gathered key block adds its gradient to the block it came from.
            let scatter = |acc: FloatTensor<B>, grad: FloatTensor<B>| {
                let src = reshape::<B>(grad, &[batch, hg, nr * g.degree, b * d]);
                B::float_select_assign(acc, 2, g.index.clone(), src, IndexingUpdateOp::Add)
            };
            dk = scatter(dk, dk_g);
            dv = scatter(dv, dv_g);
            bucket_dqs.push(reshape::<B>(dq, &[batch, hg, nr, b * d]));
        }
        let dq = in_block_order::<B>(bucket_dqs, &order);
        dqs.push(reshape::<B>(dq, &[batch, hg, np, d]));
        dks.push(reshape::<B>(dk, &[batch, hg, np, d]));
        dvs.push(reshape::<B>(dv, &[batch, hg, np, d]));
    }
    let finish = |parts: Vec<FloatTensor<B>>| slice_dim::<B>(B::float_cat(parts, 1), 2, 0..n);
    (finish(dqs), finish(dks), finish(dvs), dbias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::{Band, Longformer, Pattern};

    /// Gathered key-block slots of all buckets of layout head 0, and the active blocks.
    fn slots_and_active(pattern: &dyn Pattern, n: usize, block: usize) -> (usize, usize) {
        let layout = BlockLayout::build(pattern, n, block, 1).unwrap();
        let plans = plans(&layout, 0);
        let mut seen: Vec<usize> = plans.iter().flat_map(|p| p.rows.clone()).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..layout.n_blocks()).collect::<Vec<_>>());
        let slots = plans.iter().map(|p| p.rows.len() * p.degree).sum();
        (slots, layout.active_blocks(0).unwrap())
    }

    #[test]
    fn gathered_slots_follow_the_active_blocks_when_one_row_is_dense() {
        // A global token makes block row 0 dense; every other row is a window plus a column.
        let longformer = Longformer::new(64, vec![0], false).unwrap();
        // Causal `all`: every row has a different degree.
        let causal = Band::causal();
        for (pattern, n) in [(&longformer as &dyn Pattern, 4096), (&causal, 2000)] {
            let (slots, active) = slots_and_active(pattern, n, 64);
            assert!(
                slots < 2 * active,
                "{}: {slots} slots for {active} active",
                pattern.name()
            );
        }
        // Padding every row to the dense one's degree would be n_blocks².
        let (slots, _) = slots_and_active(&longformer, 4096, 64);
        assert!(slots < 64 * 64 / 4, "{slots}");
    }
}
