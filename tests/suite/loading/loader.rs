//! The loader's failures on broken copies of the fixture: each gives its clear error,
//! naming file and key or tensor, and never panics. And the sharded and fp16 paths.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::DType;
use hypergen::model::unet::UNet2DConditionModel;
use hypergen::Error;

use crate::common::{fixture_dir, Cpu};

const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// A temp copy of the fixture's `unet/` folder (config and full-precision weights).
fn unet_copy() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("unet");
    std::fs::create_dir(&dir).expect("mkdir");
    let src = fixture_dir().join("unet");
    for f in ["config.json", WEIGHTS] {
        std::fs::copy(src.join(f), dir.join(f)).expect("copy");
    }
    (tmp, dir)
}

fn load(dir: &Path, variant: Option<&str>) -> hypergen::Result<UNet2DConditionModel<Cpu>> {
    hypergen::load::folder::load_unet::<Cpu>(dir, variant, DType::F32, &Default::default())
        .map(|(m, _)| m)
}

/// All tensors of a safetensors file as (dtype, shape, bytes).
fn read_tensors(path: &Path) -> HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse");
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn write_tensors(
    path: &Path,
    tensors: &HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>,
) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (d, s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).expect("view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write");
}

#[test]
fn truncated_weights_name_the_file() {
    let (_tmp, dir) = unet_copy();
    let f = dir.join(WEIGHTS);
    let len = std::fs::metadata(&f).expect("meta").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .expect("open");
    file.set_len(len / 2).expect("truncate");
    let err = load(&dir, None).expect_err("truncated file must fail");
    assert!(matches!(err, Error::Safetensors { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(WEIGHTS) && msg.contains("truncated or corrupt"),
        "{msg}"
    );
}

#[test]
fn garbage_weights_name_the_file() {
    let (_tmp, dir) = unet_copy();
    std::fs::write(dir.join(WEIGHTS), b"definitely not safetensors").expect("write");
    let err = load(&dir, None).expect_err("corrupt file must fail");
    assert!(err.to_string().contains(WEIGHTS), "{err}");
}

#[test]
fn missing_config_key_names_file_and_key() {
    let (_tmp, dir) = unet_copy();
    let cfg = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).expect("read")).expect("json");
    json.as_object_mut()
        .expect("object")
        .remove("block_out_channels");
    std::fs::write(&cfg, json.to_string()).expect("write");
    let err = load(&dir, None).expect_err("missing key must fail");
    let msg = err.to_string();
    assert!(matches!(err, Error::Json { .. }), "{err:?}");
    assert!(
        msg.contains("config.json") && msg.contains("block_out_channels"),
        "{msg}"
    );
}

#[test]
fn wrong_shape_names_file_and_tensor() {
    let (_tmp, dir) = unet_copy();
    let cfg = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).expect("read")).expect("json");
    let cross = json["cross_attention_dim"]
        .as_u64()
        .expect("cross_attention_dim");
    json["cross_attention_dim"] = serde_json::json!(cross * 2);
    std::fs::write(&cfg, json.to_string()).expect("write");
    let err = load(&dir, None).expect_err("shape mismatch must fail");
    let msg = err.to_string();
    assert!(matches!(err, Error::Tensor { .. }), "{err:?}");
    assert!(
        msg.contains(WEIGHTS) && msg.contains("attn2.to_k.weight") && msg.contains("shape"),
        "{msg}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let (_tmp, dir) = unet_copy();
    let f = dir.join(WEIGHTS);
    let mut tensors = read_tensors(&f);
    tensors
        .remove("conv_out.bias")
        .expect("fixture has conv_out.bias");
    write_tensors(&f, &tensors);
    let err = load(&dir, None).expect_err("missing tensor must fail");
    assert!(matches!(err, Error::MissingTensors { .. }), "{err:?}");
    assert!(err.to_string().contains("conv_out.bias"), "{err}");
}

#[test]
fn unexpected_tensor_is_named() {
    let (_tmp, dir) = unet_copy();
    let f = dir.join(WEIGHTS);
    let mut tensors = read_tensors(&f);
    tensors.insert(
        "extra_head.weight".into(),
        (safetensors::Dtype::F32, vec![2], vec![0u8; 8]),
    );
    write_tensors(&f, &tensors);
    let err = load(&dir, None).expect_err("unused tensor must fail");
    assert!(matches!(err, Error::UnusedTensors { .. }), "{err:?}");
    assert!(err.to_string().contains("extra_head.weight"), "{err}");
}

#[test]
fn missing_weights_file_is_reported() {
    let (_tmp, dir) = unet_copy();
    std::fs::remove_file(dir.join(WEIGHTS)).expect("rm");
    let err = load(&dir, None).expect_err("no weights must fail");
    assert!(matches!(err, Error::MissingFile { .. }), "{err:?}");
    assert!(err.to_string().contains(WEIGHTS), "{err}");
}

/// Splits the weights into two shards with an index, as large hub repositories ship
/// them; the sharded model must compute exactly what the single-file one does.
#[test]
fn sharded_weights_load_like_one_file() {
    let (_tmp, dir) = unet_copy();
    let f = dir.join(WEIGHTS);
    let tensors = read_tensors(&f);
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [
        ("diffusion_pytorch_model-00001-of-00002.safetensors", a),
        ("diffusion_pytorch_model-00002-of-00002.safetensors", b),
    ] {
        let sub: HashMap<_, _> = part
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].clone()))
            .collect();
        write_tensors(&dir.join(shard), &sub);
        for n in part.iter() {
            weight_map.insert((*n).clone(), serde_json::json!(shard));
        }
    }
    std::fs::remove_file(&f).expect("rm");
    std::fs::write(
        dir.join("diffusion_pytorch_model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .expect("index");
    let sharded = load(&dir, None).expect("sharded load");
    let single = load(&fixture_dir().join("unet"), None).expect("single load");
    let probe = |m: &UNet2DConditionModel<Cpu>| crate::common::values(m.conv_out.weight.val());
    assert_eq!(probe(&sharded), probe(&single));
    let probe = |m: &UNet2DConditionModel<Cpu>| {
        crate::common::values(m.down_blocks[0].resnets[0].conv1.weight.val())
    };
    assert_eq!(probe(&sharded), probe(&single));

    // A shard named by the index but absent is reported by name.
    std::fs::remove_file(dir.join("diffusion_pytorch_model-00002-of-00002.safetensors"))
        .expect("rm");
    let err = load(&dir, None).expect_err("missing shard must fail");
    assert!(err.to_string().contains("00002-of-00002"), "{err}");
}

/// The fp16 variant file is picked when asked for and loads with nothing missing or
/// unused; its values are the float32 weights rounded to half precision.
#[test]
fn fp16_variant_loads() {
    let dir = fixture_dir().join("unet");
    let half = load(&dir, Some("fp16")).expect("fp16 variant loads");
    let full = load(&dir, None).expect("full loads");
    let a = crate::common::values(half.conv_in.weight.val());
    let b = crate::common::values(full.conv_in.weight.val());
    assert_ne!(a, b, "the fp16 file must be the one read");
    let err = crate::common::rel_error(&a, &b);
    assert!(err < 1e-3, "fp16 weights differ by {err}");
}
