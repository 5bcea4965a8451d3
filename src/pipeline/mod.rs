//! The SDXL text-to-image pipeline, as diffusers' `StableDiffusionXLPipeline` runs it,
//! in its stages: [`check_inputs`](SdxlPipeline::check_inputs),
//! [`encode_conditioning`](SdxlPipeline::encode_conditioning) (the prompts through
//! [`encode_prompt`](SdxlPipeline::encode_prompt) and the micro-conditioning
//! [`GenerationRequest::add_time_ids`], as one [`Conditioning`]),
//! [`prepare_latents`](SdxlPipeline::prepare_latents), the denoising loop
//! ([`denoise_batch`](SdxlPipeline::denoise_batch), one
//! [`predict_noise`](SdxlPipeline::predict_noise) per step) and
//! [`decode`](SdxlPipeline::decode). It knows nothing of HTTP or the command line.

mod canny;
mod components;
mod controlnet;
mod image;
mod ip_adapter;
pub mod lora;
pub mod prompt;
mod request;

pub use canny::{canny, CANNY_HIGH, CANNY_LOW};
pub use components::{ModelIndex, ModelInfo, SdxlComponents};
pub use controlnet::{ControlNetInput, Controls};
pub use image::{a1111_parameters, Encoding, Image, InitImage, Mask, OutputFormat};
pub use ip_adapter::{ImagePrompt, ImagePromptAdapter, IP_ADAPTER_IMAGE_SIZE};
pub use prompt::{PromptCounter, PromptSyntax, PromptTokens, TextualInversion};
pub use request::{GenerationRequest, Progress, RequestDefaults};

use std::ops::ControlFlow;

use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::error::{Error, Result};
use crate::model::unet::{ExtraTokens, UNetContext, UNetExtras};
use crate::model::vae::tiling::{VaeTileSize, VaeTiling};
use crate::noise::Generator;
use crate::scheduler::Scheduler;
use crate::FusedOps;

/// How a loaded model runs (as opposed to how it is loaded: [`crate::load::LoadOptions`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Decode with a tiled VAE (see [`crate::model::vae::tiling`]) so that large images
    /// fit small GPUs; `None` decodes in one piece. Images no larger than one tile are
    /// decoded in one piece either way.
    pub vae_tiling: Option<VaeTileSize>,
}

/// What a run produced.
#[derive(Debug)]
pub struct Generated<B: FusedOps> {
    /// The decoded images.
    pub images: Vec<Image>,
    /// The final latents, `[n, 4, h/8, w/8]`, before VAE scaling.
    pub latents: Tensor<B, 4>,
}

/// A partial result of a run ([`SdxlPipeline::generate_batch_with_previews`]): the
/// decoded clean-sample estimate after some step. For inpainting it shows the whole
/// estimate, the kept region included, as the model sees it at that step.
#[derive(Debug, Clone)]
pub struct Preview {
    /// Which preview this is, from 0.
    pub index: usize,
    /// Steps finished when it was taken.
    pub step: usize,
    /// Steps in all.
    pub total: usize,
    /// Each request's images (as many as it asked for), in request order.
    pub images: Vec<Vec<Image>>,
}

/// The text encoders' output for some prompts ([`SdxlPipeline::encode_prompt`]), guidance
/// branches stacked as `[negative; positive]`: what a [`Conditioning`] is made from.
#[derive(Debug, Clone)]
pub struct PromptEmbeds<B: FusedOps> {
    /// Per row, `[1, S, D1 + D2]`: the states of both encoders (S = 77 per chunk; rows
    /// may differ in length when prompts in A1111 syntax take different numbers of
    /// chunks).
    pub contexts: Vec<Tensor<B, 3>>,
    /// `[n or 2n, D]` pooled projection of the second encoder.
    pub pooled: Tensor<B, 2>,
}

impl<B: FusedOps> PromptEmbeds<B> {
    /// Every row as one `[rows, S, D1 + D2]` tensor; errors when the rows differ in length.
    pub fn context(&self) -> Result<Tensor<B, 3>> {
        let lengths: Vec<usize> = self.contexts.iter().map(|c| c.dims()[1]).collect();
        if lengths.windows(2).any(|w| w[0] != w[1]) {
            return Err(Error::invalid(
                "prompt",
                format!("rows of different lengths {lengths:?} are not one tensor"),
            ));
        }
        Ok(cat_rows(self.contexts.clone()))
    }
}

/// Some rows of a [`Conditioning`] whose texts have one length, projected together.
#[derive(Debug, Clone)]
pub struct TextGroup<B: FusedOps> {
    /// The UNet batch rows it conditions, ascending.
    pub rows: Vec<usize>,
    /// Their text as every cross-attention reads it.
    pub context: UNetContext<B>,
}

/// What the UNet reads from the prompts at every step of a run, made once by the
/// prompt-encoding stage ([`SdxlPipeline::encode_conditioning`]). Rows are in the UNet's
/// batch order: with guidance every request's negative rows, then every request's
/// positive rows; without, the positive rows alone. Prompt weighting, textual-inversion
/// embeddings or another text encoder change how it is made, never the loop that reads it.
#[derive(Debug, Clone)]
pub struct Conditioning<B: FusedOps> {
    /// The text states as every cross-attention reads them, projected once
    /// ([`UNet2DConditionModel::prepare_context`](crate::model::unet::UNet2DConditionModel::prepare_context)):
    /// one group per text length, usually one. Rows whose texts differ in length (prompts
    /// of different chunk counts in A1111 syntax) run in separate UNet calls, each
    /// attending only to its own tokens, as A1111 runs them.
    pub text: Vec<TextGroup<B>>,
    /// Per row, the text states `[1, S, D1 + D2]` as the encoders gave them, for adapters
    /// that project them with layers of their own (a ControlNet's cross-attentions).
    pub contexts: Vec<Tensor<B, 3>>,
    /// `[rows, D]` pooled projection of the second encoder.
    pub pooled: Tensor<B, 2>,
    /// SDXL's micro-conditioning ([`GenerationRequest::add_time_ids`]), six per row.
    pub time_ids: Vec<f32>,
    /// The guidance scale when the rows hold both branches, `None` without guidance.
    pub guidance_scale: Option<f64>,
    /// [`GenerationRequest::guidance_rescale`]; applies only with guidance.
    pub guidance_rescale: f64,
}

