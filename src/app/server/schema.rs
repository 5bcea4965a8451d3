//! The OpenAPI document clients are generated from. poem-openapi derives it from the
//! routes and types; this module reshapes what common generators and validators trip on
//! (openapi-python-client, OpenAPI Generator, openapi-typescript, schemathesis) and, for
//! the live `/openapi.json`, describes the running server exactly: its base URL, whether
//! it needs a key, its size limits and queue.
//!
//! The reshaping: a bare `$ref` (with its description beside it) instead of poem's
//! `allOf` wrapper; plain `application/json` content keys; both 200 answers of the image
//! routes (JSON and `text/event-stream`), which poem keeps only one of; `nullable` where
//! the server sends or takes `null`; `additionalProperties: false` on the JSON request,
//! whose unknown fields are refused; patterns for `prompt` and `size` that accept
//! exactly what the server accepts; an example error per status, made by the code that
//! makes the real one; `servers`; and security that clients satisfy with or without a
//! key (committed document) or exactly as the server needs (live document).

use std::sync::OnceLock;

use poem_openapi::types::ToJSON;
use poem_openapi::ApiResponse;
use serde_json::{json, Map, Value};

use super::api::{self, EditResult, GenerateResult, ImageFileResult};
use super::auth::{self, ApiKey, SCHEME_NAME};
use super::edit::{self, EditForm};
use super::error::ApiError;
use super::limits::{RequestLimits, MAX_BODY_BYTES, MAX_EDIT_BODY_BYTES};
use super::request;
use super::types::{self, ImageGenerationRequest};
use super::ServerConfig;
use crate::device::DeviceSpec;

/// Where `hypergen serve` listens by default, for the committed document's `servers`.
pub fn default_base_url() -> String {
    format!("http://localhost:{}", super::DEFAULT_PORT)
}

/// What the document says about the server it describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFacts {
    /// `Some(true)`: every `/v1` route needs the key; `Some(false)`: none does; `None`
    /// (the committed document): either, so clients may send a key or not.
    pub key: Option<bool>,
    /// The sizes, steps and image counts requests may ask for.
    pub limits: RequestLimits,
    /// Accepted requests that may wait (the 503 example names it).
    pub max_queue_size: usize,
    /// The base URL clients reach the server at.
    pub base_url: String,
}

impl ServerFacts {
    /// The facts of the committed document: the defaults of `hypergen serve`, with or
    /// without a key.
    pub fn committed() -> Self {
        Self::of(&ServerConfig::new("", DeviceSpec::Cpu), &default_base_url()).with_key(None)
    }

    /// The facts of a server configured as `config`, reached at `base_url`.
    pub fn of(config: &ServerConfig, base_url: &str) -> Self {
        Self {
            key: Some(config.api_key.is_some()),
            limits: config.limits,
            max_queue_size: config.worker.max_queue_size,
            base_url: base_url.trim_end_matches('/').to_string(),
        }
    }

    fn with_key(self, key: Option<bool>) -> Self {
        Self { key, ..self }
    }
}

/// The committed document (`openapi/openapi.json`, `hypergen openapi`).
pub fn committed_json() -> String {
    pretty(&document(&ServerFacts::committed()))
}

/// `doc` as the server serves it: indented JSON.
pub fn pretty(doc: &Value) -> String {
    // A `Value` always serializes.
    serde_json::to_string_pretty(doc).unwrap_or_default()
}

