//! Host-side noise-schedule tables shared by the schedulers, in f64.
//!
//! diffusers keeps betas, ᾱ and σ tables in float32 tensors and does the rest in numpy
//! float64; values that diffusers stores in float32 are rounded to float32 here too (see
//! [`f32r`]) so that the tables agree to the last bit or two, not only to 1e-4.

use super::config::{BetaSchedule, ClassDefaults, SchedulerConfig, Spacing};
use crate::error::{Error, Result};

/// Rounds to the nearest float32, as storing into a float32 tensor or array does.
pub(crate) fn f32r(x: f64) -> f64 {
    x as f32 as f64
}

/// numpy's `np.round`: halves go to the even neighbour.
pub(crate) fn round_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.linspace(start, stop, num)`: `start + i * step`, with the last value exactly `stop`.
pub(crate) fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (num - 1) as f64;
            let mut v: Vec<f64> = (0..num).map(|i| start + i as f64 * step).collect();
            v[num - 1] = stop;
            v
        }
    }
}

/// The cumulative products ᾱ_t of the training schedule, as float32 values.
///
/// `zero_snr_floor`: with `rescale_betas_zero_snr`, the last ᾱ is exactly 0; the
/// σ-based schedulers (Euler, DPM-Solver) replace it by 2^-24 so σ stays finite.
pub(crate) fn alphas_cumprod(
    config: &SchedulerConfig,
    class: &ClassDefaults,
    zero_snr_floor: bool,
) -> Result<Vec<f64>> {
    let n = config.num_train_timesteps;
    if n < 2 {
        return Err(config.unsupported(format!("num_train_timesteps {n} (needs at least 2)")));
    }
    let beta_start = config.beta_start.unwrap_or(class.beta_start);
    let beta_end = config.beta_end.unwrap_or(class.beta_end);
    let mut betas: Vec<f64> = match &config.trained_betas {
        Some(b) => {
            if b.len() != n {
                return Err(config.unsupported(format!(
                    "trained_betas has {} values but num_train_timesteps is {n}",
                    b.len()
                )));
            }
            b.iter().map(|&x| f32r(x)).collect()
        }
        None => match config.beta_schedule(class)? {
            BetaSchedule::Linear => linspace(beta_start, beta_end, n)
                .into_iter()
                .map(f32r)
                .collect(),
            BetaSchedule::ScaledLinear => {
                linspace(beta_start.sqrt(), beta_end.sqrt(), n)
                    .into_iter()
                    // torch squares the float32 linspace in float32.
                    .map(|r| {
                        let r = r as f32;
                        (r * r) as f64
                    })
                    .collect()
            }
            BetaSchedule::SquaredCosCapV2 => cosine_betas(n),
        },
    };
    if betas.iter().any(|b| !(0.0..1.0).contains(b)) {
        return Err(config.unsupported("betas outside [0, 1)"));
    }
    if config.rescale_betas_zero_snr {
        betas = rescale_zero_terminal_snr(&betas);
    }
    // torch's CPU cumprod accumulates float32 inputs in float64 and stores float32.
    let mut acc = 1.0f64;
    let mut out: Vec<f64> = betas
        .iter()
        .map(|&b| {
            acc *= f32r(1.0 - b);
            f32r(acc)
        })
        .collect();
    if config.rescale_betas_zero_snr && zero_snr_floor {
        out[n - 1] = 2f64.powi(-24);
    }
    Ok(out)
}

/// The "squaredcos_cap_v2" (GLIDE cosine) betas, capped at 0.999.
fn cosine_betas(n: usize) -> Vec<f64> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            f32r((1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999))
        })
        .collect()
}

/// Rescales betas so that the final ᾱ is zero and the first is unchanged.
fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1.0;
    let sqrt_bar: Vec<f64> = betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc.sqrt()
        })
        .collect();
    let (first, last) = (sqrt_bar[0], sqrt_bar[sqrt_bar.len() - 1]);
    let bar: Vec<f64> = sqrt_bar
        .iter()
        .map(|s| ((s - last) * first / (first - last)).powi(2))
        .collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(f32r(1.0 - bar[0]));
    for w in bar.windows(2) {
        out.push(f32r(1.0 - w[1] / w[0]));
    }
    out
}

/// σ_t = √((1 − ᾱ_t) / ᾱ_t) for every training timestep, as float32 values.
pub(crate) fn train_sigmas(alphas_cumprod: &[f64]) -> Vec<f64> {
    alphas_cumprod
        .iter()
        .map(|a| f32r(((1.0 - a) / a).sqrt()))
        .collect()
}

/// `np.log` of the float32 σ table (a float32 result).
pub(crate) fn log_sigmas(sigmas: &[f64]) -> Vec<f64> {
    sigmas.iter().map(|s| f32r(s.ln())).collect()
}

/// `np.interp(x, arange(len(table)), table)`: linear interpolation, clamped at the ends.
pub(crate) fn interp(x: f64, table: &[f64]) -> f64 {
    let last = table.len() - 1;
    if x.is_nan() || x <= 0.0 {
        return table[0];
    }
    if x >= last as f64 {
        return table[last];
    }
    let j = x.floor() as usize;
    let slope = table[j + 1] - table[j];
    slope * (x - j as f64) + table[j]
}

/// The (fractional) training timestep whose log-σ is `ln sigma`, by linear
/// interpolation in the log-σ table (diffusers' `_sigma_to_t`).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // Last index whose log-σ is ≤ log_sigma (0 if none), kept below the final index.
    let low = log_sigmas
        .iter()
        .rposition(|&l| l <= log_sigma)
        .unwrap_or(0)
        .min(log_sigmas.len() - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    // numpy subtracts the two float32 table values in float32.
    let w = ((lo - log_sigma) / f32r(lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// Karras et al. (2022) sigmas: `num` values from `sigma_max` down to `sigma_min`, evenly
/// spaced in σ^(1/ρ) with ρ = 7.
pub(crate) fn karras(sigma_min: f64, sigma_max: f64, num: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / RHO), sigma_max.powf(1.0 / RHO));
    linspace(0.0, 1.0, num)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(RHO))
        .collect()
}

/// Inference timesteps, descending, for the discrete schedulers (Euler, Euler ancestral,
/// DDIM), before any rounding the scheduler applies.
///
/// `trailing` takes exactly `steps` values `N − i·N/steps − 1`. (diffusers builds them with
/// `np.arange`, whose float length rounds up to `steps + 1` for some counts, e.g. 61,
/// appending a timestep −1; hypergen does not reproduce that.)
pub(crate) fn spaced_timesteps(
    spacing: Spacing,
    n_train: usize,
    steps: usize,
    steps_offset: usize,
) -> Vec<f64> {
    match spacing {
        Spacing::Linspace => {
            let mut t = linspace(0.0, (n_train - 1) as f64, steps);
            t.reverse();
            t
        }
        Spacing::Leading => {
            let ratio = n_train / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        Spacing::Trailing => trailing(n_train as f64, n_train, steps),
    }
}

/// `round(start − i · n_train / steps) − 1` for `i < steps`.
pub(crate) fn trailing(start: f64, n_train: usize, steps: usize) -> Vec<f64> {
    let ratio = n_train as f64 / steps as f64;
    (0..steps)
        .map(|i| round_even(start - i as f64 * ratio) - 1.0)
        .collect()
}

/// LCM's and TCD's timesteps: `steps` of the `original_steps` timesteps the model was
/// distilled on (`k − 1, 2k − 1, …` with k = N / original_steps), from the noisiest, taken
/// at `⌊i · original_steps / steps⌋`. More steps than `original_steps` is an error, as in
/// diffusers.
pub(crate) fn distilled_timesteps(
    n_train: usize,
    original_steps: usize,
    steps: usize,
) -> Result<Vec<f64>> {
    check_steps(steps, n_train)?;
    if original_steps == 0 || original_steps > n_train {
        return Err(Error::invalid(
            "original_inference_steps",
            format!("{original_steps} is outside 1..={n_train} (the training timesteps)"),
        ));
    }
    if steps > original_steps {
        return Err(Error::invalid(
            "num_inference_steps",
            format!(
                "{steps} is more than the {original_steps} steps this consistency model was \
                 distilled on (original_inference_steps)"
            ),
        ));
    }
    let k = n_train / original_steps;
    let origin: Vec<usize> = (1..=original_steps).rev().map(|i| i * k - 1).collect();
    let stride = original_steps as f64 / steps as f64;
    Ok((0..steps)
        .map(|i| origin[(i as f64 * stride).floor() as usize] as f64)
        .collect())
}

/// Validates a requested step count against the training schedule.
pub(crate) fn check_steps(steps: usize, n_train: usize) -> Result<()> {
    if steps == 0 || steps > n_train {
        return Err(Error::invalid(
            "num_inference_steps",
            format!("{steps} is outside 1..={n_train} (the scheduler's training timesteps)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_semantics() {
        assert_eq!(round_even(2.5), 2.0);
        assert_eq!(round_even(3.5), 4.0);
        assert_eq!(linspace(0.0, 999.0, 4), [0.0, 333.0, 666.0, 999.0]);
        assert_eq!(interp(1.5, &[0.0, 1.0, 3.0]), 2.0);
        assert_eq!(interp(-1.0, &[5.0, 6.0]), 5.0);
        assert_eq!(interp(7.0, &[5.0, 6.0]), 6.0);
        assert_eq!(trailing(1000.0, 1000, 61).len(), 61);
    }

    #[test]
    fn sigma_to_t_inverts_table() {
        let sig: Vec<f64> = (0..10).map(|i| f32r(0.1 * (i + 1) as f64)).collect();
        let logs = log_sigmas(&sig);
        assert!((sigma_to_t(sig[3], &logs) - 3.0).abs() < 1e-6);
        assert_eq!(sigma_to_t(1e-3, &logs), 0.0);
        assert_eq!(sigma_to_t(100.0, &logs), 9.0);
    }
}
