//! The text encoders' GEMMs two ways: the `gemm` crate as `fused_linear` calls it, and a
//! 6 × 64 AVX-512 micro-kernel on weights packed into 64-column panels ahead of time.
//!
//! ```text
//! cargo run --release -p hypergen-kernels --example panel_gemm [-- LAYERS ROUNDS]
//! ```
//!
//! The weights are `LAYERS` (default 32) layers shaped like SDXL's second text encoder
//! (four `[1280, 1280]` projections, `[1280, 5120]`, `[5120, 1280]`: 2.5 GB, more than
//! any cache, so every call streams its weight as the model does), times 77 rows (one
//! prompt) on two column halves in parallel. Each round times every layer once per way;
//! minimum and median per way are printed after the first round.
//!
//! What it showed (BENCHMARKS.md, "Where the rest of the gap is"): the panel layout's
//! minimum is 0.80–0.93 of `gemm`'s, because `gemm` packs the weight on every call
//! and at 77 rows each packed value feeds only five vector FMAs. Packing panels per
//! call in any of the ways tried there was no faster than `gemm`, so the gain needs the
//! layout at load time, which `fused_linear`'s `[in, out]` weight cannot hold. This
//! example keeps the measurement reproducible for whoever builds that layout.

use std::time::Instant;

use rayon::prelude::*;

/// Columns per panel: four AVX-512 vectors.
const WIDTH: usize = 64;
/// Rows per micro-tile: 6 × 4 accumulators.
const ROWS: usize = 6;
/// Panel rows per block: 128 × 64 floats (32 KiB) stay in L1 while the row tiles pass.
const KC: usize = 128;

/// A raw pointer that tasks may share (each writes its own columns).
#[derive(Clone, Copy)]
struct Shared<T>(T);
// SAFETY: every task writes a disjoint set of columns and only reads the rest.
unsafe impl<T> Send for Shared<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Shared<T> {}

/// Deterministic values in [-0.5, 0.5).
fn values(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 9) as f32 / (1u32 << 23) as f32 - 0.5
        })
        .collect()
}

/// `[k, n]` row-major into `[n / WIDTH][k][WIDTH]`.
fn pack(w: &[f32], k: usize, n: usize) -> Vec<f32> {
    let mut p = vec![0.0; k * n];
    for (s, panel) in p.chunks_exact_mut(k * WIDTH).enumerate() {
        for (kk, row) in panel.chunks_exact_mut(WIDTH).enumerate() {
            row.copy_from_slice(&w[kk * n + s * WIDTH..][..WIDTH]);
        }
    }
    p
}

