//! The key/value cache of one attention layer, for generation.
//!
//! A cache holds the projected keys and values of the tokens a layer has seen, `[batch,
//! kv_heads, capacity, head_dim]` in the layer's attention dtype, and how many tokens each
//! batch row holds. [`MultiHeadSparseAttention::forward_cached`] appends the new tokens' keys
//! and values and attends only the new rows (`sparse_attn_core::sparse_attention_decode`),
//! through the layout of the capacity, built once and shared: a decode step costs what its
//! layout row costs, not a forward over the whole text.

use burn::tensor::{DType, Device, Tensor};
use sparse_attn_core::{DecodeRows, Result, SparseAttentionError};

use crate::attention::MultiHeadSparseAttention;

/// Keys and values of the tokens one [`MultiHeadSparseAttention`] layer has seen.
///
/// # Invariants
/// `keys` and `values` are `[batch, kv_heads, capacity, head_dim]` of one dtype on one
/// device; `lengths` has `batch` entries, each at most `capacity`; positions `0 ..
/// lengths[b]` of row `b` hold the keys and values of its tokens `0 .. lengths[b]`.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Keys and values; `None` only while an append replaces them.
    kv: Option<(Tensor<4>, Tensor<4>)>,
    lengths: Vec<usize>,
    heads: usize,
}

impl KvCache {
    /// An empty cache of `capacity` tokens per batch row for `layer`, in the layer's
    /// attention dtype (or `dtype`, the model's float dtype, when the layer has none).
    pub(crate) fn for_layer(
        layer: &MultiHeadSparseAttention,
        batch: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        for (name, x) in [("batch", batch), ("capacity", capacity)] {
            if x == 0 {
                return Err(SparseAttentionError::Zero { name });
            }
        }
        if layer.max_seq_len > 0 && capacity > layer.max_seq_len {
            return Err(SparseAttentionError::SequenceTooLong {
                len: capacity,
                max: layer.max_seq_len,
            });
        }
        let dims = [batch, layer.n_kv_heads, capacity, layer.head_dim()];
        let dtype = layer.attention_dtype.map_or(dtype, DType::from);
        let zeros = || Tensor::<4>::zeros(dims, device).cast(dtype);
        Ok(Self {
            kv: Some((zeros(), zeros())),
            lengths: vec![0; batch],
            heads: layer.n_heads,
        })
    }

    fn tensors(&self) -> &(Tensor<4>, Tensor<4>) {
        self.kv
            .as_ref()
            .expect("a cache always holds its tensors between calls")
    }

    /// Batch rows.
    pub fn batch(&self) -> usize {
        self.lengths.len()
    }

    /// Tokens each batch row can hold.
    pub fn capacity(&self) -> usize {
        self.tensors().0.dims()[2]
    }

    /// Tokens each batch row holds.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// The cached keys, `[batch, kv_heads, capacity, head_dim]` (positions past a row's length
    /// hold zeros or stale values).
    pub fn keys(&self) -> &Tensor<4> {
        &self.tensors().0
    }

    /// The cached values, shaped as [`keys`](Self::keys).
    pub fn values(&self) -> &Tensor<4> {
        &self.tensors().1
    }

    /// Forgets every token (the memory stays allocated for the next sequence).
    pub fn clear(&mut self) {
        self.lengths.fill(0);
    }

    /// The rows of a call that adds `valid[b]` new tokens to batch row `b`: they start
    /// after the row's cached tokens.
    pub(crate) fn rows(&self, valid: &[usize]) -> DecodeRows {
        DecodeRows {
            first: self.lengths.clone(),
            valid: valid.to_vec(),
        }
    }

    /// Checks that this cache fits `layer`'s call with `k` `[batch, kv_heads, m, d]` and
    /// `rows` (from [`rows`](Self::rows)).
    pub(crate) fn check(
        &self,
        layer: &MultiHeadSparseAttention,
        k: &Tensor<4>,
        rows: &DecodeRows,
    ) -> Result<()> {
        let (cached, _) = self.tensors();
        let [batch, kv_heads, m, d] = k.dims();
        let cache = cached.dims();
        let mismatch = |what: &'static str, cache: String, layer: String| {
            Err(SparseAttentionError::CacheMismatch { what, cache, layer })
        };
        if self.heads != layer.n_heads || cache[1] != kv_heads || cache[3] != d {
            return mismatch(
                "heads (query / key-value / head dim)",
                format!("{} / {} / {}", self.heads, cache[1], cache[3]),
                format!("{} / {kv_heads} / {d}", layer.n_heads),
            );
        }
        if cache[0] != batch {
            return mismatch("batch", cache[0].to_string(), batch.to_string());
        }
        if cached.dtype() != k.dtype() {
            return mismatch(
                "dtype",
                format!("{:?}", cached.dtype()),
                format!("{:?}", k.dtype()),
            );
        }
        if cached.device() != k.device() {
            return mismatch(
                "device",
                format!("{:?}", cached.device()),
                format!("{:?}", k.device()),
            );
        }
        rows.check(batch, m, cache[2])
    }

    /// Writes the first `rows.valid[b]` rows of `k` and `v` (`[batch, kv_heads, m, d]`)
    /// after each row's cached tokens and advances the lengths. [`check`](Self::check) must
    /// have passed for `rows`.
    pub(crate) fn append(&mut self, k: Tensor<4>, v: Tensor<4>, rows: &DecodeRows) {
        let [batch, kv_heads, m, d] = k.dims();
        let (mut keys, mut values) = self.kv.take().expect("a cache always holds its tensors");
        let (first, valid) = (&rows.first, &rows.valid);
        let uniform = first.iter().all(|&f| f == first[0]) && valid.iter().all(|&x| x == m);
        if uniform {
            let at = [0..batch, 0..kv_heads, first[0]..first[0] + m, 0..d];
            keys = keys.slice_assign(at.clone(), k);
            values = values.slice_assign(at, v);
        } else {
            for (b, (&start, &new)) in first
                .iter()
                .zip(valid)
                .enumerate()
                .filter(|(_, (_, n))| **n > 0)
            {
                let src = [b..b + 1, 0..kv_heads, 0..new, 0..d];
                let at = [b..b + 1, 0..kv_heads, start..start + new, 0..d];
                keys = keys.slice_assign(at.clone(), k.clone().slice(src.clone()));
                values = values.slice_assign(at, v.clone().slice(src));
            }
        }
        self.kv = Some((keys, values));
        for (len, &new) in self.lengths.iter_mut().zip(valid) {
            *len += new;
        }
    }
}
