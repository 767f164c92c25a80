//! `slotserve bench` without `--server`: how long the model takes in this process, for the
//! official presets at full size with random weights (so no checkpoint is needed), in the same
//! terms as the official code's timing script (decompose, one UNet evaluation, a
//! 20-evaluation render).

use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::Serialize;

use crate::config::{ModelConfig, Preset};
use crate::device::DeviceChoice;
use crate::model::pipeline::SlotDiffusion;
use crate::model::sampler::SamplerKind;

/// What to measure in this process (not with `--server`).
#[derive(Debug, Clone, clap::Args)]
pub struct ModelBenchArgs {
    /// Presets to measure (full official sizes, random weights).
    #[arg(long, value_enum, value_delimiter = ',', conflicts_with = "server",
        default_values_t = [Preset::Clevrtex, Preset::Voc])]
    pub presets: Vec<Preset>,
    /// Batch sizes for decompose and the UNet evaluation.
    #[arg(long, value_delimiter = ',', conflicts_with = "server", default_values_t = [1, 4])]
    pub batches: Vec<usize>,
    /// Timed repetitions of each measurement (the median is reported).
    #[arg(long, conflicts_with = "server", default_value_t = 3)]
    pub repeats: usize,
    /// Also time a full render (20 DPM-Solver++ evaluations + VQ decode) at batch 1.
    #[arg(long, conflicts_with = "server", default_value_t = true, action = clap::ArgAction::Set)]
    pub render: bool,
    /// Compute device: `auto`, `cpu`, `cuda` (GPU 0), `cuda:N`, `metal` or `metal:N`.
    #[arg(long, env = "SLOTSERVE_DEVICE", default_value_t)]
    pub device: DeviceChoice,
}

/// One preset's timings, in seconds (medians).
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// The preset.
    pub preset: Preset,
    /// Input side in pixels.
    pub resolution: usize,
    /// (batch, seconds) of one decompose call.
    pub decompose_s: Vec<(usize, f64)>,
    /// (batch, seconds) of one batched UNet evaluation (one denoising step).
    pub unet_step_s: Vec<(usize, f64)>,
    /// Seconds of one full render at batch 1, when asked for.
    pub render_b1_s: Option<f64>,
    /// Peak resident memory of the process so far, in MiB (Linux only).
    pub peak_rss_mib: Option<f64>,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Warm-up run, then the median of `repeats` timed runs of `f`.
fn time(repeats: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    let runs = (0..repeats.max(1))
        .map(|_| {
            let t0 = Instant::now();
            f()?;
            Ok(t0.elapsed().as_secs_f64())
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(median(runs))
}

/// Peak resident set size of this process in MiB, from `/proc/self/status`.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Measures one preset.
pub fn bench_preset(
    preset: Preset,
    args: &ModelBenchArgs,
    device: &Device,
) -> anyhow::Result<BenchReport> {
    let config = ModelConfig::preset(preset);
    let model = SlotDiffusion::random(&config, 0, &VarMap::new(), device)?;
    let res = config.resolution;
    let mut decompose_s = Vec::new();
    let mut unet_step_s = Vec::new();
    for &b in &args.batches {
        let images = Tensor::rand(-1f32, 1f32, (b, 3, res, res), device)?;
        decompose_s.push((b, time(args.repeats, || Ok(model.decompose(&images).map(|_| ())?))?));
        let slots = model.decompose(&images)?.slots;
        let slot_sets: Vec<Tensor> =
            (0..b).map(|i| slots.get(i)).collect::<candle_core::Result<_>>()?;
        unet_step_s.push((
            b,
            time(args.repeats, || {
                let mut jobs = slot_sets
                    .iter()
                    .map(|s| model.start_render(s, 0, SamplerKind::DpmSolverPP, 20))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                model.denoise_step(&mut jobs.iter_mut().collect::<Vec<_>>())?;
                Ok(())
            })?,
        ));
    }
    let render_b1_s = if args.render {
        let slots =
            model.decompose(&Tensor::rand(-1f32, 1f32, (1, 3, res, res), device)?)?.slots.get(0)?;
        let t0 = Instant::now();
        model.render(&[slots], &[0], SamplerKind::DpmSolverPP, 20)?;
        Some(t0.elapsed().as_secs_f64())
    } else {
        None
    };
    Ok(BenchReport {
        preset,
        resolution: res,
        decompose_s,
        unet_step_s,
        render_b1_s,
        peak_rss_mib: peak_rss_mib(),
    })
}