impl<B: FusedOps> Conditioning<B> {
    /// Rows `rows` of the encoders' text states as one `[n, S, D1 + D2]` tensor, for
    /// adapters with cross-attentions of their own (a ControlNet). Rows of different
    /// lengths (A1111 prompts of different chunk counts) are an
    /// [`Error::InvalidArgument`] naming `prompt`.
    pub fn context_of(&self, rows: std::ops::Range<usize>) -> Result<Tensor<B, 3>> {
        let picked = self
            .contexts
            .get(rows.clone())
            .ok_or_else(|| Error::Backend(format!("rows {rows:?} of {}", self.contexts.len())))?;
        if picked.windows(2).any(|w| w[0].dims()[1] != w[1].dims()[1]) {
            return Err(Error::invalid(
                "prompt",
                "ControlNets with prompts of different chunk counts in one run are not \
                 supported yet: give the prompts the same number of chunks (BREAK) or use \
                 the plain syntax",
            ));
        }
        Ok(cat_rows(picked.to_vec()))
    }
}

/// One request's state in the denoising loop: its own scheduler (a multistep
/// scheduler's history) and generator (a stochastic sampler's noise), so a batched
/// run equals a run on its own.
struct Job<B: FusedOps> {
    scheduler: Scheduler,
    rng: Generator,
    latents: Tensor<B, 4>,
    inpaint: Option<InpaintState<B>>,
}

/// What inpainting keeps between steps: the original image's latents, the noise they
/// are re-noised with, and the mask on the latent grid.
#[derive(Debug, Clone)]
pub struct InpaintState<B: FusedOps> {
    /// The encoded input image, `[n, 4, h/f, w/f]`, scaled for the UNet.
    pub image_latents: Tensor<B, 4>,
    /// The starting noise (the same draw that noised the start), `[n, 4, h/f, w/f]`.
    pub noise: Tensor<B, 4>,
    /// 1 = repaint, 0 = keep, `[n, 4, h/f, w/f]` (repeated over channels).
    pub mask: Tensor<B, 4>,
}

/// Concatenates along the batch dimension; a single tensor is returned as it is.
fn cat_rows<B: FusedOps, const D: usize>(mut parts: Vec<Tensor<B, D>>) -> Tensor<B, D> {
    if parts.len() == 1 {
        if let Some(only) = parts.pop() {
            return only;
        }
    }
    Tensor::cat(parts, 0)
}

/// An SDXL pipeline on one device: the loaded components and how to run them.
pub struct SdxlPipeline<B: FusedOps> {
    components: SdxlComponents<B>,
    vae_tiling: Option<VaeTiling>,
    ip_adapter: Option<ImagePromptAdapter<B>>,
    device: B::Device,
}

impl<B: FusedOps> SdxlPipeline<B> {
    /// A pipeline over `components` (from [`crate::load`]) on `device`, where they live.
    /// Fails when the VAE tiling does not fit the VAE.
    pub fn new(
        components: SdxlComponents<B>,
        options: &RunOptions,
        device: &B::Device,
    ) -> Result<Self> {
        let mut pipeline = Self {
            components,
            vae_tiling: None,
            ip_adapter: None,
            device: device.clone(),
        };
        pipeline.set_vae_tiling(options.vae_tiling)?;
        Ok(pipeline)
    }

    /// Sets (or, with `None`, removes) the IP-Adapter that requests' image prompts
    /// ([`GenerationRequest::ip_adapter`]) run through.
    pub fn set_ip_adapter(&mut self, adapter: Option<ImagePromptAdapter<B>>) {
        self.ip_adapter = adapter;
    }

    /// The IP-Adapter image prompts run through, when one is set.
    pub fn ip_adapter(&self) -> Option<&ImagePromptAdapter<B>> {
        self.ip_adapter.as_ref()
    }

    /// The image tokens of a batch as every cross-attention reads them, in the
    /// conditioning's row order (every request's negative rows, then its positive rows,
    /// `num_images` each), with their scale; `None` when no request has an image prompt.
    fn image_tokens(
        &self,
        reqs: &[GenerationRequest],
        guidance: bool,
    ) -> Result<Option<ExtraTokens<B>>> {
        let Some(prompt) = reqs.first().and_then(|r| r.ip_adapter.as_ref()) else {
            return Ok(None);
        };
        let adapter = self.ip_adapter.as_ref().ok_or_else(|| {
            Error::invalid(
                "ip_adapter",
                "an image prompt needs an IP-Adapter loaded with the model",
            )
        })?;
        let mut negatives = Vec::with_capacity(reqs.len());
        let mut positives = Vec::with_capacity(reqs.len());
        for req in reqs {
            let p = req.ip_adapter.as_ref().ok_or_else(|| {
                Error::invalid(
                    "ip_adapter",
                    "requests with and without image prompts in one batch",
                )
            })?;
            let (uncond, cond) = adapter.tokens(&p.images)?;
            let [_, t, w] = cond.dims();
            let n = req.num_images;
            negatives.push(uncond.expand([n, t, w]));
            positives.push(cond.expand([n, t, w]));
        }
        let rows = if guidance {
            negatives.into_iter().chain(positives).collect()
        } else {
            positives
        };
        let kv = adapter
            .adapter
            .project_tokens(&self.components.unet, cat_rows(rows))?;
        Ok(Some(ExtraTokens {
            kv,
            scale: prompt.scale,
        }))
    }

