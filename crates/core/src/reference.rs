//! The f64 dense reference: the oracle of every test, computed from the token predicate.
//!
//! It materialises the `n x n` scores per head, so it is only for small problems. Inputs
//! and outputs are row-major `[batch, heads, n, d]` `f64` slices.

use crate::params::DropoutMask;
use crate::pattern::Pattern;
use sparse_attn_kernel_types::{RelativeBias, RelativeBuckets, ScoreMods};

/// Shape of a reference problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefShape {
    /// Batch size.
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// Tokens.
    pub seq_len: usize,
    /// Head dimension.
    pub head_dim: usize,
}

/// Output of [`reference_forward`].
#[derive(Debug, Clone, PartialEq)]
pub struct RefForward {
    /// `[batch, heads, n, d]`.
    pub out: Vec<f64>,
    /// `[batch, heads, n]` natural-log log-sum-exp (`-inf` for rows with no allowed key).
    pub lse: Vec<f64>,
}

/// Gradients of `sum(out * dout)` with respect to `q`, `k`, `v` and the relative-position
/// bias table.
#[derive(Debug, Clone, PartialEq)]
pub struct RefGrads {
    /// `[batch, heads, n, d]`.
    pub dq: Vec<f64>,
    /// `[batch, kv_heads, n, d]`.
    pub dk: Vec<f64>,
    /// `[batch, kv_heads, n, d]`.
    pub dv: Vec<f64>,
    /// `[heads, buckets]` with a relative-position bias, else empty.
    pub dbias: Vec<f64>,
}

/// What the reference computes beyond plain attention: grouped key/value heads, key
/// padding, dropout and the score modifiers, each written out from its definition.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RefOptions {
    /// Key/value heads of `k` and `v` (`None`: as many as `q`); divides `heads`.
    pub kv_heads: Option<usize>,
    /// Valid tokens of each batch row: pairs with `i` or `j` at or past it are not allowed.
    pub key_lengths: Option<Vec<usize>>,
    /// Dropout: each probability times `1 / (1 - p)` if the pair is kept, else 0.
    pub dropout: Option<DropoutMask>,
    /// Soft-capping bound of the scaled scores ([`ScoreMods`]).
    pub softcap: Option<f64>,
    /// ALiBi slopes, one per query head ([`ScoreMods`]).
    pub alibi: Option<Vec<f64>>,
    /// A relative-position bias: its buckets and `[heads, buckets]` table ([`ScoreMods`]).
    pub relative: Option<(RelativeBuckets, Vec<f64>)>,
}

impl RefOptions {
    fn kv_heads(&self, heads: usize) -> usize {
        self.kv_heads.unwrap_or(heads)
    }

    /// The score modifiers of these options.
    fn mods(&self) -> ScoreMods<'_> {
        ScoreMods {
            softcap: self.softcap,
            alibi: self.alibi.as_deref(),
            bias: self
                .relative
                .as_ref()
                .map(|(buckets, table)| RelativeBias { buckets, table }),
        }
    }

    /// Dropout factor of pair `(i, j)` of `(batch, head)`.
    fn keep(&self, batch: usize, head: usize, i: usize, j: usize) -> f64 {
        match self.dropout {
            Some(mask) if !mask.keeps_pair(batch, head, i, j) => 0.0,
            Some(mask) => mask.scale(),
            None => 1.0,
        }
    }
}

/// Softmax probabilities of one `(batch, head)` (before dropout): `[n, n]`, zero where
/// not allowed, the row log-sum-exps, and the derivative of each modified score by its
/// scaled score (`[n, n]`; 1 without soft-capping).
#[allow(clippy::too_many_arguments)]
fn probs(
    pattern: &dyn Pattern,
    slice: &Slice,
    options: &RefOptions,
    q: &[f64],
    k: &[f64],
    n: usize,
    d: usize,
    scale: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (head, valid, mods) = (slice.head, slice.valid, options.mods());
    let mut p = vec![0.0; n * n];
    let mut grad = vec![1.0; n * n];
    let mut lse = vec![f64::NEG_INFINITY; n];
    for i in 0..n {
        let row = &mut p[i * n..(i + 1) * n];
        let mut max = f64::NEG_INFINITY;
        for (j, x) in row.iter_mut().enumerate() {
            if i < valid && j < valid && pattern.allows(head, i, j) {
                let s = scale * (0..d).map(|t| q[i * d + t] * k[j * d + t]).sum::<f64>();
                *x = mods.apply(head, s, i, j);
                grad[i * n + j] = mods.derivative(s);
                max = max.max(*x);
            } else {
                *x = f64::NEG_INFINITY;
            }
        }
        if max == f64::NEG_INFINITY {
            row.fill(0.0);
            continue;
        }
        let sum: f64 = row
            .iter_mut()
            .map(|x| {
                *x = (*x - max).exp();
                *x
            })
            .sum();
        row.iter_mut().for_each(|x| *x /= sum);
        lse[i] = max + sum.ln();
    }
    (p, lse, grad)
}

