//! SDXL's two CLIP text encoders against transformers' hidden states.

use burn::tensor::{DType, Int, Tensor, TensorData};
use hypergen::model::clip::{pooled_positions, ClipTextModel};
use hypergen::FusedOps;

use crate::common::{assert_matches, fixture_dir, TOL_F32};
use crate::parity::tokenizer::cases;

/// Prompts with reference hidden states.
const PROMPTS: usize = 3;

fn load<B: FusedOps>(folder: &str, device: &B::Device) -> ClipTextModel<B> {
    hypergen::load::folder::load_text_encoder::<B>(
        &fixture_dir().join(folder),
        None,
        DType::F32,
        device,
    )
    .map(|(m, _)| m)
    .unwrap_or_else(|e| panic!("{folder} loads: {e}"))
}

/// Reference ids of the first prompts as one `[PROMPTS, 77]` batch.
fn ids<B: FusedOps>(
    pick: fn(&crate::parity::tokenizer::Case) -> &Vec<u32>,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let cases = cases();
    let flat: Vec<i64> = cases[..PROMPTS]
        .iter()
        .flat_map(|c| pick(c).iter().map(|&i| i as i64))
        .collect();
    let len = flat.len() / PROMPTS;
    Tensor::from_data(TensorData::new(flat, [PROMPTS, len]), device)
}

fn row<B: FusedOps, const D: usize>(t: &Tensor<B, D>, i: usize) -> Tensor<B, D> {
    t.clone().slice(i..i + 1)
}

/// Both encoders in both weight layouts: Burn's, and panel order where the backend runs
/// it (the CPU in float32, as `load_components` lays them out).
fn text_encoder_1<B: FusedOps>(device: &B::Device) {
    in_both_layouts("text_encoder", device, check_text_encoder_1::<B>);
}

fn text_encoder_2<B: FusedOps>(device: &B::Device) {
    in_both_layouts("text_encoder_2", device, check_text_encoder_2::<B>);
}

fn in_both_layouts<B: FusedOps>(
    folder: &str,
    device: &B::Device,
    check: fn(&ClipTextModel<B>, &B::Device),
) {
    let model = load::<B>(folder, device);
    check(&model, device);
    let model = model.into_panels();
    if model.panels() {
        check(&model, device);
    }
}

fn check_text_encoder_1<B: FusedOps>(model: &ClipTextModel<B>, device: &B::Device) {
    let layout = layout(model);
    let out = model.forward(ids::<B>(|c| &c.tokenizer, device));
    assert!(out.text_embeds.is_none(), "text_encoder has no projection");
    for i in 0..PROMPTS {
        let name = format!("te1.prompt{i}.penultimate");
        assert_matches(
            &format!("{name}{layout}"),
            row(&out.penultimate, i),
            &name,
            TOL_F32,
        );
        let name = format!("te1.prompt{i}.last");
        assert_matches(
            &format!("{name}{layout}"),
            row(&out.last, i),
            &name,
            TOL_F32,
        );
    }
    // What the pipeline runs: the last layer skipped, or run at the pooled positions only
    // (the prompts end at different positions).
    let cond = model.forward_conditioning(ids::<B>(|c| &c.tokenizer, device), false);
    assert!(cond.pooled.is_none() && cond.text_embeds.is_none());
    for i in 0..PROMPTS {
        let name = format!("te1.prompt{i}.penultimate");
        assert_matches(
            &format!("{name}{layout}"),
            row(&cond.penultimate, i),
            &name,
            TOL_F32,
        );
    }
    let cond = model.forward_conditioning(ids::<B>(|c| &c.tokenizer, device), true);
    let pooled = cond.pooled.expect("pooled was asked for");
    let (got, want) = (
        crate::common::values(pooled),
        crate::common::values(out.pooled),
    );
    let err = crate::common::rel_error(&got, &want);
    assert!(
        err <= TOL_F32,
        "te1{layout} pooled at the pooled positions only: relative error {err:.3e} against forward's"
    );
}

fn check_text_encoder_2<B: FusedOps>(model: &ClipTextModel<B>, device: &B::Device) {
    let layout = layout(model);
    let out = model.forward(ids::<B>(|c| &c.tokenizer_2, device));
    let embeds = out.text_embeds.expect("text_encoder_2 has a projection");
    for i in 0..PROMPTS {
        let name = format!("te2.prompt{i}.penultimate");
        assert_matches(
            &format!("{name}{layout}"),
            row(&out.penultimate, i),
            &name,
            TOL_F32,
        );
        let name = format!("te2.prompt{i}.text_embeds");
        assert_matches(&format!("{name}{layout}"), row(&embeds, i), &name, TOL_F32);
    }
    let cond = model.forward_conditioning(ids::<B>(|c| &c.tokenizer_2, device), true);
    let embeds = cond.text_embeds.expect("text_encoder_2 has a projection");
    for i in 0..PROMPTS {
        let name = format!("te2.prompt{i}.penultimate");
        assert_matches(
            &format!("{name}{layout}"),
            row(&cond.penultimate, i),
            &name,
            TOL_F32,
        );
        let name = format!("te2.prompt{i}.text_embeds");
        assert_matches(&format!("{name}{layout}"), row(&embeds, i), &name, TOL_F32);
    }
}

/// How a test names the weight layout in its messages.
fn layout<B: FusedOps>(model: &ClipTextModel<B>) -> &'static str {
    if model.panels() {
        " (weights in panels)"
    } else {
        ""
    }
}

crate::on_backends!(clip_text_encoder_1, text_encoder_1);
crate::on_backends!(clip_text_encoder_2, text_encoder_2);

/// Both pooling rules: the legacy "first largest id" (eos_token_id 2) and "first
/// eos_token_id" (0 when absent).
fn pooling_positions<B: FusedOps>(device: &B::Device) {
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(
            vec![
                5i64, 9, 7, 9, 0, //
                9, 3, 3, 3, 3, //
                1, 2, 3, 4, 8,
            ],
            [3, 5],
        ),
        device,
    );
    let got = |eos: i64| -> Vec<i64> {
        pooled_positions(ids.clone(), eos)
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .expect("ints")
    };
    assert_eq!(got(2), vec![1, 0, 4], "argmax rule, first occurrence");
    assert_eq!(got(3), vec![0, 1, 2], "first eos, 0 when absent");
}

crate::on_backends!(clip_pooling_positions, pooling_positions);

/// Every tensor in each text encoder's files is used and none is missing
/// (`load_module` errors otherwise), for the plain and the fp16 variant files.
#[test]
fn clip_loads_without_missing_or_unused_tensors() {
    let device = Default::default();
    for folder in ["text_encoder", "text_encoder_2"] {
        for variant in [None, Some("fp16")] {
            let model: ClipTextModel<crate::common::Cpu> =
                hypergen::load::folder::load_text_encoder(
                    &fixture_dir().join(folder),
                    variant,
                    DType::F32,
                    &device,
                )
                .map(|(m, _)| m)
                .unwrap_or_else(|e| panic!("{folder} {variant:?}: {e}"));
            let c = model.config();
            assert_eq!(model.text_model.encoder.layers.len(), c.num_hidden_layers);
            assert_eq!(
                model.text_projection.is_some(),
                folder == "text_encoder_2",
                "{folder}: projection"
            );
        }
    }
}