    /// The loaded model.
    pub fn components(&self) -> &SdxlComponents<B> {
        &self.components
    }

    /// The loaded model, to change (e.g. to merge adapters into its weights).
    pub fn components_mut(&mut self) -> &mut SdxlComponents<B> {
        &mut self.components
    }

    /// Gives the components back.
    pub fn into_components(self) -> SdxlComponents<B> {
        self.components
    }

    /// Turns tiled VAE decoding on (`Some`, resolved against the VAE's config) or off.
    pub fn set_vae_tiling(&mut self, size: Option<VaeTileSize>) -> Result<()> {
        self.vae_tiling = size
            .map(|s| VaeTiling::new(self.components.vae.config(), s))
            .transpose()?;
        Ok(())
    }

    /// Uses exactly these tiling parameters for the VAE decode (`None`: no tiling).
    pub fn set_vae_tiling_params(&mut self, tiling: Option<VaeTiling>) -> Result<()> {
        if let Some(t) = &tiling {
            t.validate()?;
        }
        self.vae_tiling = tiling;
        Ok(())
    }

    /// The VAE tiling in effect, if any.
    pub fn vae_tiling(&self) -> Option<&VaeTiling> {
        self.vae_tiling.as_ref()
    }

    /// The device the pipeline runs on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Pixels per latent cell (8 for SDXL).
    pub fn vae_scale_factor(&self) -> usize {
        self.components.vae.config().scale_factor()
    }

    /// Refuses requests the pipeline cannot run, and batches whose requests cannot
    /// share their model calls ([`GenerationRequest::batch_compatible`]).
    pub fn check_inputs(&self, reqs: &[GenerationRequest]) -> Result<()> {
        let first = reqs
            .first()
            .ok_or_else(|| Error::invalid("batch", "no requests"))?;
        let f = self.vae_scale_factor();
        for req in reqs {
            for (name, value) in [("width", req.width), ("height", req.height)] {
                if value == 0 || !value.is_multiple_of(f) {
                    return Err(Error::invalid(
                        name,
                        format!("{value} is not a positive multiple of {f}"),
                    ));
                }
            }
            if req.num_inference_steps == 0 {
                return Err(Error::invalid("num_inference_steps", "must be at least 1"));
            }
            if req.num_images == 0 {
                return Err(Error::invalid("num_images", "must be at least 1"));
            }
            if let Some(p) = &req.ip_adapter {
                if self.ip_adapter.is_none() {
                    return Err(Error::invalid(
                        "ip_adapter",
                        "an image prompt needs an IP-Adapter loaded with the model",
                    ));
                }
                if p.images.is_empty() || p.images.iter().any(|i| i.width == 0 || i.height == 0) {
                    return Err(Error::invalid(
                        "ip_adapter.image",
                        "needs at least one non-empty image",
                    ));
                }
                if !p.scale.is_finite() || p.scale < 0.0 {
                    return Err(Error::invalid(
                        "ip_adapter.scale",
                        "must be a finite number ≥ 0",
                    ));
                }
            }
            if !(0.0..=1.0).contains(&req.guidance_rescale) {
                return Err(Error::invalid(
                    "guidance_rescale",
                    format!("{} is outside 0..=1", req.guidance_rescale),
                ));
            }
            if !req.guidance_scale.is_finite() || req.guidance_scale < 0.0 {
                return Err(Error::invalid(
                    "guidance_scale",
                    "must be a finite number ≥ 0",
                ));
            }
            if let Some(init) = &req.init_image {
                self.check_init_image(req, init)?;
            }
            for control in &req.controlnets {
                control.check()?;
                self.controlnet(&control.model)?;
            }
            if !first.batch_compatible(req) {
                return Err(Error::invalid(
                    "batch",
                    "requests in one batch must share size, steps, guidance, scheduler, \
                     micro-conditioning and ControlNets",
                ));
            }
        }
        Ok(())
    }

    /// The checks of an image-to-image or inpainting request: sizes and strength.
    fn check_init_image(&self, req: &GenerationRequest, init: &InitImage) -> Result<()> {
        let img = &init.image;
        if (img.width, img.height) != (req.width, req.height)
            || img.rgb.len() != img.width * img.height * 3
        {
            return Err(Error::invalid(
                "image",
                format!(
                    "the image is {}x{} but the request is {}x{} (resize it first)",
                    img.width, img.height, req.width, req.height
                ),
            ));
        }
        if let Some(mask) = &init.mask {
            if (mask.width, mask.height) != (img.width, img.height)
                || mask.repaint.len() != mask.width * mask.height
            {
                return Err(Error::invalid(
                    "mask",
                    format!(
                        "the mask is {}x{} but the image is {}x{}",
                        mask.width, mask.height, img.width, img.height
                    ),
                ));
            }
        }
        if req.latents.is_some() {
            return Err(Error::invalid(
                "latents",
                "starting latents and an input image cannot be combined",
            ));
        }
        Scheduler::start_step(req.num_inference_steps, init.strength)?;
        Ok(())
    }

    /// Row indices as a tensor for `select`.
    fn row_index(&self, rows: &[usize]) -> Tensor<B, 1, Int> {
        let data: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
        Tensor::from_data(TensorData::new(data, [rows.len()]), &self.device)
    }

    fn token_tensor(&self, ids: &[u32]) -> Tensor<B, 2, Int> {
        let data: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        Tensor::from_data(TensorData::new(data, [1, ids.len()]), &self.device)
    }

