//! diffusers' `EulerDiscreteScheduler`: Karras et al.'s Euler method on the σ-parametrised
//! probability-flow ODE, `x ← x + (x − x̂₀)/σ · (σ_next − σ)`, optionally on a Karras
//! σ schedule. Also the σ tables of [`super::euler_ancestral`].

use crate::FusedOps;
use burn::tensor::Tensor;

use super::config::{ClassDefaults, Prediction, SchedulerConfig, Spacing};
use super::sampler::Sampler;
use super::tables::{self, f32r};
use crate::error::Result;
use crate::noise::Generator;

/// The Euler scheduler's configuration and current schedule.
#[derive(Debug, Clone)]
pub(crate) struct Euler {
    n_train: usize,
    spacing: Spacing,
    steps_offset: usize,
    pub(crate) prediction: Prediction,
    /// Karras spacing, with the config's optional `(sigma_min, sigma_max)` overrides.
    karras: Option<(Option<f64>, Option<f64>)>,
    final_zero: bool,
    /// `timestep_type: continuous` with v-prediction: the UNet receives `ln(σ)/4`.
    continuous_v: bool,
    train_sigmas: Vec<f64>,
    log_sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
}

impl Euler {
    /// `EulerDiscreteScheduler.from_config(config)`, with `use_karras_sigmas = karras`.
    pub(crate) fn new(config: &SchedulerConfig, karras: bool) -> Result<Self> {
        config.check_no_exotic_sigmas()?;
        if config.interpolation_type != "linear" {
            return Err(config.unsupported(format!(
                "interpolation_type \"{}\" (supported: linear)",
                config.interpolation_type
            )));
        }
        let prediction = config.prediction()?;
        let continuous = match config.timestep_type.as_str() {
            "discrete" => false,
            "continuous" => true,
            other => {
                return Err(config.unsupported(format!(
                    "timestep_type \"{other}\" (supported: discrete, continuous)"
                )))
            }
        };
        let mut euler = Self::base(
            config,
            &ClassDefaults::EULER,
            prediction,
            config.final_sigma_zero()?,
        )?;
        euler.karras = karras.then_some((config.sigma_min, config.sigma_max));
        euler.continuous_v = continuous && prediction == Prediction::Velocity;
        Ok(euler)
    }

    /// The plain σ schedule (no Karras, discrete timesteps), shared with Euler ancestral.
    pub(crate) fn base(
        config: &SchedulerConfig,
        class: &ClassDefaults,
        prediction: Prediction,
        final_zero: bool,
    ) -> Result<Self> {
        let alphas_cumprod = tables::alphas_cumprod(config, class, true)?;
        let train_sigmas = tables::train_sigmas(&alphas_cumprod);
        Ok(Self {
            n_train: config.num_train_timesteps,
            spacing: config.spacing(class)?,
            steps_offset: config.steps_offset,
            prediction,
            karras: None,
            final_zero,
            continuous_v: false,
            log_sigmas: tables::log_sigmas(&train_sigmas),
            train_sigmas,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
        })
    }

    /// Switches Karras σ spacing on (with optional `(sigma_min, sigma_max)` overrides) or
    /// off.
    pub(crate) fn set_karras(&mut self, karras: Option<(Option<f64>, Option<f64>)>) {
        self.karras = karras;
    }

    /// σ at `step_index` and at the next step.
    pub(crate) fn sigma_pair(&self, step_index: usize) -> (f64, f64) {
        assert!(
            step_index + 1 < self.sigmas.len(),
            "scheduler step {step_index} is past the {} steps set by set_timesteps",
            self.sigmas.len().saturating_sub(1)
        );
        (self.sigmas[step_index], self.sigmas[step_index + 1])
    }

    /// The clean-sample estimate x̂₀ from the model output at noise level σ.
    pub(crate) fn estimate_x0<B: FusedOps>(
        prediction: Prediction,
        model_output: Tensor<B, 4>,
        sample: Tensor<B, 4>,
        sigma: f64,
    ) -> Tensor<B, 4> {
        match prediction {
            Prediction::Epsilon => sample - model_output.mul_scalar(sigma),
            Prediction::Sample => model_output,
            Prediction::Velocity => {
                let s2 = sigma * sigma + 1.0;
                model_output.mul_scalar(-sigma / s2.sqrt()) + sample.div_scalar(s2)
            }
        }
    }
}

impl Sampler for Euler {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        tables::check_steps(steps, self.n_train)?;
        // The spaced timesteps are float32 in diffusers before σ is read off the table.
        let mut timesteps: Vec<f64> =
            tables::spaced_timesteps(self.spacing, self.n_train, steps, self.steps_offset)
                .into_iter()
                .map(f32r)
                .collect();
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| tables::interp(t, &self.train_sigmas))
            .collect();
        if let Some((min, max)) = self.karras {
            let min = min.unwrap_or(sigmas[sigmas.len() - 1]);
            let max = max.unwrap_or(sigmas[0]);
            sigmas = tables::karras(min, max, steps);
            timesteps = sigmas
                .iter()
                .map(|&s| tables::sigma_to_t(s, &self.log_sigmas))
                .collect();
        }
        sigmas.push(if self.final_zero {
            0.0
        } else {
            self.train_sigmas[0]
        });
        self.sigmas = sigmas.into_iter().map(f32r).collect();
        self.timesteps = if self.continuous_v {
            self.sigmas[..steps]
                .iter()
                .map(|s| f32r(0.25 * f32r(s.ln())))
                .collect()
        } else {
            timesteps.into_iter().map(f32r).collect()
        };
        Ok(())
    }

    /// σ_max (or √(σ_max² + 1) under `leading` spacing, where σ_max is not the top of the
    /// training range), from the current schedule or, before one is set, the training one.
    fn init_noise_sigma(&self) -> f64 {
        let max = if self.sigmas.is_empty() {
            &self.train_sigmas
        } else {
            &self.sigmas
        }
        .iter()
        .fold(0.0f64, |m, &s| m.max(s));
        match self.spacing {
            Spacing::Linspace | Spacing::Trailing => max,
            Spacing::Leading => f32r((max * max + 1.0).sqrt()),
        }
    }

    /// `x / √(σ² + 1)`: the UNet sees unit-variance input.
    fn scale_model_input<B: FusedOps>(
        &self,
        sample: Tensor<B, 4>,
        step_index: usize,
    ) -> Tensor<B, 4> {
        let (sigma, _) = self.sigma_pair(step_index);
        sample.div_scalar((sigma * sigma + 1.0).sqrt())
    }

    fn step<B: FusedOps>(
        &mut self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        _rng: &mut Generator,
    ) -> Tensor<B, 4> {
        let (sigma, next) = self.sigma_pair(step_index);
        let x0 = Self::estimate_x0(self.prediction, model_output, sample.clone(), sigma);
        let derivative = (sample.clone() - x0).div_scalar(sigma);
        sample + derivative.mul_scalar(next - sigma)
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    fn denoised<B: FusedOps>(
        &self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        Self::estimate_x0(
            self.prediction,
            model_output,
            sample,
            self.sigmas[step_index],
        )
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
