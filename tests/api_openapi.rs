//! `openapi.yaml` at the repository root is the API's contract: it must equal the document
//! the code generates, and the server must serve that document at `/openapi.json`.
//!
//! After changing the API, regenerate it with
//! `SLOTSERVE_UPDATE_OPENAPI=1 cargo test --test api_openapi`.

mod api_common;

use std::path::PathBuf;

use api_common::{settings, TestServer};

/// Set to rewrite `openapi.yaml` from the code instead of comparing.
const UPDATE_ENV: &str = "SLOTSERVE_UPDATE_OPENAPI";

fn committed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("openapi.yaml")
}

#[test]
fn committed_openapi_yaml_is_what_the_code_generates() {
    let generated = slotserve::api::openapi_yaml();
    if std::env::var_os(UPDATE_ENV).is_some() {
        std::fs::write(committed_path(), &generated).expect("write openapi.yaml");
        return;
    }
    let committed = std::fs::read_to_string(committed_path()).unwrap_or_default();
    assert!(
        committed == generated,
        "openapi.yaml differs from the API the code serves; regenerate it with \
         `{UPDATE_ENV}=1 cargo test --test api_openapi` and review the diff"
    );
}

#[tokio::test]
async fn the_server_serves_the_same_document() {
    let server = TestServer::start(settings()).await;
    let (status, served) = server.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(served, serde_json::to_value(slotserve::api::openapi()).unwrap());
    for path in ["/decompose", "/render", "/edit", "/health", "/info", "/metrics", "/openapi.json"]
    {
        assert!(served["paths"].get(path).is_some(), "{path} is documented");
    }
}
