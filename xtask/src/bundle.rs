//! `cargo xtask gpu-bundle`: packs the GPU benchmark and the conformance tests for a GPU
//! machine that has no Rust toolchain (../shared/GPU.md).
//!
//! Builds, in release and with the `vulkan` feature, the `bench_gpu` and `bench_decode`
//! examples and the `sparse-attn-core` conformance test binary; strips them and compresses
//! them with xz into `.gpu/` (git-ignored), named after them (`bench_gpu.xz`, ...). The GPU machine unpacks
//! them with `xz -dc .gpu/NAME.xz > /tmp/NAME && chmod +x /tmp/NAME`.

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

/// Runs a cargo build command with JSON messages; returns the executable of target `name`.
fn build(args: &[&str], name: &str) -> Result<PathBuf> {
    println!("$ cargo {}", args.join(" "));
    let output = Command::new(env!("CARGO"))
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .output()
        .context("running cargo")?;
    if !output.status.success() {
        bail!("cargo {} failed with {}", args.join(" "), output.status);
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Artifact>(line).ok())
        .filter(|a| a.reason == "compiler-artifact")
        .find_map(|a| match (a.target, a.executable) {
            (Some(t), Some(exe)) if t.name == name => Some(exe),
            _ => None,
        })
        .with_context(|| format!("cargo built no executable named {name}"))
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

/// Builds and packs the binaries into `.gpu/`: the GPU benchmark, the conformance tests and
/// the CPU benchmark (the GPU machine's host is a quieter many-core CPU).
pub fn gpu_bundle() -> Result<()> {
    let dir = Path::new(".gpu");
    std::fs::create_dir_all(dir)?;
    let cpu_bench = build(
        &[
            "build",
            "--release",
            "-p",
            "sparse-attn",
            "--features",
            "flex",
            "--example",
            "bench_cpu",
        ],
        "bench_cpu",
    )?;
    pack(&cpu_bench, dir, "bench_cpu")?;
    for example in ["bench_gpu", "bench_decode"] {
        let bench = build(
            &[
                "build",
                "--release",
                "-p",
                "sparse-attn",
                "--features",
                "vulkan",
                "--example",
                example,
            ],
            example,
        )?;
        pack(&bench, dir, example)?;
    }
    let tests = build(
        &[
            "test",
            "--release",
            "--no-run",
            "-p",
            "sparse-attn-core",
            "--features",
            "vulkan",
            "--test",
            "conformance",
        ],
        "conformance",
    )?;
    pack(&tests, dir, "conformance")
}
