//! `slotserve bench`: how long the model takes on this machine, for the official presets at
//! full size with random weights (so no checkpoint is needed), in the same terms as the
//! official code's timing script (decompose, one UNet evaluation, a 20-evaluation render),
//! at each batch size asked for and in the dtype asked for.

use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::Serialize;

use crate::config::{ModelConfig, Preset};
use crate::device::{device_name, DTypeChoice};
use crate::model::pipeline::SlotDiffusion;
use crate::model::sampler::SamplerKind;

/// What to measure.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Presets to measure (full official sizes, random weights).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Preset::Clevrtex, Preset::Voc])]
    pub presets: Vec<Preset>,
    /// Batch sizes for decompose and the UNet evaluation.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 4])]
    pub batches: Vec<usize>,
    /// Timed repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Also time a full render (20 DPM-Solver++ evaluations + VQ decode) at each batch size.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub render: bool,
    /// Weight and activation dtype (bf16 needs a GPU).
    #[arg(long, env = "SLOTSERVE_DTYPE", value_enum, default_value_t)]
    pub dtype: DTypeChoice,
}

/// One preset's timings, in seconds (medians).
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// The preset.
    pub preset: Preset,
    /// Input side in pixels.
    pub resolution: usize,
    /// Where it ran: `cpu`, `cuda` or `metal`.
    pub device: &'static str,
    /// The weights' and activations' dtype.
    pub dtype: DTypeChoice,
    /// (batch, seconds) of one decompose call.
    pub decompose_s: Vec<(usize, f64)>,
    /// (batch, seconds) of one batched UNet evaluation (one denoising step).
    pub unet_step_s: Vec<(usize, f64)>,
    /// (batch, seconds) of one full render of a batch (20 evaluations + decode), when asked
    /// for; one run after the warm-up of the other measurements.
    pub render_s: Vec<(usize, f64)>,
    /// Peak resident memory of the process so far, in MiB (Linux only).
    pub peak_rss_mib: Option<f64>,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Seconds of one run of `f`, until the device has finished the work it queued (GPU kernels
/// run asynchronously).
fn once(device: &Device, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    f()?;
    device.synchronize()?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Warm-up run, then the median of `repeats` timed runs of `f`.
fn time(
    device: &Device,
    repeats: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    once(device, &mut f)?;
    let runs = (0..repeats.max(1)).map(|_| once(device, &mut f)).collect::<anyhow::Result<_>>()?;
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
    args: &BenchArgs,
    device: &Device,
) -> anyhow::Result<BenchReport> {
    let config = ModelConfig::preset(preset);
    let model = SlotDiffusion::random_in(&config, 0, &VarMap::new(), device, args.dtype.dtype())?;
    let res = config.resolution;
    let mut decompose_s = Vec::new();
    let mut unet_step_s = Vec::new();
    let mut render_s = Vec::new();
    for &b in &args.batches {
        let images = Tensor::rand(-1f32, 1f32, (b, 3, res, res), device)?;
        decompose_s
            .push((b, time(device, args.repeats, || Ok(model.decompose(&images).map(|_| ())?))?));
        let slots = model.decompose(&images)?.slots;
        let slot_sets: Vec<Tensor> =
            (0..b).map(|i| slots.get(i)).collect::<candle_core::Result<_>>()?;
        unet_step_s.push((
            b,
            time(device, args.repeats, || {
                let mut jobs = slot_sets
                    .iter()
                    .map(|s| model.start_render(s, 0, SamplerKind::DpmSolverPP, 20))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                model.denoise_step(&mut jobs.iter_mut().collect::<Vec<_>>())?;
                Ok(())
            })?,
        ));
        if args.render {
            let seeds: Vec<u64> = (0..b as u64).collect();
            let render = || {
                Ok(model.render(&slot_sets, &seeds, SamplerKind::DpmSolverPP, 20).map(|_| ())?)
            };
            render_s.push((b, once(device, render)?));
        }
    }
    Ok(BenchReport {
        preset,
        resolution: res,
        device: device_name(device),
        dtype: args.dtype,
        decompose_s,
        unet_step_s,
        render_s,
        peak_rss_mib: peak_rss_mib(),
    })
}
