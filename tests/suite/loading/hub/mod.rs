//! Hub downloads against a local server serving the fixture in the Hub's layout: a
//! download loads and generates exactly what the local folder does, the cache is
//! reused, interrupted downloads resume, missing files and gated repositories give
//! clear errors, and offline mode reads the cache only. Every test has its own server
//! and cache, passed explicitly, so nothing global is shared.

mod server;

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::path::Path;

use burn::tensor::DType;
use hypergen::load::hub::{resolve_model_with, resolve_vae_with, HubOptions};
use hypergen::load::{load_pipeline, LoadOptions};
use hypergen::pipeline::{GenerationRequest, Progress, SdxlPipeline};

use crate::common::{fixture_dir, Cpu};
use server::{Config, Hub, SHA};

const REPO: &str = "hypergen-test/tiny-sdxl";

fn hub(config: Config) -> Hub {
    // `reference/` holds test data, not the model.
    Hub::start(&fixture_dir(), &["reference"], config)
}

fn options(hub: &Hub, cache: &Path) -> HubOptions {
    HubOptions {
        endpoint: hub.endpoint.clone(),
        cache_dir: cache.to_path_buf(),
        token: None,
        offline: false,
        progress: false,
        retries: 2,
    }
}

fn names(files: &[server::Logged]) -> HashSet<String> {
    files
        .iter()
        .map(|l| {
            l.path
                .rsplit_once("/resolve/main/")
                .map_or(l.path.clone(), |(_, f)| f.to_string())
        })
        .collect()
}

fn same_bytes(a: &Path, b: &Path) {
    let (x, y) = (
        std::fs::read(a).expect("read"),
        std::fs::read(b).expect("read"),
    );
    assert!(x == y, "{} differs from {}", a.display(), b.display());
}

fn generate(pipe: &SdxlPipeline<Cpu>) -> (Vec<u8>, Vec<f32>) {
    let req = GenerationRequest {
        prompt: "a photo of an astronaut riding a horse on mars".into(),
        num_inference_steps: 2,
        width: 64,
        height: 64,
        seed: 7,
        ..Default::default()
    };
    let mut none = |_: Progress| ControlFlow::Continue(());
    let out = pipe.generate(&req, &mut none).expect("generate");
    let latents = crate::common::values(out.latents);
    (out.images[0].rgb.clone(), latents)
}

/// Download, load and generate: the same image as the local folder. A second start
/// downloads nothing; an offline start does not touch the network at all.
#[test]
fn hub_download_load_generate_then_cache() {
    let hub = hub(Config::default());
    let cache = tempfile::tempdir().expect("tempdir");
    let opts = LoadOptions {
        hub: options(&hub, cache.path()),
        ..Default::default()
    };
    let pipe = load_pipeline::<Cpu>(
        REPO,
        DType::F32,
        &opts,
        &Default::default(),
        &Default::default(),
    )
    .expect("hub model loads");
    let info = pipe.components().info.clone();
    let dir = info.local_dir.clone().expect("a snapshot folder");
    assert_eq!(info.id, REPO);
    assert!(!info.random_weights);
    assert!(dir.starts_with(cache.path()), "{}", dir.display());
    assert!(
        dir.ends_with(format!("models--hypergen-test--tiny-sdxl/snapshots/{SHA}")),
        "{}",
        dir.display()
    );

    // Only what the float32 pipeline reads: no fp16 duplicates.
    let fetched = names(&hub.file_gets());
    assert!(
        fetched.contains("unet/diffusion_pytorch_model.safetensors"),
        "{fetched:?}"
    );
    assert!(fetched.iter().all(|f| !f.contains(".fp16.")), "{fetched:?}");
    same_bytes(
        &dir.join("unet/diffusion_pytorch_model.safetensors"),
        &fixture_dir().join("unet/diffusion_pytorch_model.safetensors"),
    );

    let local = crate::common::fixture_pipeline::<Cpu>(DType::F32, &Default::default());
    assert!(
        generate(&pipe) == generate(&local),
        "hub and local folder generate differently"
    );

    // Second start: the listing is asked for, no file is downloaded again.
    let before = hub.log().len();
    let again = resolve_model_with(REPO, None, None, &opts.hub).expect("second resolve");
    assert_eq!(again, dir);
    let new: Vec<_> = hub.log()[before..].to_vec();
    assert!(
        new.iter().all(|l| l.path.starts_with("/api/")),
        "files fetched again: {new:?}"
    );

    // Offline with a warm cache: same folder, no request at all.
    let offline = HubOptions {
        offline: true,
        ..opts.hub.clone()
    };
    let before = hub.log().len();
    assert_eq!(
        resolve_model_with(REPO, None, None, &offline).expect("offline"),
        dir
    );
    assert_eq!(
        resolve_model_with(REPO, Some(SHA), None, &offline).expect("offline by commit"),
        dir
    );
    assert_eq!(hub.log().len(), before, "offline mode made requests");
    // Offline, float16 would need the fp16 files, which were never downloaded... but the
    // plain files are an accepted fallback, as the loader's.
    assert_eq!(
        resolve_model_with(REPO, None, Some("fp16"), &offline).expect("fallback"),
        dir
    );
}

