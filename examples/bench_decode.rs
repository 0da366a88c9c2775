//! Generation speed: cached decoding through our key/value caches against recomputing the
//! whole text per token and against Burn's dense transformer with its autoregressive cache,
//! in one run on one backend; then the decode kernel's time per token against the context
//! length, and the memory of a window cache after a long stream.
//!
//! `cargo xtask bench decode` (release build) prints three markdown tables and writes
//! `target/bench/decode.json`.
//!
//! - *Generation*: a byte-level model (`local` window, learned positions) generates
//!   `--tokens` tokens greedily after each prompt length. Ours: `SparseTransformer::generate`
//!   (one prefill, then one cached step per token; tokens/s of the steps after the first,
//!   which warms up the decode kernels). Recompute: one
//!   full forward of the text so far per token (what generation cost before the caches),
//!   timed over `--slow-tokens` tokens. Burn dense: `TransformerEncoder` of the same width,
//!   depth and MLP with a causal mask through `forward_autoregressive_inference` (its cache
//!   keeps the projections; each step still scores every query against every key), timed
//!   over `--slow-tokens` tokens after its prefill. A cell whose `n x n` scores would not fit
//!   in this machine's memory is skipped with the size it needed (a CPU backend would abort
//!   on the allocation); a cell that fails (a GPU refusing a buffer) says why.
//! - *Per token*: `sparse_attention_decode` of one query at the end of a cache of `n`
//!   tokens, for the window pattern and causal dense (`all`): the window's time stays flat.
//! - *Stream*: one attention layer decodes `--stream` tokens in chunks through a window cache
//!   (`new_window_cache`): its memory against what a cache of every token would hold.
//!
//! Every timed result is read back (a token, a value) before its clock stops, so lazy
//! backends finish inside the timed region and failed launches surface.

#[path = "common/caught.rs"]
mod caught;

use std::path::PathBuf;
use std::time::Instant;

use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::transformer::{
    TransformerEncoder, TransformerEncoderConfig, TransformerEncoderInput,
};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use clap::Parser;
use serde::Serialize;
use sparse_attn::nn::{
    GenerateConfig, MultiHeadSparseAttentionConfig, PatternConfig, SparseTransformer,
    SparseTransformerConfig,
};
use sparse_attn::{DecodeRows, backends, sparse_attention_decode};

#[derive(Parser)]
struct Args {
    /// Backend (those compiled in).
    #[arg(long, default_value = "ndarray")]
    backend: String,
    /// Prompt lengths of the generation table.
    #[arg(long, value_delimiter = ',', default_value = "4096,32768")]
    prompts: Vec<usize>,
    /// Tokens generated after each prompt (cached).
    #[arg(long, default_value_t = 1024)]
    tokens: usize,
    /// Tokens timed for recompute and Burn dense (each costs a pass over the whole text),
    /// after one untimed token that warms up their kernels for the new lengths.
    #[arg(long, default_value_t = 2)]
    slow_tokens: usize,
    /// Causal window of the pattern (`local`).
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Layout block size.
    #[arg(long, default_value_t = 64)]
    block: usize,
    /// Model width.
    #[arg(long, default_value_t = 512)]
    d_model: usize,
    /// Heads.
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// Blocks.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Context lengths of the per-token table.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1024,4096,16384,65536,262144,1048576"
    )]
    contexts: Vec<usize>,
    /// Tokens streamed through one layer's window cache.
    #[arg(long, default_value_t = 1 << 20)]
    stream: usize,
    /// Tokens per call of the stream.
    #[arg(long, default_value_t = 1024)]
    chunk: usize,
    /// JSON output.
    #[arg(long, default_value = "target/bench/decode.json")]
    out: PathBuf,
}

/// A measured rate, or why there is none.
#[derive(Serialize)]
struct Rate {
    tokens_per_s: Option<f64>,
    failed: Option<String>,
}

impl Rate {
    fn new(ms_per_token: Result<f64, String>) -> Self {
        match ms_per_token {
            Ok(ms) => Self {
                tokens_per_s: Some(1e3 / ms),
                failed: None,
            },
            Err(reason) => Self {
                tokens_per_s: None,
                failed: Some(reason),
            },
        }
    }

    fn column(&self) -> String {
        match (self.tokens_per_s, &self.failed) {
            (Some(t), _) => format!("{t:.1}"),
            (_, failed) => first_line(failed.as_deref().unwrap_or_default()),
        }
    }
}

