//! The test matrix: patterns x block sizes x lengths x heads x head dims, forward and
//! gradients against the f64 dense reference, on every backend compiled in.

use std::sync::Arc;

use burn::tensor::Tensor;
use rstest::rstest;
use sparse_attn_core::pattern::{
    Band, BigBird, BigBirdConfig, Dilated, Fixed, FnPattern, Longformer, PerHead, Streaming,
    Strided, Union, VariableWindows,
};
use sparse_attn_core::reference::{RefShape, reference_backward, reference_forward};
use sparse_attn_core::{
    AttentionOptions, BlockLayout, Pattern, Result, sparse_attention, sparse_attention_portable,
};

use crate::common::{Rng, assert_close, devices, to_tensor};

/// An attention entry point under test.
type Attend =
    fn(Tensor<4>, Tensor<4>, Tensor<4>, &BlockLayout, AttentionOptions) -> Result<Tensor<4>>;

/// Runs forward and backward of `pattern` on every backend and compares with the reference.
fn check(pattern: &dyn Pattern, n: usize, block: usize, heads: usize, d: usize) {
    check_with(sparse_attention, pattern, n, block, heads, d);
}

/// [`check`] for a given entry point.
fn check_with(
    attend: Attend,
    pattern: &dyn Pattern,
    n: usize,
    block: usize,
    heads: usize,
    d: usize,
) {
    let layout = BlockLayout::build(pattern, n, block, heads).unwrap();
    let shape = RefShape {
        batch: 2,
        heads,
        seq_len: n,
        head_dim: d,
    };
    let len = 2 * heads * n * d;
    let mut rng = Rng::new((n * 131 + block * 7 + heads * 3 + d) as u64);
    let [q, k, v, dout] = [(); 4].map(|_| rng.normals(len));
    let scale = 1.0 / (d as f64).sqrt();
    let expected = reference_forward(pattern, shape, &q, &k, &v, scale);
    let grads = reference_backward(pattern, shape, &q, &k, &v, &dout, scale);
    let dims = [2, heads, n, d];
    for (backend, device) in devices() {
        let what = format!(
            "{backend} {} n={n} b={block} h={heads} d={d}",
            pattern.name()
        );
        let [tq, tk, tv] = [&q, &k, &v].map(|x| to_tensor(x, dims, &device).require_grad());
        let out = attend(
            tq.clone(),
            tk.clone(),
            tv.clone(),
            &layout,
            AttentionOptions::default(),
        )
        .unwrap();
        assert_close(
            &out.clone().into_data().try_to_vec::<f32>().unwrap(),
            &expected.out,
            2e-5,
            &format!("{what}: out"),
        );
        let g = (out * to_tensor(&dout, dims, &device)).sum().backward();
        for (name, t, want) in [
            ("dq", &tq, &grads.dq),
            ("dk", &tk, &grads.dk),
            ("dv", &tv, &grads.dv),
        ] {
            let got: Vec<f32> = t.grad(&g).unwrap().into_data().try_to_vec().unwrap();
            assert_close(&got, want, 5e-5, &format!("{what}: {name}"));
        }
    }
}

fn arc(p: impl Pattern + 'static) -> Arc<dyn Pattern> {
    Arc::new(p)
}

fn pattern(name: &str, n: usize) -> Arc<dyn Pattern> {
    match name {
        "all" => arc(Band::causal()),
        "dense" => arc(Band::dense()),
        "local" => arc(Band::local(5).unwrap()),
        "bidirectional_window" => arc(Band::bidirectional_window(3)),
        "strided" => arc(Strided::new(3).unwrap()),
        "strided_bidirectional" => arc(Strided::bidirectional(4).unwrap()),
        "paper_strided" => arc(Union::new(vec![
            arc(Band::local(4).unwrap()),
            arc(Strided::new(4).unwrap()),
        ])
        .unwrap()),
        "fixed" => arc(Fixed::new(8, 2, 2).unwrap()),
        "fixed_bidirectional" => arc(Fixed::bidirectional(6, 1, 3).unwrap()),
        "dilated" => arc(Dilated::new(3, 2, true).unwrap()),
        "longformer" => arc(Longformer::new(2, vec![0, n / 2], false).unwrap()),
        "bigbird" => arc(BigBird::new(
            BigBirdConfig {
                window: 2,
                global_tokens: vec![n / 2],
                random_blocks: 1,
                random_block: 4,
                seed: 3,
                causal: true,
            },
            n,
        )
        .unwrap()),
        "streaming" => arc(Streaming::new(2, 3).unwrap()),
        "variable" => arc(VariableWindows::new(vec![3, 5], true).unwrap()),
        // Per-head patterns, one of which leaves rows without any key (exercises empty rows).
        "per_head" => arc(PerHead::new(vec![
            arc(Band::local(2).unwrap()),
            arc(FnPattern::new("odd_rows_only", false, |_, i, j| {
                i % 2 == 1 && j < i
            })),
        ])
        .unwrap()),
        other => panic!("unknown test pattern {other}"),
    }
}

