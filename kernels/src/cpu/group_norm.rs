//! GroupNorm(+SiLU) on `[N, C, L]` f32 data: one read for the statistics, one read and
//! one write for the normalisation (in place when the input may be overwritten), groups
//! in parallel on rayon.
//!
//! Statistics are exact to f32 rounding even for a mean large next to the spread: each
//! block of [`BLOCK`] values (L1-resident) is summed in f32 lanes around its own mean,
//! and blocks merge in f64 (Chan et al.), so no per-element f64 work is needed. The
//! normalisation subtracts the group mean rounded to f32 (exact for values near it) and
//! folds the rounding remainder into the shift, so `x − mean` keeps the spread's
//! digits.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::math::{madd, multiversion, silu, LANES};

/// Values summed in f32 before their statistics merge in f64: 4 KiB, re-read from L1.
const BLOCK: usize = 1024;

/// Per-channel affine parameters `gamma`, `beta` (`[C]`).
pub(crate) type Affine<'a> = Option<(&'a [f32], &'a [f32])>;

/// The shape and options of one GroupNorm call.
#[derive(Clone, Copy)]
pub(crate) struct Params<'a> {
    /// `[N, C, L]`; `C` a multiple of `groups`.
    pub dims: [usize; 3],
    /// Number of groups.
    pub groups: usize,
    /// Per-channel `gamma`, `beta`.
    pub affine: Affine<'a>,
    /// Added to the variance.
    pub eps: f64,
    /// Apply SiLU after the affine.
    pub silu: bool,
}

impl Params<'_> {
    fn group_len(&self) -> usize {
        let [_, c, l] = self.dims;
        c / self.groups * l
    }

    /// Statistics of group `i` (counted over all samples) with values `x`.
    fn stats(&self, i: usize, x: &[f32]) -> GroupStats {
        let [_, c, _] = self.dims;
        let (mean, var) = moments(x);
        // x − mean = (x − hi) − lo with `hi` the nearest f32: `x − hi` is exact for x
        // near the mean, and `lo` folds into the shift.
        let hi = mean as f32;
        GroupStats {
            first_channel: (i % self.groups) * (c / self.groups),
            hi,
            lo: mean - hi as f64,
            rstd: 1.0 / (var + self.eps).sqrt(),
        }
    }

    /// `(centre, scale, shift)` of channel `k` of a group, such that its output is
    /// `(x − centre)·scale + shift`.
    fn channel(&self, g: &GroupStats, k: usize) -> (f32, f32, f32) {
        let (gamma, beta) = match self.affine {
            Some((gamma, beta)) => (
                gamma[g.first_channel + k] as f64,
                beta[g.first_channel + k] as f64,
            ),
            None => (1.0, 0.0),
        };
        let scale = g.rstd * gamma;
        (g.hi, scale as f32, (beta - g.lo * scale) as f32)
    }
}

/// A group's mean (split in an f32 and a small f64 remainder) and `1/√(var + eps)`.
struct GroupStats {
    first_channel: usize,
    hi: f32,
    lo: f64,
    rstd: f64,
}

// One task per (sample, group): SDXL has 32 groups per sample, enough for the core
// counts this runs on, and each group stays in one core's cache between its statistics
// and its normalisation.

/// GroupNorm of `x` (`[N, C, L]` contiguous) into `out` (same length).
pub(crate) fn group_norm(x: &[f32], out: &mut [MaybeUninit<f32>], p: Params<'_>) {
    let [n, c, l] = p.dims;
    assert!(x.len() == n * c * l && out.len() == x.len() && c.is_multiple_of(p.groups));
    out.par_chunks_mut(p.group_len())
        .zip(x.par_chunks(p.group_len()))
        .enumerate()
        .for_each(|(i, (out, x))| {
            let stats = p.stats(i, x);
            for (k, (out, x)) in out.chunks_mut(l).zip(x.chunks(l)).enumerate() {
                let (centre, scale, shift) = p.channel(&stats, k);
                normalise(x, out, centre, scale, shift, p.silu);
            }
        });
}

