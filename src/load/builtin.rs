//! Built-in models: SDXL-architecture pipelines with random weights, built at start from
//! configs embedded in the binary (`presets/`) and a fixed seed, with CLIP's real
//! tokenizer (`assets/clip/`). They need no network and no files, so
//! `hypergen serve tiny-sdxl-random` works anywhere; the full-size ones have the real
//! SDXL shapes, for benchmarks. Their images are noise-like: the weights are random.

use std::path::Path;
use std::time::Instant;

use burn::tensor::DType;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::load::folder::load_vae;
use crate::load::random_init::{lazy_num_params, randomize};
use crate::load::{vae_dtype, LoadOptions};
use crate::model::clip::ClipTextConfig;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNetConfig;
use crate::model::vae::VaeConfig;
use crate::pipeline::{ModelInfo, SdxlComponents};
use crate::scheduler::SchedulerConfig;
use crate::FusedOps;

/// The seed every built-in model's weights are generated from.
pub const SEED: u64 = 0;

/// CLIP's public vocabulary (shared by both SDXL tokenizers).
const CLIP_VOCAB: &str = include_str!("../../assets/clip/vocab.json");
/// CLIP's public BPE merges.
const CLIP_MERGES: &str = include_str!("../../assets/clip/merges.txt");
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
            model_index: include_str!(concat!("../../presets/", $dir, "/model_index.json")),
            text_encoder: include_str!(concat!(
                "../../presets/",
                $dir,
                "/text_encoder/config.json"
            )),
            text_encoder_2: include_str!(concat!(
                "../../presets/",
                $dir,
                "/text_encoder_2/config.json"
            )),
            unet: include_str!(concat!("../../presets/", $dir, "/unet/config.json")),
            vae: include_str!(concat!("../../presets/", $dir, "/vae/config.json")),
            scheduler: include_str!(concat!(
                "../../presets/",
                $scheduler_dir,
                "/scheduler/scheduler_config.json"
            )),
        }
    };
}

static BUILTINS: [Builtin; 4] = [
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
    Builtin {
        name: "sdxl-lightning-random",
        description: "ByteDance/SDXL-Lightning architecture and sampler (Euler, trailing \
             timesteps) with random weights (benchmarks)",
        preset: "presets/sdxl-base-1.0",
        configs: preset!("sdxl-base-1.0", "sdxl-lightning"),
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

/// The built-in model called `name`, or an error that lists the built-in names.
pub fn get(name: &str) -> Result<&'static Builtin> {
    find(name).ok_or_else(|| {
        Error::invalid(
            "model",
            format!(
                "`{name}` is not a built-in model (built-in: {})",
                names().join(", ")
            ),
        )
    })
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
    /// Parses one embedded config file, naming it in errors.
    fn parse<T: DeserializeOwned>(&self, text: &str, file: &str) -> Result<T> {
        serde_json::from_str(text).map_err(|source| Error::Json {
            path: Path::new(self.preset).join(file),
            source,
        })
    }

    /// Builds a model from one embedded config with `init`, naming the file in errors.
    fn init<C: DeserializeOwned, M>(
        &self,
        text: &str,
        file: &str,
        init: impl FnOnce(&C) -> Result<M>,
    ) -> Result<M> {
        let config: C = self.parse(text, file)?;
        init(&config).map_err(|e| e.in_file(Path::new(self.preset).join(file)))
    }

    /// The model's components with lazy (unallocated) parameters: what the configs
    /// describe, before any weight exists. `dtype` is recorded, not yet applied.
    pub(crate) fn lazy_components<B: FusedOps>(
        &self,
        dtype: DType,
        device: &B::Device,
    ) -> Result<SdxlComponents<B>> {
        let c = &self.configs;
        let scheduler_config =
            SchedulerConfig::from_json_str(c.scheduler).map_err(|source| Error::Json {
                path: Path::new(self.preset).join("scheduler/scheduler_config.json"),
                source,
            })?;
        let (tokenizer, tokenizer_2) = clip_tokenizers()?;
        Ok(SdxlComponents {
            tokenizer,
            tokenizer_2,
            text_encoder: self.init(
                c.text_encoder,
                "text_encoder/config.json",
                |cfg: &ClipTextConfig| cfg.init(device),
            )?,
            text_encoder_2: self.init(
                c.text_encoder_2,
                "text_encoder_2/config.json",
                |cfg: &ClipTextConfig| cfg.init(device),
            )?,
            unet: self.init(c.unet, "unet/config.json", |cfg: &UNetConfig| {
                cfg.init(device)
            })?,
            vae: self.init(c.vae, "vae/config.json", |cfg: &VaeConfig| cfg.init(device))?,
            scheduler_config,
            index: self.parse(c.model_index, "model_index.json")?,
            dtype,
            info: ModelInfo {
                id: self.name.to_string(),
                random_weights: true,
                local_dir: None,
            },
            loras: Default::default(),
            embeddings: Vec::new(),
            controlnets: Default::default(),
        })
    }

    /// Parameters per component (`text_encoder`, `text_encoder_2`, `unet`, `vae`),
    /// counted from the configs without allocating anything.
    pub fn parameter_counts<B: FusedOps>(
        &self,
        device: &B::Device,
    ) -> Result<Vec<(&'static str, usize)>> {
        let m = self.lazy_components::<B>(DType::F32, device)?;
        Ok(vec![
            ("text_encoder", lazy_num_params(&m.text_encoder)),
            ("text_encoder_2", lazy_num_params(&m.text_encoder_2)),
            ("unet", lazy_num_params(&m.unet)),
            ("vae", lazy_num_params(&m.vae)),
        ])
    }

    /// Builds the model's components on `device`: modules from the preset configs,
    /// weights drawn from [`SEED`] in `dtype` (the VAE in float32 when its config asks
    /// for upcasting). A `vae` folder replaces the random VAE by a real one (its
    /// `variant` files when present).
    pub fn components<B: FusedOps>(
        &self,
        dtype: DType,
        options: &LoadOptions,
        vae: Option<&Path>,
        device: &B::Device,
    ) -> Result<SdxlComponents<B>> {
        let start = Instant::now();
        let lazy = self.lazy_components::<B>(dtype, device)?;
        let params = lazy_num_params(&lazy.text_encoder)
            + lazy_num_params(&lazy.text_encoder_2)
            + lazy_num_params(&lazy.unet);
        tracing::info!(model = self.name, params, "generating random weights");
        let vae = match vae {
            Some(dir) => {
                let config = crate::load::folder::read_vae_config(dir)?;
                let variant = options.effective_variant(dtype);
                load_vae(dir, variant, vae_dtype(dtype, &config), device)?.0
            }
            None => {
                let vae_dtype = vae_dtype(dtype, lazy.vae.config());
                randomize(lazy.vae, SEED, 4, vae_dtype)
            }
        };
        let components = SdxlComponents {
            text_encoder: randomize(lazy.text_encoder, SEED, 1, dtype),
            text_encoder_2: randomize(lazy.text_encoder_2, SEED, 2, dtype),
            unet: randomize(lazy.unet, SEED, 3, dtype),
            vae,
            ..lazy
        };
        tracing::info!(
            model = self.name,
            dtype = ?dtype,
            seconds = format!("{:.1}", start.elapsed().as_secs_f64()),
            "built-in model ready: RANDOM WEIGHTS (images are noise-like; for tests and benchmarks)"
        );
        Ok(components)
    }
}
