//! Reading and checking request bodies. The body is parsed field by field, so that every
//! refusal names its field in `param` (the framework's own JSON payload reports neither
//! the field nor OpenAI's error shape), and then turned into a pipeline request.

use std::io::Cursor;

use bytes::Bytes;
use poem::Request;
use poem_openapi::registry::{MetaSchemaRef, Registry};
use poem_openapi::types::Type;
use serde_json::{Map, Value};

use super::body::BodyFormat;
use super::error::ApiError;
use super::limits::{
    RequestLimits, MAX_BODY_BYTES, MAX_CLIP_SKIP, MAX_CONTROLNET_SCALE, MAX_ETA, MAX_GUIDANCE,
    MAX_GUIDANCE_RESCALE, MAX_IMAGES, MAX_INPUT_PIXELS, MAX_LORA_SCALE, MAX_OUTPUT_COMPRESSION,
    MAX_PARTIAL_IMAGES, MAX_PROMPT_CHARS, MAX_REQUEST_CONTROLNETS, MAX_REQUEST_LORAS, MAX_STEPS,
};
use super::types::{
    self, ControlNetChoice, ImageGenerationRequest, OutputFormatName, PreprocessName,
    PromptSyntaxName, ResponseFormat, SchedulerName, SpacingName,
};
use crate::load::lora::LoraSpec;
use crate::pipeline::prompt::extract_extra_networks;
use crate::pipeline::{
    canny, ControlNetInput, Encoding, GenerationRequest, Image, OutputFormat, PromptSyntax,
    CANNY_HIGH, CANNY_LOW,
};
use crate::scheduler::{SamplerSettings, SchedulerKind, Spacing};

/// A body type read field by field with [`Fields`].
pub trait FromFields: Sized {
    /// Builds the value from the body's fields; every field must be consumed.
    fn from_fields(fields: &mut Fields) -> Result<Self, ApiError>;
}

/// Every schema type read with [`FromFields`] is a JSON body: documented as itself,
/// limited to [`MAX_BODY_BYTES`]. Any content type is read as JSON, so that `curl -d`
/// without a header works.
impl<T: Type + FromFields + Send> BodyFormat for T {
    const CONTENT_TYPE: &'static str = "application/json";
    const MAX_BYTES: usize = MAX_BODY_BYTES;

    fn schema_ref() -> MetaSchemaRef {
        <T as Type>::schema_ref()
    }

    fn register(registry: &mut Registry) {
        <T as Type>::register(registry);
    }

    async fn parse(_request: &Request, bytes: Bytes) -> Result<Self, ApiError> {
        parse_body(&bytes)
    }
}

/// Parses a body: JSON, an object, then [`FromFields`].
pub fn parse_body<T: FromFields>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the request body is empty; send a JSON object",
        ));
    }
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}"))
    })?;
    let Value::Object(map) = value else {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the body must be a JSON object",
        ));
    };
    let mut fields = Fields(map);
    let out = T::from_fields(&mut fields)?;
    fields.finish()?;
    Ok(out)
}

/// The fields of a JSON object, taken one by one with typed accessors that name the
/// field in their errors. `null` counts as absent.
#[derive(Debug)]
pub struct Fields(Map<String, Value>);

impl Fields {
    /// The fields of a parsed object.
    pub fn new(map: Map<String, Value>) -> Self {
        Self(map)
    }

    /// Removes a field whatever its value (fields accepted and ignored).
    pub fn take_any(&mut self, name: &str) -> Option<Value> {
        self.take(name)
    }

