//! Segmentation baselines printed beside the model: k-means on pixel colours, one cluster for
//! everything, and the ground truth as the model's feature grid can express it (the ceiling of
//! masks made on that grid).

use candle_core::{Device, Tensor};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::{cell_coverage, Rendered};
use crate::model::slot_attention::{segmentation, upsample_masks};

/// Settings of the k-means colour baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KMeansConfig {
    /// Number of clusters (use the model's slot count for a fair comparison).
    pub clusters: usize,
    /// Lloyd iterations (fewer if the assignment stops changing, which gives the same result).
    pub iterations: usize,
    /// Seed of the k-means++ initialisation.
    pub seed: u64,
}

impl Default for KMeansConfig {
    fn default() -> Self {
        Self { clusters: 7, iterations: 20, seed: 0 }
    }
}

/// A colour as a point in [0, 1]^3.
type Point = [f32; 3];

fn distance2(a: &Point, b: &Point) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum()
}

/// The nearest centre to `point` (lowest index on ties).
fn nearest(point: &Point, centres: &[Point]) -> u32 {
    let mut best = (0, f32::INFINITY);
    for (k, centre) in centres.iter().enumerate() {
        let d = distance2(point, centre);
        if d < best.1 {
            best = (k, d);
        }
    }
    best.0 as u32
}

/// k-means++ seeding: the first centre uniformly, each next one with probability
/// proportional to the squared distance to the nearest centre chosen so far.
fn initial_centres(points: &[Point], clusters: usize, rng: &mut ChaCha8Rng) -> Vec<Point> {
    let mut centres = vec![points[rng.random_range(0..points.len())]];
    let mut nearest2: Vec<f32> = points.iter().map(|p| distance2(p, &centres[0])).collect();
    while centres.len() < clusters {
        let total: f32 = nearest2.iter().sum();
        let pick = if total > 0.0 {
            let mut target = rng.random_range(0.0..total);
            nearest2
                .iter()
                .position(|&d| {
                    target -= d;
                    target < 0.0
                })
                .unwrap_or(points.len() - 1)
        } else {
            // Fewer distinct colours than clusters: the extra centres stay empty.
            rng.random_range(0..points.len())
        };
        centres.push(points[pick]);
        for (d, p) in nearest2.iter_mut().zip(points) {
            *d = d.min(distance2(p, &points[pick]));
        }
    }
    centres
}

/// Each centre moved to the mean of its points; a centre without points stays put.
fn update_centres(points: &[Point], labels: &[u32], centres: &mut [Point]) {
    let mut sums = vec![[0.0f64; 3]; centres.len()];
    let mut counts = vec![0usize; centres.len()];
    for (p, &k) in points.iter().zip(labels) {
        counts[k as usize] += 1;
        for (s, &x) in sums[k as usize].iter_mut().zip(p) {
            *s += x as f64;
        }
    }
    for ((centre, sum), &n) in centres.iter_mut().zip(&sums).zip(&counts) {
        if n > 0 {
            *centre = sum.map(|s| (s / n as f64) as f32);
        }
    }
}

/// k-means on the colours of an interleaved RGB image [H, W, 3]: a label map [H * W] of
/// cluster ids `0..clusters`, deterministic given the config.
pub fn kmeans_labels(image: &[u8], cfg: &KMeansConfig) -> Vec<u32> {
    assert!(cfg.clusters > 0, "k-means needs at least one cluster");
    let points: Vec<Point> =
        image.chunks_exact(3).map(|px| [0, 1, 2].map(|c| px[c] as f32 / 255.0)).collect();
    if points.is_empty() {
        return Vec::new();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut centres = initial_centres(&points, cfg.clusters, &mut rng);
    let mut labels: Vec<u32> = points.iter().map(|p| nearest(p, &centres)).collect();
    for _ in 0..cfg.iterations {
        update_centres(&points, &labels, &mut centres);
        let next: Vec<u32> = points.iter().map(|p| nearest(p, &centres)).collect();
        if next == labels {
            break;
        }
        labels = next;
    }
    labels
}

/// The trivial baseline: every pixel in cluster 0.
pub fn one_cluster_labels(num_pixels: usize) -> Vec<u32> {
    vec![0; num_pixels]
}

/// The ground truth as masks on a feature `grid` can express it: each id's coverage of the
/// grid cells, upsampled bilinearly and argmaxed exactly as a model's Slot Attention masks
/// are. No model with masks on that grid can score much above it.
pub fn grid_oracle_labels(scene: &Rendered, grid: (usize, usize)) -> candle_core::Result<Vec<u32>> {
    let size = (scene.height, scene.width);
    let coverage = cell_coverage(&scene.labels, size, grid);
    let ids = coverage.len();
    let data: Vec<f32> = coverage.into_iter().flatten().collect();
    let masks = Tensor::from_vec(data, (1, ids, grid.0 * grid.1), &Device::Cpu)?;
    let masks = upsample_masks(&masks, grid, size)?;
    segmentation(&masks)?.flatten_all()?.to_vec1::<u32>()
}
