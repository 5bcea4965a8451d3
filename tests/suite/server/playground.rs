//! The playground page at `/`: served without a key beside the API and its docs, and
//! used in a real headless Chromium (tests/playground_browser.py) against a real server
//! with an API key, the fixture model on the CPU.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hypergen::app::server::playground;
use hypergen::app::server::Server;

use crate::common::fixture_dir;

const KEY: &str = "sk-playground-0123456789";

/// The page, its style sheet and its script together stay small (uncompressed).
const PAGE_BUDGET_BYTES: usize = 64 << 10;

/// A server with an API key and a LoRA directory (`loras`) holding a copy of the
/// fixture's kohya adapter.
async fn start_with_key(loras: &Path) -> Server {
    std::fs::create_dir_all(loras).expect("mkdir");
    std::fs::copy(
        fixture_dir().join("loras/kohya-sgm.safetensors"),
        loras.join("kohya.safetensors"),
    )
    .expect("copy the fixture LoRA");
    let mut config = crate::common::fixture_server_config();
    config.api_key = Some(KEY.parse().expect("key"));
    config.lora_dir = Some(loras.to_path_buf());
    crate::common::start_server(config).await
}

/// `/` and `/playground` serve the page, and every file it names, without a key; the API
/// still wants the key; `/docs` and `/openapi.json` still answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playground_served_without_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = start_with_key(&tmp.path().join("loras")).await;
    let base = server.url();
    let client = reqwest::Client::new();
    let mut page = String::new();
    for path in ["/", "/playground"] {
        let resp = client
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("GET");
        assert_eq!(resp.status(), 200, "{path}");
        let ctype = resp.headers()["content-type"].to_str().expect("ascii");
        assert!(ctype.starts_with("text/html"), "{path}: {ctype}");
        let csp = resp.headers()["content-security-policy"]
            .to_str()
            .expect("ascii");
        assert!(csp.contains("default-src 'self'"), "{csp}");
        page = resp.text().await.expect("body");
        assert!(
            page.contains("<title>hypergen playground</title>"),
            "{path}"
        );
    }
    // Every local file the page loads is served, with its type; nothing comes from elsewhere.
    let mut assets = 0;
    for attr in ["src=\"", "href=\""] {
        for (i, _) in page.match_indices(attr) {
            let rest = &page[i + attr.len()..];
            let url = &rest[..rest.find('"').expect("closing quote")];
            assert!(
                !url.contains("//"),
                "the page loads `{url}` from another host"
            );
            if !url.starts_with("/playground/") {
                continue;
            }
            let resp = client
                .get(format!("{base}{url}"))
                .send()
                .await
                .expect("GET");
            assert_eq!(resp.status(), 200, "{url}");
            let ctype = resp.headers()["content-type"].to_str().expect("ascii");
            let want = if url.ends_with(".js") {
                "text/javascript"
            } else {
                "text/css"
            };
            assert!(ctype.starts_with(want), "{url}: {ctype}");
            assets += 1;
        }
    }
    assert_eq!(assets, 2, "the page names its script and style sheet");
    let size = playground::size_bytes();
    eprintln!("playground: {size} bytes (HTML + CSS + JS, uncompressed)");
    assert!(
        size <= PAGE_BUDGET_BYTES,
        "the playground grew to {size} bytes"
    );

    // Other methods are refused as the API refuses them; the API and docs are unchanged.
    let resp = client
        .post(format!("{base}/"))
        .send()
        .await
        .expect("POST /");
    assert_eq!(resp.status(), 405);
    let body: serde_json::Value = resp.json().await.expect("error JSON");
    assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
    for open in ["/docs", "/openapi.json", "/health"] {
        let resp = client
            .get(format!("{base}{open}"))
            .send()
            .await
            .expect("GET");
        assert_eq!(resp.status(), 200, "{open}");
    }
    let resp = client
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 401, "the API still needs the key");
    server.shutdown().await.expect("shutdown");
}

/// The tools the browser test needs, or what is missing.
fn browser_tools() -> Result<(), String> {
    let mut missing = Vec::new();
    for tool in ["chromium", "chromedriver"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join(tool).is_file()));
        if !found {
            missing.push(tool);
        }
    }
    if !missing.is_empty() {
        return Err(format!(
            "missing {} (apt-get install chromium chromium-driver; scripts/test installs them)",
            missing.join(", ")
        ));
    }
    crate::common::python_modules(&["selenium"])
}

/// Where the screenshots go: under the target directory, kept after the run.
fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("playground-screenshots")
}

/// The page in headless Chromium: generate with progress to 100 % and a 64×64 image,
/// the same seed again for the same pixels, an edit with a painted mask, a 400 shown in
/// the server's words, a cancelled run (which the server must stop), the history after a
/// reload, a phone-sized screen, and no console errors. Fails under CI without the
/// browser; elsewhere it prints a skip notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playground_in_chromium() {
    if !crate::common::tool_present("playground_in_chromium", browser_tools()) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = start_with_key(&tmp.path().join("loras")).await;
    let shots = screenshot_dir();
    let _ = std::fs::remove_dir_all(&shots);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/playground_browser.py");
    let base = server.url();
    let dir = shots.clone();
    let out = tokio::task::spawn_blocking(move || {
        crate::common::python()
            .arg(&script)
            .arg(&base)
            .arg(KEY)
            .arg(&dir)
            .output()
    })
    .await
    .expect("task")
    .expect("run the browser script");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    eprintln!("playground screenshots: {}", shots.display());
    assert!(out.status.success(), "the browser test failed:\n{text}");
    assert!(text.contains("playground browser OK"), "{text}");
    // Cancelling closed the stream, and the server stopped that job: four generations
    // (one with a LoRA) and one edit completed; the long run was cancelled while it ran.
    let start = Instant::now();
    while server.stats().cancelled == 0 && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = server.stats();
    assert_eq!(stats.cancelled, 1, "{stats:?}");
    assert_eq!(stats.completed, 5, "{stats:?}");
    assert_eq!(stats.failed, 0, "{stats:?}");
    server.shutdown().await.expect("shutdown");
}
