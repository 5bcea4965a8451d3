//! transformers' `CLIPVisionModelWithProjection`, the image encoder of IP-Adapter, and
//! CLIP's image preprocessing as diffusers runs it.
//!
//! Field paths equal the transformers weight names (`vision_model.embeddings.
//! patch_embedding.weight`, `vision_model.pre_layrnorm.weight` (sic),
//! `visual_projection.weight`, …). The encoder layers are the text encoder's
//! ([`ClipEncoderLayer`]) with attention over every position.

use burn::module::{Initializer, Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig};
use burn::tensor::{Tensor, TensorData};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::clip::{activation, ClipEncoder, ClipEncoderLayer};
use crate::model::layers::{layer_norm, LayerNorm};
use crate::model::linear::Linear;
use crate::FusedOps;

/// `config.json` of an image encoder folder: transformers' `CLIPVisionConfig` keys, with
/// transformers' defaults for absent ones.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    /// Width of the hidden states.
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    /// Width of the MLP's inner layer.
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    /// Number of transformer layers.
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    /// Input channels.
    #[serde(default = "defaults::num_channels")]
    pub num_channels: usize,
    /// Side of the square input image.
    #[serde(default = "defaults::image_size")]
    pub image_size: usize,
    /// Side of one square patch.
    #[serde(default = "defaults::patch_size")]
    pub patch_size: usize,
    /// MLP activation, as the text encoder's.
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    /// Epsilon of every LayerNorm.
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Width of `visual_projection`'s output (the image embedding).
    #[serde(default = "defaults::projection_dim")]
    pub projection_dim: usize,
}

mod defaults {
    pub fn hidden_size() -> usize {
        768
    }
    pub fn intermediate_size() -> usize {
        3072
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        12
    }
    pub fn num_channels() -> usize {
        3
    }
    pub fn image_size() -> usize {
        224
    }
    pub fn patch_size() -> usize {
        32
    }
    pub fn hidden_act() -> String {
        "quick_gelu".into()
    }
    pub fn layer_norm_eps() -> f64 {
        1e-5
    }
    pub fn projection_dim() -> usize {
        512
    }
}

/// `vision_model.embeddings`: class token, patch embedding, learned positions.
#[derive(Module, Debug)]
pub struct ClipVisionEmbeddings<B: FusedOps> {
    /// `[hidden]`, prepended to the patches.
    pub class_embedding: Param<Tensor<B, 1>>,
    /// Patch embedding, stride = kernel = patch size, no bias.
    pub patch_embedding: Conv2d<B>,
    /// `[patches + 1, hidden]`.
    pub position_embedding: Embedding<B>,
}

/// `vision_model`.
#[derive(Module, Debug)]
pub struct ClipVisionTransformer<B: FusedOps> {
    /// Class token, patches, positions.
    pub embeddings: ClipVisionEmbeddings<B>,
    /// Norm before the encoder (transformers' spelling).
    pub pre_layrnorm: LayerNorm<B>,
    /// The transformer layers.
    pub encoder: ClipEncoder<B>,
    /// Norm of the class token's last output.
    pub post_layernorm: LayerNorm<B>,
}

/// A CLIP image encoder with its projection (`CLIPVisionModelWithProjection`).
#[derive(Module, Debug)]
pub struct ClipVisionModel<B: FusedOps> {
    /// The transformer.
    pub vision_model: ClipVisionTransformer<B>,
    /// Projection of the pooled class token (no bias).
    pub visual_projection: Linear<B>,
    #[module(skip)]
    config: ClipVisionConfig,
}

/// What one forward pass gives IP-Adapter.
#[derive(Debug, Clone)]
pub struct ClipVisionOutput<B: FusedOps> {
    /// `visual_projection(post_layernorm(class token))`, `[N, projection_dim]` (the base
    /// adapter's input).
    pub image_embeds: Tensor<B, 2>,
    /// `hidden_states[-2]`: the second-to-last layer's output, `[N, tokens, hidden]`
    /// (IP-Adapter Plus's input).
    pub penultimate: Tensor<B, 3>,
}

impl ClipVisionConfig {
    /// Tokens the encoder reads: one per patch and the class token.
    pub fn tokens(&self) -> usize {
        let side = self.image_size / self.patch_size.max(1);
        side * side + 1
    }

