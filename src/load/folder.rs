//! Reading diffusers-layout model folders: `model_index.json`, each component's
//! `config.json`, and its safetensors weights (single file, sharded index, or a named
//! variant such as `fp16`), into the models [`crate::model`] builds from configs.
//!
//! Weights go through `burn-store`: each file is memory-mapped and every tensor is
//! copied to the device on its own, so loading never holds two full copies of a
//! component in host memory.

use crate::FusedOps;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use burn::module::Module;
use burn::tensor::DType;
use burn_store::{
    ApplyError, ChainAdapter, ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter,
    SafetensorsStore, TensorSnapshot,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::load::{vae_dtype, LoadOptions};
use crate::model::clip::{
    ClipEmbeddings, ClipEncoder, ClipTextConfig, ClipTextModel, ClipTransformer,
};
use crate::model::layers::LayerNorm;
use crate::model::linear::Linear;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::{UNet2DConditionModel, UNetConfig};
use crate::model::vae::{AutoencoderKL, VaeConfig};
use crate::pipeline::{ModelIndex, ModelInfo, SdxlComponents};
use crate::scheduler::{Scheduler, SchedulerConfig};

/// Reads a JSON file into `T`. A missing required key is reported with the file's path
/// and the key's name (serde's message names it).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile {
                path: path.to_path_buf(),
                what: "JSON config".into(),
            }
        } else {
            Error::io(path, e)
        }
    })?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Picks the weight files of one component folder.
