//! transformers' CLIP text encoder (`CLIPTextModel` and `CLIPTextModelWithProjection`),
//! the two text encoders of SDXL.
//!
//! Field paths equal the transformers weight names (`text_model.encoder.layers.0.
//! self_attn.q_proj.weight`, `text_projection.weight`, …) so weights load by name.

use crate::kernels::Activation;
use crate::FusedOps;

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig};
use burn::tensor::{Int, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::attention::sdpa;
use crate::model::layers::{layer_norm, LayerNorm};
use crate::model::linear::Linear;

/// `config.json` of a CLIP text encoder folder: transformers' `CLIPTextConfig` keys,
/// with transformers' defaults for absent ones.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    /// Model classes the folder was saved from, e.g. `CLIPTextModelWithProjection`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Number of token embeddings.
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
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
    /// Number of position embeddings: the longest id sequence the model accepts.
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// MLP activation: `quick_gelu`, `gelu`, `gelu_new` or `gelu_pytorch_tanh`.
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    /// Epsilon of every LayerNorm.
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Width of `text_projection`'s output.
    #[serde(default = "defaults::projection_dim")]
    pub projection_dim: usize,
    /// Padding id (unused by the forward pass, kept for completeness).
    #[serde(default = "defaults::pad_token_id")]
    pub pad_token_id: i64,
    /// Beginning-of-text id.
    #[serde(default = "defaults::bos_token_id")]
    pub bos_token_id: i64,
    /// End-of-text id; the legacy value 2 (as in SDXL's configs) means "pool at the
    /// largest id", which is `<|endoftext|>` in CLIP's vocabulary.
    #[serde(default = "defaults::eos_token_id")]
    pub eos_token_id: i64,
}

mod defaults {
    pub fn vocab_size() -> usize {
        49408
    }
    pub fn hidden_size() -> usize {
        512
    }
    pub fn intermediate_size() -> usize {
        2048
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        8
    }
    pub fn max_position_embeddings() -> usize {
        77
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
    pub fn pad_token_id() -> i64 {
        1
    }
    pub fn bos_token_id() -> i64 {
        49406
    }
    pub fn eos_token_id() -> i64 {
        49407
    }
}

/// The MLP activation a CLIP config's `hidden_act` names (`quick_gelu` for OpenAI CLIP,
/// `gelu` for OpenCLIP bigG).
pub(crate) fn activation(name: &str) -> Option<Activation> {
    match name {
        "quick_gelu" => Some(Activation::QuickGelu),
        "gelu" => Some(Activation::Gelu),
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluTanh),
        _ => None,
    }
}

/// `text_model.embeddings`: token plus learned position embeddings.
#[derive(Module, Debug)]
pub struct ClipEmbeddings<B: FusedOps> {
    /// `[vocab_size, hidden_size]`.
    pub token_embedding: Embedding<B>,
    /// `[max_position_embeddings, hidden_size]`.
    pub position_embedding: Embedding<B>,
}

impl<B: FusedOps> ClipEmbeddings<B> {
    /// `ids` `[N, L]` → `[N, L, hidden]`, positions 0..L.
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.forward_with(ids, &[])
    }

    /// [`forward`](Self::forward) with some token embeddings replaced (textual
    /// inversion) before the positions are added.
    pub fn forward_with(&self, ids: Tensor<B, 2, Int>, inserts: &[TokenInsert<B>]) -> Tensor<B, 3> {
        let [_, l] = ids.dims();
        let mut tokens = self.token_embedding.forward(ids);
        for insert in inserts {
            let [n, c] = insert.vectors.dims();
            let (r, p) = (insert.row, insert.position);
            let vectors = insert
                .vectors
                .clone()
                .cast(tokens.dtype())
                .reshape([1, n, c]);
            tokens = tokens.slice_assign([r..r + 1, p..p + n, 0..c], vectors);
        }
        let positions = self.position_embedding.weight.val().slice(0..l).unsqueeze();
        tokens + positions
    }
}

/// Token embeddings that replace those of some ids: a textual-inversion embedding's
/// vectors on its placeholder ids ([`ClipTextModel::forward_hidden`]).
#[derive(Debug, Clone)]
pub struct TokenInsert<B: FusedOps> {
    /// The sequence (row of the ids).
    pub row: usize,
    /// The first position replaced.
    pub position: usize,
    /// `[n, hidden]`: the embeddings of positions `position..position + n`.
    pub vectors: Tensor<B, 2>,
}

