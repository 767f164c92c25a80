//! The `slotserve` command line: serve the model, run it from the shell, convert official
//! checkpoints, make random-weight models, and write procedural scenes.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use slotserve::api::{self, ServeArgs};
use slotserve::bench::{self, BenchArgs};
use slotserve::commands::{self, RenderSpec, RenderStart, SlotSelection};
use slotserve::config::{ModelConfig, Preset};
use slotserve::cpu_runtime::Workload;
use slotserve::data::{self, SceneConfig};
use slotserve::device::{DTypeChoice, DeviceChoice};
use slotserve::logging::{self, LogFormat};
use slotserve::model::pipeline::SlotDiffusion;
use slotserve::model::sampler::SamplerKind;
use slotserve::train::{self, EvalArgs, TrainArgs};

/// mimalloc, kept from returning freed memory to the system by `cpu_runtime::configure`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Object-centric image editing with SlotDiffusion models.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log lines as plain text or as JSON objects (on stderr).
    #[arg(long, global = true, env = "SLOTSERVE_LOG_FORMAT", value_enum, default_value_t)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// Which model to run, and where.
#[derive(Args)]
struct ModelArgs {
    /// A model directory (config.json + model.safetensors) or an official .pth (with --preset).
    #[arg(long, env = "SLOTSERVE_MODEL", default_value = "weights")]
    model: PathBuf,
    /// The preset of a bare checkpoint (sizes are read from its shapes, the rest from here).
    #[arg(long, env = "SLOTSERVE_PRESET")]
    preset: Option<Preset>,
    /// Compute device: `auto`, `cpu`, `cuda` (GPU 0), `cuda:N`, `metal` or `metal:N`.
    #[arg(long, env = "SLOTSERVE_DEVICE", default_value_t)]
    device: DeviceChoice,
    /// Weight and activation dtype.
    #[arg(long, env = "SLOTSERVE_DTYPE", value_enum, default_value_t)]
    dtype: DTypeChoice,
}

impl ModelArgs {
    fn load(&self) -> anyhow::Result<SlotDiffusion> {
        SlotDiffusion::load(&self.model, self.preset, &self.device.open()?, self.dtype.dtype())
    }
}

/// Comma-separated slot indices, e.g. `0,2,3`.
#[derive(Clone)]
struct Indices(Vec<usize>);

impl std::str::FromStr for Indices {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        s.split(',')
            .map(|p| p.trim().parse::<usize>().map_err(|_| format!("`{p}` is not a slot index")))
            .collect::<Result<_, _>>()
            .map(Indices)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Time the model at the official presets' sizes, or load-test a server (`--server URL`).
    Bench(BenchArgs),
    /// Train the default model on procedural scenes (resumable; see weights/README.md).
    Train(TrainArgs),
    /// Evaluate a model on held-out procedural scenes with the paper's metrics.
    Eval(EvalArgs),
    /// Serve the model over HTTP (the embedded default model unless --model names another).
    Serve(ServeArgs),
    /// Convert an official checkpoint (.pth) into config.json + model.safetensors.
    Convert {
        /// The official preset the checkpoint follows.
        #[arg(long)]
        preset: Preset,
        /// The official checkpoint file.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// dtype of the written weights.
        #[arg(long, value_enum, default_value_t)]
        dtype: DTypeChoice,
    },
    /// Write a model with reproducible random weights at a preset's full size.
    Init {
        /// The preset whose sizes to use.
        #[arg(long)]
        preset: Preset,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Weight seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Split images into slots: slots.safetensors, mask PNGs, segmentations, summary.json.
    Decompose {
        #[command(flatten)]
        model: ModelArgs,
        /// Input images (PNG or JPEG), decomposed as one batch.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// Output directory.
        #[arg(long, default_value = "slots")]
        out: PathBuf,
    },
    /// Render an image from slots.
    Render {
        #[command(flatten)]
        model: ModelArgs,
        /// A slots file from `decompose` (tensor `slots`, [K, D] or [B, K, D]).
        #[arg(long)]
        slots: PathBuf,
        /// Which image's slot set of a batched slots file.
        #[arg(long, default_value_t = 0)]
        index: usize,
        /// Render only these slots (comma-separated indices).
        #[arg(long, conflicts_with = "drop")]
        keep: Option<Indices>,
        /// Render without these slots (comma-separated indices).
        #[arg(long)]
        drop: Option<Indices>,
        /// Seed of the initial noise.
        #[arg(long, default_value_t = 0, conflicts_with = "noise")]
        seed: u64,
        /// Initial latent instead of a seed: safetensors with a tensor `noise`.
        #[arg(long)]
        noise: Option<PathBuf>,
        /// Sampler: dpm-solver++, ddim or ddpm.
        #[arg(long, default_value = "dpm-solver++")]
        sampler: SamplerKind,
        /// Model evaluations (DDPM always runs all T).
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// Output PNG.
        #[arg(long, default_value = "render.png")]
        out: PathBuf,
    },
    /// Write one procedural multi-object scene (the default model's training data) as PNG.
    Scene {
        /// Scene seed; the same seed always gives the same scene.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output PNG path.
        #[arg(long, default_value = "scene.png")]
        out: PathBuf,
        /// Also write the ground-truth instance masks as `<stem>_masks.png`.
        #[arg(long)]
        masks: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let workload = match cli.command {
        Command::Train(_) => Workload::Training,
        _ => Workload::Inference,
    };
    slotserve::cpu_runtime::configure(workload);
    logging::init(cli.log_format);
    match cli.command {
        Command::Bench(args) => bench::run(&args)?,
        Command::Train(args) => train::train(&args)?,
        Command::Eval(args) => train::eval(&args)?,
        Command::Serve(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(api::serve(args))?;
        }
        Command::Convert { preset, checkpoint, out, dtype } => {
            let config = commands::convert(&checkpoint, preset, &out, dtype.dtype())?;
            println!("{}: {} → {}", config.name, checkpoint.display(), out.display());
        }
        Command::Init { preset, out, seed } => {
            commands::init(&ModelConfig::preset(preset), seed, &out)?;
            println!("{}", out.display());
        }
        Command::Decompose { model, images, out } => {
            let summary = commands::decompose(&model.load()?, &images, &out)?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
        }
        Command::Render { model, slots, index, keep, drop, seed, noise, sampler, steps, out } => {
            let selection = match (keep, drop) {
                (Some(k), _) => SlotSelection::Keep(k.0),
                (None, Some(d)) => SlotSelection::Drop(d.0),
                (None, None) => SlotSelection::All,
            };
            let start = noise.map_or(RenderStart::Seed(seed), RenderStart::Noise);
            let spec = RenderSpec { slots_file: slots, index, selection, start, sampler, steps };
            commands::render(&model.load()?, &spec, &out)?;
            println!("{}", out.display());
        }
        Command::Scene { seed, out, masks } => {
            for path in data::write_scene(&SceneConfig::default(), seed, &out, masks)? {
                println!("{}", path.display());
            }
        }
    }
    Ok(())
}
