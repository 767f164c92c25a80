//! Request-wide layers: the optional API key, and per-endpoint request metrics with one log
//! line per request.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::state::AppState;

/// Header carrying the API key, as an alternative to `Authorization: Bearer`.
const API_KEY_HEADER: &str = "x-api-key";

/// The key a request presents: `Authorization: Bearer <key>` or `x-api-key: <key>`.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
    bearer.or_else(|| headers.get(API_KEY_HEADER).and_then(|v| v.to_str().ok())).map(str::trim)
}

/// Compares keys through their digests, so the time taken does not reveal the key.
fn same_key(presented: &str, expected: &str) -> bool {
    Sha256::digest(presented.as_bytes()) == Sha256::digest(expected.as_bytes())
}

/// Checks the key a request presents (`Authorization: Bearer` or `x-api-key`) against the
/// configured one; 401 when it is missing or wrong. HTTP and gRPC requests alike.
pub fn check_api_key(headers: &HeaderMap, expected: &str) -> Result<(), ApiError> {
    match presented_key(headers) {
        Some(key) if same_key(key, expected) => Ok(()),
        Some(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "wrong API key")),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "an API key is required: send `Authorization: Bearer <key>` or `x-api-key: <key>`",
        )),
    }
}

/// Refuses requests without the configured API key (401 JSON); open when none is set.
pub async fn require_api_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = state.settings.api_key.as_deref() else {
        return next.run(request).await;
    };
    match check_api_key(request.headers(), expected) {
        Ok(()) => next.run(request).await,
        Err(refusal) => refusal.into_response(),
    }
}

/// Counts every request and its latency by endpoint and status, and logs it with its method,
/// path, status and latency (for a streamed answer: until the headers were sent).
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let endpoint =
        request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let seconds = started.elapsed().as_secs_f64();
    let status = response.status().as_u16();
    state.engine.metrics().request(&endpoint, status, seconds);
    let latency_ms = (seconds * 1e6).round() / 1e3;
    tracing::info!(%method, path, status, latency_ms, "request");
    response
}
