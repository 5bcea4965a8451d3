//! The worker: one OS thread that owns the pipeline and runs jobs from a bounded queue,
//! answering each through a oneshot channel. The HTTP side only ever `try_send`s, so a
//! full queue is refused at once and the async runtime never blocks on the model.

use crate::FusedOps;
use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use tokio::sync::{mpsc, oneshot};

use crate::device::{dispatch, DTypeChoice, DeviceSpec, Placed, WithBackend};
use crate::error::Error;
use crate::load::lora::{apply_loras, remove_loras, ActiveLora, LoraAdapter, LoraSpec};
use crate::load::{load_pipeline, LoadOptions};
use crate::pipeline::{
    a1111_parameters, Encoding, GenerationRequest, ModelInfo, OutputFormat, Preview, Progress,
    RunOptions, SdxlPipeline,
};
use crate::scheduler::SchedulerKind;

/// PNG files of a finished job, or why there are none.
pub type JobResult = Result<Vec<Vec<u8>>, JobError>;

/// Why a job produced no images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobError {
    /// The pipeline failed (message for the client).
    Failed(String),
    /// The server began shutting down before the job started.
    ShuttingDown,
    /// The request cannot run on this model (a LoRA adapter that does not fit it):
    /// a client error naming the field.
    Invalid {
        /// The request field at fault.
        param: &'static str,
        /// Why.
        message: String,
    },
}

/// A LoRA adapter a job runs with, beside those merged at start.
#[derive(Debug, Clone)]
pub struct JobLora {
    /// The parsed adapter (shared with the server's cache).
    pub adapter: Arc<LoraAdapter>,
    /// Its scale.
    pub scale: f32,
    /// The request field that named it (`lora_path` or `loras`), for errors.
    pub param: &'static str,
}

/// Which adapters a job wants: the same adapter values at the same scales.
fn same_loras(a: &[JobLora], b: &[JobLora]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| Arc::ptr_eq(&x.adapter, &y.adapter) && x.scale == y.scale)
}

/// Why a job was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// `max_queue_size` jobs are already waiting.
    QueueFull,
    /// The worker is shutting down or has stopped.
    Closed,
}

/// What a streamed job reports while it runs, before its [`JobResult`].
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// A denoising step finished.
    Progress {
        /// Steps finished.
        step: usize,
        /// Steps in all.
        total: usize,
        /// Seconds since the job's batch started.
        elapsed_seconds: f64,
    },
    /// A partial image of every image of the job, encoded as the job's images are.
    Partial {
        /// Which partial image, from 0.
        index: usize,
        /// One file per image of the job, in order.
        images: Vec<Vec<u8>>,
    },
}

/// How a streamed job reports.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Partial images to decode and send.
    pub partial_images: usize,
    /// Where the job's events go (sends to a dropped receiver are ignored; the reply
    /// channel is what cancels).
    pub events: mpsc::UnboundedSender<JobEvent>,
}

/// How long one job waited and ran, and what it made: filled in by the worker, read by
/// whoever submitted it (the access log, metrics).
#[derive(Debug, Default)]
pub struct JobTiming {
    queue_wait: OnceLock<Duration>,
    inference: OnceLock<Duration>,
    images: AtomicUsize,
}

impl JobTiming {
    /// How long the job waited in the queue, once it started.
    pub fn queue_wait(&self) -> Option<Duration> {
        self.queue_wait.get().copied()
    }

    /// How long its batch's generation took, once it ended.
    pub fn inference(&self) -> Option<Duration> {
        self.inference.get().copied()
    }

    /// Images handed to the job's receiver (0 until it is answered with images).
    pub fn images(&self) -> usize {
        self.images.load(Ordering::Relaxed)
    }
}

/// What the worker reports as it runs jobs (metrics); called on the worker thread, so it
/// must be quick.
pub trait WorkerObserver: Send + Sync {
    /// A batch starts; how long each of its jobs waited in the queue.
    fn batch_started(&self, queue_waits: &[Duration]);
    /// A denoising step of the running batch ended, `took` after the previous one.
    fn step_finished(&self, took: Duration);
    /// The running batch of `jobs` jobs ended (however it ended) after `took`, before
    /// its jobs are answered.
    fn batch_finished(&self, jobs: usize, took: Duration);
    /// The device allocator's memory after a batch (backends that manage device memory).
    fn device_memory(&self, memory: crate::DeviceMemory);
}

