//! The one place the backend is chosen: a `--device` string becomes a [`DeviceSpec`],
//! and [`dispatch`] runs backend-generic code on the matching Burn backend.

use std::fmt;
use std::str::FromStr;

use burn::tensor::backend::Backend;

use crate::error::{Error, Result};

/// Where to run, as the user names it on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// CUDA if present, else a GPU through wgpu, else the CPU.
    Auto,
    /// The CPU backend (Burn's `flex`).
    Cpu,
    /// The adapter wgpu prefers (Vulkan on Linux and Windows, Metal on macOS).
    Wgpu,
    /// A GPU through wgpu's Vulkan backend; `Some(n)` picks the n-th discrete GPU.
    Vulkan(Option<usize>),
    /// Apple's GPU through Metal (`mps` is accepted as its PyTorch name).
    Metal,
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
            ("metal" | "mps", None) => Ok(DeviceSpec::Metal),
            ("cuda", i) => Ok(DeviceSpec::Cuda(i.unwrap_or(0))),
            _ => Err(Error::invalid(
                "device",
                format!("`{s}` is not one of auto, cpu, wgpu, vulkan[:N], metal, mps, cuda[:N]"),
            )),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => write!(f, "auto"),
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Wgpu => write!(f, "wgpu"),
            DeviceSpec::Vulkan(None) => write!(f, "vulkan"),
            DeviceSpec::Vulkan(Some(i)) => write!(f, "vulkan:{i}"),
            DeviceSpec::Metal => write!(f, "metal"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Code that runs on whichever backend the user picked. A trait rather than a closure
/// because the body is generic over the backend.
pub trait WithBackend {
    /// What the code returns.
    type Output;
    /// Runs on backend `B`; `label` names the device for logs and `/health`.
    fn run<B: Backend>(self, device: B::Device, label: String) -> Self::Output;
}

/// The CPU backend.
pub type CpuBackend = burn::backend::Flex;
/// The wgpu backend (Vulkan, Metal, DX12).
#[cfg(feature = "wgpu")]
pub type WgpuBackend = burn::backend::Wgpu;

/// Runs `work` on the backend `spec` names. A device that is not compiled in is an
/// error that lists what this build has.
pub fn dispatch<W: WithBackend>(spec: &DeviceSpec, work: W) -> Result<W::Output> {
    match spec {
        DeviceSpec::Cpu => Ok(work.run::<CpuBackend>(Default::default(), "cpu".into())),
        #[cfg(not(feature = "wgpu"))]
        DeviceSpec::Auto => Ok(work.run::<CpuBackend>(Default::default(), "cpu".into())),
        #[cfg(feature = "wgpu")]
        DeviceSpec::Wgpu | DeviceSpec::Auto | DeviceSpec::Metal | DeviceSpec::Vulkan(_) => {
            use burn::backend::wgpu::WgpuDevice;
            let device = match spec {
                DeviceSpec::Vulkan(Some(i)) => WgpuDevice::DiscreteGpu(*i),
                _ => WgpuDevice::DefaultDevice,
            };
            Ok(work.run::<WgpuBackend>(device, spec.to_string()))
        }
        other => Err(Error::invalid(
            "device",
            format!(
                "`{other}` is not available in this build (available: {})",
                available().join(", ")
            ),
        )),
    }
}

/// The device names this build can use.
pub fn available() -> Vec<&'static str> {
    let mut v = vec!["cpu"];
    if cfg!(feature = "wgpu") {
        v.extend(["auto", "wgpu", "vulkan", "metal"]);
    }
    v
}
