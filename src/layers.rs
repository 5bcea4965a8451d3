//! Constructors for the Burn layers every component uses, with PyTorch's layouts and
//! defaults, so model code reads like its diffusers counterpart.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// `nn.Linear(input, output, bias)`.
pub fn linear<B: Backend>(input: usize, output: usize, bias: bool, device: &B::Device) -> Linear<B> {
    LinearConfig::new(input, output).with_bias(bias).init(device)
}

/// `nn.Conv2d(input, output, kernel, stride, padding)` with symmetric padding and a bias.
pub fn conv2d<B: Backend>(
    input: usize,
    output: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    device: &B::Device,
) -> Conv2d<B> {
    Conv2dConfig::new([input, output], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(padding, padding, padding, padding))
        .init(device)
}

/// `nn.GroupNorm(groups, channels, eps, affine=True)`.
pub fn group_norm<B: Backend>(groups: usize, channels: usize, eps: f64, device: &B::Device) -> GroupNorm<B> {
    GroupNormConfig::new(groups, channels)
        .with_epsilon(eps)
        .init(device)
}

/// `nn.LayerNorm(dim, eps)`.
pub fn layer_norm<B: Backend>(dim: usize, eps: f64, device: &B::Device) -> LayerNorm<B> {
    LayerNormConfig::new(dim).with_epsilon(eps).init(device)
}

/// `nn.Upsample(scale_factor=2, mode="nearest")` on `[N, C, H, W]`, written as a
/// broadcast so it is exact on every backend.
pub fn upsample_nearest2x<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h, 1, w, 1])
        .expand([n, c, h, 2, w, 2])
        .reshape([n, c, h * 2, w * 2])
}

/// A `[N, C]` tensor viewed as `[N, C, 1, 1]` to broadcast over an image.
pub fn as_channels<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 4> {
    let [n, c] = x.dims();
    x.reshape([n, c, 1, 1])
}

/// Marker so modules built only of these layers can be loaded uniformly.
pub trait Layer<B: Backend>: Module<B> {}
impl<B: Backend, M: Module<B>> Layer<B> for M {}
