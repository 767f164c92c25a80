//! What `slotserve bench --server` reports: per endpoint and level of concurrent clients,
//! throughput, latency percentiles, errors and the server's batch sizes, as JSON or a table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::batches::BatchSummary;

/// An endpoint the load generator exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    /// `POST /decompose` of images.
    Decompose,
    /// `POST /render` of slot sets.
    Render,
}

impl Endpoint {
    /// The request path.
    pub fn path(self) -> &'static str {
        match self {
            Self::Decompose => "/decompose",
            Self::Render => "/render",
        }
    }

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Decompose => "decompose",
            Self::Render => "render",
        }
    }

    /// The model stage whose batches this endpoint fills (the table shows it).
    pub fn stage(self) -> &'static str {
        match self {
            Self::Decompose => "decompose",
            Self::Render => "denoise",
        }
    }
}

/// A whole load test.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// The server's URL.
    pub server: String,
    /// The served model as `/info` describes it (name, device, dtype, ...).
    pub model: serde_json::Value,
    /// Sampler of the renders.
    pub sampler: String,
    /// Model evaluations per render.
    pub steps: usize,
    /// Requests sent at each level in each round.
    pub requests: usize,
    /// Rounds: every level ran this many times, the levels taking turns.
    pub rounds: usize,
    /// Images (decompose) or slot sets (render) in each request.
    pub per_request: usize,
    /// Load average (1, 5, 15 minutes) of the machine running the load generator, before
    /// and after the test (Linux only): other work on a shared machine skews the figures.
    pub load_average: [Option<[f64; 3]>; 2],
    /// One entry per endpoint and level, in the order they ran.
    pub levels: Vec<LevelReport>,
}

/// One endpoint at one level of concurrent clients.
#[derive(Debug, Clone, Serialize)]
pub struct LevelReport {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// Concurrent clients (1: one request at a time, the sequential baseline).
    pub clients: usize,
    /// Requests answered in full.
    pub ok: usize,
    /// Requests that failed (status, body or transport).
    pub errors: usize,
    /// The first failure, when any.
    pub first_error: Option<String>,
    /// Seconds from the first request sent to the last answer.
    pub wall_s: f64,
    /// Answered requests per second.
    pub requests_per_s: f64,
    /// Images decomposed or rendered per second.
    pub images_per_s: f64,
    /// Median latency of the answered requests, in seconds.
    pub p50_s: Option<f64>,
    /// 99th-percentile latency, in seconds.
    pub p99_s: Option<f64>,
    /// Throughput relative to the same requests sent one at a time (the 1-client level);
    /// absent when none of those was answered.
    pub vs_sequential: Option<f64>,
    /// The server's batches during this level, per model stage.
    pub batches: BTreeMap<String, BatchSummary>,
}

/// The `q`-quantile (0 < q ≤ 1) of `values` by the nearest-rank method; `None` when empty.
pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied()
}

/// Seconds with three decimals, or `-`.
fn seconds(s: Option<f64>) -> String {
    s.map_or_else(|| "-".to_string(), |s| format!("{s:.3}"))
}

impl LoadReport {
    /// The report as a text table with a heading naming what was measured.
    pub fn table(&self) -> String {
        let model = |key: &str| self.model[key].as_str().unwrap_or("?").to_string();
        let renders = match self.levels.iter().any(|l| l.endpoint == Endpoint::Render) {
            true => format!(" · render: {} {} steps", self.sampler, self.steps),
            false => String::new(),
        };
        let mut out = format!(
            "server {} · model {} ({}, {}){renders} · {} requests a level × {} round(s), {} \
             image(s) a request\n",
            self.server,
            model("name"),
            model("device"),
            model("dtype"),
            self.requests,
            self.rounds,
            self.per_request
        );
        let load = |l: &Option<[f64; 3]>| {
            l.map_or_else(|| "?".to_string(), |[a, b, c]| format!("{a:.2} {b:.2} {c:.2}"))
        };
        let [before, after] = &self.load_average;
        let _ = writeln!(
            out,
            "load average (1/5/15 min): {} before, {} after",
            load(before),
            load(after)
        );
        let _ = writeln!(
            out,
            "{:<10} {:>7} {:>9} {:>8} {:>7} {:>7} {:>7} {:>7} {:>6}  batch sizes",
            "endpoint", "clients", "ok/err", "wall s", "req/s", "img/s", "p50 s", "p99 s", "×seq"
        );
        for l in &self.levels {
            let stage = l.endpoint.stage();
            let batches = l.batches.get(stage).map_or_else(String::new, |b| {
                let sizes: Vec<String> =
                    b.histogram.iter().map(|s| format!("{}×{}", s.sizes, s.batches)).collect();
                format!("{stage}: mean {:.2} ({})", b.mean, sizes.join(" "))
            });
            let vs_sequential = l.vs_sequential.map_or_else(|| "-".into(), |x| format!("{x:.2}"));
            let _ = writeln!(
                out,
                "{:<10} {:>7} {:>9} {:>8.2} {:>7.3} {:>7.3} {:>7} {:>7} {vs_sequential:>6}  {batches}",
                l.endpoint.name(),
                l.clients,
                format!("{}/{}", l.ok, l.errors),
                l.wall_s,
                l.requests_per_s,
                l.images_per_s,
                seconds(l.p50_s),
                seconds(l.p99_s),
            );
            if let Some(e) = &l.first_error {
                let _ = writeln!(out, "           first error: {e}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&values, 0.5), Some(50.0));
        assert_eq!(percentile(&values, 0.99), Some(99.0));
        assert_eq!(percentile(&values, 1.0), Some(100.0));
        assert_eq!(percentile(&[3.0], 0.99), Some(3.0));
        assert_eq!(percentile(&[2.0, 1.0], 0.5), Some(1.0));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
