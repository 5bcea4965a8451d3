//! diffusers' `UniPCMultistepScheduler` (Zhao et al. 2023): a multistep predictor (UniP)
//! and, from the second step on, a corrector (UniC) that re-solves the previous step with
//! the model output just computed, at no extra UNet evaluation. Its schedule (timesteps,
//! σ) is DPM-Solver's.
//!
//! Both updates work in the half-log-SNR λ = ln(α/σ_t) on x̂₀ (`predict_x0`, the default)
//! or on ε, with the `bh1` (B(h) = h) or `bh2` (B(h) = e^h − 1) variant.

use std::any::Any;

use burn::tensor::Tensor;

use super::config::{Prediction, SchedulerConfig};
use super::dpm_solver::{alpha_sigma_lambda, DpmSolver};
use super::sampler::Sampler;
use crate::error::Result;
use crate::noise::Generator;
use crate::FusedOps;

/// One tensor of the backend in use, kept between steps.
type Kept = Box<dyn Any + Send + Sync>;

/// The UniPC scheduler: DPM-Solver's schedule, its own update and history.
pub(crate) struct UniPc {
    schedule: DpmSolver,
    prediction: Prediction,
    order: usize,
    predict_x0: bool,
    /// `bh2`: B(h) = e^h − 1; `bh1`: B(h) = h.
    bh2: bool,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    /// The converted model outputs of the last `order` steps, oldest first.
    outputs: Vec<Kept>,
    /// The sample the last predictor started from (what the corrector re-solves).
    last_sample: Option<Kept>,
    /// The order the last predictor used (the corrector's order).
    this_order: usize,
    lower_order_nums: usize,
}

impl std::fmt::Debug for UniPc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UniPc")
            .field("schedule", &self.schedule)
            .field("order", &self.order)
            .finish_non_exhaustive()
    }
}

impl Clone for UniPc {
    /// A copy with the same schedule and an empty history.
    fn clone(&self) -> Self {
        Self {
            schedule: self.schedule.clone(),
            prediction: self.prediction,
            order: self.order,
            predict_x0: self.predict_x0,
            bh2: self.bh2,
            lower_order_final: self.lower_order_final,
            disable_corrector: self.disable_corrector.clone(),
            outputs: Vec::new(),
            last_sample: None,
            this_order: 0,
            lower_order_nums: 0,
        }
    }
}

/// The coefficients both updates share for a step of size `h` whose earlier points sit at
/// relative positions `rks` (the last one 1): h·φ₁(h), B(h), and the matrix R and vector b
/// of the order conditions.
struct Coefficients {
    h_phi_1: f64,
    b_h: f64,
    r: Vec<Vec<f64>>,
    b: Vec<f64>,
}

impl UniPc {
    /// `UniPCMultistepScheduler.from_config(config)`.
    pub(crate) fn new(config: &SchedulerConfig) -> Result<Self> {
        let bh2 = match config.solver_type.as_str() {
            "bh2" | "midpoint" | "heun" | "logrho" => true,
            "bh1" => false,
            other => {
                return Err(
                    config.unsupported(format!("solver_type \"{other}\" (supported: bh1, bh2)"))
                )
            }
        };
        if !(1..=3).contains(&config.solver_order) {
            return Err(config.unsupported(format!(
                "solver_order {} (supported: 1, 2, 3)",
                config.solver_order
            )));
        }
        if !config.predict_x0 && config.final_sigma_zero()? {
            // The ε-form update to σ = 0 multiplies 0 by ∞: diffusers returns NaN images.
            return Err(config.unsupported(
                "predict_x0: false with final_sigmas_type \"zero\" (the last step is singular; \
                 use final_sigmas_type \"sigma_min\")",
            ));
        }
        // The class has no λ clipping and no SDE variant; its Karras timesteps are always
        // rounded and its Karras final σ (`sigma_min`) is the schedule's own smallest.
        let mut own = config.clone();
        own.lambda_min_clipped = f64::NEG_INFINITY;
        own.algorithm_type = "dpmsolver++".into();
        own.solver_type = "midpoint".into();
        own.solver_order = 2;
        let mut schedule = DpmSolver::new(&own, config.use_karras_sigmas)?;
        schedule.unipc_karras();
        Ok(Self {
            schedule,
            prediction: config.prediction()?,
            order: config.solver_order,
            predict_x0: config.predict_x0,
            bh2,
            lower_order_final: config.lower_order_final,
            disable_corrector: config.disable_corrector.clone(),
            outputs: Vec::new(),
            last_sample: None,
            this_order: 0,
            lower_order_nums: 0,
        })
    }

