//! The HTTP service, end to end: real servers on 127.0.0.1 (ephemeral ports) serving the
//! fixture model on the CPU, spoken to over HTTP. The worker is held with a test hook
//! where a test needs jobs to wait; the shutdown test runs the real binary.

use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use burn::tensor::DType;
use hypergen::app::server::worker::WorkerHooks;
use hypergen::app::server::Server;
use hypergen::pipeline::GenerationRequest;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::common::{fixture_dir, fixture_server_config, start_server, Cpu};

const KEY: &str = "sk-test-0123456789";

/// A small, fast request (64x64, 2 steps).
pub(crate) fn small(prompt: &str, seed: u64) -> Value {
    json!({"prompt": prompt, "size": "64x64", "num_inference_steps": 2, "seed": seed})
}

/// Holds the worker before each batch until opened; records batch sizes.
#[derive(Clone, Default)]
pub(crate) struct Gate(Arc<(Mutex<GateState>, Condvar)>);

#[derive(Default)]
struct GateState {
    open: bool,
    batches: Vec<usize>,
}

impl Gate {
    pub(crate) fn hooks(&self) -> WorkerHooks {
        let gate = self.clone();
        WorkerHooks {
            before_batch: Some(Arc::new(move |n| gate.enter(n))),
            ..WorkerHooks::default()
        }
    }

    fn enter(&self, n: usize) {
        let (lock, cvar) = &*self.0;
        let mut state = lock.lock().expect("gate");
        state.batches.push(n);
        cvar.notify_all();
        while !state.open {
            state = cvar.wait(state).expect("gate");
        }
    }

    pub(crate) fn open(&self) {
        let (lock, cvar) = &*self.0;
        lock.lock().expect("gate").open = true;
        cvar.notify_all();
    }

    pub(crate) fn batches(&self) -> Vec<usize> {
        self.0 .0.lock().expect("gate").batches.clone()
    }
}

/// Polls `cond` until it holds (panics after 30 s).
/// `POST {base}/v1/images/generations` with `body` as JSON.
pub(crate) async fn post_generation(
    client: &reqwest::Client,
    base: &str,
    body: &Value,
) -> reqwest::Response {
    client
        .post(format!("{base}/v1/images/generations"))
        .json(body)
        .send()
        .await
        .expect("request")
}

