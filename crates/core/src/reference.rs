//! The f64 dense reference: the oracle of every test, computed from the token predicate.
//!
//! It materialises the `n x n` scores per head, so it is only for small problems. Inputs
//! and outputs are row-major `[batch, heads, n, d]` `f64` slices.

use crate::pattern::Pattern;

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

/// Gradients of `sum(out * dout)` with respect to `q`, `k`, `v`.
#[derive(Debug, Clone, PartialEq)]
pub struct RefGrads {
    /// `[batch, heads, n, d]`.
    pub dq: Vec<f64>,
    /// `[batch, heads, n, d]`.
    pub dk: Vec<f64>,
    /// `[batch, heads, n, d]`.
    pub dv: Vec<f64>,
}

/// Softmax probabilities of one `(batch, head)`: `[n, n]`, zero where not allowed.
fn probs(
    pattern: &dyn Pattern,
    head: usize,
    q: &[f64],
    k: &[f64],
    n: usize,
    d: usize,
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let mut p = vec![0.0; n * n];
    let mut lse = vec![f64::NEG_INFINITY; n];
    for i in 0..n {
        let row = &mut p[i * n..(i + 1) * n];
        let mut max = f64::NEG_INFINITY;
        for (j, x) in row.iter_mut().enumerate() {
            if pattern.allows(head, i, j) {
                *x = scale * (0..d).map(|t| q[i * d + t] * k[j * d + t]).sum::<f64>();
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
    (p, lse)
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
    let RefShape {
        batch,
        heads,
        seq_len: n,
        head_dim: d,
    } = shape;
    let mut out = vec![0.0; batch * heads * n * d];
    let mut lse = vec![0.0; batch * heads * n];
    for bh in 0..batch * heads {
        let base = bh * n * d;
        let (qs, ks, vs) = (
            &q[base..base + n * d],
            &k[base..base + n * d],
            &v[base..base + n * d],
        );
        let (p, l) = probs(pattern, bh % heads, qs, ks, n, d, scale);
        lse[bh * n..(bh + 1) * n].copy_from_slice(&l);
        for i in 0..n {
            for t in 0..d {
                out[base + i * d + t] = (0..n).map(|j| p[i * n + j] * vs[j * d + t]).sum();
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
    let RefShape {
        batch,
        heads,
        seq_len: n,
        head_dim: d,
    } = shape;
    let len = batch * heads * n * d;
    let (mut dq, mut dk, mut dv) = (vec![0.0; len], vec![0.0; len], vec![0.0; len]);
    for bh in 0..batch * heads {
        let base = bh * n * d;
        let s = |x: &[f64]| x[base..base + n * d].to_vec();
        let (qs, ks, vs, gs) = (s(q), s(k), s(v), s(dout));
        let (p, _) = probs(pattern, bh % heads, &qs, &ks, n, d, scale);
        // dP = dO Vᵀ; dS = P (dP - rowsum(P dP)); dQ = dS K scale; dK = dSᵀ Q scale; dV = Pᵀ dO
        let mut ds = vec![0.0; n * n];
        for i in 0..n {
            let dp: Vec<f64> = (0..n)
                .map(|j| (0..d).map(|t| gs[i * d + t] * vs[j * d + t]).sum())
                .collect();
            let delta: f64 = (0..n).map(|j| p[i * n + j] * dp[j]).sum();
            for j in 0..n {
                ds[i * n + j] = p[i * n + j] * (dp[j] - delta);
            }
        }
        for i in 0..n {
            for t in 0..d {
                dq[base + i * d + t] =
                    scale * (0..n).map(|j| ds[i * n + j] * ks[j * d + t]).sum::<f64>();
                dk[base + i * d + t] =
                    scale * (0..n).map(|j| ds[j * n + i] * qs[j * d + t]).sum::<f64>();
                dv[base + i * d + t] = (0..n).map(|j| p[j * n + i] * gs[j * d + t]).sum::<f64>();
            }
        }
    }
    RefGrads { dq, dk, dv }
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
        for pattern in [
            &Band::local(3).unwrap() as &dyn Pattern,
            &Strided::new(2).unwrap(),
        ] {
            let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
                let f = reference_forward(pattern, shape, q, k, v, 0.5);
                f.out.iter().zip(&dout).map(|(a, b)| a * b).sum()
            };
            let g = reference_backward(pattern, shape, &q, &k, &v, &dout, 0.5);
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
