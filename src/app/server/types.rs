//! The HTTP schema: every request, response and error body, as `poem-openapi` types with
//! descriptions and examples. OpenAI's Images API shapes, plus hypergen's extra fields.

use std::sync::Arc;

use poem_openapi::types::Example;
use poem_openapi::{Enum, Object};

use crate::load::lora::{LoraAdapter, LoraSpec};
use crate::pipeline::{OutputFormat, PromptSyntax, RequestDefaults};
use crate::scheduler::{SchedulerKind, Spacing};

/// Body of `POST /v1/images/generations`: OpenAI's image request, plus the diffusion
/// settings OpenAI does not have. Unknown fields are refused (400, `param` names them).
#[derive(Object, Debug, Clone, PartialEq)]
#[oai(example, skip_serializing_if_is_none)]
pub struct ImageGenerationRequest {
    /// What to draw, at most 32,000 characters. In AUTOMATIC1111's syntax unless
    /// `prompt_syntax` says `plain`: `(word:1.3)`, `((word))`, `[word]`, `\(` escapes,
    /// `BREAK`, textual-inversion names (`GET /v1/textual-inversions`),
    /// `<lora:NAME:WEIGHT>` (a LoRA adapter, as in `loras`), and no length limit (chunks
    /// of 75 tokens). `plain`: the first 77 tokens, the rest cut off.
    #[oai(validator(max_length = 32000))]
    pub prompt: String,
    /// Accepted for OpenAI compatibility and ignored: the server runs the model it was
    /// started with (see `GET /v1/models`).
    pub model: Option<String>,
    /// How many images to make from this prompt, 1 to 10.
    #[oai(
        default = "default_n",
        validator(minimum(value = "1"), maximum(value = "10"))
    )]
    pub n: u32,
    /// `WIDTHxHEIGHT` in pixels. Both must be multiples of 8 within the server's limits,
    /// 64 to 2048 unless it was started with other `--min-size`/`--max-size`. `auto`
    /// means 1024x1024.
    #[oai(default = "default_size")]
    pub size: String,
    /// Accepted for OpenAI compatibility and ignored.
    pub quality: Option<String>,
    /// Accepted for OpenAI compatibility and ignored.
    pub style: Option<String>,
    /// Accepted for OpenAI compatibility and ignored (not logged).
    pub user: Option<String>,
    /// `b64_json`: the PNG in the response; `url`: a link to the PNG on this server,
    /// valid for one hour.
    #[oai(default = "default_response_format")]
    pub response_format: ResponseFormat,
    /// The file format of the images: `png` (default; with the generation parameters in
    /// a `parameters` text chunk, as A1111 writes them, unless the server was started
    /// with `--no-png-parameters`), `jpeg` or `webp` (lossless).
    pub output_format: Option<OutputFormatName>,
    /// Compression level 0–100 (default 100). For `jpeg` it is the encoder's quality
    /// (100 = best; 0 is taken as 1). PNG and WebP are lossless and ignore it: the
    /// `image` crate has no lossy WebP encoder.
    #[oai(validator(minimum(value = "0"), maximum(value = "100")))]
    pub output_compression: Option<u8>,
    /// What to steer away from, read as `prompt` is (LoRA tags excepted, as in A1111).
    /// Absent or empty: zero conditioning, as SDXL does.
    #[oai(validator(max_length = 32000))]
    pub negative_prompt: Option<String>,
    /// Denoising steps, 1 to 150.
    #[oai(
        default = "default_steps",
        validator(minimum(value = "1"), maximum(value = "150"))
    )]
    pub num_inference_steps: u32,
    /// Classifier-free guidance scale, 0 to 20; 1 or less runs without guidance.
    #[oai(
        default = "default_guidance",
        validator(minimum(value = "0"), maximum(value = "20"))
    )]
    pub guidance_scale: f64,
    /// Noise seed: the same seed, settings and model give the same image on every
    /// device. Random when absent.
    pub seed: Option<u64>,
    /// A LoRA adapter for this request: its name inside the server's LoRA directory
    /// (`--lora-dir`; `GET /v1/loras` lists them), a `.safetensors` file (the extension
    /// may be left off) or a folder holding `pytorch_lora_weights.safetensors`. Absolute
    /// paths and `..` are refused. Added to the adapters merged at start (`--lora`).
    pub lora_path: Option<String>,
    /// Strength of `lora_path`, 0 to 2.
    #[oai(
        default = "default_lora_scale",
        validator(minimum(value = "0"), maximum(value = "2"))
    )]
    pub lora_scale: f64,
    /// hypergen's extension: several LoRA adapters at once, each a name inside the
    /// server's LoRA directory with its scale (after `lora_path`, if both are given; at
    /// most 8 in all). Their changes add up.
    #[oai(validator(max_items = 8))]
    pub loras: Option<Vec<LoraChoice>>,
    /// hypergen's SDXL extension: ControlNets steering the image (at most 4), each a
    /// name inside the server's ControlNet directory (`--controlnet-dir`;
    /// `GET /v1/controlnets` lists them) with its control image; their residuals add up.
    #[oai(validator(max_items = 4))]
    pub controlnets: Option<Vec<ControlNetChoice>>,
    /// The sampler; absent: the model's own scheduler config. `heun` evaluates the
    /// model twice per step (all but the first); `euler_ancestral`, `dpmpp_2m_sde*`,
    /// `lcm` and `tcd` draw fresh noise from the seed during the run.
    pub scheduler: Option<SchedulerName>,
    /// hypergen's extension: how the steps are spread over the noise schedule, in place
    /// of the model's (`trailing` for SDXL-Lightning, Hyper-SD and Turbo). `lcm` and
    /// `tcd` take none.
    pub timestep_spacing: Option<SpacingName>,
    /// hypergen's extension: diffusers' `guidance_rescale`, 0 to 1 (default 0, off):
    /// rescales the guided prediction towards the conditional one's standard deviation,
    /// as v-prediction models with zero terminal SNR need (0.7 is the paper's).
    #[oai(validator(minimum(value = "0"), maximum(value = "1")))]
    pub guidance_rescale: Option<f64>,
    /// hypergen's extension: TCD's gamma, 0 to 1 (default 0.3), the noise each step
    /// adds back; only `tcd` takes it.
    #[oai(validator(minimum(value = "0"), maximum(value = "1")))]
    pub eta: Option<f64>,
    /// `true`: answer `text/event-stream` with OpenAI's streaming events
    /// (`image_generation.partial_image`, then one `image_generation.completed` per
    /// image) instead of one JSON body. The images are always `b64_json`.
    pub stream: Option<bool>,
    /// With `stream`, how many partial images to send, 0 to 3 (default 0): the decoded
    /// current estimate of the finished image, evenly spaced over the steps. Each costs
    /// one VAE decode.
    #[oai(validator(maximum(value = "3")))]
    pub partial_images: Option<u32>,
    /// hypergen's extension: with `stream`, also send `hypergen.progress` events: every
    /// second while the job waits (`queue_position`), then after every denoising step
    /// (`step`, `total`, `elapsed_seconds`). OpenAI's clients do not
    /// know the event; leave it unset for them.
    pub stream_progress: Option<bool>,
    /// hypergen's extension: how `prompt` and `negative_prompt` are read, `a1111`
    /// (AUTOMATIC1111's syntax) or `plain` (diffusers': the text as it is, cut at 77
    /// tokens). Absent: the server's `--prompt-syntax` (`a1111` unless set).
    pub prompt_syntax: Option<PromptSyntaxName>,
    /// hypergen's extension: diffusers' `clip_skip`, 0 to 11, for the prompt and the
    /// negative prompt: both text encoders' `hidden_states[-(clip_skip + 2)]`. 0 is
    /// SDXL's default (the penultimate layer, A1111's and Civitai's "Clip skip: 2");
    /// `clip_skip` N is A1111's "Clip skip: N + 2". Absent: the server's `--clip-skip`.
    #[oai(validator(maximum(value = "11")))]
    pub clip_skip: Option<u32>,
}

