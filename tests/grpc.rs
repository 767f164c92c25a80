//! The gRPC API with a real tonic client over loopback, against a server that also serves
//! HTTP from the same engine: every call, the streaming render, an edit swapping slots
//! between two images, the health service through loading, readiness and draining, bad input
//! and the API key.

mod api_common;

use std::time::Duration;

use api_common::{max_pixel_diff, picture, png, png_base64, settings, slot_values, TestServer};
use api_common::{NUM_SLOTS, SLOT_SIZE};
use futures::StreamExt;
use image::RgbImage;
use serde_json::json;
use slotserve::grpc::proto::edit_operation::Op;
use slotserve::grpc::proto::slot_serve_client::SlotServeClient;
use slotserve::grpc::proto::{
    self, render_event, DecomposeRequest, EditOperation, EditRequest, InfoRequest, RenderRequest,
};
use tonic::transport::Channel;
use tonic::{Code, Request};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A client of the server's gRPC API.
async fn client(server: &TestServer) -> SlotServeClient<Channel> {
    let address = server.grpc.clone().expect("the server has gRPC");
    SlotServeClient::connect(address).await.expect("connect over loopback")
}

/// The slot sets of `images`, decomposed over gRPC without masks.
async fn slot_sets(
    client: &mut SlotServeClient<Channel>,
    images: &[RgbImage],
) -> Vec<proto::SlotSet> {
    let request = DecomposeRequest { images: images.iter().map(png).collect(), masks: Some(false) };
    let reply = client.decompose(request).await.expect("decompose").into_inner();
    reply.images.into_iter().map(|i| i.slots.expect("slots")).collect()
}

/// The values of a gRPC slot set.
fn values(set: &proto::SlotSet) -> Vec<f32> {
    set.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn decode_png(bytes: &[u8]) -> RgbImage {
    image::load_from_memory(bytes).expect("a PNG").to_rgb8()
}

fn largest_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A render of the first `keep` slots of `set` with DDIM.
fn render_request(set: &proto::SlotSet, keep: &[u32], steps: u32) -> RenderRequest {
    RenderRequest {
        slots: vec![set.clone()],
        keep: keep.to_vec(),
        seed: Some(7),
        sampler: Some("ddim".into()),
        steps: Some(steps),
        ..RenderRequest::default()
    }
}

#[tokio::test]
async fn info_decompose_and_render_match_the_http_api() {
    let server = TestServer::start_with_grpc(settings()).await;
    let mut grpc = client(&server).await;

    let info = grpc.info(InfoRequest {}).await.unwrap().into_inner();
    let (_, http_info) = server.get("/info").await;
    let model = info.model.expect("model");
    assert_eq!(model.fingerprint, http_info["model"]["fingerprint"].as_str().unwrap());
    assert_eq!((model.num_slots, model.slot_size), (NUM_SLOTS as u32, SLOT_SIZE as u32));
    assert_eq!((model.preprocess.as_str(), model.crop), ("resize", 0));
    assert!(info.samplers.iter().any(|s| s == "ddim"), "{:?}", info.samplers);
    assert_eq!(info.limits.expect("limits").max_images, 4);
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));

    let (a, b) = (picture(1, 40, 30), picture(2, 64, 64));
    let request = DecomposeRequest { images: vec![png(&a), png(&b)], masks: None };
    let decomposed = grpc.decompose(request).await.unwrap().into_inner().images;
    assert_eq!(decomposed.len(), 2);
    for image in &decomposed {
        let slots = image.slots.as_ref().unwrap();
        assert_eq!(slots.shape, vec![NUM_SLOTS as u32, SLOT_SIZE as u32]);
        assert_eq!(
            (slots.data.len(), slots.model.as_str()),
            (NUM_SLOTS * SLOT_SIZE * 4, model.fingerprint.as_str())
        );
        assert_eq!((image.width, image.height, image.objects.len()), (32, 32, NUM_SLOTS));
        let area: f32 = image.objects.iter().map(|o| o.area).sum();
        assert!((area - 1.0).abs() < 1e-4, "areas sum to {area}");
        image.objects.iter().for_each(|o| assert_eq!(decode_png(&o.mask).dimensions(), (32, 32)));
        assert_eq!(decode_png(&image.segmentation).dimensions(), (32, 32));
    }
    let http_slots = server.slot_sets(&[a]).await.remove(0);
    let from_grpc = values(decomposed[0].slots.as_ref().unwrap());
    let diff = largest_difference(&from_grpc, &slot_values(&http_slots));
    assert!(diff < 1e-4, "the same image decomposes {diff} apart over gRPC and HTTP");
    let without_masks = slot_sets(&mut grpc, &[picture(1, 40, 30)]).await;
    assert!(largest_difference(&values(&without_masks[0]), &from_grpc) < 1e-4);

    let set = decomposed[0].slots.clone().unwrap();
    let rendered = grpc.render(render_request(&set, &[0, 1], 4)).await.unwrap().into_inner();
    assert_eq!((rendered.seed, rendered.sampler.as_str(), rendered.steps), (7, "ddim", 4));
    assert_eq!(rendered.images.len(), 1);
    let image = &rendered.images[0];
    assert_eq!((image.seed, image.num_slots), (7, 2));
    let over_http =
        json!({"slots": http_slots, "keep": [0, 1], "seed": 7, "sampler": "ddim", "steps": 4});
    let (status, body) = server.post("/render", &over_http).await;
    assert_eq!(status, 200, "{body}");
    let http_image = api_common::decode_png(&body["images"][0]["png"]);
    assert!(
        max_pixel_diff(&decode_png(&image.png), &http_image) <= 1,
        "gRPC and HTTP renders differ"
    );
    server.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn render_stream_reports_rising_progress_then_the_image() {
    let server = TestServer::start_with_grpc(settings()).await;
    let mut grpc = client(&server).await;
    let set = slot_sets(&mut grpc, &[picture(3, 32, 32)]).await.remove(0);
    let mut events = grpc.render_stream(render_request(&set, &[], 5)).await.unwrap().into_inner();
    let (mut steps, mut images) = (Vec::new(), Vec::new());
    while let Some(event) = events.next().await {
        match event.expect("no error in the stream").event.expect("an event") {
            render_event::Event::Progress(p) => {
                assert!(images.is_empty(), "progress after the image");
                assert_eq!((p.index, p.of), (0, 5));
                steps.push(p.step);
            }
            render_event::Event::Image(i) => images.push(i),
        }
    }
    assert_eq!(steps, vec![1, 2, 3, 4, 5]);
    assert_eq!(images.len(), 1);
    let image = images[0].image.as_ref().unwrap();
    assert_eq!((images[0].index, image.seed, image.num_slots), (0, 7, NUM_SLOTS as u32));
    let unstreamed = grpc.render(render_request(&set, &[], 5)).await.unwrap().into_inner();
    assert_eq!(decode_png(&image.png), decode_png(&unstreamed.images[0].png));
    server.stop().await.expect("clean shutdown");
}

