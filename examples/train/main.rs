//! Train a byte-level sparse transformer language model — the project's main command.
//!
//! ```text
//! cargo run --release --example train                      # built-in text, local pattern
//! cargo run --release --example train -- --pattern fixed   # any built-in pattern
//! cargo run --release --example train -- --dense           # Burn's dense attention
//! cargo run --release --example train -- --data enwik8 --seq-len 1024 --steps 5000
//! cargo run --release --example train -- --resume          # continue the last run
//! ```
//!
//! Default data is this repository's own docs and sources (read when it starts), the
//! last 10% held out. Writes `target/train/{model.bpk, optimizer.bpk, train.json,
//! loss.png}` and prints validation bits per byte, tokens/s and a generated sample.

mod checkpoint;
mod data;
mod model_args;
mod plot;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData, activation::softmax};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sparse_attn::backends;
use sparse_attn::nn::{GenerateConfig, SparseTransformer, SparseTransformerConfig};

use checkpoint::{Checkpoint, TrainState};
use data::{Corpus, random_batch, sequential_batches};
use model_args::ModelArgs;

#[derive(Parser)]
#[command(about = "Train a byte-level sparse transformer language model")]
struct Args {
    /// Text file to train on (any bytes; enwik8 works as is). Default: built-in corpus.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Backend (those compiled in: ndarray by default; flex, wgpu with their features).
    #[arg(long, default_value = "ndarray")]
    backend: String,
    /// The model.
    #[command(flatten)]
    model: ModelArgs,
    /// Total optimizer steps (a resumed run continues up to this count).
    #[arg(long, default_value_t = 400)]
    steps: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Peak learning rate (AdamW; linear warm-up, cosine decay).
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Steps between validations (and checkpoints).
    #[arg(long, default_value_t = 50)]
    eval_every: usize,
    /// Seconds between progress lines when stderr is not a terminal (a log, a pipe).
    #[arg(long, default_value_t = 10.0)]
    log_every: f64,
    /// Validation windows (consecutive, from the held-out tail).
    #[arg(long, default_value_t = 48)]
    eval_windows: usize,
    /// Checkpoint and plot directory.
    #[arg(long, default_value = "target/train")]
    out: PathBuf,
    /// Resume from the checkpoint in `--out`.
    #[arg(long)]
    resume: bool,
    /// Bytes to generate at the end (0: none).
    #[arg(long, default_value_t = 300)]
    sample_len: usize,
    /// Prompt of the generated sample.
    #[arg(long, default_value = "/// Block-sparse attention")]
    prompt: String,
}

impl Args {
    /// Warm-up over the first 10% of the steps, then cosine decay to 10% of the peak.
    fn learning_rate(&self, step: usize) -> f64 {
        let warmup = (self.steps / 10).max(1);
        if step < warmup {
            return self.lr * (step + 1) as f64 / warmup as f64;
        }
        let progress = (step - warmup) as f64 / (self.steps - warmup).max(1) as f64;
        self.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()))
    }
}

/// Mean validation loss in bits per byte (no autodiff, dropout off).
fn validate(model: &SparseTransformer, batches: &[Tensor<2, Int>]) -> anyhow::Result<f64> {
    let model = model.valid();
    let (mut sum, mut rows) = (0.0, 0);
    for batch in batches {
        let n = batch.dims()[0];
        let loss: f32 = model.loss(batch.clone())?.into_scalar();
        sum += f64::from(loss) * n as f64;
        rows += n;
    }
    Ok(sum / rows as f64 / std::f64::consts::LN_2)
}

