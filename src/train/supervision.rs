//! Instance-mask supervision of Slot Attention: an optional auxiliary loss that teaches the
//! slots the generator's objects directly, for when unsupervised grouping is too slow for the
//! compute at hand (it is a departure from the paper, which learns the grouping unsupervised).
//!
//! Slots carry no fixed order, so each scene's objects (background included) are matched to
//! slots one to one by the assignment that minimises the loss itself (Hungarian matching, as
//! in set prediction), and the loss is the cross-entropy between the Slot Attention masks
//! and the matched objects' coverage of each feature cell.
//!
//! Every cell counts the same by default, so the background, most of a scene's area, dominates
//! the loss; FG-ARI leaves the background out. A foreground weight above 1 makes the cells
//! that objects cover count more, in proportion to how much of them they cover.

use candle_core::{Result, Tensor};

use crate::data::cell_coverage;
use crate::eval::metrics::linear_sum_assignment;

/// Added to the masks before the logarithm, so empty cells of a slot cost a bounded amount.
const LOG_FLOOR: f64 = 1e-6;

/// The matched cross-entropy between Slot Attention masks `masks` [B, K, N] (normalised over
/// slots) and the label maps `labels` (one [H, W] map of `size` per scene), averaged over
/// scenes and cells. A scene with more ids than slots leaves the ids that the cheapest
/// assignment does not place unmatched: their cells add no target. Each cell weighs
/// `1 + (foreground_weight − 1) × (its share covered by objects)`; a weight of 1 is the plain
/// cross-entropy.
pub fn mask_loss(
    masks: &Tensor,
    labels: &[Vec<u32>],
    size: (usize, usize),
    grid: (usize, usize),
    foreground_weight: f64,
) -> Result<Tensor> {
    let (b, k, n) = masks.dims3()?;
    if labels.len() != b || grid.0 * grid.1 != n {
        candle_core::bail!(
            "mask supervision: {} label maps on a {}×{} grid for masks of shape {:?}",
            labels.len(),
            grid.0,
            grid.1,
            masks.dims()
        );
    }
    let log_masks = (masks + LOG_FLOOR)?.log()?;
    let costs = log_masks.detach().to_vec3::<f32>()?;
    let mut target = vec![0f32; b * k * n];
    for (i, (scene_labels, log_m)) in labels.iter().zip(&costs).enumerate() {
        let coverage = weighted_coverage(scene_labels, size, grid, foreground_weight);
        let present: Vec<&Vec<f32>> =
            coverage.iter().filter(|c| c.iter().any(|&v| v > 0.0)).collect();
        let cost: Vec<Vec<f64>> = present
            .iter()
            .map(|cov| {
                log_m
                    .iter()
                    .map(|slot| -cov.iter().zip(slot).map(|(c, l)| (c * l) as f64).sum::<f64>())
                    .collect()
            })
            .collect();
        for (object, slot) in linear_sum_assignment(&cost, false) {
            target[(i * k + slot) * n..][..n].copy_from_slice(present[object]);
        }
    }
    let target = Tensor::from_vec(target, (b, k, n), masks.device())?.to_dtype(masks.dtype())?;
    (target * log_masks)?.sum_all()?.affine(-1.0 / (b * n) as f64, 0.0)
}

/// Each id's coverage of each cell ([`cell_coverage`]), times the cell's weight.
fn weighted_coverage(
    labels: &[u32],
    size: (usize, usize),
    grid: (usize, usize),
    foreground_weight: f64,
) -> Vec<Vec<f32>> {
    let mut coverage = cell_coverage(labels, size, grid);
    let extra = foreground_weight as f32 - 1.0;
    let weights: Vec<f32> = coverage[0].iter().map(|bg| 1.0 + extra * (1.0 - bg)).collect();
    for id in &mut coverage {
        id.iter_mut().zip(&weights).for_each(|(c, w)| *c *= w);
    }
    coverage
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::mask_loss;
    use crate::data::cell_coverage;

    /// A 4×4 label map: background on the left half, object 1 top right, object 2 bottom right.
    fn labels() -> Vec<u32> {
        vec![0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 2, 2, 0, 0, 2, 2]
    }

    /// The loss of 3 slots' masks over the 2×2 grid of [`labels`] (slot rows are [cell 0..4]).
    fn loss(rows: [[f32; 4]; 3], foreground_weight: f64) -> f32 {
        let data: Vec<f32> = rows.iter().flatten().copied().collect();
        let masks = Tensor::from_vec(data, (1, 3, 4), &Device::Cpu).unwrap();
        let l = mask_loss(&masks, &[labels()], (4, 4), (2, 2), foreground_weight).unwrap();
        l.to_scalar::<f32>().unwrap()
    }

    #[test]
    fn coverage_is_the_share_of_each_cell() {
        let cov = cell_coverage(&labels(), (4, 4), (2, 2));
        assert_eq!(
            cov,
            vec![vec![1.0, 0.0, 1.0, 0.0], vec![0.0, 1.0, 0.0, 0.0], vec![0.0, 0.0, 0.0, 1.0]]
        );
        let cov = cell_coverage(&labels(), (4, 4), (1, 1));
        assert_eq!(cov, vec![vec![0.5], vec![0.25], vec![0.25]]);
    }

    #[test]
    fn the_loss_ignores_slot_order_and_rewards_the_right_masks() {
        let right = [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]];
        let wrong = [[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0]];
        let loss = |rows| loss(rows, 1.0);
        assert!(loss(right) < 1e-5, "matched masks cost {}", loss(right));
        let swapped = [right[2], right[0], right[1]];
        assert_eq!(loss(right), loss(swapped));
        assert!(loss(wrong) > 3.0, "wrong masks cost only {}", loss(wrong));
    }

    #[test]
    fn the_foreground_weight_scales_the_cost_of_object_cells_only() {
        // half of object 1's cell (cell 1) given to the background's slot
        let object_cell_split = [[0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [1.0, 0.5, 1.0, 0.0]];
        // half of a background cell (cell 0) given to object 1's slot
        let background_cell_split =
            [[0.5, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.5, 0.0, 1.0, 0.0]];
        let half = std::f32::consts::LN_2 / 4.0;
        for (rows, weight, expected) in [
            (object_cell_split, 1.0, half),
            (object_cell_split, 3.0, 3.0 * half),
            (background_cell_split, 1.0, half),
            (background_cell_split, 3.0, half),
        ] {
            let got = loss(rows, weight);
            assert!((got - expected).abs() < 1e-4, "weight {weight}: {got} against {expected}");
        }
    }
}
