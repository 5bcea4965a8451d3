//! The CPU backend's (`Flex`) fused ops: native Rust on Flex's tensor storage, tasks on
//! Flex's own rayon pool, hot loops vectorised for the CPU's instruction set at run time.
//!
//! Burn's tensor ops on the CPU take a pass (and an allocation) per op of the plain
//! compositions: 0.2–0.6 GB/s for GroupNorm and GEGLU, and attention ran at a fifth of
//! PyTorch's speed. Here each op is one pass over its data ([`group_norm`], [`geglu`])
//! or blocked GEMMs around an in-cache softmax ([`attention`]), and convolutions are
//! GEMMs on row blocks of their input, neither transposed nor copied whole ([`conv`]),
//! linear layers one GEMM over all rows with the bias written first ([`linear`]), and
//! LayerNorm one pass per row in cache ([`layer_norm`]).
//!
//! - Each kernel honours [`KernelSet::current`]: off, the op is the plain composition.
//! - The kernels compute in f32. Float16 and bfloat16 tensors are cast to f32 around
//!   them (Burn's cast, one pass each way), which keeps the f32 statistics and
//!   accumulation the plain ops have; other dtypes take the plain ops.
//! - Data is read through the tensor primitive, never through `into_data`. GroupNorm and
//!   GEGLU write into their input's buffer when the call holds its only handle (a new
//!   buffer costs a page fault per 4 KiB, which dominated these ops); GEGLU's result is
//!   then the first half of each row, a strided view. Attention's result is the
//!   `[N, H, L, D]` view of an `[N, L, H, D]` buffer, so merging heads next is free.

use std::sync::OnceLock;

use burn::backend::Flex;
use burn::tensor::{Bytes, DType, Shape, Tensor, TensorPrimitive};
use burn_flex::{FlexTensor, Layout};

use crate::{plain, Activation, FusedOps, KernelSet};

mod activation;
mod attention;
mod awake;
mod conv;
mod geglu;
mod gemm_split;
mod group_norm;
mod layer_norm;
mod linear;
pub(crate) mod math;
mod panels;
mod winograd;

#[cfg(test)]
mod tests;