/// float16 downloads the `fp16` variant files, and only those.
#[test]
fn hub_fp16_variant() {
    let hub = hub(Config::default());
    let cache = tempfile::tempdir().expect("tempdir");
    let dir = resolve_model_with(REPO, None, Some("fp16"), &options(&hub, cache.path()))
        .expect("resolve");
    let fetched = names(&hub.file_gets());
    for f in [
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors",
        "text_encoder_2/model.fp16.safetensors",
    ] {
        assert!(fetched.contains(f), "{f} not downloaded: {fetched:?}");
    }
    assert!(
        !fetched.contains("unet/diffusion_pytorch_model.safetensors"),
        "{fetched:?}"
    );
    same_bytes(
        &dir.join("vae/diffusion_pytorch_model.fp16.safetensors"),
        &fixture_dir().join("vae/diffusion_pytorch_model.fp16.safetensors"),
    );
}

/// A download cut off midway resumes from where it stopped (a `Range` request), within
/// the same call and across calls, and the result is byte-identical.
#[test]
fn hub_interrupted_download_resumes() {
    let big = "unet/diffusion_pytorch_model.safetensors";
    let config = Config {
        cut_once: [big.to_string()].into(),
        ..Default::default()
    };
    let hub = hub(config.clone());
    let cache = tempfile::tempdir().expect("tempdir");
    let dir = resolve_model_with(REPO, None, None, &options(&hub, cache.path()))
        .expect("resolve with a retry");
    same_bytes(&dir.join(big), &fixture_dir().join(big));
    let gets: Vec<_> = hub
        .file_gets()
        .into_iter()
        .filter(|l| l.path.ends_with(big))
        .collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[0].range_start, 0);
    assert!(gets[1].range_start > 0, "the retry started over: {gets:?}");

    // Without retries the first call fails, naming the file; the next one resumes.
    let hub = self::hub(config);
    let cache = tempfile::tempdir().expect("tempdir");
    let once = HubOptions {
        retries: 0,
        ..options(&hub, cache.path())
    };
    let e = resolve_model_with(REPO, None, None, &once)
        .expect_err("cut download fails")
        .to_string();
    assert!(e.contains(big), "{e}");
    let dir = resolve_model_with(REPO, None, None, &once).expect("second call resumes");
    same_bytes(&dir.join(big), &fixture_dir().join(big));
    let gets: Vec<_> = hub
        .file_gets()
        .into_iter()
        .filter(|l| l.path.ends_with(big))
        .collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert!(
        gets[1].range_start > 0,
        "the second call started over: {gets:?}"
    );
}

/// A file the pipeline needs that the repository lacks, or that the server cannot
/// serve, is an error naming it.
#[test]
fn hub_missing_files_are_named() {
    let gone = "unet/config.json";
    let hub1 = hub(Config {
        unlisted: [gone.to_string()].into(),
        ..Default::default()
    });
    let cache = tempfile::tempdir().expect("tempdir");
    let e = resolve_model_with(REPO, None, None, &options(&hub1, cache.path()))
        .expect_err("missing config")
        .to_string();
    assert!(e.contains(REPO) && e.contains(gone), "{e}");

    let broken = "text_encoder_2/model.safetensors";
    let hub2 = hub(Config {
        missing: [broken.to_string()].into(),
        only_repo: Some(REPO.into()),
        ..Default::default()
    });
    let cache = tempfile::tempdir().expect("tempdir");
    let e = resolve_model_with(REPO, None, None, &options(&hub2, cache.path()))
        .expect_err("404 on a listed file")
        .to_string();
    assert!(e.contains(broken) && e.contains("404"), "{e}");

    // A repository that does not exist: the listing 404s.
    let e = resolve_model_with("nobody/nothing", None, None, &options(&hub2, cache.path()))
        .expect_err("unknown repository")
        .to_string();
    assert!(e.contains("nobody/nothing") && e.contains("404"), "{e}");
}

