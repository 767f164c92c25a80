//! The model side of `slotserve eval`: decompose held-out scenes, reconstruct them from their
//! own slots, remove the slot of the largest object, and score all of it beside the baselines.

use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};

use crate::cpu_runtime::on_compute_pool;
use crate::data::{Rendered, Scene, SceneConfig};
use crate::eval::baselines::KMeansConfig;
use crate::eval::{self, baseline_reports, format_outcomes, format_table, held_out_scenes, Report};
use crate::imageio::tensor_to_images;
use crate::model::pipeline::SlotDiffusion;

/// `slotserve eval`: the paper's metrics on held-out procedural scenes.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// The model directory (config.json + model.safetensors).
    #[arg(long, default_value = "weights")]
    pub model: PathBuf,
    /// Held-out scenes of the training distribution.
    #[arg(long, default_value_t = 500)]
    pub scenes: usize,
    /// Held-out crowded scenes (more objects than training used); 0 skips them.
    #[arg(long, default_value_t = 100)]
    pub crowded: usize,
    /// Scenes per batch.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Base seed of the renders' initial noise (scene i uses seed + i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the reports as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Score the segmentation only (FG-ARI, mBO, mIoU), without the renders behind PSNR and
    /// edit fidelity: seconds instead of minutes, for checking a run in progress.
    #[arg(long)]
    pub segmentation_only: bool,
}

/// `slotserve eval`: prints the metric table for the training distribution and, with
/// `--crowded`, for crowded scenes (the model's row first, then the baselines), each followed by
/// where each method's objects went.
pub fn eval(args: &EvalArgs) -> anyhow::Result<()> {
    let model = SlotDiffusion::load(&args.model, None, &Device::Cpu, DType::F32)?;
    let mut all = Vec::new();
    let sets = [
        ("scenes", SceneConfig::default(), args.scenes),
        ("crowded", SceneConfig::crowded(), args.crowded),
    ];
    for (label, cfg, count) in sets {
        if count == 0 {
            continue;
        }
        let scenes = held_out_scenes(&cfg, count);
        let renders = (!args.segmentation_only).then_some(args.seed);
        let reports = evaluate_scenes(&model, &scenes, args.batch, renders)?;
        println!("{label} ({count} held-out, {}-{} objects):", cfg.min_objects, cfg.max_objects);
        println!("{}", format_table(&reports));
        println!("where the objects went (per cent of the visible objects):");
        println!("{}", format_outcomes(&reports));
        all.push((label, reports));
    }
    if let Some(path) = &args.json {
        let json: serde_json::Map<String, serde_json::Value> = all
            .into_iter()
            .map(|(label, r)| Ok((label.to_string(), serde_json::to_value(r)?)))
            .collect::<anyhow::Result<_>>()?;
        std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")?;
    }
    Ok(())
}

/// The model's report on `scenes` (batches of `batch`), then the model's on the scenes whose
/// objects all differ in colour and on those where two share one ([`Scene::shares_a_colour`]),
/// followed by the k-means (k = the model's slot count), one-cluster and
/// ground-truth-on-the-feature-grid baselines. With `renders` (the base seed of the renders'
/// noise) it also scores reconstruction and removal, and ends with the VQ-VAE's own
/// reconstruction (the renders' ceiling); without, segmentation only.
pub fn evaluate_scenes(
    model: &SlotDiffusion,
    scenes: &[Scene],
    batch: usize,
    renders: Option<u64>,
) -> anyhow::Result<Vec<Report>> {
    let name = format!("SlotDiffusion ({})", model.config().name);
    let mut report = Report::new(&name);
    let mut by_colour = [
        Report::new(format!("{name} · colours distinct")),
        Report::new(format!("{name} · a colour shared")),
    ];
    let mut autoencoder = renders.map(|_| Report::new("VQ-VAE alone (render ceiling)"));
    let rendered: Vec<Rendered> = scenes.iter().map(Scene::render).collect();
    for (chunk, (scene_chunk, rendered_chunk)) in
        scenes.chunks(batch.max(1)).zip(rendered.chunks(batch.max(1))).enumerate()
    {
        let images = image_batch(rendered_chunk, model.device())?;
        let base = renders.map(|seed| seed + (chunk * batch.max(1)) as u64);
        let rows = score_batch(model, scene_chunk, rendered_chunk, &images, base)?;
        for (scene, row) in scene_chunk.iter().zip(&rows) {
            report.absorb(row);
            by_colour[usize::from(scene.shares_a_colour())].absorb(row);
        }
        if let Some(autoencoder) = &mut autoencoder {
            score_autoencoder(model, rendered_chunk, &images, autoencoder)?;
        }
    }
    let kmeans = KMeansConfig { clusters: model.config().num_slots(), ..Default::default() };
    let mut reports = vec![report];
    reports.extend(by_colour);
    let grid = match rendered.first() {
        Some(r) => model.encoder().grid(r.height, r.width),
        None => (1, 1),
    };
    reports.extend(baseline_reports(scenes, &rendered, &kmeans, grid)?);
    reports.extend(autoencoder);
    Ok(reports)
}

