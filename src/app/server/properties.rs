//! Property-based fuzzing of what the server parses from clients: JSON bodies
//! ([`parse_body`] then [`check`]), sizes and output formats, edit forms
//! ([`check_edit`]) and uploaded image headers ([`decode_upload`]). Every input must
//! give a request within the limits or OpenAI's error object with a status of 400 or
//! 413, never a panic.

use std::collections::HashMap;

use poem::http::StatusCode;
use proptest::prelude::*;
use serde_json::{Map, Number, Value};

use super::edit::{check_edit, decode_upload, EditForm};
use super::error::ApiError;
use super::limits::{RequestLimits, MAX_GUIDANCE};
use super::request::{check, parse_body, parse_output_format, parse_size, Checked};
use super::types::ImageGenerationRequest;
use crate::load::properties::config;

/// The fields of a generation request, the edit form's own, and near misses.
const FIELDS: &[&str] = &[
    "prompt",
    "model",
    "n",
    "size",
    "quality",
    "style",
    "user",
    "response_format",
    "output_format",
    "output_compression",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "lora_path",
    "lora_scale",
    "scheduler",
    "timestep_spacing",
    "guidance_rescale",
    "eta",
    "stream",
    "partial_images",
    "stream_progress",
    "prompt_syntax",
    "clip_skip",
    "strength",
    "background",
    "image",
    "Prompt",
    "",
];

/// Text the fields take: their valid values, edge cases and anything.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "a cat", "", " ", "64x64", "1024x1024", "auto", "8x8", "0x0", "64X64", "64×64",
            "x", "64x", "-64x64", "99999999999999999999x64", "b64_json", "url", "png", "JPG",
            "webp", "gif", "euler", "dpmpp_2m_karras", "nope", "1", "0", "-1", "1e400",
            "NaN", "true", "null", "[]", "{}",
        ])
        .prop_map(str::to_string),
        2 => "\\PC{0,24}",
    ]
}

/// JSON numbers at the edges: zero, limits, negative, huge, fractional.
fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0u64..200).prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
        (-30.0f64..30.0).prop_map(Value::from),
    ]
}

/// Any JSON value, nested a little.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{0,4}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A JSON object of request fields with any values, sometimes with a valid prompt.
fn body_object() -> impl Strategy<Value = Map<String, Value>> {
    (
        prop::collection::btree_map(
            prop_oneof![4 => prop::sample::select(FIELDS).prop_map(str::to_string), 1 => "\\PC{0,8}"],
            json_value(),
            0..8,
        ),
        any::<bool>(),
    )
        .prop_map(|(fields, with_prompt)| {
            let mut map: Map<String, Value> = fields.into_iter().collect();
            if with_prompt {
                map.insert("prompt".into(), Value::String("a cat".into()));
            }
            map
        })
}

/// Raw bodies: JSON text of request objects, mangled JSON, and any bytes.
fn body_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => body_object().prop_map(|m| Value::Object(m).to_string().into_bytes()),
        2 => (body_object(), any::<prop::sample::Index>()).prop_map(|(m, cut)| {
            let s = Value::Object(m).to_string().into_bytes();
            let at = cut.index(s.len() + 1);
            s[..at].to_vec()
        }),
        1 => prop::collection::vec(any::<u8>(), 0..64),
        1 => json_value().prop_map(|v| v.to_string().into_bytes()),
    ]
}

/// Limits as `--min-size`/`--max-size`/`--max-steps`/`--max-images` may set them, in
/// any order.
fn limits() -> impl Strategy<Value = RequestLimits> {
    (0usize..4096, 0usize..4096, 0u64..200, 0u64..16).prop_map(
        |(min_size, max_size, max_steps, max_images)| RequestLimits {
            min_size,
            max_size,
            max_steps,
            max_images,
        },
    )
}

/// A refusal is OpenAI's error object: a client error with a message, and `param` one of
/// the fields it was given when it names one.
fn assert_refusal(e: &ApiError) -> Result<(), TestCaseError> {
    prop_assert!(
        e.status == StatusCode::BAD_REQUEST || e.status == StatusCode::PAYLOAD_TOO_LARGE,
        "{e}"
    );
    prop_assert!(!e.message.is_empty());
    prop_assert_eq!(e.kind, "invalid_request_error");
    Ok(())
}

