//! GEGLU on f32 rows: one parallel pass reading each `[value | gate]` row once and
//! writing `value · gelu(gate)`, with exact-erf GELU through our vectorised `erf`.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::math::{gelu, multiversion};
// Output values per task (the input is twice as many).
use super::ELEMENTWISE_TASK as TASK;

/// GEGLU of `x` (`rows` rows of `2·half` contiguous values) into `out` (`rows` rows of
/// `half`): `out = x[.., :half] · gelu(x[.., half..])`.
pub(crate) fn geglu(x: &[f32], out: &mut [MaybeUninit<f32>], half: usize) {
    assert!(half > 0 && x.len() == 2 * out.len() && out.len().is_multiple_of(half));
    let rows_per_task = (TASK / half).max(1);
    out.par_chunks_mut(rows_per_task * half)
        .zip(x.par_chunks(rows_per_task * 2 * half))
        .for_each(|(out, x)| {
            for (out, row) in out.chunks_mut(half).zip(x.chunks(2 * half)) {
                let (value, gate) = row.split_at(half);
                geglu_row(value, gate, out);
            }
        });
}

/// GEGLU of `x` (rows of `2·half` contiguous values) in place: each row's first half
/// becomes the output row.
pub(crate) fn geglu_in_place(x: &mut [f32], half: usize) {
    assert!(half > 0 && x.len().is_multiple_of(2 * half));
    let rows_per_task = (TASK / half).max(1);
    x.par_chunks_mut(rows_per_task * 2 * half).for_each(|x| {
        for row in x.chunks_mut(2 * half) {
            let (value, gate) = row.split_at_mut(half);
            geglu_row_in_place(value, gate);
        }
    });
}

#[inline(always)]
fn geglu_row_in_place_imp<const FMA: bool>(value: &mut [f32], gate: &[f32]) {
    for (v, &g) in value.iter_mut().zip(gate) {
        *v *= gelu::<FMA>(g);
    }
}

multiversion! {
    /// `value *= gelu(gate)` elementwise.
    fn geglu_row_in_place(value: &mut [f32], gate: &[f32]) => geglu_row_in_place_imp
}

#[inline(always)]
fn geglu_row_imp<const FMA: bool>(value: &[f32], gate: &[f32], out: &mut [MaybeUninit<f32>]) {
    for ((o, &v), &g) in out.iter_mut().zip(value).zip(gate) {
        o.write(v * gelu::<FMA>(g));
    }
}

multiversion! {
    /// `out = value · gelu(gate)` elementwise.
    fn geglu_row(value: &[f32], gate: &[f32], out: &mut [MaybeUninit<f32>]) => geglu_row_imp
}
