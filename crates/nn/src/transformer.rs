//! A small decoder-only language model built from [`SparseTransformerBlock`]s.

use burn::config::Config;
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{
    Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig,
    PositionalEncoding, PositionalEncodingConfig,
};
use burn::tensor::{Device, Int, Tensor};
use sparse_attn_core::{Result, SparseAttentionError};

use crate::attention::MultiHeadSparseAttentionConfig;
use crate::block::{SparseTransformerBlock, SparseTransformerBlockConfig};
use crate::pattern_config::PatternConfig;

/// How token positions enter the model.
#[derive(Config, Debug, PartialEq, Eq)]
pub enum PositionEncoding {
    /// A learned embedding per position (`max_seq_len` of them).
    Learned,
    /// Fixed sinusoids (Vaswani et al.), added to the token embeddings.
    Sinusoidal,
}

/// Configuration of a [`SparseTransformer`] language model.
#[derive(Config, Debug)]
pub struct SparseTransformerConfig {
    /// Vocabulary size (256 for bytes).
    pub vocab_size: usize,
    /// Model width.
    pub d_model: usize,
    /// Attention heads per block.
    pub n_heads: usize,
    /// Number of blocks.
    pub n_layers: usize,
    /// Longest sequence the model accepts.
    pub max_seq_len: usize,
    /// Attention pattern of every block.
    pub pattern: PatternConfig,
    /// Layout block size. Default: 32.
    #[config(default = 32)]
    pub block_size: usize,
    /// MLP width as a multiple of `d_model`. Default: 4.
    #[config(default = 4)]
    pub mlp_ratio: usize,
    /// Dropout on residual branches and attended values. Default: 0.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Position encoding. Default: learned.
    #[config(default = "PositionEncoding::Learned")]
    pub positions: PositionEncoding,
    /// Burn's dense causal `MultiHeadAttention` in every block instead of ours (the
    /// baseline). Default: false.
    #[config(default = false)]
    pub dense: bool,
}

/// Position encoding module of a [`SparseTransformer`].
#[derive(Module, Debug)]
pub enum Positions {
    /// Learned position embeddings.
    Learned(Embedding),
    /// Fixed sinusoids.
    Sinusoidal(PositionalEncoding),
}

/// Decoder-only transformer: token embedding + positions, blocks, final norm, vocabulary
/// head. Every block attends through the configured sparse pattern.
#[derive(Module, Debug)]
pub struct SparseTransformer {
    /// Token embedding.
    pub tokens: Embedding,
    /// Position encoding.
    pub positions: Positions,
    /// The blocks.
    pub blocks: Vec<SparseTransformerBlock>,
    /// Final norm.
    pub norm: LayerNorm,
    /// Vocabulary head.
    pub head: Linear,
    /// Longest accepted sequence.
    pub max_seq_len: usize,
}

impl SparseTransformerConfig {
    /// Builds the model on `device`.
    ///
    /// # Errors
    /// Zero sizes, and everything [`SparseTransformerBlockConfig::init`] rejects.
    pub fn init(&self, device: &Device) -> Result<SparseTransformer> {
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("max_seq_len", self.max_seq_len),
        ] {
            if value == 0 {
                return Err(SparseAttentionError::Zero { name });
            }
        }
        let attention = MultiHeadSparseAttentionConfig::new(
            self.d_model,
            self.n_heads,
            self.pattern.clone(),
        )
        .with_block_size(self.block_size)
        .with_dropout(self.dropout)
        .with_max_seq_len(Some(self.max_seq_len));
        let block = SparseTransformerBlockConfig::new(attention)
            .with_mlp_ratio(self.mlp_ratio)
            .with_dropout(self.dropout)
            .with_dense(self.dense);
        let blocks = (0..self.n_layers)
            .map(|_| block.init(device))
            .collect::<Result<Vec<_>>>()?;
        let positions = match self.positions {
            PositionEncoding::Learned => Positions::Learned(
                EmbeddingConfig::new(self.max_seq_len, self.d_model).init(device),
            ),
            PositionEncoding::Sinusoidal => Positions::Sinusoidal(
                PositionalEncodingConfig::new(self.d_model)
                    .with_max_sequence_size(self.max_seq_len)
                    .init(device),
            ),
        };
        Ok(SparseTransformer {
            tokens: EmbeddingConfig::new(self.vocab_size, self.d_model).init(device),
            positions,
            blocks,
            norm: LayerNormConfig::new(self.d_model).init(device),
            head: LinearConfig::new(self.d_model, self.vocab_size).init(device),
            max_seq_len: self.max_seq_len,
        })
    }
}

impl SparseTransformer {
    /// Next-token logits for every position of `tokens`.
    ///
    /// # Shapes
    /// `tokens`: `[batch, n]` -> `[batch, n, vocab_size]`.
    ///
    /// # Errors
    /// A sequence longer than `max_seq_len`; pattern errors for this length.
    ///
    /// # Example
    /// ```
    /// use burn::tensor::{Device, Int, Tensor};
    /// use sparse_attn_nn::{PatternConfig, SparseTransformerConfig};
    ///
    /// let device = Device::ndarray();
    /// let model = SparseTransformerConfig::new(256, 32, 4, 2, 64, PatternConfig::Local { ctx: 16 })
    ///     .with_block_size(16)
    ///     .init(&device)?;
    /// let tokens = Tensor::<2, Int>::from_ints([[72, 101, 108, 108, 111]], &device);
    /// assert_eq!(model.forward(tokens)?.dims(), [1, 5, 256]);
    /// # Ok::<(), sparse_attn_core::SparseAttentionError>(())
    /// ```
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Result<Tensor<3>> {
        let [batch, n] = tokens.dims();
        if n > self.max_seq_len {
            return Err(SparseAttentionError::LayoutMismatch {
                what: "max_seq_len (sequence longer than configured)",
                layout: self.max_seq_len,
                input: n,
            });
        }
        let device = tokens.device();
        let mut x = self.tokens.forward(tokens);
        x = match &self.positions {
            Positions::Learned(embedding) => {
                let index = Tensor::<1, Int>::arange(0..n as i64, &device).reshape([1, n]);
                x + embedding.forward(index)
            }
            Positions::Sinusoidal(encoding) => encoding.forward(x),
        };
        for block in &self.blocks {
            x = block.forward(x, None)?;
        }
        debug_assert_eq!(x.dims()[..2], [batch, n]);
        Ok(self.head.forward(self.norm.forward(x)))
    }

    /// Mean next-token cross-entropy (nats) of `tokens`: positions `0..n-1` predict
    /// `1..n`.
    ///
    /// # Shapes
    /// `tokens`: `[batch, n]`, `n >= 2` -> scalar `[1]`.
    ///
    /// # Errors
    /// Fewer than two tokens per row; as [`forward`](Self::forward).
    pub fn loss(&self, tokens: Tensor<2, Int>) -> Result<Tensor<1>> {
        let [batch, n] = tokens.dims();
        if n < 2 {
            return Err(SparseAttentionError::Shape {
                name: "tokens",
                got: vec![batch, n],
                expected: "[batch, n] with n >= 2".into(),
            });
        }
        let inputs = tokens.clone().slice([0..batch, 0..n - 1]);
        let targets = tokens.slice([0..batch, 1..n]).reshape([batch * (n - 1)]);
        let logits = self.forward(inputs)?;
        let vocab = logits.dims()[2];
        let loss = CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits.reshape([batch * (n - 1), vocab]), targets);
        Ok(loss)
    }
}