///
/// `stem` is the file name without extension that the library writing the folder uses
/// (`diffusion_pytorch_model` for diffusers, `model` for transformers). With a variant
/// (`fp16`), `STEM.VARIANT.safetensors` or its sharded index is preferred and the plain
/// files are the fallback, as diffusers does for repositories without that variant.
pub fn weight_files(dir: &Path, stem: &str, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    let mut candidates = Vec::new();
    if let Some(v) = variant {
        candidates.push(dir.join(format!("{stem}.{v}.safetensors")));
        candidates.push(dir.join(format!("{stem}.safetensors.index.{v}.json")));
    }
    candidates.push(dir.join(format!("{stem}.safetensors")));
    candidates.push(dir.join(format!("{stem}.safetensors.index.json")));
    for c in &candidates {
        if !c.is_file() {
            continue;
        }
        let name = c.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.ends_with(".json") {
            return shard_files(c);
        }
        return Ok(vec![c.clone()]);
    }
    Err(Error::MissingFile {
        path: dir.join(format!("{stem}.safetensors")),
        what: format!(
            "weights (looked for {})",
            candidates
                .iter()
                .filter_map(|c| c.file_name().and_then(|n| n.to_str()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// The distinct shard files a `*.safetensors.index.json` points at, in name order.
fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let idx: ShardIndex = read_json(index)?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let names: BTreeSet<&String> = idx.weight_map.values().collect();
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        let p = dir.join(n);
        if !p.is_file() {
            return Err(Error::MissingFile {
                path: p,
                what: format!("weight shard listed in {}", index.display()),
            });
        }
        out.push(p);
    }
    Ok(out)
}

/// Checks that a safetensors file is complete and well formed and lists its tensors,
/// so that a truncated download fails with the file's name instead of deep in Burn.
pub fn inspect_safetensors(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and lives only for this function; a concurrent
    // writer truncating the file could fault, which is the same contract every
    // mmap-based safetensors reader has.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut out: Vec<(String, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect();
    out.sort();
    Ok(out)
}

/// What loading one component found.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Tensors copied into the model.
    pub applied: usize,
    /// Model tensors that no file provided (always empty after a successful load).
    pub missing: Vec<String>,
    /// File tensors the model did not use and that are not known leftovers.
    pub unused: Vec<String>,
}

/// Casts every floating-point tensor to the dtype the model runs in, lazily, as the
/// tensor is read from the memory map.
#[derive(Clone)]
struct CastAdapter(DType);

impl ModuleAdapter for CastAdapter {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        let target = self.0;
        let float = matches!(
            snapshot.dtype,
            DType::F16 | DType::BF16 | DType::F32 | DType::F64
        );
        if !float || snapshot.dtype == target {
            return snapshot.clone();
        }
        let data_fn = snapshot.clone_data_fn();
        TensorSnapshot::from_closure(
            Rc::new(move || Ok(data_fn()?.convert_dtype(target))),
            target,
            snapshot.shape.clone(),
            snapshot.path_stack.clone().unwrap_or_default(),
            snapshot.container_stack.clone().unwrap_or_default(),
            snapshot.tensor_id.unwrap_or_default(),
        )
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

fn burn_norm_name(name: &str) -> String {
    if let Some(p) = name.strip_suffix(".weight") {
        format!("{p}.gamma")
    } else if let Some(p) = name.strip_suffix(".bias") {
        format!("{p}.beta")
    } else {
        name.to_string()
    }
}

/// Loads `files` into `module`, casting floats to `dtype`.
///
/// `ignore` lists tensor-name suffixes that files may carry without the model using
/// them (buffers such as CLIP's `position_ids`). Fails, naming the file and tensor,
/// on a corrupt file, a tensor of the wrong shape, a tensor the model needs that no
/// file has, or a tensor in the files that the model does not have.
pub fn load_module<B: FusedOps, M: Module<B>>(
    mut module: M,
    files: &[PathBuf],
    dtype: DType,
    component: &str,
    ignore: &[&str],
) -> Result<(M, LoadReport)> {
    let mut applied: BTreeSet<String> = BTreeSet::new();
    let mut missing: BTreeSet<String> = BTreeSet::new();
    let mut unused: Vec<String> = Vec::new();
    for file in files {
        inspect_safetensors(file)?;
        let mut store = SafetensorsStore::from_file(file)
            .with_from_adapter(ChainAdapter::new(PyTorchToBurnAdapter, CastAdapter(dtype)))
            .allow_partial(true)
            // Enum modules (such as the feed-forward list) keep diffusers' indices.
            .skip_enum_variants(true)
            .validate(false);
        let result = module
            .load_from(&mut store)
            .map_err(|e| Error::Safetensors {
                path: file.clone(),
                message: e.to_string(),
            })?;
        if let Some(err) = result.errors.first() {
            let (tensor, message) = match err {
                ApplyError::ShapeMismatch {
                    path,
                    expected,
                    found,
                } => (
                    path.clone(),
                    format!(
                        "shape {:?} in the file, the config asks for {:?}",
                        found.as_slice(),
                        expected.as_slice()
                    ),
                ),
                ApplyError::DTypeMismatch {
                    path,
                    expected,
                    found,
                } => (
                    path.clone(),
                    format!("dtype {found:?} in the file, expected {expected:?}"),
                ),
                ApplyError::AdapterError { path, message }
                | ApplyError::LoadError { path, message } => (path.clone(), message.clone()),
            };
            return Err(Error::Tensor {
                path: file.clone(),
                tensor,
                message,
            });
        }
        applied.extend(result.applied.iter().cloned());
        missing.extend(result.missing.into_iter().map(|(p, _)| p));
        unused.extend(
            result
                .unused
                .into_iter()
                .filter(|u| !ignore.iter().any(|s| u.ends_with(s))),
        );
    }
    let missing: Vec<String> = missing.difference(&applied).cloned().collect();
    // A tensor unused by one shard may have been applied from another shard only if
    // two shards hold the same name; keep the ones nobody applied.
    // Norm layers are matched through their PyTorch names (`weight`/`bias` for Burn's
    // `gamma`/`beta`); burn-store lists the file-side names as unused, so match them back.
    let unused: Vec<String> = unused
        .into_iter()
        .filter(|u| !applied.contains(u) && !applied.contains(&burn_norm_name(u)))
        .collect();
    let files_str = files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if !missing.is_empty() {
        return Err(Error::MissingTensors {
            component: component.into(),
            files: files_str,
            tensors: missing,
        });
    }
    if !unused.is_empty() {
        return Err(Error::UnusedTensors {
            component: component.into(),
            files: files_str,
            tensors: unused,
        });
    }
    let report = LoadReport {
        applied: applied.len(),
        missing,
        unused,
    };
    tracing::debug!(component, tensors = report.applied, "loaded weights");
    Ok((module, report))
}

/// Reads a model config (`config.json`) and builds the model from it with `init`,
/// naming the file in any error.
pub(crate) fn init_from<C: DeserializeOwned, M>(
    path: &Path,
    init: impl FnOnce(&C) -> Result<M>,
) -> Result<(C, M)> {
    let config: C = read_json(path)?;
    let model = init(&config).map_err(|e| e.in_file(path))?;
    Ok((config, model))
}

/// Loads `unet/` (config and weights, the `variant` files when present) with
/// parameters in `dtype`.
pub fn load_unet<B: FusedOps>(
    dir: &Path,
    variant: Option<&str>,
    dtype: DType,
    device: &B::Device,
) -> Result<(UNet2DConditionModel<B>, LoadReport)> {
    let (_, model) = init_from(&dir.join("config.json"), |c: &UNetConfig| c.init(device))?;
    let files = weight_files(dir, "diffusion_pytorch_model", variant)?;
    load_module(model, &files, dtype, "unet", &[])
}

/// Reads and checks a VAE's `config.json`.
pub fn read_vae_config(dir: &Path) -> Result<VaeConfig> {
    let path = dir.join("config.json");
    let config: VaeConfig = read_json(&path)?;
    config.validate().map_err(|e| e.in_file(&path))?;
    Ok(config)
}

/// Loads a VAE folder (`vae/`, or a replacement such as an fp16-safe VAE): its config
/// and weights (the `variant` file such as `fp16` when present, else the plain one),
/// with parameters in `dtype`.
pub fn load_vae<B: FusedOps>(
    dir: &Path,
    variant: Option<&str>,
    dtype: DType,
    device: &B::Device,
) -> Result<(AutoencoderKL<B>, LoadReport)> {
    let config = read_vae_config(dir)?;
    let model = config
        .init(device)
        .map_err(|e| e.in_file(dir.join("config.json")))?;
    let files = weight_files(dir, "diffusion_pytorch_model", variant)?;
    load_module(model, &files, dtype, "vae", &[])
}

/// The weight names of a `CLIPTextModel` saved by transformers 5, which drops the
/// `text_model.` prefix; loaded through this mirror and then put back into a
/// [`ClipTextModel`].
#[derive(Module, Debug)]
struct UnprefixedClip<B: FusedOps> {
    embeddings: ClipEmbeddings<B>,
    encoder: ClipEncoder<B>,
    final_layer_norm: LayerNorm<B>,
    text_projection: Option<Linear<B>>,
}

/// Loads a text encoder folder (`text_encoder/` or `text_encoder_2/`): its
/// `config.json` and `model[.variant].safetensors`, with parameters in `dtype`.
///
/// Weight names may carry the `text_model.` prefix (every released SDXL checkpoint)
/// or not (`CLIPTextModel` saved by transformers 5). The projection is built when the
/// config's architecture is a `…WithProjection` class or the weights hold
/// `text_projection.weight`. The `position_ids` buffer some files carry is ignored;
/// any other missing or unused tensor is an error.
pub fn load_text_encoder<B: FusedOps>(
    dir: &Path,
    variant: Option<&str>,
    dtype: DType,
    device: &B::Device,
) -> Result<(ClipTextModel<B>, LoadReport)> {
    let config_path = dir.join("config.json");
    let mut config: ClipTextConfig = read_json(&config_path)?;
    let files = weight_files(dir, "model", variant)?;
    let mut names = Vec::new();
    for file in &files {
        names.extend(inspect_safetensors(file)?.into_iter().map(|(name, _)| name));
    }
    if !config.with_projection() && names.iter().any(|n| n == "text_projection.weight") {
        config
            .architectures
            .push("CLIPTextModelWithProjection".into());
    }
    let prefixed = names.iter().any(|n| n.starts_with("text_model."));
    let model = config
        .init::<B>(device)
        .map_err(|e| e.in_file(&config_path))?;
    let component = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("text_encoder");
    let ignore = ["position_ids"];
    if prefixed {
        return load_module(model, &files, dtype, component, &ignore);
    }
    let ClipTextModel {
        text_model,
        text_projection,
        config,
    } = model;
    let flat = UnprefixedClip {
        embeddings: text_model.embeddings,
        encoder: text_model.encoder,
        final_layer_norm: text_model.final_layer_norm,
        text_projection,
    };
    let (flat, report) = load_module(flat, &files, dtype, component, &ignore)?;
    let model = ClipTextModel {
        text_model: ClipTransformer {
            embeddings: flat.embeddings,
            encoder: flat.encoder,
            final_layer_norm: flat.final_layer_norm,
        },
        text_projection: flat.text_projection,
        config,
    };
    Ok((model, report))
}

/// Loads every component of a diffusers-layout SDXL folder onto `device`: the model's
/// own `vae/`, or the folder `vae` when given; the text encoders and the UNet in `dtype`.
/// `id` names the model in logs and `/v1/models`.
pub fn load_folder<B: FusedOps>(
    dir: &Path,
    id: String,
    dtype: DType,
    options: &LoadOptions,
    vae: Option<&Path>,
    device: &B::Device,
) -> Result<SdxlComponents<B>> {
    let index: ModelIndex = read_json(&dir.join("model_index.json"))?;
    let variant = options.effective_variant(dtype);
    let tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer"))?;
    let tokenizer_2 = ClipTokenizer::from_dir(&dir.join("tokenizer_2"))?;
    let (text_encoder, _) = load_text_encoder(&dir.join("text_encoder"), variant, dtype, device)?;
    let (text_encoder_2, _) =
        load_text_encoder(&dir.join("text_encoder_2"), variant, dtype, device)?;
    let (unet, _) = load_unet(&dir.join("unet"), variant, dtype, device)?;
    let vae_dir = vae.map_or_else(|| dir.join("vae"), Path::to_path_buf);
    let vae_dtype = vae_dtype(dtype, &read_vae_config(&vae_dir)?);
    let (vae, _) = load_vae(&vae_dir, variant, vae_dtype, device)?;
    let scheduler_config =
        SchedulerConfig::read(&dir.join("scheduler").join("scheduler_config.json"))?;
    // Fail at load, not at the first request, if the scheduler is unsupported.
    Scheduler::from_config(&scheduler_config, None)?;
    tracing::info!(
        model = %dir.display(),
        vae = %vae_dir.display(),
        dtype = ?dtype,
        vae_dtype = ?vae_dtype,
        variant = variant.unwrap_or("default"),
        "loaded SDXL pipeline"
    );
    Ok(SdxlComponents {
        tokenizer,
        tokenizer_2,
        text_encoder,
        text_encoder_2,
        unet,
        vae,
        scheduler_config,
        index,
        dtype,
        info: ModelInfo {
            id,
            random_weights: false,
            local_dir: Some(dir.to_path_buf()),
        },
        loras: Default::default(),
        embeddings: Vec::new(),
        controlnets: Default::default(),
    })
}
