//! `hypergen bench`: the model and op benchmarks run on the tiny built-in model on the
//! CPU and report what they promise (every component, positive times, the summary and
//! its best batch, valid JSON); bad arguments are clean errors. Nothing here asserts a
//! speed.

use burn::tensor::DType;
use clap::Parser;
use hypergen::app::bench::{self, BenchOptions, BenchReport, Component, Mode, ModelBench, OpBench};
use hypergen::app::cli::{bench_options, BenchArgs, Cli, Command};
use hypergen::device::{DTypeChoice, DeviceSpec};
use hypergen::kernels::KernelSet;
use serde_json::Value;

fn model_options(components: Vec<Component>, batches: Vec<usize>) -> BenchOptions {
    BenchOptions {
        mode: Mode::Model {
            model: "tiny-sdxl-random".into(),
            load: Box::default(),
            run: Default::default(),
            bench: ModelBench {
                sizes: vec![(64, 64)],
                steps: vec![2],
                batches,
                guidance: 5.0,
                sampler: Default::default(),
                components,
                prompt: "a red cube".into(),
                peak_tflops: 770.0,
            },
        },
        dtype: DTypeChoice::Exact(DType::F32),
        warmup: 0,
        iters: 2,
    }
}

fn run(options: BenchOptions) -> (BenchReport, Value) {
    let mut lines = 0;
    let report = bench::run(&DeviceSpec::Cpu, options, &mut |_| lines += 1).expect("bench runs");
    assert!(lines > 0, "progress lines were logged");
    let json = report.to_json().expect("report serialises");
    let value: Value = serde_json::from_str(&json).expect("report is valid JSON");
    (report, value)
}

fn positive(v: &Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x > 0.0 && x.is_finite(), "{what} = {x}");
    x
}

#[test]
fn bench_model_every_component_on_tiny_model() {
    let (report, v) = run(model_options(Component::ALL.to_vec(), vec![1, 2]));
    print!("{}", report.render());
    assert_eq!(v["mode"], "model");
    assert_eq!(v["dtype"], "float32");
    assert_eq!(v["device"]["label"], "cpu");
    assert_eq!(v["device"]["backend"], "flex");
    assert!(
        v["date"].as_str().is_some_and(|d| d.len() == 10),
        "{}",
        v["date"]
    );
    let kernels = KernelSet::current();
    assert_eq!(
        v["kernels"],
        if kernels == KernelSet::ALL {
            "all".to_string()
        } else {
            kernels.to_string()
        }
    );
    assert_eq!(v["model"]["name"], "tiny-sdxl-random");
    assert_eq!(v["model"]["random_weights"], true);
    positive(&v["model"]["parameters"]["unet"], "unet parameters");

    let ms = v["measurements"].as_array().expect("measurements");
    // Two batches × (text, unet, scheduler, vae, one pipeline step count).
    assert_eq!(ms.len(), 10);
    for batch in [1u64, 2] {
        for c in ["text", "unet", "scheduler", "vae", "pipeline"] {
            let m = ms
                .iter()
                .find(|m| m["component"] == c && m["batch"] == batch)
                .unwrap_or_else(|| panic!("no {c} measurement at batch {batch}"));
            assert_eq!(
                (m["width"].as_u64(), m["height"].as_u64()),
                (Some(64), Some(64))
            );
            assert_eq!(
                m["unet_rows"].as_u64(),
                Some(2 * batch),
                "guidance doubles the rows"
            );
            assert_eq!(m["timing"]["iters"], 2);
            let median = positive(&m["timing"]["median_s"], "median");
            assert!(positive(&m["timing"]["min_s"], "min") <= median);
            assert!(median <= positive(&m["timing"]["max_s"], "max"));
            positive(&m["memory"]["peak_rss_bytes"], "peak RSS");
            assert!(
                m["memory"]["device_reserved_bytes"].is_null(),
                "no device pool on the CPU"
            );
            // The tiny UNet is not SDXL's: no FLOP count, rather than a wrong one.
            match c {
                "unet" | "vae" | "pipeline" => assert!(m["tflop"].is_null(), "{c}: {}", m["tflop"]),
                "text" => {
                    positive(&m["tflop"], "text TFLOP");
                    positive(&m["achieved_tflops"], "text TFLOP/s");
                }
                _ => {}
            }
            let steps = if c == "pipeline" {
                Value::from(2)
            } else {
                Value::Null
            };
            assert_eq!(m["steps"], steps);
        }
    }

    let sums = v["summaries"].as_array().expect("summaries");
    assert_eq!(sums.len(), 1);
    let s = &sums[0];
    assert_eq!(s["steps"], 2);
    let batches = s["batches"].as_array().expect("batches");
    assert_eq!(batches.len(), 2);
    let mut best = (0, 0.0);
    for b in batches {
        let ips = positive(&b["images_per_s"], "images/s");
        let e2e = positive(&b["end_to_end_s"], "end to end");
        let n = b["batch"].as_u64().expect("batch");
        assert!((ips * e2e - n as f64).abs() < 1e-9);
        positive(&b["step_s"], "step time");
        positive(&b["peak_memory_bytes"], "peak memory");
        let k = &b["breakdown"];
        for part in ["text_s", "unet_s", "scheduler_s", "vae_s"] {
            positive(&k[part], part);
        }
        assert!(b["floor_ratio"].is_null(), "no floor for a non-SDXL model");
        if ips > best.1 {
            best = (n, ips);
        }
    }
    assert_eq!(s["best_batch"].as_u64(), Some(best.0));
    positive(&s["best_images_per_s"], "best images/s");
}

