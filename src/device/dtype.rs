//! The dtype a model runs in: what the user asks for ([`DTypeChoice`], `--dtype`) and
//! what that becomes on a resolved device ([`ResolvedDevice::pick_dtype`]).

use std::fmt;
use std::str::FromStr;

use burn::tensor::DType;

use super::resolve::{ResolvedDevice, Target};
use crate::error::{Error, Result};

/// A dtype by name, or `auto`: the fastest one the device runs well.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeChoice {
    /// float32 on the CPU (half types are emulated there, and slower); float16 on GPUs
    /// that have it (what diffusers runs SDXL in), else float32.
    #[default]
    Auto,
    /// Exactly this dtype, checked against the device ([`ResolvedDevice::check_dtype`]).
    Exact(DType),
}

impl DTypeChoice {
    /// The names `--dtype` accepts.
    pub const NAMES: [&'static str; 4] = ["auto", "float32", "float16", "bfloat16"];
}

impl FromStr for DTypeChoice {
    type Err = Error;

    /// `auto`, `float32`, `float16`, `bfloat16`, and the short forms `fp32`, `f32`,
    /// `fp16`, `f16`, `half`, `bf16`.
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => DTypeChoice::Auto,
            "float32" | "fp32" | "f32" => DTypeChoice::Exact(DType::F32),
            "float16" | "fp16" | "f16" | "half" => DTypeChoice::Exact(DType::F16),
            "bfloat16" | "bf16" => DTypeChoice::Exact(DType::BF16),
            other => {
                return Err(Error::invalid(
                    "dtype",
                    format!("`{other}`: use auto, float32, float16 or bfloat16"),
                ))
            }
        })
    }
}

impl fmt::Display for DTypeChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DTypeChoice::Auto => f.write_str("auto"),
            DTypeChoice::Exact(d) => f.write_str(dtype_name(*d)),
        }
    }
}

/// The name hypergen (and diffusers' `torch_dtype`) gives a dtype: `float32`, `float16`,
/// `bfloat16`.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        _ => "other",
    }
}

impl ResolvedDevice {
    /// The dtype `choice` means on this device: `auto` picks (see [`DTypeChoice::Auto`]),
    /// a named dtype is checked.
    pub fn pick_dtype(&self, choice: DTypeChoice) -> Result<DType> {
        match choice {
            DTypeChoice::Exact(dtype) => {
                self.check_dtype(dtype)?;
                Ok(dtype)
            }
            DTypeChoice::Auto => Ok(match &self.target {
                Target::Cpu => DType::F32,
                Target::Wgpu(a) if a.float16 => DType::F16,
                Target::Wgpu(_) => DType::F32,
                Target::Cuda(_) => DType::F16,
            }),
        }
    }
}
