//! Built-in models: SDXL-architecture pipelines with random weights, built at start from
//! configs embedded in the binary (`presets/`) and a fixed seed, with CLIP's real
//! tokenizer (`assets/clip/`). They need no network and no files, so
//! `hypergen serve tiny-sdxl-random` works anywhere; the full-size ones have the real
//! SDXL shapes, for benchmarks. Their images are noise-like: the weights are random.

use crate::FusedOps;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::de::DeserializeOwned;

use crate::clip::{ClipTextConfig, ClipTextModel};
use crate::error::{Error, Result};
use crate::loader::ModelIndex;
use crate::pipeline::{vae_dtype, LoadOptions, PipelineParts, SdxlPipeline};
use crate::random_init::{lazy_num_params, randomize};
use crate::scheduler::SchedulerConfig;
use crate::tokenizer::ClipTokenizer;
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{self, AutoencoderKL, VaeConfig};

/// The seed every built-in model's weights are generated from.
pub const SEED: u64 = 0;

/// CLIP's public vocabulary (shared by both SDXL tokenizers).
const CLIP_VOCAB: &str = include_str!("../assets/clip/vocab.json");
/// CLIP's public BPE merges.
const CLIP_MERGES: &str = include_str!("../assets/clip/merges.txt");
/// CLIP's context length.
const CLIP_MAX_LENGTH: usize = 77;

/// The config files of one preset, as text.
struct Configs {
    model_index: &'static str,
    text_encoder: &'static str,
    text_encoder_2: &'static str,
    unet: &'static str,
    vae: &'static str,
    scheduler: &'static str,
}

/// One built-in model.
pub struct Builtin {
    /// The name `--model` and `serve` accept.
    pub name: &'static str,
    /// One line for listings and logs.
    pub description: &'static str,
    /// The preset folder its configs come from (for error messages).
    preset: &'static str,
    configs: Configs,
}

macro_rules! preset {
    ($dir:literal, $scheduler_dir:literal) => {
        Configs {
            model_index: include_str!(concat!("../presets/", $dir, "/model_index.json")),
            text_encoder: include_str!(concat!("../presets/", $dir, "/text_encoder/config.json")),
            text_encoder_2: include_str!(concat!(
                "../presets/",
                $dir,
                "/text_encoder_2/config.json"
            )),
            unet: include_str!(concat!("../presets/", $dir, "/unet/config.json")),
            vae: include_str!(concat!("../presets/", $dir, "/vae/config.json")),
            scheduler: include_str!(concat!(
                "../presets/",
                $scheduler_dir,
                "/scheduler/scheduler_config.json"
            )),
        }
    };
}

static BUILTINS: [Builtin; 3] = [
    Builtin {
        name: "tiny-sdxl-random",
        description:
            "small SDXL-architecture model with random weights (runs in about a second on a CPU)",
        preset: "presets/tiny-sdxl",
        configs: preset!("tiny-sdxl", "tiny-sdxl"),
    },
    Builtin {
        name: "sdxl-base-1.0-random",
        description:
            "stabilityai/stable-diffusion-xl-base-1.0 architecture with random weights (benchmarks)",
        preset: "presets/sdxl-base-1.0",
        configs: preset!("sdxl-base-1.0", "sdxl-base-1.0"),
    },
    Builtin {
        name: "sdxl-turbo-random",
        description:
            "stabilityai/sdxl-turbo architecture and scheduler with random weights (benchmarks)",
        preset: "presets/sdxl-base-1.0",
        configs: preset!("sdxl-base-1.0", "sdxl-turbo"),
    },
];

/// The names of the built-in models.
pub fn names() -> Vec<&'static str> {
    BUILTINS.iter().map(|b| b.name).collect()
}

/// The built-in model called `name`, if any.
pub fn find(name: &str) -> Option<&'static Builtin> {
    BUILTINS.iter().find(|b| b.name == name)
}

/// Both SDXL tokenizers from the embedded CLIP files: the first pads with
/// `<|endoftext|>`, the second with `!`, as SDXL's `tokenizer/` and `tokenizer_2/` do.
pub fn clip_tokenizers() -> Result<(ClipTokenizer, ClipTokenizer)> {
    Ok((
        ClipTokenizer::from_memory(CLIP_VOCAB, CLIP_MERGES, "<|endoftext|>", CLIP_MAX_LENGTH)?,
        ClipTokenizer::from_memory(CLIP_VOCAB, CLIP_MERGES, "!", CLIP_MAX_LENGTH)?,
    ))
}

impl Builtin {
    fn parse<T: DeserializeOwned>(&self, text: &str, file: &str) -> Result<(T, PathBuf)> {
        let path = Path::new(self.preset).join(file);
        let value = serde_json::from_str(text).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        Ok((value, path))
    }

    fn text_encoder<B: FusedOps>(
        &self,
        text: &str,
        file: &str,
        device: &B::Device,
    ) -> Result<ClipTextModel<B>> {
        let (config, path): (ClipTextConfig, _) = self.parse(text, file)?;
        let with_projection = config
            .architectures
            .iter()
            .any(|a| a.contains("WithProjection"));
        config.init::<B>(with_projection, &path, device)
    }

