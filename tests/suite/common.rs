//! Shared helpers: the fixture folder, reference tensors, the error metric, and a macro
//! that instantiates a generic test on every backend.

#![allow(dead_code)]

use hypergen::FusedOps;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use burn::tensor::{Tensor, TensorData};

/// Relative error every float32 parity check must meet: ‖out − ref‖ / ‖ref‖.
pub const TOL_F32: f64 = 1e-4;

/// The CPU backend.
pub type Cpu = burn::backend::Flex;
/// The wgpu backend (Vulkan, Metal, DX12; Mesa's software Vulkan in CI).
pub type Gpu = burn::backend::Wgpu;

/// The fixture model folder: `HYPERGEN_FIXTURE_DIR`, else `../shared/fixtures/tiny-sdxl`.
/// Panics (failing the test) when it is absent: a parity test never skips.
pub fn fixture_dir() -> PathBuf {
    let dir = std::env::var_os("HYPERGEN_FIXTURE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/tiny-sdxl")
        });
    assert!(
        dir.join("model_index.json").is_file(),
        "fixture model not found at {} (set HYPERGEN_FIXTURE_DIR)",
        dir.display()
    );
    dir
}

/// `reference/` inside the fixture.
pub fn reference_dir() -> PathBuf {
    fixture_dir().join("reference")
}

/// A reference tensor: shape and values as f32 (u8 tensors are widened).
#[derive(Clone, Debug)]
pub struct RefTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

fn load_all() -> HashMap<String, RefTensor> {
    let path = reference_dir().join("tensors.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("reference tensors parse");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let t = ref_tensor_of(&view);
            (name, t)
        })
        .collect()
}

/// A safetensors tensor (f32, or u8 widened) as a [`RefTensor`].
pub fn ref_tensor_of(view: &safetensors::tensor::TensorView<'_>) -> RefTensor {
    let data: Vec<f32> = match view.dtype() {
        safetensors::Dtype::F32 => view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::U8 => view.data().iter().map(|&b| b as f32).collect(),
        other => panic!("unexpected dtype {other:?}"),
    };
    RefTensor {
        shape: view.shape().to_vec(),
        data,
    }
}

/// The reference tensor `name` from `reference/tensors.safetensors`.
pub fn reference(name: &str) -> RefTensor {
    static ALL: OnceLock<HashMap<String, RefTensor>> = OnceLock::new();
    ALL.get_or_init(load_all)
        .get(name)
        .unwrap_or_else(|| panic!("reference tensor `{name}` not found"))
        .clone()
}

/// The reference tensor `name` on `device`.
pub fn ref_tensor<B: FusedOps, const D: usize>(name: &str, device: &B::Device) -> Tensor<B, D> {
    let r = reference(name);
    Tensor::from_data(TensorData::new(r.data, r.shape), device)
}

/// A tensor's values as f32, whatever its dtype.
pub fn values<B: FusedOps, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("tensor data to f32")
}

/// ‖got − want‖ / ‖want‖.
pub fn rel_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        let d = *g as f64 - *w as f64;
        num += d * d;
        den += (*w as f64) * (*w as f64);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Asserts shape and relative error against the reference tensor `name`.
pub fn assert_matches<B: FusedOps, const D: usize>(
    what: &str,
    got: Tensor<B, D>,
    name: &str,
    tol: f64,
) {
    let r = reference(name);
    assert_eq!(got.dims().to_vec(), r.shape, "{what}: shape");
    let got = values(got);
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{what}: non-finite values"
    );
    let err = rel_error(&got, &r.data);
    eprintln!("{what}: relative error {err:.3e} (tolerance {tol:.0e})");
    assert!(err <= tol, "{what}: relative error {err:.3e} > {tol:.0e}");
}

