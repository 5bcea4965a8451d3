//! The server's limits: what a request may ask for and how large its body may be. A leaf
//! that the parsers, the error answers, the schema and the command line all read.

/// Largest request body the server reads, in bytes; larger ones get 413.
pub const MAX_BODY_BYTES: usize = 1 << 20;
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

/// How large a request the server accepts: image sides (each a multiple of 8 in
/// `min..=max`), denoising steps and images per request (at most [`MAX_STEPS`] and
/// [`MAX_IMAGES`], lower on a server started with `--max-steps`/`--max-images`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeLimits {
    /// Smallest side in pixels.
    pub min: usize,
    /// Largest side in pixels.
    pub max: usize,
    /// Most denoising steps a request may ask for.
    pub max_steps: u64,
    /// Most images a request may ask for.
    pub max_images: u64,
}

impl Default for SizeLimits {
    fn default() -> Self {
        Self {
            min: 64,
            max: 2048,
            max_steps: MAX_STEPS,
            max_images: MAX_IMAGES,
        }
    }
}

/// Largest edit form the server reads, in bytes (an image, a mask and the fields);
/// larger ones get 413.
pub const MAX_EDIT_BODY_BYTES: usize = 32 << 20;
/// Most pixels an input image or mask may have, read from its header before decoding
/// (decompression bombs are refused without being decoded).
pub const MAX_INPUT_PIXELS: u64 = 4096 * 4096;

/// Most partial images a streamed request may ask for (OpenAI's limit).
pub const MAX_PARTIAL_IMAGES: u64 = 3;
