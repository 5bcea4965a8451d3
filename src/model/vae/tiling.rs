//! Tiled VAE decoding, as diffusers' `AutoencoderKL.tiled_decode` does it: the latents
//! are cut into overlapping square tiles, each tile is decoded on its own (with
//! `post_quant_conv`), and neighbouring tiles are cross-faded linearly over their
//! overlap, so that the decoder's peak activation memory depends on the tile, not on
//! the image. The result differs slightly from a plain decode (each tile sees only its
//! own context), exactly as diffusers' does.
//!
//! diffusers tiles only when enabled *and* the latents are larger than the tile in
//! height or width; [`AutoencoderKL::decode_with`] applies the same rule, and
//! [`AutoencoderKL::tiled_decode`] tiles unconditionally.

use std::str::FromStr;

use burn::tensor::{Tensor, TensorData};

use crate::error::{Error, Result};
use crate::model::vae::{AutoencoderKL, VaeConfig};
use crate::FusedOps;

/// diffusers' `tile_overlap_factor`: the fraction of a tile shared with its neighbour.
pub const DEFAULT_OVERLAP: f64 = 0.25;

/// The tile size asked for (`--vae-tiling[=PIXELS]`), before it is resolved against a
/// VAE config with [`VaeTiling::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VaeTileSize {
    /// diffusers' default: the config's `sample_size` in pixels (1024 for SDXL, so a
    /// 1024² image is not tiled and larger ones are).
    #[default]
    Config,
    /// Square tiles of this many pixels, a positive multiple of the VAE's scale factor
    /// (8 for SDXL); smaller tiles need less memory.
    Pixels(usize),
}

impl FromStr for VaeTileSize {
    type Err = Error;

    /// `auto` or `config` for [`VaeTileSize::Config`], else a number of pixels.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" | "config" => Ok(VaeTileSize::Config),
            n => n.parse().map(VaeTileSize::Pixels).map_err(|_| {
                Error::invalid(
                    "vae_tiling",
                    format!("`{s}` is not a tile size in pixels (or `auto`)"),
                )
            }),
        }
    }
}

/// The tiling parameters, in diffusers' terms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VaeTiling {
    /// Tile side in latent cells (diffusers' `tile_latent_min_size`).
    pub tile_latent: usize,
    /// Tile side in pixels (diffusers' `tile_sample_min_size`): sets the width of the
    /// blended band and where each decoded tile is cropped.
    pub tile_sample: usize,
    /// Fraction of a tile that overlaps its neighbour (diffusers' `tile_overlap_factor`).
    pub overlap: f64,
}

impl VaeTiling {
    /// Resolves `size` against the VAE's config: diffusers' defaults for
    /// [`VaeTileSize::Config`] (`sample_size` pixels, `sample_size / 2^(levels-1)`
    /// latent cells), overlap [`DEFAULT_OVERLAP`].
    pub fn new(config: &VaeConfig, size: VaeTileSize) -> Result<Self> {
        let factor = scale_factor(config);
        let tiling = match size {
            VaeTileSize::Config => Self {
                tile_latent: config.sample_size / factor,
                tile_sample: config.sample_size,
                overlap: DEFAULT_OVERLAP,
            },
            VaeTileSize::Pixels(px) => {
                if px == 0 || !px.is_multiple_of(factor) {
                    return Err(Error::invalid(
                        "vae_tiling",
                        format!("tile size {px} is not a positive multiple of {factor} pixels"),
                    ));
                }
                Self::latent(px / factor, factor)
            }
        };
        tiling.validate()?;
        Ok(tiling)
    }

    /// Tiles of `tile_latent` latent cells (`tile_latent * scale_factor` pixels) with
    /// the default overlap; check with [`validate`](Self::validate).
    pub fn latent(tile_latent: usize, scale_factor: usize) -> Self {
        Self {
            tile_latent,
            tile_sample: tile_latent * scale_factor,
            overlap: DEFAULT_OVERLAP,
        }
    }

    /// Refuses parameters that would tile nothing or loop forever.
    pub fn validate(&self) -> Result<()> {
        if !(self.overlap.is_finite() && (0.0..1.0).contains(&self.overlap)) {
            return Err(Error::invalid(
                "vae_tiling",
                format!("overlap {} is not in [0, 1)", self.overlap),
            ));
        }
        if self.tile_sample == 0 || self.stride() == 0 {
            return Err(Error::invalid(
                "vae_tiling",
                format!(
                    "tiles of {} latent cells / {} pixels with overlap {} leave no stride",
                    self.tile_latent, self.tile_sample, self.overlap
                ),
            ));
        }
        Ok(())
    }

    /// Whether diffusers would tile latents of `height × width` cells: only when they
    /// are larger than one tile.
    pub fn applies(&self, height: usize, width: usize) -> bool {
        height > self.tile_latent || width > self.tile_latent
    }

    /// Latent cells between the starts of neighbouring tiles (diffusers' `overlap_size`;
    /// Python's `int()` truncates, as `as` does).
    pub fn stride(&self) -> usize {
        (self.tile_latent as f64 * (1.0 - self.overlap)) as usize
    }