    /// Encodes one prompt with both encoders as `syntax` reads it: `([1, S, D1 + D2],
    /// [1, D])`, S = 77 for plain text, 77 per chunk for A1111 syntax. `clip_skip` is
    /// diffusers' (`hidden_states[-(clip_skip + 2)]` of both encoders; 0 for SDXL's
    /// default, the penultimate layer).
    pub fn encode_text(
        &self,
        prompt: &str,
        syntax: PromptSyntax,
        clip_skip: usize,
    ) -> Result<(Tensor<B, 3>, Tensor<B, 2>)> {
        match syntax {
            PromptSyntax::A1111 => self.encode_text_a1111(prompt, clip_skip),
            PromptSyntax::Plain => self.encode_text_plain(prompt, clip_skip),
        }
    }

    /// diffusers' `encode_prompt` for one prompt: the text as it is, cut at 77 tokens.
    fn encode_text_plain(
        &self,
        prompt: &str,
        clip_skip: usize,
    ) -> Result<(Tensor<B, 3>, Tensor<B, 2>)> {
        let c = &self.components;
        let t1 = c.tokenizer.encode(prompt)?;
        let t2 = c.tokenizer_2.encode(prompt)?;
        let max = c.tokenizer.max_length();
        if t1.untruncated_len > max {
            tracing::warn!(
                tokens = t1.untruncated_len,
                max,
                "prompt is longer than the text encoders take; the end is cut off"
            );
        }
        // SDXL reads the first encoder's penultimate layer only, the second's too and its
        // projected pooled output.
        let o1 =
            c.text_encoder
                .forward_hidden(self.token_tensor(&t1.ids), &[], clip_skip, false)?;
        let o2 =
            c.text_encoder_2
                .forward_hidden(self.token_tensor(&t2.ids), &[], clip_skip, true)?;
        let pooled = o2.text_embeds.ok_or_else(|| Error::Unsupported {
            path: c.info.component_path("text_encoder_2"),
            message:
                "text_encoder_2 has no text_projection (SDXL needs CLIPTextModelWithProjection)"
                    .into(),
        })?;
        Ok((Tensor::cat(vec![o1.penultimate, o2.penultimate], 2), pooled))
    }

    /// Conditioning for `n` images, with the negative branch first when `guidance`.
    /// `syntax` and `clip_skip` apply to both prompts (see [`encode_text`](Self::encode_text));
    /// in A1111 syntax the prompt's extra-network tags (`<lora:NAME:W>`) are removed
    /// first ([`prompt::extract_extra_networks`]).
    pub fn encode_prompt(
        &self,
        prompt: &str,
        negative_prompt: Option<&str>,
        n: usize,
        guidance: bool,
        syntax: PromptSyntax,
        clip_skip: usize,
    ) -> Result<PromptEmbeds<B>> {
        // A1111 takes LoRA (and other extra-network) tags out of the prompt before
        // encoding it; the caller applies the LoRAs. The negative prompt keeps them.
        let stripped;
        let prompt = match syntax {
            PromptSyntax::A1111 => {
                stripped = prompt::extract_extra_networks(prompt).0;
                stripped.as_str()
            }
            PromptSyntax::Plain => prompt,
        };
        let (ctx, pooled) = self.encode_text(prompt, syntax, clip_skip)?;
        let rows = |t: &Tensor<B, 3>| vec![t.clone(); n];
        let repeat2 = |t: Tensor<B, 2>| t.repeat_dim(0, n);
        if !guidance {
            return Ok(PromptEmbeds {
                contexts: rows(&ctx),
                pooled: repeat2(pooled),
            });
        }
        let negative = negative_prompt.filter(|s| !s.is_empty());
        let (nctx, npooled) = match negative {
            None if self.components.index.force_zeros_for_empty_prompt => {
                // As long as the prompt's text, so that the batch stays one UNet call:
                // zero text gives every cross-attention uniform weights over identical
                // keys and values whatever its length, the same output as diffusers' 77
                // zeros (exactly so when the key and value projections have no bias, as
                // in SDXL).
                (ctx.zeros_like(), pooled.zeros_like())
            }
            other => self.encode_text(other.unwrap_or(""), syntax, clip_skip)?,
        };
        Ok(PromptEmbeds {
            contexts: rows(&nctx).into_iter().chain(rows(&ctx)).collect(),
            pooled: Tensor::cat(vec![repeat2(npooled), repeat2(pooled)], 0),
        })
    }

    /// The scheduler a request runs with, its timesteps set.
    pub fn prepare_scheduler(&self, req: &GenerationRequest) -> Result<Scheduler> {
        let mut scheduler = Scheduler::build(&self.components.scheduler_config, &req.sampler)?;
        scheduler.set_timesteps(req.num_inference_steps)?;
        Ok(scheduler)
    }

    /// The starting latents of a request, `[n, in_channels, h/f, w/f]`: its own
    /// `latents` or noise drawn from `rng`, scaled by the scheduler's `init_noise_sigma`.
    pub fn prepare_latents(
        &self,
        req: &GenerationRequest,
        scheduler: &Scheduler,
        rng: &mut Generator,
    ) -> Result<Tensor<B, 4>> {
        let f = self.vae_scale_factor();
        let channels = self.components.unet.config().in_channels;
        let shape = [req.num_images, channels, req.height / f, req.width / f];
        let noise = match &req.latents {
            Some(v) => {
                let want: usize = shape.iter().product();
                if v.len() != want {
                    return Err(Error::invalid(
                        "latents",
                        format!(
                            "expected shape {shape:?} ({want} values), got {} values",
                            v.len()
                        ),
                    ));
                }
                v.clone()
            }
            None => rng.randn(&shape),
        };
        Ok(
            Tensor::<B, 4>::from_data(TensorData::new(noise, shape), &self.device)
                * scheduler.init_noise_sigma(),
        )
    }

