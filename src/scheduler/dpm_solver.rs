//! diffusers' `DPMSolverMultistepScheduler` with `algorithm_type: dpmsolver++` (Lu et al.
//! 2022), orders 1 and 2 with the `midpoint` or `heun` second-order update: "DPM++ 2M"
//! and, with Karras σ, "DPM++ 2M Karras"; with `sde-dpmsolver++`, the stochastic variant
//! ("DPM++ 2M SDE"), which draws fresh noise at every step.
//!
//! In the half-log-SNR λ = ln(α/σ) with α = 1/√(σ²+1), σ_t = σ·α and h = λ_next − λ,
//! the first-order update is `x ← (σ_next/σ)·x − α_next·(e^(−h) − 1)·x̂₀`; the second
//! order extrapolates x̂₀ from the previous step's.

use crate::FusedOps;
use std::any::Any;

use burn::tensor::Tensor;

use super::config::{BetaSchedule, ClassDefaults, Prediction, SchedulerConfig, Spacing};
use super::sampler::Sampler;
use super::tables::{self, f32r, round_even};
use crate::error::Result;
use crate::noise::Generator;

/// The multistep DPM-Solver++ scheduler's configuration, schedule and history.
#[derive(Debug)]
pub(crate) struct DpmSolver {
    n_train: usize,
    spacing: Spacing,
    steps_offset: usize,
    prediction: Prediction,
    order: usize,
    heun: bool,
    /// `sde-dpmsolver++`: the stochastic update.
    sde: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_zero: bool,
    karras: Option<(Option<f64>, Option<f64>)>,
    /// Karras timesteps are rounded except for the cosine schedule (then truncated).
    round_karras: bool,
    /// With Karras σ and `final_sigmas_type: sigma_min`, the final σ is the schedule's
    /// smallest (UniPC) rather than the training table's (DPM-Solver).
    karras_final_own_min: bool,
    /// The last timestep kept by `lambda_min_clipped`, plus one.
    last_timestep: usize,
    train_sigmas: Vec<f64>,
    log_sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    /// The previous step's x̂₀ (a `Tensor<B, 4>` of the backend in use).
    previous: Option<Box<dyn Any + Send + Sync>>,
    /// How many steps have run since the schedule was set, up to `order`.
    lower_order_nums: usize,
}

impl Clone for DpmSolver {
    /// A copy with the same schedule and an empty history.
    fn clone(&self) -> Self {
        Self {
            n_train: self.n_train,
            spacing: self.spacing,
            steps_offset: self.steps_offset,
            prediction: self.prediction,
            order: self.order,
            heun: self.heun,
            sde: self.sde,
            lower_order_final: self.lower_order_final,
            euler_at_final: self.euler_at_final,
            final_zero: self.final_zero,
            karras: self.karras,
            round_karras: self.round_karras,
            karras_final_own_min: self.karras_final_own_min,
            last_timestep: self.last_timestep,
            train_sigmas: self.train_sigmas.clone(),
            log_sigmas: self.log_sigmas.clone(),
            timesteps: self.timesteps.clone(),
            sigmas: self.sigmas.clone(),
            previous: None,
            lower_order_nums: 0,
        }
    }
}

/// `(α, σ_t, λ)` for the σ of the variance-exploding parametrisation.
pub(crate) fn alpha_sigma_lambda(sigma: f64) -> (f64, f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let sigma_t = sigma * alpha;
    // σ = 0 gives λ = +∞, which the first-order update handles (e^(−h) = 0).
    (alpha, sigma_t, alpha.ln() - sigma_t.ln())
}

