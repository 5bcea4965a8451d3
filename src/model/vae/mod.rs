//! diffusers' `AutoencoderKL` (models/autoencoders/autoencoder_kl.py): the VAE that
//! maps images to SDXL latents (encoder) and latents back to images (decoder).
//!
//! Module fields follow diffusers' weight names (`encoder.down_blocks.0.resnets.1.…`,
//! `decoder.mid_block.attentions.0.…`, `quant_conv`, …), so the safetensors files load
//! without renaming.

pub mod tiling;

use crate::FusedOps;

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::GroupNorm;
use burn::tensor::{DType, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::attention::{Attention, AttentionConfig};
use crate::model::downsampling::Downsample2D;
use crate::model::layers::{conv2d, conv2d_forward, group_norm, group_norm_silu};
use crate::model::resnet::{ResnetBlock2D, ResnetConfig};
use crate::model::upsampling::Upsample2D;

/// Epsilon of every GroupNorm inside the VAE (diffusers hard-codes it for the VAE).
const VAE_EPS: f64 = 1e-6;

/// The only down block the KL autoencoder's encoder is built of here.
const DOWN_BLOCK: &str = "DownEncoderBlock2D";
/// The only up block the KL autoencoder's decoder is built of here.
const UP_BLOCK: &str = "UpDecoderBlock2D";

/// `vae/config.json`. Keys and defaults mirror diffusers' `AutoencoderKL.__init__`;
/// unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VaeConfig {
    /// Image channels the encoder takes.
    #[serde(default = "default_rgb")]
    pub in_channels: usize,
    /// Image channels the decoder produces.
    #[serde(default = "default_rgb")]
    pub out_channels: usize,
    /// Encoder block kinds, one per resolution (only `DownEncoderBlock2D`).
    #[serde(default = "default_down_blocks")]
    pub down_block_types: Vec<String>,
    /// Decoder block kinds, one per resolution (only `UpDecoderBlock2D`).
    #[serde(default = "default_up_blocks")]
    pub up_block_types: Vec<String>,
    /// Channel width of each resolution level, from the image side down.
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (the decoder's blocks have one more).
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: usize,
    /// Activation function; only `silu` (alias `swish`) is implemented.
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    /// Latent channels (4 for SDXL).
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    /// GroupNorm groups everywhere in the VAE.
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    /// Image size the model was trained at (informational).
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    /// Latents are multiplied by this after encoding and divided by it before decoding.
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// Subtracted from latents before scaling (None for SDXL).
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Per-channel latent mean, for models that standardise latents (None for SDXL).
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent standard deviation (None for SDXL).
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// The VAE overflows in float16 and must run in float32 when true.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    /// Whether the 1×1 `quant_conv` follows the encoder.
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    /// Whether the 1×1 `post_quant_conv` precedes the decoder.
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have their self-attention layer.
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

fn default_rgb() -> usize {
    3
}
fn default_down_blocks() -> Vec<String> {
    vec![DOWN_BLOCK.into()]
}
fn default_up_blocks() -> Vec<String> {
    vec![UP_BLOCK.into()]
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn default_layers_per_block() -> usize {
    1
}
fn default_act_fn() -> String {
    "silu".into()
}
fn default_latent_channels() -> usize {
    4
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_sample_size() -> usize {
    32
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

impl VaeConfig {
    /// Pixels per latent cell on each axis: `2^(levels - 1)` (8 for SDXL).
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// Refuses ([`Error::UnsupportedConfig`]) configurations this implementation would
    /// build wrongly or that would make Burn panic while building layers.
    pub fn validate(&self) -> Result<()> {
        let unsupported = Error::UnsupportedConfig;
        if !matches!(self.act_fn.as_str(), "silu" | "swish") {
            return Err(unsupported(format!(
                "act_fn `{}` (only `silu` is implemented)",
                self.act_fn
            )));
        }
        for (key, types, want) in [
            ("down_block_types", &self.down_block_types, DOWN_BLOCK),
            ("up_block_types", &self.up_block_types, UP_BLOCK),
        ] {
            if let Some(other) = types.iter().find(|t| *t != want) {
                return Err(unsupported(format!(
                    "{key} contains `{other}` (only `{want}` is implemented)"
                )));
            }
        }
        let levels = self.block_out_channels.len();
        if levels == 0
            || self.down_block_types.len() != levels
            || self.up_block_types.len() != levels
        {
            return Err(unsupported(format!(
                "block_out_channels ({levels}), down_block_types ({}) and up_block_types ({}) \
                 must be non-empty and of equal length",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        if self.layers_per_block == 0 {
            return Err(unsupported("layers_per_block must be at least 1".into()));
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.latent_channels == 0 {
            return Err(unsupported(
                "in_channels, out_channels and latent_channels must be positive".into(),
            ));
        }
        let groups = self.norm_num_groups;
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| groups == 0 || c == 0 || c % groups != 0)
        {
            return Err(unsupported(format!(
                "block_out_channels entry {c} is not a positive multiple of norm_num_groups {groups}"
            )));
        }
        Ok(())
    }

    fn resnet(&self, in_channels: usize, out_channels: usize) -> ResnetConfig {
        ResnetConfig {
            in_channels,
            out_channels,
            temb_channels: None,
            groups: self.norm_num_groups,
            eps: VAE_EPS,
            output_scale_factor: 1.0,
        }
    }
}

/// `DownEncoderBlock2D`: resnets, then an optional downsampler.
#[derive(Module, Debug)]
pub struct DownEncoderBlock2D<B: FusedOps> {
    /// `layers_per_block` resnets.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// One downsampler, or none on the last (lowest-resolution) block.
    pub downsamplers: Vec<Downsample2D<B>>,
}

impl<B: FusedOps> DownEncoderBlock2D<B> {
    /// Runs the block.
    pub fn forward(&self, mut x: Tensor<B, 4>) -> Tensor<B, 4> {
        for r in &self.resnets {
            x = r.forward(x, None);
        }
        for d in &self.downsamplers {
            x = d.forward(x);
        }
        x
    }
}

/// `UpDecoderBlock2D`: resnets, then an optional upsampler.
#[derive(Module, Debug)]
pub struct UpDecoderBlock2D<B: FusedOps> {
    /// `layers_per_block + 1` resnets.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// One upsampler, or none on the last (full-resolution) block.
    pub upsamplers: Vec<Upsample2D<B>>,
}

impl<B: FusedOps> UpDecoderBlock2D<B> {
    /// Runs the block.
    pub fn forward(&self, mut x: Tensor<B, 4>) -> Tensor<B, 4> {
        for r in &self.resnets {
            x = r.forward(x, None);
        }
        for u in &self.upsamplers {
            x = u.forward(x, None);
        }
        x
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, (attention, resnet).
#[derive(Module, Debug)]
pub struct MidBlock2D<B: FusedOps> {
    /// Two resnets.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// One single-head spatial self-attention, or none when `mid_block_add_attention`
    /// is false.
    pub attentions: Vec<Attention<B>>,
}

impl<B: FusedOps> MidBlock2D<B> {
    fn new(config: &VaeConfig, channels: usize, device: &B::Device) -> Self {
        let attention = AttentionConfig {
            query_dim: channels,
            cross_attention_dim: None,
            // diffusers passes attention_head_dim = channels: one head.
            heads: 1,
            dim_head: channels,
            qkv_bias: true,
            group_norm: Some((config.norm_num_groups, VAE_EPS)),
        };
        Self {
            resnets: (0..2)
                .map(|_| config.resnet(channels, channels).init(device))
                .collect(),
            attentions: if config.mid_block_add_attention {
                vec![attention.init(device)]
            } else {
                Vec::new()
            },
        }
    }

    /// Runs the block. Without attention both resnets still run, as in diffusers.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut resnets = self.resnets.iter();
        let mut x = match resnets.next() {
            Some(r) => r.forward(x, None),
            None => x,
        };
        for (i, r) in resnets.enumerate() {
            if let Some(a) = self.attentions.get(i) {
                x = a.forward_spatial(x);
            }
            x = r.forward(x, None);
        }
        x
    }
}

/// The VAE encoder: image → `2 * latent_channels` moments (before `quant_conv`).
#[derive(Module, Debug)]
pub struct Encoder<B: FusedOps> {
    /// Image → first block width.
    pub conv_in: Conv2d<B>,
    /// One block per resolution level.
    pub down_blocks: Vec<DownEncoderBlock2D<B>>,
    /// Mid block at the lowest resolution.
    pub mid_block: MidBlock2D<B>,
    /// Final normalisation.
    pub conv_norm_out: GroupNorm<B>,
    /// Last width → mean and log-variance channels.
    pub conv_out: Conv2d<B>,
}

impl<B: FusedOps> Encoder<B> {
    fn new(c: &VaeConfig, device: &B::Device) -> Self {
        let widths = &c.block_out_channels;
        let last = widths[widths.len() - 1];
        let down_blocks = widths
            .iter()
            .enumerate()
            .map(|(i, &out)| {
                let input = if i == 0 { widths[0] } else { widths[i - 1] };
                DownEncoderBlock2D {
                    resnets: (0..c.layers_per_block)
                        .map(|j| c.resnet(if j == 0 { input } else { out }, out).init(device))
                        .collect(),
                    downsamplers: if i + 1 < widths.len() {
                        vec![Downsample2D::new(out, 0, device)]
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect();
        Self {
            conv_in: conv2d(c.in_channels, widths[0], 3, 1, 1, device),
            down_blocks,
            mid_block: MidBlock2D::new(c, last, device),
            conv_norm_out: group_norm(c.norm_num_groups, last, VAE_EPS, device),
            conv_out: conv2d(last, 2 * c.latent_channels, 3, 1, 1, device),
        }
    }

    /// `[N, in_channels, H, W]` → `[N, 2 * latent_channels, H/f, W/f]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = conv2d_forward(&self.conv_in, x);
        for b in &self.down_blocks {
            x = b.forward(x);
        }
        let x = self.mid_block.forward(x);
        conv2d_forward(&self.conv_out, group_norm_silu(&self.conv_norm_out, x))
    }
}

/// The VAE decoder: latents (after `post_quant_conv`) → image.
#[derive(Module, Debug)]
pub struct Decoder<B: FusedOps> {
    /// Latents → last block width.
    pub conv_in: Conv2d<B>,
    /// Mid block at the lowest resolution.
    pub mid_block: MidBlock2D<B>,
    /// One block per resolution level, lowest resolution first.
    pub up_blocks: Vec<UpDecoderBlock2D<B>>,
    /// Final normalisation.
    pub conv_norm_out: GroupNorm<B>,
    /// First block width → image channels.
    pub conv_out: Conv2d<B>,
}

impl<B: FusedOps> Decoder<B> {
    fn new(c: &VaeConfig, device: &B::Device) -> Self {
        let reversed: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let up_blocks = reversed
            .iter()
            .enumerate()
            .map(|(i, &out)| {
                let input = if i == 0 { reversed[0] } else { reversed[i - 1] };
                UpDecoderBlock2D {
                    resnets: (0..=c.layers_per_block)
                        .map(|j| c.resnet(if j == 0 { input } else { out }, out).init(device))
                        .collect(),
                    upsamplers: if i + 1 < reversed.len() {
                        vec![Upsample2D::new(out, device)]
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect();
        let first = c.block_out_channels[0];
        Self {
            conv_in: conv2d(c.latent_channels, reversed[0], 3, 1, 1, device),
            mid_block: MidBlock2D::new(c, reversed[0], device),
            up_blocks,
            conv_norm_out: group_norm(c.norm_num_groups, first, VAE_EPS, device),
            conv_out: conv2d(first, c.out_channels, 3, 1, 1, device),
        }
    }

    /// `[N, latent_channels, h, w]` → `[N, out_channels, h*f, w*f]`.
    pub fn forward(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = self.mid_block.forward(conv2d_forward(&self.conv_in, z));
        for b in &self.up_blocks {
            x = b.forward(x);
        }
        conv2d_forward(&self.conv_out, group_norm_silu(&self.conv_norm_out, x))
    }
}

/// The diagonal Gaussian the encoder describes for each latent element.
#[derive(Debug, Clone)]
pub struct LatentDist<B: FusedOps> {
    /// Mean (the distribution's mode).
    pub mean: Tensor<B, 4>,
    /// Standard deviation, `exp(0.5 * logvar)`.
    pub std: Tensor<B, 4>,
    /// Log-variance, clamped to [-30, 20] as diffusers clamps it.
    pub logvar: Tensor<B, 4>,
}

impl<B: FusedOps> LatentDist<B> {
    /// A sample `mean + std * noise`, with `noise` standard normal of the same shape
    /// (drawn by the caller so that seeding stays in one place).
    pub fn sample(&self, noise: Tensor<B, 4>) -> Tensor<B, 4> {
        let noise = noise.cast(self.mean.dtype());
        self.mean.clone() + self.std.clone() * noise
    }
}

/// diffusers' `AutoencoderKL`.
#[derive(Module, Debug)]
pub struct AutoencoderKL<B: FusedOps> {
    /// Image → moments.
    pub encoder: Encoder<B>,
    /// Latents → image.
    pub decoder: Decoder<B>,
    /// 1×1 conv on the moments (`use_quant_conv`).
    pub quant_conv: Option<Conv2d<B>>,
    /// 1×1 conv on the latents before decoding (`use_post_quant_conv`).
    pub post_quant_conv: Option<Conv2d<B>>,
    config: VaeConfig,
}

impl VaeConfig {
    /// Builds the model with lazy (unmaterialised) parameters; the loader fills them.
    /// Errors ([`Error::UnsupportedConfig`]) when the config fails [`validate`](Self::validate).
    pub fn init<B: FusedOps>(&self, device: &B::Device) -> Result<AutoencoderKL<B>> {
        self.validate()?;
        let config = self.clone();
        let latent = config.latent_channels;
        Ok(AutoencoderKL {
            encoder: Encoder::new(&config, device),
            decoder: Decoder::new(&config, device),
            quant_conv: config
                .use_quant_conv
                .then(|| conv2d(2 * latent, 2 * latent, 1, 1, 0, device)),
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| conv2d(latent, latent, 1, 1, 0, device)),
            config,
        })
    }
}

impl<B: FusedOps> AutoencoderKL<B> {
    /// The config the model was built from.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The dtype the parameters are stored in; inputs are cast to it.
    pub fn dtype(&self) -> DType {
        self.decoder.conv_in.weight.val().dtype()
    }

    /// Latents `[N, latent_channels, h, w]`, already divided by `scaling_factor` (and
    /// with `shift_factor` added back) → image `[N, out_channels, 8h, 8w]` for SDXL, in
    /// the [-1, 1] scale and not clamped. Computed in the parameters' dtype.
    pub fn decode(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        B::on_pool(|| {
            let z = latents.cast(self.dtype());
            let z = match &self.post_quant_conv {
                Some(c) => conv2d_forward(c, z),
                None => z,
            };
            self.decoder.forward(z)
        })
    }

    /// Image `[N, in_channels, H, W]` in the [-1, 1] scale → the latent distribution
    /// (unscaled: multiply a sample by `scaling_factor` for the UNet).
    pub fn encode(&self, image: Tensor<B, 4>) -> LatentDist<B> {
        let h = B::on_pool(|| self.encoder.forward(image.cast(self.dtype())));
        let moments = match &self.quant_conv {
            Some(c) => conv2d_forward(c, h),
            None => h,
        };
        let [n, c, h, w] = moments.dims();
        let half = c / 2;
        let mean = moments.clone().slice([0..n, 0..half, 0..h, 0..w]);
        let logvar = moments
            .slice([0..n, half..c, 0..h, 0..w])
            .clamp(-30.0, 20.0);
        let std = (logvar.clone() * 0.5).exp();
        LatentDist { mean, std, logvar }
    }
}
