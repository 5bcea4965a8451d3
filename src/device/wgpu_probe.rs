//! Lists the adapters wgpu can reach through Vulkan, Metal and DX12, with the shader
//! number formats each supports. Uses the same `wgpu` crate as Burn, so it sees what
//! Burn would see, but creates no device.

use super::inventory::Adapter;

/// The adapters, grouped by graphics API in wgpu's enumeration order. Empty when the
/// wgpu backend is not compiled in or no driver is installed.
#[cfg(feature = "wgpu")]
pub fn adapters() -> Vec<Adapter> {
    use std::collections::HashMap;

    use super::inventory::{AdapterKind, GraphicsApi};

    let backends = wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12;
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let found = block_on(instance.enumerate_adapters(backends));
    let mut per_api: HashMap<GraphicsApi, usize> = HashMap::new();
    let mut per_kind: HashMap<(GraphicsApi, AdapterKind), usize> = HashMap::new();
    let mut out = Vec::new();
    for api in [GraphicsApi::Vulkan, GraphicsApi::Metal, GraphicsApi::Dx12] {
        for adapter in &found {
            let info = adapter.get_info();
            let this_api = match info.backend {
                wgpu::Backend::Vulkan => GraphicsApi::Vulkan,
                wgpu::Backend::Metal => GraphicsApi::Metal,
                wgpu::Backend::Dx12 => GraphicsApi::Dx12,
                _ => continue,
            };
            if this_api != api {
                continue;
            }
            let kind = match info.device_type {
                wgpu::DeviceType::DiscreteGpu => AdapterKind::Discrete,
                wgpu::DeviceType::IntegratedGpu => AdapterKind::Integrated,
                wgpu::DeviceType::VirtualGpu => AdapterKind::Virtual,
                wgpu::DeviceType::Cpu => AdapterKind::Software,
                wgpu::DeviceType::Other => AdapterKind::Other,
            };
            let index = per_api.entry(api).or_default();
            let kind_index = per_kind.entry((api, kind)).or_default();
            let driver = [info.driver.as_str(), info.driver_info.as_str()]
                .iter()
                .filter(|s| !s.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join(" ");
            out.push(Adapter {
                api,
                index: *index,
                kind_index: *kind_index,
                name: info.name.clone(),
                kind,
                driver,
                float16: adapter.features().contains(wgpu::Features::SHADER_F16),
                // WGSL has no bfloat16 type, and Burn's SPIR-V path does not offer it
                // through wgpu either.
                bfloat16: false,
            });
            *index += 1;
            *kind_index += 1;
        }
    }
    out
}

/// Without the wgpu backend there are no adapters to use.
#[cfg(not(feature = "wgpu"))]
pub fn adapters() -> Vec<Adapter> {
    Vec::new()
}

/// Runs a future to completion on this thread. wgpu's native adapter enumeration is
/// ready at once; parking covers the general case without an async runtime.
#[cfg(feature = "wgpu")]
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake};

    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }

    let waker = Arc::new(Unpark(std::thread::current())).into();
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}
