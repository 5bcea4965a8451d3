//! Which files of a diffusers repository the pipeline needs, worked out from the
//! repository's file list alone, and fetched through a [`FileSource`]: the Hub
//! (downloading what the cache lacks) or the cache (offline).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

/// Where files come from: each call returns the local path of one repository file.
pub trait FileSource {
    /// Every file the repository holds, as `/`-separated relative paths.
    fn listing(&self) -> &BTreeSet<String>;
    /// The local path of `file`, fetching it if needed. Only called for listed files.
    fn fetch(&mut self, file: &str) -> Result<PathBuf, String>;
}

/// The components `SdxlPipeline::load` reads, in the order they are fetched.
const TOKENIZERS: [&str; 2] = ["tokenizer", "tokenizer_2"];
const MODELS: [&str; 4] = ["text_encoder", "text_encoder_2", "unet", "vae"];
const SCHEDULER: &str = "scheduler";

/// Tokenizer files that are used when present.
const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
];

fn fetch_listed(source: &mut dyn FileSource, file: &str) -> Result<PathBuf, String> {
    if !source.listing().contains(file) {
        return Err(format!("the repository has no `{file}`"));
    }
    source.fetch(file)
}

/// Fetches everything a diffusers-layout SDXL pipeline needs: `model_index.json`, the
/// scheduler config, both tokenizers, and each model's config and weights, one weight
/// set per component (see [`fetch_weights`]). Other files (single-file checkpoints,
/// `.bin` weights, other variants) are left alone.
pub fn fetch_pipeline(source: &mut dyn FileSource, variant: Option<&str>) -> Result<(), String> {
    let index_path = fetch_listed(source, "model_index.json")?;
    let index = read_index(&index_path)?;
    for component in TOKENIZERS.iter().chain(&MODELS).chain([&SCHEDULER]) {
        match index.get(*component) {
            Some(Value::Array(entry)) if entry.first().is_some_and(|lib| !lib.is_null()) => {}
            _ => {
                return Err(format!(
                    "model_index.json has no `{component}`: hypergen runs SDXL text-to-image pipelines \
                     (StableDiffusionXLPipeline: tokenizer, tokenizer_2, text_encoder, text_encoder_2, unet, vae, scheduler)"
                ))
            }
        }
    }
    fetch_listed(source, &format!("{SCHEDULER}/scheduler_config.json"))?;
    for tokenizer in TOKENIZERS {
        fetch_tokenizer(source, tokenizer)?;
    }
    for model in MODELS {
        fetch_listed(source, &format!("{model}/config.json"))?;
        // The stems the loader reads: transformers' for the text encoders.
        let stem = if model.starts_with("text_encoder") {
            "model"
        } else {
            "diffusion_pytorch_model"
        };
        fetch_weights(source, model, stem, variant)?;
    }
    Ok(())
}

/// Fetches a lone VAE: `config.json` and weights at the repository's root, or in `vae/`
/// when the repository is a whole pipeline. Returns the folder, relative to the root.
pub fn fetch_vae(
    source: &mut dyn FileSource,
    variant: Option<&str>,
) -> Result<&'static str, String> {
    let folder = if source.listing().contains("config.json") {
        ""
    } else {
        "vae"
    };
    let config = if folder.is_empty() {
        "config.json".to_string()
    } else {
        format!("{folder}/config.json")
    };
    fetch_listed(source, &config)?;
    fetch_weights(source, folder, "diffusion_pytorch_model", variant)?;
    Ok(folder)
}

fn read_index(path: &Path) -> Result<serde_json::Map<String, Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err("model_index.json is not a JSON object".into()),
        Err(e) => Err(format!("model_index.json: {e}")),
    }
}