    /// Pixels cross-faded between neighbouring tiles (diffusers' `blend_extent`).
    pub fn blend_extent(&self) -> usize {
        (self.tile_sample as f64 * self.overlap) as usize
    }

    /// Pixels of each blended tile kept in the output (diffusers' `row_limit`).
    pub fn row_limit(&self) -> usize {
        self.tile_sample - self.blend_extent()
    }
}

/// Pixels per latent cell: `2^(levels - 1)`.
fn scale_factor(config: &VaeConfig) -> usize {
    1 << config.block_out_channels.len().saturating_sub(1)
}

/// Linear ramp weights `(1 - k/extent, k/extent)` for `k` in `0..extent`, shaped to
/// broadcast along `dim` (2: rows, 3: columns), in `like`'s dtype. Each weight is
/// computed in f64 and rounded once, as PyTorch rounds a Python scalar.
fn ramp<B: FusedOps>(extent: usize, dim: usize, like: &Tensor<B, 4>) -> [Tensor<B, 4>; 2] {
    let shape = if dim == 2 {
        [1, 1, extent, 1]
    } else {
        [1, 1, 1, extent]
    };
    let make = |f: &dyn Fn(f64) -> f64| {
        let v: Vec<f32> = (0..extent)
            .map(|k| f(k as f64 / extent as f64) as f32)
            .collect();
        Tensor::<B, 4>::from_data(TensorData::new(v, shape), &like.device()).cast(like.dtype())
    };
    [make(&|t| 1.0 - t), make(&|t| t)]
}

/// diffusers' `blend_v` (`dim` 2) and `blend_h` (`dim` 3): the first `extent` rows
/// (columns) of `b` become a cross-fade from the last ones of `a` into `b`'s own.
fn blend<B: FusedOps>(
    a: &Tensor<B, 4>,
    b: Tensor<B, 4>,
    extent: usize,
    dim: usize,
) -> Tensor<B, 4> {
    let (size_a, size_b) = (a.dims()[dim], b.dims()[dim]);
    let extent = extent.min(size_a).min(size_b);
    if extent == 0 {
        return b;
    }
    let [fade_out, fade_in] = ramp(extent, dim, &b);
    let tail = a.clone().narrow(dim, size_a - extent, extent);
    let head = b.clone().narrow(dim, 0, extent);
    let mixed = tail * fade_out + head * fade_in;
    if extent == size_b {
        return mixed;
    }
    let rest = b.narrow(dim, extent, size_b - extent);
    Tensor::cat(vec![mixed, rest], dim)
}

/// Keeps at most `limit` rows and columns from the top left.
fn crop<B: FusedOps>(tile: Tensor<B, 4>, limit: usize) -> Tensor<B, 4> {
    let [_, _, h, w] = tile.dims();
    tile.narrow(2, 0, h.min(limit)).narrow(3, 0, w.min(limit))
}

impl<B: FusedOps> AutoencoderKL<B> {
    /// [`decode`](Self::decode), tiled when `tiling` is given and the latents are larger
    /// than one tile (diffusers' rule); otherwise exactly the plain decode.
    pub fn decode_with(
        &self,
        latents: Tensor<B, 4>,
        tiling: Option<&VaeTiling>,
    ) -> Result<Tensor<B, 4>> {
        let [_, _, h, w] = latents.dims();
        match tiling {
            Some(t) if t.applies(h, w) => self.tiled_decode(latents, t),
            _ => Ok(self.decode(latents)),
        }
    }

    /// diffusers' `tiled_decode`, whatever the latents' size: tiles start every
    /// [`VaeTiling::stride`] cells (the last ones may be cut by the edge); each decoded
    /// tile is cross-faded with the (already blended) tile above, then with the one to
    /// its left, over [`VaeTiling::blend_extent`] pixels, and cropped to
    /// [`VaeTiling::row_limit`]. Rows are assembled as they finish, so only two rows of
    /// decoded tiles are held at a time.
    pub fn tiled_decode(&self, latents: Tensor<B, 4>, tiling: &VaeTiling) -> Result<Tensor<B, 4>> {
        tiling.validate()?;
        let [_, _, h, w] = latents.dims();
        let (tile, stride) = (tiling.tile_latent, tiling.stride());
        let (extent, limit) = (tiling.blend_extent(), tiling.row_limit());
        let mut above: Vec<Tensor<B, 4>> = Vec::new();
        let mut rows = Vec::new();
        for i in (0..h).step_by(stride) {
            let mut current: Vec<Tensor<B, 4>> = Vec::new();
            let mut kept = Vec::new();
            for (col, j) in (0..w).step_by(stride).enumerate() {
                let z = latents
                    .clone()
                    .narrow(2, i, tile.min(h - i))
                    .narrow(3, j, tile.min(w - j));
                let mut decoded = self.decode(z);
                if let Some(up) = above.get(col) {
                    decoded = blend(up, decoded, extent, 2);
                }
                if let Some(left) = current.last() {
                    decoded = blend(left, decoded, extent, 3);
                }
                kept.push(crop(decoded.clone(), limit));
                current.push(decoded);
            }
            rows.push(Tensor::cat(kept, 3));
            // The finished row is only needed to blend the next one into.
            above = current;
        }
        drop(above);
        Ok(Tensor::cat(rows, 2))
    }
}
