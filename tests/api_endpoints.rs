//! Every endpoint over real HTTP: decompose (JSON, multipart, raw body), render (JSON, raw
//! PNG, server-sent events), edit (swap between images, remove, compose), scene, health,
//! info, metrics, the playground's files, and the optional API key.

mod api_common;

use api_common::{
    decode_png, picture, png, png_base64, settings, slot_values, TestServer, NUM_SLOTS, SLOT_SIZE,
};
use futures::StreamExt;
use serde_json::{json, Value};
use slotserve::data::{Scene, SceneConfig};
use slotserve::imageio::slot_color;

/// Checks one decomposed image of the tiny model; `pngs`: whether masks were asked for.
fn check_decomposed(image: &Value, fingerprint: &Value, pngs: bool) {
    assert_eq!(image["slots"]["shape"], json!([NUM_SLOTS, SLOT_SIZE]));
    assert_eq!(image["slots"]["dtype"], "f32");
    assert_eq!(&image["slots"]["model"], fingerprint);
    assert_eq!((image["width"].as_u64(), image["height"].as_u64()), (Some(32), Some(32)));
    let objects = image["objects"].as_array().unwrap();
    assert_eq!(objects.len(), NUM_SLOTS);
    let area: f64 = objects.iter().map(|o| o["area"].as_f64().unwrap()).sum();
    assert!((area - 1.0).abs() < 1e-4, "areas sum to {area}");
    for o in objects.iter().filter(|o| !o["bbox"].is_null()) {
        let b: Vec<u64> =
            o["bbox"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert!(b[0] < b[2] && b[1] < b[3] && b[2] <= 32 && b[3] <= 32, "{b:?}");
    }
    match pngs {
        true => {
            objects.iter().for_each(|o| assert_eq!(decode_png(&o["mask"]).dimensions(), (32, 32)));
            assert_eq!(decode_png(&image["segmentation"]).dimensions(), (32, 32));
        }
        false => {
            assert!(objects.iter().all(|o| o.get("mask").is_none_or(Value::is_null)));
            assert!(image["segmentation"].is_null());
        }
    }
}

/// The same image gives the same slots in any batch (up to float rounding, 1e-4).
fn assert_close(a: &Value, b: &Value) {
    let (a, b) = (slot_values(a), slot_values(b));
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(a.len() == b.len() && diff < 1e-4, "slots differ by {diff}");
}

#[tokio::test]
async fn decompose_accepts_json_multipart_and_raw_images() {
    let server = TestServer::start(settings()).await;
    let (_, info) = server.get("/info").await;
    let fingerprint = &info["model"]["fingerprint"];
    let (a, b) = (picture(1, 40, 30), picture(2, 64, 64));

    let (status, body) = server.post("/decompose", &json!({ "image": png_base64(&a) })).await;
    assert_eq!(status, 200, "{body}");
    check_decomposed(&body["images"][0], fingerprint, true);
    let from_json = body["images"][0]["slots"].clone();

    let data_url = format!("data:image/png;base64,{}", png_base64(&b));
    let (status, body) = server
        .post("/decompose?masks=false", &json!({ "images": [png_base64(&a), data_url] }))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["images"].as_array().unwrap().len(), 2);
    body["images"].as_array().unwrap().iter().for_each(|i| check_decomposed(i, fingerprint, false));
    assert_close(&body["images"][0]["slots"], &from_json);

    let form = reqwest::multipart::Form::new()
        .part("image", reqwest::multipart::Part::bytes(png(&a)).file_name("a.png"))
        .part("image", reqwest::multipart::Part::bytes(png(&b)).file_name("b.png"));
    let r = server.client.post(server.url("/decompose")).multipart(form).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["images"].as_array().unwrap().len(), 2);
    assert_close(&body["images"][0]["slots"], &from_json);

    let r = server
        .client
        .post(server.url("/decompose"))
        .header("content-type", "image/png")
        .body(png(&a));
    let body: Value = r.send().await.unwrap().json().await.unwrap();
    assert_close(&body["images"][0]["slots"], &from_json);
}

