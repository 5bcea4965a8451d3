//! The text `hypergen devices` prints.

use std::fmt::Write;

use super::inventory::Inventory;
use super::resolve::resolve;
use super::{compiled_backends, DeviceSpec};

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// Describes the backends compiled in, the wgpu adapters and CUDA devices found (with
/// their float16/bfloat16 support), and what `--device auto` resolves to.
pub fn report(inventory: &Inventory) -> String {
    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        s,
        "backends in this build: {}",
        compiled_backends().join(", ")
    );
    let _ = writeln!(s, "\nwgpu adapters:");
    if !inventory.wgpu_compiled {
        let _ = writeln!(s, "  (wgpu is not compiled in)");
    } else if inventory.adapters.is_empty() {
        let _ = writeln!(s, "  none found (no Vulkan, Metal or DX12 driver)");
    }
    for a in &inventory.adapters {
        let _ = writeln!(
            s,
            "  {:<10} {}\n             type: {}, float16: {}, bfloat16: {}{}",
            a.id(),
            a.name,
            a.kind,
            yes(a.float16),
            yes(a.bfloat16),
            if a.driver.is_empty() {
                String::new()
            } else {
                format!(", driver: {}", a.driver)
            }
        );
    }
    let _ = writeln!(s, "\nCUDA devices:");
    match &inventory.cuda {
        Err(why) => {
            let _ = writeln!(s, "  none: {why}");
        }
        Ok(devs) => {
            if !inventory.cuda_compiled {
                let _ = writeln!(
                    s,
                    "  (present, but this build has no CUDA support: rebuild with --features cuda)"
                );
            }
            for d in devs {
                let _ = writeln!(
                    s,
                    "  cuda:{:<5} {}\n             memory: {:.1} GiB, compute capability: {}.{}, float16: yes, bfloat16: {}",
                    d.index,
                    d.name,
                    d.memory_bytes as f64 / (1u64 << 30) as f64,
                    d.compute_capability.0,
                    d.compute_capability.1,
                    yes(d.bfloat16())
                );
            }
        }
    }
    let _ = writeln!(
        s,
        "\ncpu: float32, float16, bfloat16 (half types through conversions; float32 is fastest)"
    );
    match resolve(&DeviceSpec::Auto, inventory) {
        Ok(r) => {
            let _ = writeln!(s, "\n--device auto → {} ({})", r.label(), r.reason);
        }
        Err(e) => {
            let _ = writeln!(s, "\n--device auto: {e}");
        }
    }
    s
}
