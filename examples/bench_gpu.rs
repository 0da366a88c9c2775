//! GPU benchmark of the fused CubeCL kernels on a causal sliding window: forward and
//! forward+backward time and useful TFLOP/s (FLOPs of allowed query-key pairs only), next to
//! Burn's dense attention on the same device and, when given the JSON that
//! `xtask/flex_attention.py` wrote on the same GPU, PyTorch FlexAttention on the same mask.
//!
//! `cargo xtask bench gpu` builds and runs it (release, `vulkan` feature); `cargo xtask
//! gpu-bundle` packs it for a machine without a Rust toolchain. Every timing is the median of
//! several runs after a warm-up, each ending with a device synchronisation (GPU work is
//! asynchronous). Writes `target/bench/gpu.json` and prints a markdown table.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Device, Distribution, FloatDType, Tensor};
use clap::Parser;
use serde::{Deserialize, Serialize};
#[path = "common/timing.rs"]
mod timing;

use sparse_attn::pattern::Band;
use sparse_attn::{AttentionOptions, BlockLayout, sparse_attention};

#[derive(Parser)]
struct Args {
    /// Backend: vulkan (CubeCL's SPIR-V compiler) or wgpu (WGSL).
    #[arg(long, default_value = "vulkan")]
    backend: String,
    /// Sequence lengths.
    #[arg(long, value_delimiter = ',', default_value = "8192,32768,131072")]
    n: Vec<usize>,
    /// Causal window (keys per query, the query included).
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// Block size of the layout (128 ran fastest on the H200; FlexAttention's default too).
    #[arg(long, default_value_t = 128)]
    block: usize,
    /// Heads.
    #[arg(long, default_value_t = 16)]
    heads: usize,
    /// Head dimension.
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Input dtypes: f32, f16, bf16 (those the device lacks are reported and skipped).
    #[arg(long, value_delimiter = ',', default_value = "f32,f16,bf16")]
    dtypes: Vec<String>,
    /// Largest n for Burn's dense attention.
    #[arg(long, default_value_t = 32768)]
    dense_max_n: usize,
    /// Timed runs per measurement.
    #[arg(long, default_value_t = 7)]
    reps: usize,
    /// FlexAttention results (JSON rows from `xtask/flex_attention.py`) to put beside ours.
    #[arg(long)]
    flex: Option<PathBuf>,
    /// Also time dropout (p = 0.1), key padding (one padded token) and grouped-query
    /// attention (heads / 4 key/value heads), printed in a second table.
    #[arg(long)]
    extras: bool,
    /// JSON output.
    #[arg(long, default_value = "target/bench/gpu.json")]
    out: PathBuf,
}

/// One FlexAttention measurement, as `flex_attention.py` writes it.
#[derive(Deserialize)]
struct FlexRow {
    dtype: String,
    n: usize,
    fwd_ms: f64,
    fwd_bwd_ms: f64,
}

#[derive(Serialize)]
struct Row {
    backend: String,
    device: String,
    dtype: String,
    pattern: String,
    n: usize,
    heads: usize,
    head_dim: usize,
    block: usize,
    fwd_ms: f64,
    fwd_bwd_ms: f64,
    useful_tflops: f64,
    dense_fwd_ms: Option<f64>,
    dense_fwd_bwd_ms: Option<f64>,
    flex_fwd_ms: Option<f64>,
    flex_fwd_bwd_ms: Option<f64>,
    /// `(fwd_ms, fwd_bwd_ms)` with dropout 0.1, with one padded token, with heads / 4
    /// key/value heads (with `--extras`).
    dropout: Option<(f64, f64)>,
    padded: Option<(f64, f64)>,
    gqa: Option<(f64, f64)>,
}

/// Median wall time in ms of `f` over `reps` runs after a warm-up of at least three runs
/// and two seconds (kernel compilation, memory pools growing, clocks ramping up: on the
/// H200 the first half second of a new shape ran up to 3x slower); `f` must end with a
/// device synchronisation.
fn median_ms(reps: usize, f: impl FnMut()) -> f64 {
    timing::median_ms(reps, 3, Duration::from_secs(2), f)
}

fn float_dtype(name: &str) -> Result<FloatDType, String> {
    match name {
        "f32" => Ok(FloatDType::F32),
        "f16" => Ok(FloatDType::F16),
        "bf16" => Ok(FloatDType::BF16),
        other => Err(format!(
            "unknown dtype `{other}`: expected f32, f16 or bf16"
        )),
    }
}

