//! The worker: one OS thread that owns the pipeline and runs jobs from a bounded queue,
//! answering each through a oneshot channel. The HTTP side only ever `try_send`s, so a
//! full queue is refused at once and the async runtime never blocks on the model.

mod batch;
mod queue;
mod thread;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::anyhow;
use tokio::sync::{mpsc, oneshot};

use crate::device::{dispatch, DTypeChoice, DeviceSpec};
use crate::error::Error;
use crate::load::lora::{LoraAdapter, LoraSpec};
use crate::load::LoadOptions;
use crate::pipeline::{Encoding, GenerationRequest, ModelInfo, PromptCounter, RunOptions};
use crate::scheduler::SchedulerConfig;

use queue::JobQueue;
use thread::Spawn;

/// The encoded images of a finished job (PNG, JPEG or WebP files, as its [`Encoding`]
/// asked), or why there are none.
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

/// A LoRA adapter a job runs with, beside those merged at start: the request field
/// that named it (`lora_path` or `loras`, for errors) and the parsed adapter (shared
/// with the server's cache) at its scale.
pub type JobLora = (&'static str, LoraSpec<Arc<LoraAdapter>>);

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
    /// Textual-inversion embeddings to load at start (`--embeddings-dir`).
    pub embeddings_dir: Option<std::path::PathBuf>,
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
    /// Device bytes the ControlNets requests asked for may keep loaded between batches
    /// (least recently used dropped first; a batch's own are always loaded).
    pub controlnet_cache_bytes: usize,
}

impl WorkerOptions {
    /// Defaults for `model` on `device` (HyperGen's queue length and no batching, from
    /// `limits`; dtype `auto`; Hub settings from the environment).
    pub fn new(model: String, device: DeviceSpec) -> Self {
        Self {
            model,
            device,
            dtype: DTypeChoice::Auto,
            load: LoadOptions::default(),
            run: RunOptions::default(),
            loras: Vec::new(),
            embeddings_dir: None,
            max_queue_size: crate::app::server::limits::DEFAULT_MAX_QUEUE_SIZE,
            max_batch_size: crate::app::server::limits::DEFAULT_MAX_BATCH_SIZE,
            png_parameters: true,
            hooks: WorkerHooks::default(),
            warmup: None,
            controlnet_cache_bytes: crate::app::server::limits::DEFAULT_CONTROLNET_CACHE_MB << 20,
        }
    }
}

/// The textual-inversion embeddings a worker loaded at start (`--embeddings-dir`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EmbeddingsLoaded {
    /// Whether the server was started with `--embeddings-dir`.
    pub enabled: bool,
    /// Each embedding's name (the prompt's word) and its vector count, by name.
    pub loaded: Vec<(String, usize)>,
    /// Files skipped, each with why (naming the file relative to the directory).
    pub skipped: Vec<String>,
}

/// State shared by the handle and the thread.
struct Shared {
    device: String,
    /// The dtype the model runs in, resolved on the device (`float16`, ...).
    dtype: &'static str,
    /// What was loaded (set before the worker reports ready).
    info: Mutex<Option<ModelInfo>>,
    /// The loaded model's scheduler config (set with `info`).
    scheduler: Mutex<Option<SchedulerConfig>>,
    /// The adapters merged at start.
    loras: Mutex<Vec<LoraSpec<Arc<LoraAdapter>>>>,
    /// The textual-inversion embeddings loaded at start.
    embeddings: Mutex<EmbeddingsLoaded>,
    /// The most `clip_skip` the loaded model takes (set with `info`).
    max_clip_skip: AtomicUsize,
    /// Counts prompts' tokens as the loaded model splits them (set with `info`).
    counter: Mutex<Option<Arc<PromptCounter>>>,
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
    /// The state of a worker on `device` running in `dtype`, with a queue of
    /// `max_queue` jobs; not alive until its model is loaded.
    fn new(device: String, dtype: &'static str, max_queue: usize) -> Self {
        Self {
            device,
            dtype,
            info: Mutex::new(None),
            scheduler: Mutex::new(None),
            loras: Mutex::new(Vec::new()),
            embeddings: Mutex::new(EmbeddingsLoaded::default()),
            max_clip_skip: AtomicUsize::new(0),
            counter: Mutex::new(None),
            max_queue,
            queued: AtomicUsize::new(0),
            waiting: Mutex::new(std::collections::BTreeSet::new()),
            alive: AtomicBool::new(false),
            device_ok: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            aborting: AtomicBool::new(false),
            counters: Counters::default(),
        }
    }