/// One accepted request.
struct Job {
    id: u64,
    /// When it was accepted.
    queued_at: Instant,
    timing: Arc<JobTiming>,
    request: GenerationRequest,
    /// The file format of its images (the worker adds the PNG parameters text).
    encoding: Encoding,
    /// Set for a streamed job.
    stream: Option<StreamOptions>,
    /// LoRA adapters for this job only.
    loras: Vec<JobLora>,
    reply: oneshot::Sender<JobResult>,
}

impl Job {
    /// Partial images the job wants: jobs that want different numbers do not share
    /// a batch, since a batch decodes its previews together.
    fn partial_images(&self) -> usize {
        self.stream.as_ref().map_or(0, |s| s.partial_images)
    }
}

/// Counters of what happened to jobs since the worker started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Jobs accepted into the queue.
    pub accepted: u64,
    /// Jobs refused because the queue was full.
    pub refused: u64,
    /// Jobs that began running.
    pub started: u64,
    /// Jobs that finished and were answered.
    pub completed: u64,
    /// Jobs that failed (answered with an error).
    pub failed: u64,
    /// Jobs whose client went away while they ran (stopped at the next step), or that a
    /// drain out of time stopped.
    pub cancelled: u64,
    /// Jobs whose client went away before they started (never run).
    pub skipped: u64,
    /// Queued jobs refused because the server was shutting down.
    pub shut_out: u64,
    /// Requests whose client went away while they waited for their answer.
    pub abandoned: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    started: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    skipped: AtomicU64,
    shut_out: AtomicU64,
    abandoned: AtomicU64,
}

fn bump(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

/// Called on the worker thread with the number of jobs, before each batch runs.
pub type BatchHook = Arc<dyn Fn(usize) + Send + Sync>;

/// Where the worker calls a [`FaultHook`].
#[derive(Debug, Clone, Copy)]
pub enum FaultPoint<'a> {
    /// Inside a batch's fault boundary, before it generates: the batch's requests.
    Batch(&'a [GenerationRequest]),
    /// The device check after a failed batch (see [`Worker::is_healthy`]).
    Probe,
}

/// Injects faults for tests: may panic or return an error where a real fault would.
pub type FaultHook = Arc<dyn Fn(FaultPoint<'_>) -> Result<(), Error> + Send + Sync>;

/// Instrumentation for tests and metrics; none by default.
#[derive(Clone, Default)]
pub struct WorkerHooks {
    /// Runs before each batch (after its jobs left the queue).
    pub before_batch: Option<BatchHook>,
    /// Runs inside each batch's fault boundary and in the device check after a failure.
    pub fault: Option<FaultHook>,
    /// Hears of batches, steps and device memory (the server's metrics).
    pub observer: Option<Arc<dyn WorkerObserver>>,
}

impl std::fmt::Debug for WorkerHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerHooks")
            .field("before_batch", &self.before_batch.is_some())
            .field("fault", &self.fault.is_some())
            .field("observer", &self.observer.is_some())
            .finish()
    }
}

/// A small generation run before the worker reports ready, so that the device's kernels
/// are compiled and autotuned before the first request (which would pay for them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmUp {
    /// Image width in pixels (kernels are tuned per shape: the size requests will use).
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Denoising steps (≥ 1; the same kernels run at every step).
    pub steps: usize,
    /// Skip it on the CPU backend, which compiles and tunes nothing.
    pub gpu_only: bool,
}

/// What the worker loads, where it runs, and how it schedules.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The model: a diffusers-layout folder, a built-in name or a Hub id.
    pub model: String,
    /// The device to run on.
    pub device: DeviceSpec,
    /// The dtype to run in (`auto`: as the device prefers).
    pub dtype: DTypeChoice,
    /// Weight variant, VAE, Hub revision and Hub settings.
    pub load: LoadOptions,
    /// VAE tiling.
    pub run: RunOptions,
    /// LoRA adapters merged at start (`--lora`).
    pub loras: Vec<LoraSpec>,
    /// Accepted jobs that may wait (≥ 1).
    pub max_queue_size: usize,
    /// Most compatible jobs run as one batch (≥ 1).
    pub max_batch_size: usize,
    /// Write the generation parameters into PNGs (a `parameters` text chunk, as A1111
    /// does); `hypergen serve --no-png-parameters` turns it off.
    pub png_parameters: bool,
    /// Instrumentation.
    pub hooks: WorkerHooks,
    /// Generate once before reporting ready; `None`: no warm-up.
    pub warmup: Option<WarmUp>,
}

