//! One entry point for every kind of model name the command line and the server accept:
//! a local diffusers folder, a built-in random-weight model, or a Hub repository id.

use crate::FusedOps;
use std::path::{Path, PathBuf};

use crate::builtin::{self, Builtin};
use crate::error::{Error, Result};
use crate::hub::{self, HubOptions};
use crate::pipeline::{LoadOptions, SdxlPipeline};

/// What a model name refers to.
#[derive(Clone, Copy)]
pub enum ModelSource<'a> {
    /// A diffusers-layout folder on disk.
    Local(&'a Path),
    /// A built-in model (see [`builtin::names`]).
    Builtin(&'static Builtin),
    /// A Hugging Face Hub repository id.
    Hub(&'a str),
}

impl<'a> ModelSource<'a> {
    /// Classifies `model`: an existing folder wins, then a built-in name, then anything
    /// shaped like a repository id.
    pub fn parse(model: &'a str) -> Result<Self> {
        let path = Path::new(model);
        if path.is_dir() {
            return Ok(ModelSource::Local(path));
        }
        if let Some(b) = builtin::find(model) {
            return Ok(ModelSource::Builtin(b));
        }
        if hub::is_repo_id(model) {
            return Ok(ModelSource::Hub(model));
        }
        let looks_like_path = model.starts_with(['/', '.', '~'])
            || model.contains('\\')
            || model.matches('/').count() > 1;
        if looks_like_path {
            return Err(Error::invalid(
                "model",
                format!("`{model}`: no such directory (a model is a diffusers-layout folder, a built-in name or a Hub repository id)"),
            ));
        }
        Err(Error::invalid(
            "model",
            format!(
                "`{model}` is not a folder, a built-in model ({}) or a Hub repository id (owner/name)",
                builtin::names().join(", ")
            ),
        ))
    }
}

/// How to find and load a model.
#[derive(Debug, Clone, Default)]
pub struct ModelOptions {
    /// Dtype, weight variant and VAE override for the pipeline. A `vae` that is not a
    /// folder is resolved as a Hub repository id.
    pub load: LoadOptions,
    /// Hub revision (branch, tag or commit); `None` is `main`.
    pub revision: Option<String>,
    /// Hub endpoint, cache and token.
    pub hub: HubOptions,
}

/// What was loaded, for logs and the server's `/v1/models`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// The model's name: the built-in name, the repository id, or the folder's name.
    pub id: String,
    /// True for built-in models: their weights are random and their images noise.
    pub random_weights: bool,
    /// The folder the weights were read from (the Hub snapshot for repository ids);
    /// `None` for built-in models.
    pub local_dir: Option<PathBuf>,
}

/// Resolves `model` (folder, built-in name or Hub id) and loads it onto `device`.
pub fn load_pipeline<B: FusedOps>(
    model: &str,
    options: &ModelOptions,
    device: &B::Device,
) -> Result<(SdxlPipeline<B>, ModelInfo)> {
    let mut load = options.load.clone();
    let variant = load.effective_variant().map(str::to_string);
    if let Some(vae) = &load.vae {
        let vae = vae.to_string_lossy().into_owned();
        load.vae = Some(hub::resolve_vae_with(
            &vae,
            None,
            variant.as_deref(),
            &options.hub,
        )?);
    }
    match ModelSource::parse(model)? {
        ModelSource::Builtin(b) => {
            let pipeline = b.build::<B>(&load, device)?;
            Ok((
                pipeline,
                ModelInfo {
                    id: b.name.to_string(),
                    random_weights: true,
                    local_dir: None,
                },
            ))
        }
        ModelSource::Local(dir) => {
            let pipeline = SdxlPipeline::<B>::load(dir, &load, device)?;
            let id = dir
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| model.to_string());
            Ok((
                pipeline,
                ModelInfo {
                    id,
                    random_weights: false,
                    local_dir: Some(dir.to_path_buf()),
                },
            ))
        }
        ModelSource::Hub(id) => {
            let dir = hub::resolve_model_with(
                id,
                options.revision.as_deref(),
                variant.as_deref(),
                &options.hub,
            )?;
            let pipeline = SdxlPipeline::<B>::load(&dir, &load, device)?;
            Ok((
                pipeline,
                ModelInfo {
                    id: id.to_string(),
                    random_weights: false,
                    local_dir: Some(dir),
                },
            ))
        }
    }
}
