//! Backend selection by name, among those compiled in by Cargo features.
//!
//! Burn 0.22 picks the backend from the [`Device`]; this module maps the names users type
//! (`--backend flex`) to devices, and says which names this build offers, so that one
//! binary serves every backend its features enable.

use burn::tensor::Device;
#[cfg(feature = "wgpu")]
use burn::tensor::DeviceKind;

/// Names of the backends compiled into this build, in preference order.
pub const BACKENDS: &[&str] = &[
    #[cfg(feature = "ndarray")]
    "ndarray",
    #[cfg(feature = "flex")]
    "flex",
    #[cfg(feature = "wgpu")]
    "wgpu",
    #[cfg(feature = "vulkan")]
    "vulkan",
];

/// A backend name this build does not offer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "backend `{name}` is not available in this build: available are {available:?} \
     (enable it with `--features {name}`)"
)]
pub struct UnknownBackend {
    /// The name asked for.
    pub name: String,
    /// What this build offers ([`BACKENDS`]).
    pub available: Vec<&'static str>,
}

/// The device of backend `name` (`"ndarray"`, `"flex"`, `"wgpu"`, `"vulkan"`); call
/// `.autodiff()` on it to train.
///
/// `wgpu` takes wgpu's default adapter (the best GPU; `CUBECL_WGPU_DEFAULT_DEVICE=Cpu`
/// picks a software rasterizer such as lavapipe) and compiles kernels to WGSL; `vulkan`
/// takes the default Vulkan adapter and compiles kernels with CubeCL's SPIR-V compiler.
///
/// # Errors
/// [`UnknownBackend`] when `name` is not in [`BACKENDS`].
///
/// # Example
/// ```
/// let device = sparse_attn::backends::device("ndarray").unwrap().autodiff();
/// assert!(device.is_autodiff());
/// assert!(sparse_attn::backends::device("tpu").is_err());
/// ```
pub fn device(name: &str) -> Result<Device, UnknownBackend> {
    Ok(match name {
        #[cfg(feature = "ndarray")]
        #[allow(deprecated)]
        // burn-ndarray is deprecated upstream but still the default CPU backend.
        "ndarray" => Device::ndarray(),
        #[cfg(feature = "flex")]
        "flex" => Device::flex(),
        #[cfg(feature = "wgpu")]
        "wgpu" => Device::wgpu(DeviceKind::DefaultDevice),
        #[cfg(feature = "vulkan")]
        "vulkan" => Device::vulkan(DeviceKind::DefaultDevice),
        _ => {
            return Err(UnknownBackend {
                name: name.to_string(),
                available: BACKENDS.to_vec(),
            });
        }
    })
}
