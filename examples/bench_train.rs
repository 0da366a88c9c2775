//! End-to-end training throughput: the same byte-level transformer trained with our
//! sparse attention and with Burn's dense `MultiHeadAttention` (causal mask), measured in
//! one run on the same backend, reported as tokens/s and their ratio.
//!
//! `cargo xtask bench train` (release build) prints a markdown table and writes
//! `target/bench/train.json`.
//!
//! Each configuration trains on random bytes (throughput does not depend on the text)
//! with the same number of tokens per step at every `n`; one warm-up step, then the
//! median of the timed steps (forward, backward and optimizer step, with the loss read
//! back, so lazy backends finish their work inside the timed region). A configuration that
//! fails (Burn's dense attention asking a Vulkan device for a buffer beyond its limit) is
//! reported as `failed: <reason>` and the run goes on.

#[path = "common/caught.rs"]
mod caught;

use std::path::PathBuf;
use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Distribution, Tensor};
use clap::Parser;
use serde::Serialize;
use sparse_attn::backends;
use sparse_attn::nn::{PatternConfig, SparseTransformerConfig};

#[derive(Parser)]
struct Args {
    /// Backend (those compiled in).
    #[arg(long, default_value = "ndarray")]
    backend: String,
    /// Sequence lengths.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096")]
    n: Vec<usize>,
    /// Tokens per optimizer step (batch = tokens / n).
    #[arg(long, default_value_t = 8192)]
    tokens: usize,
    /// Causal window of the sparse model (pattern `local`).
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Layout block size.
    #[arg(long, default_value_t = 64)]
    block: usize,
    /// Model width.
    #[arg(long, default_value_t = 128)]
    d_model: usize,
    /// Heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Blocks.
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Timed steps per configuration.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// JSON output.
    #[arg(long, default_value = "target/bench/train.json")]
    out: PathBuf,
}

#[derive(Serialize)]
struct Row {
    backend: String,
    n: usize,
    batch: usize,
    d_model: usize,
    heads: usize,
    layers: usize,
    window: usize,
    block: usize,
    threads: usize,
    sparse: Cell,
    dense: Cell,
    /// Dense step time over ours, when both ran.
    speedup: Option<f64>,
}

/// One configuration's measurement, or why it failed (a backend refusing an allocation:
/// Burn's dense attention asks the Vulkan device for its `n x n` scores in one buffer).
#[derive(Serialize)]
struct Cell {
    step_ms: Option<f64>,
    tokens_per_s: Option<f64>,
    failed: Option<String>,
}

impl Cell {
    fn new(result: Result<f64, String>, tokens: usize) -> Self {
        match result {
            Ok(ms) => Self {
                step_ms: Some(ms),
                tokens_per_s: Some(tokens as f64 / (ms / 1e3)),
                failed: None,
            },
            Err(reason) => Self {
                step_ms: None,
                tokens_per_s: None,
                failed: Some(reason),
            },
        }
    }

    /// `ms/step | tok/s`, or the failure in both columns' place.
    fn columns(&self) -> String {
        match (self.step_ms, self.tokens_per_s, &self.failed) {
            (Some(ms), Some(per_s), _) => format!("{ms:.1} | {per_s:.0}"),
            (_, _, failed) => format!("failed: {} | -", failed.as_deref().unwrap_or("?")),
        }
    }
}

/// [`step_ms`] with an error or a panic inside it (raised when the loss is read back, for
/// a launch that failed) turned into `Err(reason)`, so that one failed configuration does
/// not end the run.
fn try_step_ms(
    args: &Args,
    config: &SparseTransformerConfig,
    batch: usize,
    n: usize,
) -> Result<f64, String> {
    caught::caught(|| step_ms(args, config, batch, n).map_err(|e| e.to_string()))
}

/// Median step time in ms of training `config` on `[batch, n + 1]` random bytes.
fn step_ms(
    args: &Args,
    config: &SparseTransformerConfig,
    batch: usize,
    n: usize,
) -> anyhow::Result<f64> {
    let device = backends::device(&args.backend)?.autodiff();
    let mut model = config.init(&device)?;
    let mut optimizer = AdamWConfig::new().init();
    let mut times = Vec::new();
    for step in 0..=args.steps {
        let tokens =
            Tensor::<2>::random([batch, n + 1], Distribution::Uniform(0.0, 255.0), &device).int();
        let start = Instant::now();
        let loss = model.loss(tokens)?;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(1e-3, model, grads);
        let _: f32 = loss.into_scalar();
        if step > 0 {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rows = Vec::new();
    println!("| n | batch | ours ms/step | ours tok/s | dense ms/step | dense tok/s | speedup |");
    println!("|---|---|---|---|---|---|---|");
    for &n in &args.n {
        let batch = (args.tokens / n).max(1);
        let config = |dense| {
            SparseTransformerConfig::new(
                256,
                args.d_model,
                args.heads,
                args.layers,
                n,
                PatternConfig::Local { ctx: args.window },
            )
            .with_block_size(args.block)
            .with_dense(dense)
        };
        let tokens = batch * n;
        let sparse = Cell::new(try_step_ms(&args, &config(false), batch, n), tokens);
        let dense = Cell::new(try_step_ms(&args, &config(true), batch, n), tokens);
        let speedup = sparse.step_ms.zip(dense.step_ms).map(|(s, d)| d / s);
        println!(
            "| {n} | {batch} | {} | {} | {} |",
            sparse.columns(),
            dense.columns(),
            speedup.map_or("-".to_string(), |x| format!("{x:.2}x"))
        );
        let row = Row {
            backend: args.backend.clone(),
            n,
            batch,
            d_model: args.d_model,
            heads: args.heads,
            layers: args.layers,
            window: args.window,
            block: args.block,
            threads: std::thread::available_parallelism().map_or(1, |t| t.get()),
            sparse,
            dense,
            speedup,
        };
        rows.push(row);
    }
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&rows)?)?;
    println!("wrote {}", args.out.display());
    Ok(())
}
