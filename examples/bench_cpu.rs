//! CPU benchmark of the fused kernels: forward and forward+backward time, useful GFLOP/s
//! (FLOPs of allowed query-key pairs only), Burn's dense causal attention, the portable
//! path (Burn tensor ops over gathered blocks, Burn autodiff) and the machine's f32 GEMM
//! rate, all measured in the same run on the same backend.
//!
//! `cargo xtask bench cpu` (release build) prints a markdown table and writes
//! `target/bench/cpu.json`. With `--extras`, each row also times the forward with 10%
//! dropout, with key padding (one padded token, so every tile checks validity), with
//! soft-capping, with ALiBi and with T5's relative-position bias, and a second table gives
//! their cost relative to the plain forward of the same run.
//!
//! Every timing is the median of several runs after a warm-up; CPU backends execute eagerly
//! and each timed region ends by reading a result back. Ratios that targets are stated in
//! are measured on neighbouring runs, since load on a shared machine drifts over seconds:
//! `bwd/fwd` times the forward and backward ops alternately and takes the median of the
//! per-round ratios (and, in brackets, the fastest backward over the fastest forward: load
//! only adds time), and `--scaling` times the forward at every `n` round robin and gives
//! `t(n) / t(previous n)` the same way. `--memory` measures the peak memory of one training
//! step instead.

use std::path::PathBuf;
use std::time::Duration;

use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, DispatchTensor, Distribution, Tensor};
use clap::Parser;
use serde::Serialize;
use sparse_attn::pattern::{Band, Fixed, Strided};
#[path = "common/bigbird.rs"]
mod bigbird;
#[path = "common/extra_options.rs"]
mod extra_options;
#[path = "common/timing.rs"]
mod timing;
use bigbird::bench_bigbird;
use extra_options::extra_options;

use burn::backend::Dispatch;
use sparse_attn::{
    AttentionOptions, AttentionParams, BlockLayout, Pattern, SparseAttentionBackend,
    sparse_attention, sparse_attention_portable,
};

#[derive(Parser)]
struct Args {
    /// Backend: ndarray, or flex with the `flex` feature.
    #[arg(long, default_value = "ndarray")]
    backend: String,
    /// Sequence lengths.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1024,2048,4096,8192,16384,32768,65536"
    )]
    n: Vec<usize>,
    /// Block sizes.
    #[arg(long, value_delimiter = ',', default_value = "64,32")]
    block: Vec<usize>,
    /// Patterns: local, strided, fixed, bigbird.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "local,strided,fixed,bigbird"
    )]
    patterns: Vec<String>,
    /// Heads.
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// Head dimension.
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Skip the backward pass.
    #[arg(long)]
    forward_only: bool,
    /// Largest n for Burn's dense attention (it allocates n x n per head).
    #[arg(long, default_value_t = 8192)]
    dense_max_n: usize,
    /// Largest n for the portable path (Burn tensor ops over gathered blocks).
    #[arg(long, default_value_t = 8192)]
    portable_max_n: usize,
    /// Only measure the peak memory of one forward+backward (first pattern, n, block):
    /// prints the process's peak resident set (`VmHWM`) before and after.
    #[arg(long)]
    memory: bool,
    /// Also time the forward with dropout and with key padding.
    #[arg(long)]
    extras: bool,
    /// Only time the forward op of the first pattern and block at every n, round robin,
    /// and print t(n) / t(previous n).
    #[arg(long)]
    scaling: bool,
    /// Timed runs (rounds) per figure; default 7 up to n = 8192, 5 up to 16384, then 3.
    #[arg(long)]
    reps: Option<usize>,
    /// JSON output.
    #[arg(long, default_value = "target/bench/cpu.json")]
    out: PathBuf,
}

#[derive(Serialize)]
struct Row {
    backend: String,
    pattern: String,
    n: usize,
    heads: usize,
    head_dim: usize,
    block: usize,
    threads: usize,
    density: f64,
    fwd_ms: f64,
    fwd_bwd_ms: Option<f64>,
    /// The forward op alone, timed alternately with `bwd_ms`.
    fwd_op_ms: Option<f64>,
    /// The backward op alone (no autodiff graph, no loss).
    bwd_ms: Option<f64>,
    /// Median over rounds of backward op / forward op time (each round one of each).
    bwd_fwd: Option<f64>,
    /// Fastest backward op / fastest forward op over the same rounds: load from other
    /// tenants only adds time, so the fastest runs are the closest to the ops' own cost.
    bwd_fwd_best: Option<f64>,
    useful_gflops: f64,
    dense_fwd_ms: Option<f64>,
    portable_fwd_ms: Option<f64>,
    portable_fwd_bwd_ms: Option<f64>,
    gemm_gflops: f64,
    /// Forward times with each option of `--extras` (name, ms).
    extras: Vec<(String, f64)>,
}

