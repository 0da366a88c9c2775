//! [`SparseTransformer`] as a model of burn-train's `Learner` (feature `learner`): its train and
//! validation steps compute the next-token loss of a [`TokenBatch`] and hand burn-train a
//! `SequenceOutput` (loss, logits, targets), so the loss, perplexity and accuracy metrics,
//! checkpointing, early stopping and the training strategies of `SupervisedTraining` work on
//! a sparse transformer unchanged. [`TokenBatcher`] turns byte windows into batches.

use burn::data::dataloader::batcher::Batcher;
use burn::tensor::{Device, Int, Tensor, TensorData};
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
    use burn::train::{Learner, SupervisedTraining};

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

    /// A sparse transformer trains through burn-train's `Learner` on one CPU device: the
    /// validation loss after two epochs is below the untrained model's.
    #[test]
    fn the_learner_trains_a_sparse_transformer() {
        let device = Device::ndarray().autodiff();
        let model =
            SparseTransformerConfig::new(256, 32, 2, 1, 16, PatternConfig::Local { ctx: 4 })
                .with_block_size(4)
                .init(&device)
                .unwrap();
        let valid = loader(8, &device);
        let loss_of = |model: &SparseTransformer| -> f32 {
            let batch = valid.iter().next().unwrap().unwrap();
            InferenceStep::step(model, batch).loss.into_scalar::<f32>()
        };
        let before = loss_of(&model);
        let learner = Learner::new(model, AdamConfig::new().init(), ConstantLr::new(1e-2));
        let dir = std::env::temp_dir().join(format!("sparse-attn-learner-{}", std::process::id()));
        let result = SupervisedTraining::new(&dir, loader(32, &device), valid.clone())
            .num_epochs(2)
            .with_metric_logger(InMemoryMetricLogger::new())
            .with_application_logger(None)
            .launch(learner);
        let after = loss_of(&result.model);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(after < before - 0.5, "loss {before} -> {after}");
    }
}
