//! Bad input of every kind gets a 4xx JSON `{"error", "error_type"}` naming the problem, and
//! the server keeps serving.

mod api_common;

use api_common::{picture, png, png_base64, settings, TestServer, SLOT_SIZE};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{json, Value};

/// What a request should be answered with.
struct Case {
    name: &'static str,
    request: reqwest::RequestBuilder,
    status: u16,
    error_type: &'static str,
    mentions: &'static str,
}

/// CRC-32 (IEEE) of PNG chunk type and data.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A small PNG whose header claims `w`×`h` pixels (a decompression bomb when huge).
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut bytes = png(&picture(1, 8, 8));
    // Signature (8), IHDR length (4), "IHDR" (4), then width and height.
    bytes[16..20].copy_from_slice(&w.to_be_bytes());
    bytes[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

/// A slot set JSON with the given shape and values.
fn slot_set(shape: [usize; 2], values: &[f32], model: &str) -> Value {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    json!({"shape": shape, "dtype": "f32", "data": STANDARD.encode(bytes), "model": model})
}

#[tokio::test]
async fn bad_requests_get_clear_json_errors() {
    let server = TestServer::start(settings()).await;
    let (_, info) = server.get("/info").await;
    let fp = info["model"]["fingerprint"].as_str().unwrap().to_string();
    let good = server.slot_sets(&[picture(2, 32, 32)]).await.remove(0);
    let ones = vec![0.5f32; 2 * SLOT_SIZE];
    let with_nan: Vec<f32> =
        ones.iter().enumerate().map(|(i, &v)| if i == 5 { f32::NAN } else { v }).collect();
    let c = &server.client;
    let post = |path: &str| c.post(server.url(path));
    let render = |body: Value| post("/render").json(&body);
    let decompose = |body: Value| post("/decompose").json(&body);
    let image = png_base64(&picture(3, 32, 32));
    let mut truncated = png(&picture(4, 32, 32));
    truncated.truncate(60);
    let with = |patch: Value| {
        let mut body = json!({"slots": good, "sampler": "ddim", "steps": 2});
        body.as_object_mut().unwrap().extend(patch.as_object().unwrap().clone());
        render(body)
    };
    let cases = vec![
        Case { name: "malformed JSON", request: post("/render").header("content-type", "application/json").body("{\"slots\": "), status: 400, error_type: "invalid_request", mentions: "" },
        Case { name: "missing field", request: render(json!({"seed": 1})), status: 422, error_type: "invalid_request", mentions: "slots" },
        Case { name: "unknown field", request: with(json!({"dorp": [1]})), status: 422, error_type: "invalid_request", mentions: "dorp" },
        Case { name: "wrong content type", request: post("/render").header("content-type", "text/plain").body("hi"), status: 415, error_type: "unsupported_media_type", mentions: "" },
        Case { name: "decompose content type", request: post("/decompose").header("content-type", "text/csv").body("a,b"), status: 415, error_type: "unsupported_media_type", mentions: "text/csv" },
        Case { name: "body over the limit", request: decompose(json!({"image": "A".repeat(2 << 20)})), status: 413, error_type: "payload_too_large", mentions: "" },
        Case { name: "multipart over the limit", request: post("/decompose").multipart(reqwest::multipart::Form::new().part("image", reqwest::multipart::Part::bytes(vec![7u8; 2 << 20]).file_name("big.png"))), status: 413, error_type: "payload_too_large", mentions: "" },
        Case { name: "invalid base64", request: decompose(json!({"image": "not base64!"})), status: 400, error_type: "invalid_base64", mentions: "image 0" },
        Case { name: "not an image", request: decompose(json!({"image": STANDARD.encode(b"GIF89a-definitely-not-a-png")})), status: 415, error_type: "unsupported_media_type", mentions: "PNG and JPEG" },
        Case { name: "text file", request: post("/decompose").multipart(reqwest::multipart::Form::new().part("image", reqwest::multipart::Part::text("hello"))), status: 415, error_type: "unsupported_media_type", mentions: "image 0" },
        Case { name: "truncated PNG", request: decompose(json!({"images": [image, STANDARD.encode(&truncated)]})), status: 400, error_type: "invalid_image", mentions: "image 1" },
        Case { name: "decompression bomb", request: post("/decompose").header("content-type", "image/png").body(png_claiming(60_000, 60_000)), status: 413, error_type: "image_too_large", mentions: "60000x60000" },
        Case { name: "zero-sized image", request: post("/decompose").header("content-type", "image/png").body(png_claiming(0, 8)), status: 400, error_type: "invalid_image", mentions: "" },
        Case { name: "huge image", request: decompose(json!({"image": png_base64(&picture(5, 600, 600))})), status: 413, error_type: "image_too_large", mentions: "600x600" },
        Case { name: "empty image", request: post("/decompose").header("content-type", "image/png").body(Vec::new()), status: 400, error_type: "invalid_image", mentions: "empty" },
        Case { name: "no image", request: decompose(json!({})), status: 400, error_type: "invalid_request", mentions: "no image" },
        Case { name: "too many images", request: decompose(json!({"images": vec![image.clone(); 5]})), status: 422, error_type: "too_many_images", mentions: "at most 4" },
        Case { name: "unknown form field", request: post("/decompose").multipart(reqwest::multipart::Form::new().text("picture", "x")), status: 400, error_type: "invalid_request", mentions: "picture" },
        Case { name: "NaN slot", request: with(json!({"slots": slot_set([2, SLOT_SIZE], &with_nan, &fp)})), status: 422, error_type: "invalid_slots", mentions: "non-finite" },
        Case { name: "wrong-length slot data", request: with(json!({"slots": slot_set([3, SLOT_SIZE], &ones, &fp)})), status: 422, error_type: "invalid_slots", mentions: "bytes" },
        Case { name: "bad slot base64", request: with(json!({"slots": {"shape": [1, SLOT_SIZE], "dtype": "f32", "data": "@@@", "model": fp}})), status: 400, error_type: "invalid_base64", mentions: "slot set 0" },
        Case { name: "zero slots", request: with(json!({"slots": slot_set([0, SLOT_SIZE], &[], &fp)})), status: 422, error_type: "invalid_slots", mentions: "1 to 64 slots" },
        Case { name: "too many slots", request: with(json!({"slots": slot_set([65, SLOT_SIZE], &vec![0.0; 65 * SLOT_SIZE], &fp)})), status: 422, error_type: "invalid_slots", mentions: "got 65" },
        Case { name: "wrong dtype", request: with(json!({"slots": {"shape": [2, SLOT_SIZE], "dtype": "f16", "data": "", "model": fp}})), status: 422, error_type: "invalid_slots", mentions: "f16" },
        Case { name: "other model", request: with(json!({"slots": slot_set([2, SLOT_SIZE], &ones, "0123abcd")})), status: 422, error_type: "model_mismatch", mentions: "0123abcd" },
        Case { name: "other slot width", request: with(json!({"slots": slot_set([2, 16], &ones, &fp)})), status: 422, error_type: "model_mismatch", mentions: "D = 16" },
        Case { name: "unknown slot index", request: with(json!({"drop": [9]})), status: 422, error_type: "invalid_edit", mentions: "slot 9" },
        Case { name: "keep and drop", request: with(json!({"drop": [1], "keep": [0]})), status: 422, error_type: "invalid_edit", mentions: "not both" },
        Case { name: "too many slot sets", request: with(json!({"slots": vec![good.clone(); 5]})), status: 422, error_type: "too_many_images", mentions: "slot sets" },
        Case { name: "zero steps", request: with(json!({"steps": 0})), status: 422, error_type: "invalid_parameters", mentions: "1 to 50" },
        Case { name: "too many steps", request: with(json!({"steps": 51})), status: 422, error_type: "invalid_parameters", mentions: "1 to 50" },
        Case { name: "ddpm over the limit", request: with(json!({"sampler": "ddpm", "steps": null})), status: 422, error_type: "invalid_parameters", mentions: "1000 steps" },
        Case { name: "ddpm with fewer steps", request: with(json!({"sampler": "ddpm", "steps": 10})), status: 422, error_type: "invalid_parameters", mentions: "all 1000" },
        Case { name: "ddim grid past the schedule", request: with(json!({"steps": 3})), status: 422, error_type: "invalid_parameters", mentions: "DDIM" },
        Case { name: "unknown sampler", request: with(json!({"sampler": "euler"})), status: 422, error_type: "invalid_parameters", mentions: "euler" },
        Case { name: "negative seed", request: with(json!({"seed": -1})), status: 422, error_type: "invalid_request", mentions: "seed" },
        Case { name: "edit without operations", request: post("/edit").json(&json!({"slots": [good], "operations": []})), status: 422, error_type: "invalid_edit", mentions: "no operations" },
        Case { name: "edit of a missing image", request: post("/edit").json(&json!({"slots": [good], "operations": [{"op": "remove", "image": 3, "slot": 0}]})), status: 422, error_type: "invalid_edit", mentions: "image 3 does not exist" },
        Case { name: "edit of a missing slot", request: post("/edit").json(&json!({"images": [image], "operations": [{"op": "swap", "a": {"image": 0, "slot": 0}, "b": {"image": 0, "slot": 7}}]})), status: 422, error_type: "invalid_edit", mentions: "slot 7 of image 0" },
        Case { name: "unknown operation", request: post("/edit").json(&json!({"slots": [good], "operations": [{"op": "paint"}]})), status: 422, error_type: "invalid_request", mentions: "paint" },
        Case { name: "edit with both inputs", request: post("/edit").json(&json!({"slots": [good], "images": [image], "operations": [{"op": "remove", "image": 0, "slot": 0}]})), status: 400, error_type: "invalid_request", mentions: "either" },
        Case { name: "bad query", request: post("/decompose?masks=maybe").json(&json!({"image": image})), status: 400, error_type: "invalid_request", mentions: "" },
        Case { name: "unknown path", request: c.get(server.url("/nowhere")), status: 404, error_type: "not_found", mentions: "/nowhere" },
        Case { name: "wrong method", request: c.get(server.url("/render")), status: 405, error_type: "method_not_allowed", mentions: "GET" },
    ];
    for case in cases {
        let response = case.request.send().await.unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{}: not JSON: {text}", case.name));
        let message =
            body["error"].as_str().unwrap_or_else(|| panic!("{}: no error in {body}", case.name));
        assert_eq!(
            (status, body["error_type"].as_str().unwrap()),
            (case.status, case.error_type),
            "{}: {message}",
            case.name
        );
        assert!(
            message.contains(case.mentions),
            "{}: `{message}` does not mention `{}`",
            case.name,
            case.mentions
        );
        assert!(
            !message.contains("backtrace") && !message.contains("   0: "),
            "{}: {message}",
            case.name
        );
    }
    assert_eq!(server.get("/health").await.0, 200, "the server still serves");
    let (status, _) =
        server.post("/render", &json!({"slots": good, "sampler": "ddim", "steps": 2})).await;
    assert_eq!(status, 200);
    assert_eq!(
        server.metric("slotserve_model_errors_total").await,
        0.0,
        "no client error reached the model"
    );
}
