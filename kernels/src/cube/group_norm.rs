//! GroupNorm(+SiLU) in three small launches instead of the plain path's dozen:
//! per-chunk statistics (mean and centred sum of squares, f32), their merge per group
//! (Chan's parallel formula, exact to rounding), then one pass that normalises, applies
//! the affine and the SiLU and writes the input dtype.

use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, CubeCount, CubeDim};

/// Threads per statistics cube (a power of two: tree reduction).
const STATS_THREADS: u32 = 256;
/// Elements per statistics chunk: 32 per thread.
const CHUNK: usize = 8192;

/// Tree-sums `value` over the cube's `STATS_THREADS` units; every unit gets the total.
#[cube]
fn cube_sum(value: f32, #[comptime] threads: u32) -> f32 {
    let mut shared = SharedMemory::<f32>::new(threads as usize);
    let tid = UNIT_POS_X as usize;
    shared[tid] = value;
    sync_cube();
    // CUBE_DIM_X (= threads) is read at run time: the loop variable must be mutable.
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if tid < stride {
            shared[tid] = shared[tid] + shared[tid + stride];
        }
        sync_cube();
        stride /= 2;
    }
    let total = shared[0];
    sync_cube();
    total
}

/// Cube (chunk, group): mean and centred sum of squares of one chunk of one group.
#[cube(launch)]
fn chunk_stats_kernel<F: Float>(
    input: &Tensor<F>,
    partials: &mut Tensor<f32>,
    group_len: usize,
    chunk_len: usize,
    chunks: usize,
    #[comptime] threads: u32,
    #[define(F)] _dtype: StorageType,
) {
    let chunk = CUBE_POS_X as usize;
    let group = CUBE_POS_Y as usize;
    let tid = UNIT_POS_X as usize;
    let step = threads as usize;
    let start = chunk * chunk_len;
    let mut end = start + chunk_len;
    if end > group_len {
        end = group_len;
    }
    let base = group * group_len;
    let count = f32::cast_from(end - start);

    // Deviations from the group's first element are summed, not raw values: a large
    // mean next to a small spread would otherwise lose the spread's digits in f32.
    let pivot = f32::cast_from(input[base]);
    let mut sum = f32::new(0.0);
    let mut i = start + tid;
    while i < end {
        sum += f32::cast_from(input[base + i]) - pivot;
        i += step;
    }
    let mean = pivot + cube_sum(sum, threads) / count;

    let mut m2 = f32::new(0.0);
    let mut j = start + tid;
    while j < end {
        let d = f32::cast_from(input[base + j]) - mean;
        m2 += d * d;
        j += step;
    }
    let m2 = cube_sum(m2, threads);

    if tid == 0 {
        let out = (group * chunks + chunk) * 2;
        partials[out] = mean;
        partials[out + 1] = m2;
    }
}

/// One unit per group: merges its chunks' statistics into `(mean, 1/sqrt(var + eps))`.
#[cube(launch)]
fn merge_stats_kernel(
    partials: &Tensor<f32>,
    stats: &mut Tensor<f32>,
    groups: usize,
    group_len: usize,
    chunk_len: usize,
    chunks: usize,
    eps: f32,
) {
    let group = ABSOLUTE_POS;
    if group >= groups {
        terminate!();
    }
    let mut n = f32::new(0.0);
    let mut mean = f32::new(0.0);
    let mut m2 = f32::new(0.0);
    for c in 0..chunks {
        let start = c * chunk_len;
        let mut end = start + chunk_len;
        if end > group_len {
            end = group_len;
        }
        let nb = f32::cast_from(end - start);
        let at = (group * chunks + c) * 2;
        let mean_b = partials[at];
        let m2_b = partials[at + 1];
        let total = n + nb;
        let delta = mean_b - mean;
        mean += delta * nb / total;
        m2 += m2_b + delta * delta * n * nb / total;
        n = total;
    }
    let var = m2 / n;
    stats[group * 2] = mean;
    stats[group * 2 + 1] = (var + eps).inverse_sqrt();
}