impl DpmSolver {
    /// `DPMSolverMultistepScheduler.from_config(config)`, with `use_karras_sigmas = karras`.
    pub(crate) fn new(config: &SchedulerConfig, karras: bool) -> Result<Self> {
        config.check_no_exotic_sigmas()?;
        let sde = match config.algorithm_type.as_str() {
            // diffusers maps "deis" to dpmsolver++.
            "dpmsolver++" | "deis" => false,
            "sde-dpmsolver++" => true,
            other => {
                return Err(config.unsupported(format!(
                    "algorithm_type \"{other}\" (supported: dpmsolver++, sde-dpmsolver++)"
                )))
            }
        };
        let heun = match config.solver_type.as_str() {
            "midpoint" | "logrho" | "bh1" | "bh2" => false,
            "heun" => true,
            other => {
                return Err(config.unsupported(format!(
                    "solver_type \"{other}\" (supported: midpoint, heun)"
                )))
            }
        };
        if !(1..=2).contains(&config.solver_order) {
            return Err(config.unsupported(format!(
                "solver_order {} (supported: 1, 2)",
                config.solver_order
            )));
        }
        for (set, key) in [
            (config.thresholding, "thresholding"),
            (config.use_lu_lambdas, "use_lu_lambdas"),
            (config.use_flow_sigmas, "use_flow_sigmas"),
            (config.use_dynamic_shifting, "use_dynamic_shifting"),
        ] {
            if set {
                return Err(config.unsupported(format!("{key}: true")));
            }
        }
        if let Some(v) = &config.variance_type {
            return Err(config.unsupported(format!("variance_type \"{v}\"")));
        }
        let alphas_cumprod = tables::alphas_cumprod(config, &ClassDefaults::EULER, true)?;
        let train_sigmas = tables::train_sigmas(&alphas_cumprod);
        // λ(t) in float32 as diffusers keeps it; λ falls with t, so the clipped ones are
        // the last (noisiest) timesteps.
        let clipped = alphas_cumprod
            .iter()
            .map(|&a| {
                let (alpha, sigma) = (f32r(a.sqrt()), f32r((1.0 - a).sqrt()));
                f32r(f32r(alpha.ln()) - f32r(sigma.ln()))
            })
            .filter(|&l| l < config.lambda_min_clipped)
            .count();
        Ok(Self {
            n_train: config.num_train_timesteps,
            spacing: config.spacing(&ClassDefaults::EULER)?,
            steps_offset: config.steps_offset,
            prediction: config.prediction()?,
            order: config.solver_order,
            heun,
            sde,
            lower_order_final: config.lower_order_final,
            euler_at_final: config.euler_at_final,
            final_zero: config.final_sigma_zero()?,
            karras: karras.then_some((config.sigma_min, config.sigma_max)),
            round_karras: config.beta_schedule(&ClassDefaults::EULER)?
                != BetaSchedule::SquaredCosCapV2,
            karras_final_own_min: false,
            last_timestep: config.num_train_timesteps - clipped,
            log_sigmas: tables::log_sigmas(&train_sigmas),
            train_sigmas,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            previous: None,
            lower_order_nums: 0,
        })
    }
}

impl DpmSolver {
    /// UniPC's variant of this schedule: Karras timesteps always rounded, the Karras
    /// final σ the schedule's own smallest.
    pub(crate) fn unipc_karras(&mut self) {
        self.round_karras = true;
        self.karras_final_own_min = true;
    }
}

