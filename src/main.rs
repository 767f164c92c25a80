//! The `slotserve` command line: serve the model, run it from the shell, convert official
//! checkpoints, train and evaluate the default model, and benchmark.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use slotserve::data::{self, SceneConfig};

/// Object-centric image editing with SlotDiffusion models.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Scene { seed, out, masks } => {
            for path in data::write_scene(&SceneConfig::default(), seed, &out, masks)? {
                println!("{}", path.display());
            }
        }
    }
    Ok(())
}
