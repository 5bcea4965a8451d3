//! Peak memory of one measurement: the device allocator's pool on GPUs
//! ([`FusedOps::device_memory`]) and the process's peak resident set on every device.

use crate::FusedOps;
use serde::Serialize;

/// Memory after a measurement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemorySample {
    /// Peak resident set of the process (`VmHWM`), bytes; since the last reset when
    /// `rss_reset`, else since the process started. `None` off Linux.
    pub peak_rss_bytes: Option<u64>,
    /// Whether the peak resident set was reset before the measurement.
    pub rss_reset: bool,
    /// Bytes the device allocator holds (its pools only grow within a measurement, so
    /// this is the measurement's high-water mark); `None` on the CPU.
    pub device_reserved_bytes: Option<u64>,
    /// Bytes in live tensors on the device after the measurement.
    pub device_in_use_bytes: Option<u64>,
}

impl MemorySample {
    /// The figure to report as "peak memory": the device pool where there is one, else
    /// the peak resident set.
    pub fn peak_bytes(&self) -> Option<u64> {
        self.device_reserved_bytes.or(self.peak_rss_bytes)
    }
}

/// The process's peak resident set (`VmHWM` in `/proc/self/status`), bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Resets the peak resident set to the current one (writing `5` to
/// `/proc/self/clear_refs`); false where the kernel does not allow it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Starts a measurement: hands cached device memory back and resets the peak RSS, so
/// that what [`sample`] reads afterwards belongs to this measurement.
pub fn begin<B: FusedOps>(device: &B::Device) -> bool {
    B::memory_cleanup(device);
    reset_peak_rss()
}

/// Reads memory at the end of a measurement started with [`begin`].
pub fn sample<B: FusedOps>(device: &B::Device, rss_reset: bool) -> MemorySample {
    let dev = B::device_memory(device);
    MemorySample {
        peak_rss_bytes: peak_rss_bytes(),
        rss_reset,
        device_reserved_bytes: dev.map(|m| m.reserved),
        device_in_use_bytes: dev.map(|m| m.in_use),
    }
}
