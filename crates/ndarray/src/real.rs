//! The element types the kernels run on: `f32` and `f64`.

use std::iter::Sum;
use std::ops::{Add, AddAssign, Mul, MulAssign, Sub};

/// A float the kernels compute in, with its GEMM and `exp`.
pub trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Sum
    + AddAssign
    + MulAssign
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + std::fmt::Debug
    + 'static
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// Negative infinity.
    const NEG_INFINITY: Self;
    /// `e^self` (exactly 0 for `-inf`).
    fn exp(self) -> Self;
    /// Natural log.
    fn ln(self) -> Self;
    /// Hyperbolic tangent (vectorisable for f32: [`crate::exp::tanh`]).
    fn tanh(self) -> Self;
    /// Conversion from a token index or distance (ALiBi).
    fn from_usize(x: usize) -> Self;
    /// Absolute value.
    fn abs(self) -> Self;
    /// Larger of two values, ignoring NaN as `f32::max` does.
    fn max(self, other: Self) -> Self;
    /// Reciprocal.
    fn recip(self) -> Self;
    /// Conversion from `f64` (the scale).
    fn from_f64(x: f64) -> Self;
    /// Conversion to `f64` (sums of the relative-position bias gradient).
    fn to_f64(self) -> f64;
    /// `c = alpha a b + beta c` with the `gemm` crate's strided GEMM (single-threaded: the
    /// kernels parallelise over tiles).
    ///
    /// # Safety
    /// The pointers and strides must address valid memory for the given sizes.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

/// Implements [`Real`] for a float type with its `exp` and the `gemm` crate's GEMM.
macro_rules! real_impl {
    ($t:ty, $exp:expr, $tanh:expr) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn tanh(self) -> Self {
                $tanh(self)
            }
            #[inline(always)]
            fn from_usize(x: usize) -> Self {
                x as $t
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            fn recip(self) -> Self {
                1.0 / self
            }
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            unsafe fn gemm_raw(
                m: usize,
                k: usize,
                n: usize,
                alpha: Self,
                a: *const Self,
                rsa: isize,
                csa: isize,
                b: *const Self,
                rsb: isize,
                csb: isize,
                beta: Self,
                c: *mut Self,
                rsc: isize,
                csc: isize,
            ) {
                // gemm's convention is `dst = alpha_g dst + beta_g lhs rhs` (column and row
                // strides in that order); `read_dst = false` ignores `dst` when `beta == 0`.
                // SAFETY: forwarded from the caller's contract.
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        c,
                        csc,
                        rsc,
                        beta != 0.0,
                        a,
                        csa,
                        rsa,
                        b,
                        csb,
                        rsb,
                        beta,
                        alpha,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                }
            }
        }
    };
}

// f32 uses the vectorisable exp; f64 keeps the exactly rounded libm one.
real_impl!(f32, crate::exp::exp, crate::exp::tanh);
real_impl!(f64, f64::exp, f64::tanh);
