//! Dropout, key padding and grouped-query attention on every backend: against the f64
//! reference with the same options, and against their definitions (a padded batch equals
//! its rows run one by one; GQA equals multi-head attention on repeated K/V heads; dropout
//! keeps `1 - p` of the pairs, is reproducible by seed and is exactly off at `p = 0`).

use std::sync::Arc;

use burn::tensor::{Device, Tensor};
use rstest::rstest;
use sparse_attn_core::pattern::{Band, Fixed, Strided};
use sparse_attn_core::reference::{
    RefOptions, RefShape, reference_backward_with, reference_forward_with,
};
use sparse_attn_core::{
    AttentionOptions, BlockLayout, DropoutMask, Pattern, RelativeBuckets, Result, sparse_attention,
    sparse_attention_portable,
};

use crate::common::{Rng, assert_close, devices, to_tensor};

/// An attention entry point under test.
pub(crate) type Attend =
    fn(Tensor<4>, Tensor<4>, Tensor<4>, &BlockLayout, AttentionOptions) -> Result<Tensor<4>>;

pub(crate) fn pattern(name: &str) -> Arc<dyn Pattern> {
    match name {
        "local" => Arc::new(Band::local(6).unwrap()),
        // Permuted layout: dropout and padding are defined on tokens, not positions.
        "strided" => Arc::new(Strided::new(3).unwrap()),
        "fixed" => Arc::new(Fixed::new(8, 2, 2).unwrap()),
        "bidirectional" => Arc::new(Band::bidirectional_window(9)),
        other => panic!("unknown test pattern {other}"),
    }
}

fn values(t: Tensor<4>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

/// Forward and gradients of `attend` with `options` on `device`: `(out, dq, dk, dv)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    attend: Attend,
    device: &Device,
    layout: &BlockLayout,
    options: AttentionOptions,
    inputs: [&[f64]; 4],
    q_dims: [usize; 4],
    kv_dims: [usize; 4],
) -> [Vec<f32>; 4] {
    run_biased(
        attend, device, layout, options, inputs, q_dims, kv_dims, None,
    )
    .0
}

/// [`run`] with a relative-position bias of `table` values `[heads, buckets]` over
/// `buckets`: also the table's gradient.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_biased(
    attend: Attend,
    device: &Device,
    layout: &BlockLayout,
    mut options: AttentionOptions,
    [q, k, v, dout]: [&[f64]; 4],
    q_dims: [usize; 4],
    kv_dims: [usize; 4],
    bias: Option<&(RelativeBuckets, Vec<f64>)>,
) -> ([Vec<f32>; 4], Option<Vec<f32>>) {
    let tq = to_tensor(q, q_dims, device).require_grad();
    let [tk, tv] = [k, v].map(|x| to_tensor(x, kv_dims, device).require_grad());
    let table = bias.map(|(buckets, table)| {
        let t = to_tensor(table, [q_dims[1], buckets.count()], device).require_grad();
        options = options.clone().relative_bias(t.clone(), buckets.clone());
        t
    });
    let out = attend(tq.clone(), tk.clone(), tv.clone(), layout, options).unwrap();
    let g = (out.clone() * to_tensor(dout, q_dims, device))
        .sum()
        .backward();
    let grad = |t: &Tensor<4>| values(t.grad(&g).unwrap());
    let dbias = table.map(|t| {
        t.grad(&g)
            .unwrap()
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .unwrap()
    });
    ([values(out), grad(&tq), grad(&tk), grad(&tv)], dbias)
}

