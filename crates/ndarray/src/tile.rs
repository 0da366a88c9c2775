//! Block × block tiles: the GEMM wrapper, element masks and the softmax loops.

use crate::real::Real;

/// `c[m x n] = alpha * a[m x k] * b[k x n] + beta * c`, all row-major views given by
/// (row stride, column stride) pairs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<T: Real>(
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    a: (&[T], usize, usize),
    b: (&[T], usize, usize),
    beta: T,
    c: &mut [T],
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let (a, rsa, csa) = a;
    let (b, rsb, csb) = b;
    // The views must cover the last element they address (checked in every build: the
    // unsafe call below rests on it, and three comparisons are nothing beside a GEMM).
    assert!(
        k == 0 || a.len() > (m - 1) * rsa + (k - 1) * csa,
        "gemm: `a` view of {} elements is too short for {m} x {k} with strides ({rsa}, {csa})",
        a.len()
    );
    assert!(
        k == 0 || b.len() > (k - 1) * rsb + (n - 1) * csb,
        "gemm: `b` view of {} elements is too short for {k} x {n} with strides ({rsb}, {csb})",
        b.len()
    );
    assert!(
        c.len() > (m - 1) * ldc + (n - 1),
        "gemm: `c` of {} elements is too short for {m} x {n} with row stride {ldc}",
        c.len()
    );
    // SAFETY: the asserts above keep every address the GEMM reads or writes inside the
    // given slices (row-major views with non-negative strides).
    unsafe {
        T::gemm_raw(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        );
    }
}

/// Sets the disallowed elements of a `bq x bk` tile (row `i` at `s[i * ld..]`) to `-inf`,
/// per `bits` (bit `i * block + j` set when allowed).
#[inline(always)]
pub(crate) fn mask_tile<T: Real>(
    s: &mut [T],
    ld: usize,
    bq: usize,
    bk: usize,
    bits: &[u64],
    block: usize,
) {
    for (i, row) in s.chunks_mut(ld).take(bq).enumerate() {
        apply_mask_row(&mut row[..bk], bits, i * block);
    }
}

/// Sets `row[j]` to `-inf` where bit `first + j` of `bits` is clear: one 32-bit word per run
/// of columns and a branch-free select per element (mask bits are data, not predictable
/// branches; 32-bit words keep the per-lane shifts 8 lanes wide under AVX2).
#[inline(always)]
fn apply_mask_row<T: Real>(row: &mut [T], bits: &[u64], first: usize) {
    let mut j = 0;
    while j < row.len() {
        let bit = first + j;
        let (offset, word) = (bit % 32, bits[bit / 64] >> (bit % 64 / 32 * 32));
        let word = (word as u32) >> offset;
        let run = (32 - offset).min(row.len() - j);
        for (t, x) in row[j..j + run].iter_mut().enumerate() {
            *x = if (word >> t) & 1 == 1 {
                *x
            } else {
                T::NEG_INFINITY
            };
        }
        j += run;
    }
}

/// Probabilities `p = exp(s - lse_i)` in place; rows whose log-sum-exp is `-inf` (no allowed
/// key) become zero.
#[inline(always)]
pub(crate) fn probabilities<T: Real>(s: &mut [T], lse: &[T], bk: usize) {
    for (row, &l) in s.chunks_mut(bk).zip(lse) {
        if l == T::NEG_INFINITY {
            row.fill(T::ZERO);
        } else {
            row.iter_mut().for_each(|x| *x = (*x - l).exp());
        }
    }
}

/// Lanes of the reductions below: enough independent accumulators for the compiler to
/// keep them in one SIMD register (a plain `fold` is a serial dependency chain).
const LANES: usize = 8;

/// Largest element (NaN-ignoring, as `f32::max`); `-inf` for an empty or fully masked row.
#[inline(always)]
pub(crate) fn row_max<T: Real>(x: &[T]) -> T {
    let mut acc = [T::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    let head = acc.iter().fold(T::NEG_INFINITY, |m, &a| m.max(a));
    tail.iter().fold(head, |m, &v| m.max(v))
}

/// `x <- exp(x - shift)` in place; returns the sum of the new values.
#[inline(always)]
pub(crate) fn exp_shifted_sum<T: Real>(x: &mut [T], shift: T) -> T {
    let mut acc = [T::ZERO; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            *v = (*v - shift).exp();
            *a += *v;
        }
    }
    let mut sum = acc.iter().copied().sum::<T>();
    for v in chunks.into_remainder() {
        *v = (*v - shift).exp();
        sum += *v;
    }
    sum
}