/// A failure in a few words, for a table cell (the JSON keeps all of it): the buffer a
/// device refused when that is the cause (it sits at the end of CubeCL's error chain),
/// otherwise the first line.
fn first_line(reason: &str) -> String {
    const REFUSED: &str = "can't allocate buffer of size: ";
    if let Some(bytes) = reason
        .find(REFUSED)
        .and_then(|at| reason[at + REFUSED.len()..].split_whitespace().next())
        .and_then(|b| b.parse::<u64>().ok())
    {
        return format!(
            "failed: the device refused a {:.1} GiB buffer",
            bytes as f64 / (1u64 << 30) as f64
        );
    }
    reason
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(120)
        .collect()
}

#[derive(Serialize)]
struct GenerationRow {
    prompt: usize,
    tokens: usize,
    prefill_s: Option<f64>,
    cached: Rate,
    recompute: Rate,
    burn_dense: Rate,
    /// Bytes of every block's key/value cache for the prompt and its new tokens.
    cache_bytes: usize,
}

#[derive(Serialize)]
struct PerTokenRow {
    context: usize,
    window_us: Option<f64>,
    causal_us: Option<f64>,
    failed: Option<String>,
}

#[derive(Serialize)]
struct StreamRow {
    tokens: usize,
    chunk: usize,
    tokens_per_s: f64,
    window_cache_bytes: usize,
    full_cache_bytes: usize,
}

#[derive(Serialize)]
struct Report {
    backend: String,
    d_model: usize,
    heads: usize,
    layers: usize,
    window: usize,
    block: usize,
    threads: usize,
    generation: Vec<GenerationRow>,
    per_token: Vec<PerTokenRow>,
    stream: Option<StreamRow>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.slow_tokens >= 1 && args.tokens >= 3,
        "--slow-tokens must be at least 1 and --tokens at least 3"
    );
    let device = backends::device(&args.backend)?;
    let report = Report {
        backend: args.backend.clone(),
        d_model: args.d_model,
        heads: args.heads,
        layers: args.layers,
        window: args.window,
        block: args.block,
        threads: std::thread::available_parallelism().map_or(1, |t| t.get()),
        generation: generation(&args, &device)?,
        per_token: per_token(&args, &device),
        stream: (args.stream > 0)
            .then(|| stream(&args, &device))
            .transpose()?,
    };
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

fn random_text(n: usize, device: &Device) -> Tensor<2, Int> {
    Tensor::<2>::random([1, n], Distribution::Uniform(0.0, 255.0), device).int()
}

/// The most likely next token after `logits`' last row, read back.
fn last_argmax(logits: Tensor<3>) -> i64 {
    let [_, n, vocab] = logits.dims();
    logits
        .slice([0..1, n - 1..n, 0..vocab])
        .reshape([vocab])
        .argmax(0)
        .into_scalar::<i64>()
}

fn generation(args: &Args, device: &Device) -> anyhow::Result<Vec<GenerationRow>> {
    println!(
        "\n### Generation: {} tokens after a prompt (d_model {}, {} heads, {} layers, window {}, block {}, {})\n",
        args.tokens, args.d_model, args.heads, args.layers, args.window, args.block, args.backend
    );
    println!(
        "| prompt | prefill s | cached tok/s | recompute tok/s | Burn dense (cached) tok/s | cached / recompute | cached / Burn dense | KV cache MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for &prompt in &args.prompts {
        let max_seq_len = prompt + args.tokens.max(args.slow_tokens + 1);
        let model = SparseTransformerConfig::new(
            256,
            args.d_model,
            args.heads,
            args.layers,
            max_seq_len,
            PatternConfig::Local { ctx: args.window },
        )
        .with_block_size(args.block)
        .init(device)?;
        let text: Vec<u32> = random_text(prompt, device)
            .into_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?
            .into_iter()
            .map(|t| t as u32)
            .collect();
        let (prefill_s, cached) =
            match caught::caught(|| cached_rate(&model, &text, args.tokens, device)) {
                Ok((prefill, ms)) => (Some(prefill), Rate::new(Ok(ms))),
                Err(e) => (None, Rate::new(Err(e))),
            };
        let recompute = Rate::new(caught::caught(|| {
            recompute_ms(&model, prompt, args.slow_tokens, device)
        }));
        let burn_dense = Rate::new(dense_ms(args, prompt, device));
        let head_dim = args.d_model / args.heads;
        let cache_bytes = args.layers * 2 * args.heads * max_seq_len * head_dim * 4;
        let ratio = |other: &Rate| match (cached.tokens_per_s, other.tokens_per_s) {
            (Some(a), Some(b)) => format!("{:.0}x", a / b),
            _ => "-".into(),
        };
        println!(
            "| {prompt} | {} | {} | {} | {} | {} | {} | {:.0} |",
            prefill_s.map_or("-".into(), |s| format!("{s:.2}")),
            cached.column(),
            recompute.column(),
            burn_dense.column(),
            ratio(&recompute),
            ratio(&burn_dense),
            cache_bytes as f64 / (1 << 20) as f64
        );
        rows.push(GenerationRow {
            prompt,
            tokens: args.tokens,
            prefill_s,
            cached,
            recompute,
            burn_dense,
            cache_bytes,
        });
    }
    Ok(rows)
}

