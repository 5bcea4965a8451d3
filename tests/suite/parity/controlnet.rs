//! ControlNet against diffusers' `StableDiffusionXLControlNet*Pipeline`s: every case of
//! `reference/controlnet/controlnet.json` (text-to-image at a scale, a guidance window,
//! two ControlNets summed, image-to-image) and the first call's residuals. Settings,
//! ControlNets, images and sizes come from the JSON and the reference tensors.

use std::path::PathBuf;

use burn::tensor::{DType, Tensor, TensorData};
use hypergen::load::controlnet::add_controlnet;
use hypergen::pipeline::{ControlNetInput, GenerationRequest, Image, InitImage, SdxlPipeline};
use hypergen::FusedOps;

use crate::common::{
    assert_image_close, fixture_dir, fixture_pipeline, no_progress, reference, reference_dir,
    rel_error, seed_of, values, RefTensor, TOL_F32,
};

/// `reference/controlnet/`.
pub fn controlnet_dir() -> PathBuf {
    reference_dir().join("controlnet")
}

/// `controlnet.json`.
pub fn controlnet_json() -> serde_json::Value {
    let path = controlnet_dir().join("controlnet.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("controlnet.json parses")
}

/// A tensor of `controlnet.safetensors`.
pub fn controlnet_tensor(name: &str) -> RefTensor {
    let path = controlnet_dir().join("controlnet.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("controlnet tensors parse");
    let view = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("controlnet tensor `{name}`: {e}"));
    crate::common::ref_tensor_of(&view)
}

fn tensor<B: FusedOps, const D: usize>(r: RefTensor, device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(r.data, r.shape), device)
}

/// A file a case names relative to `reference/controlnet/` or the fixture folder.
fn case_path(name: &str) -> PathBuf {
    let name = name.strip_prefix("reference/").unwrap_or(name);
    let here = controlnet_dir().join(name);
    if here.exists() {
        return here;
    }
    let fixture = fixture_dir().join(name);
    if fixture.exists() {
        return fixture;
    }
    reference_dir().join(name)
}

