//! What the engine needs from a model: batched decomposition and resumable render jobs that
//! one call advances together. The engine's batching does not depend on SlotDiffusion
//! itself, so it is tested with a scripted model, and the served model only adapts to it.

use image::RgbImage;
use serde::Serialize;
use utoipa::ToSchema;

use crate::imageio::Preprocess;
use crate::slots::SlotSet;

use super::RenderSpec;

/// The facts about the served model that clients and request validation need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ModelInfo {
    /// Human-readable model name.
    pub name: String,
    /// Digest of the weights; slot sets carry it.
    pub fingerprint: String,
    /// Preset the model follows (`clevrtex`, `voc`, ...).
    pub preset: String,
    /// Side of the square images the model sees, in pixels.
    pub resolution: usize,
    /// How input images are brought to `resolution`.
    #[schema(value_type = Object, example = json!({"kind": "center_crop_resize", "crop": 192}))]
    pub preprocess: Preprocess,
    /// Slots per decomposed image (K).
    pub num_slots: usize,
    /// Width of a slot vector (D).
    pub slot_size: usize,
    /// Diffusion training steps T (DDPM always runs all of them).
    pub timesteps: usize,
    /// Sampler used when a request names none.
    pub default_sampler: String,
    /// Model evaluations per render when a request gives no `steps`.
    pub default_steps: usize,
    /// Device the model runs on, as `--device` names it: `cpu`, `cuda:1`, `metal:0`.
    pub device: String,
    /// Floating-point type of weights and activations.
    pub dtype: String,
}

/// One decomposed image as plain data: its slots, a soft mask per slot and the hard
/// segmentation, at the model's resolution.
#[derive(Debug, Clone, PartialEq)]
pub struct Decomposed {
    /// The K slots.
    pub slots: SlotSet,
    /// K soft masks of `height`×`width` values in [0, 1], slot after slot, row-major.
    pub masks: Vec<f32>,
    /// Slot id (argmax of the masks) of each pixel, row-major.
    pub segmentation: Vec<u32>,
    /// Mask width in pixels.
    pub width: usize,
    /// Mask height in pixels.
    pub height: usize,
}

/// A model the engine can drive from its thread. Methods take batches; every error is
/// reported to the requests of that batch and the engine goes on serving.
pub trait Model {
    /// One image being rendered, with its own sampler state, seed and slot count.
    type Job;

    /// Facts for `/info` and for validating requests.
    fn info(&self) -> ModelInfo;

    /// Decomposes images already at the model's resolution, all in one batch.
    fn decompose(&self, images: &[RgbImage]) -> anyhow::Result<Vec<Decomposed>>;

    /// Starts a render job; an error here means the model refuses the job's parameters.
    fn start_render(&self, spec: &RenderSpec) -> anyhow::Result<Self::Job>;

    /// (evaluations done, evaluations in all) of a job; it is done when both are equal.
    fn progress(&self, job: &Self::Job) -> (usize, usize);

    /// Advances every given unfinished job by one model evaluation, as one batch.
    fn denoise_step(&self, jobs: &mut [&mut Self::Job]) -> anyhow::Result<()>;

    /// Decodes finished jobs into images, as one batch, in order.
    fn finish_render(&self, jobs: &[&Self::Job]) -> anyhow::Result<Vec<RgbImage>>;
}
