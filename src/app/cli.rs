//! The `hypergen` command line: flag definitions and the commands they start.
//! `main.rs` only calls [`main`].

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::app::logging::{self, LogFormat};
use crate::app::server::auth::ApiKey;
use crate::app::server::limits::{self, RequestLimits};
use crate::app::server::request::PromptDefaults;
use crate::app::server::worker::WarmUp;
use crate::app::server::ServerConfig;
use crate::device::{dispatch, DTypeChoice, DeviceSpec, Placed, WithBackend};
use crate::load::controlnet::{add_controlnet, ControlNetSpec};
use crate::load::embeddings::load_embeddings;
use crate::load::ip_adapter::load_image_prompt_adapter;
use crate::load::lora::{apply_lora_specs, LoraSpec};
use crate::load::{load_pipeline, LoadOptions};
use crate::model::vae::tiling::VaeTileSize;
use crate::pipeline::prompt::extract_extra_networks;
use crate::pipeline::{
    ControlNetInput, GenerationRequest, Image, ImagePrompt, InitImage, Mask, Progress,
    PromptSyntax, RequestDefaults, RunOptions,
};
use crate::scheduler::{SamplerSettings, SchedulerKind, Spacing};
use crate::FusedOps;

/// hypergen: Stable Diffusion XL on any GPU vendor.
#[derive(Debug, Parser)]
#[command(name = "hypergen", version, about)]
pub struct Cli {
    /// Log lines as `text` or `json` (one object per line, for log pipelines).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "HYPERGEN_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images from a prompt and write them as PNG files.
    Generate(Box<GenerateArgs>),
    /// Serve the model over HTTP (HyperGen- and OpenAI-compatible API).
    Serve(Box<ServeArgs>),
    /// Print the HTTP API's OpenAPI schema (what `openapi/openapi.json` holds).
    Openapi,
    /// List the GPUs and backends this build can use, and what `--device auto` picks.
    Devices,
    /// Time text encoding, the UNet step, the VAE decode and the whole pipeline (or, with
    /// `ops`, SDXL's hot ops at their real shapes) on a device.
    Bench(Box<BenchArgs>),
    /// Turn a photo into the control image a ControlNet reads (`canny`: an edge map).
    #[command(subcommand)]
    Preprocess(PreprocessCommand),
}

/// The preprocessors of `hypergen preprocess`. Depth and pose maps need models of their
/// own: make them elsewhere and pass the map as the control image.
#[derive(Debug, Subcommand)]
pub enum PreprocessCommand {
    /// OpenCV's canny edge map (`cv2.Canny` of the grey image, no blur, L1 gradient):
    /// white edges on black.
    Canny(CannyArgs),
}

/// Flags of `hypergen preprocess canny`.
#[derive(Debug, Args)]
pub struct CannyArgs {
    /// The image (PNG, JPEG or WebP).
    pub input: PathBuf,
    /// Lower hysteresis threshold on |gx| + |gy|: weaker pixels are never edges.
    #[arg(long, default_value_t = crate::pipeline::CANNY_LOW)]
    pub low: f64,
    /// Upper hysteresis threshold: stronger pixels are edges, and the candidates they
    /// touch.
    #[arg(long, default_value_t = crate::pipeline::CANNY_HIGH)]
    pub high: f64,
    /// Output PNG path.
    #[arg(long, default_value = "canny.png")]
    pub out: PathBuf,
}

/// Where a model runs and how it is loaded: flags shared by every command that loads one.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// auto, cpu, wgpu, vulkan[:N], metal[:N], mps, dx12[:N], cuda[:N] (see `hypergen devices`).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// auto (float32 on the CPU, float16 on GPUs that have it), float32, float16 or bfloat16.
    #[arg(long, default_value = "auto", value_parser = parse_dtype)]
    pub dtype: DTypeChoice,
    /// Weight-file variant to load (`fp16`); default: fp16 for half dtypes.
    #[arg(long)]
    pub variant: Option<String>,
    /// A VAE to use instead of the model's: a folder or a Hub id (e.g. the fp16-safe
    /// madebyollin/sdxl-vae-fp16-fix).
    #[arg(long)]
    pub vae: Option<String>,
    /// Hub revision of the model (branch, tag or commit).
    #[arg(long)]
    pub revision: Option<String>,
    /// For a single-file checkpoint (`--model model.safetensors`): a diffusers-layout
    /// folder whose JSON configs and tokenizer files give the architecture (default:
    /// SDXL base 1.0's when the checkpoint's shapes fit it).
    #[arg(long, value_name = "DIR")]
    pub config: Option<PathBuf>,
    /// Decode with a tiled VAE so that large images fit small GPUs: alone, tiles of the
    /// VAE config's `sample_size` (1024 px for SDXL: only larger images are tiled);
    /// `--vae-tiling=PIXELS` for smaller tiles (a multiple of 8).
    #[arg(long, value_name = "PIXELS", num_args = 0..=1, require_equals = true, default_missing_value = "auto")]
    pub vae_tiling: Option<VaeTileSize>,
    /// Threads of the CPU backend (default: one per core).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
    /// A LoRA adapter merged into the weights at start: a .safetensors file (kohya or
    /// diffusers/PEFT names) or a folder holding pytorch_lora_weights.safetensors, with an
    /// optional scale (default 1). Repeat for several; they add up.
    #[arg(long = "lora", value_name = "PATH[:SCALE]", value_parser = parse_lora)]
    pub loras: Vec<LoraSpec>,
    /// Textual-inversion embeddings for SDXL (`.safetensors` with `clip_l` and `clip_g`)
    /// in this directory and its subfolders: a word in a prompt equal to a file's name
    /// (without `.safetensors`) inserts its vectors. Pickles (.pt, .bin) are refused;
    /// files that do not fit the model are skipped with a warning naming them.
    #[arg(long, value_name = "DIR")]
    pub embeddings_dir: Option<PathBuf>,
}

