//! `grpc.health.v1.Health` following the engine: SERVING while the model is ready, NOT_SERVING
//! while it loads, after it failed, and once the server drains; for the whole server ("")
//! and for `slotserve.v1.SlotServe`. Once the server drains, `Watch` streams get NOT_SERVING
//! and then end, so that they never hold the graceful shutdown open.

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::{health_reporter, HealthReporter};
use tonic_health::ServingStatus;

use super::proto::slot_serve_server::SERVICE_NAME;
use crate::engine::Status;

/// The service names whose status is reported: the whole server and the API.
const SERVICES: [&str; 2] = ["", SERVICE_NAME];

/// The health service, already reporting the engine's current status, and the task that
/// keeps it up to date until the engine is gone (or the task is aborted).
pub async fn follow_readiness(
    mut status: watch::Receiver<Status>,
) -> (HealthServer<impl Health>, JoinHandle<()>) {
    let (mut reporter, server) = health_reporter();
    let now = status.borrow_and_update().clone();
    report(&mut reporter, &now).await;
    let follower = tokio::spawn(async move {
        while status.changed().await.is_ok() {
            let now = status.borrow_and_update().clone();
            if !report(&mut reporter, &now).await {
                break;
            }
        }
    });
    (server, follower)
}

/// Sets every reported service to what `status` means; false once the engine takes no more
/// work, after the services were set to NOT_SERVING and cleared (which ends `Watch` streams).
async fn report(reporter: &mut HealthReporter, status: &Status) -> bool {
    let (serving, going_on) = match status {
        Status::Ready => (ServingStatus::Serving, true),
        Status::Loading => (ServingStatus::NotServing, true),
        Status::Failed(_) | Status::Draining | Status::Stopped => {
            (ServingStatus::NotServing, false)
        }
    };
    for name in SERVICES {
        reporter.set_service_status(name, serving).await;
        if !going_on {
            reporter.clear_service_status(name).await;
        }
    }
    going_on
}