pub(crate) async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub(crate) async fn health(client: &reqwest::Client, base: &str) -> (Value, Duration) {
    let start = Instant::now();
    let resp = client
        .get(format!("{base}/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(resp.status(), 200);
    (resp.json().await.expect("health json"), start.elapsed())
}

/// Asserts an OpenAI error object with `status`, `param` and `code`.
pub(crate) async fn assert_error(
    resp: reqwest::Response,
    status: u16,
    param: Option<&str>,
    code: &str,
) {
    assert_eq!(resp.status().as_u16(), status, "status");
    let body: Value = resp.json().await.expect("error body is JSON");
    let err = &body["error"];
    let keys: Vec<&str> = err
        .as_object()
        .expect("error object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys.len(), 4, "{body}");
    for k in ["message", "type", "param", "code"] {
        assert!(err.get(k).is_some(), "`{k}` missing: {body}");
    }
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(err["param"].as_str(), param, "param: {body}");
    assert_eq!(err["code"], code, "code: {body}");
}

pub(crate) fn decode_png(b64: &str) -> image::RgbImage {
    let bytes = crate::common::b64_bytes(b64);
    assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
    image::load_from_memory(&bytes)
        .expect("PNG decodes")
        .to_rgb8()
}

fn max_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// Health, models, schema, docs, unknown routes, generation as b64_json and as url.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_routes() {
    let server = start_server(fixture_server_config()).await;
    let base = server.url();
    let client = reqwest::Client::new();

    let (h, _) = health(&client, &base).await;
    assert_eq!(
        h,
        json!({"status": "healthy", "model": fixture_dir().display().to_string(), "queue_size": 0, "device": "cpu", "loras": []})
    );

    let models: Value = client
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], fixture_dir().display().to_string());
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(models["data"][0]["owned_by"], "hypergen");
    assert_eq!(models["data"][0]["random_weights"], false);

    let spec = client
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .expect("spec");
    assert_eq!(spec.status(), 200);
    assert_eq!(spec.headers()["content-type"], "application/json");
    // The live document is the committed one but for what it says of this server: its
    // address, and (no key here) no security requirement.
    let mut live: Value = spec.json().await.expect("live schema");
    let mut committed: Value =
        serde_json::from_str(&hypergen::app::server::openapi_json()).expect("schema");
    assert_eq!(live["servers"][0]["url"], base);
    assert_eq!(committed["servers"][0]["url"], "http://localhost:8000");
    let generation = &committed["paths"]["/v1/images/generations"]["post"];
    assert_eq!(generation["security"], json!([{"bearerAuth": []}, {}]));
    assert!(live["paths"]["/v1/images/generations"]["post"]
        .get("security")
        .is_none());
    for doc in [&mut live, &mut committed] {
        doc["servers"] = Value::Null;
        for item in doc["paths"].as_object_mut().expect("paths").values_mut() {
            for op in item.as_object_mut().expect("item").values_mut() {
                op.as_object_mut().expect("op").remove("security");
            }
        }
    }
    assert_eq!(
        live, committed,
        "the live schema differs from the committed one"
    );
    let docs = client
        .get(format!("{base}/docs"))
        .send()
        .await
        .expect("docs");
    assert_eq!(docs.status(), 200);
    assert!(docs.text().await.expect("html").contains("swagger"));

    let resp = client
        .get(format!("{base}/v2/nothing"))
        .send()
        .await
        .expect("404");
    assert_error(resp, 404, None, "not_found").await;
    let resp = client
        .get(format!("{base}/v1/images/generations"))
        .send()
        .await
        .expect("405");
    assert_eq!(
        resp.headers()["allow"],
        "POST",
        "405 answers say what is allowed"
    );
    assert_error(resp, 405, None, "method_not_allowed").await;
    let resp = client
        .delete(format!("{base}/v1/images/files/0123"))
        .send()
        .await
        .expect("405");
    assert_eq!(resp.headers()["allow"], "GET");
    let resp = client
        .get(format!("{base}/v1/images/files/0123"))
        .send()
        .await
        .expect("404");
    assert_error(resp, 404, None, "not_found").await;

    // b64_json, two images, every OpenAI-compatible option given; nothing extra comes back.
    let mut req = small("a photo of an astronaut riding a horse on mars", 42);
    for (k, v) in [
        ("n", json!(2)),
        ("model", json!("dall-e-3")),
        ("quality", json!("hd")),
        ("style", json!("vivid")),
        ("user", json!("someone")),
        ("response_format", json!("b64_json")),
        ("negative_prompt", json!("blurry")),
        ("guidance_scale", json!(5)),
        ("scheduler", json!("euler_a")),
        ("lora_scale", json!(0.5)),
    ] {
        req[k] = v;
    }
    let resp = client
        .post(format!("{base}/v1/images/generations"))
        .json(&req)
        .send()
        .await
        .expect("generate");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    let mut keys: Vec<&String> = body.as_object().expect("object").keys().collect();
    keys.sort();
    assert_eq!(keys, ["created", "data"]);
    let data = body["data"].as_array().expect("data");
    assert_eq!(data.len(), 2);
    let mut images = Vec::new();
    for item in data {
        let mut keys: Vec<&String> = item.as_object().expect("object").keys().collect();
        keys.sort();
        assert_eq!(keys, ["b64_json", "revised_prompt"]);
        assert_eq!(item["revised_prompt"], req["prompt"]);
        let img = decode_png(item["b64_json"].as_str().expect("b64"));
        assert_eq!(img.dimensions(), (64, 64));
        images.push(img);
    }
    assert_ne!(
        images[0].as_raw(),
        images[1].as_raw(),
        "two images of one request differ"
    );

    // The server is a thin layer: its image is the pipeline's for the same request.
    let pipe = crate::common::fixture_pipeline::<Cpu>(DType::F32, &Default::default());
    let direct = pipe
        .generate(
            &GenerationRequest {
                prompt: req["prompt"].as_str().expect("prompt").into(),
                negative_prompt: Some("blurry".into()),
                num_inference_steps: 2,
                guidance_scale: 5.0,
                width: 64,
                height: 64,
                num_images: 2,
                seed: 42,
                sampler: hypergen::scheduler::SamplerSettings {
                    kind: Some(hypergen::scheduler::SchedulerKind::EulerAncestral),
                    ..Default::default()
                },
                ..Default::default()
            },
            &mut |_| std::ops::ControlFlow::Continue(()),
        )
        .expect("direct run");
    for (served, direct) in images.iter().zip(&direct.images) {
        assert!(
            max_diff(served.as_raw(), &direct.rgb) <= 1,
            "served image differs from the pipeline's"
        );
    }

    // url: a working link to the same PNG; the same seed gives the same image.
    let mut req = small("a photo of an astronaut riding a horse on mars", 7);
    req["response_format"] = json!("url");
    let body: Value = client
        .post(format!("{base}/v1/images/generations"))
        .json(&req)
        .send()
        .await
        .expect("generate")
        .json()
        .await
        .expect("json");
    let url = body["data"][0]["url"].as_str().expect("url").to_string();
    assert!(body["data"][0].get("b64_json").is_none());
    assert!(
        url.starts_with(&format!("{base}/v1/images/files/")),
        "{url}"
    );
    let download = client.get(&url).send().await.expect("download");
    assert_eq!(download.status(), 200);
    assert_eq!(
        download.headers()["content-type"].to_str().expect("ascii"),
        "image/png"
    );
    let png = download.bytes().await.expect("bytes");
    let via_url = image::load_from_memory(&png).expect("png").to_rgb8();
    req["response_format"] = json!("b64_json");
    let body: Value = client
        .post(format!("{base}/v1/images/generations"))
        .json(&req)
        .send()
        .await
        .expect("generate")
        .json()
        .await
        .expect("json");
    let via_b64 = decode_png(body["data"][0]["b64_json"].as_str().expect("b64"));
    assert_eq!(via_url.as_raw(), via_b64.as_raw(), "same seed, same image");

    // No seed: a random one, still an image.
    let resp = client
        .post(format!("{base}/v1/images/generations"))
        .json(&json!({"prompt": "x", "size": "64x64", "num_inference_steps": 1}))
        .send()
        .await
        .expect("generate");
    assert_eq!(resp.status(), 200);

    // The worker counts a job after its answer is sent.
    eventually("four jobs counted", || server.stats().completed == 4).await;
    let stats = server.stats();
    assert_eq!((stats.failed, stats.cancelled, stats.skipped), (0, 0, 0));
    server.shutdown().await.expect("shutdown");
}

