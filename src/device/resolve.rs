//! From what the user asked for ([`DeviceSpec`]) and what the machine has
//! ([`Inventory`]) to the one device to run on, and whether a dtype can run there.
//! Pure: nothing here touches a driver.

use burn::tensor::DType;

use super::inventory::{Adapter, AdapterKind, CudaDevice, GraphicsApi, Inventory};
use super::DeviceSpec;
use crate::error::{Error, Result};

/// The concrete device a [`DeviceSpec`] resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Burn's CPU backend (flex).
    Cpu,
    /// A GPU through Burn's wgpu backend.
    Wgpu(Adapter),
    /// An NVIDIA GPU through burn-cuda.
    Cuda(CudaDevice),
}

/// A resolved device, with why it was chosen (for `auto`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedDevice {
    /// Where to run.
    pub target: Target,
    /// Why `auto` chose this device; empty for an explicit choice.
    pub reason: String,
}

impl ResolvedDevice {
    fn explicit(target: Target) -> Self {
        Self {
            target,
            reason: String::new(),
        }
    }

    /// The human label of the device: `cpu`, `vulkan:0 (NVIDIA H100 80GB HBM3)`,
    /// `cuda:0 (NVIDIA H100 80GB HBM3)`.
    pub fn label(&self) -> String {
        match &self.target {
            Target::Cpu => "cpu".into(),
            Target::Wgpu(a) => a.label(),
            Target::Cuda(d) => d.label(),
        }
    }

    /// Checks that parameters and activations of `dtype` can run on this device.
    ///
    /// The CPU backend runs float32, float16 and bfloat16 (half types are computed
    /// through conversions, so float32 is the fastest there). wgpu has no bfloat16
    /// (WGSL lacks the type) and float16 needs the adapter's `SHADER_F16`. CUDA runs
    /// float16 everywhere and bfloat16 from compute capability 8.0 (Ampere) on.
    pub fn check_dtype(&self, dtype: DType) -> Result<()> {
        let refuse = |message: String| Err(Error::invalid("dtype", message));
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return refuse(format!("{dtype:?}: use float32, float16 or bfloat16"));
        }
        match (&self.target, dtype) {
            (_, DType::F32) | (Target::Cpu, _) => Ok(()),
            (Target::Wgpu(a), DType::BF16) if !a.bfloat16 => refuse(format!(
                "bfloat16 is not available on {} through wgpu (WGSL has no bfloat16 type); \
                 use --dtype float16{} or float32",
                a.label(),
                if a.float16 {
                    ""
                } else {
                    " (not on this adapter either)"
                }
            )),
            (Target::Wgpu(a), DType::F16) if !a.float16 => refuse(format!(
                "float16 needs shader float16 support (wgpu SHADER_F16), which {} lacks; \
                 use --dtype float32",
                a.label()
            )),
            (Target::Cuda(d), DType::BF16) if !d.bfloat16() => refuse(format!(
                "bfloat16 needs compute capability 8.0 or newer; {} has {}.{}: use --dtype float16",
                d.label(),
                d.compute_capability.0,
                d.compute_capability.1
            )),
            _ => Ok(()),
        }
    }
}

fn unavailable(spec: &DeviceSpec, why: &str, inventory: &Inventory) -> Error {
    Error::invalid(
        "device",
        format!(
            "`{spec}` is not available: {why}. Available here: {}",
            inventory.available().join(", ")
        ),
    )
}

/// How much `auto` and `wgpu` prefer an adapter kind (lower is better).
fn rank(kind: AdapterKind) -> u8 {
    match kind {
        AdapterKind::Discrete => 0,
        AdapterKind::Integrated => 1,
        AdapterKind::Virtual => 2,
        AdapterKind::Other => 3,
        AdapterKind::Software => 4,
    }
}

/// The best adapter among `candidates`: by kind, then the OS's native API, then order.
fn best<'a>(candidates: impl Iterator<Item = &'a Adapter>) -> Option<&'a Adapter> {
    candidates.min_by_key(|a| (rank(a.kind), a.api != GraphicsApi::native(), a.index))
}

fn cuda_missing_reason(inventory: &Inventory) -> String {
    match &inventory.cuda {
        Err(why) => why.clone(),
        Ok(devs) if inventory.cuda_compiled => format!("{} CUDA device(s) but none usable", devs.len()),
        Ok(devs) => format!(
            "{} NVIDIA GPU(s) found, but this build has no CUDA support (rebuild with --features cuda)",
            devs.len()
        ),
    }
}

