//! `hypergen bench`: how fast SDXL runs on a device, and where the time goes.
//!
//! Two modes share one report ([`BenchReport`], printed as a table or written as JSON):
//!
//! - the model benchmark ([`model`]): text encoding, one UNet evaluation, one scheduler
//!   step, the VAE decode and the whole pipeline of a loaded model (usually a full-size
//!   built-in random-weight one) at every size, batch and step count asked for, with
//!   end-to-end time, images/s at each batch and the best, time per step, achieved
//!   TFLOP/s against the arithmetic floor ([`flops`]) and peak memory ([`memory`]);
//! - the op microbenchmark ([`ops`]): SDXL's hot ops at their real shapes, our fused ops
//!   beside their plain-Burn references.
//!
//! Everything is generic over the backend and runs through [`crate::device::run_on`]
//! like the other commands. Clocks are read only after [`FusedOps`]' `sync` (GPU
//! backends queue work), and every result stays alive until then so that no lazy
//! backend can skip it.

pub mod flops;
pub mod memory;
pub mod model;
pub mod ops;

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::str::FromStr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use burn::module::Module;

use serde::Serialize;

use crate::device::{
    dtype_name, resolve_here, run_on, DTypeChoice, DeviceSpec, Placed, Target, WithBackend,
};
use crate::error::{Error, Result};
use crate::kernels::KernelSet;
use crate::load::{load_pipeline, LoadOptions};
use crate::pipeline::RunOptions;
use crate::FusedOps;

pub use model::{BatchSummary, Breakdown, Measurement, ModelBench, Summary};
pub use ops::{OpBench, OpMeasurement};

/// The built-in model benchmarked when none is named.
pub const DEFAULT_MODEL: &str = "sdxl-base-1.0-random";

/// A part of the pipeline the model benchmark can time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Component {
    /// Both text encoders on one prompt (the negative branch is zeros).
    Text,
    /// One UNet evaluation (both guidance branches in one batch).
    Unet,
    /// One guidance combination, input scaling and scheduler step.
    Scheduler,
    /// The VAE decode of the batch's latents.
    Vae,
    /// The whole pipeline, prompt to pixels.
    Pipeline,
}

impl Component {
    /// Every component, in pipeline order.
    pub const ALL: [Component; 5] = [
        Component::Text,
        Component::Unet,
        Component::Scheduler,
        Component::Vae,
        Component::Pipeline,
    ];

    /// The name flags and JSON use.
    pub fn name(self) -> &'static str {
        match self {
            Component::Text => "text",
            Component::Unet => "unet",
            Component::Scheduler => "scheduler",
            Component::Vae => "vae",
            Component::Pipeline => "pipeline",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Component {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Component::ALL
            .into_iter()
            .find(|c| c.name() == s.trim().to_ascii_lowercase())
            .ok_or_else(|| {
                Error::invalid(
                    "components",
                    format!("`{s}` is not one of text, unet, scheduler, vae, pipeline"),
                )
            })
    }
}

/// Times of the timed iterations of one measurement, seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Timing {
    /// Timed iterations (after the warm-up ones).
    pub iters: usize,
    /// Median.
    pub median_s: f64,
    /// Fastest.
    pub min_s: f64,
    /// Mean.
    pub mean_s: f64,
    /// Slowest.
    pub max_s: f64,
}

impl Timing {
    /// Statistics of `samples` (seconds); `None` when there are none.
    pub fn from_samples(mut samples: Vec<f64>) -> Option<Timing> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let median = if n % 2 == 1 {
            samples[n / 2]
        } else {
            (samples[n / 2 - 1] + samples[n / 2]) / 2.0
        };
        Some(Timing {
            iters: n,
            median_s: median,
            min_s: samples[0],
            mean_s: samples.iter().sum::<f64>() / n as f64,
            max_s: samples[n - 1],
        })
    }
}

/// Waits for the device to finish its queued work.
pub fn sync<B: FusedOps>(device: &B::Device) -> Result<()> {
    B::sync(device).map_err(|e| Error::Backend(format!("synchronising the device: {e}")))
}

/// Runs `f` `warmup` times untimed, then `iters` times timed, synchronising the device
/// before each clock read; each result is dropped only after the sync.
pub fn measure<B: FusedOps, T>(
    device: &B::Device,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<T>,
) -> Result<Timing> {
    for _ in 0..warmup {
        let out = f()?;
        sync::<B>(device)?;
        drop(out);
    }
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        sync::<B>(device)?;
        let start = Instant::now();
        let out = f()?;
        sync::<B>(device)?;
        samples.push(start.elapsed().as_secs_f64());
        drop(out);
    }
    Timing::from_samples(samples).ok_or_else(|| Error::invalid("iters", "must be at least 1"))
}

