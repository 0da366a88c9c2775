//! [`SparseTransformer`] as a model of burn-train's `Learner` (feature `learner`): its train and
//! validation steps compute the next-token loss of a [`TokenBatch`] and hand burn-train a
//! `SequenceOutput` (loss, logits, targets), so the loss, perplexity and accuracy metrics,
//! checkpointing, early stopping and the training strategies of `SupervisedTraining` work on
//! a sparse transformer unchanged. [`TokenBatcher`] turns byte windows into batches;
//! [`BitsPerTokenMetric`] reports the loss in bits per token (bits per byte for a byte-level
//! model), the unit language-model results are compared in.

use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::tensor::{Device, Int, Tensor, TensorData, TensorReadError};
use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::{
    Adaptor, Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes,
    NumericEntry, SerializedEntry,
};
use burn::train::{InferenceStep, SequenceOutput, TrainOutput, TrainStep};
use sparse_attn_core::{Result, SparseAttentionError};

use crate::transformer::SparseTransformer;

/// A batch of language-modelling examples: `inputs` `[batch, n]` and `targets` `[batch, n]`,
/// the same texts shifted by one token (position `i` of `inputs` predicts position `i` of
/// `targets`).
#[derive(Clone, Debug)]
pub struct TokenBatch {
    /// Input tokens.
    pub inputs: Tensor<2, Int>,
    /// Next tokens.
    pub targets: Tensor<2, Int>,
}

impl TokenBatch {
    /// The batch of texts `tokens` `[batch, n + 1]`: inputs are the first `n` tokens of each
    /// text, targets the last `n`.
    ///
    /// # Errors
    /// Texts shorter than two tokens.
    pub fn from_texts(tokens: Tensor<2, Int>) -> Result<Self> {
        let [batch, len] = tokens.dims();
        if len < 2 {
            return Err(SparseAttentionError::Shape {
                name: "tokens",
                got: vec![batch, len],
                expected: "[batch, n + 1] with n >= 1".into(),
            });
        }
        Ok(Self {
            inputs: tokens.clone().slice([0..batch, 0..len - 1]),
            targets: tokens.slice([0..batch, 1..len]),
        })
    }
}

/// Batches windows of token ids (each `n + 1` tokens: `n` inputs and their next tokens) into
/// [`TokenBatch`]es on the data loader's device.
#[derive(Clone, Debug, Default)]
pub struct TokenBatcher;

impl Batcher<Vec<u32>, TokenBatch> for TokenBatcher {
    /// # Panics
    /// If the windows differ in length or are shorter than two tokens (a data set of
    /// windows of one length never is).
    fn batch(&self, items: Vec<Vec<u32>>, device: &Device) -> TokenBatch {
        let (batch, len) = (items.len(), items.first().map_or(0, Vec::len));
        assert!(
            items.iter().all(|w| w.len() == len),
            "TokenBatcher: windows of different lengths in one batch"
        );
        let ids: Vec<i64> = items.into_iter().flatten().map(i64::from).collect();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [batch, len]), device);
        TokenBatch::from_texts(tokens).expect("TokenBatcher: windows of at least two tokens")
    }
}

impl SparseTransformer {
    /// The logits and mean next-token cross-entropy of `batch`, as burn-train's
    /// `SequenceOutput`.
    ///
    /// # Errors
    /// As [`forward`](Self::forward); inputs and targets of different shapes.
    pub fn sequence_output(&self, batch: TokenBatch) -> Result<SequenceOutput> {
        let TokenBatch { inputs, targets } = batch;
        if inputs.dims() != targets.dims() {
            return Err(SparseAttentionError::Shape {
                name: "targets",
                got: targets.dims().to_vec(),
                expected: format!("the inputs' shape {:?}", inputs.dims()),
            });
        }
        let [b, n] = inputs.dims();
        let logits = self.forward(inputs)?;
        let vocab = logits.dims()[2];
        let loss = burn::nn::loss::CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(
                logits.clone().reshape([b * n, vocab]),
                targets.clone().reshape([b * n]),
            );
        Ok(SequenceOutput::new(loss, logits, None, targets))
    }
}

impl TrainStep for SparseTransformer {
    type Input = TokenBatch;
    type Output = SequenceOutput;