/// Every option combination against the reference with the same options, forward and
/// gradients, through the fused path and the portable path.
#[rstest]
fn options_match_reference(
    #[values("local", "strided", "fixed")] name: &str,
    #[values((4, 4), (4, 2), (4, 1))] heads: (usize, usize),
    #[values(false, true)] padded: bool,
    #[values(0.0, 0.3)] p: f64,
    #[values(false, true)] portable: bool,
) {
    let (heads, kv_heads) = heads;
    let (n, block, d, batch) = (37, 8, 8, 2);
    let pattern = pattern(name);
    let layout = BlockLayout::build(pattern.as_ref(), n, block, heads).unwrap();
    let shape = RefShape {
        batch,
        heads,
        seq_len: n,
        head_dim: d,
    };
    let lengths = vec![n, 20];
    let seed = 11;
    let reference = RefOptions {
        kv_heads: Some(kv_heads),
        key_lengths: padded.then(|| lengths.clone()),
        dropout: DropoutMask::new(p, seed),
        ..RefOptions::default()
    };
    let mut options = AttentionOptions::default().dropout(p, seed);
    if padded {
        options = options.key_lengths(lengths);
    }
    let (q_dims, kv_dims) = ([batch, heads, n, d], [batch, kv_heads, n, d]);
    let mut rng = Rng::new(heads as u64 * 7 + kv_heads as u64 + u64::from(padded) * 3);
    let q = rng.normals(q_dims.iter().product());
    let [k, v] = [(); 2].map(|_| rng.normals(kv_dims.iter().product()));
    let dout = rng.normals(q.len());
    let what = format!("{name} h={heads}/{kv_heads} padded={padded} p={p} portable={portable}");
    check_against_reference(
        ReferenceCase {
            pattern: pattern.as_ref(),
            layout: &layout,
            shape,
            reference: &reference,
            options,
            portable,
            tolerances: (2e-5, 5e-5),
        },
        [&q, &k, &v, &dout],
        kv_heads,
        &what,
    );
}

/// One call checked against the f64 reference: the layout of `pattern`, the problem's
/// shape, the reference's options and the call's, the path, and the tolerances of the
/// output and of the gradients.
pub(crate) struct ReferenceCase<'a> {
    pub pattern: &'a dyn Pattern,
    pub layout: &'a BlockLayout,
    pub shape: RefShape,
    pub reference: &'a RefOptions,
    pub options: AttentionOptions,
    pub portable: bool,
    pub tolerances: (f64, f64),
}

/// Runs `case` on every backend, forward and gradients of `sum(out * dout)`, against the
/// reference on the same inputs (`k` and `v` with `kv_heads` heads).
pub(crate) fn check_against_reference(
    case: ReferenceCase<'_>,
    [q, k, v, dout]: [&[f64]; 4],
    kv_heads: usize,
    what: &str,
) {
    let RefShape {
        batch,
        heads,
        seq_len: n,
        head_dim: d,
    } = case.shape;
    let (q_dims, kv_dims) = ([batch, heads, n, d], [batch, kv_heads, n, d]);
    let scale = 1.0 / (d as f64).sqrt();
    let (pattern, reference) = (case.pattern, case.reference);
    let want = reference_forward_with(pattern, case.shape, reference, q, k, v, scale);
    let grads = reference_backward_with(pattern, case.shape, reference, q, k, v, dout, scale);
    let attend: Attend = if case.portable {
        sparse_attention_portable
    } else {
        sparse_attention
    };
    let (out_tol, grad_tol) = case.tolerances;
    for (backend, device) in devices() {
        let what = format!("{backend} {what}");
        let ([out, dq, dk, dv], dbias) = run_biased(
            attend,
            &device,
            case.layout,
            case.options.clone(),
            [q, k, v, dout],
            q_dims,
            kv_dims,
            reference.relative.as_ref(),
        );
        assert_close(&out, &want.out, out_tol, &format!("{what}: out"));
        assert_close(&dq, &grads.dq, grad_tol, &format!("{what}: dq"));
        assert_close(&dk, &grads.dk, grad_tol, &format!("{what}: dk"));
        assert_close(&dv, &grads.dv, grad_tol, &format!("{what}: dv"));
        if let Some(dbias) = dbias {
            // A table entry sums the gradients of many scores, each with its rounding.
            let terms = (batch * n * n) as f64 / grads.dbias.len() as f64;
            let tol = grad_tol * terms.sqrt().max(1.0);
            assert_close(&dbias, &grads.dbias, tol, &format!("{what}: dbias"));
        }
    }
}

