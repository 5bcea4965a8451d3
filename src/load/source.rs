//! The kinds of model name the command line and the server accept: a local diffusers
//! folder, a built-in random-weight model, or a Hub repository id.

use std::path::Path;

use crate::error::{Error, Result};
use crate::load::builtin::{self, Builtin};
use crate::load::hub;

/// What a model name refers to.
#[derive(Clone, Copy)]
pub enum ModelSource<'a> {
    /// A diffusers-layout folder on disk.
    Local(&'a Path),
    /// A built-in model (see [`builtin::names`]).
    Builtin(&'static Builtin),
    /// A Hugging Face Hub repository id.
    Hub(&'a str),
    /// A single-file checkpoint (`.safetensors`) in the original SGM layout.
    SingleFile(&'a Path),
    /// A single-file checkpoint in a Hub repository: `owner/name/file.safetensors`.
    HubFile {
        /// The repository id.
        repo: &'a str,
        /// The file's path in the repository.
        file: &'a str,
    },
}

impl<'a> ModelSource<'a> {
    /// Classifies `model`: an existing folder wins, then a built-in name, then anything
    /// shaped like a repository id.
    pub fn parse(model: &'a str) -> Result<Self> {
        let path = Path::new(model);
        if path.is_dir() {
            return Ok(ModelSource::Local(path));
        }
        if crate::load::single_file::is_single_file(path) {
            return Ok(ModelSource::SingleFile(path));
        }
        if let Some(b) = builtin::find(model) {
            return Ok(ModelSource::Builtin(b));
        }
        if let Some((repo, file)) = hub_file(model) {
            return Ok(ModelSource::HubFile { repo, file });
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

/// `owner/name/path/file.safetensors` split into a repository id and a file path, when
/// `model` has that shape (and is not a local file, which [`ModelSource::parse`] checks
/// first).
fn hub_file(model: &str) -> Option<(&str, &str)> {
    if !model.to_ascii_lowercase().ends_with(".safetensors") || model.starts_with(['/', '.', '~']) {
        return None;
    }
    let mut parts = model.splitn(3, '/');
    let (owner, name, file) = (parts.next()?, parts.next()?, parts.next()?);
    let repo = &model[..owner.len() + 1 + name.len()];
    let file_ok = file
        .split('/')
        .all(|seg| !seg.is_empty() && seg != "." && seg != "..");
    (hub::is_repo_id(repo) && file_ok).then_some((repo, file))
}

/// The extension of a pickled PyTorch file (`bin`, `ckpt`, `pt`, `pth`, `pkl`, in lower
/// case), which loading could run code from: such files are refused unopened. `None` for
/// any other name.
pub fn pickled_extension(path: &Path) -> Option<String> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    matches!(ext.as_str(), "bin" | "ckpt" | "pt" | "pth" | "pkl").then_some(ext)
}