/// Default of [`ImageGenerationRequest::n`].
pub fn default_n() -> u32 {
    1
}
/// Default of [`ImageGenerationRequest::size`].
pub fn default_size() -> String {
    let d = RequestDefaults::SERVER;
    format!("{}x{}", d.width, d.height)
}
/// Default of [`ImageGenerationRequest::response_format`].
pub fn default_response_format() -> ResponseFormat {
    ResponseFormat::B64Json
}
/// Default of [`ImageGenerationRequest::num_inference_steps`].
pub fn default_steps() -> u32 {
    RequestDefaults::SERVER.steps as u32
}
/// Default of [`ImageGenerationRequest::guidance_scale`].
pub fn default_guidance() -> f64 {
    RequestDefaults::SERVER.guidance_scale
}
/// A ControlNet a request asks for (an entry of `controlnets`).
#[derive(Object, Debug, Clone, PartialEq)]
#[oai(example)]
pub struct ControlNetChoice {
    /// Its name inside the server's ControlNet directory (a diffusers folder, or a
    /// `.safetensors` file whose extension may be left off).
    pub model: String,
    /// The control image (an edge, depth or pose map; a photo with `preprocess`), as
    /// base64 or a `data:image/...;base64,` URL (PNG, JPEG or WebP). Resized to the
    /// output size with a Lanczos filter when it differs.
    pub image: String,
    /// `controlnet_conditioning_scale`, 0 to 2 (default 1).
    #[oai(
        default = "default_controlnet_scale",
        validator(minimum(value = "0"), maximum(value = "2"))
    )]
    pub scale: f64,
    /// The fraction of the steps before which it is off, 0 to 1 (default 0).
    #[oai(validator(minimum(value = "0"), maximum(value = "1")))]
    pub guidance_start: Option<f64>,
    /// The fraction of the steps after which it is off, 0 to 1 (default 1); more than
    /// `guidance_start`.
    #[oai(validator(minimum(value = "0"), maximum(value = "1")))]
    pub guidance_end: Option<f64>,
    /// Turn `image` into the map first: `canny` (OpenCV's edge map, thresholds 100 and
    /// 200). Absent or `none`: `image` is the map. Depth and pose maps need models of
    /// their own: send the map.
    pub preprocess: Option<PreprocessName>,
    /// diffusers' `guess_mode` (default false): the ControlNet sees the positive prompt's
    /// rows only and its residuals ramp from 0.1 to 1 × `scale`; for empty prompts, with
    /// `guidance_scale` 3 to 5.
    pub guess_mode: Option<bool>,
}

