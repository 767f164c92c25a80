//! The paper's segmentation and image metrics, with the official definitions
//! (`slotdiffusion/img_based/models/eval_utils.py`).
//!
//! Segmentations are label maps [H * W] of ids: ground truth with 0 = background, predictions
//! with any slot ids. As in the official code (which one-hot encodes with `max + 1` classes),
//! every id from 0 to the largest present counts as a segment, even if empty; the official
//! data loaders make ground-truth ids contiguous first ([`compact_labels`]), and
//! [`segmentation_scores`] does the same. Where the official code returns NaN (no foreground),
//! these functions return `None`.

use serde::Serialize;

/// The official IoU's guard against empty unions: `iou = intersection / (union + 1e-8)`.
const IOU_EPS: f64 = 1e-8;
/// Peak value of byte images, for [`psnr`].
pub const U8_RANGE: f64 = 255.0;
/// Peak value of images in [0, 1], for [`psnr`].
pub const UNIT_RANGE: f64 = 1.0;

/// Renumbers ids to 0, 1, 2, ... in increasing order of the ids present, like the official
/// loaders' `suppress_mask_idx`. Quirk kept: if no pixel has id 0, the smallest id present
/// becomes 0 and so counts as background.
pub fn compact_labels(labels: &[u32]) -> Vec<u32> {
    let mut present = labels.to_vec();
    present.sort_unstable();
    present.dedup();
    labels.iter().map(|id| present.binary_search(id).expect("id is present") as u32).collect()
}

/// Pixel counts of every (ground-truth id, predicted id) pair: `counts[g][p]`, with rows
/// `0..=max(gt)` and columns `0..=max(pred)`.
fn contingency(gt: &[u32], pred: &[u32]) -> Vec<Vec<u64>> {
    assert_eq!(gt.len(), pred.len(), "label maps differ in size");
    let rows = gt.iter().max().map_or(0, |&m| m as usize + 1);
    let cols = pred.iter().max().map_or(0, |&m| m as usize + 1);
    let mut counts = vec![vec![0u64; cols]; rows];
    for (&g, &p) in gt.iter().zip(pred) {
        counts[g as usize][p as usize] += 1;
    }
    counts
}

/// Sum of `n * (n - 1)` (ordered pairs within a group) over counts.
fn pairs(counts: impl IntoIterator<Item = u64>) -> f64 {
    counts.into_iter().map(|n| (n * n.saturating_sub(1)) as f64).sum()
}

/// Adjusted Rand index between two label maps; with `ignore_background`, pixels whose
/// ground-truth id is 0 are dropped first (FG-ARI). When the index is undefined (both
/// labelings put everything in one cluster, or every cluster has at most one pixel, which
/// includes the case of no pixels at all) the result is 1, as in the official code.
pub fn adjusted_rand_index(gt: &[u32], pred: &[u32], ignore_background: bool) -> f64 {
    let mut counts = contingency(gt, pred);
    if ignore_background && !counts.is_empty() {
        counts.remove(0);
    }
    let cols = counts.first().map_or(0, Vec::len);
    let row_sums: Vec<u64> = counts.iter().map(|row| row.iter().sum()).collect();
    let col_sums = (0..cols).map(|p| counts.iter().map(|row| row[p]).sum::<u64>());
    let points: u64 = row_sums.iter().sum();
    let index = pairs(counts.iter().flatten().copied());
    let a_index = pairs(row_sums.iter().copied());
    let b_index = pairs(col_sums);
    let expected = a_index * b_index / pairs([points]).max(1.0);
    let max_index = (a_index + b_index) / 2.0;
    let denominator = max_index - expected;
    if denominator == 0.0 {
        1.0
    } else {
        (index - expected) / denominator
    }
}

/// FG-ARI: the adjusted Rand index over foreground (ground-truth id != 0) pixels only.
pub fn fg_ari(gt: &[u32], pred: &[u32]) -> f64 {
    adjusted_rand_index(gt, pred, true)
}

