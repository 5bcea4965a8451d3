//! Queue admission and batching: which queued jobs run, and which may share a batch.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use super::{bump, JobError, JobLora, JobResult, JobTiming, Shared, StreamOptions};
use crate::pipeline::{Encoding, GenerationRequest};

/// Which adapters a job wants: the same adapter values at the same scales.
pub(super) fn same_loras(a: &[JobLora], b: &[JobLora]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| Arc::ptr_eq(&x.adapter, &y.adapter) && x.scale == y.scale)
}

/// One accepted request.
pub(super) struct Job {
    pub(super) id: u64,
    /// When it was accepted.
    pub(super) queued_at: Instant,
    pub(super) timing: Arc<JobTiming>,
    pub(super) request: GenerationRequest,
    /// The file format of its images (the worker adds the PNG parameters text).
    pub(super) encoding: Encoding,
    /// Set for a streamed job.
    pub(super) stream: Option<StreamOptions>,
    /// LoRA adapters for this job only.
    pub(super) loras: Vec<JobLora>,
    pub(super) reply: oneshot::Sender<JobResult>,
}

impl Job {
    /// Partial images the job wants: jobs that want different numbers do not share
    /// a batch, since a batch decodes its previews together.
    pub(super) fn partial_images(&self) -> usize {
        self.stream.as_ref().map_or(0, |s| s.partial_images)
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
    pub(super) fn admit(&self, job: Job) -> Option<Job> {
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
