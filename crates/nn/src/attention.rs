//! Multi-head self-attention with a block-sparse pattern.
//!
//! Attention dropout, key padding by lengths and grouped-query attention run inside the
//! kernels (`sparse_attn_core::sparse_attention`'s options); the layer only chooses them.

use burn::config::Config;
use burn::module::{Initializer, Module, Param};
use burn::nn::attention::MultiHeadAttention;
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::tensor::{Bool, DType, Device, FloatDType, Tensor};
use sparse_attn_core::{
    AttentionOptions, RelativeBuckets, Result, SparseAttentionError, StreamWindow,
    sparse_attention, sparse_attention_decode_with,
};

use crate::dropout_seed::next_dropout_seed;
use crate::kv_cache::KvCache;
use crate::pattern_config::PatternConfig;

/// Configuration of a [`MultiHeadSparseAttention`] layer.
#[derive(Config, Debug)]
pub struct MultiHeadSparseAttentionConfig {
    /// Model width (input and output features).
    pub d_model: usize,
    /// Number of (query) heads; must divide `d_model`.
    pub n_heads: usize,
    /// Number of key/value heads, dividing `n_heads`: fewer than `n_heads` is grouped-query
    /// attention (1: multi-query), with key and value projections of `n_kv_heads * d_model /
    /// n_heads` features. `None` (default): `n_heads`, plain multi-head attention.
    #[config(default = "None")]
    pub n_kv_heads: Option<usize>,
    /// The sparsity pattern.
    pub pattern: PatternConfig,
    /// Block size of the layout, 1..=128. Default: 32.
    #[config(default = 32)]
    pub block_size: usize,
    /// Biases on the four projections. Default: true.
    #[config(default = true)]
    pub bias: bool,
    /// Dropout probability on the attention probabilities, applied inside the kernels (the
    /// backward pass regenerates the mask from its seed), active only on an autodiff device
    /// in training (Burn's `Dropout` rule; `valid()` turns it off). Each forward draws a fresh
    /// seed from its device's sequence (one per device, so that data-parallel replicas draw
    /// different masks; restarted by [`seed_attention_dropout`](crate::seed_attention_dropout)).
    /// Default: 0.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Softmax scale; `None` (default) means `1 / sqrt(d_model / n_heads)`.
    #[config(default = "None")]
    pub scale: Option<f64>,
    /// Longest sequence accepted by `forward`; `None` (default) means no limit.
    #[config(default = "None")]
    pub max_seq_len: Option<usize>,
    /// Dtype the attention itself runs in: `q`, `k` and `v` are cast to it and the output
    /// back to the input's dtype (Burn's autodiff carries the gradients through both casts).
    /// `Some(FloatDType::F16)` (or `BF16`) lets a model that trains in f32 use the GPU's
    /// tensor-core kernels, whose tile products take 16-bit operands (accumulating in f32);
    /// the projections, the softmax statistics and everything else keep their precision.
    /// `None` (default): the input's dtype.
    #[config(default = "None")]
    pub attention_dtype: Option<FloatDType>,
    /// Soft-capping of the scaled attention scores, `cap * tanh(s / cap)` (Gemma-style
    /// logit capping), inside the kernels, forward and backward. `None` (default): none.
    #[config(default = "None")]
    pub softcap: Option<f64>,
    /// ALiBi (Press et al.): every score of query token `i` and key token `j` in head `h`
    /// minus `slope_h * |i - j|`, with the standard geometric slopes of `n_heads` heads
    /// ([`sparse_attn_core::alibi_slopes`]), inside the kernels. Positions then reach the
    /// model through the scores, so a model can drop its position embedding. Default: false.
    #[config(default = false)]
    pub alibi: bool,
    /// A learnable relative-position bias (T5): a `[n_heads, buckets]` table, zeros at
    /// first, added to the scores by bucket of the token distance inside the kernels, and
    /// trained through their backward pass. `None` (default): none.
    #[config(default = "None")]
    pub relative_bias: Option<RelativeBiasConfig>,
    /// Initializer of the projections. Default: Kaiming uniform, as Burn's attention.
    #[config(default = "Initializer::KaimingUniform{gain:1.0/3.0f64.sqrt(), fan_out_only:false}")]
    pub initializer: Initializer,
}

/// The bucketing of a layer's learnable relative-position bias ([`RelativeBuckets`]).
#[derive(Config, Debug, PartialEq)]
pub struct RelativeBiasConfig {
    /// Buckets (T5: 32).
    #[config(default = 32)]
    pub buckets: usize,
    /// Distance from which every distance shares the last bucket (T5: 128).
    #[config(default = 128)]
    pub max_distance: usize,
    /// Whether keys after the query get buckets of their own (T5's encoder; for a
    /// bidirectional pattern). Default: false (causal).
    #[config(default = false)]
    pub bidirectional: bool,
}

impl RelativeBiasConfig {
    /// The bucketing.
    ///
    /// # Errors
    /// [`RelativeBuckets`](SparseAttentionError::RelativeBuckets) for a count or distance
    /// outside its invariants.
    pub fn buckets(&self) -> Result<RelativeBuckets> {
        RelativeBuckets::new(self.buckets, self.max_distance, self.bidirectional)
            .map_err(SparseAttentionError::RelativeBuckets)
    }
}

/// Multi-head self-attention whose attention is block-sparse.
///
/// `query` and `output` are `d_model x d_model` projections, `key` and `value` `d_model x
/// n_kv_heads * head_dim`; the attention itself runs through [`sparse_attention`] with the
/// layout of the configured pattern, built once per sequence length.
#[derive(Module, Debug)]
pub struct MultiHeadSparseAttention {
    /// Query projection.
    pub query: Linear,
    /// Key projection.
    pub key: Linear,
    /// Value projection.
    pub value: Linear,
    /// Output projection.
    pub output: Linear,
    /// Attention dropout: its probability and training flag (applied inside the kernels).
    pub dropout: Dropout,
    /// Number of heads.
    pub n_heads: usize,
    /// Number of key/value heads.
    pub n_kv_heads: usize,
    /// Layout block size.
    pub block_size: usize,
    /// Longest accepted sequence (0 = unlimited).
    pub max_seq_len: usize,
    /// The pattern (not a parameter).
    #[module(skip)]
    pub pattern: PatternConfig,
    /// Softmax scale (not a parameter; `None` = `1 / sqrt(head_dim)`).
    #[module(skip)]
    pub scale: Option<f64>,
    /// Dtype of the attention itself (not a parameter; `None` = the input's).
    #[module(skip)]
    pub attention_dtype: Option<FloatDType>,
    /// Soft-capping bound of the scores (not a parameter; `None` = none).
    #[module(skip)]
    pub softcap: Option<f64>,
    /// ALiBi at the standard slopes (not a parameter).
    #[module(skip)]
    pub alibi: bool,
    /// The learnable relative-position bias table `[n_heads, buckets]`, if any.
    pub relative_bias: Option<Param<Tensor<2>>>,
    /// The bucketing of the relative-position bias (not a parameter).
    #[module(skip)]
    pub relative_buckets: Option<RelativeBuckets>,
}

