//! LoRA adapters merged into a loaded model's weights, as diffusers does:
//! `W' = W + scale · (alpha / rank) · up · down` for every layer of the adapter, computed
//! in float32 and stored in the model's dtype; several adapters add up.
//!
//! Formats: kohya / sd-scripts (`lora_unet_…`, `lora_te1_…`, `lora_te2_…` with
//! `.lora_down.weight`, `.lora_up.weight` and an optional `.alpha`; UNet names in the
//! original SGM numbering `input_blocks_4_1_…` or diffusers' `down_blocks_1_…`), and
//! diffusers / PEFT (`unet.…lora_A.weight` / `lora_B.weight`, the older
//! `….lora.down.weight` / `.lora_linear_layer.…` / `processor.to_q_lora.…` names), on
//! linear layers and (LoCon) convolutions, whose `down` may be a 1×1 or a k×k kernel.
//! A LoRA is a `.safetensors` file or a folder holding `pytorch_lora_weights.safetensors`;
//! pickled files (`.bin`, `.ckpt`, `.pt`) are refused, never opened.
//!
//! [`apply_loras`] keeps the base tensors it replaces in [`LoraState`], so that
//! [`remove_loras`] restores them bit for bit (nothing is subtracted).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};

use crate::error::{Error, Result};
use crate::kernels::plain;
use crate::load::params::{list_params, read_params, write_params, LayerKind, ParamInfo};
use crate::load::sgm::UnetLayout;
use crate::pipeline::SdxlComponents;
use crate::FusedOps;

pub use crate::pipeline::lora::{
    same_loras, LoraAdapter, LoraLayer, LoraPart, LoraSpec, LoraState,
};
use crate::pipeline::lora::{HostTensor, Target};

/// The file a LoRA folder holds (diffusers' `save_lora_weights` name).
pub const LORA_FOLDER_FILE: &str = "pytorch_lora_weights.safetensors";

/// How many offending names an error lists before saying how many more there are.
const LIST_MAX: usize = 5;

#[cfg(test)]
#[path = "lora_properties.rs"]
mod properties;

/// The weight file of a LoRA named by `path`: the file itself, or
/// `pytorch_lora_weights.safetensors` in a folder. Pickled formats are refused here,
/// before anything is opened.
pub fn lora_file(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        let file = path.join(LORA_FOLDER_FILE);
        if !file.is_file() {
            return Err(Error::MissingFile {
                path: file,
                what: "LoRA weights (a LoRA folder holds pytorch_lora_weights.safetensors)".into(),
            });
        }
        return Ok(file);
    }
    if let Some(ext) = crate::load::source::pickled_extension(path) {
        return Err(Error::Lora {
            path: path.to_path_buf(),
            message: format!(
                "`.{ext}` files are Python pickles, which can run code when loaded; hypergen \
                 reads LoRAs only as .safetensors (convert it with `safetensors.torch.save_file`)"
            ),
        });
    }
    if !path.is_file() {
        return Err(Error::MissingFile {
            path: path.to_path_buf(),
            what: "LoRA adapter".into(),
        });
    }
    Ok(path.to_path_buf())
}

/// Which tensor of a pair a key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Down,
    Up,
    Alpha,
}

/// Splits a key into its layer name and role, for every naming hypergen reads.
fn split_key(key: &str) -> Option<(String, Role)> {
    const SUFFIXES: &[(&str, Role)] = &[
        (".lora_down.weight", Role::Down),
        (".lora_up.weight", Role::Up),
        (".lora_A.weight", Role::Down),
        (".lora_B.weight", Role::Up),
        (".lora.down.weight", Role::Down),
        (".lora.up.weight", Role::Up),
        (".lora_linear_layer.down.weight", Role::Down),
        (".lora_linear_layer.up.weight", Role::Up),
        (".alpha", Role::Alpha),
    ];
    for (suffix, role) in SUFFIXES {
        if let Some(layer) = key.strip_suffix(suffix) {
            return Some((normalize_layer(layer), *role));
        }
    }
    None
}

/// Old diffusers attention-processor names (`attn1.processor.to_q_lora`) to module
/// paths (`attn1.to_q`), and PEFT's `base_model.model.` prefix away.
fn normalize_layer(layer: &str) -> String {
    let layer = layer.replace("base_model.model.", "");
    for (old, new) in [
        (".processor.to_q_lora", ".to_q"),
        (".processor.to_k_lora", ".to_k"),
        (".processor.to_v_lora", ".to_v"),
        (".processor.to_out_lora", ".to_out.0"),
    ] {
        if let Some(head) = layer.strip_suffix(old) {
            return format!("{head}{new}");
        }
    }
    layer
}

