//! The served model behind the engine: [`SlotDiffusion`] as a [`Model`]. Plain data in and
//! out (images, slot sets), tensors only inside, on the model thread.

use candle_core::Tensor;
use image::RgbImage;

use super::{Decomposed, Model, ModelInfo, RenderSpec};
use crate::device::device_name;
use crate::imageio::{images_to_tensor, tensor_to_images};
use crate::model::pipeline::{RenderJob, SlotDiffusion};
use crate::slots::SlotSet;

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
            device: device_name(self.device()).to_string(),
            dtype: self.dtype().as_str().to_string(),
        }
    }

    fn decompose(&self, images: &[RgbImage]) -> anyhow::Result<Vec<Decomposed>> {
        let d = SlotDiffusion::decompose(self, &images_to_tensor(images, self.device())?)?;
        let (_, k, height, width) = d.masks.dims4()?;
        let slots: Vec<Vec<f32>> = d.slots.flatten_from(1)?.to_vec2()?;
        let masks: Vec<Vec<f32>> = d.masks.flatten_from(1)?.to_vec2()?;
        let labels: Vec<Vec<u32>> = d.segmentation.flatten_from(1)?.to_vec2()?;
        let model = self.fingerprint();
        slots
            .into_iter()
            .zip(masks)
            .zip(labels)
            .map(|((slots, masks), segmentation)| {
                let slot_size = slots.len() / k;
                Ok(Decomposed { slots: SlotSet::new(slot_size, slots, model)?, masks, segmentation, width, height })
            })
            .collect()
    }

    fn start_render(&self, spec: &RenderSpec) -> anyhow::Result<RenderJob> {
        let s = &spec.slots;
        let slots = Tensor::from_slice(s.values(), (s.num_slots(), s.slot_size()), self.device())?;
        Ok(SlotDiffusion::start_render(self, &slots, spec.seed, spec.sampler, spec.steps)?)
    }

    fn progress(&self, job: &RenderJob) -> (usize, usize) {
        (job.step(), job.total_steps())
    }

    fn denoise_step(&self, jobs: &mut [&mut RenderJob]) -> anyhow::Result<()> {
        Ok(SlotDiffusion::denoise_step(self, jobs)?)
    }

    fn finish_render(&self, jobs: &[&RenderJob]) -> anyhow::Result<Vec<RgbImage>> {
        Ok(tensor_to_images(&SlotDiffusion::finish_render(self, jobs)?)?)
    }
}
