//! `GET /metrics`: the server's counters, gauges and histograms in Prometheus' text
//! format, through the `prometheus` crate. Names follow TGI's and vLLM's conventions
//! (`hypergen_` prefix, seconds, `_total` counters). Queue gauges are read from the
//! worker at scrape time; the worker reports batches and steps as a
//! [`WorkerObserver`]; the access log ([`super::access`]) counts requests.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use super::worker::{Worker, WorkerObserver};
use crate::DeviceMemory;

/// The content type of Prometheus' text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Buckets of whole-request and inference times: 5 ms to 10 min (CPU runs are slow).
const REQUEST_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
    600.0,
];
/// Buckets of one denoising step: 1 ms to 30 s.
const STEP_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Buckets of batch sizes.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// Every metric the server exports, in one registry of its own.
pub struct Metrics {
    registry: Registry,
    queue_size: IntGauge,
    queue_capacity: IntGauge,
    requests_running: IntGauge,
    request_duration: HistogramVec,
    queue_duration: Histogram,
    inference_duration: Histogram,
    step_duration: Histogram,
    batch_size: Histogram,
    requests: IntCounterVec,
    images: IntCounter,
    rejected: IntCounterVec,
    info: IntGaugeVec,
    /// Registered on the first report: the CPU backend has no device allocator, and a
    /// gauge stuck at 0 would read as "no memory used".
    memory: OnceLock<(IntGauge, IntGauge)>,
    /// Serialises scrapes (gauges are set, then gathered).
    scrape: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("a valid histogram")
}

impl Metrics {
    /// Every metric, registered and at zero.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        // Names and label sets are constants: registering cannot fail on input.
        let m = Self {
            registry: Registry::new(),
            queue_size: IntGauge::new("hypergen_queue_size", "Accepted requests waiting to run")
                .expect("gauge"),
            queue_capacity: IntGauge::new(
                "hypergen_queue_capacity",
                "Requests the queue holds before refusing (--max-queue-size)",
            )
            .expect("gauge"),
            requests_running: IntGauge::new(
                "hypergen_requests_running",
                "Requests generating now (in the running batch)",
            )
            .expect("gauge"),
            request_duration: HistogramVec::new(
                HistogramOpts::new(
                    "hypergen_request_duration_seconds",
                    "Time from receiving a request to its answer (streams: to their end)",
                )
                .buckets(REQUEST_BUCKETS.to_vec()),
                &["route"],
            )
            .expect("histogram"),
            queue_duration: histogram(
                "hypergen_request_queue_duration_seconds",
                "Time a request waited in the queue before its batch started",
                REQUEST_BUCKETS,
            ),
            inference_duration: histogram(
                "hypergen_request_inference_duration_seconds",
                "Time a batch took to generate (text encoding, denoising, decoding)",
                REQUEST_BUCKETS,
            ),
            step_duration: histogram(
                "hypergen_step_duration_seconds",
                "Time of one denoising step of a batch",
                STEP_BUCKETS,
            ),
            batch_size: histogram(
                "hypergen_batch_size",
                "Requests run together as one batch",
                BATCH_BUCKETS,
            ),
            requests: IntCounterVec::new(
                Opts::new("hypergen_requests_total", "HTTP requests answered"),
                &["route", "status"],
            )
            .expect("counter"),
            images: IntCounter::new("hypergen_images_total", "Images generated and sent")
                .expect("counter"),
            rejected: IntCounterVec::new(
                Opts::new(
                    "hypergen_rejected_total",
                    "Image requests refused before running, by error code \
                     (queue_full, shutting_down, invalid_value, invalid_api_key, ...)",
                ),
                &["reason"],
            )
            .expect("counter"),
            info: IntGaugeVec::new(
                Opts::new(
                    "hypergen_info",
                    "The served model and where it runs (always 1)",
                ),
                &["model", "device", "dtype", "version"],
            )
            .expect("gauge"),
            memory: OnceLock::new(),
            scrape: Mutex::new(()),
        };
        let r = &m.registry;
        let all: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.queue_size.clone()),
            Box::new(m.queue_capacity.clone()),
            Box::new(m.requests_running.clone()),
            Box::new(m.request_duration.clone()),
            Box::new(m.queue_duration.clone()),
            Box::new(m.inference_duration.clone()),
            Box::new(m.step_duration.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.requests.clone()),
            Box::new(m.images.clone()),
            Box::new(m.rejected.clone()),
            Box::new(m.info.clone()),
        ];
        for c in all {
            r.register(c).expect("distinct metric names");
        }
        m
    }

    /// Sets the info metric: what is served, where and how.
    pub fn set_info(&self, model: &str, device: &str, dtype: &str) {
        self.info
            .with_label_values(&[model, device, dtype, env!("CARGO_PKG_VERSION")])
            .set(1);
    }

    /// Counts an answered request: `route` is a route pattern (never a raw path, which
    /// would make a series per image id).
    pub fn observe_request(&self, route: &str, status: u16, duration: Duration) {
        self.requests
            .with_label_values(&[route, &status.to_string()])
            .inc();
        self.request_duration
            .with_label_values(&[route])
            .observe(duration.as_secs_f64());
    }

    /// Counts images sent to a client.
    pub fn add_images(&self, n: usize) {
        self.images.inc_by(n as u64);
    }

    /// Counts an image request refused before it ran, by its error code.
    pub fn reject(&self, reason: &str) {
        self.rejected.with_label_values(&[reason]).inc();
    }

    /// The text exposition, the queue gauges read from `worker` now.
    pub fn render(&self, worker: &Worker) -> String {
        let _scrape = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        self.queue_size.set(worker.queue_size() as i64);
        self.queue_capacity.set(worker.max_queue_size() as i64);
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding the metrics failed: {e}\n"))
    }
}

impl WorkerObserver for Metrics {
    fn batch_started(&self, queue_waits: &[Duration]) {
        self.requests_running.add(queue_waits.len() as i64);
        self.batch_size.observe(queue_waits.len() as f64);
        for wait in queue_waits {
            self.queue_duration.observe(wait.as_secs_f64());
        }
    }

    fn step_finished(&self, took: Duration) {
        self.step_duration.observe(took.as_secs_f64());
    }

    fn batch_finished(&self, jobs: usize, took: Duration) {
        self.requests_running.sub(jobs as i64);
        self.inference_duration.observe(took.as_secs_f64());
    }

    fn device_memory(&self, memory: DeviceMemory) {
        let (in_use, reserved) = self.memory.get_or_init(|| {
            let in_use = IntGauge::new(
                "hypergen_device_memory_used_bytes",
                "Device memory in live tensors (after the last batch)",
            )
            .expect("gauge");
            let reserved = IntGauge::new(
                "hypergen_device_memory_reserved_bytes",
                "Device memory the allocator holds (after the last batch)",
            )
            .expect("gauge");
            let _ = self.registry.register(Box::new(in_use.clone()));
            let _ = self.registry.register(Box::new(reserved.clone()));
            (in_use, reserved)
        });
        in_use.set(memory.in_use as i64);
        reserved.set(memory.reserved as i64);
    }
}
