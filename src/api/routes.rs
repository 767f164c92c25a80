//! The endpoints. Handlers only parse, validate and map errors: the work is the engine's,
//! the response building is in `respond`.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, Request, State};
use axum::http::header::{HeaderMap, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio::time::Instant;

use super::error::{ApiError, ErrorResponse};
use super::inputs::{check_count, decode_base64_images, prepare_images, read_images};
use super::openapi::openapi;
use super::respond::{self, wait_for_images, RenderReply};
use super::sampling::Sampling;
use super::types::{
    DecomposeForm, DecomposeQuery, DecomposeRequest, DecomposeResponse, EditRequest, EditResponse,
    HealthResponse, InfoResponse, RenderRequest, RenderResponse, SceneQuery,
};
use super::AppState;
use crate::data::{Scene, SceneConfig};
use crate::edit::{self, EditedSet};
use crate::engine::{Decomposed, ModelInfo, Status};
use crate::model::sampler::SamplerKind;
use crate::slots::{SlotSet, SlotSetJson};

/// Decompose images into slots, soft masks, areas, boxes and a segmentation.
#[utoipa::path(
    post, path = "/decompose", tag = "model",
    params(DecomposeQuery),
    request_body(description = "Images as JSON (base64 or data URLs), a multipart form, or one raw PNG/JPEG body",
        content((DecomposeRequest = "application/json"), (DecomposeForm = "multipart/form-data"),
            ("image/png"), ("image/jpeg"))),
    responses(
        (status = 200, description = "One decomposition per image", body = DecomposeResponse),
        (status = 400, description = "Malformed request, invalid base64 or a broken image", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 413, description = "Body or image over the limits", body = ErrorResponse),
        (status = 415, description = "Unsupported content type or image format", body = ErrorResponse),
        (status = 422, description = "Too many images", body = ErrorResponse),
        (status = 429, description = "Overloaded; retry after `Retry-After` seconds", body = ErrorResponse),
        (status = 500, description = "Model failure", body = ErrorResponse),
        (status = 503, description = "Model loading or server shutting down", body = ErrorResponse),
        (status = 504, description = "Request took longer than the limit", body = ErrorResponse),
    ),
    security((), ("bearer" = []), ("api_key" = [])),
)]
pub async fn decompose(
    State(state): State<AppState>,
    query: Result<Query<DecomposeQuery>, QueryRejection>,
    request: Request,
) -> Result<Json<DecomposeResponse>, ApiError> {
    let Query(query) = query?;
    let deadline = state.deadline();
    let info = state.model()?;
    let bytes = read_images(request, state.limits().max_images).await?;
    let _permit = state.permit()?;
    let outs = state.decompose(bytes, info, deadline).await?;
    Ok(Json(respond::decomposition(outs, query.masks.unwrap_or(true)).await?))
}