/// Samples `len` bytes after `prompt` (temperature 0.8). A sparse model generates through
/// its key/value caches (`SparseTransformer::generate`: one prefill, then one cached step per
/// byte; the prompt keeps its last `seq_len - len` bytes); the dense baseline has no cache
/// here and runs a forward over its last `seq_len` bytes per byte.
fn generate(
    model: &SparseTransformer,
    dense: bool,
    prompt: &str,
    len: usize,
    seq_len: usize,
    rng: &mut StdRng,
    device: &Device,
) -> anyhow::Result<String> {
    let model = model.valid();
    let mut bytes = prompt.as_bytes().to_vec();
    if bytes.is_empty() {
        bytes.push(b'\n');
    }
    if !dense {
        let len = len.min(seq_len - 1);
        let keep = bytes.len().min(seq_len - len);
        let prompt: Vec<u32> = bytes[bytes.len() - keep..]
            .iter()
            .map(|&b| u32::from(b))
            .collect();
        let config = GenerateConfig::new(len)
            .with_temperature(0.8)
            .with_seed(rng.random());
        let new = model.generate(&[prompt], &config, device)?;
        bytes.extend(new[0].iter().map(|&t| t as u8));
        return Ok(String::from_utf8_lossy(&bytes).into_owned());
    }
    for _ in 0..len {
        let context = &bytes[bytes.len().saturating_sub(seq_len)..];
        let ids: Vec<i64> = context.iter().map(|&b| b as i64).collect();
        let n = ids.len();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), device);
        let logits = model
            .forward(tokens)?
            .slice([0..1, n - 1..n, 0..256])
            .reshape([256]);
        let probs: Vec<f32> = softmax(logits.div_scalar(0.8), 0)
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let mut u: f32 = rng.random();
        let next = probs
            .iter()
            .position(|&p| {
                u -= p;
                u <= 0.0
            })
            .unwrap_or(255);
        bytes.push(next as u8);
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
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
    let started = Instant::now();
    let device = backends::device(&args.backend)?;
    let train_device = device.clone().autodiff();
    let corpus = Corpus::load(args.data.as_deref(), 0.1, args.model.seq_len + 1)?;
    let checkpoint = Checkpoint::new(&args.out)?;
    let pattern = if args.model.dense {
        "dense".to_string()
    } else {
        format!("{:?}", args.model.pattern).to_lowercase()
    };

    let (config, mut state) = if args.resume {
        let state = checkpoint.load_state()?;
        let config: SparseTransformerConfig = serde_json::from_value(state.model.clone())
            .context("the checkpoint's model configuration")?;
        (config, state)
    } else {
        let config = args.model.model_config();
        let state = TrainState {
            model: serde_json::to_value(&config)?,
            pattern: pattern.clone(),
            step: 0,
            train_curve: Vec::new(),
            valid_curve: Vec::new(),
            train_seconds: 0.0,
            train_tokens: 0,
        };
        (config, state)
    };
    let seq_len = config.max_seq_len;
    let mut model = config.init(&train_device)?;
    let mut optimizer = AdamWConfig::new().with_weight_decay(0.01).init();
    if args.resume {
        model = model
            .try_load_file(checkpoint.model())
            .with_context(|| format!("loading {}", checkpoint.model().display()))?;
        optimizer = optimizer
            .load(checkpoint.optimizer())
            .with_context(|| format!("loading {}", checkpoint.optimizer().display()))?;
    }
    println!(
        "data: {} ({} training / {} validation bytes)\nmodel: {} parameters, pattern {}, seq_len {seq_len}, backend {}{}",
        corpus.source,
        corpus.train.len(),
        corpus.valid.len(),
        model.num_params(),
        state.pattern,
        args.backend,
        if args.resume {
            format!(", resumed at step {}", state.step)
        } else {
            String::new()
        },
    );

    let valid = sequential_batches(
        &corpus.valid,
        args.batch,
        seq_len + 1,
        args.eval_windows,
        &device,
    );
    let mut rng = StdRng::seed_from_u64(args.model.seed.wrapping_add(state.step as u64));
    if state.valid_curve.is_empty() {
        state.valid_curve.push((0, validate(&model, &valid)?));
    }
    // A bar on a terminal; elsewhere (a CI log, `nohup`, a pipe) a plain line every few
    // seconds and at every evaluation, so that long runs stay readable.
    let on_terminal = std::io::stderr().is_terminal();
    let bar = if on_terminal {
        ProgressBar::new(args.steps as u64).with_position(state.step as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(ProgressStyle::with_template(
        "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
    )?);
    let (mut last_line, first_step, loop_start) = (Instant::now(), state.step, Instant::now());
    let mut last_valid = state.valid_curve.last().map_or(f64::NAN, |p| p.1);
    while state.step < args.steps {
        let tick = Instant::now();
        let batch = random_batch(
            &corpus.train,
            args.batch,
            seq_len + 1,
            &mut rng,
            &train_device,
        );
        let loss = model.loss(batch)?;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(args.learning_rate(state.step), model, grads);
        let loss: f32 = loss.into_scalar();
        state.train_seconds += tick.elapsed().as_secs_f64();
        state.train_tokens += (args.batch * seq_len) as u64;
        state.step += 1;
        let bits = f64::from(loss) / std::f64::consts::LN_2;
        state.train_curve.push((state.step, bits));
        let evaluated = state.step % args.eval_every == 0 || state.step == args.steps;
        if evaluated {
            last_valid = validate(&model, &valid)?;
            state.valid_curve.push((state.step, last_valid));
            checkpoint.save(&model, &optimizer, &state)?;
        }
        let message = format!(
            "train {bits:.3} bpb | valid {last_valid:.3} bpb | {:.0} tok/s",
            state.train_tokens as f64 / state.train_seconds
        );
        if !on_terminal && (evaluated || last_line.elapsed().as_secs_f64() >= args.log_every) {
            last_line = Instant::now();
            let per_step = loop_start.elapsed().as_secs_f64() / (state.step - first_step) as f64;
            let eta = per_step * (args.steps - state.step) as f64;
            eprintln!(
                "step {}/{} | {message} | eta {:.0} s",
                state.step, args.steps, eta
            );
        }
        bar.set_position(state.step as u64);
        bar.set_message(message);
    }
    bar.finish();
    if state.train_curve.is_empty() {
        // `--steps 0` on a fresh run: still leave a complete, resumable checkpoint.
        checkpoint.save(&model, &optimizer, &state)?;
    }

    let plot = args.out.join("loss.png");
    let title = format!("byte LM, {} attention, n = {seq_len}", state.pattern);
    plot::loss_curves(&plot, &title, &state.train_curve, &state.valid_curve)?;
    let first = state.valid_curve.first().map_or(f64::NAN, |p| p.1);
    println!(
        "validation bits/byte: {first:.3} (step 0) -> {last_valid:.3} (step {}); {:.0} training tokens/s; wall time {:.1} s",
        state.step,
        state.train_tokens as f64 / state.train_seconds.max(1e-9),
        started.elapsed().as_secs_f64()
    );
    println!(
        "wrote {}, {}, {}",
        checkpoint.model().display(),
        checkpoint.optimizer().display(),
        plot.display()
    );
    if args.sample_len > 0 {
        let sample = generate(
            &model,
            config.dense,
            &args.prompt,
            args.sample_len,
            seq_len,
            &mut rng,
            &device,
        )?;
        println!("--- sample ---\n{sample}\n--------------");
    }
    Ok(())
}
