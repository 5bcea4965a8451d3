//! Prompts in AUTOMATIC1111's syntax against A1111's own prompt code and diffusers'
//! pipeline (`reference/prompts/`): the parser's pieces, the chunks each encoder is
//! given, the conditioning (≤ 1e-4 relative) and the image (within 1/255); clip skip as
//! diffusers defines it; an SDXL textual-inversion embedding as a positive and as a
//! negative prompt.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use burn::tensor::{DType, Tensor};
use hypergen::pipeline::prompt::{parse_prompt_attention, Chunks};
use hypergen::pipeline::{GenerationRequest, PromptSyntax, SdxlPipeline};
use hypergen::FusedOps;
use serde_json::Value;

use crate::common::{
    assert_image_close, fixture_dir, no_progress, ref_tensor_of, reference, reference_dir,
    rel_error, values, RefTensor, TOL_F32,
};

fn prompts_dir() -> PathBuf {
    reference_dir().join("prompts")
}

fn json(name: &str) -> Value {
    let path = prompts_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("reference JSON parses")
}

fn cases() -> &'static Value {
    static CASES: OnceLock<Value> = OnceLock::new();
    CASES.get_or_init(|| json("prompts.json"))
}

fn case(name: &str) -> &'static Value {
    &cases()["cases"][name]
}

/// A tensor of `prompts.safetensors`.
fn prompt_ref(name: &str) -> RefTensor {
    static ALL: OnceLock<HashMap<String, RefTensor>> = OnceLock::new();
    ALL.get_or_init(|| {
        let path = prompts_dir().join("prompts.safetensors");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("reference tensors parse");
        st.tensors()
            .into_iter()
            .map(|(name, view)| (name, ref_tensor_of(&view)))
            .collect()
    })
    .get(name)
    .unwrap_or_else(|| panic!("reference tensor `{name}` not found"))
    .clone()
}

/// The fixture in float32 with its textual-inversion directory loaded.
fn pipeline<B: FusedOps>(device: &B::Device) -> SdxlPipeline<B> {
    let mut pipe = crate::common::fixture_pipeline::<B>(DType::F32, device);
    let skipped = hypergen::load::embeddings::load_embeddings(
        pipe.components_mut(),
        &fixture_dir().join("embeddings"),
    )
    .expect("embeddings load");
    assert!(skipped.is_empty(), "skipped: {skipped:?}");
    pipe
}

fn clip_skip(c: &Value) -> usize {
    c["clip_skip"].as_u64().map_or(0, |v| v as usize)
}

fn assert_close(what: &str, got: Vec<f32>, shape: Vec<usize>, want: &RefTensor) {
    assert_eq!(shape, want.shape, "{what}: shape");
    let err = rel_error(&got, &want.data);
    eprintln!("{what}: relative error {err:.3e}");
    assert!(
        err <= TOL_F32,
        "{what}: relative error {err:.3e} > {TOL_F32:.0e}"
    );
}

/// One encoded prompt against `CASE.{cond,uncond}.*`.
fn check_encoded<B: FusedOps>(what: &str, ctx: Tensor<B, 3>, pooled: Tensor<B, 2>, prefix: &str) {
    let w1 = prompt_ref(&format!("{prefix}.text_encoder")).shape[2];
    let [_, t, d] = ctx.dims();
    let te1 = ctx.clone().narrow(2, 0, w1);
    let te2 = ctx.narrow(2, w1, d - w1);
    assert_close(
        &format!("{what} text_encoder"),
        values(te1),
        vec![1, t, w1],
        &prompt_ref(&format!("{prefix}.text_encoder")),
    );
    assert_close(
        &format!("{what} text_encoder_2"),
        values(te2),
        vec![1, t, d - w1],
        &prompt_ref(&format!("{prefix}.text_encoder_2")),
    );
    let dims = pooled.dims().to_vec();
    assert_close(
        &format!("{what} pooled"),
        values(pooled),
        dims,
        &prompt_ref(&format!("{prefix}.pooled")),
    );
}

