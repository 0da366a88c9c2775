//! The key/value cache of one attention layer, for generation.
//!
//! A cache holds the projected keys and values of the tokens a layer has seen, `[batch,
//! kv_heads, capacity, head_dim]` in the layer's attention dtype, and how many tokens each
//! batch row holds. [`MultiHeadSparseAttention::forward_cached`] appends the new tokens' keys
//! and values and attends only the new rows (`sparse_attn_core::sparse_attention_decode`),
//! through the layout of the capacity, built once and shared: a decode step costs what its
//! layout row costs, not a forward over the whole text.
//!
//! A *window* cache ([`MultiHeadSparseAttention::new_window_cache`]) serves patterns that
//! read only a bounded past ([`StreamWindow`]: sliding windows, `local`, streaming with
//! sinks): it keeps the sinks and the last `reach - 1` tokens, and when a row runs out of
//! slots it moves those down behind the sinks and renumbers them. The pattern reads the same
//! in the renumbered slots (that is what a stream window promises), so the result is the
//! unbounded cache's, and a stream of any length decodes in `sinks + reach - 1 + room` slots.
//! A move copies `reach - 1` keys once per `room` tokens: at most what the decode steps of
//! those tokens read anyway.

use std::ops::Range;

use burn::tensor::{DType, Device, Tensor};
use sparse_attn_core::{DecodeRows, Result, SparseAttentionError, StreamWindow};

use crate::attention::MultiHeadSparseAttention;

/// Keys and values of the tokens one [`MultiHeadSparseAttention`] layer has seen.
///
/// # Invariants
/// `keys` and `values` are `[batch, kv_heads, capacity, head_dim]` of one dtype on one
/// device; `lengths` and `shifts` have `batch` entries. Row `b` has seen `lengths[b]`
/// tokens and holds `lengths[b] - shifts[b]` of them, at most `capacity`: slots `0 ..
/// sinks` hold tokens `0 .. sinks`, and slot `s >= sinks` holds token `s + shifts[b]`.
/// `shifts` are zero without a window; with one, a row holds every token a later query can
/// read.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Keys and values; `None` only while an append replaces them.
    kv: Option<(Tensor<4>, Tensor<4>)>,
    lengths: Vec<usize>,
    shifts: Vec<usize>,
    window: Option<StreamWindow>,
    heads: usize,
}