    /// A boolean field.
    pub fn boolean(&mut self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(other) => Err(Self::wrong_type(name, "a boolean", &other)),
        }
    }

    fn take(&mut self, name: &str) -> Option<Value> {
        self.0.remove(name).filter(|v| !v.is_null())
    }

    fn wrong_type(name: &str, want: &str, got: &Value) -> ApiError {
        let got = match got {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object(_) => "an object",
        };
        ApiError::field(
            name,
            "invalid_type",
            format!("`{name}` must be {want}, got {got}"),
        )
    }

    /// A string field.
    pub fn string(&mut self, name: &str) -> Result<Option<String>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(Self::wrong_type(name, "a string", &other)),
        }
    }

    /// A required string field.
    pub fn required_string(&mut self, name: &str) -> Result<String, ApiError> {
        self.string(name)?
            .ok_or_else(|| ApiError::field(name, "missing_field", format!("`{name}` is required")))
    }

    /// A non-negative integer field.
    pub fn unsigned(&mut self, name: &str) -> Result<Option<u64>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
                ApiError::field(
                    name,
                    "invalid_type",
                    format!("`{name}` must be a non-negative integer, got {n}"),
                )
            }),
            Some(other) => Err(Self::wrong_type(name, "an integer", &other)),
        }
    }

    /// A number field.
    pub fn number(&mut self, name: &str) -> Result<Option<f64>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_f64().map(Some).ok_or_else(|| {
                ApiError::field(name, "invalid_type", format!("`{name}` must be a number"))
            }),
            Some(other) => Err(Self::wrong_type(name, "a number", &other)),
        }
    }

    /// A list of at most `max` objects (`what` in messages, `example` showing one), each
    /// read by `item` from its own fields, which it must all take. Errors name the list,
    /// since `param` is a top-level field.
    fn object_list<T>(
        &mut self,
        name: &str,
        max: usize,
        what: &str,
        example: &str,
        mut item: impl FnMut(&mut Fields) -> Result<T, ApiError>,
    ) -> Result<Option<Vec<T>>, ApiError> {
        let items = match self.take(name) {
            None => return Ok(None),
            Some(Value::Array(items)) => items,
            Some(other) => return Err(Self::wrong_type(name, "an array", &other)),
        };
        if items.len() > max {
            return Err(ApiError::invalid_value(
                name,
                format!(
                    "`{name}` names {} {what}; at most {max} are allowed",
                    items.len()
                ),
            ));
        }
        let mut out = Vec::with_capacity(items.len());
        for (i, value) in items.into_iter().enumerate() {
            let Value::Object(map) = value else {
                return Err(ApiError::field(
                    name,
                    "invalid_type",
                    format!("`{name}[{i}]` must be an object like {example}"),
                ));
            };
            let rename = |e: ApiError| ApiError {
                message: format!("`{name}[{i}]`: {}", e.message),
                param: Some(name.to_string()),
                ..e
            };
            let mut f = Fields::new(map);
            let read = item(&mut f).map_err(rename)?;
            f.finish().map_err(rename)?;
            out.push(read);
        }
        Ok(Some(out))
    }

    /// `loras`: a list of `{"path": NAME, "scale": S}` (scale 1 when absent).
    pub fn lora_list(&mut self, name: &str) -> Result<Option<Vec<types::LoraChoice>>, ApiError> {
        self.object_list(
            name,
            MAX_REQUEST_LORAS,
            "adapters",
            r#"{"path": "x.safetensors", "scale": 0.8}"#,
            |f| {
                Ok(types::LoraChoice {
                    path: f.required_string("path")?,
                    scale: match f.number("scale")? {
                        Some(s) => in_range("scale", s, 0.0, MAX_LORA_SCALE)?,
                        None => types::default_lora_scale(),
                    },
                })
            },
        )
    }

    /// `controlnets`: a list of `{"model": NAME, "image": BASE64, "scale": S,
    /// "guidance_start": A, "guidance_end": B, "preprocess": "canny"}`.
    pub fn controlnet_list(
        &mut self,
        name: &str,
    ) -> Result<Option<Vec<ControlNetChoice>>, ApiError> {
        let fraction = |f: &mut Fields, key: &str| match f.number(key)? {
            Some(v) => in_range(key, v, 0.0, 1.0).map(Some),
            None => Ok(None),
        };
        self.object_list(
            name,
            MAX_REQUEST_CONTROLNETS,
            "ControlNets",
            r#"{"model": "canny", "image": "<base64>"}"#,
            |f| {
                Ok(ControlNetChoice {
                    model: f.required_string("model")?,
                    image: f.required_string("image")?,
                    scale: match f.number("scale")? {
                        Some(s) => in_range("scale", s, 0.0, MAX_CONTROLNET_SCALE)?,
                        None => types::default_controlnet_scale(),
                    },
                    guidance_start: fraction(f, "guidance_start")?,
                    guidance_end: fraction(f, "guidance_end")?,
                    preprocess: match f.string("preprocess")?.as_deref() {
                        None | Some("none") => None,
                        Some("canny") => Some(PreprocessName::Canny),
                        Some(other) => {
                            return Err(ApiError::invalid_value(
                                "preprocess",
                                format!(
                                    "`preprocess` must be `none` or `canny`, got `{other}` \
                                     (depth and pose maps: send the map)"
                                ),
                            ))
                        }
                    },
                    guess_mode: f.boolean("guess_mode")?,
                })
            },
        )
    }

    /// Refuses whatever field is left.
    pub fn finish(self) -> Result<(), ApiError> {
        match self.0.keys().next() {
            None => Ok(()),
            Some(name) => Err(ApiError::field(
                name,
                "unknown_field",
                format!("unrecognized request argument supplied: `{name}`"),
            )),
        }
    }
}

