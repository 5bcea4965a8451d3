//! The samplers of issue 28 against diffusers (`reference/schedulers_extra`): every
//! scheduler table (4 and 25 steps), every scheduler-only trajectory, and every
//! end-to-end case (final latents and image), including v-prediction with zero terminal
//! SNR and guidance rescale.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use burn::tensor::{DType, Tensor, TensorData};
use hypergen::noise::Generator;
use hypergen::pipeline::{GenerationRequest, RunOptions, SdxlPipeline};
use hypergen::scheduler::{SamplerSettings, Scheduler, SchedulerConfig, SchedulerKind, Spacing};
use hypergen::FusedOps;
use serde_json::Value;

use crate::common::{self, no_progress, RefTensor, TOL_F32};

fn extra_dir() -> PathBuf {
    common::reference_dir().join("schedulers_extra")
}

fn json(name: &str) -> Value {
    json_file(&extra_dir().join(name))
}

/// `schedulers_extra.safetensors`, by name.
fn tensor(name: &str) -> RefTensor {
    static ALL: OnceLock<HashMap<String, RefTensor>> = OnceLock::new();
    ALL.get_or_init(|| {
        let path = extra_dir().join("schedulers_extra.safetensors");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("parses");
        st.tensors()
            .into_iter()
            .map(|(name, view)| (name, common::ref_tensor_of(&view)))
            .collect()
    })
    .get(name)
    .unwrap_or_else(|| panic!("reference tensor `{name}` not found"))
    .clone()
}

fn on<B: FusedOps, const D: usize>(r: RefTensor, device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(r.data, r.shape), device)
}

fn assert_close<B: FusedOps, const D: usize>(what: &str, got: Tensor<B, D>, want: &RefTensor) {
    assert_eq!(got.dims().to_vec(), want.shape, "{what}: shape");
    let got = common::values(got);
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite");
    let err = common::rel_error(&got, &want.data);
    eprintln!("{what}: relative error {err:.3e}");
    assert!(
        err <= TOL_F32,
        "{what}: relative error {err:.3e} > {TOL_F32:.0e}"
    );
}

/// The scheduler config a KIND starts from: the fixture's own, or the v-prediction one.
fn base_config(kind: &str) -> SchedulerConfig {
    let path = if kind.starts_with("vpred.") {
        extra_dir().join("vpred/scheduler_config.json")
    } else {
        common::fixture_dir().join("scheduler/scheduler_config.json")
    };
    SchedulerConfig::read(&path).expect("scheduler config reads")
}

/// The settings of a KIND of the README's table, as a user asks for them (`--scheduler`,
/// `--timestep-spacing`), not as diffusers' overrides.
fn settings(kind: &str) -> SamplerSettings {
    let (name, spacing) = match kind.split_once('.') {
        Some(("vpred", _)) => ("euler", None),
        Some((name, spacing)) => (name, Some(spacing.parse::<Spacing>().expect("spacing"))),
        None => (kind, None),
    };
    SamplerSettings {
        kind: Some(name.parse::<SchedulerKind>().expect("kind")),
        timestep_spacing: spacing,
        eta: (name == "tcd").then_some(0.3),
    }
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_f64().expect("number")).collect())
        .unwrap_or_default()
}

