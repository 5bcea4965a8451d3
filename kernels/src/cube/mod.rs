//! Our CubeCL kernels and their wiring into Burn's fusion backends (wgpu, CUDA).

use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::Fusion;

use crate::FusedOps;

impl<R, F, I, BT> FusedOps for Fusion<CubeBackend<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
}