impl MultiHeadSparseAttentionConfig {
    /// Builds the layer on `device`.
    ///
    /// # Errors
    /// `d_model` zero, `n_heads` zero or not dividing `d_model`, `n_kv_heads` zero or not
    /// dividing `n_heads`, a block size outside `1..=128`, a dropout outside `[0, 1)`, an
    /// `attention_dtype` the device lacks, a soft-cap that is not finite and positive, or pattern parameters that are invalid for every
    /// sequence length.
    pub fn init(&self, device: &Device) -> Result<MultiHeadSparseAttention> {
        if self.d_model == 0 {
            return Err(SparseAttentionError::Zero { name: "d_model" });
        }
        if self.n_heads == 0 {
            return Err(SparseAttentionError::Zero { name: "n_heads" });
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(SparseAttentionError::HeadsDivide {
                n_embd: self.d_model,
                heads: self.n_heads,
            });
        }
        let kv_heads = self.n_kv_heads.unwrap_or(self.n_heads);
        if kv_heads == 0 || !self.n_heads.is_multiple_of(kv_heads) {
            return Err(SparseAttentionError::KvHeads {
                heads: self.n_heads,
                kv_heads,
            });
        }
        if !(sparse_attn_core::MIN_BLOCK..=sparse_attn_core::MAX_BLOCK).contains(&self.block_size) {
            return Err(SparseAttentionError::BlockSize {
                got: self.block_size,
                min: sparse_attn_core::MIN_BLOCK,
                max: sparse_attn_core::MAX_BLOCK,
            });
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(SparseAttentionError::Probability {
                name: "dropout",
                got: self.dropout,
            });
        }
        if let Some(dtype) = self.attention_dtype {
            check_attention_dtype(dtype, device)?;
        }
        if let Some(cap) = self.softcap
            && !(cap.is_finite() && cap > 0.0)
        {
            return Err(SparseAttentionError::SoftCap(cap));
        }
        let relative_buckets = self
            .relative_bias
            .as_ref()
            .map(RelativeBiasConfig::buckets)
            .transpose()?;
        // Fail early on parameters that no sequence length can fix.
        self.pattern
            .build(self.block_size.max(1), self.block_size)?;
        let kv_width = kv_heads * (self.d_model / self.n_heads);
        let linear = |width| {
            LinearConfig::new(self.d_model, width)
                .with_bias(self.bias)
                .with_initializer(self.initializer.clone())
                .init(device)
        };
        Ok(MultiHeadSparseAttention {
            query: linear(self.d_model),
            key: linear(kv_width),
            value: linear(kv_width),
            output: linear(self.d_model),
            dropout: DropoutConfig::new(self.dropout).init(),
            n_heads: self.n_heads,
            n_kv_heads: kv_heads,
            block_size: self.block_size,
            max_seq_len: self.max_seq_len.unwrap_or(0),
            pattern: self.pattern.clone(),
            scale: self.scale,
            attention_dtype: self.attention_dtype,
            softcap: self.softcap,
            alibi: self.alibi,
            relative_bias: relative_buckets.as_ref().map(|buckets| {
                Param::from_tensor(Tensor::zeros([self.n_heads, buckets.count()], device))
            }),
            relative_buckets,
        })
    }
}

/// An attention dtype that `device`'s tensors cannot hold is a typed error (the cast would
/// panic inside the backend).
fn check_attention_dtype(dtype: FloatDType, device: &Device) -> Result<()> {
    if device.supports_dtype(dtype) {
        Ok(())
    } else {
        Err(SparseAttentionError::DType {
            got: format!("{dtype:?} (attention_dtype)"),
            expected: "an attention dtype the device's tensors support",
        })
    }
}

/// Logit added to padded keys: `exp(-PAD_LOGIT)` is zero in `f32`.
const PAD_LOGIT: f64 = 1.0e4;

/// Largest padding bias on a key's extra feature: finite in f16 (whose largest value is
/// 65504), and with any softmax scale of a head dim up to 4096 still a logit below -900.
const PAD_BIAS_MAX: f64 = 6.0e4;

impl MultiHeadSparseAttention {
    /// A sparse layer carrying the projections of Burn's dense `MultiHeadAttention`, for
    /// example to run a trained dense model with a sparse pattern. Everything but the
    /// weights comes from `config`.
    ///
    /// # Errors
    /// As [`MultiHeadSparseAttentionConfig::init`]; `config`'s width or head count differ
    /// from `dense`'s, or `config` asks for fewer key/value heads (a dense layer has one
    /// per query head).
    pub fn from_dense(
        dense: MultiHeadAttention,
        config: &MultiHeadSparseAttentionConfig,
    ) -> Result<Self> {
        for (what, config, module) in [
            ("d_model", config.d_model, dense.d_model),
            ("n_heads", config.n_heads, dense.n_heads),
            (
                "n_kv_heads",
                config.n_kv_heads.unwrap_or(config.n_heads),
                dense.n_heads,
            ),
        ] {
            if config != module {
                return Err(SparseAttentionError::ConfigMismatch {
                    what,
                    config,
                    module,
                });
            }
        }
        let device = dense.query.weight.device();
        Ok(Self {
            query: dense.query,
            key: dense.key,
            value: dense.value,
            output: dense.output,
            ..config.init(&device)?
        })
    }

