//! The model benchmark: each component of a loaded pipeline (text encoders, one UNet
//! evaluation, one scheduler step, the VAE decode) and the whole pipeline, timed at
//! every size, batch and step count asked for.

use std::ops::ControlFlow;

use burn::module::Module;
use burn::tensor::{Distribution, Tensor};
use serde::Serialize;

use super::flops::{self, ModelFlops};
use super::memory::{self, MemorySample};
use super::{measure, sync, Component, Timing};
use crate::error::{Error, Result};
use crate::model::unet::UNetExtras;
use crate::noise::Generator;
use crate::pipeline::{GenerationRequest, PromptEmbeds, PromptSyntax, SdxlPipeline};
use crate::scheduler::{SamplerSettings, Scheduler};
use crate::FusedOps;

/// What the model benchmark runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelBench {
    /// `(width, height)` pairs, pixels.
    pub sizes: Vec<(usize, usize)>,
    /// Step counts of the whole-pipeline runs.
    pub steps: Vec<usize>,
    /// Images per run; the best images/s among them is reported.
    pub batches: Vec<usize>,
    /// Guidance scale; above 1 the UNet evaluates two rows per image.
    pub guidance: f64,
    /// The sampler of the scheduler and pipeline measurements (default: the model's).
    pub sampler: SamplerSettings,
    /// The parts to time.
    pub components: Vec<Component>,
    /// Prompt to encode.
    pub prompt: String,
    /// Dense throughput of the device for the floor ratio, TFLOP/s.
    pub peak_tflops: f64,
}

/// One timed component at one size and batch.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// What was timed.
    pub component: Component,
    /// Image width, pixels.
    pub width: usize,
    /// Image height, pixels.
    pub height: usize,
    /// Images.
    pub batch: usize,
    /// Rows of each UNet evaluation (twice the images with guidance).
    pub unet_rows: usize,
    /// Denoising steps (the pipeline only).
    pub steps: Option<usize>,
    /// Time of one call.
    pub timing: Timing,
    /// FLOP of one call, where known.
    pub tflop: Option<f64>,
    /// `tflop` over the median time.
    pub achieved_tflops: Option<f64>,
    /// Memory at the end of the measurement.
    pub memory: MemorySample,
}

/// Where one whole-pipeline run's time goes, from the components' medians.
#[derive(Debug, Clone, Serialize)]
pub struct Breakdown {
    /// Both text encoders (once: the negative prompt is zeros).
    pub text_s: f64,
    /// `steps` UNet evaluations.
    pub unet_s: f64,
    /// `steps` guidance combinations and scheduler steps.
    pub scheduler_s: f64,
    /// The VAE decode.
    pub vae_s: f64,
    /// The measured pipeline minus the parts above (noise, readback, launch gaps).
    pub other_s: f64,
}

/// The whole pipeline at one size, step count and batch.
#[derive(Debug, Clone, Serialize)]
pub struct BatchSummary {
    /// Images per run.
    pub batch: usize,
    /// Median end-to-end time of one run, seconds.
    pub end_to_end_s: f64,
    /// `batch / end_to_end_s`.
    pub images_per_s: f64,
    /// One UNet evaluation plus one scheduler step (the components' medians), seconds.
    pub step_s: Option<f64>,
    /// FLOP of the run, where known.
    pub tflop: Option<f64>,
    /// `tflop` over the end-to-end time.
    pub achieved_tflops: Option<f64>,
    /// `tflop` at the peak rate ([`ModelBench::peak_tflops`]), seconds.
    pub floor_s: Option<f64>,
    /// `end_to_end_s / floor_s`: how far from the arithmetic floor.
    pub floor_ratio: Option<f64>,
    /// Peak memory of the run (device pool, else resident set), bytes.
    pub peak_memory_bytes: Option<u64>,
    /// Where the time goes, when every component was timed.
    pub breakdown: Option<Breakdown>,
}

