//! diffusers' SDXL schedulers, built from a `scheduler_config.json` as
//! `Cls.from_config(pipe.scheduler.config)` builds them: Euler (plain and Karras), Euler
//! ancestral, Heun, DDIM, DPM-Solver++ 2M (plain, Karras, SDE, SDE Karras), UniPC, and the
//! consistency samplers of few-step models, LCM and TCD.
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
mod heun;
mod lcm;
mod sampler;
mod tables;
mod tcd;
mod unipc;

use crate::FusedOps;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use burn::tensor::Tensor;

pub use config::{parse_python_json, SchedulerConfig, Spacing};
pub use tcd::DEFAULT_TCD_ETA;

use crate::error::{Error, Result};
use crate::noise::Generator;
use ddim::Ddim;
use dpm_solver::DpmSolver;
use euler::Euler;
use euler_ancestral::EulerAncestral;
use heun::Heun;
use lcm::Lcm;
use sampler::Sampler;
use tcd::Tcd;
use unipc::UniPc;

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
    /// `DPMSolverMultistepScheduler` with `algorithm_type: sde-dpmsolver++`
    /// (`dpmpp_2m_sde`): draws noise at every step.
    DpmPp2mSde,
    /// DPM++ 2M SDE with `use_karras_sigmas` (`dpmpp_2m_sde_karras`).
    DpmPp2mSdeKarras,
    /// `HeunDiscreteScheduler` (`heun`): two UNet evaluations per step but the first.
    Heun,
    /// `UniPCMultistepScheduler` (`unipc`).
    UniPc,
    /// `LCMScheduler` (`lcm`): for LCM checkpoints and LCM-LoRA; noise at every step but
    /// the last.
    Lcm,
    /// `TCDScheduler` (`tcd`): for TCD-LoRA; its `eta` (γ) sets the noise of each step.
    Tcd,
}

