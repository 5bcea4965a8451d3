//! LoRA adapters against diffusers (PEFT backend): every `lora.*` case of
//! `reference/extras/` through the library on both backends and through
//! `hypergen generate --lora`; exact restore of the base weights; a LoCon convolution
//! merged against a by-hand computation; bad adapters refused without changing the model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::{DType, Tensor};
use hypergen::load::lora::{apply_loras, remove_loras, same_weights, LoraAdapter, LoraSpec};
use hypergen::load::params::{list_params, read_params, LayerKind};
use hypergen::pipeline::{GenerationRequest, SdxlPipeline};
use hypergen::{Error, FusedOps};

use crate::common::{
    assert_matches, fixture_dir, no_progress, reference_dir, values, Cpu, RefTensor, TOL_F32,
};

/// One `lora.*` case of `extras.json`: its adapters (fixture-relative path, scale).
#[derive(Debug, Clone)]
pub struct LoraCase {
    pub name: String,
    pub adapters: Vec<(PathBuf, f32)>,
    pub steps: usize,
    pub guidance: f64,
    pub latents: PathBuf,
}

/// `reference/extras/extras.json`.
pub fn extras_json() -> serde_json::Value {
    let path = reference_dir().join("extras").join("extras.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("extras.json parses")
}

/// Every `lora.*` case, settings from `extras.json`.
pub fn lora_cases() -> Vec<LoraCase> {
    let json = extras_json();
    let cases = json["cases"].as_object().expect("cases");
    let mut out = Vec::new();
    for (name, case) in cases {
        if !name.starts_with("lora.") {
            continue;
        }
        let adapters: Vec<(PathBuf, f32)> = if let Some(one) = case["lora"].as_str() {
            vec![(
                fixture_dir().join(one),
                case["scale"].as_f64().expect("scale") as f32,
            )]
        } else {
            case["loras"]
                .as_object()
                .expect("lora or loras")
                .iter()
                .map(|(p, s)| (fixture_dir().join(p), s.as_f64().expect("scale") as f32))
                .collect()
        };
        out.push(LoraCase {
            name: name.clone(),
            adapters,
            steps: case["steps"].as_u64().expect("steps") as usize,
            guidance: case["guidance_scale"].as_f64().expect("guidance_scale"),
            latents: fixture_dir().join(case["latents"].as_str().expect("latents")),
        });
    }
    assert!(!out.is_empty(), "extras.json has no lora cases");
    out
}

/// A tensor of `extras.safetensors` (u8 widened to f32).
pub fn extras_reference(name: &str) -> RefTensor {
    let path = reference_dir().join("extras").join("extras.safetensors");
    read_tensor(&path, Some(name))
}

/// The tensor `name` (or the only tensor) of a safetensors file, as f32.
pub fn read_tensor(path: &Path, name: Option<&str>) -> RefTensor {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors parse");
    let view = match name {
        Some(n) => st
            .tensor(n)
            .unwrap_or_else(|_| panic!("tensor `{n}` not in {}", path.display())),
        None => st.tensors().into_iter().next().expect("one tensor").1,
    };
    crate::common::ref_tensor_of(&view)
}

/// The request of a case: prompt and size from `extras.json`, its starting latents.
pub fn case_request(case: &LoraCase) -> GenerationRequest {
    let json = extras_json();
    let init = read_tensor(&case.latents, None);
    GenerationRequest {
        prompt: json["prompt"].as_str().expect("prompt").into(),
        negative_prompt: None,
        num_inference_steps: case.steps,
        guidance_scale: case.guidance,
        width: json["width"].as_u64().expect("width") as usize,
        height: json["height"].as_u64().expect("height") as usize,
        num_images: init.shape[0],
        latents: Some(init.data),
        ..Default::default()
    }
}

fn assert_latents(what: &str, got: Tensor<impl FusedOps, 4>, want: &RefTensor) {
    assert_eq!(got.dims().to_vec(), want.shape, "{what}: shape");
    let got = values(got);
    let err = crate::common::rel_error(&got, &want.data);
    eprintln!("{what}: relative error {err:.3e} (tolerance {TOL_F32:.0e})");
    assert!(err <= TOL_F32, "{what}: relative error {err:.3e}");
}

fn all_cases<B: FusedOps>(device: &B::Device) {
    let mut pipe: SdxlPipeline<B> = crate::common::fixture_pipeline::<B>(DType::F32, device);
    let base_unet = pipe.components().unet.clone();
    let base_te = pipe.components().text_encoder.clone();
    let base_te2 = pipe.components().text_encoder_2.clone();
    let mut cache: HashMap<PathBuf, Arc<LoraAdapter>> = HashMap::new();
    for case in lora_cases() {
        for (p, _) in &case.adapters {
            cache
                .entry(p.clone())
                .or_insert_with(|| Arc::new(LoraAdapter::read(p).expect("fixture LoRA reads")));
        }
        let list: Vec<LoraSpec<Arc<LoraAdapter>>> = case
            .adapters
            .iter()
            .map(|(p, s)| LoraSpec::new(cache[p].clone(), *s))
            .collect();
        apply_loras(pipe.components_mut(), &list).expect("apply");
        assert_eq!(pipe.components().loras.active().len(), list.len());
        let out = pipe
            .generate(&case_request(&case), &mut no_progress)
            .expect("generate");
        assert_latents(
            &format!("{} latents", case.name),
            out.latents,
            &extras_reference(&format!("{}.latents", case.name)),
        );
        crate::common::assert_image_close(
            &format!("{} image", case.name),
            &out.images[0].rgb,
            &extras_reference(&format!("{}.image_u8", case.name)),
        );
    }
    remove_loras(pipe.components_mut());
    assert!(pipe.components().loras.is_empty());
    assert!(
        same_weights(&pipe.components().unet, &base_unet),
        "unet restored bit for bit"
    );
    assert!(
        same_weights(&pipe.components().text_encoder, &base_te),
        "te1 restored"
    );
    assert!(
        same_weights(&pipe.components().text_encoder_2, &base_te2),
        "te2 restored"
    );
    let case = &lora_cases()[0];
    let out = pipe
        .generate(&case_request(case), &mut no_progress)
        .expect("generate");
    assert_matches(
        "after removal",
        out.latents,
        "pipe.cfg5.euler4.latents",
        TOL_F32,
    );
}
crate::on_backends!(lora_fixture_cases, all_cases);

/// `hypergen generate --lora PATH:SCALE` (repeated) writes every case's image.
#[test]
fn lora_cli_generate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for case in lora_cases() {
        let r = case_request(&case);
        let out = tmp.path().join(format!("{}.png", case.name));
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_hypergen"));
        cmd.args(["generate", "--model"])
            .arg(fixture_dir())
            .args(["--prompt", &r.prompt])
            .args(["--steps", &case.steps.to_string()])
            .args(["--guidance", &case.guidance.to_string()])
            .args([
                "--width",
                &r.width.to_string(),
                "--height",
                &r.height.to_string(),
            ])
            .arg("--latents")
            .arg(&case.latents)
            .args(["--device", "cpu", "--dtype", "float32", "--out"])
            .arg(&out);
        for (p, s) in &case.adapters {
            cmd.arg("--lora").arg(format!("{}:{s}", p.display()));
        }
        let status = cmd.status().expect("run hypergen");
        assert!(status.success(), "{}: hypergen generate failed", case.name);
        let png = image::open(&out).expect("PNG written").to_rgb8();
        crate::common::assert_image_close(
            &format!("cli {}", case.name),
            png.as_raw(),
            &extras_reference(&format!("{}.image_u8", case.name)),
        );
    }
}