impl WorkerOptions {
    /// Defaults for `model` on `device` (HyperGen's queue of 100, no batching; dtype
    /// `auto`; Hub settings from the environment).
    pub fn new(model: String, device: DeviceSpec) -> Self {
        Self {
            model,
            device,
            dtype: DTypeChoice::Auto,
            load: LoadOptions::default(),
            run: RunOptions::default(),
            loras: Vec::new(),
            max_queue_size: 100,
            max_batch_size: 1,
            png_parameters: true,
            hooks: WorkerHooks::default(),
            warmup: None,
        }
    }
}

/// State shared by the handle and the thread.
struct Shared {
    device: String,
    /// The dtype the model runs in, resolved on the device (`float16`, ...).
    dtype: &'static str,
    /// What was loaded (set before the worker reports ready).
    info: Mutex<Option<ModelInfo>>,
    /// The adapters merged at start.
    loras: Mutex<Vec<ActiveLora>>,
    max_queue: usize,
    /// Accepted jobs not yet started (or dropped).
    queued: AtomicUsize,
    /// Ids of those jobs, for queue positions (ids grow, and the queue is in id order).
    waiting: Mutex<std::collections::BTreeSet<u64>>,
    alive: AtomicBool,
    /// Whether the device passed its check after the last failed batch.
    device_ok: AtomicBool,
    /// Draining: no new jobs, but the queued ones still run.
    draining: AtomicBool,
    shutting_down: AtomicBool,
    /// Stop the running batch at its next step (the drain ran out of time).
    aborting: AtomicBool,
    counters: Counters,
}

impl Shared {
    /// Forgets a job's place in the queue.
    fn leave_queue(&self, id: u64) {
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Takes `job` off the queue's books unless it should run: refused when shutting
    /// down, skipped when its client is gone.
    fn admit(&self, job: Job) -> Option<Job> {
        if self.shutting_down.load(Ordering::SeqCst) {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            self.leave_queue(job.id);
            bump(&self.counters.shut_out, 1);
            tracing::info!(job = job.id, "refused queued job: shutting down");
            let _ = job.reply.send(Err(JobError::ShuttingDown));
            return None;
        }
        if job.reply.is_closed() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            self.leave_queue(job.id);
            bump(&self.counters.skipped, 1);
            tracing::info!(
                job = job.id,
                "client went away before the job started; dropped"
            );
            return None;
        }
        Some(job)
    }
}

/// Clears `alive` when the worker thread ends, however it ends.
struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
    }
}

/// The handle to a running worker; not generic over the backend.
pub struct Worker {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("device", &self.shared.device)
            .field("queue_size", &self.queue_size())
            .field("healthy", &self.is_healthy())
            .finish()
    }
}

impl Worker {
    /// Loads the model on the backend `options.device` names, on a new worker thread,
    /// and returns once it is loaded (or with the load error).
    pub fn spawn(options: WorkerOptions) -> anyhow::Result<Worker> {
        if options.max_queue_size == 0 {
            return Err(anyhow!("--max-queue-size must be at least 1"));
        }
        if options.max_batch_size == 0 {
            return Err(anyhow!("--max-batch-size must be at least 1"));
        }
        let device = options.device.clone();
        dispatch(&device, Spawn(options))?
    }

    /// Queues a request whose images are written as `encoding` says; never waits. The
    /// receiver gets the encoded images or the failure.
    pub fn submit(
        &self,
        request: GenerationRequest,
        encoding: Encoding,
    ) -> Result<(u64, oneshot::Receiver<JobResult>), SubmitError> {
        self.submit_job(request, encoding, Vec::new(), None, Arc::default())
    }

    /// [`submit`](Self::submit) that also reports progress and partial images through
    /// `stream` while the job runs.
    pub fn submit_streaming(
        &self,
        request: GenerationRequest,
        encoding: Encoding,
        stream: Option<StreamOptions>,
    ) -> Result<(u64, oneshot::Receiver<JobResult>), SubmitError> {
        self.submit_job(request, encoding, Vec::new(), stream, Arc::default())
    }

