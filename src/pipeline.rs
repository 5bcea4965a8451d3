//! The SDXL text-to-image pipeline, as diffusers' `StableDiffusionXLPipeline` runs it:
//! both text encoders, classifier-free guidance, micro-conditioning, the scheduler
//! loop and the VAE decode. It knows nothing of HTTP or the command line.

use crate::FusedOps;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::clip::{self, ClipTextModel};
use crate::error::{Error, Result};
use crate::loader::{read_json, ModelIndex};
use crate::noise::Generator;
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerKind};
use crate::tokenizer::ClipTokenizer;
use crate::unet::UNet2DConditionModel;
use crate::vae::{self, AutoencoderKL};
use crate::vae_tiling::{VaeTileSize, VaeTiling};

/// How to load a pipeline.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Dtype of the text encoders and the UNet (and of the VAE unless it must be upcast).
    pub dtype: DType,
    /// Weight-file variant (`fp16`). `None` picks `fp16` for half-precision dtypes, as
    /// that is what those files are for, and the full-precision files otherwise.
    pub variant: Option<String>,
    /// A VAE folder (`config.json` and weights) to use instead of the model's `vae/`,
    /// e.g. an fp16-safe VAE such as `madebyollin/sdxl-vae-fp16-fix`, whose config
    /// clears `force_upcast` so that it decodes in float16 without overflowing.
    pub vae: Option<PathBuf>,
    /// Decode with a tiled VAE (see [`crate::vae_tiling`]) so that large images fit
    /// small GPUs; `None` decodes in one piece. Images no larger than one tile are
    /// decoded in one piece either way.
    pub vae_tiling: Option<VaeTileSize>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            variant: None,
            vae: None,
            vae_tiling: None,
        }
    }
}

impl LoadOptions {
    /// The weight-file variant to read: the one asked for, else `fp16` for half dtypes.
    pub fn effective_variant(&self) -> Option<&str> {
        match (&self.variant, self.dtype) {
            (Some(v), _) => Some(v.as_str()),
            (None, DType::F16 | DType::BF16) => Some("fp16"),
            _ => None,
        }
    }
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
    /// Image width in pixels, a multiple of 8.
    pub width: usize,
    /// Image height in pixels, a multiple of 8.
    pub height: usize,
    /// Images to make from this prompt.
    pub num_images: usize,
    /// Seed of the host noise generator ([`Generator`]): the same seed gives the same
    /// starting noise on every backend and machine.
    pub seed: u64,
    /// Scheduler to use instead of the one in the model folder.
    pub scheduler: Option<SchedulerKind>,
    /// Starting noise to use instead of the seed's: `[num_images, 4, height/8, width/8]`
    /// values, row-major, before scaling by the scheduler's `init_noise_sigma`.
    pub latents: Option<Vec<f32>>,
    /// Micro-conditioning `original_size` (height, width); defaults to the output size.
    pub original_size: Option<(usize, usize)>,
    /// Micro-conditioning `crops_coords_top_left` (top, left).
    pub crops_coords_top_left: (usize, usize),
    /// Micro-conditioning `target_size` (height, width); defaults to the output size.
    pub target_size: Option<(usize, usize)>,
}

impl Default for GenerationRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: None,
            num_inference_steps: 30,
            guidance_scale: 5.0,
            width: 1024,
            height: 1024,
            num_images: 1,
            seed: 0,
            scheduler: None,
            latents: None,
            original_size: None,
            crops_coords_top_left: (0, 0),
            target_size: None,
        }
    }
}

impl GenerationRequest {
    /// Whether `other` can run in one batch with `self` ([`SdxlPipeline::generate_batch`]):
    /// everything but the prompts, the seed, the starting noise and the image count agrees.
    pub fn batch_compatible(&self, other: &GenerationRequest) -> bool {
        self.num_inference_steps == other.num_inference_steps
            && self.guidance_scale.to_bits() == other.guidance_scale.to_bits()
            && self.width == other.width
            && self.height == other.height
            && self.scheduler == other.scheduler
            && self.original_size == other.original_size
            && self.crops_coords_top_left == other.crops_coords_top_left
            && self.target_size == other.target_size
    }
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

/// Reported after each denoising step.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Steps finished.
    pub step: usize,
    /// Steps in all.
    pub total: usize,
}

