//! diffusers' `Upsample2D` (models/upsampling.py) in the form SDXL's UNet and VAE use it:
//! nearest-neighbour upsampling, then a convolution.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::{Int, Tensor, TensorData};

use crate::model::layers::{conv2d, conv2d_forward, upsample2x_conv2d_forward};
use crate::FusedOps;

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