/// With `q = k = 0` under `all`, every probability of row `i` is `1 / (i + 1)`; with `v` the
/// identity, `out[i, j]` is that probability times the pair's keep factor: the kept pairs
/// are the non-zero entries.
#[test]
fn dropout_keeps_one_minus_p() {
    let (batch, heads, n) = (2, 4, 128);
    let layout = BlockLayout::build(&Band::causal(), n, 32, heads).unwrap();
    let identity: Vec<f64> = (0..batch * heads * n * n)
        .map(|x| f64::from(u8::from(x % (n * n) / n == x % n)))
        .collect();
    let dims = [batch, heads, n, n];
    let pairs = (batch * heads * n * (n + 1) / 2) as f64;
    for (backend, device) in devices() {
        for p in [0.1, 0.5] {
            let zeros = Tensor::<4>::zeros(dims, &device);
            let v = to_tensor(&identity, dims, &device);
            let options = AttentionOptions::default().dropout(p, 5);
            let out = sparse_attention(zeros.clone(), zeros, v, &layout, options).unwrap();
            let kept = values(out).iter().filter(|&&x| x != 0.0).count() as f64;
            let rate = kept / pairs;
            assert!(
                (rate - (1.0 - p)).abs() < 0.01,
                "{backend} p={p}: keep rate {rate}, expected {} within 1%",
                1.0 - p
            );
        }
    }
}

/// Same seed, same output (bit for bit); another seed, another output; `p = 0` is exactly
/// the plain kernel, forward and gradients.
#[test]
fn dropout_is_reproducible_and_off_at_zero() {
    let (n, heads, d) = (40, 2, 8);
    let layout = BlockLayout::build(&Band::local(9).unwrap(), n, 8, heads).unwrap();
    let dims = [1, heads, n, d];
    let mut rng = Rng::new(3);
    let [q, k, v, dout] = [(); 4].map(|_| rng.normals(dims.iter().product()));
    let inputs = [&q[..], &k, &v, &dout];
    for (backend, device) in devices() {
        let with = |options| {
            run(
                sparse_attention,
                &device,
                &layout,
                options,
                inputs,
                dims,
                dims,
            )
        };
        let a = with(AttentionOptions::default().dropout(0.4, 9));
        let b = with(AttentionOptions::default().dropout(0.4, 9));
        let c = with(AttentionOptions::default().dropout(0.4, 10));
        assert_eq!(a, b, "{backend}: same seed, different results");
        assert_ne!(a[0], c[0], "{backend}: another seed, same output");
        let plain = with(AttentionOptions::default());
        let zero = with(AttentionOptions::default().dropout(0.0, 9));
        assert_eq!(plain, zero, "{backend}: p = 0 differs from no dropout");
    }
}