/// IoU of every ground-truth segment (rows: ids 1..=max, or 0..=max without
/// `ignore_background`) with every predicted id (columns 0..=max), the official way.
pub fn iou_matrix(gt: &[u32], pred: &[u32], ignore_background: bool) -> Vec<Vec<f64>> {
    let counts = contingency(gt, pred);
    let gt_sizes: Vec<u64> = counts.iter().map(|row| row.iter().sum()).collect();
    let cols = counts.first().map_or(0, Vec::len);
    let pred_sizes: Vec<u64> = (0..cols).map(|p| counts.iter().map(|row| row[p]).sum()).collect();
    let first = usize::from(ignore_background);
    counts
        .iter()
        .zip(&gt_sizes)
        .skip(first)
        .map(|(row, &g)| {
            row.iter()
                .zip(&pred_sizes)
                .map(|(&inter, &p)| inter as f64 / ((g + p - inter) as f64 + IOU_EPS))
                .collect()
        })
        .collect()
}

/// mBO: mean over ground-truth foreground segments of their best IoU with any predicted
/// segment (a predicted segment may serve several objects). `None` without foreground.
pub fn mean_best_overlap(gt: &[u32], pred: &[u32]) -> Option<f64> {
    let iou = iou_matrix(gt, pred, true);
    if iou.is_empty() {
        return None;
    }
    let best = iou.iter().map(|row| row.iter().copied().fold(0.0, f64::max));
    Some(best.sum::<f64>() / iou.len() as f64)
}

/// Hungarian mIoU: segments matched one to one with predicted ids maximising total IoU;
/// the mean is over all ground-truth segments, unmatched ones counting 0. With
/// `ignore_background` (the official `fmiou`) background is left out and a map without
/// foreground gives `None`; without it (the official `miou`, the one the paper reports)
/// background is a segment like the others.
pub fn hungarian_miou(gt: &[u32], pred: &[u32], ignore_background: bool) -> Option<f64> {
    let iou = iou_matrix(gt, pred, ignore_background);
    if iou.is_empty() {
        return None;
    }
    let matched: f64 = linear_sum_assignment(&iou, true).into_iter().map(|(g, p)| iou[g][p]).sum();
    Some(matched / iou.len() as f64)
}

/// Optimal assignment (Kuhn-Munkres with potentials, O(n^2 m) for n <= m): pairs
/// (row, column), one per row or per column whichever is fewer, sorted by row, minimising
/// (or with `maximize`, maximising) the summed weights. `weights` is a rectangular matrix.
pub fn linear_sum_assignment(weights: &[Vec<f64>], maximize: bool) -> Vec<(usize, usize)> {
    let rows = weights.len();
    let cols = weights.first().map_or(0, Vec::len);
    assert!(weights.iter().all(|row| row.len() == cols), "ragged matrix");
    let sign = if maximize { -1.0 } else { 1.0 };
    if rows <= cols {
        min_cost_assignment(rows, cols, |r, c| sign * weights[r][c])
    } else {
        let mut pairs: Vec<_> = min_cost_assignment(cols, rows, |r, c| sign * weights[c][r])
            .into_iter()
            .map(|(c, r)| (r, c))
            .collect();
        pairs.sort_unstable();
        pairs
    }
}

/// Minimum-cost assignment of every row to a distinct column, for `rows <= cols`.
///
/// Rows are added one at a time; each addition grows a shortest-augmenting-path tree over
/// columns using reduced costs `cost - u[row] - v[col]` (kept non-negative by the dual
/// potentials u, v), then flips the path. Index 0 of the column arrays is a virtual column
/// holding the row being added.
fn min_cost_assignment(
    rows: usize,
    cols: usize,
    cost: impl Fn(usize, usize) -> f64,
) -> Vec<(usize, usize)> {
    let mut u = vec![0.0; rows + 1];
    let mut v = vec![0.0; cols + 1];
    // owner[c]: the row (1-based, 0 = none) assigned to column c (1-based).
    let mut owner = vec![0usize; cols + 1];
    let mut parent = vec![0usize; cols + 1];
    for row in 1..=rows {
        owner[0] = row;
        let mut column = 0;
        let mut slack = vec![f64::INFINITY; cols + 1];
        let mut in_tree = vec![false; cols + 1];
        // Grow the tree until it reaches a free column.
        while owner[column] != 0 {
            in_tree[column] = true;
            let r = owner[column];
            let (mut delta, mut next) = (f64::INFINITY, 0);
            for c in 1..=cols {
                if in_tree[c] {
                    continue;
                }
                let reduced = cost(r - 1, c - 1) - u[r] - v[c];
                if reduced < slack[c] {
                    slack[c] = reduced;
                    parent[c] = column;
                }
                if slack[c] < delta {
                    delta = slack[c];
                    next = c;
                }
            }
            for c in 0..=cols {
                if in_tree[c] {
                    u[owner[c]] += delta;
                    v[c] -= delta;
                } else {
                    slack[c] -= delta;
                }
            }
            column = next;
        }
        // Flip the augmenting path back to the virtual column.
        while column != 0 {
            let previous = parent[column];
            owner[column] = owner[previous];
            column = previous;
        }
    }
    let mut pairs: Vec<_> =
        (1..=cols).filter(|&c| owner[c] != 0).map(|c| (owner[c] - 1, c - 1)).collect();
    pairs.sort_unstable();
    pairs
}