/// `self_attn`: causal multi-head self-attention.
#[derive(Module, Debug)]
pub struct ClipAttention<B: FusedOps> {
    /// Query projection.
    pub q_proj: Linear<B>,
    /// Key projection.
    pub k_proj: Linear<B>,
    /// Value projection.
    pub v_proj: Linear<B>,
    /// Output projection.
    pub out_proj: Linear<B>,
    heads: usize,
}

impl<B: FusedOps> ClipAttention<B> {
    /// `[N, L, C]` → `[N, L, C]`, each position attending to itself and earlier ones.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.attend(x, true)
    }

    /// `[N, L, C]` → `[N, L, C]`, causal (the text encoder) or over every position (the
    /// vision encoder).
    pub fn attend(&self, x: Tensor<B, 3>, causal: bool) -> Tensor<B, 3> {
        let q = self.q_proj.forward(x.clone());
        let k = self.k_proj.forward(x.clone());
        let v = self.v_proj.forward(x);
        self.out_proj.forward(sdpa(q, k, v, self.heads, causal))
    }
}

/// `mlp`: fc1, activation, fc2.
#[derive(Module, Debug)]
pub struct ClipMlp<B: FusedOps> {
    /// `hidden → intermediate`.
    pub fc1: Linear<B>,
    /// `intermediate → hidden`.
    pub fc2: Linear<B>,
    #[module(skip)]
    act: Activation,
}

impl<B: FusedOps> ClipMlp<B> {
    /// `[N, L, C]` → `[N, L, C]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.fc2
            .forward(B::fused_activation(self.fc1.forward(x), self.act))
    }
}

/// `encoder.layers.N`: pre-norm attention and MLP, each with a residual.
#[derive(Module, Debug)]
pub struct ClipEncoderLayer<B: FusedOps> {
    /// Causal self-attention.
    pub self_attn: ClipAttention<B>,
    /// Norm before attention.
    pub layer_norm1: LayerNorm<B>,
    /// Feed-forward block.
    pub mlp: ClipMlp<B>,
    /// Norm before the MLP.
    pub layer_norm2: LayerNorm<B>,
}

impl<B: FusedOps> ClipEncoderLayer<B> {
    /// The layer's linear layers: attention's four projections, then the MLP's two.
    fn linears_mut(&mut self) -> [&mut Linear<B>; 6] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.out_proj,
            &mut m.fc1,
            &mut m.fc2,
        ]
    }

    /// A layer of width `c` with lazy parameters (every linear layer with a bias).
    pub(crate) fn new(
        c: usize,
        intermediate: usize,
        heads: usize,
        act: Activation,
        eps: f64,
        device: &B::Device,
    ) -> Self {
        ClipEncoderLayer {
            self_attn: ClipAttention {
                q_proj: Linear::new(c, c, true, device),
                k_proj: Linear::new(c, c, true, device),
                v_proj: Linear::new(c, c, true, device),
                out_proj: Linear::new(c, c, true, device),
                heads,
            },
            layer_norm1: layer_norm(c, eps, device),
            mlp: ClipMlp {
                fc1: Linear::new(c, intermediate, true, device),
                fc2: Linear::new(intermediate, c, true, device),
                act,
            },
            layer_norm2: layer_norm(c, eps, device),
        }
    }

    /// `[N, L, C]` → `[N, L, C]`, with causal attention (the text encoder).
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_with(x, true)
    }

    /// `[N, L, C]` → `[N, L, C]`, with causal attention or attention over every position
    /// (the vision encoder).
    pub fn forward_with(&self, x: Tensor<B, 3>, causal: bool) -> Tensor<B, 3> {
        let x = x.clone() + self.self_attn.attend(self.layer_norm1.forward(x), causal);
        x.clone() + self.mlp.forward(self.layer_norm2.forward(x))
    }

    /// [`forward`](Self::forward)'s output at position `at[i]` of each sequence `i`,
    /// `[N, C]`, computing only what it depends on: keys and values of positions
    /// `0..=at[i]` (the attention is causal), the query, MLP and residuals at `at[i]`.
    pub fn forward_at(&self, x: Tensor<B, 3>, at: &[usize]) -> Tensor<B, 2> {
        let [n, _, c] = x.dims();
        assert_eq!(at.len(), n, "one position per sequence");
        let attn = &self.self_attn;
        let rows = at
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                // Positions up to the pooled one, all that it attends to.
                let seen = x.clone().slice([i..i + 1, 0..p + 1]);
                let h = self.layer_norm1.forward(seen.clone());
                let q = attn.q_proj.forward(h.clone().slice([0..1, p..p + 1]));
                let k = attn.k_proj.forward(h.clone());
                let v = attn.v_proj.forward(h);
                // One query after every key it sees: no mask needed.
                let attended = attn.out_proj.forward(sdpa(q, k, v, attn.heads, false));
                let y = seen.slice([0..1, p..p + 1]) + attended;
                y.clone() + self.mlp.forward(self.layer_norm2.forward(y))
            })
            .collect();
        Tensor::cat(rows, 0).reshape([n, c])
    }
}

