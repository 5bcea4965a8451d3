//! diffusers' SDXL schedulers: Euler (plain and Karras), Euler ancestral, DDIM and
//! DPM-Solver++ 2M (plain and Karras), built from a `scheduler_config.json` as
//! `Cls.from_config(pipe.scheduler.config)` builds them.
//!
//! Each class is one file implementing the `Sampler` trait (`sampler.rs`): its training
//! tables (ᾱ, σ) are built once with the scheduler, its run's schedule (timesteps, σ) once
//! by [`Scheduler::set_timesteps`], and its per-step methods only read them.
//! [`Scheduler`] holds one of them, picked by [`SchedulerKind`].
//!
//! Tables are computed on the host in f64, rounding to float32 wherever diffusers stores
//! float32, so they agree with diffusers to float32 precision. [`Scheduler::step`] does
//! its tensor arithmetic in the sample's dtype with host scalars.
//!
//! The denoising loop is
//! ```text
//! scheduler.set_timesteps(steps)?;
//! let mut x = noise * scheduler.init_noise_sigma();
//! for (i, &t) in scheduler.timesteps().iter().enumerate() {
//!     let eps = unet(scheduler.scale_model_input(x, i), t);
//!     x = scheduler.step(eps, i, x, &mut rng);
//! }
//! ```

mod config;
mod ddim;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod sampler;
mod tables;

use crate::FusedOps;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use burn::tensor::Tensor;

pub use config::{parse_python_json, SchedulerConfig};

use crate::error::{Error, Result};
use crate::noise::Generator;
use ddim::Ddim;
use dpm_solver::DpmSolver;
use euler::Euler;
use euler_ancestral::EulerAncestral;
use sampler::Sampler;

/// The samplers hypergen implements, by the names users pick them with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `EulerDiscreteScheduler` (`euler`).
    Euler,
    /// `EulerDiscreteScheduler` with `use_karras_sigmas` (`euler_karras`).
    EulerKarras,
    /// `EulerAncestralDiscreteScheduler` (`euler_a`, `euler_ancestral`).
    EulerAncestral,
    /// `DDIMScheduler` with η = 0 (`ddim`).
    Ddim,
    /// `DPMSolverMultistepScheduler`, DPM-Solver++ order 2 (`dpmpp_2m`).
    DpmPp2m,
    /// `DPMSolverMultistepScheduler` with `use_karras_sigmas` (`dpmpp_2m_karras`).
    DpmPp2mKarras,
}

impl SchedulerKind {
    /// Every kind, in a stable order.
    pub const ALL: [SchedulerKind; 6] = [
        SchedulerKind::Euler,
        SchedulerKind::EulerKarras,
        SchedulerKind::EulerAncestral,
        SchedulerKind::Ddim,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
    ];

    /// The canonical name (what [`FromStr`] and [`fmt::Display`] use).
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerKarras => "euler_karras",
            SchedulerKind::EulerAncestral => "euler_ancestral",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::DpmPp2m => "dpmpp_2m",
            SchedulerKind::DpmPp2mKarras => "dpmpp_2m_karras",
        }
    }

    /// The diffusers class implementing this kind.
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Euler | SchedulerKind::EulerKarras => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras => "DPMSolverMultistepScheduler",
        }
    }

    /// Whether this kind uses Karras σ spacing.
    pub fn karras(self) -> bool {
        matches!(
            self,
            SchedulerKind::EulerKarras | SchedulerKind::DpmPp2mKarras
        )
    }

    /// The kind a diffusers config describes: its `_class_name`, and `use_karras_sigmas`
    /// for the classes that have that option. `None` for classes hypergen lacks.
    pub fn from_class_name(class_name: &str, use_karras_sigmas: bool) -> Option<Self> {
        Some(match (class_name, use_karras_sigmas) {
            ("EulerDiscreteScheduler", false) => SchedulerKind::Euler,
            ("EulerDiscreteScheduler", true) => SchedulerKind::EulerKarras,
            ("EulerAncestralDiscreteScheduler", _) => SchedulerKind::EulerAncestral,
            ("DDIMScheduler", _) => SchedulerKind::Ddim,
            ("DPMSolverMultistepScheduler", false) => SchedulerKind::DpmPp2m,
            ("DPMSolverMultistepScheduler", true) => SchedulerKind::DpmPp2mKarras,
            _ => return None,
        })
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    /// Accepts the canonical names, common aliases (`euler_a`, `dpm++_2m`, `dpmpp_2m_k`…;
    /// case, `-` and spaces are ignored) and diffusers class names (the non-Karras kind).
    fn from_str(s: &str) -> Result<Self> {
        let key: String = s
            .trim()
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c == '-' || c == ' ' { '_' } else { c })
            .collect();
        let kind = match key.as_str() {
            "euler" | "eulerdiscretescheduler" => SchedulerKind::Euler,
            "euler_karras" | "euler_k" => SchedulerKind::EulerKarras,
            "euler_a" | "euler_ancestral" | "eulerancestraldiscretescheduler" => {
                SchedulerKind::EulerAncestral
            }
            "ddim" | "ddimscheduler" => SchedulerKind::Ddim,
            "dpmpp_2m" | "dpm++_2m" | "dpmsolvermultistepscheduler" => SchedulerKind::DpmPp2m,
            "dpmpp_2m_karras" | "dpm++_2m_karras" | "dpmpp_2m_k" => SchedulerKind::DpmPp2mKarras,
            _ => {
                let names: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.name()).collect();
                return Err(Error::invalid(
                    "scheduler",
                    format!("unknown scheduler \"{s}\" (known: {})", names.join(", ")),
                ));
            }
        };
        Ok(kind)
    }
}