/// The pipeline at one size and step count, over every batch.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Image width, pixels.
    pub width: usize,
    /// Image height, pixels.
    pub height: usize,
    /// Denoising steps.
    pub steps: usize,
    /// One entry per batch size.
    pub batches: Vec<BatchSummary>,
    /// The batch with the most images/s.
    pub best_batch: Option<usize>,
    /// Its images/s.
    pub best_images_per_s: Option<f64>,
}

/// The FLOP counts of `pipeline`'s model (UNet and VAE only for SDXL's architecture).
pub fn model_flops<B: FusedOps>(pipeline: &SdxlPipeline<B>) -> ModelFlops {
    let tokens = pipeline.components().tokenizer.max_length();
    ModelFlops {
        sdxl_unet: flops::is_sdxl_unet(pipeline.components().unet.num_params()),
        sdxl_vae: flops::is_sdxl_vae(pipeline.components().vae.num_params()),
        text: flops::clip(pipeline.components().text_encoder.config(), tokens, false)
            + flops::clip(pipeline.components().text_encoder_2.config(), tokens, true),
    }
}

struct Ctx<'a, B: FusedOps> {
    pipeline: &'a SdxlPipeline<B>,
    device: &'a B::Device,
    bench: &'a ModelBench,
    flops: ModelFlops,
    warmup: usize,
    iters: usize,
}

impl<B: FusedOps> Ctx<'_, B> {
    fn guidance(&self) -> bool {
        self.bench.guidance > 1.0
    }

    fn rows(&self, batch: usize) -> usize {
        if self.guidance() {
            2 * batch
        } else {
            batch
        }
    }

    /// Times `f` with memory sampled around it.
    fn timed<T>(&self, f: impl FnMut() -> Result<T>) -> Result<(Timing, MemorySample)> {
        let reset = memory::begin::<B>(self.device);
        let timing = measure::<B, T>(self.device, self.warmup, self.iters, f)?;
        Ok((timing, memory::sample::<B>(self.device, reset)))
    }

    fn embeds(&self, batch: usize) -> Result<PromptEmbeds<B>> {
        self.pipeline.encode_prompt(
            &self.bench.prompt,
            None,
            batch,
            self.guidance(),
            PromptSyntax::Plain,
            0,
        )
    }

    fn text(&self, batch: usize) -> Result<(Timing, MemorySample)> {
        self.timed(|| self.embeds(batch))
    }

    fn unet(&self, (w, h): (usize, usize), batch: usize) -> Result<(Timing, MemorySample)> {
        let rows = self.rows(batch);
        let f = self.pipeline.vae_scale_factor();
        let channels = self.pipeline.components().unet.config().in_channels;
        let embeds = self.embeds(batch)?;
        let sample = Tensor::<B, 4>::random(
            [rows, channels, h / f, w / f],
            Distribution::Normal(0.0, 1.0),
            self.device,
        );
        let time_ids: Vec<f32> = (0..rows)
            .flat_map(|_| [h, w, 0, 0, h, w].map(|v| v as f32))
            .collect();
        let timesteps = vec![500.0; rows];
        // A step as the denoising loop runs it: the text's cross-attention keys and
        // values are projected once per generation, before the first step.
        let unet = &self.pipeline.components().unet;
        let text = unet.prepare_context(embeds.context()?)?;
        sync::<B>(self.device)?;
        self.timed(|| {
            unet.forward_prepared(
                sample.clone(),
                &timesteps,
                &text,
                embeds.pooled.clone(),
                &time_ids,
                &UNetExtras::default(),
            )
        })
    }

    /// Guidance combination, input scaling and one scheduler step on `batch` images.
    fn scheduler(
        &self,
        (w, h): (usize, usize),
        batch: usize,
        steps: usize,
    ) -> Result<(Timing, MemorySample)> {
        let f = self.pipeline.vae_scale_factor();
        let channels = self.pipeline.components().unet.config().in_channels;
        let shape = [batch, channels, h / f, w / f];
        let normal = Distribution::Normal(0.0, 1.0);
        let latents = Tensor::<B, 4>::random(shape, normal, self.device);
        let eps = Tensor::<B, 4>::random(
            [self.rows(batch), shape[1], shape[2], shape[3]],
            normal,
            self.device,
        );
        let fresh = || -> Result<Scheduler> {
            let mut s = Scheduler::build(
                &self.pipeline.components().scheduler_config,
                &self.bench.sampler,
            )?;
            s.set_timesteps(steps)?;
            Ok(s)
        };
        let mut scheduler = fresh()?;
        let mut rng = Generator::new(0);
        let mut index = 0;
        let guidance = self.bench.guidance;
        sync::<B>(self.device)?;
        self.timed(|| {
            if index == scheduler.timesteps().len() {
                // Multistep schedulers keep history: start over rather than run past the end.
                scheduler = fresh()?;
                index = 0;
            }
            let input = scheduler.scale_model_input(latents.clone(), index);
            let e = if self.guidance() {
                let mut parts = eps.clone().chunk(2, 0);
                let text = parts
                    .pop()
                    .ok_or_else(|| Error::Backend("guidance split".into()))?;
                let uncond = parts
                    .pop()
                    .ok_or_else(|| Error::Backend("guidance split".into()))?;
                uncond.clone() + (text - uncond) * guidance
            } else {
                eps.clone()
            };
            let out = scheduler.step(e, index, input, &mut rng);
            index += 1;
            Ok(out)
        })
    }

    fn vae(&self, (w, h): (usize, usize), batch: usize) -> Result<(Timing, MemorySample)> {
        let f = self.pipeline.vae_scale_factor();
        let channels = self.pipeline.components().vae.config().latent_channels;
        let latents = Tensor::<B, 4>::random(
            [batch, channels, h / f, w / f],
            Distribution::Normal(0.0, 1.0),
            self.device,
        );
        sync::<B>(self.device)?;
        self.timed(|| Ok(self.pipeline.components().vae.decode(latents.clone())))
    }

    fn pipeline(
        &self,
        (w, h): (usize, usize),
        batch: usize,
        steps: usize,
    ) -> Result<(Timing, MemorySample)> {
        let request = GenerationRequest {
            prompt: self.bench.prompt.clone(),
            num_inference_steps: steps,
            guidance_scale: self.bench.guidance,
            width: w,
            height: h,
            num_images: batch,
            seed: 0,
            sampler: self.bench.sampler,
            ..Default::default()
        };
        let mut quiet = |_| ControlFlow::Continue(());
        self.timed(|| self.pipeline.generate(&request, &mut quiet))
    }
}