/// `text_model.encoder`.
#[derive(Module, Debug)]
pub struct ClipEncoder<B: FusedOps> {
    /// `layers.0` … `layers.{num_hidden_layers-1}`.
    pub layers: Vec<ClipEncoderLayer<B>>,
}

/// `text_model`: embeddings, encoder, final LayerNorm.
#[derive(Module, Debug)]
pub struct ClipTransformer<B: FusedOps> {
    /// Token and position embeddings.
    pub embeddings: ClipEmbeddings<B>,
    /// The transformer layers.
    pub encoder: ClipEncoder<B>,
    /// Norm applied to the last layer's output.
    pub final_layer_norm: LayerNorm<B>,
}

/// A CLIP text encoder, with `text_projection` when it was saved as
/// `CLIPTextModelWithProjection`.
#[derive(Module, Debug)]
pub struct ClipTextModel<B: FusedOps> {
    /// The transformer.
    pub text_model: ClipTransformer<B>,
    /// Projection of the pooled output (no bias); SDXL's second encoder has it.
    pub text_projection: Option<Linear<B>>,
    #[module(skip)]
    pub(crate) config: ClipTextConfig,
}

/// What SDXL conditions on ([`ClipTextModel::forward_conditioning`]).
#[derive(Debug, Clone)]
pub struct ClipConditioning<B: FusedOps> {
    /// `hidden_states[-2]`, as in [`ClipOutput::penultimate`] (`hidden_states[-(clip_skip
    /// + 2)]` from [`ClipTextModel::forward_hidden`]).
    pub penultimate: Tensor<B, 3>,
    /// [`ClipOutput::pooled`], when asked for.
    pub pooled: Option<Tensor<B, 2>>,
    /// [`ClipOutput::text_embeds`], when asked for and the model has the projection.
    pub text_embeds: Option<Tensor<B, 2>>,
}

/// What one forward pass gives SDXL.
#[derive(Debug, Clone)]
pub struct ClipOutput<B: FusedOps> {
    /// `hidden_states[-2]`: the second-to-last layer's output, not normalised,
    /// `[N, L, hidden]` (what SDXL conditions on).
    pub penultimate: Tensor<B, 3>,
    /// `final_layer_norm` of the last layer's output, `[N, L, hidden]`.
    pub last: Tensor<B, 3>,
    /// `last` at each sequence's end-of-text position, `[N, hidden]`.
    pub pooled: Tensor<B, 2>,
    /// `text_projection(pooled)`, `[N, projection_dim]`, when the model has it.
    pub text_embeds: Option<Tensor<B, 2>>,
}

impl ClipTextConfig {
    /// Whether the folder was saved as a `…WithProjection` class (SDXL's second encoder),
    /// so that the model has `text_projection`.
    pub fn with_projection(&self) -> bool {
        self.architectures
            .iter()
            .any(|a| a.contains("WithProjection"))
    }