/// Parses image sizes: a comma list of `N` (square) or `WxH`, e.g. `512,1024x768`.
pub fn parse_sizes(s: &str) -> Result<Vec<(usize, usize)>> {
    let bad = |item: &str| {
        Error::invalid(
            "size",
            format!("`{item}`: expected N (square) or WIDTHxHEIGHT, e.g. 512,1024x768"),
        )
    };
    s.split(',')
        .map(str::trim)
        .map(|item| {
            let (w, h) = match item.split_once(['x', 'X']) {
                Some((w, h)) => (w.trim(), h.trim()),
                None => (item, item),
            };
            let w = w.parse::<usize>().map_err(|_| bad(item))?;
            let h = h.parse::<usize>().map_err(|_| bad(item))?;
            if w == 0 || h == 0 {
                return Err(bad(item));
            }
            Ok((w, h))
        })
        .collect()
}

/// Parses a comma list of positive integers for the argument `name` (`1,2,4`).
pub fn parse_counts(name: &'static str, s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(str::trim)
        .map(|item| match item.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(Error::invalid(
                name,
                format!("`{item}` is not a positive integer (expected a comma list such as 1,2,4)"),
            )),
        })
        .collect()
}

/// Parses a comma list of components (`text,unet`), or `all`.
pub fn parse_components(s: &str) -> Result<Vec<Component>> {
    if s.trim() == "all" {
        return Ok(Component::ALL.to_vec());
    }
    let mut out: Vec<Component> = Vec::new();
    for c in s.split(',').map(str::parse::<Component>) {
        let c = c?;
        if !out.contains(&c) {
            out.push(c);
        }
    }
    Ok(out)
}

/// Which benchmark to run.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Components and the whole pipeline of a model.
    Model {
        /// A folder, built-in name or Hub id (as `generate --model` takes).
        model: String,
        /// Where its files are (it loads in [`BenchOptions::dtype`]).
        load: Box<LoadOptions>,
        /// How it runs.
        run: RunOptions,
        /// What to time.
        bench: ModelBench,
    },
    /// SDXL's hot ops at their real shapes.
    Ops(OpBench),
}

/// A benchmark run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// What to run.
    pub mode: Mode,
    /// Dtype of the parameters and activations (`auto`: as the device prefers).
    pub dtype: DTypeChoice,
    /// Untimed runs before each measurement (compilation, autotuning, caches).
    pub warmup: usize,
    /// Timed runs of each measurement.
    pub iters: usize,
}

impl BenchOptions {
    /// Checks the arguments before anything is loaded.
    pub fn validate(&self) -> Result<()> {
        if self.iters == 0 {
            return Err(Error::invalid("iters", "must be at least 1"));
        }
        match &self.mode {
            Mode::Model { bench, .. } => {
                check_sizes(&bench.sizes, 8)?;
                if bench.batches.is_empty() || bench.batches.contains(&0) {
                    return Err(Error::invalid(
                        "batch",
                        "give one or more positive batch sizes",
                    ));
                }
                if bench.steps.is_empty() || bench.steps.contains(&0) {
                    return Err(Error::invalid(
                        "steps",
                        "give one or more positive step counts",
                    ));
                }
                if bench.components.is_empty() {
                    return Err(Error::invalid("components", "name at least one component"));
                }
                if !bench.guidance.is_finite() || bench.guidance < 0.0 {
                    return Err(Error::invalid("guidance", "must be a finite number ≥ 0"));
                }
                if !(bench.peak_tflops.is_finite() && bench.peak_tflops > 0.0) {
                    return Err(Error::invalid("peak_tflops", "must be a positive number"));
                }
            }
            Mode::Ops(ops) => {
                check_sizes(&ops.sizes, 64)?;
                if ops.batch == 0 {
                    return Err(Error::invalid("batch", "must be at least 1"));
                }
            }
        }
        Ok(())
    }
}

fn check_sizes(sizes: &[(usize, usize)], multiple: usize) -> Result<()> {
    if sizes.is_empty() {
        return Err(Error::invalid("size", "give one or more sizes"));
    }
    for &(w, h) in sizes {
        if w == 0 || h == 0 || !w.is_multiple_of(multiple) || !h.is_multiple_of(multiple) {
            return Err(Error::invalid(
                "size",
                format!("{w}x{h}: width and height must be positive multiples of {multiple}"),
            ));
        }
    }
    Ok(())
}

