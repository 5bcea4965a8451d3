//! Single-file SDXL checkpoints in the original (Stability `sgm`) layout:
//! `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE, attention projections as
//! 1×1 convolutions), `conditioner.embedders.0.transformer.text_model.*` (CLIP ViT-L) and
//! `conditioner.embedders.1.model.*` (OpenCLIP bigG: fused `attn.in_proj_weight`,
//! `text_projection` as a `[width, proj]` matrix), in float32, float16 or bfloat16.
//!
//! The architecture comes from a diffusers-layout config folder (`--config DIR`: its JSON
//! and tokenizer files), or, without one, from SDXL base 1.0 (`presets/sdxl-base-1.0`)
//! when every tensor's shape fits it. The file is memory-mapped and read tensor by tensor;
//! every shape is checked against the config before anything is allocated.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use burn::module::Module;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};

use crate::error::{Error, Result};
use crate::load::folder::read_json;
use crate::load::params::{list_params, write_params, LayerKind, ParamInfo};
use crate::load::sgm::{vae_sgm_name, UnetLayout};
use crate::load::{builtin, vae_dtype, LoadOptions};
use crate::model::clip::{ClipTextConfig, ClipTextModel};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::{UNet2DConditionModel, UNetConfig};
use crate::model::vae::{AutoencoderKL, VaeConfig};
use crate::pipeline::{ModelIndex, ModelInfo, SdxlComponents};
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::FusedOps;

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const CLIP_L: &str = "conditioner.embedders.0.transformer.";
const CLIP_G: &str = "conditioner.embedders.1.model.";

/// File tensors the models do not need (buffers, training leftovers).
const IGNORED: &[&str] = &["position_ids", "logit_scale", "attn_mask"];

/// Whether `path` names a single-file checkpoint (a `.safetensors` file).
pub fn is_single_file(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

/// Where one model parameter comes from in the file.
#[derive(Debug, Clone)]
struct Source {
    key: String,
    /// Rows `[start, start + len)` of the file tensor (a third of a fused projection).
    rows: Option<(usize, usize)>,
    /// The file stores the matrix as Burn does (`text_projection`): no transpose.
    burn_layout: bool,
}

/// A tensor in the mapped file.
struct FileTensor<'a> {
    shape: Vec<usize>,
    dtype: safetensors::Dtype,
    data: &'a [u8],
}

fn torch_name(path: &str) -> String {
    if let Some(p) = path.strip_suffix(".gamma") {
        format!("{p}.weight")
    } else if let Some(p) = path.strip_suffix(".beta") {
        format!("{p}.bias")
    } else {
        path.to_string()
    }
}