/// The wgpu device the tests use. Fails the calling test, with the fix, when wgpu has
/// no adapter: Burn's own device setup would then crash the whole test binary (heap
/// corruption in a driver loader it also tries), hiding every later test. The probe
/// asks wgpu for Vulkan, Metal and DX12 adapters only, which is safe without a driver.
pub fn gpu_device() -> burn::backend::wgpu::WgpuDevice {
    static ADAPTERS: OnceLock<Result<(), String>> = OnceLock::new();
    let found = ADAPTERS.get_or_init(|| {
        if !hypergen::device::Inventory::probe().adapters.is_empty() {
            return Ok(());
        }
        let icd = std::env::var("VK_ICD_FILENAMES")
            .map(|v| format!(" (VK_ICD_FILENAMES is set to `{v}`: unset it)"))
            .unwrap_or_default();
        Err(format!(
            "no wgpu adapter (Vulkan driver) on this machine{icd}: install Mesa's software \
             Vulkan (`apt-get install mesa-vulkan-drivers libvulkan1`) and set \
             XDG_RUNTIME_DIR to a private directory (mkdir -p, chmod 700); `scripts/test` \
             does both"
        ))
    });
    if let Err(message) = found {
        panic!("{message}");
    }
    burn::backend::wgpu::WgpuDevice::default()
}

/// `on_backends!(name, generic_fn)` makes `name::cpu` and `name::wgpu` tests calling
/// `generic_fn::<B>(&device)`; `generic_fn` is a function of the calling module.
#[macro_export]
macro_rules! on_backends {
    ($name:ident, $f:ident) => {
        mod $name {
            #[test]
            fn cpu() {
                super::$f::<$crate::common::Cpu>(&Default::default());
            }
            #[test]
            fn wgpu() {
                super::$f::<$crate::common::Gpu>(&$crate::common::gpu_device());
            }
        }
    };
}

/// The fixture folder as the model name `load_pipeline` takes.
pub fn fixture_model() -> String {
    fixture_dir().display().to_string()
}

/// The fixture as a pipeline in `dtype` on `device`, with `options` and `run`.
pub fn fixture_pipeline_with<B: FusedOps>(
    dtype: burn::tensor::DType,
    options: &hypergen::load::LoadOptions,
    run: &hypergen::pipeline::RunOptions,
    device: &B::Device,
) -> hypergen::pipeline::SdxlPipeline<B> {
    hypergen::load::load_pipeline::<B>(&fixture_model(), dtype, options, run, device)
        .expect("fixture pipeline loads")
}

/// The fixture as a pipeline in `dtype` on `device` (default files, its own VAE).
pub fn fixture_pipeline<B: FusedOps>(
    dtype: burn::tensor::DType,
    device: &B::Device,
) -> hypergen::pipeline::SdxlPipeline<B> {
    fixture_pipeline_with(dtype, &Default::default(), &Default::default(), device)
}

/// For a test that needs an outside tool: `Ok(())` when it is there; otherwise a failure
/// under CI (`CI` set, where `scripts/test` installs every tool) and, elsewhere, a skip
/// notice naming what is missing (`false`: the test returns at once).
pub fn tool_present(test: &str, missing: Result<(), String>) -> bool {
    match missing {
        Ok(()) => true,
        Err(what) => {
            assert!(std::env::var_os("CI").is_none(), "{test}: {what}");
            eprintln!("SKIPPED {test}: {what}");
            false
        }
    }
}

/// Where `scripts/test` installs the tests' outside tools: `HYPERGEN_TOOLS`, else
/// `~/.cache/hypergen/tools` (a Python virtual environment in `venv/`, Node packages in
/// `node/`).
pub fn tools() -> PathBuf {
    std::env::var_os("HYPERGEN_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_default();
            Path::new(&home).join(".cache/hypergen/tools")
        })
}

/// The tools' Python interpreter, never whatever `python3` a machine has: every module
/// the suite's Python imports is installed in that environment by `scripts/test` (which
/// refuses a test that spawns `python3` itself). The environment's `bin/` leads the
/// child's `PATH`, so the commands it installs (`kubernetes-validate`, `hadolint`) are
/// found too.
pub fn python() -> Command {
    let bin = tools().join("venv/bin");
    let mut cmd = Command::new(bin.join("python"));
    let path = std::env::var_os("PATH").unwrap_or_default();
    let paths = std::iter::once(bin).chain(std::env::split_paths(&path));
    if let Ok(joined) = std::env::join_paths(paths) {
        cmd.env("PATH", joined);
    }
    cmd
}

