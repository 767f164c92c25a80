//! What every front end (the HTTP routes and the gRPC service) does with a request whatever
//! its wire form: readiness, limits, admission, validation of slot sets and sampling options,
//! and decomposition on the engine. Failures are [`ApiError`]s, which each front end turns
//! into its own answer (a JSON error, a gRPC status).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::error::ApiError;
use super::inputs::{check_count, prepare_images};
use super::sampling::{Sampling, SamplingOptions};
use super::types::{InfoResponse, Limits};
use super::Settings;
use crate::engine::{Decomposed, Engine, ModelInfo, Status};
use crate::imageio::ImageLimits;
use crate::model::sampler::SamplerKind;
use crate::slots::{SlotSet, SlotSpec, WireSlotSet};

/// State shared by the HTTP handlers and the gRPC service: one engine, one set of limits,
/// one budget of requests in flight.
#[derive(Clone)]
pub struct AppState {
    /// The engine both front ends submit work to.
    pub engine: Engine,
    /// The server's settings.
    pub settings: Arc<Settings>,
    permits: Arc<Semaphore>,
}

impl AppState {
    /// State for `engine` under `settings`, with `max_concurrent` requests in flight at most.
    pub fn new(engine: Engine, settings: Settings) -> Self {
        let permits = Arc::new(Semaphore::new(settings.limits.max_concurrent.max(1)));
        Self { engine, settings: Arc::new(settings), permits }
    }

    /// The server's limits.
    pub fn limits(&self) -> &Limits {
        &self.settings.limits
    }

    /// The limits on input images.
    fn image_limits(&self) -> ImageLimits {
        ImageLimits {
            max_side: self.limits().max_image_side,
            max_pixels: self.limits().max_image_pixels,
            ..ImageLimits::default()
        }
    }

    /// When a request arriving now must be answered.
    pub fn deadline(&self) -> Instant {
        Instant::now() + Duration::from_secs(self.limits().request_timeout_secs)
    }

    /// A slot among the requests handled at once; 429 when all are taken.
    pub fn permit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.permits.clone().try_acquire_owned().map_err(|_| {
            ApiError::overloaded(format!(
                "the server is busy: {} requests are in flight; retry later",
                self.limits().max_concurrent
            ))
        })
    }

    /// The model's facts, when it takes new requests; 503 otherwise.
    pub fn model(&self) -> Result<&ModelInfo, ApiError> {
        match self.engine.status() {
            Status::Ready => {
                self.engine.info().ok_or_else(|| ApiError::unavailable("the model is loading"))
            }
            status => Err(unavailable(status)),
        }
    }

    /// The served model, samplers, limits and version (`/info`).
    pub fn info(&self) -> Result<InfoResponse, ApiError> {
        Ok(InfoResponse {
            model: self.model()?.clone(),
            samplers: SamplerKind::ALL.iter().map(|k| k.name().to_string()).collect(),
            limits: self.limits().clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        })
    }

    /// Checks sampling options against the model and the limits.
    pub fn sampling(
        &self,
        options: SamplingOptions<'_>,
        info: &ModelInfo,
    ) -> Result<Sampling, ApiError> {
        Sampling::resolve(options, info, self.limits().max_steps)
    }

    /// Validates a request's slot sets against the served model and the limits.
    pub fn slot_sets<S: WireSlotSet>(&self, sets: &[S]) -> Result<Vec<SlotSet>, ApiError> {
        check_count(sets.len(), self.limits().max_images, "slot sets")?;
        let info =
            self.engine.info().ok_or_else(|| ApiError::unavailable("the model is loading"))?;
        let spec = SlotSpec {
            slot_size: info.slot_size,
            max_slots: self.limits().max_slots,
            fingerprint: info.fingerprint.clone(),
        };
        sets.iter()
            .enumerate()
            .map(|(i, s)| {
                s.decode(&spec).map_err(|e| ApiError::from(e).at(format!("slot set {i}")))
            })
            .collect()
    }

    /// Decodes images (checked by the caller for count and emptiness), brings them to the
    /// model's input and decomposes them by `deadline`. The caller holds a permit.
    pub async fn decompose(
        &self,
        images: Vec<Vec<u8>>,
        info: &ModelInfo,
        deadline: Instant,
    ) -> Result<Vec<Decomposed>, ApiError> {
        let images =
            prepare_images(images, self.image_limits(), info.preprocess, info.resolution).await?;
        tokio::time::timeout_at(deadline, self.engine.decompose(images))
            .await
            .map_err(|_| ApiError::timeout())?
            .map_err(ApiError::from)
    }

    /// A whole decompose request: readiness, a permit, then [`Self::decompose`].
    pub async fn decompose_request(
        &self,
        images: Vec<Vec<u8>>,
    ) -> Result<Vec<Decomposed>, ApiError> {
        let deadline = self.deadline();
        let info = self.model()?;
        let _permit = self.permit()?;
        self.decompose(images, info, deadline).await
    }
}

/// 503 for a model that takes no new requests.
pub fn unavailable(status: Status) -> ApiError {
    ApiError::unavailable(match status {
        Status::Ready | Status::Loading => "the model is loading".to_string(),
        Status::Failed(reason) => format!("the model failed to load: {reason}"),
        Status::Draining | Status::Stopped => "the server is shutting down".to_string(),
    })
}
