//! Tiled VAE decoding (diffusers' `AutoencoderKL.tiled_decode`): skipped exactly as
//! diffusers skips it, identical to the plain decode when one tile covers the latents,
//! and, with small tiles on the fixture VAE, equal to an assembly written out here from
//! diffusers' formulas (each tile decoded by the plain decoder, blended and cropped on
//! the host), so wrong blending, cropping or tile placement fails. Where diffusers'
//! seams are misplaced (a stride that is not `tile - blend` pixels) the assembly keeps
//! each tile up to where the next starts, as the library does (see
//! `hypergen::model::vae::tiling`), so every image has the size asked for.

use hypergen::FusedOps;
use std::ops::ControlFlow;

use burn::tensor::{DType, Tensor, TensorData};
use clap::Parser;
use hypergen::app::cli::{Cli, Command};
use hypergen::model::vae::tiling::{VaeTileSize, VaeTiling};
use hypergen::model::vae::{AutoencoderKL, VaeConfig};
use hypergen::noise::Generator;
use hypergen::pipeline::{RunOptions, SdxlPipeline};
use hypergen::Error;

use crate::common::{fixture_vae, ref_tensor, rel_error, values, Cpu, TOL_F32};

/// Pixels per latent cell of a VAE: 2^(levels − 1), from its config.
fn factor<B: FusedOps>(vae: &AutoencoderKL<B>) -> usize {
    1 << (vae.config().block_out_channels.len() - 1)
}

/// A host copy of a `[N, C, H, W]` tensor.
#[derive(Clone, Debug)]
struct Host {
    dims: [usize; 4],
    data: Vec<f32>,
}

impl Host {
    fn of<B: FusedOps>(t: Tensor<B, 4>) -> Self {
        Self {
            dims: t.dims(),
            data: values(t),
        }
    }

    fn at(&self, n: usize, c: usize, y: usize, x: usize) -> usize {
        let [_, cs, hs, ws] = self.dims;
        ((n * cs + c) * hs + y) * ws + x
    }

    /// Rows `y0..y1`, columns `x0..x1`.
    fn window(&self, y0: usize, y1: usize, x0: usize, x1: usize) -> Self {
        let [ns, cs, _, _] = self.dims;
        let mut data = Vec::with_capacity(ns * cs * (y1 - y0) * (x1 - x0));
        for n in 0..ns {
            for c in 0..cs {
                for y in y0..y1 {
                    for x in x0..x1 {
                        data.push(self.data[self.at(n, c, y, x)]);
                    }
                }
            }
        }
        Self {
            dims: [ns, cs, y1 - y0, x1 - x0],
            data,
        }
    }

    fn tensor<B: FusedOps>(&self, device: &B::Device) -> Tensor<B, 4> {
        Tensor::from_data(TensorData::new(self.data.clone(), self.dims), device)
    }
}

/// diffusers' `blend_v` (`vertical`) / `blend_h`, in place on `b`, in f32 with each
/// weight rounded once from f64 as PyTorch rounds a Python scalar; `a`'s rows (columns)
/// are read from `offset`, where `b` starts inside `a`.
fn blend_by_hand(a: &Host, b: &mut Host, offset: usize, extent: usize, vertical: bool) {
    let d = if vertical { 2 } else { 3 };
    let extent = extent.min(a.dims[d].saturating_sub(offset)).min(b.dims[d]);
    let [ns, cs, hs, ws] = b.dims;
    for k in 0..extent {
        let t = k as f64 / extent as f64;
        let (wa, wb) = ((1.0 - t) as f32, t as f32);
        let ka = offset + k;
        for n in 0..ns {
            for c in 0..cs {
                let span = if vertical { ws } else { hs };
                for s in 0..span {
                    let (ia, ib) = if vertical {
                        (a.at(n, c, ka, s), b.at(n, c, k, s))
                    } else {
                        (a.at(n, c, s, ka), b.at(n, c, s, k))
                    };
                    b.data[ib] = a.data[ia] * wa + b.data[ib] * wb;
                }
            }
        }
    }
}

