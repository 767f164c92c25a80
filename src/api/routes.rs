//! The endpoints. Handlers only parse, validate and map errors: the work is the engine's,
//! the response building is in `respond`.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, Request, State};
use axum::http::header::{HeaderMap, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::editing::EditInputs;
use super::error::{ApiError, ErrorResponse};
use super::inputs::{decode_base64_images, read_images};
use super::openapi::openapi;
use super::rendering::RenderInput;
use super::respond;
use super::sampling::SamplingOptions;
use super::state::{unavailable, AppState};
use super::types::{
    DecomposeForm, DecomposeQuery, DecomposeRequest, DecomposeResponse, EditRequest, EditResponse,
    HealthResponse, InfoResponse, RenderRequest, RenderResponse, SceneQuery,
};
use crate::data::{Scene, SceneConfig};
use crate::engine::Status;

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
    state.model()?; // 503 before reading a body the model cannot take
    let bytes = read_images(request, state.limits().max_images).await?;
    let outs = state.decompose_request(bytes).await?;
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
    let sets = req.slots.into_vec();
    let input = RenderInput { sets: &sets, keep: req.keep.as_deref(), drop: req.drop.as_deref() };
    let options =
        SamplingOptions { seed: req.seed, sampler: req.sampler.as_deref(), steps: req.steps };
    let rendering = state.start_render(input, options)?;
    respond::render_answer(rendering, &headers).await
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
    let inputs = match (req.images, &req.slots) {
        (Some(images), None) => {
            EditInputs::Images(decode_base64_images(&images, state.limits().max_images)?)
        }
        (None, Some(sets)) => EditInputs::Slots(state.slot_sets(sets)?),
        _ => return Err(ApiError::bad_request("give either `images` or `slots`")),
    };
    let options =
        SamplingOptions { seed: req.seed, sampler: req.sampler.as_deref(), steps: req.steps };
    let edited = state.edit(inputs, &req.operations, options).await?;
    Ok(Json(respond::edited(edited)))
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
    Ok(Json(state.info()?))
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
