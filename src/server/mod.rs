//! `hypergen serve`: an HTTP service compatible with HyperGen and OpenAI's Images API,
//! a thin typed layer (poem + poem-openapi) over [`crate::pipeline`].
//!
//! - [`api`]: the routes; [`types`]: every body in the schema; [`request`]: body
//!   parsing and checks; [`error`]: OpenAI's error object for every failure;
//!   [`auth`]: the API key; [`worker`]: the thread that owns the model and its queue;
//!   [`images`]: the store behind `response_format: "url"`; [`conn`]: noticing
//!   clients that went away.
//! - Routes: `GET /health`, `GET /v1/models`, `POST /v1/images/generations`,
//!   `GET /v1/images/files/{id}`, Swagger UI at `/docs`, the schema at `/openapi.json`
//!   (committed as `openapi/openapi.json`; regenerate it with
//!   `hypergen openapi > openapi/openapi.json`).

pub mod api;
pub mod auth;
pub mod conn;
pub mod error;
pub mod images;
pub mod request;
pub mod types;
pub mod worker;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::builder::PossibleValuesParser;
use poem::{Endpoint, EndpointExt, Route};
use poem_openapi::OpenApiService;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::device::DeviceSpec;
use crate::hub::HubOptions;
use crate::model_source::ModelOptions;
use crate::pipeline::LoadOptions;
use auth::ApiKey;
use conn::{Connections, TrackingAcceptor};
use images::ImageStore;
use request::SizeLimits;
use worker::{Worker, WorkerHooks, WorkerOptions, WorkerStats};

/// Flags of `hypergen serve` (HyperGen's, plus a few of hypergen's own). `Debug` never
/// shows the API key.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The model: a local diffusers-layout SDXL folder, a Hub repository id
    /// (stabilityai/sdxl-turbo), or a built-in random-weight model (tiny-sdxl-random,
    /// sdxl-base-1.0-random, sdxl-turbo-random; no network or files needed).
    pub model: String,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// Port to listen on (0: any free port).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// auto, cpu, wgpu, vulkan[:N], metal[:N], mps, dx12[:N], cuda[:N] (see `hypergen devices`).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Weights and activations dtype.
    #[arg(long, default_value = "float16", value_parser = PossibleValuesParser::new(["float16", "bfloat16", "float32"]))]
    pub dtype: String,
    /// Weight-file variant to load (`fp16`); default: fp16 for half dtypes.
    #[arg(long)]
    pub variant: Option<String>,
    /// A VAE to use instead of the model's: a folder or a Hub id (e.g. the fp16-safe
    /// madebyollin/sdxl-vae-fp16-fix).
    #[arg(long)]
    pub vae: Option<String>,
    /// Hub revision of the model (branch, tag or commit).
    #[arg(long)]
    pub revision: Option<String>,
    /// Decode with a tiled VAE so that large images fit small GPUs: alone, tiles of the
    /// VAE config's `sample_size` (1024 px for SDXL: only larger images are tiled);
    /// `--vae-tiling=PIXELS` for smaller tiles (a multiple of 8).
    #[arg(long, value_name = "PIXELS", num_args = 0..=1, require_equals = true, default_missing_value = "auto")]
    pub vae_tiling: Option<crate::vae_tiling::VaeTileSize>,
    /// Require `Authorization: Bearer KEY` on every route but /health, /docs and /openapi.json.
    #[arg(long, env = "HYPERGEN_API_KEY", hide_env_values = true)]
    pub api_key: Option<ApiKey>,
    /// A LoRA adapter to load at start (not supported yet: refused).
    #[arg(long)]
    pub lora: Option<PathBuf>,
    /// Accepted requests that may wait; more get 503 with Retry-After.
    #[arg(long, default_value_t = 100)]
    pub max_queue_size: usize,
    /// Most queued requests with the same settings run as one batch.
    #[arg(long, default_value_t = 1)]
    pub max_batch_size: usize,
    /// Smallest image side a request may ask for, in pixels.
    #[arg(long, default_value_t = 64)]
    pub min_size: usize,
    /// Largest image side a request may ask for, in pixels.
    #[arg(long, default_value_t = 2048)]
    pub max_size: usize,
    /// Base of the image URLs the server hands out (default: http:// + the request's Host).
    #[arg(long)]
    pub public_url: Option<String>,
    /// Memory for images served by URL, in MiB (the oldest are evicted first).
    #[arg(long, default_value_t = 512)]
    pub url_store_mb: usize,
}

/// Everything a [`Server`] needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The model as the user named it (reported by `/health` and `/v1/models`): a
    /// folder, a built-in name or a Hub id.
    pub model: String,
    /// The device to run on.
    pub device: DeviceSpec,
    /// Dtype, weight variant, VAE and VAE tiling.
    pub load: LoadOptions,
    /// Hub revision of the model (`None`: `main`).
    pub revision: Option<String>,
    /// Hub endpoint, cache and token.
    pub hub: HubOptions,
    /// The API key, if the server requires one.
    pub api_key: Option<ApiKey>,
    /// Accepted requests that may wait.
    pub max_queue_size: usize,
    /// Most compatible requests run as one batch.
    pub max_batch_size: usize,
    /// Image sizes requests may ask for.
    pub limits: SizeLimits,
    /// Base of image URLs; `None`: `http://` + the request's `Host`.
    pub public_url: Option<String>,
    /// How long image URLs stay valid.
    pub url_ttl: Duration,
    /// Memory for images served by URL, in bytes.
    pub url_store_bytes: usize,
    /// Worker instrumentation (tests).
    pub hooks: WorkerHooks,
}