/// Forward and forward+backward medians of `attend` on `q` of `dims` and `k`, `v` of
/// `kv_dims`, of `dtype`.
fn time_pair(
    device: &Device,
    [dims, kv_dims]: [[usize; 4]; 2],
    dtype: FloatDType,
    reps: usize,
    attend: impl Fn(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>,
) -> (f64, f64) {
    let sync = |d: &Device| d.sync().expect("device synchronisation");
    let random = |dims: [usize; 4], d: &Device| {
        Tensor::<4>::random(dims, Distribution::Normal(0.0, 1.0), d).cast(dtype)
    };
    let x = |d: &Device| random(dims, d);
    let (q, k, v) = (x(device), random(kv_dims, device), random(kv_dims, device));
    let fwd = median_ms(reps, || {
        let _out = attend(q.clone(), k.clone(), v.clone());
        sync(device);
    });
    let ad = device.clone().autodiff();
    let g = x(&ad);
    let qa = x(&ad).require_grad();
    let [ka, va] = [(); 2].map(|_| random(kv_dims, &ad).require_grad());
    let fwd_bwd = median_ms(reps, || {
        let out = attend(qa.clone(), ka.clone(), va.clone());
        let grads = (out * g.clone()).sum().backward();
        let _dq = qa.grad(&grads).expect("tracked");
        sync(&ad);
    });
    (fwd, fwd_bwd)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let device = sparse_attn::backends::device(&args.backend)?;
    let device_name = format!("{device:?}");
    let flex: HashMap<(String, usize), FlexRow> = match &args.flex {
        Some(path) => {
            let rows: Vec<FlexRow> = serde_json::from_str(&std::fs::read_to_string(path)?)?;
            rows.into_iter()
                .map(|r| ((r.dtype.clone(), r.n), r))
                .collect()
        }
        None => HashMap::new(),
    };
    let (h, d, w) = (args.heads, args.head_dim, args.window);
    println!(
        "{} on {device_name}: causal window {w}, B=1, H={h}, d={d}, block {}\n",
        args.backend, args.block
    );
    println!(
        "| dtype | n | fwd ms | fwd+bwd ms | useful TFLOP/s (fwd) | dense fwd ms | dense fwd+bwd ms | flex fwd ms | flex fwd+bwd ms | flex/ours fwd | flex/ours fwd+bwd |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let pattern = Band::sliding_window(w)?;
    let mut rows = Vec::new();
    for name in &args.dtypes {
        let dtype = float_dtype(name)?;
        if !device.supports_dtype(DType::from(dtype)) {
            println!("| {name} | - | the device does not support {name} | | | | | | | | |");
            continue;
        }
        for &n in &args.n {
            let layout = BlockLayout::build(&pattern, n, args.block, h)?;
            let pairs: u64 = (0..h).map(|head| layout.stats(head).allowed_pairs).sum();
            let dims = [1, h, n, d];
            let ours = |q, k, v| {
                sparse_attention(q, k, v, &layout, AttentionOptions::default())
                    .expect("valid inputs")
            };
            let same = [dims, dims];
            let (fwd_ms, fwd_bwd_ms) = time_pair(&device, same, dtype, args.reps, ours);
            let with = |kv_dims, options: AttentionOptions| {
                time_pair(&device, [dims, kv_dims], dtype, args.reps, |q, k, v| {
                    sparse_attention(q, k, v, &layout, options.clone()).expect("valid inputs")
                })
            };
            let (dropout, padded, gqa) = if args.extras {
                let plain = AttentionOptions::default();
                (
                    Some(with(dims, plain.clone().dropout(0.1, 7))),
                    Some(with(dims, plain.clone().key_lengths([n - 1]))),
                    Some(with([1, (h / 4).max(1), n, d], plain)),
                )
            } else {
                (None, None, None)
            };
            let options = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: true,
            };
            let dense = (n <= args.dense_max_n).then(|| {
                let reps = args.reps.min(3);
                time_pair(&device, same, dtype, reps, |q, k, v| {
                    attention(q, k, v, None, None, options)
                })
            });
            let useful = 4.0 * pairs as f64 * d as f64 / (fwd_ms * 1e9);
            let fl = flex.get(&(name.clone(), n));
            let fmt = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}"));
            println!(
                "| {name} | {n} | {fwd_ms:.2} | {fwd_bwd_ms:.2} | {useful:.2} | {} | {} | {} | {} | {} | {} |",
                fmt(dense.map(|x| x.0)),
                fmt(dense.map(|x| x.1)),
                fmt(fl.map(|f| f.fwd_ms)),
                fmt(fl.map(|f| f.fwd_bwd_ms)),
                fmt(fl.map(|f| f.fwd_ms / fwd_ms)),
                fmt(fl.map(|f| f.fwd_bwd_ms / fwd_bwd_ms)),
            );
            rows.push(Row {
                backend: args.backend.clone(),
                device: device_name.clone(),
                dtype: name.clone(),
                pattern: format!("causal window {w}"),
                n,
                heads: h,
                head_dim: d,
                block: args.block,
                fwd_ms,
                fwd_bwd_ms,
                useful_tflops: useful,
                dense_fwd_ms: dense.map(|x| x.0),
                dense_fwd_bwd_ms: dense.map(|x| x.1),
                flex_fwd_ms: fl.map(|f| f.fwd_ms),
                flex_fwd_bwd_ms: fl.map(|f| f.fwd_bwd_ms),
                dropout,
                padded,
                gqa,
            });
        }
    }
    if args.extras {
        println!(
            "\n| dtype | n | fwd / fwd+bwd ms | dropout 0.1 | padded (n - 1) | GQA (H/4 kv heads) |"
        );
        println!("|---|---|---|---|---|---|");
        for r in &rows {
            let cell = |x: Option<(f64, f64)>| {
                x.map_or("-".to_string(), |(f, fb)| {
                    format!(
                        "{f:.2} / {fb:.2} ({:+.0}% / {:+.0}%)",
                        100.0 * (f - r.fwd_ms) / r.fwd_ms,
                        100.0 * (fb - r.fwd_bwd_ms) / r.fwd_bwd_ms
                    )
                })
            };
            println!(
                "| {} | {} | {:.2} / {:.2} | {} | {} | {} |",
                r.dtype,
                r.n,
                r.fwd_ms,
                r.fwd_bwd_ms,
                cell(r.dropout),
                cell(r.padded),
                cell(r.gqa)
            );
        }
    }
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&rows)?)?;
    println!("\nwrote {}", args.out.display());
    Ok(())
}