/// Every `KIND.N` table: timesteps (exact where integral), σ and the initial σ to 1e-4.
#[test]
fn every_table() {
    let Value::Object(tables) = json("schedulers_extra.json") else {
        panic!("schedulers_extra.json is not an object")
    };
    assert!(tables.len() >= 20, "expected every kind at 4 and 25 steps");
    for (key, entry) in &tables {
        let (kind, steps) = key.rsplit_once('.').expect("KIND.N");
        let steps: usize = steps.parse().expect("N");
        let mut sched = Scheduler::build(&base_config(kind), &settings(kind)).expect(key);
        assert_eq!(
            sched.kind().class_name(),
            entry["class"].as_str().expect("class"),
            "{key}: class"
        );
        sched.set_timesteps(steps).expect(key);
        assert_eq!(
            sched.order() as u64,
            entry["order"].as_u64().expect("order"),
            "{key}: order"
        );
        let want_t = floats(&entry["timesteps"]);
        assert_eq!(
            sched.timesteps().len(),
            want_t.len(),
            "{key}: timestep count"
        );
        for (i, (g, w)) in sched.timesteps().iter().zip(&want_t).enumerate() {
            assert!((g - w).abs() <= 1e-3, "{key}: timestep {i}: {g} vs {w}");
        }
        let want_s = floats(&entry["sigmas"]);
        assert_eq!(sched.sigmas().len(), want_s.len(), "{key}: sigma count");
        for (i, (g, w)) in sched.sigmas().iter().zip(&want_s).enumerate() {
            let err = if *w == 0.0 {
                g.abs()
            } else {
                (g - w).abs() / w.abs()
            };
            assert!(err <= TOL_F32, "{key}: sigma {i}: {g} vs {w}");
        }
        let want = entry["init_noise_sigma"]
            .as_f64()
            .expect("init_noise_sigma");
        let err = (sched.init_noise_sigma() - want).abs() / want;
        assert!(
            err <= TOL_F32,
            "{key}: init_noise_sigma {} vs {want}",
            sched.init_noise_sigma()
        );
    }
}

/// `sched.KIND.4steps.afterI`: the step rule alone on random model outputs, with the
/// seeded generator for the samplers that draw noise.
fn trajectories<B: FusedOps>(device: &B::Device) {
    let kinds = [
        "euler",
        "heun",
        "unipc",
        "dpmpp_2m_sde",
        "dpmpp_2m_sde_karras",
        "lcm",
        "tcd",
        "euler.trailing",
        "euler.linspace",
        "dpmpp_2m",
        "dpmpp_2m.trailing",
        "vpred.euler",
    ];
    for kind in kinds {
        let mut sched = Scheduler::build(&base_config(kind), &settings(kind)).expect(kind);
        sched.set_timesteps(4).expect(kind);
        let mut rng = Generator::new(1234);
        let mut x = on::<B, 4>(tensor("sched.sample"), device).mul_scalar(sched.init_noise_sigma());
        for i in 0..sched.timesteps().len() {
            let eps = on::<B, 4>(tensor(&format!("sched.eps{i}")), device);
            x = sched.step(eps, i, x, &mut rng);
            let name = format!("sched.{kind}.4steps.after{i}");
            assert_close(&name, x.clone(), &tensor(&name));
        }
    }
}
crate::on_backends!(sampler_trajectories, trajectories);

/// The fixture pipeline, with the scheduler config of the v-prediction model for those
/// cases (a model folder of the same components and that `scheduler_config.json`).
fn pipeline<B: FusedOps>(device: &B::Device, vpred: bool) -> SdxlPipeline<B> {
    let mut components = hypergen::load::load_components::<B>(
        &common::fixture_model(),
        DType::F32,
        &Default::default(),
        device,
    )
    .expect("fixture components load");
    if vpred {
        components.scheduler_config = base_config("vpred.euler");
    }
    SdxlPipeline::new(components, &RunOptions::default(), device).expect("pipeline")
}

/// One `cases.json` case as `hypergen generate` runs it: its `cli` options on the common
/// ones (prompt, 4 steps, 128², the fixture's starting latents, seed 1234).
fn request(case: &Value, common_args: &Value) -> GenerationRequest {
    let init = {
        let path = common::reference_dir().join("init_latents.safetensors");
        let bytes = std::fs::read(&path).expect("init latents");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("parses");
        common::ref_tensor_of(&st.tensor("latents").expect("latents"))
    };
    let args: Vec<&str> = common_args
        .as_array()
        .into_iter()
        .flatten()
        .chain(case["cli"].as_array().into_iter().flatten())
        .map(|v| v.as_str().expect("argument"))
        .collect();
    let value = |flag: &str| args.iter().position(|a| *a == flag).map(|i| args[i + 1]);
    let [n, _, h, w] = <[usize; 4]>::try_from(init.shape.clone()).expect("rank 4");
    GenerationRequest {
        prompt: value("--prompt").expect("prompt").into(),
        num_inference_steps: value("--steps").expect("steps").parse().expect("steps"),
        guidance_scale: case["guidance_scale"].as_f64().expect("guidance"),
        guidance_rescale: value("--guidance-rescale").map_or(0.0, |r| r.parse().expect("rescale")),
        width: w * 8,
        height: h * 8,
        num_images: n,
        seed: value("--seed").expect("seed").parse().expect("seed"),
        sampler: SamplerSettings {
            kind: value("--scheduler").map(|s| s.parse().expect("scheduler")),
            timestep_spacing: value("--timestep-spacing").map(|s| s.parse().expect("spacing")),
            eta: value("--eta").map(|e| e.parse().expect("eta")),
        },
        latents: Some(init.data),
        ..Default::default()
    }
}

