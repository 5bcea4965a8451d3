//! Times our CPU kernels (`FusedOps for Flex`) against the plain Burn ops they replace, at
//! SDXL's shapes for 512² images with classifier-free guidance (batch 2).
//!
//! ```text
//! cargo run --release -p hypergen-kernels --example cpu_ops [-- --iters N] [--fused-only] [--only TEXT] [--large]
//! ```
//!
//! Each op runs once to warm up, then `N` times (default 5); the median is printed in ms
//! with its rate: GFLOP/s for attention (4·N·H·L·S·D), GB/s for the elementwise ops
//! (bytes read once plus bytes written). Besides wall time, the process's CPU time per
//! thread (`cpu/thr`) is printed on Linux: on a machine shared with other work it is the
//! better estimate of the time on an idle one. Threads: rayon's default (all cores), or
//! `RAYON_NUM_THREADS`. `kernels/examples/cpu_ops_torch.py` times PyTorch on the same ops.
//!
//! GroupNorm and GEGLU write into their input when they hold its only handle: rows
//! marked "in place" time that path (a fresh input per run, made outside the timing);
//! the others keep the input alive, so the kernel allocates its output as PyTorch does.
//!
//! `--large` adds the VAE's attention at 1024² (one 512-wide head over 16384 positions,
//! 550 GFLOP): the kernel holds a few MiB of scores per thread, not the 1 GiB matrix.
//!
//! Build with `--release` for numbers that mean anything: in dev builds the `gemm`
//! crate (in dependencies, compiled with debug assertions) runs several times slower.

use std::time::Instant;

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use hypergen_kernels::{plain, FusedOps, KernelSet};

type B = Flex;

/// Deterministic data in about [-2, 2] (plus `shift`).
fn data(len: usize, seed: f32, shift: f32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let x = i as f32 * 0.618_034 + seed;
            shift + 2.0 * ((x * 12.9898).sin() * 0.7 + (x * 78.233).cos() * 0.3)
        })
        .collect()
}

fn tensor<const D: usize>(shape: [usize; D], seed: f32, shift: f32) -> Tensor<B, D> {
    let len = shape.iter().product();
    Tensor::from_data(
        TensorData::new(data(len, seed, shift), shape),
        &Default::default(),
    )
}

/// CPU time of the whole process (all threads) in seconds, where the OS tells it.
#[cfg(target_os = "linux")]
fn process_cpu_time() -> Option<f64> {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    }
    const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `ts` is a valid `struct timespec` (64-bit Linux layout) to write into.
    let rc = unsafe { clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    (rc == 0).then_some(ts.sec as f64 + ts.nsec as f64 * 1e-9)
}

#[cfg(not(target_os = "linux"))]
fn process_cpu_time() -> Option<f64> {
    None
}

/// Wall time and CPU time per thread of one timing, in ms.
#[derive(Clone, Copy)]
struct Ms {
    wall: f64,
    cpu: Option<f64>,
}

/// Medians of `iters` runs of `op` on inputs from `setup` (made outside the timing)
/// after one warm-up.
fn time_with<I, T>(iters: usize, mut setup: impl FnMut() -> I, mut op: impl FnMut(I) -> T) -> Ms {
    drop(op(setup()));
    let threads = rayon::current_num_threads() as f64;
    let runs: Vec<Ms> = (0..iters)
        .map(|_| {
            let input = setup();
            let (cpu0, start) = (process_cpu_time(), Instant::now());
            let out = op(input);
            let wall = start.elapsed().as_secs_f64() * 1e3;
            let cpu = cpu0
                .zip(process_cpu_time())
                .map(|(a, b)| (b - a) * 1e3 / threads);
            // Freeing the output (unmapping it, when large) is not the op's time.
            drop(out);
            Ms { wall, cpu }
        })
        .collect();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ms {
        wall: median(runs.iter().map(|r| r.wall).collect()),
        cpu: runs
            .iter()
            .map(|r| r.cpu)
            .collect::<Option<Vec<f64>>>()
            .map(median),
    }
}

/// [`time_with`] without an input.
fn time<T>(iters: usize, mut op: impl FnMut() -> T) -> Ms {
    time_with(iters, || (), |()| op())
}

struct Row {
    op: String,
    unit: &'static str,
    /// Work per run in the unit's numerator (GFLOP or GB).
    work: f64,
    fused: Ms,
    plain: Option<Ms>,
}

