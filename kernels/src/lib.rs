//! hypergen's fused ops for Burn.
//!
//! Three hot paths of SDXL get one trait method each in [`FusedOps`]: GroupNorm with an
//! optional SiLU, GEGLU, and scaled dot-product attention. Every backend gets the plain
//! Burn composition ([`plain`]) by default; CubeCL backends (wgpu and CUDA behind Burn's
//! fusion) get our own kernels from one source (feature `cube`), and the CPU backend
//! (Burn's `Flex`) native Rust kernels on its storage and thread pool, each checked
//! against the plain ops by hypergen's parity tests and this crate's unit tests.
//!
//! Which kernels run is chosen once per process by `HYPERGEN_KERNELS` ([`KernelSet`]), so
//! a benchmark can time every variant without a rebuild.

#![warn(missing_docs)]

use std::sync::OnceLock;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

pub mod plain;

mod cpu;

#[cfg(any(test, feature = "test-utils"))]
pub mod reference;

#[cfg(feature = "cube")]
pub mod cube;

/// Widest attention head our flash kernel takes; wider heads use other kernels.
pub const MAX_HEAD_DIM: usize = 256;

/// Columns per panel of a weight laid out by [`plain::to_panels`]: four AVX-512 vectors.
pub const PANEL_WIDTH: usize = 64;

/// Backends the SDXL model runs on: Burn's [`Backend`] plus hypergen's fused ops.
///
/// Every method has a plain-Burn default, so a backend opts in to kernels by overriding.
pub trait FusedOps: Backend {
    /// GroupNorm over `x` `[N, C, L]` in `groups` groups with float32 statistics, then the
    /// per-channel affine (`gamma`, `beta` `[C]`) and, when `silu`, SiLU. Output dtype is
    /// the input's.
    fn fused_group_norm(
        x: Tensor<Self, 3>,
        affine: Option<(Tensor<Self, 1>, Tensor<Self, 1>)>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Tensor<Self, 3> {
        plain::group_norm(x, affine, groups, eps, silu)
    }

    /// GEGLU on `x` `[N, L, 2I]`: the first half times exact (erf) GELU of the second.
    fn fused_geglu(x: Tensor<Self, 3>) -> Tensor<Self, 3> {
        plain::geglu(x)
    }

    /// Non-causal softmax attention of `q` `[N, H, L, D]` over `k`, `v` `[N, H, S, D]`
    /// with scale `1/sqrt(D)`, never holding more than [`plain::SCORE_BUDGET`] scores:
    /// on CubeCL backends the fastest flash kernel (ours or Burn's, autotuned), on the
    /// CPU blocks of query rows through GEMMs and an in-cache softmax, on others query
    /// blocks through Burn's attention op.
    fn fused_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
    ) -> Tensor<Self, 4> {
        plain::attention_chunked(q, k, v, plain::SCORE_BUDGET)
    }