/// Default of [`ControlNetChoice::scale`].
pub fn default_controlnet_scale() -> f64 {
    1.0
}

impl Example for ControlNetChoice {
    fn example() -> Self {
        Self {
            model: "controlnet-canny-sdxl-1.0".into(),
            image: "data:image/png;base64,iVBORw0KGgo...".into(),
            scale: 0.8,
            guidance_start: None,
            guidance_end: Some(0.8),
            preprocess: Some(PreprocessName::Canny),
            guess_mode: None,
        }
    }
}

/// A control image preprocessor.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreprocessName {
    /// The image is the map already.
    #[oai(rename = "none")]
    None,
    /// OpenCV's canny edge map of the image.
    #[oai(rename = "canny")]
    Canny,
}

/// Response of `GET /v1/controlnets`: the ControlNets requests may name.
#[derive(Object, Debug, Clone, PartialEq)]
#[oai(example)]
pub struct ControlNetList {
    /// Always `list`.
    pub object: String,
    /// Whether the server takes ControlNets (started with `--controlnet-dir`). When
    /// false, `data` is empty and requests that name one are refused.
    pub enabled: bool,
    /// The ControlNets in the directory, by name.
    pub data: Vec<ControlNetFile>,
}

impl Example for ControlNetList {
    fn example() -> Self {
        Self {
            object: "list".into(),
            enabled: true,
            data: vec![ControlNetFile::example()],
        }
    }
}

/// A ControlNet in the server's ControlNet directory.
#[derive(Object, Debug, Clone, PartialEq)]
#[oai(example)]
pub struct ControlNetFile {
    /// The name to use as a `controlnets` entry's `model`.
    pub id: String,
    /// Always `controlnet`.
    pub object: String,
    /// Size of its weight file in bytes.
    pub bytes: u64,
}

impl Example for ControlNetFile {
    fn example() -> Self {
        Self {
            id: "controlnet-canny-sdxl-1.0".into(),
            object: "controlnet".into(),
            bytes: 5_004_167_864,
        }
    }
}

/// Default of [`ImageGenerationRequest::lora_scale`].
pub fn default_lora_scale() -> f64 {
    1.0
}

/// A LoRA adapter a request asks for (an entry of `loras`).
#[derive(Object, Debug, Clone, PartialEq)]
#[oai(example)]
pub struct LoraChoice {
    /// Its name inside the server's LoRA directory, as `lora_path` takes it.
    pub path: String,
    /// Its strength, 0 to 2.
    #[oai(
        default = "default_lora_scale",
        validator(minimum(value = "0"), maximum(value = "2"))
    )]
    pub scale: f64,
}

/// The library's request for the adapter: its name in the LoRA directory at its scale.
impl From<&LoraChoice> for LoraSpec<String> {
    fn from(choice: &LoraChoice) -> Self {
        LoraSpec::new(choice.path.clone(), choice.scale as f32)
    }
}

impl Example for LoraChoice {
    fn example() -> Self {
        Self {
            path: "pixel-art-xl.safetensors".into(),
            scale: 0.8,
        }
    }
}

/// Response of `GET /v1/loras`: the adapters requests may name.
#[derive(Object, Debug, Clone, PartialEq)]
#[oai(example)]
pub struct LoraList {
    /// Always `list`.
    pub object: String,
    /// Whether the server takes LoRA adapters per request (started with `--lora-dir`).
    /// When false, `data` is empty and requests that name an adapter are refused.
    pub enabled: bool,
    /// The adapters in the LoRA directory, by name.
    pub data: Vec<LoraFile>,
}

impl Example for LoraList {
    fn example() -> Self {
        Self {
            object: "list".into(),
            enabled: true,
            data: vec![LoraFile::example()],
        }
    }
}

/// Body of `POST /v1/tokenize`: a prompt to count the tokens of. Unknown fields are
/// refused.
#[derive(Object, Debug, Clone, PartialEq)]
#[oai(example)]
pub struct TokenizeRequest {
    /// The prompt, at most 32,000 characters.
    #[oai(validator(max_length = 32000))]
    pub prompt: String,
    /// `a1111` or `plain`, as in `/v1/images/generations` (absent: the server's).
    pub prompt_syntax: Option<PromptSyntaxName>,
}

impl Example for TokenizeRequest {
    fn example() -> Self {
        Self {
            prompt: "a (photo:1.3) of an astronaut BREAK riding a horse on mars".into(),
            prompt_syntax: None,
        }
    }
}

/// Response of `POST /v1/tokenize`: the prompt's tokens per chunk of the text encoder,
/// as A1111 shows them (`80/150`: 80 tokens, two chunks of 75).
#[derive(Object, Debug, Clone, PartialEq)]
#[oai(example)]
pub struct TokenizeResponse {
    /// Always `prompt.tokens`.
    pub object: String,
    /// How the prompt was read.
    pub prompt_syntax: PromptSyntaxName,
    /// Tokens in each chunk, BOS, EOS and padding not counted. `plain`: one entry, all
    /// the prompt's tokens, of which only the first `chunk_length` are read.
    pub chunks: Vec<u32>,
    /// A1111's count: every chunk but the last counted full (a `BREAK` or a comma
    /// moving words on leaves a chunk short), plus the last chunk's tokens.
    pub total: u32,
    /// Tokens one chunk holds: 75 for CLIP.
    pub chunk_length: u32,
}

