//! 3×3 convolutions with stride 1 and padding 1 by Winograd's minimal filtering
//! F(2×2, 3×3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015):
//! 16 products per 2×2 output tile and channel pair where the direct convolution takes
//! 36, so the GEMMs that are nearly all of a convolution's time do 2.25× less work.
//!
//! - The weight `g` of each channel pair becomes `U = G·g·Gᵀ` (4×4), stored
//!   `[16][Co][Ci]`: for each of the 16 positions `ξ` a `[Co, Ci]` matrix read as `Uᵀ`.
//!   It is transformed on every call, not kept: 16/9 of the weight again for every
//!   3×3 layer would raise the UNet's memory by about a gigabyte.
//! - Output tiles go in blocks of whole tile rows. Per block, each input channel's 4×4
//!   patches become `V = Bᵀ·d·B`, stored `[16][Ci][T]` (tiles contiguous); 16 GEMMs give
//!   `M_ξ [T, Co] = V_ξ · U_ξ`, stored `[16][Co][T]`; and each output channel's
//!   `Y = Aᵀ·M·A` (2×2 per tile, plus the bias) goes straight into the NCHW output.
//!   Every phase reads and writes along tiles, a row of the image at a time.
//! - Blocks are tasks on the pool while there are enough of them; an image too small
//!   for that is one block whose channels and 16 GEMMs are split across the threads.
//! - Taken only where it pays ([`applies`]): enough channels and enough tiles to repay
//!   transforming the weight on every call.
//! - A nearest-neighbour 2× upsampling before the convolution is read through when the
//!   patches are gathered, as the direct convolution's im2col does.
//!
//! The transforms' coefficients are 0, ±1 and ½, so rounding stays at the direct
//! convolution's level in f32 (F(4×4, 3×3) would save more products but its larger
//! coefficients cost accuracy).

use std::cell::RefCell;
use std::sync::Mutex;

use rayon::prelude::*;

use super::conv::{fill_doubled, Params};
use super::SharedPtr;

/// Fewest input and output channels taken. Below it in SDXL are only the 4-channel
/// `conv_in` and `conv_out` layers, whose 4-wide GEMMs gain nothing from fewer
/// products; at 32 channels (the tiny fixture's layers) Winograd measured level with the
/// direct convolution or faster (`cpu_ops`).
const MIN_CHANNELS: usize = 32;

/// Fewest output tiles over the batch taken. The weight's transform reads the weight,
/// writes 16/9 of it and the GEMMs read that back, all from memory in a model's step,
/// while the products saved grow with the tiles: in the full-size UNet's 512² step
/// (guidance's two rows) the 16² level (128 tiles) ran 0.9–1.7× the direct
/// convolution's time, the 32² level (512 tiles) 0.48–0.81× and the 64² level 0.53–0.70×.
const MIN_TILES_TOTAL: usize = 512;

/// Target bytes of one block's transformed input and GEMM result (`V` and `M`): large
/// blocks amortise GEMM's packing of `U` over more tiles, small ones stay in cache.
const BLOCK_BYTES: usize = 4 << 20;

/// Fewest tiles per block unless that leaves a thread without work.
const MIN_TILES: usize = 128;

/// Products per tile and channel pair: the 4×4 transformed patch.
const XI: usize = 16;

/// The transformed weight, kept between calls: a fresh buffer's page faults took most of
/// the transform's time. One for the process (convolutions run one at a time; one that
/// finds it taken, nested in another's tasks, allocates its own): up to 16/9 of the
/// largest 3×3 weight taken, 105 MB for the full-size UNet's 1280-channel upsampling.
static WEIGHT: Mutex<Vec<f32>> = Mutex::new(Vec::new());

