//! ControlNets chosen per request: a directory the operator offers
//! (`hypergen serve --controlnet-dir`), whose names are resolved without ever leaving it,
//! as [`super::lora_dir::LoraDir`] does for LoRA adapters. A ControlNet is a diffusers
//! folder (`config.json` + `diffusion_pytorch_model.safetensors`) or a `.safetensors`
//! file.

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// How deep [`ControlNetDir::list`] looks into subfolders.
const LIST_DEPTH: usize = 4;

/// The weight file of a diffusers ControlNet folder.
const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// A directory of ControlNets; names given to it are paths relative to it.
#[derive(Debug, Clone)]
pub struct ControlNetDir {
    /// The directory, canonical (symlinks resolved), so containment is a prefix check.
    root: PathBuf,
}

/// One ControlNet a [`ControlNetDir`] offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlNetEntry {
    /// The name a request uses: the path relative to the directory, with `/`.
    pub name: String,
    /// Size of its weight file in bytes.
    pub bytes: u64,
}

impl ControlNetDir {
    /// Opens `path`, which must be a directory.
    pub fn open(path: &Path) -> Result<Self> {
        let root = path.canonicalize().map_err(|e| Error::io(path, e))?;
        if !root.is_dir() {
            return Err(Error::invalid(
                "controlnet-dir",
                format!("{} is not a directory", path.display()),
            ));
        }
        Ok(Self { root })
    }

    /// The directory (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The ControlNet `name` (a folder, or a `.safetensors` file whose extension may be
    /// left off), canonical. Absolute names, `..`, and symlinks that lead outside the
    /// directory are refused before anything is opened.
    pub fn resolve(&self, name: &str) -> Result<PathBuf> {
        let refuse = |message: String| Error::invalid("controlnets.model", message);
        let unknown = || {
            refuse(format!(
                "no ControlNet `{name}` in the ControlNet directory (GET /v1/controlnets lists them)"
            ))
        };
        if name.trim().is_empty() || name.contains('\0') {
            return Err(refuse("an empty name or a NUL byte".into()));
        }
        let rel = Path::new(name);
        if !(rel.components()).all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
            return Err(refuse(format!(
                "`{name}`: absolute paths and `..` are not allowed; name a ControlNet inside \
                 the ControlNet directory"
            )));
        }
        let mut candidate = self.root.join(rel);
        if !candidate.exists() {
            candidate = self.root.join(format!("{name}.safetensors"));
        }
        let real = candidate.canonicalize().map_err(|_| unknown())?;
        if !real.starts_with(&self.root) {
            return Err(refuse(format!(
                "`{name}` leads outside the ControlNet directory (a symlink); it is not served"
            )));
        }
        let weights = if real.is_dir() {
            real.join(WEIGHTS)
        } else {
            real.clone()
        };
        let weights_real = weights.canonicalize().map_err(|_| {
            refuse(format!(
                "`{name}` is a folder without {WEIGHTS}; it is not a ControlNet"
            ))
        })?;
        if !weights_real.starts_with(&self.root) {
            return Err(refuse(format!(
                "`{name}`'s weights lead outside the ControlNet directory; not served"
            )));
        }
        Ok(real)
    }

    /// Every ControlNet in the directory and its subfolders (a few levels deep): each
    /// folder holding `diffusion_pytorch_model.safetensors` and each other
    /// `.safetensors` file, sorted by name. Entries leading outside are left out.
    pub fn list(&self) -> Result<Vec<ControlNetEntry>> {
        let mut out = Vec::new();
        self.walk(&self.root, 0, &mut out)?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn walk(&self, dir: &Path, depth: usize, out: &mut Vec<ControlNetEntry>) -> Result<()> {
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(real) = path.canonicalize() else {
                continue;
            };
            let Ok(rel) = path.strip_prefix(&self.root) else {
                continue;
            };
            if !real.starts_with(&self.root) {
                continue;
            }
            let name = (rel.components())
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            let weights = real.join(WEIGHTS);
            if real.is_dir() {
                match weights.canonicalize() {
                    Ok(w) if w.starts_with(&self.root) => {
                        let bytes = w.metadata().map(|m| m.len()).unwrap_or(0);
                        out.push(ControlNetEntry { name, bytes });
                    }
                    _ if depth < LIST_DEPTH => self.walk(&path, depth + 1, out)?,
                    _ => {}
                }
            } else if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
            {
                let bytes = real.metadata().map(|m| m.len()).unwrap_or(0);
                out.push(ControlNetEntry { name, bytes });
            }
        }
        Ok(())
    }
}
