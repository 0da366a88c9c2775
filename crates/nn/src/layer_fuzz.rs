//! Property test of the layer's public API: random configs (zero and non-dividing widths
//! and heads, key/value heads, block sizes in and out of range, every pattern with odd
//! parameters, dropout, scales including non-finite ones, attention dtypes) and random
//! inputs (0-sized, n = 1, non-multiples of the block, wrong widths, key lengths and
//! padding masks, some of the wrong length). Every config and call gives a typed error or
//! an output equal to the f64 reference computed from the layer's own projections, with
//! finite gradients; none panics.
//!
//! `SPARSE_ATTN_FUZZ_CASES` sets the number of cases (a short budget by default;
//! `cargo xtask fuzz` runs a long one). proptest keeps the inputs of every failure it finds
//! in the crate's `proptest-regressions/layer_fuzz.txt` and runs them first from then on.

// burn-ndarray is deprecated upstream (0.22) but is our default backend.
#![allow(deprecated)]

use burn::tensor::{Bool, Device, FloatDType, Tensor, TensorData};
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};

use crate::attention::tests::{host, reference_output, worst};
use crate::{MultiHeadSparseAttentionConfig, PatternConfig};

/// Cases when `SPARSE_ATTN_FUZZ_CASES` is unset.
const DEFAULT_CASES: u32 = 100;

fn budget() -> u32 {
    std::env::var("SPARSE_ATTN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

/// How the case marks padding.
#[derive(Debug, Clone)]
enum Padding {
    None,
    /// `forward_lengths`.
    Lengths(Lengths),
    /// `forward_padded` with the right-padding mask of these lengths; `extra_column` gives
    /// the mask one column too many.
    Mask {
        lengths: Lengths,
        extra_column: bool,
    },
}

/// Key lengths of a case: `raw[b] % (n + 1)` for each batch row, the last one `n + 1`
/// (too long) when `too_long`, one value too many when `extra`.
#[derive(Debug, Clone)]
struct Lengths {
    raw: [usize; 3],
    too_long: bool,
    extra: bool,
}

impl Lengths {
    fn of(&self, batch: usize, n: usize) -> Vec<usize> {
        let mut lengths: Vec<usize> = (0..batch + usize::from(self.extra))
            .map(|b| self.raw[b % 3] % (n + 1))
            .collect();
        if let (true, Some(last)) = (self.too_long, lengths.last_mut()) {
            *last = n + 1;
        }
        lengths
    }
}

#[derive(Debug, Clone)]
struct Case {
    d_model: usize,
    heads: usize,
    kv_heads: Option<usize>,
    pattern: PatternConfig,
    block: usize,
    dropout: f64,
    bias: bool,
    scale: Option<f64>,
    max_seq_len: Option<usize>,
    attention_dtype: Option<FloatDType>,
    batch: usize,
    n: usize,
    /// Added to `d_model` for the input's width (mostly 0).
    width_extra: usize,
    padding: Padding,
    seed: u64,
}

fn small() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 1usize..12, 1 => Just(0usize)]
}

fn simple_pattern() -> impl Strategy<Value = PatternConfig> {
    prop_oneof![
        Just(PatternConfig::All),
        Just(PatternConfig::Dense),
        small().prop_map(|ctx| PatternConfig::Local { ctx }),
        small().prop_map(|stride| PatternConfig::Strided { stride }),
        small().prop_map(|ctx| PatternConfig::PaperStrided { ctx }),
        (small(), 0usize..3, 0usize..3).prop_map(|(local_ctx, num_verts, vertsize)| {
            PatternConfig::Fixed {
                local_ctx,
                num_verts,
                vertsize,
            }
        }),
        small().prop_map(|window| PatternConfig::SlidingWindow { window }),
        (0usize..6).prop_map(|radius| PatternConfig::BidirectionalWindow { radius }),
        (small(), 0usize..3, any::<bool>()).prop_map(|(window, dilation, causal)| {
            PatternConfig::Dilated {
                window,
                dilation,
                causal,
            }
        }),
        (
            small(),
            prop::collection::vec(0usize..40, 0..3),
            any::<bool>()
        )
            .prop_map(|(window, globals, causal)| PatternConfig::Longformer {
                window,
                globals,
                causal,
            }),
        (
            small(),
            prop::collection::vec(0usize..40, 0..3),
            0usize..3,
            small(),
            any::<u64>(),
            any::<bool>()
        )
            .prop_map(
                |(window, globals, random_blocks, random_block, seed, causal)| {
                    PatternConfig::BigBird {
                        window,
                        globals,
                        random_blocks,
                        random_block,
                        seed,
                        causal,
                    }
                }
            ),
        (0usize..3, small()).prop_map(|(sinks, window)| PatternConfig::Streaming { sinks, window }),
        (prop::collection::vec(0usize..9, 0..4), any::<bool>())
            .prop_map(|(sizes, causal)| PatternConfig::VariableWindows { sizes, causal }),
    ]
}

