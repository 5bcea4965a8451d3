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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A parsed adapter with no layers: enough for batching, which compares adapters by
    /// identity and scale.
    fn adapter(name: &str) -> Arc<LoraAdapter> {
        Arc::new(LoraAdapter {
            name: name.into(),
            path: PathBuf::from(name),
            layers: Vec::new(),
        })
    }

    fn request(width: usize) -> GenerationRequest {
        GenerationRequest {
            prompt: "a lighthouse".into(),
            width,
            height: 64,
            ..Default::default()
        }
    }

    /// A job as the queue holds it (streamed when it wants partial images), and its
    /// answer channel.
    fn job(
        request: GenerationRequest,
        partial_images: usize,
        loras: Vec<LoraSpec<Arc<LoraAdapter>>>,
    ) -> (QueuedJob, oneshot::Receiver<JobResult>) {
        let (reply, answer) = oneshot::channel();
        let stream = (partial_images > 0).then(|| StreamOptions {
            partial_images,
            events: mpsc::unbounded_channel().0,
        });
        let job = QueuedJob {
            id: 1,
            queued_at: Instant::now(),
            timing: Arc::default(),
            request,
            encoding: Encoding::default(),
            stream,
            loras,
            lora_param: "lora_path",
            reply,
        };
        (job, answer)
    }

    type Submitted = Result<(u64, oneshot::Receiver<JobResult>), SubmitError>;

    fn submit(queue: &JobQueue, shared: &Shared, width: usize) -> Submitted {
        let encoding = Encoding::default();
        queue.submit(
            shared,
            request(width),
            encoding,
            Vec::new(),
            None,
            Arc::default(),
        )
    }

    fn ids(batch: &[QueuedJob]) -> Vec<u64> {
        batch.iter().map(|j| j.id).collect()
    }

    #[test]
    fn jobs_count_against_the_queue_until_they_start() {
        let shared = Shared::new("cpu".into(), "float32", 2);
        let (queue, mut batcher) = job_queue(2, 1);
        let (first, _first) = submit(&queue, &shared, 64).expect("first job");
        let (second, _second) = submit(&queue, &shared, 64).expect("second job");
        assert_eq!((first, second), (1, 2));
        assert_eq!(
            submit(&queue, &shared, 64).unwrap_err(),
            SubmitError::QueueFull
        );
        // Taken off the channel but not started: still on the books.
        let taken = batcher.rx.try_recv().expect("a queued job");
        assert_eq!(
            submit(&queue, &shared, 64).unwrap_err(),
            SubmitError::QueueFull
        );
        batcher.pending = Some(taken);
        let batch = batcher.next_batch(&shared).expect("a batch");
        assert_eq!(ids(&batch), [1]);
        assert_eq!(shared.queued.load(Ordering::SeqCst), 1);
        let (third, _third) = submit(&queue, &shared, 64).expect("room again");
        assert_eq!(third, 3, "refused jobs take no id");
        let waiting: Vec<u64> = shared.waiting.lock().unwrap().iter().copied().collect();
        assert_eq!(waiting, [2, 3]);
        let c = &shared.counters;
        assert_eq!(c.accepted.load(Ordering::SeqCst), 3);
        assert_eq!(c.refused.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_closing_queue_takes_no_job() {
        let refused = |close: &dyn Fn(&JobQueue, &Shared, &mut Option<Batcher>)| {
            let shared = Shared::new("cpu".into(), "float32", 4);
            let (queue, batcher) = job_queue(4, 1);
            let mut batcher = Some(batcher);
            close(&queue, &shared, &mut batcher);
            let outcome = submit(&queue, &shared, 64).map(|(id, _)| id);
            let books = (
                shared.queued.load(Ordering::SeqCst),
                shared.waiting.lock().unwrap().len(),
                shared.counters.accepted.load(Ordering::SeqCst),
            );
            (outcome, books)
        };
        let closed = Err(SubmitError::Closed);
        let draining = |_: &JobQueue, s: &Shared, _: &mut Option<Batcher>| {
            s.draining.store(true, Ordering::SeqCst)
        };
        let shutting_down = |_: &JobQueue, s: &Shared, _: &mut Option<Batcher>| {
            s.shutting_down.store(true, Ordering::SeqCst)
        };
        let queue_closed = |q: &JobQueue, _: &Shared, _: &mut Option<Batcher>| q.close();
        let thread_gone = |_: &JobQueue, _: &Shared, b: &mut Option<Batcher>| drop(b.take());
        assert_eq!(refused(&draining), (closed, (0, 0, 0)));
        assert_eq!(refused(&shutting_down), (closed, (0, 0, 0)));
        assert_eq!(refused(&queue_closed), (closed, (0, 0, 0)));
        assert_eq!(refused(&thread_gone), (closed, (0, 0, 0)));
        assert_eq!(refused(&|_, _, _| {}).0, Ok(1));
    }

    #[test]
    fn queued_jobs_are_skipped_when_their_client_left_and_refused_when_shutting_down() {
        let shared = Shared::new("cpu".into(), "float32", 4);
        let (queue, mut batcher) = job_queue(4, 4);
        let (_, gone) = submit(&queue, &shared, 64).expect("job 1");
        drop(gone);
        let (_, _kept) = submit(&queue, &shared, 64).expect("job 2");
        let batch = batcher.next_batch(&shared).expect("a batch");
        assert_eq!(ids(&batch), [2]);
        assert_eq!(shared.counters.skipped.load(Ordering::SeqCst), 1);
        let (_, mut late) = submit(&queue, &shared, 64).expect("job 3");
        shared.shutting_down.store(true, Ordering::SeqCst);
        queue.close();
        assert!(batcher.next_batch(&shared).is_none());
        assert_eq!(
            late.try_recv().expect("answered"),
            Err(JobError::ShuttingDown)
        );
        assert_eq!(shared.counters.shut_out.load(Ordering::SeqCst), 1);
        assert_eq!(shared.queued.load(Ordering::SeqCst), 0);
        assert!(shared.waiting.lock().unwrap().is_empty());
    }

    #[test]
    fn jobs_batch_together_only_with_the_same_shape_previews_and_adapters() {
        let plain = |request| job(request, 0, Vec::new()).0;
        assert!(plain(request(64)).batches_with(&plain(request(64))));
        let other_prompt = GenerationRequest {
            prompt: "a harbour".into(),
            seed: 7,
            ..request(64)
        };
        assert!(plain(request(64)).batches_with(&plain(other_prompt)));
        assert!(!plain(request(64)).batches_with(&plain(request(128))));
        let more_steps = GenerationRequest {
            num_inference_steps: request(64).num_inference_steps + 1,
            ..request(64)
        };
        assert!(!plain(request(64)).batches_with(&plain(more_steps)));
        let more_guidance = GenerationRequest {
            guidance_scale: request(64).guidance_scale + 1.0,
            ..request(64)
        };
        assert!(!plain(request(64)).batches_with(&plain(more_guidance)));

        let streamed = |partial| job(request(64), partial, Vec::new()).0;
        assert!(streamed(2).batches_with(&streamed(2)));
        assert!(!streamed(2).batches_with(&streamed(1)));
        assert!(!streamed(2).batches_with(&plain(request(64))));

        let a = adapter("a.safetensors");
        let with = |loras: &[(&Arc<LoraAdapter>, f32)]| {
            let loras = loras
                .iter()
                .map(|(adapter, scale)| LoraSpec::new(Arc::clone(adapter), *scale))
                .collect();
            job(request(64), 0, loras).0
        };
        assert!(with(&[(&a, 0.8)]).batches_with(&with(&[(&a, 0.8)])));
        assert!(!with(&[(&a, 0.8)]).batches_with(&with(&[(&a, 1.0)])));
        assert!(!with(&[(&a, 0.8)]).batches_with(&plain(request(64))));
        // The same file read again is another adapter value: it may have changed.
        let a_again = adapter("a.safetensors");
        assert!(!with(&[(&a, 0.8)]).batches_with(&with(&[(&a_again, 0.8)])));
        let b = adapter("b.safetensors");
        assert!(!with(&[(&a, 1.0), (&b, 1.0)]).batches_with(&with(&[(&b, 1.0), (&a, 1.0)])));
    }

    #[test]
    fn a_batch_gathers_the_compatible_jobs_queued_after_its_first_in_order() {
        let shared = Shared::new("cpu".into(), "float32", 8);
        let (queue, mut batcher) = job_queue(8, 3);
        let answers: Vec<_> = [64, 64, 128, 64, 64, 64, 64]
            .into_iter()
            .map(|width| submit(&queue, &shared, width).expect("queued"))
            .collect();
        queue.close();
        let mut batches = Vec::new();
        while let Some(batch) = batcher.next_batch(&shared) {
            batches.push(ids(&batch));
        }
        // The 128-wide job ends the first batch and starts the next; batches hold
        // at most three.
        assert_eq!(batches, [vec![1, 2], vec![3], vec![4, 5, 6], vec![7]]);
        assert_eq!(shared.queued.load(Ordering::SeqCst), 0);
        drop(answers);
    }
}