#[tokio::test]
async fn render_answers_json_png_or_events() {
    let server = TestServer::start(settings()).await;
    let sets = server.slot_sets(&[picture(3, 32, 32)]).await;
    let request = json!({ "slots": sets[0], "seed": 11, "sampler": "ddim", "steps": 4 });

    let (status, body) = server.post("/render", &request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["seed"].as_u64(), body["sampler"].as_str(), body["steps"].as_u64()),
        (Some(11), Some("ddim"), Some(4))
    );
    assert_eq!(body["images"][0]["seed"], 11);
    assert_eq!(body["images"][0]["num_slots"], NUM_SLOTS);
    let from_json = decode_png(&body["images"][0]["png"]);
    assert_eq!(from_json.dimensions(), (32, 32));

    let r = server
        .client
        .post(server.url("/render"))
        .header("accept", "image/png")
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(r.headers()["x-seed"], "11");
    let raw = image::load_from_memory(&r.bytes().await.unwrap()).unwrap().to_rgb8();
    assert_eq!(raw, from_json, "same request and seed, same image");

    let r = server
        .client
        .post(server.url("/render"))
        .header("accept", "text/event-stream")
        .json(&request)
        .send()
        .await
        .unwrap();
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut text = String::new();
    let mut stream = r.bytes_stream();
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let events: Vec<(&str, Value)> = text
        .split("\n\n")
        .filter_map(|block| {
            let name = block.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((name, serde_json::from_str(data).unwrap()))
        })
        .collect();
    let steps: Vec<u64> = events
        .iter()
        .filter(|(n, _)| *n == "progress")
        .map(|(_, d)| d["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4], "{text}");
    assert!(events.iter().filter(|(n, _)| *n == "progress").all(|(_, d)| d["of"] == 4));
    let (last, data) = events.last().unwrap();
    assert_eq!(*last, "image");
    assert_eq!(decode_png(&data["png"]), from_json);
}

#[tokio::test]
async fn render_selects_slots_and_reports_random_seeds() {
    let server = TestServer::start(settings()).await;
    let sets = server.slot_sets(&[picture(4, 32, 32), picture(5, 32, 32)]).await;
    let (status, body) = server
        .post("/render", &json!({ "slots": sets, "drop": [1, 3], "sampler": "ddim", "steps": 2 }))
        .await;
    assert_eq!(status, 200, "{body}");
    let seed = body["seed"].as_u64().unwrap();
    let images = body["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(
        (images[0]["seed"].as_u64(), images[1]["seed"].as_u64()),
        (Some(seed), Some(seed.wrapping_add(1)))
    );
    assert!(images.iter().all(|i| i["num_slots"] == 2));
    let (status, body) = server
        .post("/render", &json!({ "slots": sets[0], "keep": [2], "steps": 2, "sampler": "ddim" }))
        .await;
    assert_eq!((status, body["images"][0]["num_slots"].as_u64()), (200, Some(1)));
}

#[tokio::test]
async fn edit_swaps_between_images_and_removes() {
    let server = TestServer::start(settings()).await;
    let images = [png_base64(&picture(6, 32, 32)), png_base64(&picture(7, 48, 48))];
    let request = json!({
        "images": images,
        "operations": [{"op": "swap", "a": {"image": 0, "slot": 2}, "b": {"image": 1, "slot": 1}},
                       {"op": "remove", "image": 0, "slot": 3}],
        "seed": 7, "sampler": "ddim", "steps": 2,
    });
    let (status, body) = server.post("/edit", &request).await;
    assert_eq!(status, 200, "{body}");
    let outputs = body["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 2, "both images were touched");
    assert_eq!(outputs[0]["origin"], json!({"image": 0}));
    let sources: Vec<(u64, u64)> = outputs[0]["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["image"].as_u64().unwrap(), r["slot"].as_u64().unwrap()))
        .collect();
    assert_eq!(sources, vec![(0, 0), (0, 1), (1, 1)]);
    assert_eq!(outputs[1]["sources"][1], json!({"image": 0, "slot": 2}));
    assert_eq!(outputs[0]["slots"]["shape"], json!([3, SLOT_SIZE]));
    assert_eq!(
        (outputs[0]["image"]["seed"].as_u64(), outputs[1]["image"]["seed"].as_u64()),
        (Some(7), Some(8))
    );
    assert_eq!(decode_png(&outputs[1]["image"]["png"]).dimensions(), (32, 32));

    // The same edit on the decomposed slot sets renders the same images.
    let sets = server.slot_sets(&[picture(6, 32, 32), picture(7, 48, 48)]).await;
    let mut by_slots = request.clone();
    by_slots.as_object_mut().unwrap().remove("images");
    by_slots["slots"] = json!(sets);
    let (status, again) = server.post("/edit", &by_slots).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["outputs"][0]["image"]["png"], outputs[0]["image"]["png"]);

    let compose = json!({ "slots": sets, "operations": [{"op": "compose", "slots": [{"image": 1, "slot": 0}, {"image": 0, "slot": 0}]}], "steps": 2, "sampler": "ddim" });
    let (status, body) = server.post("/edit", &compose).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outputs"][0]["origin"], json!({"compose": 0}));
    assert_eq!(body["outputs"][0]["slots"]["shape"], json!([2, SLOT_SIZE]));
}

#[tokio::test]
async fn scene_answers_the_procedural_scene_of_a_seed() {
    let server = TestServer::start(settings()).await;
    let get = |query: &str| server.client.get(server.url(&format!("/scene{query}"))).send();
    let r = get("?seed=3").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(r.headers()["x-seed"], "3");
    let image = image::load_from_memory(&r.bytes().await.unwrap()).unwrap().to_rgb8();
    assert_eq!(image, Scene::generate(&SceneConfig::default(), 3).render().to_rgb_image());

    // Without a seed, a random one, echoed so the scene can be had again.
    let r = get("").await.unwrap();
    assert_eq!(r.status(), 200);
    let seed = r.headers()["x-seed"].to_str().unwrap().to_string();
    let random = r.bytes().await.unwrap();
    let again = get(&format!("?seed={seed}")).await.unwrap().bytes().await.unwrap();
    assert_eq!(again, random);

    let r = get("?seed=three").await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error_type"], "invalid_request");
}

#[tokio::test]
async fn playground_files_are_served_with_types_and_validators() {
    let server = TestServer::start(settings()).await;
    let get = |path: &str| server.client.get(server.url(path)).send();
    let page = get("/").await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert_eq!(page.headers()["cache-control"], "no-cache");
    let policy = page.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(policy.starts_with("default-src 'self';"), "{policy}");
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"<script type="module" src="/playground/app.js">"#), "{html}");

    for (path, content_type) in [
        ("/playground/app.js", "text/javascript; charset=utf-8"),
        ("/playground/style.css", "text/css; charset=utf-8"),
    ] {
        let r = get(path).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["content-type"], content_type);
        // Unchanged files are revalidated, not sent again.
        let etag = r.headers()["etag"].clone();
        let again =
            server.client.get(server.url(path)).header("if-none-match", etag).send().await.unwrap();
        assert_eq!(again.status(), 304, "{path}");
    }

    let palette = get("/playground/palette.js").await.unwrap().text().await.unwrap();
    let [r, g, b] = slot_color(1);
    assert!(palette.contains(&format!("], [{r}, {g}, {b}], ")), "{palette}");

    let missing = get("/playground/nothing.js").await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.json::<Value>().await.unwrap()["error_type"], "not_found");
}

