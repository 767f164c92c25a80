//! The engine: a bounded queue in front of one model thread that owns the device.
//!
//! Handlers submit plain-data work (images, slot sets) through an [`Engine`] handle; a full
//! queue is refused at once ([`EngineError::QueueFull`], HTTP 429). The model thread takes
//! what is waiting: decompose requests that wait together run as one batch, and render jobs
//! are continuously batched: every iteration advances all active jobs (each at its own step,
//! with its own sampler and seed) with one model call, new jobs join at the next iteration,
//! finished ones leave together for one decode, and jobs whose caller went away (the event
//! receiver was dropped) are dropped at the next iteration.

mod metrics;
mod model;
mod slot_diffusion;
mod worker;

use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use image::RgbImage;
use tokio::sync::{mpsc, oneshot, watch};

pub use metrics::Metrics;
pub use model::{Decomposed, Model, ModelInfo};

use crate::model::sampler::SamplerKind;
use crate::slots::SlotSet;

/// How the engine batches and queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Most images in one decompose batch and most render jobs advanced together.
    pub max_batch_size: usize,
    /// Most requests waiting for the model thread; beyond, requests are refused.
    pub max_queue: usize,
    /// Run one decompose and one short render before reporting ready.
    pub warmup: bool,
}

/// One image to render.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderSpec {
    /// The slots to render from.
    pub slots: SlotSet,
    /// Seed of the starting noise (and of DDPM's step noise).
    pub seed: u64,
    /// Which sampler.
    pub sampler: SamplerKind,
    /// Model evaluations.
    pub steps: usize,
}

/// What a render request hears back, per image (`index` in the request's list).
#[derive(Debug)]
pub enum RenderEvent {
    /// One more model evaluation done.
    Progress {
        /// Which image of the request.
        index: usize,
        /// Evaluations done.
        step: usize,
        /// Evaluations in all.
        of: usize,
    },
    /// The image is ready.
    Image {
        /// Which image of the request.
        index: usize,
        /// The rendered image.
        image: RgbImage,
    },
    /// The image could not be made.
    Failed {
        /// Which image of the request.
        index: usize,
        /// Why.
        error: EngineError,
    },
}

/// Why the engine could not do the work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The queue is full.
    #[error("the server is busy: {0} requests are already waiting; retry later")]
    QueueFull(usize),
    /// The model is not ready (loading, failed, shutting down).
    #[error("{0}")]
    Unavailable(String),
    /// The model refused the job's parameters.
    #[error("{0}")]
    Rejected(String),
    /// The model failed: an internal error.
    #[error("internal model error: {0}")]
    Internal(String),
}

/// Where the model thread is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Loading and warming up the model.
    Loading,
    /// Serving.
    Ready,
    /// Loading failed; the message says why.
    Failed(String),
    /// Finishing the work in flight, taking no more.
    Draining,
    /// The model thread has ended.
    Stopped,
}

/// A decompose request in the queue.
struct DecomposeWork {
    images: Vec<RgbImage>,
    reply: oneshot::Sender<Result<Vec<Decomposed>, EngineError>>,
}

/// A render request in the queue.
struct RenderWork {
    specs: Vec<RenderSpec>,
    events: mpsc::UnboundedSender<RenderEvent>,
}

/// Work waiting for the model thread.
enum Work {
    Decompose(DecomposeWork),
    Render(RenderWork),
}

/// One queued request and when it arrived.
struct Entry {
    work: Work,
    queued: Instant,
}

/// State shared by the handles and the model thread.
struct Shared {
    status: watch::Sender<Status>,
    info: OnceLock<ModelInfo>,
    /// Entries in the queue; the gauge is set under the same lock, so it is never stale.
    waiting: Mutex<usize>,
    metrics: Metrics,
}

impl Shared {
    fn set_status(&self, status: Status) {
        self.status.send_replace(status);
    }

    /// Changes the count of queued entries and the queue-depth gauge together.
    fn count_waiting(&self, change: impl FnOnce(&mut usize)) {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        change(&mut waiting);
        self.metrics.queue_depth(*waiting);
    }

    /// One entry, queued at `queued`, left the queue for the model thread.
    fn dequeued(&self, queued: Instant) {
        self.count_waiting(|n| *n = n.saturating_sub(1));
        self.metrics.queue_wait(queued.elapsed().as_secs_f64());
    }
}

/// A handle to the model thread, cheap to clone; the thread ends (after finishing its work)
/// when the last handle is dropped.
#[derive(Clone)]
pub struct Engine {
    queue: SyncSender<Entry>,
    shared: Arc<Shared>,
    max_queue: usize,
}