/// `c [m, n] += x [m, k] · w [k, n]` by the `gemm` crate, two column halves in parallel
/// (`gemm_split` cuts four column blocks for two threads, as did the throwaway runs in
/// BENCHMARKS.md; this keeps both ways split alike).
fn with_gemm(m: usize, n: usize, k: usize, x: &[f32], w: &[f32], c: &mut [f32]) {
    let half = n / 2;
    let (x, w, c) = (
        Shared(x.as_ptr()),
        Shared(w.as_ptr()),
        Shared(c.as_mut_ptr()),
    );
    (0..2).into_par_iter().for_each(|h| {
        let (x, w, c) = (x, w, c);
        let c0 = h * half;
        // SAFETY: columns `c0..c0 + half` of the caller's matrices.
        unsafe {
            gemm::gemm(
                m,
                half,
                k,
                c.0.add(c0),
                1,
                n as isize,
                true,
                x.0,
                1,
                k as isize,
                w.0.add(c0),
                1,
                n as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod panel {
    use std::arch::x86_64::*;

    use super::{KC, ROWS, WIDTH};

    /// One `R × WIDTH` tile over `kl` panel rows, accumulated into `c`; with `pf`, one
    /// line per panel row from `pf` on (`WIDTH` apart) is prefetched into L2.
    ///
    /// # Safety
    /// AVX-512 F; `x` `R` rows `x_rs` apart of `kl` values, `w` `kl` rows of `WIDTH`,
    /// `c` `R` rows `c_rs` apart of `WIDTH`.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const R: usize>(
        kl: usize,
        x: *const f32,
        x_rs: usize,
        w: *const f32,
        c: *mut f32,
        c_rs: usize,
        pf: Option<*const f32>,
    ) {
        // SAFETY (all accesses): inside the regions the caller names.
        unsafe {
            let mut acc: [[__m512; 4]; R] = std::array::from_fn(|r| {
                std::array::from_fn(|j| _mm512_loadu_ps(c.add(r * c_rs + 16 * j)))
            });
            for kk in 0..kl {
                if let Some(pf) = pf {
                    _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add(kk * WIDTH) as *const i8);
                }
                let row = w.add(kk * WIDTH);
                let wv: [__m512; 4] = std::array::from_fn(|j| _mm512_loadu_ps(row.add(16 * j)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let a = _mm512_set1_ps(*x.add(r * x_rs + kk));
                    for (acc, &w) in acc.iter_mut().zip(&wv) {
                        *acc = _mm512_fmadd_ps(a, w, *acc);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (j, &a) in acc.iter().enumerate() {
                    _mm512_storeu_ps(c.add(r * c_rs + 16 * j), a);
                }
            }
        }
    }

    /// Panels `s0..s1` of `p` over all `m` rows: per panel and block of `KC` panel rows,
    /// every row tile, the first four prefetching the next block into L2.
    ///
    /// # Safety
    /// AVX-512 F; the caller's matrices as in `super::with_panels`.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn panels(
        m: usize,
        n: usize,
        k: usize,
        x: *const f32,
        p: *const f32,
        c: *mut f32,
        s0: usize,
        s1: usize,
    ) {
        for s in s0..s1 {
            let mut k0 = 0;
            while k0 < k {
                let kl = KC.min(k - k0);
                let block = p.wrapping_add(s * k * WIDTH + k0 * WIDTH);
                // The next block is contiguous after this one (or the next panel's first).
                let next = block.wrapping_add(kl * WIDTH);
                let last = s + 1 == s1 && k0 + kl == k;
                let mut r0 = 0;
                let mut t = 0;
                while r0 < m {
                    let rows = ROWS.min(m - r0);
                    // The first four tiles prefetch one 16-column line each of the next
                    // block's rows.
                    let pf = (!last && t < 4).then(|| next.wrapping_add(16 * t));
                    // SAFETY: rows `r0..r0 + rows`, panel `s`'s columns, block `k0..k0 + kl`.
                    unsafe {
                        let (xt, ct) = (x.add(r0 * k + k0), c.add(r0 * n + s * WIDTH));
                        match rows {
                            6 => tile::<6>(kl, xt, k, block, ct, n, pf),
                            5 => tile::<5>(kl, xt, k, block, ct, n, pf),
                            4 => tile::<4>(kl, xt, k, block, ct, n, pf),
                            3 => tile::<3>(kl, xt, k, block, ct, n, pf),
                            2 => tile::<2>(kl, xt, k, block, ct, n, pf),
                            _ => tile::<1>(kl, xt, k, block, ct, n, pf),
                        }
                    }
                    r0 += rows;
                    t += 1;
                }
                k0 += kl;
            }
        }
    }
}

/// `c [m, n] += x [m, k] · w`, `w` packed by [`pack`]; two halves of the panels in
/// parallel.
#[cfg(target_arch = "x86_64")]
fn with_panels(m: usize, n: usize, k: usize, x: &[f32], p: &[f32], c: &mut [f32]) {
    assert!(x.len() >= m * k && p.len() >= k * n && c.len() >= m * n && n.is_multiple_of(WIDTH));
    let panels = n / WIDTH;
    let half = panels.div_ceil(2);
    let (x, p, c) = (
        Shared(x.as_ptr()),
        Shared(p.as_ptr()),
        Shared(c.as_mut_ptr()),
    );
    (0..2).into_par_iter().for_each(|h| {
        let (x, p, c) = (x, p, c);
        let (s0, s1) = (h * half, ((h + 1) * half).min(panels));
        // SAFETY: `main` checked AVX-512; panels `s0..s1` are this task's columns, the
        // sizes were asserted above.
        unsafe { panel::panels(m, n, k, x.0, p.0, c.0, s0, s1) }
    });
}

#[cfg(target_arch = "x86_64")]
fn main() {
    if !is_x86_feature_detected!("avx512f") {
        println!("the panel kernel needs AVX-512");
        return;
    }
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let layers = args.first().copied().unwrap_or(32);
    let rounds = args.get(1).copied().unwrap_or(6).max(2);
    let m = 77;
    let shapes = [
        (1280, 1280),
        (1280, 1280),
        (1280, 1280),
        (1280, 1280),
        (1280, 5120),
        (5120, 1280),
    ];
    let mut weights = Vec::new();
    for l in 0..layers {
        for (i, &(k, n)) in shapes.iter().enumerate() {
            let w = values(k * n, (l * shapes.len() + i) as u32 + 1);
            let p = pack(&w, k, n);
            weights.push((k, n, w, p));
        }
    }
    let x = values(m * 5120, 7);
    let flop: f64 = weights
        .iter()
        .map(|(k, n, ..)| 2.0 * (m * k * n) as f64)
        .sum();

    // Both ways agree (same products, summed in the same order along k).
    let (k, n, w, p) = &weights[4];
    let (mut a, mut b) = (vec![0.0; m * n], vec![0.0; m * n]);
    with_gemm(m, *n, *k, &x, w, &mut a);
    with_panels(m, *n, *k, &x, p, &mut b);
    let err = a
        .iter()
        .zip(&b)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!(
        "{layers} layers, {:.2} GB of weights, 77 rows; max difference {err:e}",
        flop / (2.0 * 77.0) * 4.0 / 1e9
    );

    let mut out: Vec<Vec<f32>> = weights.iter().map(|(_, n, ..)| vec![0.0; m * n]).collect();
    let mut times = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for (way, t) in times.iter_mut().enumerate() {
            let start = Instant::now();
            for ((k, n, w, p), c) in weights.iter().zip(&mut out) {
                if way == 0 {
                    with_gemm(m, *n, *k, &x, w, c);
                } else {
                    with_panels(m, *n, *k, &x, p, c);
                }
            }
            if round > 0 {
                t.push(start.elapsed().as_secs_f64());
            }
        }
    }
    for (name, t) in ["gemm crate, packing per call", "panels packed ahead"]
        .iter()
        .zip(&mut times)
    {
        t.sort_by(f64::total_cmp);
        let (min, med) = (t[0], t[t.len() / 2]);
        println!(
            "{name:30} min {:7.1} ms  median {:7.1} ms  ({:.0} GFLOP/s at the minimum)",
            min * 1e3,
            med * 1e3,
            flop / min / 1e9
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("the panel kernel is written for x86-64 with AVX-512");
}
