//! Flash attention: softmax(q·kᵀ/√d)·v with an online softmax over key tiles held in
//! shared memory, so no score matrix is ever stored (at 1024² SDXL's VAE would need
//! 16384² scores, 1 GiB in f32, and the UNet 4096² per head). Accumulation is f32
//! whatever the storage dtype.
//!
//! One unit per query row, `BLOCK_Q` rows per cube; the cube loads each key/value
//! tile once for all its rows. Plain FMAs, no tensor cores: portable to every
//! CubeCL target (WGSL, SPIR-V, CUDA) and every head width (the VAE's is 512).

use burn::tensor::backend::Backend;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Shape, Tensor as BurnTensor, TensorPrimitive};
use burn_cubecl::kernel::attention::{attention as burn_attention, AttentionStrategy};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeTuneId;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::prelude::*;
use cubecl::tune::{local_tuner, LocalTuner, Tunable, TunableSet};
use cubecl::{CubeCount, CubeDim};
use cubek::attention::launch::AttentionAutotuneKey;
use cubek::attention::routines::blackbox_accelerated::BlackboxAcceleratedStrategy;

use crate::plain;

/// Query rows (units) per cube.
const BLOCK_Q: u32 = 64;
/// Shared memory for one key tile plus one value tile, in f32: 16 KiB, the WebGPU
/// minimum every adapter grants.
const TILE_BYTES: usize = 16 * 1024;
/// Widest head the kernel takes ([`crate::MAX_HEAD_DIM`]). Wider heads (the VAE's single 512-wide head) take the
/// chunked plain path: their per-unit query and accumulator arrays (2 × 512 floats)
/// came out wrong on Mesa's lavapipe, and at that width the chunked path's matmuls
/// have the arithmetic intensity to use the GPU well anyway.
pub const MAX_HEAD_DIM: usize = crate::MAX_HEAD_DIM;

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn flash_attention_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &mut Tensor<F>,
    heads: usize,
    seq_q: usize,
    seq_kv: usize,
    scale: f32,
    #[comptime] dim: usize,
    #[comptime] block_q: u32,
    #[comptime] block_k: usize,
    #[define(F)] _dtype: StorageType,
) {
    let bh = CUBE_POS_Y as usize;
    let b = bh / heads;
    let h = bh % heads;
    let tid = UNIT_POS_X as usize;
    let row = CUBE_POS_X as usize * (block_q as usize) + tid;
    let valid = row < seq_q;

    // The query row, pre-scaled, and the output accumulator live in registers.
    let mut q_row = Array::<f32>::new(dim);
    let mut acc = Array::<f32>::new(dim);
    let q_base = b * q.stride(0) + h * q.stride(1) + row * q.stride(2);
    for d in 0..dim {
        let mut x = f32::new(0.0);
        if valid {
            x = f32::cast_from(q[q_base + d * q.stride(3)]) * scale;
        }
        q_row[d] = x;
        acc[d] = f32::new(0.0);
    }

    let mut k_tile = SharedMemory::<f32>::new(block_k * dim);
    let mut v_tile = SharedMemory::<f32>::new(block_k * dim);
    let mut scores = Array::<f32>::new(block_k);
    let k_base = b * k.stride(0) + h * k.stride(1);
    let v_base = b * v.stride(0) + h * v.stride(1);
    let tile_len = block_k * dim;

    let mut running_max = f32::new(-1.0e30);
    let mut running_sum = f32::new(0.0);
    let mut start = 0;
    while start < seq_kv {
        // Every unit of the cube helps load the tile, valid row or not.
        let mut i = tid;
        while i < tile_len {
            let key = start + i / dim;
            let d = i % dim;
            if key < seq_kv {
                k_tile[i] = f32::cast_from(k[k_base + key * k.stride(2) + d * k.stride(3)]);
                v_tile[i] = f32::cast_from(v[v_base + key * v.stride(2) + d * v.stride(3)]);
            }
            i += block_q as usize;
        }
        sync_cube();

        let mut keys = seq_kv - start;
        if keys > block_k {
            keys = block_k;
        }
        let mut tile_max = f32::new(-1.0e30);
        for j in 0..keys {
            let mut s = f32::new(0.0);
            for d in 0..dim {
                s += q_row[d] * k_tile[j * dim + d];
            }
            scores[j] = s;
            tile_max = max(tile_max, s);
        }
        // Rescale what was accumulated under the old maximum once per tile.
        let new_max = max(running_max, tile_max);
        let correction = (running_max - new_max).exp();
        running_sum *= correction;
        for d in 0..dim {
            acc[d] *= correction;
        }
        for j in 0..keys {
            let p = (scores[j] - new_max).exp();
            running_sum += p;
            for d in 0..dim {
                acc[d] += p * v_tile[j * dim + d];
            }
        }
        running_max = new_max;
        sync_cube();
        start += block_k;
    }

    if valid {
        let o_base = (bh * seq_q + row) * dim;
        let inv = f32::new(1.0) / running_sum;
        for d in 0..dim {
            out[o_base + d] = F::cast_from(acc[d] * inv);
        }
    }
}

