//! Loading: every source a model name can refer to — a diffusers-layout folder
//! ([`folder`]), a Hugging Face Hub repository ([`hub`]), a built-in random-weight model
//! ([`builtin`], drawn by [`random_init`]) — produces one [`SdxlComponents`] value, which
//! [`SdxlPipeline::new`] runs. [`source`] tells the kinds of name apart.

pub mod builtin;
pub mod controlnet;
pub mod controlnet_dir;
pub mod embeddings;
pub mod folder;
pub mod hub;
pub mod ip_adapter;
pub mod lora;
pub mod lora_dir;
pub mod params;
#[cfg(test)]
pub(crate) mod properties;
pub mod random_init;
pub mod sgm;
pub mod single_file;
pub mod source;

use std::path::PathBuf;

use burn::tensor::DType;

use crate::error::Result;
use crate::model::vae::VaeConfig;
use crate::pipeline::{RunOptions, SdxlComponents, SdxlPipeline};
use crate::FusedOps;
use hub::HubOptions;
use source::ModelSource;

/// Where a model's files are and which to read. The dtype the weights are loaded in is
/// an argument of its own ([`load_components`]): it depends on the device.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Weight-file variant (`fp16`). `None` picks `fp16` for half-precision dtypes, as
    /// that is what those files are for, and the full-precision files otherwise.
    pub variant: Option<String>,
    /// A VAE to use instead of the model's: a folder (`config.json` and weights) or a Hub
    /// repository id, e.g. the fp16-safe `madebyollin/sdxl-vae-fp16-fix`, whose config
    /// clears `force_upcast` so that it decodes in float16 without overflowing.
    pub vae: Option<String>,
    /// Hub revision (branch, tag or commit); `None` is `main`.
    pub revision: Option<String>,
    /// Hub endpoint, cache and token (by default the environment's).
    pub hub: HubOptions,
    /// For single-file checkpoints: a diffusers-layout folder whose JSON configs and
    /// tokenizer files give the architecture (default: SDXL base 1.0's, when the
    /// checkpoint's shapes fit it).
    pub config: Option<PathBuf>,
}

impl LoadOptions {
    /// The weight-file variant to read for `dtype`: the one asked for, else `fp16` for
    /// half dtypes.
    pub fn effective_variant(&self, dtype: DType) -> Option<&str> {
        match (&self.variant, dtype) {
            (Some(v), _) => Some(v.as_str()),
            (None, DType::F16 | DType::BF16) => Some("fp16"),
            _ => None,
        }
    }
}

/// The dtype the VAE runs in: the SDXL VAE overflows in float16, so diffusers decodes it
/// in float32 unless its config declares it safe (`force_upcast: false`, as fp16-fixed
/// VAEs do).
pub fn vae_dtype(dtype: DType, config: &VaeConfig) -> DType {
    if dtype != DType::F32 && config.force_upcast {
        DType::F32
    } else {
        dtype
    }
}

/// Resolves `model` (folder, built-in name or Hub id; see [`ModelSource::parse`]) and
/// loads its components onto `device`, the text encoders and the UNet in `dtype` (the
/// VAE too, unless it must be upcast: [`vae_dtype`]).
pub fn load_components<B: FusedOps>(
    model: &str,
    dtype: DType,
    options: &LoadOptions,
    device: &B::Device,
) -> Result<SdxlComponents<B>> {
    let mut c = load_source(model, dtype, options, device)?;
    // The text encoders' GEMMs run on 77 rows a prompt, where packing the weight per
    // call costs a quarter of the time: lay it out once where the backend gains.
    c.text_encoder = c.text_encoder.into_panels();
    c.text_encoder_2 = c.text_encoder_2.into_panels();
    Ok(c)
}

/// [`load_components`]' components as the source gives them.
fn load_source<B: FusedOps>(
    model: &str,
    dtype: DType,
    options: &LoadOptions,
    device: &B::Device,
) -> Result<SdxlComponents<B>> {
    let variant = options.effective_variant(dtype);
    let vae: Option<PathBuf> = options
        .vae
        .as_deref()
        .map(|vae| hub::resolve_vae_with(vae, None, variant, &options.hub))
        .transpose()?;
    match ModelSource::parse(model)? {
        ModelSource::Builtin(b) => b.components::<B>(dtype, options, vae.as_deref(), device),
        ModelSource::Local(dir) => {
            let id = dir
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| model.to_string());
            folder::load_folder(dir, id, dtype, options, vae.as_deref(), device)
        }
        ModelSource::SingleFile(file) => {
            let mut c = single_file::load_single_file(file, dtype, options, device)?;
            replace_vae(&mut c, vae.as_deref(), variant, device)?;
            Ok(c)
        }
        ModelSource::HubFile { repo, file } => {
            let path =
                hub::resolve_file_with(repo, file, options.revision.as_deref(), &options.hub)?;
            let mut c = single_file::load_single_file(&path, dtype, options, device)?;
            c.info.id = model.to_string();
            replace_vae(&mut c, vae.as_deref(), variant, device)?;
            Ok(c)
        }
        ModelSource::Hub(id) => {
            let dir =
                hub::resolve_model_with(id, options.revision.as_deref(), variant, &options.hub)?;
            folder::load_folder(&dir, id.to_string(), dtype, options, vae.as_deref(), device)
        }
    }
}

/// Replaces a single-file checkpoint's VAE with the `--vae` folder, when one is given.
fn replace_vae<B: FusedOps>(
    c: &mut SdxlComponents<B>,
    vae: Option<&std::path::Path>,
    variant: Option<&str>,
    device: &B::Device,
) -> Result<()> {
    let Some(dir) = vae else {
        return Ok(());
    };
    let vae_dtype = vae_dtype(c.dtype, &folder::read_vae_config(dir)?);
    let (model, _) = folder::load_vae(dir, variant, vae_dtype, device)?;
    tracing::info!(vae = %dir.display(), "replaced the checkpoint's VAE");
    c.vae = model;
    Ok(())
}

/// [`load_components`], then a pipeline over them with `run` options.
pub fn load_pipeline<B: FusedOps>(
    model: &str,
    dtype: DType,
    options: &LoadOptions,
    run: &RunOptions,
    device: &B::Device,
) -> Result<SdxlPipeline<B>> {
    SdxlPipeline::new(load_components(model, dtype, options, device)?, run, device)
}
