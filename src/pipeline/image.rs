//! The pipeline's images: its outputs, and the input image and mask of image-to-image
//! and inpainting.

use crate::error::{Error, Result};

/// An RGB image, 8 bits per channel, row-major HWC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height × width × 3` bytes.
    pub rgb: Vec<u8>,
}

impl Image {
    /// Encodes the image as PNG.
    pub fn to_png(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let encoder = image::codecs::png::PngEncoder::new(&mut out);
        image::ImageEncoder::write_image(
            encoder,
            &self.rgb,
            self.width as u32,
            self.height as u32,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| Error::Backend(format!("PNG encoding: {e}")))?;
        Ok(out)
    }

    /// An image from decoded pixels (any colour type; alpha is dropped).
    pub fn from_dynamic(img: &image::DynamicImage) -> Self {
        let rgb = img.to_rgb8();
        Self {
            width: rgb.width() as usize,
            height: rgb.height() as usize,
            rgb: rgb.into_raw(),
        }
    }

    /// This image at `width × height`, resampled with a Lanczos filter (diffusers'
    /// `VaeImageProcessor` resizes with PIL's Lanczos; the `image` crate's Lanczos3 is the
    /// same filter, not the same bits). The same size returns a copy.
    pub fn resized(&self, width: usize, height: usize) -> Result<Image> {
        if (width, height) == (self.width, self.height) {
            return Ok(self.clone());
        }
        let buf =
            image::RgbImage::from_raw(self.width as u32, self.height as u32, self.rgb.clone())
                .ok_or_else(|| Error::invalid("image", "pixel buffer does not match its size"))?;
        let out = image::imageops::resize(
            &buf,
            width as u32,
            height as u32,
            image::imageops::FilterType::Lanczos3,
        );
        Ok(Image {
            width,
            height,
            rgb: out.into_raw(),
        })
    }
}

/// An inpainting mask: which pixels are repainted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height × width` values, row-major: `true` = repaint, `false` = keep.
    pub repaint: Vec<bool>,
}

impl Mask {
    /// diffusers' convention for a grey-level mask (`mask_processor` with
    /// `do_binarize`): luminance ≥ 0.5 (≥ 128 of 255) is repainted, darker is kept.
    pub fn from_luma(width: usize, height: usize, luma: &[u8]) -> Self {
        Self {
            width,
            height,
            repaint: luma.iter().map(|&v| v as f32 / 255.0 >= 0.5).collect(),
        }
    }

    /// OpenAI's convention for `/v1/images/edits`: transparent pixels are repainted.
    /// The threshold is diffusers' binarisation of `1 − alpha`: alpha ≤ 127 is repainted.
    pub fn from_alpha(width: usize, height: usize, alpha: &[u8]) -> Self {
        Self {
            width,
            height,
            repaint: alpha
                .iter()
                .map(|&a| 1.0 - a as f32 / 255.0 >= 0.5)
                .collect(),
        }
    }

    /// A mask from a decoded image: by its alpha channel when it has one that is not
    /// fully opaque (OpenAI), else by its luminance (diffusers; PIL's `convert("L")`).
    pub fn from_dynamic(img: &image::DynamicImage) -> Self {
        let (w, h) = (img.width() as usize, img.height() as usize);
        if img.color().has_alpha() {
            let rgba = img.to_rgba8();
            if rgba.pixels().any(|p| p.0[3] != 255) {
                let alpha: Vec<u8> = rgba.pixels().map(|p| p.0[3]).collect();
                return Self::from_alpha(w, h, &alpha);
            }
        }
        let rgb = img.to_rgb8();
        // PIL's ITU-R 601-2 luma transform in its fixed-point form.
        let luma: Vec<u8> = rgb
            .pixels()
            .map(|p| {
                let [r, g, b] = p.0.map(u32::from);
                ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
            })
            .collect();
        Self::from_luma(w, h, &luma)
    }

    /// This mask at `width × height`: resampled as a grey image with Lanczos, as
    /// diffusers resizes a mask before binarising it. The same size returns a copy.
    pub fn resized(&self, width: usize, height: usize) -> Result<Mask> {
        if (width, height) == (self.width, self.height) {
            return Ok(self.clone());
        }
        let luma: Vec<u8> = self
            .repaint
            .iter()
            .map(|&r| if r { 255 } else { 0 })
            .collect();
        let buf = image::GrayImage::from_raw(self.width as u32, self.height as u32, luma)
            .ok_or_else(|| Error::invalid("mask", "pixel buffer does not match its size"))?;
        let out = image::imageops::resize(
            &buf,
            width as u32,
            height as u32,
            image::imageops::FilterType::Lanczos3,
        );
        Ok(Mask::from_luma(width, height, out.as_raw()))
    }

