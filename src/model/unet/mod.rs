//! diffusers' `UNet2DConditionModel` for the SDXL family, built from `unet/config.json`
//! alone. Field paths equal diffusers' weight names (`down_blocks.1.attentions.0.…`).

mod blocks;
mod config;
mod embeddings;
mod extras;
mod transformer;

use crate::FusedOps;

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::GroupNorm;
use burn::tensor::{DType, Tensor};

pub use blocks::{BlockText, BlockTokens, DownBlock, MidBlock, UpBlock};
pub use config::{PerBlock, ResolvedUNet, UNetConfig};
pub use embeddings::{sinusoidal, TimestepEmbedding};
pub use extras::{ExtraTokens, UNetExtras};
pub use transformer::{
    BasicTransformerBlock, FeedForward, FeedForwardLayer, Geglu, Transformer2DModel,
};

pub(crate) use blocks::{project_text, text_fits, AttnSettings, BlockSettings};
use embeddings::host_tensor;

use crate::error::{Error, Result};
use crate::model::layers::{conv2d, conv2d_forward, group_norm, group_norm_silu};

/// The text conditioning as one UNet's cross-attentions read it: every cross-attention's
/// keys and values, projected once per generation by
/// [`prepare_context`](UNet2DConditionModel::prepare_context). The text is the same at
/// every denoising step, so projecting it per step (as diffusers does) repeats about
/// 104 GFLOP per guided full-size step: 3 % of a 512² step, 13 % of a 256² one.
#[derive(Debug, Clone)]
pub struct UNetContext<B: FusedOps> {
    rows: usize,
    down: Vec<BlockText<B>>,
    mid: BlockText<B>,
    up: Vec<BlockText<B>>,
}

impl<B: FusedOps> UNetContext<B> {
    /// Keys and values projected elsewhere (an adapter's own layers), laid out as
    /// [`prepare_context`](UNet2DConditionModel::prepare_context) lays them: per down
    /// block, the mid block, per up block; in each, per transformer, per transformer
    /// block. `rows` is their batch size. The UNet checks the layout when it reads them.
    pub fn from_blocks(
        rows: usize,
        down: Vec<BlockText<B>>,
        mid: BlockText<B>,
        up: Vec<BlockText<B>>,
    ) -> Self {
        Self {
            rows,
            down,
            mid,
            up,
        }
    }

    /// The batch rows it was prepared for.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// The SDXL denoising UNet.
#[derive(Module, Debug)]
pub struct UNet2DConditionModel<B: FusedOps> {
    /// Latents → first block width.
    pub conv_in: Conv2d<B>,
    /// Embeds the sinusoidal timestep.
    pub time_embedding: TimestepEmbedding<B>,
    /// Embeds pooled text plus micro-conditioning (`text_time`).
    pub add_embedding: TimestepEmbedding<B>,
    /// Encoder blocks.
    pub down_blocks: Vec<DownBlock<B>>,
    /// Bottleneck.
    pub mid_block: MidBlock<B>,
    /// Decoder blocks.
    pub up_blocks: Vec<UpBlock<B>>,
    /// Final normalisation.
    pub conv_norm_out: GroupNorm<B>,
    /// First block width → latents.
    pub conv_out: Conv2d<B>,
    resolved: ResolvedUNet,
}

impl UNetConfig {
    /// Builds the model with lazy (unmaterialised) parameters; the loader fills them.
    /// Errors ([`Error::UnsupportedConfig`]) when the config asks for something not
    /// implemented.
    pub fn init<B: FusedOps>(&self, device: &B::Device) -> Result<UNet2DConditionModel<B>> {
        let r = self.resolve()?;
        let config = self;
        let ch = &config.block_out_channels;
        let n = ch.len();
        let (s, encoder) = build_encoder(&r, device);
        let attn = |i: usize, depth: usize| AttnSettings {
            heads: r.heads[i],
            depth,
            cross_dim: r.cross_attention_dim[i],
        };
        let mut prev = ch[n - 1];
        let up_blocks = (0..n)
            .map(|i| {
                let d = n - 1 - i; // the down block this up block mirrors
                let out = ch[d];
                let skip_in = ch[d.saturating_sub(1)];
                let block = UpBlock::new(
                    &s,
                    prev,
                    skip_in,
                    out,
                    r.layers[d] + 1,
                    r.up_attn[i].then(|| attn(d, r.up_transformer_layers[i])),
                    i + 1 < n,
                    device,
                );
                prev = out;
                block
            })
            .collect();
        let kout = config.conv_out_kernel;
        Ok(UNet2DConditionModel {
            conv_in: encoder.conv_in,
            time_embedding: encoder.time_embedding,
            add_embedding: encoder.add_embedding,
            down_blocks: encoder.down_blocks,
            mid_block: encoder.mid_block,
            up_blocks,
            conv_norm_out: group_norm(config.norm_num_groups, ch[0], config.norm_eps, device),
            conv_out: conv2d(ch[0], config.out_channels, kout, 1, kout / 2, device),
            resolved: r,
        })
    }
}

impl<B: FusedOps> UNet2DConditionModel<B> {
    /// The config the model was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.resolved.config
    }

