//! Byte-level training data: the text, its train/validation split, and batch sampling.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::Rng;
use rand::rngs::StdRng;

/// The workspace this example was built from: its docs and sources are the built-in corpus.
const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// The repository's own text, Markdown docs first and then Rust sources, each in path
/// order (so the split is reproducible): the default training data, read when the example
/// starts so that `cargo run --example train` needs no download.
fn builtin_corpus() -> anyhow::Result<Vec<u8>> {
    fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let (path, name) = (entry.path(), entry.file_name());
            let name = name.to_string_lossy();
            if name.starts_with('.') || name == "target" {
                continue;
            }
            if path.is_dir() {
                collect(&path, out);
            } else if name.ends_with(".md") || name.ends_with(".rs") {
                out.push(path);
            }
        }
    }
    let root = Path::new(WORKSPACE);
    if !root.join("crates").is_dir() {
        bail!(
            "the built-in corpus is this repository's text, but {} is not the repository any \
             more; pass --data FILE",
            root.display()
        );
    }
    let mut files = vec![root.join("README.md")];
    for dir in ["crates", "examples", "xtask"] {
        collect(&root.join(dir), &mut files);
    }
    files.sort_by_key(|p| (!p.to_string_lossy().ends_with(".md"), p.clone()));
    let mut corpus = Vec::new();
    for file in files {
        if let Ok(text) = fs::read(&file) {
            corpus.extend(text);
            corpus.push(b'\n');
        }
    }
    Ok(corpus)
}

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
                builtin_corpus()?,
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
