//! `POST /v1/images/edits`: OpenAI's multipart image edit, read field by field so that
//! every refusal names its field, with image checks before any decoding work.

use std::collections::HashMap;
use std::sync::OnceLock;

use bytes::Bytes;
use poem::{Request, RequestBody};
use poem_openapi::payload::Payload;
use poem_openapi::registry::{MetaSchemaRef, Registry};
use serde_json::{Map, Value};

use super::body::BodyFormat;
use super::error::ApiError;
use super::limits::{RequestLimits, MAX_EDIT_BODY_BYTES, MAX_STRENGTH};
pub use super::request::decode_upload;
use super::request::{self, Checked, Fields, FromFields, PromptDefaults};
use super::types::{ImageEditRequest, ImageGenerationRequest};
use crate::pipeline::{Image, InitImage, Mask};

/// OpenAI's edit fields hypergen accepts and ignores.
pub const IGNORED_FIELDS: [&str; 3] = ["background", "input_fidelity", "moderation"];

/// Whether the text of field `name` is read as a JSON number or boolean: whether the
/// form's schema ([`ImageEditRequest`], the one list of its fields) types it so. Every
/// other field is text.
fn is_scalar(name: &str) -> bool {
    static SCALARS: OnceLock<Vec<&'static str>> = OnceLock::new();
    SCALARS
        .get_or_init(|| {
            let MetaSchemaRef::Inline(form) = <ImageEditRequest as Payload>::schema_ref() else {
                return Vec::new();
            };
            form.properties
                .iter()
                .filter(|(_, field)| match field {
                    MetaSchemaRef::Inline(s) => matches!(s.ty, "integer" | "number" | "boolean"),
                    MetaSchemaRef::Reference(_) => false,
                })
                .map(|(name, _)| *name)
                .collect()
        })
        .contains(&name)
}

/// A `multipart/form-data` edit form: its text fields and its files, unchecked.
#[derive(Debug, Default)]
pub struct EditForm {
    /// Text fields by name (the last of a repeated name wins).
    pub texts: HashMap<String, String>,
    /// The `image` file (`image[]` as OpenAI's clients name a list; the first is used).
    pub image: Option<Vec<u8>>,
    /// The `mask` file.
    pub mask: Option<Vec<u8>>,
}

impl BodyFormat for EditForm {
    const CONTENT_TYPE: &'static str = "multipart/form-data";
    const MAX_BYTES: usize = MAX_EDIT_BODY_BYTES;

    fn schema_ref() -> MetaSchemaRef {
        <ImageEditRequest as Payload>::schema_ref()
    }

    fn register(registry: &mut Registry) {
        <ImageEditRequest as Payload>::register(registry);
    }

    async fn parse(request: &Request, bytes: Bytes) -> Result<Self, ApiError> {
        let mut inner = RequestBody::new(poem::Body::from(bytes));
        let bad_form = |e: String| {
            ApiError::bad_request(
                "invalid_form",
                format!("the body must be multipart/form-data: {e}"),
            )
        };
        let mut multipart =
            <poem::web::Multipart as poem::FromRequest>::from_request(request, &mut inner)
                .await
                .map_err(|e| bad_form(e.to_string()))?;
        let mut form = EditForm::default();
        while let Some(field) = multipart
            .next_field()
            .await
            .map_err(|e| bad_form(e.to_string()))?
        {
            let name = field.name().unwrap_or_default().to_string();
            match name.as_str() {
                "image" | "image[]" => {
                    let data = field.bytes().await.map_err(|e| bad_form(e.to_string()))?;
                    form.image.get_or_insert(data);
                }
                "mask" => {
                    let data = field.bytes().await.map_err(|e| bad_form(e.to_string()))?;
                    form.mask = Some(data);
                }
                _ => {
                    let text = field.text().await.map_err(|_| {
                        ApiError::invalid_value(&name, format!("`{name}` must be UTF-8 text"))
                    })?;
                    form.texts.insert(name, text);
                }
            }
        }
        Ok(form)
    }
}

/// An edit form checked and turned into a pipeline request (see the route's docs).
pub fn check_edit(
    form: EditForm,
    limits: &RequestLimits,
    prompt: PromptDefaults,
    seed: impl FnOnce() -> u64,
) -> Result<Checked, ApiError> {
    let mut map = Map::new();
    for (name, text) in form.texts {
        let value = if name == "loras" || name == "controlnets" {
            // JSON text in a form; text that is not JSON stays text, and the field
            // reader names it.
            serde_json::from_str::<Value>(text.trim()).unwrap_or(Value::String(text))
        } else if is_scalar(&name) {
            // Form fields are text; a number that does not parse stays text, and the
            // field reader then names it.
            serde_json::from_str::<Value>(text.trim())
                .ok()
                .filter(|v| v.is_number() || v.is_boolean())
                .unwrap_or(Value::String(text))
        } else {
            Value::String(text)
        };
        map.insert(name, value);
    }
    let size_given = map
        .get("size")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty() && s != "auto");
    let mut fields = Fields::new(map);
    let strength = fields.number("strength")?;
    for ignored in IGNORED_FIELDS {
        let _ = fields.take_any(ignored);
    }
    let mut req = ImageGenerationRequest::from_fields(&mut fields)?;
    fields.finish()?;
    let image_bytes = form
        .image
        .ok_or_else(|| ApiError::field("image", "missing_field", "`image` is required"))?;
    let img = decode_upload("image", &image_bytes)?;
    let mask = match &form.mask {
        None => None,
        Some(bytes) => {
            let m = decode_upload("mask", bytes)?;
            if (m.width(), m.height()) != (img.width(), img.height()) {
                return Err(ApiError::invalid_value(
                    "mask",
                    format!(
                        "the mask is {}x{} but the image is {}x{}; they must match",
                        m.width(),
                        m.height(),
                        img.width(),
                        img.height()
                    ),
                ));
            }
            Some(Mask::from_dynamic(&m))
        }
    };
    if !size_given {
        // The image's own size, down to a multiple of 8 (diffusers' default).
        req.size = format!("{}x{}", img.width() / 8 * 8, img.height() / 8 * 8);
    }
    let strength = match strength {
        Some(s) if (0.0..=MAX_STRENGTH).contains(&s) => s,
        Some(s) => {
            return Err(ApiError::invalid_value(
                "strength",
                format!("`strength` must be between 0 and {MAX_STRENGTH}, got {s}"),
            ))
        }
        None => InitImage::default_strength(mask.is_some()),
    };
    let mut checked = request::check(&req, limits, prompt, seed)?;
    let (w, h) = (checked.generation.width, checked.generation.height);
    let mask = mask
        .map(|m| m.resized(w, h))
        .transpose()
        .map_err(|e| ApiError::invalid_value("mask", e.to_string()))?;
    let image = Image::from_dynamic(&img)
        .resized(w, h)
        .map_err(|e| ApiError::invalid_value("image", e.to_string()))?;
    crate::scheduler::Scheduler::start_step(checked.generation.num_inference_steps, strength)
        .map_err(|e| ApiError::invalid_value("strength", e.to_string()))?;
    checked.generation.init_image = Some(InitImage {
        image,
        mask,
        strength,
    });
    Ok(checked)
}
