//! Timestep and micro-conditioning embeddings (`time_proj`, `time_embedding`,
//! `add_time_proj`, `add_embedding` in diffusers).

use crate::FusedOps;
use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::activation::silu;
use burn::tensor::{DType, Tensor, TensorData};

use crate::model::layers::{linear, linear_forward};

/// diffusers' `get_timestep_embedding`: sinusoids of `values` at `dim` frequencies,
/// computed on the host in float32 exactly as torch does, so every backend sees the
/// same numbers. Returns `values.len() × dim` values, row-major.
pub fn sinusoidal(values: &[f32], dim: usize, flip_sin_to_cos: bool, freq_shift: f64) -> Vec<f32> {
    let half = dim / 2;
    let denom = half as f32 - freq_shift as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f32).ln() * i as f32 / denom).exp())
        .collect();
    let mut out = Vec::with_capacity(values.len() * dim);
    for &v in values {
        let args = freqs.iter().map(|f| v * f);
        let (sin, cos): (Vec<f32>, Vec<f32>) = args.map(|a| (a.sin(), a.cos())).unzip();
        if flip_sin_to_cos {
            out.extend(cos);
            out.extend(sin);
        } else {
            out.extend(sin);
            out.extend(cos);
        }
        // An odd width is zero-padded, as in diffusers.
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    out
}

/// Uploads host values as a `[rows, cols]` tensor of `dtype`.
pub fn host_tensor<B: FusedOps>(
    values: Vec<f32>,
    rows: usize,
    cols: usize,
    dtype: DType,
    device: &B::Device,
) -> Tensor<B, 2> {
    Tensor::<B, 2>::from_data(TensorData::new(values, [rows, cols]), device).cast(dtype)
}

/// `TimestepEmbedding`: Linear, SiLU, Linear.
#[derive(Module, Debug)]
pub struct TimestepEmbedding<B: FusedOps> {
    /// First projection.
    pub linear_1: Linear<B>,
    /// Second projection.
    pub linear_2: Linear<B>,
}

impl<B: FusedOps> TimestepEmbedding<B> {
    /// Builds the layer with lazy parameters.
    pub fn new(input: usize, dim: usize, device: &B::Device) -> Self {
        Self {
            linear_1: linear(input, dim, true, device),
            linear_2: linear(dim, dim, true, device),
        }
    }

    /// `[N, input]` → `[N, dim]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        linear_forward(&self.linear_2, silu(linear_forward(&self.linear_1, x)))
    }
}
