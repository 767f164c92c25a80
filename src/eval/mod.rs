//! `slotserve eval`: the paper's metrics over held-out procedural scenes, with baselines.
//!
//! The model side (decompose, reconstruct, render without a slot) belongs to the caller; this
//! module supplies the scenes, the ground truth for edits, per-method running means
//! ([`Report`]), the baselines, the count of where the objects went ([`outcomes`]), and the
//! printed tables.

pub mod baselines;
pub mod metrics;
pub mod outcomes;

use std::fmt::Write;

use serde::Serialize;

use crate::data::{scene_seed, Rendered, Scene, SceneConfig, Split};
use baselines::{grid_oracle_labels, kmeans_labels, one_cluster_labels, KMeansConfig};
use metrics::{masked_psnr, psnr, segmentation_scores, U8_RANGE};
use outcomes::{object_outcomes, Outcomes};

/// A running mean that skips missing values (`None`, NaN), like the official `np.nanmean`
/// (here over all scenes at once rather than batch by batch).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Mean {
    sum: f64,
    count: usize,
}

impl Mean {
    /// Adds a value unless it is missing or NaN.
    pub fn add(&mut self, value: Option<f64>) {
        if let Some(v) = value.filter(|v| !v.is_nan()) {
            self.sum += v;
            self.count += 1;
        }
    }

    /// The mean, or `None` before any value.
    pub fn value(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// How many values were added.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Adds every value `other` holds, as if they had been added here.
    pub fn absorb(&mut self, other: &Mean) {
        self.sum += other.sum;
        self.count += other.count;
    }
}

/// One method's metrics over a set of scenes (one row of the table).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Method name, as printed.
    pub name: String,
    /// Scenes segmented.
    pub scenes: usize,
    /// FG-ARI.
    pub fg_ari: Mean,
    /// mBO.
    pub mbo: Mean,
    /// Hungarian mIoU with background as a segment (the paper's mIoU).
    pub miou: Mean,
    /// Hungarian mIoU over foreground objects only.
    pub fg_miou: Mean,
    /// Reconstruction PSNR (dB) of the image from its own slots.
    pub psnr: Mean,
    /// Removal PSNR (dB) inside the removed object's region.
    pub removal_inside: Mean,
    /// Removal PSNR (dB) outside the removed object's region.
    pub removal_outside: Mean,
    /// Where the objects went (counted by [`Report::add_scene`]; left out of JSON when empty).
    #[serde(skip_serializing_if = "Outcomes::is_empty")]
    pub outcomes: Outcomes,
}

impl Report {
    /// An empty row named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            scenes: 0,
            fg_ari: Mean::default(),
            mbo: Mean::default(),
            miou: Mean::default(),
            fg_miou: Mean::default(),
            psnr: Mean::default(),
            removal_inside: Mean::default(),
            removal_outside: Mean::default(),
            outcomes: Outcomes::default(),
        }
    }

    /// Adds every scene and value of `other` (e.g. one scene's row) to this row.
    pub fn absorb(&mut self, other: &Report) {
        self.scenes += other.scenes;
        for (mine, theirs) in [
            (&mut self.fg_ari, &other.fg_ari),
            (&mut self.mbo, &other.mbo),
            (&mut self.miou, &other.miou),
            (&mut self.fg_miou, &other.fg_miou),
            (&mut self.psnr, &other.psnr),
            (&mut self.removal_inside, &other.removal_inside),
            (&mut self.removal_outside, &other.removal_outside),
        ] {
            mine.absorb(theirs);
        }
        self.outcomes.absorb(&other.outcomes);
    }

    /// Scores one scene's predicted label map [H * W] of slot ids against its ground truth:
    /// the segmentation metrics ([`segmentation_scores`]) and where its objects went
    /// ([`object_outcomes`]).
    pub fn add_scene(&mut self, scene: &Scene, rendered: &Rendered, pred: &[u32]) {
        let scores = segmentation_scores(&rendered.labels, pred);
        self.scenes += 1;
        self.fg_ari.add(Some(scores.fg_ari));
        self.mbo.add(scores.mbo);
        self.miou.add(Some(scores.miou));
        self.fg_miou.add(scores.fg_miou);
        let colours: Vec<[u8; 3]> = scene.objects.iter().map(|o| o.color).collect();
        for outcome in object_outcomes(&rendered.labels, pred, rendered.width, &colours) {
            self.outcomes.add(outcome);
        }
    }

    /// Scores a reconstruction (RGB bytes, any layout shared by both) of `original`.
    pub fn add_reconstruction(&mut self, original: &[u8], reconstruction: &[u8]) -> f64 {
        let value = psnr(original, reconstruction, U8_RANGE);
        self.psnr.add(Some(value));
        value
    }

    /// Scores an edited image against the ground-truth counterfactual, both interleaved
    /// [H, W, 3] bytes, inside and outside `region` [H, W] (the removed object's pixels).
    pub fn add_removal(
        &mut self,
        edited: &[u8],
        truth: &[u8],
        region: &[bool],
    ) -> (Option<f64>, Option<f64>) {
        let outside: Vec<bool> = region.iter().map(|&r| !r).collect();
        let inside = masked_psnr(edited, truth, region, U8_RANGE);
        let outside = masked_psnr(edited, truth, &outside, U8_RANGE);
        self.removal_inside.add(inside);
        self.removal_outside.add(outside);
        (inside, outside)
    }
}

