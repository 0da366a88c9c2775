//! Generate text with the byte-level model that the `train` example wrote.
//!
//! ```text
//! cargo run --release --example train                 # writes target/train/
//! cargo run --release --example generate -- --prompt "fn main" --tokens 400
//! ```
//!
//! Loads `target/train/model.bpk` with the configuration saved beside it (`train.json`),
//! then generates through the key/value caches of every block
//! (`SparseTransformer::generate`): one prefill of the prompt, then one cached step per
//! byte, so each byte costs the same whatever the text before it. Prints a progress line
//! (bytes, bytes/s) while it runs and the text at the end.

#[path = "train/checkpoint.rs"]
#[allow(dead_code)] // the optimizer half of the checkpoint is the train example's
mod checkpoint;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use burn::module::Module;
use clap::Parser;
use sparse_attn::backends;
use sparse_attn::nn::{GenerateConfig, SparseTransformerConfig};

use checkpoint::Checkpoint;

#[derive(Parser)]
struct Args {
    /// Checkpoint directory that `train` wrote.
    #[arg(long, default_value = "target/train")]
    checkpoint: PathBuf,
    /// Backend (`ndarray`, `flex`, `wgpu`, `vulkan`: those this build has).
    #[arg(long, default_value = "ndarray")]
    backend: String,
    /// Text to continue (its last bytes, so that prompt plus new bytes fit the model's
    /// sequence length).
    #[arg(long, default_value = "/// Block-sparse attention")]
    prompt: String,
    /// Bytes to generate (at most the model's sequence length minus one).
    #[arg(long, default_value_t = 300)]
    tokens: usize,
    /// Sampling temperature (0: the most likely byte).
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample among the `k` most likely bytes only.
    #[arg(long)]
    top_k: Option<usize>,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Bytes between progress lines.
    #[arg(long, default_value_t = 16)]
    every: usize,
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let device = backends::device(&args.backend)?;
    let checkpoint = Checkpoint::new(&args.checkpoint)?;
    let state = checkpoint.load_model_state()?;
    let config: SparseTransformerConfig = serde_json::from_value(state.model.clone())
        .context("the checkpoint's model configuration")?;
    if config.dense {
        bail!(
            "the checkpoint is the dense baseline (`train --dense`): cached generation needs sparse attention blocks"
        );
    }
    let model = config
        .init(&device)?
        .try_load_file(checkpoint.model())
        .with_context(|| format!("loading {}", checkpoint.model().display()))?;
    let seq_len = config.max_seq_len;
    if args.tokens == 0 || args.tokens >= seq_len {
        bail!(
            "--tokens {} must be between 1 and {} (the model's sequence length minus one)",
            args.tokens,
            seq_len - 1
        );
    }
    let mut bytes = args.prompt.into_bytes();
    if bytes.is_empty() {
        bytes.push(b'\n');
    }
    let keep = bytes.len().min(seq_len - args.tokens);
    let prompt: Vec<u32> = bytes[bytes.len() - keep..]
        .iter()
        .map(|&b| u32::from(b))
        .collect();
    println!(
        "model: {} parameters, pattern {}, seq_len {seq_len}, backend {}; prompt {} bytes",
        model.num_params(),
        state.pattern,
        args.backend,
        prompt.len()
    );
    let config = GenerateConfig::new(args.tokens)
        .with_temperature(args.temperature)
        .with_top_k(args.top_k)
        .with_seed(args.seed);
    let started = Instant::now();
    let mut done = 0usize;
    // On a terminal the progress line rewrites itself; in a log or a pipe each is a line.
    let end = if std::io::stderr().is_terminal() {
        '\r'
    } else {
        '\n'
    };
    let new = model.generate_with(std::slice::from_ref(&prompt), &config, &device, |_| {
        done += 1;
        if done.is_multiple_of(args.every.max(1)) || done == args.tokens {
            let secs = started.elapsed().as_secs_f64();
            eprint!(
                "{done}/{} bytes, {:.1} bytes/s{end}",
                args.tokens,
                done as f64 / secs.max(1e-9)
            );
            let _ = std::io::stderr().flush();
        }
    })?;
    if end == '\r' {
        eprintln!();
    }
    let out: Vec<u8> = prompt.iter().chain(&new[0]).map(|&t| t as u8).collect();
    println!("{}", String::from_utf8_lossy(&out));
    Ok(())
}
