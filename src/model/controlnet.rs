//! diffusers' `ControlNetModel` for SDXL (Zhang et al. 2023, "Adding Conditional Control
//! to Text-to-Image Diffusion Models"), built from its own `config.json`: a copy of the
//! UNet's encoder (its blocks are the UNet's, [`crate::model::unet`]) that reads the
//! latents plus an embedded control image and hands every skip connection and the mid
//! block's output, each through a 1×1 "zero convolution", to the UNet
//! ([`UNetExtras`](crate::model::unet::UNetExtras)). Field paths equal diffusers'
//! weight names.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::activation::silu;
use burn::tensor::{DType, Tensor};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

use crate::error::{Error, Result};
use crate::model::layers::{conv2d, conv2d_forward};
use crate::model::unet::{
    build_encoder, embed, project_text, text_fits, BlockText, DownBlock, MidBlock, ResolvedUNet,
    TimestepEmbedding, UNet2DConditionModel, UNetConfig,
};
use crate::FusedOps;

/// `config.json` of a diffusers `ControlNetModel`: its own keys, and the keys it shares
/// with the UNet's config (its encoder's layout), named as in the file.
#[derive(Debug, Clone, Deserialize)]
pub struct ControlNetConfig {
    /// Channels of the control image (3, RGB).
    #[serde(default = "three")]
    pub conditioning_channels: usize,
    /// Widths of the control image's embedding network; each step after the first halves
    /// the size, so `n` widths take the image to 1/2^(n-1) of its size (1/8: the latents').
    #[serde(default = "default_embedding_channels")]
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// `rgb` or `bgr`: the channel order the model was trained on.
    #[serde(default = "rgb")]
    pub controlnet_conditioning_channel_order: String,
    /// Whether every residual is averaged over its height and width (SD 1.5's shuffle
    /// model); only `false` is implemented.
    #[serde(default)]
    pub global_pool_conditions: bool,
    /// The encoder's layout, read with the UNet's config keys (`block_out_channels`,
    /// `transformer_layers_per_block`, …; a ControlNet's file has no up blocks or output
    /// channels, which are filled in so that the UNet's checks apply).
    #[serde(flatten, deserialize_with = "encoder_config")]
    pub encoder: UNetConfig,
}

fn three() -> usize {
    3
}
fn default_embedding_channels() -> Vec<usize> {
    vec![16, 32, 96, 256]
}
fn rgb() -> String {
    "rgb".into()
}

/// Reads the UNet keys of a ControlNet config, adding the decoder keys a ControlNet has
/// not (the up blocks mirroring the down blocks, as many output as input channels).
fn encoder_config<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<UNetConfig, D::Error> {
    let mut map = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
    if !map.contains_key("up_block_types") {
        let down = map
            .get("down_block_types")
            .and_then(|v| v.as_array())
            .ok_or_else(|| D::Error::missing_field("down_block_types"))?;
        let up: Vec<serde_json::Value> = down
            .iter()
            .rev()
            .map(|t| match t.as_str() {
                Some("CrossAttnDownBlock2D") => "CrossAttnUpBlock2D".into(),
                _ => "UpBlock2D".into(),
            })
            .collect();
        map.insert("up_block_types".into(), up.into());
    }
    if !map.contains_key("out_channels") {
        let input = map
            .get("in_channels")
            .cloned()
            .ok_or_else(|| D::Error::missing_field("in_channels"))?;
        map.insert("out_channels".into(), input);
    }
    serde_json::from_value(map.into()).map_err(D::Error::custom)
}

/// `ControlNetConditioningEmbedding`: the control image (`[N, 3, H, W]` in [0, 1]) to
/// `block_out_channels[0]` channels at the latents' size.
#[derive(Module, Debug)]
pub struct ConditioningEmbedding<B: FusedOps> {
    /// Image → first width.
    pub conv_in: Conv2d<B>,
    /// Pairs of a 3×3 convolution and a strided one that halves the size.
    pub blocks: Vec<Conv2d<B>>,
    /// Last width → the UNet's first block width.
    pub conv_out: Conv2d<B>,
}

