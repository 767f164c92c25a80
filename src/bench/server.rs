//! `slotserve bench --server URL`: a load generator for a running server. For each endpoint
//! and each level of concurrent clients it sends the same requests and measures throughput
//! and latency; the one-client level (always run, first) is that work done one request at a
//! time, the baseline each level is compared with. `/metrics` is read before and after each
//! level, so the report shows how the server batched the load.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{json, Value};

use super::batches::{self, Stages};
use super::report::{percentile, Endpoint, LevelReport, LoadReport};
use crate::data::{scene_seed, Scene, SceneConfig, Split};
use crate::imageio;

/// How to load the server.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Levels of concurrent clients; 1 (one request at a time) is always measured as the
    /// baseline.
    #[arg(long, value_delimiter = ',', requires = "server", default_values_t = [1, 4, 16])]
    pub clients: Vec<usize>,
    /// Requests sent at each level (in each round).
    #[arg(long, requires = "server", default_value_t = 32)]
    pub requests: usize,
    /// Times every level runs, the levels taking turns; figures are totals over the rounds.
    /// Taking turns keeps a change in the machine's other load from favouring one level.
    #[arg(long, requires = "server", default_value_t = 1)]
    pub rounds: usize,
    /// Endpoints to load, in this order.
    #[arg(long, value_enum, value_delimiter = ',', requires = "server",
        default_values_t = [Endpoint::Decompose, Endpoint::Render])]
    pub endpoints: Vec<Endpoint>,
    /// Images (decompose) or slot sets (render) in each request.
    #[arg(long, requires = "server", default_value_t = 1)]
    pub per_request: usize,
    /// Model evaluations per render; the server's default when absent.
    #[arg(long, requires = "server")]
    pub steps: Option<usize>,
    /// Sampler of the renders; the server's default when absent.
    #[arg(long, requires = "server")]
    pub sampler: Option<String>,
    /// PNG or JPEG files to send (comma-separated); procedural scenes when absent.
    #[arg(long, value_delimiter = ',', requires = "server")]
    pub images: Vec<PathBuf>,
    /// Procedural scenes (at the model's resolution) to send when no `--images` are given.
    #[arg(long, requires = "server", default_value_t = 8)]
    pub scenes: usize,
    /// The server's API key, when it requires one.
    #[arg(long, env = "SLOTSERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print the report as one JSON object instead of a table.
    #[arg(long, requires = "server")]
    pub json: bool,
}

/// A server under test.
struct Target {
    client: reqwest::Client,
    base: String,
    api_key: Option<String>,
}

impl Target {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.client.request(method, format!("{}{path}", self.base));
        match &self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    /// Sends `request`; a non-2xx answer is an error carrying the server's message.
    async fn text(request: reqwest::RequestBuilder) -> anyhow::Result<String> {
        let response = request.send().await?;
        let status = response.status();
        let body = response.text().await?;
        if !status.is_success() {
            let message = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or(body);
            bail!("HTTP {}: {message}", status.as_u16());
        }
        Ok(body)
    }

    async fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let body = Self::text(self.request(reqwest::Method::GET, path)).await?;
        serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON"))
    }

    /// POSTs a JSON body and returns the JSON answer's `images`, checking there are `expect`.
    async fn post_images(
        &self,
        path: &str,
        body: String,
        expect: usize,
    ) -> anyhow::Result<Vec<Value>> {
        let request = self
            .request(reqwest::Method::POST, path)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        let answer: Value = serde_json::from_str(&Self::text(request).await?)
            .with_context(|| format!("POST {path}: not JSON"))?;
        let images = answer["images"].as_array().cloned().unwrap_or_default();
        ensure!(images.len() == expect, "POST {path}: {} images for {expect}", images.len());
        Ok(images)
    }

    /// The batch-size histogram of each stage, now.
    async fn batches(&self) -> anyhow::Result<Stages> {
        let text = Self::text(self.request(reqwest::Method::GET, "/metrics")).await?;
        Ok(batches::parse(&text))
    }
}

