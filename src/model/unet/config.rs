//! `unet/config.json` of a diffusers `UNet2DConditionModel`.

use serde::Deserialize;

use crate::error::{Error, Result};

/// A config value diffusers accepts either once for all blocks or once per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// The same value for every block.
    One(T),
    /// One value per block.
    Many(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value for each of `n` blocks, or `None` when a list has the wrong length.
    pub fn expand(&self, n: usize) -> Option<Vec<T>> {
        match self {
            PerBlock::One(v) => Some(vec![v.clone(); n]),
            PerBlock::Many(v) if v.len() == n => Some(v.clone()),
            PerBlock::Many(_) => None,
        }
    }
}

/// The keys of `unet/config.json` hypergen reads, named as in the file. Unknown keys
/// are ignored; keys diffusers defaults take the same defaults here.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    /// Latent channels in.
    pub in_channels: usize,
    /// Latent channels out.
    pub out_channels: usize,
    /// Down block kinds (`DownBlock2D`, `CrossAttnDownBlock2D`).
    pub down_block_types: Vec<String>,
    /// Up block kinds (`UpBlock2D`, `CrossAttnUpBlock2D`).
    pub up_block_types: Vec<String>,
    /// Mid block kind (`UNetMidBlock2DCrossAttn`).
    #[serde(default = "default_mid_block")]
    pub mid_block_type: Option<String>,
    /// Channel width of each resolution level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: PerBlock<usize>,
    /// Padding of the strided downsampling convolutions.
    #[serde(default = "one")]
    pub downsample_padding: usize,
    /// Scale of the mid block's resnet outputs.
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    /// GroupNorm groups.
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    /// GroupNorm and LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    /// Width of the text context the cross-attention reads.
    pub cross_attention_dim: PerBlock<usize>,
    /// Transformer blocks per attention (per down block).
    #[serde(default = "default_tlpb")]
    pub transformer_layers_per_block: PerBlock<usize>,
    /// Transformer blocks per attention for the up blocks, when they differ.
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Vec<PerBlock<usize>>>,
    /// Despite its name, the number of attention heads (a historical diffusers quirk)
    /// unless `num_attention_heads` is set.
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    /// Number of attention heads, when the config spells it out.
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// Transformer2DModel projects with linear layers (SDXL) rather than 1×1 convs.
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Whether sinusoidal embeddings put cosine first.
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the sinusoidal embeddings.
    #[serde(default)]
    pub freq_shift: f64,
    /// Extra conditioning: `text_time` for SDXL.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Sinusoidal width for each micro-conditioning number.
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of `add_embedding` (pooled text + 6 × addition_time_embed_dim).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Kernel of `conv_in`.
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    /// Kernel of `conv_out`.
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
    /// Activation (`silu`).
    #[serde(default = "default_act")]
    pub act_fn: String,
    /// Scale applied to resnet outputs in down and up blocks.
    #[serde(default = "one_f")]
    pub resnet_out_scale_factor: f64,
    /// Only `default` is implemented.
    #[serde(default = "default_shift")]
    pub resnet_time_scale_shift: String,
    /// Only `None` is implemented.
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// Only `None` is implemented.
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    /// Only `None` is implemented.
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    /// Training-time latent size, informational.
    #[serde(default)]
    pub sample_size: Option<usize>,
}

fn default_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn one_f() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn default_groups() -> usize {
    32
}
fn default_eps() -> f64 {
    1e-5
}
fn default_tlpb() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn default_head_dim() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn default_act() -> String {
    "silu".into()
}
fn default_shift() -> String {
    "default".into()
}

/// Per-block settings resolved from a [`UNetConfig`], checked once so model building
/// cannot index out of range.
#[derive(Debug, Clone)]
pub struct ResolvedUNet {
    /// The config these settings were resolved from.
    pub config: UNetConfig,
    /// Per down block: resnets.
    pub layers: Vec<usize>,
    /// Per down block: heads.
    pub heads: Vec<usize>,
    /// Per down block: transformer depth.
    pub transformer_layers: Vec<usize>,
    /// Per up block (in up order): transformer depth.
    pub up_transformer_layers: Vec<usize>,
    /// Per down block: cross-attention width.
    pub cross_attention_dim: Vec<usize>,
    /// Whether each down block has attention.
    pub down_attn: Vec<bool>,
    /// Whether each up block (in up order) has attention.
    pub up_attn: Vec<bool>,
    /// Width of `time_embedding` (4 × block_out_channels[0]).
    pub time_embed_dim: usize,
    /// Sinusoidal width per micro-conditioning number.
    pub addition_time_embed_dim: usize,
    /// Input width of `add_embedding`.
    pub add_embedding_in: usize,
}