/// The device a report was measured on.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceReport {
    /// `--device` as given.
    pub spec: String,
    /// What it resolved to (`cpu`, `vulkan:0 (NVIDIA H100 80GB HBM3)`).
    pub label: String,
    /// Burn's name for the backend.
    pub backend: String,
    /// Discrete GPU, software… (wgpu adapters), or compute capability (CUDA).
    pub kind: Option<String>,
    /// Driver name and version where the device reports them.
    pub driver: Option<String>,
    /// The host CPU (`/proc/cpuinfo`).
    pub host_cpu: Option<String>,
    /// Logical CPUs of the host.
    pub host_threads: usize,
    /// The backends compiled into this build.
    pub build: Vec<&'static str>,
    /// Whether this is an optimised build.
    pub release_build: bool,
}

/// The model a report measured.
#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    /// Its name.
    pub name: String,
    /// Whether its weights are random (built-in models).
    pub random_weights: bool,
    /// Seconds to load or build it.
    pub load_s: f64,
    /// Parameters per component.
    pub parameters: BTreeMap<String, usize>,
    /// Dtype of the VAE (float32 when SDXL's VAE is upcast).
    pub vae_dtype: String,
    /// Memory once loaded.
    pub memory_after_load: memory::MemorySample,
}

/// Everything one benchmark run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// `model` or `ops`.
    pub mode: &'static str,
    /// hypergen's version.
    pub hypergen_version: &'static str,
    /// UTC date of the run, `YYYY-MM-DD`.
    pub date: String,
    /// Seconds since the Unix epoch at the start.
    pub unix_time: u64,
    /// Where it ran.
    pub device: DeviceReport,
    /// Dtype of parameters and activations.
    pub dtype: String,
    /// Our kernels that were on (`HYPERGEN_KERNELS`; the CPU backend has none, so there
    /// the fused ops are the plain ones whatever this says).
    pub kernels: String,
    /// Untimed runs per measurement.
    pub warmup: usize,
    /// Timed runs per measurement.
    pub iters: usize,
    /// Dense throughput the floor ratio assumes, TFLOP/s (model mode).
    pub peak_tflops: Option<f64>,
    /// Guidance scale (model mode).
    pub guidance: Option<f64>,
    /// The model (model mode).
    pub model: Option<ModelReport>,
    /// Each component at each size and batch (model mode).
    pub measurements: Vec<Measurement>,
    /// The whole pipeline per size and step count (model mode).
    pub summaries: Vec<Summary>,
    /// Each op variant (ops mode).
    pub ops: Vec<OpMeasurement>,
}

/// Today's UTC date as `YYYY-MM-DD`, and the Unix time.
fn today() -> (String, u64) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Days since 1970-01-01 to a civil date (proleptic Gregorian calendar).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (format!("{year:04}-{month:02}-{day:02}"), secs)
}

fn host_cpu() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

fn device_report(spec: &DeviceSpec, target: &Target, label: String) -> DeviceReport {
    let (kind, driver) = match target {
        Target::Cpu => (None, None),
        Target::Wgpu(a) => (
            Some(a.kind.to_string()),
            (!a.driver.is_empty()).then(|| a.driver.clone()),
        ),
        Target::Cuda(d) => (
            Some(format!(
                "compute capability {}.{}, {:.1} GiB",
                d.compute_capability.0,
                d.compute_capability.1,
                d.memory_bytes as f64 / (1u64 << 30) as f64
            )),
            None,
        ),
    };
    DeviceReport {
        spec: spec.to_string(),
        label,
        backend: String::new(),
        kind,
        driver,
        host_cpu: host_cpu(),
        host_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        build: crate::device::compiled_backends(),
        release_build: !cfg!(debug_assertions),
    }
}

/// Runs a benchmark on the device `spec` names; `log` gets one line per result as it
/// comes (long runs show progress).
pub fn run(
    spec: &DeviceSpec,
    options: BenchOptions,
    log: &mut dyn FnMut(&str),
) -> Result<BenchReport> {
    options.validate()?;
    let resolved = resolve_here(spec)?;
    let device = device_report(spec, &resolved.target, resolved.label());
    run_on(
        &resolved,
        Work {
            options,
            device,
            log,
        },
    )?
}