/// OpenCLIP bigG names for `text_model.…` paths of `text_encoder_2`.
fn openclip_source(path: &str, width: usize) -> Option<Source> {
    let plain = |key: String| {
        Some(Source {
            key: format!("{CLIP_G}{key}"),
            rows: None,
            burn_layout: false,
        })
    };
    match path {
        "text_model.embeddings.token_embedding.weight" => {
            return plain("token_embedding.weight".into())
        }
        "text_model.embeddings.position_embedding.weight" => {
            return plain("positional_embedding".into())
        }
        "text_projection.weight" => {
            return Some(Source {
                key: format!("{CLIP_G}text_projection"),
                rows: None,
                burn_layout: true,
            })
        }
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("text_model.final_layer_norm.") {
        return plain(format!("ln_final.{rest}"));
    }
    let rest = path.strip_prefix("text_model.encoder.layers.")?;
    let (i, inner) = rest.split_once('.')?;
    let block = format!("transformer.resblocks.{i}");
    let (module, leaf) = inner.rsplit_once('.')?;
    let fused = |n: usize| {
        Some(Source {
            key: format!("{CLIP_G}{block}.attn.in_proj_{leaf}"),
            rows: Some((n * width, width)),
            burn_layout: false,
        })
    };
    match module {
        "layer_norm1" => plain(format!("{block}.ln_1.{leaf}")),
        "layer_norm2" => plain(format!("{block}.ln_2.{leaf}")),
        "self_attn.q_proj" => fused(0),
        "self_attn.k_proj" => fused(1),
        "self_attn.v_proj" => fused(2),
        "self_attn.out_proj" => plain(format!("{block}.attn.out_proj.{leaf}")),
        "mlp.fc1" => plain(format!("{block}.mlp.c_fc.{leaf}")),
        "mlp.fc2" => plain(format!("{block}.mlp.c_proj.{leaf}")),
        _ => None,
    }
}

/// Every parameter of one component and where it comes from.
struct Plan {
    component: &'static str,
    params: BTreeMap<String, ParamInfo>,
    sources: BTreeMap<String, Source>,
}

fn plan<B: FusedOps, M: Module<B>>(
    component: &'static str,
    module: &M,
    source: impl Fn(&str) -> Option<Source>,
) -> Result<Plan> {
    let params = list_params(module);
    let mut sources = BTreeMap::new();
    let mut unmapped = Vec::new();
    for path in params.keys() {
        match source(path) {
            Some(s) => {
                sources.insert(path.clone(), s);
            }
            None => unmapped.push(path.clone()),
        }
    }
    if !unmapped.is_empty() {
        return Err(Error::MissingTensors {
            component: component.into(),
            files: "the single-file layout (no SGM name for these parameters)".into(),
            tensors: unmapped,
        });
    }
    Ok(Plan {
        component,
        params,
        sources,
    })
}

/// The PyTorch-layout shape a file tensor must have for `info` (Burn's layout).
fn expected_file_shape(info: &ParamInfo, src: &Source) -> Vec<usize> {
    if info.kind == LayerKind::Linear && info.shape.len() == 2 && !src.burn_layout {
        vec![info.shape[1], info.shape[0]]
    } else {
        info.shape.clone()
    }
}

/// Checks every planned tensor against the file's header: present, right shape.
fn check_plan(file: &Path, plan: &Plan, header: &HashMap<String, Vec<usize>>) -> Result<()> {
    let mut missing = Vec::new();
    for (path, src) in &plan.sources {
        let info = &plan.params[path];
        let Some(shape) = header.get(&src.key) else {
            missing.push(src.key.clone());
            continue;
        };
        let want = expected_file_shape(info, src);
        let got: Vec<usize> = match src.rows {
            Some((_, len)) => {
                let mut s = shape.clone();
                if let Some(first) = s.first_mut() {
                    if *first % 3 != 0 {
                        return Err(shape_error(file, &src.key, shape, &want));
                    }
                    *first = len;
                }
                s
            }
            None => shape.clone(),
        };
        // The VAE's attention projections are 1×1 convolutions in the file.
        let got: Vec<usize> = if got.len() == 4 && want.len() == 2 && got[2] == 1 && got[3] == 1 {
            got[..2].to_vec()
        } else {
            got
        };
        if got != want {
            return Err(shape_error(file, &src.key, shape, &want));
        }
    }
    if !missing.is_empty() {
        return Err(Error::MissingTensors {
            component: plan.component.into(),
            files: file.display().to_string(),
            tensors: missing,
        });
    }
    Ok(())
}

fn shape_error(file: &Path, key: &str, got: &[usize], want: &[usize]) -> Error {
    Error::Tensor {
        path: file.to_path_buf(),
        tensor: key.to_string(),
        message: format!("shape {got:?} in the file, the config asks for {want:?}"),
    }
}

fn to_f32(file: &Path, key: &str, t: &FileTensor<'_>) -> Result<Vec<f32>> {
    let b = t.data;
    Ok(match t.dtype {
        safetensors::Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        safetensors::Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(Error::Tensor {
                path: file.to_path_buf(),
                tensor: key.to_string(),
                message: format!("dtype {other:?}; a checkpoint's weights are floats"),
            })
        }
    })
}