thread_local! {
    /// Each thread's `V` and `M` block, kept between calls so tasks neither allocate
    /// nor fault in fresh pages.
    static BLOCK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether [`conv2d`] can compute this convolution: 3×3, stride 1, padding 1, after an
/// upsampling of 1× or 2×.
pub(crate) fn fits(p: &Params) -> bool {
    p.kernel == [3, 3] && p.stride == 1 && p.padding == 1 && matches!(p.upsample, 1 | 2)
}

/// Whether [`conv2d`] is worth it over the direct convolution (see [`MIN_CHANNELS`] and
/// [`MIN_TILES_TOTAL`]).
pub(crate) fn applies(p: &Params) -> bool {
    let ([n, ci, _, _], [h, w]) = (p.input, p.upsampled());
    let tiles = n * h.div_ceil(2) * w.div_ceil(2);
    fits(p) && ci >= MIN_CHANNELS && p.out_channels >= MIN_CHANNELS && tiles >= MIN_TILES_TOTAL
}

/// `x` `[N, Ci, H, W]`, upsampled `p.upsample`× (nearest), convolved with the 3×3
/// `weight` `[Co, Ci, 3, 3]` (+ `bias` `[Co]`), stride 1, padding 1, all contiguous f32:
/// `[N, Co, uH, uW]` contiguous.
///
/// # Panics
/// If [`fits`] is false for `p` or the slices' lengths do not match it.
pub(crate) fn conv2d(x: &[f32], weight: &[f32], bias: Option<&[f32]>, p: Params) -> Vec<f32> {
    assert!(
        fits(&p),
        "not a 3×3 convolution with stride 1 and padding 1: {p:?}"
    );
    let [n, ci, h, w] = p.input;
    let co = p.out_channels;
    assert_eq!(x.len(), n * ci * h * w, "input length");
    assert_eq!(weight.len(), co * ci * 9, "weight length");
    assert!(bias.is_none_or(|b| b.len() == co), "bias length");
    let [ho, wo] = p.upsampled();
    let len = n * co * ho * wo;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    if len == 0 {
        return out;
    }
    // Taken out, not borrowed, so the lock is not held across the pool's tasks.
    let mut u = WEIGHT
        .lock()
        .map(|mut w| std::mem::take(&mut *w))
        .unwrap_or_default();
    transform_weight(weight, ci, co, &mut u);
    let geo = Geometry {
        p,
        tiles: [ho.div_ceil(2), wo.div_ceil(2)],
    };
    let [th, tw] = geo.tiles;
    let tile_rows = n * th;

    // Whole tile rows per block: about BLOCK_BYTES, at least MIN_TILES, fewer while
    // that leaves threads idle.
    let threads = rayon::current_num_threads().max(1);
    let row_bytes = XI * (ci + co) * tw * 4;
    let mut rows = (BLOCK_BYTES / row_bytes)
        .max(MIN_TILES.div_ceil(tw))
        .clamp(1, tile_rows);
    while rows > 1 && tile_rows.div_ceil(rows) < threads && rows.div_ceil(2) * tw >= MIN_TILES {
        rows = rows.div_ceil(2);
    }
    let blocks = tile_rows.div_ceil(rows);
    let out_ptr = SharedPtr(out.as_mut_ptr());
    let run = |b: usize, parallel: bool| {
        let g = [b * rows, ((b + 1) * rows).min(tile_rows)];
        // Taken out, not borrowed: a thread waiting in this block's parallel phases may
        // run another convolution's tasks.
        let mut scratch = BLOCK.take();
        block(x, &u, bias, &geo, g, out_ptr, parallel, &mut scratch);
        BLOCK.set(scratch);
    };
    if blocks >= threads {
        (0..blocks).into_par_iter().for_each(|b| run(b, false));
    } else {
        // Too few blocks to fill the pool: one block at a time, each split inside.
        (0..blocks).for_each(|b| run(b, true));
    }
    if let Ok(mut kept) = WEIGHT.lock() {
        if kept.capacity() < u.capacity() {
            *kept = u;
        }
    }
    // SAFETY: the blocks wrote every element: all tile rows of all images, all channels.
    unsafe { out.set_len(len) };
    out
}

/// The convolution's shape in tiles.
struct Geometry {
    p: Params,
    /// Tile rows and columns of one image (2×2 outputs per tile).
    tiles: [usize; 2],
}

/// `U = G·g·Gᵀ` for every channel pair into `u` `[16][Co][Ci]`, with
/// `G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]]`.
fn transform_weight(weight: &[f32], ci: usize, co: usize, u: &mut Vec<f32>) {
    // Resized, not rebuilt: every element is written below, and a buffer kept between
    // calls costs no page faults (a fresh one took most of the transform's time).
    u.resize(XI * co * ci, 0.0);
    let u_ptr = SharedPtr(u.as_mut_ptr());
    let g_rows = |a: f32, b: f32, c: f32| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
    (0..co).into_par_iter().for_each(|o| {
        // A run of input channels at a time into `local` `[16][RUN]`, then 16 runs out:
        // 16 scattered streams one value at a time wrote at a fraction of the memory's
        // speed.
        const RUN: usize = 64;
        let mut local = [[0.0f32; RUN]; XI];
        for c0 in (0..ci).step_by(RUN) {
            let run = RUN.min(ci - c0);
            for (k, g) in weight[(o * ci + c0) * 9..][..run * 9]
                .chunks_exact(9)
                .enumerate()
            {
                // G·g: 4×3, column by column.
                let cols: [[f32; 4]; 3] = std::array::from_fn(|k| g_rows(g[k], g[3 + k], g[6 + k]));
                for i in 0..4 {
                    let row = g_rows(cols[0][i], cols[1][i], cols[2][i]);
                    for (j, v) in row.into_iter().enumerate() {
                        local[i * 4 + j][k] = v;
                    }
                }
            }
            for (xi, vals) in local.iter().enumerate() {
                // SAFETY: `(ξ, o, c0..c0 + run)` lies inside `u` and this task alone
                // writes output channel `o`.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        vals.as_ptr(),
                        u_ptr.get().add((xi * co + o) * ci + c0),
                        run,
                    )
                };
            }
        }
    });
}