/// Prefill seconds and ms per generated token of `SparseTransformer::generate` (greedy).
fn cached_rate(
    model: &SparseTransformer,
    prompt: &[u32],
    tokens: usize,
    device: &Device,
) -> Result<(f64, f64), String> {
    let config = GenerateConfig::new(tokens.max(3)).with_temperature(0.0);
    let start = Instant::now();
    let mut stamps = Vec::with_capacity(tokens);
    model
        .generate_with(&[prompt.to_vec()], &config, device, |_| {
            stamps.push(Instant::now())
        })
        .map_err(|e| e.to_string())?;
    // The first token comes from the prefill; the first cached step warms up the decode
    // kernels: the steps after it are timed.
    let (prefill, warm, last) = (stamps[0], stamps[1], stamps[stamps.len() - 1]);
    let steps = (stamps.len() - 2) as f64;
    Ok((
        (prefill - start).as_secs_f64(),
        (last - warm).as_secs_f64() * 1e3 / steps,
    ))
}

/// Ms per token of a full forward over the text so far (`tokens` of them, after `prompt`).
fn recompute_ms(
    model: &SparseTransformer,
    prompt: usize,
    tokens: usize,
    device: &Device,
) -> Result<f64, String> {
    let mut text = random_text(prompt, device);
    let mut start = Instant::now();
    for step in 0..=tokens {
        if step == 1 {
            start = Instant::now();
        }
        let logits = model.forward(text.clone()).map_err(|e| e.to_string())?;
        let next = last_argmax(logits);
        let next = Tensor::<2, Int>::from_data(TensorData::new(vec![next], [1, 1]), device);
        text = Tensor::cat(vec![text, next], 1);
    }
    Ok(start.elapsed().as_secs_f64() * 1e3 / tokens as f64)
}

/// The dense peer: Burn's transformer encoder with a causal mask, as a byte LM.
struct BurnDense {
    tokens: Embedding,
    positions: Embedding,
    encoder: TransformerEncoder,
    head: Linear,
}

impl BurnDense {
    fn new(args: &Args, max_seq_len: usize, device: &Device) -> Self {
        Self {
            tokens: EmbeddingConfig::new(256, args.d_model).init(device),
            positions: EmbeddingConfig::new(max_seq_len, args.d_model).init(device),
            encoder: TransformerEncoderConfig::new(
                args.d_model,
                4 * args.d_model,
                args.heads,
                args.layers,
            )
            .with_dropout(0.0)
            .with_norm_first(true)
            .init(device),
            head: LinearConfig::new(args.d_model, 256).init(device),
        }
    }
}

/// Ms per token of Burn's dense transformer through its autoregressive cache (`tokens` of
/// them, after a prefill of `prompt`), or why it cannot run here.
fn dense_ms(args: &Args, prompt: usize, device: &Device) -> Result<f64, String> {
    let n = prompt + args.slow_tokens + 1;
    let scores = (n * n * args.heads * 4) as u64;
    let on_cpu = matches!(args.backend.as_str(), "ndarray" | "flex");
    if on_cpu && available_memory().is_some_and(|free| scores * 3 > free) {
        return Err(format!(
            "skipped: its {n} x {n} scores need {:.1} GiB per layer",
            scores as f64 / (1u64 << 30) as f64
        ));
    }
    caught::caught(|| {
        let model = BurnDense::new(args, n, device);
        let mut cache = model.encoder.new_autoregressive_cache();
        let mut text = random_text(prompt, device);
        let mut step = |text: &Tensor<2, Int>| {
            let [_, len] = text.dims();
            let index = Tensor::<1, Int>::arange(0..len as i64, device).reshape([1, len]);
            let x = model.tokens.forward(text.clone()) + model.positions.forward(index);
            let input = TransformerEncoderInput::new(x)
                .mask_attn(generate_autoregressive_mask(1, len, device));
            let x = model
                .encoder
                .forward_autoregressive_inference(input, &mut cache);
            last_argmax(model.head.forward(x))
        };
        let next = step(&text);
        let mut next = Tensor::<2, Int>::from_data(TensorData::new(vec![next], [1, 1]), device);
        let mut start = Instant::now();
        for token in 0..=args.slow_tokens {
            if token == 1 {
                start = Instant::now();
            }
            text = Tensor::cat(vec![text, next], 1);
            let token = step(&text);
            next = Tensor::from_data(TensorData::new(vec![token], [1, 1]), device);
        }
        Ok(start.elapsed().as_secs_f64() * 1e3 / args.slow_tokens as f64)
    })
}

