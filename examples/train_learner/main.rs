//! Train the byte-level sparse transformer language model through burn-train's `Learner`:
//! its metrics (loss, bits per byte, learning rate), checkpoints, dashboard, and
//! data-parallel training over several devices.
//!
//! ```text
//! cargo run --release --example train_learner --features learner
//! cargo run --release --example train_learner --features learner -- --devices 2
//! cargo run --release --example train_learner --features learner,vulkan -- \
//!     --backend vulkan --devices 2 --seq-len 4096 --ctx 256 --d-model 512 --heads 8 --layers 6
//! cargo run --release --example train_learner --features learner -- --resume 1
//! ```
//!
//! The model and data are the `train` example's (same pattern and size arguments, the same
//! built-in corpus or `--data FILE`, the last 10% held out); `train` stays the zero-setup
//! command with its own loop, this one shows that the layers work unchanged inside Burn's
//! training engine. An epoch is one pass over the training text in non-overlapping windows
//! (`--train-windows` takes fewer, spread over the text), shuffled per epoch.
//!
//! `--devices N` trains data-parallel through `ExecutionStrategy::MultiDevice`: each device
//! holds a replica, takes `batch / N` sequences of every step, and the replicas' gradients
//! are summed on the first device (or, with `--sharded`, each device optimises its share of
//! the parameters). A CPU backend has one device, so its replicas share it (one thread each).
//! On a terminal burn-train draws its dashboard; elsewhere (a log, a pipe) a plain line is
//! printed every `--log-every` seconds. Checkpoints go to `OUT/checkpoint`; `--resume E`
//! continues after epoch `E`.

#[allow(dead_code)] // The `train` example's batch samplers: this one batches with burn's loader.
#[path = "../train/data.rs"]
mod data;
#[path = "../train/model_args.rs"]
mod model_args;
mod progress;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::optim::AdamWConfig;
use burn::optim::lr_scheduler::LrSchedulerConfig;
use burn::optim::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::optim::lr_scheduler::linear::LinearLrSchedulerConfig;
use burn::optim::lr_scheduler::sequential::SequentialLrSchedulerConfig;
use burn::tensor::Device;
use burn::train::metric::{LearningRateMetric, LossMetric};
use burn::train::{
    ExecutionStrategy, Learner, MultiDeviceOptim, SupervisedTraining, TrainingStrategy,
};
use clap::Parser;
use sparse_attn::backends;
use sparse_attn::nn::{
    BitsPerTokenMetric, SparseTransformer, TokenBatcher, seed_attention_dropout,
};

use data::Corpus;
use model_args::ModelArgs;
use progress::PlainProgress;

#[derive(Parser)]
#[command(about = "Train a byte-level sparse transformer LM through burn-train's Learner")]
struct Args {
    /// Text file to train on (any bytes). Default: built-in corpus.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Backend (those compiled in: ndarray by default; flex, wgpu, vulkan with their features).
    #[arg(long, default_value = "ndarray")]
    backend: String,
    /// Devices to train on, data-parallel (one model replica each).
    #[arg(long, default_value_t = 1)]
    devices: usize,
    /// Shard the optimizer over the devices instead of stepping it on the first one.
    #[arg(long)]
    sharded: bool,
    /// The model.
    #[command(flatten)]
    model: ModelArgs,
    /// Sequences per optimizer step, over all devices (a multiple of `--devices`).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Epochs (passes over the training windows).
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Training windows per epoch, spread evenly over the text (default: all of them).
    #[arg(long)]
    train_windows: Option<usize>,
    /// Validation windows (consecutive, from the held-out tail).
    #[arg(long, default_value_t = 48)]
    eval_windows: usize,
    /// Peak learning rate (AdamW; linear warm-up over 10% of the steps, cosine decay to
    /// 10% of the peak).
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Directory of the checkpoints and burn-train's logs.
    #[arg(long, default_value = "target/train_learner")]
    out: PathBuf,
    /// Resume after this epoch from the checkpoints in `--out`.
    #[arg(long)]
    resume: Option<usize>,
    /// Seconds between progress lines when stdout is not a terminal.
    #[arg(long, default_value_t = 10.0)]
    log_every: f64,
}

/// Non-overlapping windows of `len` bytes of `bytes` as token ids; `max` of them, spread
/// evenly over the text, when given.
fn windows(bytes: &[u8], len: usize, max: Option<usize>) -> Vec<Vec<u32>> {
    let all = bytes.len() / len;
    let count = max.map_or(all, |m| m.min(all));
    (0..count)
        .map(|i| {
            let start = i * all / count * len;
            bytes[start..start + len]
                .iter()
                .map(|&b| u32::from(b))
                .collect()
        })
        .collect()
}

/// Linear warm-up over the first 10% of `steps`, then cosine decay to 10% of `peak`.
fn schedule(peak: f64, steps: usize) -> anyhow::Result<SequentialLrSchedulerConfig> {
    let warmup = (steps / 10).max(1);
    if !(peak > 0.0 && peak <= 1.0) {
        bail!("--lr {peak}: expected a learning rate in (0, 1]");
    }
    Ok(SequentialLrSchedulerConfig::new(
        vec![
            LrSchedulerConfig::Linear(LinearLrSchedulerConfig::new(
                peak / warmup as f64,
                peak,
                warmup,
            )),
            LrSchedulerConfig::Cosine(
                CosineAnnealingLrSchedulerConfig::new(peak, steps.saturating_sub(warmup).max(1))
                    .with_min_lr(peak / 10.0),
            ),
        ],
        vec![warmup],
    ))
}

