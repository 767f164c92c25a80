//! The gRPC API (tonic), `proto/slotserve.proto`: the calls of the HTTP API on their own
//! port, in the same process and sharing its [engine](crate::engine), limits, request
//! budget and validation; plus the standard `grpc.health.v1.Health` service following the
//! engine's readiness. The server stops with the HTTP one (see [`crate::api::run`]).

mod auth;
mod convert;
mod health;
mod service;
mod status;

use std::future::Future;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;

use crate::api::state::AppState;
use auth::RequireApiKey;
use proto::slot_serve_server::SlotServeServer;
use service::SlotServeService;

/// The messages, server and client generated from `proto/slotserve.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("slotserve.v1");
}

/// Serves the gRPC API on `listener` until `shutdown` completes, then stops accepting and
/// finishes the calls in flight.
pub(crate) async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (health, readiness) = health::follow_readiness(state.engine.watch_status()).await;
    let slotserve = SlotServeServer::new(SlotServeService::new(state.clone()))
        .max_decoding_message_size(state.limits().payload_limit);
    let guarded = InterceptedService::new(slotserve, RequireApiKey::new(&state.settings));
    tracing::info!(address = %listener.local_addr()?, "gRPC listening");
    let served = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(guarded)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    readiness.abort();
    drop(readiness.await);
    Ok(served?)
}
