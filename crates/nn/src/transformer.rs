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
    /// None: positions enter only through the attention scores (with
    /// [`SparseTransformerConfig::alibi`]); also a model whose pattern alone orders tokens.
    None,
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
    /// Dropout on residual branches and on attention probabilities (inside the kernels).
    /// Default: 0.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Position encoding. Default: learned.
    #[config(default = "PositionEncoding::Learned")]
    pub positions: PositionEncoding,
    /// Burn's dense causal `MultiHeadAttention` in every block instead of ours (the
    /// baseline). Default: false.
    #[config(default = false)]
    pub dense: bool,
    /// Dtype the attention runs in (see
    /// [`MultiHeadSparseAttentionConfig::attention_dtype`]): `Some(FloatDType::F16)` puts a
    /// model that trains in f32 on a GPU's tensor-core kernels. Default: `None`, the model's
    /// dtype.
    #[config(default = "None")]
    pub attention_dtype: Option<burn::tensor::FloatDType>,
    /// Soft-capping of every block's attention scores (see
    /// [`MultiHeadSparseAttentionConfig::softcap`]). Default: none.
    #[config(default = "None")]
    pub softcap: Option<f64>,
    /// ALiBi in every block (see [`MultiHeadSparseAttentionConfig::alibi`]); with it the
    /// model usually drops its position encoding (`positions: PositionEncoding::None`).
    /// Default: false.
    #[config(default = false)]
    pub alibi: bool,
    /// A learnable relative-position bias in every block (see
    /// [`MultiHeadSparseAttentionConfig::relative_bias`]; a table per block). Default: none.
    #[config(default = "None")]
    pub relative_bias: Option<crate::RelativeBiasConfig>,
}

