//! A vectorisable `exp` for softmax tiles, and the `tanh` of soft-capping built on it.
//!
//! `f32::exp` is a libm call per element, which keeps the compiler from vectorising the
//! softmax loops and costs more than the GEMM work on small tiles. This is the Cephes
//! `expf` scheme (range reduction by `ln 2`, degree-6 polynomial, exponent assembled in
//! the float's bits) written with plain float and integer ops only, so loops over it
//! vectorise. Relative error is within 2 ulp on the range that matters; inputs below
//! `-87.3` (including `-inf`, the masked scores) give exactly 0.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// `1.5 * 2^23`: adding it rounds a float to the nearest integer in its low mantissa bits.
const ROUND: f32 = 12_582_912.0;

/// `e^x` for `x <= 0` (softmax inputs after the max shift; also correct up to `x = 88`).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let xc = x.clamp(-87.3, 88.0);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let poly = p * r * r + r + 1.0;
    let exponent = (t.to_bits().wrapping_sub(ROUND.to_bits()) as i32 + 127) as u32;
    let value = poly * f32::from_bits(exponent << 23);
    if x < -87.3 { 0.0 } else { value }
}

/// `tanh(x)`, vectorisable: `1 - 2 / (e^(2|x|) + 1)` with the sign of `x`, and near 0 (`|x| <
/// 1/8`, where that form cancels) the odd Taylor polynomial to `x^9`; absolute error below
/// `2e-7`, exactly `±1` from `|x| = 44` on, NaN for NaN.
#[inline(always)]
pub(crate) fn tanh(x: f32) -> f32 {
    let a = x.abs();
    let far = 1.0 - 2.0 / (exp(2.0 * a.min(44.0)) + 1.0);
    let x2 = x * x;
    let near = x
        * (1.0
            + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))));
    let t = if a < 0.125 { near } else { far.copysign(x) };
    if x.is_nan() { x } else { t }
}

#[cfg(test)]
mod tests {
    use super::{exp, tanh};

    #[test]
    fn tanh_matches_std_tanh() {
        let mut worst = 0.0f64;
        let mut x = -50.0f32;
        while x <= 50.0 {
            let (got, want) = (f64::from(tanh(x)), f64::from(x).tanh());
            worst = worst.max((got - want).abs());
            x += 0.000_731;
        }
        assert!(worst < 2e-7, "absolute error {worst}");
        assert_eq!(tanh(0.0), 0.0);
        assert_eq!(tanh(f32::INFINITY), 1.0);
        assert_eq!(tanh(f32::NEG_INFINITY), -1.0);
        assert!(tanh(f32::NAN).is_nan());
    }

    #[test]
    fn matches_std_exp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 10.0 {
            let (got, want) = (f64::from(exp(x)), f64::from(x).exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
    }
}