fn record(
    component: Component,
    (width, height): (usize, usize),
    batch: usize,
    unet_rows: usize,
    steps: Option<usize>,
    (timing, memory): (Timing, MemorySample),
    tflop: Option<f64>,
) -> Measurement {
    let tflop = tflop.map(|f| f / 1e12);
    Measurement {
        component,
        width,
        height,
        batch,
        unet_rows,
        steps,
        achieved_tflops: tflop.map(|t| t / timing.median_s),
        tflop,
        timing,
        memory,
    }
}

/// Runs the model benchmark on a loaded pipeline; `log` is told what is being timed.
pub fn run<B: FusedOps>(
    pipeline: &SdxlPipeline<B>,
    device: &B::Device,
    bench: &ModelBench,
    warmup: usize,
    iters: usize,
    log: &mut dyn FnMut(&Measurement),
) -> Result<(Vec<Measurement>, Vec<Summary>)> {
    let ctx = Ctx {
        pipeline,
        device,
        bench,
        flops: model_flops(pipeline),
        warmup,
        iters,
    };
    let wants = |c: Component| bench.components.contains(&c);
    let max_steps = bench.steps.iter().copied().max().unwrap_or(1);
    let mut out = Vec::new();
    let mut push = |m: Measurement, out: &mut Vec<Measurement>| {
        log(&m);
        out.push(m);
    };
    for &size in &bench.sizes {
        let (w, h) = size;
        for &batch in &bench.batches {
            let rows = ctx.rows(batch);
            if wants(Component::Text) {
                let t = ctx.text(batch)?;
                push(
                    record(
                        Component::Text,
                        size,
                        batch,
                        rows,
                        None,
                        t,
                        Some(ctx.flops.text),
                    ),
                    &mut out,
                );
            }
            if wants(Component::Unet) {
                let t = ctx.unet(size, batch)?;
                let f = ctx.flops.unet(w, h, rows);
                push(
                    record(Component::Unet, size, batch, rows, None, t, f),
                    &mut out,
                );
            }
            if wants(Component::Scheduler) {
                let t = ctx.scheduler(size, batch, max_steps)?;
                push(
                    record(Component::Scheduler, size, batch, rows, None, t, None),
                    &mut out,
                );
            }
            if wants(Component::Vae) {
                let t = ctx.vae(size, batch)?;
                let f = ctx.flops.vae(w, h, batch);
                push(
                    record(Component::Vae, size, batch, rows, None, t, f),
                    &mut out,
                );
            }
            if wants(Component::Pipeline) {
                for &steps in &bench.steps {
                    let t = ctx.pipeline(size, batch, steps)?;
                    let f = ctx.flops.pipeline(w, h, steps, rows, batch, 1);
                    push(
                        record(Component::Pipeline, size, batch, rows, Some(steps), t, f),
                        &mut out,
                    );
                }
            }
        }
    }
    let summaries = summarize(&out, bench);
    Ok((out, summaries))
}