    /// The model's modules with lazy (unallocated) parameters, and its other parts.
    fn modules<B: FusedOps>(&self, device: &B::Device) -> Result<Modules<B>> {
        let c = &self.configs;
        let (index, _): (ModelIndex, _) = self.parse(c.model_index, "model_index.json")?;
        let (unet_config, unet_path): (UNetConfig, _) = self.parse(c.unet, "unet/config.json")?;
        let (vae_config, vae_path): (VaeConfig, _) = self.parse(c.vae, "vae/config.json")?;
        vae_config.validate(&vae_path)?;
        let scheduler_config =
            SchedulerConfig::from_json_str(c.scheduler).map_err(|source| Error::Json {
                path: Path::new(self.preset).join("scheduler/scheduler_config.json"),
                source,
            })?;
        Ok(Modules {
            index,
            text_encoder: self.text_encoder::<B>(
                c.text_encoder,
                "text_encoder/config.json",
                device,
            )?,
            text_encoder_2: self.text_encoder::<B>(
                c.text_encoder_2,
                "text_encoder_2/config.json",
                device,
            )?,
            unet: UNet2DConditionModel::<B>::new(&unet_config, &unet_path, device)?,
            vae: AutoencoderKL::<B>::new(vae_config, device),
            scheduler_config,
        })
    }

    /// Parameters per component (`text_encoder`, `text_encoder_2`, `unet`, `vae`),
    /// counted from the configs without allocating anything.
    pub fn parameter_counts<B: FusedOps>(
        &self,
        device: &B::Device,
    ) -> Result<Vec<(&'static str, usize)>> {
        let m = self.modules::<B>(device)?;
        Ok(vec![
            ("text_encoder", lazy_num_params(&m.text_encoder)),
            ("text_encoder_2", lazy_num_params(&m.text_encoder_2)),
            ("unet", lazy_num_params(&m.unet)),
            ("vae", lazy_num_params(&m.vae)),
        ])
    }

    /// Builds the pipeline on `device`: modules from the preset configs, weights drawn
    /// from [`SEED`] in `options.dtype` (the VAE in float32 when its config asks for
    /// upcasting). `options.vae` replaces the random VAE by a real one (its `variant`
    /// files when present).
    pub fn build<B: FusedOps>(
        &self,
        options: &LoadOptions,
        device: &B::Device,
    ) -> Result<SdxlPipeline<B>> {
        let start = Instant::now();
        let dtype = options.dtype;
        let m = self.modules::<B>(device)?;
        let (tokenizer, tokenizer_2) = clip_tokenizers()?;
        let params = lazy_num_params(&m.text_encoder)
            + lazy_num_params(&m.text_encoder_2)
            + lazy_num_params(&m.unet);
        tracing::info!(model = self.name, params, "generating random weights");
        let text_encoder = randomize(m.text_encoder, SEED, 1, dtype);
        let text_encoder_2 = randomize(m.text_encoder_2, SEED, 2, dtype);
        let unet = randomize(m.unet, SEED, 3, dtype);
        let vae = match &options.vae {
            Some(dir) => {
                let config = VaeConfig::from_file(&dir.join("config.json"))?;
                vae::load(
                    dir,
                    options.effective_variant(),
                    vae_dtype(dtype, &config),
                    device,
                )?
            }
            None => {
                let vae_dtype = vae_dtype(dtype, m.vae.config());
                randomize(m.vae, SEED, 4, vae_dtype)
            }
        };
        tracing::info!(
            model = self.name,
            dtype = ?dtype,
            seconds = format!("{:.1}", start.elapsed().as_secs_f64()),
            "built-in model ready: RANDOM WEIGHTS (images are noise-like; for tests and benchmarks)"
        );
        let mut pipeline = SdxlPipeline::from_parts(
            PipelineParts {
                tokenizer,
                tokenizer_2,
                text_encoder,
                text_encoder_2,
                unet,
                vae,
                scheduler_config: m.scheduler_config,
                index: m.index,
                dtype,
                source: PathBuf::from(format!("builtin:{}", self.name)),
            },
            device,
        );
        pipeline.set_vae_tiling(options.vae_tiling)?;
        Ok(pipeline)
    }
}

/// A built-in model's parts before its weights are drawn.
struct Modules<B: FusedOps> {
    index: ModelIndex,
    text_encoder: ClipTextModel<B>,
    text_encoder_2: ClipTextModel<B>,
    unet: UNet2DConditionModel<B>,
    vae: AutoencoderKL<B>,
    scheduler_config: SchedulerConfig,
}

impl<B: FusedOps> SdxlPipeline<B> {
    /// Builds the built-in model `name` (see [`names`]) on `device`.
    pub fn from_builtin(name: &str, options: &LoadOptions, device: &B::Device) -> Result<Self> {
        let builtin = find(name).ok_or_else(|| {
            Error::invalid(
                "model",
                format!(
                    "`{name}` is not a built-in model (built-in: {})",
                    names().join(", ")
                ),
            )
        })?;
        builtin.build(options, device)
    }
}