    /// Builds the model with lazy (unmaterialised) parameters; the loader fills them.
    /// `text_projection` is built when [`with_projection`](Self::with_projection).
    ///
    /// Errors ([`Error::UnsupportedConfig`]) when the config asks for something that
    /// cannot be built (an unknown activation, a width not divisible by the head count).
    pub fn init<B: FusedOps>(&self, device: &B::Device) -> Result<ClipTextModel<B>> {
        let unsupported = Error::UnsupportedConfig;
        let with_projection = self.with_projection();
        let act = activation(&self.hidden_act)
            .ok_or_else(|| unsupported(format!("hidden_act `{}`", self.hidden_act)))?;
        let (c, heads) = (self.hidden_size, self.num_attention_heads);
        if heads == 0 || c % heads != 0 {
            return Err(unsupported(format!(
                "hidden_size {c} is not divisible by num_attention_heads {heads}"
            )));
        }
        let eps = self.layer_norm_eps;
        let layers = (0..self.num_hidden_layers)
            .map(|_| ClipEncoderLayer::new(c, self.intermediate_size, heads, act, eps, device))
            .collect();
        Ok(ClipTextModel {
            text_model: ClipTransformer {
                embeddings: ClipEmbeddings {
                    token_embedding: EmbeddingConfig::new(self.vocab_size, c).init(device),
                    position_embedding: EmbeddingConfig::new(self.max_position_embeddings, c)
                        .init(device),
                },
                encoder: ClipEncoder { layers },
                final_layer_norm: layer_norm(c, eps, device),
            },
            text_projection: with_projection
                .then(|| Linear::new(c, self.projection_dim, false, device)),
            config: self.clone(),
        })
    }
}

impl<B: FusedOps> ClipTextModel<B> {
    /// The config the model was built from.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// The model with every linear layer's weight in panel order where the backend runs
    /// that faster ([`Linear::into_panels`]: on the CPU in float32, GEMMs on 77 rows
    /// without packing the weight per call). Call once the weights are loaded.
    pub fn into_panels(mut self) -> Self {
        for layer in &mut self.text_model.encoder.layers {
            for l in layer.linears_mut() {
                *l = l.clone().into_panels();
            }
        }
        self.text_projection = self.text_projection.map(Linear::into_panels);
        self
    }

    /// Whether the linear layers' weights are in panel order ([`into_panels`]
    /// lays out all of them or none), so that changes to them (adapters) are made in
    /// that order too.
    ///
    /// [`into_panels`]: Self::into_panels
    pub fn panels(&self) -> bool {
        let layers = &self.text_model.encoder.layers;
        match (layers.first(), &self.text_projection) {
            (Some(layer), _) => layer.self_attn.q_proj.panels(),
            (None, Some(p)) => p.panels(),
            (None, None) => false,
        }
    }

    /// Encodes `ids` `[N, L]`.
    ///
    /// # Panics
    ///
    /// When `L` exceeds `max_position_embeddings` (77); the tokenizer never produces
    /// longer sequences.
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> ClipOutput<B> {
        B::on_pool(|| {
            let tm = &self.text_model;
            let mut x = tm.embeddings.forward(ids.clone());
            // hidden_states[-2] is the embeddings when there is a single layer.
            let mut penultimate = x.clone();
            let n_layers = tm.encoder.layers.len();
            for (i, layer) in tm.encoder.layers.iter().enumerate() {
                x = layer.forward(x);
                if i + 2 == n_layers {
                    penultimate = x.clone();
                }
            }
            let last = tm.final_layer_norm.forward(x);
            let pooled = gather_rows(
                last.clone(),
                pooled_positions(ids, self.config.eos_token_id),
            );
            let text_embeds = self
                .text_projection
                .as_ref()
                .map(|p| p.forward(pooled.clone()));
            ClipOutput {
                penultimate,
                last,
                pooled,
                text_embeds,
            }
        })
    }

    /// [`forward`](Self::forward)'s `penultimate` and, when `pooled`, its `pooled` and
    /// `text_embeds`, without the work SDXL throws away (diffusers runs every layer in
    /// full): the last layer runs only for the pooled positions
    /// ([`ClipEncoderLayer::forward_at`]), and not at all without `pooled` (SDXL's first
    /// encoder). The same values up to float rounding.
    ///
    /// # Panics
    ///
    /// As [`forward`](Self::forward).
    pub fn forward_conditioning(
        &self,
        ids: Tensor<B, 2, Int>,
        pooled: bool,
    ) -> ClipConditioning<B> {
        self.conditioning(ids, &[], 0, pooled)
    }

    /// The most `clip_skip` this model takes: its layers less one
    /// (`hidden_states[0]`, the embeddings, is the earliest state there is).
    pub fn max_clip_skip(&self) -> usize {
        self.text_model.encoder.layers.len().saturating_sub(1)
    }

