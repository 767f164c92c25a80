//! The load generator of `slotserve bench --server` against a real server on 127.0.0.1: every
//! request is answered, levels run in order with the sequential one first, and the batch
//! sizes it reads from `/metrics` account for exactly the work it sent.

mod api_common;

use api_common::{settings, TestServer};
use slotserve::bench::{load_test, Endpoint, LevelReport, LoadArgs};

/// Two clients, two rounds of two requests a level, two-step DDIM renders, two images a
/// request.
fn small_load() -> LoadArgs {
    LoadArgs {
        clients: vec![2],
        requests: 2,
        rounds: 2,
        endpoints: vec![Endpoint::Decompose, Endpoint::Render],
        per_request: 2,
        steps: Some(2),
        sampler: Some("ddim".into()),
        images: Vec::new(),
        scenes: 3,
        api_key: None,
        json: false,
    }
}

/// Items (images or jobs) the server's `stage` batches held during a level.
fn items(level: &LevelReport, stage: &str) -> f64 {
    level.batches.get(stage).map_or(0.0, |b| b.mean * b.batches as f64)
}

#[tokio::test]
async fn measures_each_endpoint_at_each_level() {
    let server = TestServer::start(settings()).await;
    let report = load_test(&server.base, &small_load()).await.expect("load test");
    assert_eq!((report.steps, report.sampler.as_str()), (2, "ddim"));
    assert_eq!(report.model["name"], "tiny-test");
    let runs: Vec<(Endpoint, usize)> =
        report.levels.iter().map(|l| (l.endpoint, l.clients)).collect();
    assert_eq!(
        runs,
        [
            (Endpoint::Decompose, 1),
            (Endpoint::Decompose, 2),
            (Endpoint::Render, 1),
            (Endpoint::Render, 2)
        ]
    );
    for level in &report.levels {
        let what = format!("{:?} at {} clients", level.endpoint, level.clients);
        assert_eq!((level.ok, level.errors), (4, 0), "{what}: {:?}", level.first_error);
        assert!(level.requests_per_s > 0.0, "{what}");
        assert!((level.images_per_s - 2.0 * level.requests_per_s).abs() < 1e-9, "{what}");
        assert!(level.p50_s.unwrap() <= level.p99_s.unwrap(), "{what}");
        match level.endpoint {
            Endpoint::Decompose => assert_eq!(items(level, "decompose"), 8.0, "{what}"),
            Endpoint::Render => {
                assert_eq!(items(level, "denoise"), 8.0 * 2.0, "{what}: 8 images, 2 steps each");
                assert_eq!(items(level, "decode"), 8.0, "{what}");
            }
        }
    }
    for sequential in report.levels.iter().filter(|l| l.clients == 1) {
        assert_eq!(sequential.vs_sequential, Some(1.0));
    }
    let table = report.table();
    assert!(table.contains("decompose") && table.contains("denoise: mean"), "{table}");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["levels"][3]["endpoint"], "render");
}

#[tokio::test]
async fn uses_the_api_key_and_reports_a_wrong_one() {
    let mut with_key = settings();
    with_key.api_key = Some("secret".into());
    let server = TestServer::start(with_key).await;
    let mut load = LoadArgs { clients: vec![1], requests: 1, rounds: 1, ..small_load() };
    load.endpoints = vec![Endpoint::Decompose];
    load.api_key = Some("wrong".into());
    let err = load_test(&server.base, &load).await.unwrap_err();
    assert!(format!("{err:#}").contains("HTTP 401"), "{err:#}");
    load.api_key = Some("secret".into());
    let report = load_test(&server.base, &load).await.expect("load test with the key");
    assert_eq!(report.levels.len(), 1);
    assert_eq!(report.levels[0].ok, 1);
}