    /// Whether a drain or shutdown has begun: no new jobs are taken.
    fn is_closing(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst) || self.draining.load(Ordering::SeqCst)
    }
}

/// The handle to a running worker; not generic over the backend.
pub struct Worker {
    queue: JobQueue,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
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
        self.queue
            .submit(&self.shared, request, encoding, loras, stream, timing)
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
        self.shared.is_closing()
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
        self.queue.close();
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
    pub fn loras(&self) -> Vec<LoraSpec<Arc<LoraAdapter>>> {
        self.shared
            .loras
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The textual-inversion embeddings loaded at start.
    pub fn embeddings(&self) -> EmbeddingsLoaded {
        self.shared
            .embeddings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Counts prompts' tokens as the loaded model splits them; `None` until it is loaded.
    pub fn prompt_counter(&self) -> Option<Arc<PromptCounter>> {
        self.shared
            .counter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The most `clip_skip` the loaded model takes (its text encoders' layers less one).
    pub fn max_clip_skip(&self) -> usize {
        self.shared.max_clip_skip.load(Ordering::SeqCst)
    }

    /// What was loaded: its id, where from, and whether its weights are random.
    pub fn model_info(&self) -> Option<ModelInfo> {
        self.shared
            .info
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The loaded model's `scheduler_config.json`: what a request's sampler settings
    /// apply to.
    pub fn scheduler_config(&self) -> Option<SchedulerConfig> {
        self.shared
            .scheduler
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
        self.queue.close();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker whose thread never started: its queue, and the thread's side of it.
    fn idle_worker(max_queue: usize) -> (Worker, queue::Batcher) {
        let (queue, batcher) = queue::job_queue(max_queue, 1);
        let shared = Arc::new(Shared::new("cpu".into(), "float32", max_queue));
        shared.alive.store(true, Ordering::SeqCst);
        let worker = Worker {
            queue,
            shared,
            thread: Mutex::new(None),
        };
        (worker, batcher)
    }

    fn submit(worker: &Worker) -> Result<(u64, oneshot::Receiver<JobResult>), SubmitError> {
        worker.submit(GenerationRequest::default(), Encoding::default())
    }

    #[test]
    fn queue_positions_count_the_jobs_ahead() {
        let (worker, mut batcher) = idle_worker(4);
        let answers: Vec<_> = (0..3).map(|_| submit(&worker).expect("queued")).collect();
        let positions = |w: &Worker| (1..=3).map(|id| w.queue_position(id)).collect::<Vec<_>>();
        assert_eq!(positions(&worker), [Some(0), Some(1), Some(2)]);
        assert_eq!(worker.queue_size(), 3);
        let started = batcher.next_batch(&worker.shared).expect("a batch");
        assert_eq!(positions(&worker), [None, Some(0), Some(1)]);
        assert_eq!(worker.queue_size(), 2);
        drop((started, answers));
    }

    #[test]
    fn a_drain_closes_the_queue_and_turns_the_worker_unhealthy() {
        let (worker, _batcher) = idle_worker(4);
        assert!(worker.is_healthy());
        let (_, _answer) = submit(&worker).expect("queued before the drain");
        worker.begin_drain();
        assert!(worker.is_shutting_down());
        assert!(!worker.is_healthy());
        assert_eq!(submit(&worker).unwrap_err(), SubmitError::Closed);
        assert!(!worker.shared.aborting.load(Ordering::SeqCst));
        worker.abort();
        assert!(worker.shared.aborting.load(Ordering::SeqCst));
        assert!(worker.shared.shutting_down.load(Ordering::SeqCst));
        assert_eq!(
            worker.stats(),
            WorkerStats {
                accepted: 1,
                ..WorkerStats::default()
            }
        );
    }
}