/// How prompts are read: flags of `generate`, and the defaults of `serve`'s requests.
#[derive(Debug, Clone, Args)]
pub struct PromptArgs {
    /// `a1111`: AUTOMATIC1111's syntax, `(word:1.3)`, `[word]`, `BREAK`, embeddings, any
    /// length (in chunks of 75 tokens); `plain`: diffusers', the text as it is, cut at
    /// 77 tokens.
    #[arg(long, default_value_t = PromptSyntax::default(), value_parser = parse_prompt_syntax)]
    pub prompt_syntax: PromptSyntax,
    /// diffusers' `clip_skip`, for the prompt and the negative prompt: both text
    /// encoders' `hidden_states[-(N + 2)]`. 0 (default) is SDXL's penultimate layer,
    /// A1111's and Civitai's "Clip skip: 2"; N is A1111's "Clip skip: N + 2".
    #[arg(long, default_value_t = 0)]
    pub clip_skip: usize,
}

/// `--prompt-syntax` as clap parses it.
fn parse_prompt_syntax(s: &str) -> Result<PromptSyntax, String> {
    s.parse().map_err(|e: crate::Error| e.to_string())
}

impl LoadArgs {
    /// The parsed `--device`.
    pub fn device_spec(&self) -> anyhow::Result<DeviceSpec> {
        Ok(self.device.parse()?)
    }

    /// Where the model's files are (Hub settings from the environment).
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            variant: self.variant.clone(),
            vae: self.vae.clone(),
            revision: self.revision.clone(),
            config: self.config.clone(),
            ..LoadOptions::default()
        }
    }

    /// How the loaded model runs.
    pub fn run_options(&self) -> RunOptions {
        RunOptions {
            vae_tiling: self.vae_tiling,
        }
    }

    /// Sizes the CPU backend's thread pool (`--threads`); once per process, before any
    /// CPU work. A pool that already exists (tests, the bench target) is kept.
    pub fn apply_threads(&self) {
        if let Some(n) = self.threads {
            if rayon::ThreadPoolBuilder::new()
                .num_threads(n as usize)
                .build_global()
                .is_err()
            {
                tracing::warn!(
                    threads = n,
                    "--threads: the CPU thread pool already exists; keeping it"
                );
            }
        }
    }
}

/// `--lora` as clap parses it.
fn parse_lora(s: &str) -> Result<LoraSpec, String> {
    s.parse().map_err(|e: crate::Error| e.to_string())
}

/// `--controlnet` as clap parses it.
fn parse_controlnet(s: &str) -> Result<ControlNetSpec, String> {
    s.parse().map_err(|e: crate::Error| e.to_string())
}

/// `--dtype` as clap parses it.
fn parse_dtype(s: &str) -> Result<DTypeChoice, String> {
    s.parse().map_err(|e: crate::Error| e.to_string())
}

