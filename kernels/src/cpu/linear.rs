//! `x·W + b` on f32 as one GEMM over every row of `x`, the bias written first.
//!
//! Burn's `linear` broadcasts the weight to `x`'s batch dims and runs one GEMM per batch
//! entry, each packing the whole weight again (with classifier-free guidance the UNet's
//! tokens come in two halves: at SDXL's 8×8 level that is two 64-row GEMMs over 26 MB
//! weights instead of one 128-row one), then adds the bias in another pass into another
//! new buffer. Here the rows of all batch entries are one matrix, the weight is read
//! through its strides as it lies (no copy, whichever way it was loaded), and the bias
//! fills the output before GEMM accumulates into it.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::{gemm_split, ELEMENTWISE_TASK};

/// A 2-d f32 matrix inside a buffer: element `(i, j)` at `start + i·rs + j·cs`.
pub(crate) struct Matrix<'a> {
    /// The buffer.
    pub data: &'a [f32],
    /// Offset of element `(0, 0)`.
    pub start: usize,
    /// Rows and columns.
    pub dims: [usize; 2],
    /// Row and column strides, in elements.
    pub strides: [isize; 2],
}

impl Matrix<'_> {
    /// Checks that every element lies inside the buffer.
    pub(super) fn in_bounds(&self) -> bool {
        let [r, c] = self.dims;
        if r == 0 || c == 0 {
            return true;
        }
        let mut lo = self.start as isize;
        let mut hi = lo;
        for (&d, &s) in self.dims.iter().zip(&self.strides) {
            let span = (d as isize - 1) * s;
            if span < 0 {
                lo += span;
            } else {
                hi += span;
            }
        }
        lo >= 0 && (hi as usize) < self.data.len()
    }
}

/// `x` `[rows, in]` times `weight` `[in, out]` plus `bias` `[out]`: a contiguous
/// `[rows, out]` buffer.
///
/// # Panics
/// If the shapes do not match or a matrix reaches outside its buffer.
pub(crate) fn linear(x: &Matrix, weight: &Matrix, bias: Option<&[f32]>) -> Vec<f32> {
    let [input, output] = weight.dims;
    let rows = x.dims[0];
    assert_eq!(x.dims[1], input, "inner dims");
    assert!(x.in_bounds(), "input view outside its buffer");
    assert!(weight.in_bounds(), "weight view outside its buffer");
    assert!(bias.is_none_or(|b| b.len() == output), "bias length");
    let len = rows * output;
    let mut out = match bias {
        Some(b) => bias_rows(len, b),
        None if input == 0 => vec![0.0; len],
        None => Vec::with_capacity(len),
    };
    if len == 0 || input == 0 {
        return out;
    }
    // SAFETY: `x` and `weight` were checked to lie inside their buffers; `out` has
    // capacity for `rows × output` and, when `bias` is given, holds them initialised
    // (read, `read_dst`); otherwise GEMM writes them without reading.
    unsafe {
        gemm_split::gemm(
            [rows, output, input],
            out.as_mut_ptr(),
            (1, output as isize),
            bias.is_some(),
            x.data.as_ptr().wrapping_add(x.start),
            (x.strides[1], x.strides[0]),
            weight.data.as_ptr().wrapping_add(weight.start),
            (weight.strides[1], weight.strides[0]),
        );
        out.set_len(len);
    }
    out
}

/// `len` values (whole rows): `bias` repeated, written by [`fill_rows`].
pub(super) fn bias_rows(len: usize, bias: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    fill_rows(&mut out.spare_capacity_mut()[..len], bias);
    // SAFETY: `fill_rows` wrote all `len` values.
    unsafe { out.set_len(len) };
    out
}

/// Writes `bias` into every row of `out` (rows of `bias.len()` values), in parallel
/// for large outputs: the UNet's feed-forward projection writes 42–168 MB at SDXL's 512²,
/// and filled by one thread (page faults included) its wall time was 15 ms above its CPU
/// time per thread at `[2048, 640] × [640, 5120]` (`cpu_ops`: 70–78 ms), 7–9 ms after.
fn fill_rows(out: &mut [MaybeUninit<f32>], bias: &[f32]) {
    let width = bias.len();
    let fill = |rows: &mut [MaybeUninit<f32>]| {
        for row in rows.chunks_exact_mut(width) {
            for (o, &b) in row.iter_mut().zip(bias) {
                o.write(b);
            }
        }
    };
    if width == 0 {
        return;
    }
    if out.len() <= ELEMENTWISE_TASK {
        fill(out);
    } else {
        let rows_per_task = (ELEMENTWISE_TASK / width).max(1);
        out.par_chunks_mut(rows_per_task * width).for_each(fill);
    }
}