#[rstest]
fn matrix(
    #[values(
        "all",
        "dense",
        "local",
        "bidirectional_window",
        "strided",
        "strided_bidirectional",
        "paper_strided",
        "fixed",
        "fixed_bidirectional",
        "dilated",
        "longformer",
        "bigbird",
        "streaming",
        "variable",
        "per_head"
    )]
    name: &str,
    #[values((1, 4), (3, 4), (5, 4), (16, 8), (21, 8))] nb: (usize, usize),
) {
    let (n, block) = nb;
    let heads = if matches!(name, "per_head" | "fixed") {
        2
    } else {
        1 + n % 3
    };
    let p = pattern(name, n);
    check(p.as_ref(), n, block, heads, if n % 2 == 0 { 3 } else { 8 });
}

#[rstest]
#[case(1, 1)]
#[case(1, 16)]
#[case(3, 1)]
#[case(2, 32)]
fn head_counts_and_dims(#[case] heads: usize, #[case] d: usize) {
    check(&Band::sliding_window(6).unwrap(), 19, 4, heads, d);
}

/// The block sizes and head dims the GPU kernels tile (blocks 16..128, head dims up to 256;
/// tiles smaller than a block when shared memory is short), with lengths that are not a
/// multiple of the block and windows that give full and partial blocks, in natural and in
/// permuted (strided) token order. Small problems give each row of the CubeCL kernels
/// several units (a split over keys, merged in the cube); the last case has enough rows
/// (17,664) for one unit per row.
#[rstest]
#[case(16, 37, 64, 2)]
#[case(32, 70, 16, 1)]
#[case(64, 131, 8, 2)]
#[case(128, 259, 4, 1)]
#[case(16, 21, 256, 1)]
#[case(8, 19, 100, 2)]
#[case(16, 1100, 4, 8)]
fn kernel_tile_sizes(
    #[case] block: usize,
    #[case] n: usize,
    #[case] d: usize,
    #[case] heads: usize,
) {
    check(&Band::local(block + 5).unwrap(), n, block, heads, d);
    check(&Strided::new(5).unwrap(), n, block, heads, d);
}

/// The portable path (Burn tensor ops, Burn's autodiff for the backward) against the
/// reference: natural order, token order (strided), per-head layouts, masks, empty rows.
#[rstest]
fn portable_path(#[values("local", "strided", "fixed", "per_head")] name: &str) {
    let n = 21;
    let heads = if matches!(name, "per_head" | "fixed") {
        2
    } else {
        3
    };
    check_with(
        sparse_attention_portable,
        pattern(name, n).as_ref(),
        n,
        8,
        heads,
        5,
    );
}

/// Non-contiguous inputs (after `swap_dims`) give the same result as contiguous ones, in
/// natural and in permuted (strided) token order.
#[rstest]
fn non_contiguous_inputs(#[values("all", "strided")] name: &str) {
    let layout = BlockLayout::build(pattern(name, 12).as_ref(), 12, 4, 2).unwrap();
    let mut rng = Rng::new(5);
    let x = rng.normals(2 * 12 * 2 * 4);
    for (backend, device) in devices() {
        let t = to_tensor(&x, [2, 12, 2, 4], &device);
        let swapped = t.clone().swap_dims(1, 2);
        let contiguous = Tensor::<4>::from_data(swapped.clone().into_data(), &device);
        let a = sparse_attention(
            swapped.clone(),
            swapped.clone(),
            swapped,
            &layout,
            AttentionOptions::default(),
        )
        .unwrap();
        let b = sparse_attention(
            contiguous.clone(),
            contiguous.clone(),
            contiguous,
            &layout,
            AttentionOptions::default(),
        )
        .unwrap();
        let a: Vec<f32> = a.into_data().try_to_vec().unwrap();
        let b: Vec<f64> = b
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        assert_close(&a, &b, 1e-6, &format!("{backend}: swapped vs contiguous"));
    }
}

