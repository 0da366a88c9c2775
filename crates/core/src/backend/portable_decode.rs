//! The portable decode path: each new query row's allowed cached keys gathered with Burn's
//! tensor primitives, on any backend.
//!
//! The host lists, per batch row and layout head, the key tokens each new row may read
//! ([`BlockLayout::allowed_keys`]), padded to the longest list with masked slots; the keys
//! and values are selected by those tokens and the row's softmax runs over its own list.
//! Memory is the new rows times their longest list, never the cache squared.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, TensorMetadata, get_or_init_device_settings};
use burn::tensor::{Shape, TensorData};

use super::portable::{
    bool_tensor, finite_or_zero, head_groups, int_tensor, repeat_kv, reshape, slice_dim,
};
use crate::decode::DecodeParams;
use crate::layout::BlockLayout;

/// The key tokens of each row of one batch row and layout head: `index` (`queries * width`
/// tokens, padding slots read token 0) and `masked` (`queries * width`, true where a slot is
/// padding).
struct RowKeys {
    width: usize,
    index: Vec<i64>,
    masked: Vec<bool>,
}

fn row_keys(
    layout: &BlockLayout,
    head: usize,
    first: usize,
    valid: usize,
    queries: usize,
) -> RowKeys {
    let len = first + valid;
    let lists: Vec<Vec<usize>> = (0..queries)
        .map(|i| {
            if i < valid {
                layout.allowed_keys(head, first + i, len).collect()
            } else {
                Vec::new()
            }
        })
        .collect();
    let width = lists.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut index = vec![0i64; queries * width];
    let mut masked = vec![true; queries * width];
    for (i, list) in lists.iter().enumerate() {
        for (slot, &tok) in list.iter().enumerate() {
            index[i * width + slot] = tok as i64;
            masked[i * width + slot] = false;
        }
    }
    RowKeys {
        width,
        index,
        masked,
    }
}

/// Decode on `q` `[B, H, m, d]` and caches `[B, H_kv, capacity, d]`: `[B, H, m, d]`.
pub fn decode<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    layout: &BlockLayout,
    params: &DecodeParams,
) -> FloatTensor<B> {
    let s = q.shape().to_vec();
    let (batch, heads, m, d) = (s[0], s[1], s[2], s[3]);
    let device = q.device();
    let bool_dtype = get_or_init_device_settings::<B>(&device).bool_dtype;
    let (k, v) = (repeat_kv::<B>(k, heads), repeat_kv::<B>(v, heads));
    let mut rows_out = Vec::with_capacity(batch);
    for b in 0..batch {
        let one = |t: &FloatTensor<B>| slice_dim::<B>(t.clone(), 0, b..b + 1);
        let (qb, kb, vb) = (one(&q), one(&k), one(&v));
        let mut groups = Vec::new();
        for (h0, h1, _) in head_groups(layout, heads) {
            let hg = h1 - h0;
            let part = |t: &FloatTensor<B>| slice_dim::<B>(t.clone(), 1, h0..h1);
            let keys = row_keys(layout, h0, params.first[b], params.valid[b], m);
            let w = keys.width;
            let index = int_tensor::<B>(keys.index.clone(), &device);
            let pick = |t: &FloatTensor<B>| {
                let picked = B::float_select(part(t), 2, index.clone());
                reshape::<B>(picked, &[1, hg, m, w, d])
            };
            let (kp, vp) = (pick(&kb), pick(&vb));
            let qg = reshape::<B>(part(&qb), &[1, hg, m, 1, d]);
            let scores = B::float_matmul(qg, B::float_swap_dims(kp, 3, 4));
            let mut scores = B::float_mul_scalar(scores, params.scale.into());
            if let Some(cap) = params.mods.softcap {
                let t = B::float_tanh(B::float_div_scalar(scores, cap.into()));
                scores = B::float_mul_scalar(t, cap.into());
            }
            let first = params.first[b];
            let mods = params.mods.view(params.bias_table.as_deref());
            if mods.alibi.is_some() || mods.bias.is_some() {
                // The modifiers after the cap, `- slope_h * |i - j| + bias_h(i, j)`, for row
                // i (token first + i) and slot j's key token.
                let biases: Vec<f64> = (h0..h1)
                    .flat_map(|h| {
                        keys.index
                            .iter()
                            .enumerate()
                            .map(move |(at, &tok)| mods.apply(h, 0.0, first + at / w, tok as usize))
                    })
                    .collect();
                let data = TensorData::new(biases, vec![1, hg, m, 1, w]).convert_dtype(q.dtype());
                scores = B::float_add(scores, B::float_from_data(data, &device));
            }
            let masked = bool_tensor::<B>(keys.masked, vec![1, 1, m, 1, w], &device);
            let masked = B::bool_expand(masked, Shape::from(vec![1, hg, m, 1, w]));
            let scores = B::float_mask_fill(scores, masked, f32::NEG_INFINITY.into());
            let max = finite_or_zero::<B>(B::float_max_dim(scores.clone(), 4));
            let e = B::float_exp(B::float_sub(scores, max));
            let sum = B::float_sum_dim(e.clone(), 4);
            let empty = B::float_equal_elem(sum.clone(), 0.0f32.into(), bool_dtype);
            let safe_sum = B::float_mask_fill(sum, empty, 1.0f32.into());
            let out = B::float_div(B::float_matmul(e, vp), safe_sum);
            groups.push(reshape::<B>(out, &[1, hg, m, d]));
        }
        rows_out.push(B::float_cat(groups, 1));
    }
    B::float_cat(rows_out, 0)
}
