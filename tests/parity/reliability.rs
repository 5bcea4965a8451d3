//! Faults and load: panics and out-of-memory inside jobs (injected through the worker's
//! test hook), a broken model at start, overload by clients that honour `Retry-After`,
//! a soak of the real binary (resident memory, file descriptors), and idle or slow
//! connections. Servers run on 127.0.0.1 with the fixture model on the CPU.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypergen::app::server::conn::ConnTimeouts;
use hypergen::app::server::worker::{FaultPoint, WorkerHooks};
use hypergen::Error;
use serde_json::{json, Value};

use crate::common::fixture_dir;
use crate::server::{assert_error, config, decode_png, eventually, health, small, start};

/// Memory the simulated out-of-memory takes before failing, and a flag its drop sets:
/// what the failed job took must be given back.
struct Taken {
    _bytes: Vec<u8>,
    freed: Arc<AtomicBool>,
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.freed.store(true, Ordering::SeqCst);
    }
}

/// The faults the hook injects: a panic for prompt `panic` (once `hold` is cleared); for
/// prompt `oom` (at more than 64x64) memory taken, then CubeCL's out-of-memory panic;
/// failed device checks while `probe_failures` is above zero.
#[derive(Clone, Default)]
struct Faults {
    hold: Arc<AtomicBool>,
    freed: Arc<AtomicBool>,
    probe_failures: Arc<AtomicUsize>,
    probes: Arc<AtomicUsize>,
}

impl Faults {
    fn hooks(&self) -> WorkerHooks {
        let faults = self.clone();
        WorkerHooks {
            fault: Some(Arc::new(move |point| faults.inject(point))),
            ..WorkerHooks::default()
        }
    }

    fn inject(&self, point: FaultPoint<'_>) -> Result<(), Error> {
        match point {
            FaultPoint::Batch(requests) => {
                for r in requests {
                    if r.prompt == "panic" {
                        while self.hold.load(Ordering::SeqCst) {
                            std::thread::sleep(std::time::Duration::from_millis(5));
                        }
                        panic!("injected panic");
                    }
                    if r.prompt == "oom" && r.width * r.height > 64 * 64 {
                        let _taken = Taken {
                            _bytes: vec![1u8; 64 << 20],
                            freed: self.freed.clone(),
                        };
                        // What burn-cubecl panics with when an allocation fails.
                        panic!("can't allocate buffer of size: 4294967296");
                    }
                }
                Ok(())
            }
            FaultPoint::Probe => {
                self.probes.fetch_add(1, Ordering::SeqCst);
                let left = self.probe_failures.load(Ordering::SeqCst);
                if left > 0 {
                    self.probe_failures.store(left - 1, Ordering::SeqCst);
                    return Err(Error::Backend("injected device failure".into()));
                }
                Ok(())
            }
        }
    }
}

async fn generate(client: &reqwest::Client, base: &str, body: &Value) -> reqwest::Response {
    client
        .post(format!("{base}/v1/images/generations"))
        .json(body)
        .send()
        .await
        .expect("request")
}

/// `/health`: its status code, body and how long it took.
async fn health_of(client: &reqwest::Client, base: &str) -> (u16, Value, std::time::Duration) {
    let start = std::time::Instant::now();
    let resp = client
        .get(format!("{base}/health"))
        .send()
        .await
        .expect("health");
    let status = resp.status().as_u16();
    (
        status,
        resp.json().await.expect("health json"),
        start.elapsed(),
    )
}

async fn image_of(resp: reqwest::Response) -> Vec<u8> {
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    decode_png(body["data"][0]["b64_json"].as_str().expect("b64")).into_raw()
}