    /// What the updates work on: x̂₀ (`predict_x0`) or ε, from the model output at
    /// `step_index`.
    fn convert<B: FusedOps>(
        &self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        if self.predict_x0 {
            return self.schedule.denoised(model_output, step_index, sample);
        }
        let (alpha, sigma_t, _) = alpha_sigma_lambda(self.schedule.sigmas()[step_index]);
        match self.prediction {
            Prediction::Epsilon => model_output,
            Prediction::Sample => (sample - model_output.mul_scalar(alpha)).div_scalar(sigma_t),
            Prediction::Velocity => model_output.mul_scalar(alpha) + sample.mul_scalar(sigma_t),
        }
    }

    fn lambda(&self, index: usize) -> f64 {
        alpha_sigma_lambda(self.schedule.sigmas()[index]).2
    }

    fn coefficients(&self, h: f64, rks: &[f64]) -> Coefficients {
        let order = rks.len();
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let b_h = if self.bh2 { hh.exp_m1() } else { hh };
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0;
        let mut r = Vec::with_capacity(order);
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            r.push(rks.iter().map(|rk| rk.powi(i as i32 - 1)).collect());
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        Coefficients { h_phi_1, b_h, r, b }
    }

    /// The `k`-th most recent kept output (0: the newest).
    fn output<B: FusedOps>(&self, k: usize) -> Tensor<B, 4> {
        self.outputs[self.outputs.len() - 1 - k]
            .downcast_ref::<Tensor<B, 4>>()
            .expect("UniPC history holds the backend's tensors")
            .clone()
    }

    /// The differences (m_k − m₀)/r_k of the `order − 1` earlier outputs, the newest kept
    /// output being m₀ at λ(`s0`), and the relative positions r_k (with 1 appended).
    fn differences<B: FusedOps>(
        &self,
        s0: usize,
        h: f64,
        order: usize,
    ) -> (Vec<Tensor<B, 4>>, Vec<f64>) {
        let m0 = self.output::<B>(0);
        let lambda_s0 = self.lambda(s0);
        let mut d1s = Vec::with_capacity(order);
        let mut rks = Vec::with_capacity(order);
        for k in 1..order {
            let rk = (self.lambda(s0 - k) - lambda_s0) / h;
            d1s.push((self.output::<B>(k) - m0.clone()).div_scalar(rk));
            rks.push(rk);
        }
        rks.push(1.0);
        (d1s, rks)
    }

    /// `x` carried from λ(`from`) to λ(`to`) with the newest output alone (the first-order
    /// part both updates share), and the scale of their higher-order corrections.
    fn base_update<B: FusedOps>(
        &self,
        x: Tensor<B, 4>,
        from: usize,
        to: usize,
        c: &Coefficients,
    ) -> (Tensor<B, 4>, f64) {
        let (alpha_s0, sigma_s0, _) = alpha_sigma_lambda(self.schedule.sigmas()[from]);
        let (alpha_t, sigma_t, _) = alpha_sigma_lambda(self.schedule.sigmas()[to]);
        let m0 = self.output::<B>(0);
        if self.predict_x0 {
            (
                x.mul_scalar(sigma_t / sigma_s0) - m0.mul_scalar(alpha_t * c.h_phi_1),
                alpha_t * c.b_h,
            )
        } else {
            (
                x.mul_scalar(alpha_t / alpha_s0) - m0.mul_scalar(sigma_t * c.h_phi_1),
                sigma_t * c.b_h,
            )
        }
    }

    /// UniP: from `sample` at `step_index` to the next step, with order `order`.
    fn predict<B: FusedOps>(
        &self,
        sample: Tensor<B, 4>,
        step_index: usize,
        order: usize,
    ) -> Tensor<B, 4> {
        let h = self.lambda(step_index + 1) - self.lambda(step_index);
        let (d1s, rks) = self.differences::<B>(step_index, h, order);
        let c = self.coefficients(h, &rks);
        let (x_t, scale) = self.base_update(sample, step_index, step_index + 1, &c);
        if d1s.is_empty() {
            return x_t;
        }
        let rhos = if order == 2 {
            vec![0.5]
        } else {
            let n = order - 1;
            let r: Vec<Vec<f64>> = c.r[..n].iter().map(|row| row[..n].to_vec()).collect();
            solve(r, c.b[..n].to_vec())
        };
        x_t - weighted(&d1s, &rhos).mul_scalar(scale)
    }