#[test]
fn bench_model_one_component_alone() {
    for c in Component::ALL {
        let (report, _) = run(model_options(vec![c], vec![1]));
        assert!(!report.measurements.is_empty(), "{c}: nothing measured");
        assert!(
            report.measurements.iter().all(|m| m.component == c),
            "{c}: other components were timed"
        );
        // A summary needs the whole pipeline.
        assert_eq!(report.summaries.is_empty(), c != Component::Pipeline, "{c}");
    }
}

#[test]
fn bench_ops_on_cpu() {
    let options = BenchOptions {
        mode: Mode::Ops(OpBench {
            sizes: vec![(64, 64)],
            batch: 1,
            filter: None,
        }),
        dtype: DTypeChoice::Exact(DType::F32),
        warmup: 0,
        iters: 1,
    };
    let (report, v) = run(options);
    print!("{}", report.render());
    assert_eq!(v["mode"], "ops");
    assert!(v["model"].is_null());
    let ops = v["ops"].as_array().expect("ops");
    let cases = bench::ops::cases(64, 64, 2, 1);
    for (name, _) in &cases {
        let variants: Vec<&str> = ops
            .iter()
            .filter(|o| o["name"] == name.as_str())
            .filter_map(|o| o["variant"].as_str())
            .collect();
        // Every op is timed as our kernel and as its plain-Burn reference.
        assert_eq!(variants, ["fused", "plain"], "{name}");
    }
    for o in ops {
        positive(&o["flop"], "flop");
        positive(&o["bytes"], "bytes");
        positive(&o["timing"]["median_s"], "median");
        positive(&o["gflops"], "GFLOP/s");
        positive(&o["gbps"], "GB/s");
    }
    // The real shapes: the UNet's first 3×3 conv at 1024² is 320 channels on 128².
    let at_1024 = bench::ops::cases(1024, 1024, 2, 1);
    let conv = at_1024
        .iter()
        .find(|(n, _)| n == "unet.conv3x3.320")
        .map(|(_, s)| *s);
    assert_eq!(
        conv,
        Some(bench::ops::OpShape::Conv3x3 {
            n: 2,
            cin: 320,
            cout: 320,
            h: 128,
            w: 128
        })
    );

    // The filter keeps only matching ops.
    let (report, _) = run(BenchOptions {
        mode: Mode::Ops(OpBench {
            sizes: vec![(64, 64)],
            batch: 1,
            filter: Some("geglu".into()),
        }),
        dtype: DTypeChoice::Exact(DType::F32),
        warmup: 0,
        iters: 1,
    });
    assert!(!report.ops.is_empty());
    assert!(report.ops.iter().all(|o| o.name.contains("geglu")));
}