/// A panic inside a job fails that request alone (500, OpenAI's error object) and the
/// next request is served with the same result as before the panic; a simulated device
/// out-of-memory fails its request with advice, frees what it took, and a smaller
/// request then succeeds; a device that fails its check after a fault makes `/health`
/// unhealthy until it passes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_survives_faults() {
    let faults = Faults::default();
    let mut cfg = config();
    cfg.worker.hooks = faults.hooks();
    let server = start(cfg).await;
    let base = server.url();
    let client = reqwest::Client::new();
    let healthy = || async {
        let start = std::time::Instant::now();
        while health_of(&client, &base).await.1["status"] != "healthy" {
            assert!(start.elapsed().as_secs() < 30, "never healthy again");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };

    let before = image_of(generate(&client, &base, &small("a cat", 1)).await).await;

    // A panic fails its request alone: the one queued behind it is served, with the
    // image it had before the panic (the model is unchanged).
    faults.hold.store(true, Ordering::SeqCst);
    let panicking = tokio::spawn({
        let (client, base) = (client.clone(), base.clone());
        async move { generate(&client, &base, &small("panic", 2)).await }
    });
    eventually("the panicking job to start", || server.stats().started == 2).await;
    let queued = tokio::spawn({
        let (client, base) = (client.clone(), base.clone());
        async move { image_of(generate(&client, &base, &small("a cat", 1)).await).await }
    });
    eventually("the next job to queue", || server.stats().accepted == 3).await;
    faults.hold.store(false, Ordering::SeqCst);
    let resp = panicking.await.expect("task");
    assert_eq!(resp.status(), 500);
    assert_eq!(
        resp.headers().get("x-should-retry").map(|v| v.as_bytes()),
        Some(&b"false"[..])
    );
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["type"], "server_error", "{body}");
    assert_eq!(body["error"]["code"], "generation_failed", "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("injected panic"), "{message}");
    assert!(!message.contains('\n'), "one line, no backtrace: {message}");
    let after = queued.await.expect("task");
    assert!(after == before, "the model changed across the panic");
    healthy().await;
    assert_eq!(faults.probes.load(Ordering::SeqCst), 1);

    // Out of memory: a clear message; what the job took is freed; smaller succeeds.
    let resp = generate(
        &client,
        &base,
        &json!({"prompt": "oom", "size": "128x128", "num_inference_steps": 2, "seed": 3}),
    )
    .await;
    assert_eq!(resp.status(), 500);
    let body: Value = resp.json().await.expect("json");
    let message = body["error"]["message"].as_str().expect("message");
    for needle in ["out of memory", "128x128", "smaller"] {
        assert!(message.contains(needle), "`{needle}` missing: {message}");
    }
    assert!(
        faults.freed.load(Ordering::SeqCst),
        "the job's memory was not freed"
    );
    let smaller = generate(&client, &base, &small("oom", 4)).await;
    assert_eq!(smaller.status(), 200);
    healthy().await;

    // A device that fails its check: unhealthy, and requests refused with the reason,
    // until a check passes (each batch retries it).
    faults.probe_failures.store(2, Ordering::SeqCst);
    let resp = generate(&client, &base, &small("panic", 5)).await;
    assert_error(resp, 500, None, "generation_failed").await;
    eventually("the failed device check", || {
        faults.probe_failures.load(Ordering::SeqCst) == 1
    })
    .await;
    let (code, h, took) = health_of(&client, &base).await;
    assert_eq!((code, &h["status"]), (503, &json!("unhealthy")), "{h}");
    assert!(took.as_millis() < 1000, "{took:?}");
    let resp = generate(&client, &base, &small("a cat", 6)).await;
    assert_eq!(resp.status(), 500);
    let body: Value = resp.json().await.expect("json");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("has not recovered")),
        "{body}"
    );
    let (code, h, _) = health_of(&client, &base).await;
    assert_eq!((code, &h["status"]), (503, &json!("unhealthy")), "{h}");
    let recovered = image_of(generate(&client, &base, &small("a cat", 1)).await).await;
    assert!(recovered == before);
    let (h, _) = health(&client, &base).await;
    assert_eq!(h["status"], "healthy", "{h}");
    assert_eq!(faults.probes.load(Ordering::SeqCst), 5);

    let stats = server.stats();
    assert_eq!((stats.completed, stats.failed), (4, 4), "{stats:?}");
    server.shutdown().await.expect("shutdown");
}