/// A case's conditioning: the prompt's and the negative prompt's encodings.
fn conditioning<B: FusedOps>(pipe: &SdxlPipeline<B>, name: &str) {
    let c = case(name);
    let skip = clip_skip(c);
    let syntax = match c["computed_by"].as_str() {
        // diffusers' own prompt encoding (clip skip): plain text.
        Some("diffusers") => PromptSyntax::Plain,
        _ => PromptSyntax::A1111,
    };
    let prompt = c["prompt"].as_str().expect("prompt");
    let (ctx, pooled) = pipe.encode_text(prompt, syntax, skip).expect("encode");
    check_encoded(
        &format!("{name} cond"),
        ctx,
        pooled,
        &format!("{name}.cond"),
    );
    let negative = c["negative_prompt"].as_str().unwrap_or_default();
    if negative.is_empty() {
        // An empty negative prompt is zeros, as in diffusers: checked through the image.
        let want = prompt_ref(&format!("{name}.uncond.text_encoder"));
        assert!(
            want.data.iter().all(|&v| v == 0.0),
            "{name}: uncond not zeros"
        );
    } else {
        let (ctx, pooled) = pipe.encode_text(negative, syntax, skip).expect("encode");
        check_encoded(
            &format!("{name} uncond"),
            ctx,
            pooled,
            &format!("{name}.uncond"),
        );
    }
}

/// The request a case's `cli` describes.
fn request(name: &str) -> GenerationRequest {
    let c = case(name);
    let all = cases();
    let init = reference("pipe.init_latents");
    let [n, _, h, w] = <[usize; 4]>::try_from(init.shape.clone()).expect("rank 4");
    assert_eq!(
        (h * 8, w * 8),
        (
            all["height"].as_u64().unwrap() as usize,
            all["width"].as_u64().unwrap() as usize
        )
    );
    let negative = c["negative_prompt"].as_str().unwrap_or_default();
    GenerationRequest {
        prompt: c["prompt"].as_str().expect("prompt").into(),
        negative_prompt: (!negative.is_empty()).then(|| negative.into()),
        num_inference_steps: all["steps"].as_u64().expect("steps") as usize,
        guidance_scale: all["guidance_scale"].as_f64().expect("guidance"),
        width: w * 8,
        height: h * 8,
        num_images: n,
        latents: Some(init.data),
        clip_skip: clip_skip(c),
        ..Default::default()
    }
}

/// A case's image through the whole pipeline.
fn image<B: FusedOps>(pipe: &SdxlPipeline<B>, name: &str) {
    let out = pipe
        .generate(&request(name), &mut no_progress)
        .expect("generate");
    let latents = out.latents.clone();
    let dims = latents.dims().to_vec();
    let want = prompt_ref(&format!("{name}.latents"));
    let err = rel_error(&values(latents), &want.data);
    assert_eq!(dims, want.shape, "{name} latents: shape");
    eprintln!("{name} latents: relative error {err:.3e}");
    assert!(
        err <= TOL_F32,
        "{name} latents: relative error {err:.3e} > {TOL_F32:.0e}"
    );
    assert_image_close(
        &format!("{name} image"),
        &out.images[0].rgb,
        &prompt_ref(&format!("{name}.image_u8")),
    );
}

/// Every case's conditioning and image.
fn all_cases<B: FusedOps>(device: &B::Device, names: &[&str]) {
    let pipe = pipeline::<B>(device);
    for name in names {
        conditioning(&pipe, name);
        image(&pipe, name);
    }
}

fn case_names() -> Vec<&'static str> {
    let map = cases()["cases"].as_object().expect("cases");
    map.keys().map(String::as_str).collect()
}

#[test]
fn every_case_cpu() {
    all_cases::<crate::common::Cpu>(&Default::default(), &case_names());
}

/// On software Vulkan every new tensor shape costs minutes of shader compilation, so only
/// two cases run on wgpu: `weighted_strong` (one chunk: the existing pipeline tests'
/// shapes, weights on the GPU) here, and `long` below. The other cases differ from these
/// only in host-side parsing and chunking, which the CPU test covers.
#[test]
fn weighted_wgpu() {
    all_cases::<crate::common::Gpu>(&crate::common::gpu_device(), &["weighted_strong"]);
}

/// Two chunks on wgpu: the CLIP encoders on two rows and every cross-attention on 154
/// keys and values.
#[test]
fn long_wgpu() {
    all_cases::<crate::common::Gpu>(&crate::common::gpu_device(), &["long"]);
}

