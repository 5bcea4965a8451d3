//! LoRA adapters as a model holds them: a request for one ([`LoraSpec`]), a parsed
//! adapter ([`LoraAdapter`], its low-rank pairs in host memory), and what is merged into
//! the weights ([`LoraState`], kept in [`super::SdxlComponents`]). Reading adapter files
//! and merging them is the loader's ([`crate::load::lora`]); these types live here, below
//! it, so that the components can hold the merged state without importing the loader.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::TensorPrimitive;

use crate::error::{Error, Result};
use crate::FusedOps;

/// The model part a LoRA layer changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraPart {
    /// `text_encoder` (kohya `lora_te1_`).
    TextEncoder,
    /// `text_encoder_2` (kohya `lora_te2_`).
    TextEncoder2,
    /// `unet` (kohya `lora_unet_`).
    Unet,
}

impl LoraPart {
    /// The component's folder name.
    pub fn name(self) -> &'static str {
        match self {
            LoraPart::TextEncoder => "text_encoder",
            LoraPart::TextEncoder2 => "text_encoder_2",
            LoraPart::Unet => "unet",
        }
    }
}

/// How a file names the layer a LoRA pair belongs to.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// A dotted module path (diffusers / PEFT).
    Path(String),
    /// kohya's flattened name, dots turned into underscores, in SGM or diffusers
    /// numbering: resolved against the model's own layers.
    Flat(String),
}

/// A float32 host tensor read from a LoRA file.
#[derive(Debug, Clone)]
pub(crate) struct HostTensor {
    pub(crate) shape: Vec<usize>,
    pub(crate) data: Vec<f32>,
}

/// One layer of an adapter: the low-rank pair and its alpha.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    /// The model part it changes.
    pub part: LoraPart,
    /// Its name in the file, without the `.lora_down.weight`-style suffix.
    pub key: String,
    pub(crate) target: Target,
    pub(crate) down: HostTensor,
    pub(crate) up: HostTensor,
    pub(crate) alpha: Option<f32>,
}

impl LoraLayer {
    /// The rank: rows of `down`.
    pub fn rank(&self) -> usize {
        self.down.shape.first().copied().unwrap_or(0)
    }

    /// `alpha / rank` (alpha defaults to the rank: factor 1, as PEFT files without alpha mean).
    pub fn alpha_factor(&self) -> f32 {
        let rank = self.rank().max(1) as f32;
        self.alpha.unwrap_or(rank) / rank
    }
}

/// A parsed LoRA file, in host memory as float32, ready to merge into any model it fits.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub(crate) name: String,
    pub(crate) path: PathBuf,
    pub(crate) layers: Vec<LoraLayer>,
}

impl LoraAdapter {
    /// The name it is shown under (its path unless [`with_name`](Self::with_name)).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The same adapter shown under `name` (the server names adapters relative to
    /// `--lora-dir`).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The weight file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its layers.
    pub fn layers(&self) -> &[LoraLayer] {
        &self.layers
    }

    /// Host memory it holds, in bytes (for cache bounds).
    pub fn size_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| 4 * (l.down.data.len() + l.up.data.len()) + l.key.len())
            .sum()
    }
}

/// One LoRA adapter at a scale. What names the adapter depends on who asks: a path on
/// the command line (`LoraSpec<PathBuf>`, the default), a name inside the server's LoRA
/// directory (`LoraSpec<String>`), or the parsed adapter a job merges and a model holds
/// (`LoraSpec<Arc<LoraAdapter>>`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec<S = PathBuf> {
    /// The adapter: its path, its name, or the adapter itself.
    pub source: S,
    /// Its scale.
    pub scale: f32,
}

impl<S> LoraSpec<S> {
    /// `source` at `scale`.
    pub fn new(source: S, scale: f32) -> Self {
        Self { source, scale }
    }
}

/// Whether two lists name the very same parsed adapters (not copies read again) at the
/// same scales, in the same order: what a model holds need not be merged again.
pub fn same_loras(a: &[LoraSpec<Arc<LoraAdapter>>], b: &[LoraSpec<Arc<LoraAdapter>>]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| Arc::ptr_eq(&x.source, &y.source) && x.scale == y.scale)
}

/// Which adapters are merged into a model, and the base tensors they replaced.
pub struct LoraState<B: FusedOps> {
    pub(crate) active: Vec<LoraSpec<Arc<LoraAdapter>>>,
    pub(crate) originals: BTreeMap<LoraPart, HashMap<String, TensorPrimitive<B>>>,
}

impl<B: FusedOps> Default for LoraState<B> {
    fn default() -> Self {
        Self {
            active: Vec::new(),
            originals: BTreeMap::new(),
        }
    }
}

impl<B: FusedOps> LoraState<B> {
    /// The adapters merged now, at their scales, in the order they were given.
    pub fn active(&self) -> &[LoraSpec<Arc<LoraAdapter>>] {
        &self.active
    }

    /// Whether the model holds its base weights.
    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    /// Number of base tensors kept for restoring.
    pub fn replaced_tensors(&self) -> usize {
        self.originals.values().map(HashMap::len).sum()
    }
}

impl std::str::FromStr for LoraSpec {
    type Err = Error;

    /// `PATH` or `PATH:SCALE` (scale 1 when absent), as the command line names an
    /// adapter; a suffix after the last `:` that is not a number belongs to the path
    /// (Windows drive letters).
    fn from_str(s: &str) -> Result<Self> {
        if s.is_empty() {
            return Err(Error::invalid("lora", "an empty path"));
        }
        if let Some((path, scale)) = s.rsplit_once(':') {
            if let Ok(scale) = scale.parse::<f32>() {
                if !scale.is_finite() {
                    return Err(Error::invalid(
                        "lora",
                        format!("scale {scale} is not finite"),
                    ));
                }
                if path.is_empty() {
                    return Err(Error::invalid("lora", "an empty path before the scale"));
                }
                return Ok(Self::new(PathBuf::from(path), scale));
            }
        }
        Ok(Self::new(PathBuf::from(s), 1.0))
    }
}
