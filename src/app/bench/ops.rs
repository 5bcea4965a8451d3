//! The op microbenchmark: SDXL's hot ops at their real shapes for a given image size,
//! each with its FLOP and byte count, achieved GFLOP/s and GB/s. The fused ops are
//! called through [`FusedOps`] (so they time whatever kernels the backend has and
//! `HYPERGEN_KERNELS` leaves on) beside their plain-Burn references in
//! [`crate::kernels::plain`].

use burn::tensor::{DType, Distribution, Tensor};
use serde::Serialize;

use super::{measure, sync, Timing};
use crate::error::{Error, Result};
use crate::kernels::plain;
use crate::FusedOps;

/// What the op benchmark runs.
#[derive(Debug, Clone, PartialEq)]
pub struct OpBench {
    /// `(width, height)` image sizes, pixels (multiples of 64); the ops take the shapes
    /// SDXL gives them at each.
    pub sizes: Vec<(usize, usize)>,
    /// Images per UNet call; the UNet ops get twice as many rows (classifier-free
    /// guidance), the VAE ops this many.
    pub batch: usize,
    /// Only the ops whose name contains this.
    pub filter: Option<String>,
}

/// The shape of one op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpShape {
    /// 3×3 convolution, stride 1, padding 1: `[n, cin, h, w]` → `[n, cout, h, w]`.
    Conv3x3 {
        /// Batch.
        n: usize,
        /// Input channels.
        cin: usize,
        /// Output channels.
        cout: usize,
        /// Height.
        h: usize,
        /// Width.
        w: usize,
    },
    /// `[m, k] × [k, n]`.
    Matmul {
        /// Rows (tokens).
        m: usize,
        /// Inner dimension.
        k: usize,
        /// Columns.
        n: usize,
    },
    /// GroupNorm (+SiLU) over `[n, c, l]`.
    GroupNorm {
        /// Batch.
        n: usize,
        /// Channels.
        c: usize,
        /// Spatial length.
        l: usize,
        /// Groups.
        groups: usize,
        /// Whether SiLU follows.
        silu: bool,
    },
    /// GEGLU on `[n, l, 2·inner]`.
    Geglu {
        /// Batch.
        n: usize,
        /// Tokens.
        l: usize,
        /// Output width.
        inner: usize,
    },
    /// Attention of `[n, heads, l, d]` queries over `s` keys.
    Attention {
        /// Batch.
        n: usize,
        /// Heads.
        heads: usize,
        /// Queries.
        l: usize,
        /// Keys.
        s: usize,
        /// Head width.
        d: usize,
    },
}

impl OpShape {
    /// Arithmetic of one call, FLOP (multiply-adds count 2; GroupNorm about 8 per
    /// element, SiLU 4 more; GEGLU's erf GELU about 12 per output; attention the two
    /// products only).
    pub fn flop(&self) -> f64 {
        match *self {
            OpShape::Conv3x3 { n, cin, cout, h, w } => 2.0 * (n * h * w * cout * cin * 9) as f64,
            OpShape::Matmul { m, k, n } => 2.0 * (m * k * n) as f64,
            OpShape::GroupNorm { n, c, l, silu, .. } => {
                (n * c * l) as f64 * if silu { 12.0 } else { 8.0 }
            }
            OpShape::Geglu { n, l, inner } => 12.0 * (n * l * inner) as f64,
            OpShape::Attention { n, heads, l, s, d } => 4.0 * (n * heads * l * s * d) as f64,
        }
    }

    /// The least memory traffic of one call (each input read once, the output written
    /// once), in elements.
    pub fn elements_moved(&self) -> f64 {
        (match *self {
            OpShape::Conv3x3 { n, cin, cout, h, w } => {
                n * cin * h * w + cout * cin * 9 + n * cout * h * w
            }
            OpShape::Matmul { m, k, n } => m * k + k * n + m * n,
            OpShape::GroupNorm { n, c, l, .. } => 2 * n * c * l + 2 * c,
            OpShape::Geglu { n, l, inner } => 3 * n * l * inner,
            OpShape::Attention { n, heads, l, s, d } => n * heads * d * (2 * l + 2 * s),
        }) as f64
    }

    /// The shape, as the table prints it.
    pub fn describe(&self) -> String {
        match *self {
            OpShape::Conv3x3 { n, cin, cout, h, w } => format!("[{n},{cin},{h},{w}]→{cout}"),
            OpShape::Matmul { m, k, n } => format!("[{m},{k}]×[{k},{n}]"),
            OpShape::GroupNorm {
                n, c, l, groups, ..
            } => format!("[{n},{c},{l}] g{groups}"),
            OpShape::Geglu { n, l, inner } => format!("[{n},{l},{}]", 2 * inner),
            OpShape::Attention { n, heads, l, s, d } => format!("[{n},{heads},{l},{d}]×{s}"),
        }
    }
}