/// One `(batch, head)` of a problem: its slices' offsets and its options.
struct Slice {
    batch: usize,
    head: usize,
    /// Offset of the query-side `[n, d]` slice.
    base: usize,
    /// Offset of the key/value-side `[n, d]` slice.
    kv_base: usize,
    /// Valid tokens.
    valid: usize,
}

fn slices(shape: RefShape, options: &RefOptions) -> impl Iterator<Item = Slice> + '_ {
    let RefShape {
        batch,
        heads,
        seq_len: n,
        head_dim: d,
    } = shape;
    let kv_heads = options.kv_heads(heads);
    (0..batch * heads).map(move |bh| {
        let (b, h) = (bh / heads, bh % heads);
        Slice {
            batch: b,
            head: h,
            base: bh * n * d,
            kv_base: (b * kv_heads + h / (heads / kv_heads)) * n * d,
            valid: options.key_lengths.as_ref().map_or(n, |l| l[b]),
        }
    })
}

/// Dense masked attention forward in f64.
pub fn reference_forward(
    pattern: &dyn Pattern,
    shape: RefShape,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    scale: f64,
) -> RefForward {
    reference_forward_with(pattern, shape, &RefOptions::default(), q, k, v, scale)
}

/// [`reference_forward`] with grouped key/value heads, key padding and dropout: `k` and `v`
/// are `[batch, kv_heads, n, d]`.
pub fn reference_forward_with(
    pattern: &dyn Pattern,
    shape: RefShape,
    options: &RefOptions,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    scale: f64,
) -> RefForward {
    let RefShape {
        batch,
        heads,
        seq_len: n,
        head_dim: d,
    } = shape;
    let mut out = vec![0.0; batch * heads * n * d];
    let mut lse = vec![0.0; batch * heads * n];
    for x in slices(shape, options) {
        let (base, kv) = (x.base, x.kv_base);
        let (qs, ks, vs) = (
            &q[base..base + n * d],
            &k[kv..kv + n * d],
            &v[kv..kv + n * d],
        );
        let (p, l, _) = probs(pattern, &x, options, qs, ks, n, d, scale);
        let bh = base / (n * d);
        lse[bh * n..(bh + 1) * n].copy_from_slice(&l);
        for i in 0..n {
            for t in 0..d {
                out[base + i * d + t] = (0..n)
                    .map(|j| p[i * n + j] * options.keep(x.batch, x.head, i, j) * vs[j * d + t])
                    .sum();
            }
        }
    }
    RefForward { out, lse }
}

/// Analytic gradients of `sum(out * dout)` in f64.
#[allow(clippy::too_many_arguments)]
pub fn reference_backward(
    pattern: &dyn Pattern,
    shape: RefShape,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    scale: f64,
) -> RefGrads {
    reference_backward_with(pattern, shape, &RefOptions::default(), q, k, v, dout, scale)
}

