//! The text encoders' GEMMs two ways, as the CPU backend runs them: `fused_linear` (the
//! `gemm` crate, packing the weight on every call) and `fused_linear_panels` (our 6 × 64
//! AVX-512 micro-kernel on the weight laid out in 64-column panels ahead of time, as
//! `load_components` lays out the text encoders).
//!
//! ```text
//! cargo run --release -p hypergen-kernels --example panel_gemm [-- LAYERS ROUNDS]
//! ```
//!
//! The weights are `LAYERS` (default 32) layers shaped like SDXL's second text encoder
//! (four `[1280, 1280]` projections, `[1280, 5120]`, `[5120, 1280]`: 2.5 GB, more than
//! any cache, so every call streams its weight as the model does), times 77 rows (one
//! prompt), no bias, on the global rayon pool. Each round times every layer once per
//! way; minimum and median per way are printed after the first round.
//!
//! What it showed (BENCHMARKS.md, "Where the rest of the gap is"): before the panels
//! were built into the library, this example's own copy of the kernel took 0.80–0.93
//! of `gemm`'s minimum, because `gemm` packs the weight on every call and at 77 rows
//! each packed value feeds only five vector FMAs.

use std::time::Instant;

use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData};
use hypergen_kernels::{plain, FusedOps};

/// Deterministic values in [-0.5, 0.5).
fn values(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 9) as f32 / (1u32 << 23) as f32 - 0.5
        })
        .collect()
}

fn tensor<const D: usize>(v: Vec<f32>, shape: [usize; D]) -> Tensor<Flex, D> {
    Tensor::from_data(TensorData::new(v, shape), (&Default::default(), DType::F32))
}

fn main() {
    if !Flex::linear_panels(DType::F32) {
        println!("no panel kernel here: it needs AVX-512 and HYPERGEN_KERNELS with `linear`");
        return;
    }
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let layers = args.first().copied().unwrap_or(32);
    let rounds = args.get(1).copied().unwrap_or(6).max(2);
    let m = 77;
    let shapes = [
        (1280, 1280),
        (1280, 1280),
        (1280, 1280),
        (1280, 1280),
        (1280, 5120),
        (5120, 1280),
    ];
    // (input, rows-layout weight, panel-layout weight) per layer.
    let mut weights = Vec::new();
    for l in 0..layers {
        for (i, &(k, n)) in shapes.iter().enumerate() {
            let w = tensor(values(k * n, (l * shapes.len() + i) as u32 + 1), [k, n]);
            let x = tensor(values(m * k, 7), [m, k]);
            weights.push((x, w.clone(), plain::to_panels(w)));
        }
    }
    let flop: f64 = weights
        .iter()
        .map(|(_, w, _)| 2.0 * (m * w.dims()[0] * w.dims()[1]) as f64)
        .sum();

    // Both ways agree.
    let (x, w, p) = &weights[4];
    let a = Flex::fused_linear(x.clone(), w.clone(), None);
    let b = Flex::fused_linear_panels(x.clone(), p.clone(), None);
    let err = (a - b).abs().max().into_scalar();
    println!(
        "{layers} layers, {:.2} GB of weights, {m} rows; max difference {err:e}",
        flop / (2.0 * m as f64) * 4.0 / 1e9
    );

    let mut times = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for (way, t) in times.iter_mut().enumerate() {
            let start = Instant::now();
            for (x, w, p) in &weights {
                let y = if way == 0 {
                    Flex::fused_linear(x.clone(), w.clone(), None)
                } else {
                    Flex::fused_linear_panels(x.clone(), p.clone(), None)
                };
                drop(y);
            }
            if round > 0 {
                t.push(start.elapsed().as_secs_f64());
            }
        }
    }
    for (name, t) in ["fused_linear (gemm)", "fused_linear_panels"]
        .iter()
        .zip(&mut times)
    {
        t.sort_by(f64::total_cmp);
        let (min, med) = (t[0], t[t.len() / 2]);
        println!(
            "{name:22} min {:7.1} ms  median {:7.1} ms  ({:.0} GFLOP/s at the minimum)",
            min * 1e3,
            med * 1e3,
            flop / min / 1e9
        );
    }
}
