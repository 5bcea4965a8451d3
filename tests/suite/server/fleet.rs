//! Running hypergen as a fleet: `/metrics`, request ids and the access log, JSON logs,
//! the drain on SIGTERM, and three real replicas behind HAProxy (deploy/haproxy) with a
//! rolling restart and a `kill -9` under load. Small images (64x64, 2 steps) on the CPU,
//! one thread per replica: the machine has two cores.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hypergen::app::server::worker::WarmUp;
use serde_json::{json, Value};

use crate::common::fixture_dir;

const KEY: &str = "sk-fleet-0123456789";

fn small(seed: u64) -> Value {
    json!({"prompt": "fleet", "size": "64x64", "num_inference_steps": 2, "seed": seed})
}

/// The value of the series `name{labels}` (labels as Prometheus writes them, sorted),
/// or 0 when the series is absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse::<f64>().ok())?
        })
        .unwrap_or(0.0)
}

const GEN_200: &str = r#"hypergen_requests_total{route="/v1/images/generations",status="200"}"#;

/// `/metrics` in-process: every listed name, request and image counts, refusals by
/// reason, queue and step histograms, request ids, and `--metrics-auth`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_metrics_and_request_ids() {
    let mut config = crate::common::fixture_server_config();
    config.api_key = Some(KEY.parse().expect("key"));
    config.metrics_auth = true;
    // A warm-up runs, and is no request: the counts below do not include it.
    config.worker.warmup = Some(WarmUp {
        width: 64,
        height: 64,
        steps: 3,
        gpu_only: false,
    });
    let server = crate::common::start_server(config).await;
    let base = server.url();
    let client = reqwest::Client::new();
    let gen = format!("{base}/v1/images/generations");

    // --metrics-auth: the key is needed.
    let resp = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(resp.status(), 401);

    // A client's id is echoed; without one, one is made.
    let resp = client
        .post(&gen)
        .bearer_auth(KEY)
        .header("x-request-id", "client-id-1")
        .json(&small(1))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "client-id-1");
    let mut two = small(2);
    two["n"] = json!(2);
    let resp = client
        .post(&gen)
        .bearer_auth(KEY)
        .json(&two)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let made = resp.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert_eq!(made.len(), 32, "{made}");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["data"].as_array().map(Vec::len), Some(2));
    // Refusals, by reason: a bad value and a missing key.
    let resp = client
        .post(&gen)
        .bearer_auth(KEY)
        .json(&json!({"prompt": "x", "num_inference_steps": 0}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 400);
    assert!(resp.headers().contains_key("x-request-id"));
    let resp = client
        .post(&gen)
        .json(&small(3))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 401);

    // A streamed request is counted when its stream ends.
    let mut streamed = small(4);
    streamed["stream"] = json!(true);
    let resp = client
        .post(&gen)
        .bearer_auth(KEY)
        .header("x-request-id", "streamed-1")
        .json(&streamed)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.headers()["x-request-id"], "streamed-1");
    let events = resp.text().await.expect("events");
    assert!(events.contains("image_generation.completed"), "{events}");
    let start = Instant::now();
    loop {
        let text = client
            .get(format!("{base}/metrics"))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        if sample(&text, GEN_200) == 3.0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let resp = client
        .get(format!("{base}/metrics"))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("metrics");
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .starts_with("text/plain; version=0.0.4"));
    let text = resp.text().await.expect("text");
    for name in [
        "hypergen_queue_size",
        "hypergen_queue_capacity",
        "hypergen_requests_running",
        "hypergen_request_duration_seconds",
        "hypergen_request_queue_duration_seconds",
        "hypergen_request_inference_duration_seconds",
        "hypergen_step_duration_seconds",
        "hypergen_batch_size",
        "hypergen_requests_total",
        "hypergen_images_total",
        "hypergen_rejected_total",
        "hypergen_info",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{text}"
        );
    }
    assert_eq!(sample(&text, GEN_200), 3.0, "{text}");
    assert_eq!(sample(&text, "hypergen_images_total"), 4.0, "{text}");
    assert_eq!(sample(&text, "hypergen_queue_capacity"), 100.0);
    assert_eq!(sample(&text, "hypergen_queue_size"), 0.0);
    assert_eq!(sample(&text, "hypergen_requests_running"), 0.0);
    assert_eq!(
        sample(&text, r#"hypergen_rejected_total{reason="invalid_value"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"hypergen_rejected_total{reason="missing_api_key"}"#
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"hypergen_requests_total{route="/v1/images/generations",status="400"}"#
        ),
        1.0
    );
    // Three requests ran, one batch each, two steps each.
    assert_eq!(sample(&text, "hypergen_batch_size_count"), 3.0);
    assert_eq!(sample(&text, "hypergen_batch_size_sum"), 3.0);
    assert_eq!(
        sample(&text, "hypergen_request_queue_duration_seconds_count"),
        3.0
    );
    assert_eq!(
        sample(&text, "hypergen_request_inference_duration_seconds_count"),
        3.0
    );
    assert_eq!(sample(&text, "hypergen_step_duration_seconds_count"), 6.0);
    let info = format!(
        r#"hypergen_info{{device="cpu",dtype="float32",model="{}",version="{}"}}"#,
        fixture_dir().display(),
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&text, &info), 1.0, "{text}");
    // The CPU has no device allocator: no memory gauges rather than zeros.
    assert!(!text.contains("hypergen_device_memory"), "{text}");
    server.shutdown().await.expect("shutdown");
}