impl<B: FusedOps> ConditioningEmbedding<B> {
    fn new(input: usize, widths: &[usize], output: usize, device: &B::Device) -> Self {
        let blocks = widths
            .windows(2)
            .flat_map(|w| {
                [
                    conv2d(w[0], w[0], 3, 1, 1, device),
                    conv2d(w[0], w[1], 3, 2, 1, device),
                ]
            })
            .collect();
        let last = widths[widths.len() - 1];
        Self {
            conv_in: conv2d(input, widths[0], 3, 1, 1, device),
            blocks,
            conv_out: conv2d(last, output, 3, 1, 1, device),
        }
    }

    /// `[N, 3, H, W]` → `[N, C, H/2^k, W/2^k]`: SiLU after every convolution but the last.
    pub fn forward(&self, image: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = silu(conv2d_forward(&self.conv_in, image));
        for block in &self.blocks {
            x = silu(conv2d_forward(block, x));
        }
        conv2d_forward(&self.conv_out, x)
    }
}

/// The text as one ControlNet's cross-attentions read it (its own key and value
/// projections), made once per run by [`ControlNetModel::prepare_context`].
#[derive(Debug, Clone)]
pub struct ControlNetContext<B: FusedOps> {
    rows: usize,
    down: Vec<BlockText<B>>,
    mid: BlockText<B>,
}

impl<B: FusedOps> ControlNetContext<B> {
    /// The batch rows it was prepared for.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// What a ControlNet adds to one UNet call: one residual per UNet skip connection (in the
/// order the UNet saves them) and one for the mid block's output, already scaled.
#[derive(Debug, Clone)]
pub struct ControlResiduals<B: FusedOps> {
    /// Diffusers' `down_block_res_samples`.
    pub down: Vec<Tensor<B, 4>>,
    /// Diffusers' `mid_block_res_sample`.
    pub mid: Tensor<B, 4>,
}

impl<B: FusedOps> ControlResiduals<B> {
    /// The sum of two ControlNets' residuals (diffusers' `MultiControlNetModel`).
    pub fn sum_with(self, other: Self) -> Result<Self> {
        if self.down.len() != other.down.len()
            || self.mid.dims() != other.mid.dims()
            || self
                .down
                .iter()
                .zip(&other.down)
                .any(|(a, b)| a.dims() != b.dims())
        {
            return Err(Error::invalid(
                "controlnets",
                "the ControlNets' residuals differ in count or shape (they were made for \
                 different UNets)",
            ));
        }
        Ok(Self {
            down: (self.down.into_iter().zip(other.down))
                .map(|(a, b)| a + b)
                .collect(),
            mid: self.mid + other.mid,
        })
    }
}

/// Why a ControlNet does not fit a UNet ([`ControlNetModel::check_fits`]): the first of
/// its tensors that does not, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Misfit {
    /// The ControlNet's tensor, by its weight name.
    pub tensor: String,
    /// What does not fit.
    pub message: String,
}

/// An SDXL ControlNet.
#[derive(Module, Debug)]
pub struct ControlNetModel<B: FusedOps> {
    /// Latents → first block width.
    pub conv_in: Conv2d<B>,
    /// Embeds the sinusoidal timestep.
    pub time_embedding: TimestepEmbedding<B>,
    /// Embeds pooled text plus micro-conditioning (`text_time`).
    pub add_embedding: TimestepEmbedding<B>,
    /// The control image → first block width, added to `conv_in`'s output.
    pub controlnet_cond_embedding: ConditioningEmbedding<B>,
    /// The encoder blocks (the UNet's kind).
    pub down_blocks: Vec<DownBlock<B>>,
    /// One 1×1 convolution per UNet skip connection.
    pub controlnet_down_blocks: Vec<Conv2d<B>>,
    /// The bottleneck.
    pub mid_block: MidBlock<B>,
    /// 1×1 convolution of the mid block's output.
    pub controlnet_mid_block: Conv2d<B>,
    #[module(skip)]
    config: ControlNetConfig,
    #[module(skip)]
    resolved: ResolvedUNet,
}

