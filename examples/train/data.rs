//! Byte-level training data: the text, its train/validation split, and batch sampling.

use std::path::Path;

use anyhow::{Context, bail};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::Rng;
use rand::rngs::StdRng;

/// The repository's own docs and sources, gathered by the facade's build script.
const BUILTIN: &str = include_str!(concat!(env!("OUT_DIR"), "/corpus.txt"));

/// A byte corpus split into a training part and a held-out tail.
pub struct Corpus {
    /// Where the text came from, for the log.
    pub source: String,
    /// Training bytes (the first `1 - holdout` of the text).
    pub train: Vec<u8>,
    /// Validation bytes (the last `holdout` of the text).
    pub valid: Vec<u8>,
}

impl Corpus {
    /// Reads `path` (or the built-in corpus) and holds out its last `holdout` fraction.
    ///
    /// Errors when the file is missing, empty, or too short for one window of
    /// `seq_len + 1` bytes in each part.
    pub fn load(path: Option<&Path>, holdout: f64, seq_len: usize) -> anyhow::Result<Self> {
        let (source, bytes) = match path {
            Some(path) => (
                path.display().to_string(),
                std::fs::read(path)
                    .with_context(|| format!("reading data file {}", path.display()))?,
            ),
            None => (
                "built-in corpus (this repository's docs and sources)".to_string(),
                BUILTIN.as_bytes().to_vec(),
            ),
        };
        if bytes.is_empty() {
            bail!("data file {source} is empty");
        }
        let split = ((bytes.len() as f64) * (1.0 - holdout)) as usize;
        let (train, valid) = bytes.split_at(split);
        for (part, len) in [("training", train.len()), ("validation", valid.len())] {
            if len <= seq_len {
                bail!(
                    "{source}: the {part} part has {len} bytes, fewer than one window of \
                     {} (seq_len + 1); use more text or a shorter --seq-len",
                    seq_len + 1
                );
            }
        }
        Ok(Self {
            source,
            train: train.to_vec(),
            valid: valid.to_vec(),
        })
    }
}

/// `batch` random windows of `len` bytes of `bytes`, as token ids `[batch, len]`.
pub fn random_batch(
    bytes: &[u8],
    batch: usize,
    len: usize,
    rng: &mut StdRng,
    device: &Device,
) -> Tensor<2, Int> {
    let mut ids = Vec::with_capacity(batch * len);
    for _ in 0..batch {
        let start = rng.random_range(0..=bytes.len() - len);
        ids.extend(bytes[start..start + len].iter().map(|&b| b as i64));
    }
    Tensor::from_data(TensorData::new(ids, [batch, len]), device)
}

/// Consecutive windows of `len` bytes covering `bytes` (the last partial one dropped), in
/// batches of at most `batch`: the fixed validation set.
pub fn sequential_batches(
    bytes: &[u8],
    batch: usize,
    len: usize,
    max_windows: usize,
    device: &Device,
) -> Vec<Tensor<2, Int>> {
    let windows: Vec<&[u8]> = bytes.chunks_exact(len).take(max_windows).collect();
    windows
        .chunks(batch)
        .map(|group| {
            let ids: Vec<i64> = group
                .iter()
                .flat_map(|w| w.iter().map(|&b| b as i64))
                .collect();
            Tensor::from_data(TensorData::new(ids, [group.len(), len]), device)
        })
        .collect()
}
