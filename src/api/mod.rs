//! The HTTP API (axum): `/decompose`, `/render`, `/edit`, `/scene`, `/health`, `/info`,
//! `/metrics` and `/openapi.json`, in front of the [engine](crate::engine), the playground
//! page at `/` that uses them, and the [gRPC API](crate::grpc) beside it on its own port,
//! sharing the engine, the limits and the validation.
//!
//! Handlers are thin: they parse and validate everything (images, slot sets, edits, sampling
//! options, limits) before queueing work, map every failure to a JSON error, and leave the
//! tensors to the model thread. [`serve`] runs both servers until SIGTERM or Ctrl-C, then
//! they stop accepting, report not ready, finish the work in flight and return.

mod blocking;
pub(crate) mod decomposition;
pub(crate) mod editing;
mod error;
pub(crate) mod inputs;
pub(crate) mod middleware;
mod openapi;
mod playground;
pub(crate) mod rendering;
mod respond;
mod routes;
mod sampling;
pub(crate) mod state;
pub mod types;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use error::{ApiError, ErrorResponse};
pub use openapi::{openapi, openapi_yaml};
pub use sampling::{Sampling, SamplingOptions};

use crate::config::Preset;
use crate::device::{DTypeChoice, DeviceChoice};
use crate::engine::{Engine, EngineConfig, Metrics, Model};
use crate::model::pipeline::SlotDiffusion;
use state::AppState;
use types::Limits;

/// Default `--max-batch-size`: batches of 4 pay off on a CPU without hurting latency much.
pub const DEFAULT_MAX_BATCH_SIZE: usize = 4;
/// Default `--max-queue`.
pub const DEFAULT_MAX_QUEUE: usize = 32;
/// Default `--max-concurrent`.
pub const DEFAULT_MAX_CONCURRENT: usize = 64;
/// Default `--max-images`.
pub const DEFAULT_MAX_IMAGES: usize = 8;
/// Default `--max-slots`.
pub const DEFAULT_MAX_SLOTS: usize = 64;
/// Default `--max-steps` (DDPM's 1000 steps fit).
pub const DEFAULT_MAX_STEPS: usize = 1000;
/// Default `--payload-limit`: 32 MiB.
pub const DEFAULT_PAYLOAD_LIMIT: usize = 32 << 20;
/// Default `--max-image-pixels`: 4096².
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 4096 * 4096;
/// Default `--max-image-side`.
pub const DEFAULT_MAX_IMAGE_SIDE: u32 = 8192;
/// Default `--grpc-port`.
pub const DEFAULT_GRPC_PORT: u16 = 50051;
/// Default `--request-timeout`, in seconds.
pub const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 600;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_batch_size: DEFAULT_MAX_BATCH_SIZE,
            max_queue: DEFAULT_MAX_QUEUE,
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            max_images: DEFAULT_MAX_IMAGES,
            max_slots: DEFAULT_MAX_SLOTS,
            max_steps: DEFAULT_MAX_STEPS,
            payload_limit: DEFAULT_PAYLOAD_LIMIT,
            max_image_pixels: DEFAULT_MAX_IMAGE_PIXELS,
            max_image_side: DEFAULT_MAX_IMAGE_SIDE,
            request_timeout_secs: DEFAULT_REQUEST_TIMEOUT_SECS,
        }
    }
}

