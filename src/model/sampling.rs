//! diffusers' `Downsample2D` and `Upsample2D` (models/downsampling.py, upsampling.py) in
//! the form SDXL's UNet and VAE use them: with a convolution.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::{Int, Tensor, TensorData};

use crate::model::layers::{conv2d, conv2d_forward, upsample2x_conv2d_forward};
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

/// `Upsample2D`: nearest-neighbour upsampling, then a 3×3 convolution.
#[derive(Module, Debug)]
pub struct Upsample2D<B: FusedOps> {
    /// The convolution after upsampling.
    pub conv: Conv2d<B>,
}

impl<B: FusedOps> Upsample2D<B> {
    /// diffusers' `Upsample2D(channels, use_conv=True)`.
    pub fn new(channels: usize, device: &B::Device) -> Self {
        Self {
            conv: conv2d(channels, channels, 3, 1, 1, device),
        }
    }

    /// Upsamples 2×, or to `size` when given (the UNet passes its skip connection's
    /// height and width, which differ from 2× when the latent size is not a multiple of
    /// its overall downsampling factor).
    pub fn forward(&self, x: Tensor<B, 4>, size: Option<[usize; 2]>) -> Tensor<B, 4> {
        let [_, _, h, w] = x.dims();
        match size {
            Some(size) if size != [h * 2, w * 2] => {
                conv2d_forward(&self.conv, resize_nearest(x, size))
            }
            _ => upsample2x_conv2d_forward(&self.conv, x),
        }
    }
}

/// PyTorch's `interpolate(mode="nearest", size=…)`: source index `floor(i · in / out)`.
pub fn resize_nearest<B: FusedOps>(x: Tensor<B, 4>, size: [usize; 2]) -> Tensor<B, 4> {
    let [_, _, h, w] = x.dims();
    let device = x.device();
    let index = |n_in: usize, n_out: usize| {
        let scale = n_in as f32 / n_out as f32;
        let idx: Vec<i64> = (0..n_out)
            .map(|i| ((i as f32 * scale).floor() as usize).min(n_in - 1) as i64)
            .collect();
        Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [n_out]), &device)
    };
    x.select(2, index(h, size[0])).select(3, index(w, size[1]))
}