/// The chunks each encoder is given (ids, weights, embedding positions) equal A1111's.
#[test]
fn chunks_match_a1111() {
    let pipe = pipeline::<crate::common::Cpu>(&Default::default());
    for name in case_names() {
        let c = case(name);
        if c["computed_by"] != "A1111" {
            continue;
        }
        for (branch, key) in [("prompt", "prompt"), ("negative_prompt", "negative_prompt")] {
            let Some(want) = c["chunks"].get(branch) else {
                continue;
            };
            let text = c[key].as_str().unwrap_or_default();
            let got = pipe.prompt_chunks(text).expect("chunks");
            let c = pipe.components();
            let tokenizers = [&c.tokenizer, &c.tokenizer_2];
            for (i, encoder) in ["text_encoder", "text_encoder_2"].iter().enumerate() {
                let what = format!("{name} {branch} {encoder}");
                let (eos, pad) = (tokenizers[i].eos_id(), tokenizers[i].pad_id());
                check_chunks(&what, &got[i], &want[encoder], eos, pad);
            }
        }
    }
}

/// `want` holds A1111's chunks as `tokenize_line` makes them, before the ids after the
/// first EOS become the pad id (`process_tokens`, for text_encoder_2).
fn check_chunks(what: &str, got: &Chunks, want: &Value, eos: u32, pad: u32) {
    assert_eq!(
        got.token_count as u64,
        want["token_count"].as_u64().expect("count"),
        "{what}: token count"
    );
    let want = want["chunks"].as_array().expect("chunks");
    assert_eq!(got.chunks.len(), want.len(), "{what}: chunks");
    for (i, (g, w)) in got.chunks.iter().zip(want).enumerate() {
        let mut ids: Vec<u32> = (w["ids"].as_array().expect("ids").iter())
            .map(|v| v.as_u64().expect("id") as u32)
            .collect();
        if let Some(first) = ids.iter().position(|&t| t == eos) {
            ids[first + 1..].iter_mut().for_each(|t| *t = pad);
        }
        let mults: Vec<f32> = (w["multipliers"].as_array().expect("multipliers").iter())
            .map(|v| v.as_f64().expect("multiplier") as f32)
            .collect();
        assert_eq!(g.ids, ids, "{what} chunk {i}: ids");
        assert_eq!(g.multipliers, mults, "{what} chunk {i}: multipliers");
        let fixes: Vec<u64> = (w["embeddings"].as_array().into_iter().flatten())
            .map(|f| f[0].as_u64().expect("offset"))
            .collect();
        let got_fixes: Vec<u64> = g.fixes.iter().map(|f| f.position as u64 - 1).collect();
        assert_eq!(got_fixes, fixes, "{what} chunk {i}: embedding offsets");
    }
}

/// The weights of one `parse_cases.json` line, read from its text: serde_json's default
/// float parsing is not correctly rounded, and these are compared exactly.
fn raw_weights(line: &str) -> Vec<f64> {
    let output = &line[line.find("\"output\"").expect("an output")..];
    output
        .match_indices("\", ")
        .filter_map(|(at, _)| {
            let rest = &output[at + 3..];
            let end = rest.find(']')?;
            rest[..end].trim().parse::<f64>().ok()
        })
        .collect()
}

/// `parse_cases.json`: A1111's `parse_prompt_attention` on tricky strings, its doctest
/// examples included; weights exactly (float64 products in A1111's order).
#[test]
fn parser_cases() {
    let text =
        std::fs::read_to_string(prompts_dir().join("parse_cases.json")).expect("parse cases");
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("\"input\"")).collect();
    let cases = json("parse_cases.json");
    let cases = cases.as_array().expect("a list");
    assert_eq!(lines.len(), cases.len(), "one case per line");
    assert!(!cases.is_empty());
    for (c, line) in cases.iter().zip(lines) {
        let input = c["input"].as_str().expect("input");
        let texts = (c["output"].as_array().expect("output").iter())
            .map(|p| p[0].as_str().expect("text").to_string());
        let want: Vec<(String, f64)> = texts.zip(raw_weights(line)).collect();
        assert_eq!(
            want.len(),
            c["output"].as_array().map_or(0, Vec::len),
            "{input:?}: weights read"
        );
        let got: Vec<(String, f64)> = parse_prompt_attention(input)
            .into_iter()
            .map(|p| (p.text, p.weight))
            .collect();
        assert_eq!(got, want, "parse_prompt_attention({input:?})");
    }
}

