//! What one run is asked to do, and the defaults for what a caller leaves out.

use super::controlnet::ControlNetInput;
use super::image::InitImage;
use super::ip_adapter::ImagePrompt;
use super::prompt::PromptSyntax;
use crate::scheduler::SamplerSettings;

/// Request settings a caller did not give, written once for every front end.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestDefaults {
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale.
    pub guidance_scale: f64,
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
}

impl RequestDefaults {
    /// The library's and the command line's: SDXL's native 1024², 30 steps, guidance 5
    /// (diffusers' SDXL examples).
    pub const LIBRARY: Self = Self {
        steps: 30,
        guidance_scale: 5.0,
        width: 1024,
        height: 1024,
    };
    /// The HTTP server's (`hypergen serve`), as HyperGen's server has them: 50 steps,
    /// guidance 7.5, 1024².
    pub const SERVER: Self = Self {
        steps: 50,
        guidance_scale: 7.5,
        width: 1024,
        height: 1024,
    };
}

/// One text-to-image request.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// What to draw.
    pub prompt: String,
    /// What to steer away from. `None` or empty means zero embeddings when the model
    /// index sets `force_zeros_for_empty_prompt` (SDXL does), else the encoded "".
    pub negative_prompt: Option<String>,
    /// Denoising steps (≥ 1).
    pub num_inference_steps: usize,
    /// Classifier-free guidance scale; ≤ 1 runs the conditional branch only.
    pub guidance_scale: f64,
    /// diffusers' `guidance_rescale` (Lin et al. 2023, §3.4), 0–1: blends the guided
    /// prediction with itself rescaled to the conditional prediction's standard
    /// deviation, against the over-exposure of zero-terminal-SNR models. 0: off.
    pub guidance_rescale: f64,
    /// Image width in pixels, a multiple of 8.
    pub width: usize,
    /// Image height in pixels, a multiple of 8.
    pub height: usize,
    /// Images to make from this prompt.
    pub num_images: usize,
    /// Seed of the host noise generator ([`crate::noise::Generator`]): the same seed
    /// gives the same starting noise on every backend and machine.
    pub seed: u64,
    /// The sampler and its settings; the default is the model folder's scheduler.
    pub sampler: SamplerSettings,
    /// Starting noise to use instead of the seed's: `[num_images, 4, height/8, width/8]`
    /// values, row-major, before scaling by the scheduler's `init_noise_sigma`.
    pub latents: Option<Vec<f32>>,
    /// Micro-conditioning `original_size` (height, width); defaults to the output size.
    pub original_size: Option<(usize, usize)>,
    /// Micro-conditioning `crops_coords_top_left` (top, left).
    pub crops_coords_top_left: (usize, usize),
    /// Micro-conditioning `target_size` (height, width); defaults to the output size.
    pub target_size: Option<(usize, usize)>,
    /// Image-to-image or inpainting: the image to start from (diffusers'
    /// `StableDiffusionXLImg2ImgPipeline` / `StableDiffusionXLInpaintPipeline`). `None`:
    /// text-to-image.
    pub init_image: Option<InitImage>,
    /// How the prompts are read: AUTOMATIC1111's syntax (the default) or diffusers'
    /// plain text.
    pub prompt_syntax: PromptSyntax,
    /// diffusers' `clip_skip` for both prompts: `hidden_states[-(clip_skip + 2)]` of both
    /// encoders; 0 is SDXL's default, the penultimate layer (Civitai's "clip skip 2").
    pub clip_skip: usize,
    /// ControlNets steering the run (diffusers' `StableDiffusionXLControlNet*Pipeline`),
    /// their residuals summed; empty: none.
    pub controlnets: Vec<ControlNetInput>,
    /// An image prompt through the pipeline's IP-Adapter
    /// ([`SdxlPipeline::set_ip_adapter`](super::SdxlPipeline::set_ip_adapter)).
    pub ip_adapter: Option<ImagePrompt>,
}

impl Default for GenerationRequest {
    /// An empty prompt with [`RequestDefaults::LIBRARY`].
    fn default() -> Self {
        let d = RequestDefaults::LIBRARY;
        Self {
            prompt: String::new(),
            negative_prompt: None,
            num_inference_steps: d.steps,
            guidance_scale: d.guidance_scale,
            guidance_rescale: 0.0,
            width: d.width,
            height: d.height,
            num_images: 1,
            seed: 0,
            sampler: SamplerSettings::default(),
            latents: None,
            original_size: None,
            crops_coords_top_left: (0, 0),
            target_size: None,
            init_image: None,
            prompt_syntax: PromptSyntax::default(),
            clip_skip: 0,
            controlnets: Vec::new(),
            ip_adapter: None,
        }
    }
}

impl GenerationRequest {
    /// Whether `other` can run in one batch with `self`
    /// ([`SdxlPipeline::generate_batch`](super::SdxlPipeline::generate_batch)):
    /// everything but the prompts, the seed, the starting noise, the image count and the
    /// control images agrees.
    pub fn batch_compatible(&self, other: &GenerationRequest) -> bool {
        self.num_inference_steps == other.num_inference_steps
            && self.guidance_scale.to_bits() == other.guidance_scale.to_bits()
            && self.width == other.width
            && self.height == other.height
            && self.guidance_rescale.to_bits() == other.guidance_rescale.to_bits()
            && self.sampler.same_as(&other.sampler)
            && self.original_size == other.original_size
            && self.crops_coords_top_left == other.crops_coords_top_left
            && self.target_size == other.target_size
            // The same start step: both text-to-image, or both from an image at one strength.
            && self.init_image.as_ref().map(|i| i.strength.to_bits())
                == other.init_image.as_ref().map(|i| i.strength.to_bits())
            // The same ControlNets, scales and guidance windows (images per request).
            && self.controlnets.len() == other.controlnets.len()
            && (self.controlnets.iter().zip(&other.controlnets)).all(|(a, b)| a.same_as(b))
            // Image prompts on both or neither, at one scale (the images may differ).
            && self.ip_adapter.as_ref().map(|p| p.scale.to_bits())
                == other.ip_adapter.as_ref().map(|p| p.scale.to_bits())
    }

    /// Whether classifier-free guidance runs (a negative branch beside the positive one).
    pub fn do_classifier_free_guidance(&self) -> bool {
        self.guidance_scale > 1.0
    }

    /// SDXL's six micro-conditioning numbers: original size, crop top-left, target size.
    pub fn add_time_ids(&self) -> [f32; 6] {
        let (h, w) = (self.height, self.width);
        let orig = self.original_size.unwrap_or((h, w));
        let target = self.target_size.unwrap_or((h, w));
        let (ct, cl) = self.crops_coords_top_left;
        [orig.0, orig.1, ct, cl, target.0, target.1].map(|v| v as f32)
    }
}

/// Reported after each denoising step.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Steps finished.
    pub step: usize,
    /// Steps in all.
    pub total: usize,
}