/// The document describing a server with `facts`.
pub fn document(facts: &ServerFacts) -> Value {
    let mut doc: Value =
        serde_json::from_str(&super::openapi_service().spec()).unwrap_or_else(|_| json!({}));
    unwrap_single_refs(&mut doc);
    plain_json(&mut doc);
    let routes = [
        ("/v1/images/generations", "post", GenerateResult::meta()),
        ("/v1/images/edits", "post", EditResult::meta()),
        ("/v1/images/files/{id}", "get", ImageFileResult::meta()),
    ];
    for (path, method, meta) in routes {
        merge_same_status(&mut doc, path, method, meta.responses);
    }
    unsigned_minimum(&mut doc);
    event_streams(&mut doc);
    let schemas = &mut doc["components"]["schemas"];
    error_body(&mut schemas["ErrorBody"]);
    generation_request(&mut schemas["ImageGenerationRequest"], &facts.limits);
    strict_request(&mut schemas["TokenizeRequest"]);
    let generation = doc["components"]["schemas"]["ImageGenerationRequest"].clone();
    let form = &mut doc["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
        ["multipart/form-data"]["schema"];
    edit_form(form, &generation, &facts.limits);
    error_examples(&mut doc, facts);
    security(&mut doc, facts.key);
    doc["servers"] = json!([{
        "url": facts.base_url,
        "description": match facts.key {
            None => "`hypergen serve`'s default address",
            Some(_) => "this server",
        },
    }]);
    doc
}

/// Replaces poem's `allOf: [{$ref}, {description, default}]` (how it attaches a
/// description to a referenced type) with the `$ref` and its siblings, which
/// openapi-python-client cannot take ("Cannot take allOf a non-object") and which
/// makes other generators invent a wrapper class.
fn unwrap_single_refs(v: &mut Value) {
    match v {
        Value::Object(map) => {
            let single = map
                .get("allOf")
                .and_then(Value::as_array)
                .filter(|all| {
                    all.first().is_some_and(|f| f.get("$ref").is_some())
                        && all[1..].iter().all(|x| x.get("$ref").is_none())
                })
                .cloned();
            if let Some(all) = single {
                map.remove("allOf");
                for part in all {
                    if let Value::Object(part) = part {
                        for (k, x) in part {
                            map.entry(k).or_insert(x);
                        }
                    }
                }
            }
            map.values_mut().for_each(unwrap_single_refs);
        }
        Value::Array(items) => items.iter_mut().for_each(unwrap_single_refs),
        _ => {}
    }
}

/// `application/json; charset=utf-8` keys become `application/json`: the media type
/// clients match (the answers still say `charset=utf-8`, a parameter clients ignore).
fn plain_json(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if let Some(x) = map.remove("application/json; charset=utf-8") {
                map.insert("application/json".into(), x);
            }
            map.values_mut().for_each(plain_json);
        }
        Value::Array(items) => items.iter_mut().for_each(plain_json),
        _ => {}
    }
}

/// poem keeps one response per status; a route answering 200 in several media types
/// (JSON or an event stream; PNG, JPEG or WebP) gets them all, and their descriptions,
/// back from its response type.
fn merge_same_status(
    doc: &mut Value,
    path: &str,
    method: &str,
    responses: Vec<poem_openapi::registry::MetaResponse>,
) {
    let Some(op) = doc["paths"][path][method]["responses"].as_object_mut() else {
        return;
    };
    let mut merged: Map<String, Value> = Map::new();
    for r in responses {
        let Some(status) = r.status else { continue };
        let Ok(Value::Object(r)) = serde_json::to_value(&r) else {
            continue;
        };
        let entry = merged
            .entry(status.to_string())
            .or_insert_with(|| json!({"description": "", "content": {}}));
        let description = entry["description"].as_str().unwrap_or("").to_string();
        let add = r["description"].as_str().unwrap_or("");
        entry["description"] = json!(if description.is_empty() {
            add.to_string()
        } else {
            format!("{description}\n\n{add}")
        });
        if let (Some(into), Some(Value::Object(content))) =
            (entry["content"].as_object_mut(), r.get("content").cloned())
        {
            into.extend(content);
        }
    }
    for (status, m) in merged {
        let Some(resp) = op.get_mut(&status) else {
            continue;
        };
        if m["content"].as_object().is_some_and(|c| c.len() > 1) {
            resp["description"] = m["description"].clone();
            resp["content"] = m["content"].clone();
            plain_json(resp);
        }
    }
}

/// An event stream's schema describes one event (OpenAPI before 3.2 has no `itemSchema`):
/// its `event` name and its `data`, an `ImageStreamEvent` as JSON text. poem describes
/// the stream as an array of the data objects, which no validator reads as SSE.
fn event_streams(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if let Some(stream) = map.get_mut("text/event-stream") {
                stream["schema"] = json!({
                    "type": "object",
                    "description": "One server-sent event.",
                    "required": ["event", "data"],
                    "properties": {
                        "event": {
                            "type": "string",
                            "description": "The event's type, as its `data`'s `type`."
                        },
                        "data": {
                            "type": "string",
                            "description": "An `ImageStreamEvent` (see the schemas) as JSON text."
                        }
                    }
                });
            }
            map.values_mut().for_each(event_streams);
        }
        Value::Array(items) => items.iter_mut().for_each(event_streams),
        _ => {}
    }
}

