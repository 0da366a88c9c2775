//! The score modifiers (soft-capping, ALiBi, the learnable relative-position bias) on every
//! backend, fused and portable paths, forward and gradients (the bias table's included),
//! against the f64 reference with the same modifiers; with key padding, dropout and
//! grouped-query attention in the same calls, and under a permuted layout (distances are
//! in token order).

use burn::tensor::Tensor;
use rstest::rstest;
use sparse_attn_core::reference::{RefOptions, RefShape};
use sparse_attn_core::{
    AttentionOptions, BlockLayout, DropoutMask, RelativeBuckets, SparseAttentionError,
    alibi_slopes, sparse_attention,
};

use crate::common::{Rng, devices, to_tensor};
use crate::options::{ReferenceCase, check_against_reference, pattern};

/// Scores of these inputs are about N(0, 2): a cap of 1.5 bends most of them.
const CAP: f64 = 1.5;

#[rstest]
fn modifiers_match_reference(
    #[values("local", "strided", "fixed", "bidirectional")] name: &str,
    #[values("softcap", "alibi", "both")] mods: &str,
    #[values(false, true)] portable: bool,
) {
    let (heads, kv_heads) = (4, 2);
    let (n, block, d, batch) = (37, 8, 8, 2);
    let pattern = pattern(name);
    let layout = BlockLayout::build(pattern.as_ref(), n, block, heads).unwrap();
    let shape = RefShape {
        batch,
        heads,
        seq_len: n,
        head_dim: d,
    };
    let softcap = (mods != "alibi").then_some(CAP);
    // Standard slopes for 4 heads are 1/4 .. 1/256; larger ones test the distances harder.
    let slopes = (mods != "softcap").then(|| vec![0.5, 0.25, 0.1, 0.0]);
    // "both" also pads the second batch row and drops 30% of the pairs.
    let both = mods == "both";
    let lengths = vec![n, 23];
    let (p, seed) = (if both { 0.3 } else { 0.0 }, 5);
    let reference = RefOptions {
        kv_heads: Some(kv_heads),
        key_lengths: both.then(|| lengths.clone()),
        dropout: DropoutMask::new(p, seed),
        softcap,
        alibi: slopes.clone(),
        relative: None,
    };
    let mut options = AttentionOptions::default().dropout(p, seed);
    if both {
        options = options.key_lengths(lengths);
    }
    options.softcap = softcap;
    if let Some(slopes) = slopes {
        options = options.alibi_slopes(slopes);
    }
    let (q_dims, kv_dims) = ([batch, heads, n, d], [batch, kv_heads, n, d]);
    let mut rng = Rng::new(name.len() as u64 * 13 + mods.len() as u64);
    // Scaled by 2 so that the scores reach the cap.
    let mut normals =
        |len: usize| -> Vec<f64> { rng.normals(len).into_iter().map(|x| 2.0 * x).collect() };
    let q = normals(q_dims.iter().product());
    let [k, v] = [(); 2].map(|_| normals(kv_dims.iter().product()));
    let dout = normals(q.len());
    check_against_reference(
        ReferenceCase {
            pattern: pattern.as_ref(),
            layout: &layout,
            shape,
            reference: &reference,
            options,
            portable,
            tolerances: (5e-5, 2e-4),
        },
        [&q, &k, &v, &dout],
        kv_heads,
        &format!("{name} {mods} portable={portable}"),
    );
}

/// The learnable relative-position bias, alone and with the other modifiers, padding,
/// dropout and GQA: forward and gradients, the table's against the reference's sums.
#[rstest]
fn relative_bias_matches_reference(
    #[values("local", "strided", "fixed", "bidirectional")] name: &str,
    #[values("bias", "all")] mods: &str,
    #[values(false, true)] portable: bool,
) {
    let (heads, kv_heads) = (4, 2);
    let (n, block, d, batch) = (37, 8, 8, 2);
    let pattern = pattern(name);
    let layout = BlockLayout::build(pattern.as_ref(), n, block, heads).unwrap();
    let shape = RefShape {
        batch,
        heads,
        seq_len: n,
        head_dim: d,
    };
    // Small buckets so that both exact and logarithmic ones (and the last) are hit.
    let buckets = RelativeBuckets::new(8, 20, name == "bidirectional").unwrap();
    let mut rng = Rng::new(name.len() as u64 * 7 + mods.len() as u64);
    let table = rng.normals(heads * buckets.count());
    let all = mods == "all";
    let lengths = vec![n, 23];
    let (p, seed) = (if all { 0.3 } else { 0.0 }, 9);
    let reference = RefOptions {
        kv_heads: Some(kv_heads),
        key_lengths: all.then(|| lengths.clone()),
        dropout: DropoutMask::new(p, seed),
        softcap: all.then_some(CAP),
        alibi: all.then(|| vec![0.5, 0.25, 0.1, 0.0]),
        relative: Some((buckets, table)),
    };
    let mut options = AttentionOptions::default().dropout(p, seed);
    if all {
        options = options
            .key_lengths(lengths)
            .softcap(CAP)
            .alibi_slopes(vec![0.5, 0.25, 0.1, 0.0]);
    }
    let (q_dims, kv_dims) = ([batch, heads, n, d], [batch, kv_heads, n, d]);
    let q = rng.normals(q_dims.iter().product());
    let [k, v] = [(); 2].map(|_| rng.normals(kv_dims.iter().product()));
    let dout = rng.normals(q.len());
    check_against_reference(
        ReferenceCase {
            pattern: pattern.as_ref(),
            layout: &layout,
            shape,
            reference: &reference,
            options,
            portable,
            tolerances: (5e-5, 2e-4),
        },
        [&q, &k, &v, &dout],
        kv_heads,
        &format!("{name} {mods} portable={portable}"),
    );
}

