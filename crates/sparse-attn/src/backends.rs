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

/// `count` devices of backend `name` for data-parallel training (burn-train's
/// `ExecutionStrategy::MultiDevice`), one model replica on each.
///
/// On a GPU backend (`wgpu`, `vulkan`) these are the first `count` discrete GPUs, or the
/// default device when `count` is 1. A CPU backend (`ndarray`, `flex`) has one device: its
/// `count` replicas share it, each on its own thread.
///
/// # Errors
/// [`UnknownBackend`] when `name` is not in [`BACKENDS`].
///
/// # Example
/// ```
/// let replicas = sparse_attn::backends::devices("ndarray", 2).unwrap();
/// assert_eq!(replicas.len(), 2);
/// ```
pub fn devices(name: &str, count: usize) -> Result<Vec<Device>, UnknownBackend> {
    let first = device(name)?;
    if count == 1 {
        return Ok(vec![first]);
    }
    Ok((0..count)
        .map(|index| replica_device(name, index, &first))
        .collect())
}

/// The device of replica `index` of backend `name` (`first`: its default device).
#[cfg_attr(not(feature = "wgpu"), allow(unused_variables))]
fn replica_device(name: &str, index: usize, first: &Device) -> Device {
    match name {
        #[cfg(feature = "wgpu")]
        "wgpu" => Device::wgpu(DeviceKind::DiscreteGpu(index)),
        #[cfg(feature = "vulkan")]
        "vulkan" => Device::vulkan(DeviceKind::DiscreteGpu(index)),
        _ => first.clone(),
    }
}