#[tokio::test]
async fn health_info_and_metrics() {
    let server = TestServer::start(settings()).await;
    let (status, health) = server.get("/health").await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ready")));
    let (status, info) = server.get("/info").await;
    assert_eq!(status, 200);
    let model = &info["model"];
    assert_eq!(
        (model["name"].as_str(), model["preset"].as_str()),
        (Some("tiny-test"), Some("clevrtex"))
    );
    assert_eq!(
        (model["num_slots"].as_u64(), model["slot_size"].as_u64()),
        (Some(NUM_SLOTS as u64), Some(SLOT_SIZE as u64))
    );
    assert_eq!(
        (model["resolution"].as_u64(), model["device"].as_str(), model["dtype"].as_str()),
        (Some(32), Some("cpu"), Some("f32"))
    );
    assert_eq!(model["default_sampler"], "dpm-solver++");
    assert_eq!(info["samplers"], json!(["dpm-solver++", "ddim", "ddpm"]));
    assert_eq!(info["limits"]["max_steps"], 50);
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));

    let sets = server.slot_sets(&[picture(8, 32, 32)]).await;
    server.post("/render", &json!({ "slots": sets[0], "sampler": "ddim", "steps": 2 })).await;
    let text = server.metrics().await;
    for name in [
        "slotserve_requests_total{endpoint=\"/decompose\",status=\"200\"} 1",
        "slotserve_requests_total{endpoint=\"/render\",status=\"200\"} 1",
        "slotserve_request_duration_seconds_bucket{endpoint=\"/render\",status=\"200\"",
        "slotserve_queue_depth 0",
        "slotserve_batch_size_bucket{stage=\"denoise\"",
        "slotserve_denoise_steps_total 2",
        "slotserve_denoise_steps_per_second",
        "slotserve_images_rendered_total 1",
        "slotserve_images_decomposed_total 1",
    ] {
        assert!(text.contains(name), "missing `{name}` in\n{text}");
    }
}

