//! Per-request LoRA adapters through `hypergen serve`'s HTTP API: `lora_path`,
//! `lora_scale` and `loras` give the images the library gives with the same adapters
//! merged (the library is checked against diffusers in `lora.rs`); requests without
//! adapters in between get the base model's image bit for bit; names are confined to
//! `--lora-dir`; bad adapters fail their request alone and change nothing.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::DType;
use hypergen::load::lora::{apply_loras, LoraAdapter, LoraSpec};
use hypergen::pipeline::{GenerationRequest, Progress};
use serde_json::{json, Value};

use crate::common::{fixture_dir, Cpu};
use crate::parity::lora::write_safetensors;
use crate::server::api::post_generation;

const PROMPT: &str = "a photo of an astronaut riding a horse on mars";
const SEED: u64 = 7;
const STEPS: usize = 3;
const SIZE: usize = 64;

fn request(extra: Value) -> Value {
    let mut body = json!({
        "prompt": PROMPT,
        "size": format!("{SIZE}x{SIZE}"),
        "num_inference_steps": STEPS,
        "guidance_scale": 5.0,
        "seed": SEED,
    });
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    body
}

/// The library's image for the same request with `adapters` merged.
fn library_image(adapters: &[(&Path, f32)]) -> Vec<u8> {
    let device = Default::default();
    let mut pipe = crate::common::fixture_pipeline::<Cpu>(DType::F32, &device);
    let list: Vec<LoraSpec<Arc<LoraAdapter>>> = adapters
        .iter()
        .map(|(p, s)| {
            let adapter = LoraAdapter::read(p).expect("fixture LoRA reads");
            LoraSpec::new(Arc::new(adapter), *s)
        })
        .collect();
    if !list.is_empty() {
        apply_loras(pipe.components_mut(), &list).expect("applies");
    }
    let req = GenerationRequest {
        prompt: PROMPT.into(),
        num_inference_steps: STEPS,
        guidance_scale: 5.0,
        width: SIZE,
        height: SIZE,
        seed: SEED,
        ..Default::default()
    };
    let out = pipe
        .generate(&req, &mut |_: Progress| std::ops::ControlFlow::Continue(()))
        .expect("generates");
    out.images[0].rgb.clone()
}

/// `GET /v1/loras`.
async fn list_loras(client: &reqwest::Client, base: &str) -> Value {
    client
        .get(format!("{base}/v1/loras"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json")
}

/// Asserts a 400 naming `param` whose message contains `needle`.
async fn assert_refused(resp: reqwest::Response, param: &str, needle: &str) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("json");
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], param, "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains(needle), "`{needle}` not in: {message}");
    assert!(
        !message.contains("/tmp") && !message.contains("/work"),
        "a server path leaked: {message}"
    );
}

fn assert_close(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: size");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    eprintln!("{what}: max channel difference {worst}/255");
    assert!(worst <= 1, "{what}: a channel differs by {worst}/255");
}

