//! The half-precision matrix: f16 and bf16 inputs over patterns, block sizes, head dims 16 to
//! 256, lengths that are not a multiple of the block, key padding, dropout, grouped-query
//! attention, the strided token order and the score modifiers, forward and gradients against
//! the f64 reference (which sees the same rounded inputs) on every backend that has the dtype.
//!
//! Tolerances (relative, `|got - want| <= tol * (1 + |want|)`): 1e-2 for f16 and 5e-2 for
//! bf16. They cover the output's rounding to the input dtype and the probabilities that the
//! tensor-core kernels feed to their second product in the input dtype (as FlexAttention and
//! FlashAttention do); accumulation is f32 everywhere.
//!
//! On a GPU with tensor cores, `SPARSE_ATTN_EXPECT_TENSOR_CORES=1` (with
//! `SPARSE_ATTN_TEST_GPU=1`, a `vulkan` build and `--test-threads=1`, the launch counters
//! being process-wide) makes every case check that the `vulkan` device ran it, forward and
//! backward, on the tensor-core kernels and not on the FMA fallback.
// rstest turns the case columns into arguments of the generated test functions.
#![allow(clippy::too_many_arguments)]

use std::sync::Arc;

use burn::tensor::{DType, FloatDType, Tensor};
use rstest::rstest;
use sparse_attn_core::pattern::{Band, BigBird, BigBirdConfig, Fixed, Longformer, Strided};
use sparse_attn_core::reference::{
    RefOptions, RefShape, reference_backward_with, reference_forward_with,
};
use sparse_attn_core::{
    AttentionOptions, BlockLayout, DropoutMask, Pattern, RelativeBuckets, sparse_attention,
};

use crate::common::{Rng, assert_close, devices, rounded, to_tensor};

fn pattern(name: &str, n: usize) -> Arc<dyn Pattern> {
    match name {
        "all" => Arc::new(Band::causal()),
        "local" => Arc::new(Band::local(n / 3 + 5).unwrap()),
        // Permuted layout: the kernels apply the token order by index.
        "strided" => Arc::new(Strided::new(7).unwrap()),
        "fixed" => Arc::new(Fixed::new(64, 2, 1).unwrap()),
        "longformer" => Arc::new(Longformer::new(20, vec![0, n / 2], false).unwrap()),
        "bigbird" => Arc::new(
            BigBird::new(
                BigBirdConfig {
                    window: 24,
                    global_tokens: vec![1],
                    random_blocks: 1,
                    random_block: 16,
                    seed: 5,
                    causal: true,
                },
                n,
            )
            .unwrap(),
        ),
        other => panic!("unknown test pattern {other}"),
    }
}

/// Which kernel families served a case on `backend`, as launch counter deltas.
#[cfg(feature = "wgpu")]
struct Launches(sparse_attn_wgpu::LaunchCounts);

#[cfg(feature = "wgpu")]
impl Launches {
    fn start() -> Self {
        Self(sparse_attn_wgpu::launch_counts())
    }

    /// Under `SPARSE_ATTN_EXPECT_TENSOR_CORES=1`, the `vulkan` device must have run the
    /// forward and the backward on the tensor-core kernels, and nothing on the FMA ones.
    fn check(&self, backend: &str, what: &str) {
        let expect = std::env::var("SPARSE_ATTN_EXPECT_TENSOR_CORES").is_ok_and(|v| v == "1");
        let now = sparse_attn_wgpu::launch_counts();
        let (tc, fma) = (now.tensor_core - self.0.tensor_core, now.fma - self.0.fma);
        if backend == "vulkan" {
            eprintln!("{what}: tensor-core passes {tc}, FMA passes {fma}");
            if expect {
                assert_eq!(
                    (tc, fma),
                    (2, 0),
                    "{what}: expected the tensor-core kernels"
                );
            }
        }
    }
}

#[cfg(not(feature = "wgpu"))]
struct Launches;

#[cfg(not(feature = "wgpu"))]
impl Launches {
    fn start() -> Self {
        Self
    }
    fn check(&self, _backend: &str, _what: &str) {}
}