    /// # Panics
    /// On a batch [`sequence_output`](SparseTransformer::sequence_output) refuses
    /// (burn-train's steps return no `Result`): sequences longer than the model's
    /// `max_seq_len`, or tokens and targets of different shapes.
    fn step(&self, item: TokenBatch) -> TrainOutput<SequenceOutput> {
        let output = self
            .sequence_output(item)
            .unwrap_or_else(|e| panic!("SparseTransformer train step: {e}"));
        TrainOutput::new(self, output.loss.backward(), output)
    }
}

impl InferenceStep for SparseTransformer {
    type Input = TokenBatch;
    type Output = SequenceOutput;

    /// # Panics
    /// As the train step.
    fn step(&self, item: TokenBatch) -> SequenceOutput {
        self.sequence_output(item)
            .unwrap_or_else(|e| panic!("SparseTransformer validation step: {e}"))
    }
}

/// The mean next-token cross-entropy in bits (the loss in nats over `ln 2`), averaged over
/// the batches of an epoch by their sizes: bits per byte for a byte-level model.
///
/// # Example
/// ```
/// # use burn::train::metric::LossMetric;
/// # use sparse_attn_nn::BitsPerTokenMetric;
/// // Beside Burn's loss metric, in `SupervisedTraining::metrics((LossMetric::new(), ...))`.
/// let metrics = (LossMetric::new(), BitsPerTokenMetric::new());
/// # let _ = metrics;
/// ```
#[derive(Clone)]
pub struct BitsPerTokenMetric {
    name: MetricName,
    state: NumericMetricState,
}

impl Default for BitsPerTokenMetric {
    fn default() -> Self {
        Self::new()
    }
}

impl BitsPerTokenMetric {
    /// The metric, named "Bits per token".
    pub fn new() -> Self {
        Self {
            name: Arc::new("Bits per token".to_string()),
            state: NumericMetricState::default(),
        }
    }
}

/// The input of [`BitsPerTokenMetric`]: a batch's mean cross-entropy in nats (shape `[1]`)
/// and the number of sequences it averages.
pub struct BitsPerTokenInput {
    loss: Tensor<1>,
    sequences: usize,
}

impl Adaptor<BitsPerTokenInput> for SequenceOutput {
    fn adapt(&self) -> BitsPerTokenInput {
        BitsPerTokenInput {
            loss: self.loss.clone(),
            sequences: self.targets.dims()[0],
        }
    }
}

impl Metric for BitsPerTokenMetric {
    type Input = BitsPerTokenInput;

    fn update(
        &mut self,
        input: &BitsPerTokenInput,
        _metadata: &MetricMetadata,
    ) -> Result<SerializedEntry, TensorReadError> {
        let nats = input.loss.clone().mean().try_into_scalar::<f64>()?;
        self.state
            .update(nats / std::f64::consts::LN_2, input.sequences);
        Ok(self
            .state
            .compute_update(FormatOptions::new(self.name()).precision(3)))
    }

    fn compute(&mut self) -> Result<SerializedEntry, TensorReadError> {
        Ok(self
            .state
            .compute_final(FormatOptions::new(self.name()).precision(3)))
    }

    fn clear(&mut self) {
        self.state.reset();
    }

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: Some("bits".to_string()),
            higher_is_better: false,
        }
        .into()
    }
}

impl Numeric for BitsPerTokenMetric {
    fn value(&self) -> Option<NumericEntry> {
        Some(self.state.current_value())
    }

    fn running_value(&self) -> Option<NumericEntry> {
        Some(self.state.running_value())
    }

    fn final_value(&self) -> NumericEntry {
        self.state.final_value()
    }
}

#[cfg(test)]
mod tests {
    // burn-ndarray is deprecated upstream (0.22) but is our default backend.
    #![allow(deprecated)]

    use std::sync::Arc;

    use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
    use burn::data::dataset::InMemDataset;
    use burn::optim::AdamConfig;
    use burn::optim::lr_scheduler::constant::ConstantLr;
    use burn::train::logger::InMemoryMetricLogger;
    use burn::train::metric::LossMetric;
    use burn::train::{
        ExecutionStrategy, Learner, MultiDeviceOptim, SupervisedTraining, TrainingStrategy,
    };