    /// Queues a job that runs with `loras` merged (beside those merged at start), with
    /// `stream` reports progress and partial images while it runs, and reports its
    /// queue wait, inference time and images through `timing`.
    pub fn submit_job(
        &self,
        request: GenerationRequest,
        encoding: Encoding,
        loras: Vec<JobLora>,
        stream: Option<StreamOptions>,
        timing: Arc<JobTiming>,
    ) -> Result<(u64, oneshot::Receiver<JobResult>), SubmitError> {
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = guard.as_ref() else {
            return Err(SubmitError::Closed);
        };
        if self.is_shutting_down() {
            return Err(SubmitError::Closed);
        }
        let shared = &self.shared;
        // Admission by count, so that jobs the worker has taken off the channel but
        // not started still count against the limit.
        if shared.queued.fetch_add(1, Ordering::SeqCst) >= shared.max_queue {
            shared.queued.fetch_sub(1, Ordering::SeqCst);
            bump(&shared.counters.refused, 1);
            return Err(SubmitError::QueueFull);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Before sending, so that the worker never takes a job not yet on the books.
        shared
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        let (reply, rx) = oneshot::channel();
        match tx.try_send(Job {
            id,
            queued_at: Instant::now(),
            timing,
            request,
            encoding,
            stream,
            loras,
            reply,
        }) {
            Ok(()) => {
                bump(&shared.counters.accepted, 1);
                Ok((id, rx))
            }
            Err(e) => {
                shared.queued.fetch_sub(1, Ordering::SeqCst);
                shared.leave_queue(id);
                match e {
                    mpsc::error::TrySendError::Full(_) => {
                        bump(&shared.counters.refused, 1);
                        Err(SubmitError::QueueFull)
                    }
                    mpsc::error::TrySendError::Closed(_) => Err(SubmitError::Closed),
                }
            }
        }
    }

    /// Accepted jobs not yet started.
    pub fn queue_size(&self) -> usize {
        self.shared.queued.load(Ordering::SeqCst)
    }

    /// How many accepted jobs wait ahead of job `id`, or `None` once it has left the
    /// queue (started, or dropped).
    pub fn queue_position(&self, id: u64) -> Option<usize> {
        let waiting = self
            .shared
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        waiting.contains(&id).then(|| waiting.range(..id).count())
    }

    /// The queue's capacity.
    pub fn max_queue_size(&self) -> usize {
        self.shared.max_queue
    }

    /// Whether the worker is running and can serve: false once it stopped, while
    /// shutting down, and from a failed batch (a panic, out of memory) until the device
    /// passes a check again (a small computation read back, run after the failure and
    /// before each later batch until it passes).
    pub fn is_healthy(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
            && self.shared.device_ok.load(Ordering::SeqCst)
            && !self.is_shutting_down()
    }

    /// Whether shutdown (or a drain) has begun: no new jobs are taken.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutting_down.load(Ordering::SeqCst)
            || self.shared.draining.load(Ordering::SeqCst)
    }

    /// Whether the worker thread has ended (after a drain or shutdown, once its queue
    /// is empty and its last batch done).
    pub fn has_stopped(&self) -> bool {
        !self.shared.alive.load(Ordering::SeqCst)
    }

    /// Stops taking jobs but keeps running the queued ones; the thread ends once the
    /// queue is empty ([`has_stopped`](Self::has_stopped)). [`abort`](Self::abort) cuts
    /// a drain short.
    pub fn begin_drain(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Ends a drain that ran out of time: queued jobs are refused and the running batch
    /// stops at its next step, all answered [`JobError::ShuttingDown`].
    pub fn abort(&self) {
        self.shared.aborting.store(true, Ordering::SeqCst);
        self.begin_shutdown();
    }

    /// The device the model runs on.
    pub fn device(&self) -> &str {
        &self.shared.device
    }

    /// The dtype the model runs in (`--dtype auto` resolved).
    pub fn dtype(&self) -> &'static str {
        self.shared.dtype
    }

    /// The LoRA adapters merged at start (`--lora`), with their scales.
    pub fn loras(&self) -> Vec<ActiveLora> {
        self.shared
            .loras
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// What was loaded: its id, where from, and whether its weights are random.
    pub fn model_info(&self) -> Option<ModelInfo> {
        self.shared
            .info
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// What happened to jobs so far.
    pub fn stats(&self) -> WorkerStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::SeqCst);
        WorkerStats {
            accepted: get(&c.accepted),
            refused: get(&c.refused),
            started: get(&c.started),
            completed: get(&c.completed),
            failed: get(&c.failed),
            cancelled: get(&c.cancelled),
            skipped: get(&c.skipped),
            shut_out: get(&c.shut_out),
            abandoned: get(&c.abandoned),
        }
    }

    /// Records that a request's client went away while it waited (its answer receiver
    /// is already dropped, so the worker skips or stops the job).
    pub fn note_abandoned(&self) {
        bump(&self.shared.counters.abandoned, 1);
    }

    /// Stops taking jobs: the running batch finishes, queued jobs are refused
    /// ([`JobError::ShuttingDown`]), and the thread ends once the queue is empty.
    pub fn begin_shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        // Dropping the only sender lets the thread see the end of the queue.
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Waits for the thread to end (after [`begin_shutdown`](Self::begin_shutdown)).
    /// Blocking: call it off the async runtime.
    pub fn join(&self) {
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!("the worker thread panicked");
            }
        }
    }
}

