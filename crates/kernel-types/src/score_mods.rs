//! Score modifiers: what a call changes in the scaled scores `s = scale * q . k` before the
//! softmax. Every kernel applies them in this order, on `s` of query token `i` and key token
//! `j` of query head `h`:
//! 1. soft-capping, `s <- cap * tanh(s / cap)` (Gemma's logit capping; its derivative is
//!    `1 - tanh²(s / cap)`);
//! 2. ALiBi, `s <- s - slope_h * |i - j|` (distance in token order, also under a permuted
//!    layout; for causal patterns `|i - j| = i - j`, and keys after the query in
//!    bidirectional patterns are penalised by their distance too; derivative 1);
//! 3. a relative-position bias, `s <- s + table[h, bucket(i - j)]` ([`RelativeBias`]; its
//!    table's gradient is the sum of the modified scores' gradients over each bucket).

use crate::relative_bias::RelativeBias;

/// The score modifiers of one call; the default changes nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ScoreMods<'a> {
    /// Soft-capping bound `cap` (finite, positive).
    pub softcap: Option<f64>,
    /// ALiBi slopes, one per query head (finite).
    pub alibi: Option<&'a [f64]>,
    /// A relative-position bias.
    pub bias: Option<RelativeBias<'a>>,
}

impl ScoreMods<'_> {
    /// Whether no modifier is set.
    pub fn is_plain(&self) -> bool {
        self.softcap.is_none() && self.alibi.is_none() && self.bias.is_none()
    }

    /// The ALiBi slope of query head `head` (0 without ALiBi).
    pub fn slope(&self, head: usize) -> f64 {
        self.alibi.map_or(0.0, |slopes| slopes[head])
    }

    /// The modified score of `s` for query token `i`, key token `j` of head `head`, in f64
    /// (the reference's and the tests' definition; the kernels compute the same in their
    /// dtype).
    pub fn apply(&self, head: usize, s: f64, i: usize, j: usize) -> f64 {
        let capped = match self.softcap {
            Some(cap) => cap * (s / cap).tanh(),
            None => s,
        };
        let bias = self.bias.map_or(0.0, |bias| bias.value(head, i, j));
        capped - self.slope(head) * i.abs_diff(j) as f64 + bias
    }

    /// `d apply / d s` at `s` (the soft-capping's `1 - tanh²(s / cap)`, else 1).
    pub fn derivative(&self, s: f64) -> f64 {
        match self.softcap {
            Some(cap) => 1.0 - (s / cap).tanh().powi(2),
            None => 1.0,
        }
    }
}

/// The standard ALiBi slopes of `heads` heads (Press et al. 2022): for a power of two `n`,
/// the geometric sequence `2^(-8 (h + 1) / n)`; otherwise those of the power of two below,
/// followed by every other slope of twice that power, as the paper's reference code does.
pub fn alibi_slopes(heads: usize) -> Vec<f64> {
    fn power_of_two(n: usize) -> Vec<f64> {
        let start = 2f64.powf(-8.0 / n as f64);
        (1..=n).map(|h| start.powi(h as i32)).collect()
    }
    if heads == 0 {
        return Vec::new();
    }
    if heads.is_power_of_two() {
        return power_of_two(heads);
    }
    let below = 1 << heads.ilog2();
    let mut slopes = power_of_two(below);
    slopes.extend(
        power_of_two(2 * below)
            .into_iter()
            .step_by(2)
            .take(heads - below),
    );
    slopes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_slopes_follow_the_paper() {
        // 8 heads: 1/2, 1/4, ..., 1/256.
        let eight = alibi_slopes(8);
        for (h, s) in eight.iter().enumerate() {
            assert!((s - 0.5f64.powi(h as i32 + 1)).abs() < 1e-15, "{h} {s}");
        }
        // 12 heads: the 8 of 8 heads, then slopes 1, 3, 5, 7 (0-based 0, 2, 4, 6) of 16.
        let twelve = alibi_slopes(12);
        let sixteen = alibi_slopes(16);
        assert_eq!(&twelve[..8], &eight[..]);
        assert_eq!(
            &twelve[8..],
            &[sixteen[0], sixteen[2], sixteen[4], sixteen[6]]
        );
        assert!(alibi_slopes(0).is_empty());
        assert_eq!(alibi_slopes(1), vec![2f64.powi(-8)]);
    }

    #[test]
    fn modifiers_apply_in_order() {
        let slopes = [0.5, 0.25];
        let mods = ScoreMods {
            softcap: Some(2.0),
            alibi: Some(&slopes),
            bias: None,
        };
        let s = 3.0;
        let want = 2.0 * (1.5f64).tanh() - 0.25 * 4.0;
        assert!((mods.apply(1, s, 2, 6) - want).abs() < 1e-15);
        assert!((mods.apply(1, s, 6, 2) - want).abs() < 1e-15);
        let eps = 1e-6;
        let numeric = (mods.apply(0, s + eps, 1, 0) - mods.apply(0, s - eps, 1, 0)) / (2.0 * eps);
        assert!((mods.derivative(s) - numeric).abs() < 1e-8);
        let buckets = crate::RelativeBuckets::new(4, 8, false).unwrap();
        let table = [0.0, 0.0, 0.0, 0.0, 0.5, 0.25, 0.125, 0.0625];
        let biased = ScoreMods {
            bias: Some(RelativeBias {
                buckets: &buckets,
                table: &table,
            }),
            ..mods
        };
        // Distance 4 of the causal 4-bucket bucketing lands in bucket 3.
        assert_eq!(buckets.bucket(6, 2), 3);
        assert!((biased.apply(1, s, 6, 2) - want - 0.0625).abs() < 1e-15);
        assert!(ScoreMods::default().is_plain());
        assert_eq!(ScoreMods::default().apply(0, s, 9, 1), s);
    }
}
