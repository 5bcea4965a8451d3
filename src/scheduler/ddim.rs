//! diffusers' `DDIMScheduler` with η = 0 (deterministic, what diffusers' SDXL pipeline
//! uses): `x_prev = √ᾱ_prev · x̂₀ + √(1 − ᾱ_prev) · ε̂`.

use crate::FusedOps;
use burn::tensor::Tensor;

use super::config::{ClassDefaults, Prediction, SchedulerConfig, Spacing};
use super::sampler::Sampler;
use super::tables::{self, round_even};
use crate::error::{Error, Result};
use crate::noise::Generator;

/// The DDIM scheduler's configuration and current schedule.
#[derive(Debug, Clone)]
pub(crate) struct Ddim {
    n_train: usize,
    spacing: Spacing,
    steps_offset: usize,
    prediction: Prediction,
    /// `clip_sample`: clamp x̂₀ to ± this.
    clip: Option<f64>,
    alphas_cumprod: Vec<f64>,
    /// ᾱ "before" the first training timestep: 1, or ᾱ₀ without `set_alpha_to_one`.
    final_alpha_cumprod: f64,
    steps: usize,
    timesteps: Vec<f64>,
}

impl Ddim {
    /// `DDIMScheduler.from_config(config)`.
    pub(crate) fn new(config: &SchedulerConfig) -> Result<Self> {
        if config.thresholding {
            return Err(config.unsupported("thresholding: true (dynamic thresholding)"));
        }
        let alphas_cumprod = tables::alphas_cumprod(config, &ClassDefaults::DDIM, false)?;
        Ok(Self {
            n_train: config.num_train_timesteps,
            spacing: config.spacing(&ClassDefaults::DDIM)?,
            steps_offset: config.steps_offset,
            prediction: config.prediction()?,
            clip: config
                .clip_sample
                .unwrap_or(ClassDefaults::DDIM.clip_sample)
                .then_some(config.clip_sample_range),
            final_alpha_cumprod: if config.set_alpha_to_one {
                1.0
            } else {
                alphas_cumprod[0]
            },
            alphas_cumprod,
            steps: 0,
            timesteps: Vec::new(),
        })
    }

    /// `(√ᾱ_t, √(1 − ᾱ_t))` at the timestep of `step_index`, in float32 as diffusers'
    /// `add_noise` computes them.
    fn noise_coefficients(&self, step_index: usize) -> (f64, f64) {
        let t = self.timesteps[step_index] as usize;
        let a = self.alphas_cumprod[t];
        (
            tables::f32r(a.sqrt()),
            tables::f32r(tables::f32r(1.0 - a).sqrt()),
        )
    }
}

impl Sampler for Ddim {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        tables::check_steps(steps, self.n_train)?;
        let timesteps: Vec<f64> =
            tables::spaced_timesteps(self.spacing, self.n_train, steps, self.steps_offset)
                .into_iter()
                .map(round_even)
                .collect();
        // DDIM indexes ᾱ by timestep, so every timestep must be a training timestep.
        if let Some(t) = timesteps
            .iter()
            .find(|&&t| t < 0.0 || t >= self.n_train as f64)
        {
            return Err(Error::invalid(
                "num_inference_steps",
                format!(
                    "{steps} steps with steps_offset {} put timestep {t} outside the {} \
                     training timesteps",
                    self.steps_offset, self.n_train
                ),
            ));
        }
        self.steps = steps;
        self.timesteps = timesteps;
        Ok(())
    }

    /// The clean-sample estimate x̂₀ at `step_index` (clipped as the step clips it).
    fn denoised<B: FusedOps>(
        &self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let t = self.timesteps[step_index] as usize;
        let alpha = self.alphas_cumprod[t];
        let beta = 1.0 - alpha;
        let x0 = match self.prediction {
            Prediction::Epsilon => {
                (sample - model_output.mul_scalar(beta.sqrt())).div_scalar(alpha.sqrt())
            }
            Prediction::Sample => model_output,
            Prediction::Velocity => {
                sample.mul_scalar(alpha.sqrt()) - model_output.mul_scalar(beta.sqrt())
            }
        };
        match self.clip {
            Some(r) => x0.clamp(-r, r),
            None => x0,
        }
    }

    fn step<B: FusedOps>(
        &mut self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        _rng: &mut Generator,
    ) -> Tensor<B, 4> {
        assert!(
            step_index < self.timesteps.len(),
            "scheduler step {step_index} is past the {} steps set by set_timesteps",
            self.timesteps.len()
        );
        let t = self.timesteps[step_index] as usize;
        // diffusers steps back by N / steps whatever the spacing.
        let prev = t as i64 - (self.n_train / self.steps) as i64;
        let alpha = self.alphas_cumprod[t];
        let alpha_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha_cumprod
        };
        let beta = 1.0 - alpha;
        let (x0, eps) = match self.prediction {
            Prediction::Epsilon => (
                (sample - model_output.clone().mul_scalar(beta.sqrt())).div_scalar(alpha.sqrt()),
                model_output,
            ),
            Prediction::Sample => (
                model_output.clone(),
                (sample - model_output.mul_scalar(alpha.sqrt())).div_scalar(beta.sqrt()),
            ),
            Prediction::Velocity => (
                sample.clone().mul_scalar(alpha.sqrt())
                    - model_output.clone().mul_scalar(beta.sqrt()),
                model_output.mul_scalar(alpha.sqrt()) + sample.mul_scalar(beta.sqrt()),
            ),
        };
        let x0 = match self.clip {
            Some(r) => x0.clamp(-r, r),
            None => x0,
        };
        x0.mul_scalar(alpha_prev.sqrt()) + eps.mul_scalar((1.0 - alpha_prev).sqrt())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// `√ᾱ_t·x + √(1 − ᾱ_t)·noise` at the step's timestep.
    fn add_noise<B: FusedOps>(
        &self,
        original: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        step_index: usize,
    ) -> Tensor<B, 4> {
        let (a, b) = self.noise_coefficients(step_index);
        original.mul_scalar(a) + noise.mul_scalar(b)
    }
}
