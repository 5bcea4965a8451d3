//! 2-d convolution on f32 NCHW data as tiled GEMMs, tasks on Flex's rayon pool.
//!
//! Flex's own convolution copies the whole input to NHWC, rebuilds the flattened weight
//! on every call, fills its im2col tiles one element at a time and scatters each GEMM
//! result back transposed: on SDXL's small-channel VAE layers those copies took longer
//! than the arithmetic. Here nothing is transposed:
//!
//! - The weight `[Co, Ci, Kh, Kw]` already is the GEMM's `[Co, K]` matrix (`K = Ci·Kh·Kw`)
//!   in its own memory order, so it is used as it is.
//! - A task takes one image and a block of whole output rows. Its im2col block
//!   `[K, P]` (P = the block's pixels) has one row per (input channel, kernel row,
//!   kernel column); with stride 1 each of its segments is a contiguous run of one input
//!   row, copied with `copy_from_slice` between zeroed padding.
//! - One GEMM per task writes `outᵀ [P, Co] = colᵀ · Wᵀ` straight into the NCHW output
//!   (pixels contiguous, channels `Ho·Wo` apart: the column-major destination GEMM's
//!   micro-kernel wants), then the bias is added while the block is in cache.
//! - 1×1 convolutions with stride 1 and no padding skip im2col: the input is the GEMM's
//!   operand as it lies.
//! - A nearest-neighbour upsampling before the convolution (the decoders' `Upsample2D`)
//!   is read through in im2col, each source value written to two columns: the upsampled
//!   image, four times the input, is never stored (1 GiB at the VAE's last upsampling in a
//!   1024² decode).

use std::cell::RefCell;

use rayon::prelude::*;

use super::{gemm_split, SharedPtr};

/// Target size of one task's im2col block. Larger blocks amortise GEMM's packing of the
/// weight over more pixels; smaller ones stay in cache and give more tasks. 1 MiB
/// measured best on the VAE's 32–512-channel layers (256 KiB–16 MiB tried; at 4 MiB the
/// 32-channel 256² layer took 15 ms instead of 9).
const COL_BYTES: usize = 1 << 20;

/// Fewest output pixels per task unless that leaves a thread without work.
const MIN_PIXELS: usize = 256;

/// Up to this many output pixels over the whole batch, all images go through one GEMM
/// ([`batched`]).
const BATCH_PIXELS: usize = 512;

/// Shape and options of one convolution (dilation 1, one group).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Params {
    /// Batch, input channels, input height and width.
    pub input: [usize; 4],
    /// Output channels.
    pub out_channels: usize,
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Stride (both axes).
    pub stride: usize,
    /// Zero padding (both axes, both sides).
    pub padding: usize,
    /// Nearest-neighbour upsampling factor applied to the input before the convolution
    /// (1: none); `input` holds the size before it.
    pub upsample: usize,
}

impl Params {
    /// Output height and width, `None` when the kernel does not fit the padded input.
    pub(crate) fn output_size(&self) -> Option<[usize; 2]> {
        let [h, w] = self.upsampled();
        let [kh, kw] = self.kernel;
        let (ph, pw) = (h + 2 * self.padding, w + 2 * self.padding);
        if self.stride == 0 || self.upsample == 0 || kh == 0 || kw == 0 || kh > ph || kw > pw {
            return None;
        }
        Some([(ph - kh) / self.stride + 1, (pw - kw) / self.stride + 1])
    }

    /// Height and width of the image the kernel slides over: the input after upsampling.
    pub(super) fn upsampled(&self) -> [usize; 2] {
        let [_, _, h, w] = self.input;
        [h * self.upsample, w * self.upsample]
    }

    fn k(&self) -> usize {
        self.input[1] * self.kernel[0] * self.kernel[1]
    }

    fn pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == 1 && self.padding == 0 && self.upsample == 1
    }
}