#[tokio::test]
async fn health_is_503_until_the_model_is_loaded_and_warmed_up() {
    let mut s = settings();
    s.warmup = true;
    let slow = || {
        std::thread::sleep(std::time::Duration::from_millis(600));
        api_common::tiny_model()
    };
    let server = TestServer::spawn(s, slow).await;
    let (status, body) = server.get("/health").await;
    assert_eq!((status, body["error_type"].as_str()), (503, Some("unavailable")), "{body}");
    let (status, body) =
        server.post("/decompose", &json!({ "image": png_base64(&picture(1, 32, 32)) })).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("the model is loading")));
    server.wait_ready().await;
    assert_eq!(server.get("/info").await.0, 200);
    server.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_model_that_fails_to_load_stops_the_server_with_the_reason() {
    let server = TestServer::spawn(settings(), || anyhow::bail!("no weights in /nowhere")).await;
    let err = server.stop_when_done().await.unwrap_err().to_string();
    assert!(err.contains("no weights in /nowhere"), "{err}");
}

#[tokio::test]
async fn api_key_guards_all_but_health_metrics_and_the_playground_files() {
    let mut s = settings();
    s.api_key = Some("sesame".into());
    let server = TestServer::start(s).await;
    let client = &server.client;
    let r = client.get(server.url("/info")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error_type"], "unauthorized");
    let wrong = client
        .post(server.url("/render"))
        .bearer_auth("open")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(
        client.get(server.url("/info")).bearer_auth("sesame").send().await.unwrap().status(),
        200
    );
    assert_eq!(
        client
            .get(server.url("/info"))
            .header("x-api-key", "sesame")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(client.get(server.url("/scene")).send().await.unwrap().status(), 401);
    for open in ["/health", "/metrics", "/", "/playground/app.js"] {
        assert_eq!(client.get(server.url(open)).send().await.unwrap().status(), 200, "{open}");
    }
}
