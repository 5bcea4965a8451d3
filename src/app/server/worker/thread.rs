//! The worker thread's life: load the model, merge the start-up LoRAs, warm up, then
//! serve batches until the queue closes; the device check after a failure.

use std::any::TypeId;
use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};

use super::batch::{panic_message, run_batch, switch_controlnets, switch_loras};
use super::queue::{job_queue, Batcher};
use super::{bump, EmbeddingsLoaded, FaultPoint, JobError, Shared, WarmUp, Worker, WorkerOptions};
use crate::device::{CpuBackend, DTypeChoice, Placed, WithBackend};
use crate::error::Error;
use crate::load::embeddings::load_embeddings;
use crate::load::load_pipeline;
use crate::load::lora::{apply_lora_specs, LoraAdapter, LoraSpec};
use crate::pipeline::{GenerationRequest, SdxlPipeline};
use crate::FusedOps;

/// Clears `alive` when the worker thread ends, however it ends.
struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
    }
}

/// The [`WithBackend`] body that starts the worker on the chosen backend.
pub(super) struct Spawn(pub(super) WorkerOptions);

impl WithBackend for Spawn {
    type Output = anyhow::Result<Worker>;

    fn dtype(&self) -> Option<DTypeChoice> {
        Some(self.0.dtype)
    }

    fn run<B: FusedOps>(self, device: B::Device, placed: Placed) -> anyhow::Result<Worker> {
        let options = self.0;
        let (queue, batcher) = job_queue(options.max_queue_size, options.max_batch_size);
        let dtype = placed.dtype;
        let shared = Arc::new(Shared::new(
            placed.label,
            crate::device::dtype_name(dtype),
            options.max_queue_size,
        ));
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
                    let mut embeddings = EmbeddingsLoaded::default();
                    if let Some(dir) = &options.embeddings_dir {
                        let skipped = load_embeddings(p.components_mut(), dir)?;
                        let root = dir.canonicalize().unwrap_or_else(|_| dir.clone());
                        let root = root.display().to_string();
                        embeddings = EmbeddingsLoaded {
                            enabled: true,
                            loaded: (p.components().embeddings.iter())
                                .map(|e| (e.name.clone(), e.vectors))
                                .collect(),
                            // Clients know names, not the server's paths.
                            skipped: (skipped.iter())
                                .map(|s| {
                                    s.reason
                                        .replace(&format!("{root}/"), "")
                                        .replace(&root, "the embeddings directory")
                                })
                                .collect(),
                        };
                    }
                    *thread_shared
                        .embeddings
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = embeddings;
                    let c = p.components();
                    let max_skip = c
                        .text_encoder
                        .max_clip_skip()
                        .min(c.text_encoder_2.max_clip_skip());
                    thread_shared
                        .max_clip_skip
                        .store(max_skip, Ordering::SeqCst);
                    *thread_shared
                        .counter
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(p.prompt_counter()?));
                    match options.warmup {
                        Some(w) if runs_warm_up::<B>(&w) => warm_up(&p, w)?,
                        _ => {}
                    }
                    Ok::<_, crate::Error>(p)
                }));
                let (pipeline, base) = match loaded {
                    Ok(Ok(p)) => {
                        let info = p.components().info.clone();
                        *thread_shared.info.lock().unwrap_or_else(|p| p.into_inner()) = Some(info);
                        *thread_shared
                            .scheduler
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) =
                            Some(p.components().scheduler_config.clone());
                        let base = p.components().loras.active().to_vec();
                        *thread_shared
                            .loras
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) = base.clone();
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
                serve_jobs(pipeline, &base, &device, batcher, &guard.0, &options);
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
            queue,
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }
}

/// Whether `warmup` runs on backend `B`: one for GPUs only is skipped on the CPU
/// backend (known by its type, not by the device's label).
fn runs_warm_up<B: FusedOps>(warmup: &WarmUp) -> bool {
    !(warmup.gpu_only && TypeId::of::<B>() == TypeId::of::<CpuBackend>())
}

/// Runs one generation of `warmup`'s size with the server's default guidance (so with
/// the same batch shapes as a default request), outside the metrics and the queue.
fn warm_up<B: FusedOps>(pipeline: &SdxlPipeline<B>, warmup: WarmUp) -> Result<(), Error> {
    let request = GenerationRequest {
        prompt: "warm-up".into(),
        num_inference_steps: warmup.steps,
        guidance_scale: crate::app::server::types::default_guidance(),
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
    base: &[LoraSpec<Arc<LoraAdapter>>],
    device: &B::Device,
    mut batcher: Batcher,
    shared: &Shared,
    options: &WorkerOptions,
) {
    // ControlNets loaded for requests, most recently used first.
    let mut recent: Vec<String> = Vec::new();
    while let Some(batch) = batcher.next_batch(shared) {
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
        if let Err(error) = switch_loras(&mut pipeline, base, &batch[0]) {
            tracing::warn!(jobs = ?batch.iter().map(|j| j.id).collect::<Vec<_>>(), error = ?error, "LoRA adapters not merged");
            bump(&shared.counters.started, batch.len());
            bump(&shared.counters.failed, batch.len());
            for job in batch {
                let _ = job.reply.send(Err(error.clone()));
            }
            continue;
        }
        let needs = &batch[0].request.controlnets;
        if let Err(error) = switch_controlnets(&mut pipeline, needs, &mut recent, options, device) {
            tracing::warn!(jobs = ?batch.iter().map(|j| j.id).collect::<Vec<_>>(), error = ?error, "ControlNets not loaded");
            bump(&shared.counters.started, batch.len());
            bump(&shared.counters.failed, batch.len());
            for job in batch {
                let _ = job.reply.send(Err(error.clone()));
            }
            continue;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceSpec;

    #[test]
    fn a_warm_up_for_gpus_only_is_skipped_on_the_cpu_backend() {
        let warmup = |gpu_only| WarmUp {
            width: 64,
            height: 64,
            steps: 1,
            gpu_only,
        };
        assert!(!runs_warm_up::<CpuBackend>(&warmup(true)));
        assert!(runs_warm_up::<CpuBackend>(&warmup(false)));
        #[cfg(feature = "wgpu")]
        assert!(runs_warm_up::<crate::device::WgpuBackend>(&warmup(true)));
    }

    #[test]
    fn the_device_check_computes_on_the_device_and_records_the_outcome() {
        let device = Default::default();
        let shared = Shared::new("cpu".into(), "float32", 1);
        let mut options = WorkerOptions::new("tiny".into(), DeviceSpec::Cpu);
        shared.device_ok.store(false, Ordering::SeqCst);
        assert!(device_check::<CpuBackend>(&device, &shared, &options));
        assert!(shared.device_ok.load(Ordering::SeqCst));

        // A failing probe leaves the device marked as failed.
        shared.device_ok.store(false, Ordering::SeqCst);
        options.hooks.fault = Some(Arc::new(|point| match point {
            FaultPoint::Probe => Err(Error::Backend("the device is lost".into())),
            FaultPoint::Batch(_) => Ok(()),
        }));
        assert!(!device_check::<CpuBackend>(&device, &shared, &options));
        assert!(!shared.device_ok.load(Ordering::SeqCst));

        // So does a panicking one, without the panic escaping.
        options.hooks.fault = Some(Arc::new(|_| panic!("the driver crashed")));
        assert!(!device_check::<CpuBackend>(&device, &shared, &options));
        assert!(!shared.device_ok.load(Ordering::SeqCst));
    }
}
