//! Image-to-image and inpainting against diffusers' SDXL img2img / inpaint pipelines:
//! every `img2img.*` and `inpaint.*` case of `reference/extras/extras.json`, through the
//! library (CPU and wgpu) and the command line. Settings, sizes and seeds come from
//! `extras.json` and the reference tensors, never from constants.

use hypergen::FusedOps;
use std::io::Cursor;
use std::path::PathBuf;

use burn::tensor::DType;
use hypergen::pipeline::{GenerationRequest, Image, InitImage, Mask};

use crate::common::{
    fixture_dir, fixture_pipeline, no_progress, rel_error, values, RefTensor, TOL_F32,
};

/// `reference/extras/`.
pub fn extras_dir() -> PathBuf {
    crate::common::reference_dir().join("extras")
}

/// `extras.json`.
pub fn extras_json() -> serde_json::Value {
    let path = extras_dir().join("extras.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("extras.json parses")
}

/// A tensor of `extras.safetensors`.
pub fn extra_tensor(name: &str) -> RefTensor {
    let path = extras_dir().join("extras.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("extras parse");
    let view = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("extras tensor `{name}`: {e}"));
    crate::common::ref_tensor_of(&view)
}

/// One image-to-image or inpainting case of `extras.json`.
#[derive(Debug, Clone)]
pub struct EditCase {
    pub name: String,
    pub prompt: String,
    pub width: usize,
    pub height: usize,
    pub image: PathBuf,
    /// diffusers' mask (white = repaint), for inpainting.
    pub mask: Option<PathBuf>,
    pub strength: f64,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
}

impl EditCase {
    /// OpenAI's RGBA mask beside the diffusers one (`mask_rgba.png`, alpha 0 = repaint).
    pub fn rgba_mask(&self) -> Option<PathBuf> {
        self.mask
            .as_ref()
            .map(|_| extras_dir().join("mask_rgba.png"))
    }
}

/// Every `img2img.*` and `inpaint.*` case, sorted by name.
pub fn edit_cases() -> Vec<EditCase> {
    let json = extras_json();
    let prompt = json["prompt"].as_str().expect("prompt").to_string();
    let cases = json["cases"].as_object().expect("cases");
    let mut out: Vec<EditCase> = cases
        .iter()
        .filter(|(k, _)| k.starts_with("img2img.") || k.starts_with("inpaint."))
        .map(|(name, c)| {
            let file = |v: &serde_json::Value| {
                // "mask.png (white = repaint)": the file name is the first word.
                let s = v.as_str().expect("file name");
                extras_dir().join(s.split_whitespace().next().expect("a file name"))
            };
            let r = extra_tensor(&format!("{name}.image_u8"));
            EditCase {
                name: name.clone(),
                prompt: prompt.clone(),
                height: r.shape[0],
                width: r.shape[1],
                image: file(&c["image"]),
                mask: c.get("mask").map(file),
                strength: c["strength"].as_f64().expect("strength"),
                steps: c["num_inference_steps"].as_u64().expect("steps") as usize,
                guidance: c["guidance_scale"].as_f64().expect("guidance"),
                seed: crate::common::seed_of(c["generator"].as_str().expect("generator")),
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(
        out.iter().any(|c| c.mask.is_some()) && out.iter().any(|c| c.mask.is_none()),
        "extras.json has image-to-image and inpainting cases"
    );
    out
}

/// The library request of a case, the image and mask read as the CLI and server do.
fn request(case: &EditCase, rgba_mask: bool) -> GenerationRequest {
    let img = image::open(&case.image).expect("init image");
    let mask_path = if rgba_mask {
        case.rgba_mask()
    } else {
        case.mask.clone()
    };
    let mask = mask_path.map(|p| Mask::from_dynamic(&image::open(p).expect("mask")));
    GenerationRequest {
        prompt: case.prompt.clone(),
        num_inference_steps: case.steps,
        guidance_scale: case.guidance,
        width: case.width,
        height: case.height,
        seed: case.seed,
        init_image: Some(InitImage {
            image: Image::from_dynamic(&img),
            mask,
            strength: case.strength,
        }),
        ..Default::default()
    }
}

/// Asserts every channel is within 1/255 of the case's reference image.
pub fn assert_case_image(what: &str, case: &EditCase, rgb: &[u8]) {
    crate::common::assert_image_close(what, rgb, &extra_tensor(&format!("{}.image_u8", case.name)));
}

fn all_cases<B: FusedOps>(device: &B::Device) {
    let pipe = fixture_pipeline::<B>(DType::F32, device);
    for case in edit_cases() {
        let out = pipe
            .generate(&request(&case, false), &mut no_progress)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let want = extra_tensor(&format!("{}.latents", case.name));
        assert_eq!(
            out.latents.dims().to_vec(),
            want.shape,
            "{}: shape",
            case.name
        );
        let err = rel_error(&values(out.latents), &want.data);
        eprintln!("{} latents: relative error {err:.3e}", case.name);
        assert!(
            err <= TOL_F32,
            "{}: latents relative error {err:.3e}",
            case.name
        );
        assert_case_image(&case.name, &case, &out.images[0].rgb);
    }
}
crate::on_backends!(edits_fixture_cases, all_cases);

/// OpenAI's transparent mask gives exactly diffusers' white-mask result.
#[test]
fn rgba_mask_equals_white_mask() {
    for case in edit_cases().into_iter().filter(|c| c.mask.is_some()) {
        let white = request(&case, false);
        let rgba = request(&case, true);
        let (Some(a), Some(b)) = (white.init_image, rgba.init_image) else {
            panic!("init images");
        };
        assert_eq!(a.mask, b.mask, "{}: masks differ", case.name);
        assert!(a
            .mask
            .is_some_and(|m| m.repaint.iter().any(|&r| r) && m.repaint.iter().any(|&r| !r)));
    }
}

/// `hypergen generate --image [--mask] --strength` writes the reference image.
#[test]
fn cli_edits_match_diffusers() {
    let dir = std::env::temp_dir().join(format!("hypergen-cli-edits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for case in edit_cases() {
        let out = dir.join(format!("{}.png", case.name));
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_hypergen"));
        cmd.args(["generate", "--model"])
            .arg(fixture_dir())
            .args(["--prompt", &case.prompt])
            .args(["--steps", &case.steps.to_string()])
            .args(["--guidance", &case.guidance.to_string()])
            .args(["--seed", &case.seed.to_string()])
            .args(["--strength", &case.strength.to_string()])
            .arg("--image")
            .arg(&case.image)
            .args(["--device", "cpu", "--dtype", "float32", "--out"])
            .arg(&out);
        if let Some(mask) = &case.mask {
            cmd.arg("--mask").arg(mask);
        }
        let status = cmd.status().expect("run hypergen");
        assert!(
            status.success(),
            "{}: hypergen generate failed: {status}",
            case.name
        );
        let png = image::open(&out).expect("PNG written").to_rgb8();
        assert_eq!(
            (png.width() as usize, png.height() as usize),
            (case.width, case.height)
        );
        assert_case_image(&format!("cli {}", case.name), &case, png.as_raw());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bad strengths and sizes are refused with the field named, before any work.
#[test]
fn edits_validation() {
    let pipe = fixture_pipeline::<crate::common::Cpu>(DType::F32, &Default::default());
    let case = edit_cases()
        .into_iter()
        .find(|c| c.mask.is_some())
        .expect("inpaint case");
    let check = |req: GenerationRequest, field: &str| match pipe.generate(&req, &mut no_progress) {
        Err(hypergen::Error::InvalidArgument { name, .. }) => assert_eq!(name, field),
        other => panic!("{field}: expected InvalidArgument, got {other:?}"),
    };
    let mut r = request(&case, false);
    if let Some(i) = r.init_image.as_mut() {
        i.strength = 1.5;
    }
    check(r, "strength");
    let mut r = request(&case, false);
    if let Some(i) = r.init_image.as_mut() {
        // One step at strength 0.1 leaves nothing to run.
        i.strength = 0.5 / r.num_inference_steps as f64;
    }
    check(r, "strength");
    let mut r = request(&case, false);
    r.width += 8;
    check(r, "image");
    let mut r = request(&case, false);
    if let Some(i) = r.init_image.as_mut() {
        i.mask = i
            .mask
            .as_ref()
            .map(|m| m.resized(m.width / 2, m.height / 2).expect("resize"));
    }
    check(r, "mask");
}

/// `output_format` on the generations route: JPEG and WebP answers decode to the asked
/// size, by b64 and by URL (with the right Content-Type); a PNG carries an A1111
/// `parameters` chunk that PIL reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_output_formats() {
    use serde_json::{json, Value};
    let config = crate::common::fixture_server_config();
    let server = crate::common::start_server(config).await;
    let base = format!("http://{}", server.local_addr());
    let client = reqwest::Client::new();
    let (w, h) = (64u32, 72u32);
    let post = |body: Value| {
        let client = client.clone();
        let url = format!("{base}/v1/images/generations");
        async move {
            let resp = client.post(url).json(&body).send().await.expect("post");
            assert_eq!(resp.status(), 200);
            resp.json::<Value>().await.expect("json")
        }
    };
    let req = |format: &str, response: &str| {
        json!({"prompt": "a red cube", "negative_prompt": "blur", "size": format!("{w}x{h}"),
               "num_inference_steps": 2, "seed": 3, "output_format": format,
               "output_compression": 80, "response_format": response})
    };
    for (format, want) in [
        ("jpeg", image::ImageFormat::Jpeg),
        ("webp", image::ImageFormat::WebP),
        ("png", image::ImageFormat::Png),
    ] {
        let body = post(req(format, "b64_json")).await;
        let bytes = crate::common::first_image(&body);
        assert_eq!(image::guess_format(&bytes).expect("known format"), want);
        let img = image::load_from_memory_with_format(&bytes, want).expect("decodes");
        assert_eq!((img.width(), img.height()), (w, h), "{format}");

        let body = post(req(format, "url")).await;
        let url = body["data"][0]["url"].as_str().expect("url");
        let resp = client.get(url).send().await.expect("download");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"].to_str().expect("ascii"),
            format!("image/{format}")
        );
        let via_url = resp.bytes().await.expect("bytes");
        assert_eq!(image::guess_format(&via_url).expect("known"), want);

        if format == "png" {
            let path =
                std::env::temp_dir().join(format!("hypergen-params-{}.png", std::process::id()));
            std::fs::write(&path, &bytes).expect("write");
            let out = crate::common::python()
                .args([
                    "-c",
                    "import sys; from PIL import Image; im = Image.open(sys.argv[1]); im.load(); print(im.info['parameters'])",
                ])
                .arg(&path)
                .output()
                .expect("the tools' Python (scripts/test makes it)");
            let _ = std::fs::remove_file(&path);
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "PIL: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                text.starts_with("a red cube\nNegative prompt: blur\nSteps: 2, Sampler: "),
                "{text}"
            );
            assert!(
                text.contains(&format!("CFG scale: 7.5, Seed: 3, Size: {w}x{h}, Model: ")),
                "{text}"
            );
        }
    }
    // A bad format names its field.
    let resp = client
        .post(format!("{base}/v1/images/generations"))
        .json(&json!({"prompt": "x", "output_format": "gif"}))
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.expect("json");
    assert_eq!(err["error"]["param"], "output_format");
    server.shutdown().await.expect("shutdown");

    // With the chunk turned off (`--no-png-parameters`), the PNG has no text chunk.
    let mut config = crate::common::fixture_server_config();
    config.worker.png_parameters = false;
    let server = crate::common::start_server(config).await;
    let body: Value = client
        .post(format!(
            "http://{}/v1/images/generations",
            server.local_addr()
        ))
        .json(&req("png", "b64_json"))
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    let bytes = crate::common::first_image(&body);
    let has = |kind: &[u8]| bytes.windows(4).any(|w| w == kind);
    assert!(!has(b"tEXt") && !has(b"iTXt"), "a text chunk was written");
    image::load_from_memory(&bytes).expect("still a PNG");
    server.shutdown().await.expect("shutdown");
}

/// A `multipart/form-data` body by hand: `(name, filename, bytes)` parts.
pub(crate) fn multipart(parts: &[(&str, Option<&str>, Vec<u8>)]) -> (String, Vec<u8>) {
    let boundary = "hypergen-test-boundary-7d1f";
    let mut body = Vec::new();
    for (name, file, data) in parts {
        body.extend(format!("--{boundary}\r\n").as_bytes());
        match file {
            Some(f) => body.extend(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => body
                .extend(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
        }
        body.extend(data);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// PNG's chunk CRC, to forge a header.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// `/v1/images/edits`: every case with both mask conventions gives diffusers' image;
/// bad input gets a 400 naming its field (413 for a form over the limit) and the server
/// keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_edits_match_diffusers() {
    use serde_json::Value;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = crate::common::fixture_server_config();
    let server = crate::common::start_server(config).await;
    let base = format!("http://{}", server.local_addr());
    let client = reqwest::Client::new();
    let post = |parts: Vec<(&'static str, Option<&'static str>, Vec<u8>)>| {
        let client = client.clone();
        let url = format!("{base}/v1/images/edits");
        async move {
            let (ct, body) = multipart(&parts);
            let resp = client
                .post(url)
                .header("content-type", ct)
                .body(body)
                .send()
                .await
                .expect("post");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.expect("json"))
        }
    };
    let cases = edit_cases();
    let case = &cases[0];
    let image = std::fs::read(&case.image).expect("image");
    let text = |v: String| v.into_bytes();

    // Bad input, each naming its field.
    let small_png = {
        let img = image::RgbImage::new(16, 16);
        let mut out = Vec::new();
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .expect("png");
        out
    };
    let mut bomb = small_png.clone();
    // IHDR data starts at byte 16: claim 100000x100000.
    bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let crc = crc32(&bomb[12..29]);
    bomb[29..33].copy_from_slice(&crc.to_be_bytes());
    for (parts, param) in [
        (vec![("prompt", None, text("x".into()))], "image"),
        (
            vec![
                ("image", Some("a.png"), b"not an image".to_vec()),
                ("prompt", None, text("x".into())),
            ],
            "image",
        ),
        (
            vec![
                ("image", Some("a.png"), bomb),
                ("prompt", None, text("x".into())),
            ],
            "image",
        ),
        (
            vec![
                ("image", Some("a.png"), image.clone()),
                ("mask", Some("m.png"), small_png.clone()),
                ("prompt", None, text("x".into())),
            ],
            "mask",
        ),
        (
            vec![
                ("image", Some("a.png"), image.clone()),
                ("prompt", None, text("x".into())),
                ("strength", None, text("1.5".into())),
            ],
            "strength",
        ),
        (
            vec![
                ("image", Some("a.png"), image.clone()),
                ("prompt", None, text("x".into())),
                ("output_format", None, text("gif".into())),
            ],
            "output_format",
        ),
    ] {
        let (status, body) = post(parts).await;
        assert_eq!(status, 400, "{param}: {body}");
        assert_eq!(body["error"]["param"], param, "{body}");
    }
    // A form over the body limit: refused from its length, before it is read.
    let mut stream = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    let head = format!(
        "POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: {}\r\n\r\n--b\r\n",
        hypergen::app::server::limits::MAX_EDIT_BODY_BYTES + 1
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut answer = vec![0u8; 12];
    stream.read_exact(&mut answer).await.expect("answer");
    assert_eq!(&answer, b"HTTP/1.1 413");
    drop(stream);

    // Every case, both mask conventions: the reference image.
    for case in &cases {
        let masks: Vec<Option<PathBuf>> = match &case.mask {
            Some(m) => vec![Some(m.clone()), case.rgba_mask()],
            None => vec![None],
        };
        for mask in masks {
            let mut parts = vec![
                (
                    "image",
                    Some("image.png"),
                    std::fs::read(&case.image).expect("image"),
                ),
                ("prompt", None, text(case.prompt.clone())),
                ("strength", None, text(case.strength.to_string())),
                ("num_inference_steps", None, text(case.steps.to_string())),
                ("guidance_scale", None, text(case.guidance.to_string())),
                ("seed", None, text(case.seed.to_string())),
                (
                    "size",
                    None,
                    text(format!("{}x{}", case.width, case.height)),
                ),
            ];
            if let Some(m) = &mask {
                parts.push(("mask", Some("mask.png"), std::fs::read(m).expect("mask")));
            }
            let (status, body) = post(parts).await;
            assert_eq!(status, 200, "{}: {body}", case.name);
            let png = crate::common::first_image(&body);
            let img = image::load_from_memory(&png).expect("png").to_rgb8();
            assert_case_image(
                &format!("server {} {mask:?}", case.name),
                case,
                img.as_raw(),
            );
        }
    }
    server.shutdown().await.expect("shutdown");
}
