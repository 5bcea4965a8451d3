//! hypergen's test suite beyond the unit tests: one binary, so that the crate and Burn
//! link once, in groups named for what they test. Every test reads the `tiny-sdxl`
//! fixture (`HYPERGEN_FIXTURE_DIR`); see docs/testing.md.

mod common;

/// The numbers against diffusers/transformers' references, on the CPU backend and on
/// wgpu: text encoders, UNet, VAE, schedulers, whole pipelines, edits, LoRAs, single
/// files, and our kernels against the plain ops they replace.
mod parity {
    pub mod clip;
    pub mod controlnet;
    pub mod edits;
    pub mod ip_adapter;
    pub mod kernels;
    pub mod lora;
    pub mod pipeline;
    pub mod prompts;
    pub mod samplers;
    pub mod scheduler;
    pub mod single_file;
    pub mod tokenizer;
    pub mod unet;
    pub mod vae;
    pub mod vae_tiling;
}

/// Finding and loading models: folders and their errors, built-in models, the Hub (a
/// local server speaking its layout), devices and dtypes.
mod loading {
    pub mod builtin;
    pub mod devices;
    pub mod hub;
    pub mod loader;
}

/// The HTTP server: routes and answers, per-request LoRAs, faults and overload, several
/// replicas behind HAProxy and the deploy files, the contract held by outside tools
/// (generated SDKs, schemathesis), and the playground in a browser.
mod server {
    pub mod api;
    pub mod contract;
    pub mod fleet;
    pub mod loras;
    pub mod playground;
    pub mod prompts;
    pub mod reliability;
}

/// `hypergen bench` and its reports.
mod bench;

/// The library's layering: every import points down, no circle.
mod layering;
