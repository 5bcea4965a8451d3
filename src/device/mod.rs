//! The one place the backend is chosen: a `--device` string becomes a [`DeviceSpec`],
//! [`resolve`] picks a concrete device from what the machine has ([`Inventory`]), and
//! [`dispatch`] runs backend-generic code on the matching Burn backend.
//!
//! Presence is checked before any Burn backend is created: burn-cuda panics without a
//! driver and burn-wgpu panics without an adapter, so both are probed first
//! ([`Inventory::probe`]) and a missing device is an error listing what is available.

mod cuda_probe;
mod dtype;
mod inventory;
mod probe;
mod report;
mod resolve;
mod wgpu_probe;
#[cfg(feature = "wgpu")]
mod wgpu_setup;

use crate::FusedOps;
use std::fmt;
use std::str::FromStr;

use burn::tensor::DType;

pub use dtype::{dtype_name, DTypeChoice};
pub use inventory::{Adapter, AdapterKind, CudaDevice, GraphicsApi, Inventory};
pub use report::report;
pub use resolve::{resolve, ResolvedDevice, Target};

use crate::error::{Error, Result};

/// Where to run, as the user names it on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// CUDA if present, else a hardware GPU through wgpu, else the CPU.
    Auto,
    /// The CPU backend (Burn's `flex`).
    Cpu,
    /// The best adapter wgpu has, whatever its API.
    Wgpu,
    /// A GPU through Vulkan; `Some(n)` is the n-th Vulkan adapter `hypergen devices`
    /// lists, `None` the best one.
    Vulkan(Option<usize>),
    /// A GPU through Metal (`mps` is accepted as its PyTorch name).
    Metal(Option<usize>),
    /// A GPU through DirectX 12.
    Dx12(Option<usize>),
    /// An NVIDIA GPU through CUDA.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        let (name, index) = match s.split_once(':') {
            Some((n, i)) => {
                let i = i.parse::<usize>().map_err(|_| {
                    Error::invalid(
                        "device",
                        format!("`{s}`: the part after `:` must be a GPU index"),
                    )
                })?;
                (n.to_string(), Some(i))
            }
            None => (s.clone(), None),
        };
        match (name.as_str(), index) {
            ("auto", None) => Ok(DeviceSpec::Auto),
            ("cpu", None) => Ok(DeviceSpec::Cpu),
            ("wgpu", None) => Ok(DeviceSpec::Wgpu),
            ("vulkan", i) => Ok(DeviceSpec::Vulkan(i)),
            ("metal" | "mps", i) => Ok(DeviceSpec::Metal(i)),
            ("dx12", i) => Ok(DeviceSpec::Dx12(i)),
            ("cuda", i) => Ok(DeviceSpec::Cuda(i.unwrap_or(0))),
            _ => Err(Error::invalid(
                "device",
                format!(
                    "`{s}` is not one of auto, cpu, wgpu, vulkan[:N], metal[:N], mps, dx12[:N], cuda[:N]"
                ),
            )),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let indexed = |f: &mut fmt::Formatter<'_>, name: &str, i: &Option<usize>| match i {
            Some(i) => write!(f, "{name}:{i}"),
            None => write!(f, "{name}"),
        };
        match self {
            DeviceSpec::Auto => write!(f, "auto"),
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Wgpu => write!(f, "wgpu"),
            DeviceSpec::Vulkan(i) => indexed(f, "vulkan", i),
            DeviceSpec::Metal(i) => indexed(f, "metal", i),
            DeviceSpec::Dx12(i) => indexed(f, "dx12", i),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Code that runs on whichever backend the user picked. A trait rather than a closure
/// because the body is generic over the backend.
pub trait WithBackend {
    /// What the code returns.
    type Output;
    /// The dtype the code asks to run in, resolved on the device before it starts
    /// ([`ResolvedDevice::pick_dtype`]); `None` is float32, unchecked.
    fn dtype(&self) -> Option<DTypeChoice> {
        None
    }
    /// Runs on backend `B`, where `placed` says which device and dtype.
    fn run<B: FusedOps>(self, device: B::Device, placed: Placed) -> Self::Output;
}

/// Where [`WithBackend`] code runs, as [`dispatch`] resolved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// The device for logs and `/health`: `cpu`, `vulkan:0 (NVIDIA H100 80GB HBM3)`,
    /// `cuda:0 (…)`.
    pub label: String,
    /// The dtype the work asked for, resolved on this device.
    pub dtype: DType,
}

