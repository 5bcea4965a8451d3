//! The fused ops written as plain Burn tensor ops: the default on every backend, the
//! fallback where a kernel does not apply, and the reference our kernels are tested
//! against.

use burn::tensor::activation::{gelu, gelu_approximate, sigmoid, silu};
use burn::tensor::backend::Backend;
use burn::tensor::module::{attention, conv2d as burn_conv2d, linear as burn_linear};
use burn::tensor::ops::{AttentionModuleOptions, ConvOptions};
use burn::tensor::{DType, Tensor};

use crate::{Activation, PANEL_WIDTH};

/// Most attention scores (`N·H·rows·S`) held at once by [`attention_chunked`]: 2²⁴ floats
/// (64 MiB in f32). SDXL at 1024² would otherwise hold 4096² scores per head in the
/// UNet and 16384² in the VAE (1 GiB).
pub const SCORE_BUDGET: usize = 1 << 24;

/// GroupNorm on `[N, C, L]` with statistics in float32 (half-precision sums over a
/// group lose most of their precision), optional affine and SiLU, output in `x`'s dtype.
pub fn group_norm<B: Backend>(
    x: Tensor<B, 3>,
    affine: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
    groups: usize,
    eps: f64,
    silu_after: bool,
) -> Tensor<B, 3> {
    let dtype = x.dtype();
    let [n, c, l] = x.dims();
    let x = x.cast(DType::F32).reshape([n, groups, (c / groups) * l]);
    // Sum deviations from each group's first element: summing raw values whose mean is
    // large next to their spread loses the spread's digits in f32.
    let pivot = x.clone().narrow(2, 0, 1);
    let mean = (x.clone() - pivot.clone()).mean_dim(2) + pivot;
    let centered = x - mean;
    let var = centered.clone().square().mean_dim(2);
    let mut out = (centered / (var + eps).sqrt()).reshape([n, c, l]);
    if let Some((gamma, beta)) = affine {
        out = out * gamma.cast(DType::F32).reshape([1, c, 1])
            + beta.cast(DType::F32).reshape([1, c, 1]);
    }
    if silu_after {
        out = silu(out);
    }
    out.cast(dtype)
}

/// GEGLU on `[N, L, 2I]`: `x[.., :I] * gelu(x[.., I:])`, GELU exact (erf).
pub fn geglu<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [_, _, w] = x.dims();
    let half = w / 2;
    let value = x.clone().narrow(2, 0, half);
    let gate = x.narrow(2, half, half);
    value * gelu(gate)
}

/// Burn's `conv2d` with the same `stride` and zero `padding` on both axes, no dilation,
/// one group.
pub fn conv2d<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    stride: usize,
    padding: usize,
) -> Tensor<B, 4> {
    let options = ConvOptions::new([stride, stride], [padding, padding], [1, 1], 1);
    burn_conv2d(x, weight, bias, options)
}

/// LayerNorm over the last dim with float32 statistics whatever the dtype (as PyTorch:
/// half-precision sums over wide rows lose most of their precision or overflow).
pub fn layer_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    bias: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let centered = x.clone() - x.mean_dim(D - 1);
    let var = centered.clone().square().mean_dim(D - 1);
    let normed = centered / (var + eps).sqrt();
    let mut shape = [1; D];
    shape[D - 1] = weight.dims()[0];
    let out =
        normed * weight.cast(DType::F32).reshape(shape) + bias.cast(DType::F32).reshape(shape);
    out.cast(dtype)
}

/// `x·weight + bias` (`weight` `[in, out]`) with every row of `x` in one matrix product
/// `[rows, in]·[in, out]`: the default of [`FusedOps::fused_linear`](crate::FusedOps).
/// Burn's `linear` broadcasts the weight over `x`'s batch dims instead, and on wgpu
/// (Burn 0.21) that batched product gave wrong rows past the first for a `[N, 1, C]`
/// operand made by fused ops (`tests/suite/parity/kernels.rs`, `fused_linear_rows`).
pub fn linear_rows<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    if D < 2 {
        return burn_linear(x, weight, bias);
    }
    let mut shape = x.dims();
    let [k, out] = weight.dims();
    let rows = shape[..D - 1].iter().product();
    let y = x.reshape([rows, k]).matmul(weight);
    let y = match bias {
        Some(bias) => y + bias.unsqueeze(),
        None => y,
    };
    shape[D - 1] = out;
    y.reshape(shape)
}