/// Reads one component's tensors from the mapped file into `module`, in `dtype`.
fn fill<B: FusedOps, M: Module<B>>(
    file: &Path,
    module: M,
    plan: &Plan,
    tensors: &HashMap<String, FileTensor<'_>>,
    dtype: DType,
    device: &B::Device,
) -> Result<M> {
    let mut values: HashMap<String, TensorPrimitive<B>> = HashMap::new();
    for (path, src) in &plan.sources {
        let info = &plan.params[path];
        let t = &tensors[&src.key];
        let mut data = to_f32(file, &src.key, t)?;
        let mut shape = t.shape.clone();
        if let Some((start, len)) = src.rows {
            let row: usize = shape.iter().skip(1).product();
            data = data[start * row..(start + len) * row].to_vec();
            shape[0] = len;
        }
        if shape.len() == 4 && info.shape.len() == 2 {
            shape.truncate(2);
        }
        let value = match info.shape.len() {
            1 => Tensor::<B, 1>::from_data(TensorData::new(data, shape), device)
                .cast(dtype)
                .into_primitive(),
            2 => {
                // Linear weights are transposed here, on the host, so the model holds
                // them contiguous in Burn's `[in, out]` layout like a folder's: the CPU
                // GEMM then reads both the same way (and gives the same bits).
                let (data, shape) = if info.kind == LayerKind::Linear && !src.burn_layout {
                    (
                        transpose(&data, shape[0], shape[1]),
                        vec![shape[1], shape[0]],
                    )
                } else {
                    (data, shape)
                };
                Tensor::<B, 2>::from_data(TensorData::new(data, shape), device)
                    .cast(dtype)
                    .into_primitive()
            }
            3 => Tensor::<B, 3>::from_data(TensorData::new(data, shape), device)
                .cast(dtype)
                .into_primitive(),
            4 => Tensor::<B, 4>::from_data(TensorData::new(data, shape), device)
                .cast(dtype)
                .into_primitive(),
            n => {
                return Err(Error::Tensor {
                    path: file.to_path_buf(),
                    tensor: src.key.clone(),
                    message: format!("rank {n} is not supported"),
                })
            }
        };
        values.insert(path.clone(), value);
    }
    let (module, left) = write_params(module, values);
    if !left.is_empty() {
        return Err(Error::MissingTensors {
            component: plan.component.into(),
            files: file.display().to_string(),
            tensors: left,
        });
    }
    Ok(module)
}

/// The configs a checkpoint is read against: a diffusers-layout folder's, or SDXL base's.
struct Architecture<B: FusedOps> {
    tokenizer: ClipTokenizer,
    tokenizer_2: ClipTokenizer,
    text_encoder: ClipTextModel<B>,
    text_encoder_2: ClipTextModel<B>,
    unet: UNet2DConditionModel<B>,
    vae: AutoencoderKL<B>,
    scheduler_config: SchedulerConfig,
    index: ModelIndex,
    from: String,
}

fn architecture_from_dir<B: FusedOps>(dir: &Path, device: &B::Device) -> Result<Architecture<B>> {
    let init_err = |file: &str| {
        let path = dir.join(file);
        move |e: Error| e.in_file(path)
    };
    let te: ClipTextConfig = read_json(&dir.join("text_encoder/config.json"))?;
    let te2: ClipTextConfig = read_json(&dir.join("text_encoder_2/config.json"))?;
    let unet: UNetConfig = read_json(&dir.join("unet/config.json"))?;
    let vae: VaeConfig = read_json(&dir.join("vae/config.json"))?;
    Ok(Architecture {
        tokenizer: ClipTokenizer::from_dir(&dir.join("tokenizer"))?,
        tokenizer_2: ClipTokenizer::from_dir(&dir.join("tokenizer_2"))?,
        text_encoder: te
            .init(device)
            .map_err(init_err("text_encoder/config.json"))?,
        text_encoder_2: te2
            .init(device)
            .map_err(init_err("text_encoder_2/config.json"))?,
        unet: unet.init(device).map_err(init_err("unet/config.json"))?,
        vae: vae.init(device).map_err(init_err("vae/config.json"))?,
        scheduler_config: SchedulerConfig::read(&dir.join("scheduler/scheduler_config.json"))?,
        index: read_json(&dir.join("model_index.json"))?,
        from: dir.display().to_string(),
    })
}

fn architecture_sdxl_base<B: FusedOps>(device: &B::Device) -> Result<Architecture<B>> {
    let b = builtin::get("sdxl-base-1.0-random")?;
    let c = b.lazy_components::<B>(DType::F32, device)?;
    Ok(Architecture {
        tokenizer: c.tokenizer,
        tokenizer_2: c.tokenizer_2,
        text_encoder: c.text_encoder,
        text_encoder_2: c.text_encoder_2,
        unet: c.unet,
        vae: c.vae,
        scheduler_config: c.scheduler_config,
        index: c.index,
        from: "presets/sdxl-base-1.0".into(),
    })
}