impl KvCache {
    /// An empty cache of `capacity` tokens per batch row for `layer`, in the layer's
    /// attention dtype (or `dtype`, the model's float dtype, when the layer has none).
    pub(crate) fn for_layer(
        layer: &MultiHeadSparseAttention,
        batch: usize,
        capacity: usize,
        window: Option<StreamWindow>,
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
            shifts: vec![0; batch],
            window,
            heads: layer.n_heads,
        })
    }

    /// The slots a window cache needs so that any call of up to `chunk` tokens fits: the
    /// sinks, the `reach - 1` tokens a new query may read, and room for at least `reach`
    /// new tokens (so that moves come at most once per `reach` tokens).
    pub(crate) fn window_capacity(window: StreamWindow, chunk: usize) -> usize {
        window
            .sinks
            .saturating_add(window.reach - 1)
            .saturating_add(chunk.max(window.reach))
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

    /// Slots of each batch row: the tokens it can hold (a window cache holds the last of
    /// the tokens it has seen).
    pub fn capacity(&self) -> usize {
        self.tensors().0.dims()[2]
    }

    /// Tokens each batch row has seen (the position of its next token).
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// The window this cache keeps, or `None` when it keeps every token.
    pub fn window(&self) -> Option<StreamWindow> {
        self.window
    }

    /// Bytes of the cached keys and values (what the cache holds on its device, whatever
    /// the number of tokens seen).
    pub fn memory_bytes(&self) -> usize {
        let (k, v) = self.tensors();
        [k, v]
            .iter()
            .map(|t| t.shape().num_elements() * t.dtype().size())
            .sum()
    }

    /// The cached keys, `[batch, kv_heads, capacity, head_dim]` (slot `s` of row `b` holds
    /// token `s` without a window, see [`KvCache`]'s invariants with one; slots past a row's
    /// tokens hold zeros or stale values).
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
        self.shifts.fill(0);
    }

    /// The shift of row `b` once it makes room for `new` tokens: a window cache whose row
    /// would overflow keeps its sinks and the last `reach - 1` tokens, behind the sinks.
    fn shift_for(&self, b: usize, new: usize) -> usize {
        let (len, shift) = (self.lengths[b], self.shifts[b]);
        match self.window {
            Some(StreamWindow { sinks, reach }) if len - shift + new > self.capacity() => {
                let keep = (reach - 1).min(len.saturating_sub(sinks));
                len - sinks.min(len) - keep
            }
            _ => shift,
        }
    }

    /// The rows of a call that adds `valid[b]` new tokens to batch row `b`, in slots: they
    /// start after the row's cached tokens (once a window cache has made room). A `valid`
    /// list of another length is left for [`DecodeRows::check`] to refuse.
    pub(crate) fn rows(&self, valid: &[usize]) -> DecodeRows {
        let first = (0..self.batch())
            .map(|b| {
                let new = valid.get(b).copied().unwrap_or(0);
                self.lengths[b] - self.shift_for(b, new)
            })
            .collect();
        DecodeRows {
            first,
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
    /// after each row's cached tokens (a window cache first makes room in the rows that need
    /// it) and advances the lengths. [`check`](Self::check) must have passed for `rows`.
    pub(crate) fn append(&mut self, k: Tensor<4>, v: Tensor<4>, rows: &DecodeRows) {
        let [batch, _, m, _] = k.dims();
        self.make_room(&rows.valid);
        let (first, valid) = (&rows.first, &rows.valid);
        let uniform = first.iter().all(|&f| f == first[0]) && valid.iter().all(|&x| x == m);
        let parts: Vec<RowCopy> = if uniform {
            vec![(0..batch, 0..m, first[0]..first[0] + m)]
        } else {
            (0..batch)
                .filter(|&b| valid[b] > 0)
                .map(|b| (b..b + 1, 0..valid[b], first[b]..first[b] + valid[b]))
                .collect()
        };
        self.write((k, v), &parts);
        for (len, &new) in self.lengths.iter_mut().zip(valid) {
            *len += new;
        }
    }

    /// Moves the kept tokens of every row that cannot take its `valid` new tokens down
    /// behind the sinks (one copy for all rows when they move alike).
    fn make_room(&mut self, valid: &[usize]) {
        let Some(StreamWindow { sinks, .. }) = self.window else {
            return;
        };
        // (row, its new shift) of every row that moves; the kept tokens are the last `keep`
        // the row holds (it holds `len - old shift`), and they go to slots `sinks ..`.
        let moves: Vec<(usize, usize)> = (0..self.batch())
            .map(|b| (b, self.shift_for(b, valid[b])))
            .filter(|&(b, shift)| shift != self.shifts[b])
            .collect();
        let kept = |b: usize, shift: usize| {
            let (len, held) = (self.lengths[b], self.lengths[b] - self.shifts[b]);
            let keep = len - sinks.min(len) - shift;
            (held - keep..held, sinks..sinks + keep)
        };
        let parts: Vec<RowCopy> = match moves.first() {
            None => return,
            Some(&(b0, s0))
                if moves.len() == self.batch()
                    && moves.iter().all(|&(b, s)| kept(b, s) == kept(b0, s0)) =>
            {
                let (from, to) = kept(b0, s0);
                vec![(0..self.batch(), from, to)]
            }
            Some(_) => moves
                .iter()
                .map(|&(b, s)| {
                    let (from, to) = kept(b, s);
                    (b..b + 1, from, to)
                })
                .collect(),
        };
        let cached = self.tensors().clone();
        self.write(cached, &parts);
        for (b, shift) in moves {
            self.shifts[b] = shift;
        }
    }

    /// Writes, for each `(rows, from, to)`, positions `from` of `src`'s keys and values
    /// (`[batch, kv_heads, _, d]`) into slots `to` of batch rows `rows`.
    fn write(&mut self, (src_k, src_v): (Tensor<4>, Tensor<4>), parts: &[RowCopy]) {
        let (mut keys, mut values) = self.kv.take().expect("a cache always holds its tensors");
        let [_, kv_heads, _, d] = keys.dims();
        for (rows, from, to) in parts {
            let src = [rows.clone(), 0..kv_heads, from.clone(), 0..d];
            let at = [rows.clone(), 0..kv_heads, to.clone(), 0..d];
            keys = keys.slice_assign(at.clone(), src_k.clone().slice(src.clone()));
            values = values.slice_assign(at, src_v.clone().slice(src));
        }
        self.kv = Some((keys, values));
    }
}

/// A copy into the cache: batch rows, source positions, destination slots.
type RowCopy = (Range<usize>, Range<usize>, Range<usize>);