impl SchedulerKind {
    /// Every kind, in a stable order.
    pub const ALL: [SchedulerKind; 12] = [
        SchedulerKind::Euler,
        SchedulerKind::EulerKarras,
        SchedulerKind::EulerAncestral,
        SchedulerKind::Ddim,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
        SchedulerKind::DpmPp2mSde,
        SchedulerKind::DpmPp2mSdeKarras,
        SchedulerKind::Heun,
        SchedulerKind::UniPc,
        SchedulerKind::Lcm,
        SchedulerKind::Tcd,
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
            SchedulerKind::DpmPp2mSde => "dpmpp_2m_sde",
            SchedulerKind::DpmPp2mSdeKarras => "dpmpp_2m_sde_karras",
            SchedulerKind::Heun => "heun",
            SchedulerKind::UniPc => "unipc",
            SchedulerKind::Lcm => "lcm",
            SchedulerKind::Tcd => "tcd",
        }
    }

    /// The diffusers class implementing this kind.
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Euler | SchedulerKind::EulerKarras => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::DpmPp2m
            | SchedulerKind::DpmPp2mKarras
            | SchedulerKind::DpmPp2mSde
            | SchedulerKind::DpmPp2mSdeKarras => "DPMSolverMultistepScheduler",
            SchedulerKind::Heun => "HeunDiscreteScheduler",
            SchedulerKind::UniPc => "UniPCMultistepScheduler",
            SchedulerKind::Lcm => "LCMScheduler",
            SchedulerKind::Tcd => "TCDScheduler",
        }
    }

    /// The sampler's name in AUTOMATIC1111's `parameters` text.
    pub fn a1111_name(self) -> &'static str {
        match self {
            SchedulerKind::Euler => "Euler",
            SchedulerKind::EulerKarras => "Euler Karras",
            SchedulerKind::EulerAncestral => "Euler a",
            SchedulerKind::Ddim => "DDIM",
            SchedulerKind::DpmPp2m => "DPM++ 2M",
            SchedulerKind::DpmPp2mKarras => "DPM++ 2M Karras",
            SchedulerKind::DpmPp2mSde => "DPM++ 2M SDE",
            SchedulerKind::DpmPp2mSdeKarras => "DPM++ 2M SDE Karras",
            SchedulerKind::Heun => "Heun",
            SchedulerKind::UniPc => "UniPC",
            SchedulerKind::Lcm => "LCM",
            SchedulerKind::Tcd => "TCD",
        }
    }

    /// Whether this kind uses Karras σ spacing.
    pub fn karras(self) -> bool {
        matches!(
            self,
            SchedulerKind::EulerKarras
                | SchedulerKind::DpmPp2mKarras
                | SchedulerKind::DpmPp2mSdeKarras
        )
    }

    /// Whether the kind names its σ spacing (Euler and DPM-Solver come as a plain and a
    /// Karras kind); the other classes take `use_karras_sigmas` from the config.
    fn names_karras(self) -> bool {
        matches!(
            self,
            SchedulerKind::Euler
                | SchedulerKind::EulerKarras
                | SchedulerKind::DpmPp2m
                | SchedulerKind::DpmPp2mKarras
                | SchedulerKind::DpmPp2mSde
                | SchedulerKind::DpmPp2mSdeKarras
        )
    }

    /// DPM-Solver's `algorithm_type` for this kind; `None` for other classes.
    fn dpm_algorithm(self) -> Option<&'static str> {
        match self {
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras => Some("dpmsolver++"),
            SchedulerKind::DpmPp2mSde | SchedulerKind::DpmPp2mSdeKarras => Some("sde-dpmsolver++"),
            _ => None,
        }
    }

    /// Whether the sampler draws fresh noise during the run (so the seed matters even
    /// with fixed starting latents).
    pub fn stochastic(self) -> bool {
        matches!(
            self,
            SchedulerKind::EulerAncestral
                | SchedulerKind::DpmPp2mSde
                | SchedulerKind::DpmPp2mSdeKarras
                | SchedulerKind::Lcm
                | SchedulerKind::Tcd
        )
    }

    /// UNet evaluations for `steps` steps: `2·steps − 1` for Heun (a predictor and a
    /// corrector per step but the last), `steps` for the others.
    pub fn model_evaluations(self, steps: usize) -> usize {
        match self {
            SchedulerKind::Heun => (2 * steps).saturating_sub(1),
            _ => steps,
        }
    }

    /// Whether the kind takes `eta` (TCD's γ).
    pub fn takes_eta(self) -> bool {
        self == SchedulerKind::Tcd
    }

    /// Whether the kind takes a `timestep_spacing` (LCM and TCD take their timesteps from
    /// the distillation schedule instead).
    pub fn takes_spacing(self) -> bool {
        !matches!(self, SchedulerKind::Lcm | SchedulerKind::Tcd)
    }

    /// The kind a diffusers config describes: its `_class_name`, with `use_karras_sigmas`
    /// and (DPM-Solver) `algorithm_type`. `None` for classes hypergen lacks.
    pub fn of_config(config: &SchedulerConfig) -> Option<Self> {
        let karras = config.use_karras_sigmas;
        // DPM-Solver's first-order-in-ε variants (`dpmsolver`, `sde-dpmsolver`) are not
        // implemented: no kind, so the folder is refused rather than run as `++`.
        let sde = match config.algorithm_type.as_str() {
            "dpmsolver++" | "deis" => false,
            "sde-dpmsolver++" => true,
            _ if config.class_name.as_deref() == Some("DPMSolverMultistepScheduler") => {
                return None
            }
            _ => false,
        };
        Some(match (config.class_name.as_deref()?, karras, sde) {
            ("EulerDiscreteScheduler", false, _) => SchedulerKind::Euler,
            ("EulerDiscreteScheduler", true, _) => SchedulerKind::EulerKarras,
            ("EulerAncestralDiscreteScheduler", ..) => SchedulerKind::EulerAncestral,
            ("DDIMScheduler", ..) => SchedulerKind::Ddim,
            ("DPMSolverMultistepScheduler", false, false) => SchedulerKind::DpmPp2m,
            ("DPMSolverMultistepScheduler", true, false) => SchedulerKind::DpmPp2mKarras,
            ("DPMSolverMultistepScheduler", false, true) => SchedulerKind::DpmPp2mSde,
            ("DPMSolverMultistepScheduler", true, true) => SchedulerKind::DpmPp2mSdeKarras,
            ("HeunDiscreteScheduler", ..) => SchedulerKind::Heun,
            ("UniPCMultistepScheduler", ..) => SchedulerKind::UniPc,
            ("LCMScheduler", ..) => SchedulerKind::Lcm,
            ("TCDScheduler", ..) => SchedulerKind::Tcd,
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
            "dpmpp_2m_sde" | "dpm++_2m_sde" => SchedulerKind::DpmPp2mSde,
            "dpmpp_2m_sde_karras" | "dpm++_2m_sde_karras" | "dpmpp_2m_sde_k" => {
                SchedulerKind::DpmPp2mSdeKarras
            }
            "heun" | "heundiscretescheduler" => SchedulerKind::Heun,
            "unipc" | "uni_pc" | "unipcmultistepscheduler" => SchedulerKind::UniPc,
            "lcm" | "lcmscheduler" => SchedulerKind::Lcm,
            "tcd" | "tcdscheduler" => SchedulerKind::Tcd,
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

/// What a request may choose about its sampler, beside the model folder's config.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplerSettings {
    /// The sampler; `None`: the one the model folder's `scheduler_config.json` names.
    pub kind: Option<SchedulerKind>,
    /// The timestep spacing in place of the config's; `None`: the config's.
    pub timestep_spacing: Option<Spacing>,
    /// TCD's γ, 0–1; `None`: [`DEFAULT_TCD_ETA`]. Only `tcd` takes it.
    pub eta: Option<f64>,
}

impl SamplerSettings {
    /// Whether two requests step the same schedule with the same rule (so they can share
    /// a batch).
    pub fn same_as(&self, other: &SamplerSettings) -> bool {
        self.kind == other.kind
            && self.timestep_spacing == other.timestep_spacing
            && self.eta.map(f64::to_bits) == other.eta.map(f64::to_bits)
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
    Heun(Heun),
    UniPc(UniPc),
    Lcm(Lcm),
    Tcd(Tcd),
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
            Inner::Heun($s) => $body,
            Inner::UniPc($s) => $body,
            Inner::Lcm($s) => $body,
            Inner::Tcd($s) => $body,
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
    /// the class lacks are ignored, absent keys take the class's defaults. The Euler and
    /// DPM-Solver kinds set `use_karras_sigmas` (and DPM-Solver's `algorithm_type`) as
    /// their names say; Heun and UniPC keep the config's. With `kind = None`, the kind is
    /// the config's own ([`SchedulerKind::of_config`]).
    ///
    /// Unsupported classes or values give [`Error::Unsupported`].
    pub fn from_config(config: &SchedulerConfig, kind: Option<SchedulerKind>) -> Result<Self> {
        Self::build(
            config,
            &SamplerSettings {
                kind,
                ..SamplerSettings::default()
            },
        )
    }

    /// [`from_config`](Self::from_config) with a request's [`SamplerSettings`]: its kind,
    /// its timestep spacing in place of the config's, and TCD's `eta`.
    ///
    /// A spacing for LCM or TCD, or an `eta` for any sampler but TCD, is
    /// [`Error::InvalidArgument`]: those samplers have no such setting, and ignoring it
    /// would silently give another image than the one asked for.
    pub fn build(config: &SchedulerConfig, settings: &SamplerSettings) -> Result<Self> {
        let kind = match settings.kind {
            Some(k) => k,
            None => {
                let class = config.class_name.as_deref().ok_or_else(|| {
                    config.unsupported("no `_class_name`, and no scheduler kind was given")
                })?;
                SchedulerKind::of_config(config).ok_or_else(|| {
                    let classes: Vec<&str> =
                        SchedulerKind::ALL.iter().map(|k| k.class_name()).collect();
                    let mut classes = classes;
                    classes.dedup();
                    config.unsupported(format!(
                        "scheduler class \"{class}\" (supported: {})",
                        classes.join(", ")
                    ))
                })?
            }
        };
        let mut config = config.clone();
        if kind.names_karras() {
            config.use_karras_sigmas = kind.karras();
        }
        if let Some(algorithm) = kind.dpm_algorithm() {
            config.algorithm_type = algorithm.into();
        }
        if let Some(spacing) = settings.timestep_spacing {
            if !kind.takes_spacing() {
                return Err(Error::invalid(
                    "timestep_spacing",
                    format!(
                        "the {kind} sampler takes no timestep spacing (its timesteps come from \
                         the schedule the model was distilled on)"
                    ),
                ));
            }
            config.timestep_spacing = Some(spacing.name().into());
        }
        if settings.eta.is_some() && !kind.takes_eta() {
            return Err(Error::invalid(
                "eta",
                format!("the {kind} sampler takes no eta (only tcd does)"),
            ));
        }
        let inner = match kind {
            SchedulerKind::Euler | SchedulerKind::EulerKarras => {
                Inner::Euler(Euler::new(&config, kind.karras())?)
            }
            SchedulerKind::EulerAncestral => Inner::EulerAncestral(EulerAncestral::new(&config)?),
            SchedulerKind::Ddim => Inner::Ddim(Ddim::new(&config)?),
            SchedulerKind::DpmPp2m
            | SchedulerKind::DpmPp2mKarras
            | SchedulerKind::DpmPp2mSde
            | SchedulerKind::DpmPp2mSdeKarras => {
                Inner::Dpm(DpmSolver::new(&config, kind.karras())?)
            }
            SchedulerKind::Heun => Inner::Heun(Heun::new(&config)?),
            SchedulerKind::UniPc => Inner::UniPc(UniPc::new(&config)?),
            SchedulerKind::Lcm => Inner::Lcm(Lcm::new(&config)?),
            SchedulerKind::Tcd => {
                let mut tcd = Tcd::new(&config)?;
                if let Some(eta) = settings.eta {
                    tcd.set_eta(eta)?;
                }
                Inner::Tcd(tcd)
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

    /// The timestep the UNet receives at each step (fractional for Euler Karras); Heun
    /// lists every timestep but the first twice.
    pub fn timesteps(&self) -> &[f64] {
        with_sampler!(&self.inner, s => s.timesteps())
    }

    /// σ at each step plus the final σ (one more than [`timesteps`](Self::timesteps));
    /// empty for DDIM, which has none.
    pub fn sigmas(&self) -> &[f64] {
        with_sampler!(&self.inner, s => s.sigmas())
    }

    /// diffusers' `order`: timesteps per step of `num_inference_steps` (2 for Heun, which
    /// lists every timestep but the first twice; 1 for the others).
    pub fn order(&self) -> usize {
        with_sampler!(&self.inner, s => s.order())
    }

    /// The index of [`timesteps`](Self::timesteps) an image-to-image run at `strength`
    /// starts from: [`start_step`](Self::start_step) times [`order`](Self::order), as
    /// diffusers' `get_timesteps` slices the schedule.
    pub fn start_index(&self, num_inference_steps: usize, strength: f64) -> Result<usize> {
        Ok(Self::start_step(num_inference_steps, strength)? * self.order())
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
    /// The result has the sample's dtype. The stochastic kinds
    /// ([`SchedulerKind::stochastic`]) draw their noise from `rng` in float32 (see
    /// [`crate::noise`]), in diffusers' order, on the sample's device; the others ignore
    /// `rng`.
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
    /// (in steps; [`start_index`](Self::start_index) is the index into the timesteps).
    /// Strength 1 starts at step 0; a strength so
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
            let config = SchedulerConfig {
                class_name: Some(kind.class_name().into()),
                use_karras_sigmas: kind.karras(),
                algorithm_type: kind.dpm_algorithm().unwrap_or("dpmsolver++").into(),
                ..SchedulerConfig::default()
            };
            assert_eq!(SchedulerKind::of_config(&config), Some(kind));
            let built = Scheduler::from_config(&config, None).expect("builds");
            assert_eq!(built.kind(), kind);
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