/// Loads a single-file checkpoint onto `device`, with the architecture of
/// `options.config` (a diffusers-layout folder) or of SDXL base 1.0.
pub fn load_single_file<B: FusedOps>(
    file: &Path,
    dtype: DType,
    options: &LoadOptions,
    device: &B::Device,
) -> Result<SdxlComponents<B>> {
    let f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
    // SAFETY: read-only map for the duration of the load; see
    // `folder::inspect_safetensors` for the shared contract.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(file, e))?;
    let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| Error::Safetensors {
        path: file.to_path_buf(),
        message: e.to_string(),
    })?;
    let tensors: HashMap<String, FileTensor<'_>> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            (
                name,
                FileTensor {
                    shape: v.shape().to_vec(),
                    dtype: v.dtype(),
                    data: v.data(),
                },
            )
        })
        .collect();
    let header: HashMap<String, Vec<usize>> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.shape.clone()))
        .collect();
    let arch = match &options.config {
        Some(dir) => architecture_from_dir::<B>(dir, device)?,
        None => architecture_sdxl_base::<B>(device)?,
    };
    let layout = UnetLayout::of(&arch.unet);
    let width2 = arch.text_encoder_2.config.hidden_size;
    let plans = [
        plan("text_encoder", &arch.text_encoder, |p| {
            Some(Source {
                key: format!("{CLIP_L}{}", torch_name(p)),
                rows: None,
                burn_layout: false,
            })
        })?,
        plan("text_encoder_2", &arch.text_encoder_2, |p| {
            openclip_source(&torch_name(p), width2)
        })?,
        plan("unet", &arch.unet, |p| {
            layout.sgm_name(&torch_name(p)).map(|n| Source {
                key: format!("{UNET}{n}"),
                rows: None,
                burn_layout: false,
            })
        })?,
        plan("vae", &arch.vae, |p| {
            vae_sgm_name(&arch.vae, &torch_name(p)).map(|n| Source {
                key: format!("{VAE}{n}"),
                rows: None,
                burn_layout: false,
            })
        })?,
    ];
    for p in &plans {
        check_plan(file, p, &header).map_err(|e| {
            if options.config.is_none() {
                Error::Unsupported {
                    path: file.to_path_buf(),
                    message: format!(
                        "not SDXL base 1.0's architecture ({e}); pass --config DIR, a \
                         diffusers-layout folder with this model's config and tokenizer files"
                    ),
                }
            } else {
                e
            }
        })?;
    }
    let used: BTreeSet<&str> = plans
        .iter()
        .flat_map(|p| p.sources.values().map(|s| s.key.as_str()))
        .collect();
    let unused: Vec<String> = header
        .keys()
        .filter(|k| !used.contains(k.as_str()))
        .filter(|k| !IGNORED.iter().any(|i| k.ends_with(i)))
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let (ours, others): (Vec<String>, Vec<String>) = unused
        .into_iter()
        .partition(|k| [UNET, VAE, CLIP_L, CLIP_G].iter().any(|p| k.starts_with(p)));
    if !ours.is_empty() {
        return Err(Error::UnusedTensors {
            component: "single-file checkpoint".into(),
            files: file.display().to_string(),
            tensors: ours,
        });
    }
    if !others.is_empty() {
        tracing::warn!(count = others.len(), first = %others[0], "single-file checkpoint: tensors outside the SDXL components are ignored");
    }
    let vae_dtype = vae_dtype(dtype, arch.vae.config());
    let [p_te, p_te2, p_unet, p_vae] = &plans;
    let text_encoder = fill(file, arch.text_encoder, p_te, &tensors, dtype, device)?;
    let text_encoder_2 = fill(file, arch.text_encoder_2, p_te2, &tensors, dtype, device)?;
    let unet = fill(file, arch.unet, p_unet, &tensors, dtype, device)?;
    let vae = fill(file, arch.vae, p_vae, &tensors, vae_dtype, device)?;
    Scheduler::from_config(&arch.scheduler_config, None)?;
    tracing::info!(model = %file.display(), config = %arch.from, dtype = ?dtype, "loaded single-file SDXL checkpoint");
    let id = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| file.display().to_string());
    Ok(SdxlComponents {
        tokenizer: arch.tokenizer,
        tokenizer_2: arch.tokenizer_2,
        text_encoder,
        text_encoder_2,
        unet,
        vae,
        scheduler_config: arch.scheduler_config,
        index: arch.index,
        dtype,
        info: ModelInfo {
            id,
            random_weights: false,
            local_dir: file.parent().map(Path::to_path_buf),
        },
        loras: Default::default(),
        embeddings: Vec::new(),
        controlnets: Default::default(),
    })
}

/// `rows × cols` row-major `data` transposed (`cols × rows`).
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    // Blocks keep both sides' lines in cache for the strided half.
    const BLOCK: usize = 64;
    for r0 in (0..rows).step_by(BLOCK) {
        for c0 in (0..cols).step_by(BLOCK) {
            for r in r0..(r0 + BLOCK).min(rows) {
                for c in c0..(c0 + BLOCK).min(cols) {
                    out[c * rows + r] = data[r * cols + c];
                }
            }
        }
    }
    out
}