/// With an API key, everything but /health, /docs and /openapi.json needs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_auth() {
    let mut cfg = fixture_server_config();
    cfg.api_key = Some(KEY.parse().expect("key"));
    let server = start_server(cfg).await;
    let base = server.url();
    let client = reqwest::Client::new();

    for open in ["/health", "/docs", "/openapi.json"] {
        let resp = client
            .get(format!("{base}{open}"))
            .send()
            .await
            .expect("open");
        assert_eq!(resp.status(), 200, "{open} needs no key");
    }
    let get = |path: &str| client.get(format!("{base}{path}"));
    let post = || client.post(format!("{base}/v1/images/generations"));
    assert_error(
        get("/v1/models").send().await.expect("r"),
        401,
        None,
        "missing_api_key",
    )
    .await;
    assert_error(
        get("/v1/models")
            .header("authorization", KEY)
            .send()
            .await
            .expect("r"),
        401,
        None,
        "invalid_api_key",
    )
    .await;
    assert_error(
        get("/v1/models")
            .header("authorization", format!("Basic {KEY}"))
            .send()
            .await
            .expect("r"),
        401,
        None,
        "invalid_api_key",
    )
    .await;
    assert_error(
        get("/v1/models")
            .bearer_auth("sk-wrong")
            .send()
            .await
            .expect("r"),
        401,
        None,
        "invalid_api_key",
    )
    .await;
    assert_error(
        get("/v1/models")
            .bearer_auth(&KEY[..KEY.len() - 1])
            .send()
            .await
            .expect("r"),
        401,
        None,
        "invalid_api_key",
    )
    .await;
    // Authentication comes before the body is even read.
    assert_error(
        post().body("{not json").send().await.expect("r"),
        401,
        None,
        "missing_api_key",
    )
    .await;
    assert_error(
        get("/v1/images/files/abc").send().await.expect("r"),
        401,
        None,
        "missing_api_key",
    )
    .await;

    let resp = get("/v1/models").bearer_auth(KEY).send().await.expect("r");
    assert_eq!(resp.status(), 200);
    let mut req = small("a cat", 1);
    req["response_format"] = json!("url");
    let resp = post().bearer_auth(KEY).json(&req).send().await.expect("r");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    let url = body["data"][0]["url"].as_str().expect("url");
    assert_error(
        client.get(url).send().await.expect("r"),
        401,
        None,
        "missing_api_key",
    )
    .await;
    let resp = client.get(url).bearer_auth(KEY).send().await.expect("r");
    assert_eq!(resp.status(), 200);
    server.shutdown().await.expect("shutdown");

    // The key never shows in the flags' Debug output (which `hypergen serve` logs).
    use clap::Parser;
    let cli = hypergen::app::cli::Cli::try_parse_from(["hypergen", "serve", "m", "--api-key", KEY])
        .expect("flags parse");
    let shown = format!("{cli:?}");
    assert!(
        shown.contains("redacted") && !shown.contains(KEY),
        "{shown}"
    );
}

/// Every invalid input gets 400 (413 when too large) with the field in `param`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_validation_errors() {
    let server = start_server(fixture_server_config()).await;
    let url = format!("{}/v1/images/generations", server.url());
    let client = reqwest::Client::new();
    let with = |k: &str, v: Value| {
        let mut r = small("a cat", 1);
        r[k] = v;
        r
    };
    let cases: Vec<(Value, &str, &str)> = vec![
        (json!({}), "prompt", "missing_field"),
        (json!({"prompt": null}), "prompt", "missing_field"),
        (json!({"prompt": 5}), "prompt", "invalid_type"),
        (json!({"prompt": "  "}), "prompt", "invalid_value"),
        (with("n", json!(0)), "n", "invalid_value"),
        (with("n", json!(11)), "n", "invalid_value"),
        (with("n", json!("2")), "n", "invalid_type"),
        (with("n", json!(1.5)), "n", "invalid_type"),
        (with("size", json!("big")), "size", "invalid_value"),
        (with("size", json!("100x64")), "size", "invalid_value"),
        (with("size", json!("56x64")), "size", "invalid_value"),
        (with("size", json!("64x4096")), "size", "invalid_value"),
        // Only the form the schema's pattern states: no other separator, sign, zero
        // padding or surrounding space.
        (with("size", json!("64X64")), "size", "invalid_value"),
        (with("size", json!("+64x64")), "size", "invalid_value"),
        (with("size", json!("064x64")), "size", "invalid_value"),
        (with("size", json!(" 64x64")), "size", "invalid_value"),
        (with("size", json!("AUTO")), "size", "invalid_value"),
        (with("size", json!(64)), "size", "invalid_type"),
        (
            with("response_format", json!("png")),
            "response_format",
            "invalid_value",
        ),
        (
            with("num_inference_steps", json!(0)),
            "num_inference_steps",
            "invalid_value",
        ),
        (
            with("num_inference_steps", json!(151)),
            "num_inference_steps",
            "invalid_value",
        ),
        (
            with("guidance_scale", json!(-0.5)),
            "guidance_scale",
            "invalid_value",
        ),
        (
            with("guidance_scale", json!(20.5)),
            "guidance_scale",
            "invalid_value",
        ),
        (
            with("guidance_scale", json!("high")),
            "guidance_scale",
            "invalid_type",
        ),
        (with("seed", json!(-1)), "seed", "invalid_type"),
        (
            with("scheduler", json!("warp_drive")),
            "scheduler",
            "invalid_value",
        ),
        (
            with("lora_path", json!("my.safetensors")),
            "lora_path",
            "invalid_value",
        ),
        (with("lora_scale", json!(3)), "lora_scale", "invalid_value"),
        (
            with("negative_prompt", json!(["x"])),
            "negative_prompt",
            "invalid_type",
        ),
        (with("model", json!(1)), "model", "invalid_type"),
        (with("quality", json!(true)), "quality", "invalid_type"),
        (with("style", json!({})), "style", "invalid_type"),
        (with("user", json!(2)), "user", "invalid_type"),
        (with("num_images", json!(2)), "num_images", "unknown_field"),
    ];
    for (body, param, code) in cases {
        let resp = client.post(&url).json(&body).send().await.expect("request");
        eprintln!("{body} -> {}", resp.status());
        assert_error(resp, 400, Some(param), code).await;
    }
    for raw in ["{\"prompt\": ", "[1, 2]", "\"a cat\"", "", "null"] {
        let resp = client
            .post(&url)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .expect("request");
        assert_error(resp, 400, None, "invalid_json").await;
    }
    let huge = json!({"prompt": "x".repeat(2 << 20)});
    let resp = client.post(&url).json(&huge).send().await.expect("request");
    assert_error(resp, 413, None, "request_too_large").await;
    // Nothing above reached the worker.
    assert_eq!(server.stats().accepted, 0);
    server.shutdown().await.expect("shutdown");
}