struct Work<'a> {
    options: BenchOptions,
    device: DeviceReport,
    log: &'a mut dyn FnMut(&str),
}

impl WithBackend for Work<'_> {
    type Output = Result<BenchReport>;

    fn dtype(&self) -> Option<DTypeChoice> {
        Some(self.options.dtype)
    }

    fn run<B: FusedOps>(self, device: B::Device, placed: Placed) -> Result<BenchReport> {
        let Work {
            options,
            device: mut info,
            log,
        } = self;
        info.backend = B::name(&device);
        let dtype = placed.dtype;
        let (date, unix_time) = today();
        let mut report = BenchReport {
            mode: "ops",
            hypergen_version: env!("CARGO_PKG_VERSION"),
            date,
            unix_time,
            device: info,
            dtype: dtype_name(dtype).into(),
            kernels: kernels_name(KernelSet::current()),
            warmup: options.warmup,
            iters: options.iters,
            peak_tflops: None,
            guidance: None,
            model: None,
            measurements: Vec::new(),
            summaries: Vec::new(),
            ops: Vec::new(),
        };
        match options.mode {
            Mode::Ops(bench) => {
                report.ops = ops::run::<B>(
                    &bench,
                    dtype,
                    &device,
                    options.warmup,
                    options.iters,
                    &mut |m| log(&op_line(m)),
                )?;
            }
            Mode::Model {
                model,
                load,
                run,
                bench,
            } => {
                report.mode = "model";
                let reset = memory::begin::<B>(&device);
                let start = Instant::now();
                let pipeline = load_pipeline::<B>(&model, dtype, &load, &run, &device)?;
                let c = pipeline.components();
                let info = c.info.clone();
                sync::<B>(&device)?;
                let load_s = start.elapsed().as_secs_f64();
                log(&format!("loaded {} in {load_s:.1} s", info.id));
                report.model = Some(ModelReport {
                    name: info.id,
                    random_weights: info.random_weights,
                    load_s,
                    parameters: BTreeMap::from([
                        ("text_encoder".into(), c.text_encoder.num_params()),
                        ("text_encoder_2".into(), c.text_encoder_2.num_params()),
                        ("unet".into(), c.unet.num_params()),
                        ("vae".into(), c.vae.num_params()),
                    ]),
                    vae_dtype: dtype_name(c.vae.dtype()).into(),
                    memory_after_load: memory::sample::<B>(&device, reset),
                });
                report.peak_tflops = Some(bench.peak_tflops);
                report.guidance = Some(bench.guidance);
                let (measurements, summaries) = model::run::<B>(
                    &pipeline,
                    &device,
                    &bench,
                    report.warmup,
                    report.iters,
                    &mut |m| log(&measurement_line(m)),
                )?;
                report.measurements = measurements;
                report.summaries = summaries;
            }
        }
        Ok(report)
    }
}

/// `all`, `none` or the comma list of kernels that are on.
fn kernels_name(set: KernelSet) -> String {
    if set == KernelSet::ALL {
        "all".into()
    } else {
        set.to_string()
    }
}

/// `1.23 s`, `45.6 ms`, `789 µs`.
pub fn format_seconds(s: f64) -> String {
    if s < 0.0 {
        return format!("-{}", format_seconds(-s));
    }
    if s >= 1.0 {
        format!("{s:.3} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.1} µs", s * 1e6)
    }
}

