//! The routes: a thin typed layer that checks requests, hands them to the worker and
//! shapes its answers as OpenAI's Images API does (streamed answers: [`super::stream`]).

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use base64::Engine as _;
use poem::web::Data;
use poem::Request;
use poem_openapi::param::Path;
use poem_openapi::payload::{Binary, Json};
use poem_openapi::{ApiResponse, OpenApi, Tags};

use super::access;
use super::auth::Authorized;
use super::body::Body;
use super::edit::{self, EditForm};
use super::error::{ApiError, RETRY_AFTER_SECS};
use super::limits::MAX_PROMPT_CHUNKS;
use super::request;
use super::stream::{self, job_error, EventMeta, ImageEventStream};
use super::types::{
    ControlNetFile, ControlNetList, ErrorResponse, HealthResponse, HealthStatus, ImageData,
    ImageGenerationRequest, ImagesResponse, LoraFile, LoraList, Model, ModelList, PromptSyntaxName,
    ResponseFormat, TextualInversionEntry, TextualInversionList, TokenizeRequest, TokenizeResponse,
};
use super::worker::{JobLora, JobResult, StreamOptions, SubmitError};
use super::AppState;
use crate::pipeline::{OutputFormat, PromptSyntax};
use crate::scheduler::Scheduler;

/// Groups of routes in the documentation.
#[derive(Tags)]
pub enum ApiTags {
    /// Image generation (OpenAI's Images API).
    Images,
    /// The loaded model (OpenAI's Models API).
    Models,
    /// Liveness and load.
    Health,
}

/// The HTTP API. Its state comes from the request (`Data<&Arc<AppState>>`), so the
/// schema can be produced without a model.
#[derive(Debug, Clone, Copy, Default)]
pub struct Api;

/// Responses of `GET /health`.
#[derive(ApiResponse)]
pub enum HealthResult {
    /// The worker is running and taking jobs.
    #[oai(status = 200)]
    Healthy(Json<HealthResponse>),
    /// The worker has stopped, the server is shutting down, or the device failed its
    /// check after a fault (until it passes again).
    #[oai(status = 503)]
    Unhealthy(Json<HealthResponse>),
}

/// Responses of `GET /v1/loras`.
#[derive(ApiResponse)]
pub enum LorasResult {
    /// The adapters requests may name.
    #[oai(status = 200)]
    Ok(Json<LoraList>),
    /// Missing, malformed or wrong API key.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorResponse>),
    /// The LoRA directory could not be read.
    #[oai(status = 500)]
    Failed(Json<ErrorResponse>),
}

/// Responses of `GET /v1/textual-inversions`.
#[derive(ApiResponse)]
pub enum TextualInversionsResult {
    /// The embeddings prompts may name.
    #[oai(status = 200)]
    Ok(Json<TextualInversionList>),
    /// Missing, malformed or wrong API key.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorResponse>),
}

/// Responses of `POST /v1/tokenize`.
#[derive(ApiResponse)]
pub enum TokenizeResult {
    /// The prompt's tokens per chunk.
    #[oai(status = 200)]
    Ok(Json<TokenizeResponse>),
    /// A field is invalid: `param` names it.
    #[oai(status = 400)]
    BadRequest(Json<ErrorResponse>),
    /// Missing, malformed or wrong API key.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorResponse>),
    /// The body is larger than the server reads.
    #[oai(status = 413)]
    TooLarge(Json<ErrorResponse>),
    /// The model is not loaded yet, or the tokenizer failed.
    #[oai(status = 500)]
    Failed(Json<ErrorResponse>),
}

/// Responses of `GET /v1/controlnets`.
#[derive(ApiResponse)]
pub enum ControlNetsResult {
    /// The ControlNets requests may name.
    #[oai(status = 200)]
    Ok(Json<ControlNetList>),
    /// Missing, malformed or wrong API key.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorResponse>),
    /// The ControlNet directory could not be read.
    #[oai(status = 500)]
    Failed(Json<ErrorResponse>),
}

/// Responses of `GET /v1/models`.
#[derive(ApiResponse)]
pub enum ModelsResult {
    /// The loaded model.
    #[oai(status = 200)]
    Ok(Json<ModelList>),
    /// Missing, malformed or wrong API key.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorResponse>),
}