impl ServerConfig {
    /// Defaults for a model (folder, built-in name or Hub id), HyperGen's where it has
    /// them, on `device`; Hub settings from the environment.
    pub fn new(model: impl AsRef<Path>, device: DeviceSpec) -> Self {
        Self {
            model: model.as_ref().display().to_string(),
            device,
            load: LoadOptions::default(),
            revision: None,
            hub: HubOptions::from_env(),
            api_key: None,
            max_queue_size: 100,
            max_batch_size: 1,
            limits: SizeLimits::default(),
            public_url: None,
            url_ttl: images::DEFAULT_TTL,
            url_store_bytes: 512 << 20,
            hooks: WorkerHooks::default(),
        }
    }

    /// The configuration and listen address `hypergen serve` flags describe.
    pub fn from_args(args: &ServeArgs) -> anyhow::Result<(Self, String)> {
        if args.lora.is_some() {
            bail!("--lora: LoRA adapters are not supported yet");
        }
        if args.max_queue_size == 0 {
            bail!("--max-queue-size must be at least 1");
        }
        if args.max_batch_size == 0 {
            bail!("--max-batch-size must be at least 1");
        }
        if args.min_size == 0 || args.min_size > args.max_size {
            bail!("--min-size must be at least 1 and at most --max-size");
        }
        let device: DeviceSpec = args.device.parse()?;
        let config = Self {
            model: args.model.clone(),
            load: LoadOptions {
                dtype: crate::cli::parse_dtype(&args.dtype)?,
                variant: args.variant.clone(),
                vae: args.vae.as_ref().map(PathBuf::from),
                vae_tiling: args.vae_tiling,
            },
            revision: args.revision.clone(),
            api_key: args.api_key.clone(),
            max_queue_size: args.max_queue_size,
            max_batch_size: args.max_batch_size,
            limits: SizeLimits {
                min: args.min_size,
                max: args.max_size,
            },
            public_url: args.public_url.clone(),
            url_store_bytes: args.url_store_mb.saturating_mul(1 << 20),
            ..Self::new(&args.model, device)
        };
        let host = if args.host.contains(':') && !args.host.starts_with('[') {
            format!("[{}]", args.host)
        } else {
            args.host.clone()
        };
        Ok((config, format!("{host}:{}", args.port)))
    }
}

/// What every route can reach.
pub struct AppState {
    /// The model as the user named it.
    pub model: String,
    /// True for built-in models: their weights are random and their images noise.
    pub random_weights: bool,
    /// The API key, if any.
    pub api_key: Option<ApiKey>,
    /// The worker and its queue.
    pub worker: Worker,
    /// Images served by URL.
    pub images: ImageStore,
    /// Image sizes requests may ask for.
    pub limits: SizeLimits,
    /// Base of image URLs.
    pub public_url: Option<String>,
    /// When the model was loaded, in Unix seconds.
    pub started: i64,
    /// Open connections, to notice clients that went away.
    pub connections: Arc<Connections>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("model", &self.model)
            .field("auth", &self.api_key.is_some())
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// The scheme and authority image URLs start with, for this request.
    pub fn public_base(&self, req: &poem::Request) -> String {
        if let Some(base) = &self.public_url {
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

/// The schema as served at `/openapi.json` and committed as `openapi/openapi.json`.
pub fn openapi_json() -> String {
    openapi_service().spec()
}

/// The whole HTTP application over `state`.
pub fn app(state: Arc<AppState>) -> impl Endpoint {
    let service = openapi_service();
    let docs = service.swagger_ui();
    let spec = service.spec_endpoint();
    Route::new()
        .nest("/", service)
        .nest("/docs", docs)
        .at("/openapi.json", spec)
        .data(state)
        .catch_all_error(error::catch_all)
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
        let device = config.device.clone();
        let options = WorkerOptions {
            model: config.model.clone(),
            source: ModelOptions {
                load: config.load.clone(),
                revision: config.revision.clone(),
                hub: config.hub.clone(),
            },
            max_queue_size: config.max_queue_size,
            max_batch_size: config.max_batch_size,
            hooks: config.hooks.clone(),
        };
        tracing::info!(model = %config.model, device = %device, dtype = ?config.load.dtype, "loading model");
        let worker = tokio::task::spawn_blocking(move || Worker::spawn(&device, options))
            .await
            .context("the loading task failed")?
            .with_context(|| format!("loading model `{}`", config.model))?;
        tracing::info!(
            model = %config.model,
            device = worker.device(),
            dtype = ?config.load.dtype,
            max_queue_size = config.max_queue_size,
            max_batch_size = config.max_batch_size,
            auth = config.api_key.is_some(),
            "model loaded"
        );
        let random_weights = worker.model_info().is_some_and(|i| i.random_weights);
        if random_weights {
            tracing::warn!(
                model = %config.model,
                "serving a built-in model with RANDOM weights: its images are noise (for tests and benchmarks)"
            );
        }
        let state = Arc::new(AppState {
            model: config.model.clone(),
            random_weights,
            api_key: config.api_key.clone(),
            worker,
            images: ImageStore::new(config.url_ttl, config.url_store_bytes),
            limits: config.limits,
            public_url: config.public_url.clone(),
            started: unix_now(),
            connections: Arc::new(Connections::default()),
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
        tracing::info!("listening on http://{addr} (API docs at http://{addr}/docs)");
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

/// `hypergen serve`: runs until SIGINT/SIGTERM, then shuts down gracefully (exit 0).
pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    tracing::info!(?args, "hypergen serve");
    let (config, bind) = ServerConfig::from_args(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let server = Server::start(config, &bind).await?;
        shutdown_signal().await;
        tracing::info!("shutting down: finishing the running job, refusing queued ones");
        tokio::spawn(async {
            shutdown_signal().await;
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        });
        server.shutdown().await
    })
}