/// The [`WithBackend`] body that starts the worker on the chosen backend.
struct Spawn(WorkerOptions);

impl WithBackend for Spawn {
    type Output = anyhow::Result<Worker>;

    fn dtype(&self) -> Option<DTypeChoice> {
        Some(self.0.dtype)
    }

    fn run<B: FusedOps>(self, device: B::Device, placed: Placed) -> anyhow::Result<Worker> {
        let options = self.0;
        let (tx, rx) = mpsc::channel(options.max_queue_size);
        let dtype = placed.dtype;
        let shared = Arc::new(Shared {
            device: placed.label,
            dtype: crate::device::dtype_name(dtype),
            info: Mutex::new(None),
            loras: Mutex::new(Vec::new()),
            max_queue: options.max_queue_size,
            queued: AtomicUsize::new(0),
            waiting: Mutex::new(std::collections::BTreeSet::new()),
            alive: AtomicBool::new(false),
            device_ok: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            aborting: AtomicBool::new(false),
            counters: Counters::default(),
        });
        // The CPU backend's label (see `Placed::label`).
        let on_cpu = shared.device == "cpu";
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("hypergen-worker".into())
            .spawn(move || {
                let loaded = catch_unwind(AssertUnwindSafe(|| {
                    let mut p = load_pipeline::<B>(
                        &options.model,
                        dtype,
                        &options.load,
                        &options.run,
                        &device,
                    )?;
                    let base = read_start_loras(&options.loras)?;
                    if !base.is_empty() {
                        let list: Vec<(&LoraAdapter, f32)> =
                            base.iter().map(|l| (&*l.adapter, l.scale)).collect();
                        apply_loras(p.components_mut(), &list)?;
                    }
                    match options.warmup {
                        Some(w) if w.gpu_only && on_cpu => {}
                        Some(w) => warm_up(&p, w)?,
                        None => {}
                    }
                    Ok::<_, crate::Error>((p, base))
                }));
                let (pipeline, base) = match loaded {
                    Ok(Ok((p, base))) => {
                        let info = p.components().info.clone();
                        *thread_shared.info.lock().unwrap_or_else(|p| p.into_inner()) = Some(info);
                        *thread_shared
                            .loras
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) =
                            p.components().loras.active().to_vec();
                        (p, base)
                    }
                    Ok(Err(e)) => {
                        let _ = ready_tx.send(Err(anyhow::Error::new(e)));
                        return;
                    }
                    Err(panic) => {
                        let _ = ready_tx.send(Err(anyhow!(
                            "loading the model panicked: {}",
                            panic_message(&panic)
                        )));
                        return;
                    }
                };
                thread_shared.alive.store(true, Ordering::SeqCst);
                let guard = AliveGuard(thread_shared);
                let _ = ready_tx.send(Ok(()));
                serve_jobs(pipeline, &base, &device, rx, &guard.0, &options);
            })
            .context("starting the worker thread")?;
        let loaded = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(anyhow!("the worker thread stopped while loading the model")));
        if let Err(e) = loaded {
            let _ = thread.join();
            return Err(e);
        }
        Ok(Worker {
            tx: Mutex::new(Some(tx)),
            shared,
            thread: Mutex::new(Some(thread)),
            next_id: AtomicU64::new(1),
        })
    }
}

/// Reads the adapters merged at start (`--lora`).
fn read_start_loras(specs: &[LoraSpec]) -> crate::Result<Vec<JobLora>> {
    specs
        .iter()
        .map(|s| {
            Ok(JobLora {
                adapter: Arc::new(LoraAdapter::read(&s.path)?),
                scale: s.scale,
                param: "lora",
            })
        })
        .collect()
}

/// Runs one generation of `warmup`'s size with the server's default guidance (so with
/// the same batch shapes as a default request), outside the metrics and the queue.
fn warm_up<B: FusedOps>(pipeline: &SdxlPipeline<B>, warmup: WarmUp) -> Result<(), Error> {
    let request = GenerationRequest {
        prompt: "warm-up".into(),
        num_inference_steps: warmup.steps,
        guidance_scale: crate::pipeline::RequestDefaults::HYPERGEN_API.guidance_scale,
        width: warmup.width,
        height: warmup.height,
        ..Default::default()
    };
    let start = Instant::now();
    // The path requests take (run_batch), PNG encoding included, so that the same
    // kernels are compiled and tuned.
    let outputs = pipeline.generate_batch_with_previews(
        &[request],
        &mut |_| ControlFlow::Continue(()),
        0,
        &mut |_| ControlFlow::Continue(()),
    )?;
    for out in &outputs {
        for image in &out.images {
            image.to_png()?;
        }
    }
    tracing::info!(
        width = warmup.width,
        height = warmup.height,
        steps = warmup.steps,
        seconds = start.elapsed().as_secs_f64(),
        "warmed up"
    );
    Ok(())
}

