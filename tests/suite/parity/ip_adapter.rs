//! IP-Adapter (image prompts) against diffusers: the preprocessing, the image encoder,
//! the projections (base and Plus) and the UNet with image tokens, each case read from
//! `reference/ip_adapter/ip_adapter.json`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use burn::tensor::{DType, Tensor, TensorData};
use hypergen::load::ip_adapter::{
    check_widths, load_image_encoder, load_image_prompt_adapter, load_ip_adapter,
};
use hypergen::model::clip_vision::pixel_values;
use hypergen::model::unet::{ExtraTokens, UNetExtras};
use hypergen::pipeline::{GenerationRequest, Image, ImagePrompt};
use hypergen::FusedOps;

use crate::common::{
    assert_image_close, fixture_dir, fixture_pipeline, gpu_device, no_progress, ref_tensor,
    ref_tensor_of, reference, rel_error, values, Cpu, Gpu, RefTensor, TOL_F32,
};

fn ip_dir() -> PathBuf {
    fixture_dir().join("reference").join("ip_adapter")
}

fn settings() -> &'static serde_json::Value {
    static S: OnceLock<serde_json::Value> = OnceLock::new();
    S.get_or_init(|| {
        let text = std::fs::read_to_string(ip_dir().join("ip_adapter.json")).expect("json");
        serde_json::from_str(&text).expect("json parses")
    })
}

/// The tensor `name` of `reference/ip_adapter/ip_adapter.safetensors`.
fn ip_ref(name: &str) -> RefTensor {
    static ALL: OnceLock<HashMap<String, RefTensor>> = OnceLock::new();
    ALL.get_or_init(|| {
        let bytes = std::fs::read(ip_dir().join("ip_adapter.safetensors")).expect("tensors");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("tensors parse");
        st.tensors()
            .into_iter()
            .map(|(n, v)| (n, ref_tensor_of(&v)))
            .collect()
    })
    .get(name)
    .unwrap_or_else(|| panic!("reference tensor `{name}` not found"))
    .clone()
}

fn ip_tensor<B: FusedOps, const D: usize>(name: &str, device: &B::Device) -> Tensor<B, D> {
    let r = ip_ref(name);
    Tensor::from_data(TensorData::new(r.data, r.shape), device)
}

fn close<B: FusedOps, const D: usize>(what: &str, got: Tensor<B, D>, name: &str) {
    let want = ip_ref(name);
    assert_eq!(got.dims().to_vec(), want.shape, "{what}: shape");
    let err = rel_error(&values(got), &want.data);
    eprintln!("{what}: relative error {err:.3e}");
    assert!(
        err <= TOL_F32,
        "{what}: relative error {err:.3e} > {TOL_F32:.0e}"
    );
}

/// The cases of the JSON, by name.
fn cases() -> Vec<(String, serde_json::Value)> {
    let cases = settings()["cases"].as_object().expect("cases");
    cases.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The case's image as RGB bytes with its size.
fn case_image(case: &serde_json::Value) -> (Vec<u8>, usize, usize) {
    let path = fixture_dir().join(case["ip_adapter_image"].as_str().expect("image"));
    let img = image::open(&path).expect("image decodes").to_rgb8();
    let (w, h) = img.dimensions();
    (img.into_raw(), w as usize, h as usize)
}

/// The saved pre-processed pixels of the case's image.
fn pixels_name(case: &serde_json::Value) -> &'static str {
    if case["ip_adapter_image"]
        .as_str()
        .unwrap_or_default()
        .contains("portrait")
    {
        "pixel_values.portrait"
    } else {
        "pixel_values.init_image"
    }
}