thread_local! {
    /// Each thread's im2col block, kept between calls so tasks neither allocate nor
    /// fault in fresh pages.
    static COL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `x` `[N, Ci, H, W]`, upsampled `p.upsample`× (nearest), convolved with `weight`
/// `[Co, Ci, Kh, Kw]` (+ `bias` `[Co]`), all contiguous f32: `[N, Co, Ho, Wo]` contiguous.
///
/// # Panics
/// If the slices' lengths do not match `p`, or the kernel does not fit the input.
pub(crate) fn conv2d(x: &[f32], weight: &[f32], bias: Option<&[f32]>, p: Params) -> Vec<f32> {
    let [n, ci, h, w] = p.input;
    let co = p.out_channels;
    let [ho, wo] = p
        .output_size()
        .expect("kernel larger than the padded input");
    let k = p.k();
    assert_eq!(x.len(), n * ci * h * w, "input length");
    assert_eq!(weight.len(), co * k, "weight length");
    assert!(bias.is_none_or(|b| b.len() == co), "bias length");
    let plane = ho * wo;
    let len = n * co * plane;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    if len == 0 {
        return out;
    }
    if k == 0 {
        // No input channels: the output is the bias.
        for _ in 0..n {
            for c in 0..co {
                let b = bias.map_or(0.0, |b| b[c]);
                out.extend(std::iter::repeat_n(b, plane));
            }
        }
        return out;
    }

    if n > 1 && n * plane <= BATCH_PIXELS {
        batched(x, weight, bias, p, [ho, wo], &mut out);
        return out;
    }

    // Whole output rows per task: about COL_BYTES of im2col, at least MIN_PIXELS, fewer
    // when that leaves threads idle.
    let threads = rayon::current_num_threads().max(1);
    // Pointwise convolutions build no im2col: their blocks are bounded by the rest.
    let mut rows = if p.pointwise() {
        ho
    } else {
        (COL_BYTES / (k * wo * 4)).max(1)
    };
    rows = rows.max(MIN_PIXELS.div_ceil(wo)).min(ho);
    let tasks_for = |rows: usize| n * ho.div_ceil(rows);
    while rows > 1 && tasks_for(rows) < threads {
        rows = rows.div_ceil(2);
    }
    let blocks = ho.div_ceil(rows);
    let tasks = n * blocks;
    // Too few tasks to fill the pool (a single small image): GEMM splits each itself.
    let split_inside = tasks < threads;
    let inner = if split_inside {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };

    let out_ptr = SharedPtr(out.as_mut_ptr());
    let task = |t: usize| {
        let (img, block) = (t / blocks, t % blocks);
        let r0 = block * rows;
        let r1 = (r0 + rows).min(ho);
        let pixels = (r1 - r0) * wo;
        let x_img = &x[img * ci * h * w..(img + 1) * ci * h * w];
        let dst = out_ptr.get().wrapping_add(img * co * plane + r0 * wo);
        let run = |lhs: *const f32, lhs_cs: isize| {
            // SAFETY: `lhs` addresses a live `pixels × k` matrix with unit row stride and
            // column stride `lhs_cs`; `weight` is `co × k` row-major (read as `Wᵀ`);
            // `dst` addresses this task's own pixels of every output channel inside
            // `out`'s capacity, written without being read (`read_dst` false).
            unsafe {
                gemm::gemm(
                    pixels,
                    co,
                    k,
                    dst,
                    plane as isize,
                    1,
                    false,
                    lhs,
                    lhs_cs,
                    1,
                    weight.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    inner,
                );
            }
        };
        if p.pointwise() {
            run(x_img.as_ptr().wrapping_add(r0 * wo), (h * w) as isize);
        } else {
            // Taken out, not borrowed: a GEMM that splits itself lets this thread run
            // other pool tasks meanwhile, and they may convolve too.
            let mut col = COL.take();
            col.resize(k * pixels, 0.0);
            im2col(x_img, &mut col[..k * pixels], p, [r0, r1], wo, pixels);
            run(col.as_ptr(), pixels as isize);
            COL.set(col);
        }
        if let Some(bias) = bias {
            for (c, &b) in bias.iter().enumerate() {
                // SAFETY: channel `c`'s pixels of this task, initialised by the GEMM.
                let row =
                    unsafe { std::slice::from_raw_parts_mut(dst.wrapping_add(c * plane), pixels) };
                row.iter_mut().for_each(|v| *v += b);
            }
        }
    };
    if split_inside {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
    // SAFETY: the tasks wrote every element: all images, all row blocks, all channels.
    unsafe { out.set_len(len) };
    out
}

/// The small-image case: every image's im2col side by side as one `[K, N·P]` matrix, one
/// GEMM split across the threads into a scratch `[Co, N·P]`, then copied out per image
/// with the bias. One GEMM packs the weight once where per-image tasks would pack it once
/// per image, and with guidance's two rows at SDXL's 8×8 level each would get 64 rows.
fn batched(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    p: Params,
    [ho, wo]: [usize; 2],
    out: &mut Vec<f32>,
) {
    let [n, ci, h, w] = p.input;
    let co = p.out_channels;
    let (k, plane) = (p.k(), ho * wo);
    let cols = n * plane;
    let mut prod = vec![0.0; co * cols];
    // Taken out, not borrowed, across the parallel GEMM (as above).
    let mut col = COL.take();
    col.resize(k * cols, 0.0);
    for img in 0..n {
        let x_img = &x[img * ci * h * w..(img + 1) * ci * h * w];
        im2col(x_img, &mut col[img * plane..k * cols], p, [0, ho], wo, cols);
    }
    gemm_batched(&col, weight, &mut prod, [cols, co, k]);
    COL.set(col);
    for img in 0..n {
        for (c, row) in prod.chunks_exact(cols).enumerate() {
            let b = bias.map_or(0.0, |b| b[c]);
            out.extend(row[img * plane..(img + 1) * plane].iter().map(|v| v + b));
        }
    }
}

/// `prodᵀ [cols, co] = colᵀ · Wᵀ`, split across the threads.
fn gemm_batched(col: &[f32], weight: &[f32], prod: &mut [f32], [cols, co, k]: [usize; 3]) {
    assert!(col.len() >= k * cols && weight.len() == co * k && prod.len() == co * cols);
    // SAFETY: `col` is `k × cols` row-major (read as its transpose, `cols × k`),
    // `weight` `co × k` row-major (read as `Wᵀ`), `prod` `co × cols` (written as its
    // transpose, `cols × co`).
    unsafe {
        gemm_split::gemm(
            [cols, co, k],
            prod.as_mut_ptr(),
            (cols as isize, 1),
            false,
            col.as_ptr(),
            (cols as isize, 1),
            weight.as_ptr(),
            (k as isize, 1),
        );
    }
}

/// Fills the first `P` columns of `col` `[K, row_stride]` for output rows `r0..r1` of one
/// image `x` `[Ci, H, W]`: row `(c, ky, kx)` holds, for each output pixel, the input
/// value under that kernel tap (zero in the padding).
fn im2col(
    x: &[f32],
    col: &mut [f32],
    p: Params,
    [r0, r1]: [usize; 2],
    wo: usize,
    row_stride: usize,
) {
    let [_, ci, src_h, src_w] = p.input;
    // Taps index the upsampled image; `u` maps them back to the stored one.
    let [h, w] = p.upsampled();
    let (u, src_plane) = (p.upsample, src_h * src_w);
    let [kh, kw] = p.kernel;
    let (s, pad) = (p.stride, p.padding);
    let pixels = (r1 - r0) * wo;
    let mut rows = col.chunks_mut(row_stride).map(|row| &mut row[..pixels]);
    for c in 0..ci {
        let x_c = &x[c * src_plane..(c + 1) * src_plane];
        for ky in 0..kh {
            for kx in 0..kw {
                let dst = rows.next().expect("one col row per tap");
                // Output columns whose tap lands inside the input: iw = ox·s + kx − pad.
                let lo = pad.saturating_sub(kx).div_ceil(s).min(wo);
                let hi = if w + pad > kx {
                    ((w + pad - kx - 1) / s + 1).clamp(lo, wo)
                } else {
                    lo
                };
                for (r, seg) in (r0..r1).zip(dst.chunks_exact_mut(wo)) {
                    let ih = (r * s + ky).wrapping_sub(pad);
                    if ih >= h || lo == hi {
                        seg.fill(0.0);
                        continue;
                    }
                    let src_row = ih / u;
                    let src = &x_c[src_row * src_w..(src_row + 1) * src_w];
                    seg[..lo].fill(0.0);
                    seg[hi..].fill(0.0);
                    let first = lo * s + kx - pad;
                    match (s, u) {
                        (1, 1) => seg[lo..hi].copy_from_slice(&src[first..first + (hi - lo)]),
                        (1, 2) => fill_doubled(&mut seg[lo..hi], src, first),
                        _ => {
                            for (j, d) in seg[lo..hi].iter_mut().enumerate() {
                                *d = src[(first + j * s) / u];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `dst[j] = src[(first + j) / 2]`: a row of the 2× upsampled image from `first` on.
pub(super) fn fill_doubled(dst: &mut [f32], src: &[f32], first: usize) {
    let (head, src) = if first % 2 == 1 && !dst.is_empty() {
        dst[0] = src[first / 2];
        (1, &src[first / 2 + 1..])
    } else {
        (0, &src[first / 2..])
    };
    let dst = &mut dst[head..];
    let last_src = dst.len().saturating_sub(1) / 2;
    let mut pairs = dst.chunks_exact_mut(2);
    for (pair, &v) in (&mut pairs).zip(src) {
        pair[0] = v;
        pair[1] = v;
    }
    if let [last] = pairs.into_remainder() {
        *last = src[last_src];
    }
}
