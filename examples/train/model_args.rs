//! The model arguments that the training examples share: pattern, size, attention options.

use burn::tensor::FloatDType;
use clap::ValueEnum;
use sparse_attn::nn::{
    PatternConfig, PositionEncoding, RelativeBiasConfig, SparseTransformerConfig,
};

/// The causal built-in patterns (a language model must not see the next byte).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Pattern {
    /// Causal dense, as a sparse layout.
    All,
    /// The query and the `ctx - 1` bytes before it.
    Local,
    /// Every `stride`-th earlier byte.
    Strided,
    /// The paper's strided pattern: local ∪ strided.
    PaperStrided,
    /// The paper's fixed pattern (local chunks + summary columns per head group).
    Fixed,
    /// Dilated causal window.
    Dilated,
    /// Causal window and a global first token.
    Longformer,
    /// Causal window, a global first token and seeded random blocks.
    Bigbird,
    /// Attention sinks and a causal window.
    Streaming,
    /// Consecutive causal windows of two sizes.
    VariableWindows,
    /// Heads alternating local and strided.
    Mixed,
}

/// `--attention-dtype`: f16 or bf16.
pub fn parse_attention_dtype(name: &str) -> Result<FloatDType, String> {
    match name {
        "f16" => Ok(FloatDType::F16),
        "bf16" => Ok(FloatDType::BF16),
        other => Err(format!(
            "unknown attention dtype `{other}`: expected f16 or bf16"
        )),
    }
}

/// A byte-level language model: its pattern, size and attention options.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// Attention pattern.
    #[arg(long, value_enum, default_value = "local")]
    pub pattern: Pattern,
    /// Train with Burn's dense `MultiHeadAttention` (causal mask) instead.
    #[arg(long)]
    pub dense: bool,
    /// Dtype of the attention itself (f16 or bf16; the model trains in f32): on a GPU with
    /// tensor cores (`--backend vulkan`) this runs the tensor-core kernels.
    #[arg(long, value_parser = parse_attention_dtype)]
    pub attention_dtype: Option<FloatDType>,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Model width.
    #[arg(long, default_value_t = 128)]
    pub d_model: usize,
    /// Heads.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Blocks.
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    /// Layout block size.
    #[arg(long, default_value_t = 32)]
    pub block: usize,
    /// Window / local context of the pattern.
    #[arg(long, default_value_t = 64)]
    pub ctx: usize,
    /// Stride of the strided patterns.
    #[arg(long, default_value_t = 16)]
    pub stride: usize,
    /// Dropout.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    /// Sinusoidal instead of learned positions.
    #[arg(long)]
    pub sinusoidal: bool,
    /// Soft-cap the attention scores at this bound (`cap * tanh(s / cap)`, Gemma-style).
    #[arg(long)]
    pub softcap: Option<f64>,
    /// ALiBi (standard slopes) in every block; the model then has no position embedding.
    #[arg(long, conflicts_with = "sinusoidal")]
    pub alibi: bool,
    /// A learnable T5 relative-position bias (32 buckets up to distance 128) in every block;
    /// the model then has no position embedding.
    #[arg(long, conflicts_with = "sinusoidal")]
    pub relative_bias: bool,
    /// Seed of initialisation, batches and sampling (and of BigBird's random blocks).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl ModelArgs {
    /// The pattern of `--pattern` with `--ctx`, `--stride` and `--block`.
    pub fn pattern_config(&self) -> PatternConfig {
        let (ctx, stride) = (self.ctx, self.stride);
        match self.pattern {
            Pattern::All => PatternConfig::All,
            Pattern::Local => PatternConfig::Local { ctx },
            Pattern::Strided => PatternConfig::Strided { stride },
            Pattern::PaperStrided => PatternConfig::PaperStrided { ctx: stride },
            Pattern::Fixed => PatternConfig::Fixed {
                local_ctx: ctx,
                num_verts: 2,
                vertsize: 1,
            },
            Pattern::Dilated => PatternConfig::Dilated {
                window: ctx / 2,
                dilation: 2,
                causal: true,
            },
            Pattern::Longformer => PatternConfig::Longformer {
                window: ctx,
                globals: vec![0],
                causal: true,
            },
            Pattern::Bigbird => PatternConfig::BigBird {
                window: ctx,
                globals: vec![0],
                random_blocks: 1,
                random_block: self.block,
                seed: self.seed,
                causal: true,
            },
            Pattern::Streaming => PatternConfig::Streaming {
                sinks: 4,
                window: ctx,
            },
            Pattern::VariableWindows => PatternConfig::VariableWindows {
                sizes: vec![ctx / 2, ctx],
                causal: true,
            },
            Pattern::Mixed => PatternConfig::PerHead(
                (0..self.heads)
                    .map(|h| match h % 2 {
                        0 => PatternConfig::Local { ctx },
                        _ => PatternConfig::Strided { stride },
                    })
                    .collect(),
            ),
        }
    }

    /// The model these arguments describe (a byte vocabulary).
    pub fn model_config(&self) -> SparseTransformerConfig {
        let positions = if self.alibi || self.relative_bias {
            PositionEncoding::None
        } else if self.sinusoidal {
            PositionEncoding::Sinusoidal
        } else {
            PositionEncoding::Learned
        };
        SparseTransformerConfig::new(
            256,
            self.d_model,
            self.heads,
            self.layers,
            self.seq_len,
            self.pattern_config(),
        )
        .with_block_size(self.block)
        .with_dropout(self.dropout)
        .with_positions(positions)
        .with_dense(self.dense)
        .with_attention_dtype(self.attention_dtype)
        .with_softcap(self.softcap)
        .with_alibi(self.alibi)
        .with_relative_bias(self.relative_bias.then(RelativeBiasConfig::new))
    }
}