/// Offline with a cold cache is a clear error; so is an unreachable server with one.
/// An unreachable server with a warm cache falls back to it.
#[test]
fn hub_offline_and_unreachable() {
    let cache = tempfile::tempdir().expect("tempdir");
    let cold = HubOptions {
        endpoint: "http://127.0.0.1:9".into(),
        cache_dir: cache.path().to_path_buf(),
        token: None,
        offline: true,
        progress: false,
        retries: 0,
    };
    let e = resolve_model_with(REPO, None, None, &cold)
        .expect_err("cold cache")
        .to_string();
    assert!(
        e.contains("not in the cache") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );

    let unreachable = HubOptions {
        offline: false,
        ..cold.clone()
    };
    let e = resolve_model_with(REPO, None, None, &unreachable)
        .expect_err("no server")
        .to_string();
    assert!(
        e.contains("cannot reach") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );

    // Warm the cache through a real server, then lose it.
    let hub = hub(Config::default());
    let dir = resolve_model_with(REPO, None, None, &options(&hub, cache.path())).expect("download");
    assert_eq!(
        resolve_model_with(REPO, None, None, &unreachable).expect("cache fallback"),
        dir
    );

    // A revision that was never downloaded is not in the cache.
    let e = resolve_model_with(REPO, Some("v2"), None, &cold)
        .expect_err("unknown revision")
        .to_string();
    assert!(e.contains("`v2`"), "{e}");
}

/// Gated repositories: without a token the error says to set HF_TOKEN; with it, the
/// download works. A lone VAE repository resolves to its root (`--vae`).
#[test]
fn hub_gated_repository_and_lone_vae() {
    let vae_dir = fixture_dir().join("vae");
    let hub = Hub::start(
        &vae_dir,
        &[],
        Config {
            token: Some("hf_secret".into()),
            ..Default::default()
        },
    );
    let cache = tempfile::tempdir().expect("tempdir");
    let mut opts = options(&hub, cache.path());
    let e = resolve_vae_with("madebyollin/sdxl-vae-fp16-fix", None, None, &opts)
        .expect_err("gated")
        .to_string();
    assert!(e.contains("HF_TOKEN") && e.contains("401"), "{e}");
    opts.token = Some("hf_secret".into());
    let dir = resolve_vae_with("madebyollin/sdxl-vae-fp16-fix", None, Some("fp16"), &opts)
        .expect("with token");
    same_bytes(&dir.join("config.json"), &vae_dir.join("config.json"));
    same_bytes(
        &dir.join("diffusion_pytorch_model.fp16.safetensors"),
        &vae_dir.join("diffusion_pytorch_model.fp16.safetensors"),
    );
    // The VAE loads as the pipeline's `--vae`.
    let load = LoadOptions {
        vae: Some(dir.display().to_string()),
        variant: Some("fp16".into()),
        ..Default::default()
    };
    crate::common::fixture_pipeline_with::<Cpu>(
        DType::F32,
        &load,
        &Default::default(),
        &Default::default(),
    );
}

/// `owner/name/file.safetensors`: one single-file checkpoint downloaded from the Hub
/// (nothing else of the repository), loaded with `--config`, gives the local file's image.
#[test]
fn hub_single_file_checkpoint() {
    let hub = hub(Config::default());
    let cache = tempfile::tempdir().expect("cache");
    let configs = tempfile::tempdir().expect("configs");
    crate::parity::single_file::copy_configs(&fixture_dir(), configs.path());
    let options = LoadOptions {
        config: Some(configs.path().to_path_buf()),
        hub: options(&hub, cache.path()),
        ..Default::default()
    };
    let model = format!("{REPO}/single_file/model.safetensors");
    let pipe = load_pipeline::<Cpu>(
        &model,
        DType::F32,
        &options,
        &Default::default(),
        &Default::default(),
    )
    .expect("Hub single file loads");
    assert_eq!(pipe.components().info.id, model);
    let local = fixture_dir().join("single_file").join("model.safetensors");
    let local_pipe = load_pipeline::<Cpu>(
        &local.display().to_string(),
        DType::F32,
        &LoadOptions {
            hub: options.hub.clone(),
            ..options.clone()
        },
        &Default::default(),
        &Default::default(),
    )
    .expect("local single file loads");
    assert_eq!(
        generate(&pipe),
        generate(&local_pipe),
        "same image as the local file"
    );
    assert_eq!(
        names(&hub.file_gets()),
        HashSet::from(["single_file/model.safetensors".to_string()]),
        "only the checkpoint is downloaded"
    );
    let err = match load_pipeline::<Cpu>(
        &format!("{REPO}/single_file/nope.safetensors"),
        DType::F32,
        &options,
        &Default::default(),
        &Default::default(),
    ) {
        Ok(_) => panic!("a missing file loads"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("no file `single_file/nope.safetensors`"),
        "{err}"
    );
}