/// Flags of `hypergen generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A diffusers-layout SDXL folder, a Hub repository id (stabilityai/sdxl-turbo) or a
    /// built-in model (tiny-sdxl-random, sdxl-base-1.0-random, sdxl-turbo-random,
    /// sdxl-lightning-random).
    #[arg(long)]
    pub model: String,
    /// What to draw.
    #[arg(long)]
    pub prompt: String,
    /// What to steer away from (empty: zero embeddings, as SDXL does).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Denoising steps.
    #[arg(long, default_value_t = RequestDefaults::LIBRARY.steps)]
    pub steps: usize,
    /// Classifier-free guidance scale (≤ 1 disables guidance).
    #[arg(long, default_value_t = RequestDefaults::LIBRARY.guidance_scale)]
    pub guidance: f64,
    /// diffusers' guidance_rescale, 0–1 (0: off): rescales the guided prediction towards
    /// the conditional one's spread; 0.7 for v-prediction models with zero terminal SNR.
    #[arg(long, default_value_t = 0.0)]
    pub guidance_rescale: f64,
    /// Noise seed; the same seed gives the same image on every backend.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Width in pixels (multiple of 8); default 1024, or the --image's width rounded
    /// down to a multiple of 8.
    #[arg(long)]
    pub width: Option<usize>,
    /// Height in pixels (multiple of 8); default 1024, or the --image's height rounded
    /// down to a multiple of 8.
    #[arg(long)]
    pub height: Option<usize>,
    /// Image-to-image: the image (PNG, JPEG or WebP) to start from; resized to
    /// --width × --height with a Lanczos filter when they differ from its size.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Inpainting (with --image): the mask, the image's size. With transparency, alpha 0
    /// is repainted (OpenAI's convention); opaque, white is repainted and black kept
    /// (diffusers').
    #[arg(long, requires = "image")]
    pub mask: Option<PathBuf>,
    /// How much of the schedule runs with --image, 0–1: the run starts at step
    /// steps − ⌊steps × strength⌋. Default 0.75, or 1.0 with --mask.
    #[arg(long, requires = "image")]
    pub strength: Option<f64>,
    /// A ControlNet steering the image: a diffusers folder (config.json and weights) or
    /// a .safetensors file, with an optional scale (default 1; diffusers' image-to-image
    /// ControlNet pipeline defaults to 0.8). Repeat for several, each paired with the
    /// --control-image in the same position; their residuals add up.
    #[arg(long = "controlnet", value_name = "DIR_OR_FILE[:SCALE]", value_parser = parse_controlnet)]
    pub controlnets: Vec<ControlNetSpec>,
    /// The control image of the --controlnet in the same position (an edge, depth or
    /// pose map; `hypergen preprocess canny` makes edge maps), resized to the output
    /// size with a Lanczos filter when it differs, read as RGB in [0, 1].
    #[arg(long = "control-image", value_name = "PNG")]
    pub control_images: Vec<PathBuf>,
    /// The fraction of the steps before which the ControlNets are off (all of them).
    #[arg(long, default_value_t = 0.0)]
    pub control_guidance_start: f64,
    /// The fraction of the steps after which the ControlNets are off (all of them).
    #[arg(long, default_value_t = 1.0)]
    pub control_guidance_end: f64,
    /// diffusers' guess mode for all ControlNets: they see the positive prompt's rows
    /// only and their residuals ramp from 0.1 to 1 × the scale (for empty prompts;
    /// guidance 3–5).
    #[arg(long)]
    pub control_guess_mode: bool,
    /// Image prompt: an IP-Adapter `.safetensors` file (h94/IP-Adapter's
    /// `sdxl_models/ip-adapter_sdxl.safetensors`, or a Plus variant).
    #[arg(long, requires = "ip_adapter_image")]
    pub ip_adapter: Option<PathBuf>,
    /// The IP-Adapter's CLIP image encoder folder; default: `image_encoder/` beside the
    /// adapter file, else `../models/image_encoder/` (h94's layout).
    #[arg(long, requires = "ip_adapter")]
    pub image_encoder: Option<PathBuf>,
    /// The image prompt's reference image (PNG, JPEG or WebP); repeat for several
    /// images, whose tokens are concatenated.
    #[arg(long, requires = "ip_adapter")]
    pub ip_adapter_image: Vec<PathBuf>,
    /// Weight of the image prompt in every cross-attention (0: ignored).
    #[arg(long, default_value_t = ImagePrompt::DEFAULT_SCALE, requires = "ip_adapter")]
    pub ip_adapter_scale: f64,
    /// The sampler and its settings.
    #[command(flatten)]
    pub sampler: SamplerArgs,
    /// Images to generate (default: 1, or the batch size of --latents).
    #[arg(long)]
    pub num_images: Option<usize>,
    /// Device, dtype and loading.
    #[command(flatten)]
    pub load: LoadArgs,
    /// Starting noise: a safetensors file with one tensor `latents` of shape [n, 4, h/8, w/8].
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// How the prompts are read.
    #[command(flatten)]
    pub prompt_args: PromptArgs,
    /// Output PNG path; with several images, `-N` is added before the extension.
    #[arg(long, default_value = "out.png")]
    pub out: PathBuf,
}