/// Keys per tile for a head width: as many as fit [`TILE_BYTES`], at most 64.
fn block_k(dim: usize) -> usize {
    (TILE_BYTES / (2 * dim * 4)).clamp(1, 64)
}

/// `q` `[N, H, L, D]`, `k`, `v` `[N, H, S, D]` (any strides) → `[N, H, L, D]` contiguous.
pub fn flash_attention<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
) -> CubeTensor<R> {
    let [n, h, l, d] = q.meta.shape().dims::<4>();
    let s = k.meta.shape().dims::<4>()[2];
    let client = q.client.clone();
    let dtype = q.dtype;
    let out = empty_device_contiguous_dtype::<R>(
        client.clone(),
        q.device.clone(),
        Shape::new([n, h, l, d]),
        dtype,
    );
    if n * h * l * d == 0 {
        return out;
    }
    let cubes_q = l.div_ceil(BLOCK_Q as usize) as u32;
    flash_attention_kernel::launch::<R>(
        &client,
        CubeCount::Static(cubes_q, (n * h) as u32, 1),
        CubeDim::new_1d(BLOCK_Q),
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        h,
        l,
        s,
        1.0 / (d as f32).sqrt(),
        d,
        BLOCK_Q,
        block_k(d),
        dtype.into(),
    );
    out
}

type Qkv<R> = (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>);

/// Attention by the fastest of the bounded-memory kernels for this device and shape,
/// timed once per shape by CubeCL's autotuner: our flash kernel; Burn's tensor-core
/// flash kernels where the device has them (they fail setup elsewhere and drop out;
/// their inputs are made contiguous, which Burn 0.21's flash kernels need); or Burn's
/// attention op over blocks of query rows (matmuls, at most [`plain::SCORE_BUDGET`]
/// scores). Never Burn's whole-matrix fallback. Burn's unit flash kernel is not a
/// candidate: wrong on strided inputs and at 7e-5 relative error in f32 on contiguous
/// ones (ours: 3e-7). On lavapipe the row-block path wins (its matmuls are vectorised,
/// our kernel's FMAs are not); on GPUs the autotuner decides.
pub fn attention_autotuned<R, F, I, BT>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
) -> CubeTensor<R>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    static TUNER: LocalTuner<AttentionAutotuneKey, CubeTuneId> = local_tuner!();
    let client = q.client.clone();
    let id = CubeTuneId::new(&client, &q.device);
    let tunables = TUNER.init(|| {
        let burn = |strategy: fn() -> AttentionStrategy| {
            move |(q, k, v): Qkv<R>| {
                burn_attention(
                    burn_cubecl::kernel::into_contiguous(q),
                    burn_cubecl::kernel::into_contiguous(k),
                    burn_cubecl::kernel::into_contiguous(v),
                    None,
                    None,
                    AttentionModuleOptions::default(),
                    strategy(),
                )
                .map_err(|e| format!("{e:?}"))
            }
        };
        let mut set = TunableSet::new(key::<R>, |_: &AttentionAutotuneKey, qkv: &Qkv<R>| {
            qkv.clone()
        })
        .with(Tunable::new("hypergen_flash", |(q, k, v): Qkv<R>| {
            Ok::<_, String>(flash_attention(q, k, v))
        }))
        .with(Tunable::new("chunked_matmul", |(q, k, v): Qkv<R>| {
            Ok::<_, String>(chunked::<CubeBackend<R, F, I, BT>>(q, k, v))
        }));
        let accelerated: [fn() -> AttentionStrategy; 3] =
            [|| accelerated(2), || accelerated(4), || accelerated(8)];
        for (planes, strategy) in [2, 4, 8].into_iter().zip(accelerated) {
            set = set.with(Tunable::new(
                &format!("burn_flash_accelerated_{planes}_planes"),
                burn(strategy),
            ));
        }
        set
    });
    TUNER.execute(&id, &client, tunables, (q, k, v))
}

/// Burn's attention op over blocks of query rows ([`plain::attention_chunked`]): score
/// blocks through the backend's matmuls, never more than [`plain::SCORE_BUDGET`] scores.
fn chunked<B: Backend>(
    q: B::FloatTensorPrimitive,
    k: B::FloatTensorPrimitive,
    v: B::FloatTensorPrimitive,
) -> B::FloatTensorPrimitive {
    let t = |p| BurnTensor::<B, 4>::from_primitive(TensorPrimitive::Float(p));
    plain::attention_chunked(t(q), t(k), t(v), plain::SCORE_BUDGET)
        .into_primitive()
        .tensor()
}

fn accelerated(num_planes: u8) -> AttentionStrategy {
    AttentionStrategy::FlashBlackboxAccelerated(BlackboxAcceleratedStrategy {
        num_planes,
        seq_q: 1,
        seq_kv: 1,
    })
}

fn key<R: CubeRuntime>((q, _k, v): &Qkv<R>) -> AttentionAutotuneKey {
    let [n, h, l, d] = q.meta.shape().dims::<4>();
    let [_, _, s, dv] = v.meta.shape().dims::<4>();
    let dtype = q.dtype.into();
    AttentionAutotuneKey::generate(dtype, dtype, dtype, dtype, n * h, l, d, s, dv, false)
}