/// `slotserve serve`: every flag is also an environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "SLOTSERVE_HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// Port to listen on (HTTP).
    #[arg(long, env = "SLOTSERVE_PORT", default_value_t = 3000)]
    pub port: u16,
    /// Port of the gRPC API (`proto/slotserve.proto`) on the same address; 0 turns it off.
    #[arg(long, env = "SLOTSERVE_GRPC_PORT", default_value_t = DEFAULT_GRPC_PORT)]
    pub grpc_port: u16,
    /// The model: a folder with `config.json` + `model.safetensors`, or a checkpoint file
    /// (official `.pth` or safetensors) with `--preset`.
    #[arg(long, env = "SLOTSERVE_MODEL", default_value = "weights")]
    pub model: PathBuf,
    /// Preset of a bare checkpoint file (ignored for a model folder).
    #[arg(long, env = "SLOTSERVE_PRESET", value_enum)]
    pub preset: Option<Preset>,
    /// Device to run on: `auto`, `cpu`, `cuda` (GPU 0), `cuda:N`, `metal` or `metal:N`.
    #[arg(long, env = "SLOTSERVE_DEVICE", default_value_t)]
    pub device: DeviceChoice,
    /// Floating-point type of weights and activations.
    #[arg(long, env = "SLOTSERVE_DTYPE", value_enum, default_value_t)]
    pub dtype: DTypeChoice,
    /// Most images decomposed, or render jobs denoised, in one batch.
    #[arg(long, env = "SLOTSERVE_MAX_BATCH_SIZE", default_value_t = DEFAULT_MAX_BATCH_SIZE)]
    pub max_batch_size: usize,
    /// Most requests waiting for the model; beyond, 429.
    #[arg(long, env = "SLOTSERVE_MAX_QUEUE", default_value_t = DEFAULT_MAX_QUEUE)]
    pub max_queue: usize,
    /// Most model requests handled at once (queued, running or being answered); beyond, 429.
    #[arg(long, env = "SLOTSERVE_MAX_CONCURRENT", default_value_t = DEFAULT_MAX_CONCURRENT)]
    pub max_concurrent: usize,
    /// Most images or slot sets in one request.
    #[arg(long, env = "SLOTSERVE_MAX_IMAGES", default_value_t = DEFAULT_MAX_IMAGES)]
    pub max_images: usize,
    /// Most slots in one slot set.
    #[arg(long, env = "SLOTSERVE_MAX_SLOTS", default_value_t = DEFAULT_MAX_SLOTS)]
    pub max_slots: usize,
    /// Most model evaluations per rendered image.
    #[arg(long, env = "SLOTSERVE_MAX_STEPS", default_value_t = DEFAULT_MAX_STEPS)]
    pub max_steps: usize,
    /// Largest request body, in bytes.
    #[arg(long, env = "SLOTSERVE_PAYLOAD_LIMIT", default_value_t = DEFAULT_PAYLOAD_LIMIT)]
    pub payload_limit: usize,
    /// Largest input image in pixels (width × height), checked before decoding.
    #[arg(long, env = "SLOTSERVE_MAX_IMAGE_PIXELS", default_value_t = DEFAULT_MAX_IMAGE_PIXELS)]
    pub max_image_pixels: u64,
    /// Largest input image side, in pixels.
    #[arg(long, env = "SLOTSERVE_MAX_IMAGE_SIDE", default_value_t = DEFAULT_MAX_IMAGE_SIDE)]
    pub max_image_side: u32,
    /// Longest a request may take, in seconds (504 beyond).
    #[arg(long, env = "SLOTSERVE_REQUEST_TIMEOUT", default_value_t = DEFAULT_REQUEST_TIMEOUT_SECS)]
    pub request_timeout: u64,
    /// API key required (as `Authorization: Bearer` or `x-api-key`, in HTTP headers or gRPC
    /// metadata) on every endpoint but `/health`, `/metrics`, the playground's files (`/`,
    /// `/playground/*`) and the gRPC health service.
    #[arg(long, env = "SLOTSERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Warm the model up before `/health` reports ready.
    #[arg(long, env = "SLOTSERVE_WARMUP", default_value_t = true, action = clap::ArgAction::Set)]
    pub warmup: bool,
}

impl ServeArgs {
    /// The server settings these flags describe.
    pub fn settings(&self) -> Settings {
        Settings {
            limits: Limits {
                max_batch_size: self.max_batch_size,
                max_queue: self.max_queue,
                max_concurrent: self.max_concurrent,
                max_images: self.max_images,
                max_slots: self.max_slots,
                max_steps: self.max_steps,
                payload_limit: self.payload_limit,
                max_image_pixels: self.max_image_pixels,
                max_image_side: self.max_image_side,
                request_timeout_secs: self.request_timeout,
            },
            api_key: self.api_key.clone().filter(|k| !k.is_empty()),
            warmup: self.warmup,
        }
    }
}

/// Listens on `host:port` for the server named `what`.
async fn listen(host: &str, port: u16, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind((host, port))
        .await
        .with_context(|| format!("cannot listen for {what} on {host}:{port}"))
}

/// Serves the model named by `args` until SIGTERM or Ctrl-C; see [`run`].
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let http = listen(&args.host, args.port, "HTTP").await?;
    let grpc = match args.grpc_port {
        0 => None,
        port => Some(listen(&args.host, port, "gRPC").await?),
    };
    let settings = args.settings();
    let loader = move || {
        let device = args.device.open()?;
        tracing::info!(model = %args.model.display(), "loading the model");
        SlotDiffusion::load(&args.model, args.preset, &device, args.dtype.dtype())
    };
    run(Listeners { http, grpc }, settings, loader, shutdown_signal()).await
}

