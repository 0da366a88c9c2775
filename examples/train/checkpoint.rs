//! Checkpoints: the model (Burn record), the optimizer state (Burn record) and the run's
//! progress (JSON), all in one directory, so a run can be resumed where it stopped.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use serde::{Deserialize, Serialize};
use sparse_attn::nn::SparseTransformer;

/// Progress of a run: what it trains and where it is.
#[derive(Serialize, Deserialize)]
pub struct TrainState {
    /// Model configuration (JSON of `SparseTransformerConfig`).
    pub model: serde_json::Value,
    /// Pattern name as given on the command line (`dense` for the baseline).
    pub pattern: String,
    /// Steps done.
    pub step: usize,
    /// `(step, bits per byte)` of training batches.
    pub train_curve: Vec<(usize, f64)>,
    /// `(step, bits per byte)` of the validation set.
    pub valid_curve: Vec<(usize, f64)>,
    /// Training seconds so far (evaluation excluded).
    pub train_seconds: f64,
    /// Training tokens so far.
    pub train_tokens: u64,
}

/// The files of a checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
}

impl Checkpoint {
    /// The checkpoint in `dir`, created if missing.
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The model record.
    pub fn model(&self) -> PathBuf {
        self.dir.join("model.bpk")
    }

    /// The optimizer record.
    pub fn optimizer(&self) -> PathBuf {
        self.dir.join("optimizer.bpk")
    }

    fn state(&self) -> PathBuf {
        self.dir.join("train.json")
    }

    /// Writes the model and optimizer records (Burn's format) and the progress file.
    pub fn save(
        &self,
        model: &SparseTransformer,
        optimizer: &ModuleOptimizer,
        state: &TrainState,
    ) -> anyhow::Result<()> {
        model.clone().save_file(self.model())?;
        optimizer.save(self.optimizer())?;
        std::fs::write(self.state(), serde_json::to_string_pretty(state)?)
            .with_context(|| format!("writing {}", self.state().display()))
    }

    /// Reads the progress file of an existing checkpoint, to resume it.
    pub fn load_state(&self) -> anyhow::Result<TrainState> {
        self.read_state(
            &[self.state(), self.model(), self.optimizer()],
            "run once without --resume",
        )
    }

    /// Reads the progress file of a checkpoint whose model is used without its optimizer
    /// (the `generate` example).
    #[allow(dead_code)] // the train example resumes with `load_state`
    pub fn load_model_state(&self) -> anyhow::Result<TrainState> {
        self.read_state(&[self.state(), self.model()], "run the train example first")
    }

    fn read_state(&self, files: &[PathBuf], hint: &str) -> anyhow::Result<TrainState> {
        for file in files {
            if !file.is_file() {
                bail!(
                    "no checkpoint in {}: {} is missing ({hint})",
                    self.dir.display(),
                    file.display()
                );
            }
        }
        let text = std::fs::read_to_string(self.state())?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", self.state().display()))
    }
}