fn fetch_tokenizer(source: &mut dyn FileSource, dir: &str) -> Result<(), String> {
    let has = |source: &dyn FileSource, f: &str| source.listing().contains(&format!("{dir}/{f}"));
    let bpe = has(source, "vocab.json") && has(source, "merges.txt");
    if !bpe && !has(source, "tokenizer.json") {
        return Err(format!(
            "the repository has no `{dir}/vocab.json` and `{dir}/merges.txt` (nor `{dir}/tokenizer.json`)"
        ));
    }
    let mut files: Vec<&str> = TOKENIZER_FILES.to_vec();
    if !bpe {
        files.push("tokenizer.json");
    }
    for f in files {
        if has(source, f) {
            source.fetch(&format!("{dir}/{f}"))?;
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// Fetches one component's weights, choosing as `loader::weight_files` does: with a
/// variant, `STEM.VARIANT.safetensors` or its sharded index first, then the plain
/// files. `stem` is `diffusion_pytorch_model` (diffusers) or `model` (transformers).
/// A sharded index brings its shards.
pub fn fetch_weights(
    source: &mut dyn FileSource,
    dir: &str,
    stem: &str,
    variant: Option<&str>,
) -> Result<(), String> {
    let prefix = if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    };
    let mut candidates = Vec::new();
    if let Some(v) = variant {
        candidates.push(format!("{prefix}{stem}.{v}.safetensors"));
        candidates.push(format!("{prefix}{stem}.safetensors.index.{v}.json"));
    }
    candidates.push(format!("{prefix}{stem}.safetensors"));
    candidates.push(format!("{prefix}{stem}.safetensors.index.json"));
    let Some(chosen) = candidates
        .iter()
        .find(|c| source.listing().contains(*c))
        .cloned()
    else {
        let pickle = source
            .listing()
            .iter()
            .any(|f| f.starts_with(&prefix) && f.ends_with(".bin"));
        let hint = if pickle {
            " (it has only PyTorch .bin weights; hypergen reads safetensors)"
        } else {
            ""
        };
        return Err(format!(
            "the repository has no safetensors weights for `{}`{hint}: looked for {}",
            if dir.is_empty() { "the model" } else { dir },
            candidates.join(", ")
        ));
    };
    let path = source.fetch(&chosen)?;
    if !chosen.ends_with(".json") {
        return Ok(());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let index: ShardIndex = serde_json::from_str(&text).map_err(|e| format!("{chosen}: {e}"))?;
    let shards: BTreeSet<&String> = index.weight_map.values().collect();
    for shard in shards {
        let shard = format!("{prefix}{shard}");
        if !source.listing().contains(&shard) {
            return Err(format!(
                "`{chosen}` names `{shard}`, which the repository does not have"
            ));
        }
        source.fetch(&shard)?;
    }
    Ok(())
}

/// Every file under `dir`, as `/`-separated paths relative to it (symlinks followed, as
/// the Hub cache's snapshot folders are made of them).
pub fn list_dir(dir: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if path.is_file() {
                if let Ok(rel) = path.strip_prefix(root) {
                    let parts: Vec<String> = rel
                        .components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect();
                    out.insert(parts.join("/"));
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listing whose files are fetched into a temporary folder as empty files, except
    /// for a few given contents.
    struct Fake {
        listing: BTreeSet<String>,
        contents: HashMap<String, String>,
        dir: tempfile::TempDir,
        fetched: Vec<String>,
    }

    impl Fake {
        fn new(files: &[&str], contents: &[(&str, &str)]) -> Self {
            Self {
                listing: files.iter().map(|s| s.to_string()).collect(),
                contents: contents
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                dir: tempfile::tempdir().expect("tempdir"),
                fetched: Vec::new(),
            }
        }
    }

    impl FileSource for Fake {
        fn listing(&self) -> &BTreeSet<String> {
            &self.listing
        }
        fn fetch(&mut self, file: &str) -> Result<PathBuf, String> {
            let path = self.dir.path().join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, self.contents.get(file).cloned().unwrap_or_default()).unwrap();
            self.fetched.push(file.to_string());
            Ok(path)
        }
    }

    const INDEX: &str = r#"{"_class_name": "StableDiffusionXLPipeline",
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": [null, null]}"#;

    fn sdxl_listing() -> Vec<&'static str> {
        vec![
            "model_index.json",
            "sd_xl_base_1.0.safetensors",
            "scheduler/scheduler_config.json",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "tokenizer/tokenizer_config.json",
            "tokenizer/special_tokens_map.json",
            "tokenizer_2/vocab.json",
            "tokenizer_2/merges.txt",
            "tokenizer_2/tokenizer_config.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "text_encoder/model.fp16.safetensors",
            "text_encoder/pytorch_model.bin",
            "text_encoder_2/config.json",
            "text_encoder_2/model.safetensors",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors.index.json",
            "vae/diffusion_pytorch_model-00001-of-00002.safetensors",
            "vae/diffusion_pytorch_model-00002-of-00002.safetensors",
        ]
    }

    const VAE_INDEX: &str = r#"{"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
        "b": "diffusion_pytorch_model-00002-of-00002.safetensors",
        "c": "diffusion_pytorch_model-00001-of-00002.safetensors"}}"#;

    #[test]
    fn picks_one_weight_set_per_component_preferring_the_variant() {
        let mut src = Fake::new(
            &sdxl_listing(),
            &[
                ("model_index.json", INDEX),
                (
                    "vae/diffusion_pytorch_model.safetensors.index.json",
                    VAE_INDEX,
                ),
            ],
        );
        fetch_pipeline(&mut src, Some("fp16")).expect("plan");
        let fetched: BTreeSet<&str> = src.fetched.iter().map(String::as_str).collect();
        for want in [
            "text_encoder/model.fp16.safetensors",
            "text_encoder_2/model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model-00001-of-00002.safetensors",
            "vae/diffusion_pytorch_model-00002-of-00002.safetensors",
            "tokenizer_2/merges.txt",
        ] {
            assert!(fetched.contains(want), "{want} not fetched: {fetched:?}");
        }
        for skip in [
            "sd_xl_base_1.0.safetensors",
            "text_encoder/model.safetensors",
            "text_encoder/pytorch_model.bin",
            "unet/diffusion_pytorch_model.safetensors",
        ] {
            assert!(!fetched.contains(skip), "{skip} fetched");
        }
        assert_eq!(src.fetched.len(), fetched.len(), "a file was fetched twice");

        let mut src = Fake::new(
            &sdxl_listing(),
            &[
                ("model_index.json", INDEX),
                (
                    "vae/diffusion_pytorch_model.safetensors.index.json",
                    VAE_INDEX,
                ),
            ],
        );
        fetch_pipeline(&mut src, None).expect("plan");
        assert!(src
            .fetched
            .contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
        assert!(!src
            .fetched
            .contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
    }

    #[test]
    fn missing_files_are_named() {
        let without = |gone: &str| {
            let files: Vec<&str> = sdxl_listing().into_iter().filter(|f| *f != gone).collect();
            let mut src = Fake::new(
                &files,
                &[
                    ("model_index.json", INDEX),
                    (
                        "vae/diffusion_pytorch_model.safetensors.index.json",
                        VAE_INDEX,
                    ),
                ],
            );
            fetch_pipeline(&mut src, None).expect_err("should fail")
        };
        assert!(without("unet/config.json").contains("`unet/config.json`"));
        assert!(without("model_index.json").contains("model_index.json"));
        let shard = without("vae/diffusion_pytorch_model-00002-of-00002.safetensors");
        assert!(
            shard.contains("vae/diffusion_pytorch_model-00002-of-00002.safetensors"),
            "{shard}"
        );
        let te = without("text_encoder/model.safetensors");
        assert!(te.contains("text_encoder") && te.contains(".bin"), "{te}");
        let tok = without("tokenizer/vocab.json");
        assert!(tok.contains("tokenizer/vocab.json"), "{tok}");
    }

    #[test]
    fn refuses_pipelines_without_sdxl_components() {
        let refiner = r#"{"_class_name": "StableDiffusionXLImg2ImgPipeline",
            "text_encoder": [null, null], "unet": ["diffusers", "UNet2DConditionModel"]}"#;
        let mut src = Fake::new(&sdxl_listing(), &[("model_index.json", refiner)]);
        let err = fetch_pipeline(&mut src, None).expect_err("refiner refused");
        assert!(err.contains("tokenizer"), "{err}");
    }

    #[test]
    fn lone_vae_at_the_root() {
        let mut src = Fake::new(
            &[
                "config.json",
                "diffusion_pytorch_model.safetensors",
                "README.md",
            ],
            &[],
        );
        assert_eq!(fetch_vae(&mut src, Some("fp16")).expect("vae"), "");
        assert_eq!(
            src.fetched,
            vec!["config.json", "diffusion_pytorch_model.safetensors"]
        );
    }
}