    /// Causal softmax attention: as [`fused_attention`](Self::fused_attention), query
    /// `i` attending to keys `0..=i + S − L` only (aligned at the end, as Burn's and
    /// PyTorch's `is_causal` with `L ≤ S`). The CPU backend runs our kernel (keys past a
    /// block's last query neither computed nor multiplied); others Burn's `attention`.
    fn fused_causal_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
    ) -> Tensor<Self, 4> {
        plain::attention_causal(q, k, v)
    }

    /// `act(x)` element-wise, output in `x`'s dtype. The CPU backend runs one vectorised
    /// pass in f32 (in place when it holds the only handle); others Burn's activation
    /// ops (fused by Burn's fusion on GPUs).
    fn fused_activation<const D: usize>(x: Tensor<Self, D>, act: Activation) -> Tensor<Self, D> {
        plain::activation(x, act)
    }

    /// 2-d convolution of `x` `[N, Ci, H, W]` with `weight` `[Co, Ci, Kh, Kw]` and an
    /// optional `bias` `[Co]`: the same `stride` and zero `padding` on both axes, no
    /// dilation, one group (every SDXL convolution). The CPU backend has its own GEMM
    /// kernel; others run Burn's `conv2d`.
    fn fused_conv2d(
        x: Tensor<Self, 4>,
        weight: Tensor<Self, 4>,
        bias: Option<Tensor<Self, 1>>,
        stride: usize,
        padding: usize,
    ) -> Tensor<Self, 4> {
        plain::conv2d(x, weight, bias, stride, padding)
    }

    /// `nn.Upsample(scale_factor=2, mode="nearest")` on `x` `[N, Ci, H, W]`, then
    /// [`fused_conv2d`](Self::fused_conv2d) with stride 1 (the decoders' `Upsample2D`).
    /// The CPU backend reads the upsampled image through its im2col and never stores it;
    /// others upsample, then convolve.
    fn fused_upsample_conv2d(
        x: Tensor<Self, 4>,
        weight: Tensor<Self, 4>,
        bias: Option<Tensor<Self, 1>>,
        padding: usize,
    ) -> Tensor<Self, 4> {
        Self::fused_conv2d(plain::upsample_nearest2x(x), weight, bias, 1, padding)
    }

    /// LayerNorm over the last dim of `x` with float32 statistics (biased variance), then
    /// `weight`, `bias` (`[dim]`); output in `x`'s dtype.
    fn fused_layer_norm<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 1>,
        bias: Tensor<Self, 1>,
        eps: f64,
    ) -> Tensor<Self, D> {
        plain::layer_norm(x, weight, bias, eps)
    }

    /// `x·weight + bias` over the last dim of `x` `[.., in]`, `weight` `[in, out]` (Burn's
    /// `Linear` layout), `bias` `[out]`. Every row of `x` goes through one matrix product:
    /// our GEMM kernel on the CPU backend, [`plain::linear_rows`] on others.
    fn fused_linear<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, D> {
        plain::linear_rows(x, weight, bias)
    }

    /// Whether [`fused_linear_panels`](Self::fused_linear_panels) is faster than
    /// [`fused_linear`](Self::fused_linear) for weights of `dtype`, so that models
    /// whose linear layers run on few rows (the text encoders) should lay their weights
    /// out by [`plain::to_panels`] once loaded: on the CPU backend in f32 with AVX-512
    /// and the `linear` kernel on; nowhere else.
    fn linear_panels(dtype: burn::tensor::DType) -> bool {
        let _ = dtype;
        false
    }

    /// [`fused_linear`](Self::fused_linear) with `weight` holding its `[in, out]`
    /// values in panel order ([`plain::to_panels`]). The CPU backend streams each panel
    /// once into its own micro-kernel (no packing per call); others restore the layout
    /// ([`plain::from_panels`]) and run [`fused_linear`](Self::fused_linear).
    fn fused_linear_panels<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, D> {
        Self::fused_linear(x, plain::from_panels(weight), bias)
    }

    /// Runs `f`, which runs this backend's ops, where they run best: on the CPU backend
    /// on a worker of a thread pool kept for the models (as many threads as the global
    /// pool), so that each op's parallel part starts there instead of waking a pool and
    /// putting the calling thread to sleep for every op; elsewhere on the calling thread.
    fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        f()
    }

    /// Our flash-attention kernel alone (no autotuned choice), for tests and benchmarks;
    /// `None` on backends without it (the CPU).
    fn flash_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
    ) -> Option<Tensor<Self, 4>> {
        let _ = (q, k, v);
        None
    }

    /// Device memory held by the backend's allocator on `device`, after finishing queued
    /// work; `None` where the backend does not manage device memory (the CPU).
    fn device_memory(device: &Self::Device) -> Option<DeviceMemory> {
        let _ = device;
        None
    }
}

/// Element-wise activations of the models (CLIP's MLP; SiLU for completeness).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact (erf) GELU: `x·(1 + erf(x/√2))/2` (OpenCLIP bigG, SDXL's second encoder).
    Gelu,
    /// tanh-approximated GELU: `x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))/2`.
    GeluTanh,
    /// `x·sigmoid(1.702·x)` (OpenAI CLIP, SDXL's first encoder).
    QuickGelu,
    /// `x·sigmoid(x)`.
    Silu,
}

/// A snapshot of a device allocator's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes in live tensors.
    pub in_use: u64,
    /// Bytes the allocator holds from the device (its pools only grow within a run unless
    /// cleaned up, so after a run this is the run's high-water mark).
    pub reserved: u64,
}

