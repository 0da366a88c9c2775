//! Run-time dispatch of the tile loops to AVX2.
//!
//! The crate is built for the baseline x86-64 target (SSE2), where the softmax, mask and
//! scaling loops vectorise 4 lanes wide. [`avx2_dispatch!`] compiles a function twice, once
//! with AVX2 enabled, and picks the AVX2 copy when the CPU has it (std caches the check):
//! 8 lanes for the elementwise work around the GEMMs (the `gemm` crate dispatches its own
//! micro-kernels). Results stay deterministic on a given machine.

/// Defines `fn $name<T: Real>(...)` whose body runs in an AVX2-enabled copy when the CPU
/// has AVX2, else in the baseline copy. Parameters must be plain identifiers (rebind
/// `mut` ones inside the body).
macro_rules! avx2_dispatch {
    (
        $(#[$meta:meta])*
        fn $name:ident<$T:ident: Real>($($arg:ident: $ty:ty),* $(,)?) $body:block
    ) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        fn $name<$T: Real>($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body<$T: Real>($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                #[allow(clippy::too_many_arguments)]
                fn avx2<$T: Real>($($arg: $ty),*) {
                    body::<$T>($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2 (detected just above).
                    return unsafe { avx2::<$T>($($arg),*) };
                }
            }
            body::<$T>($($arg),*)
        }
    };
}

pub(crate) use avx2_dispatch;
