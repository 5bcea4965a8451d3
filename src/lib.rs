//! hypergen: Stable Diffusion XL in Burn, computing what diffusers computes, on any
//! GPU vendor (CUDA, Vulkan, Metal) and on the CPU.
//!
//! The crate is library first: the pipeline ([`pipeline`]) knows nothing of HTTP or
//! of the command line, and model code is generic over the Burn backend; the backend
//! is chosen once, at the edge ([`device`]). Module paths follow diffusers' weight
//! names, so `down_blocks.1.attentions.0.…` lives in [`unet`].

#![warn(missing_docs)]

pub mod attention;
pub mod bench;
pub mod builtin;
pub mod cli;
pub mod clip;
pub mod device;
pub mod error;
pub mod hub;
pub mod layers;
pub mod loader;
pub mod model_source;
pub mod noise;
pub mod pipeline;
pub mod random_init;
pub mod resnet;
pub mod scheduler;
pub mod server;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod vae_tiling;

pub use error::{Error, Result};
/// Our fused ops (CubeCL kernels, plain-Burn fallbacks): the backend bound of all model code.
pub use hypergen_kernels as kernels;
pub use hypergen_kernels::{DeviceMemory, FusedOps};