/// What one level's requests came to.
#[derive(Default)]
struct Outcome {
    latencies: Vec<f64>,
    errors: Vec<String>,
}

impl Outcome {
    fn absorb(&mut self, other: Outcome) {
        self.latencies.extend(other.latencies);
        self.errors.extend(other.errors);
    }
}

/// One level over all rounds.
#[derive(Default)]
struct LevelTotals {
    outcome: Outcome,
    wall_s: f64,
    batches: Stages,
}

impl LevelTotals {
    fn requests_per_s(&self) -> f64 {
        self.outcome.latencies.len() as f64 / self.wall_s.max(1e-9)
    }

    /// The level's report; `sequential`: requests per second of the 1-client level.
    fn report(
        &self,
        endpoint: Endpoint,
        clients: usize,
        per_request: usize,
        sequential: f64,
    ) -> LevelReport {
        let (latencies, errors) = (&self.outcome.latencies, &self.outcome.errors);
        let requests_per_s = self.requests_per_s();
        LevelReport {
            endpoint,
            clients,
            ok: latencies.len(),
            errors: errors.len(),
            first_error: errors.first().cloned(),
            wall_s: self.wall_s,
            requests_per_s,
            images_per_s: requests_per_s * per_request as f64,
            p50_s: percentile(latencies, 0.5),
            p99_s: percentile(latencies, 0.99),
            vs_sequential: (sequential > 0.0).then(|| requests_per_s / sequential),
            batches: self
                .batches
                .iter()
                .map(|(stage, h)| (stage.clone(), h.summary()))
                .filter(|(_, s)| s.batches > 0)
                .collect(),
        }
    }
}

/// Sends `requests` requests from `clients` concurrent clients (request i has body i mod
/// the number of bodies); returns the outcome and the wall time in seconds.
async fn run_level(
    target: &Target,
    endpoint: Endpoint,
    bodies: &[String],
    per_request: usize,
    clients: usize,
    requests: usize,
) -> (Outcome, f64) {
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let client = || async {
        let mut outcome = Outcome::default();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= requests {
                return outcome;
            }
            let sent = Instant::now();
            let body = bodies[i % bodies.len()].clone();
            match target.post_images(endpoint.path(), body, per_request).await {
                Ok(_) => outcome.latencies.push(sent.elapsed().as_secs_f64()),
                Err(e) => outcome.errors.push(format!("{e:#}")),
            }
        }
    };
    let outcomes = futures::future::join_all((0..clients).map(|_| client())).await;
    let wall = started.elapsed().as_secs_f64();
    let merged = outcomes.into_iter().fold(Outcome::default(), |mut all, o| {
        all.absorb(o);
        all
    });
    (merged, wall)
}

/// The images to send, as base64: the given files, else procedural scenes at `resolution`.
fn input_images(args: &LoadArgs, resolution: usize) -> anyhow::Result<Vec<String>> {
    if !args.images.is_empty() {
        return args
            .images
            .iter()
            .map(|p| {
                let bytes =
                    std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
                Ok(STANDARD.encode(bytes))
            })
            .collect();
    }
    let config = SceneConfig { width: resolution, height: resolution, ..SceneConfig::default() };
    Ok((0..args.scenes.max(1) as u64)
        .map(|i| {
            let scene = Scene::generate(&config, scene_seed(Split::Eval, i)).render();
            STANDARD.encode(imageio::encode_png(&scene.to_rgb_image()))
        })
        .collect())
}

/// `per_request` consecutive items of `items` from `start`, wrapping around.
fn window<T: Clone>(items: &[T], start: usize, per_request: usize) -> Vec<T> {
    (start..start + per_request).map(|i| items[i % items.len()].clone()).collect()
}

