//! diffusers' `TCDScheduler` (Zheng et al. 2024, Trajectory Consistency Distillation):
//! from timestep t it predicts x̂₀ and ε, moves to an intermediate timestep
//! s = ⌊(1 − γ)·t_next⌋ along the deterministic trajectory, then re-noises from s to
//! t_next with fresh noise. γ (`eta`) sets the stochasticity: 0 is deterministic, 1 is
//! LCM-like. For TCD-LoRA.

use burn::tensor::Tensor;

use super::config::{ClassDefaults, Prediction, SchedulerConfig};
use super::lcm::x0_from;
use super::sampler::Sampler;
use super::tables;
use crate::error::{Error, Result};
use crate::noise::Generator;
use crate::FusedOps;

/// γ when the caller gives none: the TCD authors' recommendation and the default of
/// diffusers' `TCDScheduler.step` (its pipelines pass their own `eta = 0.0` instead).
pub const DEFAULT_TCD_ETA: f64 = 0.3;

/// The TCD scheduler: the training ᾱ table, the distilled timesteps and γ.
#[derive(Debug, Clone)]
pub(crate) struct Tcd {
    n_train: usize,
    original_steps: usize,
    prediction: Prediction,
    eta: f64,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<f64>,
}

impl Tcd {
    /// `TCDScheduler.from_config(config)`, stepping with γ = [`DEFAULT_TCD_ETA`].
    pub(crate) fn new(config: &SchedulerConfig) -> Result<Self> {
        if config.thresholding {
            return Err(config.unsupported("thresholding: true"));
        }
        // The class has the key but takes its timesteps from the distillation schedule:
        // the value is checked, not used.
        config.spacing(&ClassDefaults::LCM)?;
        Ok(Self {
            n_train: config.num_train_timesteps,
            original_steps: config.original_inference_steps,
            prediction: config.prediction()?,
            eta: DEFAULT_TCD_ETA,
            alphas_cumprod: tables::alphas_cumprod(config, &ClassDefaults::LCM, false)?,
            timesteps: Vec::new(),
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
        let a_t = self.alphas_cumprod[self.timesteps[step_index] as usize];
        let a_s = self.alphas_cumprod[self.targets(step_index).1];
        let (sa, sb) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        let x0 = x0_from(self.prediction, a_t, model_output.clone(), sample.clone());
        let eps = match self.prediction {
            Prediction::Epsilon => model_output,
            Prediction::Sample => (sample - x0.clone().mul_scalar(sa)).div_scalar(sb),
            Prediction::Velocity => model_output.mul_scalar(sa) + sample.mul_scalar(sb),
        };
        x0.mul_scalar(a_s.sqrt()) + eps.mul_scalar((1.0 - a_s).sqrt())
    }
}

impl Sampler for Tcd {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        self.timesteps = tables::distilled_timesteps(self.n_train, self.original_steps, steps)?;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step<B: FusedOps>(
        &mut self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        rng: &mut Generator,
    ) -> Tensor<B, 4> {
        let n = self.timesteps.len();
        assert!(
            step_index < n,
            "scheduler step {step_index} is past the {n} steps set by set_timesteps"
        );
        let noised = self.noised_at_s(model_output, step_index, sample.clone());
        if self.eta <= 0.0 || step_index + 1 == n {
            return noised;
        }
        let (next, s) = self.targets(step_index);
        let ratio = self.alphas_cumprod[next] / self.alphas_cumprod[s];
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
        let a_t = self.alphas_cumprod[self.timesteps[step_index] as usize];
        x0_from(self.prediction, a_t, model_output, sample)
    }

    /// `√ᾱ_t·x + √(1 − ᾱ_t)·noise`.
    fn add_noise<B: FusedOps>(
        &self,
        original: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        step_index: usize,
    ) -> Tensor<B, 4> {
        let a = self.alphas_cumprod[self.timesteps[step_index] as usize];
        original.mul_scalar(a.sqrt()) + noise.mul_scalar((1.0 - a).sqrt())
    }
}
