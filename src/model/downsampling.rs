//! diffusers' `Downsample2D` (models/downsampling.py) in the form SDXL's UNet and VAE use
//! it: a strided convolution.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::Tensor;

use crate::model::layers::{conv2d, conv2d_forward};
use crate::FusedOps;

/// `Downsample2D`: a 3×3 convolution with stride 2.
#[derive(Module, Debug)]
pub struct Downsample2D<B: FusedOps> {
    /// The strided convolution.
    pub conv: Conv2d<B>,
}

impl<B: FusedOps> Downsample2D<B> {
    /// diffusers' `Downsample2D(channels, use_conv=True, padding=padding)`: `padding ≥ 1`
    /// pads every side (the UNet's `downsample_padding`); `0` zero-pads only the right
    /// and bottom by one, as diffusers does with `F.pad` (the VAE's encoder).
    pub fn new(channels: usize, padding: usize, device: &B::Device) -> Self {
        let conv = if padding == 0 {
            Conv2dConfig::new([channels, channels], [3, 3])
                .with_stride([2, 2])
                // (top, left, bottom, right)
                .with_padding(PaddingConfig2d::Explicit(0, 0, 1, 1))
                .init(device)
        } else {
            conv2d(channels, channels, 3, 2, padding, device)
        };
        Self { conv }
    }

    /// `[N, C, H, W]` → `[N, C, H/2, W/2]` (rounded as PyTorch rounds).
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        conv2d_forward(&self.conv, x)
    }
}
