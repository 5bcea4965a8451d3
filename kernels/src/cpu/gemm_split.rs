//! One GEMM split across the threads by blocks of output columns.
//!
//! The `gemm` crate's own threading splits poorly when the matrix has few rows: at 77
//! rows (a CLIP prompt) it reached 58–120 GFLOP/s on two cores where blocks of columns,
//! one task each without inner threading, reach 164–207 (measured with cold weights, as
//! a model streams them); from 128 rows on both are within noise of each other.

use rayon::prelude::*;

use super::SharedPtr;

/// Least `m·n·k` worth splitting across threads.
const PARALLEL_WORK: usize = 1 << 21;

/// Column blocks per thread: two balance uneven finishing without shrinking blocks
/// below GEMM's efficient width (measured: 1, 2, 4, 8 per thread on two cores).
const BLOCKS_PER_THREAD: usize = 2;

/// Narrowest column block (a multiple of the micro-kernel's vector width).
const MIN_BLOCK: usize = 64;

/// Strides of one operand, in elements: `(column stride, row stride)`, as `gemm` takes.
pub(crate) type Strides = (isize, isize);

/// `dst [m, n] = (read_dst ? dst : 0) + lhs [m, k] · rhs [k, n]` in f32, blocks of `n`
/// in parallel on the current rayon pool.
///
/// # Safety
/// The pointers with their strides must address valid `m × n`, `m × k` and `k × n`
/// matrices; `dst` must not overlap the operands and, when `read_dst`, be initialised.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    [m, n, k]: [usize; 3],
    dst: *mut f32,
    (dst_cs, dst_rs): Strides,
    read_dst: bool,
    lhs: *const f32,
    (lhs_cs, lhs_rs): Strides,
    rhs: *const f32,
    (rhs_cs, rhs_rs): Strides,
) {
    let threads = rayon::current_num_threads().max(1);
    let blocks = if m * n * k >= PARALLEL_WORK {
        (threads * BLOCKS_PER_THREAD).min(n / MIN_BLOCK).max(1)
    } else {
        1
    };
    let width = n.div_ceil(blocks).next_multiple_of(16).min(n);
    let (dst, lhs, rhs) = (SharedPtr(dst), SharedPtr(lhs), SharedPtr(rhs));
    let block = |j: usize| {
        let c0 = j * width;
        let cols = width.min(n - c0);
        // SAFETY: the caller's matrices; block `j` is columns `c0..c0 + cols` of `dst`
        // and `rhs`, written by this task alone.
        unsafe {
            ::gemm::gemm(
                m,
                cols,
                k,
                dst.get().wrapping_offset(c0 as isize * dst_cs),
                dst_cs,
                dst_rs,
                read_dst,
                lhs.get(),
                lhs_cs,
                lhs_rs,
                rhs.get().wrapping_offset(c0 as isize * rhs_cs),
                rhs_cs,
                rhs_rs,
                1.0,
                1.0,
                false,
                false,
                false,
                ::gemm::Parallelism::None,
            );
        }
    };
    let count = n.div_ceil(width.max(1));
    if count <= 1 {
        (0..count).for_each(block);
    } else {
        (0..count).into_par_iter().for_each(block);
    }
}