/// The part and target of a layer name; `None` for names no format uses.
fn classify(layer: &str) -> Option<(LoraPart, Target)> {
    const FLAT: &[(&str, LoraPart)] = &[
        ("lora_unet_", LoraPart::Unet),
        ("lora_te1_", LoraPart::TextEncoder),
        ("lora_te2_", LoraPart::TextEncoder2),
        ("lora_te_", LoraPart::TextEncoder),
    ];
    for (prefix, part) in FLAT {
        if let Some(rest) = layer.strip_prefix(prefix) {
            return Some((*part, Target::Flat(rest.to_string())));
        }
    }
    const DOTTED: &[(&str, LoraPart)] = &[
        ("unet.", LoraPart::Unet),
        ("text_encoder.", LoraPart::TextEncoder),
        ("text_encoder_2.", LoraPart::TextEncoder2),
    ];
    for (prefix, part) in DOTTED {
        if let Some(rest) = layer.strip_prefix(prefix) {
            return Some((*part, Target::Path(rest.to_string())));
        }
    }
    // The oldest diffusers files name UNet layers without a prefix.
    let unet_roots = [
        "down_blocks.",
        "mid_block.",
        "up_blocks.",
        "conv_in",
        "conv_out",
    ];
    if unet_roots.iter().any(|r| layer.starts_with(r)) {
        return Some((LoraPart::Unet, Target::Path(layer.to_string())));
    }
    None
}

/// `names` as `a, b, c (and N more)`.
fn list_some(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(LIST_MAX)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > LIST_MAX {
        s.push_str(&format!(" (and {} more)", names.len() - LIST_MAX));
    }
    s
}

pub(crate) fn to_f32(
    path: &Path,
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
) -> Result<Vec<f32>> {
    let bytes = view.data();
    Ok(match view.dtype() {
        safetensors::Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        safetensors::Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        safetensors::Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        other => {
            return Err(Error::Lora {
                path: path.to_path_buf(),
                message: format!("tensor `{name}` has dtype {other:?}; LoRA tensors are floats"),
            })
        }
    })
}

#[derive(Default)]
struct Pair {
    down: Option<HostTensor>,
    up: Option<HostTensor>,
    alpha: Option<f32>,
}

impl LoraAdapter {
    /// Reads the LoRA at `path` (see [`lora_file`]), named by its path.
    pub fn read(path: &Path) -> Result<Self> {
        let file = lora_file(path)?;
        let f = std::fs::File::open(&file).map_err(|e| Error::io(&file, e))?;
        // SAFETY: read-only map, dropped at the end of this function; see
        // `folder::inspect_safetensors` for the shared contract.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(&file, e))?;
        let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| Error::Lora {
            path: file.clone(),
            message: format!("not a safetensors file: {e}"),
        })?;
        let mut pairs: BTreeMap<String, Pair> = BTreeMap::new();
        let mut foreign: Vec<String> = Vec::new();
        for (name, view) in st.tensors() {
            let Some((layer, role)) = split_key(&name) else {
                foreign.push(name);
                continue;
            };
            let data = to_f32(&file, &name, &view)?;
            let pair = pairs.entry(layer).or_default();
            match role {
                Role::Alpha => pair.alpha = data.first().copied(),
                Role::Down | Role::Up => {
                    let t = HostTensor {
                        shape: view.shape().to_vec(),
                        data,
                    };
                    if role == Role::Down {
                        pair.down = Some(t);
                    } else {
                        pair.up = Some(t);
                    }
                }
            }
        }
        foreign.sort();
        let has_pairs = pairs.values().any(|p| p.down.is_some() || p.up.is_some());
        if !has_pairs {
            return Err(Error::Lora {
                path: file,
                message: format!(
                    "not a LoRA: no `lora_down`/`lora_up` or `lora_A`/`lora_B` tensors (it holds {})",
                    if foreign.is_empty() {
                        "no tensors".to_string()
                    } else {
                        list_some(&foreign)
                    }
                ),
            });
        }
        if !foreign.is_empty() {
            return Err(Error::Lora {
                path: file,
                message: format!(
                    "{} tensor(s) are not LoRA weights hypergen can merge (LyCORIS, DoRA or \
                     full-weight layers are not supported): {}",
                    foreign.len(),
                    list_some(&foreign)
                ),
            });
        }
        let mut layers = Vec::with_capacity(pairs.len());
        let mut unknown = Vec::new();
        for (key, pair) in pairs {
            let (Some(down), Some(up)) = (pair.down, pair.up) else {
                return Err(Error::Lora {
                    path: file,
                    message: format!("layer `{key}` lacks its down or up tensor"),
                });
            };
            let Some((part, target)) = classify(&key) else {
                unknown.push(key);
                continue;
            };
            layers.push(LoraLayer {
                part,
                key,
                target,
                down,
                up,
                alpha: pair.alpha,
            });
        }
        if !unknown.is_empty() {
            return Err(Error::LoraUnmatched {
                path: file,
                count: unknown.len(),
                keys: list_some(&unknown),
            });
        }
        Ok(Self {
            name: path.display().to_string(),
            path: file,
            layers,
        })
    }
}

