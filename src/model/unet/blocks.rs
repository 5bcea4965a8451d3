//! Down, mid and up blocks of the UNet (`down_blocks.N`, `mid_block`, `up_blocks.N`).

use crate::FusedOps;
use burn::module::Module;
use burn::tensor::Tensor;

use super::transformer::Transformer2DModel;
use crate::model::attention::CrossKv;
use crate::model::downsampling::Downsample2D;
use crate::model::layers::conv2d_forward;
use crate::model::resnet::{ResnetBlock2D, ResnetConfig};
use crate::model::upsampling::Upsample2D;

/// The text as one block's transformers read it: per transformer, per transformer
/// block, the cross-attention's keys and values ([`Transformer2DModel::project_context`]).
pub type BlockText<B> = Vec<Vec<CrossKv<B>>>;

/// Projects `context` for each of a block's `attentions`.
pub(crate) fn project_text<B: FusedOps>(
    attentions: &[Transformer2DModel<B>],
    context: &Tensor<B, 3>,
) -> BlockText<B> {
    attentions
        .iter()
        .map(|a| a.project_context(context))
        .collect()
}

/// Whether `text` was projected for exactly these `attentions`.
pub(crate) fn text_fits<B: FusedOps>(
    attentions: &[Transformer2DModel<B>],
    text: &BlockText<B>,
) -> bool {
    text.len() == attentions.len() && attentions.iter().zip(text).all(|(a, t)| a.fits(t))
}

/// Transformer `j`'s share of `text` (checked to fit before the forward pass).
fn text_at<B: FusedOps>(text: &BlockText<B>, j: usize) -> &[CrossKv<B>] {
    text.get(j).map_or(&[], Vec::as_slice)
}

/// Extra cross-attention tokens for one block (IP-Adapter's, laid out as [`BlockText`])
/// and the scale of their attention.
pub type BlockTokens<'a, B> = Option<(&'a BlockText<B>, f64)>;

/// Transformer `j`'s share of the extra tokens, with their scale.
fn tokens_at<'a, B: FusedOps>(
    tokens: BlockTokens<'a, B>,
    j: usize,
) -> Option<(&'a [CrossKv<B>], f64)> {
    tokens.map(|(t, scale)| (text_at(t, j), scale))
}

/// Shared settings for building blocks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockSettings {
    pub temb: usize,
    pub groups: usize,
    pub eps: f64,
    pub resnet_scale: f64,
}

impl BlockSettings {
    fn resnet<B: FusedOps>(
        &self,
        i: usize,
        o: usize,
        scale: f64,
        device: &B::Device,
    ) -> ResnetBlock2D<B> {
        ResnetConfig {
            in_channels: i,
            out_channels: o,
            temb_channels: Some(self.temb),
            groups: self.groups,
            eps: self.eps,
            output_scale_factor: scale,
        }
        .init(device)
    }
}

impl BlockSettings {
    /// One transformer per resnet when the block has attention, none otherwise.
    fn transformers<B: FusedOps>(
        &self,
        attn: Option<AttnSettings>,
        layers: usize,
        channels: usize,
        device: &B::Device,
    ) -> Vec<Transformer2DModel<B>> {
        attn.map(|a| {
            (0..layers)
                .map(|_| {
                    Transformer2DModel::new(
                        channels,
                        a.heads,
                        a.depth,
                        a.cross_dim,
                        self.groups,
                        self.eps,
                        device,
                    )
                })
                .collect()
        })
        .unwrap_or_default()
    }
}

/// Attention settings of one block: heads, transformer depth, context width.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnSettings {
    pub heads: usize,
    pub depth: usize,
    pub cross_dim: usize,
}

/// `DownBlock2D` or `CrossAttnDownBlock2D` (the latter has `attentions`).
#[derive(Module, Debug)]
pub struct DownBlock<B: FusedOps> {
    /// Residual blocks.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// One transformer after each resnet (empty for `DownBlock2D`).
    pub attentions: Vec<Transformer2DModel<B>>,
    /// The strided convolution ending the block (absent on the last block).
    pub downsamplers: Vec<Downsample2D<B>>,
}

