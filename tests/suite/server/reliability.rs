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

use crate::common::{fixture_dir, fixture_server_config, start_server};
use crate::server::api::{assert_error, eventually, health, post_generation, small};

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

/// A panic inside a job fails that request alone (500, OpenAI's error object) and the
/// next request is served with the same result as before the panic; a simulated device
/// out-of-memory fails its request with advice, frees what it took, and a smaller
/// request then succeeds; a device that fails its check after a fault makes `/health`
/// unhealthy until it passes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_survives_faults() {
    let faults = Faults::default();
    let mut cfg = fixture_server_config();
    cfg.worker.hooks = faults.hooks();
    let server = start_server(cfg).await;
    let base = server.url();
    let client = reqwest::Client::new();
    let healthy = || async {
        let start = std::time::Instant::now();
        while health_of(&client, &base).await.1["status"] != "healthy" {
            assert!(start.elapsed().as_secs() < 30, "never healthy again");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };

    let before = crate::common::image_of(post_generation(&client, &base, &small("a cat", 1)).await)
        .await
        .1;

    // A panic fails its request alone: the one queued behind it is served, with the
    // image it had before the panic (the model is unchanged).
    faults.hold.store(true, Ordering::SeqCst);
    let panicking = tokio::spawn({
        let (client, base) = (client.clone(), base.clone());
        async move { post_generation(&client, &base, &small("panic", 2)).await }
    });
    eventually("the panicking job to start", || server.stats().started == 2).await;
    let queued = tokio::spawn({
        let (client, base) = (client.clone(), base.clone());
        async move {
            crate::common::image_of(post_generation(&client, &base, &small("a cat", 1)).await)
                .await
                .1
        }
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
    let resp = post_generation(
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
    let smaller = post_generation(&client, &base, &small("oom", 4)).await;
    assert_eq!(smaller.status(), 200);
    healthy().await;

    // A device that fails its check: unhealthy, and requests refused with the reason,
    // until a check passes (each batch retries it).
    faults.probe_failures.store(2, Ordering::SeqCst);
    let resp = post_generation(&client, &base, &small("panic", 5)).await;
    assert_error(resp, 500, None, "generation_failed").await;
    eventually("the failed device check", || {
        faults.probe_failures.load(Ordering::SeqCst) == 1
    })
    .await;
    let (code, h, took) = health_of(&client, &base).await;
    assert_eq!((code, &h["status"]), (503, &json!("unhealthy")), "{h}");
    assert!(took.as_millis() < 1000, "{took:?}");
    let resp = post_generation(&client, &base, &small("a cat", 6)).await;
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
    let recovered =
        crate::common::image_of(post_generation(&client, &base, &small("a cat", 1)).await)
            .await
            .1;
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

    let mut cfg = fixture_server_config();
    cfg.timeouts = ConnTimeouts {
        keep_alive: Duration::from_secs(3),
        head: Duration::from_secs(1),
        body: Duration::from_secs(1),
    };
    let server = start_server(cfg).await;
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

/// POSTs `body` until it is accepted, sleeping as each 503's `Retry-After` says (at most
/// 40 tries); returns the answer's JSON and how many 503s it met.
async fn generate_honouring_retry_after(
    client: &reqwest::Client,
    base: &str,
    body: &Value,
) -> (Value, u64) {
    let mut refused = 0;
    for _ in 0..40 {
        let resp = post_generation(client, base, body).await;
        if resp.status() == 503 {
            let secs: u64 = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .expect("a 503 carries Retry-After");
            refused += 1;
            tokio::time::sleep(Duration::from_secs(secs)).await;
            continue;
        }
        assert_eq!(resp.status(), 200);
        return (resp.json().await.expect("json"), refused);
    }
    panic!("never accepted after 40 tries");
}

/// Ten times the queue's size of concurrent clients that honour `Retry-After` all get
/// their own image, once: each answer carries its client's prompt and seed, and the
/// server ran exactly one job per client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_overload_with_retry_after() {
    const QUEUE: usize = 1;
    const CLIENTS: usize = 10 * QUEUE;
    let mut cfg = fixture_server_config();
    cfg.worker.max_queue_size = QUEUE;
    let server = start_server(cfg).await;
    let base = server.url();
    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let base = base.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let prompt = format!("client {i}");
                let seed = 1000 + i as u64;
                let (body, refused) =
                    generate_honouring_retry_after(&client, &base, &small(&prompt, seed)).await;
                (i, prompt, seed, body, refused)
            })
        })
        .collect();
    let mut refused = 0;
    let mut images = std::collections::HashSet::new();
    for task in tasks {
        let (i, prompt, seed, body, r) = task.await.expect("task");
        refused += r;
        let data = body["data"].as_array().expect("data");
        assert_eq!(data.len(), 1, "client {i}: {body}");
        assert_eq!(data[0]["revised_prompt"], prompt.as_str());
        let b64 = data[0]["b64_json"].as_str().expect("b64");
        let png = crate::common::b64_bytes(b64);
        let needle = format!("Seed: {seed},");
        assert!(
            png.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "client {i} got another client's image"
        );
        assert!(images.insert(png), "client {i}: a duplicate image");
    }
    // The worker counts a job just after sending its answer: let the last count land.
    let settle = std::time::Instant::now();
    while server.stats().completed < CLIENTS as u64 && settle.elapsed().as_secs() < 5 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let stats = server.stats();
    eprintln!(
        "{CLIENTS} clients, queue {QUEUE}: all served in {:.1} s after {refused} 503s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        (stats.accepted, stats.started, stats.completed, stats.failed),
        (CLIENTS as u64, CLIENTS as u64, CLIENTS as u64, 0),
        "{stats:?}"
    );
    assert_eq!(stats.refused, refused, "{stats:?}");
    assert!(refused > 0, "the queue never filled: not an overload");
    server.shutdown().await.expect("shutdown");
}

