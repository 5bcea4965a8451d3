//! diffusers' `TCDScheduler` (Zheng et al. 2024, Trajectory Consistency Distillation):
//! from timestep t it predicts x̂₀ and ε, moves to an intermediate timestep
//! s = ⌊(1 − γ)·t_next⌋ along the deterministic trajectory, then re-noises from s to
//! t_next with fresh noise. γ (`eta`) sets the stochasticity: 0 is deterministic, 1 is
//! LCM-like. For TCD-LoRA.

use burn::tensor::Tensor;

use super::config::{Prediction, SchedulerConfig};
use super::lcm::{x0_from, Distilled};
use super::sampler::Sampler;
use crate::error::{Error, Result};
use crate::noise::Generator;
use crate::FusedOps;

/// γ when the caller gives none: the TCD authors' recommendation and the default of
/// diffusers' `TCDScheduler.step` (its pipelines pass their own `eta = 0.0` instead).
pub const DEFAULT_TCD_ETA: f64 = 0.3;

/// The TCD scheduler: the distilled schedule and γ.
#[derive(Debug, Clone)]
pub(crate) struct Tcd {
    schedule: Distilled,
    eta: f64,
}

impl Tcd {
    /// `TCDScheduler.from_config(config)`, stepping with γ = [`DEFAULT_TCD_ETA`].
    pub(crate) fn new(config: &SchedulerConfig) -> Result<Self> {
        Ok(Self {
            schedule: Distilled::new(config)?,
            eta: DEFAULT_TCD_ETA,
        })
    }

    /// Sets γ, which must lie in [0, 1].
    pub(crate) fn set_eta(&mut self, eta: f64) -> Result<()> {
        if !(0.0..=1.0).contains(&eta) {
            return Err(Error::invalid(
                "eta",
                format!("{eta} is outside 0..=1 (TCD's gamma)"),
            ));
        }
        self.eta = eta;
        Ok(())
    }

    /// t_next (0 after the last step) and the intermediate s = ⌊(1 − γ)·t_next⌋.
    fn targets(&self, step_index: usize) -> (usize, usize) {
        let next = self
            .schedule
            .timesteps
            .get(step_index + 1)
            .map_or(0, |&t| t as usize);
        // torch multiplies the integer timestep by the float in float32.
        let s = ((1.0 - self.eta) as f32 * next as f32).floor() as usize;
        (next, s)
    }

    /// The sample moved along the trajectory to the intermediate timestep s.
    fn noised_at_s<B: FusedOps>(
        &self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let a_t = self.schedule.alpha_at(step_index);
        let a_s = self.schedule.alphas_cumprod[self.targets(step_index).1];
        let (sa, sb) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        let prediction = self.schedule.prediction;
        let x0 = x0_from(prediction, a_t, model_output.clone(), sample.clone());
        let eps = match prediction {
            Prediction::Epsilon => model_output,
            Prediction::Sample => (sample - x0.clone().mul_scalar(sa)).div_scalar(sb),
            Prediction::Velocity => model_output.mul_scalar(sa) + sample.mul_scalar(sb),
        };
        x0.mul_scalar(a_s.sqrt()) + eps.mul_scalar((1.0 - a_s).sqrt())
    }
}

impl Sampler for Tcd {
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
        let noised = self.noised_at_s(model_output, step_index, sample.clone());
        if self.eta <= 0.0 || step_index + 1 == n {
            return noised;
        }
        let (next, s) = self.targets(step_index);
        let ratio = self.schedule.alphas_cumprod[next] / self.schedule.alphas_cumprod[s];
        let noise = rng.randn_tensor::<B, 4>(sample.dims(), &sample.device(), sample.dtype());
        noised.mul_scalar(ratio.sqrt()) + noise.mul_scalar((1.0 - ratio).sqrt())
    }

    /// x̂₀ at `step_index`.
    fn denoised<B: FusedOps>(
        &self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        x0_from(
            self.schedule.prediction,
            self.schedule.alpha_at(step_index),
            model_output,
            sample,
        )
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