/// poem gives unsigned integers a `format` (`uint32`) but no `minimum`, which validators
/// do not read: negative numbers would pass for valid.
fn unsigned_minimum(v: &mut Value) {
    match v {
        Value::Object(map) => {
            let unsigned = map
                .get("format")
                .and_then(Value::as_str)
                .is_some_and(|f| f.starts_with("uint"));
            if unsigned && map.get("type").and_then(Value::as_str) == Some("integer") {
                map.entry("minimum").or_insert(json!(0));
            }
            map.values_mut().for_each(unsigned_minimum);
        }
        Value::Array(items) => items.iter_mut().for_each(unsigned_minimum),
        _ => {}
    }
}

/// The server always sends all four fields, `param` and `code` as `null` when they do
/// not apply.
fn error_body(schema: &mut Value) {
    schema["required"] = json!(["message", "type", "param", "code"]);
    for nullable in ["param", "code"] {
        schema["properties"][nullable]["nullable"] = json!(true);
    }
}

/// What a `prompt` must contain: a character other than ASCII whitespace (the same set
/// as [`request::is_blank`]).
const PROMPT_PATTERN: &str = "[^ \\t\\n\\r\\x0b\\x0c]";

/// A small JSON request read by the same field parser: unknown fields are refused, and
/// `null` counts as absent for every optional field.
fn strict_request(schema: &mut Value) {
    schema["additionalProperties"] = json!(false);
    let required = schema["required"].clone();
    let required = required.as_array().cloned().unwrap_or_default();
    if let Some(props) = schema["properties"].as_object_mut() {
        for (name, prop) in props.iter_mut() {
            if !required.iter().any(|r| r.as_str() == Some(name)) {
                prop["nullable"] = json!(true);
            }
        }
    }
}

