//! API errors as gRPC statuses: the code follows the HTTP status (400/413/415/422 →
//! INVALID_ARGUMENT, 401 → UNAUTHENTICATED, 429 → RESOURCE_EXHAUSTED, 503 → UNAVAILABLE,
//! 504 → DEADLINE_EXCEEDED, 500 → INTERNAL), except that another model's slot set is
//! FAILED_PRECONDITION; the JSON API's `error_type` travels in the `error-type` metadata.

use axum::http::StatusCode;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::api::ApiError;

/// Metadata key carrying the error's kind (`invalid_slots`, `model_mismatch`, ...).
pub const ERROR_TYPE_KEY: &str = "error-type";

/// The gRPC code of an API error.
fn code(error: &ApiError) -> Code {
    if error.error_type == "model_mismatch" {
        return Code::FailedPrecondition;
    }
    match error.status {
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::TOO_MANY_REQUESTS => Code::ResourceExhausted,
        StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
        StatusCode::GATEWAY_TIMEOUT => Code::DeadlineExceeded,
        s if s.is_client_error() => Code::InvalidArgument,
        _ => Code::Internal,
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        let mut status = Status::new(code(&error), error.message);
        status.metadata_mut().insert(ERROR_TYPE_KEY, MetadataValue::from_static(error.error_type));
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_http_status_and_the_kind() {
        let cases = [
            (ApiError::bad_request("x"), Code::InvalidArgument),
            (ApiError::invalid_parameters("x"), Code::InvalidArgument),
            (
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "model_mismatch", "x"),
                Code::FailedPrecondition,
            ),
            (ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "x"), Code::Unauthenticated),
            (ApiError::overloaded("x"), Code::ResourceExhausted),
            (ApiError::unavailable("x"), Code::Unavailable),
            (ApiError::timeout(), Code::DeadlineExceeded),
            (ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "x"), Code::Internal),
        ];
        for (error, expected) in cases {
            let kind = error.error_type;
            let status = Status::from(error);
            assert_eq!(status.code(), expected, "{kind}");
            assert_eq!(status.metadata().get(ERROR_TYPE_KEY).unwrap(), kind);
        }
    }
}