    /// Builds the model with lazy parameters; the loader fills them.
    ///
    /// Errors ([`Error::UnsupportedConfig`]) on an unknown activation, a width not
    /// divisible by the head count or an image not divisible into patches.
    pub fn init<B: FusedOps>(&self, device: &B::Device) -> Result<ClipVisionModel<B>> {
        let unsupported = Error::UnsupportedConfig;
        let act = activation(&self.hidden_act)
            .ok_or_else(|| unsupported(format!("hidden_act `{}`", self.hidden_act)))?;
        let (c, heads, p) = (self.hidden_size, self.num_attention_heads, self.patch_size);
        if heads == 0 || c % heads != 0 {
            return Err(unsupported(format!(
                "hidden_size {c} is not divisible by num_attention_heads {heads}"
            )));
        }
        if p == 0 || !self.image_size.is_multiple_of(p) {
            return Err(unsupported(format!(
                "image_size {} is not divisible by patch_size {p}",
                self.image_size
            )));
        }
        let eps = self.layer_norm_eps;
        let layers = (0..self.num_hidden_layers)
            .map(|_| ClipEncoderLayer::new(c, self.intermediate_size, heads, act, eps, device))
            .collect();
        Ok(ClipVisionModel {
            vision_model: ClipVisionTransformer {
                embeddings: ClipVisionEmbeddings {
                    class_embedding: Initializer::Zeros.init([c], device),
                    patch_embedding: Conv2dConfig::new([self.num_channels, c], [p, p])
                        .with_stride([p, p])
                        .with_bias(false)
                        .init(device),
                    position_embedding: EmbeddingConfig::new(self.tokens(), c).init(device),
                },
                pre_layrnorm: layer_norm(c, eps, device),
                encoder: ClipEncoder { layers },
                post_layernorm: layer_norm(c, eps, device),
            },
            visual_projection: Linear::new(c, self.projection_dim, false, device),
            config: self.clone(),
        })
    }
}

impl<B: FusedOps> ClipVisionModel<B> {
    /// The config the model was built from.
    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// Encodes `pixel_values` `[N, channels, image_size, image_size]` (preprocessed:
    /// [`preprocess`]).
    pub fn forward(&self, pixel_values: Tensor<B, 4>) -> Result<ClipVisionOutput<B>> {
        let [n, ch, h, w] = pixel_values.dims();
        let cfg = &self.config;
        let side = cfg.image_size;
        if ch != cfg.num_channels || h != side || w != side {
            return Err(Error::invalid(
                "pixel_values",
                format!(
                    "shape [{n}, {ch}, {h}, {w}], the image encoder takes [_, {}, {side}, {side}]",
                    cfg.num_channels
                ),
            ));
        }
        Ok(B::on_pool(|| {
            let vm = &self.vision_model;
            let emb = &vm.embeddings;
            let c = cfg.hidden_size;
            let patches = emb.patch_embedding.forward(pixel_values);
            let [_, _, ph, pw] = patches.dims();
            let patches = patches.reshape([n, c, ph * pw]).swap_dims(1, 2);
            let class = emb
                .class_embedding
                .val()
                .reshape([1, 1, c])
                .expand([n, 1, c]);
            let positions = emb.position_embedding.weight.val().unsqueeze::<3>();
            let mut x = vm
                .pre_layrnorm
                .forward(Tensor::cat(vec![class, patches], 1) + positions);
            // hidden_states[-2] is the pre-normed embeddings when there is a single layer.
            let mut penultimate = x.clone();
            let n_layers = vm.encoder.layers.len();
            for (i, layer) in vm.encoder.layers.iter().enumerate() {
                x = layer.forward_with(x, false);
                if i + 2 == n_layers {
                    penultimate = x.clone();
                }
            }
            let pooled = vm
                .post_layernorm
                .forward(x.slice([0..n, 0..1]).reshape([n, c]));
            ClipVisionOutput {
                image_embeds: self.visual_projection.forward(pooled),
                penultimate,
            }
        }))
    }
}

