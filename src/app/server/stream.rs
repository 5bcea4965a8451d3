//! Streamed answers (`stream: true`): the worker's progress and partial images as
//! server-sent events, then the images or an `error` event.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures_util::stream::{BoxStream, StreamExt as _};
use poem::web::sse::Event;
use poem::Request;
use poem_openapi::payload::EventStream;
use poem_openapi::types::ToJSON;
use tokio::sync::{mpsc, oneshot};

use super::conn::Connection;
use super::error::ApiError;
use super::types::{ImageStreamEvent, StreamUsage};
use super::worker::{JobError, JobEvent, JobResult};
use super::AppState;

/// A streamed answer: server-sent events, each `event: <type>` and `data: <JSON>`.
pub type ImageEventStream = EventStream<BoxStream<'static, ImageStreamEvent>>;

/// A job's failure as the client sees it.
pub(super) fn job_error(e: JobError) -> ApiError {
    match e {
        JobError::Failed(message) => {
            ApiError::generation_failed(format!("the generation failed: {message}"))
        }
        JobError::Invalid { param, message } => ApiError::invalid_value(param, message),
        JobError::ShuttingDown => ApiError::shutting_down(),
    }
}

/// The event stream of an accepted job. A task forwards the worker's events; it ends,
/// dropping the job's answer channel (which cancels the job at its next step), when the
/// client closes the connection or stops reading the stream.
pub(super) fn events(
    state: &Arc<AppState>,
    http: &Request,
    id: u64,
    events_rx: mpsc::UnboundedReceiver<JobEvent>,
    answer: oneshot::Receiver<JobResult>,
    meta: EventMeta,
) -> ImageEventStream {
    // Few events are in flight at once; a client that stops reading holds the task.
    let (out_tx, out_rx) = mpsc::channel::<ImageStreamEvent>(8);
    let conn = state.connections.get(http.remote_addr());
    tokio::spawn(forward(
        state.clone(),
        id,
        events_rx,
        answer,
        out_tx,
        conn,
        meta,
    ));
    let events = futures_util::stream::unfold(out_rx, |mut rx| async move {
        rx.recv().await.map(|event| (event, rx))
    })
    .boxed();
    EventStream::new(events)
        // Comments between events keep proxies from timing out a long step.
        .keep_alive(Duration::from_secs(15))
        .to_event(|event| {
            let data = event.to_json_string();
            Event::message(data).event_type(event.kind)
        })
}

/// What every image event of a streamed request repeats.
pub(super) struct EventMeta {
    /// `image_generation` or `image_edit`.
    pub(super) prefix: &'static str,
    pub(super) size: String,
    pub(super) quality: String,
    pub(super) output_format: &'static str,
    /// Send `hypergen.progress` events.
    pub(super) progress: bool,
}

impl EventMeta {
    /// An image event of kind `suffix` (`partial_image` or `completed`).
    fn image(&self, suffix: &str, file: &[u8]) -> ImageStreamEvent {
        ImageStreamEvent {
            kind: format!("{}.{suffix}", self.prefix),
            b64_json: Some(base64::engine::general_purpose::STANDARD.encode(file)),
            created_at: Some(super::unix_now()),
            size: Some(self.size.clone()),
            quality: Some(self.quality.clone()),
            background: Some("opaque".into()),
            output_format: Some(self.output_format.into()),
            ..empty_event(String::new())
        }
    }

    /// The stream events of one worker event.
    fn events_of(&self, event: JobEvent) -> Vec<ImageStreamEvent> {
        match event {
            JobEvent::Progress {
                step,
                total,
                elapsed_seconds,
            } if self.progress => vec![ImageStreamEvent {
                step: Some(step as u32),
                total: Some(total as u32),
                elapsed_seconds: Some(elapsed_seconds),
                ..empty_event("hypergen.progress".into())
            }],
            JobEvent::Progress { .. } => Vec::new(),
            JobEvent::Partial { index, images } => images
                .iter()
                .map(|file| ImageStreamEvent {
                    partial_image_index: Some(index as u32),
                    ..self.image("partial_image", file)
                })
                .collect(),
        }
    }
}

/// An event of type `kind` with no other field.
fn empty_event(kind: String) -> ImageStreamEvent {
    ImageStreamEvent {
        kind,
        b64_json: None,
        created_at: None,
        size: None,
        quality: None,
        background: None,
        output_format: None,
        partial_image_index: None,
        usage: None,
        step: None,
        total: None,
        elapsed_seconds: None,
        queue_position: None,
        error: None,
    }
}

/// The `error` event for `e`: OpenAI's error object.
fn error_event(e: &ApiError) -> ImageStreamEvent {
    ImageStreamEvent {
        error: Some(e.body().error),
        ..empty_event("error".into())
    }
}

/// Forwards a streamed job's events to its client, then its images (or an `error`
/// event). Returning drops `answer`, which is how the worker learns the client left.
async fn forward(
    state: Arc<AppState>,
    id: u64,
    mut events: mpsc::UnboundedReceiver<JobEvent>,
    mut answer: oneshot::Receiver<JobResult>,
    out: mpsc::Sender<ImageStreamEvent>,
    conn: Option<Arc<Connection>>,
    meta: EventMeta,
) {
    let gone = async {
        match &conn {
            Some(conn) => conn.gone().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(gone);
    let mut events_open = true;
    // While the job waits, progress clients hear their queue position every second.
    let mut waiting = meta.progress;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let result = loop {
        let event = tokio::select! {
            // Events first, so that every partial image goes out before the result.
            biased;
            _ = &mut gone => break None,
            _ = out.closed() => break None,
            _ = tick.tick(), if waiting => {
                match state.worker.queue_position(id) {
                    Some(position) => {
                        let event = ImageStreamEvent {
                            queue_position: Some(position as u32),
                            ..empty_event("hypergen.progress".into())
                        };
                        let _ = out.send(event).await;
                    }
                    None => waiting = false,
                }
                continue;
            }
            event = events.recv(), if events_open => event,
            result = &mut answer => break Some(result),
        };
        match event {
            Some(event) => {
                waiting = false;
                for e in meta.events_of(event) {
                    if out.send(e).await.is_err() {
                        break;
                    }
                }
            }
            None => events_open = false,
        }
    };
    let Some(result) = result else {
        // Dropping the receiver is what tells the worker.
        drop(answer);
        state.worker.note_abandoned();
        tracing::info!(job = id, "client went away during the stream");
        return;
    };
    // Partial images the worker sent just before its answer.
    while let Ok(event) = events.try_recv() {
        for e in meta.events_of(event) {
            let _ = out.send(e).await;
        }
    }
    let outcome = match result {
        Ok(Ok(files)) => Ok(files),
        Ok(Err(e)) => Err(job_error(e)),
        Err(_) => Err(ApiError::shutting_down()),
    };
    match outcome {
        Ok(files) => {
            for file in files {
                let event = ImageStreamEvent {
                    usage: Some(StreamUsage::default()),
                    ..meta.image("completed", &file)
                };
                if out.send(event).await.is_err() {
                    return;
                }
            }
        }
        Err(e) => {
            tracing::warn!(job = id, error = %e, "streamed request failed");
            let _ = out.send(error_event(&e)).await;
        }
    }
}
