//! What switching a LoRA adapter costs: a rank-R adapter on every attention projection
//! of a model's UNet (`to_q`, `to_k`, `to_v`, `to_out.0` of self- and cross-attention),
//! read, merged (`apply_loras`) and removed (`remove_loras`), on the CPU in float32.
//!
//! ```sh
//! cargo run --release --example lora_cost -- [MODEL] [RANK] [ITERS]
//! # default: sdxl-base-1.0-random 32 3 (the full-size SDXL architecture, random weights)
//! ```

use std::sync::Arc;
use std::time::Instant;

use burn::tensor::DType;
use hypergen::device::CpuBackend;
use hypergen::load::lora::{apply_loras, remove_loras, LoraAdapter, LoraSpec};
use hypergen::load::params::{list_params, LayerKind};
use hypergen::load::{load_components, LoadOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(|| "sdxl-base-1.0-random".into());
    let rank: usize = args.next().map_or(Ok(32), |s| s.parse())?;
    let iters: usize = args.next().map_or(Ok(3), |s| s.parse())?;
    let device = Default::default();
    let t = Instant::now();
    let mut components =
        load_components::<CpuBackend>(&model, DType::F32, &LoadOptions::default(), &device)?;
    println!("loaded {model} in {:.1} s", t.elapsed().as_secs_f64());

    // The adapter: PEFT names, deterministic values.
    let params = list_params(&components.unet);
    let targets: Vec<(String, usize, usize)> = params
        .iter()
        .filter(|(p, i)| {
            i.kind == LayerKind::Linear
                && (p.contains(".attn1.") || p.contains(".attn2."))
                && [
                    ".to_q.weight",
                    ".to_k.weight",
                    ".to_v.weight",
                    ".to_out.0.weight",
                ]
                .iter()
                .any(|s| p.ends_with(s))
        })
        // Burn stores linear weights as [in, out].
        .map(|(p, i)| {
            (
                p.trim_end_matches(".weight").to_string(),
                i.shape[0],
                i.shape[1],
            )
        })
        .collect();
    let mut values = 0usize;
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = targets
        .iter()
        .flat_map(|(module, inp, out)| {
            values += rank * (inp + out);
            let fill = |n: usize| -> Vec<u8> {
                (0..n)
                    .flat_map(|k| ((k % 13) as f32 * 1e-3 - 6e-3).to_le_bytes())
                    .collect()
            };
            [
                (
                    format!("unet.{module}.lora_A.weight"),
                    vec![rank, *inp],
                    fill(rank * inp),
                ),
                (
                    format!("unet.{module}.lora_B.weight"),
                    vec![*out, rank],
                    fill(out * rank),
                ),
            ]
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .expect("consistent view");
            (n.clone(), view)
        })
        .collect();
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("rank.safetensors");
    safetensors::serialize_to_file(views, None, &file)?;
    println!(
        "adapter: rank {rank} on {} attention projections, {:.1} M values ({:.0} MiB in float32)",
        targets.len(),
        values as f64 / 1e6,
        (values * 4) as f64 / (1 << 20) as f64
    );

    let t = Instant::now();
    let adapter = Arc::new(LoraAdapter::read(&file)?);
    println!("read and parse: {:.3} s", t.elapsed().as_secs_f64());
    // The first merge also materialises the lazily drawn base weights it touches.
    apply_loras(&mut components, &[LoraSpec::new(adapter.clone(), 1.0)])?;
    remove_loras(&mut components);
    let (mut apply, mut remove) = (Vec::new(), Vec::new());
    for _ in 0..iters {
        let t = Instant::now();
        apply_loras(&mut components, &[LoraSpec::new(adapter.clone(), 0.8)])?;
        // Wait for queued work, as a backend may run it asynchronously.
        <CpuBackend as burn::tensor::backend::Backend>::sync(&device)?;
        apply.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        remove_loras(&mut components);
        remove.push(t.elapsed().as_secs_f64());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "apply (merge W + s·up·down into every layer): median {:.3} s of {iters}",
        median(&mut apply)
    );
    println!(
        "remove (restore the kept base tensors): median {:.4} s of {iters}",
        median(&mut remove)
    );
    Ok(())
}
