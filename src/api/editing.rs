//! An edit request from its checked inputs to its rendered outputs, whatever the front end:
//! the operations are planned (every reference checked) and the outputs checked against the
//! limits before any work is queued; then images are decomposed, the edited sets gathered
//! and rendered.

use axum::http::StatusCode;
use image::RgbImage;
use tokio::time::Instant;

use super::error::ApiError;
use super::inputs::check_count;
use super::rendering::wait_for_images;
use super::sampling::{Sampling, SamplingOptions};
use super::state::AppState;
use crate::edit::{self, EditOp, EditedSet, Origin, SlotRef};
use crate::engine::ModelInfo;
use crate::slots::SlotSet;

/// The inputs of an edit, checked for count: images to decompose, or validated slot sets.
pub enum EditInputs {
    /// PNG or JPEG files, none empty.
    Images(Vec<Vec<u8>>),
    /// Slot sets of the served model.
    Slots(Vec<SlotSet>),
}

impl EditInputs {
    /// Slots of each input (a decomposed image has the model's K).
    fn slot_counts(&self, info: &ModelInfo) -> Vec<usize> {
        match self {
            Self::Images(images) => vec![info.num_slots; images.len()],
            Self::Slots(sets) => sets.iter().map(SlotSet::num_slots).collect(),
        }
    }

    /// The inputs as slot sets, decomposing images.
    async fn into_slot_sets(
        self,
        state: &AppState,
        info: &ModelInfo,
        deadline: Instant,
    ) -> Result<Vec<SlotSet>, ApiError> {
        match self {
            Self::Slots(sets) => Ok(sets),
            Self::Images(bytes) => {
                let outs = state.decompose(bytes, info, deadline).await?;
                Ok(outs.into_iter().map(|d| d.slots).collect())
            }
        }
    }
}

/// One rendered output of an edit.
pub struct EditOutput {
    /// The input image this output edits, or the compose operation it comes from.
    pub origin: Origin,
    /// Input slots the output was rendered from, in order.
    pub sources: Vec<SlotRef>,
    /// The edited slot set.
    pub slots: SlotSet,
    /// The rendered image.
    pub image: RgbImage,
    /// The seed it was rendered with.
    pub seed: u64,
}

/// The outputs of an edit and the sampling they were rendered with.
pub struct Edited {
    /// The touched inputs in input order, then one output per `compose`.
    pub outputs: Vec<EditOutput>,
    /// Seeds, sampler and steps.
    pub sampling: Sampling,
}

impl AppState {
    /// Plans `operations` over `inputs`, renders every output and returns them.
    pub async fn edit(
        &self,
        inputs: EditInputs,
        operations: &[EditOp],
        options: SamplingOptions<'_>,
    ) -> Result<Edited, ApiError> {
        let deadline = self.deadline();
        let info = self.model()?;
        let plan = edit::plan(&inputs.slot_counts(info), operations)?;
        self.check_outputs(&plan)?;
        let sampling = self.sampling(options, info)?;
        let _permit = self.permit()?;
        let inputs = inputs.into_slot_sets(self, info, deadline).await?;
        let sets =
            plan.iter().map(|out| edit::gather(&inputs, out)).collect::<Result<Vec<_>, _>>()?;
        let mut events = self.engine.render(sampling.specs(sets.clone()))?;
        let images = wait_for_images(&mut events, sets.len(), deadline).await?;
        let outputs = plan
            .into_iter()
            .zip(sets)
            .zip(images)
            .enumerate()
            .map(|(i, ((out, slots), image))| EditOutput {
                origin: out.origin,
                sources: out.slots,
                slots,
                image,
                seed: sampling.seed_of(i),
            })
            .collect();
        Ok(Edited { outputs, sampling })
    }

    /// Refuses edits with more outputs, or outputs with more slots, than the limits.
    fn check_outputs(&self, plan: &[EditedSet]) -> Result<(), ApiError> {
        let limits = self.limits();
        check_count(plan.len(), limits.max_images, "edited images")?;
        match plan.iter().find(|o| o.slots.len() > limits.max_slots) {
            Some(o) => Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_edit",
                format!(
                    "{:?} would have {} slots; at most {} are allowed",
                    o.origin,
                    o.slots.len(),
                    limits.max_slots
                ),
            )),
            None => Ok(()),
        }
    }
}
