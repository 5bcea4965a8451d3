//! The built-in random-weight models: deterministic, non-constant images from a seed
//! with no files or network, the embedded CLIP tokenizer, and the full-size presets'
//! shapes.

use std::ops::ControlFlow;

use burn::tensor::DType;
use hypergen::load::builtin;
use hypergen::load::{load_components, load_pipeline};
use hypergen::pipeline::{GenerationRequest, Progress, SdxlPipeline};

use crate::common::{fixture_dir, Cpu};

fn request(prompt: &str, seed: u64) -> GenerationRequest {
    GenerationRequest {
        prompt: prompt.into(),
        num_inference_steps: 2,
        guidance_scale: 5.0,
        width: 64,
        height: 64,
        seed,
        ..Default::default()
    }
}

fn rgb(pipe: &SdxlPipeline<Cpu>, req: &GenerationRequest) -> Vec<u8> {
    let mut none = |_: Progress| ControlFlow::Continue(());
    let out = pipe.generate(req, &mut none).expect("generate");
    assert_eq!(
        (out.images[0].width, out.images[0].height),
        (req.width, req.height)
    );
    out.images.into_iter().next().expect("one image").rgb
}

fn std_dev(v: &[u8]) -> f64 {
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
}

fn tiny(dtype: DType) -> SdxlPipeline<Cpu> {
    load_pipeline::<Cpu>(
        "tiny-sdxl-random",
        dtype,
        &Default::default(),
        &Default::default(),
        &Default::default(),
    )
    .expect("built-in model builds")
}

#[test]
fn builtin_names() {
    assert_eq!(
        builtin::names(),
        [
            "tiny-sdxl-random",
            "sdxl-base-1.0-random",
            "sdxl-turbo-random",
            "sdxl-lightning-random"
        ]
    );
    let e = builtin::get("tiny-sdxl")
        .err()
        .expect("unknown name refused")
        .to_string();
    assert!(e.contains("tiny-sdxl-random"), "{e}");
}

/// Same seed, same image, across separately built models; other seeds and prompts
/// change it; the image is not flat.
#[test]
fn builtin_tiny_is_deterministic_and_not_constant() {
    let (a, b) = (tiny(DType::F32), tiny(DType::F32));
    let img = rgb(
        &a,
        &request("a photo of an astronaut riding a horse on mars", 1),
    );
    assert_eq!(
        img,
        rgb(
            &b,
            &request("a photo of an astronaut riding a horse on mars", 1)
        )
    );
    let spread = std_dev(&img);
    eprintln!("tiny-sdxl-random image: standard deviation {spread:.1}/255");
    assert!(spread > 5.0, "image is nearly constant ({spread})");
    assert_ne!(
        img,
        rgb(
            &a,
            &request("a photo of an astronaut riding a horse on mars", 2)
        )
    );
    assert_ne!(img, rgb(&a, &request("a watercolour of a lighthouse", 1)));
}

/// The CPU backend runs float16 and bfloat16: finite, close to float32.
#[test]
fn builtin_tiny_in_half_precision_on_cpu() {
    let req = request("a photo of an astronaut riding a horse on mars", 3);
    let full = rgb(&tiny(DType::F32), &req);
    for dtype in [DType::F16, DType::BF16] {
        let pipe = tiny(dtype);
        // The weights really are half precision; the VAE is upcast (`force_upcast`).
        assert_eq!(pipe.components().unet.dtype(), dtype);
        assert_eq!(pipe.components().vae.dtype(), DType::F32);
        let half = rgb(&pipe, &req);
        let mean_diff = full
            .iter()
            .zip(&half)
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .sum::<f64>()
            / full.len() as f64;
        eprintln!("tiny-sdxl-random {dtype:?} vs F32: mean channel difference {mean_diff:.2}/255");
        assert!(std_dev(&half) > 5.0, "{dtype:?}: flat image");
        assert!(
            mean_diff < 8.0,
            "{dtype:?}: differs from float32 by {mean_diff:.2}/255 on average"
        );
    }
}

/// `load_components` labels built-in models as random weights.
#[test]
fn builtin_through_load_components() {
    let c = load_components::<Cpu>(
        "tiny-sdxl-random",
        DType::F32,
        &Default::default(),
        &Default::default(),
    )
    .expect("built-in loads");
    let info = c.info;
    assert_eq!(info.id, "tiny-sdxl-random");
    assert!(info.random_weights);
    assert_eq!(info.local_dir, None);
}

