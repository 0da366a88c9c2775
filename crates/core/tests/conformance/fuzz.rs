//! Random calls of the public API: shapes (0-sized, n = 1, non-multiples of the block),
//! heads and key/value heads, block sizes in and out of range, patterns with odd parameters,
//! mixed dtypes and options. Every call returns a typed error or a result equal to the f64
//! reference (finite, no NaN from empty rows); none panics.
//!
//! `SPARSE_ATTN_FUZZ_CASES` sets the number of cases per backend (a short budget by default;
//! `cargo xtask fuzz` runs a long one). A case that ever failed goes into
//! [`REGRESSIONS`] as its seed.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use burn::tensor::{DType, Device};
use sparse_attn_core::pattern::{Band, Dilated, Fixed, Pattern, Strided};
use sparse_attn_core::reference::{RefOptions, RefShape, reference_forward_with};
use sparse_attn_core::{AttentionOptions, BlockLayout, sparse_attention};

use crate::common::{Rng, assert_close, devices, to_tensor};

/// Cases per backend when `SPARSE_ATTN_FUZZ_CASES` is unset.
const DEFAULT_CASES: u64 = 48;

/// Seeds of `sparse_attention` cases that once failed (none yet), run before the random
/// ones.
const REGRESSIONS: &[u64] = &[];

/// Seeds of original-API cases that once failed, run before the random ones: 0 (`n_ctx` =
/// 0 panicked inside Burn's reshape instead of a `Zero` error).
const ORIGINAL_REGRESSIONS: &[u64] = &[0];