/// An attention entry point: the fused path or the portable one.
type Attend = fn(
    Tensor<4>,
    Tensor<4>,
    Tensor<4>,
    &BlockLayout,
    AttentionOptions,
) -> sparse_attn::Result<Tensor<4>>;

/// Median forward time in ms of `attend` with `opts`.
fn time_forward(
    attend: Attend,
    [q, k, v]: [&Tensor<4>; 3],
    layout: &BlockLayout,
    opts: &AttentionOptions,
    reps: usize,
) -> f64 {
    median_ms(reps, || {
        sync(attend(q.clone(), k.clone(), v.clone(), layout, opts.clone()).expect("valid inputs"))
    })
}

/// Median forward and (unless `forward_only`) forward+backward times in ms of `attend`.
fn time_attention(
    attend: Attend,
    qkv: [&Tensor<4>; 3],
    layout: &BlockLayout,
    reps: usize,
    forward_only: bool,
) -> (f64, Option<f64>) {
    let opts = AttentionOptions::default();
    let fwd_ms = time_forward(attend, qkv, layout, &opts, reps);
    let fwd_bwd_ms = (!forward_only).then(|| {
        let ad = qkv[0].device().autodiff();
        let g = Tensor::<4>::random(qkv[0].dims(), Distribution::Normal(0.0, 1.0), &ad);
        let [qa, ka, va] = qkv.map(|t| Tensor::<4>::from_data(t.to_data(), &ad).require_grad());
        median_ms(reps, || {
            let out = attend(qa.clone(), ka.clone(), va.clone(), layout, opts.clone())
                .expect("valid inputs");
            let grads = (out * g.clone()).sum().backward();
            sync(qa.grad(&grads).expect("tracked"));
        })
    });
    (fwd_ms, fwd_bwd_ms)
}

/// The fused ops alone, timed alternately.
struct OpTimes {
    /// Median forward op (`sparse_attention_forward` of the backend) in ms.
    fwd_ms: f64,
    /// Median backward op (`sparse_attention_backward`, given the forward's output and
    /// log-sum-exp and a random output gradient) in ms.
    bwd_ms: f64,
    /// Median over rounds of backward / forward, each round timing one forward then one
    /// backward: load from other tenants of a shared machine changes over seconds, so
    /// ratios of neighbouring runs are steadier than ratios of separate medians.
    bwd_fwd: f64,
    /// Fastest backward / fastest forward over the same rounds.
    bwd_fwd_best: f64,
}

/// Times the forward and backward ops of the backend alternately (no autodiff graph, no
/// validation): `reps` rounds after a warm-up.
fn time_ops(qkv: [&Tensor<4>; 3], layout: &BlockLayout, reps: usize) -> OpTimes {
    let d = qkv[0].dims()[3];
    let params = AttentionParams::plain(1.0 / (d as f64).sqrt());
    let [q, k, v] = qkv.map(|t| t.clone().into_dispatch());
    let forward = || forward_op([&q, &k, &v], layout, &params);
    let (out, lse) = forward();
    let dout = Tensor::<4>::random(
        qkv[0].dims(),
        Distribution::Normal(0.0, 1.0),
        &qkv[0].device(),
    )
    .into_dispatch();
    let mut run_forward = || sync(Tensor::from_dispatch(forward().0));
    let mut run_backward = || {
        let (dq, _dk, _dv) = <Dispatch as SparseAttentionBackend>::sparse_attention_backward(
            q.clone(),
            k.clone(),
            v.clone(),
            out.clone(),
            lse.clone(),
            dout.clone(),
            layout.clone(),
            params.clone(),
        );
        sync(Tensor::from_dispatch(dq));
    };
    let rounds = rounds_ms(reps, &mut [&mut run_forward, &mut run_backward]);
    let ratios: Vec<f64> = rounds.iter().map(|t| t[1] / t[0]).collect();
    let fastest = |i: usize| rounds.iter().map(|t| t[i]).fold(f64::INFINITY, f64::min);
    OpTimes {
        fwd_ms: timing::median(rounds.iter().map(|t| t[0]).collect()),
        bwd_ms: timing::median(rounds.iter().map(|t| t[1]).collect()),
        bwd_fwd: timing::median(ratios),
        bwd_fwd_best: fastest(1) / fastest(0),
    }
}