/// The JSON request: unknown fields are refused, `null` counts as absent, `prompt`,
/// `size`, `n` and steps as the server checks them.
fn generation_request(schema: &mut Value, limits: &RequestLimits) {
    schema["additionalProperties"] = json!(false);
    let required: Vec<String> = schema["required"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if let Some(props) = schema["properties"].as_object_mut() {
        for (name, prop) in props.iter_mut() {
            if !required.contains(name) {
                prop["nullable"] = json!(true);
            }
            // openapi-typescript types a component's property that has a `default` as
            // always present, which a request body's is not: the default moves into the
            // description.
            if let Some(default) = prop.as_object_mut().and_then(|p| p.remove("default")) {
                let text = prop["description"]
                    .as_str()
                    .unwrap_or("")
                    .trim_end()
                    .to_string();
                prop["description"] = json!(format!("{text}\n\nDefault: `{default}`."));
            }
        }
    }
    let props = &mut schema["properties"];
    props["prompt"]["pattern"] = json!(PROMPT_PATTERN);
    props["seed"]["minimum"] = json!(0);
    props["seed"]["maximum"] = json!(u64::MAX);
    props["n"]["maximum"] = json!(limits.max_images);
    props["num_inference_steps"]["maximum"] = json!(limits.max_steps);
    let auto_fits = request::parse_size(&types::default_size(), limits).is_ok();
    props["size"]["pattern"] = json!(size_pattern(limits, auto_fits, false));
    let steps_fit = u64::from(types::default_steps()) <= limits.max_steps;
    // A default outside this server's limits: a request must give the field.
    for (field, fits) in [("size", auto_fits), ("num_inference_steps", steps_fit)] {
        if fits {
            continue;
        }
        if let Some(prop) = schema["properties"][field].as_object_mut() {
            prop.remove("nullable");
        }
        if let Some(r) = schema["required"].as_array_mut() {
            r.push(json!(field));
        }
    }
}

/// The edit form: `prompt`, `size`, `n` and steps as the server checks them (an absent,
/// empty or `auto` size is the image's own).
fn edit_form(schema: &mut Value, generation: &Value, limits: &RequestLimits) {
    // The form is read with the generation request's reader (plus `strength`, the files
    // and OpenAI's fields it ignores), which refuses any other field: it takes the
    // generation's scalar fields too.
    schema["additionalProperties"] = json!(false);
    if let (Some(props), Some(more)) = (
        schema["properties"].as_object_mut(),
        generation["properties"].as_object(),
    ) {
        for (name, prop) in more {
            let scalar = prop.get("$ref").is_some()
                || matches!(
                    prop["type"].as_str(),
                    Some("string" | "integer" | "number" | "boolean")
                );
            if scalar && !props.contains_key(name) {
                let mut prop = prop.clone();
                if let Some(p) = prop.as_object_mut() {
                    p.remove("nullable");
                }
                props.insert(name.clone(), prop);
            }
        }
        for ignored in edit::IGNORED_FIELDS {
            props.entry(ignored).or_insert(json!({
                "type": "string",
                "description": "Accepted for OpenAI compatibility and ignored."
            }));
        }
    }
    let props = &mut schema["properties"];
    props["prompt"]["pattern"] = json!(PROMPT_PATTERN);
    props["seed"]["minimum"] = json!(0);
    props["seed"]["maximum"] = json!(u64::MAX);
    props["size"]["pattern"] = json!(size_pattern(limits, true, true));
    props["n"]["maximum"] = json!(limits.max_images);
    props["num_inference_steps"]["maximum"] = json!(limits.max_steps);
    if u64::from(types::default_steps()) > limits.max_steps {
        // The default is outside this server's limits: a request must give the field.
        if let Some(r) = schema["required"].as_array_mut() {
            r.push(json!("num_inference_steps"));
        }
    }
}

/// A regular expression matching exactly the `size` values [`request::parse_size`]
/// takes: `WIDTHxHEIGHT`, each a multiple of 8 within `limits` written without leading
/// zeros, or `auto` when `auto` is allowed (and the empty string when `empty` is).
pub fn size_pattern(limits: &RequestLimits, auto: bool, empty: bool) -> String {
    let sides: Vec<String> = (limits.min_size..=limits.max_size)
        .filter(|v| *v > 0 && v.is_multiple_of(8))
        .map(|v| v.to_string())
        .collect();
    let mut alternatives = Vec::new();
    if !sides.is_empty() {
        let side = format!("(?:{})", sides.join("|"));
        alternatives.push(format!("{side}x{side}"));
    }
    if auto {
        alternatives.push("auto".into());
    }
    if empty {
        alternatives.push(String::new());
    }
    if alternatives.is_empty() {
        // Nothing is accepted: a pattern no string matches.
        return "^(?!)$".into();
    }
    format!("^(?:{})$", alternatives.join("|"))
}

/// The example error of each operation and status, each made as the server makes it.
fn error_examples(doc: &mut Value, facts: &ServerFacts) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for op in item.values_mut() {
            let Some(responses) = op["responses"].as_object_mut() else {
                continue;
            };
            for (status, resp) in responses.iter_mut() {
                let is_error = resp["content"]["application/json"]["schema"]["$ref"]
                    == "#/components/schemas/ErrorResponse";
                if !is_error {
                    continue;
                }
                if let Some(e) = example_error(path, status, facts) {
                    resp["content"]["application/json"]["example"] =
                        e.body().to_json().unwrap_or(Value::Null);
                }
            }
        }
    }
}