    /// diffusers' `VaeImageProcessor.preprocess` of an image already at its size:
    /// 8-bit RGB → `[1, 3, H, W]` float32 in [-1, 1] (`2·(v/255) − 1`).
    pub fn preprocess(&self, image: &Image) -> Tensor<B, 4> {
        let (w, h) = (image.width, image.height);
        let mut chw = vec![0f32; 3 * h * w];
        for (p, px) in image.rgb.chunks_exact(3).enumerate() {
            for (c, &v) in px.iter().enumerate() {
                chw[c * h * w + p] = 2.0 * (v as f32 / 255.0) - 1.0;
            }
        }
        Tensor::from_data(TensorData::new(chw, [1, 3, h, w]), &self.device)
    }

    /// Applies the VAE's latent scaling (and shift, for VAEs with `latents_mean`/`std`):
    /// the inverse of [`unscale_latents`](Self::unscale_latents).
    pub fn scale_latents(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        let cfg = self.components.vae.config();
        let c = latents.dims()[1];
        match (&cfg.latents_mean, &cfg.latents_std) {
            (Some(mean), Some(std)) if mean.len() == c && std.len() == c => {
                let dev = latents.device();
                let m = Tensor::<B, 1>::from_data(TensorData::new(mean.clone(), [c]), &dev)
                    .reshape([1, c, 1, 1]);
                let s = Tensor::<B, 1>::from_data(TensorData::new(std.clone(), [c]), &dev)
                    .reshape([1, c, 1, 1]);
                (latents - m) * cfg.scaling_factor / s
            }
            _ => latents * cfg.scaling_factor,
        }
    }

    /// diffusers' `_encode_vae_image`: the image encoded by the VAE, a sample of its
    /// latent distribution (noise drawn from `rng`, `[1, 4, h/f, w/f]`), scaled for the
    /// UNet, as float32.
    pub fn encode_image(&self, image: &Image, rng: &mut Generator) -> Result<Tensor<B, 4>> {
        let dist = self.components.vae.encode(self.preprocess(image));
        let noise = rng.randn_tensor::<B, 4>(dist.mean.dims(), &self.device, DType::F32);
        Ok(self.scale_latents(dist.sample(noise).cast(DType::F32)))
    }

    /// The starting latents of image-to-image and inpainting (diffusers' img2img and
    /// inpaint `prepare_latents`), `start` being the index of the first timestep run
    /// ([`Scheduler::start_index`]). Draws in diffusers' order: the image's latent sample
    /// (one for all `num_images`), then the noise `[n, 4, h/f, w/f]`; for inpainting,
    /// then the sample of the masked image's encoding, which a 4-channel UNet does not
    /// use but which advances the generator as diffusers' does. Image-to-image starts at
    /// `add_noise(image, noise, start)`; inpainting too, except at strength 1, where it
    /// starts from `noise · init_noise_sigma` as diffusers does.
    pub fn prepare_image_latents(
        &self,
        req: &GenerationRequest,
        init: &InitImage,
        scheduler: &Scheduler,
        start: usize,
        rng: &mut Generator,
    ) -> Result<(Tensor<B, 4>, Option<InpaintState<B>>)> {
        let n = req.num_images;
        let image_latents = self.encode_image(&init.image, rng)?.repeat_dim(0, n);
        let [_, c, h, w] = image_latents.dims();
        let noise = rng.randn_tensor::<B, 4>([n, c, h, w], &self.device, DType::F32);
        let Some(mask) = &init.mask else {
            let latents = scheduler.add_noise(image_latents, noise, start);
            return Ok((latents, None));
        };
        // The masked image's latents: only the draw matters for a 4-channel UNet.
        let _ = rng.randn(&[1, c, h, w]);
        let latents = if init.strength >= 1.0 {
            noise.clone() * scheduler.init_noise_sigma()
        } else {
            scheduler.add_noise(image_latents.clone(), noise.clone(), start)
        };
        let grid = mask.to_grid(w, h);
        let mask = Tensor::<B, 4>::from_data(TensorData::new(grid, [1, 1, h, w]), &self.device)
            .repeat_dim(1, c)
            .repeat_dim(0, n);
        Ok((
            latents,
            Some(InpaintState {
                image_latents,
                noise,
                mask,
            }),
        ))
    }

    /// Inpainting's blend after step `i` (diffusers' 4-channel branch): the kept region
    /// becomes the original latents noised to the next step's level (the clean latents
    /// after the last step), the repainted region keeps the denoised `latents`.
    pub fn blend_inpaint(
        &self,
        scheduler: &Scheduler,
        state: &InpaintState<B>,
        latents: Tensor<B, 4>,
        i: usize,
    ) -> Tensor<B, 4> {
        let proper = if i + 1 < scheduler.timesteps().len() {
            scheduler.add_noise(state.image_latents.clone(), state.noise.clone(), i + 1)
        } else {
            state.image_latents.clone()
        };
        let keep = state.mask.ones_like() - state.mask.clone();
        keep * proper + state.mask.clone() * latents
    }

    /// The UNet's input at step `i` for `latents` of `n` rows: `[latents; latents]` with
    /// guidance (the `[negative; positive]` conditioning's rows), `latents` alone
    /// without, scaled by the scheduler ([`Scheduler::scale_model_input`]). Adapters that
    /// read the step's input (a ControlNet) see exactly this.
    pub fn model_input(
        &self,
        scheduler: &Scheduler,
        latents: Tensor<B, 4>,
        i: usize,
        cond: &Conditioning<B>,
    ) -> Tensor<B, 4> {
        let input = match cond.guidance_scale {
            Some(_) => Tensor::cat(vec![latents.clone(), latents], 0),
            None => latents,
        };
        scheduler.scale_model_input(input, i)
    }

