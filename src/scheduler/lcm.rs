//! diffusers' `LCMScheduler` (Luo et al. 2023): each step maps the sample straight to a
//! clean estimate with the consistency function's boundary condition,
//! `c_skip(t)·x + c_out(t)·x̂₀`, then re-noises it to the next timestep with fresh noise
//! (every step but the last). For LCM checkpoints and LCM-LoRA.

use burn::tensor::Tensor;

use super::config::{ClassDefaults, Prediction, SchedulerConfig};
use super::sampler::Sampler;
use super::tables;
use crate::error::Result;
use crate::noise::Generator;
use crate::FusedOps;

/// σ_data of the consistency parametrisation.
const SIGMA_DATA: f64 = 0.5;

/// What LCM and TCD share: the training ᾱ table (no zero-SNR floor) and the timesteps
/// taken from the schedule the model was distilled on.
#[derive(Debug, Clone)]
pub(crate) struct Distilled {
    n_train: usize,
    original_steps: usize,
    pub(crate) prediction: Prediction,
    pub(crate) alphas_cumprod: Vec<f64>,
    pub(crate) timesteps: Vec<f64>,
}

impl Distilled {
    /// The shared part of `LCMScheduler`/`TCDScheduler.from_config(config)`. Both classes
    /// have a `timestep_spacing` key but take their timesteps from
    /// `original_inference_steps`: the value is checked, not used.
    pub(crate) fn new(config: &SchedulerConfig) -> Result<Self> {
        if config.thresholding {
            return Err(config.unsupported("thresholding: true"));
        }
        config.spacing(&ClassDefaults::LCM)?;
        Ok(Self {
            n_train: config.num_train_timesteps,
            original_steps: config.original_inference_steps,
            prediction: config.prediction()?,
            // Zero terminal SNR leaves the last ᾱ at 0 here: no floor.
            alphas_cumprod: tables::alphas_cumprod(config, &ClassDefaults::LCM, false)?,
            timesteps: Vec::new(),
        })
    }

    /// `steps` of the distilled timesteps.
    pub(crate) fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        self.timesteps = tables::distilled_timesteps(self.n_train, self.original_steps, steps)?;
        Ok(())
    }

    /// ᾱ at the timestep of `step_index`.
    pub(crate) fn alpha_at(&self, step_index: usize) -> f64 {
        self.alphas_cumprod[self.timesteps[step_index] as usize]
    }

    /// The step count; panics on an index past it (a caller bug, not user input).
    pub(crate) fn check_index(&self, step_index: usize) -> usize {
        let n = self.timesteps.len();
        assert!(
            step_index < n,
            "scheduler step {step_index} is past the {n} steps set by set_timesteps"
        );
        n
    }

    /// `√ᾱ_t·x + √(1 − ᾱ_t)·noise`.
    pub(crate) fn add_noise<B: FusedOps>(
        &self,
        original: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        step_index: usize,
    ) -> Tensor<B, 4> {
        let a = self.alpha_at(step_index);
        original.mul_scalar(a.sqrt()) + noise.mul_scalar((1.0 - a).sqrt())
    }
}

/// The LCM scheduler: the distilled schedule and the consistency boundary condition.
#[derive(Debug, Clone)]
pub(crate) struct Lcm {
    schedule: Distilled,
    timestep_scaling: f64,
    clip: Option<f64>,
}

impl Lcm {
    /// `LCMScheduler.from_config(config)`. The class takes no timestep spacing: its
    /// timesteps come from `original_inference_steps`.
    pub(crate) fn new(config: &SchedulerConfig) -> Result<Self> {
        Ok(Self {
            schedule: Distilled::new(config)?,
            timestep_scaling: config.timestep_scaling,
            clip: config
                .clip_sample
                .unwrap_or(ClassDefaults::LCM.clip_sample)
                .then_some(config.clip_sample_range),
        })
    }

    /// The step's clean estimate: the boundary condition applied to x̂₀.
    fn consistency<B: FusedOps>(
        &self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let alpha = self.schedule.alpha_at(step_index);
        let x0 = x0_from(
            self.schedule.prediction,
            alpha,
            model_output,
            sample.clone(),
        );
        let x0 = match self.clip {
            Some(r) => x0.clamp(-r, r),
            None => x0,
        };
        let scaled = self.schedule.timesteps[step_index] * self.timestep_scaling;
        let d2 = SIGMA_DATA * SIGMA_DATA;
        let c_skip = d2 / (scaled * scaled + d2);
        let c_out = scaled / (scaled * scaled + d2).sqrt();
        x0.mul_scalar(c_out) + sample.mul_scalar(c_skip)
    }
}

/// x̂₀ from the model output at ᾱ, for DDPM-style (variance-preserving) samplers.
pub(crate) fn x0_from<B: FusedOps>(
    prediction: Prediction,
    alpha_cumprod: f64,
    model_output: Tensor<B, 4>,
    sample: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let (a, b) = (alpha_cumprod.sqrt(), (1.0 - alpha_cumprod).sqrt());
    match prediction {
        Prediction::Epsilon => (sample - model_output.mul_scalar(b)).div_scalar(a),
        Prediction::Sample => model_output,
        Prediction::Velocity => sample.mul_scalar(a) - model_output.mul_scalar(b),
    }
}

impl Sampler for Lcm {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        self.schedule.set_timesteps(steps)
    }

    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn step<B: FusedOps>(
        &mut self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        rng: &mut Generator,
    ) -> Tensor<B, 4> {
        let n = self.schedule.check_index(step_index);
        let denoised = self.consistency(model_output, step_index, sample.clone());
        if step_index + 1 == n {
            return denoised;
        }
        let prev = self.schedule.alpha_at(step_index + 1);
        let noise = rng.randn_tensor::<B, 4>(sample.dims(), &sample.device(), sample.dtype());
        denoised.mul_scalar(prev.sqrt()) + noise.mul_scalar((1.0 - prev).sqrt())
    }

    /// The consistency estimate the step returns before re-noising.
    fn denoised<B: FusedOps>(
        &self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        self.consistency(model_output, step_index, sample)
    }

    fn add_noise<B: FusedOps>(
        &self,
        original: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        step_index: usize,
    ) -> Tensor<B, 4> {
        self.schedule.add_noise(original, noise, step_index)
    }
}