fn format_bytes(b: Option<u64>) -> String {
    match b {
        Some(b) => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        None => "-".into(),
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

fn measurement_line(m: &Measurement) -> String {
    format!(
        "{:<9} {:>9} {:>5} {:>4} {:>5} {:>11} {:>11} {:>8} {:>8} {:>10}",
        m.component.name(),
        format!("{}x{}", m.width, m.height),
        m.batch,
        m.unet_rows,
        m.steps.map_or_else(|| "-".into(), |s| s.to_string()),
        format_seconds(m.timing.median_s),
        format_seconds(m.timing.min_s),
        opt(m.tflop, 3),
        opt(m.achieved_tflops, 2),
        format_bytes(m.memory.peak_bytes()),
    )
}

fn op_line(m: &OpMeasurement) -> String {
    format!(
        "{:<28} {:<6} {:>9} {:<26} {:>11} {:>9.1} {:>8.1}",
        m.name,
        m.variant,
        format!("{}x{}", m.width, m.height),
        m.shape,
        format_seconds(m.timing.median_s),
        m.gflops,
        m.gbps,
    )
}

impl BenchReport {
    /// The report as pretty-printed JSON.
    pub fn to_json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(self)
    }

    /// The report as text tables.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let d = &self.device;
        let _ = writeln!(
            s,
            "hypergen bench ({}) on {} [{}{}], {}, kernels: {}, {} warm-up + {} timed, {}{}",
            self.mode,
            d.label,
            d.backend,
            d.driver
                .as_ref()
                .map_or_else(String::new, |v| format!(", driver {v}")),
            self.dtype,
            self.kernels,
            self.warmup,
            self.iters,
            self.date,
            if d.release_build {
                ""
            } else {
                " (DEBUG BUILD)"
            },
        );
        if let Some(m) = &self.model {
            let total: usize = m.parameters.values().sum();
            let _ = writeln!(
                s,
                "model {}{}: {:.3} B parameters, VAE in {}, loaded in {:.1} s, {} after load",
                m.name,
                if m.random_weights {
                    " (random weights)"
                } else {
                    ""
                },
                total as f64 / 1e9,
                m.vae_dtype,
                m.load_s,
                format_bytes(m.memory_after_load.peak_bytes()),
            );
        }
        if !self.measurements.is_empty() {
            let _ = writeln!(
                s,
                "\n{:<9} {:>9} {:>5} {:>4} {:>5} {:>11} {:>11} {:>8} {:>8} {:>10}",
                "component",
                "size",
                "batch",
                "rows",
                "steps",
                "median",
                "min",
                "TFLOP",
                "TFLOP/s",
                "peak mem"
            );
            for m in &self.measurements {
                let _ = writeln!(s, "{}", measurement_line(m));
            }
        }
        for sum in &self.summaries {
            let _ = writeln!(
                s,
                "\npipeline {}x{}, {} steps:",
                sum.width, sum.height, sum.steps
            );
            for b in &sum.batches {
                let _ = writeln!(
                    s,
                    "  batch {}: {} end to end, {:.3} images/s, step {}, {} TFLOP/s, {}, peak {}",
                    b.batch,
                    format_seconds(b.end_to_end_s),
                    b.images_per_s,
                    b.step_s.map_or_else(|| "-".into(), format_seconds),
                    opt(b.achieved_tflops, 2),
                    match (b.floor_ratio, b.floor_s) {
                        (Some(r), Some(f)) => format!(
                            "{r:.1}× the floor ({} at {} TFLOP/s)",
                            format_seconds(f),
                            self.peak_tflops.unwrap_or(flops::DEFAULT_PEAK_TFLOPS)
                        ),
                        _ => "floor unknown (not SDXL's architecture)".into(),
                    },
                    format_bytes(b.peak_memory_bytes),
                );
                if let Some(k) = &b.breakdown {
                    let pct = |v: f64| 100.0 * v / b.end_to_end_s;
                    let _ = writeln!(
                        s,
                        "    text {} ({:.1}%), unet {} ({:.1}%), scheduler {} ({:.1}%), vae {} ({:.1}%), other {} ({:.1}%)",
                        format_seconds(k.text_s), pct(k.text_s),
                        format_seconds(k.unet_s), pct(k.unet_s),
                        format_seconds(k.scheduler_s), pct(k.scheduler_s),
                        format_seconds(k.vae_s), pct(k.vae_s),
                        format_seconds(k.other_s), pct(k.other_s),
                    );
                }
            }
            if let (Some(b), Some(ips)) = (sum.best_batch, sum.best_images_per_s) {
                let _ = writeln!(s, "  best batch: {b} ({ips:.3} images/s)");
            }
        }
        if !self.ops.is_empty() {
            let _ = writeln!(
                s,
                "\n{:<28} {:<6} {:>9} {:<26} {:>11} {:>9} {:>8} {:>12}",
                "op", "impl", "size", "shape", "median", "GFLOP/s", "GB/s", "plain/fused"
            );
            for m in &self.ops {
                let speedup = (m.variant == "fused")
                    .then(|| {
                        self.ops.iter().find(|p| {
                            p.variant == "plain"
                                && p.name == m.name
                                && (p.width, p.height) == (m.width, m.height)
                        })
                    })
                    .flatten()
                    .map(|p| format!("{:.2}×", p.timing.median_s / m.timing.median_s))
                    .unwrap_or_default();
                let _ = writeln!(s, "{} {:>12}", op_line(m), speedup);
            }
        }
        s
    }
}
