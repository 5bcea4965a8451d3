//! diffusers' `Attention` (models/attention_processor.py) with the default SDPA
//! processor, shared by the UNet's transformer blocks and the VAE's mid block.

use crate::FusedOps;
use burn::module::Module;
use burn::nn::{GroupNorm, Linear};
use burn::tensor::Tensor;

use crate::model::layers::{group_norm, group_norm_forward, linear, linear_forward};

/// Multi-head attention with separate q/k/v projections and an output projection.
/// `to_out` is a list because diffusers stores it as `to_out.0` (a Linear) followed
/// by a dropout.
#[derive(Module, Debug)]
pub struct Attention<B: FusedOps> {
    /// Optional GroupNorm on spatial input (the VAE's mid-block attention).
    pub group_norm: Option<GroupNorm<B>>,
    /// Query projection.
    pub to_q: Linear<B>,
    /// Key projection.
    pub to_k: Linear<B>,
    /// Value projection.
    pub to_v: Linear<B>,
    /// Output projection (`to_out.0`).
    pub to_out: Vec<Linear<B>>,
    heads: usize,
}

/// How to build an [`Attention`].
#[derive(Debug, Clone, Copy)]
pub struct AttentionConfig {
    /// Query (and output) width.
    pub query_dim: usize,
    /// Width of the context for cross-attention; `None` for self-attention.
    pub cross_attention_dim: Option<usize>,
    /// Number of heads.
    pub heads: usize,
    /// Width of one head.
    pub dim_head: usize,
    /// Whether q/k/v have biases (the VAE's do, the UNet's do not).
    pub qkv_bias: bool,
    /// GroupNorm (groups, eps) applied to spatial input first, as in the VAE.
    pub group_norm: Option<(usize, f64)>,
}

impl AttentionConfig {
    /// Builds the layer with uninitialised (lazy) parameters.
    pub fn init<B: FusedOps>(&self, device: &B::Device) -> Attention<B> {
        let inner = self.heads * self.dim_head;
        let ctx = self.cross_attention_dim.unwrap_or(self.query_dim);
        Attention {
            group_norm: self
                .group_norm
                .map(|(g, eps)| group_norm(g, self.query_dim, eps, device)),
            to_q: linear(self.query_dim, inner, self.qkv_bias, device),
            to_k: linear(ctx, inner, self.qkv_bias, device),
            to_v: linear(ctx, inner, self.qkv_bias, device),
            to_out: vec![linear(inner, self.query_dim, true, device)],
            heads: self.heads,
        }
    }
}

/// Splits `[N, L, H*D]` into heads `[N, H, L, D]`.
pub fn split_heads<B: FusedOps>(x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [n, l, c] = x.dims();
    x.reshape([n, l, heads, c / heads]).swap_dims(1, 2)
}

/// Merges heads `[N, H, L, D]` back into `[N, L, H*D]`.
pub fn merge_heads<B: FusedOps>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [n, h, l, d] = x.dims();
    x.swap_dims(1, 2).reshape([n, l, h * d])
}

/// Scaled dot-product attention over `[N, L, H*D]` inputs: non-causal (the UNet and VAE)
/// through [`FusedOps::fused_attention`], which never holds the full score matrix, causal
/// (CLIP, 77 tokens) through [`FusedOps::fused_causal_attention`].
pub fn sdpa<B: FusedOps>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    causal: bool,
) -> Tensor<B, 3> {
    let (q, k, v) = (
        split_heads(q, heads),
        split_heads(k, heads),
        split_heads(v, heads),
    );
    let out = if causal {
        B::fused_causal_attention(q, k, v)
    } else {
        B::fused_attention(q, k, v)
    };
    merge_heads(out)
}

/// One attention's keys and values, projected from its context ahead of the queries:
/// the UNet's cross-attention reads the same text at every denoising step, so the
/// pipeline projects it once per generation ([`Attention::project_kv`]).
#[derive(Debug, Clone)]
pub struct CrossKv<B: FusedOps> {
    /// `[N, S, H*D]` keys.
    pub key: Tensor<B, 3>,
    /// `[N, S, H*D]` values.
    pub value: Tensor<B, 3>,
}

impl<B: FusedOps> Attention<B> {
    /// Sequence attention: `x` `[N, L, C]`, `context` `[N, S, C_ctx]` (self-attention
    /// when `None`). Returns `[N, L, C]`.
    pub fn forward(&self, x: Tensor<B, 3>, context: Option<Tensor<B, 3>>) -> Tensor<B, 3> {
        let kv = self.project_kv(context.unwrap_or_else(|| x.clone()));
        self.forward_kv(x, &kv)
    }

    /// Projects `context` `[N, S, C_ctx]` to this attention's keys and values.
    pub fn project_kv(&self, context: Tensor<B, 3>) -> CrossKv<B> {
        CrossKv {
            key: linear_forward(&self.to_k, context.clone()),
            value: linear_forward(&self.to_v, context),
        }
    }

    /// Attention of `x` `[N, L, C]` over keys and values projected ahead
    /// ([`project_kv`](Self::project_kv)). Returns `[N, L, C]`.
    pub fn forward_kv(&self, x: Tensor<B, 3>, kv: &CrossKv<B>) -> Tensor<B, 3> {
        self.forward_kv_extra(x, kv, None)
    }

    /// [`forward_kv`](Self::forward_kv) that also attends to `extra` tokens' keys and
    /// values (`[N, S', H*D]`, projected by an adapter's own layers) and adds that
    /// attention, times its scale, to the first before the output projection: IP-Adapter's
    /// decoupled cross-attention. `None` is `forward_kv` exactly.
    pub fn forward_kv_extra(
        &self,
        x: Tensor<B, 3>,
        kv: &CrossKv<B>,
        extra: Option<(&CrossKv<B>, f64)>,
    ) -> Tensor<B, 3> {
        let q = linear_forward(&self.to_q, x);
        let out = match extra {
            None => sdpa(q, kv.key.clone(), kv.value.clone(), self.heads, false),
            Some((tokens, scale)) => {
                let text = sdpa(
                    q.clone(),
                    kv.key.clone(),
                    kv.value.clone(),
                    self.heads,
                    false,
                );
                let tokens = sdpa(
                    q,
                    tokens.key.clone(),
                    tokens.value.clone(),
                    self.heads,
                    false,
                );
                text + tokens.mul_scalar(scale)
            }
        };
        linear_forward(&self.to_out[0], out)
    }

    /// Width of the keys and values ([`CrossKv`]'s last dim).
    pub fn inner_dim(&self) -> usize {
        self.to_k.weight.dims()[1]
    }

    /// Spatial self-attention with residual, as the VAE's mid block uses it:
    /// `x` `[N, C, H, W]` → `[N, C, H, W]`.
    pub fn forward_spatial(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [n, c, h, w] = x.dims();
        let residual = x.clone();
        let x = match &self.group_norm {
            Some(norm) => group_norm_forward(norm, x),
            None => x,
        };
        let seq = x.reshape([n, c, h * w]).swap_dims(1, 2);
        let out = self.forward(seq, None);
        out.swap_dims(1, 2).reshape([n, c, h, w]) + residual
    }
}