/// GroupNorm of `x` (`[N, C, L]` contiguous) in place.
pub(crate) fn group_norm_in_place(x: &mut [f32], p: Params<'_>) {
    let [n, c, l] = p.dims;
    assert!(x.len() == n * c * l && c.is_multiple_of(p.groups));
    x.par_chunks_mut(p.group_len())
        .enumerate()
        .for_each(|(i, x)| {
            let stats = p.stats(i, x);
            for (k, x) in x.chunks_mut(l).enumerate() {
                let (centre, scale, shift) = p.channel(&stats, k);
                normalise_in_place(x, centre, scale, shift, p.silu);
            }
        });
}

/// Mean and (biased) variance of `x`, computed as described in the module docs.
pub(crate) fn moments(x: &[f32]) -> (f64, f64) {
    let (mut count, mut mean, mut m2) = (0f64, 0f64, 0f64);
    for block in x.chunks(BLOCK) {
        let len = block.len() as f64;
        // Centre on the block's f32 mean: deviations then sum without cancellation.
        let centre = (sum(block) as f64 / len) as f32;
        let (s1, s2) = centred_sums(block, centre);
        let (s1, s2) = (s1 as f64, s2 as f64);
        let block_mean = centre as f64 + s1 / len;
        let block_m2 = (s2 - s1 * s1 / len).max(0.0);
        // Chan et al.'s pairwise update.
        let total = count + len;
        let delta = block_mean - mean;
        mean += delta * len / total;
        m2 += block_m2 + delta * delta * count * len / total;
        count = total;
    }
    (mean, m2 / count.max(1.0))
}

#[inline(always)]
fn sum_imp<const FMA: bool>(x: &[f32]) -> f32 {
    let (chunks, tail) = x.as_chunks::<LANES>();
    let mut acc = [0f32; LANES];
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

multiversion! {
    /// Sum of `x` in f32 lanes.
    fn sum(x: &[f32]) -> f32 => sum_imp
}

#[inline(always)]
fn centred_sums_imp<const FMA: bool>(x: &[f32], centre: f32) -> (f32, f32) {
    let (chunks, tail) = x.as_chunks::<LANES>();
    let mut s1 = [0f32; LANES];
    let mut s2 = [0f32; LANES];
    for chunk in chunks {
        for ((a1, a2), &v) in s1.iter_mut().zip(&mut s2).zip(chunk) {
            let d = v - centre;
            *a1 += d;
            *a2 = madd::<FMA>(d, d, *a2);
        }
    }
    let (mut t1, mut t2) = (0f32, 0f32);
    for &v in tail {
        let d = v - centre;
        t1 += d;
        t2 = madd::<FMA>(d, d, t2);
    }
    (s1.iter().sum::<f32>() + t1, s2.iter().sum::<f32>() + t2)
}

multiversion! {
    /// `Σ(x - centre)` and `Σ(x - centre)²` in f32 lanes.
    fn centred_sums(x: &[f32], centre: f32) -> (f32, f32) => centred_sums_imp
}

#[inline(always)]
fn normalise_imp<const FMA: bool>(
    x: &[f32],
    out: &mut [MaybeUninit<f32>],
    centre: f32,
    scale: f32,
    shift: f32,
    with_silu: bool,
) {
    // Two loops rather than a branch inside one, so each vectorises on its own.
    if with_silu {
        for (o, &v) in out.iter_mut().zip(x) {
            o.write(silu::<FMA>(madd::<FMA>(v - centre, scale, shift)));
        }
    } else {
        for (o, &v) in out.iter_mut().zip(x) {
            o.write(madd::<FMA>(v - centre, scale, shift));
        }
    }
}

#[inline(always)]
fn normalise_in_place_imp<const FMA: bool>(
    x: &mut [f32],
    centre: f32,
    scale: f32,
    shift: f32,
    with_silu: bool,
) {
    if with_silu {
        for v in x {
            *v = silu::<FMA>(madd::<FMA>(*v - centre, scale, shift));
        }
    } else {
        for v in x {
            *v = madd::<FMA>(*v - centre, scale, shift);
        }
    }
}

multiversion! {
    /// [`normalise`] with `x` as the output.
    fn normalise_in_place(
        x: &mut [f32],
        centre: f32,
        scale: f32,
        shift: f32,
        with_silu: bool,
    ) => normalise_in_place_imp
}

multiversion! {
    /// `out = (x - centre)·scale + shift`, then SiLU when `with_silu`.
    fn normalise(
        x: &[f32],
        out: &mut [MaybeUninit<f32>],
        centre: f32,
        scale: f32,
        shift: f32,
        with_silu: bool,
    ) => normalise_imp
}
