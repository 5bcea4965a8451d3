//! Our CubeCL kernels and their wiring into Burn's fusion backends (wgpu, CUDA).
//!
//! A fused op enters Burn's fusion stream as a custom operation: fusion flushes what it
//! was building, hands us the inputs as plain CubeCL tensors, and we launch our kernel.

mod attention;
mod geglu;
mod group_norm;

use std::marker::PhantomData;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

use crate::{plain, DeviceMemory, FusedOps, KernelSet};

pub use attention::MAX_HEAD_DIM;

type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;

/// Which kernel a custom op launches, with its non-tensor arguments.
#[derive(Debug, Clone, Copy)]
enum Kernel {
    Geglu,
    GroupNorm {
        groups: usize,
        eps: f64,
        silu: bool,
        affine: bool,
    },
    Attention,
    Flash,
}

/// A custom operation of the fusion stream running one of our kernels.
struct KernelOp<B> {
    desc: CustomOpIr,
    kernel: Kernel,
    _backend: PhantomData<fn() -> B>,
}

impl<B> std::fmt::Debug for KernelOp<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelOp")
            .field("desc", &self.desc)
            .field("kernel", &self.kernel)
            .finish()
    }
}

/// A backend that can launch our kernels on its own tensors.
trait Launch: FusionBackend {
    fn launch(kernel: Kernel, inputs: Vec<FloatTensor<Self>>) -> FloatTensor<Self>;
}

impl<R, F, I, BT> Launch for Cube<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn launch(kernel: Kernel, inputs: Vec<FloatTensor<Self>>) -> FloatTensor<Self> {
        let mut inputs = inputs.into_iter();
        let mut next = || inputs.next().expect("inputs registered with the op");
        match kernel {
            Kernel::Geglu => geglu::geglu(next()),
            Kernel::GroupNorm {
                groups,
                eps,
                silu,
                affine,
            } => {
                let x = next();
                let affine = affine.then(|| (next(), next()));
                group_norm::group_norm(x, affine, groups, eps, silu)
            }
            Kernel::Attention => {
                attention::attention_autotuned::<R, F, I, BT>(next(), next(), next())
            }
            Kernel::Flash => attention::flash_attention(next(), next(), next()),
        }
    }
}

impl<B: Launch> Operation<B::FusionRuntime> for KernelOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let inputs = self
            .desc
            .inputs
            .iter()
            .map(|t| handles.get_float_tensor::<B>(t))
            .collect();
        let out = B::launch(self.kernel, inputs);
        handles.register_float_tensor::<B>(&self.desc.outputs[0].id, out);
    }
}

/// Registers `kernel` on `inputs` in the fusion stream; one output of `shape`, `dtype`.
fn register<R, F, I, BT>(
    name: &'static str,
    kernel: Kernel,
    inputs: Vec<FusionTensor<FusionCubeRuntime<R>>>,
    shape: Shape,
    dtype: DType,
) -> FusionTensor<FusionCubeRuntime<R>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(&inputs);
    let out = TensorIr::uninit(client.create_empty_handle(), shape, dtype);
    let inputs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let desc = CustomOpIr::new(name, &inputs, &[out]);
    let op = KernelOp::<Cube<R, F, I, BT>> {
        desc: desc.clone(),
        kernel,
        _backend: PhantomData,
    };
    client
        .register(streams, OperationIr::Custom(desc), op)
        .output()
}

fn primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> B::FloatTensorPrimitive {
    t.into_primitive().tensor()
}

