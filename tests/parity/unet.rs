//! UNet noise prediction at three timesteps against diffusers.

use burn::tensor::backend::Backend;
use burn::tensor::DType;
use hypergen::unet::UNet2DConditionModel;

use crate::common::{assert_matches, fixture_dir, ref_tensor, reference, TOL_F32};

fn unet_matches_reference<B: Backend>(device: &B::Device) {
    let dir = fixture_dir().join("unet");
    let (unet, report) = UNet2DConditionModel::<B>::load(&dir, None, DType::F32, device)
        .expect("fixture UNet loads");
    assert!(report.missing.is_empty() && report.unused.is_empty());
    let sample = ref_tensor::<B, 4>("unet.sample", device);
    let context = ref_tensor::<B, 3>("unet.encoder_hidden_states", device);
    let text_embeds = ref_tensor::<B, 2>("unet.text_embeds", device);
    let time_ids = reference("unet.time_ids").data;
    let n = sample.dims()[0];
    for t in [999u32, 421, 1] {
        let out = unet
            .forward(
                sample.clone(),
                &vec![t as f32; n],
                context.clone(),
                text_embeds.clone(),
                &time_ids,
            )
            .expect("forward");
        assert_matches(
            &format!("unet t={t}"),
            out,
            &format!("unet.t{t}.out"),
            TOL_F32,
        );
    }
}

crate::on_backends!(unet_parity, unet_matches_reference);
