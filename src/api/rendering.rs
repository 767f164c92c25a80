//! A render request from admission to its last image, whatever the front end: the slot sets
//! are validated and selected, the job queued, and its events read until the deadline, either
//! all at once ([`Rendering::outputs`]) or as a stream of updates ([`Rendering::updates`]).

use futures::Stream;
use image::RgbImage;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::error::ApiError;
use super::sampling::{Sampling, SamplingOptions};
use super::state::AppState;
use crate::edit;
use crate::engine::{collect_images, RenderEvent};
use crate::slots::{SlotSet, WireSlotSet};

/// A queued render request: its events, sampling, and the permit it holds until answered.
pub struct Rendering {
    events: UnboundedReceiver<RenderEvent>,
    /// Seeds and sampler of the request.
    pub sampling: Sampling,
    /// Slots of each image.
    pub num_slots: Vec<usize>,
    deadline: Instant,
    _permit: OwnedSemaphorePermit,
}

/// What a front end reports of a render as it goes.
#[derive(Debug)]
pub enum RenderUpdate {
    /// One more model evaluation of image `index` is done.
    Progress {
        /// Which image of the request.
        index: usize,
        /// Evaluations done.
        step: usize,
        /// Evaluations in all.
        of: usize,
    },
    /// Image `index` is ready.
    Image {
        /// Which image of the request.
        index: usize,
        /// The image and its facts.
        output: RenderedOutput,
    },
}

/// A finished image with the facts a client gets back.
#[derive(Debug)]
pub struct RenderedOutput {
    /// The image.
    pub image: RgbImage,
    /// The seed it was rendered with.
    pub seed: u64,
    /// Slots it was rendered from.
    pub num_slots: usize,
}

/// The slots of a render request: which sets, and which of their slots to render.
pub struct RenderInput<'a, S> {
    /// The slot sets as sent.
    pub sets: &'a [S],
    /// Render only these slots of each set, in this order.
    pub keep: Option<&'a [usize]>,
    /// Render without these slots of each set.
    pub drop: Option<&'a [usize]>,
}

impl AppState {
    /// Validates a render request and queues it: readiness, slot sets, the `keep`/`drop`
    /// selection, sampling options, a permit.
    pub fn start_render<S: WireSlotSet>(
        &self,
        input: RenderInput<'_, S>,
        options: SamplingOptions<'_>,
    ) -> Result<Rendering, ApiError> {
        let deadline = self.deadline();
        let info = self.model()?;
        let sets = self
            .slot_sets(input.sets)?
            .iter()
            .enumerate()
            .map(|(i, s)| {
                edit::select(s, input.keep, input.drop)
                    .map_err(|e| ApiError::from(e).at(format!("slot set {i}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let sampling = self.sampling(options, info)?;
        let permit = self.permit()?;
        let num_slots = sets.iter().map(SlotSet::num_slots).collect();
        let events = self.engine.render(sampling.specs(sets))?;
        Ok(Rendering { events, sampling, num_slots, deadline, _permit: permit })
    }
}

impl Rendering {
    /// Waits for every image, in request order, each with its seed and slot count.
    pub async fn outputs(&mut self) -> Result<Vec<RenderedOutput>, ApiError> {
        let images = wait_for_images(&mut self.events, self.num_slots.len(), self.deadline).await?;
        Ok(images.into_iter().enumerate().map(|(i, image)| self.output(i, image)).collect())
    }

    /// Image `index` with its facts.
    fn output(&self, index: usize, image: RgbImage) -> RenderedOutput {
        RenderedOutput {
            image,
            seed: self.sampling.seed_of(index),
            num_slots: self.num_slots[index],
        }
    }

    /// Progress and images as they come; an error (a failed image, the deadline) ends the
    /// stream.
    pub fn updates(self) -> impl Stream<Item = Result<RenderUpdate, ApiError>> + Send {
        futures::stream::unfold((self, false), |(mut rendering, failed)| async move {
            if failed {
                return None;
            }
            let update =
                match tokio::time::timeout_at(rendering.deadline, rendering.events.recv()).await {
                    Ok(Some(event)) => rendering.update(event),
                    Ok(None) => return None,
                    Err(_) => Err(ApiError::timeout()),
                };
            let failed = update.is_err();
            Some((update, (rendering, failed)))
        })
    }

    /// One engine event as an update.
    fn update(&self, event: RenderEvent) -> Result<RenderUpdate, ApiError> {
        match event {
            RenderEvent::Progress { index, step, of } => {
                Ok(RenderUpdate::Progress { index, step, of })
            }
            RenderEvent::Image { index, image } => {
                Ok(RenderUpdate::Image { index, output: self.output(index, image) })
            }
            RenderEvent::Failed { error, .. } => Err(ApiError::from(error)),
        }
    }
}

/// Waits for all images of a render until `deadline`.
pub async fn wait_for_images(
    events: &mut UnboundedReceiver<RenderEvent>,
    count: usize,
    deadline: Instant,
) -> Result<Vec<RgbImage>, ApiError> {
    match tokio::time::timeout_at(deadline, collect_images(events, count)).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(_) => Err(ApiError::timeout()),
    }
}