/// The worker thread's loop: gather a batch, run it, repeat until the queue closes.
/// `base` are the adapters merged at start; a batch's own adapters are merged beside
/// them before it runs and stay merged until a batch wants another set.
fn serve_jobs<B: FusedOps>(
    mut pipeline: SdxlPipeline<B>,
    base: &[JobLora],
    device: &B::Device,
    mut rx: mpsc::Receiver<Job>,
    shared: &Shared,
    options: &WorkerOptions,
) {
    // A job taken while gathering a batch that it cannot join waits here for the next.
    let mut pending: Option<Job> = None;
    // The per-job adapters merged now (beside `base`); `None`: unknown, merge again.
    let mut merged: Option<Vec<JobLora>> = Some(Vec::new());
    loop {
        let job = match pending.take() {
            Some(job) => job,
            None => match rx.blocking_recv() {
                Some(job) => job,
                None => break,
            },
        };
        let Some(job) = shared.admit(job) else {
            continue;
        };
        let mut batch = vec![job];
        while batch.len() < options.max_batch_size {
            let Ok(next) = rx.try_recv() else {
                break;
            };
            let Some(next) = shared.admit(next) else {
                continue;
            };
            if batch[0].request.batch_compatible(&next.request)
                && batch[0].partial_images() == next.partial_images()
                && same_loras(&batch[0].loras, &next.loras)
            {
                batch.push(next);
            } else {
                pending = Some(next);
                break;
            }
        }
        shared.queued.fetch_sub(batch.len(), Ordering::SeqCst);
        for job in &batch {
            shared.leave_queue(job.id);
        }
        let observer = options.hooks.observer.as_deref();
        let now = Instant::now();
        let waits: Vec<Duration> = batch.iter().map(|j| now - j.queued_at).collect();
        for (job, wait) in batch.iter().zip(&waits) {
            let _ = job.timing.queue_wait.set(*wait);
        }
        if let Some(observer) = observer {
            observer.batch_started(&waits);
        }
        if let Some(hook) = &options.hooks.before_batch {
            hook(batch.len());
        }
        if !shared.device_ok.load(Ordering::SeqCst) && !device_check::<B>(device, shared, options) {
            let message = "the device failed and has not recovered; the server cannot \
                           generate until it does (or is restarted)";
            bump(&shared.counters.failed, batch.len());
            for job in batch {
                let _ = job.reply.send(Err(JobError::Failed(message.into())));
            }
            continue;
        }
        if merged
            .as_deref()
            .is_none_or(|m| !same_loras(m, &batch[0].loras))
        {
            let switched = catch_unwind(AssertUnwindSafe(|| {
                switch_loras(&mut pipeline, base, &batch[0].loras)
            }));
            let refusal = match switched {
                Ok(Ok(())) => {
                    merged = Some(batch[0].loras.clone());
                    None
                }
                // Checked before anything changed: the model still holds `merged`.
                Ok(Err(e)) => Some(JobError::Invalid {
                    param: batch[0].loras.first().map_or("lora_path", |l| l.param),
                    message: e.to_string(),
                }),
                Err(panic) => {
                    // A part may be merged: put every kept base tensor back, and merge
                    // again before the next batch whatever it wants.
                    let _ =
                        catch_unwind(AssertUnwindSafe(|| remove_loras(pipeline.components_mut())));
                    merged = None;
                    Some(JobError::Failed(format!(
                        "merging LoRA adapters panicked: {}",
                        panic_message(&panic)
                    )))
                }
            };
            if let Some(error) = refusal {
                tracing::warn!(jobs = ?batch.iter().map(|j| j.id).collect::<Vec<_>>(), error = ?error, "LoRA adapters not merged");
                bump(&shared.counters.started, batch.len());
                bump(&shared.counters.failed, batch.len());
                for job in batch {
                    let _ = job.reply.send(Err(error.clone()));
                }
                continue;
            }
        }
        if run_batch(&pipeline, batch, shared, options, observer) {
            // Give back what the failed batch left in the device's memory pools, then
            // make sure the device still computes before reporting healthy again.
            shared.device_ok.store(false, Ordering::SeqCst);
            device_check::<B>(device, shared, options);
        }
        if let Some(observer) = observer {
            if let Some(memory) = B::device_memory(device) {
                observer.device_memory(memory);
            }
        }
    }
    tracing::info!("worker stopped");
}

