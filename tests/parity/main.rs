//! Parity with diffusers/transformers on the `tiny-sdxl` fixture, on the CPU backend and
//! on wgpu. One test binary so the crate and Burn link once.

mod common;

mod bench;
mod builtin;
mod clip;
mod contract;
mod devices;
mod edits;
mod fleet;
mod hub;
mod kernels;
mod loader;
mod lora;
mod lora_server;
mod pipeline;
mod playground;
mod reliability;
mod scheduler;
mod server;
mod single_file;
mod tokenizer;
mod unet;
mod vae;
mod vae_tiling;
