//! The model thread: loads the model, then loops over iterations. Each iteration admits
//! waiting work, drops the jobs of callers that went away, runs the waiting decompose
//! requests as one batch, advances every active render job by one batched model call and
//! decodes the jobs that finished, together.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use image::RgbImage;
use tokio::sync::mpsc::UnboundedSender;

use super::{
    DecomposeWork, EngineConfig, EngineError, Entry, Model, RenderEvent, RenderSpec, RenderWork,
    Shared, Status, Work,
};
use crate::model::sampler::SamplerKind;

/// The model thread's body.
pub(super) fn run<M, F>(
    loader: F,
    config: EngineConfig,
    shared: Arc<Shared>,
    queue: Receiver<Entry>,
) where
    M: Model,
    F: FnOnce() -> anyhow::Result<M>,
{
    let model = match guarded(loader).and_then(|m| prepare(m, &config, &shared)) {
        Ok(model) => model,
        Err(reason) => {
            tracing::error!("the model could not be loaded: {reason}");
            shared.set_status(Status::Failed(reason));
            return;
        }
    };
    shared.set_status(Status::Ready);
    tracing::info!("model ready");
    Worker::new(model, config.max_batch_size.max(1), shared.clone(), queue).run();
    shared.set_status(Status::Stopped);
}

/// Publishes the model's facts and warms it up.
fn prepare<M: Model>(model: M, config: &EngineConfig, shared: &Shared) -> Result<M, String> {
    let info = model.info();
    tracing::info!(name = %info.name, fingerprint = %info.fingerprint, device = %info.device, "model loaded");
    let resolution = info.resolution as u32;
    shared.info.get_or_init(|| info);
    if config.warmup {
        let started = Instant::now();
        guarded(|| warm_up(&model, resolution)).map_err(|e| format!("warm-up failed: {e}"))?;
        tracing::info!(seconds = started.elapsed().as_secs_f64(), "model warmed up");
    }
    Ok(model)
}

/// One decompose of a grey image and a one-step render of its slots: every stage runs once
/// before the first request.
fn warm_up<M: Model>(model: &M, resolution: u32) -> anyhow::Result<()> {
    let image = RgbImage::from_pixel(resolution, resolution, image::Rgb([128, 128, 128]));
    let decomposed = model.decompose(&[image])?;
    let slots =
        decomposed.into_iter().next().ok_or_else(|| anyhow::anyhow!("no decomposition"))?.slots;
    let mut job =
        model.start_render(&RenderSpec { slots, seed: 0, sampler: SamplerKind::Ddim, steps: 1 })?;
    while !is_done(model, &job) {
        model.denoise_step(&mut [&mut job])?;
    }
    model.finish_render(&[&job]).map(|_| ())
}

/// Runs a model call, turning a panic into an error so the thread keeps serving.
fn guarded<T>(f: impl FnOnce() -> anyhow::Result<T>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result.map_err(|e| format!("{e:#}")),
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .map_or_else(
                || "the model panicked".to_string(),
                |m| format!("the model panicked: {m}"),
            )),
    }
}

fn is_done<M: Model>(model: &M, job: &M::Job) -> bool {
    let (step, of) = model.progress(job);
    step >= of
}

/// A render job admitted but not started yet (the active batch was full).
struct PendingRender {
    spec: RenderSpec,
    index: usize,
    events: UnboundedSender<RenderEvent>,
}

/// A render job being denoised.
struct ActiveRender<J> {
    job: J,
    index: usize,
    events: UnboundedSender<RenderEvent>,
}

impl<J> ActiveRender<J> {
    fn fail(&self, error: EngineError) {
        let _ = self.events.send(RenderEvent::Failed { index: self.index, error });
    }
}

/// The model thread's state between iterations.
struct Worker<M: Model> {
    model: M,
    max_batch: usize,
    shared: Arc<Shared>,
    queue: Receiver<Entry>,
    /// Queue still open (some handle alive).
    open: bool,
    /// An entry taken from the queue that did not fit this iteration.
    held: Option<Entry>,
    pending: VecDeque<PendingRender>,
    active: Vec<ActiveRender<M::Job>>,
}

impl<M: Model> Worker<M> {
    fn new(model: M, max_batch: usize, shared: Arc<Shared>, queue: Receiver<Entry>) -> Self {
        Self {
            model,
            max_batch,
            shared,
            queue,
            open: true,
            held: None,
            pending: VecDeque::new(),
            active: Vec::new(),
        }
    }

    fn idle(&self) -> bool {
        self.held.is_none() && self.pending.is_empty() && self.active.is_empty()
    }

    fn run(mut self) {
        loop {
            let decompose = self.admit();
            if decompose.is_empty() && self.idle() && !self.open {
                return;
            }
            self.drop_cancelled();
            self.decompose(decompose);
            self.start_pending();
            self.denoise();
            self.finish();
        }
    }

    /// Next entry: the held one, else one from the queue (blocking only when idle).
    fn next_entry(&mut self, block: bool) -> Option<Entry> {
        if let Some(entry) = self.held.take() {
            return Some(entry);
        }
        let received = if block {
            self.queue.recv().map_err(|_| TryRecvError::Disconnected)
        } else {
            self.queue.try_recv()
        };
        match received {
            Ok(entry) => Some(entry),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => {
                self.open = false;
                None
            }
        }
    }