/// Which of our kernels run, from `HYPERGEN_KERNELS`: `all` (default), `none`, or a comma
/// list of `group_norm`, `geglu`, `attention`, `conv`, `winograd`, `linear`, `layer_norm`,
/// `activation`. Off means the plain Burn ops of [`plain`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSet {
    /// Fused GroupNorm(+SiLU).
    pub group_norm: bool,
    /// Fused GEGLU.
    pub geglu: bool,
    /// Flash attention.
    pub attention: bool,
    /// Convolution (the CPU backend's; GPUs always run Burn's).
    pub conv: bool,
    /// 3×3 convolutions by Winograd's F(2×2, 3×3) inside `conv` (the CPU backend's):
    /// 2.25× fewer products than the direct convolution.
    pub winograd: bool,
    /// Linear layers (the CPU backend's; GPUs always run Burn's).
    pub linear: bool,
    /// LayerNorm (the CPU backend's; GPUs run the plain composition under fusion).
    pub layer_norm: bool,
    /// Element-wise activations (the CPU backend's; GPUs run the plain composition).
    pub activation: bool,
}

impl KernelSet {
    /// Every kernel on.
    pub const ALL: KernelSet = KernelSet {
        group_norm: true,
        geglu: true,
        attention: true,
        conv: true,
        winograd: true,
        linear: true,
        layer_norm: true,
        activation: true,
    };
    /// Every kernel off.
    pub const NONE: KernelSet = KernelSet {
        group_norm: false,
        geglu: false,
        attention: false,
        conv: false,
        winograd: false,
        linear: false,
        layer_norm: false,
        activation: false,
    };

    /// Parses the `HYPERGEN_KERNELS` syntax.
    pub fn parse(s: &str) -> Result<KernelSet, String> {
        let s = s.trim();
        match s {
            "" | "all" => return Ok(Self::ALL),
            "none" => return Ok(Self::NONE),
            _ => {}
        }
        let mut set = Self::NONE;
        for name in s.split(',').map(str::trim) {
            match name {
                "group_norm" => set.group_norm = true,
                "geglu" => set.geglu = true,
                "attention" => set.attention = true,
                "conv" => set.conv = true,
                "winograd" => set.winograd = true,
                "linear" => set.linear = true,
                "layer_norm" => set.layer_norm = true,
                "activation" => set.activation = true,
                other => {
                    return Err(format!(
                        "unknown kernel `{other}` in HYPERGEN_KERNELS (expected all, none, or a \
                         comma list of group_norm, geglu, attention, conv, winograd, linear, layer_norm, activation)"
                    ))
                }
            }
        }
        Ok(set)
    }

    /// The process-wide set: `HYPERGEN_KERNELS` read once. An invalid value is reported
    /// on stderr and treated as `all`.
    pub fn current() -> KernelSet {
        static SET: OnceLock<KernelSet> = OnceLock::new();
        *SET.get_or_init(|| match std::env::var("HYPERGEN_KERNELS") {
            Ok(v) => Self::parse(&v).unwrap_or_else(|e| {
                eprintln!("hypergen: {e}; using all");
                Self::ALL
            }),
            Err(_) => Self::ALL,
        })
    }
}

impl std::fmt::Display for KernelSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = [
            (self.group_norm, "group_norm"),
            (self.geglu, "geglu"),
            (self.attention, "attention"),
            (self.conv, "conv"),
            (self.winograd, "winograd"),
            (self.linear, "linear"),
            (self.layer_norm, "layer_norm"),
            (self.activation, "activation"),
        ]
        .into_iter()
        .filter_map(|(on, n)| on.then_some(n))
        .collect();
        if names.is_empty() {
            write!(f, "none")
        } else {
            write!(f, "{}", names.join(","))
        }
    }
}

/// Keeps CubeCL's autotune results (which kernel variant won, per device and shape) in
/// `dir`, so that a restarted process skips autotuning what it already tuned. Must be
/// called before any GPU work; the rest of CubeCL's configuration (`cubecl.toml`,
/// `CUBECL_*` variables) is kept. Without the `cube` feature there is nothing to tune and
/// this does nothing.
pub fn set_autotune_cache(dir: &std::path::Path) -> Result<(), String> {
    #[cfg(feature = "cube")]
    {
        use cubecl::config::cache::CacheConfig;
        use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("creating the autotune cache {}: {e}", dir.display()))?;
        // `set` panics once the configuration was read (by any GPU work): refuse instead.
        if CubeClRuntimeConfig::storage().lock().is_some() {
            return Err("the autotune cache must be set before any GPU work".into());
        }
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        config.autotune.cache = CacheConfig::File(dir.to_path_buf());
        CubeClRuntimeConfig::set(config);
    }
    #[cfg(not(feature = "cube"))]
    let _ = dir;
    Ok(())
}
