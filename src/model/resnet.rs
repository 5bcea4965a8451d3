//! diffusers' `ResnetBlock2D` (models/resnet.py), shared by the UNet and the VAE.

use crate::FusedOps;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear};
use burn::tensor::activation::silu;
use burn::tensor::Tensor;

use crate::model::layers::{
    as_channels, conv2d, conv2d_forward, group_norm, group_norm_silu, linear, linear_forward,
};

/// A residual block: GroupNorm, SiLU, 3×3 conv, optional time-embedding shift, twice,
/// plus a 1×1 shortcut when the channel count changes.
#[derive(Module, Debug)]
pub struct ResnetBlock2D<B: FusedOps> {
    /// First normalisation.
    pub norm1: GroupNorm<B>,
    /// First 3×3 convolution.
    pub conv1: Conv2d<B>,
    /// Projection of the time embedding to the output channels (UNet only).
    pub time_emb_proj: Option<Linear<B>>,
    /// Second normalisation.
    pub norm2: GroupNorm<B>,
    /// Second 3×3 convolution.
    pub conv2: Conv2d<B>,
    /// 1×1 convolution on the skip path when input and output widths differ.
    pub conv_shortcut: Option<Conv2d<B>>,
    output_scale_factor: f64,
}

/// How to build a [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Width of the time embedding, if the block takes one.
    pub temb_channels: Option<usize>,
    /// GroupNorm groups.
    pub groups: usize,
    /// GroupNorm epsilon.
    pub eps: f64,
    /// The output is divided by this.
    pub output_scale_factor: f64,
}

impl ResnetConfig {
    /// Builds the block with uninitialised (lazy) parameters.
    pub fn init<B: FusedOps>(&self, device: &B::Device) -> ResnetBlock2D<B> {
        let (i, o) = (self.in_channels, self.out_channels);
        ResnetBlock2D {
            norm1: group_norm(self.groups, i, self.eps, device),
            conv1: conv2d(i, o, 3, 1, 1, device),
            time_emb_proj: self.temb_channels.map(|t| linear(t, o, true, device)),
            norm2: group_norm(self.groups, o, self.eps, device),
            conv2: conv2d(o, o, 3, 1, 1, device),
            conv_shortcut: (i != o).then(|| conv2d(i, o, 1, 1, 0, device)),
            output_scale_factor: self.output_scale_factor,
        }
    }
}

impl<B: FusedOps> ResnetBlock2D<B> {
    /// `x`: `[N, C_in, H, W]`; `temb`: `[N, T]` (already the raw embedding; the SiLU
    /// before the projection is applied here, as diffusers does).
    pub fn forward(&self, x: Tensor<B, 4>, temb: Option<Tensor<B, 2>>) -> Tensor<B, 4> {
        let mut h = conv2d_forward(&self.conv1, group_norm_silu(&self.norm1, x.clone()));
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            h = h + as_channels(linear_forward(proj, silu(t)));
        }
        let h = conv2d_forward(&self.conv2, group_norm_silu(&self.norm2, h));
        let skip = match &self.conv_shortcut {
            Some(c) => conv2d_forward(c, x),
            None => x,
        };
        let out = skip + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}