impl UNetConfig {
    /// Checks the config against what hypergen implements and expands per-block values.
    pub fn resolve(&self) -> Result<ResolvedUNet> {
        let bad = Error::UnsupportedConfig;
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(bad(format!(
                "block_out_channels, down_block_types and up_block_types must have the same non-zero length (got {}, {}, {})",
                n,
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        if self.act_fn != "silu" {
            return Err(bad(format!("act_fn `{}` (only `silu`)", self.act_fn)));
        }
        if self.resnet_time_scale_shift != "default" {
            return Err(bad(format!(
                "resnet_time_scale_shift `{}` (only `default`)",
                self.resnet_time_scale_shift
            )));
        }
        if self.class_embed_type.is_some()
            || self.time_cond_proj_dim.is_some()
            || self.encoder_hid_dim_type.is_some()
        {
            return Err(bad(
                "class_embed_type, time_cond_proj_dim and encoder_hid_dim_type must be null".into(),
            ));
        }
        if !self.use_linear_projection {
            return Err(bad(
                "use_linear_projection must be true (SDXL family)".into()
            ));
        }
        if self.addition_embed_type.as_deref() != Some("text_time") {
            return Err(bad(format!(
                "addition_embed_type {:?} (only `text_time`, the SDXL conditioning)",
                self.addition_embed_type
            )));
        }
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            return Err(bad(format!(
                "mid_block_type {:?} (only `UNetMidBlock2DCrossAttn`)",
                self.mid_block_type
            )));
        }
        if self
            .block_out_channels
            .iter()
            .any(|c| c % self.norm_num_groups != 0)
        {
            return Err(bad(
                "block_out_channels must be multiples of norm_num_groups".into(),
            ));
        }
        let down_attn = self
            .down_block_types
            .iter()
            .map(|t| match t.as_str() {
                "DownBlock2D" => Ok(false),
                "CrossAttnDownBlock2D" => Ok(true),
                other => Err(bad(format!("down block type `{other}`"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let up_attn = self
            .up_block_types
            .iter()
            .map(|t| match t.as_str() {
                "UpBlock2D" => Ok(false),
                "CrossAttnUpBlock2D" => Ok(true),
                other => Err(bad(format!("up block type `{other}`"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let per = |v: &PerBlock<usize>, key: &str| {
            v.expand(n)
                .ok_or_else(|| bad(format!("`{key}` needs one value or {n} values")))
        };
        let layers = per(&self.layers_per_block, "layers_per_block")?;
        let heads = per(
            self.num_attention_heads
                .as_ref()
                .unwrap_or(&self.attention_head_dim),
            "attention_head_dim",
        )?;
        let transformer_layers = per(
            &self.transformer_layers_per_block,
            "transformer_layers_per_block",
        )?;
        let cross_attention_dim = per(&self.cross_attention_dim, "cross_attention_dim")?;
        let up_transformer_layers = match &self.reverse_transformer_layers_per_block {
            // diffusers gives one depth per resnet of each up block; every SDXL-family
            // checkpoint uses one depth per block, which is what is supported here.
            Some(rev) => rev
                .iter()
                .map(|b| match b {
                    PerBlock::One(v) => Ok(*v),
                    PerBlock::Many(v) if !v.is_empty() && v.iter().all(|x| *x == v[0]) => Ok(v[0]),
                    _ => Err(bad(
                        "reverse_transformer_layers_per_block with differing depths within a block"
                            .into(),
                    )),
                })
                .collect::<Result<Vec<_>>>()?,
            None => transformer_layers.iter().rev().copied().collect(),
        };
        if up_transformer_layers.len() != n {
            return Err(bad(format!(
                "reverse_transformer_layers_per_block needs {n} entries"
            )));
        }
        for (i, (&c, &h)) in self.block_out_channels.iter().zip(&heads).enumerate() {
            if h == 0 || c % h != 0 {
                return Err(bad(format!(
                    "block {i}: {c} channels do not split into {h} heads"
                )));
            }
        }
        let addition_time_embed_dim = self
            .addition_time_embed_dim
            .ok_or_else(|| bad("`addition_time_embed_dim` is required for text_time".into()))?;
        let add_embedding_in = self.projection_class_embeddings_input_dim.ok_or_else(|| {
            bad("`projection_class_embeddings_input_dim` is required for text_time".into())
        })?;
        if add_embedding_in < 6 * addition_time_embed_dim {
            return Err(bad(
                "projection_class_embeddings_input_dim is smaller than 6 × addition_time_embed_dim"
                    .into(),
            ));
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return Err(bad("conv_in_kernel and conv_out_kernel must be odd".into()));
        }
        Ok(ResolvedUNet {
            config: self.clone(),
            layers,
            heads,
            transformer_layers,
            up_transformer_layers,
            cross_attention_dim,
            down_attn,
            up_attn,
            time_embed_dim: self.block_out_channels[0] * 4,
            addition_time_embed_dim,
            add_embedding_in,
        })
    }

    /// Width of the pooled text embedding the model expects in `text_embeds`.
    pub fn text_embeds_dim(&self) -> usize {
        self.projection_class_embeddings_input_dim.unwrap_or(0)
            - 6 * self.addition_time_embed_dim.unwrap_or(0)
    }
}