/// Responses of `POST /v1/images/generations`.
#[derive(ApiResponse)]
pub enum GenerateResult {
    /// The images, in order.
    #[oai(status = 200)]
    Ok(Json<ImagesResponse>),
    /// With `stream: true`: `image_generation.partial_image` events (`partial_images`
    /// of them), then one `image_generation.completed` per image; `hypergen.progress`
    /// after every step with `stream_progress: true`; an `error` event, ending the
    /// stream, if the generation fails after the stream began.
    #[oai(status = 200, content_type = "text/event-stream")]
    Stream(ImageEventStream),
    /// Invalid input: malformed JSON, a wrong type, a value out of range, an unknown
    /// field. `param` names the field at fault.
    #[oai(status = 400)]
    BadRequest(Json<ErrorResponse>),
    /// Missing, malformed or wrong API key.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorResponse>),
    /// The body is larger than 1 MiB.
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorResponse>),
    /// The generation failed (for example out of memory). Not worth retrying as is.
    #[oai(status = 500)]
    Failed(
        Json<ErrorResponse>,
        /// Always `false`: OpenAI's clients then do not re-run the request.
        #[oai(header = "x-should-retry")]
        String,
    ),
    /// The queue is full, or the server is shutting down. Retry later.
    #[oai(status = 503)]
    Unavailable(
        Json<ErrorResponse>,
        /// Seconds to wait before retrying.
        #[oai(header = "Retry-After")]
        u64,
    ),
}

/// Responses of `POST /v1/images/edits`.
#[derive(ApiResponse)]
pub enum EditResult {
    /// The edited images, in order.
    #[oai(status = 200)]
    Ok(Json<ImagesResponse>),
    /// With `stream: true`: `image_edit.partial_image` and `image_edit.completed`
    /// events, as `/v1/images/generations` streams.
    #[oai(status = 200, content_type = "text/event-stream")]
    Stream(ImageEventStream),
    /// Invalid input: a missing or unreadable image, a mask of another size, an image
    /// over the pixel cap, a value out of range, an unknown field. `param` names the
    /// field at fault.
    #[oai(status = 400)]
    BadRequest(Json<ErrorResponse>),
    /// Missing, malformed or wrong API key.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorResponse>),
    /// The form is larger than 32 MiB.
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorResponse>),
    /// The edit failed. Not worth retrying as is.
    #[oai(status = 500)]
    Failed(
        Json<ErrorResponse>,
        /// Always `false`: OpenAI's clients then do not re-run the request.
        #[oai(header = "x-should-retry")]
        String,
    ),
    /// The queue is full, or the server is shutting down. Retry later.
    #[oai(status = 503)]
    Unavailable(
        Json<ErrorResponse>,
        /// Seconds to wait before retrying.
        #[oai(header = "Retry-After")]
        u64,
    ),
}

impl From<ApiError> for EditResult {
    fn from(e: ApiError) -> Self {
        let body = Json(e.body());
        match e.status.as_u16() {
            400 => EditResult::BadRequest(body),
            401 => EditResult::Unauthorized(body),
            413 => EditResult::PayloadTooLarge(body),
            503 => EditResult::Unavailable(body, RETRY_AFTER_SECS),
            _ => EditResult::Failed(body, "false".into()),
        }
    }
}

/// Responses of `GET /v1/images/files/{id}`.
#[derive(ApiResponse)]
pub enum ImageFileResult {
    /// The image, as a PNG (`output_format: "png"`, the default).
    #[oai(status = 200, content_type = "image/png")]
    Png(Binary<bytes::Bytes>),
    /// The image, as a JPEG (`output_format: "jpeg"`).
    #[oai(status = 200, content_type = "image/jpeg")]
    Jpeg(Binary<bytes::Bytes>),
    /// The image, as a lossless WebP (`output_format: "webp"`).
    #[oai(status = 200, content_type = "image/webp")]
    Webp(Binary<bytes::Bytes>),
    /// Missing, malformed or wrong API key.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorResponse>),
    /// No such image, or it expired (URLs are valid for one hour).
    #[oai(status = 404)]
    NotFound(Json<ErrorResponse>),
}

