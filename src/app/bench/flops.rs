//! How much arithmetic each part of SDXL does, to turn times into achieved TFLOP/s and a
//! ratio to the arithmetic floor.
//!
//! The UNet and VAE counts are anchored on torch's FLOP counter run on the full-size
//! SDXL configs (per image: UNet 1.59 TFLOP at 512², 6.76 at 1024²; VAE decode 2.51 and
//! 10.5). Between and beyond the anchors they are scaled as `a·p + b·p²` in the pixel
//! count `p` (convolutions and projections grow with the pixels, attention scores with
//! their square), which is exact at both anchors. They apply to the SDXL architecture
//! only ([`is_sdxl_unet`], [`is_sdxl_vae`]); other models get no UNet/VAE count.

use crate::model::clip::ClipTextConfig;

/// Parameters of SDXL base 1.0's UNet: how a full-size SDXL UNet is recognised.
pub const SDXL_UNET_PARAMS: usize = 2_567_463_684;
/// Parameters of SDXL's VAE (encoder and decoder).
pub const SDXL_VAE_PARAMS: usize = 83_653_863;

/// One UNet evaluation of one image at 512×512 (torch's FLOP counter), FLOP.
pub const UNET_512: f64 = 1.59e12;
/// One UNet evaluation of one image at 1024×1024, FLOP.
pub const UNET_1024: f64 = 6.76e12;
/// One VAE decode of one image at 512×512, FLOP.
pub const VAE_512: f64 = 2.51e12;
/// One VAE decode of one image at 1024×1024, FLOP.
pub const VAE_1024: f64 = 10.5e12;

/// Dense float16 throughput the floor assumes for an H100 (TFLOP/s): 30 steps
/// with guidance at 1024² (≈ 416 TFLOP) take ≈ 0.54 s at this rate.
pub const DEFAULT_PEAK_TFLOPS: f64 = 770.0;

/// `a·p + b·p²` through `(1, lo)` and `(4, hi)`, `p` in units of 512² pixels.
fn two_anchor(lo: f64, hi: f64, width: usize, height: usize) -> f64 {
    let p = (width * height) as f64 / (512.0 * 512.0);
    let b = (hi - 4.0 * lo) / 12.0;
    let a = lo - b;
    a * p + b * p * p
}

/// Whether a UNet with `params` parameters is SDXL base's.
pub fn is_sdxl_unet(params: usize) -> bool {
    params == SDXL_UNET_PARAMS
}

/// Whether a VAE with `params` parameters is SDXL's.
pub fn is_sdxl_vae(params: usize) -> bool {
    params == SDXL_VAE_PARAMS
}

/// FLOP of one SDXL UNet evaluation of one batch row at `width × height` pixels.
pub fn sdxl_unet(width: usize, height: usize) -> f64 {
    two_anchor(UNET_512, UNET_1024, width, height)
}

/// FLOP of one SDXL VAE decode of one image at `width × height` pixels.
pub fn sdxl_vae_decode(width: usize, height: usize) -> f64 {
    two_anchor(VAE_512, VAE_1024, width, height)
}

/// FLOP of a CLIP text encoder on one sequence of `tokens` ids: per layer the four
/// attention projections, the two MLP matrices and the two attention products, plus
/// the text projection when there is one (multiply-adds count 2).
pub fn clip(config: &ClipTextConfig, tokens: usize, projection: bool) -> f64 {
    let (d, i, l) = (
        config.hidden_size as f64,
        config.intermediate_size as f64,
        tokens as f64,
    );
    let per_layer = 2.0 * l * (4.0 * d * d + 2.0 * d * i) + 4.0 * l * l * d;
    let proj = if projection {
        2.0 * d * config.projection_dim as f64
    } else {
        0.0
    };
    config.num_hidden_layers as f64 * per_layer + proj
}

/// The FLOP counts of one model, where known.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelFlops {
    /// Whether the UNet is SDXL's (its counts are known).
    pub sdxl_unet: bool,
    /// Whether the VAE is SDXL's.
    pub sdxl_vae: bool,
    /// Both text encoders on one prompt.
    pub text: f64,
}

impl ModelFlops {
    /// One UNet evaluation of `rows` batch rows.
    pub fn unet(&self, width: usize, height: usize, rows: usize) -> Option<f64> {
        self.sdxl_unet
            .then(|| sdxl_unet(width, height) * rows as f64)
    }

    /// One VAE decode of `images` images.
    pub fn vae(&self, width: usize, height: usize, images: usize) -> Option<f64> {
        self.sdxl_vae
            .then(|| sdxl_vae_decode(width, height) * images as f64)
    }

    /// A whole run: `text_calls` prompt encodings, `steps` UNet evaluations of `rows`
    /// rows and the decode of `images` images.
    pub fn pipeline(
        &self,
        width: usize,
        height: usize,
        steps: usize,
        rows: usize,
        images: usize,
        text_calls: usize,
    ) -> Option<f64> {
        Some(
            self.unet(width, height, rows)? * steps as f64
                + self.vae(width, height, images)?
                + self.text * text_calls as f64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_are_exact() {
        assert!((sdxl_unet(512, 512) - UNET_512).abs() < 1e3);
        assert!((sdxl_unet(1024, 1024) - UNET_1024).abs() < 1e3);
        assert!((sdxl_vae_decode(512, 512) - VAE_512).abs() < 1e3);
        assert!((sdxl_vae_decode(1024, 1024) - VAE_1024).abs() < 1e3);
        // The 30 steps with guidance at 1024²: ≈ 416 TFLOP.
        let f = ModelFlops {
            sdxl_unet: true,
            sdxl_vae: true,
            text: 0.0,
        };
        let total = f.pipeline(1024, 1024, 30, 2, 1, 0).unwrap_or(0.0);
        assert!((total / 1e12 - 416.1).abs() < 0.1, "{total}");
    }
}