/// The segmentation metrics of one image, computed like the official evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SegmentationScores {
    /// FG-ARI.
    pub fg_ari: f64,
    /// mBO (`None` without foreground).
    pub mbo: Option<f64>,
    /// Hungarian mIoU with background as a segment (the paper's "mIoU", official `miou`).
    pub miou: f64,
    /// Hungarian mIoU over foreground objects only (official `fmiou`; `None` without one).
    pub fg_miou: Option<f64>,
}

/// All segmentation metrics of one image: `gt` ids (0 = background) are made contiguous as
/// the official loaders do, `pred` holds slot ids (e.g. the argmax over slot masks).
pub fn segmentation_scores(gt: &[u32], pred: &[u32]) -> SegmentationScores {
    let gt = compact_labels(gt);
    SegmentationScores {
        fg_ari: fg_ari(&gt, pred),
        mbo: mean_best_overlap(&gt, pred),
        miou: hungarian_miou(&gt, pred, false).expect("a non-empty map has a segment"),
        fg_miou: hungarian_miou(&gt, pred, true),
    }
}

/// Squared error summed over the selected pixels' channels, and the count of values summed.
fn squared_error<T: Copy + Into<f64>>(
    a: &[T],
    b: &[T],
    select: impl Fn(usize) -> bool,
    channels: usize,
) -> (f64, usize) {
    assert_eq!(a.len(), b.len(), "images differ in size");
    a.iter()
        .zip(b)
        .enumerate()
        .filter(|(i, _)| select(i / channels))
        .fold((0.0, 0), |(sum, n), (_, (&x, &y))| (sum + (x.into() - y.into()).powi(2), n + 1))
}

/// PSNR in dB from a mean squared error (infinite when the images are equal).
fn psnr_from_mse(mse: f64, data_range: f64) -> f64 {
    10.0 * (data_range * data_range / mse).log10()
}

/// PSNR of two images of any layout, as `skimage.metrics.peak_signal_noise_ratio`:
/// `10 log10(range^2 / mse)` over all values; `data_range` is [`U8_RANGE`] for bytes or
/// [`UNIT_RANGE`] for [0, 1] floats. Equal images give +infinity, as skimage does.
pub fn psnr<T: Copy + Into<f64>>(a: &[T], b: &[T], data_range: f64) -> f64 {
    let (sum, n) = squared_error(a, b, |_| true, 1);
    psnr_from_mse(sum / n as f64, data_range)
}

/// PSNR restricted to a region, for edit fidelity: images are interleaved [H, W, C] and
/// `region` is [H, W]; `None` when the region is empty.
pub fn masked_psnr<T: Copy + Into<f64>>(
    a: &[T],
    b: &[T],
    region: &[bool],
    data_range: f64,
) -> Option<f64> {
    assert!(
        !region.is_empty() && a.len().is_multiple_of(region.len()),
        "region does not match the image"
    );
    let channels = a.len() / region.len();
    let (sum, n) = squared_error(a, b, |pixel| region[pixel], channels);
    (n > 0).then(|| psnr_from_mse(sum / n as f64, data_range))
}