/// The images of rendered scenes as one batch [B, 3, H, W] in [-1, 1].
fn image_batch(rendered: &[Rendered], device: &Device) -> candle_core::Result<Tensor> {
    let images = rendered
        .iter()
        .map(|r| {
            let (h, w) = (r.height, r.width);
            Tensor::from_vec(r.image_chw(), (3, h, w), device)?.affine(2.0, -1.0)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::stack(&images, 0)
}

/// Scores the VQ-VAE's own reconstruction (encode, quantize, decode) of each scene (`images`,
/// their [`image_batch`]): the most any render can reach, since renders are decoded by it; the
/// gap to the model's PSNR is the UNet's.
fn score_autoencoder(
    model: &SlotDiffusion,
    rendered: &[Rendered],
    images: &Tensor,
    report: &mut Report,
) -> anyhow::Result<()> {
    let latents = on_compute_pool(|| model.vqvae().encode(images))?;
    let out = tensor_to_images(&model.decode_latents(&latents)?)?;
    for (r, recon) in rendered.iter().zip(&out) {
        report.scenes += 1;
        report.add_reconstruction(&r.image, recon.as_raw());
    }
    Ok(())
}

/// Scores one batch (`images`, the [`image_batch`] of `rendered`), one row per scene:
/// segmentation and, given the renders' base seed, reconstruction from all slots and removal
/// of the slot that best covers the largest visible object.
fn score_batch(
    model: &SlotDiffusion,
    scenes: &[Scene],
    rendered: &[Rendered],
    images: &Tensor,
    seed: Option<u64>,
) -> anyhow::Result<Vec<Report>> {
    let device = model.device();
    let parts = model.decompose(images)?;
    let mut rows = vec![Report::new(""); rendered.len()];
    let mut slot_sets = Vec::new();
    let mut removals = Vec::new();
    for (i, r) in rendered.iter().enumerate() {
        let pred = parts.segmentation.i(i)?.flatten_all()?.to_vec1::<u32>()?;
        rows[i].add_scene(&scenes[i], r, &pred);
        if seed.is_none() {
            continue;
        }
        let slots = parts.slots.i(i)?;
        slot_sets.push(slots.clone());
        let Some(object) = eval::largest_visible_object(r) else { continue };
        let Some(drop) = eval::best_slot(&r.labels, &pred, object as u32 + 1) else { continue };
        let keep: Vec<u32> = (0..slots.dim(0)? as u32).filter(|&k| k != drop).collect();
        if keep.is_empty() {
            continue;
        }
        let keep = Tensor::from_vec(keep.clone(), keep.len(), device)?;
        removals.push((i, object, slots.index_select(&keep, 0)?));
    }
    let Some(seed) = seed else { return Ok(rows) };
    let n = slot_sets.len();
    slot_sets.extend(removals.iter().map(|(_, _, s)| s.clone()));
    let seeds: Vec<u64> = (0..slot_sets.len()).map(|j| seed + (j % n.max(1)) as u64).collect();
    let sampler = model.config().sampler;
    let out = tensor_to_images(&model.render(&slot_sets, &seeds, sampler.kind, sampler.steps)?)?;
    for ((row, r), recon) in rows.iter_mut().zip(rendered).zip(&out) {
        row.add_reconstruction(&r.image, recon.as_raw());
    }
    for ((i, object, _), edited) in removals.iter().zip(&out[n..]) {
        let truth = scenes[*i].without(*object).render();
        let region = rendered[*i].region(*object as u32 + 1);
        rows[*i].add_removal(edited.as_raw(), &truth.image, &region);
    }
    Ok(rows)
}