impl<B: FusedOps> DownBlock<B> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        s: &BlockSettings,
        input: usize,
        output: usize,
        layers: usize,
        attn: Option<AttnSettings>,
        downsample: Option<usize>,
        device: &B::Device,
    ) -> Self {
        Self {
            resnets: (0..layers)
                .map(|j| {
                    s.resnet(
                        if j == 0 { input } else { output },
                        output,
                        s.resnet_scale,
                        device,
                    )
                })
                .collect(),
            attentions: s.transformers(attn, layers, output, device),
            downsamplers: downsample
                .map(|pad| vec![Downsample2D::new(output, pad, device)])
                .unwrap_or_default(),
        }
    }

    /// Runs the block, pushing every intermediate onto `skips` for the up path.
    pub fn forward(
        &self,
        mut x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        text: &BlockText<B>,
        tokens: BlockTokens<'_, B>,
        skips: &mut Vec<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        for (j, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(x, Some(temb.clone()));
            if let Some(attn) = self.attentions.get(j) {
                x = attn.forward(x, text_at(text, j), tokens_at(tokens, j));
            }
            skips.push(x.clone());
        }
        for down in &self.downsamplers {
            x = conv2d_forward(&down.conv, x);
            skips.push(x.clone());
        }
        x
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, transformer, resnet.
#[derive(Module, Debug)]
pub struct MidBlock<B: FusedOps> {
    /// The two residual blocks.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// The transformer between them.
    pub attentions: Vec<Transformer2DModel<B>>,
}

impl<B: FusedOps> MidBlock<B> {
    pub(crate) fn new(
        s: &BlockSettings,
        channels: usize,
        scale: f64,
        attn: AttnSettings,
        device: &B::Device,
    ) -> Self {
        Self {
            resnets: (0..2)
                .map(|_| s.resnet(channels, channels, scale, device))
                .collect(),
            attentions: vec![Transformer2DModel::new(
                channels,
                attn.heads,
                attn.depth,
                attn.cross_dim,
                s.groups,
                s.eps,
                device,
            )],
        }
    }

    /// Runs the block.
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        text: &BlockText<B>,
        tokens: BlockTokens<'_, B>,
    ) -> Tensor<B, 4> {
        let mut x = self.resnets[0].forward(x, Some(temb.clone()));
        for (j, (attn, resnet)) in self.attentions.iter().zip(&self.resnets[1..]).enumerate() {
            x = attn.forward(x, text_at(text, j), tokens_at(tokens, j));
            x = resnet.forward(x, Some(temb.clone()));
        }
        x
    }
}

/// `UpBlock2D` or `CrossAttnUpBlock2D`.
#[derive(Module, Debug)]
pub struct UpBlock<B: FusedOps> {
    /// Residual blocks, each fed the previous output concatenated with a skip.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// One transformer after each resnet (empty for `UpBlock2D`).
    pub attentions: Vec<Transformer2DModel<B>>,
    /// Upsampling ending the block (absent on the last block).
    pub upsamplers: Vec<Upsample2D<B>>,
}

impl<B: FusedOps> UpBlock<B> {
    /// `prev`: channels coming from below; `skip_in`: channels of the matching down
    /// block's input; `output`: this block's width.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        s: &BlockSettings,
        prev: usize,
        skip_in: usize,
        output: usize,
        layers: usize,
        attn: Option<AttnSettings>,
        upsample: bool,
        device: &B::Device,
    ) -> Self {
        Self {
            resnets: (0..layers)
                .map(|j| {
                    let skip = if j == layers - 1 { skip_in } else { output };
                    let from = if j == 0 { prev } else { output };
                    s.resnet(from + skip, output, s.resnet_scale, device)
                })
                .collect(),
            attentions: s.transformers(attn, layers, output, device),
            upsamplers: if upsample {
                vec![Upsample2D::new(output, device)]
            } else {
                Vec::new()
            },
        }
    }

    /// Runs the block, consuming skips from the end of `skips`.
    pub fn forward(
        &self,
        mut x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        text: &BlockText<B>,
        tokens: BlockTokens<'_, B>,
        skips: &mut Vec<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        for (j, resnet) in self.resnets.iter().enumerate() {
            // The model is built so that every up resnet has a skip to consume.
            let skip = skips
                .pop()
                .expect("UNet skip stack matches the block layout");
            x = resnet.forward(Tensor::cat(vec![x, skip], 1), Some(temb.clone()));
            if let Some(attn) = self.attentions.get(j) {
                x = attn.forward(x, text_at(text, j), tokens_at(tokens, j));
            }
        }
        if let Some(up) = self.upsamplers.first() {
            // Upsample to the size of the skip the next block consumes first, as diffusers
            // does when the latent size is not a multiple of the downsampling factor.
            let [_, _, h, w] = x.dims();
            let size = skips
                .last()
                .map(|s| {
                    let [_, _, sh, sw] = s.dims();
                    [sh, sw]
                })
                .unwrap_or([h * 2, w * 2]);
            x = up.forward(x, Some(size));
        }
        x
    }
}
