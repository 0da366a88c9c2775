//! A pre-norm transformer block around a sparse (or, for comparison, dense) self-attention.

use burn::config::Config;
use burn::module::Module;
use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::attention::{MhaInput, MultiHeadAttention, MultiHeadAttentionConfig};
use burn::nn::{Dropout, DropoutConfig, Gelu, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Bool, Device, Tensor};
use sparse_attn_core::{Result, SparseAttentionError};

use crate::attention::{MultiHeadSparseAttention, MultiHeadSparseAttentionConfig};
use crate::kv_cache::KvCache;

/// Configuration of a [`SparseTransformerBlock`].
#[derive(Config, Debug)]
pub struct SparseTransformerBlockConfig {
    /// The attention (width, heads, pattern, block size, dropout, scale, ...).
    pub attention: MultiHeadSparseAttentionConfig,
    /// Hidden width of the MLP as a multiple of `d_model`. Default: 4.
    #[config(default = 4)]
    pub mlp_ratio: usize,
    /// Dropout on the two residual branches. Default: 0.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Use Burn's dense `MultiHeadAttention` with a causal mask instead of the sparse
    /// attention (same width, heads and initializer): the baseline the examples compare
    /// against. Default: false.
    #[config(default = false)]
    pub dense: bool,
}

/// The self-attention of a block: ours, or Burn's dense one for comparison.
// One per block: the size difference costs nothing, and Burn's `Module` derive has no impl
// for `Box` to even it out.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum SelfAttention {
    /// Block-sparse attention with the configured pattern.
    Sparse(MultiHeadSparseAttention),
    /// Burn's dense multi-head attention with a causal mask.
    Dense(MultiHeadAttention),
}

/// `x + attn(norm(x))`, then `x + mlp(norm(x))` (pre-norm, GELU MLP).
#[derive(Module, Debug)]
pub struct SparseTransformerBlock {
    /// Norm before the attention.
    pub norm_attention: LayerNorm,
    /// The self-attention.
    pub attention: SelfAttention,
    /// Norm before the MLP.
    pub norm_mlp: LayerNorm,
    /// MLP input projection, `d_model -> mlp_ratio * d_model`.
    pub mlp_in: Linear,
    /// MLP output projection, `mlp_ratio * d_model -> d_model`.
    pub mlp_out: Linear,
    /// MLP activation.
    pub activation: Gelu,
    /// Residual dropout.
    pub dropout: Dropout,
}

impl SparseTransformerBlockConfig {
    /// Builds the block on `device`.
    ///
    /// # Errors
    /// As [`MultiHeadSparseAttentionConfig::init`]; a zero `mlp_ratio`; a dropout outside
    /// `[0, 1)`; grouped key/value heads, soft-capping or ALiBi with `dense` (Burn's dense
    /// attention has one key/value head per query head and no score modifiers).
    pub fn init(&self, device: &Device) -> Result<SparseTransformerBlock> {
        if self.mlp_ratio == 0 {
            return Err(SparseAttentionError::Zero { name: "mlp_ratio" });
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(SparseAttentionError::Probability {
                name: "dropout",
                got: self.dropout,
            });
        }
        // Validates heads, block size, pattern and attention dropout for both variants.
        let sparse = self.attention.init(device)?;
        let a = &self.attention;
        let kv_heads = a.n_kv_heads.unwrap_or(a.n_heads);
        if self.dense && kv_heads != a.n_heads {
            return Err(SparseAttentionError::Unsupported {
                what: "dense attention with grouped key/value heads",
                expected: "n_kv_heads equal to n_heads (Burn's dense attention has one key/value head per query head), or the sparse layer",
            });
        }
        if self.dense && (a.softcap.is_some() || a.alibi || a.relative_bias.is_some()) {
            return Err(SparseAttentionError::Unsupported {
                what: "dense attention with soft-capping, ALiBi or a relative-position bias",
                expected: "the sparse layer (Burn's dense attention has no score modifiers)",
            });
        }
        let attention = if self.dense {
            SelfAttention::Dense(
                MultiHeadAttentionConfig::new(a.d_model, a.n_heads)
                    .with_dropout(a.dropout)
                    .with_initializer(a.initializer.clone())
                    .with_query_bias(a.bias)
                    .with_key_bias(a.bias)
                    .with_value_bias(a.bias)
                    .with_output_bias(a.bias)
                    .init(device),
            )
        } else {
            SelfAttention::Sparse(sparse)
        };
        let hidden = self.mlp_ratio * a.d_model;
        Ok(SparseTransformerBlock {
            norm_attention: LayerNormConfig::new(a.d_model).init(device),
            attention,
            norm_mlp: LayerNormConfig::new(a.d_model).init(device),
            mlp_in: LinearConfig::new(a.d_model, hidden).init(device),
            mlp_out: LinearConfig::new(hidden, a.d_model).init(device),
            activation: Gelu::new(),
            dropout: DropoutConfig::new(self.dropout).init(),
        })
    }
}