/// [`reference_backward`] with the options of [`reference_forward_with`]; `dk` and `dv` are
/// `[batch, kv_heads, n, d]`, summed over each group's query heads.
#[allow(clippy::too_many_arguments)]
pub fn reference_backward_with(
    pattern: &dyn Pattern,
    shape: RefShape,
    options: &RefOptions,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    scale: f64,
) -> RefGrads {
    let RefShape {
        batch,
        heads,
        seq_len: n,
        head_dim: d,
    } = shape;
    let kv_len = batch * options.kv_heads(heads) * n * d;
    let mut dq = vec![0.0; batch * heads * n * d];
    let (mut dk, mut dv) = (vec![0.0; kv_len], vec![0.0; kv_len]);
    let mut dbias = options
        .relative
        .as_ref()
        .map_or(Vec::new(), |(_, table)| vec![0.0; table.len()]);
    for x in slices(shape, options) {
        let (base, kv) = (x.base, x.kv_base);
        let (qs, gs) = (&q[base..base + n * d], &dout[base..base + n * d]);
        let (ks, vs) = (&k[kv..kv + n * d], &v[kv..kv + n * d]);
        let (p, _, grad) = probs(pattern, &x, options, qs, ks, n, d, scale);
        let keep = |i: usize, j: usize| options.keep(x.batch, x.head, i, j);
        // dP = (dO Vᵀ) * keep; dS = P (dP - rowsum(P dP)) * d(modified)/d(scaled score);
        // dQ = dS K scale; dK = dSᵀ Q scale; dV = (P * keep)ᵀ dO
        let mut ds = vec![0.0; n * n];
        for i in 0..n {
            let dp: Vec<f64> = (0..n)
                .map(|j| keep(i, j) * (0..d).map(|t| gs[i * d + t] * vs[j * d + t]).sum::<f64>())
                .collect();
            let delta: f64 = (0..n).map(|j| p[i * n + j] * dp[j]).sum();
            for j in 0..n {
                let dmod = p[i * n + j] * (dp[j] - delta);
                // The bias adds to the modified score: its gradient is dS before the
                // soft-cap's derivative.
                if let Some((buckets, _)) = &options.relative {
                    dbias[x.head * buckets.count() + buckets.bucket(i, j)] += dmod;
                }
                ds[i * n + j] = dmod * grad[i * n + j];
            }
        }
        for i in 0..n {
            for t in 0..d {
                dq[base + i * d + t] =
                    scale * (0..n).map(|j| ds[i * n + j] * ks[j * d + t]).sum::<f64>();
                dk[kv + i * d + t] +=
                    scale * (0..n).map(|j| ds[j * n + i] * qs[j * d + t]).sum::<f64>();
                dv[kv + i * d + t] += (0..n)
                    .map(|j| p[j * n + i] * keep(j, i) * gs[j * d + t])
                    .sum::<f64>();
            }
        }
    }
    RefGrads { dq, dk, dv, dbias }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::{Band, Strided};

    /// The analytic gradients agree with central finite differences of the forward.
    #[test]
    fn gradients_match_finite_differences() {
        let shape = RefShape {
            batch: 1,
            heads: 2,
            seq_len: 7,
            head_dim: 3,
        };
        let len = 2 * 7 * 3;
        let wave = |s: f64| {
            (0..len)
                .map(|x| ((x as f64 + s) * 0.7).sin())
                .collect::<Vec<_>>()
        };
        let (q, k, v, dout) = (wave(0.1), wave(1.3), wave(2.9), wave(4.2));
        let plain = RefOptions::default();
        // A cap near the scores' size, so that the tanh bends them.
        let modified = RefOptions {
            softcap: Some(0.4),
            alibi: Some(vec![0.3, 0.05]),
            ..RefOptions::default()
        };
        let buckets = RelativeBuckets::new(6, 5, true).unwrap();
        let table: Vec<f64> = (0..2 * 6).map(|x| ((x as f64) * 1.7).sin()).collect();
        let biased = RefOptions {
            relative: Some((buckets, table.clone())),
            ..modified.clone()
        };
        for (pattern, options) in [
            (&Band::local(3).unwrap() as &dyn Pattern, &plain),
            (&Strided::new(2).unwrap(), &plain),
            (&Band::local(3).unwrap(), &modified),
            (&Band::bidirectional_window(2), &modified),
            (&Band::bidirectional_window(3), &biased),
        ] {
            let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
                let f = reference_forward_with(pattern, shape, options, q, k, v, 0.5);
                f.out.iter().zip(&dout).map(|(a, b)| a * b).sum()
            };
            let g = reference_backward_with(pattern, shape, options, &q, &k, &v, &dout, 0.5);
            let eps = 1e-6;
            for (which, grad) in [(0, &g.dq), (1, &g.dk), (2, &g.dv)] {
                for x in 0..len {
                    let mut args = [q.clone(), k.clone(), v.clone()];
                    args[which][x] += eps;
                    let up = loss(&args[0], &args[1], &args[2]);
                    args[which][x] -= 2.0 * eps;
                    let down = loss(&args[0], &args[1], &args[2]);
                    let fd = (up - down) / (2.0 * eps);
                    assert!(
                        (fd - grad[x]).abs() < 1e-7,
                        "{} arg {which} elem {x}: fd {fd} vs {}",
                        pattern.name(),
                        grad[x]
                    );
                }
            }
            // The bias table's gradient.
            if let Some((buckets, table)) = &options.relative {
                for x in 0..table.len() {
                    let at = |delta: f64| {
                        let mut t = table.clone();
                        t[x] += delta;
                        let o = RefOptions {
                            relative: Some((buckets.clone(), t)),
                            ..options.clone()
                        };
                        let f = reference_forward_with(pattern, shape, &o, &q, &k, &v, 0.5);
                        f.out.iter().zip(&dout).map(|(a, b)| a * b).sum::<f64>()
                    };
                    let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                    assert!(
                        (fd - g.dbias[x]).abs() < 1e-7,
                        "bias {x}: fd {fd} vs {}",
                        g.dbias[x]
                    );
                }
                assert!(g.dbias.iter().any(|&x| x.abs() > 1e-3));
            }
        }
    }

    #[test]
    fn empty_rows_give_zero_and_minus_infinity() {
        let none = crate::pattern::FnPattern::new("none", false, |_, _, _| false);
        let shape = RefShape {
            batch: 1,
            heads: 1,
            seq_len: 3,
            head_dim: 2,
        };
        let f = reference_forward(&none, shape, &[1.0; 6], &[1.0; 6], &[1.0; 6], 1.0);
        assert_eq!(f.out, vec![0.0; 6]);
        assert!(f.lse.iter().all(|&x| x == f64::NEG_INFINITY));
    }
}