impl Example for TokenizeResponse {
    fn example() -> Self {
        Self {
            object: "prompt.tokens".into(),
            prompt_syntax: PromptSyntaxName::A1111,
            chunks: vec![6, 6],
            total: 81,
            chunk_length: 75,
        }
    }
}

/// Response of `GET /v1/textual-inversions`: the embeddings a prompt may name.
#[derive(Object, Debug, Clone, PartialEq)]
#[oai(example)]
pub struct TextualInversionList {
    /// Always `list`.
    pub object: String,
    /// Whether the server loaded embeddings (started with `--embeddings-dir`).
    pub enabled: bool,
    /// The embeddings, by name.
    pub data: Vec<TextualInversionEntry>,
    /// Files of the directory that were not loaded, each with why (a pickle, widths
    /// that do not fit the model, …).
    pub skipped: Vec<String>,
}

impl Example for TextualInversionList {
    fn example() -> Self {
        Self {
            object: "list".into(),
            enabled: true,
            data: vec![TextualInversionEntry::example()],
            skipped: Vec::new(),
        }
    }
}

/// A textual-inversion embedding: the word that inserts it in a prompt (in A1111
/// syntax) and how many tokens it takes.
#[derive(Object, Debug, Clone, PartialEq)]
#[oai(example)]
pub struct TextualInversionEntry {
    /// The word: the file's name without `.safetensors`.
    pub id: String,
    /// Always `textual_inversion`.
    pub object: String,
    /// Vectors (tokens of the 75 of a chunk) it inserts.
    pub vectors: u32,
}

impl Example for TextualInversionEntry {
    fn example() -> Self {
        Self {
            id: "negativeXL_D".into(),
            object: "textual_inversion".into(),
            vectors: 8,
        }
    }
}

/// An adapter in the server's LoRA directory.
#[derive(Object, Debug, Clone, PartialEq)]
#[oai(example)]
pub struct LoraFile {
    /// The name to use as `lora_path` (or a `loras` entry's `path`).
    pub id: String,
    /// Always `lora`.
    pub object: String,
    /// Size of its weight file in bytes.
    pub bytes: u64,
}

impl Example for LoraFile {
    fn example() -> Self {
        Self {
            id: "pixel-art-xl.safetensors".into(),
            object: "lora".into(),
            bytes: 170_543_052,
        }
    }
}

impl Example for ImageGenerationRequest {
    fn example() -> Self {
        Self {
            prompt: "a photo of an astronaut riding a horse on mars".into(),
            model: Some("stabilityai/stable-diffusion-xl-base-1.0".into()),
            n: 1,
            size: "1024x1024".into(),
            quality: None,
            style: None,
            user: None,
            response_format: ResponseFormat::B64Json,
            output_format: Some(OutputFormatName::Png),
            output_compression: None,
            negative_prompt: Some("blurry, low quality".into()),
            num_inference_steps: 30,
            guidance_scale: 5.0,
            seed: Some(42),
            lora_path: None,
            lora_scale: 1.0,
            loras: None,
            controlnets: None,
            scheduler: Some(SchedulerName::Euler),
            timestep_spacing: None,
            guidance_rescale: None,
            eta: None,
            stream: None,
            partial_images: None,
            stream_progress: None,
            prompt_syntax: None,
            clip_skip: None,
        }
    }
}

