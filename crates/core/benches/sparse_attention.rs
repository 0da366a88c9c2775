//! Criterion benchmarks: layout building and the fused CPU path against Burn's dense
//! attention on the same backend (`cargo bench -p sparse-attn-core`). The wide sweep with
//! GFLOP/s, JSON and a plot is `cargo xtask bench cpu`.

// burn-ndarray is deprecated upstream (0.22) but is our default backend.
#![allow(deprecated)]
// criterion's macros generate undocumented items.
#![allow(missing_docs)]

use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Distribution, Tensor};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use sparse_attn_core::pattern::Band;
use sparse_attn_core::{AttentionOptions, BlockLayout, sparse_attention};

fn layouts(c: &mut Criterion) {
    let window = Band::sliding_window(1024).expect("valid window");
    c.bench_function("layout/window1024/n=1M/b=64", |b| {
        b.iter(|| BlockLayout::build(&window, 1 << 20, 64, 1).expect("valid layout"))
    });
}

/// Ends a timed region: CPU backends run eagerly; reading one element waits for the op.
fn sync(t: Tensor<4>) {
    let _ = t.slice([0..1, 0..1, 0..1, 0..1]).into_data();
}

fn attention_cpu(c: &mut Criterion) {
    let device = Device::ndarray();
    let (h, d, block) = (8, 64, 64);
    let mut group = c.benchmark_group("attention/ndarray/window256/h8/d64");
    group.sample_size(10);
    for n in [1024, 4096] {
        let layout = BlockLayout::build(&Band::sliding_window(256).expect("valid"), n, block, h)
            .expect("valid");
        let x = || Tensor::<4>::random([1, h, n, d], Distribution::Normal(0.0, 1.0), &device);
        let (q, k, v) = (x(), x(), x());
        group.bench_with_input(BenchmarkId::new("sparse_fwd", n), &n, |b, _| {
            b.iter(|| {
                sync(
                    sparse_attention(
                        q.clone(),
                        k.clone(),
                        v.clone(),
                        &layout,
                        AttentionOptions::default(),
                    )
                    .expect("valid"),
                )
            })
        });
        let ad = device.clone().autodiff();
        let [qa, ka, va] =
            [&q, &k, &v].map(|t| Tensor::<4>::from_data(t.to_data(), &ad).require_grad());
        group.bench_with_input(BenchmarkId::new("sparse_fwd_bwd", n), &n, |b, _| {
            b.iter(|| {
                let out = sparse_attention(
                    qa.clone(),
                    ka.clone(),
                    va.clone(),
                    &layout,
                    AttentionOptions::default(),
                )
                .expect("valid");
                let grads = out.sum().backward();
                sync(qa.grad(&grads).expect("tracked"));
            })
        });
        let causal = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        group.bench_with_input(BenchmarkId::new("burn_dense_causal_fwd", n), &n, |b, _| {
            b.iter(|| {
                sync(attention(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    None,
                    None,
                    causal,
                ))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, layouts, attention_cpu);
criterion_main!(benches);