impl From<ApiError> for GenerateResult {
    fn from(e: ApiError) -> Self {
        let body = Json(e.body());
        match e.status.as_u16() {
            400 => GenerateResult::BadRequest(body),
            401 => GenerateResult::Unauthorized(body),
            413 => GenerateResult::PayloadTooLarge(body),
            503 => GenerateResult::Unavailable(body, RETRY_AFTER_SECS),
            _ => GenerateResult::Failed(body, "false".into()),
        }
    }
}

impl From<ApiError> for ImageFileResult {
    fn from(e: ApiError) -> Self {
        match e.status.as_u16() {
            401 => ImageFileResult::Unauthorized(Json(e.body())),
            _ => ImageFileResult::NotFound(Json(e.body())),
        }
    }
}

/// Example id for the image route's documentation.
fn example_image_id() -> String {
    "6f1c0e7d9b2a4c1e8f3a5b7d9e0f1a2b".into()
}

#[OpenApi]
impl Api {
    /// Health check
    ///
    /// Whether the server can take requests, the model it serves, the device it runs
    /// on and how many accepted requests wait. Needs no API key and answers at once,
    /// however busy the worker is.
    #[oai(
        path = "/health",
        method = "get",
        operation_id = "health",
        tag = "ApiTags::Health"
    )]
    async fn health(&self, state: Data<&Arc<AppState>>) -> HealthResult {
        let healthy = state.worker.is_healthy();
        let body = Json(HealthResponse {
            status: if healthy {
                HealthStatus::Healthy
            } else {
                HealthStatus::Unhealthy
            },
            model: state.config.worker.model.clone(),
            queue_size: state.worker.queue_size() as u64,
            device: state.worker.device().to_string(),
            loras: state.worker.loras().iter().map(Into::into).collect(),
        });
        if healthy {
            HealthResult::Healthy(body)
        } else {
            HealthResult::Unhealthy(body)
        }
    }

    /// List models
    ///
    /// OpenAI's model list, holding the one model this server was started with.
    #[oai(
        path = "/v1/models",
        method = "get",
        operation_id = "listModels",
        tag = "ApiTags::Models"
    )]
    async fn list_models(&self, _auth: Authorized, state: Data<&Arc<AppState>>) -> ModelsResult {
        ModelsResult::Ok(Json(ModelList {
            object: "list".into(),
            data: vec![Model {
                id: state.config.worker.model.clone(),
                object: "model".into(),
                created: state.started,
                owned_by: "hypergen".into(),
                random_weights: state.model.random_weights,
                loras: state.worker.loras().iter().map(Into::into).collect(),
            }],
        }))
    }

    /// List LoRA adapters
    ///
    /// The LoRA adapters requests may name in `lora_path` or `loras`: what the server's
    /// LoRA directory (`--lora-dir`) holds. Without one, `enabled` is false and the
    /// list is empty.
    #[oai(
        path = "/v1/loras",
        method = "get",
        operation_id = "listLoras",
        tag = "ApiTags::Models"
    )]
    async fn list_loras(&self, _auth: Authorized, state: Data<&Arc<AppState>>) -> LorasResult {
        let Some(library) = state.loras.clone() else {
            return LorasResult::Ok(Json(LoraList {
                object: "list".into(),
                enabled: false,
                data: Vec::new(),
            }));
        };
        let listed = tokio::task::spawn_blocking(move || library.list()).await;
        match listed {
            Ok(Ok(entries)) => LorasResult::Ok(Json(LoraList {
                object: "list".into(),
                enabled: true,
                data: entries
                    .into_iter()
                    .map(|e| LoraFile {
                        id: e.name,
                        object: "lora".into(),
                        bytes: e.bytes,
                    })
                    .collect(),
            })),
            Ok(Err(e)) => LorasResult::Failed(Json(e.body())),
            Err(e) => LorasResult::Failed(Json(
                ApiError::internal(format!("listing LoRA adapters failed: {e}")).body(),
            )),
        }
    }

    /// List textual-inversion embeddings
    ///
    /// The embeddings a prompt in A1111 syntax may name by word: what the server
    /// loaded from its embeddings directory (`--embeddings-dir`) at start, and the files
    /// it skipped. Without one, `enabled` is false and the lists are empty.
    #[oai(
        path = "/v1/textual-inversions",
        method = "get",
        operation_id = "listTextualInversions",
        tag = "ApiTags::Models"
    )]
    async fn list_textual_inversions(
        &self,
        _auth: Authorized,
        state: Data<&Arc<AppState>>,
    ) -> TextualInversionsResult {
        let loaded = state.worker.embeddings();
        TextualInversionsResult::Ok(Json(TextualInversionList {
            object: "list".into(),
            enabled: loaded.enabled,
            data: (loaded.loaded.into_iter())
                .map(|(id, vectors)| TextualInversionEntry {
                    id,
                    object: "textual_inversion".into(),
                    vectors: vectors as u32,
                })
                .collect(),
            skipped: loaded.skipped,
        }))
    }

    /// Count a prompt's tokens
    ///
    /// The prompt's tokens per chunk of 75 as the loaded model's text encoders read it
    /// (what the playground shows under the prompt, as A1111 shows `80/150`).
    #[oai(
        path = "/v1/tokenize",
        method = "post",
        operation_id = "tokenize",
        tag = "ApiTags::Models"
    )]
    async fn tokenize(
        &self,
        _auth: Authorized,
        state: Data<&Arc<AppState>>,
        /// The prompt.
        body: Body<TokenizeRequest>,
    ) -> TokenizeResult {
        let Some(counter) = state.worker.prompt_counter() else {
            return TokenizeResult::Failed(Json(
                ApiError::internal("the model is not loaded").body(),
            ));
        };
        let syntax = body
            .0
            .prompt_syntax
            .map_or(state.config.prompt.syntax, PromptSyntax::from);
        match counter.count(&body.0.prompt, syntax) {
            Ok(t) => TokenizeResult::Ok(Json(TokenizeResponse {
                object: "prompt.tokens".into(),
                prompt_syntax: match syntax {
                    PromptSyntax::A1111 => PromptSyntaxName::A1111,
                    PromptSyntax::Plain => PromptSyntaxName::Plain,
                },
                chunks: t.per_chunk.iter().map(|&n| n as u32).collect(),
                total: t.total as u32,
                chunk_length: t.chunk_length as u32,
            })),
            Err(e) => TokenizeResult::Failed(Json(
                ApiError::internal(format!("counting tokens failed: {e}")).body(),
            )),
        }
    }

    /// List ControlNets
    ///
    /// The ControlNets requests may name in `controlnets`: what the server's ControlNet
    /// directory (`--controlnet-dir`) holds. Without one, `enabled` is false and the
    /// list is empty.
    #[oai(
        path = "/v1/controlnets",
        method = "get",
        operation_id = "listControlNets",
        tag = "ApiTags::Models"
    )]
    async fn list_controlnets(
        &self,
        _auth: Authorized,
        state: Data<&Arc<AppState>>,
    ) -> ControlNetsResult {
        let Some(dir) = state.controlnets.clone() else {
            return ControlNetsResult::Ok(Json(ControlNetList {
                object: "list".into(),
                enabled: false,
                data: Vec::new(),
            }));
        };
        match tokio::task::spawn_blocking(move || dir.list()).await {
            Ok(Ok(entries)) => ControlNetsResult::Ok(Json(ControlNetList {
                object: "list".into(),
                enabled: true,
                data: entries
                    .into_iter()
                    .map(|e| ControlNetFile {
                        id: e.name,
                        object: "controlnet".into(),
                        bytes: e.bytes,
                    })
                    .collect(),
            })),
            Ok(Err(_)) | Err(_) => ControlNetsResult::Failed(Json(
                ApiError::internal("listing the ControlNet directory failed").body(),
            )),
        }
    }

    /// Create images
    ///
    /// OpenAI's image generation, with SDXL's settings as extra fields. The request
    /// waits in a bounded queue (503 with `Retry-After` when it is full) and is
    /// dropped, or stopped at the next denoising step, if the client goes away.
    #[oai(
        path = "/v1/images/generations",
        method = "post",
        operation_id = "createImage",
        tag = "ApiTags::Images"
    )]
    async fn create_image(
        &self,
        _auth: Authorized,
        state: Data<&Arc<AppState>>,
        request: &Request,
        /// The prompt and settings.
        body: Body<ImageGenerationRequest>,
    ) -> GenerateResult {
        let checked = match request::check(
            &body.0,
            &state.config.limits,
            state.config.prompt,
            request::random_seed,
        )
        .and_then(|c| check_sampler(&state, c))
        .and_then(|c| with_controlnets(&state, c))
        {
            Ok(checked) => with_loras(&state, checked).await,
            Err(e) => Err(e),
        };
        let outcome = match checked {
            Ok((checked, loras)) if checked.stream.is_some() => {
                match start_stream(&state, request, checked, loras, "image_generation") {
                    Ok(events) => return GenerateResult::Stream(events),
                    Err(e) => Err(e),
                }
            }
            Ok((checked, loras)) => {
                run_checked(&state, request, checked, loras, &body.0.prompt).await
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(images) => GenerateResult::Ok(Json(images)),
            Err(e) => {
                if e.status.is_server_error() {
                    tracing::warn!(error = %e, "image request not served");
                }
                e.into()
            }
        }
    }

    /// Edit an image
    ///
    /// OpenAI's image edit (`multipart/form-data`): image-to-image, or inpainting with a
    /// `mask`, with SDXL's settings and `strength` as extra fields. Queued and cancelled
    /// like `/v1/images/generations`.
    #[oai(
        path = "/v1/images/edits",
        method = "post",
        operation_id = "createImageEdit",
        tag = "ApiTags::Images"
    )]
    async fn create_image_edit(
        &self,
        _auth: Authorized,
        state: Data<&Arc<AppState>>,
        request: &Request,
        /// The image, the mask, the prompt and settings.
        form: Body<EditForm>,
    ) -> EditResult {
        let checked = match edit::check_edit(
            form.0,
            &state.config.limits,
            state.config.prompt,
            request::random_seed,
        )
        .and_then(|c| check_sampler(&state, c))
        .and_then(|c| with_controlnets(&state, c))
        {
            Ok(checked) => with_loras(&state, checked).await,
            Err(e) => Err(e),
        };
        let outcome = match checked {
            Ok((checked, loras)) if checked.stream.is_some() => {
                match start_stream(&state, request, checked, loras, "image_edit") {
                    Ok(events) => return EditResult::Stream(events),
                    Err(e) => Err(e),
                }
            }
            Ok((checked, loras)) => {
                let prompt = checked.generation.prompt.clone();
                run_checked(&state, request, checked, loras, &prompt).await
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(images) => EditResult::Ok(Json(images)),
            Err(e) => {
                if e.status.is_server_error() {
                    tracing::warn!(error = %e, "edit request not served");
                }
                e.into()
            }
        }
    }

    /// Download an image
    ///
    /// An image made with `response_format: "url"`, in the `output_format` asked for
    /// (PNG, JPEG or WebP, with the matching Content-Type); each stays available for one
    /// hour.
    #[oai(
        path = "/v1/images/files/:id",
        method = "get",
        operation_id = "getImage",
        tag = "ApiTags::Images"
    )]
    async fn get_image(
        &self,
        _auth: Authorized,
        state: Data<&Arc<AppState>>,
        /// The id at the end of the URL the generation returned.
        #[oai(example = "example_image_id")]
        id: Path<String>,
    ) -> ImageFileResult {
        match state.images.get_file(&id.0) {
            Some((bytes, OutputFormat::Png)) => ImageFileResult::Png(Binary(bytes)),
            Some((bytes, OutputFormat::Jpeg)) => ImageFileResult::Jpeg(Binary(bytes)),
            Some((bytes, OutputFormat::Webp)) => ImageFileResult::Webp(Binary(bytes)),
            None => image_not_found(&id.0).into(),
        }
    }
}

