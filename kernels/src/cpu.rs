//! The CPU backend's (`Flex`) fused ops: native Rust on Flex's tensor storage, tasks on
//! Flex's own rayon pool, hot loops vectorised for the CPU's instruction set at run time.
//!
//! Burn's tensor ops on the CPU take a pass (and an allocation) per op of the plain
//! compositions: 0.2–0.6 GB/s for GroupNorm and GEGLU, and attention ran at a fifth of
//! PyTorch's speed. Here each op is one pass over its data ([`group_norm`], [`geglu`])
//! or blocked GEMMs around an in-cache softmax ([`attention`]).
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

use burn::backend::Flex;
use burn::tensor::{Bytes, DType, Shape, Tensor, TensorPrimitive};
use burn_flex::{FlexTensor, Layout};

use crate::{plain, FusedOps, KernelSet};

mod attention;
mod geglu;
mod group_norm;
pub(crate) mod math;

#[cfg(test)]
mod tests;

impl FusedOps for Flex {
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
        {
            return plain::attention_chunked(q, k, v, plain::SCORE_BUDGET);
        }
        // Views stay views in f32 (no copy); half precision is cast to f32 once.
        let prim = |t: Tensor<Self, 4>| {
            let t = if t.dtype() == DType::F32 {
                t
            } else {
                t.cast(DType::F32)
            };
            t.into_primitive().tensor()
        };
        wrap(attention::attention(&prim(q), &prim(k), &prim(v)), dtype)
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