impl FusedOps for Flex {
    fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        // A pool of the models' own, as large as the global one: a thread waiting in a
        // join runs other tasks of its pool, and tasks the application's threads put in
        // the global pool (image decoding, adapter loading) must not run inside a
        // model's ops.
        static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
        let pool = POOL.get_or_init(|| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(rayon::current_num_threads())
                .thread_name(|i| format!("hypergen-cpu-{i}"))
                .build()
                .ok()
        });
        match pool {
            Some(pool) => pool.install(|| awake::with_workers_awake(f)),
            None => f(),
        }
    }

    fn fused_group_norm(
        x: Tensor<Self, 3>,
        affine: Option<(Tensor<Self, 1>, Tensor<Self, 1>)>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Tensor<Self, 3> {
        let [n, c, l] = x.dims();
        if !KernelSet::current().group_norm
            || !half_or_f32(x.dtype())
            || groups == 0
            || !c.is_multiple_of(groups)
            || n * c * l == 0
        {
            return plain::group_norm(x, affine, groups, eps, silu);
        }
        let dtype = x.dtype();
        let mut x = contiguous_f32(x);
        let affine = affine.map(|(g, b)| (contiguous_f32(g), contiguous_f32(b)));
        let params = group_norm::Params {
            dims: [n, c, l],
            groups,
            affine: affine
                .as_ref()
                .map(|(g, b)| (g.storage::<f32>(), b.storage::<f32>())),
            eps,
            silu,
        };
        // In place when nothing else holds the input (often: a convolution's output).
        if let Some(values) = x.try_storage_mut::<f32>() {
            group_norm::group_norm_in_place(values, params);
            return wrap(x, dtype);
        }
        let mut out = Vec::with_capacity(n * c * l);
        group_norm::group_norm(
            x.storage::<f32>(),
            &mut out.spare_capacity_mut()[..n * c * l],
            params,
        );
        // SAFETY: `group_norm` wrote every element.
        unsafe { out.set_len(n * c * l) };
        wrap(from_vec(out, vec![n, c, l]), dtype)
    }

    fn fused_geglu(x: Tensor<Self, 3>) -> Tensor<Self, 3> {
        let [n, l, w] = x.dims();
        if !KernelSet::current().geglu
            || !half_or_f32(x.dtype())
            || !w.is_multiple_of(2)
            || n * l * w == 0
        {
            return plain::geglu(x);
        }
        let (dtype, half) = (x.dtype(), w / 2);
        let mut x = contiguous_f32(x);
        // In place when nothing else holds the input (the projection's output in the
        // model): the result is the first half of each row, a strided view of it.
        if let Some(values) = x.try_storage_mut::<f32>() {
            geglu::geglu_in_place(values, half);
            let layout = Layout::new(
                Shape::from(vec![n, l, half]),
                vec![(l * w) as isize, w as isize, 1],
                0,
            );
            return wrap(x.with_layout(layout), dtype);
        }
        let len = n * l * half;
        let mut out = Vec::with_capacity(len);
        geglu::geglu(
            x.storage::<f32>(),
            &mut out.spare_capacity_mut()[..len],
            half,
        );
        // SAFETY: `geglu` wrote every element.
        unsafe { out.set_len(len) };
        wrap(from_vec(out, vec![n, l, half]), dtype)
    }

    fn fused_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
    ) -> Tensor<Self, 4> {
        attention_or(q, k, v, false, |q, k, v| {
            plain::attention_chunked(q, k, v, plain::SCORE_BUDGET)
        })
    }

    fn fused_causal_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
    ) -> Tensor<Self, 4> {
        attention_or(q, k, v, true, plain::attention_causal)
    }

    fn fused_activation<const D: usize>(x: Tensor<Self, D>, act: Activation) -> Tensor<Self, D> {
        if !KernelSet::current().activation || !half_or_f32(x.dtype()) {
            return plain::activation(x, act);
        }
        // In place as a rule: the input is a linear layer's output.
        map_values(x, |values| activation::activation_in_place(values, act))
    }

    fn fused_conv2d(
        x: Tensor<Self, 4>,
        weight: Tensor<Self, 4>,
        bias: Option<Tensor<Self, 1>>,
        stride: usize,
        padding: usize,
    ) -> Tensor<Self, 4> {
        conv2d(x, weight, bias, stride, padding, 1, |x, weight, bias| {
            plain::conv2d(x, weight, bias, stride, padding)
        })
    }

    fn fused_upsample_conv2d(
        x: Tensor<Self, 4>,
        weight: Tensor<Self, 4>,
        bias: Option<Tensor<Self, 1>>,
        padding: usize,
    ) -> Tensor<Self, 4> {
        conv2d(x, weight, bias, 1, padding, 2, |x, weight, bias| {
            plain::conv2d(plain::upsample_nearest2x(x), weight, bias, 1, padding)
        })
    }

    fn fused_layer_norm<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 1>,
        bias: Tensor<Self, 1>,
        eps: f64,
    ) -> Tensor<Self, D> {
        let dims = x.dims();
        let dtype = x.dtype();
        let dim = if D == 0 { 0 } else { dims[D - 1] };
        if !KernelSet::current().layer_norm
            || !half_or_f32(dtype)
            || dim == 0
            || weight.dims() != [dim]
            || bias.dims() != [dim]
        {
            return plain::layer_norm(x, weight, bias, eps);
        }
        let (weight, bias) = (contiguous_f32(weight), contiguous_f32(bias));
        // Usually a copy: the residual stream is cloned.
        map_values(x, |values| {
            layer_norm::layer_norm_in_place(
                values,
                dim,
                weight.storage::<f32>(),
                bias.storage::<f32>(),
                eps,
            )
        })
    }

    fn fused_linear<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, D> {
        if !KernelSet::current().linear || !linear_operands(&x, &weight, bias.as_ref()) {
            return plain::linear(x, weight, bias);
        }
        let dims = x.dims();
        let [input, output] = weight.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let x = x.into_primitive().tensor();
        // The rows of `x` as one matrix through its strides when its leading dims merge
        // (contiguous tensors, GEGLU's half rows); a contiguous copy otherwise.
        let (x, [x_rs, x_cs]) = match row_strides(x.layout()) {
            Some(strides) => (x, strides),
            None => {
                let x = x.to_contiguous();
                let strides = row_strides(x.layout()).expect("a contiguous layout merges");
                (x, strides)
            }
        };
        let bias = bias.map(contiguous_f32);
        let weight = weight.into_primitive().tensor();
        let w_strides = weight.layout().strides();
        let out = linear::linear(
            &matrix(&x, [rows, input], [x_rs, x_cs]),
            &matrix(&weight, [input, output], [w_strides[0], w_strides[1]]),
            bias.as_ref().map(|b| b.storage::<f32>()),
        );
        linear_output(out, dims, output)
    }

    fn linear_panels(dtype: DType) -> bool {
        dtype == DType::F32 && KernelSet::current().linear && panels::available()
    }

    fn fused_linear_panels<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, D> {
        // Whatever `KernelSet` says now: the weight is in panels and only this kernel or
        // the fallback (the layout restored) reads it.
        if !panels::available() || !linear_operands(&x, &weight, bias.as_ref()) {
            return Self::fused_linear(x, plain::from_panels(weight), bias);
        }
        let dims = x.dims();
        let [input, output] = weight.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let x = x.into_primitive().tensor();
        // The rows of `x` through their stride when its columns are adjacent; a
        // contiguous copy otherwise.
        let (x, [x_rs, _]) = match row_strides(x.layout()) {
            Some([rs, 1]) if rs >= 0 => (x, [rs, 1]),
            _ => {
                let x = x.to_contiguous();
                let strides = row_strides(x.layout()).expect("a contiguous layout merges");
                (x, strides)
            }
        };
        let bias = bias.map(contiguous_f32);
        let weight = contiguous_f32(weight);
        let out = panels::linear(
            &matrix(&x, [rows, input], [x_rs, 1]),
            weight.storage::<f32>(),
            output,
            bias.as_ref().map(|b| b.storage::<f32>()),
        );
        linear_output(out, dims, output)
    }
}

