//! Names of the original (Stability's `sgm`) SDXL layout for diffusers' module paths:
//! the UNet's `input_blocks.N.M…` / `middle_block` / `output_blocks` and the VAE's
//! `down.N.block.M…`. Single-file checkpoints and kohya LoRAs use them. The numbering
//! depends on how many layers each block has, so it is computed from the model itself.

use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKL;
use crate::FusedOps;

/// How many resnets each UNet block has and which blocks have attentions or resamplers:
/// what the SGM block numbering counts.
#[derive(Debug, Clone, Default)]
pub struct UnetLayout {
    /// Per down block: (resnets, has a downsampler).
    pub down: Vec<(usize, bool)>,
    /// Per up block: (resnets, has attentions, has an upsampler).
    pub up: Vec<(usize, bool, bool)>,
}

impl UnetLayout {
    /// The layout of a built UNet.
    pub fn of<B: FusedOps>(unet: &UNet2DConditionModel<B>) -> Self {
        Self {
            down: unet
                .down_blocks
                .iter()
                .map(|b| (b.resnets.len(), !b.downsamplers.is_empty()))
                .collect(),
            up: unet
                .up_blocks
                .iter()
                .map(|b| {
                    (
                        b.resnets.len(),
                        !b.attentions.is_empty(),
                        !b.upsamplers.is_empty(),
                    )
                })
                .collect(),
        }
    }