    /// The per-block settings resolved from the config when the model was built.
    pub fn resolved(&self) -> &ResolvedUNet {
        &self.resolved
    }

    /// The dtype of the parameters (what inputs are cast to).
    pub fn dtype(&self) -> DType {
        self.conv_in.weight.val().dtype()
    }

    /// Predicts noise.
    ///
    /// - `sample`: `[N, in_channels, h, w]` latents.
    /// - `timesteps`: one timestep per batch row (float, as Euler schedulers give them).
    /// - `context`: `[N, S, cross_attention_dim]` text states.
    /// - `text_embeds`: `[N, D]` pooled text projection.
    /// - `time_ids`: `N × 6` micro-conditioning numbers, row-major.
    ///
    /// Projects `context` for the cross-attentions on every call; a denoising loop
    /// prepares it once ([`prepare_context`](Self::prepare_context)) and calls
    /// [`forward_prepared`](Self::forward_prepared).
    pub fn forward(
        &self,
        sample: Tensor<B, 4>,
        timesteps: &[f32],
        context: Tensor<B, 3>,
        text_embeds: Tensor<B, 2>,
        time_ids: &[f32],
    ) -> Result<Tensor<B, 4>> {
        let text = self.prepare_context(context)?;
        self.forward_prepared(
            sample,
            timesteps,
            &text,
            text_embeds,
            time_ids,
            &UNetExtras::default(),
        )
    }

    /// Projects the text states `context` `[N, S, cross_attention_dim]` to every
    /// cross-attention's keys and values, for any number of
    /// [`forward_prepared`](Self::forward_prepared) calls on `N` rows.
    pub fn prepare_context(&self, context: Tensor<B, 3>) -> Result<UNetContext<B>> {
        B::on_pool(|| {
            let r = &self.resolved;
            let [cn, _, cd] = context.dims();
            if cd != r.cross_attention_dim[0] {
                return Err(Error::invalid(
                    "encoder_hidden_states",
                    format!(
                        "shape [{cn}, _, {cd}], the UNet takes [_, _, {}]",
                        r.cross_attention_dim[0]
                    ),
                ));
            }
            let context = context.cast(self.dtype());
            Ok(UNetContext {
                rows: cn,
                down: (self.down_blocks.iter())
                    .map(|b| project_text(&b.attentions, &context))
                    .collect(),
                mid: project_text(&self.mid_block.attentions, &context),
                up: (self.up_blocks.iter())
                    .map(|b| project_text(&b.attentions, &context))
                    .collect(),
            })
        })
    }

    /// Whether `text` was prepared by a UNet of this layout.
    fn fits(&self, text: &UNetContext<B>) -> bool {
        let down = self.down_blocks.iter().map(|b| &b.attentions);
        let up = self.up_blocks.iter().map(|b| &b.attentions);
        text.down.len() == self.down_blocks.len()
            && text.up.len() == self.up_blocks.len()
            && (down.zip(&text.down))
                .chain(std::iter::once((&self.mid_block.attentions, &text.mid)))
                .chain(up.zip(&text.up))
                .all(|(attentions, t)| text_fits(attentions, t))
    }

