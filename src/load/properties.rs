//! Property-based fuzzing of what the loaders parse from files: safetensors headers
//! (through [`inspect_safetensors`], which every folder load runs first) and the SGM
//! names single-file checkpoints and kohya LoRAs use. Every input must give a value or
//! an error, never a panic. (The LoRA key parsers have theirs in `lora_properties.rs`.)

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::folder::inspect_safetensors;
use super::sgm::{vae_sgm_name_for, UnetLayout};

/// Cases per property (the issue asks for at least 10,000).
pub(crate) const CASES: u32 = 10_000;

/// The proptest settings of every fuzz test: [`CASES`] cases, no regression files
/// written into the source tree (a failure prints its minimal input).
pub(crate) fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// safetensors' dtype names, and some that are not.
const DTYPES: &[&str] = &[
    "F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
    "F8_E4M3", "F8_E5M2", "F4", "E8M0", "f32", "", "X",
];

/// Sizes that stress arithmetic: zero, small, the edges of u32/u64.
fn dim() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0u64..5,
        1 => Just(u32::MAX as u64),
        1 => Just(u64::MAX),
        1 => Just(u64::MAX / 2 + 1),
        1 => any::<u64>(),
    ]
}

/// One header entry: a dtype, a shape and data offsets, each consistent or not.
fn entry() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(DTYPES),
        prop::collection::vec(dim(), 0..5),
        dim(),
        dim(),
        any::<bool>(),
    )
        .prop_map(|(dtype, shape, a, b, as_string)| {
            if as_string {
                // Wrong JSON types where numbers belong.
                json!({"dtype": dtype, "shape": format!("{shape:?}"), "data_offsets": [a.to_string(), b]})
            } else {
                json!({"dtype": dtype, "shape": shape, "data_offsets": [a, b]})
            }
        })
}

/// A whole file: a header of entries (or a JSON value of another shape), its 8-byte
/// length prefix (right, or anything), then a data section.
fn safetensors_file() -> impl Strategy<Value = Vec<u8>> {
    let header = prop_oneof![
        4 => prop::collection::btree_map("[a-z_.0-9]{0,12}", entry(), 0..4).prop_map(|m| {
            Value::Object(m.into_iter().collect::<Map<String, Value>>()).to_string()
        }),
        1 => prop::collection::btree_map("[a-z_]{0,8}", "\\PC{0,8}", 0..3).prop_map(|m| {
            json!({"__metadata__": m, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
                .to_string()
        }),
        1 => "\\PC{0,64}",
        1 => Just("[1, 2, 3]".to_string()),
    ];
    (
        header,
        prop_oneof![3 => Just(None), 1 => dim().prop_map(Some)],
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(header, len, data)| {
            let len = len.unwrap_or(header.len() as u64);
            let mut out = len.to_le_bytes().to_vec();
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(&data);
            out
        })
}

/// A consistent file of F32 tensors, so that parsing reaches the listing, with the
/// names and shapes it holds.
#[allow(clippy::type_complexity)]
fn valid_file() -> impl Strategy<Value = (Vec<u8>, Vec<(String, Vec<usize>)>)> {
    prop::collection::btree_map("\\PC{0,16}", prop::collection::vec(0usize..4, 0..4), 0..5)
        .prop_map(|tensors| {
            let tensors: Vec<(String, Vec<usize>)> = tensors.into_iter().collect();
            (f32_file(&tensors), tensors)
        })
}

/// A safetensors file of zero-filled F32 tensors with these names and shapes.
pub(crate) fn f32_file(tensors: &[(String, Vec<usize>)]) -> Vec<u8> {
    zero_safetensors(
        tensors
            .iter()
            .map(|(name, shape)| (name.as_str(), "F32", &shape[..])),
    )
}

/// A well-formed safetensors file of zero-filled tensors `(name, dtype, shape)`; dtypes
/// other than F64, F32, I32, F16 and BF16 take one byte per element.
pub(crate) fn zero_safetensors<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a str, &'a [usize])>,
) -> Vec<u8> {
    let mut header = Map::new();
    let mut offset = 0usize;
    for (name, dtype, shape) in tensors {
        let size = match dtype {
            "F64" => 8,
            "F32" | "I32" => 4,
            "F16" | "BF16" => 2,
            _ => 1,
        };
        let bytes = size * shape.iter().product::<usize>();
        header.insert(
            name.to_string(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let header = Value::Object(header).to_string();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.resize(out.len() + offset, 0);
    out
}

/// Writes `bytes` to the file `name` in a scratch folder shared by the fuzz tests (each
/// test its own name, every case overwriting it) and returns its path.
pub(crate) fn scratch_file(name: &str, bytes: &[u8]) -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("scratch folder"));
    let path = dir.path().join(name);
    let mut f = std::fs::File::create(&path).expect("create fuzz file");
    f.write_all(bytes).expect("write fuzz file");
    path
}

/// Path segments diffusers' UNet and VAE names are made of, numbers at the edges, and
/// anything else.
fn segment() -> impl Strategy<Value = String> {
    let names = prop::sample::select(vec![
        "conv_in",
        "conv_out",
        "conv_norm_out",
        "time_embedding",
        "add_embedding",
        "linear_1",
        "linear_2",
        "down_blocks",
        "mid_block",
        "up_blocks",
        "resnets",
        "attentions",
        "downsamplers",
        "upsamplers",
        "conv",
        "norm1",
        "conv1",
        "norm2",
        "conv2",
        "time_emb_proj",
        "conv_shortcut",
        "encoder",
        "decoder",
        "group_norm",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "weight",
        "",
    ]);
    prop_oneof![
        5 => names.prop_map(str::to_string),
        3 => (0usize..6).prop_map(|n| n.to_string()),
        1 => prop::sample::select(vec![
            usize::MAX.to_string(),
            (usize::MAX - 1).to_string(),
            "18446744073709551616".to_string(),
            "-1".to_string(),
        ]),
        1 => "\\PC{0,6}",
    ]
}

/// A number as a path segment: small, or at the edges of `usize`.
fn index() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (0usize..6).prop_map(|n| n.to_string()),
        1 => prop::sample::select(vec![usize::MAX, usize::MAX - 1, usize::MAX / 2 + 1])
            .prop_map(|n| n.to_string()),
    ]
}

