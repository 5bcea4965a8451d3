//! LoRA adapters chosen per request: a directory the operator offers ([`LoraDir`]),
//! whose names are resolved without ever leaving it, and a bounded cache of parsed
//! adapters ([`LoraCache`]) so that switching adapters between jobs reads no file twice.

use std::collections::VecDeque;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::lora::{lora_file, LoraAdapter, LORA_FOLDER_FILE};
use crate::error::{Error, Result};

/// How deep [`LoraDir::list`] looks into subfolders.
const LIST_DEPTH: usize = 4;

/// A directory of LoRA adapters; names given to it are paths relative to it.
#[derive(Debug, Clone)]
pub struct LoraDir {
    /// The directory, canonical (symlinks resolved), so containment is a prefix check.
    root: PathBuf,
}

/// One adapter a [`LoraDir`] offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraEntry {
    /// The name a request uses: the path relative to the directory, with `/`.
    pub name: String,
    /// Size of its weight file in bytes.
    pub bytes: u64,
}

impl LoraDir {
    /// Opens `path`, which must be a directory.
    pub fn open(path: &Path) -> Result<Self> {
        let root = path.canonicalize().map_err(|e| Error::io(path, e))?;
        if !root.is_dir() {
            return Err(Error::invalid(
                "lora-dir",
                format!("{} is not a directory", path.display()),
            ));
        }
        Ok(Self { root })
    }

    /// The directory (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The weight file of adapter `name`: a `.safetensors` file or a LoRA folder inside
    /// the directory (`.safetensors` may be left off). Absolute names, `..`, and
    /// symlinks that lead outside the directory are refused before anything is opened.
    pub fn resolve(&self, name: &str) -> Result<PathBuf> {
        let refuse = |message: String| Error::invalid("lora_path", message);
        if name.trim().is_empty() {
            return Err(refuse("an empty name".into()));
        }
        if name.contains('\0') {
            return Err(refuse("a name with a NUL byte".into()));
        }
        let rel = Path::new(name);
        for c in rel.components() {
            match c {
                Component::Normal(_) | Component::CurDir => {}
                Component::ParentDir => {
                    return Err(refuse(format!(
                        "`{name}`: `..` is not allowed; name an adapter inside the LoRA directory"
                    )))
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(refuse(format!(
                        "`{name}`: absolute paths are not allowed; name an adapter inside the LoRA directory"
                    )))
                }
            }
        }
        let mut candidate = self.root.join(rel);
        if !candidate.exists() {
            let with_ext = self.root.join(format!("{name}.safetensors"));
            if with_ext.exists() {
                candidate = with_ext;
            } else {
                return Err(refuse(format!(
                    "no adapter `{name}` in the LoRA directory (GET /v1/loras lists them)"
                )));
            }
        }
        let inside = |p: &Path| -> Result<PathBuf> {
            // Resolves every symlink on the way; only the final target is compared.
            let real = p.canonicalize().map_err(|_| {
                refuse(format!(
                    "no adapter `{name}` in the LoRA directory (GET /v1/loras lists them)"
                ))
            })?;
            if real.starts_with(&self.root) {
                Ok(real)
            } else {
                Err(refuse(format!(
                    "`{name}` leads outside the LoRA directory (a symlink); it is not served"
                )))
            }
        };
        let real = inside(&candidate)?;
        // A folder's weight file may itself be a symlink.
        let file = lora_file(&real).map_err(|e| match e {
            Error::MissingFile { .. } => refuse(format!(
                "`{name}` is a folder without {LORA_FOLDER_FILE}; it is not a LoRA"
            )),
            Error::Lora { message, .. } => refuse(format!("`{name}`: {message}")),
            other => other,
        })?;
        inside(&file)
    }

    /// Every adapter in the directory and its subfolders (a few levels deep): each
    /// `.safetensors` file and each folder holding `pytorch_lora_weights.safetensors`,
    /// sorted by name. Entries that lead outside the directory are left out.
    pub fn list(&self) -> Result<Vec<LoraEntry>> {
        let mut out = Vec::new();
        self.walk(&self.root, 0, &mut out)?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn walk(&self, dir: &Path, depth: usize, out: &mut Vec<LoraEntry>) -> Result<()> {
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(real) = path.canonicalize() else {
                continue;
            };
            if !real.starts_with(&self.root) {
                continue;
            }
            let Ok(rel) = path.strip_prefix(&self.root) else {
                continue;
            };
            let name = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            if real.is_dir() {
                let file = real.join(LORA_FOLDER_FILE);
                if let Ok(meta) = file.metadata() {
                    if file.canonicalize().is_ok_and(|f| f.starts_with(&self.root)) {
                        out.push(LoraEntry {
                            name,
                            bytes: meta.len(),
                        });
                    }
                } else if depth < LIST_DEPTH {
                    self.walk(&path, depth + 1, out)?;
                }
            } else if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
            {
                if let Ok(meta) = real.metadata() {
                    out.push(LoraEntry {
                        name,
                        bytes: meta.len(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Parsed adapters kept in host memory, least recently used dropped first, up to a
/// byte budget. A file changed on disk (size or modification time) is read again.
#[derive(Debug)]
pub struct LoraCache {
    max_bytes: usize,
    entries: Mutex<VecDeque<CacheEntry>>,
}

#[derive(Debug)]
struct CacheEntry {
    file: PathBuf,
    stamp: (u64, Option<SystemTime>),
    adapter: Arc<LoraAdapter>,
}

impl LoraCache {
    /// A cache holding at most `max_bytes` of parsed adapters (0: none are kept).
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            entries: Mutex::new(VecDeque::new()),
        }
    }

    /// The adapter in weight file `file` (already resolved), named `name`, from the
    /// cache or read now. Blocking: call it off an async runtime.
    pub fn get(&self, file: &Path, name: &str) -> Result<Arc<LoraAdapter>> {
        let meta = file.metadata().map_err(|e| Error::io(file, e))?;
        let stamp = (meta.len(), meta.modified().ok());
        {
            let mut entries = self.lock();
            if let Some(i) = entries
                .iter()
                .position(|e| e.file == file && e.stamp == stamp)
            {
                let entry = entries.remove(i).expect("index from position");
                let adapter = entry.adapter.clone();
                entries.push_front(entry);
                if adapter.name() == name {
                    return Ok(adapter);
                }
                return Ok(Arc::new((*adapter).clone().with_name(name)));
            }
        }
        // Read outside the lock: a large file must not hold up other requests.
        let adapter = Arc::new(LoraAdapter::read(file)?.with_name(name));
        let mut entries = self.lock();
        entries.retain(|e| e.file != file);
        entries.push_front(CacheEntry {
            file: file.to_path_buf(),
            stamp,
            adapter: adapter.clone(),
        });
        let mut total = 0usize;
        let mut keep = 0usize;
        for e in entries.iter() {
            total += e.adapter.size_bytes();
            if total > self.max_bytes {
                break;
            }
            keep += 1;
        }
        entries.truncate(keep);
        Ok(adapter)
    }

    /// Bytes of parsed adapters held now.
    pub fn bytes(&self) -> usize {
        self.lock().iter().map(|e| e.adapter.size_bytes()).sum()
    }

    /// Adapters held now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<CacheEntry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}
