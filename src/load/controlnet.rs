//! Loading a ControlNet ([`crate::model::controlnet`]) for a loaded model: from a
//! diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`) or a single
//! `.safetensors` file in diffusers' weight names, whose config is the `config.json`
//! beside it or, without one, the UNet's own layout with the depths and widths the file's
//! tensors show (what `ControlNetModel.from_unet` makes). Loading is strict (every
//! tensor used, none missing) and the result is checked to fit the UNet.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::DType;

use super::folder::{inspect_safetensors, load_module, read_json, weight_files};
use crate::error::{Error, Result};
use crate::model::controlnet::{ControlNetConfig, ControlNetModel};
use crate::model::unet::{PerBlock, UNet2DConditionModel};
use crate::pipeline::SdxlComponents;
use crate::FusedOps;

/// Loads the ControlNet at `path` (a folder or a `.safetensors` file) in `dtype` and
/// checks that it fits `unet` (a misfit names the ControlNet's tensor).
pub fn load_controlnet<B: FusedOps>(
    path: &Path,
    unet: &UNet2DConditionModel<B>,
    dtype: DType,
    device: &B::Device,
) -> Result<ControlNetModel<B>> {
    let (config_path, files) = if path.is_dir() {
        let files = weight_files(path, "diffusion_pytorch_model", None)?;
        (path.join("config.json"), files)
    } else if path.is_file() {
        let beside = path.with_file_name("config.json");
        (beside, vec![path.to_path_buf()])
    } else {
        return Err(Error::MissingFile {
            path: path.to_path_buf(),
            what: "ControlNet (a diffusers folder or a .safetensors file)".into(),
        });
    };
    let config: ControlNetConfig = if config_path.is_file() {
        read_json(&config_path)?
    } else {
        config_from_tensors(unet, &files[0])?
    };
    let model = config
        .init::<B>(device)
        .map_err(|e| e.in_file(&config_path))?;
    let (model, _) = load_module(model, &files, dtype, "controlnet", &[])?;
    model.check_fits(unet).map_err(|m| Error::Tensor {
        path: files[0].clone(),
        tensor: m.tensor,
        message: m.message,
    })?;
    Ok(model)
}

/// Loads the ControlNet at `path` for `components` (in their dtype, checked against
/// their UNet) and adds it under `name`, replacing one of that name.
pub fn add_controlnet<B: FusedOps>(
    components: &mut SdxlComponents<B>,
    name: impl Into<String>,
    path: &Path,
    device: &B::Device,
) -> Result<()> {
    let model = load_controlnet(path, &components.unet, components.dtype, device)?;
    let name = name.into();
    tracing::info!(controlnet = %name, path = %path.display(), "loaded ControlNet");
    components.controlnets.insert(name, model);
    Ok(())
}

/// The config of a single-file ControlNet without one: the UNet's layout (as
/// `ControlNetModel.from_unet` copies it) with the transformer depths per block and the
/// control image embedding's widths that `file`'s tensors have.
fn config_from_tensors<B: FusedOps>(
    unet: &UNet2DConditionModel<B>,
    file: &Path,
) -> Result<ControlNetConfig> {
    let tensors: BTreeMap<String, Vec<usize>> = inspect_safetensors(file)?.into_iter().collect();
    let out_of = |name: &str| tensors.get(name).and_then(|s| s.first().copied());
    let missing = |name: &str| Error::MissingTensors {
        component: "controlnet".into(),
        files: file.display().to_string(),
        tensors: vec![name.to_string()],
    };
    const CONV_IN: &str = "controlnet_cond_embedding.conv_in.weight";
    let first = out_of(CONV_IN).ok_or_else(|| missing(CONV_IN))?;
    let conditioning_channels = tensors.get(CONV_IN).and_then(|s| s.get(1).copied());
    let mut widths = vec![first];
    for k in (1..).step_by(2) {
        match out_of(&format!("controlnet_cond_embedding.blocks.{k}.weight")) {
            Some(w) => widths.push(w),
            None => break,
        }
    }
    let mut encoder = unet.config().clone();
    let unet_depths = unet.resolved().transformer_layers.clone();
    let depths: Vec<usize> = (unet_depths.iter().enumerate())
        .map(|(i, &d)| {
            let prefix = format!("down_blocks.{i}.attentions.0.transformer_blocks.");
            let count = (tensors.keys())
                .filter_map(|n| n.strip_prefix(&prefix))
                .filter_map(|rest| rest.split('.').next()?.parse::<usize>().ok())
                .max()
                .map_or(d, |m| m + 1);
            count
        })
        .collect();
    encoder.transformer_layers_per_block = PerBlock::Many(depths);
    encoder.reverse_transformer_layers_per_block = None;
    Ok(ControlNetConfig {
        conditioning_channels: conditioning_channels.unwrap_or(3),
        conditioning_embedding_out_channels: widths,
        controlnet_conditioning_channel_order: "rgb".into(),
        global_pool_conditions: false,
        encoder,
    })
}

/// A ControlNet as the command line names it: a folder or `.safetensors` file and the
/// scale its residuals are multiplied by.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlNetSpec {
    /// The folder or file.
    pub path: PathBuf,
    /// `controlnet_conditioning_scale` (1 when not given).
    pub scale: f64,
}

impl std::str::FromStr for ControlNetSpec {
    type Err = Error;

    /// `PATH` or `PATH:SCALE`; a suffix after the last `:` that is not a number belongs
    /// to the path (Windows drive letters).
    fn from_str(s: &str) -> Result<Self> {
        if s.is_empty() {
            return Err(Error::invalid("controlnet", "an empty path"));
        }
        if let Some((path, scale)) = s.rsplit_once(':') {
            if let Ok(scale) = scale.parse::<f64>() {
                if !scale.is_finite() || path.is_empty() {
                    return Err(Error::invalid(
                        "controlnet",
                        format!("`{s}`: a path and a finite scale, PATH:SCALE"),
                    ));
                }
                return Ok(Self {
                    path: PathBuf::from(path),
                    scale,
                });
            }
        }
        Ok(Self {
            path: PathBuf::from(s),
            scale: 1.0,
        })
    }
}

/// Bytes a loaded ControlNet's parameters take on its device.
pub fn controlnet_bytes<B: FusedOps>(model: &ControlNetModel<B>) -> usize {
    use burn::module::Module;
    model.num_params() * model.dtype().size()
}

#[cfg(test)]
mod tests {
    use super::ControlNetSpec;

    #[test]
    fn spec_parses_path_and_scale() {
        let s: ControlNetSpec = "dir/canny:0.5".parse().expect("parses");
        assert_eq!((s.path.to_str(), s.scale), (Some("dir/canny"), 0.5));
        let s: ControlNetSpec = "C:\\nets\\canny".parse().expect("parses");
        assert_eq!((s.path.to_str(), s.scale), (Some("C:\\nets\\canny"), 1.0));
        assert!(":0.5".parse::<ControlNetSpec>().is_err());
        assert!("x:inf".parse::<ControlNetSpec>().is_err());
        assert!("".parse::<ControlNetSpec>().is_err());
    }
}
