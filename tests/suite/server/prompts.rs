//! Prompts as SDXL users write them, through `hypergen serve`: `<lora:NAME:W>` tags
//! resolved like the `loras` field, textual-inversion embeddings from `--embeddings-dir`
//! (listed, confined, pickles and misfits skipped by name), `prompt_syntax` and
//! `clip_skip`, bad syntax never refused, and a 300-token prompt streamed.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::DType;
use hypergen::load::lora::{apply_loras, LoraAdapter, LoraSpec};
use hypergen::pipeline::{GenerationRequest, Progress};
use serde_json::{json, Value};

use crate::common::{b64_bytes, fixture_dir, image_of, Cpu};
use crate::parity::lora::write_safetensors;
use crate::server::api::{post_generation, stream_events};

const PROMPT: &str = "a photo of an astronaut riding a horse on mars, hgstyle";
const SIZE: usize = 64;

fn request(prompt: &str, extra: Value) -> Value {
    let mut body = json!({
        "prompt": prompt,
        "size": format!("{SIZE}x{SIZE}"),
        "num_inference_steps": 3,
        "guidance_scale": 5.0,
        "seed": 5,
    });
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    body
}

/// The test's directories: a LoRA, the fixture's embedding, a pickle, an embedding too
/// wide for the model, one outside reached by a symlink.
fn dirs(root: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let fixture = fixture_dir();
    let loras = root.join("loras");
    std::fs::create_dir_all(&loras).expect("mkdir");
    std::fs::copy(
        fixture.join("loras/kohya-sgm.safetensors"),
        loras.join("kohya.safetensors"),
    )
    .expect("copy");
    let embeddings = root.join("embeddings");
    std::fs::create_dir_all(embeddings.join("negative")).expect("mkdir");
    std::fs::copy(
        fixture.join("embeddings/hgstyle.safetensors"),
        embeddings.join("negative/hgstyle.safetensors"),
    )
    .expect("copy");
    std::fs::write(embeddings.join("pickled.pt"), b"never opened").expect("write");
    write_safetensors(
        &embeddings.join("sd15style.safetensors"),
        &[
            ("clip_l", vec![1, 768], vec![0.1; 768]),
            ("clip_g", vec![1, 1280], vec![0.1; 1280]),
        ],
    );
    std::fs::copy(
        fixture.join("embeddings/hgstyle.safetensors"),
        root.join("outside.safetensors"),
    )
    .expect("copy");
    std::os::unix::fs::symlink(
        root.join("outside.safetensors"),
        embeddings.join("escape.safetensors"),
    )
    .expect("symlink");
    (loras, embeddings)
}

/// The library's image for `prompt` (its LoRA tags removed by the pipeline) with the
/// LoRA merged at `scale` and the fixture's embedding loaded.
fn library_image(prompt: &str, lora: &Path, scale: f32) -> Vec<u8> {
    let mut pipe = crate::common::fixture_pipeline::<Cpu>(DType::F32, &Default::default());
    let adapter = Arc::new(LoraAdapter::read(lora).expect("reads"));
    apply_loras(pipe.components_mut(), &[LoraSpec::new(adapter, scale)]).expect("applies");
    hypergen::load::embeddings::load_embeddings(
        pipe.components_mut(),
        &fixture_dir().join("embeddings"),
    )
    .expect("embeddings");
    let req = GenerationRequest {
        prompt: prompt.into(),
        num_inference_steps: 3,
        guidance_scale: 5.0,
        width: SIZE,
        height: SIZE,
        seed: 5,
        ..Default::default()
    };
    let out = pipe
        .generate(&req, &mut |_: Progress| std::ops::ControlFlow::Continue(()))
        .expect("generates");
    out.images[0].rgb.clone()
}

/// The pixels of a generation's first image (the PNGs differ in their `parameters`).
async fn image(client: &reqwest::Client, base: &str, body: &Value) -> Vec<u8> {
    image_of(post_generation(client, base, body).await).await.1
}

