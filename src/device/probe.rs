//! Fills an [`Inventory`] from this machine, through the wgpu and CUDA probes. Kept apart
//! from the inventory's plain data so that the probes depend on it and not the reverse.

use super::inventory::Inventory;
use super::{cuda_probe, wgpu_probe};

impl Inventory {
    /// Looks at this machine: lists wgpu adapters and asks the CUDA driver, if any.
    /// Never panics and never initialises a Burn backend.
    pub fn probe() -> Self {
        Self {
            wgpu_compiled: cfg!(feature = "wgpu"),
            cuda_compiled: cfg!(feature = "cuda"),
            adapters: wgpu_probe::adapters(),
            cuda: cuda_probe::devices(),
        }
    }
}
