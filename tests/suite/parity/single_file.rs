//! Single-file checkpoints in the original SGM layout: the fixture's
//! `single_file/model.safetensors`, read with `--config` pointing at a copy of the
//! fixture's JSON and tokenizer files only, gives diffusers' `pipe.cfg5.euler4`.

use std::ops::ControlFlow;
use std::path::Path;

use burn::tensor::DType;
use hypergen::load::{load_pipeline, LoadOptions};
use hypergen::pipeline::Progress;
use hypergen::FusedOps;

use crate::common::{assert_matches, fixture_dir, reference, TOL_F32};

/// Copies every `.json`, `.txt` and tokenizer file of the fixture (never weights) into
/// `dst`, keeping the layout.
pub fn copy_configs(src: &Path, dst: &Path) {
    for entry in std::fs::read_dir(src).expect("read fixture dir") {
        let entry = entry.expect("entry");
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() {
            let n = name.to_string_lossy();
            if n == "reference" || n == "loras" || n == "single_file" {
                continue;
            }
            let sub = dst.join(&name);
            std::fs::create_dir_all(&sub).expect("mkdir");
            copy_configs(&path, &sub);
        } else {
            let n = name.to_string_lossy();
            if n.ends_with(".json") || n.ends_with(".txt") {
                std::fs::copy(&path, dst.join(&name)).expect("copy");
            }
        }
    }
}

fn single_file_cfg5_euler4<B: FusedOps>(device: &B::Device) {
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_configs(&fixture_dir(), tmp.path());
    let file = fixture_dir().join("single_file").join("model.safetensors");
    let options = LoadOptions {
        config: Some(tmp.path().to_path_buf()),
        ..Default::default()
    };
    let pipe = load_pipeline::<B>(
        &file.display().to_string(),
        DType::F32,
        &options,
        &Default::default(),
        device,
    )
    .expect("single-file checkpoint loads");
    let init = reference("pipe.init_latents");
    let [n, _, h, w] = <[usize; 4]>::try_from(init.shape.clone()).expect("rank 4");
    let json = crate::parity::lora::extras_json();
    let request = hypergen::pipeline::GenerationRequest {
        prompt: json["prompt"].as_str().expect("prompt").into(),
        num_inference_steps: 4,
        guidance_scale: 5.0,
        width: w * 8,
        height: h * 8,
        num_images: n,
        latents: Some(init.data),
        ..Default::default()
    };
    let out = pipe
        .generate(&request, &mut |_: Progress| ControlFlow::Continue(()))
        .expect("generate");
    assert_matches(
        "single-file cfg5 euler4 latents",
        out.latents,
        "pipe.cfg5.euler4.latents",
        TOL_F32,
    );
    crate::common::assert_image_close(
        "single-file cfg5 euler4 image",
        &out.images[0].rgb,
        &reference("pipe.cfg5.euler4.image_u8"),
    );
}
crate::on_backends!(single_file_pipeline, single_file_cfg5_euler4);

/// Without `--config`, a checkpoint whose shapes are not SDXL base's is refused with the
/// first mismatching tensor named and `--config` suggested.
#[test]
fn single_file_without_config_names_mismatch() {
    let file = fixture_dir().join("single_file").join("model.safetensors");
    let err = match load_pipeline::<crate::common::Cpu>(
        &file.display().to_string(),
        DType::F32,
        &LoadOptions::default(),
        &Default::default(),
        &Default::default(),
    ) {
        Ok(_) => panic!("the fixture is not SDXL base's size"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("--config"), "{err}");
    assert!(err.contains("shape"), "{err}");
}

/// `hypergen generate --model model.safetensors --config DIR` writes the reference image.
#[test]
fn single_file_cli_generate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let configs = tmp.path().join("configs");
    std::fs::create_dir_all(&configs).expect("mkdir");
    copy_configs(&fixture_dir(), &configs);
    let out = tmp.path().join("x.png");
    let init = reference("pipe.init_latents");
    let json = crate::parity::lora::extras_json();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_hypergen"))
        .args(["generate", "--model"])
        .arg(fixture_dir().join("single_file").join("model.safetensors"))
        .arg("--config")
        .arg(&configs)
        .args(["--prompt", json["prompt"].as_str().expect("prompt")])
        .args(["--steps", "4", "--guidance", "5"])
        .args(["--width", &(init.shape[3] * 8).to_string()])
        .args(["--height", &(init.shape[2] * 8).to_string()])
        .arg("--latents")
        .arg(crate::common::reference_dir().join("init_latents.safetensors"))
        .args(["--device", "cpu", "--dtype", "float32", "--out"])
        .arg(&out)
        .status()
        .expect("run hypergen");
    assert!(status.success(), "hypergen generate failed: {status}");
    let png = image::open(&out).expect("PNG written").to_rgb8();
    crate::common::assert_image_close(
        "single-file cli",
        png.as_raw(),
        &reference("pipe.cfg5.euler4.image_u8"),
    );
}

/// A 64×64, 2-step image of `model` loaded with `options`.
fn small_image(model: &Path, options: &LoadOptions) -> Vec<u8> {
    let pipe = load_pipeline::<crate::common::Cpu>(
        &model.display().to_string(),
        DType::F32,
        options,
        &Default::default(),
        &Default::default(),
    )
    .expect("loads");
    let request = hypergen::pipeline::GenerationRequest {
        prompt: "a lighthouse".into(),
        num_inference_steps: 2,
        width: 64,
        height: 64,
        seed: 3,
        ..Default::default()
    };
    pipe.generate(&request, &mut |_: Progress| ControlFlow::Continue(()))
        .expect("generate")
        .images[0]
        .rgb
        .clone()
}

/// `--vae DIR` replaces a single-file checkpoint's VAE, as it does a folder's: with a
/// VAE whose scaling factor differs, the single file and the folder give the same image,
/// unlike the single file without it.
#[test]
fn single_file_with_vae_folder() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let configs = tmp.path().join("configs");
    std::fs::create_dir_all(&configs).expect("mkdir");
    copy_configs(&fixture_dir(), &configs);
    let vae = tmp.path().join("vae");
    std::fs::create_dir_all(&vae).expect("mkdir");
    let src = fixture_dir().join("vae");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).expect("read"))
            .expect("json");
    config["scaling_factor"] = serde_json::json!(0.2);
    std::fs::write(vae.join("config.json"), config.to_string()).expect("write");
    std::fs::copy(
        src.join("diffusion_pytorch_model.safetensors"),
        vae.join("diffusion_pytorch_model.safetensors"),
    )
    .expect("copy");
    let file = fixture_dir().join("single_file").join("model.safetensors");
    let plain = LoadOptions {
        config: Some(configs.clone()),
        ..Default::default()
    };
    let with_vae = LoadOptions {
        vae: Some(vae.display().to_string()),
        ..plain.clone()
    };
    let single = small_image(&file, &with_vae);
    let folder = small_image(
        &fixture_dir(),
        &LoadOptions {
            vae: Some(vae.display().to_string()),
            ..Default::default()
        },
    );
    assert_eq!(single, folder, "single file + --vae = folder + --vae");
    assert_ne!(single, small_image(&file, &plain), "the VAE was replaced");
}