    /// One guided noise prediction for the step's [`model_input`](Self::model_input) at
    /// `timesteps` (one per row): one UNet call per text length (usually one), the
    /// branches combined with the guidance scale when the input holds both. `extras` is
    /// what adapters add to this step's UNet call (ControlNet residuals, IP-Adapter
    /// tokens), for the UNet's rows (both branches).
    pub fn predict_noise(
        &self,
        input: Tensor<B, 4>,
        timesteps: &[f32],
        cond: &Conditioning<B>,
        extras: &UNetExtras<B>,
    ) -> Result<Tensor<B, 4>> {
        let dtype = input.dtype();
        let rows = input.dims()[0];
        let unet = &self.components.unet;
        let eps = match &cond.text[..] {
            [one] => unet.forward_prepared(
                input,
                timesteps,
                &one.context,
                cond.pooled.clone(),
                &cond.time_ids,
                extras,
            )?,
            groups => {
                // Texts of different lengths: one UNet call per length, then the rows
                // back in order.
                let no_extras = extras.down_residuals.is_none()
                    && extras.mid_residual.is_none()
                    && extras.tokens.is_none();
                if !no_extras {
                    return Err(Error::invalid(
                        "prompt",
                        "ControlNets or image prompts with a prompt and negative prompt of different chunk \
                         counts (A1111 syntax) are not supported yet: give both the same \
                         number of chunks (BREAK) or use the plain syntax",
                    ));
                }
                let mut parts = Vec::with_capacity(groups.len());
                let mut order: Vec<usize> = Vec::with_capacity(rows);
                for g in groups {
                    let index = self.row_index(&g.rows);
                    let time_ids: Vec<f32> = (g.rows.iter())
                        .flat_map(|&r| cond.time_ids[r * 6..r * 6 + 6].iter().copied())
                        .collect();
                    let steps: Vec<f32> = g.rows.iter().map(|&r| timesteps[r]).collect();
                    parts.push(unet.forward_prepared(
                        input.clone().select(0, index.clone()),
                        &steps,
                        &g.context,
                        cond.pooled.clone().select(0, index),
                        &time_ids,
                        extras,
                    )?);
                    order.extend(&g.rows);
                }
                let mut inverse = vec![0; order.len()];
                for (at, &row) in order.iter().enumerate() {
                    inverse[row] = at;
                }
                Tensor::cat(parts, 0).select(0, self.row_index(&inverse))
            }
        };
        let eps = eps.cast(dtype);
        let Some(scale) = cond.guidance_scale else {
            return Ok(eps);
        };
        let mut parts = eps.chunk(2, 0);
        let (Some(text), Some(uncond)) = (parts.pop(), parts.pop()) else {
            return Err(Error::Backend("guidance split".into()));
        };
        let guided = uncond.clone() + (text.clone() - uncond) * scale;
        Ok(match cond.guidance_rescale {
            r if r > 0.0 => rescale_noise_cfg(guided, text, r),
            _ => guided,
        })
    }

