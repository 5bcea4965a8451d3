//! The loaded model: one value that every source produces ([`crate::load`]) and the
//! pipeline runs ([`super::SdxlPipeline::new`]).

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::tensor::DType;
use serde::Deserialize;

use super::lora::LoraState;
use super::prompt::TextualInversion;
use crate::model::clip::ClipTextModel;
use crate::model::controlnet::ControlNetModel;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKL;
use crate::scheduler::SchedulerConfig;
use crate::FusedOps;

/// `model_index.json` of a diffusers pipeline folder (only the keys hypergen reads).
#[derive(Debug, Clone, Deserialize)]
pub struct ModelIndex {
    /// The pipeline class, e.g. `StableDiffusionXLPipeline`.
    #[serde(rename = "_class_name")]
    pub class_name: String,
    /// When true, an empty negative prompt means zero embeddings rather than encoding "".
    #[serde(default = "default_true")]
    pub force_zeros_for_empty_prompt: bool,
}

fn default_true() -> bool {
    true
}

/// What was loaded, for logs, errors and the server's `/v1/models`.
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

impl ModelInfo {
    /// Where a component's files are, for error messages: `DIR/COMPONENT` for models read
    /// from a folder, `builtin:NAME/COMPONENT` otherwise.
    pub fn component_path(&self, component: &str) -> PathBuf {
        match &self.local_dir {
            Some(dir) => dir.join(component),
            None => PathBuf::from(format!("builtin:{}", self.id)).join(component),
        }
    }
}

/// Every part of an SDXL pipeline, as diffusers' `StableDiffusionXLPipeline` holds them.
pub struct SdxlComponents<B: FusedOps> {
    /// `tokenizer/` (pads with `<|endoftext|>`).
    pub tokenizer: ClipTokenizer,
    /// `tokenizer_2/` (pads with `!`).
    pub tokenizer_2: ClipTokenizer,
    /// `text_encoder/` (CLIP ViT-L).
    pub text_encoder: ClipTextModel<B>,
    /// `text_encoder_2/` (OpenCLIP bigG with projection).
    pub text_encoder_2: ClipTextModel<B>,
    /// `unet/`.
    pub unet: UNet2DConditionModel<B>,
    /// `vae/`.
    pub vae: AutoencoderKL<B>,
    /// `scheduler/scheduler_config.json`: the default scheduler.
    pub scheduler_config: SchedulerConfig,
    /// `model_index.json`.
    pub index: ModelIndex,
    /// Dtype of the text encoders and the UNet (the VAE's is [`AutoencoderKL::dtype`]).
    pub dtype: DType,
    /// Where the model came from.
    pub info: ModelInfo,
    /// LoRA adapters merged into the weights, and the base tensors they replaced
    /// ([`crate::load::lora::apply_loras`]).
    pub loras: LoraState<B>,
    /// Textual-inversion embeddings a prompt in A1111 syntax may name
    /// ([`crate::load::embeddings`]); none unless loaded.
    pub embeddings: Vec<TextualInversion>,
    /// ControlNets loaded for this model, by the name requests use
    /// ([`ControlNetInput::model`](super::ControlNetInput::model)); each checked to fit
    /// the UNet when it was added ([`crate::load::controlnet`]).
    pub controlnets: BTreeMap<String, ControlNetModel<B>>,
}