/// The tiled decode written out from diffusers' `tiled_decode`: tiles of `tile` latent
/// cells every `stride = int(tile * 0.75)`, each decoded by the plain decoder; blended
/// (in place, so later tiles blend with already-blended ones) over `int(tile_px * 0.25)`
/// pixels from where the tile starts in its neighbour (`stride * f`: diffusers' `tile_px -
/// blend` whenever that is whole); each tile but the last of a row or column cropped
/// there, and placed row by row.
fn assemble_by_hand<B: FusedOps>(
    vae: &AutoencoderKL<B>,
    latents: &Host,
    tile: usize,
    device: &B::Device,
) -> Host {
    let tile_px = tile * factor(vae);
    let stride = (tile as f64 * 0.75) as usize;
    let blend = (tile_px as f64 * 0.25) as usize;
    let offset = stride * factor(vae);
    let [_, _, h, w] = latents.dims;
    let mut rows: Vec<Vec<Host>> = Vec::new();
    for i in (0..h).step_by(stride) {
        let mut row: Vec<Host> = Vec::new();
        for j in (0..w).step_by(stride) {
            let z = latents.window(i, (i + tile).min(h), j, (j + tile).min(w));
            let mut decoded = Host::of(vae.decode(z.tensor::<B>(device)));
            if let Some(above) = rows.last() {
                blend_by_hand(&above[row.len()], &mut decoded, offset, blend, true);
            }
            if let Some(left) = row.last() {
                blend_by_hand(left, &mut decoded, offset, blend, false);
            }
            row.push(decoded);
        }
        rows.push(row);
    }
    let (last_row, last_col) = (rows.len() - 1, rows[0].len() - 1);
    let cropped: Vec<Vec<Host>> = rows
        .iter()
        .enumerate()
        .map(|(r, row)| {
            row.iter()
                .enumerate()
                .map(|(c, t)| {
                    let keep_h = if r == last_row { t.dims[2] } else { offset };
                    let keep_w = if c == last_col { t.dims[3] } else { offset };
                    t.window(0, keep_h, 0, keep_w)
                })
                .collect()
        })
        .collect();
    let [ns, cs, _, _] = cropped[0][0].dims;
    let out_h: usize = cropped.iter().map(|r| r[0].dims[2]).sum();
    let out_w: usize = cropped[0].iter().map(|t| t.dims[3]).sum();
    let mut out = Host {
        dims: [ns, cs, out_h, out_w],
        data: vec![f32::NAN; ns * cs * out_h * out_w],
    };
    let mut y0 = 0;
    for row in &cropped {
        let mut x0 = 0;
        for t in row {
            let [_, _, th, tw] = t.dims;
            for n in 0..ns {
                for c in 0..cs {
                    for y in 0..th {
                        for x in 0..tw {
                            let o = out.at(n, c, y0 + y, x0 + x);
                            out.data[o] = t.data[t.at(n, c, y, x)];
                        }
                    }
                }
            }
            x0 += tw;
        }
        y0 += row[0].dims[2];
    }
    out
}

/// Standard-normal latents `[n, 4, h, w]` from the seeded generator.
fn noise(seed: u64, dims: [usize; 4]) -> Host {
    Host {
        dims,
        data: Generator::new(seed).randn(&dims),
    }
}

/// The default tiles follow the VAE config (`sample_size` pixels, `sample_size / f`
/// cells, overlap 0.25), and tiles that hold the whole latents leave the decode the
/// plain one, value for value.
fn skipped_when_latents_fit<B: FusedOps>(device: &B::Device) {
    let vae = fixture_vae::<B>(device);
    let f = factor(&vae);
    let sample = vae.config().sample_size;
    let tiling = VaeTiling::new(vae.config(), VaeTileSize::Config).expect("default tiling");
    assert_eq!(
        (tiling.tile_latent, tiling.tile_sample, tiling.overlap),
        (sample / f, sample, 0.25)
    );
    let z = ref_tensor::<B, 4>("vae.decode.in", device);
    let [_, _, h, w] = z.dims();
    assert_eq!(
        tiling.applies(h, w),
        h > sample / f || w > sample / f,
        "the config's tiles apply exactly to latents larger than one tile"
    );
    // Tiles of exactly the latents' larger side hold them whole.
    let whole = VaeTiling::new(vae.config(), VaeTileSize::Pixels(h.max(w) * f))
        .expect("tiles of the latents' size");
    assert!(!whole.applies(h, w));
    let plain = values(vae.decode(z.clone()));
    let tiled = values(vae.decode_with(z, Some(&whole)).expect("decode_with"));
    assert_eq!(plain, tiled, "an untiled decode must be the plain decode");
}
crate::on_backends!(vae_tiling_skipped, skipped_when_latents_fit);

