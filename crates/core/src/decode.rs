//! Cached decoding: new query rows against a key/value cache, through the layout built once
//! for the cache's capacity.
//!
//! A model generating text appends each new token's keys and values to a cache of
//! `capacity` positions and attends only the new rows. The layout of the cache's capacity
//! knows every row of the pattern, so a step reads exactly the keys its row allows among the
//! tokens cached so far: no layout is rebuilt per token, no `n x n` mask exists, and a step
//! costs what its row's active blocks cost.

use std::sync::Arc;

use burn::backend::Dispatch;
use burn::tensor::Tensor;

use crate::api::{AttentionOptions, check_device_limits, check_layout, same_dtype_and_device};
use crate::backend::SparseAttentionBackend;
use crate::error::{Result, SparseAttentionError};
use crate::layout::BlockLayout;
use crate::params::ScoreModParams;

/// Which tokens the query rows of a decode call are, per batch row.
///
/// Row `i < valid[b]` of batch row `b` is token `first[b] + i`; it attends the keys its
/// layout row allows among cache positions `0 .. first[b] + valid[b]` (the tokens cached so
/// far, this call's included). Rows `valid[b] ..` are padding (zero output): a batch of
/// sequences of different lengths decodes in one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeRows {
    /// First new token of each batch row (the tokens already in its cache).
    pub first: Vec<usize>,
    /// Valid new rows of each batch row.
    pub valid: Vec<usize>,
}

impl DecodeRows {
    /// Every batch row adds the same `queries` tokens after `first` cached ones.
    pub fn uniform(batch: usize, first: usize, queries: usize) -> Self {
        Self {
            first: vec![first; batch],
            valid: vec![queries; batch],
        }
    }

    /// Checks these rows against a call of `batch` rows of `queries` new tokens over a cache
    /// of `capacity` tokens.
    ///
    /// # Errors
    /// [`DecodeRows`](SparseAttentionError::DecodeRows) for lists not one per batch row,
    /// [`ValidRows`](SparseAttentionError::ValidRows) for more valid rows than `queries`,
    /// [`CacheFull`](SparseAttentionError::CacheFull) for rows past the capacity.
    pub fn check(&self, batch: usize, queries: usize, capacity: usize) -> Result<()> {
        for (what, list) in [("first", &self.first), ("valid", &self.valid)] {
            if list.len() != batch {
                return Err(SparseAttentionError::DecodeRows {
                    what,
                    got: list.len(),
                    batch,
                });
            }
        }
        for (row, (&first, &valid)) in self.first.iter().zip(&self.valid).enumerate() {
            if valid > queries {
                return Err(SparseAttentionError::ValidRows {
                    row,
                    valid,
                    queries,
                });
            }
            let end = first.saturating_add(valid);
            if end > capacity {
                return Err(SparseAttentionError::CacheFull { row, end, capacity });
            }
        }
        Ok(())
    }
}

/// The validated parameters of the backend's decode op.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeParams {
    /// Softmax scale, finite and positive.
    pub scale: f64,
    /// First new token of each batch row.
    pub first: Arc<[usize]>,
    /// Valid new rows of each batch row (at most the call's query rows; `first + valid` at
    /// most the capacity).
    pub valid: Arc<[usize]>,
    /// Soft-capping, ALiBi and the relative-position buckets.
    pub mods: ScoreModParams,
    /// The relative-position bias table `[heads, buckets]` (row-major), exactly when
    /// `mods.relative` is set: decoding is not differentiable, so it takes the table's
    /// values.
    pub bias_table: Option<Arc<[f64]>>,
}

/// Attention of new query rows over a key/value cache: row `i` of batch row `b` is token
/// `rows.first[b] + i` and gets `sum_j softmax_j(scale q_i . k_j) v_j` over the cached keys
/// `j < rows.first[b] + rows.valid[b]` that `layout` allows for it (see [`DecodeRows`]).
///
/// `layout` is built for the cache's capacity (`layout.seq_len() == capacity`); the result
/// is the matching rows of [`sparse_attention`](crate::sparse_attention) over the capacity
/// with key lengths `first + valid`, so for a causal pattern it equals the full forward over
/// the text so far at those positions (to rounding), for every pattern, token order and
/// per-head layout. Not differentiable (inference); runs the fused decode kernels of the
/// backend, which split long rows across key blocks.
///
/// # Shapes
/// `q`: `[batch, heads, queries, d]`; `k_cache`, `v_cache`: `[batch, kv_heads, capacity,
/// d]`, `kv_heads` dividing `heads`. Output `[batch, heads, queries, d]`.
///
/// # Errors
/// Empty or mismatched shapes, dtypes or devices, a layout for another capacity or head
/// count, rows not one per batch row, more valid rows than queries, rows past the capacity
/// ([`CacheFull`](SparseAttentionError::CacheFull)), a scale that is not finite and positive.
///
/// # Example
/// ```
/// use burn::tensor::{Device, Distribution, Tensor};
/// use sparse_attn_core::{BlockLayout, DecodeRows, pattern::Band, sparse_attention_decode};
///
/// let device = Device::ndarray();
/// // A cache of 64 positions, 2 heads; 10 tokens cached, one new token (token 10).
/// let layout = BlockLayout::build(&Band::sliding_window(16).unwrap(), 64, 16, 2).unwrap();
/// let cache = Tensor::<4>::random([1, 2, 64, 8], Distribution::Normal(0.0, 1.0), &device);
/// let q = Tensor::<4>::random([1, 2, 1, 8], Distribution::Normal(0.0, 1.0), &device);
/// let rows = DecodeRows::uniform(1, 10, 1);
/// let out = sparse_attention_decode(q, cache.clone(), cache, &layout, &rows, None).unwrap();
/// assert_eq!(out.dims(), [1, 2, 1, 8]);
/// ```
pub fn sparse_attention_decode(
    q: Tensor<4>,
    k_cache: Tensor<4>,
    v_cache: Tensor<4>,
    layout: &BlockLayout,
    rows: &DecodeRows,
    scale: Option<f64>,
) -> Result<Tensor<4>> {
    let options = AttentionOptions {
        scale,
        ..AttentionOptions::default()
    };
    sparse_attention_decode_with(q, k_cache, v_cache, layout, rows, options)
}