/// The sampler of each class, each a [`Sampler`]. A new class adds a variant here and a
/// line in `with_sampler!`.
#[derive(Debug, Clone)]
enum Inner {
    Euler(Euler),
    EulerAncestral(EulerAncestral),
    Ddim(Ddim),
    Dpm(DpmSolver),
}

/// Runs `$body` with `$s` bound to whichever [`Sampler`] `$inner` holds (the trait has
/// generic methods, so it is dispatched here rather than through `dyn`).
macro_rules! with_sampler {
    ($inner:expr, $s:ident => $body:expr) => {
        match $inner {
            Inner::Euler($s) => $body,
            Inner::EulerAncestral($s) => $body,
            Inner::Ddim($s) => $body,
            Inner::Dpm($s) => $body,
        }
    };
}

/// A configured scheduler: the noise schedule of one sampling run and its update rule.
///
/// Call [`set_timesteps`](Self::set_timesteps) before the loop; `step_index` arguments
/// index [`timesteps`](Self::timesteps). A clone copies the schedule but not DPM-Solver's
/// multistep history.
#[derive(Debug, Clone)]
pub struct Scheduler {
    kind: SchedulerKind,
    config: SchedulerConfig,
    inner: Inner,
}

impl Scheduler {
    /// Builds `kind` from `config`, as `Cls.from_config(config)` does in diffusers: keys
    /// the class lacks are ignored, absent keys take the class's defaults, and the Karras
    /// kinds set `use_karras_sigmas` (the others clear it). With `kind = None`, the kind is
    /// the config's `_class_name` (and its `use_karras_sigmas`).
    ///
    /// Unsupported classes or values give [`Error::Unsupported`].
    pub fn from_config(config: &SchedulerConfig, kind: Option<SchedulerKind>) -> Result<Self> {
        let kind = match kind {
            Some(k) => k,
            None => {
                let class = config.class_name.as_deref().ok_or_else(|| {
                    config.unsupported("no `_class_name`, and no scheduler kind was given")
                })?;
                SchedulerKind::from_class_name(class, config.use_karras_sigmas).ok_or_else(
                    || {
                        config.unsupported(format!(
                            "scheduler class \"{class}\" (supported: EulerDiscreteScheduler, \
                             EulerAncestralDiscreteScheduler, DDIMScheduler, \
                             DPMSolverMultistepScheduler)"
                        ))
                    },
                )?
            }
        };
        let mut config = config.clone();
        config.use_karras_sigmas = kind.karras();
        let inner = match kind {
            SchedulerKind::Euler | SchedulerKind::EulerKarras => {
                Inner::Euler(Euler::new(&config, kind.karras())?)
            }
            SchedulerKind::EulerAncestral => Inner::EulerAncestral(EulerAncestral::new(&config)?),
            SchedulerKind::Ddim => Inner::Ddim(Ddim::new(&config)?),
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras => {
                Inner::Dpm(DpmSolver::new(&config, kind.karras())?)
            }
        };
        Ok(Self {
            kind,
            config,
            inner,
        })
    }

    /// Reads `scheduler_config.json` from a scheduler folder (or the JSON file itself) and
    /// builds `kind` from it, or the config's own class when `kind` is `None`.
    pub fn load(scheduler_dir_or_config_json: &Path, kind: Option<SchedulerKind>) -> Result<Self> {
        let path = if scheduler_dir_or_config_json.is_dir() {
            scheduler_dir_or_config_json.join("scheduler_config.json")
        } else {
            scheduler_dir_or_config_json.to_path_buf()
        };
        Self::from_config(&SchedulerConfig::read(&path)?, kind)
    }

