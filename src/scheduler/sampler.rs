//! The one interface every sampler implements, so that [`Scheduler`](super::Scheduler)
//! and the denoising loop never ask which one they hold.

use burn::tensor::Tensor;

use crate::error::Result;
use crate::noise::Generator;
use crate::FusedOps;

/// One diffusers scheduler class: its training tables (ᾱ, σ), built once from the config
/// when the sampler is built, the schedule of a run (timesteps, σ), built once by
/// [`set_timesteps`](Self::set_timesteps), and the per-step update rule, which only reads
/// them.
///
/// `step_index` arguments index [`timesteps`](Self::timesteps); an index past the
/// schedule is a caller bug and panics.
pub(crate) trait Sampler {
    /// Computes the schedule for `num_inference_steps` steps and clears any history.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;

    /// The timestep the UNet receives at each step.
    fn timesteps(&self) -> &[f64];

    /// σ at each step plus the final σ; empty for samplers without σ (DDIM).
    fn sigmas(&self) -> &[f64] {
        &[]
    }

    /// diffusers' `order`: UNet evaluations per step of `num_inference_steps` (Heun's 2);
    /// image-to-image skips `order` timesteps per skipped step.
    fn order(&self) -> usize {
        1
    }

    /// The standard deviation to scale unit initial noise by.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// The UNet input at `step_index` (the sample itself unless the sampler rescales it).
    fn scale_model_input<B: FusedOps>(
        &self,
        sample: Tensor<B, 4>,
        _step_index: usize,
    ) -> Tensor<B, 4> {
        sample
    }

    /// One denoising step from `sample`, given the model's output there, in the sample's
    /// dtype. Samplers that add noise draw it from `rng`; the others ignore it.
    fn step<B: FusedOps>(
        &mut self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        rng: &mut Generator,
    ) -> Tensor<B, 4>;

    /// The estimate of the clean sample x̂₀ at `step_index`, given the model's output
    /// there and the sample it saw.
    fn denoised<B: FusedOps>(
        &self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
    ) -> Tensor<B, 4>;

    /// `original` noised to the level of `step_index`; `noise` has `original`'s dtype.
    fn add_noise<B: FusedOps>(
        &self,
        original: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        step_index: usize,
    ) -> Tensor<B, 4>;
}
