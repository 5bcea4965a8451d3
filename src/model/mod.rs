//! The networks of SDXL and their building blocks, one file per component with its
//! config beside it. Each model is built from its config alone
//! (`UNetConfig::init(&device)`, `VaeConfig::init`, `ClipTextConfig::init`) with lazy
//! parameters that [`crate::load`] fills; models store their config and never see a file.

pub mod attention;
pub mod clip;
pub mod clip_vision;
pub mod controlnet;
pub mod downsampling;
pub mod ip_adapter;
pub mod layers;
pub mod linear;
pub mod resnet;
pub mod tokenizer;
pub mod unet;
pub mod upsampling;
pub mod vae;