/// The CPU backend.
pub type CpuBackend = burn::backend::Flex;
/// The wgpu backend (Vulkan, Metal, DX12).
#[cfg(feature = "wgpu")]
pub type WgpuBackend = burn::backend::Wgpu;
/// The CUDA backend.
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Cuda;

/// Resolves `spec` on this machine, checks the work's dtype there, and runs `work` on the
/// matching backend. A device that is not compiled in or not present, or a dtype the
/// device cannot run, is an error before anything starts.
pub fn dispatch<W: WithBackend>(spec: &DeviceSpec, work: W) -> Result<W::Output> {
    let resolved = resolve_here(spec)?;
    if !resolved.reason.is_empty() {
        tracing::info!(device = %resolved.label(), "{}", resolved.reason);
    }
    run_on(&resolved, work)
}

/// Runs `work` on an already resolved device, after resolving its dtype there.
pub fn run_on<W: WithBackend>(resolved: &ResolvedDevice, work: W) -> Result<W::Output> {
    let dtype = match work.dtype() {
        Some(choice) => {
            let dtype = resolved.pick_dtype(choice)?;
            if choice == DTypeChoice::Auto {
                tracing::info!(device = %resolved.label(), "dtype auto: {}", dtype_name(dtype));
            }
            dtype
        }
        None => DType::F32,
    };
    let placed = Placed {
        label: resolved.label(),
        dtype,
    };
    match &resolved.target {
        Target::Cpu => Ok(work.run::<CpuBackend>(Default::default(), placed)),
        #[cfg(feature = "wgpu")]
        Target::Wgpu(adapter) => {
            let device = wgpu_setup::device_for(adapter)?;
            Ok(work.run::<WgpuBackend>(device, placed))
        }
        #[cfg(feature = "cuda")]
        Target::Cuda(d) => {
            let device = burn::backend::cuda::CudaDevice::new(d.index);
            Ok(work.run::<CudaBackend>(device, placed))
        }
        #[allow(unreachable_patterns)]
        _ => Err(Error::invalid(
            "device",
            format!("{} is not compiled into this build", placed.label),
        )),
    }
}

/// The human label of the device `spec` resolves to on this machine (`cpu`,
/// `vulkan:0 (NVIDIA H100 80GB HBM3)`), as [`WithBackend::run`] receives it.
pub fn label(spec: &DeviceSpec) -> Result<String> {
    Ok(resolve_here(spec)?.label())
}

/// [`resolve`] on this machine. `cpu` needs no probing, which also keeps GPU drivers
/// (and their warnings) out of CPU-only runs.
pub fn resolve_here(spec: &DeviceSpec) -> Result<ResolvedDevice> {
    if *spec == DeviceSpec::Cpu {
        return Ok(ResolvedDevice {
            target: Target::Cpu,
            reason: String::new(),
        });
    }
    resolve(spec, &Inventory::probe())
}

/// The device names this build accepts, whatever the machine has; see
/// [`Inventory::available`] for the devices actually present.
pub fn available() -> Vec<&'static str> {
    let mut v = vec!["cpu", "auto"];
    if cfg!(feature = "wgpu") {
        v.extend(["wgpu", "vulkan", "metal", "dx12"]);
    }
    if cfg!(feature = "cuda") {
        v.push("cuda");
    }
    v
}

/// The backends compiled into this build, for `hypergen devices` and error messages.
pub fn compiled_backends() -> Vec<&'static str> {
    let mut v = vec!["cpu"];
    if cfg!(feature = "wgpu") {
        v.push(if cfg!(feature = "vulkan-spirv") {
            "wgpu (Vulkan with SPIR-V kernels, Metal, DX12)"
        } else {
            "wgpu (Vulkan, Metal, DX12; WGSL kernels)"
        });
    }
    if cfg!(feature = "cuda") {
        v.push("cuda");
    }
    v
}
