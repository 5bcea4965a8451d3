//! Running one batch: switching its LoRA adapters, generating, answering its jobs, and
//! telling a client what went wrong (out of memory recognised and explained).

use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::queue::QueuedJob;
use super::{bump, FaultPoint, JobError, JobEvent, Shared, WorkerObserver, WorkerOptions};
use crate::error::Error;
use crate::load::controlnet::{add_controlnet, controlnet_bytes};
use crate::load::lora::{apply_loras, remove_loras, LoraAdapter, LoraSpec};
use crate::pipeline::{
    a1111_parameters, ControlNetInput, GenerationRequest, OutputFormat, Preview, Progress,
    SdxlPipeline,
};
use crate::scheduler::SchedulerKind;
use crate::FusedOps;

/// Makes the merged adapters those `job` runs with: `base` (merged at start), then its
/// own ([`apply_loras`] does nothing when they are merged already). A batch shares its
/// adapters, so its first job speaks for it. On an error the model holds what it held;
/// after a panic it holds its base weights.
pub(super) fn switch_loras<B: FusedOps>(
    pipeline: &mut SdxlPipeline<B>,
    base: &[LoraSpec<Arc<LoraAdapter>>],
    job: &QueuedJob,
) -> Result<(), JobError> {
    let wanted: Vec<_> = base.iter().chain(&job.loras).cloned().collect();
    let switched = catch_unwind(AssertUnwindSafe(|| {
        apply_loras(pipeline.components_mut(), &wanted)
    }));
    match switched {
        Ok(Ok(())) => Ok(()),
        // Checked before anything changed.
        Ok(Err(e)) => Err(JobError::Invalid {
            param: job.lora_param,
            message: e.to_string(),
        }),
        Err(panic) => {
            // A part may be merged: put every kept base tensor back, which leaves the
            // model's state saying that nothing is merged.
            let _ = catch_unwind(AssertUnwindSafe(|| remove_loras(pipeline.components_mut())));
            Err(JobError::Failed(format!(
                "merging LoRA adapters panicked: {}",
                panic_message(&panic)
            )))
        }
    }
}

/// Loads the ControlNets `needs` names (canonical paths in the server's ControlNet
/// directory) that are not loaded yet, checked against the UNet, and drops the least
/// recently used others beyond the cache budget. On an error nothing the batch needs
/// was dropped and no half-loaded model is kept.
pub(super) fn switch_controlnets<B: FusedOps>(
    pipeline: &mut SdxlPipeline<B>,
    needs: &[ControlNetInput],
    recent: &mut Vec<String>,
    options: &WorkerOptions,
    device: &B::Device,
) -> Result<(), JobError> {
    for input in needs {
        let name = &input.model;
        if !pipeline.components().controlnets.contains_key(name) {
            let loaded = catch_unwind(AssertUnwindSafe(|| {
                add_controlnet(
                    pipeline.components_mut(),
                    name.clone(),
                    Path::new(name),
                    device,
                )
            }));
            match loaded {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    // Clients know names in the ControlNet directory, not its place.
                    let folder = Path::new(name).parent().map(|p| p.display().to_string());
                    let mut message = e.to_string();
                    if let Some(folder) = folder.filter(|f| !f.is_empty()) {
                        message = message.replace(&format!("{folder}/"), "");
                    }
                    return Err(JobError::Invalid {
                        param: "controlnets",
                        message,
                    });
                }
                Err(panic) => {
                    return Err(JobError::Failed(format!(
                        "loading a ControlNet panicked: {}",
                        panic_message(&panic)
                    )))
                }
            }
        }
        recent.retain(|r| r != name);
        recent.insert(0, name.clone());
    }
    let components = pipeline.components_mut();
    let mut total = 0usize;
    recent.retain(|name| {
        let needed = needs.iter().any(|n| &n.model == name);
        let bytes = components.controlnets.get(name).map_or(0, controlnet_bytes);
        total += bytes;
        if needed || total <= options.controlnet_cache_bytes {
            return true;
        }
        total -= bytes;
        components.controlnets.remove(name);
        false
    });
    Ok(())
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
fn failure_message(raw: &str, requests: &[GenerationRequest]) -> String {
    let first = raw.lines().next().unwrap_or(raw).trim();
    if !is_out_of_memory(raw) {
        return first.to_string();
    }
    let Some(r) = requests.first() else {
        return first.to_string();
    };
    let images: usize = requests.iter().map(|r| r.num_images).sum();
    format!(
        "out of memory on the device for {images} image(s) of {}x{} ({first}); its memory \
         was freed: retry with a smaller size or fewer images",
        r.width, r.height
    )
}

/// Runs one batch and answers its jobs; returns whether it failed in a way that may
/// have left the device in trouble (a panic, out of memory), to be checked.
pub(super) fn run_batch<B: FusedOps>(
    pipeline: &SdxlPipeline<B>,
    batch: Vec<QueuedJob>,
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
                let files: Result<Vec<Vec<u8>>, Error> =
                    out.images.iter().map(|img| img.encode(&encoding)).collect();
                let answer = files.map_err(|e| JobError::Failed(e.to_string()));
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
    let message = failure_message(&failure, &requests);
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
    let kind = req
        .sampler
        .kind
        .or_else(|| SchedulerKind::of_config(&c.scheduler_config));
    a1111_parameters(req, kind.unwrap_or(SchedulerKind::Euler), &c.info.id)
}

pub(super) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_is_recognised_however_a_backend_words_it() {
        for raw in [
            "CUDA_ERROR_OUT_OF_MEMORY: out of memory",
            "Out of memory: can't allocate buffer of size 4294967296",
            "Can't allocate buffer of size 4294967296",
            "wgpu error: Validation Error\n\nCaused by:\n    Not enough memory left",
            "Device(OutOfMemory)",
            "allocation failed: out-of-memory on device 0",
        ] {
            assert!(is_out_of_memory(raw), "{raw}");
        }
        for raw in [
            "shape mismatch: [2, 4, 8, 8] and [1, 4, 8, 8]",
            "the generation panicked: index out of bounds: the len is 3 but the index is 7",
            "memory access fault by GPU",
            "the device was lost",
        ] {
            assert!(!is_out_of_memory(raw), "{raw}");
        }
    }

    #[test]
    fn a_client_hears_what_to_change_after_out_of_memory_and_one_line_otherwise() {
        let request = |num_images| GenerationRequest {
            width: 1024,
            height: 768,
            num_images,
            ..Default::default()
        };
        let batch = [request(2), request(1)];
        assert_eq!(
            failure_message(
                "CUDA_ERROR_OUT_OF_MEMORY: out of memory\n   0: backtrace frame",
                &batch
            ),
            "out of memory on the device for 3 image(s) of 1024x768 \
             (CUDA_ERROR_OUT_OF_MEMORY: out of memory); its memory was freed: retry with \
             a smaller size or fewer images"
        );
        assert_eq!(
            failure_message("  a shape mismatch \nstack backtrace:\n   0: main", &batch),
            "a shape mismatch"
        );
        assert_eq!(failure_message("out of memory", &[]), "out of memory");
    }

    #[test]
    fn a_panic_is_told_by_its_message() {
        let text = |f: fn()| panic_message(&std::panic::catch_unwind(f).unwrap_err());
        let literal = text(|| panic!("a literal"));
        let formatted = text(|| panic!("{} formatted", 2));
        let other = text(|| std::panic::panic_any(7_u8));
        assert_eq!(literal, "a literal");
        assert_eq!(formatted, "2 formatted");
        assert_eq!(other, "unknown panic");
    }
}
