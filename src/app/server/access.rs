//! The access log and request ids: a middleware around every route that takes the
//! client's `x-request-id` (or makes one), echoes it, writes one log line per request
//! (method, route, status, duration, queue wait, images, request id) and counts the
//! request in [`super::metrics`]. Streamed answers are logged when their stream ends.
//! Probes (`/health`, `/metrics`) are logged at `debug` so that they do not drown the
//! log; prompts only with `--log-prompts`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt as _;
use poem::http::{header, HeaderValue, StatusCode};
use poem::{Body, Endpoint, IntoResponse, Request, Response};

use super::worker::JobTiming;
use super::AppState;

/// The request id header, taken from the client (a proxy) or made, and echoed.
pub const REQUEST_ID: &str = "x-request-id";

/// Longest client request id kept; a longer (or non-printable) one is replaced.
const MAX_ID_LEN: usize = 128;

/// What a handler tells the access log about its request.
#[derive(Debug, Default)]
pub struct RequestRecord {
    /// The request id (the client's or ours).
    pub id: String,
    /// The job's queue wait, inference time and images, filled in by the worker.
    pub timing: Arc<JobTiming>,
    /// The prompt, when the operator asked for prompts in the log.
    prompt: Mutex<Option<String>>,
}

/// The timing handle to give the worker for `req`'s job, noting its prompt for the log
/// when the operator asked for prompts. Outside the middleware (no record): a fresh one.
pub fn job_timing(req: &Request, prompt: &str) -> Arc<JobTiming> {
    let Some(record) = req.extensions().get::<Arc<RequestRecord>>() else {
        return Arc::default();
    };
    let log_prompts = req
        .data::<Arc<AppState>>()
        .is_some_and(|s| s.config.log_prompts);
    if log_prompts {
        *record.prompt.lock().unwrap_or_else(|p| p.into_inner()) = Some(prompt.to_string());
    }
    record.timing.clone()
}

/// The route pattern of `path`, a bounded set of labels for metrics.
pub fn route_label(path: &str) -> &'static str {
    match path {
        "/health" => "/health",
        "/metrics" => "/metrics",
        "/v1/models" => "/v1/models",
        "/v1/images/generations" => "/v1/images/generations",
        "/v1/images/edits" => "/v1/images/edits",
        "/openapi.json" => "/openapi.json",
        p if p.starts_with("/v1/images/files/") => "/v1/images/files/{id}",
        p if p == "/docs" || p.starts_with("/docs/") => "/docs",
        _ => "other",
    }
}

/// A client's request id if it is usable (printable ASCII, not too long), else a new
/// random one.
fn request_id(given: Option<&str>) -> String {
    if let Some(id) = given {
        if !id.is_empty() && id.len() <= MAX_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic()) {
            return id.to_string();
        }
    }
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness: still unique within the process.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        bytes[..8].copy_from_slice(&n.to_le_bytes());
        bytes[8..].copy_from_slice(&super::unix_now().to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One request's line, written when it is dropped (at the end of a streamed body) or
/// by [`AccessEntry::finish`].
struct AccessEntry {
    state: Arc<AppState>,
    record: Arc<RequestRecord>,
    method: String,
    path: String,
    route: &'static str,
    status: u16,
    start: Instant,
    /// The error code of a refused image request.
    rejected: Option<String>,
    stream: bool,
}

impl AccessEntry {
    fn finish(self) {
        drop(self)
    }
}

impl Drop for AccessEntry {
    fn drop(&mut self) {
        let duration = self.start.elapsed();
        let timing = &self.record.timing;
        let images = timing.images();
        let metrics = &self.state.metrics;
        metrics.observe_request(self.route, self.status, duration);
        metrics.add_images(images);
        if let Some(reason) = &self.rejected {
            metrics.reject(reason);
        }
        let prompt = self
            .record
            .prompt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
        let probe = matches!(self.route, "/health" | "/metrics");
        macro_rules! line {
            ($level:expr) => {
                tracing::event!(
                    target: "hypergen::access",
                    $level,
                    request_id = %self.record.id,
                    method = %self.method,
                    path = %self.path,
                    route = self.route,
                    status = self.status,
                    duration_seconds = duration.as_secs_f64(),
                    queue_seconds = secs(timing.queue_wait()),
                    inference_seconds = secs(timing.inference()),
                    images,
                    stream = self.stream,
                    prompt = prompt.as_deref(),
                    "request"
                )
            };
        }
        if probe {
            line!(tracing::Level::DEBUG);
        } else {
            line!(tracing::Level::INFO);
        }
    }
}

/// Whether a refusal of an image request is worth counting: the client's or the
/// server's "not now", not a generation that ran and failed.
fn is_rejection(route: &str, status: StatusCode) -> bool {
    matches!(route, "/v1/images/generations" | "/v1/images/edits")
        && (status.is_client_error() || status == StatusCode::SERVICE_UNAVAILABLE)
        && status.as_u16() != 499
}

/// The error code in an OpenAI error body.
fn error_code(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// The middleware: wraps the whole application (inside its state, outside its error
/// conversion, so it sees every final status).
pub async fn around<E: Endpoint>(next: Arc<E>, mut req: Request) -> poem::Result<Response> {
    let start = Instant::now();
    let id = request_id(req.header(REQUEST_ID));
    let record = Arc::new(RequestRecord {
        id,
        ..RequestRecord::default()
    });
    req.extensions_mut().insert(record.clone());
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let route = route_label(&path);
    let state = req.data::<Arc<AppState>>().cloned();
    let mut resp = match next.call(req).await {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    };
    if let Ok(v) = HeaderValue::from_str(&record.id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    let Some(state) = state else {
        return Ok(resp);
    };
    let status = resp.status();
    let mut rejected = None;
    if is_rejection(route, status) {
        let body = resp.take_body().into_bytes().await.unwrap_or_default();
        rejected = Some(error_code(&body));
        resp.set_body(body);
    }
    let stream = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    let entry = AccessEntry {
        state,
        record,
        method,
        path,
        route,
        status: status.as_u16(),
        start,
        rejected,
        stream,
    };
    if stream {
        // Logged when the stream ends (or the client leaves): the entry lives in the body.
        let body = resp.take_body().into_bytes_stream();
        let logged = body.map(move |chunk: std::io::Result<Bytes>| {
            let _entry = &entry;
            chunk
        });
        resp.set_body(Body::from_bytes_stream(logged));
    } else {
        entry.finish();
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_or_made() {
        assert_eq!(request_id(Some("abc-123")), "abc-123");
        for bad in [None, Some(""), Some("has space"), Some("é")] {
            let id = request_id(bad);
            assert_eq!(id.len(), 32, "{bad:?}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        assert_ne!(request_id(None), request_id(None));
        assert_eq!(request_id(Some(&"x".repeat(200))).len(), 32);
    }

    #[test]
    fn routes_are_patterns() {
        assert_eq!(
            route_label("/v1/images/files/0123abcd"),
            "/v1/images/files/{id}"
        );
        assert_eq!(route_label("/docs/index.css"), "/docs");
        assert_eq!(route_label("/health"), "/health");
        assert_eq!(route_label("/random/path"), "other");
    }
}
