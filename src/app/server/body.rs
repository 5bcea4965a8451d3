//! [`Body`]: the one extractor of request bodies, JSON or multipart. A body is read whole,
//! within its format's size limit and the connection's body deadline, and only then
//! parsed, so that a body too large, too slow or malformed is answered with OpenAI's
//! error object (the framework's own payloads answer in plain text).

use std::future::Future;

use bytes::Bytes;
use poem::{Request, RequestBody};
use poem_openapi::registry::{MetaMediaType, MetaRequest, MetaSchemaRef, Registry};
use poem_openapi::{ApiExtractor, ApiExtractorType, ExtractParamOptions};

use super::error::ApiError;

/// What a request body is: the media type the schema documents, the size limit, the
/// schema and the parser of the whole body.
pub trait BodyFormat: Sized + Send {
    /// The media type the schema documents. Bodies are parsed whatever their
    /// `Content-Type` says; the parser refuses what it cannot read.
    const CONTENT_TYPE: &'static str;
    /// Largest body read, in bytes; larger ones get 413.
    const MAX_BYTES: usize;

    /// The body's schema.
    fn schema_ref() -> MetaSchemaRef;

    /// Registers the types the schema refers to.
    fn register(registry: &mut Registry);

    /// Parses the whole body of `request`.
    fn parse(
        request: &Request,
        bytes: Bytes,
    ) -> impl Future<Output = Result<Self, ApiError>> + Send;
}

/// A request body in format `T`: documented as `T`'s schema, read up to `T::MAX_BYTES`
/// and parsed by `T`.
#[derive(Debug, Clone, PartialEq)]
pub struct Body<T>(pub T);

/// The whole body of `request`, at most `limit` bytes, within the connection's body
/// deadline. A declared length over the limit is refused before anything is read; the
/// read itself stops at the limit, so that a body without a length cannot grow past it.
async fn read_limited(
    request: &Request,
    body: &mut RequestBody,
    limit: usize,
) -> poem::Result<Bytes> {
    let too_long = request
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > limit);
    if too_long {
        return Err(ApiError::too_large(limit).into());
    }
    let timeout = super::conn::body_timeout(request);
    let read = body.take()?.into_bytes_limit(limit);
    let bytes = tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| ApiError::request_timeout(timeout))?
        .map_err(|e| match e {
            poem::error::ReadBodyError::PayloadTooLarge => ApiError::too_large(limit),
            other => ApiError::bad_request("invalid_body", format!("reading the body: {other}")),
        })?;
    Ok(bytes)
}

impl<'a, T: BodyFormat> ApiExtractor<'a> for Body<T> {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        T::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        Some(MetaRequest {
            description: None,
            content: vec![MetaMediaType {
                content_type: T::CONTENT_TYPE,
                schema: T::schema_ref(),
            }],
            required: true,
        })
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        let bytes = read_limited(request, body, T::MAX_BYTES).await?;
        Ok(Self(T::parse(request, bytes).await?))
    }
}