fn open(path: &PathBuf) -> Image {
    Image::from_dynamic(&image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// The names of the ControlNets the cases use (their folders, relative to the fixture).
fn controlnet_names(json: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = (json["cases"].as_object().expect("cases").values())
        .filter_map(|c| c["controlnets"].as_array())
        .flatten()
        .map(|v| v.as_str().expect("controlnet folder").to_string())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The fixture pipeline with every ControlNet the cases use, each under its folder name.
fn pipeline<B: FusedOps>(device: &B::Device) -> SdxlPipeline<B> {
    let mut pipe = fixture_pipeline::<B>(DType::F32, device);
    for name in controlnet_names(&controlnet_json()) {
        add_controlnet(
            pipe.components_mut(),
            &name,
            &fixture_dir().join(&name),
            device,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    pipe
}

/// The library request of a ControlNet case.
fn request(json: &serde_json::Value, name: &str) -> GenerationRequest {
    let c = &json["cases"][name];
    let want = controlnet_tensor(&format!("{name}.image_u8"));
    let nets = c["controlnets"].as_array().expect("controlnets");
    let images = c["control_images"].as_array().expect("control_images");
    let scales: Vec<f64> = match &c["controlnet_conditioning_scale"] {
        serde_json::Value::Array(v) => v.iter().map(|s| s.as_f64().expect("scale")).collect(),
        s => vec![s.as_f64().expect("scale"); nets.len()],
    };
    let controlnets = (nets.iter().zip(images).zip(scales))
        .map(|((net, image), scale)| ControlNetInput {
            model: net.as_str().expect("name").into(),
            image: open(&case_path(image.as_str().expect("image"))),
            scale,
            guidance_start: c["control_guidance_start"].as_f64().expect("start"),
            guidance_end: c["control_guidance_end"].as_f64().expect("end"),
            guess_mode: false,
        })
        .collect();
    let mut req = GenerationRequest {
        prompt: json["prompt"].as_str().expect("prompt").into(),
        num_inference_steps: c["num_inference_steps"].as_u64().expect("steps") as usize,
        guidance_scale: c["guidance_scale"].as_f64().expect("guidance"),
        height: want.shape[0],
        width: want.shape[1],
        controlnets,
        ..Default::default()
    };
    if c.get("latents").is_some() {
        req.latents = Some(reference("pipe.init_latents").data);
    }
    if let Some(image) = c.get("image") {
        req.init_image = Some(InitImage {
            image: open(&case_path(image.as_str().expect("image"))),
            mask: None,
            strength: c["strength"].as_f64().expect("strength"),
        });
        req.seed = seed_of(c["generator"].as_str().expect("generator"));
    }
    req
}

/// The ControlNet cases, by name.
fn case_names(json: &serde_json::Value) -> Vec<String> {
    let names: Vec<String> = (json["cases"].as_object().expect("cases").iter())
        .filter(|(_, c)| c.get("controlnets").is_some())
        .map(|(k, _)| k.clone())
        .collect();
    assert!(names.len() >= 4, "controlnet.json has its cases");
    names
}

fn run_case<B: FusedOps>(pipe: &SdxlPipeline<B>, json: &serde_json::Value, name: &str) {
    let out = pipe
        .generate(&request(json, name), &mut no_progress)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let want = controlnet_tensor(&format!("{name}.latents"));
    assert_eq!(out.latents.dims().to_vec(), want.shape, "{name}: shape");
    let err = rel_error(&values(out.latents), &want.data);
    eprintln!("{name} latents: relative error {err:.3e}");
    assert!(err <= TOL_F32, "{name}: latents relative error {err:.3e}");
    assert_image_close(
        name,
        &out.images[0].rgb,
        &controlnet_tensor(&format!("{name}.image_u8")),
    );
}

/// Every case on the CPU.
#[test]
fn cases_cpu() {
    let device = Default::default();
    let pipe = pipeline::<crate::common::Cpu>(&device);
    let json = controlnet_json();
    for name in case_names(&json) {
        run_case(&pipe, &json, &name);
    }
}

/// One case on wgpu (the multi-ControlNet one: both models, every block): each new
/// tensor shape costs minutes of shader compilation on the software Vulkan of CI.
#[test]
fn multi_case_wgpu() {
    let device = crate::common::gpu_device();
    let pipe = pipeline::<crate::common::Gpu>(&device);
    let json = controlnet_json();
    let name = case_names(&json)
        .into_iter()
        .find(|n| json["cases"][n]["controlnets"].as_array().map(Vec::len) > Some(1))
        .expect("a case with several ControlNets");
    run_case(&pipe, &json, &name);
}

/// The first ControlNet call of case a, from the saved inputs: the control image's
/// embedding and every residual.
#[test]
fn first_call_residuals() {
    let device = Default::default();
    type B = crate::common::Cpu;
    let pipe = pipeline::<B>(&device);
    let json = controlnet_json();
    let name = case_names(&json)
        .into_iter()
        .find(|n| n.starts_with("a."))
        .expect("case a");
    let net = json["cases"][&name]["controlnets"][0]
        .as_str()
        .expect("its ControlNet");
    let model = pipe.controlnet(net).expect("loaded");
    let t = |what: &str| controlnet_tensor(&format!("a.step0.{what}"));
    let sample: Tensor<B, 4> = tensor(t("sample"), &device);
    let rows = sample.dims()[0];
    let timestep = t("timestep").data;
    let timesteps = vec![timestep[0]; rows];
    let text = model
        .prepare_context(tensor(t("encoder_hidden_states"), &device))
        .expect("context");
    let cond: Tensor<B, 4> = tensor(t("controlnet_cond"), &device);

    // The control image as the pipeline prepares it equals diffusers'.
    let req = request(&json, &name);
    let mine = pipe
        .control_image(&req.controlnets[0].image, req.width, req.height)
        .expect("control image");
    let want_cond = t("controlnet_cond");
    let got = values(mine);
    let per = got.len();
    assert_eq!(
        rel_error(&got, &want_cond.data[..per]),
        0.0,
        "control image"
    );

    let emb = model.embed_condition(cond.clone());
    let err = rel_error(&values(emb), &t("cond_embedding").data);
    eprintln!("cond_embedding: relative error {err:.3e}");
    assert!(err <= TOL_F32, "cond_embedding {err:.3e}");

    let out = model
        .forward(
            sample,
            &timesteps,
            &text,
            tensor(t("text_embeds"), &device),
            &t("time_ids").data,
            cond,
            1.0,
        )
        .expect("controlnet call");
    let mut k = 0;
    for (k_, down) in out.down.into_iter().enumerate() {
        let want = t(&format!("down_block_res_samples.{k_}"));
        assert_eq!(down.dims().to_vec(), want.shape, "residual {k_}: shape");
        let err = rel_error(&values(down), &want.data);
        eprintln!("down residual {k_}: relative error {err:.3e}");
        assert!(err <= TOL_F32, "down residual {k_}: {err:.3e}");
        k += 1;
    }
    assert!(
        controlnet_tensor_exists(&format!("a.step0.down_block_res_samples.{}", k - 1))
            && !controlnet_tensor_exists(&format!("a.step0.down_block_res_samples.{k}")),
        "as many residuals as diffusers saved"
    );
    let err = rel_error(&values(out.mid), &t("mid_block_res_sample").data);
    eprintln!("mid residual: relative error {err:.3e}");
    assert!(err <= TOL_F32, "mid residual {err:.3e}");
}

fn controlnet_tensor_exists(name: &str) -> bool {
    let path = controlnet_dir().join("controlnet.safetensors");
    let bytes = std::fs::read(&path).expect("controlnet tensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse");
    st.tensor(name).is_ok()
}

/// `hypergen generate --controlnet DIR:SCALE --control-image PNG …` writes every case's
/// reference image (two ControlNets, image-to-image, the guidance window included).
#[test]
fn cli_cases_match_diffusers() {
    let json = controlnet_json();
    let dir = std::env::temp_dir().join(format!("hypergen-cli-controlnet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for name in case_names(&json) {
        let c = &json["cases"][&name];
        let req = request(&json, &name);
        let out = dir.join(format!("{name}.png"));
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_hypergen"));
        cmd.args(["generate", "--model"])
            .arg(fixture_dir())
            .args(["--prompt", &req.prompt])
            .args(["--steps", &req.num_inference_steps.to_string()])
            .args(["--guidance", &req.guidance_scale.to_string()])
            .args(["--width", &req.width.to_string()])
            .args(["--height", &req.height.to_string()])
            .args(["--seed", &req.seed.to_string()])
            .args(["--device", "cpu", "--dtype", "float32", "--out"])
            .arg(&out);
        for (k, control) in req.controlnets.iter().enumerate() {
            let image = c["control_images"][k].as_str().expect("image");
            cmd.arg("--controlnet")
                .arg(format!(
                    "{}:{}",
                    fixture_dir().join(&control.model).display(),
                    control.scale
                ))
                .arg("--control-image")
                .arg(case_path(image));
        }
        let first = &req.controlnets[0];
        cmd.args([
            "--control-guidance-start",
            &first.guidance_start.to_string(),
            "--control-guidance-end",
            &first.guidance_end.to_string(),
        ]);
        match &req.init_image {
            Some(init) => {
                cmd.arg("--image")
                    .arg(case_path(c["image"].as_str().expect("image")))
                    .args(["--strength", &init.strength.to_string()]);
            }
            None => {
                cmd.arg("--latents")
                    .arg(reference_dir().join("init_latents.safetensors"));
            }
        }
        let status = cmd.status().expect("run hypergen");
        assert!(
            status.success(),
            "{name}: hypergen generate failed: {status}"
        );
        let png = image::open(&out).expect("output png").to_rgb8();
        assert_image_close(
            &format!("cli {name}"),
            png.as_raw(),
            &controlnet_tensor(&format!("{name}.image_u8")),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A control image count that does not match the ControlNets is refused before loading.
#[test]
fn cli_refuses_unpaired_control_images() {
    let json = controlnet_json();
    let net = controlnet_names(&json).remove(0);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hypergen"))
        .args(["generate", "--model"])
        .arg(fixture_dir())
        .args(["--prompt", "x", "--device", "cpu", "--controlnet"])
        .arg(fixture_dir().join(net))
        .output()
        .expect("run hypergen");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--control-image"), "{err}");
}

/// The share of pixels where two edge maps agree (edge or not).
fn agreement(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len(), "map sizes");
    let same = (a.chunks_exact(3).zip(b.chunks_exact(3)))
        .filter(|(p, q)| (p[0] > 127) == (q[0] > 127))
        .count();
    same as f64 / (a.len() / 3) as f64
}

/// Each OpenCV canny map of the fixture (`canny_of_*.png`, its thresholds read from its
/// `made_by`) against ours of the same source: at least 98 % of pixels agree.
#[test]
fn canny_agrees_with_opencv() {
    let json = controlnet_json();
    let inputs = json["inputs"].as_object().expect("inputs");
    let mut checked = 0;
    for (name, info) in inputs.iter().filter(|(k, _)| k.starts_with("canny_of_")) {
        let made_by = info["made_by"].as_str().expect("made_by");
        // "cv2.Canny(..., LOW, HIGH), OpenCV …[, of SOURCE]"
        let args = &made_by[..made_by.rfind("),").expect("cv2.Canny call")];
        let mut nums = args.rsplit(',').map(|s| s.trim().parse::<f64>());
        let high = nums.next().and_then(Result::ok).expect("high");
        let low = nums.next().and_then(Result::ok).expect("low");
        let source = match made_by.rsplit_once(" of ") {
            Some((_, src)) => case_path(src.trim()),
            None => controlnet_dir().join(name.trim_start_matches("canny_of_")),
        };
        let ours = hypergen::pipeline::canny(&open(&source), low, high).expect("canny");
        let want = open(&controlnet_dir().join(name));
        let agree = agreement(&ours.rgb, &want.rgb);
        eprintln!("{name}: {:.4} of pixels agree with OpenCV", agree);
        assert!(agree >= 0.98, "{name}: {agree:.4} agreement");
        checked += 1;
    }
    assert!(checked >= 2, "both canny maps checked");
}

/// `hypergen preprocess canny IN --low L --high H --out OUT` writes our map.
#[test]
fn cli_preprocess_canny() {
    let source = controlnet_dir().join("canny_source.png");
    let out = std::env::temp_dir().join(format!("hypergen-canny-{}.png", std::process::id()));
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_hypergen"))
        .args(["preprocess", "canny"])
        .arg(&source)
        .args(["--low", "100", "--high", "200", "--out"])
        .arg(&out)
        .status()
        .expect("run hypergen");
    assert!(status.success());
    let written = open(&out);
    let ours = hypergen::pipeline::canny(&open(&source), 100.0, 200.0).expect("canny");
    assert_eq!(written, ours);
    let _ = std::fs::remove_file(&out);
}

/// Bad ControlNet input is refused with the field named, before any work: an unknown
/// model, a non-finite scale, an empty guidance window, a batch mixing ControlNet
/// settings.
#[test]
fn bad_input_is_refused_by_name() {
    let pipe = pipeline::<crate::common::Cpu>(&Default::default());
    let json = controlnet_json();
    let name = case_names(&json).remove(0);
    let base = request(&json, &name);
    let check = |reqs: &[GenerationRequest], field: &str| match pipe.check_inputs(reqs) {
        Err(hypergen::Error::InvalidArgument { name, .. }) => assert_eq!(name, field),
        other => panic!("{field}: expected InvalidArgument, got {other:?}"),
    };
    let with = |f: &dyn Fn(&mut ControlNetInput)| {
        let mut r = base.clone();
        f(&mut r.controlnets[0]);
        r
    };
    check(
        &[with(&|c| c.model = "nothing-loaded".into())],
        "controlnets.model",
    );
    check(&[with(&|c| c.scale = f64::NAN)], "controlnets.scale");
    check(
        &[with(&|c| {
            c.guidance_start = 0.6;
            c.guidance_end = 0.5;
        })],
        "controlnets.guidance_start",
    );
    check(&[base.clone(), with(&|c| c.scale = 0.25)], "batch");
    pipe.check_inputs(&[base.clone(), base])
        .expect("same ControlNets batch");
}

/// A ControlNet whose widths do not fit the UNet is refused, naming its tensor.
#[test]
fn misfit_controlnet_names_its_tensor() {
    use hypergen::model::controlnet::ControlNetConfig;
    type B = crate::common::Cpu;
    let device = Default::default();
    let pipe = fixture_pipeline::<B>(DType::F32, &device);
    let json = controlnet_json();
    let folder = fixture_dir().join(&controlnet_names(&json)[0]);
    let text = std::fs::read_to_string(folder.join("config.json")).expect("config");
    let mut config: serde_json::Value = serde_json::from_str(&text).expect("json");
    // Widths of another UNet: the last level narrower than the fixture's.
    let widths = config["block_out_channels"]
        .as_array()
        .expect("widths")
        .clone();
    let last = widths.len() - 1;
    config["block_out_channels"][last] = widths[last - 1].clone();
    let config: ControlNetConfig = serde_json::from_value(config).expect("config parses");
    let model = config.init::<B>(&device).expect("builds");
    let misfit = model
        .check_fits(&pipe.components().unet)
        .expect_err("does not fit");
    eprintln!("{}: {}", misfit.tensor, misfit.message);
    assert!(
        misfit.tensor.starts_with("controlnet_down_blocks."),
        "{misfit:?}"
    );

    // Through the loader, the weights of the fixture's ControlNet under that config
    // fail on the first tensor of another shape, named with its file.
    let dir = std::env::temp_dir().join(format!("hypergen-misfit-cn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut cfg: serde_json::Value = serde_json::from_str(&text).expect("json");
    cfg["block_out_channels"][last] = widths[last - 1].clone();
    std::fs::write(dir.join("config.json"), cfg.to_string()).expect("write config");
    #[cfg(unix)]
    std::os::unix::fs::symlink(
        folder.join("diffusion_pytorch_model.safetensors"),
        dir.join("diffusion_pytorch_model.safetensors"),
    )
    .expect("link weights");
    #[cfg(unix)]
    match hypergen::load::controlnet::load_controlnet::<B>(
        &dir,
        &pipe.components().unet,
        DType::F32,
        &device,
    ) {
        Err(hypergen::Error::Tensor { tensor, .. }) => assert!(!tensor.is_empty()),
        other => panic!("expected a named tensor, got {:?}", other.err()),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `POST /v1/images/generations` with `controlnets` (base64 and data-URL images, two
/// ControlNets named in `--controlnet-dir`) gives the library's image for the same
/// request; `GET /v1/controlnets` lists the directory; bad ControlNet input is a 400
/// naming `controlnets`, and the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_matches_library_and_refuses_bad_input() {
    use base64::Engine as _;
    use serde_json::json;
    let json = controlnet_json();
    let name = case_names(&json)
        .into_iter()
        .find(|n| json["cases"][n]["controlnets"].as_array().map(Vec::len) > Some(1))
        .expect("a case with several ControlNets");
    let mut req = request(&json, &name);
    req.latents = None;
    req.seed = 1234;
    let folders: Vec<PathBuf> = (req.controlnets.iter())
        .map(|c| fixture_dir().join(&c.model))
        .collect();
    let dir = folders[0]
        .parent()
        .expect("the ControlNets' folder")
        .to_path_buf();

    let mut config = crate::common::fixture_server_config();
    config.controlnet_dir = Some(dir.clone());
    let server = crate::common::start_server(config).await;
    let base = server.url();
    let client = reqwest::Client::new();

    let list: serde_json::Value = client
        .get(format!("{base}/v1/controlnets"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(list["enabled"], true, "{list}");
    let ids: Vec<&str> = (list["data"].as_array().expect("data").iter())
        .map(|e| e["id"].as_str().expect("id"))
        .collect();
    for folder in &folders {
        let id = folder.file_name().and_then(|n| n.to_str()).expect("name");
        assert!(ids.contains(&id), "{id} listed in {list}");
    }

    let controlnets: Vec<serde_json::Value> = (req.controlnets.iter().zip(&folders))
        .enumerate()
        .map(|(k, (c, folder))| {
            let png = c.image.to_png().expect("png");
            let b64 = base64::engine::general_purpose::STANDARD.encode(png);
            // One plain base64, one data URL.
            let image = if k == 0 {
                b64
            } else {
                format!("data:image/png;base64,{b64}")
            };
            json!({
                "model": folder.file_name().and_then(|n| n.to_str()).expect("name"),
                "image": image,
                "scale": c.scale,
                "guidance_start": c.guidance_start,
                "guidance_end": c.guidance_end,
            })
        })
        .collect();
    let body = |controlnets: serde_json::Value| {
        json!({
            "prompt": req.prompt,
            "size": format!("{}x{}", req.width, req.height),
            "num_inference_steps": req.num_inference_steps,
            "guidance_scale": req.guidance_scale,
            "seed": req.seed,
            "controlnets": controlnets,
        })
    };
    let post = |b: serde_json::Value| {
        let client = client.clone();
        let url = format!("{base}/v1/images/generations");
        async move { client.post(url).json(&b).send().await.expect("post") }
    };

    let refused = |mut bad: serde_json::Value, what: &'static str| {
        let b = {
            let mut b = body(json!([]));
            b["controlnets"] = json!([bad.take()]);
            b
        };
        async move {
            let resp = post(b).await;
            let status = resp.status();
            let v: serde_json::Value = resp.json().await.expect("json");
            assert_eq!(status, 400, "{what}: {v}");
            assert_eq!(v["error"]["param"], "controlnets", "{what}: {v}");
        }
    };
    let good = controlnets[0].clone();
    let with = |key: &str, value: serde_json::Value| {
        let mut c = good.clone();
        c[key] = value;
        c
    };
    refused(with("model", json!("no-such-controlnet")), "unknown model").await;
    refused(
        with("model", json!("../tiny-sdxl")),
        "outside the directory",
    )
    .await;
    refused(
        with("image", json!("not base64 at all!")),
        "undecodable image",
    )
    .await;
    refused(
        with(
            "image",
            json!(base64::engine::general_purpose::STANDARD.encode(b"not an image")),
        ),
        "not an image",
    )
    .await;
    refused(with("scale", json!(3.0)), "scale out of range").await;
    refused(
        {
            let mut c = with("guidance_start", json!(0.7));
            c["guidance_end"] = json!(0.2);
            c
        },
        "empty guidance window",
    )
    .await;
    refused(with("preprocess", json!("depth")), "unknown preprocessor").await;

    let (_, rgb) = crate::common::image_of(post(body(json!(controlnets))).await).await;
    let pipe = pipeline::<crate::common::Cpu>(&Default::default());
    let out = pipe.generate(&req, &mut no_progress).expect("library run");
    let want = RefTensor {
        shape: vec![req.height, req.width, 3],
        data: out.images[0].rgb.iter().map(|&v| v as f32).collect(),
    };
    assert_image_close("http vs library", &rgb, &want);
}

/// `POST /v1/images/edits` with `controlnets` (JSON text in the form) gives diffusers'
/// image of the image-to-image ControlNet case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_edit_matches_diffusers() {
    use base64::Engine as _;
    let json = controlnet_json();
    let name = case_names(&json)
        .into_iter()
        .find(|n| json["cases"][n].get("image").is_some())
        .expect("an image-to-image case");
    let c = &json["cases"][&name];
    let req = request(&json, &name);
    let init = req.init_image.as_ref().expect("init image");
    let folder = fixture_dir().join(&req.controlnets[0].model);
    let mut config = crate::common::fixture_server_config();
    config.controlnet_dir = Some(folder.parent().expect("folder").to_path_buf());
    let server = crate::common::start_server(config).await;
    let controlnets: Vec<serde_json::Value> = (req.controlnets.iter())
        .map(|cn| {
            let png = cn.image.to_png().expect("png");
            serde_json::json!({
                "model": fixture_dir().join(&cn.model).file_name().and_then(|n| n.to_str()),
                "image": base64::engine::general_purpose::STANDARD.encode(png),
                "scale": cn.scale,
                "guidance_start": cn.guidance_start,
                "guidance_end": cn.guidance_end,
            })
        })
        .collect();
    let image = std::fs::read(case_path(c["image"].as_str().expect("image"))).expect("image");
    let text = |v: String| v.into_bytes();
    let (ct, body) = crate::parity::edits::multipart(&[
        ("image", Some("image.png"), image),
        ("prompt", None, text(req.prompt.clone())),
        ("size", None, text(format!("{}x{}", req.width, req.height))),
        ("strength", None, text(init.strength.to_string())),
        ("seed", None, text(req.seed.to_string())),
        (
            "num_inference_steps",
            None,
            text(req.num_inference_steps.to_string()),
        ),
        ("guidance_scale", None, text(req.guidance_scale.to_string())),
        (
            "controlnets",
            None,
            text(serde_json::Value::from(controlnets).to_string()),
        ),
    ]);
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/images/edits", server.url()))
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .expect("post");
    let (_, rgb) = crate::common::image_of(resp).await;
    assert_image_close(
        &format!("http edit {name}"),
        &rgb,
        &controlnet_tensor(&format!("{name}.image_u8")),
    );
}

/// A ControlNet in `--controlnet-dir` whose widths do not fit the UNet: a 400 naming
/// `controlnets` and the tensor, without the server's paths; the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_refuses_a_misfit_controlnet() {
    let json = controlnet_json();
    let folder = fixture_dir().join(&controlnet_names(&json)[0]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let misfit = tmp.path().join("misfit");
    std::fs::create_dir_all(&misfit).expect("mkdir");
    let text = std::fs::read_to_string(folder.join("config.json")).expect("config");
    let mut cfg: serde_json::Value = serde_json::from_str(&text).expect("json");
    let widths = cfg["block_out_channels"]
        .as_array()
        .expect("widths")
        .clone();
    let last = widths.len() - 1;
    cfg["block_out_channels"][last] = widths[last - 1].clone();
    std::fs::write(misfit.join("config.json"), cfg.to_string()).expect("config");
    // A copy in the test's own temporary directory (a symlink would lead outside it).
    std::fs::copy(
        folder.join("diffusion_pytorch_model.safetensors"),
        misfit.join("diffusion_pytorch_model.safetensors"),
    )
    .expect("copy weights");
    let mut config = crate::common::fixture_server_config();
    config.controlnet_dir = Some(tmp.path().to_path_buf());
    let server = crate::common::start_server(config).await;
    let png = Image {
        width: 8,
        height: 8,
        rgb: vec![0; 192],
    }
    .to_png()
    .expect("png");
    let b64 = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(png)
    };
    let body = serde_json::json!({
        "prompt": "a cat",
        "size": "64x64",
        "num_inference_steps": 1,
        "controlnets": [{"model": "misfit", "image": b64}],
    });
    let url = format!("{}/v1/images/generations", server.url());
    let client = reqwest::Client::new();
    let resp = client.post(&url).json(&body).send().await.expect("post");
    let status = resp.status();
    let v: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "controlnets", "{v}");
    let message = v["error"]["message"].as_str().expect("message");
    assert!(message.contains("weight"), "names the tensor: {message}");
    let root = tmp
        .path()
        .canonicalize()
        .expect("root")
        .display()
        .to_string();
    assert!(!message.contains(&root), "no server path: {message}");
    // Still serving.
    let mut plain = body.clone();
    plain.as_object_mut().expect("object").remove("controlnets");
    let resp = client.post(&url).json(&plain).send().await.expect("post");
    assert_eq!(resp.status(), 200);
}

/// A single `.safetensors` file without a `config.json` beside it: its layout comes from
/// the UNet's config and the file's tensors (the depth ControlNet has fewer transformer
/// layers than the UNet), and it loads strictly.
#[test]
#[cfg(unix)]
fn single_file_without_config() {
    use hypergen::load::controlnet::load_controlnet;
    use hypergen::model::controlnet::ControlNetConfig;
    type B = crate::common::Cpu;
    let device = Default::default();
    let pipe = fixture_pipeline::<B>(DType::F32, &device);
    let tmp = tempfile::tempdir().expect("tempdir");
    for name in controlnet_names(&controlnet_json()) {
        let folder = fixture_dir().join(&name);
        let file = tmp.path().join(format!(
            "{}.safetensors",
            folder.file_name().and_then(|n| n.to_str()).expect("name")
        ));
        std::os::unix::fs::symlink(folder.join("diffusion_pytorch_model.safetensors"), &file)
            .expect("link");
        let model = load_controlnet::<B>(&file, &pipe.components().unet, DType::F32, &device)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let text = std::fs::read_to_string(folder.join("config.json")).expect("config");
        let want: ControlNetConfig = serde_json::from_str(&text).expect("config parses");
        let got = model.config();
        assert_eq!(
            got.encoder.transformer_layers_per_block.expand(3),
            want.encoder.transformer_layers_per_block.expand(3),
            "{name}"
        );
        assert_eq!(
            got.conditioning_embedding_out_channels, want.conditioning_embedding_out_channels,
            "{name}"
        );
    }
}

/// ControlNet inpainting and ControlNet with another sampler, against
/// `tests/references/controlnet_extra/` (diffusers 0.42.1 from this fixture:
/// `scripts/references/controlnet_extra.py`). The references hold the SHA-256 of every
/// fixture file they were computed from; another fixture fails here with the command
/// that recomputes them.
#[test]
fn controlnet_extra_cpu() {
    use hypergen::pipeline::Mask;
    use hypergen::scheduler::SamplerSettings;
    use sha2::{Digest, Sha256};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/references/controlnet_extra");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).expect("cases.json"))
            .expect("cases.json parses");
    let fixture = fixture_dir();
    for (file, want) in meta["fixture_sha256"].as_object().expect("fingerprint") {
        let got = format!(
            "{:x}",
            Sha256::digest(std::fs::read(fixture.join(file)).expect(file))
        );
        assert_eq!(
            Some(got.as_str()),
            want.as_str(),
            "{file} differs from the fixture the references in {} were computed from: \
             recompute them with scripts/references/controlnet_extra.py",
            dir.display()
        );
    }
    let bytes = std::fs::read(dir.join("references.safetensors")).expect("references");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("references parse");
    let reference = |name: &str| crate::common::ref_tensor_of(&st.tensor(name).expect(name));
    let device = Default::default();
    let mut pipe = fixture_pipeline::<crate::common::Cpu>(DType::F32, &device);
    let cases = meta["cases"].as_object().expect("cases");
    assert!(cases.len() >= 2);
    for (name, c) in cases {
        let net = c["controlnet"].as_str().expect("controlnet");
        if !pipe.components().controlnets.contains_key(net) {
            add_controlnet(pipe.components_mut(), net, &fixture.join(net), &device)
                .expect("ControlNet loads");
        }
        let want_image = reference(&format!("{name}.image_u8"));
        let cli: Vec<&str> = (c["cli"].as_array().expect("cli").iter())
            .map(|v| v.as_str().expect("option"))
            .collect();
        let flag = |f: &str| cli.iter().position(|o| *o == f).map(|i| cli[i + 1]);
        let file = |key: &str| {
            c[key]
                .as_str()
                .map(|s| fixture.join(s.split_whitespace().next().expect("a file")))
        };
        let mut control =
            ControlNetInput::new(net, open(&file("control_image").expect("control image")));
        control.scale = c["scale"].as_f64().expect("scale");
        control.guidance_end = c["guidance_end"].as_f64().expect("end");
        control.guess_mode = c["guess_mode"].as_bool().expect("guess_mode");
        let req = GenerationRequest {
            prompt: meta["prompt"].as_str().expect("prompt").into(),
            num_inference_steps: c["num_inference_steps"].as_u64().expect("steps") as usize,
            guidance_scale: c["guidance_scale"].as_f64().expect("guidance"),
            height: want_image.shape[0],
            width: want_image.shape[1],
            seed: seed_of(c["generator"].as_str().expect("generator")),
            sampler: SamplerSettings {
                kind: flag("--scheduler").map(|s| s.parse().expect("scheduler")),
                ..Default::default()
            },
            init_image: file("image").map(|image| InitImage {
                image: open(&image),
                mask: file("mask").map(|m| Mask::from_dynamic(&image::open(m).expect("mask"))),
                strength: c["strength"].as_f64().expect("strength"),
            }),
            controlnets: vec![control],
            ..Default::default()
        };
        let out = pipe
            .generate(&req, &mut no_progress)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = reference(&format!("{name}.latents"));
        assert_eq!(out.latents.dims().to_vec(), want.shape, "{name}: shape");
        let err = rel_error(&values(out.latents), &want.data);
        eprintln!("{name} latents: relative error {err:.3e}");
        assert!(err <= TOL_F32, "{name}: latents relative error {err:.3e}");
        assert_image_close(name, &out.images[0].rgb, &want_image);
    }
}