/// `value` checked against `lo..=hi`.
fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    name: &str,
    value: T,
    lo: T,
    hi: T,
) -> Result<T, ApiError> {
    if value >= lo && value <= hi {
        Ok(value)
    } else {
        Err(ApiError::invalid_value(
            name,
            format!("`{name}` must be between {lo} and {hi}, got {value}"),
        ))
    }
}

/// A prompt field, at most [`MAX_PROMPT_CHARS`] characters.
fn prompt_text(name: &str, text: Option<String>) -> Result<Option<String>, ApiError> {
    match text {
        Some(t) if t.chars().count() as u64 > MAX_PROMPT_CHARS => Err(ApiError::invalid_value(
            name,
            format!("`{name}` must be at most {MAX_PROMPT_CHARS} characters"),
        )),
        other => Ok(other),
    }
}

impl FromFields for types::TokenizeRequest {
    fn from_fields(f: &mut Fields) -> Result<Self, ApiError> {
        Ok(Self {
            prompt: prompt_text("prompt", Some(f.required_string("prompt")?))?.unwrap_or_default(),
            prompt_syntax: match f.string("prompt_syntax")? {
                None => None,
                Some(s) => Some(parse_prompt_syntax(&s)?),
            },
        })
    }
}

/// Parses `prompt_syntax`: `a1111` or `plain`.
pub fn parse_prompt_syntax(s: &str) -> Result<PromptSyntaxName, ApiError> {
    match s.parse::<PromptSyntax>() {
        Ok(PromptSyntax::A1111) => Ok(PromptSyntaxName::A1111),
        Ok(PromptSyntax::Plain) => Ok(PromptSyntaxName::Plain),
        Err(_) => Err(ApiError::invalid_value(
            "prompt_syntax",
            format!("`prompt_syntax` must be `a1111` or `plain`, got `{s}`"),
        )),
    }
}

impl FromFields for ImageGenerationRequest {
    fn from_fields(f: &mut Fields) -> Result<Self, ApiError> {
        // A struct literal, so that a new field cannot be forgotten here.
        Ok(Self {
            prompt: prompt_text("prompt", Some(f.required_string("prompt")?))?.unwrap_or_default(),
            model: f.string("model")?,
            n: match f.unsigned("n")? {
                Some(n) => in_range("n", n, 1, MAX_IMAGES)? as u32,
                None => types::default_n(),
            },
            size: f.string("size")?.unwrap_or_else(types::default_size),
            quality: f.string("quality")?,
            style: f.string("style")?,
            user: f.string("user")?,
            response_format: match f.string("response_format")?.as_deref() {
                None | Some("b64_json") => ResponseFormat::B64Json,
                Some("url") => ResponseFormat::Url,
                Some(other) => {
                    return Err(ApiError::invalid_value(
                        "response_format",
                        format!("`response_format` must be `b64_json` or `url`, got `{other}`"),
                    ))
                }
            },
            output_format: match f.string("output_format")? {
                None => None,
                Some(s) => Some(parse_output_format(&s)?),
            },
            output_compression: match f.unsigned("output_compression")? {
                Some(c) => {
                    Some(in_range("output_compression", c, 0, MAX_OUTPUT_COMPRESSION)? as u8)
                }
                None => None,
            },
            negative_prompt: prompt_text("negative_prompt", f.string("negative_prompt")?)?,
            num_inference_steps: match f.unsigned("num_inference_steps")? {
                Some(s) => in_range("num_inference_steps", s, 1, MAX_STEPS)? as u32,
                None => types::default_steps(),
            },
            guidance_scale: match f.number("guidance_scale")? {
                Some(g) => in_range("guidance_scale", g, 0.0, MAX_GUIDANCE)?,
                None => types::default_guidance(),
            },
            seed: f.unsigned("seed")?,
            lora_path: f.string("lora_path")?,
            lora_scale: match f.number("lora_scale")? {
                Some(s) => in_range("lora_scale", s, 0.0, MAX_LORA_SCALE)?,
                None => types::default_lora_scale(),
            },
            loras: f.lora_list("loras")?,
            controlnets: f.controlnet_list("controlnets")?,
            scheduler: match f.string("scheduler")? {
                None => None,
                Some(s) => Some(SchedulerName::from(
                    s.parse::<SchedulerKind>()
                        .map_err(|e| ApiError::invalid_value("scheduler", e.to_string()))?,
                )),
            },
            timestep_spacing: match f.string("timestep_spacing")? {
                None => None,
                Some(s) => Some(SpacingName::from(s.parse::<Spacing>().map_err(|e| {
                    ApiError::invalid_value("timestep_spacing", e.to_string())
                })?)),
            },
            guidance_rescale: match f.number("guidance_rescale")? {
                Some(r) => Some(in_range("guidance_rescale", r, 0.0, MAX_GUIDANCE_RESCALE)?),
                None => None,
            },
            eta: match f.number("eta")? {
                Some(e) => Some(in_range("eta", e, 0.0, MAX_ETA)?),
                None => None,
            },
            stream: f.boolean("stream")?,
            partial_images: match f.unsigned("partial_images")? {
                Some(p) => Some(in_range("partial_images", p, 0, MAX_PARTIAL_IMAGES)? as u32),
                None => None,
            },
            stream_progress: f.boolean("stream_progress")?,
            prompt_syntax: match f.string("prompt_syntax")? {
                None => None,
                Some(s) => Some(parse_prompt_syntax(&s)?),
            },
            clip_skip: match f.unsigned("clip_skip")? {
                Some(c) => Some(in_range("clip_skip", c, 0, MAX_CLIP_SKIP)? as u32),
                None => None,
            },
        })
    }
}

