//! The HTTP contract, held by outside tools against real servers serving the fixture:
//! clients generated from the committed schema by four generators
//! (tests/sdk/run_sdks.py), schemathesis's every check in its examples, coverage and
//! fuzzing phases, and CORS for browser clients. The tools live in
//! `$HYPERGEN_TOOLS` (default `~/.cache/hypergen/tools`), installed by `scripts/test`;
//! without them these tests fail under CI and are skipped elsewhere.

use std::path::Path;
use std::time::Instant;

use hypergen::app::server::limits::RequestLimits;
use hypergen::app::server::Server;
use serde_json::{json, Value};

use crate::common::tools;

const KEY: &str = "sk-contract-0123456789";

/// Whether `tool` (relative to [`tools`]) is installed; under CI its absence fails.
fn has_tool(test: &str, tool: &str) -> bool {
    let path = tools().join(tool);
    let found = if path.exists() {
        Ok(())
    } else {
        Err(format!(
            "{} is missing: run scripts/test (it installs the tools) or set HYPERGEN_TOOLS",
            path.display()
        ))
    };
    crate::common::tool_present(test, found)
}

/// A server with a key whose valid generations stay cheap: 64x64 only, at most 4 steps
/// and 2 images.
async fn cheap_server(cors: &[&str]) -> Server {
    let mut config = crate::common::fixture_server_config();
    config.api_key = Some(KEY.parse().expect("key"));
    config.limits = RequestLimits {
        min_size: 64,
        max_size: 64,
        max_steps: 4,
        max_images: 2,
    };
    config.cors_origins = cors.iter().map(|o| o.to_string()).collect();
    crate::common::start_server(config).await
}

/// Runs `cmd` off the async runtime; returns its success and its output.
async fn run(mut cmd: std::process::Command) -> (bool, String) {
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("task")
        .expect("the tool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Clients generated from `openapi/openapi.json` by openapi-python-client, OpenAPI
/// Generator (`python`, `typescript-fetch`) and openapi-typescript + openapi-fetch: no
/// generator warning drops anything, and each client goes through every route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_generated_sdks() {
    let test = "contract_generated_sdks";
    if !has_tool(test, "venv/bin/openapi-generator-cli")
        || !has_tool(test, "node/node_modules/.bin/openapi-typescript")
    {
        return;
    }
    let server = cheap_server(&[]).await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::tempdir().expect("scratch folder");
    let mut cmd = crate::common::python();
    cmd.arg(root.join("tests/sdk/run_sdks.py"))
        .arg(root.join("openapi/openapi.json"))
        .arg(server.url())
        .arg(KEY)
        .arg(tools())
        .arg(work.path());
    let start = Instant::now();
    let (ok, text) = run(cmd).await;
    eprintln!(
        "{text}\n(generated SDKs: {:.0} s)",
        start.elapsed().as_secs_f64()
    );
    assert!(ok && text.contains("sdk clients OK"), "{text}");
    assert_eq!(server.stats().failed, 0);
    server.shutdown().await.expect("shutdown");
}

/// Cases schemathesis generates per operation (and phase).
const CASES_PER_OPERATION: usize = 1000;

/// schemathesis, every check, in its examples, coverage and fuzzing phases, with at
/// least 1,000 cases per operation against the live `/openapi.json`: no failure and no
/// warning. Deliberately dropped: positive-data refusals the schema cannot state, each
/// listed with its reason in tests/schemathesis/hooks.py.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_schemathesis() {
    let test = "contract_schemathesis";
    if !has_tool(test, "venv/bin/schemathesis") {
        return;
    }
    let server = cheap_server(&[]).await;
    let base = server.url();
    // An image to fetch, so that `GET /v1/images/files/{id}` is tested on a real id too.
    let client = reqwest::Client::new();
    let made: Value = client
        .post(format!("{base}/v1/images/generations"))
        .bearer_auth(KEY)
        .json(&json!({"prompt": "a cat", "size": "64x64", "num_inference_steps": 1, "response_format": "url"}))
        .send()
        .await
        .expect("generate")
        .json()
        .await
        .expect("json");
    let url = made["data"][0]["url"].as_str().expect("url");
    let id = url.rsplit('/').next().expect("id");
    let work = tempfile::tempdir().expect("scratch folder");
    let config = work.path().join("schemathesis.toml");
    // Warnings fail the run, all but two: the edit route's generated uploads seldom
    // decode as images, so most of its schema-valid cases are refused (see hooks.py),
    // which schemathesis reports as `validation_mismatch` and `low_valid_rate` (its
    // per-operation warning settings do not apply to `fail-on`).
    let fail_on = [
        "missing_auth",
        "missing_test_data",
        "base_url_mismatch",
        "missing_deserializer",
        "unused_openapi_auth",
        "unsupported_regex",
        "method_not_allowed",
        "unresolvable_reference",
        "rate_limited",
    ]
    .map(|w| format!("{w:?}"))
    .join(", ");
    std::fs::write(
        &config,
        format!("[warnings]\nfail-on = [{fail_on}]\n\n[parameters]\n\"path.id\" = \"{id}\"\n"),
    )
    .expect("config");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = std::process::Command::new(tools().join("venv/bin/schemathesis"));
    cmd.current_dir(work.path())
        .env(
            "SCHEMATHESIS_HOOKS",
            root.join("tests/schemathesis/hooks.py"),
        )
        .arg("--config-file")
        .arg(&config)
        .args(["--no-color", "run"])
        .arg(format!("{base}/openapi.json"))
        .args(["--checks", "all", "--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", &CASES_PER_OPERATION.to_string()])
        .args(["--header", &format!("Authorization: Bearer {KEY}")])
        .args([
            "--seed",
            "1",
            "--generation-database",
            "none",
            "--workers",
            "2",
        ])
        .args(["--request-timeout", "60"]);
    let start = Instant::now();
    let (ok, text) = run(cmd).await;
    eprintln!(
        "{text}\n(schemathesis: {:.0} s)",
        start.elapsed().as_secs_f64()
    );
    assert!(ok, "schemathesis failed:\n{text}");
    let stats = server.stats();
    assert_eq!(stats.failed, 0, "generations failed: {stats:?}");
    server.shutdown().await.expect("shutdown");
}