/// Tiling forced on latents inside one tile's stride (a tile of ⌈4/3 · side⌉ + 1 cells,
/// whose stride covers the latents' larger side): one tile, nothing blended or cropped,
/// identical numbers. (A forced tile of exactly the latents' size is *not* one tile in
/// diffusers: see the assembly test.)
fn forced_single_tile_is_plain<B: FusedOps>(device: &B::Device) {
    let vae = fixture_vae::<B>(device);
    let z = ref_tensor::<B, 4>("vae.decode.in", device);
    let [_, _, h, w] = z.dims();
    let tiling = VaeTiling::latent((h.max(w) * 4).div_ceil(3) + 1, factor(&vae));
    assert!(tiling.stride() >= h.max(w), "{tiling:?} is one tile");
    let plain = Host::of(vae.decode(z.clone()));
    let tiled = Host::of(vae.tiled_decode(z, &tiling).expect("tiled_decode"));
    assert_eq!(plain.dims, tiled.dims);
    assert_eq!(plain.data, tiled.data, "one tile must be the plain decode");
}
crate::on_backends!(vae_tiling_forced_single_tile, forced_single_tile_is_plain);

/// Small tiles against the assembly by hand: the reference latents in 3×3 tiles of 8
/// cells (trailing tiles of 4), a batch of two non-square latents (12×20: 2×3 tiles,
/// trailing ones narrower than the blend band), and tiling forced at exactly the
/// latents' size (a second, 4-cell row and column wholly inside the blend band): all
/// three where diffusers' seams are aligned, so this is diffusers' formula itself.
fn matches_assembly_by_hand<B: FusedOps>(device: &B::Device) {
    let reference = Host::of(ref_tensor::<B, 4>("vae.decode.in", device));
    check_against_hand::<B>(
        &[
            ("reference 16x16, tile 8", reference.clone(), 8),
            ("batch 2, 12x20, tile 8", noise(7, [2, 4, 12, 20]), 8),
            ("reference 16x16, forced tile 16", reference, 16),
        ],
        device,
    );
}
crate::on_backends!(vae_tiling_by_hand, matches_assembly_by_hand);

/// Where diffusers misplaces its seams, against the same assembly by hand: tiles whose
/// stride is not whole (9 cells: stride 6, not 6.75; 10 cells on 12×20, the size that
/// came out 8 and 4 pixels too large) and a tile cut by the edge before the last (8
/// cells on 19 rows: the tile at 12 ends at the edge, one at 18 follows). On the CPU
/// alone: where the tiles go is the backend-independent assembly (the wgpu decode of
/// tiles is checked above), and each new tile shape costs the software Vulkan minutes
/// of kernel compilation.
#[test]
fn vae_tiling_unaligned_by_hand() {
    let device = Default::default();
    let reference = Host::of(ref_tensor::<Cpu, 4>("vae.decode.in", &device));
    check_against_hand::<Cpu>(
        &[
            ("reference 16x16, tile 9 (stride 6 of 6.75)", reference, 9),
            (
                "12x20, tile 10 (stride 7 of 7.5)",
                noise(11, [1, 4, 12, 20]),
                10,
            ),
            (
                "19x14, tile 8, cut before the last",
                noise(5, [1, 4, 19, 14]),
                8,
            ),
        ],
        &device,
    );
}