/// The error a request to `path` answered with `status` could get.
fn example_error(path: &str, status: &str, facts: &ServerFacts) -> Option<ApiError> {
    let edits = path == "/v1/images/edits";
    Some(match status {
        "400" if edits => {
            let form = EditForm {
                texts: [("prompt".to_string(), "a cat".to_string())].into(),
                ..EditForm::default()
            };
            edit::check_edit(form, &facts.limits, Default::default(), || 0).err()?
        }
        "400" => request::parse_body::<ImageGenerationRequest>(br#"{"prompt": "a cat", "n": 12}"#)
            .err()?,
        "401" => {
            let key: ApiKey = "example-key".parse().ok()?;
            auth::check(Some(&key), None).err()?
        }
        "404" => api::image_not_found("6f1c0e7d9b2a4c1e8f3a5b7d9e0f1a2b"),
        "413" if edits => ApiError::too_large(MAX_EDIT_BODY_BYTES),
        "413" => ApiError::too_large(MAX_BODY_BYTES),
        "500" => api::failed(&format!(
            "out of memory: {}",
            "allocating 1.5 GiB on cuda:0"
        )),
        "503" => ApiError::queue_full(facts.max_queue_size),
        _ => return None,
    })
}

/// `key`: `None` lets clients send a key or not (`[{bearerAuth: []}, {}]`), `Some(true)`
/// requires it, `Some(false)` drops the requirement.
fn security(doc: &mut Value, key: Option<bool>) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for item in paths.values_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for op in item.values_mut() {
            let Some(op) = op.as_object_mut() else {
                continue;
            };
            if !op.contains_key("security") {
                continue;
            }
            match key {
                None => {
                    let mut with_key = Map::new();
                    with_key.insert(SCHEME_NAME.into(), json!([]));
                    op.insert("security".into(), json!([with_key, {}]));
                }
                Some(true) => {}
                Some(false) => {
                    op.remove("security");
                }
            }
        }
    }
}

/// The methods a path answers, for the `Allow` header of a 405; `None` for unknown paths.
pub fn allowed_methods(path: &str) -> Option<&'static str> {
    static ROUTES: OnceLock<Vec<(Vec<String>, String)>> = OnceLock::new();
    let routes = ROUTES.get_or_init(|| {
        let doc = document(&ServerFacts::committed());
        let mut routes: Vec<(Vec<String>, String)> = doc["paths"]
            .as_object()
            .map(|paths| {
                paths
                    .iter()
                    .map(|(p, item)| {
                        let methods: Vec<String> = item
                            .as_object()
                            .map(|m| m.keys().map(|k| k.to_ascii_uppercase()).collect())
                            .unwrap_or_default();
                        (segments(p), methods.join(", "))
                    })
                    .collect()
            })
            .unwrap_or_default();
        for fixed in ["/openapi.json", "/docs"] {
            routes.push((segments(fixed), "GET".into()));
        }
        routes
    });
    let given = segments(path);
    routes
        .iter()
        .find(|(pattern, _)| {
            pattern.len() == given.len()
                && pattern
                    .iter()
                    .zip(&given)
                    .all(|(p, g)| p == g || (p.starts_with('{') && !g.is_empty()))
        })
        .map(|(_, methods)| methods.as_str())
}