/// Form of `POST /v1/images/edits` (`multipart/form-data`): OpenAI's image edit, plus
/// the SDXL settings of `/v1/images/generations` and `strength`. Without `mask` the whole
/// image is changed (image-to-image); with one, only the masked region is repainted
/// (inpainting with the base model: after every step the kept region is reset to the
/// original, re-noised to the step's level).
#[derive(poem_openapi::Multipart, Debug)]
pub struct ImageEditRequest {
    /// The image to edit: PNG, JPEG or WebP, at most 4096×4096 pixels (checked from the
    /// file's header before decoding). Alpha is dropped. An image whose size differs
    /// from `size` is resized to it with a Lanczos (Lanczos3) filter. `image[]` is read
    /// as `image` (the first one is used).
    pub image: poem_openapi::types::multipart::Upload,
    /// Where to edit, the image's size. With transparency, OpenAI's convention: pixels
    /// with alpha 0 (up to 127) are repainted, opaque ones kept. Without (fully opaque
    /// or no alpha channel), diffusers' convention: white (luminance ≥ 128) is repainted,
    /// black kept.
    pub mask: Option<poem_openapi::types::multipart::Upload>,
    /// What the edited image should show, at most 32,000 characters, read as
    /// `/v1/images/generations` reads it (`prompt_syntax`).
    #[oai(validator(max_length = 32000))]
    pub prompt: String,
    /// Accepted for OpenAI compatibility and ignored.
    pub model: Option<String>,
    /// How many images, 1 to 10.
    #[oai(validator(minimum(value = "1"), maximum(value = "10")))]
    pub n: Option<u32>,
    /// `WIDTHxHEIGHT` of the output, multiples of 8 within the server's limits. Absent
    /// or `auto`: the image's size, rounded down to multiples of 8.
    pub size: Option<String>,
    /// `b64_json` (default) or `url`.
    pub response_format: Option<ResponseFormat>,
    /// `png` (default, with the A1111 `parameters` chunk), `jpeg` or `webp` (lossless).
    pub output_format: Option<OutputFormatName>,
    /// 0–100, default 100: the JPEG quality; PNG and WebP are lossless and ignore it.
    #[oai(validator(maximum(value = "100")))]
    pub output_compression: Option<u8>,
    /// `true`: answer `text/event-stream` with `image_edit.partial_image` and
    /// `image_edit.completed` events (as `/v1/images/generations` streams).
    pub stream: Option<bool>,
    /// With `stream`, how many partial images to send, 0 to 3 (default 0).
    #[oai(validator(maximum(value = "3")))]
    pub partial_images: Option<u32>,
    /// hypergen's extension: with `stream`, a `hypergen.progress` event after every step.
    pub stream_progress: Option<bool>,
    /// Accepted for OpenAI compatibility and ignored (not logged).
    pub user: Option<String>,
    /// How much of the schedule runs, 0 to 1: the run starts at step
    /// `steps − ⌊steps × strength⌋` (diffusers' `strength`). Default 0.75 without a
    /// mask, 1.0 (the masked region from pure noise) with one. `steps × strength` must be
    /// at least 1.
    #[oai(validator(minimum(value = "0"), maximum(value = "1")))]
    pub strength: Option<f64>,
    /// What to steer away from.
    #[oai(validator(max_length = 32000))]
    pub negative_prompt: Option<String>,
    /// `a1111` (default unless the server says otherwise) or `plain`, as in
    /// `/v1/images/generations`.
    pub prompt_syntax: Option<PromptSyntaxName>,
    /// diffusers' `clip_skip`, 0 to 11, as in `/v1/images/generations`.
    #[oai(validator(maximum(value = "11")))]
    pub clip_skip: Option<u32>,
    /// Denoising steps of the whole schedule, 1 to 150 (default 50).
    #[oai(validator(minimum(value = "1"), maximum(value = "150")))]
    pub num_inference_steps: Option<u32>,
    /// Classifier-free guidance scale, 0 to 20 (default 7.5).
    #[oai(validator(minimum(value = "0"), maximum(value = "20")))]
    pub guidance_scale: Option<f64>,
    /// Noise seed (random when absent). The image's latent sample is drawn first, then
    /// the noise, as diffusers draws them.
    pub seed: Option<u64>,
    /// The sampler; absent: the model's own scheduler config. `heun` evaluates the
    /// model twice per step (all but the first); `euler_ancestral`, `dpmpp_2m_sde*`,
    /// `lcm` and `tcd` draw fresh noise from the seed during the run.
    pub scheduler: Option<SchedulerName>,
    /// hypergen's extension: how the steps are spread over the noise schedule, in place
    /// of the model's (`trailing` for SDXL-Lightning, Hyper-SD and Turbo). `lcm` and
    /// `tcd` take none.
    pub timestep_spacing: Option<SpacingName>,
    /// hypergen's extension: diffusers' `guidance_rescale`, 0 to 1 (default 0, off):
    /// rescales the guided prediction towards the conditional one's standard deviation,
    /// as v-prediction models with zero terminal SNR need (0.7 is the paper's).
    #[oai(validator(minimum(value = "0"), maximum(value = "1")))]
    pub guidance_rescale: Option<f64>,
    /// hypergen's extension: TCD's gamma, 0 to 1 (default 0.3), the noise each step
    /// adds back; only `tcd` takes it.
    #[oai(validator(minimum(value = "0"), maximum(value = "1")))]
    pub eta: Option<f64>,
    /// A LoRA adapter for this edit, as in `/v1/images/generations`.
    pub lora_path: Option<String>,
    /// Strength of `lora_path`, 0 to 2 (default 1).
    #[oai(validator(minimum(value = "0"), maximum(value = "2")))]
    pub lora_scale: Option<f64>,
    /// Several LoRA adapters, as in `/v1/images/generations`, written as JSON text:
    /// `[{"path": "pixel-art-xl.safetensors", "scale": 0.8}]`.
    pub loras: Option<String>,
    /// ControlNets, as in `/v1/images/generations`, written as JSON text:
    /// `[{"model": "canny", "image": "<base64>", "scale": 0.8}]`. The control image is
    /// separate from `image` (which the edit starts from).
    pub controlnets: Option<String>,
}

/// How prompts are read (`prompt_syntax`).
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptSyntaxName {
    /// AUTOMATIC1111's syntax: weights, `BREAK`, escapes, embeddings, LoRA tags, any
    /// length.
    #[oai(rename = "a1111")]
    A1111,
    /// diffusers': the text as it is, cut at 77 tokens.
    #[oai(rename = "plain")]
    Plain,
}

impl From<PromptSyntaxName> for PromptSyntax {
    fn from(name: PromptSyntaxName) -> Self {
        match name {
            PromptSyntaxName::A1111 => PromptSyntax::A1111,
            PromptSyntaxName::Plain => PromptSyntax::Plain,
        }
    }
}