/// Refuses sampler settings the model's scheduler cannot run (an `eta` for a sampler
/// without one, a spacing for LCM or TCD, more steps than a consistency model was
/// distilled on), naming the field, before the request is queued.
fn check_sampler(
    state: &AppState,
    checked: request::Checked,
) -> Result<request::Checked, ApiError> {
    let g = &checked.generation;
    let refuse = |e: crate::Error| match e {
        crate::Error::InvalidArgument { name, message } => ApiError::invalid_value(name, message),
        other => ApiError::invalid_value("scheduler", other.to_string()),
    };
    let mut scheduler = Scheduler::build(&state.scheduler, &g.sampler).map_err(refuse)?;
    scheduler
        .set_timesteps(g.num_inference_steps)
        .map_err(refuse)?;
    Ok(checked)
}

/// Puts the ControlNets a checked request names, resolved in the ControlNet directory
/// (canonical paths: the worker loads each once), into its generation. Without
/// `--controlnet-dir`, a request naming one is refused with how to enable them.
fn with_controlnets(
    state: &AppState,
    mut checked: request::Checked,
) -> Result<request::Checked, ApiError> {
    if checked.controlnets.is_empty() {
        return Ok(checked);
    }
    let Some(dir) = &state.controlnets else {
        return Err(ApiError::invalid_value(
            "controlnets",
            "ControlNets are off on this server; the operator enables them with \
             `hypergen serve … --controlnet-dir DIR`",
        ));
    };
    let mut inputs = std::mem::take(&mut checked.controlnets);
    for (i, input) in inputs.iter_mut().enumerate() {
        let path = dir.resolve(&input.model).map_err(|e| {
            let message = match e {
                crate::Error::InvalidArgument { message, .. } => message,
                other => other.to_string(),
            };
            let root = dir.root().display().to_string();
            ApiError::invalid_value(
                "controlnets",
                format!(
                    "`controlnets[{i}]`: {}",
                    message.replace(&root, "the ControlNet directory")
                ),
            )
        })?;
        input.model = path.display().to_string();
    }
    checked.generation.controlnets = inputs;
    Ok(checked)
}