/// A full queue refuses at once (exact count of 503s, with Retry-After); every accepted
/// job is answered; /health stays fast throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_queue_full() {
    let gate = Gate::default();
    let mut cfg = fixture_server_config();
    cfg.worker.max_queue_size = 2;
    cfg.worker.hooks = gate.hooks();
    let server = start_server(cfg).await;
    let base = server.url();
    let client = reqwest::Client::new();
    let generate = |seed: u64| {
        let client = client.clone();
        let url = format!("{base}/v1/images/generations");
        tokio::spawn(async move {
            let resp = client
                .post(url)
                .json(&small("a cat", seed))
                .send()
                .await
                .expect("request");
            let retry = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().expect("ascii").to_string());
            (
                resp.status().as_u16(),
                retry,
                resp.json::<Value>().await.expect("json"),
            )
        })
    };
    let running = generate(0);
    eventually("the worker to take the first job", || {
        gate.batches().len() == 1
    })
    .await;
    let (h, took) = health(&client, &base).await;
    assert_eq!(h["queue_size"], 0);
    assert!(took < Duration::from_secs(1), "/health took {took:?}");

    let others: Vec<_> = (1..=5).map(generate).collect();
    eventually("two jobs queued", || {
        server.stats().accepted == 3 && server.stats().refused == 3
    })
    .await;
    let (h, took) = health(&client, &base).await;
    assert_eq!(h["queue_size"], 2, "{h}");
    assert_eq!(h["status"], "healthy");
    assert!(
        took < Duration::from_secs(1),
        "/health took {took:?} with a full queue"
    );

    gate.open();
    let mut statuses = vec![running.await.expect("task").0];
    for task in others {
        let (status, retry, body) = task.await.expect("task");
        if status == 503 {
            assert_eq!(retry.as_deref(), Some("5"), "503 carries Retry-After");
            assert_eq!(body["error"]["code"], "queue_full");
        }
        statuses.push(status);
    }
    statuses.sort();
    assert_eq!(statuses, [200, 200, 200, 503, 503, 503]);
    let (h, _) = health(&client, &base).await;
    assert_eq!(h["queue_size"], 0);
    eventually("three jobs counted", || server.stats().completed == 3).await;
    assert_eq!(server.stats().refused, 3);
    server.shutdown().await.expect("shutdown");
}

/// Sends a generation request over a raw connection, to close it at will.
async fn send_raw(addr: std::net::SocketAddr, body: &Value) -> tokio::net::TcpStream {
    let body = body.to_string();
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /v1/images/generations HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.write_all(body.as_bytes()).await.expect("write");
    stream
}

/// A client that leaves before its turn is dropped unrun; one that leaves mid-run is
/// stopped at the next step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_disconnects() {
    let gate = Gate::default();
    let mut cfg = fixture_server_config();
    cfg.worker.hooks = gate.hooks();
    let server = start_server(cfg).await;
    let base = server.url();
    let client = reqwest::Client::new();
    let first = {
        let client = client.clone();
        let url = format!("{base}/v1/images/generations");
        tokio::spawn(async move {
            client
                .post(url)
                .json(&small("a cat", 1))
                .send()
                .await
                .expect("request")
                .status()
        })
    };
    eventually("the worker to take the first job", || {
        gate.batches().len() == 1
    })
    .await;

    // Before its turn: queued, then the client goes.
    let leaver = send_raw(server.local_addr(), &small("a dog", 2)).await;
    eventually("the second job to queue", || server.stats().accepted == 2).await;
    let (h, _) = health(&client, &base).await;
    assert_eq!(h["queue_size"], 1);
    drop(leaver);
    eventually("the server to notice", || server.stats().abandoned == 1).await;
    gate.open();
    assert_eq!(first.await.expect("task"), 200);
    eventually("the dropped job to be skipped", || {
        server.stats().skipped == 1
    })
    .await;
    let stats = server.stats();
    assert_eq!((stats.started, stats.completed), (1, 1), "{stats:?}");
    let (h, _) = health(&client, &base).await;
    assert_eq!(h["queue_size"], 0);

    // During its run: 150 steps take seconds; leaving stops it within a step or two.
    let slow =
        json!({"prompt": "a slow cat", "size": "64x64", "num_inference_steps": 150, "seed": 3});
    let leaver = send_raw(server.local_addr(), &slow).await;
    eventually("the slow job to start", || server.stats().started == 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let left = Instant::now();
    drop(leaver);
    eventually("the slow job to be cancelled", || {
        server.stats().cancelled == 1
    })
    .await;
    let stopped_in = left.elapsed();
    let stats = server.stats();
    assert_eq!((stats.completed, stats.abandoned), (1, 2), "{stats:?}");
    assert!(
        stopped_in < Duration::from_secs(2),
        "cancelling took {stopped_in:?}"
    );

    // The worker is still fine.
    let resp = client
        .post(format!("{base}/v1/images/generations"))
        .json(&small("after", 4))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    server.shutdown().await.expect("shutdown");
}

/// Up to --max-batch-size queued jobs with the same settings run as one batch, and each
/// gets the image it would get alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_batches_compatible_jobs() {
    let gate = Gate::default();
    let mut cfg = fixture_server_config();
    cfg.worker.max_batch_size = 3;
    cfg.worker.hooks = gate.hooks();
    let server = start_server(cfg).await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/images/generations", server.url());
    let generate = |body: Value| {
        let client = client.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let resp = client.post(url).json(&body).send().await.expect("request");
            assert_eq!(resp.status(), 200);
            let body: Value = resp.json().await.expect("json");
            decode_png(body["data"][0]["b64_json"].as_str().expect("b64"))
        })
    };
    let first = generate(small("first", 1));
    eventually("the worker to take the first job", || {
        gate.batches().len() == 1
    })
    .await;
    let b = generate(small("a red cube", 2));
    eventually("b queued", || server.stats().accepted == 2).await;
    let c = generate(
        json!({"prompt": "a blue ball", "size": "64x64", "num_inference_steps": 2, "seed": 3, "negative_prompt": "blurry"}),
    );
    eventually("c queued", || server.stats().accepted == 3).await;
    let d =
        generate(json!({"prompt": "wide", "size": "128x64", "num_inference_steps": 2, "seed": 4}));
    eventually("d queued", || server.stats().accepted == 4).await;
    gate.open();
    first.await.expect("task");
    let (b_img, _c_img, d_img) = (
        b.await.expect("b"),
        c.await.expect("c"),
        d.await.expect("d"),
    );
    assert_eq!(
        gate.batches(),
        [1, 2, 1],
        "b and c share a batch; d differs in size"
    );
    assert_eq!(d_img.dimensions(), (128, 64));
    let alone = generate(small("a red cube", 2)).await.expect("alone");
    assert!(
        max_diff(b_img.as_raw(), alone.as_raw()) <= 1,
        "batched image differs from the lone run"
    );
    server.shutdown().await.expect("shutdown");
}