fn slot_ref(image: u32, slot: u32) -> Option<proto::SlotRef> {
    Some(proto::SlotRef { image, slot })
}

#[tokio::test]
async fn edit_swaps_slots_between_two_images() {
    let server = TestServer::start_with_grpc(settings()).await;
    let mut grpc = client(&server).await;
    let (a, b) = (picture(4, 32, 32), picture(5, 48, 40));
    let inputs = slot_sets(&mut grpc, &[a.clone(), b.clone()]).await;
    let swap =
        EditOperation { op: Some(Op::Swap(proto::Swap { a: slot_ref(0, 1), b: slot_ref(1, 2) })) };
    let request = EditRequest {
        images: vec![png(&a), png(&b)],
        operations: vec![swap],
        seed: Some(3),
        sampler: Some("ddim".into()),
        steps: Some(2),
        ..EditRequest::default()
    };
    let edited = grpc.edit(request).await.unwrap().into_inner();
    assert_eq!(
        (edited.seed, edited.sampler.as_str(), edited.steps, edited.outputs.len()),
        (3, "ddim", 2, 2)
    );
    let d = SLOT_SIZE;
    let (in_a, in_b) = (values(&inputs[0]), values(&inputs[1]));
    for (n, out) in edited.outputs.iter().enumerate() {
        let origin = out.origin.as_ref().unwrap().kind.unwrap();
        assert_eq!(origin, proto::origin::Kind::Image(n as u32));
        let image = out.image.as_ref().unwrap();
        assert_eq!((image.seed, image.num_slots), (3 + n as u64, NUM_SLOTS as u32));
        assert_eq!(decode_png(&image.png).dimensions(), (32, 32));
    }
    let sources: Vec<(u32, u32)> =
        edited.outputs[0].sources.iter().map(|r| (r.image, r.slot)).collect();
    assert_eq!(sources, vec![(0, 0), (1, 2), (0, 2), (0, 3)]);
    let out_a = values(edited.outputs[0].slots.as_ref().unwrap());
    let out_b = values(edited.outputs[1].slots.as_ref().unwrap());
    assert!(
        largest_difference(&out_a[d..2 * d], &in_b[2 * d..3 * d]) < 1e-4,
        "slot 2 of b moved into a"
    );
    assert!(
        largest_difference(&out_b[2 * d..3 * d], &in_a[d..2 * d]) < 1e-4,
        "slot 1 of a moved into b"
    );
    assert!(largest_difference(&out_a[..d], &in_a[..d]) < 1e-4, "other slots stay");

    let from_slots = EditRequest { slots: inputs, ..edited_request_from(&edited) };
    let again = grpc.edit(from_slots).await.unwrap().into_inner();
    let same = |n: usize| decode_png(&again.outputs[n].image.as_ref().unwrap().png);
    assert!(
        max_pixel_diff(&same(0), &decode_png(&edited.outputs[0].image.as_ref().unwrap().png)) <= 1
    );
    assert_eq!(again.outputs[1].sources, edited.outputs[1].sources);
    server.stop().await.expect("clean shutdown");
}