/// One case of the matrix: `(pattern, n, block, heads, kv_heads, head_dim, padded, dropout,
/// score modifiers)`; the modifiers are soft-capping at 1.5 (most scores of these inputs
/// bend), ALiBi with slopes 0.3, 0.1, 0.05, 0, and a relative-position bias (16 buckets up
/// to 64, its table's gradient checked too).
#[rstest]
#[case::local_d16_b16("local", 37, 16, 2, 2, 16, false, 0.0, false)]
#[case::causal_d64_b64("all", 150, 64, 2, 2, 64, false, 0.0, false)]
#[case::local_d128_b128("local", 300, 128, 2, 2, 128, false, 0.0, false)]
#[case::strided_d64_b32("strided", 200, 32, 2, 2, 64, false, 0.0, false)]
#[case::strided_d128_padded_dropout_gqa("strided", 150, 16, 2, 1, 128, true, 0.1, false)]
#[case::fixed_d128_b64_gqa_padded("fixed", 256, 64, 4, 2, 128, true, 0.0, false)]
#[case::longformer_d64_b64_dropout("longformer", 130, 64, 4, 2, 64, false, 0.2, false)]
#[case::bigbird_d64_b16_padded_dropout("bigbird", 180, 16, 2, 1, 64, true, 0.1, false)]
#[case::local_d256_b32("local", 100, 32, 1, 1, 256, false, 0.0, false)]
#[case::local_d64_b64_softcap_alibi("local", 150, 64, 2, 2, 64, false, 0.0, true)]
#[case::strided_d128_b32_padded_gqa_softcap_alibi("strided", 200, 32, 4, 2, 128, true, 0.0, true)]
#[case::causal_d128_b128_dropout_softcap_alibi("all", 300, 128, 2, 1, 128, false, 0.1, true)]
fn half_precision_matrix(
    #[values(FloatDType::F16, FloatDType::BF16)] dtype: FloatDType,
    #[case] name: &str,
    #[case] n: usize,
    #[case] block: usize,
    #[case] heads: usize,
    #[case] kv_heads: usize,
    #[case] d: usize,
    #[case] padded: bool,
    #[case] p: f64,
    #[case] modified: bool,
) {
    let tol = if dtype == FloatDType::F16 { 1e-2 } else { 5e-2 };
    let batch = 2;
    let pattern = pattern(name, n);
    let layout = BlockLayout::build(pattern.as_ref(), n, block, heads).unwrap();
    let shape = RefShape {
        batch,
        heads,
        seq_len: n,
        head_dim: d,
    };
    let lengths = vec![n, n / 2 + 3];
    let seed = 23;
    let slopes: Vec<f64> = [0.3, 0.1, 0.05, 0.0][..heads].to_vec();
    let mut rng = Rng::new((n * 31 + block + d * 7 + heads) as u64);
    let bias = modified.then(|| {
        let buckets = RelativeBuckets::new(16, 64, false).unwrap();
        let table = rounded(rng.normals(heads * 16), dtype);
        (buckets, table)
    });
    let reference = RefOptions {
        kv_heads: Some(kv_heads),
        key_lengths: padded.then(|| lengths.clone()),
        dropout: DropoutMask::new(p, seed),
        softcap: modified.then_some(1.5),
        alibi: modified.then(|| slopes.clone()),
        relative: bias.clone(),
    };
    let mut options = AttentionOptions::default().dropout(p, seed);
    if padded {
        options = options.key_lengths(lengths);
    }
    if modified {
        options = options.softcap(1.5).alibi_slopes(slopes);
    }
    let (q_dims, kv_dims) = ([batch, heads, n, d], [batch, kv_heads, n, d]);
    let q = rounded(rng.normals(q_dims.iter().product()), dtype);
    let [k, v] = [(); 2].map(|_| rounded(rng.normals(kv_dims.iter().product()), dtype));
    let dout = rounded(rng.normals(q.len()), dtype);
    let scale = 1.0 / (d as f64).sqrt();
    let want = reference_forward_with(pattern.as_ref(), shape, &reference, &q, &k, &v, scale);
    let grads = reference_backward_with(
        pattern.as_ref(),
        shape,
        &reference,
        &q,
        &k,
        &v,
        &dout,
        scale,
    );
    let f32s =
        |t: Tensor<4>| -> Vec<f32> { t.cast(FloatDType::F32).into_data().try_to_vec().unwrap() };
    for (backend, device) in devices() {
        if !device.supports_dtype(DType::from(dtype)) {
            eprintln!("{backend}: no {dtype:?} on this device, skipped");
            continue;
        }
        let what = format!(
            "{backend} {dtype:?} {name} n={n} b={block} h={heads}/{kv_heads} d={d} \
             padded={padded} p={p} modified={modified}"
        );
        let launches = Launches::start();
        let tq = to_tensor(&q, q_dims, &device).cast(dtype).require_grad();
        let [tk, tv] = [&k, &v].map(|x| to_tensor(x, kv_dims, &device).cast(dtype).require_grad());
        let mut options = options.clone();
        let table = bias.as_ref().map(|(buckets, table)| {
            let t = to_tensor(table, [heads, buckets.count()], &device)
                .cast(dtype)
                .require_grad();
            options = options.clone().relative_bias(t.clone(), buckets.clone());
            t
        });
        let out = sparse_attention(tq.clone(), tk.clone(), tv.clone(), &layout, options).unwrap();
        assert_eq!(out.dtype(), DType::from(dtype), "{what}");
        assert_close(&f32s(out.clone()), &want.out, tol, &format!("{what}: out"));
        let g = (out * to_tensor(&dout, q_dims, &device).cast(dtype))
            .sum()
            .backward();
        for (name, t, want) in [
            ("dq", &tq, &grads.dq),
            ("dk", &tk, &grads.dk),
            ("dv", &tv, &grads.dv),
        ] {
            assert_close(
                &f32s(t.grad(&g).unwrap()),
                want,
                tol,
                &format!("{what}: {name}"),
            );
        }
        if let Some(table) = table {
            // Each entry sums about n * n / buckets score gradients: relative to the
            // largest entry.
            let got: Vec<f32> = table
                .grad(&g)
                .unwrap()
                .cast(FloatDType::F32)
                .into_data()
                .try_to_vec()
                .unwrap();
            let size = grads.dbias.iter().fold(1.0f64, |m, x| m.max(x.abs()));
            let scaled: Vec<f64> = grads.dbias.iter().map(|x| x / size).collect();
            let got: Vec<f32> = got.iter().map(|&x| (f64::from(x) / size) as f32).collect();
            assert_close(&got, &scaled, tol, &format!("{what}: dbias"));
        }
        launches.check(backend, &what);
    }
}