/// `Ok(())` when the tools' Python imports every module of `modules`, else what is
/// missing and how to install it (for [`tool_present`]).
pub fn python_modules(modules: &[&str]) -> Result<(), String> {
    let imports = format!("import {}", modules.join(", "));
    match python().args(["-c", &imports]).output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "the Python modules {modules:?} are missing from {} ({}): run scripts/test, which installs them",
            tools().join("venv").display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!(
            "no Python at {} ({e}): run scripts/test, which makes it",
            tools().join("venv/bin/python").display()
        )),
    }
}

/// A progress callback that never cancels.
pub fn no_progress(_: hypergen::pipeline::Progress) -> std::ops::ControlFlow<()> {
    std::ops::ControlFlow::Continue(())
}

/// The fixture VAE in f32, checking that every tensor in its file was used and every
/// parameter was filled.
pub fn fixture_vae<B: FusedOps>(device: &B::Device) -> hypergen::model::vae::AutoencoderKL<B> {
    use hypergen::load::folder::{inspect_safetensors, weight_files};
    let dir = fixture_dir().join("vae");
    let (vae, report) =
        hypergen::load::folder::load_vae::<B>(&dir, None, burn::tensor::DType::F32, device)
            .unwrap_or_else(|e| panic!("loading the fixture VAE: {e}"));
    assert!(report.missing.is_empty(), "missing: {:?}", report.missing);
    assert!(report.unused.is_empty(), "unused: {:?}", report.unused);
    let files = weight_files(&dir, "diffusion_pytorch_model", None).expect("weight files");
    let in_files: usize = files
        .iter()
        .map(|f| inspect_safetensors(f).expect("weights parse").len())
        .sum();
    assert_eq!(
        report.applied, in_files,
        "tensors applied vs tensors in the file"
    );
    vae
}

/// The server config every server test starts from: the fixture on the CPU in float32.
pub fn fixture_server_config() -> hypergen::app::server::ServerConfig {
    let mut config =
        hypergen::app::server::ServerConfig::new(fixture_dir(), hypergen::device::DeviceSpec::Cpu);
    config.worker.dtype = hypergen::device::DTypeChoice::Exact(burn::tensor::DType::F32);
    config
}

/// Starts a server with `config` on a free loopback port.
pub async fn start_server(
    config: hypergen::app::server::ServerConfig,
) -> hypergen::app::server::Server {
    hypergen::app::server::Server::start(config, "127.0.0.1:0")
        .await
        .expect("server starts")
}

/// Bytes from base64 (an image in an Images API answer or an event).
pub fn b64_bytes(b64: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64")
}

/// The bytes of the first image of an Images API answer (`data[0].b64_json`).
pub fn first_image(body: &serde_json::Value) -> Vec<u8> {
    let b64 = body["data"][0]["b64_json"]
        .as_str()
        .unwrap_or_else(|| panic!("no data[0].b64_json in {body}"));
    b64_bytes(b64)
}

/// The PNG file and its pixels from a successful generation's answer.
pub async fn image_of(resp: reqwest::Response) -> (Vec<u8>, Vec<u8>) {
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(status, 200, "{body}");
    let png = first_image(&body);
    let rgb = image::load_from_memory(&png)
        .expect("PNG decodes")
        .to_rgb8()
        .into_raw();
    (png, rgb)
}

/// Asserts every channel of every pixel is within 1/255 of the reference image `want`.
pub fn assert_image_close(what: &str, rgb: &[u8], want: &RefTensor) {
    assert_eq!(rgb.len(), want.data.len(), "{what}: size");
    let worst = rgb
        .iter()
        .zip(&want.data)
        .map(|(a, b)| (*a as f32 - b).abs())
        .fold(0f32, f32::max);
    eprintln!("{what}: max channel difference {worst}/255");
    assert!(worst <= 1.0, "{what}: a channel differs by {worst}/255");
}

/// The number in `torch.Generator('cpu').manual_seed(N)`.
pub fn seed_of(generator: &str) -> u64 {
    let start = generator
        .find("manual_seed(")
        .expect("a manual_seed generator")
        + 12;
    let rest = &generator[start..];
    rest[..rest.find(')').expect("closing parenthesis")]
        .trim()
        .parse()
        .expect("integer seed")
}