    /// Self-attention of `x`.
    ///
    /// # Shapes
    /// `x`: `[batch, n, d_model]` -> `[batch, n, d_model]`.
    ///
    /// # Errors
    /// An empty batch or sequence, a sequence longer than `max_seq_len`, a width other than
    /// `d_model`, or a pattern that does not fit this sequence length.
    ///
    /// # Example
    /// ```
    /// use burn::tensor::{Device, Distribution, Tensor};
    /// use sparse_attn_nn::{MultiHeadSparseAttentionConfig, PatternConfig};
    ///
    /// let device = Device::ndarray();
    /// let layer = MultiHeadSparseAttentionConfig::new(32, 4, PatternConfig::Local { ctx: 16 })
    ///     .with_block_size(16)
    ///     .init(&device)?;
    /// let x = Tensor::<3>::random([2, 50, 32], Distribution::Normal(0.0, 1.0), &device);
    /// assert_eq!(layer.forward(x)?.dims(), [2, 50, 32]);
    /// # Ok::<(), sparse_attn_core::SparseAttentionError>(())
    /// ```
    pub fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>> {
        self.attend(x, Padding::None)
    }

    /// Self-attention of right-padded sequences: sequence `b` holds `lengths[b]` tokens,
    /// the rest of its `n` is padding, handled inside the kernels (no mask tensor at all):
    /// padded tokens are never attended to, their output rows get no attention (only the
    /// output projection's bias) and no gradient flows through them.
    ///
    /// # Shapes
    /// `x`: `[batch, n, d_model]`, `lengths`: `batch` values `<= n` -> `[batch, n, d_model]`.
    ///
    /// # Errors
    /// As [`forward`](Self::forward), and lengths that are not one per sequence or exceed
    /// `n`.
    ///
    /// # Example
    /// ```
    /// use burn::tensor::{Device, Distribution, Tensor};
    /// use sparse_attn_nn::{MultiHeadSparseAttentionConfig, PatternConfig};
    ///
    /// let device = Device::ndarray();
    /// let layer = MultiHeadSparseAttentionConfig::new(32, 4, PatternConfig::Local { ctx: 16 })
    ///     .with_n_kv_heads(Some(2))
    ///     .with_dropout(0.1)
    ///     .init(&device)?;
    /// let x = Tensor::<3>::random([2, 50, 32], Distribution::Normal(0.0, 1.0), &device);
    /// assert_eq!(layer.forward_lengths(x, &[50, 31])?.dims(), [2, 50, 32]);
    /// # Ok::<(), sparse_attn_core::SparseAttentionError>(())
    /// ```
    pub fn forward_lengths(&self, x: Tensor<3>, lengths: &[usize]) -> Result<Tensor<3>> {
        self.attend(x, Padding::Lengths(lengths))
    }

    /// Self-attention of `x` whose keys marked in `key_padding_mask` are ignored.
    ///
    /// `key_padding_mask[b, j] == true` marks token `j` of sequence `b` as padding (Burn's
    /// `mask_pad` convention): no query attends to it, and its own output row is zero. A
    /// right-padded batch gives, on its valid rows, what each sequence gives unpadded
    /// (for patterns whose allowed keys of a valid query do not depend on `n`).
    ///
    /// Any mask works (not only right padding); for right padding,
    /// [`forward_lengths`](Self::forward_lengths) is cheaper (padding in the kernels). The
    /// mask is applied without an `n x n` tensor: queries gain a column of ones and keys a
    /// column holding `-1e4 / scale` (at most `6e4`, finite in f16) on padded tokens, so the
    /// padded scores are far below the others and their softmax weight is exactly zero in
    /// `f32`.
    ///
    /// # Shapes
    /// `x`: `[batch, n, d_model]`, `key_padding_mask`: `[batch, n]` -> `[batch, n, d_model]`.
    ///
    /// # Errors
    /// As [`forward`](Self::forward), and a mask of another shape.
    pub fn forward_padded(
        &self,
        x: Tensor<3>,
        key_padding_mask: Option<Tensor<2, Bool>>,
    ) -> Result<Tensor<3>> {
        match key_padding_mask {
            None => self.attend(x, Padding::None),
            Some(mask) => self.attend(x, Padding::Mask(Box::new(mask))),
        }
    }

    /// The attention options of one forward of an input on `device` whose attention runs
    /// in `dtype`: scale, score modifiers, and dropout when training.
    fn options(&self, scale: f64, device: &Device, dtype: DType) -> AttentionOptions {
        let options = self.score_options(scale, dtype);
        let p = self.dropout.prob;
        if p > 0.0 && self.dropout.training.is_enabled() && device.is_autodiff() {
            options.dropout(p, next_dropout_seed(device))
        } else {
            options
        }
    }

    /// The options every call of the layer shares: scale and score modifiers (the bias
    /// table in the attention's `dtype`).
    fn score_options(&self, scale: f64, dtype: DType) -> AttentionOptions {
        let mut options = AttentionOptions::with_scale(scale);
        options.softcap = self.softcap;
        if self.alibi {
            options = options.alibi();
        }
        if let (Some(table), Some(buckets)) = (&self.relative_bias, &self.relative_buckets) {
            let table = table.val();
            let table = if table.dtype() == dtype {
                table
            } else {
                table.cast(FloatDType::from(dtype))
            };
            options = options.relative_bias(table, buckets.clone());
        }
        options
    }

    /// Head dimension (`d_model / n_heads`).
    pub fn head_dim(&self) -> usize {
        self.query.weight.dims()[0] / self.n_heads
    }

    /// An empty key/value cache for [`forward_cached`](Self::forward_cached): `batch`
    /// sequences of up to `capacity` tokens, on `device`, in the layer's attention dtype (or
    /// the projections' dtype).
    ///
    /// # Errors
    /// `batch` or `capacity` zero, or `capacity` above `max_seq_len`.
    pub fn new_cache(&self, batch: usize, capacity: usize, device: &Device) -> Result<KvCache> {
        let dtype = self.query.weight.val().dtype();
        KvCache::for_layer(self, batch, capacity, None, dtype, device)
    }

    /// The stream window of this layer's pattern ([`StreamWindow`]: sinks and reach), or
    /// `None` when its queries may read the whole past (or it regroups tokens).
    ///
    /// # Errors
    /// Pattern parameters that do not fit a sequence of `seq_len` tokens.
    pub fn stream_window(&self, seq_len: usize) -> Result<Option<StreamWindow>> {
        Ok(self
            .pattern
            .build(seq_len, self.block_size)?
            .stream_window())
    }