/// The first `count` held-out scenes (seeds of [`Split::Eval`], never used in training).
pub fn held_out_scenes(cfg: &SceneConfig, count: usize) -> Vec<Scene> {
    (0..count as u64).map(|i| Scene::generate(cfg, scene_seed(Split::Eval, i))).collect()
}

/// The rows of the baselines on `scenes` (`rendered`, their renders): k-means on colours, one
/// cluster, and the ground truth on the model's feature `grid` (its ceiling, see
/// [`baselines::grid_oracle_labels`]).
pub fn baseline_reports(
    scenes: &[Scene],
    rendered: &[Rendered],
    kmeans: &KMeansConfig,
    grid: (usize, usize),
) -> candle_core::Result<Vec<Report>> {
    let mut kmeans_row = Report::new(format!("k-means colours (k={})", kmeans.clusters));
    let mut one_row = Report::new("one cluster");
    let mut oracle_row = Report::new(format!("truth on the {}×{} grid", grid.0, grid.1));
    for (scene, r) in scenes.iter().zip(rendered) {
        kmeans_row.add_scene(scene, r, &kmeans_labels(&r.image, kmeans));
        one_row.add_scene(scene, r, &one_cluster_labels(r.labels.len()));
        oracle_row.add_scene(scene, r, &grid_oracle_labels(r, grid)?);
    }
    Ok(vec![kmeans_row, one_row, oracle_row])
}

/// The predicted id whose segment best overlaps (IoU) ground-truth id `id`: the slot to drop
/// to remove that object. `None` if the object is not visible.
pub fn best_slot(gt: &[u32], pred: &[u32], id: u32) -> Option<u32> {
    let region: Vec<u32> = gt.iter().map(|&g| u32::from(g == id)).collect();
    if !region.contains(&1) {
        return None;
    }
    let iou = metrics::iou_matrix(&region, pred, true);
    let best = iou[0].iter().enumerate().fold((0, f64::NEG_INFINITY), |best, (p, &v)| {
        if v > best.1 {
            (p, v)
        } else {
            best
        }
    });
    Some(best.0 as u32)
}

/// The object with the most visible pixels (index into `Scene::objects`), a stable choice of
/// what to remove when one removal per scene is scored.
pub fn largest_visible_object(rendered: &Rendered) -> Option<usize> {
    let mut areas = vec![0usize; rendered.num_masks];
    for &id in &rendered.labels {
        areas[id as usize] += 1;
    }
    (1..areas.len())
        .filter(|&id| areas[id] > 0)
        .max_by_key(|&id| (areas[id], std::cmp::Reverse(id)))
        .map(|id| id - 1)
}

/// Formats a value with `digits` decimals, or "-" when missing.
fn cell(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
}

/// The metrics table, one row per report, as `slotserve eval` prints it.
pub fn format_table(reports: &[Report]) -> String {
    let name_width = reports.iter().map(|r| r.name.len()).max().unwrap_or(0).max(6);
    let mut out = format!(
        "{:<name_width$} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}\n",
        "method", "scenes", "FG-ARI", "mBO", "mIoU", "FG-mIoU", "PSNR", "rm-in", "rm-out"
    );
    for r in reports {
        let _ = writeln!(
            out,
            "{:<name_width$} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
            r.name,
            r.scenes,
            cell(r.fg_ari.value(), 3),
            cell(r.mbo.value(), 3),
            cell(r.miou.value(), 3),
            cell(r.fg_miou.value(), 3),
            cell(r.psnr.value(), 2),
            cell(r.removal_inside.value(), 2),
            cell(r.removal_outside.value(), 2),
        );
    }
    out
}

/// The outcome table: for each report that counted outcomes, the share of its objects (in
/// per cent) that went each way, as `slotserve eval` prints it after the metrics.
pub fn format_outcomes(reports: &[Report]) -> String {
    let counted: Vec<&Report> = reports.iter().filter(|r| !r.outcomes.is_empty()).collect();
    let name_width = counted.iter().map(|r| r.name.len()).max().unwrap_or(0).max(6);
    let mut out = format!("{:<name_width$} {:>7}", "method", "objects");
    for header in Outcomes::HEADERS {
        let _ = write!(out, " {header:>11}");
    }
    for r in counted {
        let total = r.outcomes.total();
        let _ = write!(out, "\n{:<name_width$} {total:>7}", r.name);
        for count in r.outcomes.counts() {
            let _ = write!(out, " {:>11.1}", 100.0 * count as f64 / total as f64);
        }
    }
    out + "\n"
}