/// The backend's forward op alone: output and log-sum-exp.
fn forward_op(
    [q, k, v]: [&DispatchTensor; 3],
    layout: &BlockLayout,
    params: &AttentionParams,
) -> (DispatchTensor, DispatchTensor) {
    <Dispatch as SparseAttentionBackend>::sparse_attention_forward(
        q.clone(),
        k.clone(),
        v.clone(),
        layout.clone(),
        params.clone(),
    )
}

/// [`timing::rounds_ms`] with this benchmark's warm-up (two rounds and a quarter second).
fn rounds_ms(reps: usize, fs: &mut [&mut dyn FnMut()]) -> Vec<Vec<f64>> {
    timing::rounds_ms(reps, 2, Duration::from_millis(250), fs)
}

/// `--scaling`: the forward op of the first pattern and block at every `n`, timed round
/// robin (one run per `n` per round), with `t(n) / t(n / 2)` as the median over rounds of
/// each round's ratio.
fn measure_scaling(args: &Args, device: &Device) -> Result<(), Box<dyn std::error::Error>> {
    let (name, block, h, d) = (&args.patterns[0], args.block[0], args.heads, args.head_dim);
    let mut cases = Vec::new();
    for &n in &args.n {
        let layout = BlockLayout::build(pattern(name, n, block).as_ref(), n, block, h)?;
        let x = || {
            Tensor::<4>::random([1, h, n, d], Distribution::Normal(0.0, 1.0), device)
                .into_dispatch()
        };
        cases.push((n, layout, [x(), x(), x()]));
    }
    let params = AttentionParams::plain(1.0 / (d as f64).sqrt());
    let mut runs: Vec<_> = cases
        .iter()
        .map(|(_, layout, [q, k, v])| {
            let params = params.clone();
            move || {
                sync(Tensor::from_dispatch(
                    forward_op([q, k, v], layout, &params).0,
                ))
            }
        })
        .collect();
    let mut fs: Vec<&mut dyn FnMut()> = runs.iter_mut().map(|f| f as &mut dyn FnMut()).collect();
    let rounds = rounds_ms(args.reps.unwrap_or(7), &mut fs);
    println!(
        "{name}, b = {block}, H = {h}, d = {d}, forward op, {} rounds\n",
        rounds.len()
    );
    println!("| n | fwd ms | t(n) / t(previous n) |");
    println!("|---|---|---|");
    for (i, (n, _, _)) in cases.iter().enumerate() {
        let t = timing::median(rounds.iter().map(|r| r[i]).collect());
        let ratio =
            (i > 0).then(|| timing::median(rounds.iter().map(|r| r[i] / r[i - 1]).collect()));
        println!(
            "| {n} | {t:.2} | {} |",
            ratio.map_or("-".to_string(), |r| format!("{r:.3}"))
        );
    }
    Ok(())
}

/// Median wall time in ms of `f` over `reps` runs after a warm-up.
fn median_ms(reps: usize, f: impl FnMut()) -> f64 {
    // Two runs and a quarter second of warm-up: first runs pay for page faults of fresh
    // buffers and the rayon pool waking up (on this shared machine a single warm-up run
    // left the first rows of a table up to 2x slow).
    timing::median_ms(reps, 2, Duration::from_millis(250), f)
}

fn sync(t: Tensor<4>) {
    let _ = t.slice([0..1, 0..1, 0..1, 0..1]).into_data();
}

/// The stride of `strided` at `n` tokens in blocks of `block`: the one nearest `sqrt(n)`
/// among those the original code accepts (its `strided_transpose` asserts that `n / stride`
/// is a multiple of the block size); `sqrt(n)` itself when none divides.
fn stride(n: usize, block: usize) -> usize {
    let root = (n as f64).sqrt();
    (1..=n)
        .filter(|s| n.is_multiple_of(*s) && (n / s).is_multiple_of(block))
        .min_by(|a, b| {
            (*a as f64 - root)
                .abs()
                .total_cmp(&(*b as f64 - root).abs())
        })
        .unwrap_or(root as usize)
}