/// A model part's merge targets: module path → weight info, and kohya's flat names.
struct PartTargets {
    weights: BTreeMap<String, ParamInfo>,
    flat: HashMap<String, String>,
}

impl PartTargets {
    fn new(params: BTreeMap<String, ParamInfo>, sgm: Option<&UnetLayout>) -> Self {
        let mut weights = BTreeMap::new();
        let mut flat = HashMap::new();
        for (path, info) in params {
            if info.kind == LayerKind::Other {
                continue;
            }
            let Some(module) = path.strip_suffix(".weight") else {
                continue;
            };
            flat.insert(module.replace('.', "_"), module.to_string());
            if let Some(name) = sgm.and_then(|l| l.sgm_name(module)) {
                flat.insert(name.replace('.', "_"), module.to_string());
            }
            weights.insert(module.to_string(), info);
        }
        Self { weights, flat }
    }

    /// The module path a layer changes, when the model has it.
    fn resolve(&self, target: &Target) -> Option<(&String, &ParamInfo)> {
        let module = match target {
            Target::Flat(name) => self.flat.get(name)?.clone(),
            Target::Path(p) => {
                if self.weights.contains_key(p) {
                    p.clone()
                } else {
                    // Text encoders saved by transformers 5 drop `text_model.`.
                    format!("text_model.{p}")
                }
            }
        };
        self.weights.get_key_value(&module)
    }
}

/// A part's merges: weight path → its shape and what adds to it.
type PartPlan<'a> = BTreeMap<String, (ParamInfo, Vec<Contribution<'a>>)>;

/// One merge: which layer of which adapter, with its total factor.
struct Contribution<'a> {
    layer: &'a LoraLayer,
    factor: f32,
}

fn part_targets<B: FusedOps>(c: &SdxlComponents<B>, part: LoraPart) -> PartTargets {
    match part {
        LoraPart::TextEncoder => PartTargets::new(list_params(&c.text_encoder), None),
        LoraPart::TextEncoder2 => PartTargets::new(list_params(&c.text_encoder_2), None),
        LoraPart::Unet => PartTargets::new(list_params(&c.unet), Some(&UnetLayout::of(&c.unet))),
    }
}

/// Checks that `layer` fits the weight `module` of shape `info` (Burn's layout): `up` is
/// `[out, rank(, 1, 1)]` and `down` is `[rank, in, …]` with the layer's fan-in.
fn check_fit(
    adapter: &LoraAdapter,
    layer: &LoraLayer,
    module: &str,
    info: &ParamInfo,
) -> Result<()> {
    let torch_shape: Vec<usize> = match info.kind {
        LayerKind::Linear => info.shape.iter().rev().copied().collect(),
        _ => info.shape.clone(),
    };
    let out = torch_shape.first().copied().unwrap_or(0);
    let fan_in: usize = torch_shape.iter().skip(1).product();
    let in_ch = torch_shape.get(1).copied().unwrap_or(0);
    let rank = layer.rank();
    let up_ok = layer.up.shape.len() >= 2
        && layer.up.shape[0] == out
        && layer.up.shape[1] == rank
        && layer.up.shape.iter().skip(2).all(|&d| d == 1);
    let down_fan: usize = layer.down.shape.iter().skip(1).product();
    let down_ok = layer.down.shape.len() >= 2
        && layer.down.shape[1] == in_ch
        && down_fan == fan_in
        && rank > 0;
    if up_ok && down_ok {
        return Ok(());
    }
    Err(Error::LoraShape {
        path: PathBuf::from(&adapter.name),
        layer: format!("{}.{module}", layer.part.name()),
        message: format!(
            "`{}`: down {:?} and up {:?} do not fit the layer's weight {:?} ([out, in, …])",
            layer.key, layer.down.shape, layer.up.shape, torch_shape
        ),
    })
}