/// Where [`run`] serves: HTTP always, gRPC when a listener is given. A bare
/// [`TcpListener`] means HTTP only.
#[derive(Debug)]
pub struct Listeners {
    /// The HTTP API's listener.
    pub http: TcpListener,
    /// The gRPC API's listener; `None`: no gRPC.
    pub grpc: Option<TcpListener>,
}

impl From<TcpListener> for Listeners {
    fn from(http: TcpListener) -> Self {
        Self { http, grpc: None }
    }
}

/// Everything the server needs besides the model.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Limits on requests, batches and the queue.
    pub limits: Limits,
    /// API key required on every endpoint but `/health`, `/metrics` and the playground's
    /// files; `None`: open.
    pub api_key: Option<String>,
    /// Warm the model up before reporting ready.
    pub warmup: bool,
}

/// The application: protected model and info routes, open health, metrics and playground
/// routes, JSON errors for unknown paths and methods, body limit, and the metrics and
/// request-log layer.
fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/decompose", post(routes::decompose))
        .route("/render", post(routes::render))
        .route("/edit", post(routes::edit))
        .route("/info", get(routes::info))
        .route("/openapi.json", get(routes::openapi_json))
        .route("/scene", get(routes::scene))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::require_api_key,
        ));
    let open = Router::new()
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .route("/", get(playground::page))
        .route("/playground/{file}", get(playground::asset));
    Router::new()
        .merge(protected)
        .merge(open)
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.limits().payload_limit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), middleware::track))
        .with_state(state)
}

/// Serves HTTP (and gRPC, when `listeners` has it) with a model made by `loader` (on the
/// model thread) until `shutdown` completes or the model fails to load. On shutdown both
/// servers stop accepting connections and report not ready (503 on `/health`, NOT_SERVING on
/// gRPC health), finish the requests in flight, and `run` waits for the model thread to end.
pub async fn run<M, F>(
    listeners: impl Into<Listeners>,
    settings: Settings,
    loader: F,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    M: Model + 'static,
    F: FnOnce() -> anyhow::Result<M> + Send + 'static,
{
    let listeners = listeners.into();
    let limits = &settings.limits;
    let config = EngineConfig {
        max_batch_size: limits.max_batch_size,
        max_queue: limits.max_queue,
        warmup: settings.warmup,
    };
    let metrics = Metrics::new();
    let (engine, thread) = Engine::start(loader, config, metrics.clone());
    let state = AppState::new(engine.clone(), settings);
    let upkeep = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            metrics.upkeep();
        }
    });
    let (failure_tx, failure_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopping = engine.clone();
    let stop = tokio::spawn(async move {
        let load_failure = async {
            match stopping.wait_ready().await {
                Ok(()) => std::future::pending().await,
                Err(reason) => reason,
            }
        };
        tokio::select! {
            () = shutdown => tracing::info!("shutting down: finishing the requests in flight"),
            reason = load_failure => drop(failure_tx.send(reason)),
        }
        stopping.drain();
        stop_tx.send_replace(true);
    });
    let stopped = move || {
        let mut stop_rx = stop_rx.clone();
        async move { drop(stop_rx.wait_for(|&stopped| stopped).await) }
    };
    tracing::info!(address = %listeners.http.local_addr()?, "HTTP listening");
    let http = async {
        axum::serve(listeners.http, router(state.clone())).with_graceful_shutdown(stopped()).await
    };
    let grpc = async {
        match listeners.grpc {
            Some(listener) => crate::grpc::serve(listener, state.clone(), stopped()).await,
            None => Ok(()),
        }
    };
    let served = tokio::try_join!(async { http.await.map_err(anyhow::Error::from) }, grpc);
    stop.abort();
    drop(stop.await);
    upkeep.abort();
    drop((state, engine));
    tokio::task::spawn_blocking(move || thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the model thread panicked"))?;
    served?;
    match failure_rx.await {
        Ok(reason) => Err(anyhow::anyhow!("the model failed to load: {reason}")),
        Err(_) => Ok(()),
    }
}

/// Completes on SIGTERM or Ctrl-C (SIGINT).
pub async fn shutdown_signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => drop(sigterm.recv().await),
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}