/// Flags of `hypergen serve` (HyperGen's, plus a few of hypergen's own). `Debug` never
/// shows the API key.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// The model: a local diffusers-layout SDXL folder, a Hub repository id
    /// (stabilityai/sdxl-turbo), or a built-in random-weight model (tiny-sdxl-random,
    /// sdxl-base-1.0-random, sdxl-turbo-random, sdxl-lightning-random; no network or
    /// files needed).
    pub model: String,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// Port to listen on (0: any free port).
    #[arg(long, default_value_t = crate::app::server::DEFAULT_PORT)]
    pub port: u16,
    /// Device, dtype and loading.
    #[command(flatten)]
    pub load: LoadArgs,
    /// Require `Authorization: Bearer KEY` on every route but /health, /docs and /openapi.json.
    #[arg(long, env = "HYPERGEN_API_KEY", hide_env_values = true)]
    pub api_key: Option<ApiKey>,
    /// Accepted requests that may wait; more get 503 with Retry-After.
    #[arg(long, default_value_t = limits::DEFAULT_MAX_QUEUE_SIZE)]
    pub max_queue_size: usize,
    /// Most queued requests with the same settings run as one batch.
    #[arg(long, default_value_t = limits::DEFAULT_MAX_BATCH_SIZE)]
    pub max_batch_size: usize,
    /// Smallest image side a request may ask for, in pixels.
    #[arg(long, default_value_t = RequestLimits::DEFAULT.min_size)]
    pub min_size: usize,
    /// Largest image side a request may ask for, in pixels.
    #[arg(long, default_value_t = RequestLimits::DEFAULT.max_size)]
    pub max_size: usize,
    /// Most denoising steps a request may ask for (at most 150).
    #[arg(long, default_value_t = RequestLimits::DEFAULT.max_steps)]
    pub max_steps: u64,
    /// Most images one request may ask for (`n`, at most 10).
    #[arg(long, default_value_t = RequestLimits::DEFAULT.max_images)]
    pub max_images: u64,
    /// Base of the image URLs the server hands out (default: http:// + the request's Host).
    #[arg(long)]
    pub public_url: Option<String>,
    /// Memory for images served by URL, in MiB (the oldest are evicted first).
    #[arg(long, default_value_t = crate::app::server::images::DEFAULT_STORE_MB)]
    pub url_store_mb: usize,
    /// Do not write the generation parameters (prompt, steps, sampler, seed…) into PNGs
    /// as an A1111-style `parameters` text chunk.
    #[arg(long)]
    pub no_png_parameters: bool,
    /// Let requests name LoRA adapters (`lora_path`, `loras`) inside this directory;
    /// names that lead outside it are refused. `GET /v1/loras` lists what it holds.
    #[arg(long, value_name = "DIR")]
    pub lora_dir: Option<PathBuf>,
    /// Memory for parsed per-request LoRA adapters, in MiB (least recently used dropped
    /// first).
    #[arg(long, default_value_t = crate::app::server::DEFAULT_LORA_CACHE_MB)]
    pub lora_cache_mb: usize,
    /// Let requests name ControlNets (`controlnets[].model`) inside this directory
    /// (diffusers folders or .safetensors files); names that lead outside it are
    /// refused. `GET /v1/controlnets` lists what it holds.
    #[arg(long, value_name = "DIR")]
    pub controlnet_dir: Option<PathBuf>,
    /// Device memory for ControlNets kept loaded between requests, in MiB (least
    /// recently used dropped first; a request's own are always loaded).
    #[arg(long, default_value_t = limits::DEFAULT_CONTROLNET_CACHE_MB)]
    pub controlnet_cache_mb: usize,
    /// Require the API key on `GET /metrics` too (by default it is open, like /health,
    /// for Prometheus scrapes inside the cluster).
    #[arg(long)]
    pub metrics_auth: bool,
    /// Write each request's prompt into its access-log line (off: prompts stay private).
    #[arg(long)]
    pub log_prompts: bool,
    /// On SIGTERM, seconds to finish the running and queued requests (new ones get 503
    /// at once) before refusing the rest and exiting; the default fits Kubernetes'
    /// 30-second grace period.
    #[arg(long, value_name = "SECONDS", default_value_t = crate::app::server::DEFAULT_DRAIN_TIMEOUT.as_secs())]
    pub drain_timeout: u64,
    /// Before reporting healthy, generate one image of this size (WIDTHxHEIGHT, the size
    /// requests will use: GPU kernels are compiled and autotuned per shape), or `off`.
    /// `auto`: 1024x1024 on GPUs, none on the CPU (which compiles and tunes nothing).
    #[arg(long, value_name = "WxH|auto|off", default_value = "auto", value_parser = parse_warmup_size)]
    pub warmup_size: WarmupSize,
    /// Denoising steps of the warm-up generation (0: no warm-up).
    #[arg(long, default_value_t = 2)]
    pub warmup_steps: usize,
    /// Keep GPU kernel autotune results in this folder (a volume), so that a restarted
    /// replica does not autotune again (default: CubeCL's own cache folder).
    #[arg(long, value_name = "DIR", env = "HYPERGEN_AUTOTUNE_CACHE")]
    pub autotune_cache: Option<PathBuf>,
    /// Let web pages from ORIGIN (`https://app.example.com`) call the API from a browser
    /// (CORS); repeatable. Off by default: no CORS headers.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,
    /// How requests' prompts are read unless they say (`prompt_syntax`, `clip_skip`).
    #[command(flatten)]
    pub prompt_args: PromptArgs,
}

/// `--warmup-size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmupSize {
    /// SDXL's default size on GPUs, none on the CPU.
    Auto,
    /// No warm-up.
    Off,
    /// This width and height, on any device.
    Size(usize, usize),
}