/// Paths in the shape of diffusers' UNet and VAE paths (`ROOT.I.KIND.J.TAIL…`, VAE ones
/// under `encoder.`/`decoder.`), and any sequence of segments.
fn dotted_path() -> impl Strategy<Value = String> {
    let root = prop::sample::select(vec![
        "down_blocks",
        "mid_block",
        "up_blocks",
        "time_embedding",
        "add_embedding",
        "conv_in",
    ]);
    let kind = prop::sample::select(vec!["resnets", "attentions", "downsamplers", "upsamplers"]);
    let shaped = (
        prop::option::of(prop::sample::select(vec!["encoder", "decoder"])),
        root,
        index(),
        kind,
        index(),
        prop::collection::vec(segment(), 0..3),
    )
        .prop_map(|(coder, root, i, kind, j, tail)| {
            let mut parts: Vec<String> = coder.into_iter().map(str::to_string).collect();
            parts.extend([root.to_string(), i, kind.to_string(), j]);
            parts.extend(tail);
            parts.join(".")
        });
    prop_oneof![
        3 => shaped,
        1 => prop::collection::vec(segment(), 0..8).prop_map(|s| s.join(".")),
    ]
}

fn unet_layout() -> impl Strategy<Value = UnetLayout> {
    (
        prop::collection::vec((0usize..4, any::<bool>()), 0..5),
        prop::collection::vec((0usize..4, any::<bool>(), any::<bool>()), 0..5),
    )
        .prop_map(|(down, up)| UnetLayout { down, up })
}

proptest! {
    #![proptest_config(config())]

    /// Any file: a tensor list or an error naming the file, never a panic.
    #[test]
    fn safetensors_header_never_panics(bytes in safetensors_file()) {
        let path = scratch_file("any.safetensors", &bytes);
        if let Err(e) = inspect_safetensors(&path) {
            prop_assert!(e.to_string().contains("any.safetensors"), "{e}");
        }
    }

    /// A consistent file lists exactly its tensors.
    #[test]
    fn safetensors_header_lists_valid_files((bytes, tensors) in valid_file()) {
        let path = scratch_file("valid.safetensors", &bytes);
        let listed = inspect_safetensors(&path);
        prop_assert_eq!(listed.ok(), Some(tensors));
    }

    /// Any path on any layout: a name or none, never a panic; names are SGM's.
    #[test]
    fn sgm_unet_names_never_panic(layout in unet_layout(), path in dotted_path()) {
        if let Some(name) = layout.sgm_name(&path) {
            let roots = ["input_blocks.", "middle_block.", "output_blocks.", "out.", "time_embed.", "label_emb."];
            prop_assert!(roots.iter().any(|r| name.starts_with(r)), "{path} → {name}");
        }
    }

    /// Any path for any number of VAE up blocks: a name or none, never a panic.
    #[test]
    fn sgm_vae_names_never_panic(n_up in prop_oneof![0usize..6, Just(usize::MAX)], path in dotted_path()) {
        let _ = vae_sgm_name_for(n_up, &path);
    }
}
