//! IP-Adapter (image prompts): the image projection (diffusers' `ImageProjection` for the
//! base adapter, `IPAdapterPlusImageProjection`, the Resampler, for Plus) and the
//! decoupled cross-attention's per-layer `to_k_ip` / `to_v_ip`.
//!
//! Field paths equal the original weight names users download (`image_proj.proj.weight`,
//! `image_proj.layers.0.0.to_kv.weight`, `ip_adapter.1.to_k_ip.weight`). `ip_adapter.N`
//! numbers every attention of the UNet in diffusers' `attn_processors` order (down
//! blocks, up blocks, then the mid block; self- then cross-attention in each transformer
//! block): only the odd N, the cross-attentions, carry weights.

use burn::module::{Initializer, Module, Param};
use burn::nn::Gelu;
use burn::tensor::Tensor;

use crate::error::{Error, Result};
use crate::model::attention::sdpa;
use crate::model::attention::CrossKv;
use crate::model::layers::{layer_norm, LayerNorm};
use crate::model::linear::Linear;
use crate::model::unet::{BlockText, UNet2DConditionModel, UNetContext};
use crate::FusedOps;

/// Epsilon of the projections' LayerNorms (PyTorch's default, which diffusers keeps).
const EPS: f64 = 1e-5;
/// Width of one head of the Resampler's attention (fixed by diffusers' conversion).
const RESAMPLER_DIM_HEAD: usize = 64;

/// How an adapter projects the image encoder's output to tokens, with every width read
/// from the weights ([`IpAdapterConfig::from_tensors`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageProjConfig {
    /// The base adapter: `LayerNorm(reshape(Linear(image_embeds), [tokens, width]))`.
    Base {
        /// Width of the image embedding (the encoder's `projection_dim`).
        embed_dim: usize,
        /// Tokens per image.
        tokens: usize,
        /// Width of each token.
        width: usize,
    },
    /// IP-Adapter Plus's Resampler over the encoder's penultimate hidden states.
    Plus {
        /// Width of the hidden states it reads (the encoder's `hidden_size`).
        input_dim: usize,
        /// Learned queries (tokens per image).
        queries: usize,
        /// Width of the queries.
        hidden_dim: usize,
        /// Resampler blocks.
        depth: usize,
        /// Attention heads.
        heads: usize,
        /// Width of the feed-forward's inner layer.
        ff_inner: usize,
        /// Width of each output token.
        width: usize,
    },
}

/// An IP-Adapter's layout, read from its tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpAdapterConfig {
    /// The image projection.
    pub image_proj: ImageProjConfig,
    /// Per attention processor index N: `Some(inner)` (the key/value width) where the file
    /// has `ip_adapter.N.to_k_ip`, `None` otherwise.
    pub layers: Vec<Option<usize>>,
}

/// `to_k_ip` / `to_v_ip` of one cross-attention.
#[derive(Module, Debug)]
pub struct IpAttention<B: FusedOps> {
    /// Keys of the image tokens (no bias).
    pub to_k_ip: Linear<B>,
    /// Values of the image tokens (no bias).
    pub to_v_ip: Linear<B>,
}

/// diffusers' `ImageProjection`.
#[derive(Module, Debug)]
pub struct ImageProjection<B: FusedOps> {
    /// `embed_dim → tokens × width`.
    pub proj: Linear<B>,
    /// Norm of each token.
    pub norm: LayerNorm<B>,
}

/// The Resampler's attention: queries from the latents, keys and values from the image
/// features and the latents together (`to_kv` rows are `[k; v]`), no biases.
#[derive(Module, Debug)]
pub struct PerceiverAttention<B: FusedOps> {
    /// Norm of the image features.
    pub norm1: LayerNorm<B>,
    /// Norm of the latents.
    pub norm2: LayerNorm<B>,
    /// Queries.
    pub to_q: Linear<B>,
    /// Keys and values.
    pub to_kv: Linear<B>,
    /// Output projection.
    pub to_out: Linear<B>,
    heads: usize,
}

/// One entry of the Resampler's feed-forward (`layers.i.1.{0,1,2,3}`): an enum keeps
/// the original indices.
#[derive(Module, Debug)]
pub enum FeedForwardPart<B: FusedOps> {
    /// `.0`.
    Norm(LayerNorm<B>),
    /// `.1` and `.3` (no bias).
    Linear(Linear<B>),
    /// `.2` (exact GELU).
    Gelu(Gelu),
}

/// One entry of a Resampler block (`layers.i.{0,1}`).
// One value per adapter or block: the size difference costs nothing, and Burn's
// derive needs the variants inline to keep the weight names.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum ResamplerPart<B: FusedOps> {
    /// `.0`.
    Attention(PerceiverAttention<B>),
    /// `.1`.
    FeedForward(Vec<FeedForwardPart<B>>),
}

