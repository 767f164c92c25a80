//! Conversions between the generated gRPC messages and the types the API shares with HTTP.
//! Incoming messages are only reshaped here; their validation is the shared code's.

use image::RgbImage;

use super::proto;
use crate::api::decomposition::DecomposedParts;
use crate::api::editing::{EditOutput, Edited};
use crate::api::rendering::{RenderUpdate, RenderedOutput};
use crate::api::types::{InfoResponse, Limits};
use crate::api::{ApiError, SamplingOptions};
use crate::edit::{EditOp, Origin, SlotRef};
use crate::engine::ModelInfo;
use crate::imageio::{encode_png, Preprocess};
use crate::slots::{SlotError, SlotSet, SlotSpec, WireSlotSet};

impl WireSlotSet for proto::SlotSet {
    fn decode(&self, spec: &SlotSpec) -> Result<SlotSet, SlotError> {
        let shape: Vec<usize> = self.shape.iter().map(|&n| n as usize).collect();
        let (k, d) = spec.check_header(&shape, &self.model)?;
        SlotSet::from_le_bytes(k, d, &self.data, &self.model)
    }
}

/// The message form of a slot set.
pub fn slot_set(set: &SlotSet) -> proto::SlotSet {
    proto::SlotSet {
        shape: vec![set.num_slots() as u32, set.slot_size() as u32],
        data: set.to_le_bytes(),
        model: set.model().to_string(),
    }
}

/// A request's `seed`, `sampler` and `steps`.
pub fn sampling_options(
    seed: Option<u64>,
    sampler: &Option<String>,
    steps: Option<u32>,
) -> SamplingOptions<'_> {
    SamplingOptions { seed, sampler: sampler.as_deref(), steps: steps.map(|n| n as usize) }
}

/// Slot indices of `keep`/`drop`; an empty list means the field was not given.
pub fn indices(list: &[u32]) -> Option<Vec<usize>> {
    (!list.is_empty()).then(|| list.iter().map(|&i| i as usize).collect())
}

/// One decomposed image.
pub fn decomposed(parts: DecomposedParts) -> proto::DecomposedImage {
    let objects = parts
        .objects
        .into_iter()
        .map(|o| proto::SlotObject {
            slot: o.summary.slot as u32,
            area: o.summary.area,
            bbox: o.summary.bbox.map(|[x0, y0, x1, y1]| proto::BoundingBox { x0, y0, x1, y1 }),
            mask: o.mask.unwrap_or_default(),
        })
        .collect();
    proto::DecomposedImage {
        slots: Some(slot_set(&parts.slots)),
        width: parts.width as u32,
        height: parts.height as u32,
        objects,
        segmentation: parts.segmentation.unwrap_or_default(),
    }
}

/// A rendered image as PNG bytes with its seed and slot count.
pub fn rendered(output: &RenderedOutput) -> proto::RenderedImage {
    rendered_image(&output.image, output.seed, output.num_slots)
}

fn rendered_image(image: &RgbImage, seed: u64, num_slots: usize) -> proto::RenderedImage {
    proto::RenderedImage { png: encode_png(image), seed, num_slots: num_slots as u32 }
}

/// One message of `RenderStream`.
pub fn render_event(update: RenderUpdate) -> proto::RenderEvent {
    let event = match update {
        RenderUpdate::Progress { index, step, of } => {
            proto::render_event::Event::Progress(proto::Progress {
                index: index as u32,
                step: step as u32,
                of: of as u32,
            })
        }
        RenderUpdate::Image { index, output } => {
            proto::render_event::Event::Image(proto::RenderedImageEvent {
                index: index as u32,
                image: Some(rendered(&output)),
            })
        }
    };
    proto::RenderEvent { event: Some(event) }
}

/// A slot reference that must be present.
fn slot_ref(r: Option<proto::SlotRef>, field: &str) -> Result<SlotRef, ApiError> {
    let r = r.ok_or_else(|| ApiError::bad_request(format!("`{field}` is missing")))?;
    Ok(SlotRef { image: r.image as usize, slot: r.slot as usize })
}