/// Per size and step count: end-to-end time, images/s, time per step and the breakdown
/// for every batch, and the best batch.
pub fn summarize(measurements: &[Measurement], bench: &ModelBench) -> Vec<Summary> {
    let find = |c: Component, size: (usize, usize), batch: usize, steps: Option<usize>| {
        measurements.iter().find(|m| {
            m.component == c && (m.width, m.height) == size && m.batch == batch && m.steps == steps
        })
    };
    let median = |m: Option<&Measurement>| m.map(|m| m.timing.median_s);
    let mut out = Vec::new();
    for &size in &bench.sizes {
        for &steps in &bench.steps {
            let mut batches = Vec::new();
            for &batch in &bench.batches {
                let Some(run) = find(Component::Pipeline, size, batch, Some(steps)) else {
                    continue;
                };
                let e2e = run.timing.median_s;
                let text = median(find(Component::Text, size, batch, None));
                let unet = median(find(Component::Unet, size, batch, None));
                let sched = median(find(Component::Scheduler, size, batch, None));
                let vae = median(find(Component::Vae, size, batch, None));
                // UNet evaluations (and scheduler steps) of the run: Heun's second order
                // evaluates twice per step but the first. A model folder whose own
                // scheduler is Heun needs `--scheduler heun` for this count.
                let n = bench
                    .sampler
                    .kind
                    .map_or(steps, |k| k.model_evaluations(steps)) as f64;
                let breakdown = match (text, unet, sched, vae) {
                    (Some(t), Some(u), Some(s), Some(v)) => Some(Breakdown {
                        text_s: t,
                        unet_s: u * n,
                        scheduler_s: s * n,
                        vae_s: v,
                        other_s: e2e - t - (u + s) * n - v,
                    }),
                    _ => None,
                };
                let floor_s = run.tflop.map(|t| t / bench.peak_tflops);
                batches.push(BatchSummary {
                    batch,
                    end_to_end_s: e2e,
                    images_per_s: batch as f64 / e2e,
                    step_s: unet.map(|u| u + sched.unwrap_or(0.0)),
                    tflop: run.tflop,
                    achieved_tflops: run.achieved_tflops,
                    floor_s,
                    floor_ratio: floor_s.map(|f| e2e / f),
                    peak_memory_bytes: run.memory.peak_bytes(),
                    breakdown,
                });
            }
            if batches.is_empty() {
                continue;
            }
            let best = batches
                .iter()
                .max_by(|a, b| a.images_per_s.total_cmp(&b.images_per_s));
            out.push(Summary {
                width: size.0,
                height: size.1,
                steps,
                best_batch: best.map(|b| b.batch),
                best_images_per_s: best.map(|b| b.images_per_s),
                batches,
            });
        }
    }
    out
}