/// The swap of `edit_swaps_slots_between_two_images` with the sampling its answer echoes,
/// without inputs.
fn edited_request_from(edited: &proto::EditResponse) -> EditRequest {
    let swap =
        EditOperation { op: Some(Op::Swap(proto::Swap { a: slot_ref(0, 1), b: slot_ref(1, 2) })) };
    EditRequest {
        operations: vec![swap],
        seed: Some(edited.seed),
        sampler: Some(edited.sampler.clone()),
        steps: Some(edited.steps),
        ..EditRequest::default()
    }
}

/// The health of `service` as the standard health service reports it.
async fn health(channel: &Channel, service: &str) -> Result<ServingStatus, tonic::Status> {
    let request = HealthCheckRequest { service: service.to_string() };
    let reply = HealthClient::new(channel.clone()).check(request).await?.into_inner();
    Ok(reply.status())
}

#[tokio::test]
async fn health_follows_loading_readiness_and_draining() {
    let mut s = settings();
    s.warmup = true;
    let slow = || {
        std::thread::sleep(Duration::from_millis(800));
        api_common::tiny_model()
    };
    let server = TestServer::listen(s, slow, true).await;
    let channel =
        Channel::from_shared(server.grpc.clone().unwrap()).unwrap().connect().await.unwrap();
    for service in ["", "slotserve.v1.SlotServe"] {
        assert_eq!(health(&channel, service).await.unwrap(), ServingStatus::NotServing);
    }
    let loading = SlotServeClient::new(channel.clone()).info(InfoRequest {}).await.unwrap_err();
    assert_eq!(loading.code(), Code::Unavailable, "{loading}");
    server.wait_ready().await;
    for service in ["", "slotserve.v1.SlotServe"] {
        assert_eq!(health(&channel, service).await.unwrap(), ServingStatus::Serving);
    }
    let unknown = health(&channel, "no.such.Service").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let request = HealthCheckRequest { service: String::new() };
    let mut watch = HealthClient::new(channel.clone()).watch(request).await.unwrap().into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let stopping = tokio::spawn(server.stop());
    let mut seen = Vec::new();
    let watching = async {
        while let Some(Ok(update)) = watch.next().await {
            seen.push(update.status());
        }
    };
    tokio::time::timeout(Duration::from_secs(30), watching).await.expect("the watch ends");
    assert_eq!(seen, vec![ServingStatus::NotServing], "the watch reports draining, then ends");
    let stopped = tokio::time::timeout(Duration::from_secs(30), stopping).await;
    stopped.expect("a health watch does not hold the shutdown").unwrap().expect("clean shutdown");
}

/// Asserts that `result` failed with `code` and a message mentioning `mentions`.
fn assert_refused<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
    mentions: &str,
) {
    let status = result.expect_err("the call is refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(mentions),
        "`{}` does not mention `{mentions}`",
        status.message()
    );
}