fn pattern() -> impl Strategy<Value = PatternConfig> {
    prop_oneof![
        6 => simple_pattern(),
        1 => prop::collection::vec(simple_pattern(), 1..5).prop_map(PatternConfig::PerHead),
    ]
}

fn lengths() -> impl Strategy<Value = Lengths> {
    (
        any::<[usize; 3]>(),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(raw, too_long, extra)| Lengths {
            raw,
            too_long,
            extra,
        })
}

fn case() -> impl Strategy<Value = Case> {
    let config = (
        // Heads, head dim, and a width that is not a multiple of the heads now and then.
        prop_oneof![16 => prop::sample::select(vec![1usize, 2, 4]), 1 => Just(0usize), 1 => Just(3usize)],
        1usize..9,
        prop::bool::weighted(0.05),
        prop_oneof![6 => Just(None), 2 => Just(Some(1usize)), 1 => (0usize..3).prop_map(Some)],
        pattern(),
        prop_oneof![18 => prop::sample::select(vec![1usize, 4, 8, 16]), 1 => Just(0usize), 1 => Just(129usize)],
        prop_oneof![16 => Just(0.0), 2 => Just(0.2), 1 => Just(1.0)],
        any::<bool>(),
        prop_oneof![
            6 => Just(None),
            3 => (0.05f64..2.0).prop_map(Some),
            1 => prop::sample::select(vec![0.0, -0.5, f64::NAN, f64::INFINITY]).prop_map(Some),
        ],
    );
    let input = (
        prop_oneof![8 => Just(None), 1 => (0usize..40).prop_map(Some)],
        prop_oneof![8 => Just(None), 2 => Just(Some(FloatDType::F64)), 1 => Just(Some(FloatDType::F16))],
        prop_oneof![1 => Just(0usize), 8 => 1usize..3],
        prop_oneof![1 => Just(0usize), 1 => Just(1usize), 8 => 2usize..40],
        prop_oneof![12 => Just(0usize), 1 => Just(1usize)],
        prop_oneof![
            2 => Just(Padding::None),
            1 => lengths().prop_map(Padding::Lengths),
            1 => (lengths(), prop::bool::weighted(0.1))
                .prop_map(|(lengths, extra_column)| Padding::Mask { lengths, extra_column }),
        ],
        any::<u64>(),
    );
    (config, input).prop_map(
        |(
            (heads, head_dim, uneven, kv_heads, pattern, block, dropout, bias, scale),
            (max_seq_len, attention_dtype, batch, n, width_extra, padding, seed),
        )| Case {
            d_model: heads * head_dim + usize::from(uneven),
            heads,
            kv_heads,
            pattern,
            block,
            dropout,
            bias,
            scale,
            max_seq_len,
            attention_dtype,
            batch,
            n,
            width_extra,
            padding,
            seed,
        },
    )
}

/// Deterministic inputs in `[-1, 1)` from the case's seed (SplitMix64).
fn inputs(seed: u64, len: usize) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// What a case that did not fail came to.
enum Outcome {
    /// A typed error, or dropout (random) without a reference.
    Refused,
    /// An output equal to the reference.
    Compared,
}