async fn refused(client: &reqwest::Client, base: &str, body: &Value, param: &str) -> String {
    let resp = post_generation(client, base, body).await;
    let status = resp.status().as_u16();
    let json: Value = resp.json().await.expect("json");
    assert_eq!(status, 400, "{json}");
    assert_eq!(json["error"]["param"], param, "{json}");
    json["error"]["message"]
        .as_str()
        .expect("message")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_through_the_server() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (loras, embeddings) = dirs(tmp.path());
    let mut config = crate::common::fixture_server_config();
    config.lora_dir = Some(loras.clone());
    config.worker.embeddings_dir = Some(embeddings);
    let server = crate::common::start_server(config).await;
    let base = server.url();
    let client = reqwest::Client::new();

    // The listing: the embedding by its word; the pickle and the misfit skipped by
    // name, without the server's paths; nothing from outside.
    let list: Value = client
        .get(format!("{base}/v1/textual-inversions"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(list["enabled"], true, "{list}");
    assert_eq!(
        list["data"],
        json!([{"id": "hgstyle", "object": "textual_inversion", "vectors": 2}]),
        "{list}"
    );
    let skipped = list["skipped"].to_string();
    assert!(
        skipped.contains("pickled.pt") && skipped.contains("pickle"),
        "{skipped}"
    );
    assert!(
        skipped.contains("sd15style.safetensors") && skipped.contains("768"),
        "{skipped}"
    );
    assert!(
        !skipped.contains("escape") && !skipped.contains("/tmp"),
        "{skipped}"
    );

    // `<lora:…>` in the prompt is the `loras` field: the same image, bit for bit.
    let tagged = image(
        &client,
        &base,
        &request(&format!("{PROMPT} <lora:kohya:0.8>"), json!({})),
    )
    .await;
    let field = image(
        &client,
        &base,
        &request(PROMPT, json!({"loras": [{"path": "kohya", "scale": 0.8}]})),
    )
    .await;
    assert_eq!(tagged, field, "<lora:…> differs from `loras`");
    // An embedding and a LoRA together: the library's image with both.
    let want = library_image(
        PROMPT,
        &fixture_dir().join("loras/kohya-sgm.safetensors"),
        0.8,
    );
    let worst = tagged
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    assert!(worst <= 1, "server vs library: {worst}/255");
    // Without the embedding the image differs (the word is read as the embedding).
    let without = image(
        &client,
        &base,
        &request(
            PROMPT,
            json!({"loras": [{"path": "kohya", "scale": 0.8}], "prompt_syntax": "plain"}),
        ),
    )
    .await;
    assert_ne!(
        without, field,
        "plain syntax should not insert the embedding"
    );

    // LoRA tags are confined like `loras`, and refused without a number.
    let message = refused(
        &client,
        &base,
        &request("a cat <lora:../outside:1>", json!({})),
        "prompt",
    )
    .await;
    assert!(message.contains(".."), "{message}");
    refused(
        &client,
        &base,
        &request("a cat <lora:kohya:lots>", json!({})),
        "prompt",
    )
    .await;

    // Clip skip within the model's layers; the syntax by name.
    let message = refused(
        &client,
        &base,
        &request("a cat", json!({"clip_skip": 9})),
        "clip_skip",
    )
    .await;
    assert!(message.contains("more than this model takes"), "{message}");
    refused(
        &client,
        &base,
        &request("a cat", json!({"prompt_syntax": "comfy"})),
        "prompt_syntax",
    )
    .await;
    let skipped1 = image(&client, &base, &request("a cat", json!({"clip_skip": 1}))).await;
    let skipped0 = image(&client, &base, &request("a cat", json!({"clip_skip": 0}))).await;
    assert_ne!(skipped1, skipped0, "clip_skip changes nothing");

    // At most 8 chunks of 75 tokens; `BREAK`s count.
    let nine = ["cat"; 9].join(" BREAK ");
    let message = refused(&client, &base, &request(&nine, json!({})), "prompt").await;
    assert!(message.contains("9 chunks"), "{message}");
    let message = refused(
        &client,
        &base,
        &request(
            "a cat",
            json!({"negative_prompt": vec!["x"; 700].join(" ")}),
        ),
        "negative_prompt",
    )
    .await;
    assert!(message.contains("at most 8"), "{message}");
    image(
        &client,
        &base,
        &request(&["cat"; 8].join(" BREAK "), json!({})),
    )
    .await;

    // Bad syntax is never an error.
    image(
        &client,
        &base,
        &request("((unbalanced [brackets:1.2 \\ (x:y:z) ]]", json!({})),
    )
    .await;

    // A 300-token prompt: four chunks of 75 (what the playground shows), streamed.
    let long = vec!["cat"; 300].join(" ");
    let tokens: Value = client
        .post(format!("{base}/v1/tokenize"))
        .json(&json!({"prompt": long}))
        .send()
        .await
        .expect("tokenize")
        .json()
        .await
        .expect("json");
    assert_eq!(tokens["chunks"], json!([75, 75, 75, 75]), "{tokens}");
    assert_eq!(
        (tokens["total"].as_u64(), tokens["chunk_length"].as_u64()),
        (Some(300), Some(75))
    );
    let plain: Value = client
        .post(format!("{base}/v1/tokenize"))
        .json(&json!({"prompt": long, "prompt_syntax": "plain"}))
        .send()
        .await
        .expect("tokenize")
        .json()
        .await
        .expect("json");
    assert_eq!(plain["chunks"], json!([300]), "{plain}");
    let breaks: Value = client
        .post(format!("{base}/v1/tokenize"))
        .json(&json!({"prompt": "a cat BREAK a dog <lora:kohya:0.5>, hgstyle"}))
        .send()
        .await
        .expect("tokenize")
        .json()
        .await
        .expect("json");
    // "a cat" | "a dog", the comma and the embedding's 2 vectors.
    assert_eq!(breaks["chunks"], json!([2, 5]), "{breaks}");
    let events = stream_events(&client, &base, &request(&long, json!({"stream": true}))).await;
    let (kind, done) = events.last().expect("events");
    assert_eq!(kind, "image_generation.completed", "{events:?}");
    assert!(!b64_bytes(done["b64_json"].as_str().expect("image")).is_empty());
}