/// Tile rows `g0..g1` (over the batch: row `g` is image `g / th`, tile row `g % th`):
/// input transform, 16 GEMMs, output transform into `out`. `parallel`: split each phase
/// across the pool.
#[allow(clippy::too_many_arguments)]
fn block(
    x: &[f32],
    u: &[f32],
    bias: Option<&[f32]>,
    geo: &Geometry,
    [g0, g1]: [usize; 2],
    out: SharedPtr<*mut f32>,
    parallel: bool,
    scratch: &mut Vec<f32>,
) {
    let [_, ci, _, _] = geo.p.input;
    let co = geo.p.out_channels;
    let t = (g1 - g0) * geo.tiles[1];
    scratch.resize(XI * (ci + co) * t, 0.0);
    let (v, m) = scratch.split_at_mut(XI * ci * t);
    let (v_ptr, m_ptr) = (SharedPtr(v.as_mut_ptr()), SharedPtr(m.as_mut_ptr()));
    let each = |count: usize, f: &(dyn Fn(usize) + Sync)| {
        if parallel {
            (0..count).into_par_iter().for_each(f);
        } else {
            (0..count).for_each(f);
        }
    };
    // SAFETY (all three phases): `v` is `[16][Ci][T]` and `m` `[16][Co][T]`; channel `c`
    // of the input transform writes only `v[·][c][·]`, GEMM `ξ` reads `v[ξ]` and writes
    // only `m[ξ]`, output channel `o` reads `m[·][o][·]` and writes only its own
    // channel of the block's output rows.
    each(ci, &|c| unsafe {
        input_tiles(x, geo, c, [g0, g1], v_ptr.get())
    });
    each(XI, &|xi| unsafe {
        ::gemm::gemm(
            t,
            co,
            ci,
            m_ptr.get().add(xi * co * t),
            t as isize,
            1,
            false,
            v_ptr.get().add(xi * ci * t),
            t as isize,
            1,
            u.as_ptr().add(xi * co * ci),
            ci as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            ::gemm::Parallelism::None,
        )
    });
    each(co, &|o| unsafe {
        output_tiles(
            m_ptr.get(),
            geo,
            o,
            bias.map_or(0.0, |b| b[o]),
            [g0, g1],
            out.get(),
        )
    });
}

/// Input channel `c`'s patches of tile rows `g0..g1`, `V = Bᵀ·d·B` with
/// `Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`, into
/// `v[ξ][c][tile]`.
///
/// # Safety
/// `v` must address a `[16][Ci][T]` buffer, `T = (g1 - g0)·tw`, whose channel `c` no
/// other thread touches meanwhile.
unsafe fn input_tiles(x: &[f32], geo: &Geometry, c: usize, [g0, g1]: [usize; 2], v: *mut f32) {
    let [_, ci, h, w] = geo.p.input;
    let up = geo.p.upsample;
    let [th, tw] = geo.tiles;
    let t = (g1 - g0) * tw;
    // Four padded rows of the (upsampled) image: column 0 is the left padding.
    let width = 2 * tw + 2;
    let mut rows = vec![0.0f32; 4 * width];
    // Row-transformed patches: `rt[r][j][tx]`.
    let mut rt = vec![0.0f32; 16 * tw];
    for g in g0..g1 {
        let (img, ty) = (g / th, g % th);
        let plane = &x[(img * ci + c) * h * w..][..h * w];
        for (r, row) in rows.chunks_exact_mut(width).enumerate() {
            // Upsampled row 2·ty + r - 1; outside the image, zero padding.
            let iy = (2 * ty + r).wrapping_sub(1);
            row.fill(0.0);
            if iy < h * up {
                let src = &plane[(iy / up) * w..][..w];
                let dst = &mut row[1..1 + w * up];
                if up == 1 {
                    dst.copy_from_slice(src);
                } else {
                    fill_doubled(dst, src, 0);
                }
            }
        }
        for r in 0..4 {
            let d = &rows[r * width..][..width];
            let (rt0, rest) = rt[r * 4 * tw..][..4 * tw].split_at_mut(tw);
            let (rt1, rest) = rest.split_at_mut(tw);
            let (rt2, rt3) = rest.split_at_mut(tw);
            for tx in 0..tw {
                let [d0, d1, d2, d3] = [d[2 * tx], d[2 * tx + 1], d[2 * tx + 2], d[2 * tx + 3]];
                rt0[tx] = d0 - d2;
                rt1[tx] = d1 + d2;
                rt2[tx] = d2 - d1;
                rt3[tx] = d1 - d3;
            }
        }
        let base = (g - g0) * tw;
        for j in 0..4 {
            let at = |r: usize| &rt[(r * 4 + j) * tw..][..tw];
            let (a0, a1, a2, a3) = (at(0), at(1), at(2), at(3));
            // SAFETY: `(ξ, c, base..base + tw)` lies inside `v` (caller's contract).
            let dst = |i: usize| unsafe {
                std::slice::from_raw_parts_mut(v.add(((i * 4 + j) * ci + c) * t + base), tw)
            };
            for (d, (p, q)) in dst(0).iter_mut().zip(a0.iter().zip(a2)) {
                *d = p - q;
            }
            for (d, (p, q)) in dst(1).iter_mut().zip(a1.iter().zip(a2)) {
                *d = p + q;
            }
            for (d, (p, q)) in dst(2).iter_mut().zip(a2.iter().zip(a1)) {
                *d = p - q;
            }
            for (d, (p, q)) in dst(3).iter_mut().zip(a1.iter().zip(a3)) {
                *d = p - q;
            }
        }
    }
}