/// The committed schema is the code's; every operation, request, response and schema is
/// described, and bodies have examples. `HYPERGEN_UPDATE_OPENAPI=1` rewrites the file.
#[test]
fn openapi_schema_is_committed() {
    let spec = hypergen::app::server::openapi_json();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/openapi.json");
    if std::env::var_os("HYPERGEN_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, format!("{spec}\n")).expect("write openapi.json");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed.trim_end() == spec.trim_end(),
        "openapi/openapi.json differs from the code's schema; regenerate it with \
         `hypergen openapi > openapi/openapi.json` (or HYPERGEN_UPDATE_OPENAPI=1 cargo test openapi)"
    );

    let doc: Value = serde_json::from_str(&spec).expect("schema is JSON");
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            operations += 1;
            let at = format!("{method} {path}");
            assert!(
                op["summary"].is_string() && op["description"].is_string(),
                "{at}: undocumented"
            );
            for (status, resp) in op["responses"].as_object().expect("responses") {
                assert!(
                    resp["description"].as_str().is_some_and(|d| !d.is_empty()),
                    "{at} {status}"
                );
                if status != "200" && path != "/health" {
                    let json = &resp["content"]["application/json"];
                    assert_eq!(
                        json["schema"]["$ref"], "#/components/schemas/ErrorResponse",
                        "{at} {status}"
                    );
                    // Each status has its own example, the error the server sends.
                    let code = json["example"]["error"]["code"].as_str().unwrap_or("");
                    let expected = match status.as_str() {
                        "400" if path.ends_with("edits") => "missing_field",
                        "400" => "invalid_value",
                        "401" => "missing_api_key",
                        "404" => "not_found",
                        "413" => "request_too_large",
                        "500" => "generation_failed",
                        "503" => "queue_full",
                        other => panic!("{at}: undocumented status {other}"),
                    };
                    assert_eq!(code, expected, "{at} {status} example");
                }
            }
        }
    }
    assert_eq!(operations, 9);
    let edit = &doc["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"];
    assert!(
        edit["multipart/form-data"].is_object(),
        "the edits route takes a multipart form: {edit}"
    );
    for (name, schema) in doc["components"]["schemas"].as_object().expect("schemas") {
        assert!(
            schema["description"].is_string(),
            "schema {name} has no description"
        );
        if schema["type"] == "object" {
            assert!(
                schema["example"].is_object(),
                "schema {name} has no example"
            );
            for (field, prop) in schema["properties"].as_object().expect("properties") {
                assert!(
                    prop["description"].is_string(),
                    "{name}.{field} has no description"
                );
            }
        }
    }
    let request = &doc["components"]["schemas"]["ImageGenerationRequest"]["properties"];
    // No `allOf` wrapper anywhere (openapi-python-client cannot take one around a
    // `$ref`); nothing declared `charset=utf-8`.
    assert!(!spec.contains("allOf") && !spec.contains("charset"));
    let error = &doc["components"]["schemas"]["ErrorBody"];
    assert_eq!(
        error["required"],
        json!(["message", "type", "param", "code"])
    );
    assert_eq!(error["properties"]["param"]["nullable"], true);
    assert_eq!(
        doc["components"]["schemas"]["ImageGenerationRequest"]["additionalProperties"],
        false
    );
    let names: Vec<&str> = request["scheduler"]["$ref"]
        .as_str()
        .map(|r| r.rsplit('/').next().unwrap_or(""))
        .into_iter()
        .collect();
    assert_eq!(names, ["SchedulerName"]);
    let scheduler_names: Vec<String> = doc["components"]["schemas"]["SchedulerName"]["enum"]
        .as_array()
        .expect("enum")
        .iter()
        .map(|v| v.as_str().expect("name").to_string())
        .collect();
    let kinds: Vec<String> = hypergen::scheduler::SchedulerKind::ALL
        .iter()
        .map(|k| k.name().to_string())
        .collect();
    assert_eq!(
        scheduler_names, kinds,
        "the schema lists SchedulerKind's names"
    );
}