/// The full-size presets have SDXL's parameter counts (counted without allocating).
#[test]
fn builtin_full_size_presets_have_sdxl_shapes() {
    for name in [
        "sdxl-base-1.0-random",
        "sdxl-turbo-random",
        "sdxl-lightning-random",
    ] {
        let counts = builtin::find(name)
            .expect("preset")
            .parameter_counts::<Cpu>(&Default::default())
            .expect("configs build");
        assert_eq!(
            counts,
            [
                ("text_encoder", 123_060_480),
                ("text_encoder_2", 694_659_840),
                ("unet", 2_567_463_684),
                ("vae", 83_653_863),
            ],
            "{name}"
        );
    }
}

/// The embedded CLIP files give the fixture tokenizers' ids for every reference case.
#[test]
fn builtin_tokenizers_match_the_reference() {
    let (t1, t2) = builtin::clip_tokenizers().expect("embedded tokenizers");
    let f1 = hypergen::model::tokenizer::ClipTokenizer::from_dir(&fixture_dir().join("tokenizer"))
        .expect("fixture");
    for case in crate::parity::tokenizer::cases() {
        assert_eq!(
            t1.encode(&case.prompt).expect("encodes").ids,
            case.tokenizer,
            "{:?}",
            case.prompt
        );
        assert_eq!(
            t2.encode(&case.prompt).expect("encodes").ids,
            case.tokenizer_2,
            "{:?}",
            case.prompt
        );
        assert_eq!(
            t1.encode(&case.prompt).expect("encodes"),
            f1.encode(&case.prompt).expect("encodes"),
            "{:?}",
            case.prompt
        );
    }
    use hypergen::model::tokenizer::ClipTokenizer;
    let e = ClipTokenizer::from_memory("{}", "#version: 0.2\na b c\n", "!", 77)
        .expect_err("bad merges");
    assert!(e.to_string().contains("merges.txt line 1"), "{e}");
    let e = ClipTokenizer::from_memory("[1]", "", "!", 77).expect_err("bad vocab");
    assert!(e.to_string().contains("vocab.json"), "{e}");
}

/// The README's offline example: no files, no network.
#[test]
fn cli_generate_builtin_offline() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("tiny.png");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_hypergen"))
        .args([
            "generate",
            "--model",
            "tiny-sdxl-random",
            "--prompt",
            "a lighthouse at dusk",
        ])
        .args([
            "--steps", "2", "--width", "64", "--height", "64", "--device", "cpu", "--out",
        ])
        .arg(&out)
        .current_dir(tmp.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HOME", tmp.path().join("hf"))
        .output()
        .expect("run hypergen");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let png = image::open(&out).expect("PNG written").to_rgb8();
    assert_eq!(png.dimensions(), (64, 64));
    assert!(std_dev(png.as_raw()) > 5.0);
    assert!(!tmp.path().join("hf").exists(), "the Hub cache was touched");
}

/// `hypergen serve tiny-sdxl-random` serves at once, with no files, and `/v1/models`
/// says the weights are random.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_builtin_labels_random_weights() {
    use hypergen::app::server::ServerConfig;
    use hypergen::device::DeviceSpec;

    let mut config = ServerConfig::new("tiny-sdxl-random", DeviceSpec::Cpu);
    config.worker.dtype = hypergen::device::DTypeChoice::Exact(DType::F32);
    let server = crate::common::start_server(config).await;
    let client = reqwest::Client::new();
    let models: serde_json::Value = client
        .get(format!("{}/v1/models", server.url()))
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    assert_eq!(models["data"][0]["id"], "tiny-sdxl-random");
    assert_eq!(models["data"][0]["random_weights"], true);
    let image: serde_json::Value = client
        .post(format!("{}/v1/images/generations", server.url()))
        .json(&serde_json::json!({"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 2, "seed": 1}))
        .send()
        .await
        .expect("generation")
        .json()
        .await
        .expect("json");
    assert!(
        image["data"][0]["b64_json"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{image}"
    );
    server.shutdown().await.expect("shutdown");
}