fn pattern(name: &str, n: usize, block: usize) -> Box<dyn Pattern> {
    match name {
        "local" => Box::new(Band::sliding_window(256).expect("valid")),
        "strided" => Box::new(Strided::new(stride(n, block)).expect("valid")),
        "fixed" => Box::new(Fixed::new(256, 4, 32).expect("valid")),
        "bigbird" => Box::new(bench_bigbird(n).expect("valid")),
        other => panic!("unknown pattern {other}: expected local, strided, fixed or bigbird"),
    }
}

/// f32 GEMM rate of this machine at the kernels' thread count: [2048 x 2048] x [2048 x 2048]
/// through the `gemm` crate (the one the CPU kernels call per tile) on rayon's pool, whose
/// size (`RAYON_NUM_THREADS`) is also the kernels' parallelism. Burn's own matmul would pick
/// its thread count itself, and on a 16-core host put the window forward at "286% of GEMM".
fn gemm_gflops() -> f64 {
    let m = 2048;
    let fill = |seed: usize| -> Vec<f32> {
        (0..m * m)
            .map(|i| ((i * 7 + seed) % 13) as f32 / 13.0 - 0.5)
            .collect()
    };
    let (a, b, mut c) = (fill(1), fill(2), vec![0.0f32; m * m]);
    let threads = rayon::current_num_threads();
    let ms = median_ms(5, || {
        let rs = m as isize;
        // SAFETY: `a`, `b` and `c` are m x m row-major (column stride 1, row stride m), so
        // every address the GEMM touches lies inside them; `c` is written only.
        unsafe {
            gemm::gemm(
                m,
                m,
                m,
                c.as_mut_ptr(),
                1,
                rs,
                false,
                a.as_ptr(),
                1,
                rs,
                b.as_ptr(),
                1,
                rs,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            );
        }
        std::hint::black_box(&c);
    });
    2.0 * (m as f64).powi(3) / (ms * 1e6)
}

