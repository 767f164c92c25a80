//! Graceful shutdown on a real SIGTERM: both servers (HTTP and gRPC) stop accepting, finish
//! the requests in flight, and `run` returns cleanly. (Its own test binary: the signal goes
//! to the process.)

mod api_common;

use std::time::Duration;

use api_common::{picture, png, png_base64, settings, tiny_model};
use futures::StreamExt;
use serde_json::{json, Value};
use slotserve::api;
use slotserve::grpc::proto::slot_serve_client::SlotServeClient;
use slotserve::grpc::proto::{render_event, DecomposeRequest, RenderRequest};
use tokio::net::TcpListener;

#[tokio::test]
async fn sigterm_drains_work_in_flight() {
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", http.local_addr().unwrap());
    let grpc_base = format!("http://{}", grpc.local_addr().unwrap());
    let listeners = api::Listeners { http, grpc: Some(grpc) };
    let server = tokio::spawn(api::run(listeners, settings(), tiny_model, api::shutdown_signal()));
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
    let mut grpc_client = SlotServeClient::connect(grpc_base.clone()).await.unwrap();
    let decomposed =
        DecomposeRequest { images: vec![png(&picture(2, 32, 32))], masks: Some(false) };
    let slots =
        grpc_client.decompose(decomposed).await.unwrap().into_inner().images[0].slots.clone();
    let render = RenderRequest {
        slots: slots.into_iter().collect(),
        sampler: Some("ddim".into()),
        steps: Some(40),
        ..RenderRequest::default()
    };
    let mut stream = grpc_client.render_stream(render).await.unwrap().into_inner();
    let first = stream.next().await.unwrap().unwrap().event.unwrap();
    assert!(matches!(first, render_event::Event::Progress(_)), "the render has started");
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
    let mut images = 0;
    while let Some(event) = stream.next().await {
        let event = event.expect("the gRPC stream in flight finishes").event.unwrap();
        images += usize::from(matches!(event, render_event::Event::Image(_)));
    }
    assert_eq!(images, 1, "the streamed render in flight delivers its image");
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("run returns")
        .unwrap()
        .expect("clean exit");
    assert!(client.get(format!("{base}/health")).send().await.is_err(), "no longer accepting");
    assert!(SlotServeClient::connect(grpc_base).await.is_err(), "gRPC no longer accepting");
}