/// `--warmup-size` as clap parses it: `auto`, `off`, or `WIDTHxHEIGHT` in multiples of 8.
fn parse_warmup_size(s: &str) -> Result<WarmupSize, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(WarmupSize::Off);
    }
    if s.eq_ignore_ascii_case("auto") {
        return Ok(WarmupSize::Auto);
    }
    let parsed = s
        .split_once(['x', 'X'])
        .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
    match parsed {
        Some((w, h)) if w > 0 && h > 0 && w % 8 == 0 && h % 8 == 0 => Ok(WarmupSize::Size(w, h)),
        _ => Err(format!(
            "expected `auto`, `off` or WIDTHxHEIGHT in multiples of 8 (1024x1024), got `{s}`"
        )),
    }
}

impl ServeArgs {
    /// The server configuration and listen address these flags describe.
    pub fn server_config(&self) -> anyhow::Result<(ServerConfig, String)> {
        if self.min_size == 0 || self.min_size > self.max_size {
            bail!("--min-size must be at least 1 and at most --max-size");
        }
        let mut config = ServerConfig::new(&self.model, self.load.device_spec()?);
        let worker = &mut config.worker;
        worker.dtype = self.load.dtype;
        worker.load = self.load.load_options();
        worker.run = self.load.run_options();
        worker.loras = self.load.loras.clone();
        worker.embeddings_dir = self.load.embeddings_dir.clone();
        worker.max_queue_size = self.max_queue_size;
        worker.max_batch_size = self.max_batch_size;
        config.api_key = self.api_key.clone();
        use limits::{MAX_IMAGES, MAX_STEPS};
        if !(1..=MAX_STEPS).contains(&self.max_steps) {
            bail!("--max-steps must be between 1 and {MAX_STEPS}");
        }
        if !(1..=MAX_IMAGES).contains(&self.max_images) {
            bail!("--max-images must be between 1 and {MAX_IMAGES}");
        }
        config.limits = RequestLimits {
            min_size: self.min_size,
            max_size: self.max_size,
            max_steps: self.max_steps,
            max_images: self.max_images,
        };
        config.public_url = self.public_url.clone();
        config.url_store_bytes = self.url_store_mb.saturating_mul(1 << 20);
        config.worker.png_parameters = !self.no_png_parameters;
        config.lora_dir = self.lora_dir.clone();
        config.prompt = PromptDefaults {
            syntax: self.prompt_args.prompt_syntax,
            clip_skip: self.prompt_args.clip_skip,
        };
        config.lora_cache_bytes = self.lora_cache_mb.saturating_mul(1 << 20);
        config.controlnet_dir = self.controlnet_dir.clone();
        config.worker.controlnet_cache_bytes = self.controlnet_cache_mb.saturating_mul(1 << 20);
        config.metrics_auth = self.metrics_auth;
        config.log_prompts = self.log_prompts;
        config.drain_timeout = std::time::Duration::from_secs(self.drain_timeout);
        let steps = self.warmup_steps;
        let defaults = RequestDefaults::SERVER;
        config.worker.warmup = match self.warmup_size {
            _ if steps == 0 => None,
            WarmupSize::Off => None,
            WarmupSize::Auto => Some(WarmUp {
                width: defaults.width,
                height: defaults.height,
                steps,
                gpu_only: true,
            }),
            WarmupSize::Size(width, height) => Some(WarmUp {
                width,
                height,
                steps,
                gpu_only: false,
            }),
        };
        for origin in &self.cors_origins {
            let valid = (origin.starts_with("http://") || origin.starts_with("https://"))
                && !origin.ends_with('/')
                && poem::http::HeaderValue::from_str(origin).is_ok();
            if !valid {
                bail!("--cors-origin {origin}: expected an origin such as https://app.example.com (scheme and host, no path)");
            }
        }
        config.cors_origins = self.cors_origins.clone();
        let host = if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        Ok((config, format!("{host}:{}", self.port)))
    }
}

/// Flags of `hypergen bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A model as `generate --model` takes it (full-size random-weight built-ins need no
    /// download), or `ops` for the per-op microbenchmark.
    #[arg(default_value = crate::app::bench::DEFAULT_MODEL)]
    pub model: String,
    /// Device, dtype and loading.
    #[command(flatten)]
    pub load: LoadArgs,
    /// Image sizes: N (square) or WIDTHxHEIGHT, comma-separated [default: 1024; 512 for
    /// models whose name contains `turbo`].
    #[arg(long)]
    pub size: Option<String>,
    /// Image width (instead of --size; --height defaults to it).
    #[arg(long, conflicts_with = "size")]
    pub width: Option<usize>,
    /// Image height (instead of --size; --width defaults to it).
    #[arg(long, conflicts_with = "size")]
    pub height: Option<usize>,
    /// Denoising steps of the whole-pipeline runs, comma-separated [default: 30; 1 for
    /// turbo models].
    #[arg(long)]
    pub steps: Option<String>,
    /// Images per run, comma-separated; images/s is reported for each and the best (ops:
    /// one value, the UNet ops get twice as many rows).
    #[arg(long, default_value = "1")]
    pub batch: String,
    /// Guidance scale [default: 5; 0 for turbo models].
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Untimed runs before each measurement (kernel compilation, autotuning).
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed runs of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// What to time: `all` or a comma list of text, unet, scheduler, vae, pipeline.
    #[arg(long, default_value = "all")]
    pub components: String,
    /// Prompt for text encoding and the pipeline.
    #[arg(long, default_value = "a photo of an astronaut riding a horse on mars")]
    pub prompt: String,
    /// Dense throughput of the device, for the ratio to the arithmetic floor (TFLOP/s).
    #[arg(long, default_value_t = crate::app::bench::flops::DEFAULT_PEAK_TFLOPS)]
    pub peak_tflops: f64,
    /// `ops` only: time the ops whose name contains this (e.g. `attention`, `unet.`).
    #[arg(long)]
    pub filter: Option<String>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The sampler of the scheduler and pipeline measurements.
    #[command(flatten)]
    pub sampler: SamplerArgs,
}