    /// The mask on a grid of `w × h` cells, nearest neighbour (torch's
    /// `F.interpolate(mask, size)`): cell `(i, j)` takes pixel `(⌊i·H/h⌋, ⌊j·W/w⌋)`;
    /// 1.0 = repaint.
    pub fn to_grid(&self, w: usize, h: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(w * h);
        for i in 0..h {
            let y = (i * self.height / h).min(self.height.saturating_sub(1));
            for j in 0..w {
                let x = (j * self.width / w).min(self.width.saturating_sub(1));
                out.push(if self.repaint[y * self.width + x] {
                    1.0
                } else {
                    0.0
                });
            }
        }
        out
    }
}

/// The image a run starts from: image-to-image, or inpainting when it has a mask.
#[derive(Debug, Clone)]
pub struct InitImage {
    /// The input image, exactly the request's `width × height` (resize it first:
    /// [`Image::resized`]).
    pub image: Image,
    /// Inpainting: which pixels to repaint, the image's size. `None`: image-to-image.
    pub mask: Option<Mask>,
    /// How much of the schedule runs, 0–1 (diffusers' `strength`): the run starts at
    /// step `steps − ⌊steps·strength⌋`; 1 repaints from pure noise.
    pub strength: f64,
}

impl InitImage {
    /// The default strength of image-to-image (A1111's default denoising strength;
    /// diffusers' SDXL img2img defaults to 0.3, which barely changes an image).
    pub const DEFAULT_STRENGTH: f64 = 0.75;
    /// The default strength of inpainting: the masked region is repainted from pure
    /// noise, as OpenAI's edits do (diffusers defaults to 0.9999, which skips one step).
    pub const DEFAULT_INPAINT_STRENGTH: f64 = 1.0;

    /// The default strength for a run with or without a mask.
    pub fn default_strength(inpaint: bool) -> f64 {
        if inpaint {
            Self::DEFAULT_INPAINT_STRENGTH
        } else {
            Self::DEFAULT_STRENGTH
        }
    }
}

/// The file formats images are written in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum OutputFormat {
    /// PNG (lossless), with the generation parameters in a text chunk when given.
    #[default]
    Png,
    /// JPEG at a quality of 1–100.
    Jpeg,
    /// WebP, lossless: the `image` crate's encoder has no lossy mode, so the quality
    /// setting does not apply.
    Webp,
}

impl OutputFormat {
    /// The MIME type (`image/png`, `image/jpeg`, `image/webp`).
    pub fn mime(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Webp => "image/webp",
        }
    }

    /// The name OpenAI's `output_format` uses (`png`, `jpeg`, `webp`).
    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg => "jpeg",
            OutputFormat::Webp => "webp",
        }
    }
}

/// How an image is written: format, JPEG quality and the PNG's parameters text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoding {
    /// The file format.
    pub format: OutputFormat,
    /// JPEG quality, 0–100 (0 is taken as 1, the encoder's lowest); PNG and WebP are
    /// lossless and ignore it.
    pub quality: u8,
    /// Text for a PNG `parameters` chunk (A1111's way of recording how an image was
    /// made, see [`a1111_parameters`]); ignored by JPEG and WebP.
    pub parameters: Option<String>,
}

impl Encoding {
    /// The JPEG encoder's best quality, and the default.
    pub const BEST_QUALITY: u8 = 100;
}

impl Default for Encoding {
    fn default() -> Self {
        Self {
            format: OutputFormat::Png,
            quality: Self::BEST_QUALITY,
            parameters: None,
        }
    }
}

impl Image {
    /// Encodes the image as `encoding` says.
    pub fn encode(&self, encoding: &Encoding) -> Result<Vec<u8>> {
        let (w, h) = (self.width as u32, self.height as u32);
        let mut out = Vec::new();
        let result = match encoding.format {
            OutputFormat::Png => {
                let png = self.to_png()?;
                return Ok(match &encoding.parameters {
                    Some(text) => with_png_text(&png, "parameters", text),
                    None => png,
                });
            }
            OutputFormat::Jpeg => {
                let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(
                    &mut out,
                    encoding.quality.clamp(1, Encoding::BEST_QUALITY),
                );
                image::ImageEncoder::write_image(
                    encoder,
                    &self.rgb,
                    w,
                    h,
                    image::ExtendedColorType::Rgb8,
                )
            }
            OutputFormat::Webp => {
                let encoder = image::codecs::webp::WebPEncoder::new_lossless(&mut out);
                image::ImageEncoder::write_image(
                    encoder,
                    &self.rgb,
                    w,
                    h,
                    image::ExtendedColorType::Rgb8,
                )
            }
        };
        result.map_err(|e| Error::Backend(format!("{} encoding: {e}", encoding.format.name())))?;
        Ok(out)
    }
}