/// One timed op variant.
#[derive(Debug, Clone, Serialize)]
pub struct OpMeasurement {
    /// The op (`unet.conv3x3.320`, `vae.attention`, …).
    pub name: String,
    /// `fused` (the [`FusedOps`] method), `ours` (our flash kernel alone) or `plain`
    /// (its plain-Burn reference).
    pub variant: &'static str,
    /// The image size whose shapes these are.
    pub width: usize,
    /// The image height.
    pub height: usize,
    /// The tensor shape.
    pub shape: String,
    /// Arithmetic of one call, FLOP.
    pub flop: f64,
    /// Least memory traffic of one call, bytes.
    pub bytes: f64,
    /// Time of one call.
    pub timing: Timing,
    /// `flop` over the median time, GFLOP/s.
    pub gflops: f64,
    /// `bytes` over the median time, GB/s.
    pub gbps: f64,
}

/// The ops SDXL runs at `width × height` with `rows` UNet rows and `images` VAE images:
/// `(name, shape)`.
pub fn cases(width: usize, height: usize, rows: usize, images: usize) -> Vec<(String, OpShape)> {
    let (h, w) = (height / 8, width / 8);
    let l = |div: usize| (h / div) * (w / div);
    let mut v: Vec<(String, OpShape)> = Vec::new();
    for (div, c) in [(1, 320), (2, 640), (4, 1280)] {
        let (ch, cw) = (h / div, w / div);
        v.push((
            format!("unet.conv3x3.{c}"),
            OpShape::Conv3x3 {
                n: rows,
                cin: c,
                cout: c,
                h: ch,
                w: cw,
            },
        ));
        v.push((
            format!("unet.group_norm_silu.{c}"),
            OpShape::GroupNorm {
                n: rows,
                c,
                l: l(div),
                groups: 32,
                silu: true,
            },
        ));
    }
    for (div, c, heads) in [(2, 640, 10), (4, 1280, 20)] {
        let tokens = rows * l(div);
        v.push((
            format!("unet.linear.{c}x{c}"),
            OpShape::Matmul {
                m: tokens,
                k: c,
                n: c,
            },
        ));
        v.push((
            format!("unet.linear.ff_in.{c}"),
            OpShape::Matmul {
                m: tokens,
                k: c,
                n: 8 * c,
            },
        ));
        v.push((
            format!("unet.linear.ff_out.{c}"),
            OpShape::Matmul {
                m: tokens,
                k: 4 * c,
                n: c,
            },
        ));
        v.push((
            format!("unet.geglu.{c}"),
            OpShape::Geglu {
                n: rows,
                l: l(div),
                inner: 4 * c,
            },
        ));
        v.push((
            format!("unet.self_attention.{c}"),
            OpShape::Attention {
                n: rows,
                heads,
                l: l(div),
                s: l(div),
                d: 64,
            },
        ));
        v.push((
            format!("unet.cross_attention.{c}"),
            OpShape::Attention {
                n: rows,
                heads,
                l: l(div),
                s: 77,
                d: 64,
            },
        ));
        v.push((
            format!("unet.linear.cross_kv.{c}"),
            OpShape::Matmul {
                m: rows * 77,
                k: 2048,
                n: c,
            },
        ));
    }
    // The VAE decoder: 512 channels at the latent size and twice it, 256 at four times,
    // 128 at full size; one 512-wide head over every latent pixel in its mid block.
    for (mul, c) in [(1, 512), (2, 512), (4, 256), (8, 128)] {
        let (ch, cw) = (h * mul, w * mul);
        v.push((
            format!("vae.conv3x3.{c}@{ch}"),
            OpShape::Conv3x3 {
                n: images,
                cin: c,
                cout: c,
                h: ch,
                w: cw,
            },
        ));
        v.push((
            format!("vae.group_norm_silu.{c}@{ch}"),
            OpShape::GroupNorm {
                n: images,
                c,
                l: ch * cw,
                groups: 32,
                silu: true,
            },
        ));
    }
    v.push((
        "vae.attention".into(),
        OpShape::Attention {
            n: images,
            heads: 1,
            l: h * w,
            s: h * w,
            d: 512,
        },
    ));
    v
}

fn bytes_per_element(dtype: DType) -> f64 {
    dtype.size() as f64
}