/// diffusers' `IPAdapterPlusImageProjection` in the original layout.
#[derive(Module, Debug)]
pub struct Resampler<B: FusedOps> {
    /// `[1, queries, hidden_dim]`.
    pub latents: Param<Tensor<B, 3>>,
    /// `input_dim → hidden_dim`.
    pub proj_in: Linear<B>,
    /// Attention and feed-forward per block.
    pub layers: Vec<Vec<ResamplerPart<B>>>,
    /// `hidden_dim → width`.
    pub proj_out: Linear<B>,
    /// Norm of each output token.
    pub norm_out: LayerNorm<B>,
}

/// The image projection of either kind.
// One value per adapter or block: the size difference costs nothing, and Burn's
// derive needs the variants inline to keep the weight names.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum ImageProj<B: FusedOps> {
    /// The base adapter's.
    Base(ImageProjection<B>),
    /// Plus's Resampler.
    Plus(Resampler<B>),
}

/// An IP-Adapter's weights.
#[derive(Module, Debug)]
pub struct IpAdapter<B: FusedOps> {
    /// Image features → tokens.
    pub image_proj: ImageProj<B>,
    /// Per attention processor index: the cross-attentions' key and value layers.
    pub ip_adapter: Vec<Option<IpAttention<B>>>,
    #[module(skip)]
    config: IpAdapterConfig,
}

/// The shape of `name` among `tensors`.
fn shape<'a>(tensors: &'a [(String, Vec<usize>)], name: &str) -> Result<&'a [usize]> {
    tensors
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, s)| s.as_slice())
        .ok_or_else(|| Error::UnsupportedConfig(format!("no tensor `{name}`")))
}

/// The shape of `name`, which must have `D` dimensions.
fn dims<const D: usize>(tensors: &[(String, Vec<usize>)], name: &str) -> Result<[usize; D]> {
    let s = shape(tensors, name)?;
    s.try_into().map_err(|_| {
        Error::UnsupportedConfig(format!("`{name}` has shape {s:?}, expected {D} dimensions"))
    })
}

impl IpAdapterConfig {
    /// Reads the layout from a file's tensor names and shapes (`image_proj.*`,
    /// `ip_adapter.N.*`), as diffusers' `load_ip_adapter` infers it.
    pub fn from_tensors(tensors: &[(String, Vec<usize>)]) -> Result<Self> {
        let unsupported = Error::UnsupportedConfig;
        let image_proj = if shape(tensors, "image_proj.latents").is_ok() {
            let [_, queries, hidden_dim] = dims(tensors, "image_proj.latents")?;
            let [_, input_dim] = dims(tensors, "image_proj.proj_in.weight")?;
            let [width, _] = dims(tensors, "image_proj.proj_out.weight")?;
            let [q, _] = dims(tensors, "image_proj.layers.0.0.to_q.weight")?;
            let [ff_inner, _] = dims(tensors, "image_proj.layers.0.1.1.weight")?;
            let depth = (0..)
                .take_while(|i| {
                    shape(tensors, &format!("image_proj.layers.{i}.0.to_q.weight")).is_ok()
                })
                .count();
            if q % RESAMPLER_DIM_HEAD != 0 {
                return Err(unsupported(format!(
                    "image_proj.layers.0.0.to_q has {q} rows, not a multiple of the head width {RESAMPLER_DIM_HEAD}"
                )));
            }
            ImageProjConfig::Plus {
                input_dim,
                queries,
                hidden_dim,
                depth,
                heads: q / RESAMPLER_DIM_HEAD,
                ff_inner,
                width,
            }
        } else {
            let [out, embed_dim] = dims(tensors, "image_proj.proj.weight")?;
            let [width] = dims(tensors, "image_proj.norm.weight")?;
            if width == 0 || out % width != 0 {
                return Err(unsupported(format!(
                    "image_proj.proj has {out} rows, not a multiple of the token width {width}"
                )));
            }
            ImageProjConfig::Base {
                embed_dim,
                tokens: out / width,
                width,
            }
        };
        let mut layers: Vec<Option<usize>> = Vec::new();
        for (name, s) in tensors {
            let Some(rest) = name.strip_prefix("ip_adapter.") else {
                continue;
            };
            let Some((n, "to_k_ip.weight")) = rest.split_once('.') else {
                continue;
            };
            let n: usize = n
                .parse()
                .map_err(|_| unsupported(format!("tensor `{name}`: not a layer index")))?;
            if layers.len() <= n {
                layers.resize(n + 1, None);
            }
            layers[n] = s.first().copied();
        }
        Ok(Self { image_proj, layers })
    }