fn segments(path: &str) -> Vec<String> {
    path.trim_end_matches('/')
        .split('/')
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::server::limits::{
        MAX_CLIP_SKIP, MAX_CONTROLNET_SCALE, MAX_ETA, MAX_GUIDANCE, MAX_GUIDANCE_RESCALE,
        MAX_IMAGES, MAX_LORA_SCALE, MAX_OUTPUT_COMPRESSION, MAX_PARTIAL_IMAGES, MAX_PROMPT_CHARS,
        MAX_REQUEST_CONTROLNETS, MAX_REQUEST_LORAS, MAX_STEPS, MAX_STRENGTH,
    };

    /// The bounds the schema states, which the bounds test checks.
    const BOUNDS: [&str; 4] = ["minimum", "maximum", "maxItems", "maxLength"];
    /// Validator keywords the bounds test does not check: none may appear until it does.
    const UNCHECKED: [&str; 6] = [
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "minLength",
        "minItems",
        "uniqueItems",
    ];

    /// Every bounded field of a request schema: its name, keyword, bound, and whether
    /// it is an integer.
    fn bounds(props: &Value) -> Vec<(String, &'static str, Value, bool)> {
        let mut out = Vec::new();
        for (name, prop) in props.as_object().expect("properties") {
            for key in prop.as_object().expect("property").keys() {
                let unchecked = UNCHECKED.contains(&key.as_str());
                assert!(
                    !unchecked,
                    "`{name}` has a `{key}` the bounds test does not check"
                );
            }
            for bound in BOUNDS {
                if let Some(v) = prop.get(bound) {
                    let integer = prop["type"] == "integer";
                    out.push((name.clone(), bound, v.clone(), integer));
                }
            }
        }
        out
    }

    /// `bound` as JSON text, and the number just past it on its outer side.
    fn probes(bound: &Value, keyword: &str, integer: bool) -> (String, String) {
        if integer || keyword == "maxItems" || keyword == "maxLength" {
            // poem writes every bound as a float; the served document's `seed` bound
            // is past what a float holds exactly.
            let b = match (bound.as_u64(), bound.as_i64(), bound.as_f64()) {
                (Some(u), _, _) => i128::from(u),
                (_, Some(i), _) => i128::from(i),
                (_, _, Some(f)) if f.fract() == 0.0 => f as i128,
                _ => panic!("{keyword} {bound} is not an integer"),
            };
            let outer = if keyword == "minimum" { b - 1 } else { b + 1 };
            (b.to_string(), outer.to_string())
        } else {
            let b = bound.as_f64().expect("a number bound");
            let step = 1e-6 * (1.0 + b.abs());
            let outer = if keyword == "minimum" {
                b - step
            } else {
                b + step
            };
            (b.to_string(), outer.to_string())
        }
    }

    /// A JSON generation request with `field` set to the JSON text `value` (for
    /// `maxItems`, a list of that many adapters).
    fn generation_with(
        field: &str,
        keyword: &str,
        value: &str,
    ) -> Result<request::Checked, ApiError> {
        let value = match keyword {
            "maxItems" => {
                let n: usize = value.parse().expect("a count");
                let item = match field {
                    "controlnets" => controlnet_item(""),
                    _ => r#"{"path": "a"}"#.to_string(),
                };
                format!("[{}]", vec![item; n].join(","))
            }
            "maxLength" => format!(r#""{}""#, long_text(value)),
            _ => value.to_string(),
        };
        let body = match field {
            "prompt" => format!(r#"{{"prompt": {value}}}"#),
            _ => format!(r#"{{"prompt": "a cat", "{field}": {value}}}"#),
        };
        let req = request::parse_body::<ImageGenerationRequest>(body.as_bytes())?;
        request::check(&req, &RequestLimits::DEFAULT, Default::default(), || 0)
    }

    /// Text of `count` characters (a count as text), for `maxLength` probes: multi-byte
    /// characters, since the limit counts characters.
    fn long_text(count: &str) -> String {
        "é".repeat(count.parse().expect("a count"))
    }

    /// A `controlnets` entry with a small control image, plus `extra` fields (`, "k": v`).
    fn controlnet_item(extra: &str) -> String {
        use base64::Engine as _;
        let mut png = Vec::new();
        image::DynamicImage::new_rgb8(8, 8)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("encode");
        let b64 = base64::engine::general_purpose::STANDARD.encode(png);
        format!(r#"{{"model": "a", "image": "{b64}"{extra}}}"#)
    }

    /// An edit of a 64x64 image with the form field `field` set to the text `value`.
    fn edit_with(field: &str, value: &str) -> Result<request::Checked, ApiError> {
        let mut png = Vec::new();
        image::DynamicImage::new_rgb8(64, 64)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("encode");
        let form = EditForm {
            // A later pair replaces an earlier one of the same name (`prompt`).
            texts: [("prompt", "a cat"), (field, value)]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
            image: Some(png),
            mask: None,
        };
        edit::check_edit(form, &RequestLimits::DEFAULT, Default::default(), || 0)
    }

    /// Whether `result` refuses `field`.
    fn refuses(result: &Result<request::Checked, ApiError>, field: &str) -> bool {
        matches!(result, Err(e) if e.param.as_deref() == Some(field))
    }

    /// For each bounded field of `props`: `parse` takes the bound and refuses the value
    /// just past it, unless `unreachable` names the bound (another rule refuses it).
    fn check_bounds(
        what: &str,
        props: &Value,
        parse: impl Fn(&str, &str, &str) -> Result<request::Checked, ApiError>,
        refused_as: impl Fn(&str) -> String,
        unreachable: &[(&str, &str)],
    ) {
        let found = bounds(props);
        assert!(!found.is_empty(), "{what}: no bounds in {props}");
        for (field, keyword, bound, integer) in &found {
            let (at, outer) = probes(bound, keyword, *integer);
            let param = refused_as(field);
            if !unreachable.contains(&(field.as_str(), *keyword)) {
                let r = parse(field, keyword, &at);
                assert!(
                    !refuses(&r, &param),
                    "{what}: `{field}` {keyword} {at} is refused: {r:?}"
                );
            }
            let r = parse(field, keyword, &outer);
            assert!(
                refuses(&r, &param),
                "{what}: `{field}` {outer} past its {keyword} is taken"
            );
        }
    }

    /// The parsers' bounds are the schema's, for every bounded field of both request
    /// bodies, in poem's document (the validator literals in `types.rs`) and in the
    /// served one (reshaped with the server's limits). The validators must be literals,
    /// so this is what keeps them equal to the constants the parsers check.
    #[test]
    fn schema_bounds_are_the_parsers() {
        let poem: Value =
            serde_json::from_str(&super::super::openapi_service().spec()).expect("spec");
        let served = document(&ServerFacts::committed());
        let edit_path = "/v1/images/edits";
        for (what, doc) in [("poem's", &poem), ("served", &served)] {
            let schemas = &doc["components"]["schemas"];
            let form = &doc["paths"][edit_path]["post"]["requestBody"]["content"]
                ["multipart/form-data"]["schema"]["properties"];
            check_bounds(
                what,
                &schemas["ImageGenerationRequest"]["properties"],
                generation_with,
                str::to_string,
                &[],
            );
            check_bounds(
                what,
                &schemas["LoraChoice"]["properties"],
                |_, _, v| {
                    generation_with("loras", "", &format!(r#"[{{"path": "a", "scale": {v}}}]"#))
                },
                |_| "loras".into(),
                &[],
            );
            check_bounds(
                what,
                &schemas["ControlNetChoice"]["properties"],
                |field, _, v| {
                    // A window must stay non-empty: the other end at its far side.
                    let other = match field {
                        "guidance_start" => r#", "guidance_end": 1"#.to_string(),
                        "guidance_end" => r#", "guidance_start": 0"#.to_string(),
                        _ => String::new(),
                    };
                    let item = controlnet_item(&format!(r#", "{field}": {v}{other}"#));
                    generation_with("controlnets", "", &format!("[{item}]"))
                },
                |_| "controlnets".into(),
                // An empty window is refused: start 1 or end 0 never run.
                &[("guidance_start", "maximum"), ("guidance_end", "minimum")],
            );
            check_bounds(
                what,
                form,
                |field, keyword, v| match keyword {
                    "maxLength" => edit_with(field, &long_text(v)),
                    _ => edit_with(field, v),
                },
                str::to_string,
                // No step runs at strength 0: `steps × strength` must be at least 1.
                &[("strength", "minimum")],
            );
        }
        // The literals are the constants.
        let json = &poem["components"]["schemas"]["ImageGenerationRequest"]["properties"];
        let form = &poem["paths"][edit_path]["post"]["requestBody"]["content"]
            ["multipart/form-data"]["schema"]["properties"];
        let scale = &poem["components"]["schemas"]["LoraChoice"]["properties"]["scale"];
        let cases = [
            (&json["n"]["maximum"], MAX_IMAGES as f64),
            (&json["num_inference_steps"]["maximum"], MAX_STEPS as f64),
            (&json["guidance_scale"]["maximum"], MAX_GUIDANCE),
            (&json["lora_scale"]["maximum"], MAX_LORA_SCALE),
            (&json["loras"]["maxItems"], MAX_REQUEST_LORAS as f64),
            (&json["prompt"]["maxLength"], MAX_PROMPT_CHARS as f64),
            (
                &json["negative_prompt"]["maxLength"],
                MAX_PROMPT_CHARS as f64,
            ),
            (&json["clip_skip"]["maximum"], MAX_CLIP_SKIP as f64),
            (&form["prompt"]["maxLength"], MAX_PROMPT_CHARS as f64),
            (
                &form["negative_prompt"]["maxLength"],
                MAX_PROMPT_CHARS as f64,
            ),
            (&form["clip_skip"]["maximum"], MAX_CLIP_SKIP as f64),
            (
                &json["controlnets"]["maxItems"],
                MAX_REQUEST_CONTROLNETS as f64,
            ),
            (
                &poem["components"]["schemas"]["ControlNetChoice"]["properties"]["scale"]
                    ["maximum"],
                MAX_CONTROLNET_SCALE,
            ),
            (
                &json["output_compression"]["maximum"],
                MAX_OUTPUT_COMPRESSION as f64,
            ),
            (
                &json["partial_images"]["maximum"],
                MAX_PARTIAL_IMAGES as f64,
            ),
            (&scale["maximum"], MAX_LORA_SCALE),
            (&form["n"]["maximum"], MAX_IMAGES as f64),
            (&form["num_inference_steps"]["maximum"], MAX_STEPS as f64),
            (&form["guidance_scale"]["maximum"], MAX_GUIDANCE),
            (&form["lora_scale"]["maximum"], MAX_LORA_SCALE),
            (
                &form["output_compression"]["maximum"],
                MAX_OUTPUT_COMPRESSION as f64,
            ),
            (
                &form["partial_images"]["maximum"],
                MAX_PARTIAL_IMAGES as f64,
            ),
            (&form["strength"]["maximum"], MAX_STRENGTH),
            (&json["guidance_rescale"]["maximum"], MAX_GUIDANCE_RESCALE),
            (&json["eta"]["maximum"], MAX_ETA),
            (&form["guidance_rescale"]["maximum"], MAX_GUIDANCE_RESCALE),
            (&form["eta"]["maximum"], MAX_ETA),
        ];
        for (i, (bound, constant)) in cases.iter().enumerate() {
            assert_eq!(bound.as_f64(), Some(*constant), "case {i}");
        }
    }

    /// Every field of the edit form's schema is one the form's reader takes (the
    /// schema is the one list of its fields), and a field outside it is refused.
    #[test]
    fn edit_form_fields_are_the_readers() {
        let doc = document(&ServerFacts::committed());
        let form = &doc["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
            ["multipart/form-data"]["schema"]["properties"];
        let form = form.as_object().expect("properties");
        assert!(form.contains_key("strength"), "{form:?}");
        for (name, prop) in form {
            if name == "image" || name == "mask" {
                continue;
            }
            // An enum's first value (enums are referenced types), else a value of the
            // field's type.
            let referenced = prop["$ref"]
                .as_str()
                .and_then(|r| r.strip_prefix("#/components/schemas/"))
                .map(|t| &doc["components"]["schemas"][t]);
            let value = match (referenced, prop["type"].as_str()) {
                (Some(t), _) => t["enum"][0].as_str().expect("an enum").to_string(),
                (None, Some("integer")) => "1".into(),
                (None, Some("number")) => "0.5".into(),
                (None, Some("boolean")) => "false".into(),
                _ if name == "size" => "64x64".into(),
                _ if name == "loras" || name == "controlnets" => "[]".into(),
                _ => "text".into(),
            };
            let r = edit_with(name, &value);
            assert!(!refuses(&r, name), "`{name}` = {value}: {r:?}");
        }
        assert!(refuses(&edit_with("nonsense", "1"), "nonsense"));
    }

    #[test]
    fn size_patterns_list_the_sides() {
        let limits = RequestLimits {
            min_size: 60,
            max_size: 80,
            ..RequestLimits::default()
        };
        assert_eq!(
            size_pattern(&limits, false, false),
            "^(?:(?:64|72|80)x(?:64|72|80))$"
        );
        assert_eq!(
            size_pattern(&limits, true, true),
            "^(?:(?:64|72|80)x(?:64|72|80)|auto|)$"
        );
        assert_eq!(
            size_pattern(
                &RequestLimits {
                    min_size: 9,
                    max_size: 15,
                    ..RequestLimits::default()
                },
                false,
                false
            ),
            "^(?!)$"
        );
    }

    #[test]
    fn allow_lists_the_routes_methods() {
        assert_eq!(allowed_methods("/v1/images/generations"), Some("POST"));
        assert_eq!(allowed_methods("/v1/images/files/abc"), Some("GET"));
        assert_eq!(allowed_methods("/health"), Some("GET"));
        assert_eq!(allowed_methods("/openapi.json"), Some("GET"));
        assert_eq!(allowed_methods("/v2/nothing"), None);
    }
}