/// The process's peak resident set in MiB (`VmHWM` of `/proc/self/status`; Linux).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// One forward+backward of `pattern` on an autodiff device: the peak memory a training
/// step of the attention needs (inputs, output, gradients and the kernels' scratch).
fn measure_memory(args: &Args, device: &Device) -> Result<(), Box<dyn std::error::Error>> {
    let (name, n, block) = (&args.patterns[0], args.n[0], args.block[0]);
    let (h, d) = (args.heads, args.head_dim);
    let layout = BlockLayout::build(pattern(name, n, block).as_ref(), n, block, h)?;
    let before = peak_rss_mib().unwrap_or(f64::NAN);
    let ad = device.clone().autodiff();
    let x =
        || Tensor::<4>::random([1, h, n, d], Distribution::Normal(0.0, 1.0), &ad).require_grad();
    let (q, k, v) = (x(), x(), x());
    let out = sparse_attention(
        q.clone(),
        k.clone(),
        v.clone(),
        &layout,
        AttentionOptions::default(),
    )?;
    let grads = out.sum().backward();
    for t in [&q, &k, &v] {
        sync(t.grad(&grads).expect("tracked"));
    }
    let tensor_mib = (h * n * d * 4) as f64 / (1024.0 * 1024.0);
    println!(
        "{name} n={n} b={block} H={h} d={d}: peak RSS {:.0} MiB (before the inputs: {before:.0} MiB; one [1, H, n, d] f32 tensor: {tensor_mib:.0} MiB)",
        peak_rss_mib().unwrap_or(f64::NAN)
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let device = sparse_attn::backends::device(&args.backend)?;
    if args.memory {
        return measure_memory(&args, &device);
    }
    if args.scaling {
        return measure_scaling(&args, &device);
    }
    let threads = rayon::current_num_threads();
    let gemm = gemm_gflops();
    println!(
        "backend {} threads {threads}: f32 GEMM {gemm:.1} GFLOP/s\n",
        args.backend
    );
    println!(
        "| pattern | n | b | density | fwd ms | bwd ms (op) | bwd/fwd (ops: median (best)) | fwd+bwd ms (autodiff) | useful GFLOP/s | % GEMM | dense fwd ms | speedup | 0.7/density | portable fwd ms | portable fwd+bwd ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let (h, d) = (args.heads, args.head_dim);
    let mut rows = Vec::new();
    // Burn's dense attention does not depend on the pattern: time it once per n.
    let mut dense_cache: std::collections::HashMap<usize, f64> = std::collections::HashMap::new();
    for name in &args.patterns {
        for &block in &args.block {
            for &n in &args.n {
                let p = pattern(name, n, block);
                let layout = BlockLayout::build(p.as_ref(), n, block, h)?;
                let pairs = (0..h)
                    .map(|head| layout.stats(head).map(|s| s.allowed_pairs))
                    .sum::<Result<u64, _>>()?;
                let density = pairs as f64 / (h as f64 * n as f64 * n as f64);
                let reps = args.reps.unwrap_or(if n <= 8192 {
                    7
                } else if n <= 16384 {
                    5
                } else {
                    3
                });
                let x =
                    || Tensor::<4>::random([1, h, n, d], Distribution::Normal(0.0, 1.0), &device);
                let (q, k, v) = (x(), x(), x());
                let (fwd_ms, fwd_bwd_ms) = time_attention(
                    sparse_attention,
                    [&q, &k, &v],
                    &layout,
                    reps,
                    args.forward_only,
                );
                let ops = (!args.forward_only).then(|| time_ops([&q, &k, &v], &layout, reps));
                let (portable_fwd_ms, portable_fwd_bwd_ms) = if n <= args.portable_max_n {
                    let (f, fb) = time_attention(
                        sparse_attention_portable,
                        [&q, &k, &v],
                        &layout,
                        reps,
                        args.forward_only,
                    );
                    (Some(f), fb)
                } else {
                    (None, None)
                };
                let dense_fwd_ms = (n <= args.dense_max_n).then(|| {
                    *dense_cache.entry(n).or_insert_with(|| {
                        let options = AttentionModuleOptions {
                            scale: None,
                            softcap: None,
                            is_causal: true,
                        };
                        median_ms(3, || {
                            sync(attention(
                                q.clone(),
                                k.clone(),
                                v.clone(),
                                None,
                                None,
                                options,
                            ))
                        })
                    })
                });
                let extras = if args.extras {
                    extra_options(n)
                        .into_iter()
                        .map(|extra| {
                            let opts = extra.for_inputs(&q);
                            let ms =
                                time_forward(sparse_attention, [&q, &k, &v], &layout, &opts, reps);
                            (extra.name.to_string(), ms)
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                let useful = 4.0 * pairs as f64 * d as f64 / (fwd_ms * 1e6);
                let fmt = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}"));
                println!(
                    "| {name} | {n} | {block} | {density:.4} | {fwd_ms:.2} | {} | {} | {} | {useful:.1} | {:.0}% | {} | {} | {:.1} | {} | {} |",
                    fmt(ops.as_ref().map(|o| o.bwd_ms)),
                    ops.as_ref().map_or("-".to_string(), |o| format!(
                        "{:.2} ({:.2})",
                        o.bwd_fwd, o.bwd_fwd_best
                    )),
                    fmt(fwd_bwd_ms),
                    100.0 * useful / gemm,
                    fmt(dense_fwd_ms),
                    fmt(dense_fwd_ms.map(|t| t / fwd_ms)),
                    0.7 / density,
                    fmt(portable_fwd_ms),
                    fmt(portable_fwd_bwd_ms),
                );
                rows.push(Row {
                    backend: args.backend.clone(),
                    pattern: p.name(),
                    n,
                    heads: h,
                    head_dim: d,
                    block,
                    threads,
                    density,
                    fwd_ms,
                    fwd_bwd_ms,
                    fwd_op_ms: ops.as_ref().map(|o| o.fwd_ms),
                    bwd_ms: ops.as_ref().map(|o| o.bwd_ms),
                    bwd_fwd: ops.as_ref().map(|o| o.bwd_fwd),
                    bwd_fwd_best: ops.as_ref().map(|o| o.bwd_fwd_best),
                    useful_gflops: useful,
                    dense_fwd_ms,
                    portable_fwd_ms,
                    portable_fwd_bwd_ms,
                    gemm_gflops: gemm,
                    extras,
                });
            }
        }
    }
    if args.extras {
        let names: Vec<&str> = extra_options(2).iter().map(|extra| extra.name).collect();
        println!(
            "\n| pattern | n | b | fwd ms | {} |",
            names
                .iter()
                .map(|n| format!("{n} fwd ms (cost)"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        println!("|---|---|---|---|{}", "---|".repeat(names.len()));
        for r in &rows {
            if r.extras.is_empty() {
                continue;
            }
            let cells: Vec<String> = r
                .extras
                .iter()
                .map(|(_, t)| format!("{t:.2} ({:+.1}%)", 100.0 * (t - r.fwd_ms) / r.fwd_ms))
                .collect();
            println!(
                "| {} | {} | {} | {:.2} | {} |",
                r.pattern,
                r.n,
                r.block,
                r.fwd_ms,
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