/// An RGB image, 8 bits per channel, row-major HWC.
#[derive(Debug, Clone)]
pub struct Image {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height × width × 3` bytes.
    pub rgb: Vec<u8>,
}

impl Image {
    /// Encodes the image as PNG.
    pub fn to_png(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let encoder = image::codecs::png::PngEncoder::new(&mut out);
        image::ImageEncoder::write_image(
            encoder,
            &self.rgb,
            self.width as u32,
            self.height as u32,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| Error::Backend(format!("PNG encoding: {e}")))?;
        Ok(out)
    }
}

/// What a run produced.
#[derive(Debug)]
pub struct Generated<B: FusedOps> {
    /// The decoded images.
    pub images: Vec<Image>,
    /// The final latents, `[n, 4, h/8, w/8]`, before VAE scaling.
    pub latents: Tensor<B, 4>,
}

/// Text conditioning for one run, guidance branches stacked as `[negative; positive]`.
#[derive(Debug, Clone)]
pub struct PromptEmbeds<B: FusedOps> {
    /// `[n or 2n, 77, D1 + D2]` penultimate states of both encoders.
    pub context: Tensor<B, 3>,
    /// `[n or 2n, D]` pooled projection of the second encoder.
    pub pooled: Tensor<B, 2>,
}

/// A loaded SDXL pipeline on one device.
pub struct SdxlPipeline<B: FusedOps> {
    /// `tokenizer/`.
    pub tokenizer: ClipTokenizer,
    /// `tokenizer_2/`.
    pub tokenizer_2: ClipTokenizer,
    /// `text_encoder/` (CLIP ViT-L).
    pub text_encoder: ClipTextModel<B>,
    /// `text_encoder_2/` (OpenCLIP bigG with projection).
    pub text_encoder_2: ClipTextModel<B>,
    /// `unet/`.
    pub unet: UNet2DConditionModel<B>,
    /// `vae/`.
    pub vae: AutoencoderKL<B>,
    /// `scheduler/scheduler_config.json`.
    pub scheduler_config: SchedulerConfig,
    /// `model_index.json`.
    pub index: ModelIndex,
    /// Dtype of the text encoders and UNet.
    pub dtype: DType,
    /// Where the model came from.
    pub source: PathBuf,
    vae_tiling: Option<VaeTiling>,
    device: B::Device,
}

/// The components of a pipeline, for [`SdxlPipeline::from_parts`].
pub struct PipelineParts<B: FusedOps> {
    /// First tokenizer (pads with `<|endoftext|>`).
    pub tokenizer: ClipTokenizer,
    /// Second tokenizer (pads with `!`).
    pub tokenizer_2: ClipTokenizer,
    /// CLIP ViT-L text encoder.
    pub text_encoder: ClipTextModel<B>,
    /// OpenCLIP bigG text encoder with projection.
    pub text_encoder_2: ClipTextModel<B>,
    /// The UNet.
    pub unet: UNet2DConditionModel<B>,
    /// The VAE.
    pub vae: AutoencoderKL<B>,
    /// The default scheduler's config.
    pub scheduler_config: SchedulerConfig,
    /// `model_index.json`.
    pub index: ModelIndex,
    /// Dtype of the text encoders and UNet.
    pub dtype: DType,
    /// Where the model came from (a folder, or a label such as `builtin:tiny-sdxl-random`).
    pub source: PathBuf,
}

/// The dtype the VAE runs in: the SDXL VAE overflows in float16, so diffusers decodes it
/// in float32 unless its config declares it safe (`force_upcast: false`, as fp16-fixed
/// VAEs do).
pub fn vae_dtype(dtype: DType, config: &vae::VaeConfig) -> DType {
    if dtype != DType::F32 && config.force_upcast {
        DType::F32
    } else {
        dtype
    }
}

impl<B: FusedOps> SdxlPipeline<B> {
    /// Loads every component of a diffusers-layout SDXL folder onto `device`.
    pub fn load(dir: &Path, options: &LoadOptions, device: &B::Device) -> Result<Self> {
        let index: ModelIndex = read_json(&dir.join("model_index.json"))?;
        let variant = options.effective_variant();
        let dtype = options.dtype;
        let tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer"))?;
        let tokenizer_2 = ClipTokenizer::from_dir(&dir.join("tokenizer_2"))?;
        let text_encoder = clip::load(&dir.join("text_encoder"), variant, dtype, device)?;
        let text_encoder_2 = clip::load(&dir.join("text_encoder_2"), variant, dtype, device)?;
        let (unet, _) = UNet2DConditionModel::load(&dir.join("unet"), variant, dtype, device)?;
        let vae_dir = options.vae.clone().unwrap_or_else(|| dir.join("vae"));
        let vae_cfg: vae::VaeConfig = read_json(&vae_dir.join("config.json"))?;
        let vae_dtype = vae_dtype(dtype, &vae_cfg);
        let vae = vae::load(&vae_dir, variant, vae_dtype, device)?;
        let scheduler_config =
            SchedulerConfig::read(&dir.join("scheduler").join("scheduler_config.json"))?;
        // Fail at load, not at the first request, if the scheduler is unsupported.
        Scheduler::from_config(&scheduler_config, None)?;
        tracing::info!(
            model = %dir.display(),
            vae = %vae_dir.display(),
            dtype = ?dtype,
            vae_dtype = ?vae_dtype,
            variant = variant.unwrap_or("default"),
            "loaded SDXL pipeline"
        );
        let mut pipeline = Self::from_parts(
            PipelineParts {
                tokenizer,
                tokenizer_2,
                text_encoder,
                text_encoder_2,
                unet,
                vae,
                scheduler_config,
                index,
                dtype,
                source: dir.to_path_buf(),
            },
            device,
        );
        pipeline.set_vae_tiling(options.vae_tiling)?;
        Ok(pipeline)
    }

    /// Assembles a pipeline from components built elsewhere (the built-in models).
    pub fn from_parts(parts: PipelineParts<B>, device: &B::Device) -> Self {
        let PipelineParts {
            tokenizer,
            tokenizer_2,
            text_encoder,
            text_encoder_2,
            unet,
            vae,
            scheduler_config,
            index,
            dtype,
            source,
        } = parts;
        Self {
            tokenizer,
            tokenizer_2,
            text_encoder,
            text_encoder_2,
            unet,
            vae,
            scheduler_config,
            index,
            dtype,
            source,
            vae_tiling: None,
            device: device.clone(),
        }
    }

    /// Turns tiled VAE decoding on (`Some`, resolved against the VAE's config) or off.
    pub fn set_vae_tiling(&mut self, size: Option<VaeTileSize>) -> Result<()> {
        self.vae_tiling = size
            .map(|s| VaeTiling::new(self.vae.config(), s))
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
        1 << self.vae.config().block_out_channels.len().saturating_sub(1)
    }

    fn token_tensor(&self, ids: &[u32]) -> Tensor<B, 2, Int> {
        let data: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        Tensor::from_data(TensorData::new(data, [1, ids.len()]), &self.device)
    }

    /// Encodes one prompt with both encoders: `([1, 77, D1 + D2], [1, D])`.
    pub fn encode_text(&self, prompt: &str) -> Result<(Tensor<B, 3>, Tensor<B, 2>)> {
        let t1 = self.tokenizer.encode(prompt)?;
        let t2 = self.tokenizer_2.encode(prompt)?;
        let max = self.tokenizer.max_length();
        if t1.untruncated_len > max {
            tracing::warn!(
                tokens = t1.untruncated_len,
                max,
                "prompt is longer than the text encoders take; the end is cut off"
            );
        }
        let o1 = self.text_encoder.forward(self.token_tensor(&t1.ids));
        let o2 = self.text_encoder_2.forward(self.token_tensor(&t2.ids));
        let pooled = o2.text_embeds.ok_or_else(|| Error::Unsupported {
            path: self.source.join("text_encoder_2"),
            message:
                "text_encoder_2 has no text_projection (SDXL needs CLIPTextModelWithProjection)"
                    .into(),
        })?;
        Ok((Tensor::cat(vec![o1.penultimate, o2.penultimate], 2), pooled))
    }

    /// Conditioning for `n` images, with the negative branch first when `guidance`.
    pub fn encode_prompt(
        &self,
        prompt: &str,
        negative_prompt: Option<&str>,
        n: usize,
        guidance: bool,
    ) -> Result<PromptEmbeds<B>> {
        let (ctx, pooled) = self.encode_text(prompt)?;
        let repeat3 = |t: Tensor<B, 3>| t.repeat_dim(0, n);
        let repeat2 = |t: Tensor<B, 2>| t.repeat_dim(0, n);
        if !guidance {
            return Ok(PromptEmbeds {
                context: repeat3(ctx),
                pooled: repeat2(pooled),
            });
        }
        let negative = negative_prompt.filter(|s| !s.is_empty());
        let (nctx, npooled) = match negative {
            None if self.index.force_zeros_for_empty_prompt => {
                (ctx.zeros_like(), pooled.zeros_like())
            }
            other => self.encode_text(other.unwrap_or(""))?,
        };
        Ok(PromptEmbeds {
            context: Tensor::cat(vec![repeat3(nctx), repeat3(ctx)], 0),
            pooled: Tensor::cat(vec![repeat2(npooled), repeat2(pooled)], 0),
        })
    }

    fn validate(&self, req: &GenerationRequest) -> Result<()> {
        let f = self.vae_scale_factor();
        if req.width == 0 || !req.width.is_multiple_of(f) {
            return Err(Error::invalid(
                "width",
                format!("{} is not a positive multiple of {f}", req.width),
            ));
        }
        if req.height == 0 || !req.height.is_multiple_of(f) {
            return Err(Error::invalid(
                "height",
                format!("{} is not a positive multiple of {f}", req.height),
            ));
        }
        if req.num_inference_steps == 0 {
            return Err(Error::invalid("num_inference_steps", "must be at least 1"));
        }
        if req.num_images == 0 {
            return Err(Error::invalid("num_images", "must be at least 1"));
        }
        if !req.guidance_scale.is_finite() || req.guidance_scale < 0.0 {
            return Err(Error::invalid(
                "guidance_scale",
                "must be a finite number ≥ 0",
            ));
        }
        Ok(())
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
    /// (starting noise and, for ancestral schedulers, step noise) and image count, so
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
        let counts: Vec<usize> = latents.iter().map(|l| l.dims()[0]).collect();
        let all = if latents.len() == 1 {
            latents[0].clone()
        } else {
            Tensor::cat(latents.clone(), 0)
        };
        let mut images = self.decode(all)?.into_iter();
        Ok(latents
            .into_iter()
            .zip(counts)
            .map(|(latents, n)| Generated {
                images: images.by_ref().take(n).collect(),
                latents,
            })
            .collect())
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

    /// The denoising loop for a batch (see [`generate_batch`](Self::generate_batch)):
    /// the final latents of each request, in order.
    pub fn denoise_batch(
        &self,
        reqs: &[GenerationRequest],
        progress: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Vec<Tensor<B, 4>>> {
        let first = reqs
            .first()
            .ok_or_else(|| Error::invalid("batch", "no requests"))?;
        for req in reqs {
            self.validate(req)?;
            if !first.batch_compatible(req) {
                return Err(Error::invalid(
                    "batch",
                    "requests in one batch must share size, steps, guidance, scheduler and \
                     micro-conditioning",
                ));
            }
        }
        let f = self.vae_scale_factor();
        let ucfg = self.unet.config();
        let guidance = first.guidance_scale > 1.0;

        // Each request has its own scheduler state and generator, so that its noise (and a
        // multistep scheduler's history) is exactly that of a run on its own; only the
        // model calls are shared.
        let mut jobs = Vec::with_capacity(reqs.len());
        let mut negatives = Vec::with_capacity(reqs.len());
        let mut positives = Vec::with_capacity(reqs.len());
        for req in reqs {
            let n = req.num_images;
            let shape = [n, ucfg.in_channels, req.height / f, req.width / f];
            let mut scheduler = Scheduler::from_config(&self.scheduler_config, req.scheduler)?;
            scheduler.set_timesteps(req.num_inference_steps)?;
            let mut rng = Generator::new(req.seed);
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
            let latents = Tensor::<B, 4>::from_data(TensorData::new(noise, shape), &self.device)
                * scheduler.init_noise_sigma();
            let embeds =
                self.encode_prompt(&req.prompt, req.negative_prompt.as_deref(), n, guidance)?;
            if guidance {
                // encode_prompt stacks [negative; positive], n rows each.
                negatives.push((
                    embeds.context.clone().narrow(0, 0, n),
                    embeds.pooled.clone().narrow(0, 0, n),
                ));
                positives.push((
                    embeds.context.narrow(0, n, n),
                    embeds.pooled.narrow(0, n, n),
                ));
            } else {
                positives.push((embeds.context, embeds.pooled));
            }
            jobs.push((scheduler, rng, latents));
        }
        // The batch's conditioning: every negative row, then every positive row.
        let (contexts, pooleds): (Vec<_>, Vec<_>) = negatives.into_iter().chain(positives).unzip();
        let context = cat_rows(contexts);
        let pooled = cat_rows(pooleds);

        let n: usize = reqs.iter().map(|r| r.num_images).sum();
        let rows = if guidance { 2 * n } else { n };
        let (h, w) = (first.height, first.width);
        let orig = first.original_size.unwrap_or((h, w));
        let target = first.target_size.unwrap_or((h, w));
        let (ct, cl) = first.crops_coords_top_left;
        let ids = [orig.0, orig.1, ct, cl, target.0, target.1].map(|v| v as f32);
        let time_ids: Vec<f32> = (0..rows).flat_map(|_| ids).collect();

        let timesteps = jobs[0].0.timesteps().to_vec();
        let total = timesteps.len();
        if progress(Progress { step: 0, total }).is_break() {
            return Err(Error::Cancelled);
        }
        for (i, &t) in timesteps.iter().enumerate() {
            let latents = cat_rows(jobs.iter().map(|j| j.2.clone()).collect());
            let input = if guidance {
                Tensor::cat(vec![latents.clone(), latents], 0)
            } else {
                latents
            };
            // The input scaling depends only on the step, the same for every request.
            let input = jobs[0].0.scale_model_input(input, i);
            let eps = self.unet.forward(
                input,
                &vec![t as f32; rows],
                context.clone(),
                pooled.clone(),
                &time_ids,
            )?;
            let eps = eps.cast(jobs[0].2.dtype());
            let eps = if guidance {
                let mut parts = eps.chunk(2, 0);
                let text = parts
                    .pop()
                    .ok_or_else(|| Error::Backend("guidance split".into()))?;
                let uncond = parts
                    .pop()
                    .ok_or_else(|| Error::Backend("guidance split".into()))?;
                uncond.clone() + (text - uncond) * first.guidance_scale
            } else {
                eps
            };
            let mut offset = 0;
            for (req, (scheduler, rng, latents)) in reqs.iter().zip(jobs.iter_mut()) {
                let k = req.num_images;
                let own = if reqs.len() == 1 {
                    eps.clone()
                } else {
                    eps.clone().narrow(0, offset, k)
                };
                *latents = scheduler.step(own, i, latents.clone(), rng);
                offset += k;
            }
            if progress(Progress { step: i + 1, total }).is_break() {
                return Err(Error::Cancelled);
            }
        }
        Ok(jobs.into_iter().map(|(_, _, latents)| latents).collect())
    }

    /// Decodes final latents into images (unscaling them as the VAE config says), tiled
    /// when [`vae_tiling`](Self::vae_tiling) is set and the latents exceed one tile.
    pub fn decode(&self, latents: Tensor<B, 4>) -> Result<Vec<Image>> {
        let cfg = self.vae.config();
        let [n, c, _, _] = latents.dims();
        let latents = match (&cfg.latents_mean, &cfg.latents_std) {
            (Some(mean), Some(std)) if mean.len() == c && std.len() == c => {
                let dev = latents.device();
                let m = Tensor::<B, 1>::from_data(TensorData::new(mean.clone(), [c]), &dev)
                    .reshape([1, c, 1, 1]);
                let s = Tensor::<B, 1>::from_data(TensorData::new(std.clone(), [c]), &dev)
                    .reshape([1, c, 1, 1]);
                latents * s / cfg.scaling_factor + m
            }
            _ => latents / cfg.scaling_factor,
        };
        let image = self.vae.decode_with(latents, self.vae_tiling.as_ref())?;
        let [_, ch, h, w] = image.dims();
        if ch != 3 {
            return Err(Error::Unsupported {
                path: self.source.join("vae").join("config.json"),
                message: format!("the VAE decodes {ch} channels; images need 3"),
            });
        }
        // diffusers' postprocess: [-1, 1] → [0, 1], clamp, ×255, round.
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