/// A `hypergen serve` child process and its log lines (stderr).
struct Replica {
    name: String,
    port: u16,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Replica {
    /// Starts the fixture model on 127.0.0.1:`port` (0: any) with JSON logs and one CPU
    /// thread; returns once it listens.
    fn start(name: &str, port: u16, extra: &[&str]) -> Replica {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hypergen"))
            .arg("serve")
            .arg(fixture_dir())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--device", "cpu", "--dtype", "float32", "--threads", "1"])
            .args(["--log-format", "json", "--warmup-size", "64x64"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start hypergen serve");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let reader = {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(rest) = line.split("listening on http://").nth(1) {
                        let addr: String =
                            rest.chars().take_while(|c| !c.is_whitespace()).collect();
                        let _ = addr_tx.send(addr);
                    }
                    log.lock().expect("log").push(line);
                }
            })
        };
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| {
                panic!(
                    "{name} never listened:\n{}",
                    log.lock().expect("log").join("\n")
                )
            });
        let port = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        Replica {
            name: name.into(),
            port,
            child,
            log,
            reader: Some(reader),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit (panics after `limit`); returns its status and
    /// its whole log.
    fn wait(mut self, limit: Duration) -> (std::process::ExitStatus, Vec<String>) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!(
                    "{} did not exit within {limit:?}:\n{}",
                    self.name,
                    self.log.lock().expect("log").join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let log = self.log.lock().expect("log").clone();
        (status, log)
    }

    /// The JSON access-log lines so far.
    fn access_lines(&self) -> Vec<Value> {
        access_lines(&self.log.lock().expect("log"))
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every line is JSON (`--log-format json`); the access-log lines among them.
fn access_lines(log: &[String]) -> Vec<Value> {
    log.iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|v| v["target"] == "hypergen::access")
        .collect()
}

/// `(status, body, headers)` of a generation request.
async fn generate(
    client: &reqwest::Client,
    base: &str,
    body: &Value,
    id: &str,
) -> Result<(u16, Value, reqwest::header::HeaderMap), String> {
    let resp = client
        .post(format!("{base}/v1/images/generations"))
        .header("x-request-id", id)
        .json(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.json::<Value>().await.map_err(|e| e.to_string())?;
    Ok((status, body, headers))
}

/// The binary: JSON logs with an access line per request (request id, status, queue
/// wait, images, no prompt); SIGTERM drains: `/health` unhealthy and new requests 503 +
/// Retry-After at once, the running and queued requests all answered 200, exit 0.
/// Then `--drain-timeout 1` with a long job: it is stopped and answered 503, exit 0.
#[test]
fn fleet_binary_drains_on_sigterm() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let client = reqwest::Client::new();

    let replica = Replica::start("drain", 0, &["--drain-timeout", "60"]);
    let base = replica.url();
    runtime.block_on(async {
        let mut long = small(1);
        long["num_inference_steps"] = json!(40);
        let running = {
            let (client, base) = (client.clone(), base.clone());
            tokio::spawn(async move { generate(&client, &base, &long, "drain-running").await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let queued: Vec<_> = (0..2)
            .map(|i| {
                let (client, base) = (client.clone(), base.clone());
                tokio::spawn(async move {
                    generate(&client, &base, &small(10 + i), &format!("drain-queued-{i}")).await
                })
            })
            .collect();
        let start = Instant::now();
        loop {
            let h: Value = client
                .get(format!("{base}/health"))
                .send()
                .await
                .expect("health")
                .json()
                .await
                .expect("json");
            if h["queue_size"] == 2 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "never queued: {h}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        replica.signal("-TERM");
        // Unhealthy at once, while the jobs still run.
        let start = Instant::now();
        loop {
            let resp = client
                .get(format!("{base}/health"))
                .send()
                .await
                .expect("health while draining");
            if resp.status() == 503 {
                let h: Value = resp.json().await.expect("json");
                assert_eq!(h["status"], "unhealthy");
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "still healthy");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (status, body, headers) = generate(&client, &base, &small(5), "drain-new")
            .await
            .expect("a new request during the drain is answered");
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "shutting_down");
        assert_eq!(headers["retry-after"], "5");
        assert_eq!(headers["x-request-id"], "drain-new");
        let (status, body, _) = running.await.expect("task").expect("running answered");
        assert_eq!(status, 200, "{body}");
        for q in queued {
            let (status, body, _) = q.await.expect("task").expect("queued answered");
            assert_eq!(
                status, 200,
                "queued requests are finished by the drain: {body}"
            );
        }
    });
    let (status, log) = replica.wait(Duration::from_secs(60));
    assert!(status.success(), "exit {status:?}:\n{}", log.join("\n"));
    // Warm start: the warm-up generation ran before the server listened.
    let at = |what: &str| log.iter().position(|l| l.contains(what));
    assert!(
        at("warmed up").is_some() && at("warmed up") < at("listening on"),
        "{}",
        log.join("\n")
    );
    let lines = access_lines(&log);
    let by_id: BTreeMap<String, &Value> = lines
        .iter()
        .filter_map(|l| Some((l["request_id"].as_str()?.to_string(), l)))
        .collect();
    let ok = by_id["drain-queued-0"];
    assert_eq!(ok["status"], 200, "{ok}");
    assert_eq!(ok["method"], "POST");
    assert_eq!(ok["route"], "/v1/images/generations");
    assert_eq!(ok["images"], 1);
    assert!(ok["duration_seconds"].as_f64().is_some_and(|d| d > 0.0));
    // It waited behind the 40-step job.
    assert!(
        ok["queue_seconds"].as_f64().is_some_and(|d| d > 0.0),
        "{ok}"
    );
    assert!(ok.get("prompt").is_none(), "prompts are not logged: {ok}");
    assert_eq!(by_id["drain-new"]["status"], 503);
    assert_eq!(by_id["drain-running"]["status"], 200);

    // Out of time: the running job is stopped and answered 503.
    let replica = Replica::start(
        "drain-timeout",
        0,
        &["--drain-timeout", "1", "--log-prompts"],
    );
    let base = replica.url();
    runtime.block_on(async {
        let mut long = small(1);
        // Far longer than the 1 s drain: 150 steps at 128x128.
        long["num_inference_steps"] = json!(150);
        long["size"] = json!("128x128");
        let running = {
            let (client, base) = (client.clone(), base.clone());
            tokio::spawn(async move { generate(&client, &base, &long, "too-long").await })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        replica.signal("-TERM");
        let (status, body, headers) = running.await.expect("task").expect("answered");
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "shutting_down");
        assert_eq!(headers["retry-after"], "5");
    });
    let (status, log) = replica.wait(Duration::from_secs(30));
    assert!(status.success(), "exit {status:?}:\n{}", log.join("\n"));
    let lines = access_lines(&log);
    let line = lines
        .iter()
        .find(|l| l["request_id"] == "too-long")
        .expect("logged");
    assert_eq!(line["prompt"], "fleet", "--log-prompts: {line}");
    assert!(
        log.iter().any(|l| l.contains("drain timed out")),
        "{}",
        log.join("\n")
    );
}

/// A free loopback port (bound, then released for the child to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// HAProxy on deploy/haproxy/haproxy.cfg, with the replicas' addresses in its
/// environment.
struct Haproxy {
    child: Child,
    socket: PathBuf,
    port: u16,
}

impl Haproxy {
    fn start(dir: &Path, ports: &[u16; 3]) -> Haproxy {
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/haproxy/haproxy.cfg");
        let socket = dir.join("haproxy.sock");
        let port = free_port();
        let mut cmd = Command::new("haproxy");
        cmd.env("HAPROXY_STATS_SOCKET", &socket)
            .env("HYPERGEN_LB_BIND", format!("127.0.0.1:{port}"));
        for (i, p) in ports.iter().enumerate() {
            cmd.env(format!("HYPERGEN_{}", i + 1), format!("127.0.0.1:{p}"));
        }
        let check = cmd
            .args(["-c", "-q", "-f"])
            .arg(&config)
            .output()
            .expect("haproxy -c");
        assert!(
            check.status.success(),
            "haproxy rejects deploy/haproxy/haproxy.cfg:\n{}",
            String::from_utf8_lossy(&check.stderr)
        );
        let mut cmd = Command::new("haproxy");
        cmd.env("HAPROXY_STATS_SOCKET", &socket)
            .env("HYPERGEN_LB_BIND", format!("127.0.0.1:{port}"));
        for (i, p) in ports.iter().enumerate() {
            cmd.env(format!("HYPERGEN_{}", i + 1), format!("127.0.0.1:{p}"));
        }
        let log = std::fs::File::create(dir.join("haproxy.log")).expect("log file");
        let child = cmd
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start haproxy");
        let start = Instant::now();
        while !socket.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "haproxy did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Haproxy {
            child,
            socket,
            port,
        }
    }

    /// Each server's status (`UP`, `DOWN`, `UP 1/2`, ...) from the runtime API.
    fn status(&self) -> BTreeMap<String, String> {
        let mut s = std::os::unix::net::UnixStream::connect(&self.socket).expect("socket");
        s.write_all(b"show stat\n").expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        let mut lines = out.lines();
        let header: Vec<&str> = lines
            .next()
            .expect("header")
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = |name: &str| header.iter().position(|h| *h == name).expect("column");
        let (px, sv, st) = (col("pxname"), col("svname"), col("status"));
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > st && f[px] == "hypergen" && f[sv].starts_with("hypergen-"))
            .map(|f| (f[sv].to_string(), f[st].to_string()))
            .collect()
    }

    /// Waits until server `name` has status `want` (exactly); returns how long it took.
    fn wait_for(&self, name: &str, want: &str, limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let status = self.status();
            if status.get(name).map(String::as_str) == Some(want) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "{name} not {want} within {limit:?}: {status:?}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the load generator saw of one request.
#[derive(Debug, Clone)]
struct Outcome {
    /// Order in which requests were sent, over all clients.
    seq: usize,
    id: String,
    status: u16,
    served_by: String,
    images: usize,
    /// Why it failed (shown by `Debug` when an assertion fails).
    #[allow(dead_code)]
    error: Option<String>,
}

/// `clients` tasks sending small requests through the balancer until `stop`.
fn load(
    runtime: &tokio::runtime::Runtime,
    base: String,
    clients: usize,
    phase: &'static str,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<Vec<Outcome>>> {
    (0..clients)
        .map(|c| {
            let (base, stop, sent) = (base.clone(), stop.clone(), sent.clone());
            runtime.spawn(async move {
                let client = reqwest::Client::new();
                let mut out = Vec::new();
                // Bounded: a stuck balancer ends the phase instead of hanging the test.
                for i in 0..400 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let seq = sent.fetch_add(1, Ordering::SeqCst);
                    let id = format!("{phase}-{c}-{i}");
                    let outcome = match generate(&client, &base, &small(i), &id).await {
                        Ok((status, body, headers)) => Outcome {
                            seq,
                            id: id.clone(),
                            status,
                            served_by: headers
                                .get("x-served-by")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string(),
                            images: body["data"].as_array().map_or(0, |d| {
                                d.iter().filter(|i| i["b64_json"].is_string()).count()
                            }),
                            error: (status != 200).then(|| body.to_string()),
                        },
                        Err(e) => Outcome {
                            seq,
                            id,
                            status: 0,
                            served_by: String::new(),
                            images: 0,
                            error: Some(e),
                        },
                    };
                    out.push(outcome);
                }
                out
            })
        })
        .collect()
}

fn collect(
    runtime: &tokio::runtime::Runtime,
    tasks: Vec<tokio::task::JoinHandle<Vec<Outcome>>>,
) -> Vec<Outcome> {
    runtime.block_on(async {
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("load task"));
        }
        all
    })
}

async fn scrape(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// Three replicas behind HAProxy configured as deploy/haproxy/haproxy.cfg, under steady
/// load: `/metrics` account for every request; a SIGTERM rolling restart of each replica
/// in turn loses no request (their access logs hold every request id exactly once with
/// status 200); a `kill -9` is out of rotation within three health intervals and only
/// requests in flight on it may fail.
#[test]
fn fleet_haproxy_rolling_restart() {
    let has_haproxy = Command::new("haproxy")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    let found = match has_haproxy {
        true => Ok(()),
        false => {
            Err("haproxy is missing (apt-get install haproxy; scripts/test installs it)".into())
        }
    };
    if !crate::common::tool_present("fleet_haproxy_rolling_restart", found) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let names = ["hypergen-1", "hypergen-2", "hypergen-3"];
    let extra = ["--drain-timeout", "20"];
    let mut replicas: Vec<Option<Replica>> = names
        .iter()
        .map(|n| Some(Replica::start(n, free_port(), &extra)))
        .collect();
    let live = |r: &[Option<Replica>]| -> Vec<(String, String)> {
        r.iter()
            .flatten()
            .map(|r| (r.name.clone(), r.url()))
            .collect()
    };
    let ports = names.map(|n| {
        replicas
            .iter()
            .flatten()
            .find(|r| r.name == n)
            .map(|r| r.port)
            .expect("replica")
    });
    let lb = Haproxy::start(dir.path(), &ports);
    let base = format!("http://127.0.0.1:{}", lb.port);
    for n in names {
        lb.wait_for(n, "UP", Duration::from_secs(20));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let clients = 3;
    let sent = Arc::new(AtomicUsize::new(0));
    // Logs of replicas that have exited.
    let mut old_logs: Vec<Vec<String>> = Vec::new();

    // 1. Steady load; every replica's /metrics account for what it served.
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(
        &runtime,
        base.clone(),
        clients,
        "steady",
        stop.clone(),
        sent.clone(),
    );
    let start = Instant::now();
    while sent.load(Ordering::SeqCst) < 24 && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::SeqCst);
    let steady = collect(&runtime, tasks);
    assert!(steady.len() >= 24);
    for o in &steady {
        assert_eq!((o.status, o.images), (200, 1), "{o:?}");
    }
    runtime.block_on(async {
        let mut total = 0.0;
        for (name, url) in live(&replicas) {
            let text = scrape(&url).await;
            let served = steady.iter().filter(|o| o.served_by == name).count();
            assert_eq!(sample(&text, GEN_200), served as f64, "{name}:\n{text}");
            assert_eq!(sample(&text, "hypergen_images_total"), served as f64);
            total += sample(&text, GEN_200);
        }
        assert_eq!(total, steady.len() as f64);
    });

    // 2. Rolling restart under load: SIGTERM, wait for the exit, start again on the
    //    same port, wait until HAProxy has it back; then the next one.
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(
        &runtime,
        base.clone(),
        clients,
        "rolling",
        stop.clone(),
        sent.clone(),
    );
    std::thread::sleep(Duration::from_millis(500));
    for (i, name) in names.iter().enumerate() {
        let old = replicas[i].take().expect("replica");
        old.signal("-TERM");
        let port = old.port;
        let (status, log) = old.wait(Duration::from_secs(40));
        assert!(status.success(), "{name} exit {status:?}");
        old_logs.push(log);
        replicas[i] = Some(Replica::start(name, port, &extra));
        lb.wait_for(name, "UP", Duration::from_secs(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let rolling = collect(&runtime, tasks);
    let lost: Vec<&Outcome> = rolling
        .iter()
        .filter(|o| o.status != 200 || o.images != 1)
        .collect();
    assert!(
        lost.is_empty(),
        "requests lost in the rolling restart: {lost:?}"
    );
    assert!(rolling.len() >= 6, "too little load: {}", rolling.len());
    // Every request id of both phases is in exactly one replica's log with status 200.
    let mut logged: BTreeMap<String, usize> = BTreeMap::new();
    let current: Vec<Value> = replicas
        .iter()
        .flatten()
        .flat_map(Replica::access_lines)
        .collect();
    for line in old_logs.iter().flat_map(|l| access_lines(l)).chain(current) {
        if line["status"] == 200 && line["route"] == "/v1/images/generations" {
            let id = line["request_id"].as_str().expect("id").to_string();
            *logged.entry(id).or_default() += 1;
        }
    }
    let ids: BTreeSet<String> = steady
        .iter()
        .chain(&rolling)
        .map(|o| o.id.clone())
        .collect();
    let logged_ids: BTreeSet<String> = logged.keys().cloned().collect();
    assert_eq!(logged_ids, ids, "the access logs account for every request");
    assert!(logged.values().all(|n| *n == 1), "a request logged twice");

    // 3. kill -9 of one replica under load: out of rotation within three health
    //    intervals (1 s each); only its in-flight requests may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(
        &runtime,
        base.clone(),
        clients,
        "kill",
        stop.clone(),
        sent.clone(),
    );
    std::thread::sleep(Duration::from_millis(800));
    replicas[1].as_ref().expect("replica").signal("-KILL");
    let took = lb.wait_for("hypergen-2", "DOWN", Duration::from_secs(10));
    assert!(
        took <= Duration::from_secs(3),
        "hypergen-2 left the rotation after {took:?}"
    );
    let after_down = sent.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    let killed = collect(&runtime, tasks);
    // Failures only among requests sent before the replica was out of rotation, at most
    // one per client (each client has one request in flight).
    let failed: Vec<&Outcome> = killed.iter().filter(|o| o.status != 200).collect();
    assert!(
        failed.len() <= clients && failed.iter().all(|o| o.seq < after_down),
        "more failures than requests in flight on the killed replica: {failed:?}"
    );
    let later: Vec<&Outcome> = killed.iter().filter(|o| o.seq >= after_down).collect();
    assert!(!later.is_empty(), "no load after the kill");
    for o in later {
        assert_eq!((o.status, o.images), (200, 1), "{o:?}");
        assert_ne!(o.served_by, "hypergen-2", "served by a dead replica: {o:?}");
    }
    drop(lb);
    drop(replicas);
}

/// deploy/: the Kubernetes manifests against Kubernetes' schemas (kubernetes-validate),
/// the ServiceMonitor CRD and the manifests' agreement (probes, grace period, HPA) by
/// hand, the Dockerfile with hadolint, the HAProxy config (deploy/check.py).
#[test]
fn fleet_deploy_files_validate() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/check.py");
    let out = crate::common::python()
        .arg(&script)
        .output()
        .expect("run deploy/check.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Exit status 2: a tool is missing.
    let found = if out.status.code() == Some(2) {
        Err(text.clone())
    } else {
        Ok(())
    };
    if !crate::common::tool_present("fleet_deploy_files_validate", found) {
        return;
    }
    assert!(out.status.success(), "{text}");
    assert!(text.contains("deploy OK"), "{text}");
}
