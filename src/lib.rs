//! hypergen: Stable Diffusion XL in Burn, computing what diffusers computes, on any
//! GPU vendor (CUDA, Vulkan, Metal) and on the CPU.
//!
//! The crate is a library first, in layers where every import points down:
//!
//! - [`model`]: the networks (text encoders, UNet, VAE) and tokenizers, built from their
//!   configs (`XConfig::init(&device)`); they never see a file. Module paths follow
//!   diffusers' weight names, so `down_blocks.1.attentions.0.…` lives in [`model::unet`].
//! - [`scheduler`]: diffusers' samplers, built from `scheduler_config.json`.
//! - [`noise`]: the seeded host generator that replays PyTorch's CPU noise, shared by
//!   the pipeline's starting latents and the ancestral schedulers' step noise.
//! - [`load`]: every model source (folder, Hub, built-in random model) turned into one
//!   [`pipeline::SdxlComponents`] value.
//! - [`pipeline`]: the stages of SDXL text-to-image, run over those components.
//! - [`device`]: the one place a backend is chosen; [`kernels`]: our fused ops.
//!
//! The application (command line, HTTP server, benchmark) is [`app`], behind the `app`
//! cargo feature (on by default); without it the library builds with none of its
//! dependencies (no poem, tokio, clap or indicatif).

#![warn(missing_docs)]

#[cfg(feature = "app")]
pub mod app;
pub mod device;
pub mod error;
pub mod load;
pub mod model;
pub mod noise;
pub mod pipeline;
pub mod scheduler;

pub use error::{Error, Result};
/// Our fused ops (CubeCL kernels, plain-Burn fallbacks): the backend bound of all model code.
pub use hypergen_kernels as kernels;
pub use hypergen_kernels::{DeviceMemory, FusedOps};
