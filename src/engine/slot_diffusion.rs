//! The served model behind the engine: [`SlotDiffusion`] as a [`Model`]. Plain data in and
//! out (images, slot sets), tensors only inside, on the model thread.

use candle_core::{Tensor, WithDType};
use image::RgbImage;

use super::{Decomposed, Model, ModelInfo, RenderSpec};
use crate::device::device_name;
use crate::imageio::{images_to_tensor, tensor_to_images};
use crate::model::pipeline::{RenderJob, SlotDiffusion};
use crate::slots::SlotSet;

/// A model error without the backtrace candle attaches when `RUST_BACKTRACE` is set: the
/// message reaches clients and logs, the backtrace would only clutter them.
fn plain(e: candle_core::Error) -> anyhow::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => plain(*inner),
        other => other.into(),
    }
}

/// The rows of a batch tensor [B, ...] as flat vectors, one per item.
fn rows<T: WithDType>(t: &Tensor) -> anyhow::Result<Vec<Vec<T>>> {
    t.flatten_from(1).and_then(|t| t.to_vec2()).map_err(plain)
}

impl Model for SlotDiffusion {
    type Job = RenderJob;

    fn info(&self) -> ModelInfo {
        let c = self.config();
        ModelInfo {
            name: c.name.clone(),
            fingerprint: self.fingerprint().to_string(),
            preset: format!("{:?}", c.preset).to_lowercase(),
            resolution: c.resolution,
            preprocess: c.preprocess,
            num_slots: c.num_slots(),
            slot_size: c.slot_size(),
            timesteps: c.schedule.timesteps,
            default_sampler: c.sampler.kind.name().to_string(),
            default_steps: c.sampler.steps,
            device: device_name(self.device()),
            dtype: self.dtype().as_str().to_string(),
        }
    }

    fn decompose(&self, images: &[RgbImage]) -> anyhow::Result<Vec<Decomposed>> {
        let d = images_to_tensor(images, self.device())
            .and_then(|batch| SlotDiffusion::decompose(self, &batch))
            .map_err(plain)?;
        let (_, k, height, width) = d.masks.dims4().map_err(plain)?;
        let model = self.fingerprint();
        rows::<f32>(&d.slots)?
            .into_iter()
            .zip(rows::<f32>(&d.masks)?)
            .zip(rows::<u32>(&d.segmentation)?)
            .map(|((slots, masks), segmentation)| {
                let slot_size = slots.len() / k;
                Ok(Decomposed {
                    slots: SlotSet::new(slot_size, slots, model)?,
                    masks,
                    segmentation,
                    width,
                    height,
                })
            })
            .collect()
    }

    fn start_render(&self, spec: &RenderSpec) -> anyhow::Result<RenderJob> {
        let s = &spec.slots;
        Tensor::from_slice(s.values(), (s.num_slots(), s.slot_size()), self.device())
            .and_then(|slots| {
                SlotDiffusion::start_render(self, &slots, spec.seed, spec.sampler, spec.steps)
            })
            .map_err(plain)
    }

    fn progress(&self, job: &RenderJob) -> (usize, usize) {
        (job.step(), job.total_steps())
    }

    fn denoise_step(&self, jobs: &mut [&mut RenderJob]) -> anyhow::Result<()> {
        SlotDiffusion::denoise_step(self, jobs).map_err(plain)
    }

    fn finish_render(&self, jobs: &[&RenderJob]) -> anyhow::Result<Vec<RgbImage>> {
        SlotDiffusion::finish_render(self, jobs)
            .and_then(|images| tensor_to_images(&images))
            .map_err(plain)
    }
}