    /// A key/value cache of bounded memory for a window pattern: it keeps only the tokens a
    /// later query can read (the pattern's sinks and its last `reach - 1` tokens), so a
    /// stream of any length decodes through [`forward_cached`](Self::forward_cached) in
    /// `sinks + reach - 1 + max(chunk, reach)` slots per batch row, with the same result
    /// as an unbounded cache. `chunk` is the most tokens one call adds (the prefill chunk).
    ///
    /// # Errors
    /// `batch` or `chunk` zero; a pattern without a stream window
    /// ([`Unsupported`](SparseAttentionError::Unsupported): use [`new_cache`](Self::new_cache));
    /// slots above `max_seq_len`.
    ///
    /// # Example
    /// ```
    /// use burn::tensor::{Device, Distribution, Tensor};
    /// use sparse_attn_nn::{MultiHeadSparseAttentionConfig, PatternConfig};
    ///
    /// let device = Device::ndarray();
    /// let pattern = PatternConfig::Streaming { sinks: 4, window: 16 };
    /// let layer = MultiHeadSparseAttentionConfig::new(32, 4, pattern).with_block_size(16).init(&device)?;
    /// let mut cache = layer.new_window_cache(1, 1, &device)?;
    /// for _ in 0..200 {
    ///     let x = Tensor::<3>::random([1, 1, 32], Distribution::Normal(0.0, 1.0), &device);
    ///     layer.forward_cached(x, &mut cache)?;
    /// }
    /// assert_eq!(cache.lengths(), &[200]);
    /// assert_eq!(cache.capacity(), 4 + 15 + 16);
    /// # Ok::<(), sparse_attn_core::SparseAttentionError>(())
    /// ```
    pub fn new_window_cache(&self, batch: usize, chunk: usize, device: &Device) -> Result<KvCache> {
        let (window, capacity) = self.window_slots(chunk)?;
        let dtype = self.query.weight.val().dtype();
        KvCache::for_layer(self, batch, capacity, Some(window), dtype, device)
    }

    /// The stream window of a window cache for calls of up to `chunk` tokens and its slots
    /// per batch row: [`new_window_cache`](Self::new_window_cache) without the allocation.
    pub(crate) fn window_slots(&self, chunk: usize) -> Result<(StreamWindow, usize)> {
        if chunk == 0 {
            return Err(SparseAttentionError::Zero { name: "chunk" });
        }
        // Stream windows do not depend on the length asked about: ask at one block.
        let window = self
            .stream_window(self.block_size)?
            .ok_or(SparseAttentionError::Unsupported {
                what: "a window cache for a pattern whose queries may read the whole past or that regroups tokens",
                expected: "a causal window pattern (local, sliding window, dilated, streaming, or a combination of them), or `new_cache` with a capacity",
            })?;
        if (self.alibi || self.relative_bias.is_some()) && window.sinks > 0 {
            return Err(SparseAttentionError::Unsupported {
                what: "a window cache with ALiBi or a relative-position bias for a pattern with attention sinks (a sink's distance to the newest token grows without bound, a window cache's slots do not)",
                expected: "`new_cache` with a capacity, or a window pattern without sinks",
            });
        }
        let capacity = KvCache::window_capacity(window, chunk);
        if self.stream_window(capacity)? != Some(window) {
            return Err(SparseAttentionError::Unsupported {
                what: "a window cache for a pattern whose window depends on the sequence length",
                expected: "a pattern with the same stream window at every length, or `new_cache` with a capacity",
            });
        }
        Ok((window, capacity))
    }

    /// Self-attention of new tokens `x` that follow the tokens in `cache`: their keys and
    /// values are appended to the cache, and each new token attends the cached tokens its
    /// pattern allows (its own and the earlier new ones included), through the layout of
    /// the cache's capacity. For a causal pattern the result equals, to rounding,
    /// [`forward`](Self::forward) over the whole text at these positions; one token at a time
    /// is decoding, a chunk is chunked prefill. Inference only (no gradient through the
    /// cache; dropout off).
    ///
    /// # Shapes
    /// `x`: `[batch, m, d_model]` -> `[batch, m, d_model]`.
    ///
    /// # Errors
    /// As [`forward`](Self::forward); a cache of another layer, batch, dtype or device
    /// ([`CacheMismatch`](SparseAttentionError::CacheMismatch)); more tokens than the cache
    /// has room for ([`CacheFull`](SparseAttentionError::CacheFull)).
    ///
    /// # Example
    /// ```
    /// use burn::tensor::{Device, Distribution, Tensor};
    /// use sparse_attn_nn::{MultiHeadSparseAttentionConfig, PatternConfig};
    ///
    /// let device = Device::ndarray();
    /// let layer = MultiHeadSparseAttentionConfig::new(32, 4, PatternConfig::Local { ctx: 16 })
    ///     .with_block_size(16)
    ///     .init(&device)?;
    /// let x = Tensor::<3>::random([1, 40, 32], Distribution::Normal(0.0, 1.0), &device);
    /// let full = layer.forward(x.clone())?;
    /// // A 30-token prefill, then the last ten tokens one at a time.
    /// let mut cache = layer.new_cache(1, 64, &device)?;
    /// let mut parts = vec![layer.forward_cached(x.clone().slice([0..1, 0..30, 0..32]), &mut cache)?];
    /// for t in 30..40 {
    ///     parts.push(layer.forward_cached(x.clone().slice([0..1, t..t + 1, 0..32]), &mut cache)?);
    /// }
    /// let cached = Tensor::cat(parts, 1);
    /// let diff = (cached - full).abs().max().into_scalar::<f32>();
    /// assert!(diff < 1e-4, "{diff}");
    /// assert_eq!(cache.lengths(), &[40]);
    /// # Ok::<(), sparse_attn_core::SparseAttentionError>(())
    /// ```
    pub fn forward_cached(&self, x: Tensor<3>, cache: &mut KvCache) -> Result<Tensor<3>> {
        let [batch, m, _] = x.dims();
        self.forward_cached_lengths(x, &vec![m; batch], cache)
    }