/// Writes a safetensors file of f32 tensors.
pub fn write_safetensors(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, d)| d.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            (
                n.to_string(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .expect("view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write safetensors");
}

/// Deterministic values in [-1, 1).
fn pseudo(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A LoCon layer (3×3 `lora_down`, 1×1 `lora_up`) on the first UNet resnet's `conv1`,
/// named in kohya's SGM numbering, merges to W + scale·(alpha/rank)·up·down computed
/// by hand in f64.
#[test]
fn lora_locon_conv_by_hand() {
    let device = Default::default();
    let mut pipe = crate::common::fixture_pipeline::<Cpu>(DType::F32, &device);
    let module = "down_blocks.0.resnets.0.conv1";
    let params = list_params(&pipe.components().unet);
    let info = &params[&format!("{module}.weight")];
    assert_eq!(info.kind, LayerKind::Conv2d);
    let [out, inp, kh, kw] = <[usize; 4]>::try_from(info.shape.clone()).expect("conv weight");
    let rank = 3;
    let alpha = 1.5f32;
    let scale = 0.8f32;
    let down = pseudo(rank * inp * kh * kw, 1);
    let up = pseudo(out * rank, 2);
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("locon.safetensors");
    let key = "lora_unet_input_blocks_1_0_in_layers_2";
    write_safetensors(
        &file,
        &[
            (
                &format!("{key}.lora_down.weight"),
                vec![rank, inp, kh, kw],
                down.clone(),
            ),
            (
                &format!("{key}.lora_up.weight"),
                vec![out, rank, 1, 1],
                up.clone(),
            ),
            (&format!("{key}.alpha"), vec![], vec![alpha]),
        ],
    );
    let path = format!("{module}.weight");
    let before = values(Tensor::<Cpu, 4>::from_primitive(
        read_params(&pipe.components().unet, std::slice::from_ref(&path))[&path].clone(),
    ));
    let adapter = Arc::new(LoraAdapter::read(&file).expect("LoCon reads"));
    apply_loras(pipe.components_mut(), &[LoraSpec::new(adapter, scale)]).expect("LoCon applies");
    let after = values(Tensor::<Cpu, 4>::from_primitive(
        read_params(&pipe.components().unet, std::slice::from_ref(&path))[&path].clone(),
    ));
    let factor = scale as f64 * alpha as f64 / rank as f64;
    let fan = inp * kh * kw;
    let mut worst = 0f64;
    for o in 0..out {
        for k in 0..fan {
            let mut d = 0f64;
            for r in 0..rank {
                d += up[o * rank + r] as f64 * down[r * fan + k] as f64;
            }
            let want = before[o * fan + k] as f64 + factor * d;
            worst = worst.max((after[o * fan + k] as f64 - want).abs());
        }
    }
    eprintln!("LoCon merge: max abs difference {worst:.3e}");
    assert!(worst <= 1e-5, "LoCon merge differs by {worst:.3e}");
    assert!(before != after, "the merge changed the weight");
}

fn assert_unchanged(
    pipe: &SdxlPipeline<Cpu>,
    base: &hypergen::model::unet::UNet2DConditionModel<Cpu>,
) {
    assert!(pipe.components().loras.is_empty());
    assert!(
        same_weights(&pipe.components().unet, base),
        "model unchanged"
    );
}

/// Bad adapters are refused with a clear error, and the model keeps its weights.
#[test]
fn lora_bad_adapters_change_nothing() {
    let device = Default::default();
    let mut pipe = crate::common::fixture_pipeline::<Cpu>(DType::F32, &device);
    let base = pipe.components().unet.clone();
    let tmp = tempfile::tempdir().expect("tempdir");

    let missing = LoraAdapter::read(&tmp.path().join("nope.safetensors")).unwrap_err();
    assert!(matches!(missing, Error::MissingFile { .. }), "{missing}");

    let pickle = tmp.path().join("x.ckpt");
    std::fs::write(&pickle, b"not opened").expect("write");
    let err = LoraAdapter::read(&pickle).unwrap_err();
    assert!(err.to_string().contains("pickle"), "{err}");

    let not_lora = tmp.path().join("not_lora.safetensors");
    write_safetensors(&not_lora, &[("model.weight", vec![2, 2], vec![0.0; 4])]);
    let err = LoraAdapter::read(&not_lora).unwrap_err();
    assert!(err.to_string().contains("not a LoRA"), "{err}");

    // A real adapter with one extra layer the model lacks: nothing is merged.
    let unmatched = tmp.path().join("unmatched.safetensors");
    write_safetensors(
        &unmatched,
        &[
            (
                "lora_unet_no_such_layer.lora_down.weight",
                vec![1, 4],
                vec![0.1; 4],
            ),
            (
                "lora_unet_no_such_layer.lora_up.weight",
                vec![4, 1],
                vec![0.1; 4],
            ),
        ],
    );
    let adapter = Arc::new(LoraAdapter::read(&unmatched).expect("parses"));
    let err = apply_loras(pipe.components_mut(), &[LoraSpec::new(adapter, 1.0)]).unwrap_err();
    assert!(matches!(err, Error::LoraUnmatched { .. }), "{err}");
    assert!(err.to_string().contains("no_such_layer"), "{err}");
    assert_unchanged(&pipe, &base);

    // Shapes that do not fit a real layer: the layer is named.
    let params = list_params(&pipe.components().unet);
    let (path, info) = params
        .iter()
        .find(|(p, i)| i.kind == LayerKind::Linear && p.ends_with("attn1.to_q.weight"))
        .expect("an attention layer");
    let module = path.trim_end_matches(".weight");
    let (inp, out) = (info.shape[0], info.shape[1]);
    let bad = tmp.path().join("bad_shape.safetensors");
    let peft = format!("unet.{module}");
    write_safetensors(
        &bad,
        &[
            (
                &format!("{peft}.lora_A.weight"),
                vec![2, inp + 1],
                vec![0.1; 2 * (inp + 1)],
            ),
            (
                &format!("{peft}.lora_B.weight"),
                vec![out, 2],
                vec![0.1; 2 * out],
            ),
        ],
    );
    let adapter = Arc::new(LoraAdapter::read(&bad).expect("parses"));
    let bad_fit = [LoraSpec::new(adapter, 1.0)];
    let err = apply_loras(pipe.components_mut(), &bad_fit).unwrap_err();
    assert!(matches!(err, Error::LoraShape { .. }), "{err}");
    assert!(err.to_string().contains(module), "{err}");
    assert_unchanged(&pipe, &base);

    // A good adapter, then a bad one: the good one stays merged, unchanged.
    let good = Arc::new(LoraAdapter::read(&lora_cases()[0].adapters[0].0).expect("reads"));
    apply_loras(pipe.components_mut(), &[LoraSpec::new(good, 1.0)]).expect("applies");
    let merged = pipe.components().unet.clone();
    assert!(apply_loras(pipe.components_mut(), &bad_fit).is_err());
    assert!(
        same_weights(&pipe.components().unet, &merged),
        "merged state kept"
    );
    remove_loras(pipe.components_mut());
    assert_unchanged(&pipe, &base);
}