/// The slot sets of `images`, decomposed by the server `max_images` at a time.
async fn slot_sets(
    target: &Target,
    images: &[String],
    max_images: usize,
) -> anyhow::Result<Vec<Value>> {
    let mut sets = Vec::with_capacity(images.len());
    for chunk in images.chunks(max_images.max(1)) {
        let body = json!({ "images": chunk }).to_string();
        let decomposed = target.post_images("/decompose?masks=false", body, chunk.len()).await?;
        sets.extend(decomposed.into_iter().map(|d| d["slots"].clone()));
    }
    Ok(sets)
}

/// The machine's load average over 1, 5 and 15 minutes (Linux only).
fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut values = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some([values.next()??, values.next()??, values.next()??])
}

/// Load-tests the server at `url` as `args` asks and reports what it measured.
pub async fn load_test(url: &str, args: &LoadArgs) -> anyhow::Result<LoadReport> {
    ensure!(args.requests > 0, "--requests must be at least 1");
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    ensure!(args.per_request > 0, "--per-request must be at least 1");
    ensure!(!args.clients.contains(&0), "--clients must all be at least 1");
    let target = Target {
        client: reqwest::Client::new(),
        base: url.trim_end_matches('/').to_string(),
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
    };
    let info = target.get_json("/info").await.with_context(|| format!("cannot reach {url}"))?;
    let model = &info["model"];
    let max_images = info["limits"]["max_images"].as_u64().unwrap_or(1) as usize;
    ensure!(
        args.per_request <= max_images,
        "--per-request {} is over the server's limit of {max_images} images a request",
        args.per_request
    );
    let steps = args.steps.or(model["default_steps"].as_u64().map(|s| s as usize)).unwrap_or(20);
    let sampler = args
        .sampler
        .clone()
        .or_else(|| model["default_sampler"].as_str().map(str::to_string))
        .unwrap_or_else(|| "dpm-solver++".to_string());
    let resolution = model["resolution"].as_u64().context("/info gives no resolution")? as usize;
    let images = input_images(args, resolution)?;
    let mut levels = args.clients.clone();
    levels.push(1);
    levels.sort_unstable();
    levels.dedup();
    let load_before = load_average();
    let mut reports = Vec::new();
    for &endpoint in &args.endpoints {
        let bodies: Vec<String> = match endpoint {
            Endpoint::Decompose => (0..images.len())
                .map(|i| json!({ "images": window(&images, i, args.per_request) }).to_string())
                .collect(),
            Endpoint::Render => {
                let sets = slot_sets(&target, &images, max_images).await?;
                (0..sets.len())
                    .map(|i| {
                        json!({ "slots": window(&sets, i, args.per_request), "seed": i,
                                "sampler": sampler, "steps": steps })
                        .to_string()
                    })
                    .collect()
            }
        };
        // One unmeasured request, so no level pays for anything done once.
        target
            .post_images(endpoint.path(), bodies[0].clone(), args.per_request)
            .await
            .with_context(|| format!("warm-up {} request", endpoint.name()))?;
        let mut totals: Vec<LevelTotals> = levels.iter().map(|_| LevelTotals::default()).collect();
        for _ in 0..args.rounds {
            for (&clients, total) in levels.iter().zip(&mut totals) {
                let before = target.batches().await?;
                let (outcome, wall_s) =
                    run_level(&target, endpoint, &bodies, args.per_request, clients, args.requests)
                        .await;
                let after = target.batches().await?;
                total.outcome.absorb(outcome);
                total.wall_s += wall_s;
                batches::add(&mut total.batches, &batches::gained(&before, &after));
            }
        }
        // `levels` is sorted and starts at 1: the sequential baseline.
        let sequential = totals[0].requests_per_s();
        reports.extend(levels.iter().zip(&totals).map(|(&clients, total)| {
            total.report(endpoint, clients, args.per_request, sequential)
        }));
    }
    Ok(LoadReport {
        server: url.to_string(),
        model: model.clone(),
        sampler,
        steps,
        requests: args.requests,
        rounds: args.rounds,
        per_request: args.per_request,
        load_average: [load_before, load_average()],
        levels: reports,
    })
}