/// The file formats of `output_format`.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormatName {
    /// PNG (lossless).
    #[oai(rename = "png")]
    Png,
    /// JPEG.
    #[oai(rename = "jpeg")]
    Jpeg,
    /// WebP (lossless).
    #[oai(rename = "webp")]
    Webp,
}

impl From<OutputFormatName> for OutputFormat {
    fn from(f: OutputFormatName) -> Self {
        match f {
            OutputFormatName::Png => OutputFormat::Png,
            OutputFormatName::Jpeg => OutputFormat::Jpeg,
            OutputFormatName::Webp => OutputFormat::Webp,
        }
    }
}

/// How generated images are returned.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFormat {
    /// Base64-encoded PNG in `b64_json`.
    #[oai(rename = "b64_json")]
    B64Json,
    /// A URL on this server serving the PNG for one hour, in `url`.
    #[oai(rename = "url")]
    Url,
}

/// A sampler hypergen implements (the names of `hypergen generate --scheduler`).
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerName {
    /// Euler (diffusers' `EulerDiscreteScheduler`).
    #[oai(rename = "euler")]
    Euler,
    /// Euler with Karras sigmas.
    #[oai(rename = "euler_karras")]
    EulerKarras,
    /// Euler ancestral (stochastic: draws noise from the seed at every step).
    #[oai(rename = "euler_ancestral")]
    EulerAncestral,
    /// DDIM with η = 0.
    #[oai(rename = "ddim")]
    Ddim,
    /// DPM-Solver++ 2M.
    #[oai(rename = "dpmpp_2m")]
    DpmPp2m,
    /// DPM-Solver++ 2M with Karras sigmas.
    #[oai(rename = "dpmpp_2m_karras")]
    DpmPp2mKarras,
    /// DPM-Solver++ 2M SDE (stochastic: draws noise from the seed at every step).
    #[oai(rename = "dpmpp_2m_sde")]
    DpmPp2mSde,
    /// DPM-Solver++ 2M SDE with Karras sigmas.
    #[oai(rename = "dpmpp_2m_sde_karras")]
    DpmPp2mSdeKarras,
    /// Heun (second order: two model evaluations per step but the first).
    #[oai(rename = "heun")]
    Heun,
    /// UniPC (predictor–corrector, one model evaluation per step).
    #[oai(rename = "unipc")]
    UniPc,
    /// LCM, for LCM checkpoints and LCM-LoRA (4–8 steps, guidance 1–2).
    #[oai(rename = "lcm")]
    Lcm,
    /// TCD, for TCD-LoRA (4–8 steps; `eta` sets its noise).
    #[oai(rename = "tcd")]
    Tcd,
}

/// A timestep spacing (diffusers' `timestep_spacing`).
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpacingName {
    /// From 0 upwards in even strides plus the config's offset (SDXL base's own).
    #[oai(rename = "leading")]
    Leading,
    /// From the last training timestep down in even strides (few-step models).
    #[oai(rename = "trailing")]
    Trailing,
    /// Evenly from the last training timestep to 0.
    #[oai(rename = "linspace")]
    Linspace,
}

impl From<SpacingName> for Spacing {
    fn from(name: SpacingName) -> Self {
        match name {
            SpacingName::Leading => Spacing::Leading,
            SpacingName::Trailing => Spacing::Trailing,
            SpacingName::Linspace => Spacing::Linspace,
        }
    }
}

impl From<Spacing> for SpacingName {
    fn from(spacing: Spacing) -> Self {
        match spacing {
            Spacing::Leading => SpacingName::Leading,
            Spacing::Trailing => SpacingName::Trailing,
            Spacing::Linspace => SpacingName::Linspace,
        }
    }
}

impl From<SchedulerKind> for SchedulerName {
    fn from(kind: SchedulerKind) -> Self {
        match kind {
            SchedulerKind::Euler => SchedulerName::Euler,
            SchedulerKind::EulerKarras => SchedulerName::EulerKarras,
            SchedulerKind::EulerAncestral => SchedulerName::EulerAncestral,
            SchedulerKind::Ddim => SchedulerName::Ddim,
            SchedulerKind::DpmPp2m => SchedulerName::DpmPp2m,
            SchedulerKind::DpmPp2mKarras => SchedulerName::DpmPp2mKarras,
            SchedulerKind::DpmPp2mSde => SchedulerName::DpmPp2mSde,
            SchedulerKind::DpmPp2mSdeKarras => SchedulerName::DpmPp2mSdeKarras,
            SchedulerKind::Heun => SchedulerName::Heun,
            SchedulerKind::UniPc => SchedulerName::UniPc,
            SchedulerKind::Lcm => SchedulerName::Lcm,
            SchedulerKind::Tcd => SchedulerName::Tcd,
        }
    }
}