/// Render images from slot sets, optionally keeping or dropping slots.
#[utoipa::path(
    post, path = "/render", tag = "model",
    request_body = RenderRequest,
    responses(
        (status = 200, description = "JSON with base64 PNGs; raw `image/png` for one image when the client \
            accepts it; with `Accept: text/event-stream`, events `progress` ({index, step, of}), `image` \
            ({index, png, seed, num_slots}) and `error`",
            content((RenderResponse = "application/json"), ("image/png"), (String = "text/event-stream")),
            headers(("x-seed" = u64, description = "Seed (raw PNG answers)"))),
        (status = 400, description = "Malformed JSON or invalid base64", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 413, description = "Body over the limit", body = ErrorResponse),
        (status = 415, description = "Not JSON", body = ErrorResponse),
        (status = 422, description = "Invalid slots (shape, values, K), another model's slots, \
            unknown slot indices, unknown sampler, steps out of range, too many sets", body = ErrorResponse),
        (status = 429, description = "Overloaded; retry after `Retry-After` seconds", body = ErrorResponse),
        (status = 500, description = "Model failure", body = ErrorResponse),
        (status = 503, description = "Model loading or server shutting down", body = ErrorResponse),
        (status = 504, description = "Request took longer than the limit", body = ErrorResponse),
    ),
    security((), ("bearer" = []), ("api_key" = [])),
)]
pub async fn render(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<RenderRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let deadline = state.deadline();
    let info = state.model()?;
    let sets = req.slots.into_vec();
    check_count(sets.len(), state.limits().max_images, "slot sets")?;
    let sets = state
        .decode_sets(&sets)?
        .iter()
        .enumerate()
        .map(|(i, s)| {
            edit::select(s, req.keep.as_deref(), req.drop.as_deref())
                .map_err(|e| ApiError::from(e).at(format!("slot set {i}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let sampling = state.sampling(req.seed, req.sampler.as_deref(), req.steps, info)?;
    let permit = state.permit()?;
    let num_slots = sets.iter().map(SlotSet::num_slots).collect();
    let events = state.engine.render(sampling.specs(sets))?;
    RenderReply { events, sampling, num_slots, deadline, _permit: permit }.respond(&headers).await
}

/// The inputs of an edit: images to decompose, or slot sets.
enum EditInputs {
    Images(Vec<Vec<u8>>),
    Slots(Vec<SlotSet>),
}

impl EditInputs {
    /// The request's `images` or `slots`, checked.
    fn parse(state: &AppState, req: &EditRequest) -> Result<Self, ApiError> {
        let max = state.limits().max_images;
        match (&req.images, &req.slots) {
            (Some(images), None) => Ok(Self::Images(decode_base64_images(images, max)?)),
            (None, Some(sets)) => {
                check_count(sets.len(), max, "slot sets")?;
                Ok(Self::Slots(state.decode_sets(sets)?))
            }
            _ => Err(ApiError::bad_request("give either `images` or `slots`")),
        }
    }

    /// Slots of each input (a decomposed image has the model's K).
    fn slot_counts(&self, info: &ModelInfo) -> Vec<usize> {
        match self {
            Self::Images(images) => vec![info.num_slots; images.len()],
            Self::Slots(sets) => sets.iter().map(SlotSet::num_slots).collect(),
        }
    }

    /// The inputs as slot sets, decomposing images.
    async fn into_slot_sets(
        self,
        state: &AppState,
        info: &ModelInfo,
        deadline: Instant,
    ) -> Result<Vec<SlotSet>, ApiError> {
        match self {
            Self::Slots(sets) => Ok(sets),
            Self::Images(bytes) => {
                let outs = state.decompose(bytes, info, deadline).await?;
                Ok(outs.into_iter().map(|d| d.slots).collect())
            }
        }
    }
}

/// Edit images (or slot sets) by slot operations and render the results, in one call.
#[utoipa::path(
    post, path = "/edit", tag = "model",
    request_body = EditRequest,
    responses(
        (status = 200, description = "The edited images", body = EditResponse),
        (status = 400, description = "Malformed JSON, invalid base64 or a broken image", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 413, description = "Body or image over the limits", body = ErrorResponse),
        (status = 415, description = "Not JSON, or an unsupported image format", body = ErrorResponse),
        (status = 422, description = "Unknown image or slot references, invalid slots, another model's \
            slots, unknown sampler, steps out of range, too many images", body = ErrorResponse),
        (status = 429, description = "Overloaded; retry after `Retry-After` seconds", body = ErrorResponse),
        (status = 500, description = "Model failure", body = ErrorResponse),
        (status = 503, description = "Model loading or server shutting down", body = ErrorResponse),
        (status = 504, description = "Request took longer than the limit", body = ErrorResponse),
    ),
    security((), ("bearer" = []), ("api_key" = [])),
)]
pub async fn edit(
    State(state): State<AppState>,
    body: Result<Json<EditRequest>, JsonRejection>,
) -> Result<Json<EditResponse>, ApiError> {
    let Json(req) = body?;
    let deadline = state.deadline();
    let info = state.model()?;
    let inputs = EditInputs::parse(&state, &req)?;
    let plan = edit::plan(&inputs.slot_counts(info), &req.operations)?;
    state.check_outputs(&plan)?;
    let sampling = state.sampling(req.seed, req.sampler.as_deref(), req.steps, info)?;
    let _permit = state.permit()?;
    let inputs = inputs.into_slot_sets(&state, info, deadline).await?;
    let sets = plan.iter().map(|out| edit::gather(&inputs, out)).collect::<Result<Vec<_>, _>>()?;
    let mut events = state.engine.render(sampling.specs(sets.clone()))?;
    let images = wait_for_images(&mut events, sets.len(), deadline).await?;
    Ok(Json(respond::edited(plan, sets, &images, &sampling)))
}

/// A procedural scene (the default model's training data) as PNG: something to try the
/// model on without an image at hand, as the playground's "generate scene" does.
#[utoipa::path(
    get, path = "/scene", tag = "service",
    params(SceneQuery),
    responses(
        (status = 200, description = "The scene, 64×64", content_type = "image/png",
            headers(("x-seed" = u64, description = "The scene's seed"))),
        (status = 400, description = "Malformed seed", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
    ),
    security((), ("bearer" = []), ("api_key" = [])),
)]
pub async fn scene(query: Result<Query<SceneQuery>, QueryRejection>) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let seed = query.seed.unwrap_or_else(rand::random);
    let image = Scene::generate(&SceneConfig::default(), seed).render().to_rgb_image();
    Ok(respond::png_response(&image, seed))
}

/// Readiness: 200 once the model is loaded and warmed up, 503 otherwise.
#[utoipa::path(
    get, path = "/health", tag = "service",
    responses(
        (status = 200, description = "Ready", body = HealthResponse),
        (status = 503, description = "Loading, failed or shutting down", body = ErrorResponse),
    ),
)]
pub async fn health(State(state): State<AppState>) -> Result<Json<HealthResponse>, ApiError> {
    match state.engine.status() {
        Status::Ready => Ok(Json(HealthResponse { status: "ready".into() })),
        status => Err(unavailable(status)),
    }
}