impl SelfAttention {
    /// Self-attention of `x` (`[batch, n, d_model]`), keys marked in `key_padding_mask`
    /// (`[batch, n]`, true = padding) ignored.
    ///
    /// # Errors
    /// As [`MultiHeadSparseAttention::forward_padded`] (the dense variant checks the mask
    /// shape the same way).
    pub fn forward(
        &self,
        x: Tensor<3>,
        key_padding_mask: Option<Tensor<2, Bool>>,
    ) -> Result<Tensor<3>> {
        match self {
            Self::Sparse(attention) => attention.forward_padded(x, key_padding_mask),
            Self::Dense(attention) => {
                let [batch, n, _] = x.dims();
                let causal = generate_autoregressive_mask(batch, n, &x.device());
                let mut input = MhaInput::self_attn(x).mask_attn(causal);
                if let Some(mask) = key_padding_mask {
                    if mask.dims() != [batch, n] {
                        return Err(SparseAttentionError::Shape {
                            name: "key_padding_mask",
                            got: mask.dims().to_vec(),
                            expected: format!("[{batch}, {n}], the batch and length of `x`"),
                        });
                    }
                    input = input.mask_pad(mask);
                }
                Ok(attention.forward(input).context)
            }
        }
    }
}

impl SparseTransformerBlock {
    /// The block applied to `x`.
    ///
    /// # Shapes
    /// `x`: `[batch, n, d_model]`, `key_padding_mask`: `[batch, n]` -> `[batch, n, d_model]`.
    ///
    /// # Errors
    /// As [`SelfAttention::forward`].
    pub fn forward(
        &self,
        x: Tensor<3>,
        key_padding_mask: Option<Tensor<2, Bool>>,
    ) -> Result<Tensor<3>> {
        let attended = self
            .attention
            .forward(self.norm_attention.forward(x.clone()), key_padding_mask)?;
        Ok(self.mlp(x + self.dropout.forward(attended)))
    }

    /// The block applied to new tokens `x` that follow the tokens in `cache` (see
    /// [`MultiHeadSparseAttention::forward_cached_lengths`]): row `b` adds its first
    /// `valid[b]` tokens.
    ///
    /// # Shapes
    /// `x`: `[batch, m, d_model]` -> `[batch, m, d_model]`.
    ///
    /// # Errors
    /// As the attention's cached forward; a block with Burn's dense attention
    /// ([`Unsupported`](SparseAttentionError::Unsupported): it has no key/value cache here).
    pub fn forward_cached(
        &self,
        x: Tensor<3>,
        valid: &[usize],
        cache: &mut KvCache,
    ) -> Result<Tensor<3>> {
        let attended = self.cached_attention()?.forward_cached_lengths(
            self.norm_attention.forward(x.clone()),
            valid,
            cache,
        )?;
        Ok(self.mlp(x + self.dropout.forward(attended)))
    }

    /// An empty key/value cache of this block's attention (see
    /// [`MultiHeadSparseAttention::new_cache`]).
    ///
    /// # Errors
    /// As `new_cache`; a dense block has no cache.
    pub fn new_cache(&self, batch: usize, capacity: usize, device: &Device) -> Result<KvCache> {
        self.cached_attention()?.new_cache(batch, capacity, device)
    }

    /// A bounded key/value cache of this block's attention for a window pattern (see
    /// [`MultiHeadSparseAttention::new_window_cache`]).
    ///
    /// # Errors
    /// As `new_window_cache`; a dense block has no cache.
    pub fn new_window_cache(&self, batch: usize, chunk: usize, device: &Device) -> Result<KvCache> {
        self.cached_attention()?
            .new_window_cache(batch, chunk, device)
    }

    /// The attention that keeps this block's key/value cache.
    ///
    /// # Errors
    /// [`Unsupported`](SparseAttentionError::Unsupported) for Burn's dense attention.
    pub(crate) fn cached_attention(&self) -> Result<&MultiHeadSparseAttention> {
        match &self.attention {
            SelfAttention::Sparse(attention) => Ok(attention),
            SelfAttention::Dense(_) => Err(SparseAttentionError::Unsupported {
                what: "cached decoding through Burn's dense attention block",
                expected: "sparse attention blocks (a `dense: false` model)",
            }),
        }
    }

    /// The residual MLP half of the block.
    fn mlp(&self, x: Tensor<3>) -> Tensor<3> {
        let hidden = self
            .activation
            .forward(self.mlp_in.forward(self.norm_mlp.forward(x.clone())));
        x + self.dropout.forward(self.mlp_out.forward(hidden))
    }
}