    /// Runs the whole pipeline. `progress` is called after every step; returning
    /// `ControlFlow::Break` cancels the run before the next step ([`Error::Cancelled`]).
    pub fn generate(
        &self,
        req: &GenerationRequest,
        progress: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Generated<B>> {
        let mut out = self.generate_batch(std::slice::from_ref(req), progress)?;
        out.pop()
            .ok_or_else(|| Error::Backend("a batch of one produced nothing".into()))
    }

    /// Runs several requests as one batch: one UNet call per step for all of their
    /// images, one VAE decode. Each request keeps its own prompt, negative prompt, seed
    /// (starting noise and, for stochastic samplers, step noise) and image count, so
    /// every result equals what [`generate`](Self::generate) gives for that request
    /// alone. The requests must agree on everything else
    /// ([`GenerationRequest::batch_compatible`]). `progress` reports the shared steps;
    /// `ControlFlow::Break` cancels the whole batch.
    pub fn generate_batch(
        &self,
        reqs: &[GenerationRequest],
        progress: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Vec<Generated<B>>> {
        let latents = self.denoise_batch(reqs, progress)?;
        self.decode_batch(latents)
    }

    /// The denoising loop alone: returns the final latents.
    pub fn denoise(
        &self,
        req: &GenerationRequest,
        progress: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Tensor<B, 4>> {
        let mut out = self.denoise_batch(std::slice::from_ref(req), progress)?;
        out.pop()
            .ok_or_else(|| Error::Backend("a batch of one produced nothing".into()))
    }

    /// Conditioning of a batch: every request's negative rows, then every request's
    /// positive rows, so that the UNet's `[latents; latents]` input lines up with it.
    fn batch_embeds(&self, reqs: &[GenerationRequest], guidance: bool) -> Result<PromptEmbeds<B>> {
        let mut negatives = (Vec::new(), Vec::new());
        let mut positives = (Vec::new(), Vec::new());
        for req in reqs {
            let n = req.num_images;
            let mut e = self.encode_prompt(
                &req.prompt,
                req.negative_prompt.as_deref(),
                n,
                guidance,
                req.prompt_syntax,
                req.clip_skip,
            )?;
            if guidance {
                let positive = e.contexts.split_off(n);
                negatives.0.extend(e.contexts);
                negatives.1.push(e.pooled.clone().narrow(0, 0, n));
                positives.0.extend(positive);
                positives.1.push(e.pooled.narrow(0, n, n));
            } else {
                positives.0.extend(e.contexts);
                positives.1.push(e.pooled);
            }
        }
        Ok(PromptEmbeds {
            contexts: negatives.0.into_iter().chain(positives.0).collect(),
            pooled: cat_rows(negatives.1.into_iter().chain(positives.1).collect()),
        })
    }

    /// The prompt-encoding stage of a batch: both encoders on every request's prompts
    /// ([`encode_prompt`](Self::encode_prompt)), the text projected for the UNet's
    /// cross-attentions (rows of one text length together), and the micro-conditioning,
    /// as one [`Conditioning`].
    pub fn encode_conditioning(&self, reqs: &[GenerationRequest]) -> Result<Conditioning<B>> {
        let first = reqs
            .first()
            .ok_or_else(|| Error::invalid("batch", "no requests"))?;
        let guidance_scale = first
            .do_classifier_free_guidance()
            .then_some(first.guidance_scale);
        let embeds = self.batch_embeds(reqs, guidance_scale.is_some())?;
        let rows = embeds.contexts.len();
        let mut by_length: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for (row, c) in embeds.contexts.iter().enumerate() {
            by_length.entry(c.dims()[1]).or_default().push(row);
        }
        // The text is the same at every step: its cross-attention keys and values once.
        let text = by_length
            .into_values()
            .map(|group| {
                let parts = group.iter().map(|&r| embeds.contexts[r].clone()).collect();
                Ok(TextGroup {
                    context: self.components.unet.prepare_context(cat_rows(parts))?,
                    rows: group,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let time_ids = (0..rows).flat_map(|_| first.add_time_ids()).collect();
        Ok(Conditioning {
            contexts: embeds.contexts,
            text,
            pooled: embeds.pooled,
            time_ids,
            guidance_scale,
            guidance_rescale: first.guidance_rescale,
        })
    }

    /// The denoising loop for a batch (see [`generate_batch`](Self::generate_batch)):
    /// the final latents of each request, in order.
    pub fn denoise_batch(
        &self,
        reqs: &[GenerationRequest],
        progress: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Vec<Tensor<B, 4>>> {
        self.denoise_previewing(reqs, progress, 0, &mut |_| ControlFlow::Continue(()))
    }

    /// [`generate_batch`](Self::generate_batch) that also decodes `previews` partial
    /// images, evenly spaced over the steps (after steps ⌈k·total/(previews+1)⌉,
    /// k = 1…previews): the VAE decode of each request's current clean-sample estimate
    /// x̂₀ ([`Scheduler::denoised`]), handed to `on_preview` in order. Previews change
    /// nothing in the run: the final images equal `generate_batch`'s. Each costs one VAE
    /// decode. `ControlFlow::Break` from either callback cancels the batch.
    pub fn generate_batch_with_previews(
        &self,
        reqs: &[GenerationRequest],
        progress: &mut dyn FnMut(Progress) -> ControlFlow<()>,
        previews: usize,
        on_preview: &mut dyn FnMut(Preview) -> ControlFlow<()>,
    ) -> Result<Vec<Generated<B>>> {
        let latents = self.denoise_previewing(reqs, progress, previews, on_preview)?;
        self.decode_batch(latents)
    }

    /// Decodes each request's latents in one VAE call.
    fn decode_batch(&self, latents: Vec<Tensor<B, 4>>) -> Result<Vec<Generated<B>>> {
        let counts: Vec<usize> = latents.iter().map(|l| l.dims()[0]).collect();
        let mut images = self.decode(cat_rows(latents.clone()))?.into_iter();
        Ok(latents
            .into_iter()
            .zip(counts)
            .map(|(latents, n)| Generated {
                images: images.by_ref().take(n).collect(),
                latents,
            })
            .collect())
    }

    /// The denoising loop, decoding `previews` partial images on the way.
    fn denoise_previewing(
        &self,
        reqs: &[GenerationRequest],
        progress: &mut dyn FnMut(Progress) -> ControlFlow<()>,
        previews: usize,
        on_preview: &mut dyn FnMut(Preview) -> ControlFlow<()>,
    ) -> Result<Vec<Tensor<B, 4>>> {
        self.check_inputs(reqs)?;
        let first = &reqs[0];
        // The schedule is built once for the batch (its requests share the scheduler and
        // the steps); each request steps its own copy, with its own multistep history.
        let schedule = self.prepare_scheduler(first)?;
        // Requests in a batch share the strength, hence the first step.
        let start = match &first.init_image {
            Some(init) => schedule.start_index(first.num_inference_steps, init.strength)?,
            None => 0,
        };
        let mut jobs = Vec::with_capacity(reqs.len());
        for req in reqs {
            let scheduler = schedule.clone();
            let mut rng = Generator::new(req.seed);
            let (latents, inpaint) = match &req.init_image {
                Some(init) => self.prepare_image_latents(req, init, &scheduler, start, &mut rng)?,
                None => (self.prepare_latents(req, &scheduler, &mut rng)?, None),
            };
            jobs.push(Job {
                scheduler,
                rng,
                latents,
                inpaint,
            });
        }
        let cond = self.encode_conditioning(reqs)?;
        // ControlNets fill the residuals of each step's UNet call; the image prompt's
        // tokens are made once per request.
        let controls = self.prepare_controls(reqs, &cond)?;
        let image_tokens = self.image_tokens(reqs, cond.guidance_scale.is_some())?;

        let timesteps = jobs[0].scheduler.timesteps().to_vec();
        let total = timesteps.len() - start;
        // The finished-step count after which each preview is decoded (several previews
        // may share a step when there are fewer steps than previews).
        let preview_steps: Vec<usize> = (1..=previews)
            .map(|k| (k * total).div_ceil(previews + 1).clamp(1, total.max(1)))
            .collect();
        let mut next_preview = 0;
        if progress(Progress { step: 0, total }).is_break() {
            return Err(Error::Cancelled);
        }
        for (i, &t) in timesteps.iter().enumerate().skip(start) {
            let latents = cat_rows(jobs.iter().map(|j| j.latents.clone()).collect());
            // The input scaling depends only on the step, the same for every request.
            let input = self.model_input(&jobs[0].scheduler, latents, i, &cond);
            let timesteps = vec![t as f32; input.dims()[0]];
            let mut extras = controls.extras(&input, &timesteps, &cond, i - start, total)?;
            extras.tokens = image_tokens.clone();
            let eps = self.predict_noise(input, &timesteps, &cond, &extras)?;
            let done = i + 1 - start;
            let previewing = preview_steps.get(next_preview) == Some(&done);
            let mut estimates = Vec::new();
            let mut offset = 0;
            for job in jobs.iter_mut() {
                let k = job.latents.dims()[0];
                let own = if reqs.len() == 1 {
                    eps.clone()
                } else {
                    eps.clone().narrow(0, offset, k)
                };
                if previewing {
                    estimates.push(job.scheduler.denoised(own.clone(), i, job.latents.clone()));
                }
                job.latents = job
                    .scheduler
                    .step(own, i, job.latents.clone(), &mut job.rng);
                if let Some(state) = &job.inpaint {
                    job.latents = self.blend_inpaint(&job.scheduler, state, job.latents.clone(), i);
                }
                offset += k;
            }
            if progress(Progress { step: done, total }).is_break() {
                return Err(Error::Cancelled);
            }
            if previewing {
                let images: Vec<Vec<Image>> = self
                    .decode_batch(estimates)?
                    .into_iter()
                    .map(|g| g.images)
                    .collect();
                while preview_steps.get(next_preview) == Some(&done) {
                    let preview = Preview {
                        index: next_preview,
                        step: done,
                        total,
                        images: images.clone(),
                    };
                    next_preview += 1;
                    if on_preview(preview).is_break() {
                        return Err(Error::Cancelled);
                    }
                }
            }
        }
        Ok(jobs.into_iter().map(|j| j.latents).collect())
    }

    /// Undoes the VAE's latent scaling (and shift, for VAEs with `latents_mean`/`std`).
    pub fn unscale_latents(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        let cfg = self.components.vae.config();
        let c = latents.dims()[1];
        match (&cfg.latents_mean, &cfg.latents_std) {
            (Some(mean), Some(std)) if mean.len() == c && std.len() == c => {
                let dev = latents.device();
                let m = Tensor::<B, 1>::from_data(TensorData::new(mean.clone(), [c]), &dev)
                    .reshape([1, c, 1, 1]);
                let s = Tensor::<B, 1>::from_data(TensorData::new(std.clone(), [c]), &dev)
                    .reshape([1, c, 1, 1]);
                latents * s / cfg.scaling_factor + m
            }
            _ => latents / cfg.scaling_factor,
        }
    }

    /// Decodes final latents into images, tiled when [`vae_tiling`](Self::vae_tiling)
    /// is set and the latents exceed one tile.
    pub fn decode(&self, latents: Tensor<B, 4>) -> Result<Vec<Image>> {
        let latents = self.unscale_latents(latents);
        let image = self
            .components
            .vae
            .decode_with(latents, self.vae_tiling.as_ref())?;
        self.postprocess(image)
    }

    /// diffusers' `VaeImageProcessor.postprocess`: `[-1, 1]` → `[0, 1]`, clamp, ×255,
    /// round, as 8-bit RGB images.
    pub fn postprocess(&self, image: Tensor<B, 4>) -> Result<Vec<Image>> {
        let [n, ch, h, w] = image.dims();
        if ch != 3 {
            return Err(Error::Unsupported {
                path: self
                    .components
                    .info
                    .component_path("vae")
                    .join("config.json"),
                message: format!("the VAE decodes {ch} channels; images need 3"),
            });
        }
        let pixels = ((image.cast(DType::F32) / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0)
            .round()
            .permute([0, 2, 3, 1]);
        let values: Vec<f32> = pixels
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| Error::Backend(format!("reading the image back: {e:?}")))?;
        let per = h * w * 3;
        Ok((0..n)
            .map(|i| Image {
                width: w,
                height: h,
                rgb: values[i * per..(i + 1) * per]
                    .iter()
                    .map(|&v| v as u8)
                    .collect(),
            })
            .collect())
    }
}

/// diffusers' `rescale_noise_cfg`: `r · guided · std(text)/std(guided) + (1 − r) · guided`,
/// the standard deviations per image over all its values, with Bessel's correction (as
/// torch's `std`), computed in float32.
fn rescale_noise_cfg<B: FusedOps>(
    guided: Tensor<B, 4>,
    text: Tensor<B, 4>,
    rescale: f64,
) -> Tensor<B, 4> {
    let dtype = guided.dtype();
    let [n, c, h, w] = guided.dims();
    let std = |x: Tensor<B, 4>| {
        let x = x.cast(DType::F32).reshape([n, c * h * w]);
        let centred = x.clone() - x.mean_dim(1);
        let denominator = (c * h * w).saturating_sub(1).max(1) as f64;
        (centred.clone() * centred)
            .sum_dim(1)
            .div_scalar(denominator)
            .sqrt()
    };
    let ratio = (std(text) / std(guided.clone()))
        .reshape([n, 1, 1, 1])
        .cast(dtype);
    let rescaled = guided.clone() * ratio;
    rescaled.mul_scalar(rescale) + guided.mul_scalar(1.0 - rescale)
}
