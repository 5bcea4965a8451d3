//! The pipeline's output images.

use crate::error::{Error, Result};

/// An RGB image, 8 bits per channel, row-major HWC.
#[derive(Debug, Clone)]
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
}
