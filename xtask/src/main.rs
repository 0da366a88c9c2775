//! Maintainer tasks (matklad's xtask pattern): `cargo xtask ci`, `cargo xtask bench cpu`,
//! `cargo xtask bench train`, `cargo xtask bench decode`, `cargo xtask bench gpu`, `cargo xtask bench-layout`,
//! `cargo xtask gpu-bundle`.

mod bundle;
mod plot;

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "sparse-attn maintainer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// fmt check, clippy with warnings denied, and the test feature matrix (the three test
    /// commands of README.md).
    Ci,
    /// Layout build time and memory of every built-in pattern and combinator, n = 64k..1M
    /// (release build).
    BenchLayout,
    /// Benchmarks (release build); extra arguments go to the benchmark binary.
    Bench {
        /// Which benchmark: `cpu` (CPU attention kernels), `gpu` (CubeCL kernels through
        /// Vulkan, next to Burn's dense attention and, with `--flex FILE`, FlexAttention),
        /// `train` (end-to-end training) or `decode` (cached generation,
        /// decode kernel per token, window-cache stream).
        target: String,
        /// Arguments for the benchmark binary (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build the GPU benchmark and the conformance tests (release, `vulkan`) and the CPU
    /// benchmark, stripped and xz-compressed into `.gpu/`, for a GPU machine without a Rust
    /// toolchain.
    GpuBundle,
    /// The public-API fuzz tests with a long budget (release build, ndarray): the
    /// conformance suite's and the layer's, `cases` random calls each, every one a typed
    /// error or the reference's result.
    Fuzz {
        /// Random cases per backend.
        #[arg(long, default_value_t = 20_000)]
        cases: u64,
    },
}

fn cargo(args: &[&str]) -> Result<()> {
    println!("$ cargo {}", args.join(" "));
    let status = Command::new(env!("CARGO"))
        .args(args)
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("cargo {} failed with {status}", args.join(" "));
    }
    Ok(())
}

/// The features of `cargo test-all` (.cargo/config.toml): every backend CI can run, fusion,
/// burn-train's `Learner`.
const ALL: &str = "sparse-attn/flex,sparse-attn/wgpu,sparse-attn/fusion,sparse-attn/learner";

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Ci => {
            cargo(&["fmt", "--all", "--", "--check"])?;
            cargo(&[
                "clippy",
                "--workspace",
                "--all-targets",
                "--features",
                ALL,
                "--",
                "-D",
                "warnings",
            ])?;
            // The README's test commands, through the aliases of .cargo/config.toml.
            cargo(&["test", "--workspace"])?;
            cargo(&["test-wgpu"])?;
            cargo(&["test-all"])
        }
        Task::GpuBundle => bundle::gpu_bundle(),
        Task::Fuzz { cases } => {
            // SAFETY of the environment: xtask is single-threaded here.
            unsafe { std::env::set_var("SPARSE_ATTN_FUZZ_CASES", cases.to_string()) };
            cargo(&[
                "test",
                "--release",
                "-p",
                "sparse-attn-core",
                "--test",
                "conformance",
                "--",
                "fuzz",
                "--nocapture",
            ])?;
            cargo(&[
                "test",
                "--release",
                "-p",
                "sparse-attn-nn",
                "--lib",
                "--",
                "layer_fuzz",
                "--nocapture",
            ])
        }
        Task::BenchLayout => cargo(&[
            "run",
            "--release",
            "-p",
            "sparse-attn",
            "--example",
            "layout_bench",
        ]),
        Task::Bench { target, args } => {
            let (example, features) = match target.as_str() {
                "cpu" => ("bench_cpu", "flex"),
                "gpu" => ("bench_gpu", "vulkan"),
                "train" => ("bench_train", "flex"),
                "decode" => ("bench_decode", "flex"),
                other => {
                    bail!("unknown benchmark `{other}`: expected cpu, gpu, train or decode")
                }
            };
            let mut cmd = vec![
                "run",
                "--release",
                "-p",
                "sparse-attn",
                "--features",
                features,
                "--example",
                example,
                "--",
            ];
            cmd.extend(args.iter().map(String::as_str));
            cargo(&cmd)?;
            if target != "cpu" {
                return Ok(());
            }
            let json = Path::new("target/bench/cpu.json");
            let png = Path::new("target/bench/cpu.png");
            plot::cpu(json, png)?;
            println!("wrote {}", png.display());
            Ok(())
        }
    }
}