/// Picks the device `spec` names on the machine `inventory` describes. A device that is
/// not compiled in or not present is an error that lists what is available.
pub fn resolve(spec: &DeviceSpec, inventory: &Inventory) -> Result<ResolvedDevice> {
    let wgpu_api = |api: GraphicsApi, index: Option<usize>| -> Result<ResolvedDevice> {
        if !inventory.wgpu_compiled {
            return Err(unavailable(
                spec,
                "this build has no wgpu backend (rebuild with the default `wgpu` feature)",
                inventory,
            ));
        }
        let of_api = || inventory.adapters.iter().filter(|a| a.api == api);
        let found = match index {
            Some(i) => of_api().find(|a| a.index == i),
            None => best(of_api()),
        };
        match found {
            Some(a) => Ok(ResolvedDevice::explicit(Target::Wgpu(a.clone()))),
            None => {
                let n = of_api().count();
                let why = match (n, index) {
                    (0, _) => format!("no {} adapter found", api.name()),
                    (n, Some(i)) => {
                        format!("there are {n} {} adapter(s), so no index {i}", api.name())
                    }
                    (_, None) => format!("no {} adapter found", api.name()),
                };
                Err(unavailable(spec, &why, inventory))
            }
        }
    };
    match spec {
        DeviceSpec::Cpu => Ok(ResolvedDevice::explicit(Target::Cpu)),
        DeviceSpec::Vulkan(i) => wgpu_api(GraphicsApi::Vulkan, *i),
        DeviceSpec::Metal(i) => wgpu_api(GraphicsApi::Metal, *i),
        DeviceSpec::Dx12(i) => wgpu_api(GraphicsApi::Dx12, *i),
        DeviceSpec::Wgpu => {
            if !inventory.wgpu_compiled {
                return Err(unavailable(
                    spec,
                    "this build has no wgpu backend",
                    inventory,
                ));
            }
            best(inventory.adapters.iter())
                .map(|a| ResolvedDevice::explicit(Target::Wgpu(a.clone())))
                .ok_or_else(|| {
                    unavailable(
                        spec,
                        "wgpu found no Vulkan, Metal or DX12 adapter",
                        inventory,
                    )
                })
        }
        DeviceSpec::Cuda(i) => {
            if !inventory.cuda_compiled {
                let driver = match &inventory.cuda {
                    Ok(d) => format!("; {} NVIDIA GPU(s) are present", d.len()),
                    Err(_) => String::new(),
                };
                return Err(unavailable(
                    spec,
                    &format!(
                        "this build has no CUDA support (rebuild with --features cuda){driver}"
                    ),
                    inventory,
                ));
            }
            match &inventory.cuda {
                Err(why) => Err(unavailable(spec, why, inventory)),
                Ok(devs) => devs
                    .iter()
                    .find(|d| d.index == *i)
                    .map(|d| ResolvedDevice::explicit(Target::Cuda(d.clone())))
                    .ok_or_else(|| {
                        unavailable(
                            spec,
                            &format!("there are {} CUDA device(s)", devs.len()),
                            inventory,
                        )
                    }),
            }
        }
        DeviceSpec::Auto => Ok(auto(inventory)),
    }
}

/// `auto`: CUDA if compiled in and present, else the best hardware GPU through wgpu
/// (discrete before integrated: Apple silicon and laptop GPUs are integrated and still
/// far faster than the CPU), else the CPU. Software adapters such as Mesa's llvmpipe
/// are never chosen: they are slower than the CPU backend.
fn auto(inventory: &Inventory) -> ResolvedDevice {
    if inventory.cuda_compiled {
        if let Some(d) = inventory.cuda_devices().first() {
            return ResolvedDevice {
                target: Target::Cuda(d.clone()),
                reason: "auto: CUDA device found".into(),
            };
        }
    }
    let cuda_note = cuda_missing_reason(inventory);
    let hardware = inventory
        .adapters
        .iter()
        .filter(|a| matches!(a.kind, AdapterKind::Discrete | AdapterKind::Integrated));
    if let Some(a) = best(hardware) {
        return ResolvedDevice {
            target: Target::Wgpu(a.clone()),
            reason: format!("auto: {cuda_note}; using the {} {}", a.kind, a.label()),
        };
    }
    let gpus = if !inventory.wgpu_compiled {
        "this build has no wgpu backend".to_string()
    } else if inventory.adapters.is_empty() {
        "wgpu found no adapter".to_string()
    } else {
        format!(
            "wgpu found no discrete or integrated GPU (only {}; software and virtual adapters are skipped)",
            inventory
                .adapters
                .iter()
                .map(|a| format!("{}: {}", a.label(), a.kind))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    ResolvedDevice {
        target: Target::Cpu,
        reason: format!("auto: {cuda_note}; {gpus}; using the CPU"),
    }
}