/// Merges `base` and `extra` in place of what is merged now; on an error (an adapter
/// that does not fit) the model is left as it was.
fn switch_loras<B: FusedOps>(
    pipeline: &mut SdxlPipeline<B>,
    base: &[JobLora],
    extra: &[JobLora],
) -> crate::Result<()> {
    let start = Instant::now();
    let list: Vec<(&LoraAdapter, f32)> = base
        .iter()
        .chain(extra)
        .map(|l| (&*l.adapter, l.scale))
        .collect();
    if list.is_empty() {
        remove_loras(pipeline.components_mut());
    } else {
        apply_loras(pipeline.components_mut(), &list)?;
    }
    tracing::info!(
        adapters = ?extra.iter().map(|l| (l.adapter.name(), l.scale)).collect::<Vec<_>>(),
        seconds = start.elapsed().as_secs_f64(),
        "switched per-request LoRA adapters"
    );
    Ok(())
}

/// Frees cached device memory and runs a small computation on the device, read back;
/// records (and returns) whether it worked. Never panics.
fn device_check<B: FusedOps>(device: &B::Device, shared: &Shared, options: &WorkerOptions) -> bool {
    let ok = catch_unwind(AssertUnwindSafe(|| {
        B::memory_cleanup(device);
        if let Some(hook) = &options.hooks.fault {
            hook(FaultPoint::Probe)?;
        }
        let sum = burn::tensor::Tensor::<B, 1>::from_floats([1.0, 2.0, 3.0], device)
            .sum()
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .unwrap_or_default();
        if sum == [6.0] {
            Ok(())
        } else {
            Err(Error::Backend(format!("1 + 2 + 3 gave {sum:?}")))
        }
    }));
    let ok = match ok {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "the device check failed");
            false
        }
        Err(panic) => {
            tracing::error!(error = %panic_message(&panic), "the device check panicked");
            false
        }
    };
    if ok && !shared.device_ok.swap(true, Ordering::SeqCst) {
        tracing::info!("the device passed its check; serving again");
    }
    ok
}

/// Whether a failure's message is a device (or host) out-of-memory, as CubeCL, wgpu and
/// CUDA word it.
fn is_out_of_memory(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "out of memory",
        "out-of-memory",
        "outofmemory",
        "out_of_memory",
        "can't allocate buffer",
        "not enough memory",
    ]
    .iter()
    .any(|needle| m.contains(needle))
}

/// The client's message for a failed batch: an out-of-memory says what to change; any
/// other failure its first line (backtraces stay in the log).
fn failure_message(raw: &str, batch: &[Job]) -> String {
    let first = raw.lines().next().unwrap_or(raw).trim();
    if !is_out_of_memory(raw) {
        return first.to_string();
    }
    let r = &batch[0].request;
    let images: usize = batch.iter().map(|j| j.request.num_images).sum();
    format!(
        "out of memory on the device for {images} image(s) of {}x{} ({first}); its memory \
         was freed: retry with a smaller size or fewer images",
        r.width, r.height
    )
}

