//! The optional API key on gRPC calls: the same check as HTTP's (`authorization: Bearer
//! <key>` or `x-api-key` metadata), UNAUTHENTICATED without it. The health service is left
//! open, like `/health`.

use std::sync::Arc;

use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::api::middleware::check_api_key;
use crate::api::Settings;

/// Refuses calls without the configured API key; lets everything through when none is set.
#[derive(Debug, Clone)]
pub struct RequireApiKey {
    key: Option<Arc<str>>,
}

impl RequireApiKey {
    /// The check for the key in `settings`.
    pub fn new(settings: &Settings) -> Self {
        Self { key: settings.api_key.as_deref().map(Arc::from) }
    }
}

impl Interceptor for RequireApiKey {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match &self.key {
            None => Ok(request),
            Some(expected) => match check_api_key(request.metadata().as_ref(), expected) {
                Ok(()) => Ok(request),
                Err(refusal) => Err(refusal.into()),
            },
        }
    }
}