    use super::*;
    use crate::{PatternConfig, SparseTransformerConfig};

    /// A repeating text in windows of 17 tokens.
    fn loader(windows: usize, device: &Device) -> Arc<dyn DataLoader<TokenBatch>> {
        let text: Vec<u32> = b"block sparse attention in burn; "
            .iter()
            .cycle()
            .take(windows * 17 + 1)
            .map(|&b| u32::from(b))
            .collect();
        let items: Vec<Vec<u32>> = (0..windows)
            .map(|w| text[w * 17..w * 17 + 17].to_vec())
            .collect();
        DataLoaderBuilder::new(TokenBatcher)
            .batch_size(4)
            .set_device(device.clone())
            .build(InMemDataset::new(items))
    }

    /// Trains a small sparse transformer for two epochs through burn-train's `Learner` with
    /// `strategy` (`None`: one device); the validation loss before and after.
    fn train(strategy: Option<ExecutionStrategy>, device: &Device) -> (f32, f32) {
        let model =
            SparseTransformerConfig::new(256, 32, 2, 1, 16, PatternConfig::Local { ctx: 4 })
                .with_block_size(4)
                .with_dropout(0.1)
                .init(device)
                .unwrap();
        let valid = loader(8, device);
        let loss_of = |model: &SparseTransformer| -> f32 {
            let batch = valid.iter().next().unwrap().unwrap();
            InferenceStep::step(model, batch).loss.into_scalar::<f32>()
        };
        let before = loss_of(&model);
        let learner = Learner::new(model, AdamConfig::new().init(), ConstantLr::new(1e-2));
        let dir = std::env::temp_dir().join(format!(
            "sparse-attn-learner-{}-{}",
            std::process::id(),
            strategy.is_some()
        ));
        let mut training = SupervisedTraining::new(&dir, loader(32, device), valid.clone())
            .metrics((LossMetric::new(), BitsPerTokenMetric::new()))
            .num_epochs(2)
            .with_metric_logger(InMemoryMetricLogger::new())
            .with_application_logger(None);
        if let Some(strategy) = strategy {
            training = training.with_training_strategy(TrainingStrategy::Default(strategy));
        }
        let result = training.launch(learner);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            result.error.is_none(),
            "training failed: {:?}",
            result.error.map(|e| e.to_string())
        );
        (before, loss_of(&result.model))
    }

    /// A sparse transformer (attention dropout on) trains through burn-train's `Learner` on
    /// one CPU device: the validation loss after two epochs is below the untrained model's.
    #[test]
    fn the_learner_trains_a_sparse_transformer() {
        let (before, after) = train(None, &Device::ndarray().autodiff());
        assert!(after < before - 0.5, "loss {before} -> {after}");
    }

    /// The same through the multi-device strategy with two replicas (on the one CPU device,
    /// a thread each; each step sums their gradients on the first).
    #[test]
    fn the_learner_trains_on_two_replicas() {
        let device = Device::ndarray().autodiff();
        let strategy = ExecutionStrategy::multi(
            vec![device.clone(), device.clone()],
            MultiDeviceOptim::OptimMainDevice,
        );
        let (before, after) = train(Some(strategy), &device);
        assert!(after < before - 0.5, "loss {before} -> {after}");
    }

    /// Bits per token are the loss over ln 2.
    #[test]
    fn bits_per_token_are_the_loss_in_bits() {
        let device = Device::ndarray();
        let loss = Tensor::<1>::from_floats([std::f32::consts::LN_2 * 3.0], &device);
        let targets = Tensor::<2, Int>::zeros([2, 5], &device);
        let output = SequenceOutput::new(loss, Tensor::zeros([2, 5, 7], &device), None, targets);
        let mut metric = BitsPerTokenMetric::new();
        let input: BitsPerTokenInput = output.adapt();
        let metadata = MetricMetadata {
            progress: burn::data::dataloader::Progress::new(1, 1, None),
            iteration: Some(0),
            lr: None,
        };
        metric.update(&input, &metadata).unwrap();
        match metric.value() {
            Some(NumericEntry::Aggregated {
                aggregated_value,
                count,
            }) => {
                assert!((aggregated_value - 3.0).abs() < 1e-5, "{aggregated_value}");
                assert_eq!(count, 2);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
