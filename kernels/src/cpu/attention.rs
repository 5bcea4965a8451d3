//! Softmax attention on f32 `[N, H, L, D]` views, blocks of query rows in parallel.
//!
//! Each rayon task takes one (sample, head, block of query rows): the block's scores
//! `scale·Q_blk·Kᵀ` (one GEMM), an exact softmax along each row in f32 (max subtracted,
//! our vectorised `exp`), then `P·V` (a second GEMM) straight into the output, each row
//! scaled by its `1/Σ` afterwards (D values per row rather than S).
//!
//! The score block is stored transposed (`[S, rows]`, one column per query row): GEMM
//! then computes it without repacking K for every block (its micro-kernel wants the
//! destination column-major: twice as fast with 64-wide heads, 2.5× with 512-wide ones,
//! measured), and the softmax runs down the block in memory order with one vector lane
//! per query row, its per-row max and sum in L1. A block holds about [`SCORE_BYTES`], so
//! memory holds `threads × SCORE_BYTES` of scores whatever `L·S` is.
//!
//! Inputs are read through their strides (GEMM takes any), so the head views the model
//! passes (`[N, L, H, D]` with dims swapped) are never copied. The output is written in
//! `[N, L, H, D]` memory order and returned as the `[N, H, L, D]` view of it: the model
//! merges heads next (`swap_dims(1, 2)` and a reshape), which then costs no copy.

use std::cell::RefCell;

use burn::tensor::{Bytes, DType, Shape};
use burn_flex::{FlexTensor, Layout};
use rayon::prelude::*;

use super::math::{exp, multiversion};
use super::SharedPtr;

/// Target size of one task's score block (`rows × S` f32). Larger blocks amortise the
/// GEMMs' packing over more rows; 4 MiB measured best at S = 1024 and 4096 (2, 1 and
/// 8 MiB, and other row caps, were slower on a 2 MiB-L2 Xeon).
const SCORE_BYTES: usize = 4 << 20;

/// Fewest query rows per task from the score-size rule, however long S is (the GEMMs
/// get inefficient with fewer, measured); fewer only when that is what it takes to give
/// every thread work.
const MIN_ROWS: usize = 64;

/// Most query rows per task: bounds a task's time so that the cores balance.
const MAX_ROWS: usize = 256;

/// Query rows are blocked in multiples of this (a vector of f32 lanes), except the
/// last block of a head.
const ROW_ALIGN: usize = 16;

/// Columns of the score block whose exponentials are summed in f32 before being added
/// to the row's total: keeps the sum's rounding error near `(64 + S/64)·ε`, not `S·ε`.
const SUM_BLOCK: usize = 64;

/// A 4-d f32 view: the tensor's storage with its element strides and start offset.
struct View<'a> {
    data: &'a [f32],
    start: usize,
    dims: [usize; 4],
    strides: [isize; 4],
}

impl<'a> View<'a> {
    fn new(t: &'a FlexTensor) -> Self {
        let layout = t.layout();
        let shape = layout.shape();
        let s = layout.strides();
        View {
            data: t.storage::<f32>(),
            start: layout.start_offset(),
            dims: [shape[0], shape[1], shape[2], shape[3]],
            strides: [s[0], s[1], s[2], s[3]],
        }
    }

    /// Pointer to element `[n, h, 0, 0]`.
    fn head(&self, n: usize, h: usize) -> *const f32 {
        let offset =
            self.start as isize + n as isize * self.strides[0] + h as isize * self.strides[1];
        self.data.as_ptr().wrapping_offset(offset)
    }
}

/// Per-thread buffers of the tasks: the score block and each row's max, sum and
/// partial sum. Kept between calls (a few MiB per thread) so that tasks neither
/// allocate nor zero memory.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
    partial: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Softmax attention of `q` `[N, H, L, D]` over `k` `[N, H, S, D]`, `v` `[N, H, S, Dv]`
