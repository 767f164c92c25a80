//! Continuous batching seen from clients: concurrent renders share batches and give the same
//! images as alone; overload is refused with 429 and nothing is lost or duplicated; the jobs
//! of clients that went away or ran out of time are dropped.

mod api_common;

use std::time::Duration;

use api_common::{decode_png, max_pixel_diff, picture, settings, TestServer};
use futures::StreamExt;
use serde_json::{json, Value};

/// Renders `body` and returns the first image.
async fn render_one(server: &TestServer, body: Value) -> image::RgbImage {
    let (status, reply) = server.post("/render", &body).await;
    assert_eq!(status, 200, "{reply}");
    decode_png(&reply["images"][0]["png"])
}

/// Count of denoising batches and of those with a single job.
async fn denoise_batches(server: &TestServer) -> (f64, f64) {
    let text = server.metrics().await;
    let count = api_common::metric_value(&text, "slotserve_batch_size_count{stage=\"denoise\"}");
    let singles =
        api_common::metric_value(&text, "slotserve_batch_size_bucket{stage=\"denoise\",le=\"1\"}");
    (count, singles)
}

/// Polls until the metric reaches `want`; returns its last value.
async fn wait_for_metric(server: &TestServer, name: &str, want: f64) -> f64 {
    let mut value = 0.0;
    for _ in 0..100 {
        value = server.metric(name).await;
        if value >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    value
}

#[tokio::test]
async fn concurrent_renders_share_batches_and_match_solo_renders() {
    let server = TestServer::start(settings()).await;
    let sets =
        server.slot_sets(&[picture(1, 32, 32), picture(2, 32, 32), picture(3, 40, 40)]).await;
    // Different slot counts share a batch: the second set renders without two slots.
    let requests: Vec<Value> = (0..3)
        .map(|i| {
            let mut r =
                json!({ "slots": sets[i], "seed": 100 + i, "sampler": "ddim", "steps": 10 });
            if i == 1 {
                r["drop"] = json!([0, 3]);
            }
            r
        })
        .collect();
    let mut solo = Vec::new();
    for r in &requests {
        solo.push(render_one(&server, r.clone()).await);
    }
    assert_eq!(denoise_batches(&server).await, (30.0, 30.0), "alone, every batch has one job");
    assert!(
        max_pixel_diff(&solo[0], &solo[2]) > 8,
        "different slots and seeds give different images"
    );

    let together =
        futures::future::join_all(requests.iter().map(|r| render_one(&server, r.clone()))).await;
    let (count, singles) = denoise_batches(&server).await;
    assert!(
        count - singles > 0.0,
        "concurrent requests were batched: {count} batches, {singles} single"
    );
    for (i, (a, b)) in solo.iter().zip(&together).enumerate() {
        let diff = max_pixel_diff(a, b);
        println!("image {i}: max pixel difference alone vs batched = {diff}/255");
        assert!(diff <= 1, "image {i} differs by {diff}/255 when batched");
    }

    // One request with a list batches its images and seeds them seed, seed + 1, ...
    let (status, reply) = server
        .post(
            "/render",
            &json!({ "slots": [sets[0], sets[2]], "seed": 100, "sampler": "ddim", "steps": 10 }),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    assert!(max_pixel_diff(&decode_png(&reply["images"][0]["png"]), &solo[0]) <= 1);
    let third = render_one(
        &server,
        json!({ "slots": sets[2], "seed": 101, "sampler": "ddim", "steps": 10 }),
    )
    .await;
    assert!(max_pixel_diff(&decode_png(&reply["images"][1]["png"]), &third) <= 1);
}

#[tokio::test]
async fn overload_is_refused_and_nothing_is_lost_or_duplicated() {
    let mut s = settings();
    (s.limits.max_batch_size, s.limits.max_queue) = (1, 1);
    let server = TestServer::start(s).await;
    let set = server.slot_sets(&[picture(4, 32, 32)]).await.remove(0);
    let send = |seed: u64| {
        let request = server.client.post(server.url("/render"));
        let body = json!({ "slots": set, "seed": seed, "sampler": "ddim", "steps": 10 });
        async move {
            let r = request.json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
            (seed, status, retry, r.json::<Value>().await.unwrap())
        }
    };
    let replies = futures::future::join_all((0..8).map(send)).await;
    let mut served = 0;
    for (seed, status, retry, body) in &replies {
        match status {
            200 => {
                assert_eq!(body["images"][0]["seed"], *seed, "each answer belongs to its request");
                served += 1;
            }
            429 => {
                assert_eq!(body["error_type"], "overloaded");
                assert_eq!(retry.as_deref(), Some("1"));
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert!((1..8).contains(&served), "{served} of 8 served");
    assert_eq!(
        server.metric("slotserve_images_rendered_total").await,
        served as f64,
        "one image per answer"
    );
    assert_eq!(
        server.metric("slotserve_requests_total{endpoint=\"/render\",status=\"429\"}").await,
        (8 - served) as f64
    );
    assert_eq!(server.metric("slotserve_queue_depth").await, 0.0);
}

#[tokio::test]
async fn requests_beyond_max_concurrent_are_refused() {
    let mut s = settings();
    (s.limits.max_concurrent, s.limits.max_steps) = (1, 200);
    let server = TestServer::start(s).await;
    let set = server.slot_sets(&[picture(5, 32, 32)]).await.remove(0);
    // long enough (a second or so) to be still in flight when the second request arrives
    let long = json!({ "slots": set, "sampler": "ddim", "steps": 200 });
    let short = json!({ "slots": set, "sampler": "ddim", "steps": 2 });
    let (first, second) = tokio::join!(server.post("/render", &long), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        server.post("/render", &short).await
    });
    assert_eq!(first.0, 200);
    assert_eq!((second.0, second.1["error_type"].as_str()), (429, Some("overloaded")));
    assert!(second.1["error"].as_str().unwrap().contains("in flight"));
}

#[tokio::test]
async fn jobs_of_disconnected_clients_are_dropped() {
    let server = TestServer::start(settings()).await;
    let set = server.slot_sets(&[picture(6, 32, 32)]).await.remove(0);
    let body = json!({ "slots": set, "sampler": "ddim", "steps": 50 });

    // An event-stream client leaves after the first progress event.
    let r = server
        .client
        .post(server.url("/render"))
        .header("accept", "text/event-stream")
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(std::str::from_utf8(&first).unwrap().contains("event: progress"));
    drop(stream);
    assert_eq!(wait_for_metric(&server, "slotserve_jobs_cancelled_total", 1.0).await, 1.0);

    // A JSON client gives up before the image is ready.
    let gone = server
        .client
        .post(server.url("/render"))
        .timeout(Duration::from_millis(300))
        .json(&body)
        .send()
        .await;
    assert!(gone.unwrap_err().is_timeout());
    assert_eq!(wait_for_metric(&server, "slotserve_jobs_cancelled_total", 2.0).await, 2.0);
    let steps = server.metric("slotserve_denoise_steps_total").await;
    assert!(steps < 100.0, "the cancelled jobs stopped early ({steps} steps run)");
    assert_eq!(server.metric("slotserve_images_rendered_total").await, 0.0);
}

#[tokio::test]
async fn requests_past_the_time_limit_get_504_and_are_dropped() {
    let mut s = settings();
    (s.limits.request_timeout_secs, s.limits.max_steps) = (1, 1000);
    let server = TestServer::start(s).await;
    let set = server.slot_sets(&[picture(7, 32, 32)]).await.remove(0);
    let (status, body) = server.post("/render", &json!({ "slots": set, "sampler": "ddpm" })).await;
    assert_eq!((status, body["error_type"].as_str()), (504, Some("timeout")), "{body}");
    assert_eq!(wait_for_metric(&server, "slotserve_jobs_cancelled_total", 1.0).await, 1.0);
}