    /// UniC: re-solves the step from `last_sample` at `step_index − 1` to `step_index`,
    /// now that `this_output` (converted) is known there.
    fn correct<B: FusedOps>(
        &self,
        this_output: Tensor<B, 4>,
        last_sample: Tensor<B, 4>,
        step_index: usize,
        order: usize,
    ) -> Tensor<B, 4> {
        let s0 = step_index - 1;
        let h = self.lambda(step_index) - self.lambda(s0);
        let (d1s, rks) = self.differences::<B>(s0, h, order);
        let c = self.coefficients(h, &rks);
        let rhos = if order == 1 {
            vec![0.5]
        } else {
            solve(c.r.clone(), c.b.clone())
        };
        let (x_t, scale) = self.base_update(last_sample, s0, step_index, &c);
        let d1_t = (this_output - self.output::<B>(0)).mul_scalar(rhos[order - 1]);
        let correction = if d1s.is_empty() {
            d1_t
        } else {
            weighted(&d1s, &rhos[..order - 1]) + d1_t
        };
        x_t - correction.mul_scalar(scale)
    }
}

/// Σ w_k·t_k.
fn weighted<B: FusedOps>(tensors: &[Tensor<B, 4>], weights: &[f64]) -> Tensor<B, 4> {
    tensors
        .iter()
        .zip(weights)
        .map(|(t, &w)| t.clone().mul_scalar(w))
        .reduce(|a, b| a + b)
        .expect("at least one term")
}

/// Solves the small system `a·x = b` by Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        let (top, rest) = a.split_at_mut(col + 1);
        let pivot_row = &top[col];
        for (offset, row) in rest.iter_mut().enumerate() {
            let f = row[col] / pivot_row[col];
            for (x, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
            b[col + 1 + offset] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x
}

impl Sampler for UniPc {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        self.schedule.set_timesteps(steps)?;
        self.outputs.clear();
        self.last_sample = None;
        self.this_order = 0;
        self.lower_order_nums = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        self.schedule.timesteps()
    }

    fn sigmas(&self) -> &[f64] {
        self.schedule.sigmas()
    }

    fn step<B: FusedOps>(
        &mut self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        _rng: &mut Generator,
    ) -> Tensor<B, 4> {
        let n = self.timesteps().len();
        assert!(
            step_index < n,
            "scheduler step {step_index} is past the {n} steps set by set_timesteps"
        );
        if step_index == 0 {
            // A new run over the same schedule.
            self.outputs.clear();
            self.last_sample = None;
            self.lower_order_nums = 0;
        }
        let converted = self.convert(model_output, step_index, sample.clone());
        let last = self
            .last_sample
            .take()
            .and_then(|s| s.downcast::<Tensor<B, 4>>().ok());
        let sample = match last {
            Some(last) if step_index > 0 && !self.disable_corrector.contains(&(step_index - 1)) => {
                self.correct(converted.clone(), *last, step_index, self.this_order)
            }
            _ => sample,
        };
        self.outputs.push(Box::new(converted));
        if self.outputs.len() > self.order {
            self.outputs.remove(0);
        }
        let this_order = if self.lower_order_final {
            self.order.min(n - step_index)
        } else {
            self.order
        };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        self.last_sample = Some(Box::new(sample.clone()));
        let prev = self.predict(sample, step_index, self.this_order);
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        prev
    }

    fn denoised<B: FusedOps>(
        &self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        self.schedule.denoised(model_output, step_index, sample)
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

#[cfg(test)]
mod tests {
    use super::{solve, UniPc};
    use crate::scheduler::SchedulerConfig;

    #[test]
    fn the_singular_epsilon_form_is_refused() {
        let config = SchedulerConfig {
            predict_x0: false,
            ..SchedulerConfig::default()
        };
        assert!(matches!(
            UniPc::new(&config),
            Err(crate::Error::Unsupported { .. })
        ));
        let config = SchedulerConfig {
            final_sigmas_type: "sigma_min".into(),
            ..config
        };
        assert!(UniPc::new(&config).is_ok());
    }

    #[test]
    fn solves_small_systems() {
        let x = solve(vec![vec![0.0, 2.0], vec![1.0, 1.0]], vec![4.0, 3.0]);
        assert!((x[0] - 1.0).abs() < 1e-12 && (x[1] - 2.0).abs() < 1e-12);
    }
}