impl From<SchedulerName> for SchedulerKind {
    fn from(name: SchedulerName) -> Self {
        match name {
            SchedulerName::Euler => SchedulerKind::Euler,
            SchedulerName::EulerKarras => SchedulerKind::EulerKarras,
            SchedulerName::EulerAncestral => SchedulerKind::EulerAncestral,
            SchedulerName::Ddim => SchedulerKind::Ddim,
            SchedulerName::DpmPp2m => SchedulerKind::DpmPp2m,
            SchedulerName::DpmPp2mKarras => SchedulerKind::DpmPp2mKarras,
            SchedulerName::DpmPp2mSde => SchedulerKind::DpmPp2mSde,
            SchedulerName::DpmPp2mSdeKarras => SchedulerKind::DpmPp2mSdeKarras,
            SchedulerName::Heun => SchedulerKind::Heun,
            SchedulerName::UniPc => SchedulerKind::UniPc,
            SchedulerName::Lcm => SchedulerKind::Lcm,
            SchedulerName::Tcd => SchedulerKind::Tcd,
        }
    }
}

/// Response of `POST /v1/images/generations` (OpenAI's `ImagesResponse`).
#[derive(Object, Debug, Clone, PartialEq)]
#[oai(example)]
pub struct ImagesResponse {
    /// When the images were made, in Unix seconds.
    pub created: i64,
    /// One entry per image, in order.
    pub data: Vec<ImageData>,
}

impl Example for ImagesResponse {
    fn example() -> Self {
        Self {
            created: 1_700_000_000,
            data: vec![ImageData::example()],
        }
    }
}

/// One generated image: `b64_json` or `url`, as the request's `response_format` asked.
#[derive(Object, Debug, Clone, PartialEq)]
#[oai(example, skip_serializing_if_is_none)]
pub struct ImageData {
    /// The PNG, base64-encoded (`response_format` `b64_json`).
    pub b64_json: Option<String>,
    /// Where to download the PNG (`response_format` `url`); valid for one hour, with
    /// the same `Authorization` as the API when the server has a key.
    pub url: Option<String>,
    /// The prompt the image was made from (hypergen does not rewrite prompts).
    pub revised_prompt: Option<String>,
}

impl Example for ImageData {
    fn example() -> Self {
        Self {
            b64_json: None,
            url: Some(
                "http://localhost:8000/v1/images/files/6f1c0e7d9b2a4c1e8f3a5b7d9e0f1a2b".into(),
            ),
            revised_prompt: Some("a photo of an astronaut riding a horse on mars".into()),
        }
    }
}

/// Whether the server can take requests.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[oai(rename_all = "lowercase")]
pub enum HealthStatus {
    /// The model is loaded and the worker is taking jobs.
    Healthy,
    /// The worker has stopped or the server is shutting down.
    Unhealthy,
}

/// Response of `GET /health`.
#[derive(Object, Debug, Clone, PartialEq)]
#[oai(example)]
pub struct HealthResponse {
    /// `healthy`, or `unhealthy` when the worker cannot serve.
    pub status: HealthStatus,
    /// The model the server was started with, as it was named.
    pub model: String,
    /// Accepted requests that have not started yet.
    pub queue_size: u64,
    /// The device the model runs on (`cpu`, `cuda:0`, `vulkan`, …).
    pub device: String,
    /// LoRA adapters merged into the model at start (`--lora`), in order.
    pub loras: Vec<LoadedLora>,
}

/// A LoRA adapter merged into the served model.
#[derive(Object, Debug, Clone, PartialEq)]
#[oai(example)]
pub struct LoadedLora {
    /// The adapter as it was named (`--lora PATH`).
    pub name: String,
    /// Its scale.
    pub scale: f64,
}

impl Example for LoadedLora {
    fn example() -> Self {
        Self {
            name: "loras/pixel-art-xl.safetensors".into(),
            scale: 0.8,
        }
    }
}

/// A merged adapter as the answers show it: the name it was merged under.
impl From<&LoraSpec<Arc<LoraAdapter>>> for LoadedLora {
    fn from(merged: &LoraSpec<Arc<LoraAdapter>>) -> Self {
        Self {
            name: merged.source.name().to_string(),
            scale: f64::from(merged.scale),
        }
    }
}

impl Example for HealthResponse {
    fn example() -> Self {
        Self {
            status: HealthStatus::Healthy,
            model: "./stable-diffusion-xl-base-1.0".into(),
            queue_size: 0,
            device: "cuda:0".into(),
            loras: vec![LoadedLora::example()],
        }
    }
}

/// Response of `GET /v1/models` (OpenAI's list object).
#[derive(Object, Debug, Clone, PartialEq)]
#[oai(example)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    /// The loaded model.
    pub data: Vec<Model>,
}

impl Example for ModelList {
    fn example() -> Self {
        Self {
            object: "list".into(),
            data: vec![Model::example()],
        }
    }
}

/// A model the server serves (OpenAI's model object).
#[derive(Object, Debug, Clone, PartialEq)]
#[oai(example)]
pub struct Model {
    /// The model as the server was started with it.
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// When the server loaded it, in Unix seconds.
    pub created: i64,
    /// Always `hypergen`.
    pub owned_by: String,
    /// True for hypergen's built-in models, whose weights are random: their images are
    /// noise (for tests and benchmarks).
    pub random_weights: bool,
    /// LoRA adapters merged into it at start (`--lora`), in order.
    pub loras: Vec<LoadedLora>,
}