/// 503 for a model that takes no new requests.
fn unavailable(status: Status) -> ApiError {
    ApiError::unavailable(match status {
        Status::Ready | Status::Loading => "the model is loading".to_string(),
        Status::Failed(reason) => format!("the model failed to load: {reason}"),
        Status::Draining | Status::Stopped => "the server is shutting down".to_string(),
    })
}

/// The served model, samplers, limits and version.
#[utoipa::path(
    get, path = "/info", tag = "service",
    responses(
        (status = 200, description = "Model and server facts", body = InfoResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 503, description = "Model not loaded yet", body = ErrorResponse),
    ),
    security((), ("bearer" = []), ("api_key" = [])),
)]
pub async fn info(State(state): State<AppState>) -> Result<Json<InfoResponse>, ApiError> {
    Ok(Json(InfoResponse {
        model: state.model()?.clone(),
        samplers: SamplerKind::ALL.iter().map(|k| k.name().to_string()).collect(),
        limits: state.limits().clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    }))
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(
    get, path = "/metrics", tag = "service",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")),
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let mut response = state.engine.metrics().render().into_response();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    response
}

/// This API's OpenAPI document (the same as the committed `openapi.yaml`).
#[utoipa::path(
    get, path = "/openapi.json", tag = "service",
    responses(
        (status = 200, description = "OpenAPI document", body = Object),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
    ),
    security((), ("bearer" = []), ("api_key" = [])),
)]
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi())
}

/// JSON 404 for unknown paths.
pub async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no endpoint at {}", request.uri().path()),
    )
}

/// JSON 405 for known paths with the wrong method.
pub async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", request.method(), request.uri().path()),
    )
}

impl AppState {
    /// The model's facts, when it takes new requests; 503 otherwise.
    fn model(&self) -> Result<&ModelInfo, ApiError> {
        match self.engine.status() {
            Status::Ready => {
                self.engine.info().ok_or_else(|| ApiError::unavailable("the model is loading"))
            }
            status => Err(unavailable(status)),
        }
    }

    /// When a request arriving now must be answered.
    fn deadline(&self) -> Instant {
        Instant::now() + self.timeout()
    }

    /// Checks sampling options against the model and the limits.
    fn sampling(
        &self,
        seed: Option<u64>,
        sampler: Option<&str>,
        steps: Option<usize>,
        info: &ModelInfo,
    ) -> Result<Sampling, ApiError> {
        Sampling::resolve(seed, sampler, steps, info, self.limits().max_steps)
    }

    /// Decodes images, brings them to the model's input and decomposes them by `deadline`.
    async fn decompose(
        &self,
        images: Vec<Vec<u8>>,
        info: &ModelInfo,
        deadline: Instant,
    ) -> Result<Vec<Decomposed>, ApiError> {
        let images =
            prepare_images(images, self.image_limits(), info.preprocess, info.resolution).await?;
        tokio::time::timeout_at(deadline, self.engine.decompose(images))
            .await
            .map_err(|_| respond::timeout())?
            .map_err(ApiError::from)
    }

    /// Validates slot sets against the served model.
    fn decode_sets(&self, sets: &[SlotSetJson]) -> Result<Vec<SlotSet>, ApiError> {
        let spec = self.slot_spec()?;
        sets.iter()
            .enumerate()
            .map(|(i, s)| {
                s.decode(&spec).map_err(|e| ApiError::from(e).at(format!("slot set {i}")))
            })
            .collect()
    }

    /// Refuses edits with more outputs, or outputs with more slots, than the limits.
    fn check_outputs(&self, plan: &[EditedSet]) -> Result<(), ApiError> {
        let limits = self.limits();
        check_count(plan.len(), limits.max_images, "edited images")?;
        match plan.iter().find(|o| o.slots.len() > limits.max_slots) {
            Some(o) => Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_edit",
                format!(
                    "{:?} would have {} slots; at most {} are allowed",
                    o.origin,
                    o.slots.len(),
                    limits.max_slots
                ),
            )),
            None => Ok(()),
        }
    }
}