/// A model folder whose weights are corrupt: `hypergen serve` exits non-zero naming the
/// file and the cause, without a panic.
#[test]
fn server_binary_exits_on_a_broken_model() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = tmp.path().join("broken-sdxl");
    std::fs::create_dir(&model).expect("mkdir");
    for entry in std::fs::read_dir(fixture_dir()).expect("fixture") {
        let entry = entry.expect("entry");
        let name = entry.file_name();
        if name != "unet" {
            std::os::unix::fs::symlink(entry.path(), model.join(&name)).expect("symlink");
        }
    }
    let unet = model.join("unet");
    std::fs::create_dir(&unet).expect("mkdir unet");
    let src = fixture_dir().join("unet");
    std::fs::copy(src.join("config.json"), unet.join("config.json")).expect("copy config");
    let weights = "diffusion_pytorch_model.safetensors";
    let bytes = std::fs::read(src.join(weights)).expect("read weights");
    std::fs::write(unet.join(weights), &bytes[..bytes.len() / 3]).expect("write truncated");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hypergen"))
        .arg("serve")
        .arg(&model)
        .args(["--port", "0", "--device", "cpu", "--dtype", "float32"])
        .output()
        .expect("run hypergen serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains(weights) && stderr.contains("truncated or corrupt"),
        "the cause is named: {stderr}"
    );
}

/// 200 idle keep-alive connections, clients that dribble a request head or a body, and
/// clients that never read their answer: `/health` answers each time in under 100 ms
/// meanwhile, the slow ones are closed at their deadlines (head, body: 408, idle), and
/// a generation still succeeds afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_idle_and_slow_clients() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    let mut cfg = config();
    cfg.timeouts = ConnTimeouts {
        keep_alive: Duration::from_secs(3),
        head: Duration::from_secs(1),
        body: Duration::from_secs(1),
    };
    let server = start(cfg).await;
    let addr = server.local_addr();
    let base = server.url();
    let client = reqwest::Client::new();
    // Connected and warm before the load, so that its own connection is not the test.
    health_of(&client, &base).await;

    // 200 keep-alive connections, each used once, then idle.
    let mut idle = Vec::new();
    for _ in 0..200 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).await.expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
        idle.push(s);
    }
    // Dribblers: a head a line at a time, and a body a byte at a time, never done.
    let dribble = |head: &'static [u8], each: &'static [u8]| {
        tokio::spawn(async move {
            let start = Instant::now();
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(head).await.expect("write");
            let mut answer = Vec::new();
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if s.write_all(each).await.is_err() {
                    break;
                }
                let mut buf = [0u8; 1024];
                match tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
                    Err(_) => {}
                }
                assert!(start.elapsed() < Duration::from_secs(20), "never closed");
            }
            (
                start.elapsed(),
                String::from_utf8_lossy(&answer).to_string(),
            )
        })
    };
    let heads: Vec<_> = (0..20)
        .map(|_| dribble(b"GET /health HTTP/1.1\r\n", b"X-Slow: 1\r\n"))
        .collect();
    let bodies: Vec<_> = (0..20)
        .map(|_| {
            dribble(
                b"POST /v1/images/generations HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{",
                b" ",
            )
        })
        .collect();
    let mut worst = Duration::ZERO;
    for _ in 0..30 {
        let (code, _, took) = health_of(&client, &base).await;
        assert_eq!(code, 200);
        worst = worst.max(took);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("/health with 200 idle and 40 slow connections: slowest of 30 {worst:?}");
    assert!(worst < Duration::from_millis(100), "/health took {worst:?}");

    for task in heads {
        let (after, answer) = task.await.expect("task");
        assert!(
            after < Duration::from_secs(4),
            "head dribbler held {after:?}"
        );
        assert!(answer.is_empty(), "{answer}");
    }
    for task in bodies {
        let (after, answer) = task.await.expect("task");
        assert!(
            after < Duration::from_secs(4),
            "body dribbler held {after:?}"
        );
        assert!(
            answer.starts_with("HTTP/1.1 408") && answer.contains("request_timeout"),
            "{answer}"
        );
    }
    // The idle ones are closed after keep_alive.
    for mut s in idle {
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("an idle connection is closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
    eventually("the connections to close", || {
        server.open_connections() <= 1
    })
    .await;
    let resp = client
        .post(format!("{base}/v1/images/generations"))
        .json(&small("after", 1))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    server.shutdown().await.expect("shutdown");
}