/// Parses `output_format`: `png`, `jpeg` (or `jpg`) or `webp`.
pub fn parse_output_format(s: &str) -> Result<OutputFormatName, ApiError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "png" => Ok(OutputFormatName::Png),
        "jpeg" | "jpg" => Ok(OutputFormatName::Jpeg),
        "webp" => Ok(OutputFormatName::Webp),
        _ => Err(ApiError::invalid_value(
            "output_format",
            format!("`output_format` must be `png`, `jpeg` or `webp`, got `{s}`"),
        )),
    }
}

/// The encoding a request asks for: its format, and `output_compression` as the JPEG
/// quality (default the best).
pub fn encoding(format: Option<OutputFormatName>, compression: Option<u8>) -> Encoding {
    Encoding {
        format: format.map(OutputFormat::from).unwrap_or_default(),
        quality: compression.unwrap_or(Encoding::BEST_QUALITY),
        parameters: None,
    }
}

/// Parses `WIDTHxHEIGHT` (or `auto`, 1024x1024) within `limits`. Exactly that form:
/// decimal sides without sign or leading zeros, a lowercase `x`, nothing around them,
/// so that the schema's pattern ([`super::schema::size_pattern`]) can say what is taken.
pub fn parse_size(size: &str, limits: &RequestLimits) -> Result<(usize, usize), ApiError> {
    let auto = types::default_size();
    let size = if size == "auto" { auto.as_str() } else { size };
    let bad = || {
        ApiError::invalid_value(
            "size",
            format!("`size` must look like `1024x1024` (WIDTHxHEIGHT) or be `auto`, got `{size}`"),
        )
    };
    let side = |s: &str| -> Option<usize> {
        let canonical = !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_digit())
            && (s == "0" || !s.starts_with('0'));
        canonical.then(|| s.parse().ok()).flatten()
    };
    let (w, h) = size.split_once('x').ok_or_else(bad)?;
    let (w, h) = (side(w).ok_or_else(bad)?, side(h).ok_or_else(bad)?);
    for (what, v) in [("width", w), ("height", h)] {
        if v < limits.min_size || v > limits.max_size || !v.is_multiple_of(8) {
            return Err(ApiError::invalid_value(
                "size",
                format!(
                    "the {what} {v} must be a multiple of 8 between {} and {}",
                    limits.min_size, limits.max_size
                ),
            ));
        }
    }
    Ok((w, h))
}

/// Whether a prompt has nothing but ASCII whitespace (the schema's `prompt` pattern
/// refuses the same).
pub fn is_blank(prompt: &str) -> bool {
    prompt
        .chars()
        .all(|c| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c'))
}

/// How a streamed request is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSettings {
    /// The request's `quality`, echoed in the events (`auto` when absent).
    pub quality: String,
    /// Partial images to send, 0 to [`MAX_PARTIAL_IMAGES`].
    pub partial_images: usize,
    /// Send `hypergen.progress` events.
    pub progress: bool,
}

