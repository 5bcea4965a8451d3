//! What this machine and this build offer: the wgpu adapters, the CUDA devices, and which
//! backends were compiled in. Plain data, so that device resolution can be tested with
//! made-up machines; [`Inventory::probe`] (in `probe.rs`, beside the probes)
//! fills it from the real one.

use std::fmt;

/// The graphics API wgpu drives an adapter through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GraphicsApi {
    /// Vulkan (Linux, Windows, Android; macOS through MoltenVK).
    Vulkan,
    /// Apple's Metal.
    Metal,
    /// DirectX 12 (Windows).
    Dx12,
}

impl GraphicsApi {
    /// The name used in device strings (`vulkan:0`, `metal:0`, `dx12:0`).
    pub fn name(self) -> &'static str {
        match self {
            GraphicsApi::Vulkan => "vulkan",
            GraphicsApi::Metal => "metal",
            GraphicsApi::Dx12 => "dx12",
        }
    }

    /// The API wgpu uses on this OS when none is named (what Burn's lazy setup picks).
    pub fn native() -> Self {
        if cfg!(target_os = "macos") {
            GraphicsApi::Metal
        } else {
            GraphicsApi::Vulkan
        }
    }
}

impl fmt::Display for GraphicsApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What kind of processor an adapter is, as the driver reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdapterKind {
    /// A discrete GPU.
    Discrete,
    /// A GPU sharing memory with the CPU (laptops, Apple silicon).
    Integrated,
    /// A GPU exposed through a hypervisor.
    Virtual,
    /// A software rasteriser on the CPU (Mesa llvmpipe/lavapipe, SwiftShader, WARP).
    Software,
    /// The driver does not say.
    Other,
}

impl fmt::Display for AdapterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AdapterKind::Discrete => "discrete GPU",
            AdapterKind::Integrated => "integrated GPU",
            AdapterKind::Virtual => "virtual GPU",
            AdapterKind::Software => "software (CPU)",
            AdapterKind::Other => "unknown type",
        })
    }
}

/// One wgpu adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adapter {
    /// The graphics API it is reached through.
    pub api: GraphicsApi,
    /// Its position among the adapters of `api`: the `N` of `vulkan:N`.
    pub index: usize,
    /// Its position among the adapters of `api` of the same `kind`: how Burn's
    /// `WgpuDevice::DiscreteGpu(n)` and friends count.
    pub kind_index: usize,
    /// The adapter's name (`NVIDIA H100 80GB HBM3`, `llvmpipe (LLVM 15.0.7, 256 bits)`).
    pub name: String,
    /// Discrete, integrated, software…
    pub kind: AdapterKind,
    /// Driver name and version, when the driver reports them.
    pub driver: String,
    /// Whether shaders may use float16 (wgpu's `SHADER_F16`).
    pub float16: bool,
    /// Whether shaders may use bfloat16 (never through WGSL).
    pub bfloat16: bool,
}

impl Adapter {
    /// `vulkan:0`.
    pub fn id(&self) -> String {
        format!("{}:{}", self.api, self.index)
    }

    /// `vulkan:0 (NVIDIA H100 80GB HBM3)`.
    pub fn label(&self) -> String {
        format!("{} ({})", self.id(), self.name)
    }
}

/// One CUDA device, as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaDevice {
    /// The `N` of `cuda:N` (the driver's ordinal).
    pub index: usize,
    /// The device name.
    pub name: String,
    /// Device memory in bytes.
    pub memory_bytes: u64,
    /// Compute capability (major, minor), e.g. (9, 0) for Hopper.
    pub compute_capability: (i32, i32),
}

impl CudaDevice {
    /// `cuda:0 (NVIDIA H100 80GB HBM3)`.
    pub fn label(&self) -> String {
        format!("cuda:{} ({})", self.index, self.name)
    }

    /// bfloat16 arithmetic needs Ampere (8.0) or newer.
    pub fn bfloat16(&self) -> bool {
        self.compute_capability.0 >= 8
    }
}

/// Everything device resolution needs to know about the machine and the build.
#[derive(Debug, Clone)]
pub struct Inventory {
    /// Whether the wgpu backend was compiled in.
    pub wgpu_compiled: bool,
    /// Whether the CUDA backend was compiled in.
    pub cuda_compiled: bool,
    /// The wgpu adapters (Vulkan, Metal and DX12; empty when wgpu is not compiled in).
    pub adapters: Vec<Adapter>,
    /// CUDA devices, or why there are none (no driver, no device…). Probed even when
    /// CUDA is not compiled in, so that the error can say a rebuild would help.
    pub cuda: Result<Vec<CudaDevice>, String>,
}

impl Inventory {
    /// The CUDA devices found (none when the driver is missing).
    pub fn cuda_devices(&self) -> &[CudaDevice] {
        self.cuda.as_deref().unwrap_or(&[])
    }

    /// The device strings that would work here, with names: what errors list.
    pub fn available(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.cuda_compiled {
            out.extend(self.cuda_devices().iter().map(CudaDevice::label));
        }
        out.extend(self.adapters.iter().map(Adapter::label));
        if !self.adapters.is_empty() {
            out.push("wgpu".into());
        }
        out.push("cpu".into());
        out.push("auto".into());
        out
    }
}
