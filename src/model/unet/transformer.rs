//! `Transformer2DModel` with linear projections and its `BasicTransformerBlock`s
//! (self-attention, cross-attention to the text, GEGLU feed-forward).

use crate::FusedOps;
use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, GroupNorm, Linear};
use burn::tensor::Tensor;

use crate::model::attention::{Attention, AttentionConfig, CrossKv};
use crate::model::layers::{
    group_norm, group_norm_forward, layer_norm, linear, linear_forward, LayerNorm,
};

/// `GEGLU`: one projection to twice the width, the second half gating the first
/// through exact GELU.
#[derive(Module, Debug)]
pub struct Geglu<B: FusedOps> {
    /// Projection to `2 × inner`.
    pub proj: Linear<B>,
}

impl<B: FusedOps> Geglu<B> {
    /// `[N, L, dim]` → `[N, L, inner]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        B::fused_geglu(linear_forward(&self.proj, x))
    }
}

/// One entry of `ff.net`: diffusers stores `[GEGLU, Dropout, Linear]` as a
/// `ModuleList`, so an enum keeps the indices (and so the weight names) identical.
#[derive(Module, Debug)]
pub enum FeedForwardLayer<B: FusedOps> {
    /// `net.0`.
    Geglu(Geglu<B>),
    /// `net.1` (no weights; identity at inference).
    Dropout(Dropout),
    /// `net.2`.
    Linear(Linear<B>),
}

impl<B: FusedOps> FeedForwardLayer<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            FeedForwardLayer::Geglu(g) => g.forward(x),
            FeedForwardLayer::Dropout(_) => x,
            FeedForwardLayer::Linear(l) => linear_forward(l, x),
        }
    }
}

/// diffusers' `FeedForward` with GEGLU.
#[derive(Module, Debug)]
pub struct FeedForward<B: FusedOps> {
    /// `ff.net.{0,1,2}`.
    pub net: Vec<FeedForwardLayer<B>>,
}

impl<B: FusedOps> FeedForward<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.net.iter().fold(x, |x, layer| layer.forward(x))
    }
}

/// diffusers' `BasicTransformerBlock` as configured for SDXL.
#[derive(Module, Debug)]
pub struct BasicTransformerBlock<B: FusedOps> {
    /// Norm before self-attention.
    pub norm1: LayerNorm<B>,
    /// Self-attention.
    pub attn1: Attention<B>,
    /// Norm before cross-attention.
    pub norm2: LayerNorm<B>,
    /// Cross-attention to the text embeddings.
    pub attn2: Attention<B>,
    /// Norm before the feed-forward.
    pub norm3: LayerNorm<B>,
    /// GEGLU feed-forward.
    pub ff: FeedForward<B>,
}

impl<B: FusedOps> BasicTransformerBlock<B> {
    fn new(dim: usize, heads: usize, cross_dim: usize, eps: f64, device: &B::Device) -> Self {
        let head_dim = dim / heads;
        let attn = |cross| AttentionConfig {
            query_dim: dim,
            cross_attention_dim: cross,
            heads,
            dim_head: head_dim,
            qkv_bias: false,
            group_norm: None,
        };
        let inner = dim * 4;
        Self {
            norm1: layer_norm(dim, eps, device),
            attn1: attn(None).init(device),
            norm2: layer_norm(dim, eps, device),
            attn2: attn(Some(cross_dim)).init(device),
            norm3: layer_norm(dim, eps, device),
            ff: FeedForward {
                net: vec![
                    FeedForwardLayer::Geglu(Geglu {
                        proj: linear(dim, inner * 2, true, device),
                    }),
                    FeedForwardLayer::Dropout(DropoutConfig::new(0.0).init()),
                    FeedForwardLayer::Linear(linear(inner, dim, true, device)),
                ],
            },
        }
    }

    /// `x` `[N, L, C]` with the text's keys and values for `attn2`
    /// ([`Attention::project_kv`] of the context), and extra tokens' with their scale
    /// ([`Attention::forward_kv_extra`]).
    fn forward(
        &self,
        x: Tensor<B, 3>,
        text: &CrossKv<B>,
        extra: Option<(&CrossKv<B>, f64)>,
    ) -> Tensor<B, 3> {
        let x = self.attn1.forward(self.norm1.forward(x.clone()), None) + x;
        let x = self
            .attn2
            .forward_kv_extra(self.norm2.forward(x.clone()), text, extra)
            + x;
        self.ff.forward(self.norm3.forward(x.clone())) + x
    }
}

/// `Transformer2DModel` with `use_linear_projection = true`.
#[derive(Module, Debug)]
pub struct Transformer2DModel<B: FusedOps> {
    /// GroupNorm on the spatial input.
    pub norm: GroupNorm<B>,
    /// Channels → inner width.
    pub proj_in: Linear<B>,
    /// The transformer blocks.
    pub transformer_blocks: Vec<BasicTransformerBlock<B>>,
    /// Inner width → channels.
    pub proj_out: Linear<B>,
}

impl<B: FusedOps> Transformer2DModel<B> {
    /// `channels` split into `heads`; `depth` blocks attending to a `cross_dim`-wide context.
    pub fn new(
        channels: usize,
        heads: usize,
        depth: usize,
        cross_dim: usize,
        groups: usize,
        eps: f64,
        device: &B::Device,
    ) -> Self {
        Self {
            // diffusers fixes this GroupNorm's epsilon at 1e-6 whatever norm_eps says.
            norm: group_norm(groups, channels, 1e-6, device),
            proj_in: linear(channels, channels, true, device),
            transformer_blocks: (0..depth)
                .map(|_| BasicTransformerBlock::new(channels, heads, cross_dim, eps, device))
                .collect(),
            proj_out: linear(channels, channels, true, device),
        }
    }

    /// The text `context` `[N, S, cross_dim]` as each transformer block's
    /// cross-attention reads it: one [`CrossKv`] per block, in order.
    pub fn project_context(&self, context: &Tensor<B, 3>) -> Vec<CrossKv<B>> {
        self.transformer_blocks
            .iter()
            .map(|block| block.attn2.project_kv(context.clone()))
            .collect()
    }

    /// Whether `text` fits this model: one [`CrossKv`] per transformer block, as wide as
    /// its cross-attention.
    pub fn fits(&self, text: &[CrossKv<B>]) -> bool {
        text.len() == self.transformer_blocks.len()
            && self
                .transformer_blocks
                .iter()
                .zip(text)
                .all(|(block, kv)| kv.key.dims()[2] == block.attn2.inner_dim())
    }

    /// `x` `[N, C, H, W]` with the text projected for its blocks
    /// ([`project_context`](Self::project_context)) and, when given, extra tokens
    /// projected for them with their scale (IP-Adapter) → `[N, C, H, W]`.
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        text: &[CrossKv<B>],
        extra: Option<(&[CrossKv<B>], f64)>,
    ) -> Tensor<B, 4> {
        let [n, c, h, w] = x.dims();
        let residual = x.clone();
        let x = group_norm_forward(&self.norm, x);
        let mut seq = linear_forward(&self.proj_in, x.reshape([n, c, h * w]).swap_dims(1, 2));
        for (j, (block, kv)) in self.transformer_blocks.iter().zip(text).enumerate() {
            let extra = extra.and_then(|(kvs, scale)| kvs.get(j).map(|kv| (kv, scale)));
            seq = block.forward(seq, kv, extra);
        }
        let out = linear_forward(&self.proj_out, seq);
        out.swap_dims(1, 2).reshape([n, c, h, w]) + residual
    }
}