impl Engine {
    /// Starts the model thread: it loads the model with `loader` (so the model and its device
    /// live on that thread only), warms it up if asked, then serves.
    pub fn start<M, F>(loader: F, config: EngineConfig, metrics: Metrics) -> (Self, JoinHandle<()>)
    where
        M: Model + 'static,
        F: FnOnce() -> anyhow::Result<M> + Send + 'static,
    {
        let (queue, receiver) = sync_channel(config.max_queue.max(1));
        let shared = Arc::new(Shared {
            status: watch::Sender::new(Status::Loading),
            info: OnceLock::new(),
            waiting: Mutex::new(0),
            metrics,
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("slotserve-model".into())
            .spawn(move || worker::run(loader, config, thread_shared, receiver))
            .expect("spawning the model thread");
        (Self { queue, shared, max_queue: config.max_queue.max(1) }, thread)
    }

    /// Where the model thread is.
    pub fn status(&self) -> Status {
        self.shared.status.borrow().clone()
    }

    /// A receiver that sees every change of [`Self::status`] (for health reporting); it does
    /// not keep the model thread alive.
    pub fn watch_status(&self) -> watch::Receiver<Status> {
        self.shared.status.subscribe()
    }

    /// Waits until the model is ready (`Ok`) or will never be (`Err` with the reason).
    pub async fn wait_ready(&self) -> Result<(), String> {
        let mut rx = self.shared.status.subscribe();
        let status =
            rx.wait_for(|s| *s != Status::Loading).await.map_err(|e| e.to_string())?.clone();
        match status {
            Status::Ready => Ok(()),
            Status::Failed(reason) => Err(reason),
            other => Err(format!("model thread is {other:?}")),
        }
    }

    /// Facts about the model, once it is loaded.
    pub fn info(&self) -> Option<&ModelInfo> {
        self.shared.info.get()
    }

    /// The metrics the engine records into.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Marks the engine as draining: callers should admit no new requests (the HTTP layer
    /// answers 503), while the requests in flight may still submit their work, which is
    /// finished. The model thread ends once every handle is dropped.
    pub fn drain(&self) {
        self.shared.status.send_if_modified(|s| {
            let ready = *s == Status::Ready;
            if ready {
                *s = Status::Draining;
            }
            ready
        });
    }

    /// Decomposes images (already at the model's resolution) in the next decompose batch.
    pub async fn decompose(&self, images: Vec<RgbImage>) -> Result<Vec<Decomposed>, EngineError> {
        let (reply, response) = oneshot::channel();
        self.submit(Work::Decompose(DecomposeWork { images, reply }))?;
        response.await.map_err(|_| EngineError::Unavailable("the model thread stopped".into()))?
    }

    /// Queues render jobs; their progress and images arrive on the returned receiver.
    /// Dropping the receiver cancels the jobs at the model thread's next iteration.
    pub fn render(
        &self,
        specs: Vec<RenderSpec>,
    ) -> Result<mpsc::UnboundedReceiver<RenderEvent>, EngineError> {
        let (events, receiver) = mpsc::unbounded_channel();
        self.submit(Work::Render(RenderWork { specs, events }))?;
        Ok(receiver)
    }

    fn submit(&self, work: Work) -> Result<(), EngineError> {
        match self.status() {
            // Draining still takes the follow-up work of requests already admitted.
            Status::Ready | Status::Draining => {}
            Status::Loading => {
                return Err(EngineError::Unavailable("the model is still loading".into()))
            }
            Status::Stopped => {
                return Err(EngineError::Unavailable("the model thread stopped".into()))
            }
            Status::Failed(reason) => {
                return Err(EngineError::Unavailable(format!("the model failed: {reason}")))
            }
        }
        // Counted before sending, so the model thread never takes an entry not yet counted.
        self.shared.count_waiting(|n| *n += 1);
        self.queue.try_send(Entry { work, queued: Instant::now() }).map_err(|e| {
            self.shared.count_waiting(|n| *n = n.saturating_sub(1));
            match e {
                TrySendError::Full(_) => EngineError::QueueFull(self.max_queue),
                TrySendError::Disconnected(_) => {
                    EngineError::Unavailable("the model thread stopped".into())
                }
            }
        })
    }
}

/// Waits for all `count` images of a render request, in order; the first failure wins.
pub async fn collect_images(
    events: &mut mpsc::UnboundedReceiver<RenderEvent>,
    count: usize,
) -> Result<Vec<RgbImage>, EngineError> {
    let mut images: Vec<Option<RgbImage>> = vec![None; count];
    while let Some(event) = events.recv().await {
        match event {
            RenderEvent::Progress { .. } => {}
            RenderEvent::Image { index, image } => images[index] = Some(image),
            RenderEvent::Failed { error, .. } => return Err(error),
        }
        if images.iter().all(Option::is_some) {
            break;
        }
    }
    images
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| EngineError::Unavailable("the model thread stopped before finishing".into()))
}