impl ControlNetConfig {
    /// Builds the model with lazy parameters; the loader fills them. Errors
    /// ([`Error::UnsupportedConfig`]) when the config asks for something not implemented.
    pub fn init<B: FusedOps>(&self, device: &B::Device) -> Result<ControlNetModel<B>> {
        let r = self.encoder.resolve()?;
        let bad = Error::UnsupportedConfig;
        let widths = &self.conditioning_embedding_out_channels;
        if widths.is_empty() || widths.contains(&0) {
            return Err(bad(
                "conditioning_embedding_out_channels must list positive widths".into(),
            ));
        }
        if !matches!(
            self.controlnet_conditioning_channel_order.as_str(),
            "rgb" | "bgr"
        ) {
            return Err(bad(format!(
                "controlnet_conditioning_channel_order `{}` (only `rgb` or `bgr`)",
                self.controlnet_conditioning_channel_order
            )));
        }
        if self.global_pool_conditions {
            return Err(bad("global_pool_conditions (only false)".into()));
        }
        let (_, encoder) = build_encoder(&r, device);
        let ch = &self.encoder.block_out_channels;
        let zero = |c: usize| conv2d(c, c, 1, 1, 0, device);
        let controlnet_down_blocks = skip_channels(&r).into_iter().map(zero).collect();
        Ok(ControlNetModel {
            conv_in: encoder.conv_in,
            time_embedding: encoder.time_embedding,
            add_embedding: encoder.add_embedding,
            controlnet_cond_embedding: ConditioningEmbedding::new(
                self.conditioning_channels,
                widths,
                ch[0],
                device,
            ),
            down_blocks: encoder.down_blocks,
            controlnet_down_blocks,
            mid_block: encoder.mid_block,
            controlnet_mid_block: zero(ch[ch.len() - 1]),
            config: self.clone(),
            resolved: r,
        })
    }
}

/// The channels of each skip connection a UNet of layout `r` saves, in order:
/// `conv_in`'s output, each down block's resnet (or transformer) outputs and its
/// downsampler's.
fn skip_channels(r: &ResolvedUNet) -> Vec<usize> {
    let ch = &r.config.block_out_channels;
    let mut out = vec![ch[0]];
    for (i, &c) in ch.iter().enumerate() {
        out.extend(std::iter::repeat_n(c, r.layers[i]));
        if i + 1 < ch.len() {
            out.push(c);
        }
    }
    out
}

impl<B: FusedOps> ControlNetModel<B> {
    /// The config the model was built from.
    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    /// The dtype of the parameters (what inputs are cast to).
    pub fn dtype(&self) -> DType {
        self.conv_in.weight.val().dtype()
    }

    /// Refuses a ControlNet whose residuals or inputs would not fit `unet`, naming the
    /// first of its tensors that does not fit.
    pub fn check_fits(&self, unet: &UNet2DConditionModel<B>) -> std::result::Result<(), Misfit> {
        let theirs = skip_channels(unet.resolved());
        let ours = skip_channels(&self.resolved);
        let tensor = |tensor: String, message: String| Misfit { tensor, message };
        if ours.len() != theirs.len() {
            return Err(tensor(
                format!(
                    "controlnet_down_blocks.{}.weight",
                    ours.len().min(theirs.len())
                ),
                format!(
                    "the ControlNet makes {} skip residuals, the UNet saves {} skip connections",
                    ours.len(),
                    theirs.len()
                ),
            ));
        }
        for (k, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            if a != b {
                return Err(tensor(
                    format!("controlnet_down_blocks.{k}.weight"),
                    format!("{a} channels, the UNet's skip connection {k} has {b}"),
                ));
            }
        }
        let (cn, un) = (&self.config.encoder, unet.config());
        if cn.in_channels != un.in_channels {
            return Err(tensor(
                "conv_in.weight".into(),
                format!(
                    "reads {} latent channels, the UNet {}",
                    cn.in_channels, un.in_channels
                ),
            ));
        }
        let (ours, theirs) = (&self.resolved, unet.resolved());
        if ours.cross_attention_dim != theirs.cross_attention_dim {
            return Err(tensor(
                "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight".into(),
                format!(
                    "cross_attention_dim {:?}, the UNet's is {:?}",
                    ours.cross_attention_dim, theirs.cross_attention_dim
                ),
            ));
        }
        if ours.add_embedding_in != theirs.add_embedding_in {
            return Err(tensor(
                "add_embedding.linear_1.weight".into(),
                format!(
                    "takes {} pooled text and micro-conditioning values, the UNet {}",
                    ours.add_embedding_in, theirs.add_embedding_in
                ),
            ));
        }
        Ok(())
    }