/// The LoRA directory of the test: copies of the fixture's adapters, broken adapters, and
/// ways out of it.
fn lora_dir(root: &Path) -> std::path::PathBuf {
    let fixture = fixture_dir();
    let dir = root.join("loras");
    std::fs::create_dir_all(dir.join("peft")).expect("mkdir");
    std::fs::create_dir_all(dir.join("styles")).expect("mkdir");
    std::fs::copy(
        fixture.join("loras/kohya-sgm.safetensors"),
        dir.join("styles/kohya.safetensors"),
    )
    .expect("copy");
    std::fs::copy(
        fixture.join("loras/diffusers-peft/pytorch_lora_weights.safetensors"),
        dir.join("peft/pytorch_lora_weights.safetensors"),
    )
    .expect("copy");
    // A LoRA outside the directory, reached by a symlink inside it and by `..`.
    std::fs::copy(
        fixture.join("loras/kohya-sgm.safetensors"),
        root.join("outside.safetensors"),
    )
    .expect("copy");
    std::os::unix::fs::symlink(
        root.join("outside.safetensors"),
        dir.join("escape.safetensors"),
    )
    .expect("symlink");
    std::fs::write(dir.join("pickled.ckpt"), b"never opened").expect("write");
    write_safetensors(
        &dir.join("not-a-lora.safetensors"),
        &[("model.weight", vec![2, 2], vec![0.0; 4])],
    );
    write_safetensors(
        &dir.join("unmatched.safetensors"),
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
    // SD 1.5-like shapes on a real layer name: the first attention's query.
    let params = {
        let device = Default::default();
        let pipe = crate::common::fixture_pipeline::<Cpu>(DType::F32, &device);
        hypergen::load::params::list_params(&pipe.components().unet)
    };
    let (path, info) = params
        .iter()
        .find(|(p, i)| {
            i.kind == hypergen::load::params::LayerKind::Linear && p.ends_with("attn1.to_q.weight")
        })
        .expect("an attention layer");
    let module = path.trim_end_matches(".weight");
    let (inp, out) = (info.shape[0] + 3, info.shape[1]);
    write_safetensors(
        &dir.join("wrong-shape.safetensors"),
        &[
            (
                &format!("unet.{module}.lora_A.weight"),
                vec![2, inp],
                vec![0.1; 2 * inp],
            ),
            (
                &format!("unet.{module}.lora_B.weight"),
                vec![out, 2],
                vec![0.1; 2 * out],
            ),
        ],
    );
    dir
}

/// Alternating adapters, confinement, bad adapters and the listing, on one server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_per_request_server() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = lora_dir(tmp.path());
    let fixture = fixture_dir();
    let kohya = fixture.join("loras/kohya-sgm.safetensors");
    let peft = fixture.join("loras/diffusers-peft/pytorch_lora_weights.safetensors");

    let mut config = crate::common::fixture_server_config();
    config.lora_dir = Some(dir.clone());
    let server = crate::common::start_server(config).await;
    let base = server.url();
    let client = reqwest::Client::new();

    // The listing: adapters by name, nothing that leads outside.
    let list = list_loras(&client, &base).await;
    assert_eq!(list["enabled"], true, "{list}");
    let names: Vec<&str> = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|e| e["id"].as_str().expect("id"))
        .collect();
    assert_eq!(
        names,
        [
            "not-a-lora.safetensors",
            "peft",
            "styles/kohya.safetensors",
            "unmatched.safetensors",
            "wrong-shape.safetensors"
        ],
        "{list}"
    );

    let (base_png, base_rgb) =
        crate::common::image_of(post_generation(&client, &base, &request(json!({}))).await).await;
    assert_close("no LoRA vs library", &base_rgb, &library_image(&[]));

    // kohya at 1.0 (the extension may be left off), then none, then kohya 0.6.
    let (_, rgb) = crate::common::image_of(
        post_generation(
            &client,
            &base,
            &request(json!({"lora_path": "styles/kohya"})),
        )
        .await,
    )
    .await;
    assert_close("kohya 1.0", &rgb, &library_image(&[(&kohya, 1.0)]));
    assert_ne!(rgb, base_rgb, "the adapter changes the image");

    let (png, _) =
        crate::common::image_of(post_generation(&client, &base, &request(json!({}))).await).await;
    assert_eq!(png, base_png, "base image after removal, bit for bit");

    let (_, rgb) = crate::common::image_of(
        post_generation(
            &client,
            &base,
            &request(json!({"lora_path": "styles/kohya.safetensors", "lora_scale": 0.6})),
        )
        .await,
    )
    .await;
    assert_close("kohya 0.6", &rgb, &library_image(&[(&kohya, 0.6)]));

    // A folder, then two adapters at once through `loras`.
    let (_, rgb) = crate::common::image_of(
        post_generation(&client, &base, &request(json!({"lora_path": "peft"}))).await,
    )
    .await;
    assert_close("peft 1.0", &rgb, &library_image(&[(&peft, 1.0)]));
    let (_, rgb) = crate::common::image_of(
        post_generation(
            &client,
            &base,
            &request(json!({"loras": [
                {"path": "styles/kohya.safetensors", "scale": 0.7},
                {"path": "peft", "scale": 0.5}
            ]})),
        )
        .await,
    )
    .await;
    assert_close(
        "kohya 0.7 + peft 0.5",
        &rgb,
        &library_image(&[(&kohya, 0.7), (&peft, 0.5)]),
    );

    // Confinement: nothing outside the directory is served.
    for (name, needle) in [
        ("../outside.safetensors", "`..` is not allowed"),
        ("/etc/passwd", "absolute paths are not allowed"),
        ("escape.safetensors", "leads outside the LoRA directory"),
        ("missing.safetensors", "no adapter `missing.safetensors`"),
        ("pickled.ckpt", "pickles"),
    ] {
        let resp = post_generation(&client, &base, &request(json!({"lora_path": name}))).await;
        assert_refused(resp, "lora_path", needle).await;
    }
    let resp = post_generation(
        &client,
        &base,
        &request(json!({"loras": [{"path": "../outside.safetensors"}]})),
    )
    .await;
    assert_refused(resp, "loras", "`..` is not allowed").await;
    let resp = post_generation(
        &client,
        &base,
        &request(json!({"loras": [{"path": "peft", "scale": 3}]})),
    )
    .await;
    assert_refused(resp, "loras", "between 0 and 2").await;
    let resp = post_generation(
        &client,
        &base,
        &request(json!({"lora_path": "peft", "lora_scale": -1})),
    )
    .await;
    assert_refused(resp, "lora_scale", "between 0 and 2").await;

    // Bad adapters fail their request alone; the model is unchanged after each.
    for (name, needle) in [
        ("not-a-lora.safetensors", "not a LoRA"),
        ("unmatched.safetensors", "no_such_layer"),
        ("wrong-shape.safetensors", "attn1.to_q"),
    ] {
        let resp = post_generation(&client, &base, &request(json!({"lora_path": name}))).await;
        assert_refused(resp, "lora_path", needle).await;
        let (png, _) =
            crate::common::image_of(post_generation(&client, &base, &request(json!({}))).await)
                .await;
        assert_eq!(png, base_png, "base image after refusing {name}");
    }
    // Also while another adapter is merged: the refused one leaves it as it was.
    let (_, merged) = crate::common::image_of(
        post_generation(&client, &base, &request(json!({"lora_path": "peft"}))).await,
    )
    .await;
    let resp = post_generation(
        &client,
        &base,
        &request(json!({"lora_path": "wrong-shape.safetensors"})),
    )
    .await;
    assert_refused(resp, "lora_path", "attn1.to_q").await;
    let (_, again) = crate::common::image_of(
        post_generation(&client, &base, &request(json!({"lora_path": "peft"}))).await,
    )
    .await;
    assert_eq!(again, merged, "merged adapter kept after a refused one");

    // A streamed request with an adapter ends with the same image.
    let resp = post_generation(
        &client,
        &base,
        &request(json!({"lora_path": "peft", "stream": true})),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.expect("events");
    let completed = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|e| e["type"] == "image_generation.completed")
        .unwrap_or_else(|| panic!("no completed event in {text}"));
    let png = crate::common::b64_bytes(completed["b64_json"].as_str().expect("b64_json"));
    let rgb = image::load_from_memory(&png)
        .expect("PNG")
        .to_rgb8()
        .into_raw();
    assert_eq!(rgb, merged, "streamed image with the adapter");

    let (png, _) =
        crate::common::image_of(post_generation(&client, &base, &request(json!({}))).await).await;
    assert_eq!(png, base_png, "base image at the end");
    server.shutdown().await.expect("shuts down");
}

/// Without `--lora-dir`, naming an adapter is refused with how to enable it, and the
/// listing says adapters are off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_per_request_off_by_default() {
    let config = crate::common::fixture_server_config();
    let server = crate::common::start_server(config).await;
    let base = server.url();
    let client = reqwest::Client::new();
    let resp = post_generation(
        &client,
        &base,
        &request(json!({"lora_path": "x.safetensors"})),
    )
    .await;
    assert_refused(resp, "lora_path", "--lora-dir").await;
    let resp = post_generation(&client, &base, &request(json!({"loras": [{"path": "x"}]}))).await;
    assert_refused(resp, "loras", "--lora-dir").await;
    let list = list_loras(&client, &base).await;
    assert_eq!(
        list,
        json!({"object": "list", "enabled": false, "data": []})
    );
    server.shutdown().await.expect("shuts down");
}
