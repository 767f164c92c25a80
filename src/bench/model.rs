//! `slotserve bench` without `--server`: how long the model takes in this process, for the
//! presets at full size with random weights (so no checkpoint is needed), in the same terms as
//! `scripts/time_pytorch.py` times the official code: decompose, one UNet evaluation, and a
//! 20-evaluation render, at the batch sizes and in the dtype asked for.
//!
//! Besides wall time each measurement reports the CPU time the process used, which says how
//! much work it took even when other processes share the cores.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::Serialize;

use crate::config::{ModelConfig, Preset};
use crate::cpu_runtime::on_compute_pool;
use crate::device::{device_name, DTypeChoice, DeviceChoice};
use crate::model::pipeline::SlotDiffusion;
use crate::model::sampler::SamplerKind;

/// The timestep of the timed UNet evaluations (mid-schedule, as the official timing script).
const UNET_TIMESTEP: f32 = 500.0;

/// What to measure in this process (not with `--server`).
#[derive(Debug, Clone, clap::Args)]
pub struct ModelBenchArgs {
    /// Presets to measure (full sizes, random weights; `shapes` is the embedded default model).
    #[arg(long, value_enum, value_delimiter = ',', conflicts_with = "server",
        default_values_t = [Preset::Clevrtex, Preset::Voc])]
    pub presets: Vec<Preset>,
    /// Batch sizes for decompose (none: skip decompose).
    #[arg(long, value_delimiter = ',', num_args = 0.., conflicts_with = "server",
        default_values_t = [1, 8])]
    pub decompose_batches: Vec<usize>,
    /// Batch sizes for one UNet evaluation (none: skip the UNet).
    #[arg(long, value_delimiter = ',', num_args = 0.., conflicts_with = "server",
        default_values_t = [1, 4])]
    pub unet_batches: Vec<usize>,
    /// Batch sizes for a full render, 20 DPM-Solver++ evaluations and the VQ-VAE decode (none:
    /// skip renders).
    #[arg(long, value_delimiter = ',', num_args = 0.., conflicts_with = "server",
        default_values_t = [1])]
    pub render_batches: Vec<usize>,
    /// Timed repetitions of each decompose and UNet measurement (the median is reported).
    #[arg(long, conflicts_with = "server", default_value_t = 3)]
    pub repeats: usize,
    /// Weight and activation dtype (bf16 and f16 need a GPU).
    #[arg(long, env = "SLOTSERVE_DTYPE", value_enum, default_value_t)]
    pub dtype: DTypeChoice,
    /// Compute device: `auto`, `cpu`, `cuda` (GPU 0), `cuda:N`, `metal` or `metal:N`.
    #[arg(long, env = "SLOTSERVE_DEVICE", default_value_t)]
    pub device: DeviceChoice,
}

/// The median of timed runs of one measurement.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timing {
    /// Images (or latents) per call.
    pub batch: usize,
    /// Wall-clock seconds per call.
    pub wall_s: f64,
    /// CPU seconds per call, all threads of the process together (user + system).
    pub cpu_s: f64,
}

/// One preset's timings (medians).
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// The preset.
    pub preset: Preset,
    /// Input side in pixels.
    pub resolution: usize,
    /// Where it ran: `cpu`, `cuda:N` or `metal:N`.
    pub device: String,
    /// The weights' and activations' dtype.
    pub dtype: DTypeChoice,
    /// Threads of the compute pool.
    pub threads: usize,
    /// Whether the fast CPU kernels of `ops` ran.
    pub fast_kernels: bool,
    /// One decompose call per batch size.
    pub decompose: Vec<Timing>,
    /// One batched UNet evaluation (one denoising step) per batch size.
    pub unet_step: Vec<Timing>,
    /// One full render per batch size (one run each, after the warm-up of the others).
    pub render: Vec<Timing>,
    /// Peak resident memory of the process so far, in MiB (Linux only).
    pub peak_rss_mib: Option<f64>,
}

/// CPU seconds this process has used so far (user + system, all threads), from
/// `/proc/self/stat`; 0 where that file does not exist.
fn cpu_seconds() -> f64 {
    /// Kernel clock ticks per second of `/proc` times (`USER_HZ`, 100 on Linux).
    const TICKS_PER_SECOND: f64 = 100.0;
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let fields = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: f64 =
        fields.split_whitespace().skip(11).take(2).filter_map(|f| f.parse::<f64>().ok()).sum();
    ticks / TICKS_PER_SECOND
}

/// Wall and CPU seconds of one run of `f`, until `device` has finished the work it queued
/// (GPU kernels run asynchronously).
fn run_timed(
    device: &Device,
    f: &mut impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(f64, f64)> {
    let (t0, c0) = (Instant::now(), cpu_seconds());
    f()?;
    device.synchronize()?;
    Ok((t0.elapsed().as_secs_f64(), cpu_seconds() - c0))
}

/// One untimed warm-up run, then the median of `repeats` timed runs of `f` (wall and CPU time
/// medians taken separately).
fn time(
    device: &Device,
    batch: usize,
    repeats: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Timing> {
    run_timed(device, &mut f)?;
    let runs = (0..repeats.max(1))
        .map(|_| run_timed(device, &mut f))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let median = |mut xs: Vec<f64>| {
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    Ok(Timing {
        batch,
        wall_s: median(runs.iter().map(|r| r.0).collect()),
        cpu_s: median(runs.iter().map(|r| r.1).collect()),
    })
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
    let model = SlotDiffusion::random_in(&config, 0, &VarMap::new(), device, args.dtype.dtype())?;
    let res = config.resolution;
    let images = |b: usize| Tensor::rand(-1f32, 1f32, (b, 3, res, res), device);
    let decompose = args
        .decompose_batches
        .iter()
        .map(|&b| {
            let images = images(b)?;
            time(device, b, args.repeats, || Ok(model.decompose(&images).map(|_| ())?))
        })
        .collect::<anyhow::Result<_>>()?;
    let unet_step = args
        .unet_batches
        .iter()
        .map(|&b| {
            let slots = model.decompose(&images(b)?)?.slots;
            let [c, h, w] = model.latent_dims();
            let latents = Tensor::randn(0f32, 1f32, (b, c, h, w), device)?;
            let t = Tensor::full(UNET_TIMESTEP, b, device)?;
            let unet = model.unet();
            // on the compute pool, as the model's own entry points run it
            time(device, b, args.repeats, || {
                Ok(on_compute_pool(|| unet.forward(&latents, &t, &slots)).map(|_| ())?)
            })
        })
        .collect::<anyhow::Result<_>>()?;
    // One render per batch size, not repeated (20 UNet evaluations, warm after the above).
    let render = args
        .render_batches
        .iter()
        .map(|&b| {
            let slots = model.decompose(&images(b)?)?.slots;
            let sets = (0..b).map(|i| slots.get(i)).collect::<candle_core::Result<Vec<_>>>()?;
            let seeds: Vec<u64> = (0..b as u64).collect();
            let (wall_s, cpu_s) = run_timed(device, &mut || {
                model.render(&sets, &seeds, SamplerKind::DpmSolverPP, 20)?;
                Ok(())
            })?;
            Ok(Timing { batch: b, wall_s, cpu_s })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(BenchReport {
        preset,
        resolution: res,
        device: device_name(device),
        dtype: args.dtype,
        threads: rayon::current_num_threads(),
        fast_kernels: crate::ops::kernels_enabled()
            && device.is_cpu()
            && model.dtype() == DType::F32,
        decompose,
        unet_step,
        render,
        peak_rss_mib: peak_rss_mib(),
    })
}