    /// [`forward_cached`](Self::forward_cached) for batch rows that add different numbers of
    /// tokens: row `b` adds the first `valid[b]` rows of its `x` (the rest is padding and
    /// gets no attention, only the output projection's bias), so sequences of different
    /// lengths decode in one batch.
    ///
    /// # Errors
    /// As [`forward_cached`](Self::forward_cached), and `valid` not one per batch row or
    /// above `m`.
    pub fn forward_cached_lengths(
        &self,
        x: Tensor<3>,
        valid: &[usize],
        cache: &mut KvCache,
    ) -> Result<Tensor<3>> {
        let [batch, m, _] = x.dims();
        self.check_input(&x)?;
        let (q, k, v) = self.split_heads(x.clone());
        let rows = cache.rows(valid);
        cache.check(self, &k, &rows)?;
        let capacity = cache.capacity();
        let layout = self
            .pattern
            .layout(capacity, self.block_size, self.n_heads)?;
        cache.append(k, v, &rows);
        let options = self.score_options(self.softmax_scale(), q.dtype());
        let attended = sparse_attention_decode_with(
            q,
            cache.keys().clone(),
            cache.values().clone(),
            &layout,
            &rows,
            options,
        )?;
        Ok(self.merge_heads(attended, x.dtype(), batch, m))
    }

    /// The softmax scale: the configured one or `1 / sqrt(head_dim)`.
    fn softmax_scale(&self) -> f64 {
        self.scale.unwrap_or(1.0 / (self.head_dim() as f64).sqrt())
    }

    /// Refuses inputs that Burn's layers would panic on or that do not fit the layer.
    fn check_input(&self, x: &Tensor<3>) -> Result<()> {
        let [batch, n, width] = x.dims();
        // Burn's linear layers panic on empty inputs: refuse them before the projections.
        if let Some(name) = [("batch", batch), ("seq_len", n)]
            .into_iter()
            .find_map(|(name, x)| (x == 0).then_some(name))
        {
            return Err(SparseAttentionError::Zero { name });
        }
        if let Some(dtype) = self.attention_dtype {
            check_attention_dtype(dtype, &x.device())?;
        }
        let d_model = self.query.weight.dims()[0];
        if width != d_model {
            return Err(SparseAttentionError::Shape {
                name: "x",
                got: vec![batch, n, width],
                expected: format!("[batch, n, {d_model}]"),
            });
        }
        Ok(())
    }

    /// `q`, `k`, `v` of `x` (`[batch, n, d_model]`) as `[batch, heads, n, head_dim]` in the
    /// attention dtype.
    fn split_heads(&self, x: Tensor<3>) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let [batch, n, _] = x.dims();
        let d = self.head_dim();
        let compute = |t: Tensor<4>| match self.attention_dtype {
            Some(dtype) => t.cast(dtype),
            None => t,
        };
        let split = |t: Tensor<3>, h: usize| compute(t.reshape([batch, n, h, d]).swap_dims(1, 2));
        (
            split(self.query.forward(x.clone()), self.n_heads),
            split(self.key.forward(x.clone()), self.n_kv_heads),
            split(self.value.forward(x), self.n_kv_heads),
        )
    }

    /// The attention output `[batch, heads, n, head_dim]` back in `dtype`, heads merged and
    /// projected: `[batch, n, d_model]`.
    fn merge_heads(&self, attended: Tensor<4>, dtype: DType, batch: usize, n: usize) -> Tensor<3> {
        let attended = match self.attention_dtype {
            Some(_) => attended.cast(FloatDType::from(dtype)),
            None => attended,
        };
        let d_model = self.query.weight.dims()[0];
        let merged = attended.swap_dims(1, 2).reshape([batch, n, d_model]);
        self.output.forward(merged)
    }

    fn attend(&self, x: Tensor<3>, padding: Padding<'_>) -> Result<Tensor<3>> {
        let [batch, n, _] = x.dims();
        self.check_input(&x)?;
        if let Padding::Mask(mask) = &padding
            && mask.dims() != [batch, n]
        {
            return Err(SparseAttentionError::Shape {
                name: "key_padding_mask",
                got: mask.dims().to_vec(),
                expected: format!("[{batch}, {n}], the batch and length of `x`"),
            });
        }
        if self.max_seq_len > 0 && n > self.max_seq_len {
            return Err(SparseAttentionError::SequenceTooLong {
                len: n,
                max: self.max_seq_len,
            });
        }
        let layout = self.pattern.layout(n, self.block_size, self.n_heads)?;
        let (heads, kv_heads) = (self.n_heads, self.n_kv_heads);
        let d = self.head_dim();
        let scale = self.softmax_scale();
        let input_dtype = x.dtype();
        let (q, k, v) = self.split_heads(x.clone());
        let options = self.options(scale, &x.device(), q.dtype());
        let attended = match padding {
            Padding::None => sparse_attention(q, k, v, &layout, options)?,
            Padding::Lengths(lengths) => {
                sparse_attention(q, k, v, &layout, options.key_lengths(lengths))?
            }
            Padding::Mask(mask) => {
                let (device, dtype) = (q.device(), FloatDType::from(q.dtype()));
                let pad = mask.float().reshape([batch, 1, n, 1]).cast(dtype);
                let column = |h| [batch, h, n, 1];
                let ones = Tensor::<4>::ones(column(heads), &device).cast(dtype);
                // The bias must stay finite in a 16-bit attention dtype.
                let key_bias = pad
                    .clone()
                    .mul_scalar(-(PAD_LOGIT / scale).min(PAD_BIAS_MAX))
                    .expand(column(kv_heads));
                let q = Tensor::cat(vec![q, ones], 3);
                let k = Tensor::cat(vec![k, key_bias], 3);
                let zeros = Tensor::<4>::zeros(column(kv_heads), &device).cast(dtype);
                let v = Tensor::cat(vec![v, zeros], 3);
                let out = sparse_attention(q, k, v, &layout, options)?;
                let keep = pad.neg().add_scalar(1.0);
                out.slice([0..batch, 0..heads, 0..n, 0..d]) * keep
            }
        };
        Ok(self.merge_heads(attended, input_dtype, batch, n))
    }
}

/// How a forward marks padding.
enum Padding<'a> {
    None,
    /// Valid tokens per sequence (right padding), handled by the kernels.
    Lengths(&'a [usize]),
    /// A `[batch, n]` mask (true = padding), any layout of padded tokens.
    Mask(Box<Tensor<2, Bool>>),
}

