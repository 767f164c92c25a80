//! Process-wide logs: plain text for people or JSON lines for log collectors, written to
//! stderr so that what commands print on stdout (reports, JSON) stays clean.

use tracing_subscriber::EnvFilter;

/// How log lines are written (`--log-format`, `SLOTSERVE_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object a line: `timestamp`, `level`, `target`, `message` and the event's
    /// fields at the top level (a request line has `method`, `path`, `status`, `latency_ms`).
    Json,
}

/// Installs the global logger; the level comes from `RUST_LOG` (default `info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logger = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => logger.init(),
        LogFormat::Json => logger.json().flatten_event(true).with_span_list(false).init(),
    }
}