    /// Width of the tokens.
    pub fn width(&self) -> usize {
        match self.image_proj {
            ImageProjConfig::Base { width, .. } | ImageProjConfig::Plus { width, .. } => width,
        }
    }

    /// Builds the adapter with lazy parameters; the loader fills them.
    pub fn init<B: FusedOps>(&self, device: &B::Device) -> IpAdapter<B> {
        let width = self.width();
        let image_proj = match self.image_proj {
            ImageProjConfig::Base {
                embed_dim, tokens, ..
            } => ImageProj::Base(ImageProjection {
                proj: Linear::new(embed_dim, tokens * width, true, device),
                norm: layer_norm(width, EPS, device),
            }),
            ImageProjConfig::Plus {
                input_dim,
                queries,
                hidden_dim: h,
                depth,
                heads,
                ff_inner,
                width,
            } => {
                let inner = heads * RESAMPLER_DIM_HEAD;
                ImageProj::Plus(Resampler {
                    latents: Initializer::Zeros.init([1, queries, h], device),
                    proj_in: Linear::new(input_dim, h, true, device),
                    layers: (0..depth)
                        .map(|_| {
                            vec![
                                ResamplerPart::Attention(PerceiverAttention {
                                    norm1: layer_norm(h, EPS, device),
                                    norm2: layer_norm(h, EPS, device),
                                    to_q: Linear::new(h, inner, false, device),
                                    to_kv: Linear::new(h, 2 * inner, false, device),
                                    to_out: Linear::new(inner, h, false, device),
                                    heads,
                                }),
                                ResamplerPart::FeedForward(vec![
                                    FeedForwardPart::Norm(layer_norm(h, EPS, device)),
                                    FeedForwardPart::Linear(Linear::new(
                                        h, ff_inner, false, device,
                                    )),
                                    FeedForwardPart::Gelu(Gelu::new()),
                                    FeedForwardPart::Linear(Linear::new(
                                        ff_inner, h, false, device,
                                    )),
                                ]),
                            ]
                        })
                        .collect(),
                    proj_out: Linear::new(h, width, true, device),
                    norm_out: layer_norm(width, EPS, device),
                })
            }
        };
        IpAdapter {
            image_proj,
            ip_adapter: self
                .layers
                .iter()
                .map(|l| {
                    l.map(|inner| IpAttention {
                        to_k_ip: Linear::new(width, inner, false, device),
                        to_v_ip: Linear::new(width, inner, false, device),
                    })
                })
                .collect(),
            config: self.clone(),
        }
    }
}

impl<B: FusedOps> PerceiverAttention<B> {
    /// `latents` `[N, Q, h]` attending to `x` `[N, T, h]` and themselves → `[N, Q, h]`
    /// (without the residual).
    fn forward(&self, x: Tensor<B, 3>, latents: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = self.norm1.forward(x);
        let latents = self.norm2.forward(latents);
        let q = self.to_q.forward(latents.clone());
        let kv = self.to_kv.forward(Tensor::cat(vec![x, latents], 1));
        let [n, s, two_inner] = kv.dims();
        let inner = two_inner / 2;
        let k = kv.clone().slice([0..n, 0..s, 0..inner]);
        let v = kv.slice([0..n, 0..s, inner..two_inner]);
        self.to_out.forward(sdpa(q, k, v, self.heads, false))
    }
}

impl<B: FusedOps> FeedForwardPart<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            FeedForwardPart::Norm(n) => n.forward(x),
            FeedForwardPart::Linear(l) => l.forward(x),
            FeedForwardPart::Gelu(g) => g.forward(x),
        }
    }
}

impl<B: FusedOps> Resampler<B> {
    /// `features` `[N, T, input_dim]` → `[N, queries, width]`.
    pub fn forward(&self, features: Tensor<B, 3>) -> Tensor<B, 3> {
        let n = features.dims()[0];
        let [_, q, h] = self.latents.dims();
        let mut latents = self.latents.val().expand([n, q, h]);
        let x = self.proj_in.forward(features);
        for block in &self.layers {
            for part in block {
                latents = match part {
                    ResamplerPart::Attention(a) => a.forward(x.clone(), latents.clone()) + latents,
                    ResamplerPart::FeedForward(ff) => {
                        ff.iter().fold(latents.clone(), |y, p| p.forward(y)) + latents
                    }
                };
            }
        }
        self.norm_out.forward(self.proj_out.forward(latents))
    }
}