/// The preprocessing alone: PIL's bicubic resize, the centre crop, CLIP's normalisation.
#[test]
fn preprocessing_matches_clip_image_processor() {
    let device = Default::default();
    let size = settings()["feature_extractor"]["crop_size"]["height"]
        .as_u64()
        .expect("crop size") as usize;
    for (name, case) in cases() {
        let (rgb, w, h) = case_image(&case);
        let got = pixel_values::<Cpu>(&rgb, w, h, size, &device);
        let want = ip_ref(pixels_name(&case));
        assert_eq!(got.dims().to_vec(), want.shape, "{name}");
        let max = values(got)
            .iter()
            .zip(&want.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{name}: max |pixel difference| {max:.2e}");
        // One byte step is 1/255/std ≈ 0.015; PIL's resize is matched bit for bit.
        assert!(max < 1e-5, "{name}: pixel values differ by {max}");
    }
}

/// The encoder's embeddings and the projected tokens, for every case (CPU).
#[test]
fn image_embeddings_and_tokens_match() {
    let device = Default::default();
    let fx = fixture_dir();
    for (name, case) in cases() {
        let enc_dir = fx.join(case["image_encoder"].as_str().expect("encoder"));
        let adapter_path = fx.join(case["adapter"].as_str().expect("adapter"));
        let (encoder, _) =
            load_image_encoder::<Cpu>(&enc_dir, DType::F32, &device).expect("encoder");
        let (adapter, _) =
            load_ip_adapter::<Cpu>(&adapter_path, DType::F32, &device).expect("adapter");
        check_widths(&adapter_path, &adapter, &encoder).expect("widths");
        let pixels = ip_tensor::<Cpu, 4>(pixels_name(&case), &device);
        let out = encoder.forward(pixels.clone()).expect("encoder forward");
        let (cond, uncond) = if adapter.reads_hidden_states() {
            close(
                &format!("{name} penultimate"),
                out.penultimate.clone(),
                &format!("{name}.penultimate"),
            );
            let zeros = encoder
                .forward(pixels.zeros_like())
                .expect("zeros")
                .penultimate;
            close(
                &format!("{name} uncond"),
                zeros.clone(),
                &format!("{name}.uncond_penultimate"),
            );
            (out.penultimate, zeros)
        } else {
            close(
                &format!("{name} image_embeds"),
                out.image_embeds.clone(),
                &format!("{name}.image_embeds"),
            );
            let e = out.image_embeds.unsqueeze_dim::<3>(1);
            (e.clone(), e.zeros_like())
        };
        let tokens = adapter
            .project_image(Tensor::cat(vec![uncond, cond], 0))
            .expect("tokens");
        let [n, t, w] = tokens.dims();
        close(
            &format!("{name} tokens"),
            tokens.reshape([n, 1, t, w]),
            &format!("{name}.ip_tokens_cfg"),
        );
    }
}

/// One UNet call with image tokens (timestep 421, the references' inputs), base and Plus.
fn unet_with_tokens_matches<B: FusedOps>(device: &B::Device) {
    let fx = fixture_dir();
    let (unet, _) =
        hypergen::load::folder::load_unet::<B>(&fx.join("unet"), None, DType::F32, device)
            .expect("unet");
    let sample = ref_tensor::<B, 4>("unet.sample", device);
    let context = ref_tensor::<B, 3>("unet.encoder_hidden_states", device);
    let text_embeds = ref_tensor::<B, 2>("unet.text_embeds", device);
    let time_ids = reference("unet.time_ids").data;
    let n = sample.dims()[0];
    let text = unet.prepare_context(context).expect("context");
    for (case, out_name) in [
        ("ip.base.scale0.6", "unet.t421.ip_base_scale0.6.out"),
        ("ip.plus.scale0.6", "unet.t421.ip_plus_scale0.6.out"),
    ] {
        let c = &settings()["cases"][case];
        let (adapter, _) = load_ip_adapter::<B>(
            &fx.join(c["adapter"].as_str().expect("adapter")),
            DType::F32,
            device,
        )
        .expect("adapter");
        // [rows, 1, D] (base) or [rows, 1, T, D] (Plus): one image per row.
        let r = ip_ref(&format!("{case}.embeds_in_cfg"));
        let (rows, d) = (r.shape[0], r.shape[r.shape.len() - 1]);
        let t = r.data.len() / rows / d;
        let embeds = Tensor::<B, 3>::from_data(TensorData::new(r.data, [rows, t, d]), device);
        let tokens = adapter.project_image(embeds).expect("tokens");
        assert_eq!(rows, n);
        let kv = adapter.project_tokens(&unet, tokens).expect("project");
        let extras = UNetExtras {
            tokens: Some(ExtraTokens {
                kv,
                scale: c["ip_adapter_scale"].as_f64().expect("scale"),
            }),
            ..UNetExtras::default()
        };
        let out = unet
            .forward_prepared(
                sample.clone(),
                &vec![421.0; n],
                &text,
                text_embeds.clone(),
                &time_ids,
                &extras,
            )
            .expect("forward");
        close(case, out, out_name);
    }
}

/// The UNet with image tokens on the CPU (wgpu runs the whole Plus case end to end).
#[test]
fn unet_with_image_tokens_cpu() {
    unet_with_tokens_matches::<Cpu>(&Default::default());
}

/// The case's run as a request, with its image prompt.
fn request(case: &serde_json::Value) -> GenerationRequest {
    let init = {
        let path = fixture_dir().join(case["latents"].as_str().expect("latents"));
        let bytes = std::fs::read(&path).expect("init latents");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("parses");
        ref_tensor_of(&st.tensor("latents").expect("latents"))
    };
    let (rgb, width, height) = case_image(case);
    let size = |k: &str| case[k].as_u64().expect("size") as usize;
    GenerationRequest {
        prompt: case["prompt"].as_str().expect("prompt").into(),
        negative_prompt: case["negative_prompt"].as_str().map(Into::into),
        num_inference_steps: size("num_inference_steps"),
        guidance_scale: case["guidance_scale"].as_f64().expect("guidance"),
        width: size("width"),
        height: size("height"),
        num_images: init.shape[0],
        latents: Some(init.data),
        ip_adapter: Some(ImagePrompt {
            images: vec![Image { width, height, rgb }],
            scale: case["ip_adapter_scale"].as_f64().expect("scale"),
        }),
        ..Default::default()
    }
}

/// Every case (or those in `only`): final latents to 1e-4, images within 1/255.
fn end_to_end<B: FusedOps>(device: &B::Device, only: Option<&[&str]>) {
    let fx = fixture_dir();
    let mut pipe = fixture_pipeline::<B>(DType::F32, device);
    for (name, case) in cases() {
        if only.is_some_and(|o| !o.contains(&name.as_str())) {
            continue;
        }
        let adapter = load_image_prompt_adapter::<B>(
            &fx.join(case["adapter"].as_str().expect("adapter")),
            Some(&fx.join(case["image_encoder"].as_str().expect("encoder"))),
            DType::F32,
            device,
        )
        .expect("adapter loads");
        pipe.set_ip_adapter(Some(adapter));
        let out = pipe
            .generate(&request(&case), &mut no_progress)
            .expect(&name);
        close(
            &format!("{name} latents"),
            out.latents,
            &format!("{name}.latents"),
        );
        assert_image_close(
            &format!("{name} image"),
            &out.images[0].rgb,
            &ip_ref(&format!("{name}.image_u8")),
        );
    }
}

/// Every case on the CPU.
#[test]
fn image_prompt_runs_cpu() {
    end_to_end::<Cpu>(&Default::default(), None);
}

/// On wgpu, the Plus case only: it runs every operation the base cases do (the encoder,
/// linear projections, LayerNorm, the decoupled attention) and the Resampler besides,
/// and each new tensor shape costs minutes of shader compilation on CI's software Vulkan.
#[test]
fn image_prompt_runs_wgpu() {
    end_to_end::<Gpu>(&gpu_device(), Some(&["ip.plus.scale0.6"]));
}

/// `hypergen generate --ip-adapter … --ip-adapter-image … --ip-adapter-scale …` writes the
/// reference image, the image encoder found beside the adapter (no --image-encoder).
#[test]
fn cli_image_prompt() {
    let fx = fixture_dir();
    let name = "ip.base.scale0.6";
    let case = &settings()["cases"][name];
    let dir = tempfile::tempdir().expect("temp dir");
    let latents = dir.path().join("latents.safetensors");
    std::fs::copy(
        fx.join(case["latents"].as_str().expect("latents")),
        &latents,
    )
    .expect("copy");
    let out = dir.path().join("out.png");
    let num = |k: &str| case[k].to_string();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_hypergen"))
        .args(["generate", "--model"])
        .arg(&fx)
        .args(["--prompt", case["prompt"].as_str().expect("prompt")])
        .args(["--steps", &num("num_inference_steps")])
        .args(["--guidance", &num("guidance_scale")])
        .args(["--width", &num("width"), "--height", &num("height")])
        .arg("--latents")
        .arg(&latents)
        .arg("--ip-adapter")
        .arg(fx.join(case["adapter"].as_str().expect("adapter")))
        .arg("--ip-adapter-image")
        .arg(fx.join(case["ip_adapter_image"].as_str().expect("image")))
        .args(["--ip-adapter-scale", &num("ip_adapter_scale")])
        .arg("--out")
        .arg(&out)
        .status()
        .expect("hypergen runs");
    assert!(status.success(), "hypergen generate with an image prompt");
    let png = image::open(&out).expect("PNG written").to_rgb8();
    assert_image_close(
        &format!("cli {name}"),
        png.as_raw(),
        &ip_ref(&format!("{name}.image_u8")),
    );
}

/// Pickled adapters are refused before anything is read, with how to convert; an
/// encoder of another width is named.
#[test]
fn bad_adapters_are_refused() {
    let device = Default::default();
    let err = load_ip_adapter::<Cpu>(
        std::path::Path::new("ip-adapter_sdxl.bin"),
        DType::F32,
        &device,
    )
    .expect_err("pickle refused");
    assert!(err.to_string().contains("safetensors"), "{err}");
    let fx = fixture_dir().join("ip_adapter");
    let (plus, _) = load_ip_adapter::<Cpu>(
        &fx.join("sdxl_models/ip-adapter-plus_sdxl.safetensors"),
        DType::F32,
        &device,
    )
    .expect("plus");
    let (encoder, _) =
        load_image_encoder::<Cpu>(&fx.join("image_encoder"), DType::F32, &device).expect("encoder");
    check_widths(std::path::Path::new("plus"), &plus, &encoder).expect("matching widths");
    // The base adapter reads the projection (48 wide), Plus the hidden states (64).
    let (base, _) = load_ip_adapter::<Cpu>(
        &fx.join("sdxl_models/ip-adapter_sdxl.safetensors"),
        DType::F32,
        &device,
    )
    .expect("base");
    let hidden = encoder.config().hidden_size;
    let proj = encoder.config().projection_dim;
    assert_ne!(hidden, proj, "the fixture's widths differ");
    let mut cfg = encoder.config().clone();
    cfg.projection_dim = proj + 1;
    let other = cfg.init::<Cpu>(&device).expect("other encoder");
    let err = check_widths(std::path::Path::new("base"), &base, &other).expect_err("widths differ");
    assert!(err.to_string().contains("projection_dim"), "{err}");
}

/// Bad image prompts are refused naming the field, before any work; requests with other
/// scales (or none) never share a batch.
#[test]
fn image_prompt_input_errors_name_the_field() {
    let device = Default::default();
    let (_, case) = cases().into_iter().next().expect("a case");
    let mut pipe = fixture_pipeline::<Cpu>(DType::F32, &device);
    let req = request(&case);
    let err = pipe
        .check_inputs(std::slice::from_ref(&req))
        .expect_err("no adapter loaded");
    assert!(err.to_string().contains("ip_adapter"), "{err}");
    let fx = fixture_dir();
    let adapter = load_image_prompt_adapter::<Cpu>(
        &fx.join(case["adapter"].as_str().expect("adapter")),
        None,
        DType::F32,
        &device,
    )
    .expect("adapter and encoder found beside it");
    pipe.set_ip_adapter(Some(adapter));
    pipe.check_inputs(std::slice::from_ref(&req))
        .expect("valid");
    for (scale, images, field) in [
        (-0.5, 1, "ip_adapter.scale"),
        (f64::NAN, 1, "ip_adapter.scale"),
        (0.5, 0, "ip_adapter.image"),
    ] {
        let mut bad = req.clone();
        let prompt = bad.ip_adapter.as_mut().expect("prompt");
        prompt.scale = scale;
        prompt.images.truncate(images);
        let err = pipe.check_inputs(&[bad]).expect_err(field);
        assert!(err.to_string().contains(field), "{field}: {err}");
    }
    let mut other_scale = req.clone();
    other_scale.ip_adapter.as_mut().expect("prompt").scale += 0.1;
    let none = GenerationRequest {
        ip_adapter: None,
        ..req.clone()
    };
    assert!(req.batch_compatible(&req.clone()));
    assert!(!req.batch_compatible(&other_scale));
    assert!(!req.batch_compatible(&none));
}
