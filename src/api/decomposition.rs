//! A decomposed image's slots, per-slot areas and boxes, and PNGs (soft masks, palette
//! segmentation), encoded once for whichever wire form a front end answers in.

use super::blocking::on_blocking_thread;
use super::error::ApiError;
use crate::engine::Decomposed;
use crate::imageio::{encode_mask_png, encode_segmentation_png};
use crate::slots::SlotSet;
use crate::summary::{summarize, SlotSummary};

/// One decomposed image, with its PNGs encoded.
pub struct DecomposedParts {
    /// The slot set.
    pub slots: SlotSet,
    /// Mask width in pixels.
    pub width: usize,
    /// Mask height in pixels.
    pub height: usize,
    /// One entry per slot, in slot order.
    pub objects: Vec<SlotPart>,
    /// Argmax segmentation as a palette PNG; `None` when masks were not asked for.
    pub segmentation: Option<Vec<u8>>,
}

/// What one slot covers, and its soft mask.
pub struct SlotPart {
    /// Slot index, area and bounding box.
    pub summary: SlotSummary,
    /// Soft mask as an 8-bit greyscale PNG; `None` when masks were not asked for.
    pub mask: Option<Vec<u8>>,
}

/// The parts of one decomposed image; PNGs only `with_pngs`.
fn parts(d: Decomposed, with_pngs: bool) -> DecomposedParts {
    let (w, h) = (d.width, d.height);
    let k = d.slots.num_slots();
    let plane = w * h;
    let mask_png = |slot: usize| {
        encode_mask_png(&d.masks[slot * plane..(slot + 1) * plane], w as u32, h as u32)
    };
    let objects = summarize(&d.segmentation, w, k)
        .into_iter()
        .map(|summary| SlotPart { mask: with_pngs.then(|| mask_png(summary.slot)), summary })
        .collect();
    let segmentation = with_pngs.then(|| {
        let labels: Vec<u8> = d.segmentation.iter().map(|&l| l.min(255) as u8).collect();
        encode_segmentation_png(&labels, w as u32, h as u32, k)
    });
    DecomposedParts { slots: d.slots, width: w, height: h, objects, segmentation }
}

/// Every decomposed image in a front end's `form`, built on a blocking thread (PNG encoding
/// is CPU work).
pub async fn describe_all<T: Send + 'static>(
    outs: Vec<Decomposed>,
    with_pngs: bool,
    form: fn(DecomposedParts) -> T,
) -> Result<Vec<T>, ApiError> {
    on_blocking_thread("encoding the decomposition", move || {
        outs.into_iter().map(|d| form(parts(d, with_pngs))).collect()
    })
    .await
}
