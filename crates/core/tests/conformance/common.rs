//! Helpers shared by the integration tests: devices by feature, a seeded RNG, tolerances.

#![allow(dead_code)]

use burn::tensor::{Device, FloatDType, Tensor, TensorData};

/// Every backend compiled in, as autodiff devices.
#[allow(clippy::vec_init_then_push)] // pushes are feature-gated
pub fn devices() -> Vec<(&'static str, Device)> {
    let mut out = Vec::new();
    #[cfg(feature = "ndarray")]
    out.push(("ndarray", Device::ndarray().autodiff()));
    #[cfg(feature = "flex")]
    out.push(("flex", Device::flex().autodiff()));
    // CI and development machines have no GPU: wgpu runs on lavapipe (software Vulkan).
    // On a GPU machine, `SPARSE_ATTN_TEST_GPU=1` takes the default adapter instead and, in a
    // `vulkan` build, adds the SPIR-V compiler's path (lavapipe crashes on it; see GPU.md).
    #[cfg(feature = "wgpu")]
    {
        use burn::tensor::DeviceKind;
        let on_gpu = std::env::var("SPARSE_ATTN_TEST_GPU").is_ok_and(|v| v == "1");
        let kind = if on_gpu {
            DeviceKind::DefaultDevice
        } else {
            DeviceKind::Cpu
        };
        out.push(("wgpu", Device::wgpu(kind.clone()).autodiff()));
        #[cfg(feature = "vulkan")]
        if on_gpu {
            out.push(("vulkan", Device::vulkan(kind).autodiff()));
        }
    }
    assert!(
        !out.is_empty(),
        "no backend feature enabled: enable ndarray, flex or wgpu"
    );
    eprintln!(
        "backends under test: {:?}",
        out.iter().map(|(name, _)| *name).collect::<Vec<_>>()
    );
    out
}

/// A small seeded generator (SplitMix64 + Box-Muller), so tests are reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    /// `len` standard normal values, rounded to f32 (the inputs both sides see).
    pub fn normals(&mut self, len: usize) -> Vec<f64> {
        (0..len)
            .map(|_| {
                let (u, v) = (self.next().max(1e-12), self.next());
                let x = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
                f64::from(x as f32)
            })
            .collect()
    }
}

pub fn to_tensor<const D: usize>(values: &[f64], dims: [usize; D], device: &Device) -> Tensor<D> {
    let data: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    Tensor::from_data(TensorData::new(data, dims), device)
}

/// `|got - want| <= tol * (1 + |want|)` element-wise, with the worst element in the message.
pub fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (f64::from(g) - w).abs() / (1.0 + w.abs());
        if err.is_nan() || err > worst.0 {
            worst = (if err.is_nan() { f64::INFINITY } else { err }, i);
        }
    }
    assert!(
        worst.0 <= tol,
        "{what}: element {} is {} but expected {} (relative error {:e} > {tol:e})",
        worst.1,
        got[worst.1],
        want[worst.1],
        worst.0
    );
}

/// `values` rounded to `dtype` (to nearest even on the mantissa: exact for the normal range,
/// where these inputs lie), so that the reference sees what the kernels see.
pub fn rounded(values: Vec<f64>, dtype: FloatDType) -> Vec<f64> {
    let mantissa = if dtype == FloatDType::F16 { 10 } else { 7 };
    let drop = 23 - mantissa;
    values
        .into_iter()
        .map(|x| {
            let bits = (x as f32).to_bits();
            let half = (1u32 << (drop - 1)) - 1 + ((bits >> drop) & 1);
            f64::from(f32::from_bits((bits + half) & !((1u32 << drop) - 1)))
        })
        .collect()
}