/// Makes the adapters merged into the model's weights exactly `wanted` (each at its
/// scale), in place of any merged before: nothing to do when the model holds these
/// very adapters at these scales already ([`same_loras`]); an empty list restores the
/// base weights ([`remove_loras`]); otherwise the base weights are restored and
/// `wanted` merged. Everything is checked before anything changes: on an error (a
/// layer the model lacks, a shape that does not fit) the model is left as it was.
pub fn apply_loras<B: FusedOps>(
    components: &mut SdxlComponents<B>,
    wanted: &[LoraSpec<Arc<LoraAdapter>>],
) -> Result<()> {
    if same_loras(components.loras.active(), wanted) {
        return Ok(());
    }
    if wanted.is_empty() {
        remove_loras(components);
        return Ok(());
    }
    let start = Instant::now();
    // Plan: every contribution to every weight, checked against the model.
    let mut plan: BTreeMap<LoraPart, PartPlan<'_>> = BTreeMap::new();
    let mut targets: BTreeMap<LoraPart, PartTargets> = BTreeMap::new();
    for spec in wanted {
        let (adapter, scale) = (&*spec.source, spec.scale);
        if !scale.is_finite() {
            return Err(Error::invalid(
                "lora_scale",
                format!("{scale} is not a finite number"),
            ));
        }
        let mut unmatched = Vec::new();
        for layer in &adapter.layers {
            let t = targets
                .entry(layer.part)
                .or_insert_with(|| part_targets(components, layer.part));
            let Some((module, info)) = t.resolve(&layer.target) else {
                unmatched.push(layer.key.clone());
                continue;
            };
            check_fit(adapter, layer, module, info)?;
            plan.entry(layer.part)
                .or_default()
                .entry(format!("{module}.weight"))
                .or_insert_with(|| (info.clone(), Vec::new()))
                .1
                .push(Contribution {
                    layer,
                    factor: scale * layer.alpha_factor(),
                });
        }
        if !unmatched.is_empty() {
            return Err(Error::LoraUnmatched {
                path: PathBuf::from(&adapter.name),
                count: unmatched.len(),
                keys: list_some(&unmatched),
            });
        }
    }
    remove_loras(components);
    for (part, weights) in plan {
        // Text encoders may hold their linear weights in panel order: so do the deltas.
        let panels = match part {
            LoraPart::TextEncoder => components.text_encoder.panels(),
            LoraPart::TextEncoder2 => components.text_encoder_2.panels(),
            LoraPart::Unet => false,
        };
        let paths: Vec<String> = weights.keys().cloned().collect();
        let originals = match part {
            LoraPart::TextEncoder => read_params(&components.text_encoder, &paths),
            LoraPart::TextEncoder2 => read_params(&components.text_encoder_2, &paths),
            LoraPart::Unet => read_params(&components.unet, &paths),
        };
        let mut merged = HashMap::with_capacity(weights.len());
        for (path, (info, contributions)) in &weights {
            let Some(base) = originals.get(path) else {
                continue;
            };
            let value = match info.shape.len() {
                2 => merge_weight::<B, 2>(base.clone(), info, contributions, panels),
                4 => merge_weight::<B, 4>(base.clone(), info, contributions, false),
                n => {
                    return Err(Error::Backend(format!(
                        "{}.{path}: a rank-{n} weight cannot take a LoRA",
                        part.name()
                    )))
                }
            };
            merged.insert(path.clone(), value);
        }
        match part {
            LoraPart::TextEncoder => {
                components.text_encoder = write_params(components.text_encoder.clone(), merged).0
            }
            LoraPart::TextEncoder2 => {
                components.text_encoder_2 =
                    write_params(components.text_encoder_2.clone(), merged).0
            }
            LoraPart::Unet => components.unet = write_params(components.unet.clone(), merged).0,
        }
        components.loras.originals.insert(part, originals);
    }
    components.loras.active = wanted.to_vec();
    tracing::info!(
        adapters = ?names(wanted),
        tensors = components.loras.replaced_tensors(),
        seconds = start.elapsed().as_secs_f64(),
        "merged LoRA adapters"
    );
    Ok(())
}