/// A request the pipeline can run, and how to answer it.
#[derive(Debug, Clone)]
pub struct Checked {
    /// Stream the answer (`stream: true`), and how.
    pub stream: Option<StreamSettings>,
    /// What the worker runs.
    pub generation: GenerationRequest,
    /// How to return the images.
    pub response_format: ResponseFormat,
    /// The file format of the images.
    pub encoding: Encoding,
    /// LoRA adapters asked for (`lora_path`, then `loras`), not yet resolved.
    pub loras: Vec<RequestedLora>,
    /// ControlNets asked for, their `model` the name in the ControlNet directory, not
    /// yet resolved (the server puts them into `generation` once it has).
    pub controlnets: Vec<ControlNetInput>,
}

/// The ControlNets `req` names, their images decoded (and preprocessed), in order.
pub fn requested_controlnets(
    req: &ImageGenerationRequest,
) -> Result<Vec<ControlNetInput>, ApiError> {
    const FIELD: &str = "controlnets";
    let mut out = Vec::new();
    for (i, c) in req.controlnets.iter().flatten().enumerate() {
        let refuse =
            |message: String| ApiError::invalid_value(FIELD, format!("`{FIELD}[{i}]`: {message}"));
        let b64 = match c.image.split_once(";base64,") {
            Some((head, data)) if head.starts_with("data:") => data,
            _ => c.image.as_str(),
        };
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| refuse(format!("`image` is not base64 or a base64 data URL: {e}")))?;
        let decoded = decode_upload(FIELD, &bytes).map_err(|e| refuse(e.message))?;
        let mut image = Image::from_dynamic(&decoded);
        if c.preprocess == Some(PreprocessName::Canny) {
            image = canny(&image, CANNY_LOW, CANNY_HIGH).map_err(|e| refuse(e.to_string()))?;
        }
        let input = ControlNetInput {
            model: c.model.clone(),
            image,
            scale: c.scale,
            guidance_start: c.guidance_start.unwrap_or(0.0),
            guidance_end: c.guidance_end.unwrap_or(1.0),
            guess_mode: c.guess_mode.unwrap_or(false),
        };
        input.check().map_err(|e| refuse(e.to_string()))?;
        out.push(input);
    }
    Ok(out)
}

/// A LoRA adapter a request names, before the server resolves it in its directory: the
/// field it came from (`lora_path` or `loras`, for errors) and its name at its scale.
pub type RequestedLora = (&'static str, LoraSpec<String>);

/// How a server reads prompts that do not say (`--prompt-syntax`, `--clip-skip`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PromptDefaults {
    /// `prompt_syntax` when absent.
    pub syntax: PromptSyntax,
    /// `clip_skip` when absent.
    pub clip_skip: usize,
}

/// The `<lora:NAME:WEIGHT>` tags of a prompt in A1111 syntax (weight 1 when absent;
/// A1111's optional third argument, a separate UNet weight, is not supported: the
/// first weight applies to the whole adapter). Other extra networks are removed from
/// the text and otherwise ignored, as A1111 ignores kinds it does not know.
pub fn prompt_loras(prompt: &str) -> Result<Vec<RequestedLora>, ApiError> {
    let (_, found) = extract_extra_networks(prompt);
    let mut out = Vec::new();
    for tag in found.into_iter().filter(|t| t.kind == "lora") {
        let name = tag.args.first().map(|n| n.trim()).unwrap_or_default();
        let scale = match tag.args.get(1).map(|w| w.trim()) {
            None | Some("") => 1.0,
            Some(w) => {
                let scale = w.parse::<f64>().map_err(|_| {
                    ApiError::invalid_value(
                        "prompt",
                        format!("`<lora:{name}:{w}>`: the weight must be a number"),
                    )
                })?;
                if !(0.0..=MAX_LORA_SCALE).contains(&scale) {
                    return Err(ApiError::invalid_value(
                        "prompt",
                        format!(
                            "`<lora:{name}:{w}>`: the weight must be between 0 and {MAX_LORA_SCALE}"
                        ),
                    ));
                }
                scale
            }
        };
        out.push(("prompt", LoraSpec::new(name.to_string(), scale as f32)));
    }
    Ok(out)
}