/// The mean next-token loss of `model` (in validation mode) over `windows`, in bits per
/// byte, in batches of `batch` on `device`.
fn valid_bits(
    model: &SparseTransformer,
    windows: &[Vec<u32>],
    batch: usize,
    device: &Device,
) -> anyhow::Result<f64> {
    let model = model.valid();
    let (mut sum, mut rows) = (0.0, 0);
    for group in windows.chunks(batch) {
        let loss: f32 = model
            .sequence_output(TokenBatcher.batch(group.to_vec(), device))?
            .loss
            .into_scalar();
        sum += f64::from(loss) * group.len() as f64;
        rows += group.len();
    }
    Ok(sum / rows.max(1) as f64 / std::f64::consts::LN_2)
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Trains as `args` say; the validation bits per byte before and after.
fn run(args: Args) -> anyhow::Result<(f64, f64)> {
    if args.devices == 0 || !args.batch.is_multiple_of(args.devices) {
        bail!(
            "--batch {} over --devices {}: expected at least one device and a batch that \
             divides evenly among them",
            args.batch,
            args.devices
        );
    }
    let per_device = args.batch / args.devices;
    let devices: Vec<_> = backends::devices(&args.backend, args.devices)?
        .into_iter()
        .map(|d| d.autodiff())
        .collect();
    let main = devices[0].clone();
    let seq_len = args.model.seq_len;
    let corpus = Corpus::load(args.data.as_deref(), 0.1, seq_len + 1)?;
    let train = windows(&corpus.train, seq_len + 1, args.train_windows);
    let valid = windows(&corpus.valid, seq_len + 1, Some(args.eval_windows));
    let steps = args.epochs * train.len().div_ceil(args.batch);
    seed_attention_dropout(args.model.seed);

    let config = args.model.model_config();
    let model = config.init(&main)?;
    println!(
        "data: {} ({} training windows, {} validation windows of {seq_len} bytes)\nmodel: {} \
         parameters, pattern {:?}, backend {} on {} device(s), {per_device} sequences per \
         device and step, {steps} steps",
        corpus.source,
        train.len(),
        valid.len(),
        model.num_params(),
        args.model.pattern,
        args.backend,
        args.devices,
    );
    let plain = main.clone().without_autodiff();
    let before = valid_bits(&model, &valid, per_device, &plain)?;
    let scheduler = schedule(args.lr, steps)?
        .init()
        .map_err(|e| anyhow::anyhow!("learning-rate schedule: {e}"))?;
    let learner = Learner::new(
        model,
        AdamWConfig::new().with_weight_decay(0.01).init(),
        scheduler,
    );
    let loader = |items: Vec<Vec<u32>>, shuffle: bool| {
        let builder = DataLoaderBuilder::new(TokenBatcher)
            .batch_size(per_device)
            .set_device(main.clone());
        let builder = if shuffle {
            builder.shuffle(args.model.seed)
        } else {
            builder
        };
        builder.build(InMemDataset::new(items))
    };
    let valid_loader = loader(valid.clone(), false);
    let train_tokens = args.epochs * train.len() * seq_len;
    let mut training = SupervisedTraining::new(&args.out, loader(train, true), valid_loader)
        .metrics((LossMetric::new(), BitsPerTokenMetric::new()))
        .metric_train_numeric(LearningRateMetric::new())
        .with_default_checkpointers()
        .num_epochs(args.epochs)
        .summary();
    if args.devices > 1 {
        let optim = if args.sharded {
            MultiDeviceOptim::OptimSharded
        } else {
            MultiDeviceOptim::OptimMainDevice
        };
        training = training.with_training_strategy(TrainingStrategy::Default(
            ExecutionStrategy::multi(devices, optim),
        ));
    }
    if let Some(epoch) = args.resume {
        training = training.checkpoint(epoch);
    }
    if !std::io::stdout().is_terminal() {
        training = training.renderer(Box::new(PlainProgress::new(args.log_every, seq_len)));
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let started = Instant::now();
    let result = training.launch(learner);
    let seconds = started.elapsed().as_secs_f64();
    if let Some(error) = &result.error {
        bail!("training failed: {error}");
    }
    if let Some(stop) = &result.interrupted {
        println!(
            "training stopped early: {}",
            stop.reason.as_deref().unwrap_or("no reason given")
        );
    }
    let after = valid_bits(&result.model, &valid, per_device, &plain)?;
    println!(
        "validation bits/byte: {before:.3} -> {after:.3}; {train_tokens} training tokens in \
         {seconds:.1} s with validation ({:.0} tokens/s); checkpoints in {}",
        train_tokens as f64 / seconds,
        args.out.join("checkpoint").display()
    );
    Ok((before, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A few steps of the example on the CPU, on one device and on two replicas: the
    /// validation loss falls.
    #[test]
    fn the_example_trains_on_one_and_two_replicas() {
        for devices in ["1", "2"] {
            let out = std::env::temp_dir().join(format!(
                "sparse-attn-train-learner-{}-{devices}",
                std::process::id()
            ));
            let args = Args::parse_from([
                "train_learner",
                "--devices",
                devices,
                "--seq-len",
                "32",
                "--d-model",
                "32",
                "--heads",
                "2",
                "--layers",
                "1",
                "--block",
                "8",
                "--ctx",
                "16",
                "--batch",
                "4",
                "--train-windows",
                "64",
                "--eval-windows",
                "8",
                "--lr",
                "0.01",
                "--out",
                out.to_str().unwrap(),
            ]);
            let (before, after) = run(args).unwrap();
            let _ = std::fs::remove_dir_all(&out);
            assert!(
                after < before - 1.0,
                "{devices} device(s): {before} -> {after}"
            );
        }
    }
}