/// Bytes of memory available to this process (Linux's `MemAvailable`), if known.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn per_token(args: &Args, device: &Device) -> Vec<PerTokenRow> {
    println!(
        "\n### Decode kernel: one query at the end of a cache of n tokens ({} heads, d {}, block {}, {})\n",
        args.heads,
        args.d_model / args.heads,
        args.block,
        args.backend
    );
    println!(
        "| context | window {} us/token | all (causal dense) us/token |",
        args.window
    );
    println!("|---|---|---|");
    let mut rows = Vec::new();
    for &context in &args.contexts {
        let measured = caught::caught(|| {
            let d = args.d_model / args.heads;
            let cache = || {
                Tensor::<4>::random(
                    [1, args.heads, context, d],
                    Distribution::Normal(0.0, 1.0),
                    device,
                )
            };
            let (keys, values) = (cache(), cache());
            let q = Tensor::<4>::random(
                [1, args.heads, 1, d],
                Distribution::Normal(0.0, 1.0),
                device,
            );
            let rows = DecodeRows::uniform(1, context - 1, 1);
            let time = |pattern: &PatternConfig| -> Result<f64, String> {
                let layout = pattern
                    .layout(context, args.block, args.heads)
                    .map_err(|e| e.to_string())?;
                let run = || {
                    let out = sparse_attention_decode(
                        q.clone(),
                        keys.clone(),
                        values.clone(),
                        &layout,
                        &rows,
                        None,
                    )
                    .map_err(|e| e.to_string())?;
                    Ok::<f32, String>(out.slice([0..1, 0..1, 0..1, 0..1]).into_scalar::<f32>())
                };
                run()?;
                let reps = 20;
                let start = Instant::now();
                for _ in 0..reps {
                    run()?;
                }
                Ok(start.elapsed().as_secs_f64() * 1e6 / reps as f64)
            };
            let window = time(&PatternConfig::Local { ctx: args.window })?;
            let causal = time(&PatternConfig::All)?;
            Ok((window, causal))
        });
        let row = match measured {
            Ok((w, c)) => {
                println!("| {context} | {w:.0} | {c:.0} |");
                PerTokenRow {
                    context,
                    window_us: Some(w),
                    causal_us: Some(c),
                    failed: None,
                }
            }
            Err(e) => {
                println!("| {context} | failed: {} | - |", first_line(&e));
                PerTokenRow {
                    context,
                    window_us: None,
                    causal_us: None,
                    failed: Some(e),
                }
            }
        };
        rows.push(row);
    }
    rows
}

fn stream(args: &Args, device: &Device) -> anyhow::Result<StreamRow> {
    let layer = MultiHeadSparseAttentionConfig::new(
        args.d_model,
        args.heads,
        PatternConfig::Local { ctx: args.window },
    )
    .with_block_size(args.block)
    .init(device)?;
    let mut cache = layer.new_window_cache(1, args.chunk, device)?;
    let start = Instant::now();
    let mut seen = 0;
    let mut last = 0.0;
    while seen < args.stream {
        let m = args.chunk.min(args.stream - seen);
        let x = Tensor::<3>::random([1, m, args.d_model], Distribution::Normal(0.0, 1.0), device);
        let out = layer.forward_cached(x, &mut cache)?;
        // Read one value back per chunk, so that lazy backends cannot queue the stream.
        last = out.slice([0..1, 0..1, 0..1]).into_scalar::<f32>();
        seen += m;
    }
    let seconds = start.elapsed().as_secs_f64();
    anyhow::ensure!(
        last.is_finite(),
        "the stream's output is not finite: {last}"
    );
    let head_dim = args.d_model / args.heads;
    let row = StreamRow {
        tokens: seen,
        chunk: args.chunk,
        tokens_per_s: seen as f64 / seconds,
        window_cache_bytes: cache.memory_bytes(),
        full_cache_bytes: 2 * args.heads * seen * head_dim * 4,
    };
    println!(
        "\n### Stream: {} tokens through one layer's window cache, {} per call ({})\n",
        seen, args.chunk, args.backend
    );
    println!("| tokens | tok/s | window cache MiB | a cache of every token MiB |");
    println!("|---|---|---|---|");
    println!(
        "| {seen} | {:.0} | {:.2} | {:.0} |",
        row.tokens_per_s,
        row.window_cache_bytes as f64 / (1 << 20) as f64,
        row.full_cache_bytes as f64 / (1 << 20) as f64
    );
    anyhow::ensure!(
        cache.lengths() == [seen],
        "the cache saw {:?} tokens",
        cache.lengths()
    );
    Ok(row)
}