/// Cases per backend: `SPARSE_ATTN_FUZZ_CASES`, else [`DEFAULT_CASES`].
fn budget() -> u64 {
    std::env::var("SPARSE_ATTN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

/// A small integer generator on top of the suite's seeded [`Rng`].
struct Draw(Rng);

impl Draw {
    fn below(&mut self, n: usize) -> usize {
        let x = self.0.normals(1)[0];
        // A normal folded to [0, 1) is plenty uniform for picking among a few options.
        ((x.abs().fract()) * n as f64) as usize % n.max(1)
    }
    fn pick<T: Copy>(&mut self, options: &[T]) -> T {
        options[self.below(options.len())]
    }
    /// One of `bad` once in eight draws, else one of `good`: most cases stay valid, and
    /// every bad value still comes up.
    fn mostly<T: Copy>(&mut self, good: &[T], bad: &[T]) -> T {
        if self.below(8) == 0 {
            self.pick(bad)
        } else {
            self.pick(good)
        }
    }
}

/// One random problem.
#[derive(Debug)]
struct Case {
    dims: [usize; 4],
    kv_heads: usize,
    block: usize,
    pattern: Option<Arc<dyn Pattern>>,
    k_dtype_differs: bool,
    options: AttentionOptions,
}

fn case(seed: u64) -> Case {
    let mut r = Draw(Rng::new(seed));
    let heads: usize = r.mostly(&[1, 2, 4], &[0]);
    let dims = [
        r.mostly(&[1, 2], &[0]),
        heads,
        r.mostly(&[1, 3, 16, 17, 33], &[0]),
        r.mostly(&[1, 3, 8], &[0]),
    ];
    let divisors: Vec<usize> = (1..=heads).filter(|g| heads.is_multiple_of(*g)).collect();
    let kv_heads = if divisors.is_empty() || r.below(8) == 0 {
        r.pick(&[0, 3, 5])
    } else {
        r.pick(&divisors)
    };
    let block = r.mostly(&[1, 4, 7, 16], &[0, 200]);
    let pattern: Option<Arc<dyn Pattern>> = match r.below(6) {
        0 => Some(Arc::new(Band::causal())),
        1 => Band::local(r.pick(&[0, 1, 5, usize::MAX]))
            .ok()
            .map(|p| Arc::new(p) as Arc<dyn Pattern>),
        2 => Strided::new(r.pick(&[0, 1, 4, 9]))
            .ok()
            .map(|p| Arc::new(p) as Arc<dyn Pattern>),
        3 => Fixed::sparse_transformer(r.pick(&[4, 8, 16]), r.pick(&[1, 2]), 1, 4)
            .ok()
            .map(|p| Arc::new(p) as Arc<dyn Pattern>),
        4 => Dilated::new(
            r.pick(&[1, 3]),
            r.pick(&[1, 2, usize::MAX]),
            r.below(2) == 0,
        )
        .ok()
        .map(|p| Arc::new(p) as Arc<dyn Pattern>),
        _ => Some(Arc::new(Band::bidirectional_window(r.pick(&[0, 2, 40])))),
    };
    let mut options = AttentionOptions::default();
    if r.below(4) == 0 {
        options.scale = Some(r.mostly(&[0.5, 2.0], &[-1.0, 0.0, f64::NAN]));
    }
    if r.below(4) == 0 {
        options = options.dropout(r.mostly(&[0.0, 0.3], &[1.0, -0.5]), seed);
    }
    if r.below(3) == 0 {
        let n = dims[2];
        let count = r.mostly(&[dims[0]], &[dims[0] + 1]);
        options.key_lengths = Some((0..count).map(|_| r.mostly(&[0, 1, n], &[n + 1])).collect());
    }
    Case {
        dims,
        kv_heads,
        block,
        pattern,
        k_dtype_differs: r.below(8) == 0,
        options,
    }
}

/// Runs `case` on `device`: `Err` for a typed error, `Ok(Some(out))` for a result, and
/// `Ok(None)` when the inputs were refused before the call (no pattern or no layout).
fn run(c: &Case, device: &Device, backend: &str) -> Result<Option<Vec<f32>>, String> {
    let Some(pattern) = &c.pattern else {
        return Ok(None);
    };
    let [batch, heads, n, d] = c.dims;
    let Ok(layout) = BlockLayout::build(pattern.as_ref(), n, c.block, heads) else {
        return Ok(None);
    };
    let mut rng = Rng::new(7);
    let kv_dims = [batch, c.kv_heads, n, d];
    let (q, k, v) = (
        rng.normals(batch * heads * n * d),
        rng.normals(batch * c.kv_heads * n * d),
        rng.normals(batch * c.kv_heads * n * d),
    );
    let (qt, mut kt, vt) = (
        to_tensor(&q, c.dims, device),
        to_tensor(&k, kv_dims, device),
        to_tensor(&v, kv_dims, device),
    );
    if c.k_dtype_differs {
        let other = if backend == "ndarray" || backend == "flex" {
            DType::F64
        } else {
            DType::F16
        };
        kt = kt.cast(other);
    }
    let out = match sparse_attention(qt, kt, vt, &layout, c.options.clone()) {
        Ok(out) => out,
        Err(e) => return Err(e.to_string()),
    };
    let got: Vec<f32> = out.into_data().convert::<f32>().to_vec().unwrap();
    assert!(got.iter().all(|x| x.is_finite()), "non-finite output");
    if c.options.dropout.is_none() {
        let shape = RefShape {
            batch,
            heads,
            seq_len: n,
            head_dim: d,
        };
        let options = RefOptions {
            kv_heads: Some(c.kv_heads),
            key_lengths: c.options.key_lengths.clone(),
            ..RefOptions::default()
        };
        let scale = c.options.scale.unwrap_or(1.0 / (d as f64).sqrt());
        let want = reference_forward_with(pattern.as_ref(), shape, &options, &q, &k, &v, scale);
        assert_close(&got, &want.out, 1e-4, "output against the reference");
    }
    Ok(Some(got))
}

#[test]
fn random_calls_give_a_typed_error_or_the_reference() {
    let cases = budget();
    for (backend, device) in devices() {
        // Lavapipe is slow: a quarter of the budget there.
        let backend_cases = if backend == "ndarray" || backend == "flex" {
            cases
        } else {
            cases.div_ceil(4)
        };
        let (mut answered, mut refused) = (0, 0);
        for seed in REGRESSIONS.iter().copied().chain(0..backend_cases) {
            let c = case(seed);
            match catch_unwind(AssertUnwindSafe(|| run(&c, &device, backend))) {
                Ok(Ok(Some(_))) => answered += 1,
                Ok(Ok(None)) => refused += 1,
                Ok(Err(e)) => {
                    if std::env::var("SPARSE_ATTN_FUZZ_VERBOSE").is_ok() {
                        eprintln!("{backend}: seed {seed}: {e}");
                    }
                    refused += 1
                }
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    panic!("{backend}: seed {seed} panicked on {c:?}: {message}");
                }
            }
        }
        eprintln!("{backend}: {answered} results, {refused} refused");
        // The draws must exercise both sides, or the test says nothing.
        assert!(
            answered > 0 && refused > 0,
            "{backend}: {answered} / {refused}"
        );
    }
}

/// Random calls of the original API (`attention_impl`, `blocksparse_attention_impl`) on
/// `[batch, n, n_embd]` inputs with random heads, modes, contexts, block sizes and vertex
/// counts: a typed error or finite values, never a panic; where both answer (modes other
/// than `fixed`), the block-sparse result equals the dense masked one.
#[test]
fn original_api_random_calls_give_a_typed_error_or_agree() {
    use sparse_attn_core::{AttnMode, attention_impl, blocksparse_attention_impl};
    let cases = budget();
    let device = Device::ndarray();
    let (mut agreed, mut refused) = (0, 0);
    for seed in ORIGINAL_REGRESSIONS.iter().copied().chain(0..cases) {
        let mut r = Draw(Rng::new(seed ^ 0x5eed));
        let heads: usize = r.mostly(&[1, 2, 4], &[0, 3]);
        let e = r.mostly(&[4, 8, 16], &[0, 6]);
        let n = r.mostly(&[1, 7, 16, 40], &[0]);
        let batch = r.mostly(&[1, 2], &[0]);
        let mode = r.pick(&[
            AttnMode::All,
            AttnMode::Local,
            AttnMode::Strided,
            AttnMode::Fixed,
        ]);
        let ctx = r.mostly(&[Some(4), Some(8), Some(16)], &[None, Some(0), Some(3)]);
        let blocksize = r.mostly(&[1, 4, 8], &[0, 3, 300]);
        let (verts, vertsize) = (r.mostly(&[1, 2], &[0, 9]), r.mostly(&[1, 2], &[0]));
        let mut rng = Rng::new(seed);
        let dims = [batch, n, e];
        let [q, k, v] = [(); 3].map(|_| to_tensor(&rng.normals(batch * n * e), dims, &device));
        let call = AssertUnwindSafe(|| {
            let (q2, k2, v2) = (q.clone(), k.clone(), v.clone());
            let sparse =
                blocksparse_attention_impl(q, k, v, heads, mode, ctx, blocksize, verts, vertsize);
            let dense = attention_impl(q2, k2, v2, heads, mode, ctx);
            (sparse, dense)
        });
        let (sparse, dense) = catch_unwind(call)
            .unwrap_or_else(|_| panic!("seed {seed} panicked: {heads} heads, {dims:?}, {mode:?}, ctx {ctx:?}, block {blocksize}, verts {verts}x{vertsize}"));
        let values = |t: Tensor3| -> Vec<f32> { t.into_data().convert::<f32>().to_vec().unwrap() };
        match (sparse, dense) {
            (Ok(s), Ok(d)) => {
                let (s, d) = (values(s), values(d));
                assert!(s.iter().all(|x| x.is_finite()), "seed {seed}: non-finite");
                let d: Vec<f64> = d.iter().map(|&x| f64::from(x)).collect();
                assert_close(&s, &d, 1e-4, &format!("seed {seed}: block-sparse vs dense"));
                agreed += 1;
            }
            (Ok(s), Err(_)) => {
                assert!(
                    values(s).iter().all(|x| x.is_finite()),
                    "seed {seed}: non-finite"
                );
                refused += 1;
            }
            (Err(_), _) => refused += 1,
        }
    }
    eprintln!("original API: {agreed} agreed, {refused} refused (by one or both)");
    assert!(agreed > 0 && refused > 0, "{agreed} / {refused}");
}

type Tensor3 = burn::tensor::Tensor<3>;