/// A `[k, n]` weight with its values in panel order, the same shape: first
/// `n / PANEL_WIDTH` panels of [`PANEL_WIDTH`](crate::PANEL_WIDTH) columns, each its `k`
/// rows in turn, then the remaining columns as one narrower panel. A permutation, so
/// exact on every backend; [`from_panels`] undoes it.
pub fn to_panels<B: Backend>(weight: Tensor<B, 2>) -> Tensor<B, 2> {
    let [k, n] = weight.dims();
    let full = n / PANEL_WIDTH * PANEL_WIDTH;
    // One panel, or one row: the panel order is the weight's own.
    if full == 0 || k <= 1 || n == PANEL_WIDTH {
        return weight;
    }
    let mut parts = Vec::with_capacity(2);
    if full > 0 {
        parts.push(
            weight
                .clone()
                .slice([0..k, 0..full])
                .reshape([k, full / PANEL_WIDTH, PANEL_WIDTH])
                .swap_dims(0, 1)
                .reshape([k * full]),
        );
    }
    if full < n {
        parts.push(weight.slice([0..k, full..n]).reshape([k * (n - full)]));
    }
    Tensor::cat(parts, 0).reshape([k, n])
}

/// The `[k, n]` weight whose values [`to_panels`] put in panel order, in its own order.
pub fn from_panels<B: Backend>(panels: Tensor<B, 2>) -> Tensor<B, 2> {
    let [k, n] = panels.dims();
    let full = n / PANEL_WIDTH * PANEL_WIDTH;
    if full == 0 || k <= 1 || n == PANEL_WIDTH {
        return panels;
    }
    let flat = panels.reshape([k * n]);
    let mut parts = Vec::with_capacity(2);
    if full > 0 {
        parts.push(
            flat.clone()
                .slice(0..k * full)
                .reshape([full / PANEL_WIDTH, k, PANEL_WIDTH])
                .swap_dims(0, 1)
                .reshape([k, full]),
        );
    }
    if full < n {
        parts.push(flat.slice(k * full..k * n).reshape([k, n - full]));
    }
    Tensor::cat(parts, 1)
}

/// Burn's `linear`: `x·weight + bias` with `weight` `[in, out]`.
pub fn linear<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    burn_linear(x, weight, bias)
}

/// `nn.Upsample(scale_factor=2, mode="nearest")` on `[N, C, H, W]`, written as a
/// broadcast so it is exact on every backend.
pub fn upsample_nearest2x<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h, 1, w, 1])
        .expand([n, c, h, 2, w, 2])
        .reshape([n, c, h * 2, w * 2])
}

/// Softmax attention through Burn's `attention` op in one call: the reference.
pub fn attention_full<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> Tensor<B, 4> {
    attention(q, k, v, None, None, AttentionModuleOptions::default())
}

/// Causal softmax attention through Burn's `attention` op (`is_causal`: query `i` sees
/// keys `0..=i + S − L`).
pub fn attention_causal<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let options = AttentionModuleOptions {
        is_causal: true,
        ..Default::default()
    };
    attention(q, k, v, None, None, options)
}

/// `act(x)` as Burn's activation ops, in `x`'s dtype.
pub fn activation<B: Backend, const D: usize>(x: Tensor<B, D>, act: Activation) -> Tensor<B, D> {
    match act {
        Activation::Gelu => gelu(x),
        Activation::GeluTanh => gelu_approximate(x),
        Activation::QuickGelu => x.clone() * sigmoid(x * 1.702),
        Activation::Silu => silu(x),
    }
}

/// Softmax attention computed over blocks of query rows so that no more than `budget`
/// scores exist at once; equal to [`attention_full`] (each row's softmax is independent).
pub fn attention_chunked<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    budget: usize,
) -> Tensor<B, 4> {
    let [n, h, l, _] = q.dims();
    let s = k.dims()[2];
    let rows = (budget / (n * h * s).max(1)).max(1);
    if rows >= l {
        return attention_full(q, k, v);
    }
    let parts = (0..l)
        .step_by(rows)
        .map(|start| {
            let len = rows.min(l - start);
            attention_full(q.clone().narrow(2, start, len), k.clone(), v.clone())
        })
        .collect();
    Tensor::cat(parts, 2)
}