    /// Predicts noise as [`forward`](Self::forward) does, with the text prepared ahead
    /// by [`prepare_context`](Self::prepare_context) (for as many rows as `sample` has)
    /// and what adapters add to this call ([`UNetExtras`]; `UNetExtras::default()` for
    /// none).
    pub fn forward_prepared(
        &self,
        sample: Tensor<B, 4>,
        timesteps: &[f32],
        text: &UNetContext<B>,
        text_embeds: Tensor<B, 2>,
        time_ids: &[f32],
        extras: &UNetExtras<B>,
    ) -> Result<Tensor<B, 4>> {
        B::on_pool(|| {
            let [n, c, _, _] = sample.dims();
            let r = &self.resolved;
            let dtype = self.dtype();
            let device = sample.device();
            if c != r.config.in_channels {
                return Err(Error::invalid(
                    "sample",
                    format!("has {c} channels, the UNet takes {}", r.config.in_channels),
                ));
            }
            if timesteps.len() != n {
                return Err(Error::invalid(
                    "timesteps",
                    format!("{} timesteps for {n} batch rows", timesteps.len()),
                ));
            }
            if text.rows != n {
                return Err(Error::invalid(
                    "encoder_hidden_states",
                    format!(
                        "was prepared for {} rows, the sample has {n}: prepare it from the \
                         sample's rows",
                        text.rows
                    ),
                ));
            }
            if !self.fits(text) {
                return Err(Error::invalid(
                    "encoder_hidden_states",
                    "was prepared by a UNet of another layout: prepare it with this \
                     UNet's prepare_context",
                ));
            }
            let tokens = extras.tokens.as_ref();
            if let Some(tokens) = tokens {
                if tokens.kv.rows != n || !self.fits(&tokens.kv) {
                    return Err(Error::invalid(
                        "image_tokens",
                        format!(
                            "were projected for {} rows or another layout; the UNet needs one \
                             key and value per cross-attention, as wide as its own, for {n} rows",
                            tokens.kv.rows
                        ),
                    ));
                }
            }
            let emb = embed(
                r,
                (&self.time_embedding, &self.add_embedding),
                timesteps,
                text_embeds,
                time_ids,
                dtype,
                &device,
            )?;
            let sample = sample.cast(dtype);
            let mut x = conv2d_forward(&self.conv_in, sample);
            let mut skips = vec![x.clone()];
            for (i, (block, text)) in self.down_blocks.iter().zip(&text.down).enumerate() {
                let tokens = tokens.map(|t| (&t.kv.down[i], t.scale));
                x = block.forward(x, &emb, text, tokens, &mut skips);
            }
            if let Some(residuals) = &extras.down_residuals {
                skips = add_residuals(skips, residuals, dtype)?;
            }
            let mid_tokens = tokens.map(|t| (&t.kv.mid, t.scale));
            x = self.mid_block.forward(x, &emb, &text.mid, mid_tokens);
            if let Some(residual) = &extras.mid_residual {
                x = add_residual(
                    x,
                    residual,
                    dtype,
                    "mid_block_additional_residual",
                    "the residual",
                )?;
            }
            for (i, (block, text)) in self.up_blocks.iter().zip(&text.up).enumerate() {
                let tokens = tokens.map(|t| (&t.kv.up[i], t.scale));
                x = block.forward(x, &emb, text, tokens, &mut skips);
            }
            let x = group_norm_silu(&self.conv_norm_out, x);
            Ok(conv2d_forward(&self.conv_out, x))
        })
    }
}

/// `x + residual` (in the model's dtype), refusing a residual of another shape; `what`
/// names it in the error.
fn add_residual<B: FusedOps>(
    x: Tensor<B, 4>,
    residual: &Tensor<B, 4>,
    dtype: DType,
    name: &'static str,
    what: &str,
) -> Result<Tensor<B, 4>> {
    if residual.dims() != x.dims() {
        return Err(Error::invalid(
            name,
            format!(
                "{what} has shape {:?}, the UNet adds it to a tensor of shape {:?}",
                residual.dims(),
                x.dims()
            ),
        ));
    }
    Ok(x + residual.clone().cast(dtype))
}

/// Every skip plus its residual (ControlNet's `down_block_additional_residuals`).
fn add_residuals<B: FusedOps>(
    skips: Vec<Tensor<B, 4>>,
    residuals: &[Tensor<B, 4>],
    dtype: DType,
) -> Result<Vec<Tensor<B, 4>>> {
    const NAME: &str = "down_block_additional_residuals";
    if residuals.len() != skips.len() {
        return Err(Error::invalid(
            NAME,
            format!(
                "{} residuals, the UNet saves {} skip connections (one residual each)",
                residuals.len(),
                skips.len()
            ),
        ));
    }
    skips
        .into_iter()
        .zip(residuals)
        .enumerate()
        .map(|(k, (skip, r))| add_residual(skip, r, dtype, NAME, &format!("residual {k}")))
        .collect()
}

