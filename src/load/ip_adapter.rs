//! IP-Adapter weights in the layout users download (h94/IP-Adapter:
//! `sdxl_models/ip-adapter_sdxl.safetensors` beside `sdxl_models/image_encoder/`, or
//! `models/image_encoder/` for the ViT-H adapters) and their CLIP image encoder. Strict
//! as the other loaders: every tensor used, every shape checked, pickles refused.

use std::path::{Path, PathBuf};

use burn::tensor::DType;

use crate::error::{Error, Result};
use crate::load::folder::{init_from, inspect_safetensors, load_module, weight_files, LoadReport};
use crate::model::clip_vision::{ClipVisionConfig, ClipVisionModel};
use crate::model::ip_adapter::{ImageProjConfig, IpAdapter, IpAdapterConfig};
use crate::pipeline::ImagePromptAdapter;
use crate::FusedOps;

/// The adapter file `path` names, checked to be a safetensors file; pickled formats are
/// refused before anything is opened.
pub fn ip_adapter_file(path: &Path) -> Result<PathBuf> {
    if let Some(ext) = crate::load::source::pickled_extension(path) {
        return Err(Error::IpAdapter {
            path: path.to_path_buf(),
            message: format!(
                "`.{ext}` files are Python pickles, which can run code when loaded; hypergen \
                 reads IP-Adapters only as .safetensors (h94/IP-Adapter publishes both; or \
                 convert it with `safetensors.torch.save_file` of the `image_proj` and \
                 `ip_adapter` dicts, keys prefixed `image_proj.` and `ip_adapter.`)"
            ),
        });
    }
    if !path.is_file() {
        return Err(Error::MissingFile {
            path: path.to_path_buf(),
            what: "IP-Adapter weights".into(),
        });
    }
    Ok(path.to_path_buf())
}

/// The image encoder folder for the adapter `file`: `given` when set, else
/// `image_encoder/` beside the file (h94's `sdxl_models/`, the bigG encoder), else
/// `../models/image_encoder/` (the ViT-H encoder of `ip-adapter-plus_sdxl_vit-h`), else
/// `../image_encoder/` (an encoder at the top of the adapter's repository).
pub fn image_encoder_dir(file: &Path, given: Option<&Path>) -> Result<PathBuf> {
    if let Some(dir) = given {
        return Ok(dir.to_path_buf());
    }
    let parent = file.parent().unwrap_or(Path::new("."));
    let candidates = [
        parent.join("image_encoder"),
        parent.join("..").join("models").join("image_encoder"),
        parent.join("..").join("image_encoder"),
    ];
    candidates
        .iter()
        .find(|d| d.join("config.json").is_file())
        .cloned()
        .ok_or_else(|| Error::MissingFile {
            path: candidates[0].clone(),
            what: "the IP-Adapter's image encoder (also looked in ../models/image_encoder and \
                   ../image_encoder; \
                   name it with --image-encoder)"
                .into(),
        })
}

/// Loads a CLIP image encoder folder (`config.json`, `model.safetensors`).
pub fn load_image_encoder<B: FusedOps>(
    dir: &Path,
    dtype: DType,
    device: &B::Device,
) -> Result<(ClipVisionModel<B>, LoadReport)> {
    let (_, model) = init_from(&dir.join("config.json"), |c: &ClipVisionConfig| {
        c.init(device)
    })?;
    let files = weight_files(dir, "model", None)?;
    load_module(model, &files, dtype, "image_encoder", &["position_ids"])
}

/// Loads an IP-Adapter file, its layout read from its tensors.
pub fn load_ip_adapter<B: FusedOps>(
    path: &Path,
    dtype: DType,
    device: &B::Device,
) -> Result<(IpAdapter<B>, LoadReport)> {
    let file = ip_adapter_file(path)?;
    let tensors = inspect_safetensors(&file)?;
    let config = IpAdapterConfig::from_tensors(&tensors).map_err(|e| e.in_file(&file))?;
    load_module(config.init(device), &[file], dtype, "ip_adapter", &[])
}

/// Checks that `encoder` gives what `adapter` reads: the image embedding's width for the
/// base adapter, the hidden states' for Plus; the error names both widths.
pub fn check_widths<B: FusedOps>(
    adapter_path: &Path,
    adapter: &IpAdapter<B>,
    encoder: &ClipVisionModel<B>,
) -> Result<()> {
    let enc = encoder.config();
    let (want, have, what) = match adapter.config().image_proj {
        ImageProjConfig::Base { embed_dim, .. } => {
            (embed_dim, enc.projection_dim, "projection_dim")
        }
        ImageProjConfig::Plus { input_dim, .. } => (input_dim, enc.hidden_size, "hidden_size"),
    };
    if want != have {
        return Err(Error::IpAdapter {
            path: adapter_path.to_path_buf(),
            message: format!(
                "the adapter reads image features of width {want}, the image encoder's \
                 {what} is {have}: the encoder is not the one this adapter was trained with"
            ),
        });
    }
    Ok(())
}

/// Loads the adapter `file` and its encoder (`encoder_dir`, else found beside the file:
/// [`image_encoder_dir`]), in `dtype`, checking that their widths agree.
pub fn load_image_prompt_adapter<B: FusedOps>(
    file: &Path,
    encoder_dir: Option<&Path>,
    dtype: DType,
    device: &B::Device,
) -> Result<ImagePromptAdapter<B>> {
    let (adapter, _) = load_ip_adapter::<B>(file, dtype, device)?;
    let dir = image_encoder_dir(file, encoder_dir)?;
    let (encoder, _) = load_image_encoder::<B>(&dir, dtype, device)?;
    check_widths(file, &adapter, &encoder)?;
    Ok(ImagePromptAdapter {
        adapter,
        encoder,
        path: file.to_path_buf(),
    })
}