#[cfg(test)]
pub(crate) mod tests {
    // burn-ndarray is deprecated upstream (0.22) but is our default backend.
    #![allow(deprecated)]

    use burn::store::ModuleRecord;
    use burn::tensor::{Distribution, TensorData};
    use sparse_attn_core::Pattern;
    use sparse_attn_core::reference::{RefOptions, RefShape, reference_forward_with};

    use super::*;

    fn layer(pattern: PatternConfig, device: &Device) -> MultiHeadSparseAttention {
        MultiHeadSparseAttentionConfig::new(16, 4, pattern)
            .with_block_size(4)
            .init(device)
            .unwrap()
    }

    pub(crate) fn host(t: Tensor<3>) -> Vec<f64> {
        t.into_data()
            .try_to_vec::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    }

    /// `[B, n, H*d]` <-> `[B, H, n, d]` on host buffers.
    fn split(x: &[f64], batch: usize, n: usize, heads: usize, d: usize, back: bool) -> Vec<f64> {
        let mut out = vec![0.0; x.len()];
        for b in 0..batch {
            for i in 0..n {
                for h in 0..heads {
                    for t in 0..d {
                        let flat = ((b * n + i) * heads + h) * d + t;
                        let split = ((b * heads + h) * n + i) * d + t;
                        if back {
                            out[flat] = x[split]
                        } else {
                            out[split] = x[flat]
                        }
                    }
                }
            }
        }
        out
    }

    /// The layer's output for `x` from its own projections and the f64 reference attention
    /// of `pattern` (with valid key lengths when given, and the layer's score modifiers).
    pub(crate) fn reference_output(
        layer: &MultiHeadSparseAttention,
        x: Tensor<3>,
        pattern: &dyn Pattern,
        key_lengths: Option<Vec<usize>>,
        scale: f64,
    ) -> Vec<f64> {
        let [batch, n, d_model] = x.dims();
        let (heads, kv_heads) = (layer.n_heads, layer.n_kv_heads);
        let d = d_model / heads;
        let device = x.device();
        let project = |l: &Linear, h| split(&host(l.forward(x.clone())), batch, n, h, d, false);
        let (q, k, v) = (
            project(&layer.query, heads),
            project(&layer.key, kv_heads),
            project(&layer.value, kv_heads),
        );
        let shape = RefShape {
            batch,
            heads,
            seq_len: n,
            head_dim: d,
        };
        let options = RefOptions {
            kv_heads: Some(kv_heads),
            key_lengths,
            softcap: layer.softcap,
            alibi: layer.alibi.then(|| sparse_attn_core::alibi_slopes(heads)),
            relative: layer
                .relative_buckets
                .clone()
                .zip(layer.relative_bias.as_ref().map(|table| {
                    let data = table.val().into_data().convert::<f64>();
                    data.try_into_vec::<f64>().unwrap()
                })),
            ..RefOptions::default()
        };
        let attended = reference_forward_with(pattern, shape, &options, &q, &k, &v, scale);
        let merged: Vec<f32> = split(&attended.out, batch, n, heads, d, true)
            .iter()
            .map(|&x| x as f32)
            .collect();
        host(layer.output.forward(Tensor::from_data(
            TensorData::new(merged, [batch, n, d_model]),
            &device,
        )))
    }

    /// The relative-position bias table is a parameter: it gets a gradient through the
    /// kernels' backward pass, and a record saves and loads it.
    #[test]
    fn the_relative_bias_table_is_trained() {
        let device = Device::ndarray().autodiff();
        let layer = MultiHeadSparseAttentionConfig::new(16, 4, PatternConfig::Local { ctx: 8 })
            .with_block_size(4)
            .with_relative_bias(Some(RelativeBiasConfig::new()))
            .init(&device)
            .unwrap();
        let x = Tensor::<3>::random([2, 19, 16], Distribution::Normal(0.0, 1.0), &device);
        let loss = (layer.forward(x).unwrap().powi_scalar(2)).sum();
        let grads = loss.backward();
        let table = layer.relative_bias.as_ref().unwrap();
        let grad = table.val().grad(&grads).unwrap();
        assert_eq!(grad.dims(), [4, 32]);
        let norm = grad.abs().sum().into_scalar::<f32>();
        assert!(norm > 0.0, "no gradient reached the bias table");
        assert_eq!(
            layer.num_params(),
            layer_without_bias_params(&device) + 4 * 32
        );
    }

    fn layer_without_bias_params(device: &Device) -> usize {
        MultiHeadSparseAttentionConfig::new(16, 4, PatternConfig::Local { ctx: 8 })
            .with_block_size(4)
            .init(device)
            .unwrap()
            .num_params()
    }

    #[test]
    fn matches_dense_masked_attention_from_the_same_weights() {
        let device = Device::ndarray();
        let pattern = PatternConfig::Fixed {
            local_ctx: 8,
            num_verts: 2,
            vertsize: 1,
        };
        // Plain multi-head, grouped-query and multi-query attention; soft-capping, ALiBi and a
        // relative-position bias.
        for (kv_heads, modified) in [(4, false), (2, false), (1, false), (2, true)] {
            let relative = RelativeBiasConfig::new()
                .with_buckets(8)
                .with_max_distance(12);
            let mut layer = MultiHeadSparseAttentionConfig::new(16, 4, pattern.clone())
                .with_block_size(4)
                .with_n_kv_heads(Some(kv_heads))
                .with_softcap(modified.then_some(0.5))
                .with_alibi(modified)
                .with_relative_bias(modified.then_some(relative))
                .init(&device)
                .unwrap();
            if modified {
                // A table that is not the zeros of a fresh layer.
                let table = Tensor::<2>::random([4, 8], Distribution::Normal(0.0, 1.0), &device);
                layer.relative_bias = Some(Param::from_tensor(table));
            }
            let (batch, n) = (2, 19);
            let x = Tensor::<3>::random([batch, n, 16], Distribution::Normal(0.0, 1.0), &device);
            let got = host(layer.forward(x.clone()).unwrap());
            let pattern = pattern.build(n, 4).unwrap();
            let want = reference_output(&layer, x, pattern.as_ref(), None, 0.5);
            let worst = worst(&got, &want);
            assert!(
                worst < 1e-5,
                "kv heads {kv_heads} modified {modified}: layer differs from the dense masked reference by {worst}"
            );
        }
    }