/// Two runs give bit-identical outputs and gradients.
#[test]
fn deterministic() {
    let layout = BlockLayout::build(&Band::sliding_window(9).unwrap(), 40, 8, 2).unwrap();
    let mut rng = Rng::new(9);
    let x = rng.normals(2 * 2 * 40 * 5);
    for (backend, device) in devices() {
        let run = || {
            let t = to_tensor(&x, [2, 2, 40, 5], &device).require_grad();
            let out = sparse_attention(
                t.clone(),
                t.clone(),
                t.clone(),
                &layout,
                AttentionOptions::default(),
            )
            .unwrap();
            let g = out.clone().sum().backward();
            let grad: Vec<f32> = t.grad(&g).unwrap().into_data().try_to_vec().unwrap();
            (out.into_data().try_to_vec::<f32>().unwrap(), grad)
        };
        assert_eq!(run(), run(), "{backend}: two runs differ");
    }
}

/// `f64` tensors run the `f64` kernels on CPU backends and match the reference tightly; a
/// CubeCL device that holds f64 tensors (Vulkan on a real GPU) answers with a typed error
/// (its kernels accumulate in f32, which would silently lose the precision asked for).
#[rstest]
#[case("strided", 23, 8)]
#[case("bigbird", 30, 4)]
fn f64_inputs(#[case] name: &str, #[case] n: usize, #[case] block: usize) {
    use burn::tensor::{DType, TensorData};
    let p = pattern(name, n);
    let (heads, d) = (2, 5);
    let layout = BlockLayout::build(p.as_ref(), n, block, heads).unwrap();
    let shape = RefShape {
        batch: 1,
        heads,
        seq_len: n,
        head_dim: d,
    };
    let mut rng = Rng::new(77);
    let [q, k, v] = [(); 3].map(|_| rng.normals(heads * n * d));
    let scale = 1.0 / (d as f64).sqrt();
    let expected = reference_forward(p.as_ref(), shape, &q, &k, &v, scale);
    let ones = vec![1.0; q.len()];
    let grads = reference_backward(p.as_ref(), shape, &q, &k, &v, &ones, scale);
    for (backend, device) in devices() {
        if !device.supports_dtype(DType::F64) {
            continue; // wgpu's WGSL has no f64
        }
        let t = |x: &[f64]| {
            Tensor::<4>::from_data(
                TensorData::new(x.to_vec(), [1, heads, n, d]),
                (&device, DType::F64),
            )
            .require_grad()
        };
        let (tq, tk, tv) = (t(&q), t(&k), t(&v));
        if matches!(backend, "wgpu" | "vulkan") {
            let opts = AttentionOptions::default();
            let err = sparse_attention(tq.clone(), tk, tv, &layout, opts).unwrap_err();
            assert!(err.to_string().contains("f32, f16 or bf16"), "{err}");
            continue;
        }
        let out = sparse_attention(
            tq.clone(),
            tk.clone(),
            tv.clone(),
            &layout,
            AttentionOptions::default(),
        )
        .unwrap();
        assert_eq!(out.dtype(), DType::F64, "{backend}");
        let got: Vec<f64> = out.clone().into_data().try_to_vec().unwrap();
        let worst = got
            .iter()
            .zip(&expected.out)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            worst < 1e-12,
            "{backend} {name}: f64 output differs by {worst}"
        );
        let g = out.sum().backward();
        for (t, want) in [(&tq, &grads.dq), (&tk, &grads.dk), (&tv, &grads.dv)] {
            let got: Vec<f64> = t.grad(&g).unwrap().into_data().try_to_vec().unwrap();
            let worst = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(
                worst < 1e-12,
                "{backend} {name}: f64 gradient differs by {worst}"
            );
        }
    }
}

/// A NaN input reaches only the rows that attend it (CPU kernels). Not asserted on CubeCL
/// devices: WGSL and the Vulkan compilers may assume floats are never NaN, so a shader
/// cannot promise NaN propagation.
#[test]
fn nan_propagates_only_to_rows_that_touch_it() {
    let (n, d, poisoned) = (24, 4, 9);
    let window = Band::sliding_window(4).unwrap();
    let layout = BlockLayout::build(&window, n, 8, 1).unwrap();
    let mut rng = Rng::new(3);
    let q = rng.normals(n * d);
    let mut k = rng.normals(n * d);
    k[poisoned * d + 1] = f64::NAN;
    let cpu = devices()
        .into_iter()
        .filter(|(name, _)| !matches!(*name, "wgpu" | "vulkan"));
    for (backend, device) in cpu {
        let t = |x: &[f64]| to_tensor(x, [1, 1, n, d], &device);
        let out =
            sparse_attention(t(&q), t(&k), t(&q), &layout, AttentionOptions::default()).unwrap();
        let out: Vec<f32> = out.into_data().try_to_vec().unwrap();
        for i in 0..n {
            let touched = window.allows(0, i, poisoned);
            let row = &out[i * d..(i + 1) * d];
            assert_eq!(
                row.iter().any(|x| x.is_nan()),
                touched,
                "{backend}: row {i}"
            );
        }
    }
}
