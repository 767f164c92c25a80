//! `slotserve bench`: how fast slotserve is. Without `--server` it times the model in this
//! process at the official presets' sizes ([`bench_preset`]); with `--server URL` it
//! load-tests a running server at several levels of concurrency ([`load_test`]).

mod batches;
mod model;
mod report;
mod server;

pub use batches::{BatchSummary, SizeCount};
pub use model::{bench_preset, peak_rss_mib, BenchReport, ModelBenchArgs};
pub use report::{Endpoint, LevelReport, LoadReport};
pub use server::{load_test, LoadArgs};

/// `slotserve bench`: the in-process timings, or with `--server` the load generator.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Load-test the slotserve server at this URL (e.g. `http://127.0.0.1:3000`) instead of
    /// timing the model in this process.
    #[arg(long)]
    pub server: Option<String>,
    /// In-process timings.
    #[command(flatten)]
    pub model: ModelBenchArgs,
    /// Load generator.
    #[command(flatten)]
    pub load: LoadArgs,
}

/// Runs the benchmark `args` asks for and prints its report on stdout: JSON lines (one per
/// preset) in process, a table or one JSON object (`--json`) against a server.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    match &args.server {
        Some(url) => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let report = runtime.block_on(load_test(url, &args.load))?;
            match args.load.json {
                true => println!("{}", serde_json::to_string(&report)?),
                false => print!("{}", report.table()),
            }
        }
        None => {
            let device = args.model.device.open()?;
            for &preset in &args.model.presets {
                let report = bench_preset(preset, &args.model, &device)?;
                println!("{}", serde_json::to_string(&report)?);
            }
        }
    }
    Ok(())
}