/// Whether our linear kernels take these operands: f32 throughout, `x`'s last dim the
/// weight's rows, a bias as long as its columns.
fn linear_operands<const D: usize>(
    x: &Tensor<Flex, D>,
    weight: &Tensor<Flex, 2>,
    bias: Option<&Tensor<Flex, 1>>,
) -> bool {
    let [input, output] = weight.dims();
    D > 0
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && bias.is_none_or(|b| b.dtype() == DType::F32 && b.dims() == [output])
        && x.dims()[D - 1] == input
}

/// A linear kernel's `[rows, output]` result as the tensor of `x`'s shape `dims` with
/// its last dim `output`.
fn linear_output<const D: usize>(
    out: Vec<f32>,
    dims: [usize; D],
    output: usize,
) -> Tensor<Flex, D> {
    let mut shape = dims.to_vec();
    shape[D - 1] = output;
    wrap(from_vec(out, shape), DType::F32)
}

/// Our convolution of `x` upsampled `upsample`× (nearest), or `fallback` (the same
/// through Burn's ops) for what it does not take: half precision (casting both ways
/// around ours would cost more than it saves at dtypes the CPU is not run in by
/// default), mismatched shapes, an empty output, or the kernel switched off.
fn conv2d(
    x: Tensor<Flex, 4>,
    weight: Tensor<Flex, 4>,
    bias: Option<Tensor<Flex, 1>>,
    stride: usize,
    padding: usize,
    upsample: usize,
    fallback: impl FnOnce(Tensor<Flex, 4>, Tensor<Flex, 4>, Option<Tensor<Flex, 1>>) -> Tensor<Flex, 4>,
) -> Tensor<Flex, 4> {
    let [n, ci, h, w] = x.dims();
    let [co, wci, kh, kw] = weight.dims();
    let params = conv::Params {
        input: [n, ci, h, w],
        out_channels: co,
        kernel: [kh, kw],
        stride,
        padding,
        upsample,
    };
    let dtype = x.dtype();
    let Some([ho, wo]) = params.output_size() else {
        return fallback(x, weight, bias);
    };
    if !KernelSet::current().conv
        || dtype != DType::F32
        || weight.dtype() != dtype
        || bias
            .as_ref()
            .is_some_and(|b| b.dtype() != dtype || b.dims() != [co])
        || wci != ci
        || n * co * ho * wo == 0
    {
        return fallback(x, weight, bias);
    }
    let (x, weight) = (contiguous_f32(x), contiguous_f32(weight));
    let bias = bias.map(contiguous_f32);
    let conv = if KernelSet::current().winograd && winograd::applies(&params) {
        winograd::conv2d
    } else {
        conv::conv2d
    };
    let out = conv(
        x.storage::<f32>(),
        weight.storage::<f32>(),
        bias.as_ref().map(|b| b.storage::<f32>()),
        params,
    );
    wrap(from_vec(out, vec![n, co, ho, wo]), dtype)
}

/// `x` (f32, f16 or bf16) with `f` applied to its values as one contiguous f32 slice: in
/// place when nothing else holds the input, else on a copy; the result in `x`'s dtype.
fn map_values<const D: usize>(x: Tensor<Flex, D>, f: impl FnOnce(&mut [f32])) -> Tensor<Flex, D> {
    let (dims, dtype) = (x.dims(), x.dtype());
    let mut x = contiguous_f32(x);
    if let Some(values) = x.try_storage_mut::<f32>() {
        f(values);
        return wrap(x, dtype);
    }
    let mut values = x.storage::<f32>().to_vec();
    f(&mut values);
    wrap(from_vec(values, dims.to_vec()), dtype)
}

