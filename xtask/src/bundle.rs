//! `cargo xtask gpu-bundle`: packs the benchmarks, the Learner example and the conformance
//! tests for a GPU machine that has no Rust toolchain (../shared/GPU.md).
//!
//! Builds, in release and with one feature set (`flex`, `vulkan`, `learner`), the examples of
//! [`EXAMPLES`] and the `sparse-attn-core` conformance test binary; strips them and
//! compresses them with xz into `.gpu/` (git-ignored), named after them (`bench_gpu.xz`,
//! ...). The GPU machine unpacks them with `xz -dc .gpu/NAME.xz > /tmp/NAME && chmod +x
//! /tmp/NAME`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The part of cargo's JSON messages that names built executables.
#[derive(Deserialize)]
struct Artifact {
    reason: String,
    executable: Option<PathBuf>,
    target: Option<Target>,
}

#[derive(Deserialize)]
struct Target {
    name: String,
}

/// Runs a cargo build command with JSON messages; returns the executables of the targets
/// `names`, in that order.
fn build(args: &[&str], names: &[&str]) -> Result<Vec<PathBuf>> {
    println!("$ cargo {}", args.join(" "));
    let output = Command::new(env!("CARGO"))
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .output()
        .context("running cargo")?;
    if !output.status.success() {
        bail!("cargo {} failed with {}", args.join(" "), output.status);
    }
    let built: Vec<(String, PathBuf)> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Artifact>(line).ok())
        .filter(|a| a.reason == "compiler-artifact")
        .filter_map(|a| Some((a.target?.name, a.executable?)))
        .collect();
    names
        .iter()
        .map(|name| {
            built
                .iter()
                .find(|(target, _)| target == name)
                .map(|(_, exe)| exe.clone())
                .with_context(|| format!("cargo built no executable named {name}"))
        })
        .collect()
}

/// Strips `exe` into `dir/NAME` and compresses it to `dir/NAME.xz`.
fn pack(exe: &Path, dir: &Path, name: &str) -> Result<()> {
    let stripped = dir.join(name);
    let status = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(exe)
        .status()
        .context("running strip")?;
    if !status.success() {
        bail!("strip {} failed", exe.display());
    }
    let status = Command::new("xz")
        .args(["-f", "-T0", "-6"])
        .arg(&stripped)
        .status()
        .context("running xz")?;
    if !status.success() {
        bail!("xz {} failed", stripped.display());
    }
    println!("packed {}.xz", stripped.display());
    Ok(())
}

/// The features of every bundled binary: one feature set, so that the examples and the test
/// binary share one release build of the dependencies.
const FEATURES: &str = "sparse-attn/flex,sparse-attn/vulkan,sparse-attn/learner";

/// The bundled examples: the benchmarks (the GPU machine's host is also a quieter many-core
/// CPU for `bench_cpu`) and the Learner training example.
const EXAMPLES: [&str; 4] = ["bench_cpu", "bench_gpu", "bench_decode", "train_learner"];

/// Builds and packs the binaries into `.gpu/`: the examples and the conformance tests.
pub fn gpu_bundle() -> Result<()> {
    let dir = Path::new(".gpu");
    std::fs::create_dir_all(dir)?;
    let mut args = vec!["build", "--release", "--workspace", "--features", FEATURES];
    for example in EXAMPLES {
        args.extend(["--example", example]);
    }
    for (exe, name) in build(&args, &EXAMPLES)?.iter().zip(EXAMPLES) {
        pack(exe, dir, name)?;
    }
    let tests = build(
        &[
            "test",
            "--release",
            "--no-run",
            "--workspace",
            "--features",
            FEATURES,
            "--test",
            "conformance",
        ],
        &["conformance"],
    )?;
    pack(&tests[0], dir, "conformance")
}
