//! Cached decoding on every backend: new query rows against a key/value cache equal the
//! matching rows of the f64 reference over the cache's capacity with key lengths `first +
//! valid` (for causal patterns: the full forward over the text so far), for one-token steps
//! and chunked prefill, batch rows at different positions, padding rows, grouped-query
//! heads, permuted (strided) and per-head layouts, the fused and the portable path.

use std::sync::Arc;

use burn::tensor::{DType, Device, FloatDType, Tensor};
use rstest::rstest;
use sparse_attn_core::pattern::{Band, BigBird, BigBirdConfig, Fixed, PerHead, Strided};
use sparse_attn_core::reference::{RefOptions, RefShape, reference_forward_with};
use sparse_attn_core::{
    AttentionOptions, BlockLayout, DecodeRows, Pattern, RelativeBuckets, Result,
    SparseAttentionError, sparse_attention_decode, sparse_attention_decode_portable,
    sparse_attention_decode_with,
};

use crate::common::{Rng, assert_close, devices, rounded, to_tensor};

type Decode = fn(
    Tensor<4>,
    Tensor<4>,
    Tensor<4>,
    &BlockLayout,
    &DecodeRows,
    AttentionOptions,
) -> Result<Tensor<4>>;

/// Soft-cap and ALiBi slopes (for 4 heads) of the modifier cases.
const CAP_AND_SLOPES: (f64, [f64; 4]) = (1.5, [0.5, 0.25, 0.1, 0.0]);

/// The cache's capacity in the matrix.
const CAP: usize = 37;

fn pattern(name: &str, heads: usize) -> Arc<dyn Pattern> {
    match name {
        "local" => Arc::new(Band::local(6).unwrap()),
        "strided" => Arc::new(Strided::new(3).unwrap()),
        "fixed" => Arc::new(Fixed::new(8, 2, 2).unwrap()),
        "bidirectional" => Arc::new(Band::bidirectional_window(4)),
        // Random blocks drawn for the capacity: decode reads the capacity's layout.
        "bigbird" => Arc::new(
            BigBird::new(
                BigBirdConfig {
                    window: 5,
                    global_tokens: vec![0, 9],
                    random_blocks: 1,
                    random_block: 4,
                    seed: 3,
                    causal: true,
                },
                CAP,
            )
            .unwrap(),
        ),
        "per_head" => Arc::new(
            PerHead::new(
                (0..heads)
                    .map(|h| -> Arc<dyn Pattern> {
                        if h % 2 == 0 {
                            Arc::new(Band::local(3 + h).unwrap())
                        } else {
                            Arc::new(Strided::new(4).unwrap())
                        }
                    })
                    .collect(),
            )
            .unwrap(),
        ),
        other => panic!("unknown test pattern {other}"),
    }
}

/// The query rows of `rows` picked from full `[batch, heads, capacity, d]` values.
fn rows_of(
    full: &[f64],
    rows: &DecodeRows,
    [batch, heads, cap, d]: [usize; 4],
    m: usize,
) -> Vec<f64> {
    let mut out = vec![0.0; batch * heads * m * d];
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..rows.valid[b] {
                let src = ((b * heads + h) * cap + rows.first[b] + i) * d;
                let dst = ((b * heads + h) * m + i) * d;
                out[dst..dst + d].copy_from_slice(&full[src..src + d]);
            }
        }
    }
    out
}

