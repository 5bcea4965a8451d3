//! ControlNet in the pipeline, as diffusers' `StableDiffusionXLControlNet*Pipeline`s run
//! it: each request names loaded ControlNets ([`SdxlComponents::controlnets`]) with a
//! control image, a scale and the part of the run it acts on; at every step each active
//! ControlNet sees the UNet's input (both guidance rows) and its residuals, summed over
//! ControlNets (`MultiControlNetModel`), go into the UNet call's [`UNetExtras`].
//!
//! [`SdxlComponents::controlnets`]: super::SdxlComponents::controlnets

use burn::tensor::{Tensor, TensorData};

use super::{cat_rows, Conditioning, GenerationRequest, Image, SdxlPipeline};
use crate::error::{Error, Result};
use crate::model::controlnet::{ControlNetContext, ControlNetModel, ControlResiduals};
use crate::model::unet::UNetExtras;
use crate::FusedOps;

/// One ControlNet a request runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlNetInput {
    /// The ControlNet, by the name it was loaded under
    /// ([`SdxlComponents::controlnets`](super::SdxlComponents::controlnets)).
    pub model: String,
    /// The control image (an edge, depth or pose map), resized to the output size with
    /// a Lanczos filter when it is not that size ([`Image::resized`], as diffusers'
    /// control image processor does), read as RGB in [0, 1].
    pub image: Image,
    /// `controlnet_conditioning_scale`: what its residuals are multiplied by.
    pub scale: f64,
    /// `control_guidance_start`: the fraction of the steps before which it is off.
    pub guidance_start: f64,
    /// `control_guidance_end`: the fraction of the steps after which it is off.
    pub guidance_end: f64,
    /// diffusers' `guess_mode`: with guidance the ControlNet sees the positive rows only
    /// (the negative rows get no residual), and its residuals are scaled from 0.1 (first
    /// skip) to 1 (mid block) times `scale`, so that it steers without a prompt.
    pub guess_mode: bool,
}

impl ControlNetInput {
    /// `model` with `image` at scale 1 over the whole run (diffusers' defaults).
    pub fn new(model: impl Into<String>, image: Image) -> Self {
        Self {
            model: model.into(),
            image,
            scale: 1.0,
            guidance_start: 0.0,
            guidance_end: 1.0,
            guess_mode: false,
        }
    }

    /// Whether it acts at step `i` of `n` (diffusers' `controlnet_keep`): unless
    /// `i/n < start` or `(i+1)/n > end`.
    pub fn active_at(&self, i: usize, n: usize) -> bool {
        let (i, n) = (i as f64, n as f64);
        !(i / n < self.guidance_start || (i + 1.0) / n > self.guidance_end)
    }

    /// Whether `other` runs the same ControlNet the same way (the image may differ:
    /// every request's rows get their own).
    pub fn same_as(&self, other: &ControlNetInput) -> bool {
        self.model == other.model
            && self.scale.to_bits() == other.scale.to_bits()
            && self.guidance_start.to_bits() == other.guidance_start.to_bits()
            && self.guidance_end.to_bits() == other.guidance_end.to_bits()
            && self.guess_mode == other.guess_mode
    }

    /// The checks of one request's `k`-th ControlNet that need no model.
    pub fn check(&self) -> Result<()> {
        if !self.scale.is_finite() {
            return Err(Error::invalid(
                "controlnets.scale",
                "must be a finite number",
            ));
        }
        let (s, e) = (self.guidance_start, self.guidance_end);
        if !(0.0..=1.0).contains(&s) || !(0.0..=1.0).contains(&e) || s >= e {
            return Err(Error::invalid(
                "controlnets.guidance_start",
                format!("start {s} and end {e} must satisfy 0 ≤ start < end ≤ 1"),
            ));
        }
        let img = &self.image;
        if img.width == 0 || img.height == 0 || img.rgb.len() != img.width * img.height * 3 {
            return Err(Error::invalid(
                "controlnets.image",
                "the pixel buffer does not match its size",
            ));
        }
        Ok(())
    }
}

/// One ControlNet of a batch, ready for the loop: the model, the text projected for it,
/// the control images of the UNet's rows.
struct PreparedControl<'a, B: FusedOps> {
    model: &'a ControlNetModel<B>,
    input: &'a ControlNetInput,
    text: ControlNetContext<B>,
    image: Tensor<B, 4>,
}

/// Every ControlNet of a batch ([`SdxlPipeline::prepare_controls`]); empty without.
pub struct Controls<'a, B: FusedOps> {
    nets: Vec<PreparedControl<'a, B>>,
}

impl<B: FusedOps> SdxlPipeline<B> {
    /// The ControlNet model `name`, or an error naming the field.
    pub fn controlnet(&self, name: &str) -> Result<&ControlNetModel<B>> {
        self.components.controlnets.get(name).ok_or_else(|| {
            Error::invalid(
                "controlnets.model",
                format!("no ControlNet `{name}` is loaded"),
            )
        })
    }

    /// diffusers' control image preprocessing: RGB, resized to `width × height` when it
    /// is not that size, `[1, 3, H, W]` in [0, 1] (not [-1, 1]).
    pub fn control_image(
        &self,
        image: &Image,
        width: usize,
        height: usize,
    ) -> Result<Tensor<B, 4>> {
        let image = image.resized(width, height)?;
        let (w, h) = (image.width, image.height);
        let mut chw = vec![0f32; 3 * h * w];
        for (p, px) in image.rgb.chunks_exact(3).enumerate() {
            for (c, &v) in px.iter().enumerate() {
                chw[c * h * w + p] = v as f32 / 255.0;
            }
        }
        Ok(Tensor::from_data(
            TensorData::new(chw, [1, 3, h, w]),
            &self.device,
        ))
    }