/// [`sparse_attention_decode`] with the score modifiers of `options` (its `scale`,
/// `softcap` and `alibi`): the rows of [`sparse_attention`](crate::sparse_attention) with
/// the same options.
///
/// # Errors
/// As [`sparse_attention_decode`], and [`Unsupported`](SparseAttentionError::Unsupported)
/// for dropout or key lengths (decoding runs without dropout; [`DecodeRows`] says which
/// cached tokens are valid), and a soft-cap or ALiBi slopes that
/// [`sparse_attention`](crate::sparse_attention) refuses.
pub fn sparse_attention_decode_with(
    q: Tensor<4>,
    k_cache: Tensor<4>,
    v_cache: Tensor<4>,
    layout: &BlockLayout,
    rows: &DecodeRows,
    options: AttentionOptions,
) -> Result<Tensor<4>> {
    let params = validate(&q, &k_cache, &v_cache, layout, rows, options)?;
    // The caches are the larger tensors: they decide the device's limits.
    check_device_limits(&k_cache, layout.block(), &params.mods)?;
    Ok(Tensor::from_dispatch(
        <Dispatch as SparseAttentionBackend>::sparse_attention_decode(
            q.into_dispatch(),
            k_cache.into_dispatch(),
            v_cache.into_dispatch(),
            layout.clone(),
            params,
        ),
    ))
}

/// [`sparse_attention_decode_with`] through the portable path (Burn tensor operations over
/// the gathered allowed keys of each row), to compare against and to debug a backend.
///
/// # Errors
/// As [`sparse_attention_decode_with`].
pub fn sparse_attention_decode_portable(
    q: Tensor<4>,
    k_cache: Tensor<4>,
    v_cache: Tensor<4>,
    layout: &BlockLayout,
    rows: &DecodeRows,
    options: AttentionOptions,
) -> Result<Tensor<4>> {
    let params = validate(&q, &k_cache, &v_cache, layout, rows, options)?;
    Ok(Tensor::from_dispatch(
        crate::backend::portable_decode::decode::<Dispatch>(
            q.into_dispatch(),
            k_cache.into_dispatch(),
            v_cache.into_dispatch(),
            layout,
            &params,
        ),
    ))
}

fn validate(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    layout: &BlockLayout,
    rows: &DecodeRows,
    options: AttentionOptions,
) -> Result<DecodeParams> {
    let dims = q.dims();
    let [batch, heads, queries, d] = dims;
    if let Some(name) = ["batch", "heads", "queries", "head_dim"]
        .iter()
        .zip(dims)
        .find_map(|(name, x)| (x == 0).then_some(*name))
    {
        return Err(SparseAttentionError::Zero { name });
    }
    let [_, kv_heads, capacity, _] = k.dims();
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(SparseAttentionError::KvHeads { heads, kv_heads });
    }
    let kv_dims = [batch, kv_heads, capacity, d];
    for (name, t) in [("k_cache", k), ("v_cache", v)] {
        if t.dims() != kv_dims || capacity == 0 {
            return Err(SparseAttentionError::Shape {
                name,
                got: t.dims().to_vec(),
                expected: format!(
                    "[{batch}, kv_heads, capacity, {d}] with capacity >= 1 and the same shape for both caches: `q` is {dims:?}"
                ),
            });
        }
        same_dtype_and_device(name, t, q)?;
    }
    check_layout(layout, capacity, heads)?;
    rows.check(batch, queries, capacity)?;
    if options.dropout.is_some() || options.key_lengths.is_some() {
        return Err(SparseAttentionError::Unsupported {
            what: "dropout or key lengths in decode attention",
            expected: "no dropout (decoding runs without it), and the valid cached tokens \
                       given by `DecodeRows`",
        });
    }
    let (mods, table) = crate::api::score_mods(&options, heads, q)?;
    // Decoding is not differentiable: the table's values travel with the parameters.
    let bias_table = table.map(|t| {
        let data = t.into_data().convert::<f64>();
        data.try_into_vec::<f64>()
            .expect("converted to f64 above")
            .into()
    });
    let scale = options.scale.unwrap_or(1.0 / (d as f64).sqrt());
    if !(scale.is_finite() && scale > 0.0) {
        return Err(SparseAttentionError::Scale(scale));
    }
    Ok(DecodeParams {
        scale,
        first: rows.first.as_slice().into(),
        valid: rows.valid.as_slice().into(),
        mods,
        bias_table,
    })
}