    /// Takes waiting entries: decompose requests while the batch has room; render requests
    /// while their jobs fit in the batch beside the active and admitted ones (so requests that
    /// waited together start, and finish, together), or one request when no admitted job
    /// waits to start. Returns this iteration's decompose batch.
    fn admit(&mut self) -> Vec<DecomposeWork> {
        let mut batch: Vec<DecomposeWork> = Vec::new();
        let mut images = 0;
        let mut block = self.open && self.idle();
        while let Some(entry) = self.next_entry(block) {
            block = false;
            let fits = match &entry.work {
                Work::Decompose(d) => batch.is_empty() || images + d.images.len() <= self.max_batch,
                Work::Render(r) => {
                    self.pending.is_empty()
                        || self.active.len() + self.pending.len() + r.specs.len() <= self.max_batch
                }
            };
            if !fits {
                self.held = Some(entry);
                break;
            }
            self.shared.dequeued(entry.queued);
            match entry.work {
                Work::Decompose(d) => {
                    images += d.images.len();
                    batch.push(d);
                }
                Work::Render(r) => self.enqueue_render(r),
            }
        }
        batch
    }

    fn enqueue_render(&mut self, work: RenderWork) {
        let RenderWork { specs, events } = work;
        self.pending.extend(specs.into_iter().enumerate().map(|(index, spec)| PendingRender {
            spec,
            index,
            events: events.clone(),
        }));
    }

    /// Drops the jobs whose caller went away.
    fn drop_cancelled(&mut self) {
        let before = self.pending.len() + self.active.len();
        self.pending.retain(|p| !p.events.is_closed());
        self.active.retain(|a| !a.events.is_closed());
        let dropped = before - self.pending.len() - self.active.len();
        if dropped > 0 {
            tracing::info!(jobs = dropped, "dropped render jobs whose client went away");
            self.shared.metrics.jobs_cancelled(dropped);
        }
    }

    /// Runs the decompose requests of this iteration as one batch.
    fn decompose(&mut self, batch: Vec<DecomposeWork>) {
        let (batch, gone): (Vec<_>, Vec<_>) = batch.into_iter().partition(|d| !d.reply.is_closed());
        self.shared.metrics.jobs_cancelled(gone.len());
        if batch.is_empty() {
            return;
        }
        let images: Vec<RgbImage> = batch.iter().flat_map(|d| d.images.iter().cloned()).collect();
        let metrics = &self.shared.metrics;
        metrics.batch("decompose", images.len());
        let result = guarded(|| self.model.decompose(&images)).and_then(|outs| {
            match outs.len() == images.len() {
                true => Ok(outs),
                false => Err(format!(
                    "decompose returned {} results for {} images",
                    outs.len(),
                    images.len()
                )),
            }
        });
        let mut outs = match result {
            Ok(outs) => outs.into_iter(),
            Err(e) => {
                tracing::error!("decompose failed: {e}");
                metrics.model_error("decompose");
                batch
                    .into_iter()
                    .for_each(|d| drop(d.reply.send(Err(EngineError::Internal(e.clone())))));
                return;
            }
        };
        metrics.images_decomposed(images.len());
        for d in batch {
            let mine = outs.by_ref().take(d.images.len()).collect();
            let _ = d.reply.send(Ok(mine));
        }
    }

    /// Starts admitted jobs while the active batch has room.
    fn start_pending(&mut self) {
        while self.active.len() < self.max_batch {
            let Some(PendingRender { spec, index, events }) = self.pending.pop_front() else {
                break;
            };
            match guarded(|| self.model.start_render(&spec)) {
                Ok(job) => self.active.push(ActiveRender { job, index, events }),
                Err(e) => drop(
                    events.send(RenderEvent::Failed { index, error: EngineError::Rejected(e) }),
                ),
            }
        }
        self.shared.metrics.active_renders(self.active.len());
    }

    /// One batched model evaluation for every unfinished active job.
    fn denoise(&mut self) {
        let started = Instant::now();
        let model = &self.model;
        let mut jobs: Vec<&mut M::Job> =
            self.active.iter_mut().map(|a| &mut a.job).filter(|j| !is_done(model, j)).collect();
        let count = jobs.len();
        if count == 0 {
            return;
        }
        if let Err(e) = guarded(|| model.denoise_step(&mut jobs)) {
            self.fail_active("denoise", e);
            return;
        }
        let metrics = &self.shared.metrics;
        metrics.batch("denoise", count);
        metrics.denoise_iteration(count, started.elapsed().as_secs_f64());
        for a in &self.active {
            let (step, of) = self.model.progress(&a.job);
            let _ = a.events.send(RenderEvent::Progress { index: a.index, step, of });
        }
    }

    /// Decodes the finished jobs together and delivers their images.
    fn finish(&mut self) {
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|a| is_done(&self.model, &a.job));
        self.active = running;
        if done.is_empty() {
            return;
        }
        let jobs: Vec<&M::Job> = done.iter().map(|a| &a.job).collect();
        self.shared.metrics.batch("decode", jobs.len());
        let result = guarded(|| self.model.finish_render(&jobs)).and_then(|images| {
            match images.len() == jobs.len() {
                true => Ok(images),
                false => {
                    Err(format!("decode returned {} images for {} jobs", images.len(), jobs.len()))
                }
            }
        });
        match result {
            Ok(images) => {
                self.shared.metrics.images_rendered(images.len());
                for (a, image) in done.iter().zip(images) {
                    let _ = a.events.send(RenderEvent::Image { index: a.index, image });
                }
            }
            Err(e) => {
                tracing::error!("decode failed: {e}");
                self.shared.metrics.model_error("decode");
                done.iter().for_each(|a| a.fail(EngineError::Internal(e.clone())));
            }
        }
        self.shared.metrics.active_renders(self.active.len());
    }

    /// Fails every active job after a model error in `stage`.
    fn fail_active(&mut self, stage: &'static str, error: String) {
        tracing::error!("{stage} failed: {error}");
        self.shared.metrics.model_error(stage);
        for a in self.active.drain(..) {
            a.fail(EngineError::Internal(error.clone()));
        }
        self.shared.metrics.active_renders(0);
    }
}