fn args(argv: &[&str]) -> BenchArgs {
    let full = ["hypergen", "bench"].iter().chain(argv).copied();
    match Cli::try_parse_from(full).expect("flags parse").command {
        Command::Bench(a) => *a,
        other => panic!("parsed as {other:?}"),
    }
}

fn refused(argv: &[&str], needle: &str) {
    let e = match bench_options(&args(argv)) {
        Ok(o) => panic!("{argv:?} accepted: {o:?}"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains(needle),
        "{argv:?}: `{e}` does not mention `{needle}`"
    );
}

#[test]
fn bench_argument_errors_are_clean() {
    // Defaults: SDXL base at 1024², 30 steps, guidance 5; Turbo at 512², 1 step, none.
    let o = bench_options(&args(&[])).expect("defaults");
    match &o.mode {
        Mode::Model { model, bench, .. } => {
            assert_eq!(model, bench::DEFAULT_MODEL);
            assert_eq!(
                (bench.sizes.clone(), bench.steps.clone()),
                (vec![(1024, 1024)], vec![30])
            );
            assert_eq!(bench.guidance, 5.0);
            assert_eq!(bench.components, Component::ALL);
        }
        other => panic!("{other:?}"),
    }
    let o = bench_options(&args(&[
        "sdxl-turbo-random",
        "--steps",
        "1,2,4",
        "--batch",
        "1,4",
    ]))
    .expect("turbo");
    match &o.mode {
        Mode::Model { bench, .. } => {
            assert_eq!(bench.sizes, vec![(512, 512)]);
            assert_eq!(bench.steps, vec![1, 2, 4]);
            assert_eq!(bench.batches, vec![1, 4]);
            assert_eq!(bench.guidance, 0.0);
        }
        other => panic!("{other:?}"),
    }
    let o = bench_options(&args(&["--width", "768", "--height", "512"])).expect("width/height");
    assert!(matches!(&o.mode, Mode::Model { bench, .. } if bench.sizes == vec![(768, 512)]));
    let o =
        bench_options(&args(&["ops", "--size", "512,1024x768", "--dtype", "fp16"])).expect("ops");
    assert!(matches!(&o.mode, Mode::Ops(b) if b.sizes == vec![(512, 512), (1024, 768)]));
    assert_eq!(o.dtype, DTypeChoice::Exact(DType::F16));

    refused(&["--size", "0"], "size");
    refused(&["--size", "big"], "size");
    refused(&["--size", "500"], "multiples of 8");
    refused(&["ops", "--size", "520"], "multiples of 64");
    refused(&["--batch", "0"], "batch");
    refused(&["--batch", "1,x"], "batch");
    refused(&["ops", "--batch", "1,2"], "one batch size");
    refused(&["--steps", "0"], "steps");
    refused(&["--components", "unet,decoder"], "decoder");
    refused(&["--iters", "0"], "iters");
    refused(&["--guidance=-1"], "guidance");
    // A dtype the parser does not know is refused by it, naming the flag.
    let e = Cli::try_parse_from(["hypergen", "bench", "--dtype", "int8"])
        .expect_err("int8 refused")
        .to_string();
    assert!(e.contains("--dtype") && e.contains("int8"), "{e}");
    // --size and --width together is a flag conflict, reported by the parser.
    assert!(Cli::try_parse_from(["hypergen", "bench", "--size", "64", "--width", "64"]).is_err());

    // Errors found when running are errors too, not panics.
    let run_err = |argv: &[&str]| {
        let full = ["hypergen", "bench"].iter().chain(argv).copied();
        let cli = Cli::try_parse_from(full).expect("flags parse");
        hypergen::app::cli::run(cli)
            .expect_err("refused")
            .to_string()
    };
    let e = run_err(&["no-such-model", "--device", "cpu", "--size", "64"]);
    assert!(e.contains("no-such-model"), "{e}");
    let e = run_err(&["tiny-sdxl-random", "--device", "tpu", "--size", "64"]);
    assert!(e.contains("tpu"), "{e}");
}
