//! Our CubeCL kernels and their wiring into Burn's fusion backends (wgpu, CUDA).

use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::Fusion;

use burn::tensor::backend::Backend;

use crate::{DeviceMemory, FusedOps};

impl<R, F, I, BT> FusedOps for Fusion<CubeBackend<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn device_memory(device: &Self::Device) -> Option<DeviceMemory> {
        Self::sync(device).ok()?;
        let usage = R::client(device).memory_usage().ok()?;
        Some(DeviceMemory {
            in_use: usage.bytes_in_use,
            reserved: usage.bytes_reserved,
        })
    }
}
