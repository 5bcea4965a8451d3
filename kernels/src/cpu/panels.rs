//! `x·W + b` in f32 with `W` laid out in column panels at load time
//! ([`crate::plain::to_panels`]), by our own AVX-512 micro-kernel.
//!
//! At the text encoders' 77 rows `gemm` spends a quarter of its time packing the weight,
//! on every call: each packed value then feeds only a few vector FMAs. With the weight
//! already in panels of [`PANEL_WIDTH`] columns (`[k][64]` each, contiguous), every
//! panel streams from memory once per call straight into a 6 × 64 tile of accumulators.
//! Measured over 32 layers shaped like SDXL's second encoder (`examples/panel_gemm.rs`):
//! 0.80–0.93 of `gemm`'s time.

use rayon::prelude::*;

use super::linear::{bias_rows, Matrix};
use super::SharedPtr;
use crate::PANEL_WIDTH;

/// Least `m·n·k` worth splitting across threads (as `gemm_split`'s).
const PARALLEL_WORK: usize = 1 << 21;

/// Tasks per thread: two balance uneven finishing (as `gemm_split`'s column blocks).
const TASKS_PER_THREAD: usize = 2;

/// Whether this CPU runs the kernel (AVX-512 F).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x` `[rows, k]` (unit column stride) times the `[k, n]` weight whose values `panels`
/// holds in panel order, plus `bias` `[n]`: a contiguous `[rows, n]` buffer. Panels are
/// split across threads in contiguous runs.
///
/// # Panics
/// If the CPU lacks AVX-512 ([`available`]), the shapes do not match, `x`'s columns are
/// not adjacent, or a matrix reaches outside its buffer.
pub(crate) fn linear(x: &Matrix, panels: &[f32], n: usize, bias: Option<&[f32]>) -> Vec<f32> {
    assert!(available(), "the panel kernel needs AVX-512");
    let [rows, k] = x.dims;
    assert!(x.strides[1] == 1 || k <= 1, "x's columns must be adjacent");
    assert!(x.strides[0] >= 0 || rows <= 1, "x's rows must ascend");
    assert!(x.in_bounds(), "input view outside its buffer");
    assert_eq!(panels.len(), k * n, "weight size");
    assert!(bias.is_none_or(|b| b.len() == n), "bias length");
    let len = rows * n;
    let mut out = match bias {
        Some(b) => bias_rows(len, b),
        None => vec![0.0; len],
    };
    if len == 0 || k == 0 {
        return out;
    }
    let count = n.div_ceil(PANEL_WIDTH);
    let tasks = if rows * n * k >= PARALLEL_WORK {
        (rayon::current_num_threads() * TASKS_PER_THREAD).clamp(1, count)
    } else {
        1
    };
    let per_task = count.div_ceil(tasks);
    let x_rs = x.strides[0].max(0) as usize;
    let (xp, pp, cp) = (
        SharedPtr(x.data.as_ptr().wrapping_add(x.start)),
        SharedPtr(panels.as_ptr()),
        SharedPtr(out.as_mut_ptr()),
    );
    let task = |t: usize| {
        let (s0, s1) = (t * per_task, ((t + 1) * per_task).min(count));
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 was checked; `x` lies in its buffer with `rows` rows `x_rs`
        // apart, `panels` holds `k × n` values, `out` `rows × n`; panels `s0..s1` are
        // this task's columns of `out`, written by it alone.
        unsafe {
            avx512::panels([rows, n, k], xp.get(), x_rs, pp.get(), cp.get(), s0..s1)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (s0, s1, xp, pp, cp, x_rs);
    };
    if tasks == 1 {
        task(0);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use crate::PANEL_WIDTH;

    /// Rows per micro-tile: 6 × 4 accumulators of 16 lanes.
    const ROWS: usize = 6;
    /// Panel rows per block: 128 × 64 floats (32 KiB) stay in L1 while the row tiles
    /// pass over them.
    const KC: usize = 128;

    /// Lanes of vector `j` (16 each) inside a panel `width` wide.
    fn mask(width: usize, j: usize) -> __mmask16 {
        let lanes = width.saturating_sub(16 * j).min(16);
        ((1u32 << lanes) - 1) as __mmask16
    }

    /// Loads vector `j` of a panel row: all 16 lanes in full panels, the lanes inside
    /// `width` in the last, narrower one (the others read as zero, never touched).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load<const FULL: bool>(p: *const f32, width: usize, j: usize) -> __m512 {
        // SAFETY: the caller's row holds `width` values from `p`; masked lanes are not
        // accessed.
        unsafe {
            if FULL {
                _mm512_loadu_ps(p.wrapping_add(16 * j))
            } else {
                _mm512_maskz_loadu_ps(mask(width, j), p.wrapping_add(16 * j))
            }
        }
    }

    /// Stores vector `j` of an output row, as [`load`] reads it.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store<const FULL: bool>(p: *mut f32, width: usize, j: usize, v: __m512) {
        // SAFETY: as `load`.
        unsafe {
            if FULL {
                _mm512_storeu_ps(p.wrapping_add(16 * j), v)
            } else {
                _mm512_mask_storeu_ps(p.wrapping_add(16 * j), mask(width, j), v)
            }
        }
    }

    /// The operands of one tile: `kl` panel rows of `w` (`width` apart), the matching
    /// `kl` values of each row of `x` (`x_rs` apart), output rows of `c` (`c_rs` apart);
    /// with `pf`, one line per panel row from `pf` on is prefetched into L2.
    #[derive(Clone, Copy)]
    struct Tile {
        kl: usize,
        x: *const f32,
        x_rs: usize,
        w: *const f32,
        width: usize,
        c: *mut f32,
        c_rs: usize,
        pf: Option<*const f32>,
    }

    /// One `R × width` tile, accumulated into `c`.
    ///
    /// # Safety
    /// AVX-512 F; `x` holds `R` rows of `kl` values, `w` `kl` rows of `width` (64 when
    /// `FULL`), `c` `R` rows of `width`.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const R: usize, const FULL: bool>(t: Tile) {
        let Tile {
            kl,
            x,
            x_rs,
            w,
            width,
            c,
            c_rs,
            pf,
        } = t;
        // SAFETY (all accesses): inside the regions the caller names.
        unsafe {
            let mut acc: [[__m512; 4]; R] = std::array::from_fn(|r| {
                std::array::from_fn(|j| load::<FULL>(c.add(r * c_rs), width, j))
            });
            for kk in 0..kl {
                if let Some(pf) = pf {
                    _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add(kk * width) as *const i8);
                }
                let row = w.add(kk * width);
                let wv: [__m512; 4] = std::array::from_fn(|j| load::<FULL>(row, width, j));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let a = _mm512_set1_ps(*x.add(r * x_rs + kk));
                    for (acc, &w) in acc.iter_mut().zip(&wv) {
                        *acc = _mm512_fmadd_ps(a, w, *acc);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (j, &a) in acc.iter().enumerate() {
                    store::<FULL>(c.add(r * c_rs), width, j, a);
                }
            }
        }
    }

    /// A tile of `rows` (1–6) rows: [`tile`] for that row count and panel kind.
    ///
    /// # Safety
    /// As [`tile`].
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_rows(rows: usize, t: Tile) {
        macro_rules! by_rows {
            ($full:literal) => {
                match rows {
                    6 => tile::<6, $full>(t),
                    5 => tile::<5, $full>(t),
                    4 => tile::<4, $full>(t),
                    3 => tile::<3, $full>(t),
                    2 => tile::<2, $full>(t),
                    _ => tile::<1, $full>(t),
                }
            };
        }
        // SAFETY: the caller's.
        unsafe {
            if t.width == PANEL_WIDTH {
                by_rows!(true)
            } else {
                by_rows!(false)
            }
        }
    }

    /// Panels `range` of the weight `p` over all `m` rows: per panel and block of `KC`
    /// panel rows, every row tile, the first four prefetching the next block into L2.
    ///
    /// # Safety
    /// AVX-512 F; `x` `m` rows `x_rs` apart of `k` values, `p` the `k × n` panel-ordered
    /// weight, `c` `m × n` contiguous; nothing else writes panels `range`' columns of `c`.
    pub(super) unsafe fn panels(
        [m, n, k]: [usize; 3],
        x: *const f32,
        x_rs: usize,
        p: *const f32,
        c: *mut f32,
        range: Range<usize>,
    ) {
        let full = n / PANEL_WIDTH;
        let end = range.end;
        for s in range {
            // Full panels, then the last one with the remaining columns.
            let width = if s < full {
                PANEL_WIDTH
            } else {
                n - full * PANEL_WIDTH
            };
            let panel = p.wrapping_add(s * k * PANEL_WIDTH);
            let mut k0 = 0;
            while k0 < k {
                let kl = KC.min(k - k0);
                let block = panel.wrapping_add(k0 * width);
                // The next block follows this one (or is the next panel's first).
                let next = block.wrapping_add(kl * width);
                let last = s + 1 == end && k0 + kl == k;
                let (mut r0, mut t) = (0, 0);
                while r0 < m {
                    let rows = (m - r0).min(ROWS);
                    let pf = (!last && t < 4).then(|| next.wrapping_add(16 * t));
                    // SAFETY: rows `r0..r0 + rows`, panel `s`'s columns, block `k0..k0 + kl`.
                    unsafe {
                        tile_rows(
                            rows,
                            Tile {
                                kl,
                                x: x.add(r0 * x_rs + k0),
                                x_rs,
                                w: block,
                                width,
                                c: c.add(r0 * n + s * PANEL_WIDTH),
                                c_rs: n,
                                pf,
                            },
                        )
                    };
                    r0 += rows;
                    t += 1;
                }
                k0 += kl;
            }
        }
    }
}
