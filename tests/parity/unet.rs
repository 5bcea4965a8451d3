//! UNet noise prediction at three timesteps against diffusers.

use burn::tensor::DType;
use hypergen::FusedOps;

use crate::common::{assert_matches, fixture_dir, ref_tensor, reference, TOL_F32};

fn unet_matches_reference<B: FusedOps>(device: &B::Device) {
    let dir = fixture_dir().join("unet");
    let (unet, report) = hypergen::load::folder::load_unet::<B>(&dir, None, DType::F32, device)
        .expect("fixture UNet loads");
    assert!(report.missing.is_empty() && report.unused.is_empty());
    let sample = ref_tensor::<B, 4>("unet.sample", device);
    let context = ref_tensor::<B, 3>("unet.encoder_hidden_states", device);
    let text_embeds = ref_tensor::<B, 2>("unet.text_embeds", device);
    let time_ids = reference("unet.time_ids").data;
    let n = sample.dims()[0];
    // The denoising loop's way: the text projected once, reused at every timestep.
    let text = unet.prepare_context(context.clone()).expect("context");
    for t in [999u32, 421, 1] {
        let timesteps = vec![t as f32; n];
        let out = unet
            .forward(
                sample.clone(),
                &timesteps,
                context.clone(),
                text_embeds.clone(),
                &time_ids,
            )
            .expect("forward");
        let reference = format!("unet.t{t}.out");
        assert_matches(&format!("unet t={t}"), out, &reference, TOL_F32);
        let out = unet
            .forward_prepared(
                sample.clone(),
                &timesteps,
                &text,
                text_embeds.clone(),
                &time_ids,
            )
            .expect("forward_prepared");
        assert_matches(&format!("unet prepared t={t}"), out, &reference, TOL_F32);
    }
    // A context prepared for other rows is refused, not broadcast.
    let one_row = unet
        .prepare_context(context.narrow(0, 0, 1))
        .expect("context of one row");
    let err = unet
        .forward_prepared(sample, &vec![1.0; n], &one_row, text_embeds, &time_ids)
        .expect_err("rows differ");
    assert!(err.to_string().contains("rows"), "{err}");
}

crate::on_backends!(unet_parity, unet_matches_reference);

/// PyTorch's `interpolate(mode="nearest", size=…)` picks source `floor(i · in / out)`;
/// the UNet relies on it when the latent size is not a multiple of its downsampling.
#[test]
fn resize_nearest_matches_pytorch_indexing() {
    use burn::tensor::{Tensor, TensorData};
    let device = Default::default();
    let x = Tensor::<crate::common::Cpu, 4>::from_data(
        TensorData::new((0..15).map(|v| v as f32).collect::<Vec<_>>(), [1, 1, 3, 5]),
        &device,
    );
    let y = hypergen::model::upsampling::resize_nearest(x, [5, 9]);
    let rows = [0, 0, 1, 1, 2]; // floor(i * 3 / 5)
    let cols = [0, 0, 1, 1, 2, 2, 3, 3, 4]; // floor(i * 5 / 9)
    let want: Vec<f32> = rows
        .iter()
        .flat_map(|r| cols.iter().map(move |c| (r * 5 + c) as f32))
        .collect();
    assert_eq!(crate::common::values(y), want);
}
