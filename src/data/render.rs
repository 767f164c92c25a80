//! A rendered scene: the image and its exact instance masks, plus PNG helpers.

use std::path::Path;

use image::{ImageResult, RgbImage};

/// An image with its ground-truth segmentation, in the layout of the DeepMind multi-object
/// datasets: image [H, W, 3] u8, masks [K, H, W] with id 0 the background.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Number of mask channels K (max objects + 1); ids run 0..K.
    pub num_masks: usize,
    /// RGB bytes, row-major, interleaved: [H, W, 3].
    pub image: Vec<u8>,
    /// The id visible at each pixel after occlusion (0 = background, i + 1 = object i in
    /// painter's order): [H, W].
    pub labels: Vec<u32>,
}

impl Rendered {
    /// Binary masks [K, H, W] (0 or 1): channel k is 1 where id k is visible.
    pub fn masks(&self) -> Vec<u8> {
        (0..self.num_masks as u32)
            .flat_map(|k| self.labels.iter().map(move |&id| u8::from(id == k)))
            .collect()
    }

    /// The pixels where `id` is visible, [H, W].
    pub fn region(&self, id: u32) -> Vec<bool> {
        self.labels.iter().map(|&l| l == id).collect()
    }

    /// The image as f32 [3, H, W] in [0, 1], the layout models take.
    pub fn image_chw(&self) -> Vec<f32> {
        (0..3)
            .flat_map(|c| self.image.chunks_exact(3).map(move |px| px[c] as f32 / 255.0))
            .collect()
    }

    /// The image as an `image` crate buffer.
    pub fn to_rgb_image(&self) -> RgbImage {
        RgbImage::from_raw(self.width as u32, self.height as u32, self.image.clone())
            .expect("image buffer has width * height * 3 bytes")
    }

    /// Writes the image as PNG.
    pub fn save_image(&self, path: &Path) -> ImageResult<()> {
        self.to_rgb_image().save(path)
    }

    /// Writes the label map as a palette PNG (one fixed colour per id, see [`palette_color`]).
    pub fn save_masks(&self, path: &Path) -> ImageResult<()> {
        label_map_image(&self.labels, self.width, self.height).save(path)
    }
}

/// The colour of ground-truth segment id `id`: dark grey for the background (0), then the
/// slot colours of [`crate::imageio::slot_color`], so ground truth and predicted segmentations
/// are drawn alike.
pub fn palette_color(id: u32) -> [u8; 3] {
    match id {
        0 => [40, 40, 40],
        id => crate::imageio::slot_color(id as usize - 1),
    }
}

/// Colours a label map [H, W] with [`palette_color`]; for ground truth and predicted ids alike.
pub fn label_map_image(labels: &[u32], width: usize, height: usize) -> RgbImage {
    assert_eq!(labels.len(), width * height, "label map size");
    let bytes = labels.iter().flat_map(|&id| palette_color(id)).collect();
    RgbImage::from_raw(width as u32, height as u32, bytes).expect("3 bytes per label")
}

/// The fraction of each feature cell that every id covers: `[ids][cells]` for a label map
/// [H, W] (ids `0..=max id`) pooled onto a `grid` whose cells are whole pixel blocks.
pub fn cell_coverage(labels: &[u32], size: (usize, usize), grid: (usize, usize)) -> Vec<Vec<f32>> {
    let (h, w) = size;
    let (gh, gw) = grid;
    let (ch, cw) = (h / gh, w / gw);
    let ids = labels.iter().max().map_or(1, |&m| m as usize + 1);
    let mut coverage = vec![vec![0f32; gh * gw]; ids];
    let share = 1.0 / (ch * cw) as f32;
    for y in 0..gh * ch {
        for x in 0..gw * cw {
            let id = labels[y * w + x] as usize;
            coverage[id][(y / ch) * gw + x / cw] += share;
        }
    }
    coverage
}