impl Sampler for DpmSolver {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        tables::check_steps(steps, self.n_train)?;
        let last = self.last_timestep;
        // DPM-Solver spaces steps + 1 points and drops the final one (t = 0).
        let mut timesteps: Vec<f64> = match self.spacing {
            Spacing::Linspace => {
                let mut t: Vec<f64> = tables::linspace(0.0, last as f64 - 1.0, steps + 1)
                    .into_iter()
                    .map(round_even)
                    .collect();
                t.reverse();
                t.pop();
                t
            }
            Spacing::Leading => {
                let ratio = last / (steps + 1);
                (1..=steps)
                    .rev()
                    .map(|i| (i * ratio + self.steps_offset) as f64)
                    .collect()
            }
            Spacing::Trailing => tables::trailing(last as f64, self.n_train, steps),
        };
        let mut sigmas: Vec<f64> = match self.karras {
            Some((min, max)) => {
                let min = min.unwrap_or(self.train_sigmas[0]);
                let max = max.unwrap_or(self.train_sigmas[self.n_train - 1]);
                let sigmas = tables::karras(min, max, steps);
                timesteps = sigmas
                    .iter()
                    .map(|&s| {
                        let t = tables::sigma_to_t(s, &self.log_sigmas);
                        if self.round_karras {
                            round_even(t)
                        } else {
                            t.trunc()
                        }
                    })
                    .collect();
                sigmas
            }
            None => timesteps
                .iter()
                .map(|&t| tables::interp(t, &self.train_sigmas))
                .collect(),
        };
        let final_sigma = match (self.final_zero, self.karras.is_some()) {
            (true, _) => 0.0,
            (false, true) if self.karras_final_own_min => sigmas[sigmas.len() - 1],
            (false, _) => self.train_sigmas[0],
        };
        sigmas.push(final_sigma);
        self.sigmas = sigmas.into_iter().map(f32r).collect();
        self.timesteps = timesteps;
        self.previous = None;
        self.lower_order_nums = 0;
        Ok(())
    }

    /// The clean-sample estimate x̂₀ at `step_index`, as the step computes it.
    fn denoised<B: FusedOps>(
        &self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let (alpha_s, sigma_s, _) = alpha_sigma_lambda(self.sigmas[step_index]);
        match self.prediction {
            Prediction::Epsilon => (sample - model_output.mul_scalar(sigma_s)).div_scalar(alpha_s),
            Prediction::Sample => model_output,
            Prediction::Velocity => sample.mul_scalar(alpha_s) - model_output.mul_scalar(sigma_s),
        }
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
        if step_index == 0 {
            // A new run over the same schedule.
            self.previous = None;
            self.lower_order_nums = 0;
        }
        let sigma = self.sigmas[step_index];
        let (alpha_s, sigma_s, lambda_s) = alpha_sigma_lambda(sigma);
        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(self.sigmas[step_index + 1]);
        let x0 = match self.prediction {
            Prediction::Epsilon => {
                (sample.clone() - model_output.mul_scalar(sigma_s)).div_scalar(alpha_s)
            }
            Prediction::Sample => model_output,
            Prediction::Velocity => {
                sample.clone().mul_scalar(alpha_s) - model_output.mul_scalar(sigma_s)
            }
        };
        let previous = self
            .previous
            .take()
            .and_then(|p| p.downcast::<Tensor<B, 4>>().ok())
            .map(|p| *p);

        let last_step = step_index == n - 1;
        let lower_order_final = last_step
            && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_zero);
        let h = lambda_t - lambda_s;
        // The SDE update is the ODE one with h doubled in the x̂₀ terms, the sample decayed
        // by e^(−h) more, and noise of standard deviation σ_t·√(1 − e^(−2h)) added. diffusers
        // draws that noise at every step (the last one's is multiplied by σ_t = 0).
        let noise = self
            .sde
            .then(|| rng.randn_tensor::<B, 4>(sample.dims(), &sample.device(), sample.dtype()));
        // The first-order coefficient of x̂₀: −α_t(e^(−h) − 1), or α_t(1 − e^(−2h)).
        let (decay, c0) = if self.sde {
            ((-h).exp(), -(-2.0 * h).exp_m1())
        } else {
            (1.0, -(-h).exp_m1())
        };
        let first =
            sample.mul_scalar(sigma_t / sigma_s * decay) + x0.clone().mul_scalar(alpha_t * c0);
        let prev_sample = match previous {
            Some(m1)
                if self.order == 2
                    && self.lower_order_nums >= 1
                    && step_index >= 1
                    && !lower_order_final =>
            {
                let (_, _, lambda_s1) = alpha_sigma_lambda(self.sigmas[step_index - 1]);
                let r0 = (lambda_s - lambda_s1) / h;
                let d1 = (x0.clone() - m1).mul_scalar(1.0 / r0);
                let c1 = match (self.heun, self.sde) {
                    (false, _) => 0.5 * alpha_t * c0,
                    (true, false) => alpha_t * (1.0 - c0 / h),
                    (true, true) => alpha_t * (1.0 - c0 / (2.0 * h)),
                };
                first + d1.mul_scalar(c1)
            }
            _ => first,
        };
        let prev_sample = match noise {
            Some(noise) => prev_sample + noise.mul_scalar(sigma_t * (-(-2.0 * h).exp_m1()).sqrt()),
            None => prev_sample,
        };
        if self.order == 2 {
            self.previous = Some(Box::new(x0));
        }
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        prev_sample
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// `α_t·x + σ_t·noise` with α_t = 1/√(σ²+1), σ_t = σ·α_t.
    fn add_noise<B: FusedOps>(
        &self,
        original: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        step_index: usize,
    ) -> Tensor<B, 4> {
        let sigma = self.sigmas[step_index];
        // diffusers' `_sigma_to_alpha_sigma_t`, in float32 like its tensors.
        let alpha_t = f32r(1.0 / f32r(sigma * sigma + 1.0).sqrt());
        let sigma_t = f32r(sigma * alpha_t);
        original.mul_scalar(alpha_t) + noise.mul_scalar(sigma_t)
    }
}