/// Resident memory (kB) and open file descriptors of process `pid`.
fn rss_and_fds(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count();
    (rss, fds)
}

/// The real binary under 2,000 requests (per hundred: four generations, the rest cheap
/// requests of every kind: health, models, refused bodies, unknown routes and files),
/// from clients that come and go: resident memory ends within 10 % of its level after
/// the first hundred, and no file descriptor is left behind.
#[test]
fn server_binary_soak() {
    const REQUESTS: usize = 2000;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hypergen"))
        .arg("serve")
        .arg(fixture_dir())
        .args(["--host", "127.0.0.1", "--port", "0", "--device", "cpu"])
        .args(["--dtype", "float32"])
        .env("RUST_LOG", "warn,hypergen=info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start hypergen serve");
    let pid = child.id();
    let stderr = child.stderr.take().expect("stderr");
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let addr: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
                let _ = addr_tx.send(addr);
            }
        }
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the server listens");
    let base = format!("http://{addr}");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // Every client's connections closed, the server's descriptors settle.
    let settled = |pid: u32| {
        let mut last = rss_and_fds(pid);
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(50));
            let now = rss_and_fds(pid);
            if now.1 == last.1 {
                return now;
            }
            last = now;
        }
        last
    };
    let started = Instant::now();
    let mut generations = 0;
    let mut first = None;
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    for block in 0..REQUESTS / 100 {
        // A new client per block: its connections open, are reused, then close.
        runtime.block_on(async {
            let client = reqwest::Client::new();
            let mut pending = Vec::new();
            for k in 0..100 {
                let n = block * 100 + k;
                // Per hundred: 4 generations, 32 health, 20 models (200); 20 bad
                // sizes, 8 malformed bodies (400); 8 unknown files, 8 unknown routes (404).
                let req = match k % 25 {
                    0 => {
                        generations += 1;
                        client
                            .post(format!("{base}/v1/images/generations"))
                            .json(&small("soak", n as u64))
                    }
                    1..=8 => client.get(format!("{base}/health")),
                    9..=13 => client.get(format!("{base}/v1/models")),
                    14..=18 => client
                        .post(format!("{base}/v1/images/generations"))
                        .json(&json!({"prompt": "x", "size": "65x64"})),
                    19..=20 => client
                        .post(format!("{base}/v1/images/generations"))
                        .body("{not json"),
                    21..=22 => client.get(format!("{base}/v1/images/files/{n:032x}")),
                    _ => client.get(format!("{base}/nothing/{n}")),
                };
                pending.push(tokio::spawn(async move {
                    let resp = req.send().await.expect("request");
                    let status = resp.status().as_u16();
                    resp.bytes().await.expect("body");
                    status
                }));
                // At most 8 in flight.
                if pending.len() == 8 {
                    let status = pending.remove(0).await.expect("task");
                    *by_status.entry(status).or_default() += 1;
                }
            }
            for task in pending {
                *by_status.entry(task.await.expect("task")).or_default() += 1;
            }
        });
        if block == 0 {
            first = Some(settled(pid));
        }
    }
    let elapsed = started.elapsed();
    let (rss0, fds0) = first.expect("first hundred");
    let (rss, fds) = settled(pid);
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let exit = child.wait().expect("wait");
    eprintln!(
        "soak: {REQUESTS} requests ({generations} generations) in {:.1} s; statuses {by_status:?}; \
         RSS {rss0} kB after 100, {rss} kB after {REQUESTS} ({:+.1} %); fds {fds0} → {fds}",
        elapsed.as_secs_f64(),
        100.0 * (rss as f64 - rss0 as f64) / rss0 as f64
    );
    assert_eq!(by_status.values().sum::<usize>(), REQUESTS);
    let per_hundred = |n: usize| Some(REQUESTS / 100 * n);
    assert_eq!(
        by_status.get(&200).copied(),
        per_hundred(56),
        "{by_status:?}"
    );
    assert_eq!(
        by_status.get(&400).copied(),
        per_hundred(28),
        "{by_status:?}"
    );
    assert_eq!(
        by_status.get(&404).copied(),
        per_hundred(16),
        "{by_status:?}"
    );
    assert!(
        (rss as f64) <= rss0 as f64 * 1.10,
        "resident memory grew from {rss0} kB to {rss} kB"
    );
    assert!(
        fds <= fds0,
        "file descriptors: {fds0} after 100, {fds} at the end"
    );
    assert!(exit.success(), "{exit:?}");
}