/// Turns `hypergen bench` flags into the library's options.
pub fn bench_options(args: &BenchArgs) -> anyhow::Result<crate::app::bench::BenchOptions> {
    use crate::app::bench::{self, Mode, ModelBench, OpBench};
    let turbo = args.model.to_ascii_lowercase().contains("turbo");
    let defaults = RequestDefaults::LIBRARY;
    let sizes = match (&args.size, args.width, args.height) {
        (Some(s), _, _) => bench::parse_sizes(s)?,
        (None, Some(w), h) => vec![(w, h.unwrap_or(w))],
        (None, None, Some(h)) => vec![(h, h)],
        (None, None, None) => vec![if turbo {
            (512, 512)
        } else {
            (defaults.width, defaults.height)
        }],
    };
    let batches = bench::parse_counts("batch", &args.batch)?;
    let dtype = args.load.dtype;
    let mode = if args.model == "ops" {
        let [batch] = batches[..] else {
            bail!("invalid `batch`: `hypergen bench ops` takes one batch size");
        };
        Mode::Ops(OpBench {
            sizes,
            batch,
            filter: args.filter.clone(),
        })
    } else {
        let default_steps = if turbo { 1 } else { defaults.steps }.to_string();
        Mode::Model {
            model: args.model.clone(),
            load: Box::new(args.load.load_options()),
            run: args.load.run_options(),
            bench: ModelBench {
                sizes,
                steps: bench::parse_counts(
                    "steps",
                    args.steps.as_deref().unwrap_or(&default_steps),
                )?,
                batches,
                guidance: args.guidance.unwrap_or(if turbo {
                    0.0
                } else {
                    defaults.guidance_scale
                }),
                sampler: args.sampler.settings()?,
                components: bench::parse_components(&args.components)?,
                prompt: args.prompt.clone(),
                peak_tflops: args.peak_tflops,
            },
        }
    };
    let options = bench::BenchOptions {
        mode,
        dtype,
        warmup: args.warmup,
        iters: args.iters,
    };
    options.validate()?;
    Ok(options)
}