/// Runs one batch and answers its jobs; returns whether it failed in a way that may
/// have left the device in trouble (a panic, out of memory), to be checked.
fn run_batch<B: FusedOps>(
    pipeline: &SdxlPipeline<B>,
    batch: Vec<Job>,
    shared: &Shared,
    options: &WorkerOptions,
    observer: Option<&dyn WorkerObserver>,
) -> bool {
    let png_parameters = options.png_parameters;
    let c = &shared.counters;
    bump(&c.started, batch.len());
    let ids: Vec<u64> = batch.iter().map(|j| j.id).collect();
    let first = &batch[0].request;
    tracing::info!(
        jobs = ?ids,
        width = first.width,
        height = first.height,
        steps = first.num_inference_steps,
        "generating"
    );
    let requests: Vec<GenerationRequest> = batch.iter().map(|j| j.request.clone()).collect();
    let start = Instant::now();
    // Stop early when nobody is waiting for any image of the batch, or when a drain
    // ran out of time.
    let all_gone =
        || shared.aborting.load(Ordering::SeqCst) || batch.iter().all(|j| j.reply.is_closed());
    let mut last_step = start;
    let mut on_step = |p: Progress| {
        // Step 0 comes before the first step (after text encoding): it only starts the
        // clock.
        let now = Instant::now();
        if let (Some(observer), true) = (observer, p.step > 0) {
            observer.step_finished(now - last_step);
        }
        last_step = now;
        for job in &batch {
            if let Some(stream) = &job.stream {
                let _ = stream.events.send(JobEvent::Progress {
                    step: p.step,
                    total: p.total,
                    elapsed_seconds: start.elapsed().as_secs_f64(),
                });
            }
        }
        if all_gone() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let mut on_preview = |p: Preview| {
        for (job, images) in batch.iter().zip(&p.images) {
            let Some(stream) = &job.stream else {
                continue;
            };
            // Partial images carry no parameters text: they are not the result.
            let files: Result<Vec<Vec<u8>>, Error> =
                images.iter().map(|img| img.encode(&job.encoding)).collect();
            match files {
                Ok(images) => {
                    let _ = stream.events.send(JobEvent::Partial {
                        index: p.index,
                        images,
                    });
                }
                Err(e) => tracing::warn!(job = job.id, error = %e, "partial image not encoded"),
            }
        }
        if all_gone() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let previews = batch[0].partial_images();
    // The fault boundary: a panic anywhere in the generation fails this batch alone.
    // The pipeline is only read here, so a panic cannot leave it half-changed.
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        if let Some(hook) = &options.hooks.fault {
            hook(FaultPoint::Batch(&requests))?;
        }
        pipeline.generate_batch_with_previews(&requests, &mut on_step, previews, &mut on_preview)
    }));
    // Before answering: the receivers' side reads it as soon as they hear.
    let took = start.elapsed();
    for job in &batch {
        let _ = job.timing.inference.set(took);
    }
    if let Some(observer) = observer {
        observer.batch_finished(batch.len(), took);
    }
    let failure = match outcome {
        Ok(Ok(outputs)) => {
            for (job, out) in batch.into_iter().zip(outputs) {
                let mut encoding = job.encoding.clone();
                if png_parameters && encoding.format == OutputFormat::Png {
                    encoding.parameters = Some(parameters_text(pipeline, &job.request));
                }
                let pngs: Result<Vec<Vec<u8>>, Error> =
                    out.images.iter().map(|img| img.encode(&encoding)).collect();
                let answer = pngs.map_err(|e| JobError::Failed(e.to_string()));
                let failed = answer.is_err();
                // Before answering: the receiver's side reads it as soon as it hears.
                job.timing
                    .images
                    .store(answer.as_ref().map_or(0, Vec::len), Ordering::Relaxed);
                if job.reply.send(answer).is_err() {
                    bump(&c.cancelled, 1);
                    tracing::info!(job = job.id, "client went away; result discarded");
                } else if failed {
                    bump(&c.failed, 1);
                } else {
                    bump(&c.completed, 1);
                }
            }
            tracing::info!(jobs = ?ids, seconds = start.elapsed().as_secs_f64(), "generated");
            return false;
        }
        Ok(Err(Error::Cancelled)) if shared.aborting.load(Ordering::SeqCst) => {
            bump(&c.cancelled, batch.len());
            tracing::warn!(jobs = ?ids, "drain timed out; generation stopped");
            for job in batch {
                let _ = job.reply.send(Err(JobError::ShuttingDown));
            }
            return false;
        }
        Ok(Err(Error::Cancelled)) => {
            bump(&c.cancelled, batch.len());
            tracing::info!(jobs = ?ids, "every client went away; generation cancelled");
            return false;
        }
        Ok(Err(e)) => (e.to_string(), false),
        Err(panic) => (
            format!("the generation panicked: {}", panic_message(&panic)),
            true,
        ),
    };
    let (failure, panicked) = failure;
    tracing::error!(jobs = ?ids, error = %failure, "generation failed");
    let message = failure_message(&failure, &batch);
    bump(&c.failed, batch.len());
    for job in batch {
        let _ = job.reply.send(Err(JobError::Failed(message.clone())));
    }
    panicked || is_out_of_memory(&failure)
}

/// A1111's `parameters` text for a request: its scheduler (or the model's own) and the
/// model's id.
fn parameters_text<B: FusedOps>(pipeline: &SdxlPipeline<B>, req: &GenerationRequest) -> String {
    let c = pipeline.components();
    let kind = req.scheduler.or_else(|| {
        c.scheduler_config.class_name.as_deref().and_then(|class| {
            SchedulerKind::from_class_name(class, c.scheduler_config.use_karras_sigmas)
        })
    });
    a1111_parameters(req, kind.unwrap_or(SchedulerKind::Euler), &c.info.id)
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