/// Each case's tiled decode has the latents' size in pixels, equals the assembly by hand
/// and differs from the untiled decode (or the comparison could not catch a blending or
/// cropping mistake).
fn check_against_hand<B: FusedOps>(cases: &[(&str, Host, usize)], device: &B::Device) {
    let vae = fixture_vae::<B>(device);
    let f = factor(&vae);
    for (what, latents, tile) in cases {
        let tiling = VaeTiling::latent(*tile, f);
        let got = Host::of(
            vae.tiled_decode(latents.tensor::<B>(device), &tiling)
                .expect("tiled_decode"),
        );
        let want = assemble_by_hand(&vae, latents, *tile, device);
        let [n, _, h, w] = latents.dims;
        assert_eq!(got.dims, [n, 3, h * f, w * f], "{what}: shape");
        assert_eq!(got.dims, want.dims, "{what}: shape by hand");
        assert!(got.data.iter().all(|v| v.is_finite()), "{what}: non-finite");
        let err = rel_error(&got.data, &want.data);
        let plain = Host::of(vae.decode(latents.tensor::<B>(device)));
        let vs_plain = rel_error(&got.data, &plain.data);
        eprintln!("{what}: relative error {err:.3e} vs by hand; {vs_plain:.3e} vs untiled");
        assert!(
            err <= TOL_F32,
            "{what}: relative error {err:.3e} > {TOL_F32:.0e}"
        );
        assert!(
            vs_plain > 100.0 * TOL_F32,
            "{what}: tiled decode is too close to the untiled one ({vs_plain:.3e}) to test anything"
        );
    }
}

/// `VaeTiling::new` follows diffusers' defaults (SDXL: 1024 px, 128 cells, stride 96,
/// blend 256 px, keep 768 px) and refuses tile sizes that are not whole latent cells.
#[test]
fn vae_tiling_parameters() {
    let sdxl: VaeConfig = serde_json::from_value(serde_json::json!({
        "sample_size": 1024,
        "block_out_channels": [128, 256, 512, 512],
    }))
    .expect("config parses");
    let t = VaeTiling::new(&sdxl, VaeTileSize::Config).expect("default tiling");
    assert_eq!((t.tile_latent, t.tile_sample), (128, 1024));
    assert_eq!((t.stride(), t.blend_extent()), (96, 256));
    // 160 cells (1280 px): tiles at 0 and 96, the first kept for 96 cells (diffusers'
    // row limit of 768 px), the last whole.
    let spans: Vec<_> = t
        .axis(160, 8)
        .iter()
        .map(|s| (s.start, s.cells, s.keep))
        .collect();
    assert_eq!(spans, [(0, 128, 768), (96, 64, 512)]);
    assert!(
        !t.applies(128, 128),
        "1024² is not tiled by default, as in diffusers"
    );
    assert!(t.applies(128, 129) && t.applies(160, 96));
    let small = VaeTiling::new(&sdxl, VaeTileSize::Pixels(512)).expect("512 px tiles");
    assert_eq!((small.tile_latent, small.tile_sample), (64, 512));
    for bad in [0, 60] {
        match VaeTiling::new(&sdxl, VaeTileSize::Pixels(bad)) {
            Err(Error::InvalidArgument { name, .. }) => assert_eq!(name, "vae_tiling"),
            other => panic!("{bad} px: expected InvalidArgument, got {other:?}"),
        }
    }
    // A one-cell tile has no stride (int(0.75) = 0) and would never advance.
    assert!(VaeTiling::latent(1, 8).validate().is_err());
    let no_overlap = VaeTiling {
        overlap: 1.0,
        ..VaeTiling::latent(8, 8)
    };
    assert!(no_overlap.validate().is_err());
}

