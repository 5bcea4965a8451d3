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
use crate::load::lora::{apply_lora_specs, ActiveLora, LoraSpec};
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

/// Instrumentation for tests and metrics; none by default.
#[derive(Clone, Default)]
pub struct WorkerHooks {
    /// Runs before each batch (after its jobs left the queue).
    pub before_batch: Option<BatchHook>,
    /// Hears of batches, steps and device memory (the server's metrics).
    pub observer: Option<Arc<dyn WorkerObserver>>,
}

impl std::fmt::Debug for WorkerHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerHooks")
            .field("before_batch", &self.before_batch.is_some())
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
        self.submit_streaming(request, encoding, None)
    }

    /// [`submit`](Self::submit) that also reports progress and partial images through
    /// `stream` while the job runs.
    pub fn submit_streaming(
        &self,
        request: GenerationRequest,
        encoding: Encoding,
        stream: Option<StreamOptions>,
    ) -> Result<(u64, oneshot::Receiver<JobResult>), SubmitError> {
        self.submit_timed(request, encoding, stream, Arc::default())
    }

    /// [`submit_streaming`](Self::submit_streaming) that reports the job's queue wait,
    /// inference time and images through `timing`.
    pub fn submit_timed(
        &self,
        request: GenerationRequest,
        encoding: Encoding,
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

    /// Whether the worker is running and taking jobs.
    pub fn is_healthy(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst) && !self.is_shutting_down()
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
                    apply_lora_specs(p.components_mut(), &options.loras)?;
                    match options.warmup {
                        Some(w) if w.gpu_only && on_cpu => {}
                        Some(w) => warm_up(&p, w)?,
                        None => {}
                    }
                    Ok::<_, crate::Error>(p)
                }));
                let pipeline = match loaded {
                    Ok(Ok(p)) => {
                        let info = p.components().info.clone();
                        *thread_shared.info.lock().unwrap_or_else(|p| p.into_inner()) = Some(info);
                        *thread_shared
                            .loras
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) =
                            p.components().loras.active().to_vec();
                        p
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
                serve_jobs(&pipeline, &device, rx, &guard.0, &options);
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
fn serve_jobs<B: FusedOps>(
    pipeline: &SdxlPipeline<B>,
    device: &B::Device,
    mut rx: mpsc::Receiver<Job>,
    shared: &Shared,
    options: &WorkerOptions,
) {
    // A job taken while gathering a batch that it cannot join waits here for the next.
    let mut pending: Option<Job> = None;
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
        run_batch(pipeline, batch, shared, options.png_parameters, observer);
        if let Some(observer) = observer {
            if let Some(memory) = B::device_memory(device) {
                observer.device_memory(memory);
            }
        }
    }
    tracing::info!("worker stopped");
}

fn run_batch<B: FusedOps>(
    pipeline: &SdxlPipeline<B>,
    batch: Vec<Job>,
    shared: &Shared,
    png_parameters: bool,
    observer: Option<&dyn WorkerObserver>,
) {
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
    let outcome = catch_unwind(AssertUnwindSafe(|| {
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
            return;
        }
        Ok(Err(Error::Cancelled)) if shared.aborting.load(Ordering::SeqCst) => {
            bump(&c.cancelled, batch.len());
            tracing::warn!(jobs = ?ids, "drain timed out; generation stopped");
            for job in batch {
                let _ = job.reply.send(Err(JobError::ShuttingDown));
            }
            return;
        }
        Ok(Err(Error::Cancelled)) => {
            bump(&c.cancelled, batch.len());
            tracing::info!(jobs = ?ids, "every client went away; generation cancelled");
            return;
        }
        Ok(Err(e)) => e.to_string(),
        Err(panic) => format!("the generation panicked: {}", panic_message(&panic)),
    };
    tracing::error!(jobs = ?ids, error = %failure, "generation failed");
    bump(&c.failed, batch.len());
    for job in batch {
        let _ = job.reply.send(Err(JobError::Failed(failure.clone())));
    }
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