impl Example for Model {
    fn example() -> Self {
        Self {
            id: "./stable-diffusion-xl-base-1.0".into(),
            object: "model".into(),
            created: 1_700_000_000,
            owned_by: "hypergen".into(),
            random_weights: false,
            loras: Vec::new(),
        }
    }
}

/// Every error response: OpenAI's error object.
#[derive(Object, Debug, Clone, PartialEq)]
#[oai(example)]
pub struct ErrorResponse {
    /// What went wrong.
    pub error: ErrorBody,
}

impl Example for ErrorResponse {
    fn example() -> Self {
        Self {
            error: ErrorBody {
                message: "`n` must be between 1 and 10, got 12".into(),
                kind: "invalid_request_error".into(),
                param: Some("n".into()),
                code: Some("invalid_value".into()),
            },
        }
    }
}

/// The content of an error response.
#[derive(Object, Debug, Clone, PartialEq)]
#[oai(example)]
pub struct ErrorBody {
    /// A human-readable explanation.
    pub message: String,
    /// `invalid_request_error` (400, 401, 404, 405, 413) or `server_error` (500, 503),
    /// as OpenAI names them.
    #[oai(rename = "type")]
    pub kind: String,
    /// The request field at fault, for invalid input; else null.
    pub param: Option<String>,
    /// A machine-readable code (`invalid_value`, `invalid_type`, `missing_field`,
    /// `unknown_field`, `invalid_json`, `invalid_api_key`, `missing_api_key`,
    /// `not_found`, `method_not_allowed`, `request_too_large`, `queue_full`,
    /// `shutting_down`, `generation_failed`, `internal_error`).
    pub code: Option<String>,
}

impl Example for ErrorBody {
    fn example() -> Self {
        ErrorResponse::example().error
    }
}

/// One event of a streamed answer (`stream: true`), sent as
/// `event: <type>` / `data: <this object as JSON>`. OpenAI's events
/// (`image_generation.partial_image`, `image_generation.completed`,
/// `image_edit.partial_image`, `image_edit.completed`) carry the image fields; hypergen's
/// `hypergen.progress` (only with `stream_progress: true`) carries `step`, `total` and
/// `elapsed_seconds`; `error` carries OpenAI's error object and ends the stream.
#[derive(Object, Debug, Clone, PartialEq)]
#[oai(example, skip_serializing_if_is_none)]
pub struct ImageStreamEvent {
    /// The event's type, the same as its SSE `event:` name.
    #[oai(rename = "type")]
    pub kind: String,
    /// The image (partial or final), base64-encoded in `output_format`.
    pub b64_json: Option<String>,
    /// Unix time (seconds) the event was made.
    pub created_at: Option<i64>,
    /// `WIDTHxHEIGHT` of the image.
    pub size: Option<String>,
    /// The request's `quality`, `auto` when it gave none (hypergen ignores it).
    pub quality: Option<String>,
    /// Always `opaque`: SDXL images have no transparency.
    pub background: Option<String>,
    /// `png`, `jpeg` or `webp`.
    pub output_format: Option<String>,
    /// Partial events: which partial image, from 0.
    pub partial_image_index: Option<u32>,
    /// Completed events: token usage, always zeros (hypergen does not count tokens).
    pub usage: Option<StreamUsage>,
    /// `hypergen.progress`: steps finished.
    pub step: Option<u32>,
    /// `hypergen.progress`: steps in all.
    pub total: Option<u32>,
    /// `hypergen.progress`: seconds since the job started running.
    pub elapsed_seconds: Option<f64>,
    /// `hypergen.progress` while the job waits to start (then without `step`): how many
    /// accepted jobs are ahead of it.
    pub queue_position: Option<u32>,
    /// `error`: what went wrong.
    pub error: Option<ErrorBody>,
}

/// OpenAI's token usage of a completed image; hypergen reports zeros.
#[derive(Object, Debug, Clone, Default, PartialEq)]
#[oai(example)]
pub struct StreamUsage {
    /// Always 0.
    pub total_tokens: u64,
    /// Always 0.
    pub input_tokens: u64,
    /// Always 0.
    pub output_tokens: u64,
    /// Always zeros.
    pub input_tokens_details: StreamUsageDetails,
}

/// OpenAI's breakdown of input tokens; hypergen reports zeros.
#[derive(Object, Debug, Clone, Default, PartialEq)]
#[oai(example)]
pub struct StreamUsageDetails {
    /// Always 0.
    pub text_tokens: u64,
    /// Always 0.
    pub image_tokens: u64,
}

impl Example for ImageStreamEvent {
    fn example() -> Self {
        Self {
            kind: "image_generation.completed".into(),
            b64_json: Some("iVBORw0KGgo...".into()),
            created_at: Some(1_700_000_000),
            size: Some("1024x1024".into()),
            quality: Some("auto".into()),
            background: Some("opaque".into()),
            output_format: Some("png".into()),
            partial_image_index: None,
            usage: Some(StreamUsage::default()),
            step: None,
            total: None,
            elapsed_seconds: None,
            queue_position: None,
            error: None,
        }
    }
}

impl Example for StreamUsage {
    fn example() -> Self {
        Self::default()
    }
}

impl Example for StreamUsageDetails {
    fn example() -> Self {
        Self::default()
    }
}
