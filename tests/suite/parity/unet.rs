//! UNet noise prediction at three timesteps against diffusers.

use burn::tensor::{DType, Tensor};
use hypergen::model::unet::{ExtraTokens, UNetExtras};
use hypergen::FusedOps;

use crate::common::{assert_matches, fixture_dir, ref_tensor, reference, values, Cpu, TOL_F32};

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
                &UNetExtras::default(),
            )
            .expect("forward_prepared");
        assert_matches(&format!("unet prepared t={t}"), out, &reference, TOL_F32);
    }
    // A context prepared for other rows is refused, not broadcast.
    let one_row = unet
        .prepare_context(context.narrow(0, 0, 1))
        .expect("context of one row");
    let err = unet
        .forward_prepared(
            sample,
            &vec![1.0; n],
            &one_row,
            text_embeds,
            &time_ids,
            &UNetExtras::default(),
        )
        .expect_err("rows differ");
    assert!(err.to_string().contains("rows"), "{err}");
}

crate::on_backends!(unet_parity, unet_matches_reference);

/// What adapters add to a UNet call is honoured where diffusers adds it: zero residuals
/// and zero-weighted tokens leave the output bit-identical, non-zero ones change it, and
/// residuals or tokens that do not fit are refused with the reason.
#[test]
fn unet_extras_are_honoured() {
    let device = Default::default();
    let dir = fixture_dir().join("unet");
    let (unet, _) = hypergen::load::folder::load_unet::<Cpu>(&dir, None, DType::F32, &device)
        .expect("fixture UNet loads");
    let sample = ref_tensor::<Cpu, 4>("unet.sample", &device);
    let context = ref_tensor::<Cpu, 3>("unet.encoder_hidden_states", &device);
    let text_embeds = ref_tensor::<Cpu, 2>("unet.text_embeds", &device);
    let time_ids = reference("unet.time_ids").data;
    let [n, _, h, w] = sample.dims();
    let text = unet.prepare_context(context.clone()).expect("context");
    let run = |extras: &UNetExtras<Cpu>| {
        unet.forward_prepared(
            sample.clone(),
            &vec![421.0; n],
            &text,
            text_embeds.clone(),
            &time_ids,
            extras,
        )
        .map(values)
    };
    let plain = run(&UNetExtras::default()).expect("plain");

    // The skips the down path saves, derived from the config: conv_in's output, one per
    // down resnet, one per downsampler (a stride-2 convolution halves, rounding up).
    let ch = &unet.config().block_out_channels;
    let layers = &unet.resolved().layers;
    let (mut sh, mut sw) = (h, w);
    let mut skips = vec![[n, ch[0], sh, sw]];
    for (i, &c) in ch.iter().enumerate() {
        skips.extend((0..layers[i]).map(|_| [n, c, sh, sw]));
        if i + 1 < ch.len() {
            (sh, sw) = (sh.div_ceil(2), sw.div_ceil(2));
            skips.push([n, c, sh, sw]);
        }
    }
    let mid = [n, ch[ch.len() - 1], sh, sw];
    let zeros = |shape: [usize; 4]| Tensor::<Cpu, 4>::zeros(shape, &device);
    let filled = |shape: [usize; 4], v: f32| Tensor::<Cpu, 4>::full(shape, v, &device);

    let zero = UNetExtras {
        down_residuals: Some(skips.iter().map(|&s| zeros(s)).collect()),
        mid_residual: Some(zeros(mid)),
        tokens: Some(ExtraTokens {
            kv: text.clone(),
            scale: 0.0,
        }),
    };
    // Counts of differing values: a vector of thousands would bury the message.
    let differing = |out: &[f32]| out.iter().zip(&plain).filter(|(a, b)| a != b).count();
    let out = run(&zero).expect("zero extras");
    assert_eq!(out.len(), plain.len());
    assert_eq!(differing(&out), 0, "zero extras must change nothing");

    let changed = |extras: UNetExtras<Cpu>, what: &str| {
        let out = run(&extras).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(out.len(), plain.len());
        assert!(out.iter().all(|v| v.is_finite()), "{what}: non-finite");
        assert!(differing(&out) > 0, "{what} must change the output");
    };
    changed(
        UNetExtras {
            mid_residual: Some(filled(mid, 0.5)),
            ..UNetExtras::default()
        },
        "a mid residual",
    );
    let mut down: Vec<_> = skips.iter().map(|&s| zeros(s)).collect();
    down[skips.len() - 1] = filled(skips[skips.len() - 1], 0.5);
    changed(
        UNetExtras {
            down_residuals: Some(down),
            ..UNetExtras::default()
        },
        "a residual on the deepest skip",
    );
    changed(
        UNetExtras {
            tokens: Some(ExtraTokens {
                kv: text.clone(),
                scale: 0.5,
            }),
            ..UNetExtras::default()
        },
        "weighted extra tokens",
    );

    let refused = |extras: UNetExtras<Cpu>, words: &[&str]| {
        let err = run(&extras).expect_err("refused").to_string();
        for word in words {
            assert!(err.contains(word), "{err:?} lacks {word:?}");
        }
    };
    refused(
        UNetExtras {
            down_residuals: Some(skips[1..].iter().map(|&s| zeros(s)).collect()),
            ..UNetExtras::default()
        },
        &[
            "down_block_additional_residuals",
            &format!("{} residuals", skips.len() - 1),
            &format!("{} skip connections", skips.len()),
        ],
    );
    let mut wrong = skips.clone();
    wrong[2][1] += 1;
    refused(
        UNetExtras {
            down_residuals: Some(wrong.iter().map(|&s| zeros(s)).collect()),
            ..UNetExtras::default()
        },
        &[
            "residual 2",
            &format!("{:?}", wrong[2]),
            &format!("{:?}", skips[2]),
        ],
    );
    refused(
        UNetExtras {
            mid_residual: Some(zeros([n, mid[1], mid[2] + 1, mid[3]])),
            ..UNetExtras::default()
        },
        &["mid_block_additional_residual", &format!("{mid:?}")],
    );
    let more_rows = Tensor::cat(vec![context.clone(), context.narrow(0, 0, 1)], 0);
    let more_rows = unet.prepare_context(more_rows).expect("one row more");
    refused(
        UNetExtras {
            tokens: Some(ExtraTokens {
                kv: more_rows,
                scale: 1.0,
            }),
            ..UNetExtras::default()
        },
        &[
            "image_tokens",
            &format!("{} rows", n + 1),
            &format!("for {n} rows"),
        ],
    );
}

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