/// An edit operation; one with no kind or a missing slot reference is refused.
pub fn edit_op(operation: proto::EditOperation) -> Result<EditOp, ApiError> {
    use proto::edit_operation::Op;
    match operation.op {
        Some(Op::Swap(s)) => Ok(EditOp::Swap { a: slot_ref(s.a, "a")?, b: slot_ref(s.b, "b")? }),
        Some(Op::Remove(r)) => {
            Ok(EditOp::Remove { image: r.image as usize, slot: r.slot as usize })
        }
        Some(Op::Insert(i)) => {
            Ok(EditOp::Insert { slot: slot_ref(i.slot, "slot")?, into: i.into as usize })
        }
        Some(Op::Replace(r)) => Ok(EditOp::Replace {
            target: slot_ref(r.target, "target")?,
            source: slot_ref(r.source, "source")?,
        }),
        Some(Op::Compose(c)) => Ok(EditOp::Compose {
            slots: c
                .slots
                .into_iter()
                .map(|r| slot_ref(Some(r), "slots"))
                .collect::<Result<_, _>>()?,
        }),
        None => Err(ApiError::bad_request(
            "no operation given: set one of swap, remove, insert, replace, compose",
        )),
    }
}

fn proto_slot_ref(r: SlotRef) -> proto::SlotRef {
    proto::SlotRef { image: r.image as u32, slot: r.slot as u32 }
}

fn edited_image(out: EditOutput) -> proto::EditedImage {
    let kind = match out.origin {
        Origin::Image(i) => proto::origin::Kind::Image(i as u32),
        Origin::Compose(n) => proto::origin::Kind::Compose(n as u32),
    };
    proto::EditedImage {
        origin: Some(proto::Origin { kind: Some(kind) }),
        sources: out.sources.into_iter().map(proto_slot_ref).collect(),
        image: Some(rendered_image(&out.image, out.seed, out.slots.num_slots())),
        slots: Some(slot_set(&out.slots)),
    }
}

/// The answer to `Edit`.
pub fn edit_response(edited: Edited) -> proto::EditResponse {
    let s = edited.sampling;
    proto::EditResponse {
        outputs: edited.outputs.into_iter().map(edited_image).collect(),
        seed: s.seed,
        sampler: s.sampler.to_string(),
        steps: s.steps as u32,
    }
}

/// The preprocessing rule's name and crop side (0 when it has none).
fn preprocess(rule: Preprocess) -> (String, u32) {
    match rule {
        Preprocess::Resize => ("resize".into(), 0),
        Preprocess::CenterCropResize { crop } => ("center_crop_resize".into(), crop),
        Preprocess::ShortSideCenterCrop => ("short_side_center_crop".into(), 0),
    }
}

fn model_info(m: ModelInfo) -> proto::ModelInfo {
    let (preprocess, crop) = preprocess(m.preprocess);
    proto::ModelInfo {
        name: m.name,
        fingerprint: m.fingerprint,
        preset: m.preset,
        resolution: m.resolution as u32,
        preprocess,
        crop,
        num_slots: m.num_slots as u32,
        slot_size: m.slot_size as u32,
        timesteps: m.timesteps as u32,
        default_sampler: m.default_sampler,
        default_steps: m.default_steps as u32,
        device: m.device,
        dtype: m.dtype,
    }
}

fn limits(l: Limits) -> proto::Limits {
    proto::Limits {
        max_batch_size: l.max_batch_size as u64,
        max_queue: l.max_queue as u64,
        max_concurrent: l.max_concurrent as u64,
        max_images: l.max_images as u64,
        max_slots: l.max_slots as u64,
        max_steps: l.max_steps as u64,
        payload_limit: l.payload_limit as u64,
        max_image_pixels: l.max_image_pixels,
        max_image_side: l.max_image_side,
        request_timeout_secs: l.request_timeout_secs,
    }
}

/// The answer to `Info`.
pub fn info(info: InfoResponse) -> proto::InfoResponse {
    proto::InfoResponse {
        model: Some(model_info(info.model)),
        samplers: info.samplers,
        limits: Some(limits(info.limits)),
        version: info.version,
    }
}