/// The real binary: `--port 0`, key from HYPERGEN_API_KEY (never logged), SIGTERM while
/// a job runs and another waits: the running one is answered, the waiting one refused,
/// exit 0.
#[test]
fn server_binary_shuts_down_gracefully() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hypergen"))
        .args(["serve"])
        .arg(fixture_dir())
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--device",
            "cpu",
            "--dtype",
            "float32",
        ])
        .env("HYPERGEN_API_KEY", KEY)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start hypergen serve");
    let stderr = child.stderr.take().expect("stderr");
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let log = Arc::new(Mutex::new(String::new()));
    let reader = {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
                    let _ = addr_tx.send(addr);
                }
                let mut log = log.lock().expect("log");
                log.push_str(&line);
                log.push('\n');
            }
        })
    };
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| panic!("the server never listened:\n{}", log.lock().expect("log")));
    let base = format!("http://{addr}");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let done = Arc::new(AtomicBool::new(false));
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let send = |body: Value| {
            let client = client.clone();
            let url = format!("{base}/v1/images/generations");
            tokio::spawn(async move {
                let resp = client
                    .post(url)
                    .bearer_auth(KEY)
                    .json(&body)
                    .send()
                    .await
                    .expect("request");
                (
                    resp.status().as_u16(),
                    resp.json::<Value>().await.expect("json"),
                )
            })
        };
        let running =
            send(json!({"prompt": "slow", "size": "64x64", "num_inference_steps": 60, "seed": 1}));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let waiting = send(small("queued", 2));
        let start = Instant::now();
        loop {
            let (h, _) = health(&client, &base).await;
            if h["queue_size"] == 1 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the second job never queued: {h}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let status = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let (status, body) = running.await.expect("task");
        assert_eq!(status, 200, "the running job is finished: {body}");
        let png = decode_png(body["data"][0]["b64_json"].as_str().expect("b64"));
        assert_eq!(png.dimensions(), (64, 64));
        let (status, body) = waiting.await.expect("task");
        assert!(
            status == 503 || status == 200,
            "the queued job is answered or refused: {status}"
        );
        if status == 503 {
            assert_eq!(body["error"]["code"], "shutting_down");
        }
        done.store(true, Ordering::SeqCst);
    });
    let start = Instant::now();
    let exit = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the server did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = reader.join();
    let log = log.lock().expect("log").clone();
    assert!(done.load(Ordering::SeqCst));
    assert!(exit.success(), "exit status {exit:?}:\n{log}");
    assert!(!log.contains(KEY), "the API key was logged:\n{log}");
    assert!(log.contains("model loaded") && log.contains("cpu"), "{log}");
    // `hypergen openapi` prints the schema the server serves.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hypergen"))
        .arg("openapi")
        .output()
        .expect("hypergen openapi");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        hypergen::app::server::openapi_json()
    );
}

/// A model path that does not exist is a clear error, not a panic or a hang.
#[test]
fn server_refuses_missing_model() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hypergen"))
        .args(["serve", "/no/such/model", "--port", "0", "--device", "cpu"])
        .output()
        .expect("run hypergen");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("/no/such/model") && stderr.contains("no such directory"),
        "{stderr}"
    );
}

/// OpenAI's official Python client generates an image against the server and decodes
/// it (tests/openai_client.py). Without the `openai` module this fails under CI and
/// prints a skip notice elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_openai_python_client() {
    let found = crate::common::python_modules(&["openai"]);
    if !crate::common::tool_present("server_openai_python_client", found) {
        return;
    }
    let mut cfg = fixture_server_config();
    cfg.api_key = Some(KEY.parse().expect("key"));
    let server = start_server(cfg).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let base = server.url();
    // An inpainting case of the fixture, with OpenAI's transparent mask.
    let case = crate::parity::edits::edit_cases()
        .into_iter()
        .find(|c| c.mask.is_some())
        .expect("an inpainting case");
    let edited =
        std::env::temp_dir().join(format!("hypergen-openai-edit-{}.png", std::process::id()));
    let edit = json!({
        "image": case.image, "mask": case.rgba_mask(), "prompt": case.prompt,
        "size": format!("{}x{}", case.width, case.height), "out": edited,
        "extra": {"strength": case.strength, "num_inference_steps": case.steps,
                  "guidance_scale": case.guidance, "seed": case.seed},
    })
    .to_string();
    let out = tokio::task::spawn_blocking(move || {
        crate::common::python()
            .arg(&script)
            .args([&base, KEY, &edit])
            .output()
    })
    .await
    .expect("task")
    .expect("run the client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "the openai client failed:\n{text}");
    assert!(text.contains("openai client OK"), "{text}");
    let png = image::open(&edited).expect("the edited PNG").to_rgb8();
    let _ = std::fs::remove_file(&edited);
    crate::parity::edits::assert_case_image("openai client edit", &case, png.as_raw());
    server.shutdown().await.expect("shutdown");
}

/// `serve --lora`: adapters merged at start are listed by `/health` and `/v1/models`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_start_loras_are_listed() {
    let mut config = fixture_server_config();
    let case = &crate::parity::lora::lora_cases()[0];
    let spec = hypergen::load::lora::LoraSpec::new(case.adapters[0].0.clone(), 0.5);
    config.worker.loras = vec![spec.clone()];
    let server = start_server(config).await;
    let base = server.url();
    let client = reqwest::Client::new();
    let (h, _) = health(&client, &base).await;
    let want = json!([{"name": spec.source.display().to_string(), "scale": 0.5}]);
    assert_eq!(h["loras"], want);
    let models: Value = client
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    assert_eq!(models["data"][0]["loras"], want);
}

/// A bad `--lora` stops the server at start with the adapter's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_bad_start_lora_fails() {
    let mut config = fixture_server_config();
    config.worker.loras = vec![hypergen::load::lora::LoraSpec::new(
        fixture_dir().join("no-such-lora.safetensors"),
        1.0,
    )];
    let err = match Server::start(config, "127.0.0.1:0").await {
        Ok(_) => panic!("a missing LoRA must stop the server"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("no-such-lora"), "{err}");
}

/// A `text/event-stream` body as `(event, data)` pairs (keep-alive comments skipped).
pub(crate) fn sse_events(body: &str) -> Vec<(String, Value)> {
    body.replace("\r\n", "\n")
        .split("\n\n")
        .filter_map(|block| {
            let mut event = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            let event = event?;
            let data = serde_json::from_str(&data).expect("event data is JSON");
            Some((event, data))
        })
        .collect()
}

/// Posts a streamed generation and returns its events, checking the content type.
pub(crate) async fn stream_events(
    client: &reqwest::Client,
    base: &str,
    body: &Value,
) -> Vec<(String, Value)> {
    let resp = client
        .post(format!("{base}/v1/images/generations"))
        .json(body)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    sse_events(&resp.text().await.expect("body"))
}

fn kinds(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(k, _)| k.as_str()).collect()
}

