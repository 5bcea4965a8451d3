//! Tiled VAE decoding, as diffusers' `AutoencoderKL.tiled_decode` does it: the latents
//! are cut into overlapping square tiles, each tile is decoded on its own (with
//! `post_quant_conv`), and neighbouring tiles are cross-faded linearly over their
//! overlap, so that the decoder's peak activation memory depends on the tile, not on
//! the image. The result differs slightly from a plain decode (each tile sees only its
//! own context), exactly as diffusers' does.
//!
//! One difference, where diffusers is wrong: diffusers keeps `tile - blend` pixels of
//! every tile and fades the last `blend` rows of a tile into the next, which is where the
//! next tile starts only when the stride (`int(tile * 0.75)` cells) is exactly
//! `tile - blend` pixels. For other tile sizes (720 or 600 px on SDXL) diffusers returns
//! a larger image than asked for, its content shifted at each seam. Here each tile is
//! kept up to where the next one starts and faded over the rows they really share, so the
//! image always has the latents' size; wherever diffusers' seams are aligned (every tile
//! size divisible by 32 px on SDXL) the two are the same formula.
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
        let factor = config.scale_factor();
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

    /// The tiles along an axis of `cells` latent cells, `factor` pixels each: every
    /// [`stride`](Self::stride) cells a tile of at most `tile_latent` cells (cut by the
    /// edge), each kept in the output up to where the next one starts, the last one
    /// whole; their kept pixels add up to `cells * factor`.
    pub fn axis(&self, cells: usize, factor: usize) -> Vec<TileSpan> {
        let stride = self.stride();
        (0..cells)
            .step_by(stride.max(1))
            .map(|start| {
                let cells_here = self.tile_latent.min(cells - start);
                let last = start + stride >= cells;
                TileSpan {
                    start,
                    cells: cells_here,
                    keep: if last { cells_here } else { stride } * factor,
                }
            })
            .collect()
    }

    /// diffusers' `tiled_decode` assembly with `decode` as each tile's decoder (the
    /// VAE's, or a stand-in in tests): the tiles of [`axis`](Self::axis) on both
    /// axes, each decoded, cross-faded with the (already blended) tile above, then with
    /// the one to its left, over [`blend_extent`](Self::blend_extent) pixels where they
    /// overlap, and cropped to its kept part. Rows are assembled as they finish, so only
    /// two rows of decoded tiles are held at a time. The image has `factor` pixels per
    /// latent cell on each axis.
    pub fn assemble<B: FusedOps>(
        &self,
        latents: Tensor<B, 4>,
        factor: usize,
        mut decode: impl FnMut(Tensor<B, 4>) -> Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        self.validate()?;
        let [_, _, h, w] = latents.dims();
        let (rows_of_tiles, cols_of_tiles) = (self.axis(h, factor), self.axis(w, factor));
        // Where a tile starts inside its predecessor: the blended band begins there.
        let offset = self.stride() * factor;
        let extent = self.blend_extent();
        let mut above: Vec<Tensor<B, 4>> = Vec::new();
        let mut rows = Vec::with_capacity(rows_of_tiles.len());
        for row in &rows_of_tiles {
            let mut current: Vec<Tensor<B, 4>> = Vec::with_capacity(cols_of_tiles.len());
            let mut kept = Vec::with_capacity(cols_of_tiles.len());
            for (col, span) in cols_of_tiles.iter().enumerate() {
                let z = latents
                    .clone()
                    .narrow(2, row.start, row.cells)
                    .narrow(3, span.start, span.cells);
                let mut decoded = decode(z);
                if let Some(up) = above.get(col) {
                    decoded = blend(up, decoded, offset, extent, 2);
                }
                if let Some(left) = current.last() {
                    decoded = blend(left, decoded, offset, extent, 3);
                }
                kept.push(crop(decoded.clone(), row.keep, span.keep));
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

/// One tile along one axis ([`VaeTiling::axis`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileSpan {
    /// First latent cell of the tile.
    pub start: usize,
    /// Latent cells in the tile: the tile size, or fewer where the edge cuts it.
    pub cells: usize,
    /// Pixels of the decoded (blended) tile kept in the image, from its start.
    pub keep: usize,
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
/// (columns) of `b` become a cross-fade from `a`'s into `b`'s own, `a`'s taken from
/// `offset`, where `b` starts inside `a` (diffusers takes `a`'s last rows, the same ones
/// whenever its tiles are aligned), and no further than either tile reaches.
fn blend<B: FusedOps>(
    a: &Tensor<B, 4>,
    b: Tensor<B, 4>,
    offset: usize,
    extent: usize,
    dim: usize,
) -> Tensor<B, 4> {
    let (size_a, size_b) = (a.dims()[dim], b.dims()[dim]);
    let extent = extent.min(size_a.saturating_sub(offset)).min(size_b);
    if extent == 0 {
        return b;
    }
    let [fade_out, fade_in] = ramp(extent, dim, &b);
    let tail = a.clone().narrow(dim, offset, extent);
    let head = b.clone().narrow(dim, 0, extent);
    let mixed = tail * fade_out + head * fade_in;
    if extent == size_b {
        return mixed;
    }
    let rest = b.narrow(dim, extent, size_b - extent);
    Tensor::cat(vec![mixed, rest], dim)
}

/// Keeps `rows` rows and `cols` columns from the top left.
fn crop<B: FusedOps>(tile: Tensor<B, 4>, rows: usize, cols: usize) -> Tensor<B, 4> {
    tile.narrow(2, 0, rows).narrow(3, 0, cols)
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

    /// diffusers' `tiled_decode`, whatever the latents' size: [`VaeTiling::assemble`]
    /// with this VAE's decoder; the image has exactly the latents' size in pixels.
    pub fn tiled_decode(&self, latents: Tensor<B, 4>, tiling: &VaeTiling) -> Result<Tensor<B, 4>> {
        tiling.assemble(latents, self.config.scale_factor(), |z| self.decode(z))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use proptest::prelude::*;

    /// A stand-in decoder whose every pixel depends on its own latent cell alone
    /// (nearest-neighbour upsampling of the first channel): tiling it must change
    /// nothing, so any tile placed, blended or cropped off its true position shows.
    fn upsample(z: Tensor<Flex, 4>, factor: usize) -> Tensor<Flex, 4> {
        let [n, _, h, w] = z.dims();
        z.narrow(1, 0, 1)
            .reshape([n, 1, h, 1, w, 1])
            .repeat_dim(3, factor)
            .repeat_dim(5, factor)
            .reshape([n, 1, h * factor, w * factor])
    }

    /// Latents in which every cell differs from its neighbours by at least 1 (and from
    /// any cell fewer than 251 columns away in its row), small values so the
    /// cross-fade's rounding stays far below that: a pixel taken from another cell is
    /// off by at least 1.
    fn counting(h: usize, w: usize) -> Tensor<Flex, 4> {
        let v: Vec<f32> = (0..h)
            .flat_map(|y| (0..w).map(move |x| ((3 * y + x) % 251) as f32))
            .collect();
        Tensor::from_data(TensorData::new(v, [1, 1, h, w]), &Default::default())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Along an axis the kept parts of the tiles follow each other without gap or
        /// overlap and add up to the axis, whatever the tile size: every image has the
        /// size asked for.
        #[test]
        fn tiles_cover_each_axis_exactly(cells in 8usize..=256, tile in 2usize..=300, factor in prop::sample::select(vec![1usize, 2, 8])) {
            let tiling = VaeTiling::latent(tile, factor);
            prop_assume!(tiling.validate().is_ok());
            let spans = tiling.axis(cells, factor);
            let mut next = 0;
            for (k, span) in spans.iter().enumerate() {
                prop_assert_eq!(span.start * factor, next, "tile {} starts off its place", k);
                prop_assert_eq!(span.start, k * tiling.stride());
                prop_assert!(span.cells >= 1 && span.cells <= tile);
                prop_assert!(span.keep <= span.cells * factor);
                next += span.keep;
            }
            prop_assert_eq!(next, cells * factor);
        }

        /// The whole assembly with a decoder that has no context: the tiled image is the
        /// untiled one, in shape and (to rounding of the cross-fade) every pixel, for
        /// images of 64 to 2048 pixels a side and any tile size.
        #[test]
        fn tiled_positional_decode_is_untiled(h in 8usize..=256, w in 8usize..=256, tile in 2usize..=160) {
            let factor = 8;
            let tiling = VaeTiling::latent(tile, factor);
            prop_assume!(tiling.validate().is_ok());
            let z = counting(h, w);
            let plain = upsample(z.clone(), factor);
            let tiled = tiling
                .assemble(z, factor, |t| upsample(t, factor))
                .expect("assemble");
            prop_assert_eq!(tiled.dims(), [1, 1, h * factor, w * factor]);
            let worst = (tiled - plain)
                .abs()
                .max()
                .into_scalar();
            // Two cross-fades of values below 251 round by less than 1e-3; a pixel of
            // another cell is off by 1 or more: 0.5 tells the two apart.
            prop_assert!(worst < 0.5, "worst difference {}", worst);
        }
    }

    /// The sizes users met: SDXL's 1216×832 with 720-pixel tiles, 1024² with 600, and
    /// 160×96 with 72 and 88 (all wrong by 4 to 18 pixels before).
    #[test]
    fn reported_sizes_come_out_exact() {
        for (width, height, tile_px) in [
            (1216, 832, 720),
            (1024, 1024, 600),
            (160, 96, 72),
            (160, 96, 88),
        ] {
            let tiling = VaeTiling::latent(tile_px / 8, 8);
            let (w, h) = (width / 8, height / 8);
            let out = tiling
                .assemble(counting(h, w), 8, |t| upsample(t, 8))
                .expect("assemble");
            assert_eq!(
                out.dims(),
                [1, 1, height, width],
                "{width}x{height}, tiles of {tile_px}"
            );
        }
    }
}