/// `--cors-origin`: a preflight and a request from an allowed origin get the CORS
/// headers; another origin does not; without the flag nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_cors() {
    let allowed = "https://app.example.com";
    let server = cheap_server(&[allowed, "http://localhost:5173"]).await;
    let base = server.url();
    let client = reqwest::Client::new();
    let preflight = |origin: &str| {
        client
            .request(
                reqwest::Method::OPTIONS,
                format!("{base}/v1/images/generations"),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
    };
    let resp = preflight(allowed).await.expect("preflight");
    assert!(resp.status().is_success(), "{}", resp.status());
    let h = resp.headers();
    assert_eq!(h["access-control-allow-origin"], allowed);
    let methods = h["access-control-allow-methods"].to_str().expect("ascii");
    assert!(methods.contains("POST"), "{methods}");
    let headers = h["access-control-allow-headers"]
        .to_str()
        .expect("ascii")
        .to_ascii_lowercase();
    assert!(
        headers.contains("authorization") && headers.contains("content-type"),
        "{headers}"
    );

    let resp = client
        .get(format!("{base}/v1/models"))
        .header("origin", allowed)
        .bearer_auth(KEY)
        .send()
        .await
        .expect("models");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["access-control-allow-origin"], allowed);
    let exposed = resp.headers()["access-control-expose-headers"]
        .to_str()
        .expect("ascii")
        .to_ascii_lowercase();
    assert!(exposed.contains("retry-after"), "{exposed}");

    // Another origin gets no CORS header (a browser then hides the answer from it).
    let resp = preflight("https://evil.example.com")
        .await
        .expect("preflight");
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    let resp = client
        .get(format!("{base}/health"))
        .header("origin", "https://evil.example.com")
        .send()
        .await
        .expect("health");
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    let body: Value = resp.json().await.expect("an error object or health");
    assert!(body.is_object());
    server.shutdown().await.expect("shutdown");

    // Off by default: no CORS headers, and OPTIONS is an ordinary 405 with `Allow`.
    let server = cheap_server(&[]).await;
    let base = server.url();
    let resp = client
        .request(
            reqwest::Method::OPTIONS,
            format!("{base}/v1/images/generations"),
        )
        .header("origin", allowed)
        .header("access-control-request-method", "POST")
        .send()
        .await
        .expect("preflight");
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "POST");
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    let resp = client
        .get(format!("{base}/health"))
        .header("origin", allowed)
        .send()
        .await
        .expect("health");
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    server.shutdown().await.expect("shutdown");
}
