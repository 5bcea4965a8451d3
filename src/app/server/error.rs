//! [`ApiError`]: every error the service answers with, as OpenAI's error object, and
//! the conversion of the framework's own errors (unknown route, bad method, …) to it.

use std::fmt;

use poem::http::{header, HeaderValue, StatusCode};
use poem::{IntoResponse, Response};

use super::types::{ErrorBody, ErrorResponse};

/// Seconds a client is asked to wait before retrying a refused request.
pub const RETRY_AFTER_SECS: u64 = 5;

/// An error answer: status, OpenAI error fields and the headers that go with them.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// OpenAI's `type`.
    pub kind: &'static str,
    /// OpenAI's `code`.
    pub code: &'static str,
    /// The offending request field, if any.
    pub param: Option<String>,
    /// What went wrong.
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: String) -> Self {
        Self {
            status,
            kind,
            code,
            param: None,
            message,
        }
    }

    /// 400: the value of field `param` is not acceptable.
    pub fn invalid_value(param: &str, message: impl Into<String>) -> Self {
        Self::field(param, "invalid_value", message)
    }

    /// 400 about field `param`, with a specific `code`.
    pub fn field(param: &str, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                code,
                message.into(),
            )
        }
    }

    /// 400 about the request as a whole (malformed JSON, not an object).
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message.into(),
        )
    }

    /// 401 with `code` `missing_api_key` or `invalid_api_key`.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            code,
            message.into(),
        )
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            message.into(),
        )
    }

    /// 413 for a body over `limit` bytes.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("the request body is larger than the server's limit of {limit} bytes"),
        )
    }

    /// 408: the body did not arrive within `timeout`.
    pub fn request_timeout(timeout: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            format!(
                "the request body did not arrive within {} seconds",
                timeout.as_secs_f64()
            ),
        )
    }

    /// 503: the queue is full; retry later.
    pub fn queue_full(max: usize) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "queue_full",
            format!("the server is busy: {max} requests are already waiting; retry later"),
        )
    }

    /// 503: the server is shutting down.
    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "shutting_down",
            "the server is shutting down".into(),
        )
    }

    /// The client closed its connection (nginx's 499; nobody receives it).
    pub fn client_gone() -> Self {
        Self::new(
            StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            "invalid_request_error",
            "client_closed_request",
            "the client closed the connection".into(),
        )
    }

    /// 500: the generation failed (sent with `x-should-retry: false`).
    pub fn generation_failed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "generation_failed",
            message.into(),
        )
    }

    /// 500 for anything else that is the server's fault.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            message.into(),
        )
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorBody {
                message: self.message.clone(),
                kind: self.kind.to_string(),
                param: self.param.clone(),
                code: Some(self.code.to_string()),
            },
        }
    }

    /// `Retry-After` seconds, for the statuses that carry it.
    pub fn retry_after(&self) -> Option<u64> {
        (self.status == StatusCode::SERVICE_UNAVAILABLE).then_some(RETRY_AFTER_SECS)
    }

    /// `x-should-retry`, for the statuses whose retry advice differs from a client's
    /// default: never re-run a failed generation (it may be out of memory again).
    pub fn should_retry(&self) -> Option<&'static str> {
        match self.status {
            StatusCode::INTERNAL_SERVER_ERROR => Some("false"),
            StatusCode::SERVICE_UNAVAILABLE => Some("true"),
            _ => None,
        }
    }

    /// The error for a framework error (from routing, extractors, the body reader).
    pub fn from_poem(err: &poem::Error) -> Self {
        if let Some(api) = err.downcast_ref::<ApiError>() {
            return api.clone();
        }
        let status = err.status();
        match status {
            StatusCode::NOT_FOUND => Self::not_found("unknown route"),
            StatusCode::METHOD_NOT_ALLOWED => Self::new(
                status,
                "invalid_request_error",
                "method_not_allowed",
                "method not allowed on this route".into(),
            ),
            StatusCode::PAYLOAD_TOO_LARGE => Self::too_large(super::limits::MAX_BODY_BYTES),
            // poem's CORS middleware, for an `Origin` that `--cors-origin` does not list.
            StatusCode::FORBIDDEN => Self::new(
                status,
                "invalid_request_error",
                "origin_not_allowed",
                "this origin may not call the API from a browser (see --cors-origin)".into(),
            ),
            StatusCode::UNAUTHORIZED => {
                Self::unauthorized("invalid_api_key", "missing or invalid API key")
            }
            s if s.is_client_error() => Self::bad_request("invalid_request", err.to_string()),
            _ => Self::internal(err.to_string()),
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

impl poem::error::ResponseError for ApiError {
    fn status(&self) -> StatusCode {
        self.status
    }

    fn as_response(&self) -> Response {
        let json = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        let mut resp = poem::web::Json(json).into_response();
        resp.set_status(self.status);
        if let Some(secs) = self.retry_after() {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(v) = self.should_retry() {
            resp.headers_mut()
                .insert("x-should-retry", HeaderValue::from_static(v));
        }
        resp
    }
}

/// Turns any error that escaped the typed handlers into OpenAI's error object (the
/// framework's own plain-text 400/404/405/413 bodies included).
pub async fn catch_all(err: poem::Error) -> Response {
    let api = ApiError::from_poem(&err);
    if api.status.is_server_error() {
        tracing::error!(error = %err, "request failed");
    }
    poem::error::ResponseError::as_response(&api)
}