/// OpenAI CLIP's per-channel mean, which diffusers' `CLIPImageProcessor` uses.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP's per-channel standard deviation (0.26862954, 0.26130258, 0.27577711 as
/// f32).
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// CLIP's image preprocessing as diffusers' IP-Adapter runs it
/// (`CLIPImageProcessor(size=size, crop_size=size)` with the PIL backend): the shorter
/// side resized to `size` with PIL's bicubic filter (the longer to `⌊size·long/short⌋`,
/// rounded to bytes), a centre crop of `size × size` at `((H − size)/2, (W − size)/2)`
/// rounded down, `x/255`, then `(x − mean)/std` per channel.
///
/// `rgb` is `width × height` RGB bytes, row-major; the result is `[3, size, size]`,
/// channel-major.
pub fn preprocess(rgb: &[u8], width: usize, height: usize, size: usize) -> Vec<f32> {
    let short = width.min(height).max(1);
    let long = width.max(height);
    // transformers computes the longer side as int(size * long / short).
    let scaled = ((size as f64) * (long as f64) / (short as f64)) as usize;
    let (nw, nh) = if width <= height {
        (size, scaled)
    } else {
        (scaled, size)
    };
    let resized = pil_bicubic(rgb, width, height, nw, nh);
    let (top, left) = ((nh - size) / 2, (nw - size) / 2);
    let mut out = vec![0f32; 3 * size * size];
    for ch in 0..3 {
        for y in 0..size {
            for x in 0..size {
                let v = resized[((top + y) * nw + left + x) * 3 + ch] as f32 / 255.0;
                out[(ch * size + y) * size + x] = (v - CLIP_MEAN[ch]) / CLIP_STD[ch];
            }
        }
    }
    out
}

/// [`preprocess`] as a `[1, 3, size, size]` tensor.
pub fn pixel_values<B: FusedOps>(
    rgb: &[u8],
    width: usize,
    height: usize,
    size: usize,
    device: &B::Device,
) -> Tensor<B, 4> {
    let data = preprocess(rgb, width, height, size);
    Tensor::from_data(TensorData::new(data, [1, 3, size, size]), device)
}

/// Fixed-point precision of PIL's 8-bit resampling (`PRECISION_BITS` in Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's bicubic kernel (`a = −0.5`).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// One axis's taps as PIL computes them (`precompute_coeffs` and
/// `normalize_coeffs_8bpc`): per output position, the first input index and the
/// fixed-point weights.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i64>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic((x as f64 - center + 0.5) / filterscale))
                .collect();
            let total: f64 = w.iter().sum();
            let one = (1i64 << PRECISION_BITS) as f64;
            let k = w
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    // C's truncating cast after rounding half away from zero.
                    if w < 0.0 {
                        (-0.5 + w * one) as i64
                    } else {
                        (0.5 + w * one) as i64
                    }
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

/// PIL's `clip8`: the fixed-point sum back to a byte.
fn clip8(ss: i64) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `Image.resize((nw, nh), Image.BICUBIC)` on RGB bytes, bit for bit: a horizontal pass,
/// then a vertical one, each rounded to bytes (skipped when that side keeps its size).
fn pil_bicubic(rgb: &[u8], w: usize, h: usize, nw: usize, nh: usize) -> Vec<u8> {
    let half = 1i64 << (PRECISION_BITS - 1);
    let horizontal = if nw != w {
        let taps = coefficients(w, nw);
        let mut out = vec![0u8; nw * h * 3];
        for y in 0..h {
            for (x, (start, k)) in taps.iter().enumerate() {
                for ch in 0..3 {
                    let ss = k.iter().enumerate().fold(half, |ss, (i, &k)| {
                        ss + rgb[(y * w + start + i) * 3 + ch] as i64 * k
                    });
                    out[(y * nw + x) * 3 + ch] = clip8(ss);
                }
            }
        }
        out
    } else {
        rgb.to_vec()
    };
    if nh == h {
        return horizontal;
    }
    let taps = coefficients(h, nh);
    let mut out = vec![0u8; nw * nh * 3];
    for (y, (start, k)) in taps.iter().enumerate() {
        for x in 0..nw {
            for ch in 0..3 {
                let ss = k.iter().enumerate().fold(half, |ss, (i, &k)| {
                    ss + horizontal[((start + i) * nw + x) * 3 + ch] as i64 * k
                });
                out[(y * nw + x) * 3 + ch] = clip8(ss);
            }
        }
    }
    out
}