/// A padded batch equals each row run alone, unpadded, with a layout built for its length:
/// forward and gradients on the valid tokens, zeros past them.
#[rstest]
fn padded_batch_equals_rows_one_by_one(#[values("local", "fixed")] name: &str) {
    let (n, block, heads, d) = (35, 8, 2, 4);
    let lengths = [35, 17, 1];
    let batch = lengths.len();
    let pattern = pattern(name);
    let layout = BlockLayout::build(pattern.as_ref(), n, block, heads).unwrap();
    let dims = [batch, heads, n, d];
    let mut rng = Rng::new(21);
    let [q, k, v, dout] = [(); 4].map(|_| rng.normals(dims.iter().product()));
    // Row `b`'s first `len` tokens of every head, `[1, heads, len, d]`.
    let row = |x: &[f64], b: usize, len: usize| -> Vec<f64> {
        (0..heads)
            .flat_map(|h| {
                let at = (b * heads + h) * n * d;
                x[at..at + len * d].to_vec()
            })
            .collect()
    };
    for (backend, device) in devices() {
        let options = AttentionOptions::default().key_lengths(lengths);
        let padded = run(
            sparse_attention,
            &device,
            &layout,
            options,
            [&q, &k, &v, &dout],
            dims,
            dims,
        );
        for (b, &len) in lengths.iter().enumerate() {
            let alone = BlockLayout::build(pattern.as_ref(), len, block, heads).unwrap();
            let single = [1, heads, len, d];
            let (sq, sk, sv, sg) = (
                row(&q, b, len),
                row(&k, b, len),
                row(&v, b, len),
                row(&dout, b, len),
            );
            let want = run(
                sparse_attention,
                &device,
                &alone,
                AttentionOptions::default(),
                [&sq, &sk, &sv, &sg],
                single,
                single,
            );
            for ((what, got), want) in ["out", "dq", "dk", "dv"].iter().zip(&padded).zip(&want) {
                // The padded result of row b: valid tokens equal the row alone, the rest 0.
                for h in 0..heads {
                    let at = (b * heads + h) * n * d;
                    let expect: Vec<f64> = want[h * len * d..(h + 1) * len * d]
                        .iter()
                        .map(|&x| f64::from(x))
                        .chain(std::iter::repeat_n(0.0, (n - len) * d))
                        .collect();
                    assert_close(
                        &got[at..at + n * d],
                        &expect,
                        1e-5,
                        &format!("{backend} {name} row {b} (len {len}) head {h}: {what}"),
                    );
                }
            }
        }
    }
}

/// Grouped-query attention equals multi-head attention on K/V heads repeated for their
/// groups; the K/V gradients are the group sums (Burn's autodiff of the repeat).
#[rstest]
fn gqa_equals_repeated_heads(
    #[values(2, 1)] kv_heads: usize,
    #[values("local", "strided")] name: &str,
) {
    let (n, block, heads, d, batch) = (30, 8, 4, 8, 2);
    let pattern = pattern(name);
    let layout = BlockLayout::build(pattern.as_ref(), n, block, heads).unwrap();
    let (q_dims, kv_dims) = ([batch, heads, n, d], [batch, kv_heads, n, d]);
    let mut rng = Rng::new(kv_heads as u64);
    let q = rng.normals(q_dims.iter().product());
    let [k, v] = [(); 2].map(|_| rng.normals(kv_dims.iter().product()));
    let dout = rng.normals(q.len());
    for (backend, device) in devices() {
        let grouped = run(
            sparse_attention,
            &device,
            &layout,
            AttentionOptions::default(),
            [&q, &k, &v, &dout],
            q_dims,
            kv_dims,
        );
        let tq = to_tensor(&q, q_dims, &device).require_grad();
        let [tk, tv] = [&k, &v].map(|x| to_tensor(x, kv_dims, &device).require_grad());
        let repeat = |t: Tensor<4>| {
            t.reshape([batch, kv_heads, 1, n, d])
                .repeat_dim(2, heads / kv_heads)
                .reshape(q_dims)
        };
        let out = sparse_attention(
            tq.clone(),
            repeat(tk.clone()),
            repeat(tv.clone()),
            &layout,
            AttentionOptions::default(),
        )
        .unwrap();
        let g = (out.clone() * to_tensor(&dout, q_dims, &device))
            .sum()
            .backward();
        let want = [
            values(out),
            values(tq.grad(&g).unwrap()),
            values(tk.grad(&g).unwrap()),
            values(tv.grad(&g).unwrap()),
        ];
        for ((what, got), want) in ["out", "dq", "dk", "dv"].iter().zip(&grouped).zip(&want) {
            let want: Vec<f64> = want.iter().map(|&x| f64::from(x)).collect();
            assert_close(
                got,
                &want,
                1e-5,
                &format!("{backend} {name} kv={kv_heads}: {what}"),
            );
        }
    }
}
