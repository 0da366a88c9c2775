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
    /// Larger of two values, ignoring NaN as `f32::max` does.
    fn max(self, other: Self) -> Self;
    /// Reciprocal.
    fn recip(self) -> Self;
    /// Conversion from `f64` (the scale).
    fn from_f64(x: f64) -> Self;
    /// `c = alpha a b + beta c` with matrixmultiply's strided GEMM.
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

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    #[inline(always)]
    fn exp(self) -> Self {
        crate::exp::exp(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        f32::max(self, other)
    }
    fn recip(self) -> Self {
        1.0 / self
    }
    fn from_f64(x: f64) -> Self {
        x as f32
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
        // SAFETY: forwarded from the caller's contract.
        unsafe {
            matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
        }
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    fn max(self, other: Self) -> Self {
        f64::max(self, other)
    }
    fn recip(self) -> Self {
        1.0 / self
    }
    fn from_f64(x: f64) -> Self {
        x
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
        // SAFETY: forwarded from the caller's contract.
        unsafe {
            matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
        }
    }
}