/// A checked request with the LoRA adapters it names, read from the LoRA directory.
async fn with_loras(
    state: &Arc<AppState>,
    checked: request::Checked,
) -> Result<(request::Checked, Vec<JobLora>), ApiError> {
    let max = state.worker.max_clip_skip();
    if checked.generation.clip_skip > max {
        return Err(ApiError::invalid_value(
            "clip_skip",
            format!(
                "`clip_skip` {} is more than this model takes ({max}: its text encoders' layers less one)",
                checked.generation.clip_skip
            ),
        ));
    }
    if let Some(counter) = state.worker.prompt_counter() {
        let g = &checked.generation;
        let prompts = [
            ("prompt", Some(&g.prompt)),
            ("negative_prompt", g.negative_prompt.as_ref()),
        ];
        for (param, text) in prompts {
            let Some(text) = text else { continue };
            let tokens = counter
                .count(text, g.prompt_syntax)
                .map_err(|e| ApiError::internal(format!("counting tokens failed: {e}")))?;
            let chunks = tokens.per_chunk.len();
            if chunks > MAX_PROMPT_CHUNKS {
                return Err(ApiError::invalid_value(
                    param,
                    format!(
                        "`{param}` takes {chunks} chunks of {} tokens ({} tokens); this server reads at most {MAX_PROMPT_CHUNKS}",
                        tokens.chunk_length, tokens.total
                    ),
                ));
            }
        }
    }
    let loras = super::loras::resolve(state.loras.clone(), checked.loras.clone()).await?;
    Ok((checked, loras))
}

