//! LayerNorm over the last dim of f32 rows, in place, blocks of rows in parallel.
//!
//! Burn's composition (mean, subtract, square, mean, add, sqrt, divide, scale, shift)
//! is nine passes and as many new buffers per call; here each row is read once for its
//! statistics (GroupNorm's exact f32-lane sums, [`moments`]) and once more, while still
//! in L1, to normalise it.

use rayon::prelude::*;

use super::group_norm::moments;
use super::math::{madd, multiversion};

/// Least values per rayon task: smaller tasks cost more to hand out than they take.
const TASK_VALUES: usize = 1 << 14;

/// Normalises each `dim`-long row of `x` in place: `(x − mean)/√(var + eps)·weight +
/// bias`, statistics per row (biased variance, as PyTorch).
///
/// # Panics
/// If `x` is not whole rows or the parameters are not `dim` long.
pub(crate) fn layer_norm_in_place(
    x: &mut [f32],
    dim: usize,
    weight: &[f32],
    bias: &[f32],
    eps: f64,
) {
    assert!(dim > 0 && x.len().is_multiple_of(dim), "whole rows");
    assert!(weight.len() == dim && bias.len() == dim, "parameter length");
    let rows_per_task = TASK_VALUES.div_ceil(dim).max(1);
    x.par_chunks_mut(rows_per_task * dim).for_each(|rows| {
        for row in rows.chunks_exact_mut(dim) {
            let (mean, var) = moments(row);
            // x − mean = (x − hi) − lo with `hi` the nearest f32 (as GroupNorm).
            let hi = mean as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            let shift = (-(mean - hi as f64) * rstd) as f32;
            normalise(row, hi, rstd as f32, shift, weight, bias);
        }
    });
}

#[inline(always)]
fn normalise_imp<const FMA: bool>(
    row: &mut [f32],
    centre: f32,
    scale: f32,
    shift: f32,
    weight: &[f32],
    bias: &[f32],
) {
    for ((v, &w), &b) in row.iter_mut().zip(weight).zip(bias) {
        *v = madd::<FMA>(madd::<FMA>(*v - centre, scale, shift), w, b);
    }
}

multiversion! {
    /// `((v − centre)·scale + shift)·w + b` for each value of `row`.
    fn normalise(
        row: &mut [f32],
        centre: f32,
        scale: f32,
        shift: f32,
        weight: &[f32],
        bias: &[f32],
    ) => normalise_imp
}