fn tensor<B: Backend, const D: usize>(p: B::FloatTensorPrimitive) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// Storage dtypes our kernels read and write.
fn supported(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

impl<R, F, I, BT> FusedOps for Fusion<Cube<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn fused_group_norm(
        x: Tensor<Self, 3>,
        affine: Option<(Tensor<Self, 1>, Tensor<Self, 1>)>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Tensor<Self, 3> {
        let [_, c, _] = x.dims();
        let params_supported = affine.as_ref().is_none_or(|(g, _)| supported(g.dtype()));
        if !KernelSet::current().group_norm
            || !supported(x.dtype())
            || !params_supported
            || groups == 0
            || c % groups != 0
        {
            return plain::group_norm(x, affine, groups, eps, silu);
        }
        let (shape, dtype) = (x.shape(), x.dtype());
        let mut inputs = vec![primitive(x)];
        let has_affine = affine.is_some();
        if let Some((gamma, beta)) = affine {
            // The kernel reads the parameters in their stored dtype; only a mismatched
            // pair (never the case for a loaded GroupNorm) is cast.
            let beta = if beta.dtype() == gamma.dtype() {
                beta
            } else {
                beta.cast(gamma.dtype())
            };
            inputs.push(primitive(gamma));
            inputs.push(primitive(beta));
        }
        let kernel = Kernel::GroupNorm {
            groups,
            eps,
            silu,
            affine: has_affine,
        };
        tensor(register::<R, F, I, BT>(
            "hypergen_group_norm",
            kernel,
            inputs,
            shape,
            dtype,
        ))
    }

    fn fused_geglu(x: Tensor<Self, 3>) -> Tensor<Self, 3> {
        let [n, l, w] = x.dims();
        if !KernelSet::current().geglu || !supported(x.dtype()) || w % 2 != 0 {
            return plain::geglu(x);
        }
        let dtype = x.dtype();
        tensor(register::<R, F, I, BT>(
            "hypergen_geglu",
            Kernel::Geglu,
            vec![primitive(x)],
            Shape::new([n, l, w / 2]),
            dtype,
        ))
    }

    fn fused_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
    ) -> Tensor<Self, 4> {
        if !KernelSet::current().attention || !flash_applies(&q, &k, &v) {
            return plain::attention_chunked(q, k, v, plain::SCORE_BUDGET);
        }
        attention_op::<R, F, I, BT>(Kernel::Attention, q, k, v)
    }

    fn flash_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
    ) -> Option<Tensor<Self, 4>> {
        flash_applies(&q, &k, &v).then(|| attention_op::<R, F, I, BT>(Kernel::Flash, q, k, v))
    }

    fn device_memory(device: &Self::Device) -> Option<DeviceMemory> {
        Self::sync(device).ok()?;
        let usage = R::client(device).memory_usage().ok()?;
        Some(DeviceMemory {
            in_use: usage.bytes_in_use,
            reserved: usage.bytes_reserved,
        })
    }
}

/// Whether our flash kernel takes these inputs: one supported dtype, a head width up to
/// [`MAX_HEAD_DIM`], values as wide as keys.
fn flash_applies<B: Backend>(q: &Tensor<B, 4>, k: &Tensor<B, 4>, v: &Tensor<B, 4>) -> bool {
    let d = q.dims()[3];
    supported(q.dtype())
        && q.dtype() == k.dtype()
        && k.dtype() == v.dtype()
        && d > 0
        && d <= MAX_HEAD_DIM
        && k.dims()[3] == d
        && v.dims()[3] == d
}

fn attention_op<R, F, I, BT>(
    kernel: Kernel,
    q: Tensor<Fusion<Cube<R, F, I, BT>>, 4>,
    k: Tensor<Fusion<Cube<R, F, I, BT>>, 4>,
    v: Tensor<Fusion<Cube<R, F, I, BT>>, 4>,
) -> Tensor<Fusion<Cube<R, F, I, BT>>, 4>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let (shape, dtype) = (q.shape(), q.dtype());
    let name = match kernel {
        Kernel::Flash => "hypergen_flash_attention",
        _ => "hypergen_attention_autotuned",
    };
    tensor(register::<R, F, I, BT>(
        name,
        kernel,
        vec![primitive(q), primitive(k), primitive(v)],
        shape,
        dtype,
    ))
}