/// Output channel `o` of tile rows `g0..g1`: `Y = Aᵀ·M·A + bias` with
/// `Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]]`, from `m[ξ][o][tile]` into the NCHW output.
///
/// # Safety
/// `m` must address a `[16][Co][T]` buffer the GEMMs filled, `T = (g1 - g0)·tw`, and
/// `out` the `[N, Co, Ho, Wo]` output, whose rows of channel `o` in these tile rows no
/// other thread touches meanwhile.
unsafe fn output_tiles(
    m: *const f32,
    geo: &Geometry,
    o: usize,
    bias: f32,
    [g0, g1]: [usize; 2],
    out: *mut f32,
) {
    let co = geo.p.out_channels;
    let [h, w] = geo.p.upsampled();
    let [th, tw] = geo.tiles;
    let t = (g1 - g0) * tw;
    // Column-transformed tiles: `s[a][j][tx]`, then one output row's two phases.
    let mut s = vec![0.0f32; 8 * tw];
    let mut y = vec![0.0f32; 2 * tw];
    for g in g0..g1 {
        let (img, ty) = (g / th, g % th);
        let base = (g - g0) * tw;
        // SAFETY: `(ξ, o, base..base + tw)` lies inside `m` (caller's contract).
        let src = |i: usize, j: usize| unsafe {
            std::slice::from_raw_parts(m.add(((i * 4 + j) * co + o) * t + base), tw)
        };
        for j in 0..4 {
            let (m0, m1, m2, m3) = (src(0, j), src(1, j), src(2, j), src(3, j));
            let (s0, s1) = s.split_at_mut(4 * tw);
            let (s0, s1) = (&mut s0[j * tw..][..tw], &mut s1[j * tw..][..tw]);
            for tx in 0..tw {
                s0[tx] = m0[tx] + m1[tx] + m2[tx];
                s1[tx] = m1[tx] - m2[tx] - m3[tx];
            }
        }
        for a in 0..2 {
            let oy = 2 * ty + a;
            if oy >= h {
                break;
            }
            let at = |j: usize| &s[(a * 4 + j) * tw..][..tw];
            let (s0, s1, s2, s3) = (at(0), at(1), at(2), at(3));
            let (y0, y1) = y.split_at_mut(tw);
            for tx in 0..tw {
                y0[tx] = s0[tx] + s1[tx] + s2[tx] + bias;
                y1[tx] = s1[tx] - s2[tx] - s3[tx] + bias;
            }
            // SAFETY: row `oy` of channel `o` of image `img` (caller's contract).
            let row = unsafe {
                std::slice::from_raw_parts_mut(out.add(((img * co + o) * h + oy) * w), w)
            };
            let (y0, y1) = (&y[..tw], &y[tw..]);
            let mut pairs = row.chunks_exact_mut(2);
            for (pair, (&e, &f)) in (&mut pairs).zip(y0.iter().zip(y1)) {
                pair[0] = e;
                pair[1] = f;
            }
            if let [last] = pairs.into_remainder() {
                *last = y0[tw - 1];
            }
        }
    }
}