/// `--prompt-syntax plain` is diffusers' encoding: the pipeline's references bit for bit
/// against the default path's plain encoding of today.
#[test]
fn plain_syntax_is_diffusers() {
    let pipe =
        crate::common::fixture_pipeline::<crate::common::Cpu>(DType::F32, &Default::default());
    let mut req = request("weighted");
    req.prompt = cases()["plain_prompt"]
        .as_str()
        .expect("plain prompt")
        .into();
    req.prompt_syntax = PromptSyntax::Plain;
    let out = pipe.generate(&req, &mut no_progress).expect("generate");
    crate::common::assert_matches(
        "plain syntax latents",
        out.latents,
        "pipe.cfg5.euler4.latents",
        TOL_F32,
    );
    // Bit for bit what diffusers' encoding through the text encoders gives: the
    // tokenizers' 77 ids, each encoder's penultimate states, the second's pooled.
    let plain_prompt = cases()["plain_prompt"].as_str().expect("plain prompt");
    let c = pipe.components();
    let ids = |t: &hypergen::model::tokenizer::ClipTokenizer| {
        let e = t.encode(plain_prompt).expect("tokenizes");
        let data: Vec<i32> = e.ids.iter().map(|&i| i as i32).collect();
        Tensor::<crate::common::Cpu, 2, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(data, [1, e.ids.len()]),
            &Default::default(),
        )
    };
    let o1 = c
        .text_encoder
        .forward_conditioning(ids(&c.tokenizer), false);
    let o2 = c
        .text_encoder_2
        .forward_conditioning(ids(&c.tokenizer_2), true);
    let want = Tensor::cat(vec![o1.penultimate, o2.penultimate], 2);
    for syntax in [PromptSyntax::Plain, PromptSyntax::A1111] {
        let (got, pooled) = pipe.encode_text(plain_prompt, syntax, 0).expect("encode");
        assert_eq!(
            values(got),
            values(want.clone()),
            "{syntax}: not bit for bit"
        );
        assert_eq!(
            values(pooled),
            values(o2.text_embeds.clone().expect("pooled")),
            "{syntax}: pooled not bit for bit"
        );
    }
    // The weighted prompt as plain text is not the weighted one.
    let (plain, _) = pipe
        .encode_text(
            case("weighted")["prompt"].as_str().unwrap(),
            PromptSyntax::Plain,
            0,
        )
        .expect("encode");
    let (a1111, _) = pipe
        .encode_text(
            case("weighted")["prompt"].as_str().unwrap(),
            PromptSyntax::A1111,
            0,
        )
        .expect("encode");
    assert!(rel_error(&values(plain), &values(a1111)) > 1e-3);
}

/// Requests whose prompts take different numbers of chunks batch together: each row
/// group runs at its own length and every image equals the request's alone.
#[test]
fn batch_of_different_lengths() {
    let pipe = pipeline::<crate::common::Cpu>(&Default::default());
    let reqs = [request("break_neg"), request("weighted"), request("long")];
    assert!(reqs.iter().all(|r| r.batch_compatible(&reqs[0])));
    let batch = pipe.generate_batch(&reqs, &mut no_progress).expect("batch");
    for (req, out) in reqs.iter().zip(batch) {
        let alone = pipe.generate(req, &mut no_progress).expect("alone");
        let err = rel_error(&values(out.latents), &values(alone.latents));
        eprintln!("{:?}: batched vs alone {err:.3e}", &req.prompt[..20]);
        assert!(err <= 1e-5, "batched differs from alone: {err:.3e}");
    }
}

/// `hypergen generate` with each case's `cli` arguments (paths relative to the fixture):
/// `--clip-skip`, `--embeddings-dir`, a long prompt with a long negative prompt.
#[test]
fn cli_cases() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for name in ["clip_skip1", "ti_negative", "long"] {
        let mut args: Vec<String> = (case(name)["cli"].as_array().expect("cli").iter())
            .map(|a| a.as_str().expect("text").to_string())
            .collect();
        let out = tmp.path().join(format!("{name}.png"));
        let at = args.iter().position(|a| a == "--out").expect("--out") + 1;
        args[at] = out.display().to_string();
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_hypergen"))
            .current_dir(fixture_dir())
            .arg("generate")
            .arg("--model")
            .arg(fixture_dir())
            .args(&args)
            .status()
            .expect("run hypergen");
        assert!(
            status.success(),
            "{name}: hypergen generate failed: {status}"
        );
        let png = image::open(&out).expect("PNG written").to_rgb8();
        assert_image_close(
            &format!("{name} cli"),
            png.as_raw(),
            &prompt_ref(&format!("{name}.image_u8")),
        );
    }
}