/// The encoder half of a UNet: what a ControlNet copies (diffusers'
/// `ControlNetModel.from_unet`), built here once for both.
pub(crate) struct Encoder<B: FusedOps> {
    pub conv_in: Conv2d<B>,
    pub time_embedding: TimestepEmbedding<B>,
    pub add_embedding: TimestepEmbedding<B>,
    pub down_blocks: Vec<DownBlock<B>>,
    pub mid_block: MidBlock<B>,
}

/// Builds the encoder half of the network `r` describes (conv_in, the time and
/// micro-conditioning embeddings, the down blocks, the mid block), with the block
/// settings the up path reuses.
pub(crate) fn build_encoder<B: FusedOps>(
    r: &ResolvedUNet,
    device: &B::Device,
) -> (BlockSettings, Encoder<B>) {
    let config = &r.config;
    let ch = &config.block_out_channels;
    let n = ch.len();
    let s = BlockSettings {
        temb: r.time_embed_dim,
        groups: config.norm_num_groups,
        eps: config.norm_eps,
        resnet_scale: config.resnet_out_scale_factor,
    };
    let attn = |i: usize, depth: usize| AttnSettings {
        heads: r.heads[i],
        depth,
        cross_dim: r.cross_attention_dim[i],
    };
    let down_blocks = (0..n)
        .map(|i| {
            DownBlock::new(
                &s,
                if i == 0 { ch[0] } else { ch[i - 1] },
                ch[i],
                r.layers[i],
                r.down_attn[i].then(|| attn(i, r.transformer_layers[i])),
                (i + 1 < n).then_some(config.downsample_padding),
                device,
            )
        })
        .collect();
    let mid_block = MidBlock::new(
        &s,
        ch[n - 1],
        config.mid_block_scale_factor,
        attn(n - 1, r.transformer_layers[n - 1]),
        device,
    );
    let kin = config.conv_in_kernel;
    let encoder = Encoder {
        conv_in: conv2d(config.in_channels, ch[0], kin, 1, kin / 2, device),
        time_embedding: TimestepEmbedding::new(ch[0], r.time_embed_dim, device),
        add_embedding: TimestepEmbedding::new(r.add_embedding_in, r.time_embed_dim, device),
        down_blocks,
        mid_block,
    };
    (s, encoder)
}

/// The embedding every resnet reads: the sinusoidal timestep through `time_embedding`
/// plus pooled text and micro-conditioning through `add_embedding` (SDXL's
/// `text_time`), for `timesteps.len()` rows. Refuses inputs of the wrong count or width.
pub(crate) fn embed<B: FusedOps>(
    r: &ResolvedUNet,
    (time_embedding, add_embedding): (&TimestepEmbedding<B>, &TimestepEmbedding<B>),
    timesteps: &[f32],
    text_embeds: Tensor<B, 2>,
    time_ids: &[f32],
    dtype: DType,
    device: &B::Device,
) -> Result<Tensor<B, 2>> {
    let cfg = &r.config;
    let n = timesteps.len();
    let [tn, td] = text_embeds.dims();
    if time_ids.len() != n * 6 || tn != n {
        return Err(Error::invalid(
            "timesteps",
            format!(
                "need one timestep, one text_embeds row and six time ids per batch row \
                 ({tn} rows; got {n} timesteps and {} time ids)",
                time_ids.len()
            ),
        ));
    }
    let want = r.add_embedding_in - 6 * r.addition_time_embed_dim;
    if td != want {
        return Err(Error::invalid(
            "text_embeds",
            format!("shape [{tn}, {td}], the model takes [{n}, {want}]"),
        ));
    }
    let ch0 = cfg.block_out_channels[0];
    let t_emb = sinusoidal(timesteps, ch0, cfg.flip_sin_to_cos, cfg.freq_shift);
    let t_emb = host_tensor::<B>(t_emb, n, ch0, dtype, device);
    let emb = time_embedding.forward(t_emb);
    let ad = r.addition_time_embed_dim;
    let time_emb = sinusoidal(time_ids, ad, cfg.flip_sin_to_cos, cfg.freq_shift);
    let time_emb = host_tensor::<B>(time_emb, n, 6 * ad, dtype, device);
    let add_in = Tensor::cat(vec![text_embeds.cast(dtype), time_emb], 1);
    Ok(emb + add_embedding.forward(add_in))
}