    /// The SGM name of the diffusers UNet path `path` (a module or a parameter path such
    /// as `down_blocks.1.attentions.0.proj_in.weight`); `None` when it has none.
    pub fn sgm_name(&self, path: &str) -> Option<String> {
        let parts: Vec<&str> = path.split('.').collect();
        let rest = |from: usize| parts[from.min(parts.len())..].join(".");
        let join = |head: String, tail: String| {
            if tail.is_empty() {
                head
            } else {
                format!("{head}.{tail}")
            }
        };
        let idx = |i: usize| parts.get(i).and_then(|s| s.parse::<usize>().ok());
        match parts.first().copied()? {
            "conv_in" => Some(join("input_blocks.0.0".into(), rest(1))),
            "conv_norm_out" => Some(join("out.0".into(), rest(1))),
            "conv_out" => Some(join("out.2".into(), rest(1))),
            "time_embedding" => {
                let l = linear_index(parts.get(1)?)?;
                Some(join(format!("time_embed.{l}"), rest(2)))
            }
            "add_embedding" => {
                let l = linear_index(parts.get(1)?)?;
                Some(join(format!("label_emb.0.{l}"), rest(2)))
            }
            "down_blocks" => {
                let i = idx(1)?;
                let start = 1 + self.down[..i.min(self.down.len())]
                    .iter()
                    .map(|(r, d)| r + usize::from(*d))
                    .sum::<usize>();
                let (resnets, _) = *self.down.get(i)?;
                let j = idx(3)?;
                // Indices come from file keys: checked, so that a huge one is no name.
                match *parts.get(2)? {
                    "resnets" => Some(join(
                        format!("input_blocks.{}.0", start.checked_add(j)?),
                        resnet_tail(&rest(4))?,
                    )),
                    "attentions" => Some(join(
                        format!("input_blocks.{}.1", start.checked_add(j)?),
                        rest(4),
                    )),
                    "downsamplers" if parts.get(4) == Some(&"conv") => Some(join(
                        format!("input_blocks.{}.0.op", start + resnets),
                        rest(5),
                    )),
                    _ => None,
                }
            }
            "mid_block" => {
                let j = idx(2)?;
                match *parts.get(1)? {
                    "resnets" => Some(join(
                        format!("middle_block.{}", j.checked_mul(2)?),
                        resnet_tail(&rest(3))?,
                    )),
                    "attentions" if j == 0 => Some(join("middle_block.1".into(), rest(3))),
                    _ => None,
                }
            }
            "up_blocks" => {
                let i = idx(1)?;
                let start = self.up[..i.min(self.up.len())]
                    .iter()
                    .map(|(r, _, _)| r)
                    .sum::<usize>();
                let (resnets, attn, _) = *self.up.get(i)?;
                let j = idx(3)?;
                match *parts.get(2)? {
                    "resnets" => Some(join(
                        format!("output_blocks.{}.0", start.checked_add(j)?),
                        resnet_tail(&rest(4))?,
                    )),
                    "attentions" => Some(join(
                        format!("output_blocks.{}.1", start.checked_add(j)?),
                        rest(4),
                    )),
                    "upsamplers" if parts.get(4) == Some(&"conv") => Some(join(
                        format!(
                            "output_blocks.{}.{}.conv",
                            (start + resnets).checked_sub(1)?,
                            1 + usize::from(attn)
                        ),
                        rest(5),
                    )),
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

/// `linear_1` → 0, `linear_2` → 2 (the SiLU sits between them in SGM's `Sequential`).
fn linear_index(name: &str) -> Option<usize> {
    match name {
        "linear_1" => Some(0),
        "linear_2" => Some(2),
        _ => None,
    }
}

/// A UNet resnet's inner names in SGM (`in_layers`, `emb_layers`, `out_layers`,
/// `skip_connection`); `tail` is what follows `resnets.J.`.
fn resnet_tail(tail: &str) -> Option<String> {
    let (head, rest) = tail.split_once('.').unwrap_or((tail, ""));
    let mapped = match head {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "time_emb_proj" => "emb_layers.1",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        _ => return None,
    };
    Some(if rest.is_empty() {
        mapped.to_string()
    } else {
        format!("{mapped}.{rest}")
    })
}

/// The SGM (`first_stage_model.`-relative) name of a diffusers VAE path, for a VAE with
/// `up_blocks` decoder blocks (SGM numbers them the other way round).
pub fn vae_sgm_name<B: FusedOps>(vae: &AutoencoderKL<B>, path: &str) -> Option<String> {
    vae_sgm_name_for(vae.decoder.up_blocks.len(), path)
}

/// [`vae_sgm_name`] for a VAE whose decoder has `n_up` up blocks.
pub fn vae_sgm_name_for(n_up: usize, path: &str) -> Option<String> {
    let parts: Vec<&str> = path.split('.').collect();
    let rest = |from: usize| parts[from.min(parts.len())..].join(".");
    let join = |head: String, tail: String| {
        if tail.is_empty() {
            head
        } else {
            format!("{head}.{tail}")
        }
    };
    let idx = |i: usize| parts.get(i).and_then(|s| s.parse::<usize>().ok());
    let coder = *parts.first()?;
    if coder != "encoder" && coder != "decoder" {
        // quant_conv, post_quant_conv keep their names.
        return Some(path.to_string());
    }
    let inner = match *parts.get(1)? {
        "conv_in" | "conv_out" => join(parts[1].to_string(), rest(2)),
        "conv_norm_out" => join("norm_out".into(), rest(2)),
        "down_blocks" | "up_blocks" => {
            let i = idx(2)?;
            let (block, sampler) = if parts[1] == "down_blocks" {
                (format!("down.{i}"), "downsample")
            } else {
                (
                    format!("up.{}", n_up.checked_sub(i.checked_add(1)?)?),
                    "upsample",
                )
            };
            match *parts.get(3)? {
                "resnets" => {
                    let j = idx(4)?;
                    join(format!("{block}.block.{j}"), vae_resnet_tail(&rest(5))?)
                }
                "downsamplers" | "upsamplers" => join(format!("{block}.{sampler}"), rest(5)),
                _ => return None,
            }
        }
        "mid_block" => match *parts.get(2)? {
            "resnets" => {
                let j = idx(3)?;
                join(
                    format!("mid.block_{}", j.checked_add(1)?),
                    vae_resnet_tail(&rest(4))?,
                )
            }
            "attentions" => {
                let (head, tail) = match *parts.get(4)? {
                    "group_norm" => ("norm", rest(5)),
                    "to_q" => ("q", rest(5)),
                    "to_k" => ("k", rest(5)),
                    "to_v" => ("v", rest(5)),
                    "to_out" => ("proj_out", rest(6)),
                    _ => return None,
                };
                join(format!("mid.attn_1.{head}"), tail)
            }
            _ => return None,
        },
        _ => return None,
    };
    Some(format!("{coder}.{inner}"))
}

/// A VAE resnet's inner names in SGM: only the shortcut differs (`nin_shortcut`).
fn vae_resnet_tail(tail: &str) -> Option<String> {
    let (head, rest) = tail.split_once('.').unwrap_or((tail, ""));
    let mapped = match head {
        "norm1" | "conv1" | "norm2" | "conv2" => head,
        "conv_shortcut" => "nin_shortcut",
        _ => return None,
    };
    Some(if rest.is_empty() {
        mapped.to_string()
    } else {
        format!("{mapped}.{rest}")
    })
}
