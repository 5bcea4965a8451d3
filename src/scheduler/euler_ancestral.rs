//! diffusers' `EulerAncestralDiscreteScheduler`: each step goes down to σ_down by an Euler
//! step and adds fresh noise of standard deviation σ_up, with σ_down² + σ_up² = σ_next²
//! and σ_up = σ_next · √(1 − σ_next²/σ²). SDXL-Turbo uses it with `trailing` spacing.

use crate::FusedOps;
use burn::tensor::Tensor;

use super::config::{ClassDefaults, Prediction, SchedulerConfig};
use super::euler::Euler;
use super::sampler::Sampler;
use crate::error::Result;
use crate::noise::Generator;

/// The ancestral Euler scheduler: the σ tables of [`Euler`] without its options.
#[derive(Debug, Clone)]
pub(crate) struct EulerAncestral {
    tables: Euler,
}

impl EulerAncestral {
    /// `EulerAncestralDiscreteScheduler.from_config(config)`. The class has no Karras,
    /// final-σ or interpolation options: those keys are ignored, as diffusers does.
    pub(crate) fn new(config: &SchedulerConfig) -> Result<Self> {
        let prediction = config.prediction()?;
        if prediction == Prediction::Sample {
            return Err(config.unsupported(
                "prediction_type \"sample\" with EulerAncestralDiscreteScheduler \
                 (diffusers does not implement it either)",
            ));
        }
        Ok(Self {
            tables: Euler::base(config, &ClassDefaults::EULER, prediction, true)?,
        })
    }
}

impl Sampler for EulerAncestral {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        self.tables.set_timesteps(num_inference_steps)
    }

    fn timesteps(&self) -> &[f64] {
        self.tables.timesteps()
    }

    fn sigmas(&self) -> &[f64] {
        self.tables.sigmas()
    }

    fn init_noise_sigma(&self) -> f64 {
        self.tables.init_noise_sigma()
    }

    fn scale_model_input<B: FusedOps>(
        &self,
        sample: Tensor<B, 4>,
        step_index: usize,
    ) -> Tensor<B, 4> {
        self.tables.scale_model_input(sample, step_index)
    }

    /// One ancestral step. Noise is drawn from `rng` even on the last step (where σ_up is
    /// 0) so that the generator advances exactly as diffusers' does.
    fn step<B: FusedOps>(
        &mut self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        rng: &mut Generator,
    ) -> Tensor<B, 4> {
        let (sigma, next) = self.tables.sigma_pair(step_index);
        let sigma_up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
        let sigma_down = (next * next - sigma_up * sigma_up).max(0.0).sqrt();
        let x0 = Euler::estimate_x0(self.tables.prediction, model_output, sample.clone(), sigma);
        let derivative = (sample.clone() - x0).div_scalar(sigma);
        let prev = sample.clone() + derivative.mul_scalar(sigma_down - sigma);
        let noise = rng.randn_tensor::<B, 4>(sample.dims(), &sample.device(), sample.dtype());
        prev + noise.mul_scalar(sigma_up)
    }

    fn denoised<B: FusedOps>(
        &self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        self.tables.denoised(model_output, step_index, sample)
    }

    fn add_noise<B: FusedOps>(
        &self,
        original: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        step_index: usize,
    ) -> Tensor<B, 4> {
        self.tables.add_noise(original, noise, step_index)
    }
}
