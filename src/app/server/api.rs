//! The routes: a thin typed layer that checks requests, hands them to the worker and
//! shapes its answers as OpenAI's Images API does.

use std::sync::Arc;

use base64::Engine as _;
use poem::web::Data;
use poem::Request;
use poem_openapi::param::Path;
use poem_openapi::payload::{Binary, Json};
use poem_openapi::{ApiResponse, OpenApi, Tags};

use super::auth::Authorized;
use super::edit::{self, EditForm};
use super::error::{ApiError, RETRY_AFTER_SECS};
use super::request::{self, JsonBody};
use super::types::{
    ErrorResponse, HealthResponse, HealthStatus, ImageData, ImageGenerationRequest, ImagesResponse,
    Model, ModelList, ResponseFormat,
};
use super::worker::{JobError, SubmitError};
use super::AppState;
use crate::pipeline::OutputFormat;

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
    /// The worker has stopped or the server is shutting down.
    #[oai(status = 503)]
    Unhealthy(Json<HealthResponse>),
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
        body: JsonBody<ImageGenerationRequest>,
    ) -> GenerateResult {
        match generate(&state, request, &body.0).await {
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
        form: EditForm,
    ) -> EditResult {
        let outcome = match edit::check_edit(form, &state.config.limits, request::random_seed) {
            Ok(checked) => {
                let prompt = checked.generation.prompt.clone();
                run_checked(&state, request, checked, &prompt).await
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
            None => {
                ApiError::not_found(format!("no image `{}` (URLs expire after one hour)", id.0))
                    .into()
            }
        }
    }
}

/// Runs one image request: check, queue, wait, encode.
async fn generate(
    state: &AppState,
    http: &Request,
    req: &ImageGenerationRequest,
) -> Result<ImagesResponse, ApiError> {
    let checked = request::check(req, &state.config.limits, request::random_seed)?;
    run_checked(state, http, checked, &req.prompt).await
}

/// Queues a checked request, waits for it (dropping it if the client goes away) and
/// shapes the answer.
async fn run_checked(
    state: &AppState,
    http: &Request,
    checked: request::Checked,
    prompt: &str,
) -> Result<ImagesResponse, ApiError> {
    if state.worker.is_shutting_down() {
        return Err(ApiError::shutting_down());
    }
    let g = &checked.generation;
    let (id, answer) = state
        .worker
        .submit(g.clone(), checked.encoding.clone())
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
        "accepted image request"
    );
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
    let pngs = match answer {
        Ok(Ok(pngs)) => pngs,
        Ok(Err(JobError::Failed(message))) => {
            return Err(ApiError::generation_failed(format!(
                "the generation failed: {message}"
            )))
        }
        Ok(Err(JobError::ShuttingDown)) => return Err(ApiError::shutting_down()),
        // The worker dropped the job unanswered: it stopped.
        Err(_) => return Err(ApiError::shutting_down()),
    };
    let base = match checked.response_format {
        ResponseFormat::Url => Some(state.public_base(http)),
        ResponseFormat::B64Json => None,
    };
    let format = checked.encoding.format;
    let mut data = Vec::with_capacity(pngs.len());
    for png in pngs {
        let (b64_json, url) = match &base {
            None => (
                Some(base64::engine::general_purpose::STANDARD.encode(&png)),
                None,
            ),
            Some(base) => {
                let id = state.images.insert_as(png, format).ok_or_else(|| {
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