/// What an accepted request must satisfy.
fn assert_within(c: &Checked, limits: &RequestLimits) -> Result<(), TestCaseError> {
    let g = &c.generation;
    for side in [g.width, g.height] {
        prop_assert!(
            side >= limits.min_size && side <= limits.max_size && side % 8 == 0,
            "{g:?}"
        );
    }
    prop_assert!((1..=limits.max_images as usize).contains(&g.num_images));
    prop_assert!((1..=limits.max_steps as usize).contains(&g.num_inference_steps));
    prop_assert!((0.0..=MAX_GUIDANCE).contains(&g.guidance_scale));
    prop_assert!(!g.prompt.trim().is_empty());
    Ok(())
}

/// A valid 8x8 PNG, and the same bytes with some changed (headers that lie).
fn image_bytes() -> impl Strategy<Value = Option<Vec<u8>>> {
    let png = {
        let img = image::RgbImage::from_pixel(8, 8, image::Rgb([200, 10, 10]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .expect("encode PNG");
        out.into_inner()
    };
    let mutated = {
        let png = png.clone();
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4).prop_map(
            move |edits| {
                let mut bytes = png.clone();
                for (at, b) in edits {
                    let i = at.index(bytes.len());
                    bytes[i] = b;
                }
                bytes
            },
        )
    };
    prop_oneof![
        Just(None),
        Just(Some(png)),
        mutated.prop_map(Some),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(Some),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Any body: a request within the limits, or a 400 naming what is wrong.
    #[test]
    fn request_bodies_never_panic(bytes in body_bytes()) {
        let limits = RequestLimits::default();
        match parse_body::<ImageGenerationRequest>(&bytes) {
            Ok(req) => match check(&req, &limits, Default::default(), || 7) {
                Ok(c) => assert_within(&c, &limits)?,
                Err(e) => assert_refusal(&e)?,
            },
            Err(e) => assert_refusal(&e)?,
        }
    }

    /// Any size text within any limits: a size within them, or a 400 on `size`.
    #[test]
    fn sizes_never_panic(size in prop_oneof![
        text(),
        (any::<u64>(), prop::sample::select(vec!["x", "X", "×", " x ", "*", ""]), any::<u64>())
            .prop_map(|(w, sep, h)| format!("{w}{sep}{h}")),
        (0u64..3000, 0u64..3000).prop_map(|(w, h)| format!("{w}x{h}")),
    ], limits in limits()) {
        match parse_size(&size, &limits) {
            Ok((w, h)) => {
                for side in [w, h] {
                    prop_assert!(side >= limits.min_size && side <= limits.max_size && side % 8 == 0);
                }
            }
            Err(e) => {
                assert_refusal(&e)?;
                prop_assert_eq!(e.param.as_deref(), Some("size"));
            }
        }
        if let Err(e) = parse_output_format(&size) {
            prop_assert_eq!(e.param.as_deref(), Some("output_format"));
        }
    }

    /// Any edit form (text fields as a form sends them, an image or not): a checked
    /// edit within the limits, or a 400.
    #[test]
    fn edit_forms_never_panic(
        texts in prop::collection::hash_map(
            prop_oneof![4 => prop::sample::select(FIELDS).prop_map(str::to_string), 1 => "\\PC{0,8}"],
            text(),
            0..8,
        ),
        image in image_bytes(),
        mask in image_bytes(),
    ) {
        // Small limits keep the resizing of accepted edits cheap.
        let limits = RequestLimits { min_size: 8, max_size: 64, ..RequestLimits::default() };
        let form = EditForm { texts: texts.into_iter().collect::<HashMap<_, _>>(), image, mask };
        match check_edit(form, &limits, Default::default(), || 7) {
            Ok(c) => assert_within(&c, &limits)?,
            Err(e) => assert_refusal(&e)?,
        }
    }

    /// Any upload: decoded, or a 400 naming the field.
    #[test]
    fn uploads_never_panic(bytes in image_bytes()) {
        if let Err(e) = decode_upload("image", bytes.as_deref().unwrap_or_default()) {
            assert_refusal(&e)?;
            prop_assert_eq!(e.param.as_deref(), Some("image"));
        }
    }
}