    /// The ControlNet stage of a batch: each ControlNet of the first request (the batch
    /// shares them, [`GenerationRequest::batch_compatible`]) with the text projected for
    /// its cross-attentions and every request's control image, repeated for its images
    /// and, with guidance, for both branches, in the UNet's row order.
    pub fn prepare_controls<'a>(
        &'a self,
        reqs: &'a [GenerationRequest],
        cond: &Conditioning<B>,
    ) -> Result<Controls<'a, B>> {
        let Some(first) = reqs.first() else {
            return Ok(Controls { nets: Vec::new() });
        };
        let mut nets = Vec::with_capacity(first.controlnets.len());
        for (k, input) in first.controlnets.iter().enumerate() {
            let model = self.controlnet(&input.model)?;
            let mut images = Vec::with_capacity(reqs.len());
            for req in reqs {
                let own = req.controlnets.get(k).ok_or_else(|| {
                    Error::invalid("controlnets", "requests of a batch differ in ControlNets")
                })?;
                let image = self.control_image(&own.image, req.width, req.height)?;
                images.push(image.repeat_dim(0, req.num_images));
            }
            let image = cat_rows(images);
            // In guess mode with guidance the ControlNet reads the positive rows alone.
            let positive_only = input.guess_mode && cond.guidance_scale.is_some();
            let rows = cond.contexts.len();
            let (image, context) = match cond.guidance_scale {
                Some(_) if !positive_only => (
                    Tensor::cat(vec![image.clone(), image], 0),
                    cond.context_of(0..rows)?,
                ),
                Some(_) => (image, cond.context_of(rows / 2..rows)?),
                None => (image, cond.context_of(0..rows)?),
            };
            nets.push(PreparedControl {
                model,
                input,
                text: model.prepare_context(context)?,
                image,
            });
        }
        Ok(Controls { nets })
    }
}

impl<B: FusedOps> Controls<'_, B> {
    /// What the ControlNets add to the UNet call at step `i` of the `n` the run takes
    /// (counted from the run's first step, as diffusers' image-to-image pipelines count
    /// them), for the UNet's `input` (scaled, all rows) at `timesteps`: the summed
    /// residuals of those active at that step; nothing when none is.
    pub fn extras(
        &self,
        input: &Tensor<B, 4>,
        timesteps: &[f32],
        cond: &Conditioning<B>,
        i: usize,
        n: usize,
    ) -> Result<UNetExtras<B>> {
        let mut sum: Option<ControlResiduals<B>> = None;
        for net in self.nets.iter().filter(|c| c.input.active_at(i, n)) {
            let residuals = if net.input.guess_mode {
                guess_mode_residuals(net, input, timesteps, cond)?
            } else {
                net.model.forward(
                    input.clone(),
                    timesteps,
                    &net.text,
                    cond.pooled.clone(),
                    &cond.time_ids,
                    net.image.clone(),
                    net.input.scale,
                )?
            };
            sum = Some(match sum {
                Some(s) => s.sum_with(residuals)?,
                None => residuals,
            });
        }
        Ok(match sum {
            Some(r) => UNetExtras {
                down_residuals: Some(r.down),
                mid_residual: Some(r.mid),
                ..UNetExtras::default()
            },
            None => UNetExtras::default(),
        })
    }
}

/// One ControlNet call in diffusers' guess mode: on the positive rows when the input
/// holds both branches (zeros for the negative rows), the residuals scaled by
/// `logspace(-1, 0, skips + 1) · scale` (float32, as torch computes them), the last
/// factor the mid block's.
fn guess_mode_residuals<B: FusedOps>(
    net: &PreparedControl<'_, B>,
    input: &Tensor<B, 4>,
    timesteps: &[f32],
    cond: &Conditioning<B>,
) -> Result<ControlResiduals<B>> {
    let rows = input.dims()[0];
    let half = if cond.guidance_scale.is_some() {
        rows / 2
    } else {
        0
    };
    let own = rows - half;
    let out = net.model.forward(
        input.clone().narrow(0, half, own),
        &timesteps[half..],
        &net.text,
        cond.pooled.clone().narrow(0, half, own),
        &cond.time_ids[half * 6..],
        net.image.clone(),
        1.0,
    )?;
    let k = out.down.len();
    let factor = |j: usize| {
        let exponent = -1.0f32 + j as f32 / k as f32;
        10f32.powf(exponent) * net.input.scale as f32
    };
    let pad = |t: Tensor<B, 4>| {
        if half == 0 {
            t
        } else {
            Tensor::cat(vec![t.zeros_like(), t], 0)
        }
    };
    Ok(ControlResiduals {
        down: (out.down.into_iter().enumerate())
            .map(|(j, d)| pad(d * factor(j)))
            .collect(),
        mid: pad(out.mid * factor(k)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// diffusers' `controlnet_keep`: with 4 steps and the window (0, 0.5), steps 0 and 1.
    #[test]
    fn guidance_window_is_diffusers() {
        let image = Image {
            width: 1,
            height: 1,
            rgb: vec![0; 3],
        };
        let mut c = ControlNetInput::new("a", image);
        c.guidance_end = 0.5;
        let on: Vec<usize> = (0..4).filter(|&i| c.active_at(i, 4)).collect();
        assert_eq!(on, [0, 1]);
        c.guidance_start = 0.25;
        c.guidance_end = 1.0;
        let on: Vec<usize> = (0..4).filter(|&i| c.active_at(i, 4)).collect();
        assert_eq!(on, [1, 2, 3]);
    }
}
