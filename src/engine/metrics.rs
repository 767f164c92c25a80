//! Prometheus metrics of one server: requests and latency per endpoint and status, queue
//! depth, batch sizes, denoising throughput, images made and jobs cancelled.
//!
//! Each server owns its recorder (no process-wide global), so several servers in one
//! process (tests) keep separate counts.

use std::sync::Arc;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// Latency buckets in seconds: a decompose takes tens of milliseconds, a CPU render minutes.
const LATENCY_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
/// Batch-size buckets.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0];

/// The metrics recorder of one server, cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh recorder with histogram buckets for latencies and batch sizes.
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Suffix("_batch_size".into()), BATCH_BUCKETS)
            })
            .expect("bucket lists are not empty")
            .build_recorder();
        let handle = recorder.handle();
        Self { recorder: Arc::new(recorder), handle }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Drains histogram samples into their buckets (call now and then).
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(self.recorder.as_ref(), f)
    }

    /// One HTTP request answered.
    pub fn request(&self, endpoint: &str, status: u16, seconds: f64) {
        let (endpoint, status) = (endpoint.to_string(), status.to_string());
        self.with(|| {
            counter!("slotserve_requests_total", "endpoint" => endpoint.clone(), "status" => status.clone())
                .increment(1);
            histogram!("slotserve_request_duration_seconds", "endpoint" => endpoint, "status" => status)
                .record(seconds);
        });
    }

    /// Requests waiting in the queue.
    pub fn queue_depth(&self, waiting: usize) {
        self.with(|| gauge!("slotserve_queue_depth").set(waiting as f64));
    }

    /// How long a request waited in the queue.
    pub fn queue_wait(&self, seconds: f64) {
        self.with(|| histogram!("slotserve_queue_wait_seconds").record(seconds));
    }

    /// Render jobs being denoised.
    pub fn active_renders(&self, jobs: usize) {
        self.with(|| gauge!("slotserve_active_render_jobs").set(jobs as f64));
    }

    /// One batch run by the model: `stage` is `decompose`, `denoise` or `decode`.
    pub fn batch(&self, stage: &'static str, size: usize) {
        self.with(|| histogram!("slotserve_batch_size", "stage" => stage).record(size as f64));
    }

    /// One denoising iteration that advanced `jobs` jobs in `seconds`.
    pub fn denoise_iteration(&self, jobs: usize, seconds: f64) {
        self.with(|| {
            counter!("slotserve_denoise_steps_total").increment(jobs as u64);
            gauge!("slotserve_denoise_steps_per_second").set(jobs as f64 / seconds.max(1e-9));
        });
    }

    /// Images decomposed.
    pub fn images_decomposed(&self, n: usize) {
        self.with(|| counter!("slotserve_images_decomposed_total").increment(n as u64));
    }

    /// Images rendered and delivered to the model thread's callers.
    pub fn images_rendered(&self, n: usize) {
        self.with(|| counter!("slotserve_images_rendered_total").increment(n as u64));
    }

    /// Jobs dropped because their client went away.
    pub fn jobs_cancelled(&self, n: usize) {
        if n > 0 {
            self.with(|| counter!("slotserve_jobs_cancelled_total").increment(n as u64));
        }
    }

    /// A model call that failed (an internal error).
    pub fn model_error(&self, stage: &'static str) {
        self.with(|| counter!("slotserve_model_errors_total", "stage" => stage).increment(1));
    }
}