    /// [`forward_conditioning`](Self::forward_conditioning) generalised: `inserts`
    /// replace token embeddings (textual inversion), and `penultimate` is
    /// `hidden_states[-(clip_skip + 2)]`, diffusers' `clip_skip` (0: the penultimate
    /// layer's output, SDXL's default). The pooled output is the last layer's whatever
    /// `clip_skip` is. Errors when `clip_skip` exceeds [`max_clip_skip`](Self::max_clip_skip).
    ///
    /// # Panics
    ///
    /// As [`forward`](Self::forward).
    pub fn forward_hidden(
        &self,
        ids: Tensor<B, 2, Int>,
        inserts: &[TokenInsert<B>],
        clip_skip: usize,
        pooled: bool,
    ) -> Result<ClipConditioning<B>> {
        let max = self.max_clip_skip();
        if clip_skip > max {
            return Err(Error::invalid(
                "clip_skip",
                format!(
                    "{clip_skip} is more than this text encoder takes ({max}: its layers less one)"
                ),
            ));
        }
        Ok(self.conditioning(ids, inserts, clip_skip, pooled))
    }

    /// [`forward_hidden`](Self::forward_hidden) once `clip_skip` is known to fit.
    fn conditioning(
        &self,
        ids: Tensor<B, 2, Int>,
        inserts: &[TokenInsert<B>],
        clip_skip: usize,
        pooled: bool,
    ) -> ClipConditioning<B> {
        B::on_pool(|| {
            let tm = &self.text_model;
            let mut x = tm.embeddings.forward_with(ids.clone(), inserts);
            let layers = &tm.encoder.layers;
            let (last, before) = match layers.split_last() {
                Some((last, before)) => (Some(last), before),
                None => (None, &layers[..]),
            };
            // The layers to run before the state SDXL conditions on is taken.
            let keep_after = before.len().saturating_sub(clip_skip);
            let mut hidden = (keep_after == 0).then(|| x.clone());
            for (i, layer) in before.iter().enumerate() {
                if hidden.is_some() && !pooled {
                    break;
                }
                x = layer.forward(x);
                if i + 1 == keep_after {
                    hidden = Some(x.clone());
                }
            }
            let penultimate = hidden.unwrap_or_else(|| x.clone());
            if !pooled {
                return ClipConditioning {
                    penultimate,
                    pooled: None,
                    text_embeds: None,
                };
            }
            let positions = pooled_positions(ids, self.config.eos_token_id);
            let at_pooled = match last {
                Some(layer) => {
                    let at: Vec<usize> = positions
                        .into_data()
                        .iter::<i64>()
                        .map(|p| p as usize)
                        .collect();
                    layer.forward_at(x, &at)
                }
                // No layers: the embeddings are both `penultimate` and the last output.
                None => gather_rows(x, positions),
            };
            let pooled = tm.final_layer_norm.forward(at_pooled);
            let text_embeds = self
                .text_projection
                .as_ref()
                .map(|p| p.forward(pooled.clone()));
            ClipConditioning {
                penultimate,
                pooled: Some(pooled),
                text_embeds,
            }
        })
    }
}

/// The position pooled per sequence, `[N, 1]`, for `ids` `[N, L]`, as transformers
/// picks it: with the legacy `eos_token_id == 2` the first position of the largest id
/// (CLIP's `<|endoftext|>` is the largest), otherwise the first position holding
/// `eos_token_id` (0 when there is none).
pub fn pooled_positions<B: FusedOps>(
    ids: Tensor<B, 2, Int>,
    eos_token_id: i64,
) -> Tensor<B, 2, Int> {
    let [n, l] = ids.dims();
    let hits = if eos_token_id == 2 {
        let max = ids.clone().max_dim(1);
        ids.clone().equal(max.expand([n, l]))
    } else {
        ids.clone().equal_elem(eos_token_id)
    };
    // The smallest position among the hits; computed as a min so ties resolve to the
    // first occurrence on every backend (argmax gives no such guarantee).
    let positions = Tensor::<B, 1, Int>::arange(0..l as i64, &ids.device())
        .unsqueeze::<2>()
        .expand([n, l]);
    let first = positions.mask_fill(hits.bool_not(), l as i64).min_dim(1);
    let none = first.clone().equal_elem(l as i64);
    first.mask_fill(none, 0)
}

/// `x[i, pos[i], :]` for `x` `[N, L, C]`, `pos` `[N, 1]` → `[N, C]`.
fn gather_rows<B: FusedOps>(x: Tensor<B, 3>, pos: Tensor<B, 2, Int>) -> Tensor<B, 2> {
    let [n, _, c] = x.dims();
    let index = pos.reshape([n, 1, 1]).expand([n, 1, c]);
    x.gather(1, index).reshape([n, c])
}
