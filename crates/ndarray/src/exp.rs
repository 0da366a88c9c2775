//! A vectorisable `exp` for softmax tiles, and the `tanh` of soft-capping built on it.
//!
//! `f32::exp` is a libm call per element, which keeps the compiler from vectorising the
//! softmax loops and costs more than the GEMM work on small tiles. This is the Cephes
//! `expf` scheme (range reduction by `ln 2`, degree-6 polynomial, exponent assembled in
//! the float's bits) written with plain float and integer ops only, so loops over it
//! vectorise. Relative error is within 2 ulp on the range that matters; inputs below
//! [`FLUSH_BELOW`] (including `-inf`, the masked scores) give exactly 0.
//!
//! The flush keeps the probabilities, and their products in the `P V` GEMM, out of subnormal
//! numbers, which x86 cores compute some hundred times slower: a term below `e^-64` next to
//! a row's largest term (`e^0` after the max shift) is far below f32's precision of the sum
//! (`2^-24 ≈ e^-16.6`). Rows whose scores spread far (ALiBi's distance penalties, trained
//! models' peaked attention) would otherwise spend their time in subnormal arithmetic.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// `1.5 * 2^23`: adding it rounds a float to the nearest integer in its low mantissa bits.
const ROUND: f32 = 12_582_912.0;

/// Inputs below this give 0 (see the module docs).
pub(crate) const FLUSH_BELOW: f32 = -64.0;

/// `e^x` for `x <= 0` (softmax inputs after the max shift; also correct up to `x = 88`).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let xc = x.clamp(FLUSH_BELOW, 88.0);
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
    if x < FLUSH_BELOW { 0.0 } else { value }
}

/// Largest `|x|` of [`tanh`]'s rational form; its f32 value is 1 beyond it.
const TANH_CLAMP: f32 = 7.905_311;

/// `tanh(x)`, vectorisable: Eigen's rational approximation (a degree-13 odd polynomial over
/// a degree-6 even one, `x` clamped to `±7.905`, where the f32 result is `±1`); relative error
/// within a few ulp, exactly `±1` for large `|x|`, NaN for NaN. Plain float ops and one
/// division, no branch: loops over it vectorise.
#[inline(always)]
#[allow(clippy::excessive_precision)] // Eigen's constants, as published.
pub(crate) fn tanh(x: f32) -> f32 {
    const A1: f32 = 4.893_524_6e-3;
    const A3: f32 = 6.372_619_3e-4;
    const A5: f32 = 1.485_722_4e-5;
    const A7: f32 = 5.122_297e-8;
    const A9: f32 = -8.604_672e-11;
    const A11: f32 = 2.000_188e-13;
    const A13: f32 = -2.760_768_5e-16;
    const B0: f32 = 4.893_525_2e-3;
    const B2: f32 = 2.268_434_6e-3;
    const B4: f32 = 1.185_347_1e-4;
    const B6: f32 = 1.198_258_4e-6;
    let x = x.clamp(-TANH_CLAMP, TANH_CLAMP);
    let x2 = x * x;
    let mut p = A13;
    p = p * x2 + A11;
    p = p * x2 + A9;
    p = p * x2 + A7;
    p = p * x2 + A5;
    p = p * x2 + A3;
    p = p * x2 + A1;
    let p = p * x;
    let mut q = B6;
    q = q * x2 + B4;
    q = q * x2 + B2;
    q = q * x2 + B0;
    p / q
}

#[cfg(test)]
mod tests {
    use super::{FLUSH_BELOW, exp, tanh};

    #[test]
    fn tanh_matches_std_tanh() {
        let mut worst = 0.0f64;
        let mut x = -50.0f32;
        while x <= 50.0 {
            let (got, want) = (f64::from(tanh(x)), f64::from(x).tanh());
            worst = worst.max((got - want).abs());
            x += 0.000_731;
        }
        // A few ulp of 1 (6e-8) near the clamp, where tanh is within 3e-7 of 1.
        assert!(worst < 5e-7, "absolute error {worst}");
        // Relative error near 0, where a `1 - 2 / (e^2x + 1)` form would cancel.
        for x in [1e-30f32, 1e-7, 3e-4, 0.01, 0.1] {
            let (got, want) = (f64::from(tanh(x)), f64::from(x).tanh());
            assert!((got - want).abs() / want < 1e-6, "{x}: {got} vs {want}");
            assert_eq!(tanh(-x), -tanh(x));
        }
        assert_eq!(tanh(0.0), 0.0);
        assert_eq!(tanh(f32::INFINITY), 1.0);
        assert_eq!(tanh(f32::NEG_INFINITY), -1.0);
        assert!(tanh(f32::NAN).is_nan());
    }

    #[test]
    fn matches_std_exp() {
        let mut worst = 0.0f64;
        let mut x = FLUSH_BELOW;
        while x <= 10.0 {
            let (got, want) = (f64::from(exp(x)), f64::from(x).exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(FLUSH_BELOW - 0.01), 0.0);
        assert!(exp(FLUSH_BELOW) > 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
    }
}