/// The 404 of `GET /v1/images/files/{id}` for an unknown or expired `id`.
pub fn image_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("no image `{id}` (URLs expire after one hour)"))
}

/// The 500 of a generation the worker could not finish, `message` saying why.
pub fn failed(message: &str) -> ApiError {
    ApiError::generation_failed(format!("the generation failed: {message}"))
}

/// Hands a checked request to the worker's queue (503 when it is full or closed) and
/// logs its acceptance.
fn submit(
    state: &AppState,
    http: &Request,
    checked: &request::Checked,
    loras: Vec<JobLora>,
    stream: Option<StreamOptions>,
) -> Result<(u64, oneshot::Receiver<JobResult>), ApiError> {
    let g = &checked.generation;
    let partial_images = stream.as_ref().map(|s| s.partial_images);
    let (id, answer) = state
        .worker
        .submit_job(
            g.clone(),
            checked.encoding.clone(),
            loras,
            stream,
            access::job_timing(http, &g.prompt),
        )
        .map_err(|e| match e {
            SubmitError::QueueFull => ApiError::queue_full(state.worker.max_queue_size()),
            SubmitError::Closed => ApiError::shutting_down(),
        })?;
    tracing::info!(
        job = id,
        seed = g.seed,
        n = g.num_images,
        width = g.width,
        height = g.height,
        steps = g.num_inference_steps,
        partial_images,
        "accepted image request"
    );
    Ok((id, answer))
}