/// `W + Σ factor · up · down` in float32, back in `W`'s dtype, in Burn's layout (linear
/// weights in panel order when `panels`: [`crate::model::linear::Linear::into_panels`]).
fn merge_weight<B: FusedOps, const D: usize>(
    base: TensorPrimitive<B>,
    info: &ParamInfo,
    contributions: &[Contribution<'_>],
    panels: bool,
) -> TensorPrimitive<B> {
    let w: Tensor<B, D> = Tensor::from_primitive(base);
    let device = w.device();
    let dtype = w.dtype();
    let mut acc = w.cast(DType::F32);
    for c in contributions {
        let rank = c.layer.rank();
        let out = c.layer.up.shape[0];
        let fan: usize = c.layer.down.shape.iter().skip(1).product();
        // The factor goes on the small matrix, not on the product.
        let up = Tensor::<B, 2>::from_data(
            TensorData::new(c.layer.up.data.clone(), [out, rank]),
            &device,
        )
        .cast(DType::F32)
        .mul_scalar(c.factor);
        let down = Tensor::<B, 2>::from_data(
            TensorData::new(c.layer.down.data.clone(), [rank, fan]),
            &device,
        )
        .cast(DType::F32);
        let delta: Tensor<B, D> = match info.kind {
            // Burn stores linear weights as [in, out]: (up·down)ᵀ = downᵀ·upᵀ, so the
            // product comes out in that layout without transposing the large matrix.
            LayerKind::Linear => {
                let delta: Tensor<B, 2> = down.transpose().matmul(up.transpose());
                let delta = if panels {
                    plain::to_panels(delta)
                } else {
                    delta
                };
                delta.reshape(acc.shape())
            }
            // [out, in·kh·kw] in PyTorch's layout, which convolutions share.
            _ => up.matmul(down).reshape(acc.shape()),
        };
        acc = acc + delta;
    }
    acc.cast(dtype).into_primitive()
}

/// Restores the base weights that [`apply_loras`] replaced (the very tensors, so the
/// model equals its loaded state bit for bit) and forgets the adapters.
pub fn remove_loras<B: FusedOps>(components: &mut SdxlComponents<B>) {
    let originals = std::mem::take(&mut components.loras.originals);
    for (part, values) in originals {
        match part {
            LoraPart::TextEncoder => {
                components.text_encoder = write_params(components.text_encoder.clone(), values).0
            }
            LoraPart::TextEncoder2 => {
                components.text_encoder_2 =
                    write_params(components.text_encoder_2.clone(), values).0
            }
            LoraPart::Unet => components.unet = write_params(components.unet.clone(), values).0,
        }
    }
    if !components.loras.active.is_empty() {
        tracing::info!(adapters = ?names(&components.loras.active), "removed LoRA adapters");
    }
    components.loras.active.clear();
}

/// Whether two modules' float parameters are equal bit for bit, path by path (to check
/// that [`remove_loras`] gave the loaded weights back).
pub fn same_weights<B: FusedOps, M: Module<B>>(a: &M, b: &M) -> bool {
    use burn_store::ModuleSnapshot;
    let sa = a.collect(None, None, true);
    let sb = b.collect(None, None, true);
    sa.len() == sb.len()
        && sa.iter().zip(&sb).all(|(x, y)| {
            x.full_path() == y.full_path()
                && match (x.to_data(), y.to_data()) {
                    (Ok(dx), Ok(dy)) => dx.dtype == dy.dtype && dx.as_bytes() == dy.as_bytes(),
                    _ => false,
                }
        })
}

/// Adapters and scales for logs: `[("name", scale), …]`.
fn names(specs: &[LoraSpec<Arc<LoraAdapter>>]) -> Vec<(&str, f32)> {
    specs.iter().map(|s| (s.source.name(), s.scale)).collect()
}

/// Reads every adapter of `specs` (each named by its path).
pub fn read_loras(specs: &[LoraSpec]) -> Result<Vec<LoraSpec<Arc<LoraAdapter>>>> {
    specs
        .iter()
        .map(|s| {
            Ok(LoraSpec::new(
                Arc::new(LoraAdapter::read(&s.source)?),
                s.scale,
            ))
        })
        .collect()
}

/// Reads every adapter of `specs` and makes them the merged ones, all at once
/// ([`apply_loras`]).
pub fn apply_lora_specs<B: FusedOps>(
    components: &mut SdxlComponents<B>,
    specs: &[LoraSpec],
) -> Result<()> {
    apply_loras(components, &read_loras(specs)?)
}