/// Runs one case: `Err` only for a wrong result (a typed error is an accepted outcome).
fn check(case: &Case) -> Result<Outcome, String> {
    let device = Device::ndarray().autodiff();
    let config =
        MultiHeadSparseAttentionConfig::new(case.d_model, case.heads, case.pattern.clone())
            .with_n_kv_heads(case.kv_heads)
            .with_block_size(case.block)
            .with_dropout(case.dropout)
            .with_bias(case.bias)
            .with_scale(case.scale)
            .with_max_seq_len(case.max_seq_len)
            .with_attention_dtype(case.attention_dtype);
    let Ok(layer) = config.init(&device) else {
        return Ok(Outcome::Refused);
    };
    let width = case.d_model + case.width_extra;
    let values = inputs(case.seed, case.batch * case.n * width);
    let x = Tensor::<3>::from_data(
        TensorData::new(values, [case.batch, case.n, width]),
        &device,
    )
    .require_grad();
    let (out, lengths) = match &case.padding {
        Padding::None => (layer.forward(x.clone()), None),
        Padding::Lengths(lengths) => {
            let lengths = lengths.of(case.batch, case.n);
            (layer.forward_lengths(x.clone(), &lengths), Some(lengths))
        }
        Padding::Mask {
            lengths,
            extra_column,
        } => {
            // One length per batch row, at most n: a mask says no more than that.
            let lengths: Vec<usize> = lengths
                .of(case.batch, case.n)
                .into_iter()
                .take(case.batch)
                .map(|len| len.min(case.n))
                .collect();
            let columns = case.n + usize::from(*extra_column);
            let mask: Vec<bool> = lengths
                .iter()
                .flat_map(|&len| (0..columns).map(move |j| j >= len))
                .collect();
            let mask =
                Tensor::<2, Bool>::from_data(TensorData::new(mask, [case.batch, columns]), &device);
            (layer.forward_padded(x.clone(), Some(mask)), Some(lengths))
        }
    };
    let Ok(out) = out else {
        return Ok(Outcome::Refused);
    };
    if out.dims() != [case.batch, case.n, case.d_model] {
        return Err(format!("output of shape {:?}", out.dims()));
    }
    let got = host(out.clone());
    if let Some(bad) = got.iter().find(|v| !v.is_finite()) {
        return Err(format!("non-finite output {bad}"));
    }
    if case.batch * case.n * case.d_model > 0 {
        let grads = out.sum().backward();
        let dx = host(x.grad(&grads).ok_or("no gradient for x")?);
        if let Some(bad) = dx.iter().find(|v| !v.is_finite()) {
            return Err(format!("non-finite gradient {bad}"));
        }
    }
    // Dropout draws its own mask.
    if case.dropout > 0.0 {
        return Ok(Outcome::Refused);
    }
    let pattern = case
        .pattern
        .build(case.n, case.block)
        .expect("the layer built it");
    let scale = case
        .scale
        .unwrap_or(1.0 / ((case.d_model / case.heads) as f64).sqrt());
    let want = reference_output(&layer, x, pattern.as_ref(), lengths, scale);
    let tolerance = match case.attention_dtype {
        Some(FloatDType::F16) => 3e-2,
        _ => 1e-4,
    };
    let worst = worst(&got, &want);
    if worst > tolerance {
        return Err(format!(
            "differs from the reference by {worst} (tolerance {tolerance})"
        ));
    }
    Ok(Outcome::Compared)
}

#[test]
fn random_layers_give_a_typed_error_or_the_reference() {
    let compared = AtomicUsize::new(0);
    let config = Config {
        cases: budget(),
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel(
            "proptest-regressions",
        ))),
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&case(), |case| match check(&case) {
        Ok(Outcome::Compared) => {
            compared.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        Ok(Outcome::Refused) => Ok(()),
        Err(reason) => Err(TestCaseError::fail(reason)),
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    // About a fifth of the cases get through every check to the reference (5000 cases:
    // 1100); a run in which far fewer do checks too little.
    let compared = compared.into_inner();
    assert!(
        compared * 10 >= budget() as usize,
        "only {compared} of {} cases were compared with the reference",
        budget()
    );
}