/// Queues a streamed request and returns its event stream; errors before the job is
/// accepted are ordinary error responses.
fn start_stream(
    state: &Arc<AppState>,
    http: &Request,
    checked: request::Checked,
    loras: Vec<JobLora>,
    prefix: &'static str,
) -> Result<ImageEventStream, ApiError> {
    if state.worker.is_shutting_down() {
        return Err(ApiError::shutting_down());
    }
    let settings = checked
        .stream
        .clone()
        .ok_or_else(|| ApiError::internal("a streamed request without stream settings"))?;
    let g = &checked.generation;
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let stream = StreamOptions {
        partial_images: settings.partial_images,
        events: events_tx,
    };
    let (id, answer) = submit(state, http, &checked, loras, Some(stream))?;
    let meta = EventMeta {
        prefix,
        size: format!("{}x{}", g.width, g.height),
        quality: settings.quality.clone(),
        output_format: checked.encoding.format.name(),
        progress: settings.progress,
    };
    Ok(stream::events(state, http, id, events_rx, answer, meta))
}

/// Queues a checked request, waits for it (dropping it if the client goes away) and
/// shapes the answer.
async fn run_checked(
    state: &AppState,
    http: &Request,
    checked: request::Checked,
    loras: Vec<JobLora>,
    prompt: &str,
) -> Result<ImagesResponse, ApiError> {
    if state.worker.is_shutting_down() {
        return Err(ApiError::shutting_down());
    }
    let (id, answer) = submit(state, http, &checked, loras, None)?;
    // Stop waiting (which drops the job, or stops it at its next step) when the client
    // goes away.
    let mut answer = answer;
    let answer = match state.connections.get(http.remote_addr()) {
        Some(conn) => {
            let outcome = tokio::select! {
                answer = &mut answer => Some(answer),
                _ = conn.gone() => None,
            };
            match outcome {
                Some(answer) => answer,
                None => {
                    // Dropping the receiver is what tells the worker.
                    drop(answer);
                    state.worker.note_abandoned();
                    tracing::info!(job = id, "client went away");
                    return Err(ApiError::client_gone());
                }
            }
        }
        None => answer.await,
    };
    let files = match answer {
        Ok(Ok(files)) => files,
        Ok(Err(e)) => return Err(job_error(e)),
        // The worker dropped the job unanswered: it stopped.
        Err(_) => return Err(ApiError::shutting_down()),
    };
    let base = match checked.response_format {
        ResponseFormat::Url => Some(state.public_base(http)),
        ResponseFormat::B64Json => None,
    };
    let format = checked.encoding.format;
    let mut data = Vec::with_capacity(files.len());
    for file in files {
        let (b64_json, url) = match &base {
            None => (
                Some(base64::engine::general_purpose::STANDARD.encode(&file)),
                None,
            ),
            Some(base) => {
                let id = state.images.insert_as(file, format).ok_or_else(|| {
                    ApiError::internal(
                        "the image is larger than the server's URL store; use b64_json",
                    )
                })?;
                (None, Some(format!("{base}/v1/images/files/{id}")))
            }
        };
        data.push(ImageData {
            b64_json,
            url,
            revised_prompt: Some(prompt.to_string()),
        });
    }
    Ok(ImagesResponse {
        created: super::unix_now(),
        data,
    })
}
