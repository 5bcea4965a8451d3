//! Property-based fuzzing of the LoRA key parsers (`split_key`, `normalize_layer`,
//! `classify`) and of [`LoraAdapter::read`] on files whose keys, shapes and dtypes are
//! anything: an adapter or an error naming the file, never a panic.

use proptest::prelude::*;

use super::{classify, normalize_layer, split_key, LoraAdapter, Role};
use crate::load::properties::{config, scratch_file, zero_safetensors};

/// Key prefixes every supported format uses, and near misses.
const PREFIXES: &[&str] = &[
    "lora_unet_",
    "lora_te1_",
    "lora_te2_",
    "lora_te_",
    "unet.",
    "text_encoder.",
    "text_encoder_2.",
    "base_model.model.unet.",
    "base_model.model.",
    "down_blocks.",
    "mid_block.",
    "up_blocks.",
    "conv_in",
    "lora_",
    "",
];

/// Key suffixes every supported format uses, and near misses.
const SUFFIXES: &[&str] = &[
    ".lora_down.weight",
    ".lora_up.weight",
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora.down.weight",
    ".lora.up.weight",
    ".lora_linear_layer.down.weight",
    ".lora_linear_layer.up.weight",
    ".alpha",
    ".processor.to_q_lora.down.weight",
    ".processor.to_out_lora.up.weight",
    ".weight",
    ".lora_down",
    "",
];

/// A key: prefix, middle and suffix from the formats' vocabulary or anything.
fn key() -> impl Strategy<Value = String> {
    let middle = prop_oneof![
        prop::sample::select(vec![
            "input_blocks_4_1_proj_in",
            "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1",
            "text_model.encoder.layers.0.self_attn.q_proj",
            "mid_block.resnets.0.conv1",
            "",
            ".",
            "..",
        ])
        .prop_map(str::to_string),
        "\\PC{0,24}",
    ];
    (
        prop::sample::select(PREFIXES),
        middle,
        prop::sample::select(SUFFIXES),
    )
        .prop_map(|(p, m, s)| format!("{p}{m}{s}"))
}

/// One tensor of a LoRA file: a dtype and a small shape.
fn tensor() -> impl Strategy<Value = (&'static str, Vec<usize>)> {
    (
        prop::sample::select(vec!["F32", "F16", "BF16", "F64", "I32", "U8", "BOOL"]),
        prop::collection::vec(0usize..5, 0..5),
    )
}

proptest! {
    #![proptest_config(config())]

    /// Any key: split, normalised and classified without a panic; a split key's layer
    /// is the key without its suffix (after normalisation).
    #[test]
    fn lora_keys_never_panic(key in prop_oneof![key(), "\\PC{0,40}"]) {
        if let Some((layer, role)) = split_key(&key) {
            prop_assert!(layer.len() <= key.len(), "{key} → {layer}");
            if role == Role::Alpha {
                prop_assert!(key.ends_with(".alpha"));
            }
            let _ = classify(&layer);
        }
        let _ = normalize_layer(&key);
        let _ = classify(&key);
    }

    /// Any LoRA file of well-formed safetensors: an adapter whose layers all have both
    /// tensors, or an error naming the file.
    #[test]
    fn lora_files_never_panic(tensors in prop::collection::btree_map(key(), tensor(), 0..6)) {
        let tensors: Vec<_> = tensors.into_iter().collect();
        let path = scratch_file("lora.safetensors", &zero_safetensors(
                tensors.iter().map(|(name, (dtype, shape))| (name.as_str(), *dtype, &shape[..])),
            ));
        match LoraAdapter::read(&path) {
            Ok(adapter) => {
                prop_assert!(!adapter.layers().is_empty());
                for layer in adapter.layers() {
                    let _ = (layer.rank(), layer.alpha_factor());
                }
            }
            Err(e) => prop_assert!(e.to_string().contains("lora.safetensors"), "{e}"),
        }
    }

    /// Any bytes as a LoRA file: an error naming the file, never a panic.
    #[test]
    fn lora_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
        let path = scratch_file("bytes.safetensors", &bytes);
        let read = LoraAdapter::read(&path);
        prop_assert!(read.is_err());
    }
}