/// `--vae-tiling` alone takes the config's tile; `--vae-tiling=PIXELS` a size; on
/// `serve` a bare flag does not swallow the positional model.
#[test]
fn vae_tiling_flags() {
    let generate = |extra: &[&str]| {
        let mut args = vec!["hypergen", "generate", "--model", "m", "--prompt", "p"];
        args.extend_from_slice(extra);
        match Cli::try_parse_from(args).expect("flags parse").command {
            Command::Generate(g) => g.load.run_options().vae_tiling,
            _ => panic!("not generate"),
        }
    };
    assert_eq!(generate(&[]), None);
    assert_eq!(generate(&["--vae-tiling"]), Some(VaeTileSize::Config));
    assert_eq!(
        generate(&["--vae-tiling=512"]),
        Some(VaeTileSize::Pixels(512))
    );
    assert!(Cli::try_parse_from([
        "hypergen",
        "generate",
        "--model",
        "m",
        "--prompt",
        "p",
        "--vae-tiling=big"
    ])
    .is_err());

    let cli =
        Cli::try_parse_from(["hypergen", "serve", "--vae-tiling", "m"]).expect("serve parses");
    let Command::Serve(args) = cli.command else {
        panic!("not serve")
    };
    assert_eq!(args.model, "m");
    let (config, _) = args.server_config().expect("config");
    assert_eq!(config.worker.run.vae_tiling, Some(VaeTileSize::Config));
}

/// The pipeline option reaches the decode: tiles of half the reference latents change
/// the image, tiles that hold the latents whole leave it exactly as untiled.
#[test]
fn vae_tiling_pipeline_option() {
    let device = Default::default();
    let load = |vae_tiling| {
        let run = RunOptions { vae_tiling };
        crate::common::fixture_pipeline_with::<Cpu>(DType::F32, &Default::default(), &run, &device)
    };
    let mut pipeline = load(None);
    assert!(pipeline.vae_tiling().is_none());
    let f = pipeline.vae_scale_factor();
    // The reference run's latent size, from the reference tensors.
    let init = crate::common::reference("pipe.init_latents");
    let [_, c, h, w] = <[usize; 4]>::try_from(init.shape.clone()).expect("rank 4");
    let half = h.max(w).div_ceil(2);
    let small = load(Some(VaeTileSize::Pixels(half * f)));
    assert_eq!(small.vae_tiling(), Some(&VaeTiling::latent(half, f)));

    let latents = noise(3, [1, c, h, w]).tensor::<Cpu>(&device);
    let image = |p: &SdxlPipeline<Cpu>| {
        let mut images = p.decode(latents.clone()).expect("decode");
        assert_eq!(images.len(), 1);
        images.remove(0)
    };
    let plain = image(&pipeline);
    let tiled = image(&small);
    assert_eq!((tiled.width, tiled.height), (w * f, h * f));
    assert_ne!(
        tiled.rgb, plain.rgb,
        "tiles of half the latents must take effect"
    );
    pipeline
        .set_vae_tiling(Some(VaeTileSize::Pixels(h.max(w) * f)))
        .expect("tiles of the whole latents");
    assert_eq!(image(&pipeline).rgb, plain.rgb, "no tiling within one tile");
    pipeline
        .set_vae_tiling(Some(VaeTileSize::Config))
        .expect("default tiling");
    let config = VaeTiling::new(pipeline.components().vae.config(), VaeTileSize::Config)
        .expect("config tiling");
    assert_eq!(pipeline.vae_tiling(), Some(&config));

    // The same through a whole (one-step) generation.
    let req = hypergen::pipeline::GenerationRequest {
        prompt: "a cat".into(),
        num_inference_steps: 1,
        width: w * f,
        height: h * f,
        ..Default::default()
    };
    let mut go = |_| ControlFlow::Continue(());
    pipeline.set_vae_tiling(None).expect("unset tiling");
    let before = pipeline.generate(&req, &mut go).expect("generate");
    let after = small.generate(&req, &mut go).expect("generate tiled");
    assert_eq!(before.latents.dims(), after.latents.dims());
    assert_ne!(before.images[0].rgb, after.images[0].rgb);
    pipeline
        .set_vae_tiling(Some(VaeTileSize::Pixels(h.max(w) * f)))
        .expect("tiles of the whole latents");
    let again = pipeline.generate(&req, &mut go).expect("generate again");
    assert_eq!(before.images[0].rgb, again.images[0].rgb);
}
