//! Graceful shutdown on a real SIGTERM: the server stops accepting, finishes the request in
//! flight, and `run` returns cleanly. (Its own test binary: the signal goes to the process.)

mod api_common;

use std::time::Duration;

use api_common::{picture, png_base64, settings, tiny_model};
use serde_json::{json, Value};
use slotserve::api;
use tokio::net::TcpListener;

#[tokio::test]
async fn sigterm_drains_work_in_flight() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(api::run(listener, settings(), tiny_model, api::shutdown_signal()));
    let client = reqwest::Client::new();
    while client
        .get(format!("{base}/health"))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let request = json!({ "images": [png_base64(&picture(1, 32, 32))],
        "operations": [{"op": "remove", "image": 0, "slot": 1}], "sampler": "ddim", "steps": 40 });
    let in_flight = tokio::spawn(client.post(format!("{base}/edit")).json(&request).send());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let status = std::process::Command::new("kill")
        .args(["-TERM", &std::process::id().to_string()])
        .status();
    assert!(status.unwrap().success());

    let reply = in_flight.await.unwrap().expect("the request in flight is answered");
    assert_eq!(reply.status(), 200);
    let body: Value = reply.json().await.unwrap();
    assert_eq!(body["outputs"][0]["slots"]["shape"][0], 3);
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("run returns")
        .unwrap()
        .expect("clean exit");
    assert!(client.get(format!("{base}/health")).send().await.is_err(), "no longer accepting");
}