/// Every end-to-end case: final latents to 1e-4 and the image within 1/255, and the
/// latents after the first step (the step rule with a real model output).
fn end_to_end<B: FusedOps>(device: &B::Device, only: Option<&[&str]>) {
    let cases = json("cases.json");
    let Value::Object(all) = &cases["cases"] else {
        panic!("cases.json has no cases")
    };
    let plain = pipeline::<B>(device, false);
    let vpred = pipeline::<B>(device, true);
    for (name, case) in all {
        if only.is_some_and(|o| !o.contains(&name.as_str())) {
            continue;
        }
        let req = request(case, &cases["cli_common"]);
        let pipe = if name.starts_with("vpred.") {
            &vpred
        } else {
            &plain
        };
        let out = pipe.generate(&req, &mut no_progress).expect(name);
        assert_close(
            &format!("{name} latents"),
            out.latents,
            &tensor(&format!("{name}.latents")),
        );
        common::assert_image_close(
            &format!("{name} image"),
            &out.images[0].rgb,
            &tensor(&format!("{name}.image_u8")),
        );
    }
}

/// Every case on the CPU.
#[test]
fn sampler_runs_cpu() {
    end_to_end::<common::Cpu>(&Default::default(), None);
}

/// On wgpu, a multistep corrector (UniPC), per-step noise (DPM++ 2M SDE Karras) and the
/// v-prediction case with guidance rescale (the only new tensor operations): the other
/// samplers differ from these only in host-side tables and scalar coefficients, and all
/// the cases take over six minutes on the software Vulkan of CI.
#[test]
fn sampler_runs_wgpu() {
    end_to_end::<common::Gpu>(
        &common::gpu_device(),
        Some(&[
            "heun",
            "unipc",
            "dpmpp_2m_sde_karras",
            "lcm",
            "tcd",
            "vpred.rescale0.7",
        ]),
    );
}

/// `tests/references/sampler_edits/`: image-to-image and inpainting with the new samplers,
/// computed by diffusers with `scripts/references/sampler_edits.py` (the fixture has
/// edits with its own scheduler only).
fn sampler_edits_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/references/sampler_edits")
}

/// Every case of `sampler_edits`: latents to 1e-4, images within 1/255, on the CPU. The
/// references hold the SHA-256 of every fixture file they were computed from; another
/// fixture fails here with the command that recomputes them, rather than comparing
/// against another model's numbers.
#[test]
fn sampler_edits_cpu() {
    use hypergen::pipeline::{Image, InitImage, Mask};
    use sha2::{Digest, Sha256};
    let dir = sampler_edits_dir();
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).expect("cases.json"))
            .expect("cases.json parses");
    let fixture = common::fixture_dir();
    let Value::Object(files) = &meta["fixture_sha256"] else {
        panic!("cases.json has no fixture fingerprint")
    };
    for (file, want) in files {
        let bytes = std::fs::read(fixture.join(file)).expect(file);
        let got = format!("{:x}", Sha256::digest(&bytes));
        assert_eq!(
            Some(got.as_str()),
            want.as_str(),
            "{file} differs from the fixture the references in {} were computed from: \
             recompute them with scripts/references/sampler_edits.py (its docstring says how)",
            dir.display()
        );
    }
    let bytes = std::fs::read(dir.join("references.safetensors")).expect("references");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("references parse");
    let reference = |name: &str| common::ref_tensor_of(&st.tensor(name).expect(name));
    let prompt = meta["prompt"].as_str().expect("prompt");
    let image = image::open(fixture.join(meta["image"].as_str().expect("image"))).expect("image");
    let pipe = common::fixture_pipeline::<common::Cpu>(DType::F32, &Default::default());
    let Value::Object(cases) = &meta["cases"] else {
        panic!("cases.json has no cases")
    };
    assert!(!cases.is_empty());
    for (name, case) in cases {
        let want = reference(&format!("{name}.image_u8"));
        let cli: Vec<&str> = case["cli"]
            .as_array()
            .expect("cli")
            .iter()
            .map(|v| v.as_str().expect("argument"))
            .collect();
        let flag = |f: &str| cli.iter().position(|a| *a == f).map(|i| cli[i + 1]);
        let mask = case["mask"].as_str().map(|m| {
            let file = m.split_whitespace().next().expect("a file name");
            Mask::from_dynamic(&image::open(fixture.join(file)).expect("mask"))
        });
        let req = GenerationRequest {
            prompt: prompt.into(),
            num_inference_steps: case["num_inference_steps"].as_u64().expect("steps") as usize,
            guidance_scale: case["guidance_scale"].as_f64().expect("guidance"),
            width: want.shape[1],
            height: want.shape[0],
            seed: common::seed_of(case["generator"].as_str().expect("generator")),
            sampler: SamplerSettings {
                kind: flag("--scheduler").map(|s| s.parse().expect("scheduler")),
                timestep_spacing: None,
                eta: flag("--eta").map(|e| e.parse().expect("eta")),
            },
            init_image: Some(InitImage {
                image: Image::from_dynamic(&image),
                mask,
                strength: case["strength"].as_f64().expect("strength"),
            }),
            ..Default::default()
        };
        let out = pipe.generate(&req, &mut no_progress).expect(name);
        assert_close(
            &format!("{name} latents"),
            out.latents,
            &reference(&format!("{name}.latents")),
        );
        common::assert_image_close(name, &out.images[0].rgb, &want);
    }
}

