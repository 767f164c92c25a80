//! CPU work of a request (image decoding and resizing, PNG encoding) on tokio's blocking
//! threads, so it never stalls the threads that serve connections.

use axum::http::StatusCode;

use super::error::ApiError;

/// Runs `work` on a blocking thread; a panic in it is a 500 naming `what`.
pub async fn on_blocking_thread<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("{what} failed: {e}"))
    })
}