/// Position encoding module of a [`SparseTransformer`].
// One per model, so the size difference costs nothing; Burn's `Module` derive has no
// impl for `Box` to even it out.
#[allow(clippy::large_enum_variant)]
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
    /// Position encoding (`None` for [`PositionEncoding::None`]).
    pub positions: Option<Positions>,
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
        let attention =
            MultiHeadSparseAttentionConfig::new(self.d_model, self.n_heads, self.pattern.clone())
                .with_block_size(self.block_size)
                .with_dropout(self.dropout)
                .with_attention_dtype(self.attention_dtype)
                .with_softcap(self.softcap)
                .with_alibi(self.alibi)
                .with_relative_bias(self.relative_bias.clone())
                .with_max_seq_len(Some(self.max_seq_len));
        let block = SparseTransformerBlockConfig::new(attention)
            .with_mlp_ratio(self.mlp_ratio)
            .with_dropout(self.dropout)
            .with_dense(self.dense);
        let blocks = (0..self.n_layers)
            .map(|_| block.init(device))
            .collect::<Result<Vec<_>>>()?;
        let positions = match self.positions {
            PositionEncoding::Learned => Some(Positions::Learned(
                EmbeddingConfig::new(self.max_seq_len, self.d_model).init(device),
            )),
            PositionEncoding::Sinusoidal => Some(Positions::Sinusoidal(
                PositionalEncodingConfig::new(self.d_model)
                    .with_max_sequence_size(self.max_seq_len)
                    .init(device),
            )),
            PositionEncoding::None => None,
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
            return Err(SparseAttentionError::SequenceTooLong {
                len: n,
                max: self.max_seq_len,
            });
        }
        let device = tokens.device();
        let mut x = self.tokens.forward(tokens);
        x = match &self.positions {
            Some(Positions::Learned(embedding)) => {
                let index = Tensor::<1, Int>::arange(0..n as i64, &device).reshape([1, n]);
                x + embedding.forward(index)
            }
            Some(Positions::Sinusoidal(encoding)) => encoding.forward(x),
            None => x,
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

#[cfg(test)]
mod tests {
    // burn-ndarray is deprecated upstream (0.22) but is our default backend.
    #![allow(deprecated)]

    use burn::module::{ModuleVisitor, Param};
    use burn::store::ModuleRecord;
    use burn::tensor::{Distribution, TensorData};

    use super::*;
    use crate::{MultiHeadSparseAttention, SelfAttention};

    fn config(dense: bool, positions: PositionEncoding) -> SparseTransformerConfig {
        SparseTransformerConfig::new(256, 16, 2, 2, 24, PatternConfig::Local { ctx: 8 })
            .with_block_size(4)
            .with_positions(positions)
            .with_dense(dense)
    }

    fn tokens(batch: usize, n: usize, device: &Device) -> Tensor<2, Int> {
        Tensor::<2>::random([batch, n], Distribution::Uniform(0.0, 255.0), device).int()
    }

    /// Collects, for every float parameter, whether its gradient is present and nonzero.
    struct GradientsSeen<'a> {
        grads: &'a burn::tensor::Gradients,
        missing: Vec<String>,
        path: Vec<String>,
    }

    impl ModuleVisitor for GradientsSeen<'_> {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let nonzero = param
                .val()
                .grad(self.grads)
                .is_some_and(|g| g.abs().sum().into_scalar::<f32>() > 0.0);
            if !nonzero {
                self.missing.push(self.path.join("."));
            }
        }
    }

    #[test]
    fn logits_have_the_vocabulary_shape_for_every_variant() {
        let device = Device::ndarray();
        for dense in [false, true] {
            for positions in [PositionEncoding::Learned, PositionEncoding::Sinusoidal] {
                let model = config(dense, positions).init(&device).unwrap();
                let logits = model.forward(tokens(2, 13, &device)).unwrap();
                assert_eq!(logits.dims(), [2, 13, 256]);
            }
        }
    }

    #[test]
    fn gradients_reach_every_parameter() {
        let device = Device::ndarray().autodiff();
        for dense in [false, true] {
            let model = config(dense, PositionEncoding::Learned)
                .init(&device)
                .unwrap();
            let grads = model.loss(tokens(2, 24, &device)).unwrap().backward();
            let mut seen = GradientsSeen {
                grads: &grads,
                missing: Vec::new(),
                path: Vec::new(),
            };
            model.visit(&mut seen);
            assert!(seen.missing.is_empty(), "no gradient: {:?}", seen.missing);
        }
    }

    #[test]
    fn sparse_all_equals_dense_causal_with_the_same_weights() {
        let device = Device::ndarray();
        let all = |dense| {
            SparseTransformerConfig::new(256, 16, 2, 2, 24, PatternConfig::All)
                .with_block_size(4)
                .with_dense(dense)
        };
        let dense = all(true).init(&device).unwrap();
        let mut sparse = dense.clone();
        let attention =
            MultiHeadSparseAttentionConfig::new(16, 2, PatternConfig::All).with_block_size(4);
        for block in &mut sparse.blocks {
            let SelfAttention::Dense(mha) = block.attention.clone() else {
                panic!("built dense")
            };
            block.attention = SelfAttention::Sparse(
                MultiHeadSparseAttention::from_dense(mha, &attention).unwrap(),
            );
        }
        let x = tokens(2, 21, &device);
        let a = dense.forward(x.clone()).unwrap().into_data();
        let b = sparse.forward(x).unwrap().into_data();
        a.assert_approx_eq::<f32>(&b, burn::tensor::Tolerance::absolute(1e-4));
    }

    /// A second device of this build, standing for a second card: wgpu where it is compiled
    /// in (the CubeCL kernels, layouts uploaded to that device), else flex, else the ndarray
    /// device again.
    fn second_device() -> Device {
        #[cfg(feature = "wgpu")]
        return Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
        #[cfg(all(feature = "flex", not(feature = "wgpu")))]
        return Device::flex();
        #[cfg(not(any(feature = "flex", feature = "wgpu")))]
        Device::ndarray()
    }

    /// A record saved on one device loads on another, and the model computes the same
    /// logits there.
    #[test]
    fn record_and_config_round_trip() {
        let device = Device::ndarray();
        let config = config(false, PositionEncoding::Sinusoidal);
        let json = serde_json::to_string(&config).unwrap();
        let config: SparseTransformerConfig = serde_json::from_str(&json).unwrap();
        let saved = config.init(&device).unwrap();
        let bytes = saved.clone().into_record().into_bytes().unwrap();
        let x = tokens(1, 10, &device);
        let expected = saved.forward(x.clone()).unwrap().into_data();
        for target in [device.clone(), second_device()] {
            let loaded = config
                .init(&target)
                .unwrap()
                .load_record(ModuleRecord::from_bytes(bytes.clone()).unwrap());
            let logits = loaded.forward(x.clone().to_device(&target)).unwrap();
            logits
                .into_data()
                .assert_approx_eq::<f32>(&expected, burn::tensor::Tolerance::absolute(1e-4));
        }
    }

    /// Data parallelism as burn-train's multi-device strategy runs it: each replica (a fork
    /// of the model on its device) takes half the batch, its gradients move to the main
    /// device and are summed there; the sum is the whole batch's gradient on one device,
    /// for every parameter (the relative-bias table's included).
    #[test]
    fn two_replicas_gradients_sum_to_the_whole_batch_gradient() {
        use burn::optim::{GradientsAccumulator, GradientsParams};

        let main = Device::ndarray().autodiff();
        let other = second_device().autodiff();
        let model = config(false, PositionEncoding::Learned)
            .with_relative_bias(Some(crate::RelativeBiasConfig::new()))
            .init(&main)
            .unwrap();
        let batch = tokens(4, 23, &main);
        let whole =
            GradientsParams::from_grads(model.loss(batch.clone()).unwrap().backward(), &model);
        let mut sum = GradientsAccumulator::new();
        for (rows, device) in [(0..2, &main), (2..4, &other)] {
            let replica = model.clone().fork(device);
            let half = batch.clone().slice([rows, 0..23]).to_device(device);
            // Each replica's loss is its half's mean: half the whole batch's mean.
            let loss = replica.loss(half).unwrap().mul_scalar(0.5);
            let grads = GradientsParams::from_grads(loss.backward(), &replica);
            sum.accumulate(&model, grads.to_device(&main, &model));
        }
        let summed = sum.grads();
        let mut compared = 0;
        let mut worst = 0.0f32;
        model.visit(&mut CompareGradients {
            whole: &whole,
            summed: &summed,
            compared: &mut compared,
            worst: &mut worst,
        });
        assert!(compared > 10, "only {compared} parameters compared");
        // Another backend rounds its kernels differently (flex beside ndarray: ~3e-4).
        let tolerance = if other == main { 1e-4 } else { 1e-3 };
        assert!(
            worst < tolerance,
            "summed replica gradients differ by {worst}"
        );
    }

    /// Compares, parameter by parameter, two sets of gradients (the largest absolute
    /// difference relative to the gradient's scale).
    struct CompareGradients<'a> {
        whole: &'a burn::optim::GradientsParams,
        summed: &'a burn::optim::GradientsParams,
        compared: &'a mut usize,
        worst: &'a mut f32,
    }

    impl ModuleVisitor for CompareGradients<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let (Some(a), Some(b)) = (
                self.whole.get::<D>(param.id),
                self.summed.get::<D>(param.id),
            ) else {
                panic!("a parameter has no gradient on one side");
            };
            let scale = a.clone().abs().max().into_scalar::<f32>().max(1e-3);
            let diff = (a - b).abs().max().into_scalar::<f32>() / scale;
            *self.worst = self.worst.max(diff);
            *self.compared += 1;
        }
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let device = Device::ndarray();
        let model = config(false, PositionEncoding::Learned)
            .init(&device)
            .unwrap();
        assert!(matches!(
            model.forward(tokens(1, 25, &device)),
            Err(SparseAttentionError::SequenceTooLong { len: 25, max: 24 })
        ));
        let one = Tensor::<2, Int>::from_data(TensorData::new(vec![7i64], [1, 1]), &device);
        assert!(matches!(
            model.loss(one),
            Err(SparseAttentionError::Shape { .. })
        ));
        let zero_layers = SparseTransformerConfig::new(256, 16, 2, 0, 24, PatternConfig::All);
        assert!(matches!(
            zero_layers.init(&device),
            Err(SparseAttentionError::Zero { name: "n_layers" })
        ));
    }
}