/// `stream: true`: OpenAI's events, partial images evenly spaced, a final image equal
/// to the non-streamed one, progress only when asked, edits too, and range checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stream_events() {
    let server = start_server(fixture_server_config()).await;
    let base = server.url();
    let client = reqwest::Client::new();

    let mut body =
        json!({"prompt": "a cat", "size": "64x64", "num_inference_steps": 3, "seed": 11});
    let plain: Value = client
        .post(format!("{base}/v1/images/generations"))
        .json(&body)
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    body["stream"] = json!(true);
    body["partial_images"] = json!(2);
    let events = stream_events(&client, &base, &body).await;
    assert_eq!(
        kinds(&events),
        [
            "image_generation.partial_image",
            "image_generation.partial_image",
            "image_generation.completed"
        ]
    );
    for (i, (kind, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], kind.as_str());
        assert_eq!(data["size"], "64x64");
        assert_eq!(data["output_format"], "png");
        assert_eq!(data["background"], "opaque");
        assert_eq!(data["quality"], "auto");
        assert!(data["created_at"].is_i64(), "{data}");
        let img = decode_png(data["b64_json"].as_str().expect("b64_json"));
        assert_eq!(img.dimensions(), (64, 64));
        if i < 2 {
            assert_eq!(data["partial_image_index"], i);
            assert!(data.get("usage").is_none(), "{data}");
        } else {
            assert!(data.get("partial_image_index").is_none(), "{data}");
            assert_eq!(data["usage"]["total_tokens"], 0);
            assert_eq!(data["usage"]["input_tokens_details"]["image_tokens"], 0);
        }
    }
    let streamed = decode_png(events[2].1["b64_json"].as_str().expect("b64"));
    let expected = decode_png(plain["data"][0]["b64_json"].as_str().expect("b64"));
    assert_eq!(
        streamed.as_raw(),
        expected.as_raw(),
        "the streamed image differs"
    );
    // A partial image is an estimate, not the final image.
    let first = decode_png(events[0].1["b64_json"].as_str().expect("b64"));
    assert!(max_diff(first.as_raw(), expected.as_raw()) > 0);

    // n = 2: one completed event per image; progress events only when asked.
    let events = stream_events(
        &client,
        &base,
        &json!({"prompt": "a cat", "size": "64x64", "num_inference_steps": 2, "seed": 1,
                "n": 2, "stream": true, "stream_progress": true}),
    )
    .await;
    // Progress events without a step report the queue position while the job waits.
    let (steps, waits): (Vec<&Value>, Vec<&Value>) = events
        .iter()
        .filter(|(k, _)| k == "hypergen.progress")
        .map(|(_, d)| d)
        .partition(|d| d.get("step").is_some());
    assert!(waits.iter().all(|d| d["queue_position"] == 0), "{waits:?}");
    let progress = steps;
    assert_eq!(progress.len(), 3, "{:?}", kinds(&events));
    assert_eq!(
        (&progress[2]["step"], &progress[2]["total"]),
        (&json!(2), &json!(2))
    );
    assert!(progress[2]["elapsed_seconds"].is_f64());
    assert_eq!(
        kinds(&events)[kinds(&events).len() - 2..],
        ["image_generation.completed", "image_generation.completed"]
    );

    // partial_images out of range.
    for bad in [json!(4), json!(-1)] {
        let resp = client
            .post(format!("{base}/v1/images/generations"))
            .json(
                &json!({"prompt": "a cat", "size": "64x64", "stream": true, "partial_images": bad}),
            )
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 400);
        let err: Value = resp.json().await.expect("json");
        assert_eq!(err["error"]["param"], "partial_images", "{err}");
    }

    // An edit streams too.
    let mut png = Vec::new();
    image::RgbImage::from_pixel(64, 64, image::Rgb([200, 90, 40]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .expect("png");
    let text = |s: &str| s.as_bytes().to_vec();
    let (ct, form) = crate::parity::edits::multipart(&[
        ("image", Some("in.png"), png),
        ("prompt", None, text("a red cat")),
        ("num_inference_steps", None, text("4")),
        ("seed", None, text("3")),
        ("stream", None, text("true")),
        ("partial_images", None, text("1")),
    ]);
    let resp = client
        .post(format!("{base}/v1/images/edits"))
        .header("content-type", ct)
        .body(form)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let events = sse_events(&resp.text().await.expect("body"));
    assert_eq!(
        kinds(&events),
        ["image_edit.partial_image", "image_edit.completed"]
    );
    assert_eq!(events[0].1["partial_image_index"], 0);
    server.shutdown().await.expect("shutdown");
}

/// A streaming client that goes away mid-run stops its job within a step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stream_disconnect_cancels() {
    let server = start_server(fixture_server_config()).await;
    let slow = json!({"prompt": "a slow cat", "size": "64x64", "num_inference_steps": 150,
                      "seed": 3, "stream": true, "partial_images": 1});
    let leaver = send_raw(server.local_addr(), &slow).await;
    eventually("the slow job to start", || server.stats().started == 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let left = Instant::now();
    drop(leaver);
    eventually("the slow job to be cancelled", || {
        server.stats().cancelled == 1
    })
    .await;
    let stopped_in = left.elapsed();
    assert!(
        stopped_in < Duration::from_secs(3),
        "cancelling took {stopped_in:?}"
    );
    assert_eq!(server.stats().completed, 0);
    server.shutdown().await.expect("shutdown");
}

/// With `stream_progress`, a waiting job reports its place in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stream_queue_position() {
    let gate = Gate::default();
    let mut cfg = fixture_server_config();
    cfg.worker.hooks = gate.hooks();
    let server = start_server(cfg).await;
    let base = server.url();
    let client = reqwest::Client::new();
    let first = {
        let client = client.clone();
        let url = format!("{base}/v1/images/generations");
        tokio::spawn(async move {
            let resp = client.post(url).json(&small("a cat", 1)).send().await;
            resp.expect("request").status()
        })
    };
    eventually("the worker to take the first job", || {
        gate.batches().len() == 1
    })
    .await;
    let second = client
        .post(format!("{base}/v1/images/generations"))
        .json(&json!({
        "prompt": "a dog", "size": "64x64", "num_inference_steps": 2, "seed": 2,
        "stream": true, "stream_progress": true}));
    let third = client
        .post(format!("{base}/v1/images/generations"))
        .json(&json!({
        "prompt": "a bird", "size": "64x64", "num_inference_steps": 2, "seed": 3,
        "stream": true, "stream_progress": true}));
    let mut second = second.send().await.expect("request");
    let mut third = third.send().await.expect("request");
    let mut text = String::new();
    while !text.contains("\"queue_position\":1") {
        let chunk = third.chunk().await.expect("chunk").expect("more events");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let chunk = second.chunk().await.expect("chunk").expect("an event");
    assert!(
        String::from_utf8_lossy(&chunk).contains("\"queue_position\":0"),
        "{chunk:?}"
    );
    gate.open();
    assert_eq!(first.await.expect("task"), 200);
    for resp in [second, third] {
        let rest = resp.text().await.expect("body");
        assert!(rest.contains("image_generation.completed"), "{rest}");
    }
    server.shutdown().await.expect("shutdown");
}

/// The `parameters` text chunk of a PNG (A1111's generation settings).
fn png_parameters(png: &[u8]) -> Option<String> {
    let mut at = 8;
    while at + 8 <= png.len() {
        let len = u32::from_be_bytes(png[at..at + 4].try_into().ok()?) as usize;
        let kind = &png[at + 4..at + 8];
        let data = png.get(at + 8..at + 8 + len)?;
        if kind == b"tEXt" || kind == b"iTXt" {
            let nul = data.iter().position(|&b| b == 0)?;
            if &data[..nul] == b"parameters" {
                // tEXt: Latin-1 after the NUL; iTXt: flags, method, language and
                // translated keyword (three NUL-terminated fields) before the text.
                let rest = &data[nul + 1..];
                let text = if kind == b"tEXt" {
                    rest.iter().map(|&b| b as char).collect()
                } else {
                    let mut fields = rest[2..].splitn(3, |&b| b == 0);
                    let _ = (fields.next(), fields.next());
                    String::from_utf8_lossy(fields.next()?).into_owned()
                };
                return Some(text);
            }
        }
        at += 12 + len;
    }
    None
}

/// The sampler fields reach the sampler: each request's PNG parameters name the sampler
/// and settings it ran with, and the served image is the pipeline's for them; settings a
/// sampler does not take are refused with 400 naming the field, before the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sampler_fields() {
    use hypergen::scheduler::{SamplerSettings, SchedulerKind, Spacing};
    let server = start_server(fixture_server_config()).await;
    let base = server.url();
    let client = reqwest::Client::new();
    let pipe = crate::common::fixture_pipeline::<Cpu>(DType::F32, &Default::default());
    let cases = [
        (
            json!({"scheduler": "heun", "timestep_spacing": "trailing", "guidance_rescale": 0.5}),
            "Sampler: Heun",
            &[", Timestep spacing: trailing", ", CFG Rescale phi: 0.5"][..],
            SamplerSettings {
                kind: Some(SchedulerKind::Heun),
                timestep_spacing: Some(Spacing::Trailing),
                eta: None,
            },
            0.5,
        ),
        (
            json!({"scheduler": "tcd", "eta": 0.2}),
            "Sampler: TCD",
            &[", Eta: 0.2"][..],
            SamplerSettings {
                kind: Some(SchedulerKind::Tcd),
                timestep_spacing: None,
                eta: Some(0.2),
            },
            0.0,
        ),
        (
            json!({"scheduler": "dpmpp_2m_sde_karras"}),
            "Sampler: DPM++ 2M SDE Karras",
            &[][..],
            SamplerSettings {
                kind: Some(SchedulerKind::DpmPp2mSdeKarras),
                ..Default::default()
            },
            0.0,
        ),
    ];
    for (fields, sampler, extras, settings, rescale) in cases {
        let mut body = small("a photo of an astronaut riding a horse on mars", 5);
        body["guidance_scale"] = json!(5.0);
        for (k, v) in fields.as_object().expect("object") {
            body[k] = v.clone();
        }
        let resp = post_generation(&client, &base, &body).await;
        assert_eq!(resp.status(), 200, "{body}");
        let json: Value = resp.json().await.expect("json");
        let png = crate::common::first_image(&json);
        let text = png_parameters(&png).expect("a parameters chunk");
        assert!(text.contains(sampler), "{text}");
        for extra in extras {
            assert!(text.contains(extra), "{extra} missing from {text}");
        }
        let direct = pipe
            .generate(
                &GenerationRequest {
                    prompt: body["prompt"].as_str().expect("prompt").into(),
                    num_inference_steps: 2,
                    guidance_scale: 5.0,
                    guidance_rescale: rescale,
                    width: 64,
                    height: 64,
                    seed: 5,
                    sampler: settings,
                    ..Default::default()
                },
                &mut crate::common::no_progress,
            )
            .expect("direct run");
        let served = image::load_from_memory(&png).expect("png").to_rgb8();
        assert!(
            max_diff(served.as_raw(), &direct.images[0].rgb) <= 1,
            "{sampler}: served image differs from the pipeline's"
        );
    }

    let refused: [(Value, &str); 7] = [
        (json!({"scheduler": "euler", "eta": 0.3}), "eta"),
        (json!({"scheduler": "euler_ancestral", "eta": 0.3}), "eta"),
        (
            json!({"scheduler": "lcm", "timestep_spacing": "trailing"}),
            "timestep_spacing",
        ),
        (
            json!({"scheduler": "lcm", "num_inference_steps": 60}),
            "num_inference_steps",
        ),
        (json!({"timestep_spacing": "sideways"}), "timestep_spacing"),
        (json!({"guidance_rescale": 1.5}), "guidance_rescale"),
        (json!({"scheduler": "tcd", "eta": 2}), "eta"),
    ];
    for (fields, param) in refused {
        let mut body = small("a cat", 1);
        for (k, v) in fields.as_object().expect("object") {
            body[k] = v.clone();
        }
        let resp = post_generation(&client, &base, &body).await;
        eprintln!("{body} -> {}", resp.status());
        assert_error(resp, 400, Some(param), "invalid_value").await;
    }
    // Only the three good requests reached the worker.
    assert_eq!(server.stats().accepted, 3);
    server.shutdown().await.expect("shutdown");
}