/// The adapters `req` names: `lora_path` (with `lora_scale`) first, then `loras`, then
/// the prompt's `<lora:…>` tags when it is read in A1111 syntax (`syntax`).
pub fn requested_loras(
    req: &ImageGenerationRequest,
    syntax: PromptSyntax,
) -> Result<Vec<RequestedLora>, ApiError> {
    let mut out = Vec::new();
    // An empty `lora_path` (what forms and some clients send for "none") names nothing.
    if let Some(name) = req.lora_path.as_ref().filter(|n| !n.trim().is_empty()) {
        out.push((
            "lora_path",
            LoraSpec::new(name.clone(), req.lora_scale as f32),
        ));
    }
    for choice in req.loras.iter().flatten() {
        out.push(("loras", LoraSpec::from(choice)));
    }
    if syntax == PromptSyntax::A1111 {
        out.extend(prompt_loras(&req.prompt)?);
    }
    if out.len() > MAX_REQUEST_LORAS {
        return Err(ApiError::invalid_value(
            "loras",
            format!(
                "at most {MAX_REQUEST_LORAS} LoRA adapters per request (`lora_path`, `loras` \
                 and the prompt's `<lora:…>` tags together)"
            ),
        ));
    }
    Ok(out)
}

/// Checks what the field parser cannot (size, this server's limits, features hypergen
/// lacks) and builds the
/// pipeline request; `seed` fills in an absent seed.
pub fn check(
    req: &ImageGenerationRequest,
    limits: &RequestLimits,
    prompt: PromptDefaults,
    seed: impl FnOnce() -> u64,
) -> Result<Checked, ApiError> {
    if is_blank(&req.prompt) {
        return Err(ApiError::invalid_value(
            "prompt",
            "`prompt` must not be empty",
        ));
    }
    let (width, height) = parse_size(&req.size, limits)?;
    in_range("n", u64::from(req.n), 1, limits.max_images)?;
    in_range(
        "num_inference_steps",
        u64::from(req.num_inference_steps),
        1,
        limits.max_steps,
    )?;
    let syntax = req.prompt_syntax.map_or(prompt.syntax, PromptSyntax::from);
    let loras = requested_loras(req, syntax)?;
    let controlnets = requested_controlnets(req)?;
    Ok(Checked {
        loras,
        controlnets,
        stream: (req.stream == Some(true)).then(|| StreamSettings {
            quality: req.quality.clone().unwrap_or_else(|| "auto".into()),
            partial_images: req.partial_images.unwrap_or(0) as usize,
            progress: req.stream_progress == Some(true),
        }),
        generation: GenerationRequest {
            prompt: req.prompt.clone(),
            negative_prompt: req.negative_prompt.clone(),
            num_inference_steps: req.num_inference_steps as usize,
            guidance_scale: req.guidance_scale,
            width,
            height,
            num_images: req.n as usize,
            seed: req.seed.unwrap_or_else(seed),
            guidance_rescale: req.guidance_rescale.unwrap_or(0.0),
            sampler: SamplerSettings {
                kind: req.scheduler.map(SchedulerKind::from),
                timestep_spacing: req.timestep_spacing.map(Spacing::from),
                eta: req.eta,
            },
            prompt_syntax: syntax,
            clip_skip: req.clip_skip.map_or(prompt.clip_skip, |c| c as usize),
            ..Default::default()
        },
        response_format: req.response_format,
        encoding: encoding(req.output_format, req.output_compression),
    })
}

/// Decodes an uploaded PNG, JPEG or WebP after checking its header's dimensions
/// against [`MAX_INPUT_PIXELS`]; errors name `field`.
pub fn decode_upload(field: &str, bytes: &[u8]) -> Result<image::DynamicImage, ApiError> {
    let not_image = || {
        ApiError::invalid_value(
            field,
            format!("`{field}` must be a PNG, JPEG or WebP image"),
        )
    };
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|_| not_image())?;
    match reader.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP) => {}
        _ => return Err(not_image()),
    }
    let (w, h) = reader.into_dimensions().map_err(|_| not_image())?;
    if u64::from(w) * u64::from(h) > MAX_INPUT_PIXELS || w == 0 || h == 0 {
        return Err(ApiError::invalid_value(
            field,
            format!("`{field}` is {w}x{h}; at most {MAX_INPUT_PIXELS} pixels are accepted"),
        ));
    }
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|_| not_image())?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    reader.limits(limits);
    reader
        .decode()
        .map_err(|e| ApiError::invalid_value(field, format!("`{field}` could not be decoded: {e}")))
}

/// A random seed for a request that has none.
pub fn random_seed() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        // No OS randomness: the clock still differs between requests.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    })
}
