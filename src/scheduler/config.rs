//! `scheduler_config.json`: the keys diffusers' SDXL schedulers read, with diffusers'
//! defaults for absent keys, and the typed settings validated from them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use crate::error::{Error, Result};

/// A diffusers `scheduler_config.json`, key for key. Unknown keys are ignored; absent keys
/// take the default of the diffusers class they belong to. Where the classes disagree
/// (the betas, `clip_sample`, `timestep_spacing`) the field stays `None` here until a
/// class is chosen ([`ClassDefaults`]).
///
/// Values are kept as written; [`Scheduler::from_config`](super::Scheduler::from_config)
/// validates them and refuses what it does not implement with [`Error::Unsupported`].
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    /// The diffusers class that wrote the file, e.g. `EulerDiscreteScheduler`.
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// Training steps of the noise schedule.
    #[serde(default = "default_num_train_timesteps")]
    pub num_train_timesteps: usize,
    /// First beta of the schedule; `None`: the class default.
    #[serde(default, deserialize_with = "lenient_opt_f64")]
    pub beta_start: Option<f64>,
    /// Last beta of the schedule; `None`: the class default.
    #[serde(default, deserialize_with = "lenient_opt_f64")]
    pub beta_end: Option<f64>,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`; `None`: the class default.
    #[serde(default)]
    pub beta_schedule: Option<String>,
    /// Explicit betas, overriding `beta_schedule`.
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// What the UNet predicts: `epsilon`, `v_prediction` or `sample`.
    #[serde(default = "default_prediction_type")]
    pub prediction_type: String,
    /// `leading`, `trailing` or `linspace`; `None` means the class default (`leading` for
    /// DDIM, `linspace` for the others).
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    /// Added to every timestep under `leading` spacing.
    #[serde(default)]
    pub steps_offset: usize,
    /// Karras et al. sigma spacing (Euler, DPM-Solver).
    #[serde(default)]
    pub use_karras_sigmas: bool,
    /// Exponential sigma spacing (not implemented).
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    /// Beta-distribution sigma spacing (not implemented).
    #[serde(default)]
    pub use_beta_sigmas: bool,
    /// DPM-Solver's uniform-logSNR spacing (not implemented).
    #[serde(default)]
    pub use_lu_lambdas: bool,
    /// Flow-matching sigmas (not implemented).
    #[serde(default)]
    pub use_flow_sigmas: bool,
    /// Resolution-dependent shifting (not implemented).
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    /// Overrides the smallest sigma of a Karras schedule.
    #[serde(default, deserialize_with = "lenient_opt_f64")]
    pub sigma_min: Option<f64>,
    /// Overrides the largest sigma of a Karras schedule.
    #[serde(default, deserialize_with = "lenient_opt_f64")]
    pub sigma_max: Option<f64>,
    /// Rescale betas to zero terminal SNR (Lin et al. 2023).
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// Euler: how sigmas are read off the training table (`linear` only).
    #[serde(default = "default_interpolation_type")]
    pub interpolation_type: String,
    /// Euler: `discrete`, or `continuous` (with `v_prediction`: timesteps are `ln(σ)/4`).
    #[serde(default = "default_timestep_type")]
    pub timestep_type: String,
    /// Last sigma of the schedule: `zero` or `sigma_min`.
    #[serde(default = "default_final_sigmas_type")]
    pub final_sigmas_type: String,
    /// DDIM: the final step goes to ᾱ = 1 (else to ᾱ at t = 0).
    #[serde(default = "default_true")]
    pub set_alpha_to_one: bool,
    /// DDIM, Heun, LCM, TCD: clamp the predicted clean sample to `±clip_sample_range`;
    /// `None`: the class default.
    #[serde(default)]
    pub clip_sample: Option<bool>,
    /// DDIM: the clamp range.
    #[serde(default = "default_one", deserialize_with = "lenient_f64")]
    pub clip_sample_range: f64,
    /// Dynamic thresholding (pixel-space models; not implemented).
    #[serde(default)]
    pub thresholding: bool,
    /// DPM-Solver: `dpmsolver++` (or `deis`, which diffusers maps to it).
    #[serde(default = "default_algorithm_type")]
    pub algorithm_type: String,
    /// DPM-Solver: 1 or 2.
    #[serde(default = "default_solver_order")]
    pub solver_order: usize,
    /// DPM-Solver: `midpoint` or `heun` (`logrho`, `bh1`, `bh2` mean `midpoint`).
    #[serde(default = "default_solver_type")]
    pub solver_type: String,
    /// DPM-Solver: first order on the last step(s) when there are fewer than 15.
    #[serde(default = "default_true")]
    pub lower_order_final: bool,
    /// DPM-Solver: always first order on the last step.
    #[serde(default)]
    pub euler_at_final: bool,
    /// DPM-Solver: clip λ(t) from below, trimming the noisiest timesteps.
    #[serde(
        default = "default_lambda_min_clipped",
        deserialize_with = "lenient_f64"
    )]
    pub lambda_min_clipped: f64,
    /// DPM-Solver: `learned`/`learned_range` outputs (not implemented).
    #[serde(default)]
    pub variance_type: Option<String>,
    /// UniPC: the solver works on x̂₀ (`true`) or on ε.
    #[serde(default = "default_true")]
    pub predict_x0: bool,
    /// UniPC: steps whose corrector is skipped.
    #[serde(default)]
    pub disable_corrector: Vec<usize>,
    /// LCM, TCD: the step count of the distillation schedule their timesteps are taken from.
    #[serde(default = "default_original_inference_steps")]
    pub original_inference_steps: usize,
    /// LCM: the timestep multiplier of the consistency boundary condition.
    #[serde(default = "default_timestep_scaling", deserialize_with = "lenient_f64")]
    pub timestep_scaling: f64,
    /// The file this config was read from, for error messages.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

fn default_num_train_timesteps() -> usize {
    1000
}
fn default_prediction_type() -> String {
    "epsilon".into()
}
fn default_interpolation_type() -> String {
    "linear".into()
}
fn default_timestep_type() -> String {
    "discrete".into()
}
fn default_final_sigmas_type() -> String {
    "zero".into()
}
fn default_algorithm_type() -> String {
    "dpmsolver++".into()
}
fn default_solver_type() -> String {
    "midpoint".into()
}
fn default_solver_order() -> usize {
    2
}
fn default_original_inference_steps() -> usize {
    50
}
fn default_timestep_scaling() -> f64 {
    10.0
}
fn default_true() -> bool {
    true
}
fn default_one() -> f64 {
    1.0
}
fn default_lambda_min_clipped() -> f64 {
    f64::NEG_INFINITY
}

impl Default for SchedulerConfig {
    /// diffusers' defaults for every key, no class name.
    fn default() -> Self {
        serde_json::from_str("{}").expect("an empty object is a valid scheduler config")
    }
}

impl SchedulerConfig {
    /// Parses config JSON as Python writes it (`Infinity`, `-Infinity` and `NaN` allowed).
    pub fn from_json_str(text: &str) -> serde_json::Result<Self> {
        serde_json::from_value(parse_python_json(text)?)
    }

    /// Reads `scheduler_config.json` (or any file of that form).
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::MissingFile {
                    path: path.to_path_buf(),
                    what: "scheduler config".into(),
                }
            } else {
                Error::io(path, e)
            }
        })?;
        let mut config = Self::from_json_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// The file named in errors.
    pub(crate) fn path(&self) -> PathBuf {
        self.source
            .clone()
            .unwrap_or_else(|| PathBuf::from("scheduler_config.json"))
    }

    /// An [`Error::Unsupported`] naming this config's file.
    pub(crate) fn unsupported(&self, message: impl Into<String>) -> Error {
        Error::Unsupported {
            path: self.path(),
            message: message.into(),
        }
    }
}

/// Parses JSON that may contain Python's non-standard `NaN`, `Infinity` and `-Infinity`
/// (diffusers writes `lambda_min_clipped: -Infinity`). Those tokens become the strings
/// `"NaN"`, `"Infinity"` and `"-Infinity"`, which this module's float fields accept.
pub fn parse_python_json(text: &str) -> serde_json::Result<serde_json::Value> {
    let mut out = String::with_capacity(text.len() + 16);
    let mut rest = text;
    let mut in_string = false;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if c == '\\' {
                // Copy the escape and the escaped character together.
                let n = rest[1..].chars().next().map_or(1, |e| 1 + e.len_utf8());
                out.push_str(&rest[..n]);
                rest = &rest[n..];
                continue;
            }
            in_string = c != '"';
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t))
        {
            out.push('"');
            out.push_str(token);
            out.push('"');
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    serde_json::from_str(&out)
}

/// A float written as a number or as one of [`parse_python_json`]'s special strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum LenientF64 {
    Number(f64),
    Special(String),
}

impl LenientF64 {
    fn value<E: serde::de::Error>(self) -> Result<f64, E> {
        match self {
            LenientF64::Number(v) => Ok(v),
            LenientF64::Special(s) => match s.as_str() {
                "Infinity" => Ok(f64::INFINITY),
                "-Infinity" => Ok(f64::NEG_INFINITY),
                "NaN" => Ok(f64::NAN),
                other => Err(E::custom(format!("expected a number, found \"{other}\""))),
            },
        }
    }
}

fn lenient_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    LenientF64::deserialize(d)?.value()
}

fn lenient_opt_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Option::<LenientF64>::deserialize(d)?
        .map(LenientF64::value)
        .transpose()
}

/// The defaults of one diffusers class for the keys on which the classes differ.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClassDefaults {
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: &'static str,
    pub clip_sample: bool,
    pub spacing: Spacing,
}

impl ClassDefaults {
    /// Euler, Euler ancestral, DPM-Solver, UniPC.
    pub const EULER: Self = Self {
        beta_start: 0.0001,
        beta_end: 0.02,
        beta_schedule: "linear",
        clip_sample: false,
        spacing: Spacing::Linspace,
    };
    /// DDIM.
    pub const DDIM: Self = Self {
        clip_sample: true,
        spacing: Spacing::Leading,
        ..Self::EULER
    };
    /// Heun.
    pub const HEUN: Self = Self {
        beta_start: 0.00085,
        beta_end: 0.012,
        ..Self::EULER
    };
    /// LCM and TCD (which take no spacing: their timesteps come from the distillation
    /// schedule).
    pub const LCM: Self = Self {
        beta_start: 0.00085,
        beta_end: 0.012,
        beta_schedule: "scaled_linear",
        clip_sample: false,
        spacing: Spacing::Leading,
    };
}

/// Which betas the schedule starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredCosCapV2,
}

/// What the model's output means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prediction {
    Epsilon,
    /// `v_prediction`: v = α·ε − σ_t·x₀.
    Velocity,
    Sample,
}

/// How inference timesteps are spread over the training range (diffusers'
/// `timestep_spacing`; "Common Diffusion Noise Schedules and Sample Steps are Flawed",
/// Lin et al. 2023, table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Spacing {
    /// `leading`: multiples of `N / steps` from 0, plus `steps_offset`; never reaches
    /// the last training timestep.
    Leading,
    /// `trailing`: from the last training timestep down in steps of `N / steps`; what
    /// few-step models (SDXL-Lightning, Hyper-SD, SDXL-Turbo) are trained for.
    Trailing,
    /// `linspace`: evenly spaced from the last training timestep to 0.
    Linspace,
}

impl Spacing {
    /// Every spacing, in a stable order.
    pub const ALL: [Spacing; 3] = [Spacing::Leading, Spacing::Trailing, Spacing::Linspace];

    /// diffusers' name: `leading`, `trailing` or `linspace`.
    pub fn name(self) -> &'static str {
        match self {
            Spacing::Leading => "leading",
            Spacing::Trailing => "trailing",
            Spacing::Linspace => "linspace",
        }
    }
}

impl std::fmt::Display for Spacing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Spacing {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Spacing::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                Error::invalid(
                    "timestep_spacing",
                    format!(
                        "unknown timestep spacing \"{s}\" (known: leading, trailing, linspace)"
                    ),
                )
            })
    }
}

impl SchedulerConfig {
    pub(crate) fn beta_schedule(&self, class: &ClassDefaults) -> Result<BetaSchedule> {
        match self.beta_schedule.as_deref().unwrap_or(class.beta_schedule) {
            "linear" => Ok(BetaSchedule::Linear),
            "scaled_linear" => Ok(BetaSchedule::ScaledLinear),
            "squaredcos_cap_v2" => Ok(BetaSchedule::SquaredCosCapV2),
            other => Err(self.unsupported(format!(
                "beta_schedule \"{other}\" (supported: linear, scaled_linear, squaredcos_cap_v2)"
            ))),
        }
    }

    pub(crate) fn prediction(&self) -> Result<Prediction> {
        match self.prediction_type.as_str() {
            "epsilon" => Ok(Prediction::Epsilon),
            "v_prediction" => Ok(Prediction::Velocity),
            "sample" => Ok(Prediction::Sample),
            other => Err(self.unsupported(format!(
                "prediction_type \"{other}\" (supported: epsilon, v_prediction, sample)"
            ))),
        }
    }

    /// The spacing, with the class default when the key is absent.
    pub(crate) fn spacing(&self, class: &ClassDefaults) -> Result<Spacing> {
        match self.timestep_spacing.as_deref() {
            None => Ok(class.spacing),
            Some(name) => name.parse().map_err(|_| {
                self.unsupported(format!(
                    "timestep_spacing \"{name}\" (supported: leading, trailing, linspace)"
                ))
            }),
        }
    }

    /// `true` for `final_sigmas_type: zero`, `false` for `sigma_min`.
    pub(crate) fn final_sigma_zero(&self) -> Result<bool> {
        match self.final_sigmas_type.as_str() {
            "zero" => Ok(true),
            "sigma_min" => Ok(false),
            other => Err(self.unsupported(format!(
                "final_sigmas_type \"{other}\" (supported: zero, sigma_min)"
            ))),
        }
    }

    /// Refuses the sigma spacings hypergen does not implement.
    pub(crate) fn check_no_exotic_sigmas(&self) -> Result<()> {
        for (set, key) in [
            (self.use_exponential_sigmas, "use_exponential_sigmas"),
            (self.use_beta_sigmas, "use_beta_sigmas"),
        ] {
            if set {
                return Err(self.unsupported(format!("{key}: true")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_specials_parse() {
        let c = SchedulerConfig::from_json_str(
            r#"{"lambda_min_clipped": -Infinity, "_class_name": "A \"NaN\" Infinity",
                "sigma_min": NaN, "sigma_max": null}"#,
        )
        .expect("parses");
        assert_eq!(c.lambda_min_clipped, f64::NEG_INFINITY);
        assert!(c.sigma_min.is_some_and(f64::is_nan));
        assert_eq!(c.sigma_max, None);
        assert_eq!(c.class_name.as_deref(), Some("A \"NaN\" Infinity"));
    }

    #[test]
    fn defaults_are_diffusers() {
        let c = SchedulerConfig::default();
        assert_eq!(c.num_train_timesteps, 1000);
        assert_eq!(c.beta_schedule, None);
        assert_eq!(c.timestep_spacing, None);
        assert_eq!(c.solver_order, 2);
        assert!(c.set_alpha_to_one && c.lower_order_final && c.predict_x0);
        assert_eq!(c.lambda_min_clipped, f64::NEG_INFINITY);
    }
}