/// The bias table's gradient is the same bits from run to run (no atomics, a fixed order),
/// and a table of the wrong shape, dtype or device is a typed error.
#[test]
fn relative_bias_is_deterministic_and_checked() {
    let (heads, n, d) = (4, 70, 8);
    let layout = BlockLayout::build(pattern("local").as_ref(), n, 8, heads).unwrap();
    let buckets = RelativeBuckets::new(8, 20, false).unwrap();
    let mut rng = Rng::new(21);
    let x = rng.normals(2 * heads * n * d);
    let values = rng.normals(heads * 8);
    for (backend, device) in devices() {
        let grad = || {
            let t = to_tensor(&x, [2, heads, n, d], &device).require_grad();
            let table = to_tensor(&values, [heads, 8], &device).require_grad();
            let options = AttentionOptions::default().relative_bias(table.clone(), buckets.clone());
            let out = sparse_attention(t.clone(), t.clone(), t, &layout, options).unwrap();
            let g = (out.clone() * out).sum().backward();
            let dbias = table.grad(&g).unwrap();
            dbias.into_data().convert::<f32>().to_vec::<f32>().unwrap()
        };
        let first = grad();
        assert!(first.iter().any(|&x| x != 0.0), "{backend}: zero gradient");
        assert_eq!(first, grad(), "{backend}: two runs differ");
        let t = to_tensor(&x, [2, heads, n, d], &device);
        let wrong = to_tensor(&values[..3 * 8], [3, 8], &device);
        let options = AttentionOptions::default().relative_bias(wrong, buckets.clone());
        let err = sparse_attention(t.clone(), t.clone(), t, &layout, options).unwrap_err();
        assert!(
            matches!(
                err,
                SparseAttentionError::BiasTable {
                    heads: 4,
                    buckets: 8,
                    ..
                }
            ),
            "{backend}: {err}"
        );
    }
    assert!(matches!(
        RelativeBuckets::new(8, 2, false),
        Err(sparse_attn_core::BucketsError::MaxDistance { .. })
    ));
}

/// The standard slopes are the default of `alibi()`; a cap or slopes that make no sense are
/// typed errors.
#[test]
fn alibi_defaults_and_bad_modifiers() {
    let (heads, n, d) = (4, 16, 8);
    let layout = BlockLayout::build(pattern("local").as_ref(), n, 8, heads).unwrap();
    let x = Rng::new(3).normals(heads * n * d);
    for (backend, device) in devices() {
        let t = || to_tensor(&x, [1, heads, n, d], &device);
        let attend = |options: AttentionOptions| sparse_attention(t(), t(), t(), &layout, options);
        let values = |x: Tensor<4>| x.into_data().try_to_vec::<f32>().unwrap();
        let standard = values(attend(AttentionOptions::default().alibi()).unwrap());
        let explicit =
            values(attend(AttentionOptions::default().alibi_slopes(alibi_slopes(heads))).unwrap());
        assert_eq!(
            standard, explicit,
            "{backend}: alibi() != the standard slopes"
        );
        for cap in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = attend(AttentionOptions::default().softcap(cap)).unwrap_err();
            assert!(
                matches!(err, SparseAttentionError::SoftCap(_)),
                "{backend}: {err}"
            );
        }
        for slopes in [vec![0.5; 3], vec![0.5, 0.5, f64::NAN, 0.5]] {
            let err = attend(AttentionOptions::default().alibi_slopes(slopes)).unwrap_err();
            assert!(
                matches!(err, SparseAttentionError::AlibiSlopes { heads: 4, .. }),
                "{backend}: {err}"
            );
        }
    }
}
