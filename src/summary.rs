//! What a client wants to know about each slot of a decomposed image: how much of the image
//! it covers and where.

use serde::{Deserialize, Serialize};

/// One slot's share of the hard segmentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SlotSummary {
    /// Slot index.
    pub slot: usize,
    /// Fraction of the image's pixels assigned to the slot, in [0, 1].
    pub area: f32,
    /// Bounding box `[x0, y0, x1, y1]` of its pixels (inclusive-exclusive), or `None` when
    /// the slot owns no pixel.
    pub bbox: Option<[u32; 4]>,
}

/// Per-slot area and bounding box from a row-major `width`-wide label map of slot ids.
pub fn summarize(labels: &[u32], width: usize, num_slots: usize) -> Vec<SlotSummary> {
    let mut count = vec![0usize; num_slots];
    let mut bbox: Vec<Option<[u32; 4]>> = vec![None; num_slots];
    for (i, &id) in labels.iter().enumerate() {
        let Some(c) = count.get_mut(id as usize) else { continue };
        *c += 1;
        let (x, y) = ((i % width) as u32, (i / width) as u32);
        let b = bbox[id as usize].get_or_insert([x, y, x + 1, y + 1]);
        *b = [b[0].min(x), b[1].min(y), b[2].max(x + 1), b[3].max(y + 1)];
    }
    let total = labels.len().max(1) as f32;
    (0..num_slots)
        .map(|slot| SlotSummary { slot, area: count[slot] as f32 / total, bbox: bbox[slot] })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn areas_and_boxes() {
        // 4×3 image: slot 1 is a 2×2 block at (1, 1), slot 2 owns nothing.
        let labels = [0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 0];
        let s = summarize(&labels, 4, 3);
        assert_eq!(s[0].area, 8.0 / 12.0);
        assert_eq!(s[1].bbox, Some([1, 1, 3, 3]));
        assert_eq!(s[1].area, 4.0 / 12.0);
        assert_eq!(s[2], SlotSummary { slot: 2, area: 0.0, bbox: None });
    }
}
