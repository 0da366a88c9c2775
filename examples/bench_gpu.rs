//! GPU benchmark of the fused CubeCL kernels over patterns, dtypes, block sizes and lengths:
//! forward and forward+backward time, the kernels that ran (tensor-core or FMA) and useful
//! TFLOP/s (FLOPs of allowed query-key pairs only), next to Burn's dense attention on the same
//! device and, when given the JSON that `xtask/flex_attention.py` wrote on the same GPU,
//! PyTorch FlexAttention on the same mask. A cell whose runs failed says why instead of
//! showing a time: after the timed runs every cell reads a value of its output back.
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
#[path = "common/caught.rs"]
mod caught;
#[path = "common/extra_options.rs"]
mod extra_options;
use extra_options::{ExtraOption, extra_options};
#[path = "common/timing.rs"]
mod timing;

use sparse_attn::cubecl_kernels::{LaunchCounts, launch_counts};
use sparse_attn::pattern::{Band, BigBird, BigBirdConfig, Fixed, Strided};
use sparse_attn::{AttentionOptions, BlockLayout, Pattern, sparse_attention};

#[derive(Parser)]
struct Args {
    /// Backend: vulkan (CubeCL's SPIR-V compiler) or wgpu (WGSL).
    #[arg(long, default_value = "vulkan")]
    backend: String,
    /// Sequence lengths.
    #[arg(long, value_delimiter = ',', default_value = "8192,32768,131072")]
    n: Vec<usize>,
    /// Patterns: window (causal sliding window), strided (`j <= i`, `(i - j) % stride == 0`;
    /// block-sparse in our permuted order), fixed (windows of `2 * window` plus the last
    /// `window / 8` tokens of every earlier window), bigbird (causal window, token 0 global,
    /// 2 seeded random blocks of 128 tokens per query block of 128). `xtask/flex_attention.py`
    /// builds the same masks.
    #[arg(long, value_delimiter = ',', default_value = "window")]
    patterns: Vec<String>,
    /// Causal window (keys per query, the query included).
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// Stride of the strided pattern.
    #[arg(long, default_value_t = 256)]
    stride: usize,
    /// Block sizes of the layout.
    #[arg(long, value_delimiter = ',', default_value = "128")]
    blocks: Vec<usize>,
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
    /// Also time dropout (p = 0.1), key padding (one padded token), soft-capping (at 30),
    /// ALiBi (standard slopes), T5's relative-position bias (32 buckets, its table's gradient
    /// in the backward) and grouped-query attention (heads / 4 key/value heads), printed in
    /// a second table.
    #[arg(long)]
    extras: bool,
    /// JSON output.
    #[arg(long, default_value = "target/bench/gpu.json")]
    out: PathBuf,
}

/// One FlexAttention measurement, as `flex_attention.py` writes it (a failed one has a
/// reason instead of times).
#[derive(Deserialize)]
struct FlexRow {
    pattern: String,
    dtype: String,
    n: usize,
    block: usize,
    fwd_ms: Option<f64>,
    fwd_bwd_ms: Option<f64>,
    failed: Option<String>,
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
    /// Which kernels ran our forward and backward (`tensor-core`, `fma`).
    kernels: String,
    /// Our forward and forward+backward ms, or why they failed.
    ours: Timing,
    useful_tflops: Option<f64>,
    /// Burn's dense attention (up to `--dense-max-n`).
    dense: Option<Timing>,
    flex_fwd_ms: Option<f64>,
    flex_fwd_bwd_ms: Option<f64>,
    flex_failed: Option<String>,
    /// With each option of `--extras` (name, forward / forward+backward ms or why not).
    extras: Vec<(String, Timing)>,
}

