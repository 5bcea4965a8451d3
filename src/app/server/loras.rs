//! Per-request LoRA adapters: the operator's directory (`--lora-dir`), the cache of
//! parsed adapters (`--lora-cache-mb`), and turning a request's names into adapters for
//! the worker. Nothing outside the directory is ever opened.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use super::error::ApiError;
use super::request::RequestedLora;
use super::worker::JobLora;
use crate::error::Error;
use crate::load::lora::LoraSpec;
use crate::load::lora_dir::{LoraCache, LoraDir, LoraEntry};

/// The adapters requests may name, and those already parsed.
#[derive(Debug)]
pub struct LoraLibrary {
    dir: LoraDir,
    cache: LoraCache,
}

impl LoraLibrary {
    /// Opens the directory; parsed adapters are kept up to `cache_bytes`.
    pub fn open(dir: &Path, cache_bytes: usize) -> anyhow::Result<Self> {
        let dir = LoraDir::open(dir).with_context(|| format!("--lora-dir {}", dir.display()))?;
        tracing::info!(dir = %dir.root().display(), cache_bytes, "per-request LoRA adapters enabled");
        Ok(Self {
            dir,
            cache: LoraCache::new(cache_bytes),
        })
    }

    /// What the directory offers.
    pub fn list(&self) -> Result<Vec<LoraEntry>, ApiError> {
        self.dir
            .list()
            .map_err(|e| ApiError::internal(self.clean(&e.to_string())))
    }

    /// The parsed cache.
    pub fn cache(&self) -> &LoraCache {
        &self.cache
    }

    /// Resolves and reads one adapter (blocking: file reads).
    fn load(&self, (param, wanted): &RequestedLora) -> Result<JobLora, ApiError> {
        let refuse = |e: Error| {
            let message = match e {
                Error::InvalidArgument { message, .. } => message,
                other => other.to_string(),
            };
            ApiError::invalid_value(param, self.clean(&message))
        };
        let file = self.dir.resolve(&wanted.source).map_err(refuse)?;
        let adapter = self.cache.get(&file, &wanted.source).map_err(refuse)?;
        Ok((*param, LoraSpec::new(adapter, wanted.scale)))
    }

    /// A message without the directory's absolute path (clients know names only).
    fn clean(&self, message: &str) -> String {
        let root = self.dir.root().display().to_string();
        message
            .replace(&format!("{root}/"), "")
            .replace(&root, "the LoRA directory")
    }
}

/// The adapters a request names, read (from the cache or the directory) off the async
/// runtime. Without `--lora-dir`, any named adapter is refused with how to enable them.
pub async fn resolve(
    library: Option<Arc<LoraLibrary>>,
    wanted: Vec<RequestedLora>,
) -> Result<Vec<JobLora>, ApiError> {
    let Some((first, _)) = wanted.first() else {
        return Ok(Vec::new());
    };
    let Some(library) = library else {
        return Err(ApiError::invalid_value(
            first,
            "per-request LoRA adapters are off on this server; the operator enables them \
             with `hypergen serve … --lora-dir DIR` (adapters merged at start use `--lora`)",
        ));
    };
    tokio::task::spawn_blocking(move || wanted.iter().map(|w| library.load(w)).collect())
        .await
        .map_err(|e| ApiError::internal(format!("reading LoRA adapters failed: {e}")))?
}
