//! Constructors for the Burn layers every component uses, with PyTorch's layouts and
//! defaults, so model code reads like its diffusers counterpart.

use crate::kernels::plain;
use crate::FusedOps;
use burn::module::Module;
use burn::module::{Initializer, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::nn::{GroupNorm, GroupNormConfig, Linear, LinearConfig};
use burn::tensor::Tensor;

/// `nn.Linear(input, output, bias)`.
pub fn linear<B: FusedOps>(
    input: usize,
    output: usize,
    bias: bool,
    device: &B::Device,
) -> Linear<B> {
    LinearConfig::new(input, output)
        .with_bias(bias)
        .init(device)
}

/// `nn.Conv2d(input, output, kernel, stride, padding)` with symmetric padding and a bias.
pub fn conv2d<B: FusedOps>(
    input: usize,
    output: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    device: &B::Device,
) -> Conv2d<B> {
    Conv2dConfig::new([input, output], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(
            padding, padding, padding, padding,
        ))
        .init(device)
}

/// `Linear` forward through [`FusedOps::fused_linear`] (on the CPU one GEMM over every
/// row, the bias written first).
pub fn linear_forward<B: FusedOps, const D: usize>(
    linear: &Linear<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let bias = linear.bias.as_ref().map(|b| b.val());
    B::fused_linear(x, linear.weight.val(), bias)
}

/// `Conv2d` forward through [`FusedOps::fused_conv2d`] (our GEMM kernel on the CPU) for
/// the layers it takes: one stride and one explicit padding for every side, no dilation,
/// one group (every convolution [`conv2d`] builds); Burn's own forward for others.
pub fn conv2d_forward<B: FusedOps>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    match fused_conv_padding(conv) {
        Some(padding) => {
            let bias = conv.bias.as_ref().map(|b| b.val());
            B::fused_conv2d(x, conv.weight.val(), bias, conv.stride[0], padding)
        }
        None => conv.forward(x),
    }
}

/// `Conv2d` forward on `x` upsampled 2× (nearest), through
/// [`FusedOps::fused_upsample_conv2d`] (on the CPU the upsampled image is never stored)
/// for stride-1 layers [`conv2d_forward`] takes; upsampling, then the layer, for others.
pub fn upsample2x_conv2d_forward<B: FusedOps>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    match fused_conv_padding(conv) {
        Some(padding) if conv.stride == [1, 1] => {
            let bias = conv.bias.as_ref().map(|b| b.val());
            B::fused_upsample_conv2d(x, conv.weight.val(), bias, padding)
        }
        _ => conv2d_forward(conv, plain::upsample_nearest2x(x)),
    }
}

/// The padding of every side when the fused convolutions take `conv`: one stride and one
/// explicit padding for both axes, no dilation, one group.
fn fused_conv_padding<B: FusedOps>(conv: &Conv2d<B>) -> Option<usize> {
    let padding = match conv.padding {
        PaddingConfig2d::Explicit(t, l, b, r) if t == l && l == b && b == r => t,
        PaddingConfig2d::Valid => 0,
        _ => return None,
    };
    let [sh, sw] = conv.stride;
    (sh == sw && conv.dilation == [1, 1] && conv.groups == 1).then_some(padding)
}

/// `nn.GroupNorm(groups, channels, eps, affine=True)`.
pub fn group_norm<B: FusedOps>(
    groups: usize,
    channels: usize,
    eps: f64,
    device: &B::Device,
) -> GroupNorm<B> {
    GroupNormConfig::new(groups, channels)
        .with_epsilon(eps)
        .init(device)
}

/// `GroupNorm` forward with PyTorch's precision, through [`FusedOps::fused_group_norm`] (our
/// fused kernel on GPUs): statistics in f32 whatever the input dtype, as PyTorch's
/// kernels accumulate half inputs in float. Summing tens of thousands of squares in f16
/// (Burn's `GroupNorm::forward` keeps the input dtype) overflows or loses most digits at
/// SDXL resolutions.
pub fn group_norm_forward<B: FusedOps, const D: usize>(
    norm: &GroupNorm<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    group_norm_act(norm, x, false)
}

/// [`group_norm_forward`] followed by SiLU, fused into one kernel where we have one.
pub fn group_norm_silu<B: FusedOps, const D: usize>(
    norm: &GroupNorm<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    group_norm_act(norm, x, true)
}

fn group_norm_act<B: FusedOps, const D: usize>(
    norm: &GroupNorm<B>,
    x: Tensor<B, D>,
    silu: bool,
) -> Tensor<B, D> {
    let shape = x.shape();
    let (n, c) = (shape[0], shape[1]);
    let flat = x.reshape([n, c, shape.num_elements() / (n * c)]);
    let affine = match (&norm.gamma, &norm.beta) {
        (Some(gamma), Some(beta)) => Some((gamma.val(), beta.val())),
        _ => None,
    };
    B::fused_group_norm(flat, affine, norm.num_groups, norm.epsilon, silu).reshape(shape)
}

/// `nn.LayerNorm(dim, eps)` whose statistics are taken in float32 whatever the
/// parameter dtype, as PyTorch does: half-precision sums over wide rows lose most of
/// their precision or overflow. Parameters are named as in PyTorch (`weight`, `bias`).
#[derive(Module, Debug)]
pub struct LayerNorm<B: FusedOps> {
    /// Scale.
    pub weight: Param<Tensor<B, 1>>,
    /// Shift.
    pub bias: Param<Tensor<B, 1>>,
    eps: f64,
}

impl<B: FusedOps> LayerNorm<B> {
    /// Normalises the last dimension ([`FusedOps::fused_layer_norm`]).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        B::fused_layer_norm(x, self.weight.val(), self.bias.val(), self.eps)
    }
}

/// `nn.LayerNorm(dim, eps)`.
pub fn layer_norm<B: FusedOps>(dim: usize, eps: f64, device: &B::Device) -> LayerNorm<B> {
    LayerNorm {
        weight: Initializer::Ones.init([dim], device),
        bias: Initializer::Zeros.init([dim], device),
        eps,
    }
}

/// A `[N, C]` tensor viewed as `[N, C, 1, 1]` to broadcast over an image.
pub fn as_channels<B: FusedOps>(x: Tensor<B, 2>) -> Tensor<B, 4> {
    let [n, c] = x.dims();
    x.reshape([n, c, 1, 1])
}

/// Marker so modules built only of these layers can be loaded uniformly.
pub trait Layer<B: FusedOps>: Module<B> {}
impl<B: FusedOps, M: Module<B>> Layer<B> for M {}