/// A timed cell: forward and forward+backward ms, or why it failed.
type Timing = Result<(f64, f64), String>;

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
/// `kv_dims`, of `dtype`; `Err(reason)` when the runs failed. A device synchronisation does
/// not surface a failed launch (Burn's dense attention asking for more than a buffer can
/// hold), so after the timed runs a value of the output and of the gradient is read back;
/// a panic inside the cell is caught and reported the same way.
fn time_pair(
    device: &Device,
    [dims, kv_dims]: [[usize; 4]; 2],
    dtype: FloatDType,
    reps: usize,
    attend: impl Fn(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>,
) -> Timing {
    let cell = || -> Timing {
        let sync = |d: &Device| d.sync().map_err(|e| format!("synchronisation: {e:?}"));
        let random = |dims: [usize; 4], d: &Device| {
            Tensor::<4>::random(dims, Distribution::Normal(0.0, 1.0), d).cast(dtype)
        };
        let x = |d: &Device| random(dims, d);
        let (q, k, v) = (x(device), random(kv_dims, device), random(kv_dims, device));
        let mut failed = None;
        let fwd = median_ms(reps, || {
            let _out = attend(q.clone(), k.clone(), v.clone());
            if let Err(e) = sync(device) {
                failed.get_or_insert(e);
            }
        });
        let ad = device.clone().autodiff();
        let g = x(&ad);
        let qa = x(&ad).require_grad();
        let [ka, va] = [(); 2].map(|_| random(kv_dims, &ad).require_grad());
        let fwd_bwd = median_ms(reps, || {
            let out = attend(qa.clone(), ka.clone(), va.clone());
            let grads = (out * g.clone()).sum().backward();
            let _dq = qa.grad(&grads).expect("tracked");
            if let Err(e) = sync(&ad) {
                failed.get_or_insert(e);
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        let read = |t: Tensor<4>, what: &str| {
            t.sum()
                .try_into_data()
                .map(|_| ())
                .map_err(|e| format!("{what}: {e:?}"))
        };
        read(attend(q.clone(), k.clone(), v.clone()), "forward")?;
        let out = attend(qa.clone(), ka.clone(), va.clone());
        let grads = (out * g.clone()).sum().backward();
        read(qa.grad(&grads).expect("tracked"), "backward")?;
        Ok((fwd, fwd_bwd))
    };
    caught::caught(cell)
}

/// A cell of the table: the time, or why the runs failed (first line, shortened).
fn cell_text(x: &Result<f64, String>) -> String {
    match x {
        Ok(ms) => format!("{ms:.2}"),
        Err(reason) => {
            let line = reason.lines().next().unwrap_or_default();
            format!("failed: {}", line.chars().take(80).collect::<String>())
        }
    }
}

/// The benchmark pattern `name` for sequences of `n` tokens.
fn bench_pattern(name: &str, args: &Args, n: usize) -> Result<Box<dyn Pattern>, String> {
    let w = args.window;
    let err = |e: sparse_attn::SparseAttentionError| e.to_string();
    Ok(match name {
        "window" => Box::new(Band::sliding_window(w).map_err(err)?),
        "strided" => Box::new(Strided::new(args.stride).map_err(err)?),
        "fixed" => Box::new(Fixed::new(2 * w, 1, (w / 8).max(1)).map_err(err)?),
        "bigbird" => Box::new(
            BigBird::new(
                BigBirdConfig {
                    window: w,
                    global_tokens: vec![0],
                    random_blocks: 2,
                    random_block: 128,
                    seed: 7,
                    causal: true,
                },
                n,
            )
            .map_err(err)?,
        ),
        other => {
            return Err(format!(
                "unknown pattern `{other}`: expected window, strided, fixed or bigbird"
            ));
        }
    })
}

/// The kernel families that ran between two launch counts.
fn kernels_between(before: LaunchCounts, after: LaunchCounts) -> String {
    match (
        after.tensor_core > before.tensor_core,
        after.fma > before.fma,
    ) {
        (true, false) => "tensor-core",
        (false, true) => "fma",
        (true, true) => "tensor-core+fma",
        (false, false) => "-",
    }
    .to_string()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let device = sparse_attn::backends::device(&args.backend)?;
    let device_name = format!("{device:?}");
    let flex: HashMap<(String, String, usize, usize), FlexRow> = match &args.flex {
        Some(path) => {
            let rows: Vec<FlexRow> = serde_json::from_str(&std::fs::read_to_string(path)?)?;
            rows.into_iter()
                .map(|r| ((r.pattern.clone(), r.dtype.clone(), r.n, r.block), r))
                .collect()
        }
        None => HashMap::new(),
    };
    let (h, d, w) = (args.heads, args.head_dim, args.window);
    println!(
        "{} on {device_name}: B=1, H={h}, d={d}, window {w}, stride {}, blocks {:?}\n",
        args.backend, args.stride, args.blocks
    );
    println!(
        "| pattern | dtype | block | n | kernels | fwd ms | fwd+bwd ms | useful TFLOP/s (fwd) | dense fwd ms | dense fwd+bwd ms | flex fwd ms | flex fwd+bwd ms | flex/ours fwd | flex/ours fwd+bwd | dense/ours fwd | dense/ours fwd+bwd |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for pattern_name in &args.patterns {
        for name in &args.dtypes {
            let dtype = float_dtype(name)?;
            if !device.supports_dtype(DType::from(dtype)) {
                println!(
                    "| {pattern_name} | {name} | - | - | the device does not support {name} | | | | | | | | | | | |"
                );
                continue;
            }
            for &block in &args.blocks {
                for &n in &args.n {
                    let pattern = bench_pattern(pattern_name, &args, n)?;
                    let layout = BlockLayout::build(pattern.as_ref(), n, block, h)?;
                    let pairs = (0..h)
                        .map(|head| layout.stats(head).map(|s| s.allowed_pairs))
                        .sum::<Result<u64, _>>()?;
                    let dims = [1, h, n, d];
                    let ours = |q, k, v| {
                        sparse_attention(q, k, v, &layout, AttentionOptions::default())
                            .expect("valid inputs")
                    };
                    let same = [dims, dims];
                    let before = launch_counts();
                    let timed = time_pair(&device, same, dtype, args.reps, ours);
                    let kernels = kernels_between(before, launch_counts());
                    let with = |kv_dims, extra: ExtraOption| {
                        time_pair(&device, [dims, kv_dims], dtype, args.reps, |q, k, v| {
                            let options = extra.for_inputs(&q);
                            sparse_attention(q, k, v, &layout, options).expect("valid inputs")
                        })
                    };
                    let extras = if args.extras {
                        // The shared options on the full K/V heads, then GQA (H/4 K/V heads).
                        let gqa = ExtraOption {
                            name: "GQA (H/4 kv heads)",
                            options: AttentionOptions::default(),
                            relative_bias: false,
                        };
                        let gqa_dims = [1, (h / 4).max(1), n, d];
                        extra_options(n)
                            .into_iter()
                            .map(|extra| (dims, extra))
                            .chain([(gqa_dims, gqa)])
                            .map(|(kv_dims, extra)| (extra.name.to_string(), with(kv_dims, extra)))
                            .collect()
                    } else {
                        Vec::new()
                    };
                    // Burn's dense attention: causal mask only; it computes every pair.
                    let options = AttentionModuleOptions {
                        scale: None,
                        softcap: None,
                        is_causal: true,
                    };
                    let dense = (n <= args.dense_max_n).then(|| {
                        time_pair(&device, same, dtype, args.reps.min(3), |q, k, v| {
                            attention(q, k, v, None, None, options)
                        })
                    });
                    let useful = timed
                        .as_ref()
                        .ok()
                        .map(|(f, _)| 4.0 * pairs as f64 * d as f64 / (f * 1e9));
                    let fl = flex.get(&(pattern_name.clone(), name.clone(), n, block));
                    let fmt = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}"));
                    let part = |x: &Timing, i: usize| {
                        cell_text(&x.clone().map(|t| if i == 0 { t.0 } else { t.1 }))
                    };
                    let opt_part = |x: &Option<Timing>, i: usize| {
                        x.as_ref().map_or("-".to_string(), |x| part(x, i))
                    };
                    let ratio = |peer: Option<f64>, i: usize| {
                        let ours = timed.as_ref().ok().map(|t| if i == 0 { t.0 } else { t.1 });
                        fmt(peer.zip(ours).map(|(p, o)| p / o))
                    };
                    let dense_ok = |i: usize| {
                        dense
                            .as_ref()
                            .and_then(|x| x.as_ref().ok())
                            .map(|t| if i == 0 { t.0 } else { t.1 })
                    };
                    let flex_cell = |x: Option<f64>| match fl.and_then(|f| f.failed.as_ref()) {
                        Some(reason) => {
                            format!("failed: {}", reason.chars().take(60).collect::<String>())
                        }
                        None => fmt(x),
                    };
                    let (flex_fwd, flex_fwd_bwd) =
                        (fl.and_then(|f| f.fwd_ms), fl.and_then(|f| f.fwd_bwd_ms));
                    println!(
                        "| {pattern_name} | {name} | {block} | {n} | {kernels} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        part(&timed, 0),
                        part(&timed, 1),
                        fmt(useful),
                        opt_part(&dense, 0),
                        opt_part(&dense, 1),
                        flex_cell(flex_fwd),
                        flex_cell(flex_fwd_bwd),
                        ratio(flex_fwd, 0),
                        ratio(flex_fwd_bwd, 1),
                        ratio(dense_ok(0), 0),
                        ratio(dense_ok(1), 1),
                    );
                    rows.push(Row {
                        backend: args.backend.clone(),
                        device: device_name.clone(),
                        dtype: name.clone(),
                        pattern: pattern.name(),
                        n,
                        heads: h,
                        head_dim: d,
                        block,
                        kernels,
                        ours: timed,
                        useful_tflops: useful,
                        dense,
                        flex_fwd_ms: flex_fwd,
                        flex_fwd_bwd_ms: flex_fwd_bwd,
                        flex_failed: fl.and_then(|f| f.failed.clone()),
                        extras,
                    });
                }
            }
        }
    }
    let extra_names: Vec<&str> = rows
        .iter()
        .find(|r| !r.extras.is_empty())
        .map(|r| r.extras.iter().map(|(name, _)| name.as_str()).collect())
        .unwrap_or_default();
    if !extra_names.is_empty() {
        println!(
            "\n| pattern | dtype | block | n | fwd / fwd+bwd ms | {} |",
            extra_names.join(" | ")
        );
        println!("|---|---|---|---|---|{}", "---|".repeat(extra_names.len()));
        for r in &rows {
            let Ok((fwd, fwd_bwd)) = r.ours else { continue };
            let cell = |x: &Timing| match x {
                Ok((f, fb)) => format!(
                    "{f:.2} / {fb:.2} ({:+.0}% / {:+.0}%)",
                    100.0 * (f - fwd) / fwd,
                    100.0 * (fb - fwd_bwd) / fwd_bwd
                ),
                Err(reason) => cell_text(&Err(reason.clone())),
            };
            let cells: Vec<String> = r.extras.iter().map(|(_, x)| cell(x)).collect();
            println!(
                "| {} | {} | {} | {} | {fwd:.2} / {fwd_bwd:.2} | {} |",
                r.pattern,
                r.dtype,
                r.block,
                r.n,
                cells.join(" | ")
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