    /// The attention dtype casts `q`, `k`, `v` in and the output back, gradients included:
    /// an f32 model whose attention runs in f64 (the CPU kernels' other precision) gives the
    /// f32 layer's output and gradients, and the output comes back in f32. Key padding by
    /// mask (extra features in the attention dtype) works the same.
    #[test]
    fn attention_dtype_casts_in_and_out() {
        let device = Device::ndarray().autodiff();
        let plain = layer(PatternConfig::Local { ctx: 6 }, &device);
        let cast = MultiHeadSparseAttention {
            attention_dtype: Some(FloatDType::F64),
            ..plain.clone()
        };
        let x = Tensor::<3>::random([2, 11, 16], Distribution::Normal(0.0, 1.0), &device);
        let mask = Tensor::<2, Bool>::from_data(
            TensorData::new((0..22).map(|i| i % 11 > 8).collect::<Vec<_>>(), [2, 11]),
            &device,
        );
        for masked in [false, true] {
            let run = |l: &MultiHeadSparseAttention| {
                let out = if masked {
                    l.forward_padded(x.clone(), Some(mask.clone())).unwrap()
                } else {
                    l.forward(x.clone()).unwrap()
                };
                assert_eq!(out.dtype(), burn::tensor::DType::F32);
                let grads = out.clone().sum().backward();
                let dw = l.query.weight.val().grad(&grads).unwrap();
                (host(out), dw.into_data().try_to_vec::<f32>().unwrap())
            };
            let ((a, da), (b, db)) = (run(&plain), run(&cast));
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-5, "masked={masked}: out {x} vs {y}");
            }
            for (x, y) in da.iter().zip(&db) {
                assert!((x - y).abs() < 1e-4, "masked={masked}: dW {x} vs {y}");
            }
        }
    }

    #[test]
    fn attention_dropout_only_in_training_and_reproducible_by_seed() {
        let config = MultiHeadSparseAttentionConfig::new(16, 4, PatternConfig::Local { ctx: 8 })
            .with_block_size(4)
            .with_dropout(0.5);
        let device = Device::ndarray().autodiff();
        let layer = config.init(&device).unwrap();
        let plain = MultiHeadSparseAttention {
            dropout: DropoutConfig::new(0.0).init(),
            ..layer.clone()
        };
        let x = Tensor::<3>::random([1, 12, 16], Distribution::Normal(0.0, 1.0), &device);
        let run = |l: &MultiHeadSparseAttention| host(l.forward(x.clone()).unwrap());
        crate::seed_attention_dropout(3);
        let first = run(&layer);
        let second = run(&layer);
        assert_ne!(first, second, "each training forward draws a new mask");
        assert_ne!(first, run(&plain), "dropout is on in training");
        crate::seed_attention_dropout(3);
        assert_eq!(
            first,
            run(&layer),
            "the same seed sequence gives the same masks"
        );
        // Gradients flow through the kernels' dropout.
        let grads = layer.forward(x.clone()).unwrap().sum().backward();
        assert!(layer.query.weight.val().grad(&grads).is_some());
        // Off without autodiff (inference), as Burn's dropout.
        let inference = Device::ndarray();
        let xi = Tensor::<3>::from_data(x.to_data(), &inference);
        let [a, b] = [&layer, &plain].map(|l| {
            let l = l.clone().fork(&inference);
            host(l.forward(xi.clone()).unwrap())
        });
        assert_eq!(a, b, "dropout must be off on a device without autodiff");
    }

    #[test]
    fn gradients_reach_every_parameter() {
        let device = Device::ndarray().autodiff();
        let layer = layer(PatternConfig::Strided { stride: 3 }, &device);
        let x = Tensor::<3>::random([1, 10, 16], Distribution::Normal(0.0, 1.0), &device);
        let grads = layer.forward(x).unwrap().powi_scalar(2).sum().backward();
        for (name, linear) in [
            ("query", &layer.query),
            ("key", &layer.key),
            ("value", &layer.value),
            ("output", &layer.output),
        ] {
            let weight = linear.weight.val().grad(&grads).expect(name);
            assert!(
                weight.abs().sum().into_scalar::<f32>() > 0.0,
                "{name} weight gradient is zero"
            );
            let bias = linear
                .bias
                .as_ref()
                .unwrap()
                .val()
                .grad(&grads)
                .expect(name);
            assert!(
                bias.abs().sum().into_scalar::<f32>() > 0.0,
                "{name} bias gradient is zero"
            );
        }
    }

    /// Rows of `t` (`[batch, n, w]`) for sequence `b`, tokens `0..len`, as host values.
    fn rows(t: Tensor<3>, b: usize, len: usize) -> Vec<f64> {
        let [_, _, w] = t.dims();
        host(t.slice([b..b + 1, 0..len, 0..w]))
    }

    pub(crate) fn worst(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn padded_batch_equals_each_sequence_unpadded() {
        let device = Device::ndarray().autodiff();
        // Bidirectional, so padded keys would be seen without the mask.
        let layer = layer(PatternConfig::BidirectionalWindow { radius: 3 }, &device);
        let (n, lengths) = (12, [12, 7]);
        let x =
            Tensor::<3>::random([2, n, 16], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let mask = Tensor::<2, Bool>::from_data(
            TensorData::new(
                lengths
                    .iter()
                    .flat_map(|&len| (0..n).map(move |j| j >= len))
                    .collect::<Vec<_>>(),
                [2, n],
            ),
            &device,
        );
        let weights = Tensor::<3>::random([2, n, 16], Distribution::Normal(0.0, 1.0), &device);
        // The mask (any padding) and the lengths (right padding, in the kernels).
        for by_lengths in [false, true] {
            let out = if by_lengths {
                layer.forward_lengths(x.clone(), &lengths).unwrap()
            } else {
                layer.forward_padded(x.clone(), Some(mask.clone())).unwrap()
            };
            let grads = (out.clone() * weights.clone()).sum().backward();
            let dx = x.grad(&grads).unwrap();
            for (b, &len) in lengths.iter().enumerate() {
                let xb = x.clone().slice([b..b + 1, 0..len, 0..16]).into_data();
                let xb = Tensor::<3>::from_data(xb, &device).require_grad();
                let wb = weights.clone().slice([b..b + 1, 0..len, 0..16]);
                let alone = layer.forward(xb.clone()).unwrap();
                let grads_alone = (alone.clone() * wb).sum().backward();
                let fwd = worst(&rows(out.clone(), b, len), &host(alone));
                let grad = worst(
                    &rows(dx.clone(), b, len),
                    &host(xb.grad(&grads_alone).unwrap()),
                );
                assert!(
                    fwd < 1e-5 && grad < 1e-5,
                    "sequence {b}: fwd {fwd}, grad {grad}"
                );
                let pad = rows(out.clone(), b, n)[len * 16..]
                    .iter()
                    .fold(0.0, |m, v| v.abs().max(m));
                let pad_grad = rows(dx.clone(), b, n)[len * 16..]
                    .iter()
                    .fold(0.0, |m, v| v.abs().max(m));
                // Padded rows: zero attention output (the output bias remains), no gradient.
                let bias = host(
                    layer
                        .output
                        .bias
                        .as_ref()
                        .unwrap()
                        .val()
                        .reshape([1, 1, 16]),
                );
                let bias_max = bias.iter().fold(0.0, |m: f64, v| v.abs().max(m));
                assert!(pad <= bias_max + 1e-6, "padded rows of sequence {b}");
                assert_eq!(pad_grad, 0.0, "gradient reached padding of sequence {b}");
            }
        }
    }

    #[test]
    fn bad_padding_mask_is_a_typed_error() {
        let device = Device::ndarray();
        let layer = layer(PatternConfig::All, &device);
        let mask = Tensor::<2, Bool>::empty([1, 5], &device);
        let err = layer
            .forward_padded(Tensor::zeros([1, 6, 16], &device), Some(mask))
            .unwrap_err();
        assert!(matches!(
            err,
            SparseAttentionError::Shape {
                name: "key_padding_mask",
                ..
            }
        ));
    }

    #[test]
    fn record_round_trip_gives_identical_outputs() {
        let device = Device::ndarray();
        let saved = layer(PatternConfig::Local { ctx: 8 }, &device);
        let bytes = saved.clone().into_record().into_bytes().unwrap();
        let fresh = layer(PatternConfig::Local { ctx: 8 }, &device);
        let x = Tensor::<3>::random([1, 9, 16], Distribution::Normal(0.0, 1.0), &device);
        assert_ne!(
            host(fresh.forward(x.clone()).unwrap()),
            host(saved.forward(x.clone()).unwrap())
        );
        let loaded = fresh.load_record(ModuleRecord::from_bytes(bytes).unwrap());
        assert_eq!(
            host(loaded.forward(x.clone()).unwrap()),
            host(saved.forward(x).unwrap())
        );
    }

    #[test]
    fn bad_configs_and_inputs_are_typed_errors() {
        let device = Device::ndarray();
        let err = MultiHeadSparseAttentionConfig::new(10, 3, PatternConfig::All)
            .init(&device)
            .unwrap_err();
        assert_eq!(
            err,
            SparseAttentionError::HeadsDivide {
                n_embd: 10,
                heads: 3
            }
        );
        let err = MultiHeadSparseAttentionConfig::new(8, 2, PatternConfig::Local { ctx: 0 })
            .init(&device)
            .unwrap_err();
        assert!(matches!(err, SparseAttentionError::InvalidPattern { .. }));
        let layer = MultiHeadSparseAttentionConfig::new(8, 2, PatternConfig::All)
            .with_max_seq_len(Some(6))
            .init(&device)
            .unwrap();
        assert!(layer.forward(Tensor::zeros([1, 7, 8], &device)).is_err());
        assert!(layer.forward(Tensor::zeros([1, 6, 9], &device)).is_err());
        assert!(layer.forward(Tensor::zeros([1, 6, 8], &device)).is_ok());
        let err = MultiHeadSparseAttentionConfig::new(8, 2, PatternConfig::All)
            .with_dropout(1.0)
            .init(&device)
            .unwrap_err();
        assert!(matches!(err, SparseAttentionError::Probability { .. }));
        for cap in [0.0, f64::NAN] {
            let err = MultiHeadSparseAttentionConfig::new(8, 2, PatternConfig::All)
                .with_softcap(Some(cap))
                .init(&device)
                .unwrap_err();
            assert!(matches!(err, SparseAttentionError::SoftCap(_)));
        }
        for kv_heads in [0, 3] {
            let err = MultiHeadSparseAttentionConfig::new(12, 4, PatternConfig::All)
                .with_n_kv_heads(Some(kv_heads))
                .init(&device)
                .unwrap_err();
            assert_eq!(err, SparseAttentionError::KvHeads { heads: 4, kv_heads });
        }
        let err = layer
            .forward_lengths(Tensor::zeros([2, 6, 8], &device), &[6, 7])
            .unwrap_err();
        assert!(matches!(
            err,
            SparseAttentionError::KeyLength { row: 1, .. }
        ));
        let err = layer
            .forward_lengths(Tensor::zeros([2, 6, 8], &device), &[6])
            .unwrap_err();
        assert!(matches!(
            err,
            SparseAttentionError::KeyLengths { got: 1, batch: 2 }
        ));
        // Found by the layer fuzz test: each of these panicked inside Burn (its linear layer
        // on an empty input, ndarray's cast to f16).
        for shape in [[0, 6, 8], [1, 0, 8]] {
            let err = layer.forward(Tensor::zeros(shape, &device)).unwrap_err();
            assert!(
                matches!(err, SparseAttentionError::Zero { .. }),
                "{shape:?}"
            );
        }
        let err = MultiHeadSparseAttentionConfig::new(0, 1, PatternConfig::All)
            .init(&device)
            .unwrap_err();
        assert_eq!(err, SparseAttentionError::Zero { name: "d_model" });
        let config = MultiHeadSparseAttentionConfig::new(8, 2, PatternConfig::All)
            .with_attention_dtype(Some(FloatDType::F16));
        assert!(matches!(
            config.init(&device).unwrap_err(),
            SparseAttentionError::DType { .. }
        ));
        let half = MultiHeadSparseAttention {
            attention_dtype: Some(FloatDType::F16),
            ..layer
        };
        assert!(matches!(
            half.forward(Tensor::zeros([1, 6, 8], &device)).unwrap_err(),
            SparseAttentionError::DType { .. }
        ));
    }
}