fn values(t: Tensor<4>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

#[rstest]
fn decode_matches_the_reference_rows(
    #[values("local", "strided", "fixed", "bigbird", "per_head", "bidirectional")] name: &str,
    #[values((4, 4), (4, 2))] heads: (usize, usize),
    #[values(false, true)] portable: bool,
) {
    check_decode(name, heads, portable, false);
}

/// Decoding with soft-capping, ALiBi and a relative-position bias equals the rows of the
/// reference with the same modifiers (distances between the row's token and each cached
/// key's token).
#[rstest]
fn decode_with_score_modifiers_matches_the_reference_rows(
    #[values("local", "strided", "bidirectional")] name: &str,
    #[values(false, true)] portable: bool,
) {
    check_decode(name, (4, 2), portable, true);
}

/// The calls of [`decode_matches_the_reference_rows`] for one pattern, head split and path,
/// with the modifiers of [`CAP_AND_SLOPES`] when `modified`.
fn check_decode(name: &str, heads: (usize, usize), portable: bool, modified: bool) {
    let (heads, kv_heads) = heads;
    let (cap, block, d, batch) = (CAP, 8, 8, 2);
    let pattern = pattern(name, heads);
    let layout = BlockLayout::build(pattern.as_ref(), cap, block, heads).unwrap();
    let mut rng = Rng::new(heads as u64 * 13 + kv_heads as u64);
    let q_full = rng.normals(batch * heads * cap * d);
    let [k, v] = [(); 2].map(|_| rng.normals(batch * kv_heads * cap * d));
    let scale = 1.0 / (d as f64).sqrt();
    let decode: Decode = if portable {
        sparse_attention_decode_portable
    } else {
        sparse_attention_decode_with
    };
    let (cap_value, slopes) = CAP_AND_SLOPES;
    // Scores of these inputs are about N(0, 1): doubled q reaches the cap.
    let q_full: Vec<f64> = if modified {
        q_full.iter().map(|x| 3.0 * x).collect()
    } else {
        q_full
    };
    let mut options = AttentionOptions::default();
    if modified {
        options = options.softcap(cap_value).alibi_slopes(slopes);
    }
    let bias = modified.then(|| {
        let buckets = RelativeBuckets::new(8, 20, name == "bidirectional").unwrap();
        (buckets, rng.normals(heads * 8))
    });
    // A chunked prefill from the start and from a cached prefix (with a padded row), one
    // token at two positions, the last position of the capacity.
    let calls = [
        (
            DecodeRows {
                first: vec![0, 5],
                valid: vec![7, 4],
            },
            7,
        ),
        (
            DecodeRows {
                first: vec![20, 30],
                valid: vec![1, 1],
            },
            1,
        ),
        (
            DecodeRows {
                first: vec![36, 11],
                valid: vec![1, 0],
            },
            1,
        ),
        (
            DecodeRows {
                first: vec![9, 0],
                valid: vec![28, 37],
            },
            37,
        ),
    ];
    for (rows, m) in calls {
        let lengths: Vec<usize> = rows
            .first
            .iter()
            .zip(&rows.valid)
            .map(|(f, v)| f + v)
            .collect();
        let shape = RefShape {
            batch,
            heads,
            seq_len: cap,
            head_dim: d,
        };
        let reference = RefOptions {
            kv_heads: Some(kv_heads),
            key_lengths: Some(lengths),
            softcap: modified.then_some(cap_value),
            alibi: modified.then(|| slopes.to_vec()),
            relative: bias.clone(),
            ..RefOptions::default()
        };
        let full =
            reference_forward_with(pattern.as_ref(), shape, &reference, &q_full, &k, &v, scale);
        let want = rows_of(&full.out, &rows, [batch, heads, cap, d], m);
        let q = rows_of(&q_full, &rows, [batch, heads, cap, d], m);
        for (backend, device) in devices() {
            let what = format!(
                "{backend} {name} h={heads}/{kv_heads} portable={portable} modified={modified} rows={rows:?}"
            );
            let mut options = options.clone();
            if let Some((buckets, table)) = &bias {
                let table = to_tensor(table, [heads, buckets.count()], &device);
                options = options.relative_bias(table, buckets.clone());
            }
            let got = run(
                (decode, options),
                &device,
                &layout,
                &rows,
                [&q, &k, &v],
                [batch, heads, m, d],
                kv_heads,
                cap,
            );
            assert_close(&got, &want, 2e-5, &what);
        }
    }
}

/// The fused decode kernels at the sizes models use: head dims 64 and 128, blocks 64 and
/// 128, a capacity that is not a multiple of the block, a row long enough to split into
/// several key chunks, grouped-query heads, f32 and (inputs rounded to them) f16 and bf16.
#[rstest]
fn decode_at_model_sizes_and_dtypes(
    #[values("window", "strided")] name: &str,
    #[values((64, 64), (128, 64), (64, 128), (128, 128))] dims: (usize, usize),
    #[values(FloatDType::F32, FloatDType::F16, FloatDType::BF16)] dtype: FloatDType,
) {
    let (d, block) = dims;
    let (cap, heads, kv_heads, batch) = (1500, 4, 2, 1);
    let pattern: Arc<dyn Pattern> = match name {
        "window" => Arc::new(Band::local(300).unwrap()),
        _ => Arc::new(Strided::new(37).unwrap()),
    };
    let layout = BlockLayout::build(pattern.as_ref(), cap, block, heads).unwrap();
    let round = |x: Vec<f64>| {
        if dtype == FloatDType::F32 {
            x
        } else {
            rounded(x, dtype)
        }
    };
    let mut rng = Rng::new(d as u64 * 7 + block as u64);
    let q_full = round(rng.normals(batch * heads * cap * d));
    let [k, v] = [(); 2].map(|_| round(rng.normals(batch * kv_heads * cap * d)));
    let scale = 1.0 / (d as f64).sqrt();
    // One token at the end of the capacity (its row reaches back over many key blocks) and
    // a chunk of prefill in the middle.
    for (rows, m) in [
        (DecodeRows::uniform(batch, cap - 1, 1), 1),
        (DecodeRows::uniform(batch, 700, 5), 5),
    ] {
        let lengths = vec![rows.first[0] + rows.valid[0]];
        let shape = RefShape {
            batch,
            heads,
            seq_len: cap,
            head_dim: d,
        };
        let options = RefOptions {
            kv_heads: Some(kv_heads),
            key_lengths: Some(lengths),
            ..RefOptions::default()
        };
        let full =
            reference_forward_with(pattern.as_ref(), shape, &options, &q_full, &k, &v, scale);
        let want = rows_of(&full.out, &rows, [batch, heads, cap, d], m);
        let q = rows_of(&q_full, &rows, [batch, heads, cap, d], m);
        let tol = match dtype {
            FloatDType::F16 => 1e-2,
            FloatDType::BF16 => 5e-2,
            _ => 2e-5,
        };
        for (backend, device) in devices() {
            if !device.supports_dtype(DType::from(dtype)) {
                eprintln!("{backend}: no {dtype:?} on this device, skipped");
                continue;
            }
            let what = format!("{backend} {name} d={d} b={block} {dtype:?} rows={rows:?}");
            let q_dims = [batch, heads, m, d];
            let kv_dims = [batch, kv_heads, cap, d];
            let tq = to_tensor(&q, q_dims, &device).cast(dtype);
            let [tk, tv] = [&k, &v].map(|x| to_tensor(x, kv_dims, &device).cast(dtype));
            let out = sparse_attention_decode(tq, tk, tv, &layout, &rows, None).unwrap();
            assert_eq!(out.dtype(), DType::from(dtype), "{what}");
            assert_close(&values(out.cast(FloatDType::F32)), &want, tol, &what);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    (decode, options): (Decode, AttentionOptions),
    device: &Device,
    layout: &BlockLayout,
    rows: &DecodeRows,
    [q, k, v]: [&[f64]; 3],
    q_dims: [usize; 4],
    kv_heads: usize,
    cap: usize,
) -> Vec<f32> {
    let [batch, _, _, d] = q_dims;
    let kv_dims = [batch, kv_heads, cap, d];
    let q = to_tensor(q, q_dims, device);
    let [k, v] = [k, v].map(|x| to_tensor(x, kv_dims, device));
    values(decode(q, k, v, layout, rows, options).unwrap())
}

/// Rows past the cache, rows not one per batch row, more valid rows than queries, a layout
/// of another capacity, dropout or key lengths, bad modifiers: typed errors.
#[test]
fn bad_decode_calls_are_typed_errors() {
    let device = Device::ndarray();
    let layout = BlockLayout::build(&Band::local(4).unwrap(), 16, 4, 2).unwrap();
    let q = Tensor::<4>::zeros([1, 2, 2, 4], &device);
    let cache = Tensor::<4>::zeros([1, 2, 16, 4], &device);
    let call = |rows: DecodeRows, cache: Tensor<4>| {
        sparse_attention_decode(q.clone(), cache.clone(), cache, &layout, &rows, None).unwrap_err()
    };
    // Options decoding does not take, and modifiers as the forward refuses them.
    let rows = DecodeRows::uniform(1, 0, 2);
    let with = |options: AttentionOptions| {
        sparse_attention_decode_with(
            q.clone(),
            cache.clone(),
            cache.clone(),
            &layout,
            &rows,
            options,
        )
        .unwrap_err()
    };
    for options in [
        AttentionOptions::default().dropout(0.1, 1),
        AttentionOptions::default().key_lengths([2]),
    ] {
        assert!(matches!(
            with(options),
            SparseAttentionError::Unsupported { .. }
        ));
    }
    assert!(matches!(
        with(AttentionOptions::default().softcap(-1.0)),
        SparseAttentionError::SoftCap(_)
    ));
    assert!(matches!(
        with(AttentionOptions::default().alibi_slopes([0.5])),
        SparseAttentionError::AlibiSlopes { heads: 2, .. }
    ));
    assert!(matches!(
        call(DecodeRows::uniform(1, 15, 2), cache.clone()),
        SparseAttentionError::CacheFull {
            row: 0,
            end: 17,
            capacity: 16
        }
    ));
    assert!(matches!(
        call(DecodeRows::uniform(2, 0, 2), cache.clone()),
        SparseAttentionError::DecodeRows {
            what: "first",
            got: 2,
            batch: 1
        }
    ));
    assert!(matches!(
        call(DecodeRows::uniform(1, 0, 3), cache.clone()),
        SparseAttentionError::ValidRows {
            row: 0,
            valid: 3,
            queries: 2
        }
    ));
    assert!(matches!(
        call(
            DecodeRows::uniform(1, 0, 1),
            Tensor::<4>::zeros([1, 2, 12, 4], &device)
        ),
        SparseAttentionError::LayoutMismatch {
            what: "seq_len",
            ..
        }
    ));
    assert!(matches!(
        call(DecodeRows::uniform(1, usize::MAX, 1), cache),
        SparseAttentionError::CacheFull { .. }
    ));
}