    /// Projects the text states `context` `[N, S, cross_attention_dim]` for this
    /// ControlNet's cross-attentions, once per run.
    pub fn prepare_context(&self, context: Tensor<B, 3>) -> Result<ControlNetContext<B>> {
        B::on_pool(|| {
            let [rows, _, width] = context.dims();
            let want = self.resolved.cross_attention_dim[0];
            if width != want {
                return Err(Error::invalid(
                    "encoder_hidden_states",
                    format!("{width} wide, the ControlNet takes {want}"),
                ));
            }
            let context = context.cast(self.dtype());
            Ok(ControlNetContext {
                rows,
                down: (self.down_blocks.iter())
                    .map(|b| project_text(&b.attentions, &context))
                    .collect(),
                mid: project_text(&self.mid_block.attentions, &context),
            })
        })
    }

    /// The control image's embedding alone (`controlnet_cond_embedding`), for checks.
    pub fn embed_condition(&self, image: Tensor<B, 4>) -> Tensor<B, 4> {
        B::on_pool(|| {
            let image = self.channel_order(image.cast(self.dtype()));
            self.controlnet_cond_embedding.forward(image)
        })
    }

    fn channel_order(&self, image: Tensor<B, 4>) -> Tensor<B, 4> {
        if self.config.controlnet_conditioning_channel_order == "bgr" {
            image.flip([1])
        } else {
            image
        }
    }

    /// One ControlNet call, with the UNet's inputs of this step (`sample`, `timesteps`,
    /// the text as [`prepare_context`](Self::prepare_context) projected it,
    /// `text_embeds`, `time_ids`: see
    /// [`UNet2DConditionModel::forward`]) and `image`, the control image
    /// `[N, conditioning_channels, 8h, 8w]` in [0, 1]: the residuals, times `scale`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        sample: Tensor<B, 4>,
        timesteps: &[f32],
        text: &ControlNetContext<B>,
        text_embeds: Tensor<B, 2>,
        time_ids: &[f32],
        image: Tensor<B, 4>,
        scale: f64,
    ) -> Result<ControlResiduals<B>> {
        B::on_pool(|| {
            let [n, c, h, w] = sample.dims();
            let [ni, ci, _, _] = image.dims();
            let dtype = self.dtype();
            let device = sample.device();
            if c != self.config.encoder.in_channels || timesteps.len() != n {
                return Err(Error::invalid(
                    "sample",
                    format!(
                        "[{n}, {c}, _, _] with {} timesteps; the ControlNet takes {} channels, \
                         one timestep per row",
                        timesteps.len(),
                        self.config.encoder.in_channels
                    ),
                ));
            }
            if ni != n || ci != self.config.conditioning_channels {
                return Err(Error::invalid(
                    "control_image",
                    format!(
                        "[{ni}, {ci}, _, _], the ControlNet takes [{n}, {}, _, _]",
                        self.config.conditioning_channels
                    ),
                ));
            }
            let fits = text.rows == n
                && text.down.len() == self.down_blocks.len()
                && (self.down_blocks.iter().zip(&text.down))
                    .all(|(b, t)| text_fits(&b.attentions, t))
                && text_fits(&self.mid_block.attentions, &text.mid);
            if !fits {
                return Err(Error::invalid(
                    "encoder_hidden_states",
                    "was not prepared by this ControlNet's prepare_context for these rows",
                ));
            }
            let emb = embed(
                &self.resolved,
                (&self.time_embedding, &self.add_embedding),
                timesteps,
                text_embeds,
                time_ids,
                dtype,
                &device,
            )?;
            let cond = self.embed_condition(image);
            if cond.dims() != [n, self.config.encoder.block_out_channels[0], h, w] {
                return Err(Error::invalid(
                    "control_image",
                    format!(
                        "embeds to {:?}, the latents are {h}x{w}: the control image must be \
                         the output size",
                        cond.dims()
                    ),
                ));
            }
            let mut x = conv2d_forward(&self.conv_in, sample.cast(dtype)) + cond;
            let mut skips = vec![x.clone()];
            for (block, text) in self.down_blocks.iter().zip(&text.down) {
                x = block.forward(x, &emb, text, None, &mut skips);
            }
            x = self.mid_block.forward(x, &emb, &text.mid, None);
            let down = (self.controlnet_down_blocks.iter().zip(skips))
                .map(|(zero, skip)| conv2d_forward(zero, skip) * scale)
                .collect();
            let mid = conv2d_forward(&self.controlnet_mid_block, x) * scale;
            Ok(ControlResiduals { down, mid })
        })
    }
}