/// `hypergen bench`: runs the benchmark, prints its tables (progress on stderr) and
/// writes the JSON report when asked.
pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let options = bench_options(&args)?;
    let device = args.load.device_spec()?;
    args.load.apply_threads();
    let report = crate::app::bench::run(&device, options, &mut |line| eprintln!("{line}"))?;
    print!("{}", report.render());
    if let Some(path) = &args.json {
        std::fs::write(path, report.to_json()?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Reads a `--latents` file: one tensor named `latents`, float32 (or float16), rank 4.
pub fn read_latents(path: &Path) -> anyhow::Result<(Vec<f32>, [usize; 4])> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a valid safetensors file", path.display()))?;
    let view = st
        .tensor("latents")
        .with_context(|| format!("{}: no tensor named `latents`", path.display()))?;
    let shape: [usize; 4] = view.shape().try_into().map_err(|_| {
        anyhow::anyhow!(
            "{}: `latents` has shape {:?}, expected [n, 4, h/8, w/8]",
            path.display(),
            view.shape()
        )
    })?;
    let data = match view.dtype() {
        safetensors::Dtype::F32 => view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::F16 => view
            .data()
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => bail!(
            "{}: `latents` is {other:?}, expected F32 or F16",
            path.display()
        ),
    };
    Ok((data, shape))
}

/// The file name for image `i` of `n`.
fn numbered(out: &Path, i: usize, n: usize) -> PathBuf {
    if n == 1 {
        return out.to_path_buf();
    }
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
    let ext = out.extension().and_then(|s| s.to_str()).unwrap_or("png");
    out.with_file_name(format!("{stem}-{i}.{ext}"))
}

struct Generate {
    args: GenerateArgs,
    request: GenerationRequest,
}

impl WithBackend for Generate {
    type Output = anyhow::Result<()>;

    fn dtype(&self) -> Option<DTypeChoice> {
        Some(self.args.load.dtype)
    }

    fn run<B: FusedOps>(self, device: B::Device, placed: Placed) -> anyhow::Result<()> {
        let load = &self.args.load;
        let mut pipeline = load_pipeline::<B>(
            &self.args.model,
            placed.dtype,
            &load.load_options(),
            &load.run_options(),
            &device,
        )
        .with_context(|| format!("loading {}", self.args.model))?;
        apply_lora_specs(pipeline.components_mut(), &load.loras).context("--lora")?;
        if let Some(dir) = &load.embeddings_dir {
            load_embeddings(pipeline.components_mut(), dir).context("--embeddings-dir")?;
        }
        if self.request.prompt_syntax == PromptSyntax::A1111 {
            let (_, tags) = extract_extra_networks(&self.request.prompt);
            if tags.iter().any(|t| t.kind == "lora") {
                tracing::warn!(
                    "<lora:…> tags are removed from the prompt and not applied by `generate`; \
                     give the adapters with --lora PATH:SCALE (the server applies tags from --lora-dir)"
                );
            }
        }
        for spec in &self.args.controlnets {
            let name = controlnet_name(spec);
            if !pipeline.components().controlnets.contains_key(&name) {
                add_controlnet(pipeline.components_mut(), name, &spec.path, &device)
                    .with_context(|| format!("--controlnet {}", spec.path.display()))?;
            }
        }
        if let Some(file) = &self.args.ip_adapter {
            let adapter = load_image_prompt_adapter::<B>(
                file,
                self.args.image_encoder.as_deref(),
                placed.dtype,
                &device,
            )
            .context("--ip-adapter")?;
            pipeline.set_ip_adapter(Some(adapter));
        }
        let info = &pipeline.components().info;
        if info.random_weights {
            tracing::warn!(model = %info.id, "built-in model with RANDOM weights: the image is noise-like");
        }
        tracing::info!(device = %placed.label, model = %info.id, "generating");
        let bar = ProgressBar::new(self.request.num_inference_steps as u64).with_style(
            ProgressStyle::with_template(
                "{spinner} step {pos}/{len} [{bar:30}] {elapsed_precise} ({per_sec})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let mut on_step = |p: Progress| {
            bar.set_length(p.total as u64);
            bar.set_position(p.step as u64);
            ControlFlow::Continue(())
        };
        let out = pipeline
            .generate(&self.request, &mut on_step)
            .context("generating")?;
        bar.finish_and_clear();
        let n = out.images.len();
        for (i, img) in out.images.iter().enumerate() {
            let path = numbered(&self.args.out, i, n);
            let png = img.to_png()?;
            std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
            println!("{}", path.display());
        }
        Ok(())
    }
}

/// The name a `--controlnet` is loaded under: its path as given.
fn controlnet_name(spec: &ControlNetSpec) -> String {
    spec.path.display().to_string()
}

/// The request's ControlNets from `--controlnet`, `--control-image` and the guidance
/// window flags, the images paired with the models in order.
fn control_inputs(args: &GenerateArgs) -> anyhow::Result<Vec<ControlNetInput>> {
    if args.controlnets.len() != args.control_images.len() {
        bail!(
            "--controlnet is given {} times but --control-image {} times: one image per ControlNet, in order",
            args.controlnets.len(),
            args.control_images.len()
        );
    }
    (args.controlnets.iter().zip(&args.control_images))
        .map(|(spec, path)| {
            let image =
                image::open(path).with_context(|| format!("--control-image {}", path.display()))?;
            Ok(ControlNetInput {
                model: controlnet_name(spec),
                image: Image::from_dynamic(&image),
                scale: spec.scale,
                guidance_start: args.control_guidance_start,
                guidance_end: args.control_guidance_end,
                guess_mode: args.control_guess_mode,
            })
        })
        .collect()
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let device = args.load.device_spec()?;
    let sampler = args.sampler.settings()?;
    let latents = args.latents.as_deref().map(read_latents).transpose()?;
    let num_images = match (&latents, args.num_images) {
        (Some((_, shape)), Some(n)) if shape[0] != n => {
            bail!(
                "--num-images {n} disagrees with the batch size {} of --latents",
                shape[0]
            )
        }
        (Some((_, shape)), _) => shape[0],
        (None, n) => n.unwrap_or(1),
    };
    let image = args
        .image
        .as_deref()
        .map(|p| image::open(p).with_context(|| format!("--image {}", p.display())))
        .transpose()?;
    let (width, height) = match &image {
        // diffusers' default size for an input image: its own, down to a multiple of 8.
        Some(img) => (
            args.width.unwrap_or(img.width() as usize / 8 * 8),
            args.height.unwrap_or(img.height() as usize / 8 * 8),
        ),
        None => (
            args.width.unwrap_or(RequestDefaults::LIBRARY.width),
            args.height.unwrap_or(RequestDefaults::LIBRARY.height),
        ),
    };
    if let Some((_, shape)) = &latents {
        let (h, w) = (shape[2] * 8, shape[3] * 8);
        if (h, w) != (height, width) {
            bail!(
                "--latents has spatial size {}x{} (an image of {w}x{h}), but --width/--height ask for {width}x{height}",
                shape[3], shape[2]
            );
        }
    }
    let init_image = match &image {
        None => None,
        Some(img) => {
            let mask = args
                .mask
                .as_deref()
                .map(|p| image::open(p).with_context(|| format!("--mask {}", p.display())))
                .transpose()?;
            if let Some(m) = &mask {
                if (m.width(), m.height()) != (img.width(), img.height()) {
                    bail!(
                        "--mask is {}x{} but --image is {}x{}",
                        m.width(),
                        m.height(),
                        img.width(),
                        img.height()
                    );
                }
            }
            let mask = mask
                .map(|m| Mask::from_dynamic(&m).resized(width, height))
                .transpose()?;
            let strength = args
                .strength
                .unwrap_or_else(|| InitImage::default_strength(mask.is_some()));
            Some(InitImage {
                image: Image::from_dynamic(img).resized(width, height)?,
                mask,
                strength,
            })
        }
    };
    let ip_adapter = match args.ip_adapter_image.as_slice() {
        [] => None,
        paths => Some(ImagePrompt {
            images: paths
                .iter()
                .map(|p| {
                    image::open(p)
                        .map(|img| Image::from_dynamic(&img))
                        .with_context(|| format!("--ip-adapter-image {}", p.display()))
                })
                .collect::<anyhow::Result<_>>()?,
            scale: args.ip_adapter_scale,
        }),
    };
    let request = GenerationRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        num_inference_steps: args.steps,
        guidance_scale: args.guidance,
        width,
        height,
        num_images,
        seed: args.seed,
        sampler,
        guidance_rescale: args.guidance_rescale,
        latents: latents.map(|(v, _)| v),
        init_image,
        prompt_syntax: args.prompt_args.prompt_syntax,
        clip_skip: args.prompt_args.clip_skip,
        controlnets: control_inputs(&args)?,
        ip_adapter,
        ..Default::default()
    };
    args.load.apply_threads();
    dispatch(&device, Generate { args, request })?
}

/// The sampler flags of `generate` and `bench`.
#[derive(Debug, Args)]
pub struct SamplerArgs {
    /// Sampler instead of the model's: euler, euler_karras, euler_a, heun, ddim,
    /// dpmpp_2m, dpmpp_2m_karras, dpmpp_2m_sde, dpmpp_2m_sde_karras, unipc, lcm, tcd.
    /// heun evaluates the UNet twice per step but the first; euler_a, dpmpp_2m_sde*, lcm
    /// and tcd draw noise from --seed during the run.
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Timestep spacing instead of the model's: leading, trailing (SDXL-Lightning,
    /// Hyper-SD, Turbo) or linspace. Not for lcm and tcd.
    #[arg(long)]
    pub timestep_spacing: Option<String>,
    /// TCD's gamma, 0–1 [default: 0.3]: the noise each step adds back. tcd only.
    #[arg(long)]
    pub eta: Option<f64>,
}

impl SamplerArgs {
    /// The library's settings from the flags.
    pub fn settings(&self) -> anyhow::Result<SamplerSettings> {
        Ok(SamplerSettings {
            kind: self
                .scheduler
                .as_deref()
                .map(str::parse::<SchedulerKind>)
                .transpose()?,
            timestep_spacing: self
                .timestep_spacing
                .as_deref()
                .map(str::parse::<Spacing>)
                .transpose()?,
            eta: self.eta,
        })
    }
}

/// Parses the command line and runs the command; the binary's whole `main`.
pub fn main() -> anyhow::Result<()> {
    run(Cli::parse())
}

/// Runs a parsed command line (logging to stderr, `RUST_LOG` or `info`).
pub fn run(cli: Cli) -> anyhow::Result<()> {
    logging::init(cli.log_format);
    match cli.command {
        Command::Bench(args) => bench(*args),
        Command::Generate(args) => generate(*args),
        Command::Preprocess(PreprocessCommand::Canny(args)) => {
            let input = image::open(&args.input)
                .with_context(|| format!("reading {}", args.input.display()))?;
            let edges = crate::pipeline::canny(&Image::from_dynamic(&input), args.low, args.high)?;
            std::fs::write(&args.out, edges.to_png()?)
                .with_context(|| format!("writing {}", args.out.display()))?;
            println!("{}", args.out.display());
            Ok(())
        }
        Command::Serve(args) => {
            tracing::info!(?args, "hypergen serve");
            let (config, bind) = args.server_config()?;
            if let Some(dir) = &args.autotune_cache {
                hypergen_kernels::set_autotune_cache(dir)
                    .map_err(anyhow::Error::msg)
                    .context("--autotune-cache")?;
            }
            args.load.apply_threads();
            crate::app::server::serve(config, &bind)
        }
        Command::Openapi => {
            println!("{}", crate::app::server::openapi_json());
            Ok(())
        }
        Command::Devices => {
            print!(
                "{}",
                crate::device::report(&crate::device::Inventory::probe())
            );
            Ok(())
        }
    }
}
