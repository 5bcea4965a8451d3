//! Queue admission and batching: which submitted jobs are accepted, which queued jobs
//! still run, and which may share a batch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::{bump, JobError, JobLora, JobResult, JobTiming, Shared, StreamOptions, SubmitError};
use crate::load::lora::{same_loras, LoraAdapter, LoraSpec};
use crate::pipeline::{Encoding, GenerationRequest};

/// One accepted request.
pub(super) struct QueuedJob {
    pub(super) id: u64,
    /// When it was accepted.
    pub(super) queued_at: Instant,
    pub(super) timing: Arc<JobTiming>,
    pub(super) request: GenerationRequest,
    /// The file format of its images (the worker adds the PNG parameters text).
    pub(super) encoding: Encoding,
    /// Set for a streamed job.
    pub(super) stream: Option<StreamOptions>,
    /// LoRA adapters for this job only, merged beside those merged at start.
    pub(super) loras: Vec<LoraSpec<Arc<LoraAdapter>>>,
    /// The request field that named the first of them (`lora_path` when none), which
    /// an adapter that does not fit the model is blamed on.
    pub(super) lora_param: &'static str,
    pub(super) reply: oneshot::Sender<JobResult>,
}

impl QueuedJob {
    /// Partial images the job wants: jobs that want different numbers do not share
    /// a batch, since a batch decodes its previews together.
    pub(super) fn partial_images(&self) -> usize {
        self.stream.as_ref().map_or(0, |s| s.partial_images)
    }

    /// Whether `other` may run in one batch with this job: the same denoising shape
    /// ([`GenerationRequest::batch_compatible`]), the same partial images, and the same
    /// adapters at the same scales (a batch runs on one merged model).
    pub(super) fn batches_with(&self, other: &QueuedJob) -> bool {
        self.request.batch_compatible(&other.request)
            && self.partial_images() == other.partial_images()
            && same_loras(&self.loras, &other.loras)
    }
}

/// The submitting side of the queue: job ids, admission, and the channel the worker
/// thread reads.
pub(super) struct JobQueue {
    /// `None` once the queue is closed (drain or shutdown).
    tx: Mutex<Option<mpsc::Sender<QueuedJob>>>,
    next_id: AtomicU64,
}

/// A queue of `capacity` jobs, and the worker thread's side of it, which gathers
/// batches of up to `max_batch` jobs.
pub(super) fn job_queue(capacity: usize, max_batch: usize) -> (JobQueue, Batcher) {
    let (tx, rx) = mpsc::channel(capacity);
    let queue = JobQueue {
        tx: Mutex::new(Some(tx)),
        next_id: AtomicU64::new(1),
    };
    let batcher = Batcher {
        rx,
        pending: None,
        max_batch,
    };
    (queue, batcher)
}

impl JobQueue {
    /// Queues a job, never waiting: refused when the queue is closed or the worker is
    /// draining or shutting down ([`SubmitError::Closed`]), and when `max_queue` jobs
    /// already wait ([`SubmitError::QueueFull`]).
    pub(super) fn submit(
        &self,
        shared: &Shared,
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
        if shared.is_closing() {
            return Err(SubmitError::Closed);
        }
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
        let lora_param = loras.first().map_or("lora_path", |(param, _)| *param);
        match tx.try_send(QueuedJob {
            id,
            queued_at: Instant::now(),
            timing,
            request,
            encoding,
            stream,
            loras: loras.into_iter().map(|(_, spec)| spec).collect(),
            lora_param,
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

    /// Closes the queue: no job is accepted any more, and the worker thread sees the
    /// end of the queue once it has taken the jobs in it.
    pub(super) fn close(&self) {
        // Dropping the only sender is what ends the channel.
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// The worker thread's side of the queue: takes jobs in order and gathers batches.
pub(super) struct Batcher {
    rx: mpsc::Receiver<QueuedJob>,
    /// A job taken while gathering a batch that it could not join: it starts the next.
    pending: Option<QueuedJob>,
    max_batch: usize,
}

impl Batcher {
    /// Waits for the next batch: the first queued job that should still run
    /// ([`Shared::admit`]) and the jobs queued right after it that may share its batch
    /// ([`QueuedJob::batches_with`]), up to the batch size, taken off the queue's books.
    /// `None` once the queue is closed and empty. Blocking: call it on the worker thread.
    pub(super) fn next_batch(&mut self, shared: &Shared) -> Option<Vec<QueuedJob>> {
        loop {
            let job = match self.pending.take() {
                Some(job) => job,
                None => self.rx.blocking_recv()?,
            };
            let Some(job) = shared.admit(job) else {
                continue;
            };
            let mut batch = vec![job];
            while batch.len() < self.max_batch {
                let Ok(next) = self.rx.try_recv() else {
                    break;
                };
                let Some(next) = shared.admit(next) else {
                    continue;
                };
                if batch[0].batches_with(&next) {
                    batch.push(next);
                } else {
                    self.pending = Some(next);
                    break;
                }
            }
            shared.queued.fetch_sub(batch.len(), Ordering::SeqCst);
            for job in &batch {
                shared.leave_queue(job.id);
            }
            return Some(batch);
        }
    }
}

impl Shared {
    /// Forgets a job's place in the queue.
    pub(super) fn leave_queue(&self, id: u64) {
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Takes `job` off the queue's books unless it should run: refused when shutting
    /// down, skipped when its client is gone.
    pub(super) fn admit(&self, job: QueuedJob) -> Option<QueuedJob> {
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