/// Our attention kernel (`causal` or not) where it applies, else `plain`.
fn attention_or(
    q: Tensor<Flex, 4>,
    k: Tensor<Flex, 4>,
    v: Tensor<Flex, 4>,
    causal: bool,
    plain: impl FnOnce(Tensor<Flex, 4>, Tensor<Flex, 4>, Tensor<Flex, 4>) -> Tensor<Flex, 4>,
) -> Tensor<Flex, 4> {
    let [n, h, l, d] = q.dims();
    let [kn, kh, s, kd] = k.dims();
    let [vn, vh, vs, dv] = v.dims();
    let dtype = q.dtype();
    if !KernelSet::current().attention
        || !half_or_f32(dtype)
        || k.dtype() != dtype
        || v.dtype() != dtype
        || [kn, kh, kd] != [n, h, d]
        || [vn, vh, vs] != [n, h, s]
        || n * h * l * d * s * dv == 0
        || (causal && l > s)
    {
        return plain(q, k, v);
    }
    // Views stay views in f32 (no copy); half precision is cast to f32 once.
    let prim = |t: Tensor<Flex, 4>| {
        let t = if t.dtype() == DType::F32 {
            t
        } else {
            t.cast(DType::F32)
        };
        t.into_primitive().tensor()
    };
    wrap(
        attention::attention(&prim(q), &prim(k), &prim(v), causal),
        dtype,
    )
}

/// The f32 tensor `t` as the matrix `dims` with `strides` from its start offset.
fn matrix(t: &FlexTensor, dims: [usize; 2], strides: [isize; 2]) -> linear::Matrix<'_> {
    linear::Matrix {
        data: t.storage::<f32>(),
        start: t.layout().start_offset(),
        dims,
        strides,
    }
}

/// Row and column strides of a layout seen as a matrix of its last dim's rows: `Some`
/// when every leading dim steps by the next one's stride times its size.
fn row_strides(layout: &Layout) -> Option<[isize; 2]> {
    let (dims, strides) = (layout.shape(), layout.strides());
    let d = strides.len();
    match d {
        0 => None,
        1 => Some([dims[0] as isize * strides[0], strides[0]]),
        _ => (0..d - 2)
            .all(|i| dims[i] == 1 || strides[i] == strides[i + 1] * dims[i + 1] as isize)
            .then(|| [strides[d - 2], strides[d - 1]]),
    }
}

/// Values per rayon task of the element-wise passes (activations, GEGLU's output, the
/// linear kernel's bias fill): 256 KiB of f32, enough to amortise a task, small enough
/// to balance across cores.
const ELEMENTWISE_TASK: usize = 1 << 16;

/// A pointer the rayon tasks of one kernel share: each task reads the inputs and writes
/// its own disjoint part of the output, all of which outlive the tasks (rayon joins
/// before the kernel returns).
#[derive(Clone, Copy)]
struct SharedPtr<T>(T);
// SAFETY: see the type's docs; every user upholds them.
unsafe impl<T> Send for SharedPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SharedPtr<T> {}

impl<T: Copy> SharedPtr<T> {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> T {
        self.0
    }
}

/// Whether our kernels take this dtype (f32, or f16/bf16 cast to f32 around them).
fn half_or_f32(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// `t` as a contiguous f32 Flex tensor whose storage starts at element 0 and holds
/// exactly its elements (copied only if it is not already that).
fn contiguous_f32<const D: usize>(t: Tensor<Flex, D>) -> FlexTensor {
    let t = if t.dtype() == DType::F32 {
        t
    } else {
        t.cast(DType::F32)
    };
    let prim = t.into_primitive().tensor();
    let exact = prim.is_contiguous()
        && prim.layout().start_offset() == 0
        && prim.bytes().len() == prim.layout().num_elements() * 4;
    if exact {
        prim
    } else {
        prim.to_contiguous()
    }
}

/// A contiguous f32 tensor of `shape` over `values`.
fn from_vec(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(values),
        Layout::contiguous(shape.into()),
        DType::F32,
    )
}

/// The f32 primitive `t` as a tensor of `dtype`.
fn wrap<const D: usize>(t: FlexTensor, dtype: DType) -> Tensor<Flex, D> {
    let t = Tensor::from_primitive(TensorPrimitive::Float(t));
    if dtype == DType::F32 {
        t
    } else {
        t.cast(dtype)
    }
}