/// Runs one op's variants.
fn run_case<B: FusedOps>(
    shape: OpShape,
    dtype: DType,
    device: &B::Device,
    warmup: usize,
    iters: usize,
) -> Result<Vec<(&'static str, Timing)>> {
    let normal = Distribution::Normal(0.0, 1.0);
    let small = Distribution::Normal(0.0, 0.02);
    let opts = (device, dtype);
    let mut out = Vec::new();
    match shape {
        OpShape::Conv3x3 { n, cin, cout, h, w } => {
            let x = Tensor::<B, 4>::random([n, cin, h, w], normal, opts);
            let k = Tensor::<B, 4>::random([cout, cin, 3, 3], small, opts);
            let b = Tensor::<B, 1>::random([cout], small, opts);
            sync::<B>(device)?;
            out.push((
                "fused",
                measure::<B, _>(device, warmup, iters, || {
                    Ok(B::fused_conv2d(x.clone(), k.clone(), Some(b.clone()), 1, 1))
                })?,
            ));
            out.push((
                "plain",
                measure::<B, _>(device, warmup, iters, || {
                    Ok(plain::conv2d(x.clone(), k.clone(), Some(b.clone()), 1, 1))
                })?,
            ));
        }
        OpShape::Matmul { m, k, n } => {
            let a = Tensor::<B, 2>::random([m, k], normal, opts);
            let b = Tensor::<B, 2>::random([k, n], small, opts);
            sync::<B>(device)?;
            out.push((
                "fused",
                measure::<B, _>(device, warmup, iters, || {
                    Ok(B::fused_linear(a.clone(), b.clone(), None))
                })?,
            ));
            out.push((
                "plain",
                measure::<B, _>(device, warmup, iters, || {
                    Ok(plain::linear(a.clone(), b.clone(), None))
                })?,
            ));
        }
        OpShape::GroupNorm {
            n,
            c,
            l,
            groups,
            silu,
        } => {
            let x = Tensor::<B, 3>::random([n, c, l], normal, opts);
            let g = Tensor::<B, 1>::random([c], normal, opts);
            let b = Tensor::<B, 1>::random([c], normal, opts);
            let affine = || Some((g.clone(), b.clone()));
            sync::<B>(device)?;
            out.push((
                "fused",
                measure::<B, _>(device, warmup, iters, || {
                    Ok(B::fused_group_norm(x.clone(), affine(), groups, 1e-5, silu))
                })?,
            ));
            out.push((
                "plain",
                measure::<B, _>(device, warmup, iters, || {
                    Ok(plain::group_norm(x.clone(), affine(), groups, 1e-5, silu))
                })?,
            ));
        }
        OpShape::Geglu { n, l, inner } => {
            let x = Tensor::<B, 3>::random([n, l, 2 * inner], normal, opts);
            sync::<B>(device)?;
            out.push((
                "fused",
                measure::<B, _>(device, warmup, iters, || Ok(B::fused_geglu(x.clone())))?,
            ));
            out.push((
                "plain",
                measure::<B, _>(device, warmup, iters, || Ok(plain::geglu(x.clone())))?,
            ));
        }
        OpShape::Attention { n, heads, l, s, d } => {
            let q = Tensor::<B, 4>::random([n, heads, l, d], normal, opts);
            let k = Tensor::<B, 4>::random([n, heads, s, d], normal, opts);
            let v = Tensor::<B, 4>::random([n, heads, s, d], normal, opts);
            sync::<B>(device)?;
            out.push((
                "fused",
                measure::<B, _>(device, warmup, iters, || {
                    Ok(B::fused_attention(q.clone(), k.clone(), v.clone()))
                })?,
            ));
            // Our flash kernel alone, where the backend has it (the fused path may pick
            // Burn's tensor-core kernels instead).
            if B::flash_attention(q.clone(), k.clone(), v.clone()).is_some() {
                out.push((
                    "ours",
                    measure::<B, _>(device, warmup, iters, || {
                        B::flash_attention(q.clone(), k.clone(), v.clone())
                            .ok_or_else(|| Error::Backend("no flash kernel here".into()))
                    })?,
                ));
            }
            out.push((
                "plain",
                measure::<B, _>(device, warmup, iters, || {
                    Ok(plain::attention_full(q.clone(), k.clone(), v.clone()))
                })?,
            ));
        }
    }
    Ok(out)
}

/// Runs the op benchmark in `dtype` on `device`; `log` is told each result.
pub fn run<B: FusedOps>(
    bench: &OpBench,
    dtype: DType,
    device: &B::Device,
    warmup: usize,
    iters: usize,
    log: &mut dyn FnMut(&OpMeasurement),
) -> Result<Vec<OpMeasurement>> {
    let mut out = Vec::new();
    for &(width, height) in &bench.sizes {
        for (name, shape) in cases(width, height, 2 * bench.batch, bench.batch) {
            if let Some(filter) = &bench.filter {
                if !name.contains(filter.as_str()) {
                    continue;
                }
            }
            for (variant, timing) in run_case::<B>(shape, dtype, device, warmup, iters)? {
                let flop = shape.flop();
                let bytes = shape.elements_moved() * bytes_per_element(dtype);
                let m = OpMeasurement {
                    name: name.clone(),
                    variant,
                    width,
                    height,
                    shape: shape.describe(),
                    flop,
                    bytes,
                    gflops: flop / timing.median_s / 1e9,
                    gbps: bytes / timing.median_s / 1e9,
                    timing,
                };
                log(&m);
                out.push(m);
            }
        }
    }
    Ok(out)
}
