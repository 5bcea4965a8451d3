//! Turns a listed adapter into the Burn `WgpuDevice` that selects exactly it, setting up
//! a non-default graphics API (DX12 on Windows, Vulkan on macOS) once per process.

use std::collections::HashMap;
use std::sync::Mutex;

use burn::backend::wgpu::{graphics, init_setup, RuntimeOptions, WgpuDevice};

use super::inventory::{Adapter, AdapterKind, GraphicsApi};
use crate::error::{Error, Result};

/// The Burn device for `adapter`. Burn counts adapters per kind (`DiscreteGpu(n)` is the
/// n-th discrete GPU of the API), which [`Adapter::kind_index`] records.
pub fn device_for(adapter: &Adapter) -> Result<WgpuDevice> {
    let device = match adapter.kind {
        AdapterKind::Discrete => WgpuDevice::DiscreteGpu(adapter.kind_index),
        AdapterKind::Integrated => WgpuDevice::IntegratedGpu(adapter.kind_index),
        AdapterKind::Virtual => WgpuDevice::VirtualGpu(adapter.kind_index),
        AdapterKind::Software if adapter.kind_index == 0 => WgpuDevice::Cpu,
        _ => {
            return Err(Error::invalid(
                "device",
                format!(
                    "{} ({}) cannot be selected through Burn's wgpu backend",
                    adapter.label(),
                    adapter.kind
                ),
            ))
        }
    };
    ensure_api(&device, adapter.api)?;
    Ok(device)
}

/// Burn sets a wgpu device up lazily with the OS's native API; any other API must be set
/// up before first use, and only once (Burn panics on a second setup).
fn ensure_api(device: &WgpuDevice, api: GraphicsApi) -> Result<()> {
    static SETUPS: Mutex<Option<HashMap<WgpuDevice, GraphicsApi>>> = Mutex::new(None);
    let mut guard = SETUPS
        .lock()
        .map_err(|_| Error::Backend("wgpu setup registry poisoned".into()))?;
    let setups = guard.get_or_insert_with(HashMap::new);
    match setups.get(device) {
        Some(existing) if *existing == api => return Ok(()),
        Some(existing) => {
            return Err(Error::invalid(
                "device",
                format!("{device:?} is already set up with {existing} in this process; cannot switch to {api}"),
            ))
        }
        None => {}
    }
    if api != GraphicsApi::native() {
        let options = RuntimeOptions::default();
        match api {
            GraphicsApi::Vulkan => {
                init_setup::<graphics::Vulkan>(device, options);
            }
            GraphicsApi::Metal => {
                init_setup::<graphics::Metal>(device, options);
            }
            GraphicsApi::Dx12 => {
                init_setup::<graphics::Dx12>(device, options);
            }
        }
    }
    setups.insert(device.clone(), api);
    Ok(())
}
