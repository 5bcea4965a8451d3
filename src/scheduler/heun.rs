//! diffusers' `HeunDiscreteScheduler`: Karras et al.'s (2022) second-order Heun method on
//! the σ-parametrised probability-flow ODE. Each step is an Euler predictor to σ_next and a
//! trapezoidal corrector there, so the schedule lists every timestep but the first twice
//! (`2N − 1` UNet evaluations for N steps) and `step` alternates between the two halves.

use std::any::Any;

use burn::tensor::Tensor;

use super::config::{ClassDefaults, SchedulerConfig};
use super::euler::Euler;
use super::sampler::Sampler;
use crate::error::Result;
use crate::noise::Generator;
use crate::FusedOps;

/// The first half of a step, kept for the second: the derivative there, the step size
/// and the sample the step started from (tensors of the backend in use).
struct FirstHalf {
    derivative: Box<dyn Any + Send + Sync>,
    sample: Box<dyn Any + Send + Sync>,
    dt: f64,
}

/// The Heun scheduler: Euler's σ tables, interleaved.
pub(crate) struct Heun {
    /// The plain N-step Euler schedule the interleaved one is built from.
    euler: Euler,
    clip: Option<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    pending: Option<FirstHalf>,
}

impl std::fmt::Debug for Heun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heun")
            .field("timesteps", &self.timesteps)
            .field("sigmas", &self.sigmas)
            .finish_non_exhaustive()
    }
}

impl Clone for Heun {
    /// A copy with the same schedule and no step in progress.
    fn clone(&self) -> Self {
        Self {
            euler: self.euler.clone(),
            clip: self.clip,
            timesteps: self.timesteps.clone(),
            sigmas: self.sigmas.clone(),
            pending: None,
        }
    }
}

impl Heun {
    /// `HeunDiscreteScheduler.from_config(config)`. The class has Karras σ but no
    /// zero-terminal-SNR, final-σ or timestep-type options: those keys are ignored, as
    /// diffusers ignores them.
    pub(crate) fn new(config: &SchedulerConfig) -> Result<Self> {
        config.check_no_exotic_sigmas()?;
        let mut own = config.clone();
        own.rescale_betas_zero_snr = false;
        let mut euler = Euler::base(&own, &ClassDefaults::HEUN, config.prediction()?, true)?;
        // The class reads no sigma_min/sigma_max overrides.
        euler.set_karras(config.use_karras_sigmas.then_some((None, None)));
        Ok(Self {
            euler,
            clip: config
                .clip_sample
                .unwrap_or(ClassDefaults::HEUN.clip_sample)
                .then_some(config.clip_sample_range),
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            pending: None,
        })
    }

    /// The clean-sample estimate at noise level σ, clamped when the config asks.
    fn x0<B: FusedOps>(
        &self,
        model_output: Tensor<B, 4>,
        sample: Tensor<B, 4>,
        sigma: f64,
    ) -> Tensor<B, 4> {
        let x0 = Euler::estimate_x0(self.euler.prediction, model_output, sample, sigma);
        match self.clip {
            Some(r) => x0.clamp(-r, r),
            None => x0,
        }
    }
}

impl Sampler for Heun {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        self.euler.set_timesteps(steps)?;
        let (t, s) = (self.euler.timesteps(), self.euler.sigmas());
        // [t0, t1, t1, …] and [σ0, σ1, σ1, …, σ_{N−1}, σ_{N−1}, 0].
        self.timesteps = std::iter::once(t[0])
            .chain(t[1..].iter().flat_map(|&x| [x, x]))
            .collect();
        let last = s.len() - 1;
        self.sigmas = std::iter::once(s[0])
            .chain(s[1..last].iter().flat_map(|&x| [x, x]))
            .chain(std::iter::once(s[last]))
            .collect();
        self.pending = None;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    fn order(&self) -> usize {
        2
    }

    fn init_noise_sigma(&self) -> f64 {
        self.euler.init_noise_sigma()
    }

    fn scale_model_input<B: FusedOps>(
        &self,
        sample: Tensor<B, 4>,
        step_index: usize,
    ) -> Tensor<B, 4> {
        let sigma = self.sigmas[step_index];
        sample.div_scalar((sigma * sigma + 1.0).sqrt())
    }

    fn step<B: FusedOps>(
        &mut self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        _rng: &mut Generator,
    ) -> Tensor<B, 4> {
        let n = self.timesteps.len();
        assert!(
            step_index < n,
            "scheduler step {step_index} is past the {n} steps set by set_timesteps"
        );
        let first = self
            .pending
            .take()
            .map(|p| {
                let derivative = p.derivative.downcast::<Tensor<B, 4>>().ok();
                let start = p.sample.downcast::<Tensor<B, 4>>().ok();
                (derivative, start, p.dt)
            })
            .and_then(|(d, s, dt)| Some((*d?, *s?, dt)));
        match first {
            // The corrector: the mean of both halves' derivatives from the step's start.
            Some((d1, start, dt)) => {
                let sigma_next = self.sigmas[step_index];
                let x0 = self.x0(model_output, sample.clone(), sigma_next);
                let d2 = (sample - x0).div_scalar(sigma_next);
                start + (d1 + d2).mul_scalar(0.5 * dt)
            }
            // The predictor: an Euler step to σ_next.
            None => {
                let (sigma, next) = (self.sigmas[step_index], self.sigmas[step_index + 1]);
                let x0 = self.x0(model_output, sample.clone(), sigma);
                let derivative = (sample.clone() - x0).div_scalar(sigma);
                let dt = next - sigma;
                let out = sample.clone() + derivative.clone().mul_scalar(dt);
                self.pending = Some(FirstHalf {
                    derivative: Box::new(derivative),
                    sample: Box::new(sample),
                    dt,
                });
                out
            }
        }
    }

    /// x̂₀ at the σ the UNet saw at `step_index`.
    fn denoised<B: FusedOps>(
        &self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        self.x0(model_output, sample, self.sigmas[step_index])
    }

    /// `x + σ·noise`.
    fn add_noise<B: FusedOps>(
        &self,
        original: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        step_index: usize,
    ) -> Tensor<B, 4> {
        original + noise.mul_scalar(self.sigmas[step_index])
    }
}