/// A1111's `parameters` text: the prompt as written (its weights, `BREAK`s and
/// `<lora:…>` tags kept, as A1111 records them), `Negative prompt: …` when there is one,
/// then `Steps: …, Sampler: …, CFG scale: …, Seed: …, Size: WxH, Model: …` (and
/// `Denoising strength: …` for image-to-image, `Clip skip: …` when not SDXL's default,
/// `Prompt syntax: plain` for a prompt not read in A1111's syntax), which A1111,
/// ComfyUI, Civitai and other tools read back from a PNG.
pub fn a1111_parameters(
    req: &super::GenerationRequest,
    sampler: crate::scheduler::SchedulerKind,
    model: &str,
) -> String {
    let sampler = sampler.a1111_name();
    let mut text = req.prompt.clone();
    if let Some(neg) = req.negative_prompt.as_deref().filter(|s| !s.is_empty()) {
        text.push_str("\nNegative prompt: ");
        text.push_str(neg);
    }
    text.push_str(&format!(
        "\nSteps: {}, Sampler: {sampler}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {model}",
        req.num_inference_steps, req.guidance_scale, req.seed, req.width, req.height
    ));
    if let Some(init) = &req.init_image {
        text.push_str(&format!(", Denoising strength: {}", init.strength));
    }
    if let Some(spacing) = req.sampler.timestep_spacing {
        text.push_str(&format!(", Timestep spacing: {spacing}"));
    }
    if let Some(eta) = req.sampler.eta {
        text.push_str(&format!(", Eta: {eta}"));
    }
    if req.guidance_rescale > 0.0 {
        // The key of A1111's CFG Rescale extension.
        text.push_str(&format!(", CFG Rescale phi: {}", req.guidance_rescale));
    }
    if req.clip_skip > 0 {
        // A1111 counts from the last layer (1) where diffusers counts from the
        // penultimate one (0): SDXL's default is A1111's "Clip skip: 2", left out.
        text.push_str(&format!(", Clip skip: {}", req.clip_skip + 2));
    }
    if req.prompt_syntax == super::PromptSyntax::Plain {
        // Not an A1111 key (A1111 keeps what it does not know): this prompt was not
        // read in its syntax.
        text.push_str(", Prompt syntax: plain");
    }
    text
}

/// `png` with a text chunk `keyword: text` inserted after its header: `tEXt` when the
/// text is Latin-1 (what PIL and A1111 write), else an uncompressed UTF-8 `iTXt`.
fn with_png_text(png: &[u8], keyword: &str, text: &str) -> Vec<u8> {
    // Signature (8) + IHDR chunk (4 length + 4 type + 13 data + 4 CRC).
    const AFTER_IHDR: usize = 8 + 25;
    if png.len() < AFTER_IHDR {
        return png.to_vec();
    }
    let latin1: Option<Vec<u8>> = text
        .chars()
        .map(|c| u8::try_from(u32::from(c)).ok())
        .collect();
    let (kind, data) = match latin1 {
        Some(bytes) => {
            let mut d = keyword.as_bytes().to_vec();
            d.push(0);
            d.extend(bytes);
            (*b"tEXt", d)
        }
        None => {
            let mut d = keyword.as_bytes().to_vec();
            // Null, no compression (flag, method), empty language and translated keyword.
            d.extend([0, 0, 0, 0, 0]);
            d.extend(text.as_bytes());
            (*b"iTXt", d)
        }
    };
    let mut out = Vec::with_capacity(png.len() + data.len() + 12);
    out.extend_from_slice(&png[..AFTER_IHDR]);
    out.extend((data.len() as u32).to_be_bytes());
    let mut crc_input = kind.to_vec();
    crc_input.extend(&data);
    out.extend(&crc_input);
    out.extend(crc32(&crc_input).to_be_bytes());
    out.extend_from_slice(&png[AFTER_IHDR..]);
    out
}

/// CRC-32 (ISO-HDLC, PNG's chunk checksum), bit by bit: chunks here are small.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_keep_the_prompt_as_written() {
        use crate::pipeline::{GenerationRequest, PromptSyntax};
        use crate::scheduler::SchedulerKind;
        let mut req = GenerationRequest {
            prompt: "a (photo:1.3) BREAK <lora:pixel:0.8> hgstyle".into(),
            negative_prompt: Some("[blurry]".into()),
            clip_skip: 1,
            ..Default::default()
        };
        let text = a1111_parameters(&req, SchedulerKind::Euler, "m");
        assert!(text.starts_with(
            "a (photo:1.3) BREAK <lora:pixel:0.8> hgstyle\nNegative prompt: [blurry]\n"
        ));
        assert!(text.ends_with("Model: m, Clip skip: 3"), "{text}");
        req.clip_skip = 0;
        req.prompt_syntax = PromptSyntax::Plain;
        let text = a1111_parameters(&req, SchedulerKind::Euler, "m");
        assert!(text.ends_with("Model: m, Prompt syntax: plain"), "{text}");
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }
}
