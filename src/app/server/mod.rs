//! `hypergen serve`: an HTTP service compatible with HyperGen and OpenAI's Images API,
//! a thin typed layer (poem + poem-openapi) over [`crate::pipeline`].
//!
//! - [`api`]: the routes; [`types`]: every body in the schema; [`body`]: reading
//!   bodies; [`request`]: body parsing and checks; [`limits`]: what a request may ask
//!   for; [`error`]: OpenAI's error object for every failure; [`auth`]: the API key;
//!   [`worker`]: the thread that owns the model and its queue; [`images`]: the store
//!   behind `response_format: "url"`; [`conn`]: noticing clients that went away;
//!   [`access`]: request ids and the access log; [`metrics`]: `GET /metrics` for
//!   Prometheus; [`loras`]: per-request LoRA adapters; [`playground`]: the browser page
//!   at `/`; [`schema`]: the OpenAPI document as generators need it.
//! - Routes: `GET /health`, `GET /v1/models`, `POST /v1/images/generations`,
//!   `GET /v1/images/files/{id}`, Swagger UI at `/docs`, the schema at `/openapi.json`
//!   (committed as `openapi/openapi.json`; regenerate it with
//!   `hypergen openapi > openapi/openapi.json`), and `GET /metrics` (Prometheus' text
//!   format, outside the schema).
//! - On SIGTERM the server drains ([`Server::drain`]): `/health` turns unhealthy, new
//!   requests get 503 + `Retry-After`, running and queued jobs finish within the drain
//!   timeout, then it exits 0.

pub mod access;
pub mod api;
pub mod auth;
pub mod body;
pub mod conn;
pub mod edit;
pub mod error;
pub mod images;
pub mod limits;
pub mod loras;
pub mod metrics;
pub mod playground;
#[cfg(test)]
mod properties;
pub mod request;
pub mod schema;
pub mod stream;
pub mod types;
pub mod worker;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use poem::web::Data;
use poem::{Endpoint, EndpointExt, IntoResponse, Response, Route};
use poem_openapi::OpenApiService;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::device::DeviceSpec;
use crate::load::controlnet_dir::ControlNetDir;
use crate::pipeline::ModelInfo;
use crate::scheduler::SchedulerConfig;
use auth::ApiKey;
use conn::{ConnTimeouts, Connections, TrackingAcceptor};
use images::ImageStore;
use limits::RequestLimits;
use loras::LoraLibrary;
use metrics::Metrics;
use worker::{Worker, WorkerOptions, WorkerStats};

/// The port `hypergen serve` listens on unless configured (`--port`).
pub const DEFAULT_PORT: u16 = 8000;

/// Memory for parsed per-request LoRA adapters unless configured (`--lora-cache-mb`).
pub const DEFAULT_LORA_CACHE_MB: usize = 1024;

/// Everything a [`Server`] needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The worker: the model, where and how it runs, its queue.
    pub worker: WorkerOptions,
    /// The API key, if the server requires one.
    pub api_key: Option<ApiKey>,
    /// The sizes, steps and image counts requests may ask for.
    pub limits: RequestLimits,
    /// Base of image URLs; `None`: `http://` + the request's `Host`.
    pub public_url: Option<String>,
    /// How long image URLs stay valid.
    pub url_ttl: Duration,
    /// Memory for images served by URL, in bytes.
    pub url_store_bytes: usize,
    /// The directory per-request LoRA adapters are named in; `None`: requests may not
    /// name adapters.
    pub lora_dir: Option<PathBuf>,
    /// How requests' prompts are read unless they say (`--prompt-syntax`, `--clip-skip`).
    pub prompt: request::PromptDefaults,
    /// Memory for parsed per-request LoRA adapters, in bytes.
    pub lora_cache_bytes: usize,
    /// The directory requests name ControlNets in; `None`: requests may not name any.
    /// (The device memory they may keep is [`WorkerOptions::controlnet_cache_bytes`].)
    pub controlnet_dir: Option<PathBuf>,
    /// How long idle and slow connections may hold the server.
    pub timeouts: ConnTimeouts,
    /// Whether `GET /metrics` needs the API key (when the server has one).
    pub metrics_auth: bool,
    /// Write prompts into the access log.
    pub log_prompts: bool,
    /// How long a drain (SIGTERM) may take to finish running and queued jobs before
    /// the rest are answered 503.
    pub drain_timeout: Duration,
    /// Web origins (`https://app.example.com`) whose pages may call the API from a
    /// browser (CORS); empty: none, and no CORS headers at all.
    pub cors_origins: Vec<String>,
}