/// Streaming previews (each sampler's x̂₀, decoded) work with every sampler, image-to-
/// image included, and change nothing: the final images equal a run without them.
#[test]
fn previews_with_every_sampler() {
    use hypergen::pipeline::{Image, InitImage};
    let pipe = common::fixture_pipeline::<common::Cpu>(DType::F32, &Default::default());
    for kind in SchedulerKind::ALL {
        for init in [false, true] {
            let (w, h) = (64, 64);
            let req = GenerationRequest {
                prompt: "a red cube on a table".into(),
                num_inference_steps: 3,
                guidance_scale: 5.0,
                width: w,
                height: h,
                seed: 9,
                sampler: SamplerSettings {
                    kind: Some(kind),
                    ..Default::default()
                },
                init_image: init.then(|| InitImage {
                    image: Image {
                        width: w,
                        height: h,
                        rgb: (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect(),
                    },
                    mask: None,
                    strength: 0.7,
                }),
                ..Default::default()
            };
            let what = format!("{kind} (from an image: {init})");
            let plain = pipe.generate(&req, &mut no_progress).expect(&what);
            let mut previews = Vec::new();
            let with = pipe
                .generate_batch_with_previews(
                    std::slice::from_ref(&req),
                    &mut no_progress,
                    2,
                    &mut |p| {
                        previews.push(p);
                        std::ops::ControlFlow::Continue(())
                    },
                )
                .expect(&what);
            assert_eq!(previews.len(), 2, "{what}: previews");
            for p in &previews {
                let img = &p.images[0][0];
                assert_eq!((img.width, img.height), (w, h), "{what}: preview size");
                assert!(
                    img.rgb.iter().any(|&v| v != img.rgb[0]),
                    "{what}: a flat preview"
                );
            }
            assert_eq!(
                with[0].images[0].rgb, plain.images[0].rgb,
                "{what}: previews changed the image"
            );
        }
    }
}

/// `hypergen generate` with each case's own options (`cases.json`'s `cli`) writes the
/// reference image: the flags reach the sampler. The v-prediction cases run on a model
/// folder made of the fixture's components and `vpred/scheduler_config.json`, as the
/// README describes it.
#[test]
fn cli_sampler_cases() {
    let cases = json("cases.json");
    let dir = tempfile::tempdir().expect("temp dir");
    let vpred = dir.path().join("vpred-model");
    std::fs::create_dir_all(vpred.join("scheduler")).expect("vpred folder");
    for entry in std::fs::read_dir(common::fixture_dir()).expect("fixture") {
        let entry = entry.expect("entry");
        let name = entry.file_name();
        if name != "scheduler" && name != "reference" {
            std::os::unix::fs::symlink(entry.path(), vpred.join(&name)).expect("symlink");
        }
    }
    std::fs::copy(
        extra_dir().join("vpred/scheduler_config.json"),
        vpred.join("scheduler/scheduler_config.json"),
    )
    .expect("vpred config");
    let fixture = common::fixture_dir().display().to_string();
    for name in ["tcd", "euler.trailing", "heun", "vpred.rescale0.7"] {
        let case = &cases["cases"][name];
        let out = dir.path().join(format!("{name}.png"));
        let model = if name.starts_with("vpred.") {
            vpred.display().to_string()
        } else {
            fixture.clone()
        };
        let args: Vec<String> = cases["cli_common"]
            .as_array()
            .expect("cli_common")
            .iter()
            .chain(case["cli"].as_array().expect("cli"))
            .map(|v| v.as_str().expect("argument").to_string())
            .map(|a| {
                a.replace("<fixture>", &fixture)
                    .replace("<guidance_scale>", &case["guidance_scale"].to_string())
            })
            .collect();
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_hypergen"))
            .args(["generate", "--model", &model])
            .args(&args)
            .arg("--out")
            .arg(&out)
            .status()
            .expect("hypergen runs");
        assert!(status.success(), "{name}: hypergen generate {args:?}");
        let png = image::open(&out).expect("PNG written").to_rgb8();
        common::assert_image_close(
            &format!("cli {name}"),
            png.as_raw(),
            &tensor(&format!("{name}.image_u8")),
        );
    }
}

/// Sampler options beyond the fixture's tables (UniPC order 3, v-prediction, Karras σ for
/// Heun and UniPC, the SDE's Heun update, LCM and TCD with other predictions), stepped
/// on random model outputs against `tests/references/sampler_options/`
/// (`scripts/references/sampler_options.py`, diffusers 0.42.1), from the fixture's
/// scheduler config (its SHA-256 is checked).
#[test]
fn sampler_options_match_diffusers() {
    use sha2::{Digest, Sha256};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/references/sampler_options");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).expect("cases.json"))
            .expect("parses");
    let config_path = common::fixture_dir().join("scheduler/scheduler_config.json");
    let digest = format!(
        "{:x}",
        Sha256::digest(std::fs::read(&config_path).expect("scheduler config"))
    );
    assert_eq!(
        Some(digest.as_str()),
        meta["scheduler_config_sha256"].as_str(),
        "{} differs from the config the references in {} were computed from: recompute \
         them with scripts/references/sampler_options.py",
        config_path.display(),
        dir.display()
    );
    let bytes = std::fs::read(dir.join("trajectories.safetensors")).expect("references");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parses");
    let t = |n: &str| common::ref_tensor_of(&st.tensor(n).expect(n));
    let base: Value = json_file(&config_path);
    let device = Default::default();
    let Value::Object(cases) = &meta["cases"] else {
        panic!("no cases")
    };
    for (name, case) in cases {
        let mut config = base.clone();
        for (k, v) in case["options"].as_object().expect("options") {
            config[k] = v.clone();
        }
        let config: SchedulerConfig = serde_json::from_value(config).expect("config");
        let settings = SamplerSettings {
            kind: Some(
                case["scheduler"]
                    .as_str()
                    .expect("kind")
                    .parse()
                    .expect("kind"),
            ),
            timestep_spacing: None,
            eta: case["eta"].as_f64(),
        };
        let mut s = Scheduler::build(&config, &settings).expect(name);
        s.set_timesteps(case["steps"].as_u64().expect("steps") as usize)
            .expect(name);
        assert_eq!(
            Some(s.timesteps().len() as u64),
            case["timesteps"].as_u64(),
            "{name}: timesteps"
        );
        let mut rng = Generator::new(1234);
        let mut x = on::<common::Cpu, 4>(t("sample"), &device).mul_scalar(s.init_noise_sigma());
        for i in 0..s.timesteps().len() {
            x = s.step(
                on::<common::Cpu, 4>(t(&format!("eps{i}")), &device),
                i,
                x,
                &mut rng,
            );
        }
        assert_close(name, x, &t(name));
    }
}

fn json_file(path: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    hypergen::scheduler::parse_python_json(&text).expect("parses")
}