/// Elementwise: normalise, affine, optional SiLU, cast to `F`.
#[cube(launch)]
fn apply_kernel<F: Float, P: Float>(
    input: &Tensor<F>,
    stats: &Tensor<f32>,
    gamma: &Tensor<P>,
    beta: &Tensor<P>,
    output: &mut Tensor<F>,
    channels: usize,
    spatial: usize,
    group_len: usize,
    #[comptime] affine: bool,
    #[comptime] silu: bool,
    #[define(F, P)] _dtypes: [StorageType; 2],
) {
    if ABSOLUTE_POS >= output.len() {
        terminate!();
    }
    let group = ABSOLUTE_POS / group_len;
    let mut y = (f32::cast_from(input[ABSOLUTE_POS]) - stats[group * 2]) * stats[group * 2 + 1];
    if affine {
        let c = (ABSOLUTE_POS / spatial) % channels;
        y = y * f32::cast_from(gamma[c]) + f32::cast_from(beta[c]);
    }
    if silu {
        y = y / (f32::new(1.0) + (-y).exp());
    }
    output[ABSOLUTE_POS] = F::cast_from(y);
}

/// GroupNorm on `x` `[N, C, L]`; `affine` holds `gamma`, `beta` `[C]` in one float dtype
/// (the parameters', read as they are stored: no cast per call).
pub fn group_norm<R: CubeRuntime>(
    x: CubeTensor<R>,
    affine: Option<(CubeTensor<R>, CubeTensor<R>)>,
    groups: usize,
    eps: f64,
    silu: bool,
) -> CubeTensor<R> {
    let x = into_contiguous(x);
    let [n, c, l] = x.meta.shape().dims::<3>();
    let client = x.client.clone();
    let device = x.device.clone();
    let dtype = x.dtype;
    let out = empty_device_contiguous_dtype::<R>(
        client.clone(),
        device.clone(),
        Shape::new([n, c, l]),
        dtype,
    );
    let total = n * c * l;
    if total == 0 {
        return out;
    }
    let all_groups = n * groups;
    let group_len = total / all_groups;
    let chunks = group_len.div_ceil(CHUNK);

    let partials = empty_device_contiguous_dtype::<R>(
        client.clone(),
        device.clone(),
        Shape::new([all_groups, chunks, 2]),
        DType::F32,
    );
    chunk_stats_kernel::launch::<R>(
        &client,
        CubeCount::Static(chunks as u32, all_groups as u32, 1),
        CubeDim::new_1d(STATS_THREADS),
        x.clone().into_tensor_arg(),
        partials.clone().into_tensor_arg(),
        group_len,
        CHUNK,
        chunks,
        STATS_THREADS,
        dtype.into(),
    );

    let stats = empty_device_contiguous_dtype::<R>(
        client.clone(),
        device.clone(),
        Shape::new([all_groups, 2]),
        DType::F32,
    );
    let cube_dim = CubeDim::new(&client, all_groups);
    merge_stats_kernel::launch::<R>(
        &client,
        calculate_cube_count_elemwise(&client, all_groups, cube_dim),
        cube_dim,
        partials.into_tensor_arg(),
        stats.clone().into_tensor_arg(),
        all_groups,
        group_len,
        CHUNK,
        chunks,
        eps as f32,
    );

    // Without an affine the kernel never reads gamma/beta; the stats buffer stands in.
    let has_affine = affine.is_some();
    let (gamma, beta) = match affine {
        Some((g, b)) => (into_contiguous(g), into_contiguous(b)),
        None => (stats.clone(), stats.clone()),
    };
    let param_dtype = gamma.dtype;
    let cube_dim = CubeDim::new(&client, total);
    apply_kernel::launch::<R>(
        &client,
        calculate_cube_count_elemwise(&client, total, cube_dim),
        cube_dim,
        x.into_tensor_arg(),
        stats.into_tensor_arg(),
        gamma.into_tensor_arg(),
        beta.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        c,
        l,
        group_len,
        has_affine,
        silu,
        [dtype.into(), param_dtype.into()],
    );
    out
}