/// The default drain: within Kubernetes' default 30 s grace period, with time to exit.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(25);

impl ServerConfig {
    /// Defaults for a model (folder, built-in name or Hub id), HyperGen's where it has
    /// them, on `device`; Hub settings from the environment.
    pub fn new(model: impl AsRef<Path>, device: DeviceSpec) -> Self {
        Self {
            worker: WorkerOptions::new(model.as_ref().display().to_string(), device),
            api_key: None,
            limits: RequestLimits::DEFAULT,
            public_url: None,
            url_ttl: images::DEFAULT_TTL,
            url_store_bytes: images::DEFAULT_STORE_MB << 20,
            lora_dir: None,
            prompt: request::PromptDefaults::default(),
            lora_cache_bytes: DEFAULT_LORA_CACHE_MB << 20,
            controlnet_dir: None,
            timeouts: ConnTimeouts::default(),
            metrics_auth: false,
            log_prompts: false,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            cors_origins: Vec::new(),
        }
    }
}

/// What every route can reach.
pub struct AppState {
    /// How the server was configured.
    pub config: ServerConfig,
    /// What the worker loaded.
    pub model: ModelInfo,
    /// The loaded model's scheduler config, which requests' sampler settings apply to.
    pub scheduler: SchedulerConfig,
    /// The worker and its queue.
    pub worker: Worker,
    /// Images served by URL.
    pub images: ImageStore,
    /// When the model was loaded, in Unix seconds.
    pub started: i64,
    /// Open connections, to notice clients that went away.
    pub connections: Arc<Connections>,
    /// Per-request LoRA adapters (`--lora-dir`), if enabled.
    pub loras: Option<Arc<LoraLibrary>>,
    /// The ControlNets requests may name (`--controlnet-dir`), if enabled.
    pub controlnets: Option<Arc<ControlNetDir>>,
    /// What `GET /metrics` reports.
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("model", &self.config.worker.model)
            .field("auth", &self.config.api_key.is_some())
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// The scheme and authority image URLs start with, for this request.
    pub fn public_base(&self, req: &poem::Request) -> String {
        if let Some(base) = &self.config.public_url {
            return base.trim_end_matches('/').to_string();
        }
        let scheme = match req.header("x-forwarded-proto") {
            Some(p) if p.eq_ignore_ascii_case("https") => "https",
            _ => "http",
        };
        let host = req
            .header("host")
            .map(str::to_string)
            .unwrap_or_else(|| req.local_addr().to_string());
        format!("{scheme}://{host}")
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The OpenAPI service: routes and schema.
pub fn openapi_service() -> OpenApiService<api::Api, ()> {
    OpenApiService::new(api::Api, "hypergen", env!("CARGO_PKG_VERSION")).description(
        "Stable Diffusion XL over HTTP, compatible with HyperGen and OpenAI's Images API. \
         When the server has an API key, every route but `/health`, `/docs` and \
         `/openapi.json` needs `Authorization: Bearer KEY`. Every error is OpenAI's \
         error object.",
    )
}

/// The committed schema (`openapi/openapi.json`, `hypergen openapi`): the defaults of
/// `hypergen serve`, usable with or without a key. `/openapi.json` serves the running
/// server's own ([`schema::document`]).
pub fn openapi_json() -> String {
    schema::committed_json()
}

/// Headers a browser page may send (CORS preflight).
const CORS_REQUEST_HEADERS: [&str; 2] = ["authorization", "content-type"];
/// Headers a browser page may read: the retry advice of 500 and 503 answers.
const CORS_EXPOSED_HEADERS: [&str; 2] = ["retry-after", "x-should-retry"];

/// The whole HTTP application over `state`.
pub fn app(state: Arc<AppState>) -> impl Endpoint {
    let service = openapi_service();
    // Swagger UI with the live document in place of poem's.
    let docs_html = Arc::new(
        service
            .swagger_ui_html()
            .replace(&service.spec(), DOCUMENT_PLACEHOLDER),
    );
    let cors = state.config.cors_origins.clone();
    let connections = state.connections.clone();
    let api = Route::new()
        .nest("/", service)
        .at(
            "/docs",
            poem::get(poem::endpoint::make(move |req: poem::Request| {
                let html = docs_html.clone();
                async move {
                    let doc = live_document(&req);
                    poem::web::Html(html.replace(DOCUMENT_PLACEHOLDER, &schema::pretty(&doc)))
                }
            })),
        )
        .at(
            "/openapi.json",
            poem::get(poem::endpoint::make(|req: poem::Request| async move {
                let doc = live_document(&req);
                poem::Response::builder()
                    .content_type("application/json")
                    .body(schema::pretty(&doc))
            })),
        )
        .at("/metrics", poem::get(metrics_endpoint))
        .around(allow_on_405);
    // No CORS headers at all unless origins are configured.
    let route = playground::with_playground(api).with_if(
        !cors.is_empty(),
        poem::middleware::Cors::new()
            .allow_origins(cors)
            .allow_methods([poem::http::Method::GET, poem::http::Method::POST])
            .allow_headers(CORS_REQUEST_HEADERS)
            .expose_headers(CORS_EXPOSED_HEADERS),
    );
    route
        .catch_all_error(error::catch_all)
        .around(access::around)
        .around(move |ep, req| {
            let busy = connections.get(req.remote_addr()).map(|c| c.begin());
            async move { Ok(while_busy(ep.call(req).await?, busy)) }
        })
        .data(state)
}

/// Keeps a request's connection marked busy ([`conn::Connection::begin`]) until its
/// response is out: at once for a body of known size, at the end of the stream for a
/// streamed one (server-sent events).
fn while_busy(resp: poem::Response, busy: Option<conn::Busy>) -> poem::Response {
    let streamed = resp
        .content_type()
        .is_some_and(|t| t.starts_with("text/event-stream"));
    if !streamed || busy.is_none() {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let stream = futures_util::StreamExt::map(body.into_bytes_stream(), move |chunk| {
        let _held = &busy;
        chunk
    });
    poem::Response::from_parts(parts, poem::Body::from_bytes_stream(stream))
}

/// `GET /metrics`: Prometheus' text format; needs the API key only with
/// `--metrics-auth`.
#[poem::handler]
async fn metrics_endpoint(
    req: &poem::Request,
    state: Data<&Arc<AppState>>,
) -> poem::Result<Response> {
    if state.config.metrics_auth {
        auth::check(state.config.api_key.as_ref(), req.header("authorization"))?;
    }
    Ok(Response::builder()
        .content_type(metrics::CONTENT_TYPE)
        .body(state.metrics.render(&state.worker)))
}

/// Where the Swagger UI page takes the document.
const DOCUMENT_PLACEHOLDER: &str = "__HYPERGEN_OPENAPI_DOCUMENT__";

/// The document describing the server that answers `req`.
fn live_document(req: &poem::Request) -> serde_json::Value {
    match req.data::<Arc<AppState>>() {
        Some(state) => schema::document(&schema::ServerFacts::of(
            &state.config,
            &state.public_base(req),
        )),
        None => schema::document(&schema::ServerFacts::committed()),
    }
}

/// Adds `Allow` (RFC 9110) to a 405: the methods the path answers.
async fn allow_on_405<E: Endpoint>(
    next: Arc<E>,
    req: poem::Request,
) -> poem::Result<poem::Response> {
    let allow = schema::allowed_methods(req.uri().path());
    let with_allow = |mut resp: poem::Response| {
        if let Some(allow) = allow {
            if let Ok(v) = poem::http::HeaderValue::from_str(allow) {
                resp.headers_mut().insert(poem::http::header::ALLOW, v);
            }
        }
        resp
    };
    match next.call(req).await {
        Ok(resp) => {
            let resp = resp.into_response();
            Ok(
                if resp.status() == poem::http::StatusCode::METHOD_NOT_ALLOWED {
                    with_allow(resp)
                } else {
                    resp
                },
            )
        }
        Err(e) if e.status() == poem::http::StatusCode::METHOD_NOT_ALLOWED => {
            Ok(with_allow(error::catch_all(e).await))
        }
        Err(e) => Err(e),
    }
}

/// A running server: the model loaded, listening.
pub struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Loads the model (on the worker thread), then listens on `bind` (`host:port`;
    /// port 0 picks a free one). Returns once requests can be served.
    pub async fn start(config: ServerConfig, bind: &str) -> anyhow::Result<Server> {
        let w = &config.worker;
        // Checked before the (slow) model load, so a typo fails at once.
        let loras = match &config.lora_dir {
            Some(dir) => Some(Arc::new(LoraLibrary::open(dir, config.lora_cache_bytes)?)),
            None => None,
        };
        let controlnets = match &config.controlnet_dir {
            Some(dir) => {
                Some(Arc::new(ControlNetDir::open(dir).with_context(|| {
                    format!("--controlnet-dir {}", dir.display())
                })?))
            }
            None => None,
        };
        tracing::info!(model = %w.model, device = %w.device, dtype = %w.dtype, "loading model");
        let metrics = Arc::new(Metrics::new());
        let mut options = config.worker.clone();
        options.hooks.observer = Some(metrics.clone());
        let worker = tokio::task::spawn_blocking(move || Worker::spawn(options))
            .await
            .context("the loading task failed")?
            .with_context(|| format!("loading model `{}`", config.worker.model))?;
        let model = worker
            .model_info()
            .context("the worker reported ready without a model")?;
        let scheduler = worker
            .scheduler_config()
            .context("the worker reported ready without a scheduler config")?;
        tracing::info!(
            model = %w.model,
            device = worker.device(),
            dtype = %w.dtype,
            max_queue_size = w.max_queue_size,
            max_batch_size = w.max_batch_size,
            auth = config.api_key.is_some(),
            "model loaded"
        );
        if model.random_weights {
            tracing::warn!(
                model = %w.model,
                "serving a built-in model with RANDOM weights: its images are noise (for tests and benchmarks)"
            );
        }
        let timeouts = config.timeouts;
        metrics.set_info(&w.model, worker.device(), worker.dtype());
        let state = Arc::new(AppState {
            images: ImageStore::new(config.url_ttl, config.url_store_bytes),
            config,
            model,
            scheduler,
            worker,
            started: unix_now(),
            connections: Arc::new(Connections::new(timeouts)),
            loras,
            controlnets,
            metrics,
        });
        let listener = match tokio::net::TcpListener::bind(bind).await {
            Ok(l) => l,
            Err(e) => {
                shut_worker(&state).await;
                return Err(e).with_context(|| format!("listening on {bind}"));
            }
        };
        let addr = listener.local_addr().context("listening")?;
        let acceptor =
            TrackingAcceptor::new(listener, state.connections.clone()).context("listening")?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(
            poem::Server::new_with_acceptor(acceptor).run_with_graceful_shutdown(
                app(state.clone()),
                async move {
                    let _ = stopped.await;
                },
                None,
            ),
        );
        tracing::info!("listening on http://{addr} (playground at http://{addr}/, API docs at http://{addr}/docs)");
        Ok(Server {
            addr,
            state,
            stop: Some(stop),
            task,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDRESS`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What happened to jobs so far.
    pub fn stats(&self) -> WorkerStats {
        self.state.worker.stats()
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.state.connections.len()
    }

    /// Drains, for a rolling update: `/health` turns unhealthy and new requests are
    /// refused (503 + `Retry-After`) at once, while the running and queued jobs finish;
    /// what is still queued or running after `timeout` is answered 503. Then
    /// [`shutdown`](Self::shutdown).
    pub async fn drain(self, timeout: Duration) -> anyhow::Result<()> {
        let worker = &self.state.worker;
        worker.begin_drain();
        let deadline = Instant::now() + timeout;
        while !worker.has_stopped() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if worker.has_stopped() {
            tracing::info!("drained: every accepted request was answered");
        } else {
            tracing::warn!(
                queue_size = worker.queue_size(),
                timeout_seconds = timeout.as_secs_f64(),
                "drain timed out: refusing what is left"
            );
            worker.abort();
        }
        self.shutdown().await
    }

    /// Graceful shutdown: stop accepting, finish the running job, refuse the queued
    /// ones (503), wait for every response to go out, stop the worker.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.state.worker.begin_shutdown();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let served = (&mut self.task).await;
        shut_worker(&self.state).await;
        served
            .context("the server task failed")?
            .context("the server failed")?;
        tracing::info!("server stopped");
        Ok(())
    }
}

async fn shut_worker(state: &Arc<AppState>) {
    state.worker.begin_shutdown();
    let state = state.clone();
    let _ = tokio::task::spawn_blocking(move || state.worker.join()).await;
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// `hypergen serve`: listens on `bind` until SIGINT/SIGTERM, then shuts down gracefully
/// (exit 0).
pub fn serve(config: ServerConfig, bind: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let server = Server::start(config, bind).await?;
        shutdown_signal().await;
        let timeout = server.state.config.drain_timeout;
        tracing::info!(
            timeout_seconds = timeout.as_secs_f64(),
            "draining: refusing new requests, finishing running and queued ones"
        );
        tokio::spawn(async {
            shutdown_signal().await;
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        });
        server.drain(timeout).await
    })
}
