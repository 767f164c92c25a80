//! Errors as the API answers them: a status and `{"error": "...", "error_type": "..."}`.
//! Everything a client can send maps to a 4xx here; 500 is kept for model failures.

use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::rejection::{BytesRejection, JsonRejection, QueryRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::edit::EditError;
use crate::engine::EngineError;
use crate::imageio::ImageError;
use crate::slots::SlotError;

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"error": "slot set is from model \"1f2e\", but this server runs model \"9a8b\"",
    "error_type": "model_mismatch"}))]
pub struct ErrorResponse {
    /// What went wrong, for people.
    pub error: String,
    /// A stable machine-readable kind: `invalid_request`, `invalid_base64`, `invalid_image`,
    /// `unsupported_media_type`, `payload_too_large`, `image_too_large`, `invalid_slots`,
    /// `model_mismatch`, `invalid_edit`, `invalid_parameters`, `too_many_images`,
    /// `unauthorized`, `not_found`, `method_not_allowed`, `overloaded`, `unavailable`,
    /// `timeout`, `internal`.
    pub error_type: String,
}

/// An error on its way to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable kind (see [`ErrorResponse::error_type`]).
    pub error_type: &'static str,
    /// Human-readable message.
    pub message: String,
}

/// Seconds a client should wait before retrying an overloaded server.
const RETRY_AFTER_SECONDS: &str = "1";

impl ApiError {
    /// An error with the given status, kind and message.
    pub fn new(status: StatusCode, error_type: &'static str, message: impl Into<String>) -> Self {
        Self { status, error_type, message: message.into() }
    }

    /// 400: the request is malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 422: well-formed but unusable parameters.
    pub fn invalid_parameters(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameters", message)
    }

    /// 429: too much work in flight.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", message)
    }

    /// 503: the model cannot take work now.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// 504: the request ran past the server's time limit.
    pub fn timeout() -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "the request took longer than the server's limit",
        )
    }

    /// Prefixes the message with where the problem is (e.g. `image 2`).
    pub fn at(mut self, place: impl std::fmt::Display) -> Self {
        self.message = format!("{place}: {}", self.message);
        self
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorResponse {
        ErrorResponse { error: self.message.clone(), error_type: self.error_type.to_string() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        let headers = response.headers_mut();
        match self.status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
            }
            StatusCode::UNAUTHORIZED => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

/// The kind of an error that only has a status (extractor rejections).
fn kind_of(status: StatusCode) -> &'static str {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        _ => "invalid_request",
    }
}

/// Extractor rejections keep axum's status and message, in our JSON form.
macro_rules! from_rejection {
    ($($rejection:ty),*) => {$(
        impl From<$rejection> for ApiError {
            fn from(e: $rejection) -> Self {
                Self::new(e.status(), kind_of(e.status()), e.body_text())
            }
        }
    )*};
}

from_rejection!(JsonRejection, QueryRejection, BytesRejection, MultipartRejection, MultipartError);

impl From<ImageError> for ApiError {
    fn from(e: ImageError) -> Self {
        let (status, kind) = match e {
            ImageError::UnsupportedFormat => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ImageError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "image_too_large"),
            ImageError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_image"),
            ImageError::TooSmall(_) => (StatusCode::UNPROCESSABLE_ENTITY, "image_too_small"),
        };
        Self::new(status, kind, e.to_string())
    }
}

impl From<SlotError> for ApiError {
    fn from(e: SlotError) -> Self {
        let (status, kind) = match &e {
            SlotError::Base64(_) => (StatusCode::BAD_REQUEST, "invalid_base64"),
            e if e.is_model_mismatch() => (StatusCode::UNPROCESSABLE_ENTITY, "model_mismatch"),
            _ => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_slots"),
        };
        Self::new(status, kind, e.to_string())
    }
}

impl From<EditError> for ApiError {
    fn from(e: EditError) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_edit", e.to_string())
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let (status, kind) = match e {
            EngineError::QueueFull(_) => (StatusCode::TOO_MANY_REQUESTS, "overloaded"),
            EngineError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            EngineError::Rejected(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameters"),
            EngineError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        Self::new(status, kind, e.to_string())
    }
}
