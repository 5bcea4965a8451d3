//! Textual-inversion embeddings for SDXL from a directory (`--embeddings-dir`): every
//! `.safetensors` file in it (and its subfolders, a few levels deep) holding `clip_l`
//! `[n, D1]` and `clip_g` `[n, D2]`, the format people download; the file's stem is the
//! word that inserts it in a prompt ([`crate::pipeline::prompt`]).
//!
//! As with LoRAs, pickled files (`.pt`, `.bin`, …) are never opened, and entries that
//! lead outside the directory (symlinks) are not read. A file that does not fit the
//! model (widths, vector count) is skipped with its reason, as A1111 skips them, so
//! that one stray SD 1.5 embedding does not stop a server.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::pipeline::{SdxlComponents, TextualInversion};
use crate::FusedOps;

/// How deep the directory is searched.
const LIST_DEPTH: usize = 4;

/// What an embedding must fit: the two text encoders' widths, and how many vectors one
/// chunk can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddingShape {
    /// `text_encoder`'s hidden size (`clip_l`'s width).
    pub width_l: usize,
    /// `text_encoder_2`'s hidden size (`clip_g`'s width).
    pub width_g: usize,
    /// Most vectors: a chunk's tokens (75 for CLIP).
    pub max_vectors: usize,
}

impl EmbeddingShape {
    /// What `components`' encoders and tokenizer take.
    pub fn of<B: FusedOps>(components: &SdxlComponents<B>) -> Self {
        Self {
            width_l: components.text_encoder.config().hidden_size,
            width_g: components.text_encoder_2.config().hidden_size,
            max_vectors: components.tokenizer.max_length().saturating_sub(2),
        }
    }
}

/// A file of the directory that was not loaded, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedEmbedding {
    /// The file.
    pub path: PathBuf,
    /// Why, naming the file.
    pub reason: String,
}

/// A directory's embeddings.
#[derive(Debug, Clone, Default)]
pub struct EmbeddingsDir {
    /// The ones that fit, sorted by name.
    pub loaded: Vec<TextualInversion>,
    /// The ones that did not.
    pub skipped: Vec<SkippedEmbedding>,
}

fn refuse(path: &Path, message: impl Into<String>) -> Error {
    Error::Unsupported {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Whether `path` names a pickled file (refused unopened).
fn pickled(path: &Path) -> bool {
    crate::load::source::pickled_extension(path).is_some()
}

/// Reads one SDXL textual-inversion file and checks it against `shape`; errors name
/// the file.
pub fn read_embedding(path: &Path, shape: EmbeddingShape) -> Result<TextualInversion> {
    if pickled(path) {
        return Err(refuse(
            path,
            "a Python pickle, which can run code when loaded; hypergen reads embeddings only \
             as .safetensors",
        ));
    }
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| refuse(path, "no usable file name (the name is the prompt's word)"))?
        .to_string();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| refuse(path, format!("not a safetensors file: {e}")))?;
    let read = |key: &str, width: usize| -> Result<(usize, Vec<f32>)> {
        let view = st.tensor(key).map_err(|_| {
            refuse(
                path,
                format!("no `{key}` tensor: not an SDXL embedding (clip_l and clip_g)"),
            )
        })?;
        let dims = view.shape().to_vec();
        let (n, w) = match dims[..] {
            [n, w] => (n, w),
            [w] => (1, w),
            _ => {
                return Err(refuse(
                    path,
                    format!("`{key}` has shape {dims:?}, not [vectors, width]"),
                ))
            }
        };
        if w != width {
            return Err(refuse(
                path,
                format!("`{key}` is {w} wide, this model's text encoder takes {width}"),
            ));
        }
        let data =
            super::lora::to_f32(path, key, &view).map_err(|e| refuse(path, e.to_string()))?;
        Ok((n, data))
    };
    let (nl, clip_l) = read("clip_l", shape.width_l)?;
    let (ng, clip_g) = read("clip_g", shape.width_g)?;
    if nl != ng {
        return Err(refuse(
            path,
            format!("clip_l has {nl} vectors and clip_g {ng}; they must agree"),
        ));
    }
    if nl == 0 || nl > shape.max_vectors {
        return Err(refuse(
            path,
            format!(
                "{nl} vectors; an embedding has 1 to {} (one chunk)",
                shape.max_vectors
            ),
        ));
    }
    Ok(TextualInversion {
        name,
        path: path.to_path_buf(),
        vectors: nl,
        clip_l,
        clip_g,
    })
}

/// Reads every embedding in `dir` (see the module's documentation).
pub fn read_embeddings_dir(dir: &Path, shape: EmbeddingShape) -> Result<EmbeddingsDir> {
    let root = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    if !root.is_dir() {
        return Err(Error::invalid(
            "embeddings-dir",
            format!("{} is not a directory", dir.display()),
        ));
    }
    let mut files = Vec::new();
    walk(&root, &root, 0, &mut files)?;
    files.sort();
    let mut out = EmbeddingsDir::default();
    let mut names = BTreeSet::new();
    for path in files {
        if pickled(&path) {
            out.skipped.push(SkippedEmbedding {
                reason: format!(
                    "{}: a Python pickle, which can run code when loaded; hypergen reads \
                     embeddings only as .safetensors",
                    path.display()
                ),
                path,
            });
            continue;
        }
        match read_embedding(&path, shape) {
            Ok(e) if !names.insert(e.name.clone()) => out.skipped.push(SkippedEmbedding {
                reason: format!(
                    "{}: another file is already named `{}`",
                    path.display(),
                    e.name
                ),
                path,
            }),
            Ok(e) => out.loaded.push(e),
            Err(e) => out.skipped.push(SkippedEmbedding {
                reason: e.to_string(),
                path,
            }),
        }
    }
    out.loaded.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Collects the candidate files under `dir` that stay inside `root`.
fn walk(root: &Path, dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        // Symlinks are followed only to places inside the directory.
        let Ok(real) = path.canonicalize() else {
            continue;
        };
        if !real.starts_with(root) {
            tracing::warn!(path = %path.display(), "leads outside the embeddings directory; not read");
            continue;
        }
        if real.is_dir() {
            if depth < LIST_DEPTH {
                walk(root, &real, depth + 1, out)?;
            }
            continue;
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default()
            .to_ascii_lowercase();
        if ext == "safetensors" || pickled(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// Loads `dir`'s embeddings into `components` (replacing any before) and returns the
/// files skipped, each logged as a warning.
pub fn load_embeddings<B: FusedOps>(
    components: &mut SdxlComponents<B>,
    dir: &Path,
) -> Result<Vec<SkippedEmbedding>> {
    let found = read_embeddings_dir(dir, EmbeddingShape::of(components))?;
    for s in &found.skipped {
        tracing::warn!(reason = %s.reason, "textual-inversion embedding skipped");
    }
    components.embeddings = found.loaded;
    Ok(found.skipped)
}