/// (f32, any strides), scale `1/√D`; when `causal` (needs `L ≤ S`), query `i` sees keys
/// `0..=i + S − L` only. Returns `[N, H, L, Dv]` f32, laid out as `[N, L, H, Dv]`
/// (module docs).
pub(crate) fn attention(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    causal: bool,
) -> FlexTensor {
    let (q, k, v) = (View::new(q), View::new(k), View::new(v));
    let [n, h, l, d] = q.dims;
    let s = k.dims[2];
    let dv = v.dims[3];
    assert!(k.dims == [n, h, s, d] && v.dims == [n, h, s, dv] && d > 0 && s > 0 && l > 0);
    assert!(!causal || l <= s, "causal attention needs L ≤ S");
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let rows = block_rows(n * h, l, s);
    let blocks = l.div_ceil(rows);

    let len = n * l * h * dv;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let out_ptr = SharedPtr(out.as_mut_ptr());
    (0..n * h * blocks).into_par_iter().for_each(|task| {
        let (head, block) = (task / blocks, task % blocks);
        let (ni, hi) = (head / h, head % h);
        let row0 = block * rows;
        let m = rows.min(l - row0);
        // Keys this block sees: all, or (causal) up to its last query's.
        let keys = if causal { row0 + m + (s - l) } else { s };
        let q_blk = q.head(ni, hi).wrapping_offset(row0 as isize * q.strides[2]);
        let out_rs = h * dv;
        let out_blk = out_ptr
            .get()
            .wrapping_add((ni * l + row0) * out_rs + hi * dv);
        SCRATCH.with_borrow_mut(|scratch| {
            let Scratch {
                scores,
                max,
                sum,
                partial,
            } = scratch;
            scores.resize(m * keys, 0.0);
            let scores = &mut scores[..m * keys];
            for buf in [&mut *max, &mut *sum, &mut *partial] {
                buf.resize(m, 0.0);
            }
            // SAFETY: the pointers and strides describe the live views `q`, `k`, `v`
            // (rows `row0..row0 + m` of head (ni, hi)) and the `m × s` score buffer.
            unsafe {
                // scoresᵀ [s, m] = scale · K · Q_blkᵀ, written as scores [m, s] with
                // column-major storage.
                gemm::gemm(
                    m,
                    keys,
                    d,
                    scores.as_mut_ptr(),
                    m as isize,
                    1,
                    false,
                    q_blk,
                    q.strides[3],
                    q.strides[2],
                    k.head(ni, hi),
                    k.strides[2],
                    k.strides[3],
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            if causal {
                // Query `row0 + r` sees keys up to `row0 + r + s − l`: in column `j`,
                // rows below `j − (row0 + s − l)` are masked.
                let first = row0 + (s - l);
                for (j, col) in scores.chunks_exact_mut(m).enumerate().skip(first + 1) {
                    col[..(j - first).min(m)].fill(f32::NEG_INFINITY);
                }
            }
            softmax_columns(scores, max, sum, partial);
            // SAFETY: as above, and `out_blk` addresses this task's own `m × dv` output
            // rows (row stride `out_rs`) inside `out`'s capacity; GEMM writes them
            // without reading them (`read_dst` false).
            unsafe {
                // out_blk = P · V
                gemm::gemm(
                    m,
                    dv,
                    keys,
                    out_blk,
                    1,
                    out_rs as isize,
                    false,
                    scores.as_ptr(),
                    m as isize,
                    1,
                    v.head(ni, hi),
                    v.strides[3],
                    v.strides[2],
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for (r, &total) in sum.iter().enumerate() {
                // SAFETY: row `r` of this task's output block, initialised by the GEMM.
                let row =
                    unsafe { std::slice::from_raw_parts_mut(out_blk.wrapping_add(r * out_rs), dv) };
                scale_row(row, 1.0 / total);
            }
        });
    });
    // SAFETY: the tasks above wrote every element: all (n, h) heads, all row blocks,
    // `dv` values per row.
    unsafe { out.set_len(len) };
    let layout = Layout::new(
        Shape::from(vec![n, h, l, dv]),
        vec![(l * h * dv) as isize, dv as isize, (h * dv) as isize, 1],
        0,
    );
    FlexTensor::new(Bytes::from_elems(out), layout, DType::F32)
}

/// Query rows per task for `heads` (sample, head) pairs of `l` queries over `s` keys:
/// about [`SCORE_BYTES`] of scores within [`MIN_ROWS`]..=[`MAX_ROWS`], fewer when that
/// leaves under four tasks per thread, blocks as equal as [`ROW_ALIGN`] allows.
fn block_rows(heads: usize, l: usize, s: usize) -> usize {
    let mut rows = (SCORE_BYTES / 4 / s).clamp(MIN_ROWS, MAX_ROWS);
    let tasks = 4 * rayon::current_num_threads();
    while rows > ROW_ALIGN && heads * l.div_ceil(rows) < tasks {
        rows /= 2;
    }
    let blocks = l.div_ceil(rows);
    l.div_ceil(blocks).next_multiple_of(ROW_ALIGN).min(l)
}

#[inline(always)]
fn softmax_columns_imp<const FMA: bool>(
    scores: &mut [f32],
    max: &mut [f32],
    sum: &mut [f32],
    partial: &mut [f32],
) {
    let rows = max.len();
    max.fill(f32::NEG_INFINITY);
    for col in scores.chunks_exact(rows) {
        for (m, &x) in max.iter_mut().zip(col) {
            *m = if x > *m { x } else { *m };
        }
    }
    sum.fill(0.0);
    for cols in scores.chunks_mut(SUM_BLOCK * rows) {
        partial.fill(0.0);
        for col in cols.chunks_exact_mut(rows) {
            for ((p, x), &m) in partial.iter_mut().zip(col).zip(&*max) {
                *x = exp::<FMA>(*x - m);
                *p += *x;
            }
        }
        for (s, &p) in sum.iter_mut().zip(&*partial) {
            *s += p;
        }
    }
}

multiversion! {
    /// Softmax numerators of a column-major score block (`max.len()` rows, one column
    /// per key): each row's entries become `exp(x − max(row))`; `sum` gets each row's
    /// sum of them. `max` and `partial` are scratch of the same length.
    fn softmax_columns(
        scores: &mut [f32],
        max: &mut [f32],
        sum: &mut [f32],
        partial: &mut [f32],
    ) => softmax_columns_imp
}

#[inline(always)]
fn scale_row_imp<const FMA: bool>(row: &mut [f32], factor: f32) {
    for x in row {
        *x *= factor;
    }
}

multiversion! {
    /// `row *= factor`.
    fn scale_row(row: &mut [f32], factor: f32) => scale_row_imp
}