fn print(rows: &[Row]) {
    println!(
        "{:<46} {:>9} {:>9} {:>14} {:>9} {:>9} {:>14}",
        "op", "ours ms", "cpu/thr", "ours rate", "plain ms", "cpu/thr", "plain rate"
    );
    for r in rows {
        let cols = |t: Option<Ms>| match t {
            Some(t) => (
                format!("{:.2}", t.wall),
                t.cpu.map_or("-".into(), |c| format!("{c:.2}")),
                format!("{:.1} {}", r.work / (t.wall / 1e3), r.unit),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let (a, b, c) = cols(Some(r.fused));
        let (d, e, f) = cols(r.plain);
        println!("{:<46} {a:>9} {b:>9} {c:>14} {d:>9} {e:>9} {f:>14}", r.op);
    }
}

fn main() {
    let mut iters = 5;
    let mut with_plain = true;
    let mut only = String::new();
    let mut large = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--iters" => iters = args.next().and_then(|v| v.parse().ok()).expect("--iters N"),
            "--fused-only" => with_plain = false,
            "--only" => only = args.next().expect("--only TEXT"),
            "--large" => large = true,
            other => panic!(
                "unknown argument {other} (expected --iters N, --fused-only, --only TEXT, \
                 --large)"
            ),
        }
    }
    // Runs the ops whose name contains `--only`'s text.
    let wanted = |op: &str| op.contains(&only);
    println!(
        "hypergen-kernels cpu_ops: {} rayon threads, kernels {}, median of {iters}{}",
        rayon::current_num_threads(),
        KernelSet::current(),
        if cfg!(debug_assertions) {
            " (dev build: build with --release for meaningful numbers)"
        } else {
            ""
        }
    );
    let mut rows = Vec::new();

    // Attention: [N, L, H·D] projections split into heads, as the model passes them
    // (strided views), self-attention at 64² and 32² latents, cross-attention to 77
    // tokens, and the VAE's single 512-wide head at 64² latents.
    let mut attention_cases = vec![
        ("self", 2, 10, 1024, 1024, 64),
        ("self", 2, 5, 4096, 4096, 64),
        ("cross", 2, 10, 1024, 77, 64),
        ("vae", 1, 1, 4096, 4096, 512),
    ];
    if large {
        attention_cases.push(("vae 1024²", 1, 1, 16384, 16384, 512));
    }
    for (what, n, h, l, s, d) in attention_cases {
        let op = format!("attention {what} [{n},{h},{l},{d}] S={s}");
        if !wanted(&op) {
            continue;
        }
        let split = |t: Tensor<B, 3>| t.reshape([n, 0, h, d]).swap_dims(1, 2);
        let q = split(tensor([n, l, h * d], 0.1, 0.0));
        let k = split(tensor([n, s, h * d], 0.2, 0.0));
        let v = split(tensor([n, s, h * d], 0.3, 0.0));
        let run = |fused: bool| {
            time(iters, || {
                if fused {
                    B::fused_attention(q.clone(), k.clone(), v.clone())
                } else {
                    plain::attention_chunked(q.clone(), k.clone(), v.clone(), plain::SCORE_BUDGET)
                }
            })
        };
        rows.push(Row {
            op,
            unit: "GFLOP/s",
            work: 4.0 * (n * h * l * s * d) as f64 / 1e9,
            fused: run(true),
            plain: with_plain.then(|| run(false)),
        });
    }

    // GEGLU on the feed-forward projections at 64² and 32² latents.
    for [n, l, w] in [[2, 4096, 2560], [2, 1024, 5120]] {
        if !wanted(&format!("geglu [{n},{l},{w}]")) {
            continue;
        }
        let x = tensor([n, l, w], 0.4, 0.0);
        let run = |fused: bool| {
            time(iters, || {
                if fused {
                    B::fused_geglu(x.clone())
                } else {
                    plain::geglu(x.clone())
                }
            })
        };
        let work = (n * l * w + n * l * w / 2) as f64 * 4.0 / 1e9;
        rows.push(Row {
            op: format!("geglu [{n},{l},{w}]"),
            unit: "GB/s",
            work,
            fused: run(true),
            plain: with_plain.then(|| run(false)),
        });
        rows.push(Row {
            op: format!("geglu [{n},{l},{w}] in place"),
            unit: "GB/s",
            work,
            fused: time_with(iters, || x.clone().add_scalar(0.0), B::fused_geglu),
            plain: None,
        });
    }

    // GroupNorm(32) + SiLU: the UNet's first ResNet block at 64² latents and the VAE
    // decoder's 512-channel blocks at 256².
    for [n, c, l] in [[2, 320, 4096], [1, 512, 65536]] {
        if !wanted(&format!("group_norm+silu [{n},{c},{l}]")) {
            continue;
        }
        let x = tensor([n, c, l], 0.5, 0.3);
        let gamma = tensor([c], 0.6, 1.0);
        let beta = tensor([c], 0.7, 0.0);
        let affine = || Some((gamma.clone(), beta.clone()));
        let run = |fused: bool| {
            time(iters, || {
                if fused {
                    B::fused_group_norm(x.clone(), affine(), 32, 1e-5, true)
                } else {
                    plain::group_norm(x.clone(), affine(), 32, 1e-5, true)
                }
            })
        };
        let work = 2.0 * (n * c * l) as f64 * 4.0 / 1e9;
        rows.push(Row {
            op: format!("group_norm+silu [{n},{c},{l}] g32"),
            unit: "GB/s",
            work,
            fused: run(true),
            plain: with_plain.then(|| run(false)),
        });
        rows.push(Row {
            op: format!("group_norm+silu [{n},{c},{l}] g32 in place"),
            unit: "GB/s",
            work,
            fused: time_with(
                iters,
                || x.clone().add_scalar(0.0),
                |x| B::fused_group_norm(x, affine(), 32, 1e-5, true),
            ),
            plain: None,
        });
    }

    // Linear layers (rows = batch·positions) and
    // convolutions where the UNet spends most of its step at 512²: the transformer
    // projections at 16² and 32² latents, the text projections (154 rows), and the
    // 3×3 convolutions of each level; then the tiny fixture's projections.
    for [rows_, k, n] in [
        [512, 1280, 10240],
        [512, 5120, 1280],
        [512, 1280, 1280],
        [2048, 640, 5120],
        [2048, 2560, 640],
        [2048, 640, 640],
        [154, 2048, 1280],
        // The tiny fixture's at 256² (213 calls per UNet step, most time per FLOP).
        [512, 64, 64],
        [512, 64, 512],
        [512, 256, 64],
        [128, 128, 128],
        [128, 128, 1024],
        [128, 512, 128],
        [154, 96, 64],
        [154, 96, 128],
    ] {
        let op = format!("linear [{rows_},{k}]x[{k},{n}]");
        if !wanted(&op) {
            continue;
        }
        let x = tensor([rows_, k], 0.8, 0.0);
        // Contiguous `[in, out]`, as the loaders store Burn's `Linear` weights.
        let w = tensor([k, n], 0.9, 0.0).mul_scalar(0.05);
        let b = tensor([n], 1.0, 0.0);
        let run = |fused: bool| {
            time(iters, || {
                let (x, w, b) = (x.clone(), w.clone(), Some(b.clone()));
                if fused {
                    B::fused_linear(x, w, b)
                } else {
                    plain::linear(x, w, b)
                }
            })
        };
        rows.push(Row {
            op,
            unit: "GFLOP/s",
            work: 2.0 * (rows_ * k * n) as f64 / 1e9,
            fused: run(true),
            plain: with_plain.then(|| run(false)),
        });
    }
    for [n, ci, hw, co, kk] in [
        [2, 1280, 16, 1280, 3],
        [2, 640, 32, 640, 3],
        [2, 320, 64, 320, 3],
        [2, 2560, 16, 1280, 3],
        [2, 640, 64, 320, 3],
        [2, 640, 64, 320, 1],
        // The tiny fixture's UNet (256², guidance) and VAE (256² decode) layers.
        [2, 32, 32, 32, 3],
        [2, 64, 32, 64, 3],
        [1, 64, 128, 64, 3],
        [1, 32, 256, 32, 3],
    ] {
        let op = format!("conv{kk}x{kk} [{n},{ci},{hw},{hw}] -> {co}");
        if !wanted(&op) {
            continue;
        }
        let x = tensor([n, ci, hw, hw], 1.1, 0.0);
        let w = tensor([co, ci, kk, kk], 1.2, 0.0).mul_scalar(0.02);
        let b = tensor([co], 1.3, 0.0);
        let pad = kk / 2;
        let run = |fused: bool| {
            time(iters, || {
                let (x, w, b) = (x.clone(), w.clone(), Some(b.clone()));
                if fused {
                    B::fused_conv2d(x, w, b, 1, pad)
                } else {
                    plain::conv2d(x, w, b, 1, pad)
                }
            })
        };
        rows.push(Row {
            op,
            unit: "GFLOP/s",
            work: 2.0 * (n * co * ci * kk * kk * hw * hw) as f64 / 1e9,
            fused: run(true),
            plain: with_plain.then(|| run(false)),
        });
    }
    print(&rows);
}
