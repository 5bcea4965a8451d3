//! Image prompts (IP-Adapter): the adapter and its image encoder as the pipeline holds
//! them, and the image tokens of a request, computed once per request and handed to
//! every UNet call through [`UNetExtras`](crate::model::unet::UNetExtras).

use std::path::PathBuf;

use burn::tensor::Tensor;

use super::image::Image;
use crate::error::{Error, Result};
use crate::model::clip_vision::{pixel_values, ClipVisionModel};
use crate::model::ip_adapter::IpAdapter;
use crate::FusedOps;

/// Side of the square image the encoder reads. diffusers builds
/// `CLIPImageProcessor(size=224, crop_size=224)` whatever the encoder folder's
/// `preprocessor_config.json` says, so this is fixed, not read from the folder.
pub const IP_ADAPTER_IMAGE_SIZE: usize = 224;

/// A request's image prompt: the reference images and the weight of their attention.
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePrompt {
    /// One or more reference images; several images' tokens are concatenated (diffusers'
    /// `ip_adapter_image=[[a, b]]` for one adapter), not averaged.
    pub images: Vec<Image>,
    /// Scale of the image tokens' attention in every cross-attention (diffusers'
    /// `set_ip_adapter_scale`); 0 is the run without the adapter.
    pub scale: f64,
}

impl ImagePrompt {
    /// The scale when none is given (diffusers' after `load_ip_adapter`).
    pub const DEFAULT_SCALE: f64 = 1.0;
}

/// A loaded IP-Adapter with its image encoder
/// ([`crate::load::ip_adapter::load_image_prompt_adapter`]).
pub struct ImagePromptAdapter<B: FusedOps> {
    /// The projection and the per-layer key and value weights.
    pub adapter: IpAdapter<B>,
    /// The CLIP image encoder.
    pub encoder: ClipVisionModel<B>,
    /// The adapter file, for logs and errors.
    pub path: PathBuf,
}

impl<B: FusedOps> ImagePromptAdapter<B> {
    /// The tokens of `images` and of the negative branch, each `[1, images × tokens,
    /// width]`: the base adapter's negative is a zero image embedding, Plus's the
    /// encoder's penultimate states of an all-zero (normalised) pixel tensor, as in
    /// diffusers.
    pub fn tokens(&self, images: &[Image]) -> Result<(Tensor<B, 3>, Tensor<B, 3>)> {
        if images.is_empty() {
            return Err(Error::invalid("ip_adapter.image", "no image"));
        }
        let device = self.encoder.visual_projection.weight.device();
        let dtype = self.encoder.visual_projection.weight.val().dtype();
        let pixels: Vec<Tensor<B, 4>> = images
            .iter()
            .map(|im| {
                pixel_values::<B>(&im.rgb, im.width, im.height, IP_ADAPTER_IMAGE_SIZE, &device)
            })
            .collect();
        let pixels = Tensor::cat(pixels, 0).cast(dtype);
        let k = images.len();
        let out = self.encoder.forward(pixels.clone())?;
        let (cond, uncond) = if self.adapter.reads_hidden_states() {
            let zeros = self.encoder.forward(pixels.zeros_like())?.penultimate;
            (out.penultimate, zeros)
        } else {
            let e = out.image_embeds.unsqueeze_dim::<3>(1);
            (e.clone(), e.zeros_like())
        };
        let flat = |t: Tensor<B, 3>| -> Result<Tensor<B, 3>> {
            let t = self.adapter.project_image(t)?;
            let [_, n, w] = t.dims();
            Ok(t.reshape([1, k * n, w]))
        };
        Ok((flat(uncond)?, flat(cond)?))
    }
}