#[tokio::test]
async fn bad_input_is_invalid_argument_and_the_server_keeps_serving() {
    let server = TestServer::start_with_grpc(settings()).await;
    let mut grpc = client(&server).await;
    let set = slot_sets(&mut grpc, &[picture(6, 32, 32)]).await.remove(0);

    let mut truncated = png(&picture(7, 32, 32));
    truncated.truncate(60);
    let broken = DecomposeRequest { images: vec![truncated], masks: None };
    assert_refused(grpc.decompose(broken).await, Code::InvalidArgument, "image 0");
    let text = DecomposeRequest { images: vec![b"hello, not an image".to_vec()], masks: None };
    assert_refused(grpc.decompose(text).await, Code::InvalidArgument, "PNG and JPEG");
    let empty = DecomposeRequest { images: vec![Vec::new()], masks: None };
    assert_refused(grpc.decompose(empty).await, Code::InvalidArgument, "empty");
    let none = DecomposeRequest::default();
    assert_refused(grpc.decompose(none).await, Code::InvalidArgument, "no images");

    let mut short = set.clone();
    short.data.truncate(short.data.len() - 4);
    let request = RenderRequest { slots: vec![short], ..render_request(&set, &[], 2) };
    let status = grpc.render(request).await.unwrap_err();
    assert_eq!(status.metadata().get("error-type").unwrap(), "invalid_slots");
    assert_refused::<()>(Err(status), Code::InvalidArgument, "slot set 0: slot data has 508 bytes");
    assert_refused(
        grpc.render(render_request(&set, &[9], 2)).await,
        Code::InvalidArgument,
        "slot 9",
    );
    let other_model = proto::SlotSet { model: "not-this-model".into(), ..set.clone() };
    let request = RenderRequest { slots: vec![other_model], ..render_request(&set, &[], 2) };
    assert_refused(grpc.render(request).await, Code::FailedPrecondition, "not-this-model");
    let unknown_sampler =
        RenderRequest { sampler: Some("euler".into()), ..render_request(&set, &[], 2) };
    assert_refused(grpc.render(unknown_sampler).await, Code::InvalidArgument, "euler");
    let stream = grpc.render_stream(render_request(&set, &[4], 2)).await;
    assert_refused(stream.map(|_| ()), Code::InvalidArgument, "slot 4");

    let swap =
        EditOperation { op: Some(Op::Swap(proto::Swap { a: slot_ref(0, 1), b: slot_ref(0, 7) })) };
    let unknown_slot =
        EditRequest { slots: vec![set.clone()], operations: vec![swap], ..EditRequest::default() };
    assert_refused(grpc.edit(unknown_slot).await, Code::InvalidArgument, "slot 7 of image 0");
    let no_kind = EditRequest {
        slots: vec![set.clone()],
        operations: vec![EditOperation { op: None }],
        ..EditRequest::default()
    };
    assert_refused(grpc.edit(no_kind).await, Code::InvalidArgument, "operation 0");
    let half = EditOperation { op: Some(Op::Swap(proto::Swap { a: slot_ref(0, 1), b: None })) };
    let missing_ref =
        EditRequest { slots: vec![set.clone()], operations: vec![half], ..EditRequest::default() };
    assert_refused(grpc.edit(missing_ref).await, Code::InvalidArgument, "`b` is missing");
    let remove = EditOperation { op: Some(Op::Remove(proto::Remove { image: 0, slot: 0 })) };
    let both = EditRequest {
        images: vec![png(&picture(8, 32, 32))],
        slots: vec![set.clone()],
        operations: vec![remove],
        ..EditRequest::default()
    };
    assert_refused(grpc.edit(both).await, Code::InvalidArgument, "either `images` or `slots`");

    let huge = DecomposeRequest { images: vec![vec![7u8; 2 << 20]], masks: None };
    assert_refused(grpc.decompose(huge).await, Code::OutOfRange, "message length too large");

    let rendered = grpc.render(render_request(&set, &[2], 2)).await.unwrap().into_inner();
    assert_eq!(rendered.images[0].num_slots, 1, "the server still serves");
    let (status, _) =
        server.post("/decompose", &json!({ "image": png_base64(&picture(9, 32, 32)) })).await;
    assert_eq!(status, 200, "and so does HTTP");
    server.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn api_key_guards_every_call_but_health() {
    let mut s = settings();
    s.api_key = Some("sesame".into());
    let server = TestServer::start_with_grpc(s).await;
    let channel =
        Channel::from_shared(server.grpc.clone().unwrap()).unwrap().connect().await.unwrap();
    let mut open = SlotServeClient::new(channel.clone());
    assert_refused(open.info(InfoRequest {}).await, Code::Unauthenticated, "API key is required");
    let with_key = |key: &'static str| {
        move |mut request: Request<()>| {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {key}").parse().unwrap());
            Ok(request)
        }
    };
    let mut wrong = SlotServeClient::with_interceptor(channel.clone(), with_key("open"));
    assert_refused(wrong.info(InfoRequest {}).await, Code::Unauthenticated, "wrong API key");
    let request = DecomposeRequest { images: vec![png(&picture(1, 32, 32))], masks: Some(false) };
    assert_refused(wrong.decompose(request.clone()).await, Code::Unauthenticated, "wrong API key");
    let mut right = SlotServeClient::with_interceptor(channel.clone(), with_key("sesame"));
    assert!(right.info(InfoRequest {}).await.is_ok());
    assert_eq!(right.decompose(request).await.unwrap().into_inner().images.len(), 1);
    assert_eq!(health(&channel, "").await.unwrap(), ServingStatus::Serving, "health needs no key");
    server.stop().await.expect("clean shutdown");
}