impl<B: FusedOps> IpAdapter<B> {
    /// The layout the adapter was built from.
    pub fn config(&self) -> &IpAdapterConfig {
        &self.config
    }

    /// Whether the projection reads the encoder's penultimate hidden states (Plus) rather
    /// than its image embedding.
    pub fn reads_hidden_states(&self) -> bool {
        matches!(self.image_proj, ImageProj::Plus(_))
    }

    /// Image features → tokens `[N, tokens, width]`: `image_embeds` `[N, embed_dim]` for
    /// the base adapter, penultimate hidden states `[N, T, input_dim]` for Plus (as
    /// `[N, 1, embed_dim]` and `[N, T, input_dim]` both arrive as rank 3).
    pub fn project_image(&self, features: Tensor<B, 3>) -> Result<Tensor<B, 3>> {
        let [n, t, d] = features.dims();
        match (&self.image_proj, &self.config.image_proj) {
            (
                ImageProj::Base(p),
                ImageProjConfig::Base {
                    embed_dim,
                    tokens,
                    width,
                },
            ) => {
                if t != 1 || d != *embed_dim {
                    return Err(Error::invalid(
                        "image_embeds",
                        format!("width {d}, the IP-Adapter takes {embed_dim} (from the image encoder's projection_dim)"),
                    ));
                }
                let x = p.proj.forward(features.reshape([n, d]));
                Ok(p.norm.forward(x.reshape([n, *tokens, *width])))
            }
            (ImageProj::Plus(r), ImageProjConfig::Plus { input_dim, .. }) => {
                if d != *input_dim {
                    return Err(Error::invalid(
                        "image_embeds",
                        format!("width {d}, the IP-Adapter Plus takes {input_dim} (the image encoder's hidden_size)"),
                    ));
                }
                Ok(r.forward(features))
            }
            _ => Err(Error::UnsupportedConfig(
                "IP-Adapter built for another projection".into(),
            )),
        }
    }

    /// The image `tokens` `[N, S, width]` as every cross-attention of `unet` reads them,
    /// projected by this adapter's `to_k_ip` / `to_v_ip`, laid out as
    /// [`UNet2DConditionModel::prepare_context`] lays the text; once per request.
    ///
    /// Errors when the adapter was not made for this UNet: a cross-attention without
    /// its layer, or of another width.
    pub fn project_tokens(
        &self,
        unet: &UNet2DConditionModel<B>,
        tokens: Tensor<B, 3>,
    ) -> Result<UNetContext<B>> {
        let rows = tokens.dims()[0];
        let tokens = tokens.cast(unet.dtype());
        // diffusers' processor order: down blocks, up blocks, then the mid block.
        let mut index = 0usize;
        let mut block =
            |attentions: &[crate::model::unet::Transformer2DModel<B>]| -> Result<BlockText<B>> {
                attentions
                .iter()
                .map(|a| {
                    a.transformer_blocks
                        .iter()
                        .map(|tb| {
                            // attn1 is `index`, attn2 the next one.
                            let n = index + 1;
                            index += 2;
                            let inner = tb.attn2.inner_dim();
                            match self.ip_adapter.get(n).and_then(Option::as_ref) {
                                Some(l) if l.to_k_ip.weight.dims()[1] == inner => Ok(CrossKv {
                                    key: l.to_k_ip.forward(tokens.clone()),
                                    value: l.to_v_ip.forward(tokens.clone()),
                                }),
                                Some(l) => Err(Error::invalid(
                                    "ip_adapter",
                                    format!(
                                        "ip_adapter.{n}.to_k_ip has {} outputs, the UNet's cross-attention {inner}: the adapter is for another model",
                                        l.to_k_ip.weight.dims()[1]
                                    ),
                                )),
                                None => Err(Error::invalid(
                                    "ip_adapter",
                                    format!("no ip_adapter.{n}.to_k_ip for one of the UNet's cross-attentions: the adapter is for another model"),
                                )),
                            }
                        })
                        .collect()
                })
                .collect()
            };
        let down = (unet.down_blocks.iter())
            .map(|b| block(&b.attentions))
            .collect::<Result<Vec<_>>>()?;
        let up = (unet.up_blocks.iter())
            .map(|b| block(&b.attentions))
            .collect::<Result<Vec<_>>>()?;
        let mid = block(&unet.mid_block.attentions)?;
        if self.ip_adapter.len() > index {
            return Err(Error::invalid(
                "ip_adapter",
                format!(
                    "the adapter has layers up to ip_adapter.{}, the UNet {} attentions: the adapter is for another model",
                    self.ip_adapter.len() - 1,
                    index
                ),
            ));
        }
        Ok(UNetContext::from_blocks(rows, down, mid, up))
    }
}