    /// Computes the schedule for `num_inference_steps` steps (and clears any multistep
    /// history). 0, or more than the training timesteps, is [`Error::InvalidArgument`].
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        with_sampler!(&mut self.inner, s => s.set_timesteps(num_inference_steps))
    }

    /// The timestep the UNet receives at each step (fractional for Euler Karras).
    pub fn timesteps(&self) -> &[f64] {
        with_sampler!(&self.inner, s => s.timesteps())
    }

    /// σ at each step plus the final σ (one more than [`timesteps`](Self::timesteps));
    /// empty for DDIM, which has none.
    pub fn sigmas(&self) -> &[f64] {
        with_sampler!(&self.inner, s => s.sigmas())
    }

    /// The standard deviation to scale unit initial noise by.
    pub fn init_noise_sigma(&self) -> f64 {
        with_sampler!(&self.inner, s => s.init_noise_sigma())
    }

    /// The UNet input at `step_index`: `x / √(σ² + 1)` for the Euler kinds, `x` otherwise.
    ///
    /// # Panics
    /// If `step_index` is not below `timesteps().len()` (a caller bug, not user input).
    pub fn scale_model_input<B: FusedOps>(
        &self,
        sample: Tensor<B, 4>,
        step_index: usize,
    ) -> Tensor<B, 4> {
        with_sampler!(&self.inner, s => s.scale_model_input(sample, step_index))
    }

    /// One denoising step from `sample` at `step_index`, given the model's output there.
    /// The result has the sample's dtype. Euler ancestral draws its noise from `rng` in
    /// float32 (see [`crate::noise`]) on the sample's device; the others ignore `rng`.
    ///
    /// # Panics
    /// If `step_index` is not below `timesteps().len()` (a caller bug, not user input).
    pub fn step<B: FusedOps>(
        &mut self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        rng: &mut Generator,
    ) -> Tensor<B, 4> {
        with_sampler!(&mut self.inner, s => s.step(model_output, step_index, sample, rng))
    }

    /// The current estimate of the clean sample x̂₀ at `step_index`, given the model's
    /// output there and the sample it saw (before [`step`](Self::step)): `x − σ·ε` for
    /// the Euler kinds, `(x − σ_t·ε)/α_t` for DPM-Solver, `(x − √(1−ᾱ)·ε)/√ᾱ` for DDIM
    /// (and their sample / v-prediction forms). What streaming previews decode.
    ///
    /// # Panics
    /// If `step_index` is not below `timesteps().len()` (a caller bug, not user input).
    pub fn denoised<B: FusedOps>(
        &self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        with_sampler!(&self.inner, s => s.denoised(model_output, step_index, sample))
    }

    /// diffusers' `add_noise`: `original` noised to the level of step `step_index` of
    /// the schedule (image-to-image's start, inpainting's kept region). Euler kinds:
    /// `x + σ·noise`; DPM-Solver: `α_t·x + σ_t·noise` with α_t = 1/√(σ²+1), σ_t = σ·α_t;
    /// DDIM: `√ᾱ_t·x + √(1 − ᾱ_t)·noise` at the step's timestep. Computed in the
    /// sample's dtype with host scalars.
    ///
    /// # Panics
    /// If `step_index` is not below `timesteps().len()` (a caller bug, not user input).
    pub fn add_noise<B: FusedOps>(
        &self,
        original: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        step_index: usize,
    ) -> Tensor<B, 4> {
        let n = self.timesteps().len();
        assert!(
            step_index < n,
            "add_noise at step {step_index} is past the {n} steps set by set_timesteps"
        );
        let noise = noise.cast(original.dtype());
        with_sampler!(&self.inner, s => s.add_noise(original, noise, step_index))
    }

    /// diffusers' `get_timesteps` for image-to-image and inpainting: the first step of
    /// the schedule that a run at `strength` (0–1) starts from, `steps − ⌊steps·strength⌋`
    /// (every scheduler here has `order` 1). Strength 1 starts at step 0; a strength so
    /// small that no step is left is [`Error::InvalidArgument`].
    pub fn start_step(num_inference_steps: usize, strength: f64) -> Result<usize> {
        if !(0.0..=1.0).contains(&strength) {
            return Err(Error::invalid(
                "strength",
                format!("{strength} is not between 0 and 1"),
            ));
        }
        // Python's int(num_inference_steps * strength): the f64 product, truncated.
        let init = ((num_inference_steps as f64 * strength) as usize).min(num_inference_steps);
        if init == 0 {
            return Err(Error::invalid(
                "strength",
                format!(
                    "strength {strength} with {num_inference_steps} steps leaves no step to run \
                     (needs steps × strength ≥ 1)"
                ),
            ));
        }
        Ok(num_inference_steps - init)
    }

    /// Which scheduler this is.
    pub fn kind(&self) -> SchedulerKind {
        self.kind
    }

    /// The configuration it was built from (with `use_karras_sigmas` set for its kind).
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduler_can_move_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Scheduler>();
    }

    #[test]
    fn names_round_trip() {
        for kind in SchedulerKind::ALL {
            assert_eq!(kind.name().parse::<SchedulerKind>().ok(), Some(kind));
            assert_eq!(
                SchedulerKind::from_class_name(kind.class_name(), kind.karras()),
                Some(kind)
            );
        }
        assert_eq!(
            "Euler-A".parse::<SchedulerKind>().ok(),
            Some(SchedulerKind::EulerAncestral)
        );
        assert!(matches!(
            "lms".parse::<SchedulerKind>(),
            Err(Error::InvalidArgument { .. })
        ));
    }
}
