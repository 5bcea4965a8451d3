//! The server's limits: what a request may ask for, how large its body may be, how many
//! requests may wait. A leaf that the parsers, the error answers, the schema and the
//! command line all read, so that each limit is written once.
//!
//! The schema's validators (`#[oai(validator(...))]` in [`super::types`]) must be
//! literals; a test beside the schema (`schema_bounds_are_the_parsers`) proves that
//! every bound the schema states is the one the parsers check.

/// Largest request body the server reads, in bytes; larger ones get 413.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Largest edit form the server reads, in bytes (an image, a mask and the fields);
/// larger ones get 413.
pub const MAX_EDIT_BODY_BYTES: usize = 32 << 20;
/// Most pixels an input image or mask may have, read from its header before decoding
/// (decompression bombs are refused without being decoded).
pub const MAX_INPUT_PIXELS: u64 = 4096 * 4096;

/// Most images one request may ask for.
pub const MAX_IMAGES: u64 = 10;
/// Most denoising steps one request may ask for.
pub const MAX_STEPS: u64 = 150;
/// Largest guidance scale accepted.
pub const MAX_GUIDANCE: f64 = 20.0;
/// Largest LoRA scale accepted.
pub const MAX_LORA_SCALE: f64 = 2.0;
/// Most LoRA adapters one request may name (`lora_path` and `loras` together).
pub const MAX_REQUEST_LORAS: usize = 8;
/// Largest `clip_skip` a request may ask for: SDXL's first text encoder (CLIP ViT-L)
/// has 12 layers, and `hidden_states[-(11 + 2)]` is its embeddings. A model with fewer
/// layers takes less (its layers less one), refused per request.
pub const MAX_CLIP_SKIP: u64 = 11;
/// Longest `prompt` or `negative_prompt` in characters (OpenAI's limit for its image
/// models), refused before anything is tokenized.
pub const MAX_PROMPT_CHARS: u64 = 32_000;
/// Most chunks of 75 tokens a prompt in A1111 syntax may take (600 tokens; A1111's own UI
/// has no limit). Each chunk is a pass of both text encoders and 77 more keys and values
/// in every cross-attention of every step: for SDXL about 26 MB of prepared keys and
/// values per image row in float16, and under 1 % of a 1024² UNet evaluation.
pub const MAX_PROMPT_CHUNKS: usize = 8;
/// Most ControlNets one request may name.
pub const MAX_REQUEST_CONTROLNETS: usize = 4;
/// Largest ControlNet `scale` accepted.
pub const MAX_CONTROLNET_SCALE: f64 = 2.0;
/// Device memory for ControlNets kept loaded between batches unless configured
/// (`--controlnet-cache-mb`): two full-size SDXL ControlNets in float16.
pub const DEFAULT_CONTROLNET_CACHE_MB: usize = 5 << 10;
/// Most partial images a streamed request may ask for (OpenAI's limit).
pub const MAX_PARTIAL_IMAGES: u64 = 3;
/// Largest `output_compression`: OpenAI's scale, passed on as the JPEG quality, whose
/// best it is.
pub const MAX_OUTPUT_COMPRESSION: u64 = crate::pipeline::Encoding::BEST_QUALITY as u64;
/// Largest `guidance_rescale`: the guided prediction fully rescaled.
pub const MAX_GUIDANCE_RESCALE: f64 = 1.0;
/// Largest `eta` (TCD's γ): every step re-noised as LCM does.
pub const MAX_ETA: f64 = 1.0;
/// Largest `strength` of an edit: the whole schedule.
pub const MAX_STRENGTH: f64 = 1.0;

/// Accepted requests that may wait unless configured (`--max-queue-size`; HyperGen's).
pub const DEFAULT_MAX_QUEUE_SIZE: usize = 100;
/// Most queued requests run as one batch unless configured (`--max-batch-size`): one,
/// no batching.
pub const DEFAULT_MAX_BATCH_SIZE: usize = 1;

/// How large a request this server accepts: image sides (each a multiple of 8 in
/// `min_size..=max_size`), denoising steps and images per request (at most
/// [`MAX_STEPS`] and [`MAX_IMAGES`], lower on a server started with
/// `--max-steps`/`--max-images`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Smallest side in pixels.
    pub min_size: usize,
    /// Largest side in pixels.
    pub max_size: usize,
    /// Most denoising steps a request may ask for.
    pub max_steps: u64,
    /// Most images a request may ask for.
    pub max_images: u64,
}

impl RequestLimits {
    /// `hypergen serve`'s: sides of 64 to 2048 pixels, and the most steps and images
    /// the server ever takes.
    pub const DEFAULT: Self = Self {
        min_size: 64,
        max_size: 2048,
        max_steps: MAX_STEPS,
        max_images: MAX_IMAGES,
    };
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}
