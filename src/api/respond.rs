//! Building responses from the engine's plain results: PNG encoding, per-slot areas and
//! boxes, and the three forms of a render answer (JSON, raw PNG, server-sent events).

use std::convert::Infallible;

use axum::http::header::{HeaderMap, ACCEPT, CONTENT_TYPE};
use axum::http::HeaderValue;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use futures::Stream;
use image::RgbImage;
use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::error::ApiError;
use super::types::{
    DecomposeResponse, DecomposedImage, EditResponse, EditedImage, ImageEvent, ProgressEvent,
    RenderResponse, RenderedImage, SlotObject,
};
use super::Sampling;
use crate::edit::EditedSet;
use crate::engine::{collect_images, Decomposed, RenderEvent};
use crate::imageio::{encode_mask_png, encode_png, encode_segmentation_png};
use crate::slots::SlotSet;
use crate::summary::summarize;

/// Whether the client's `Accept` header lists `mime`.
pub fn accepts(headers: &HeaderMap, mime: &str) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| item.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case(mime)))
}

/// Base64 of an image's PNG encoding.
pub fn png_base64(image: &RgbImage) -> String {
    STANDARD.encode(encode_png(image))
}

/// A rendered image as the API reports it.
pub fn rendered(image: &RgbImage, seed: u64, num_slots: usize) -> RenderedImage {
    RenderedImage { png: png_base64(image), seed, num_slots }
}

/// The API form of one decomposed image.
fn describe(d: &Decomposed, with_pngs: bool) -> DecomposedImage {
    let (w, h) = (d.width, d.height);
    let k = d.slots.num_slots();
    let plane = w * h;
    let mask_png = |slot: usize| {
        STANDARD.encode(encode_mask_png(
            &d.masks[slot * plane..(slot + 1) * plane],
            w as u32,
            h as u32,
        ))
    };
    let objects = summarize(&d.segmentation, w, k)
        .into_iter()
        .map(|summary| SlotObject { mask: with_pngs.then(|| mask_png(summary.slot)), summary })
        .collect();
    let segmentation = with_pngs.then(|| {
        let labels: Vec<u8> = d.segmentation.iter().map(|&l| l.min(255) as u8).collect();
        STANDARD.encode(encode_segmentation_png(&labels, w as u32, h as u32, k))
    });
    DecomposedImage { slots: d.slots.to_json(), width: w, height: h, objects, segmentation }
}

/// The `/decompose` answer, built on a blocking thread (PNG encoding is CPU work).
pub async fn decomposition(
    outs: Vec<Decomposed>,
    with_pngs: bool,
) -> Result<DecomposeResponse, ApiError> {
    tokio::task::spawn_blocking(move || DecomposeResponse {
        images: outs.iter().map(|d| describe(d, with_pngs)).collect(),
    })
    .await
    .map_err(|e| {
        ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    })
}

/// The `/edit` answer: each planned output with its slot set and image.
pub fn edited(
    plan: Vec<EditedSet>,
    sets: Vec<SlotSet>,
    images: &[RgbImage],
    sampling: &Sampling,
) -> EditResponse {
    let outputs = plan
        .into_iter()
        .zip(sets)
        .zip(images)
        .enumerate()
        .map(|(i, ((out, set), image))| EditedImage {
            origin: out.origin,
            sources: out.slots,
            image: rendered(image, sampling.seed_of(i), set.num_slots()),
            slots: set.to_json(),
        })
        .collect();
    EditResponse {
        outputs,
        seed: sampling.seed,
        sampler: sampling.sampler.to_string(),
        steps: sampling.steps,
    }
}

/// Waits for all images of a render until `deadline`.
pub async fn wait_for_images(
    events: &mut UnboundedReceiver<RenderEvent>,
    count: usize,
    deadline: Instant,
) -> Result<Vec<RgbImage>, ApiError> {
    match tokio::time::timeout_at(deadline, collect_images(events, count)).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(_) => Err(timeout()),
    }
}

/// 504: the request ran past the server's time limit.
pub fn timeout() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::GATEWAY_TIMEOUT,
        "timeout",
        "the request took longer than the server's limit",
    )
}

/// What a render request is answered with, as the client's `Accept` header asks: a stream
/// of events, one raw PNG, or JSON.
pub struct RenderReply {
    /// The job's events.
    pub events: UnboundedReceiver<RenderEvent>,
    /// Seeds and sampler of the request.
    pub sampling: Sampling,
    /// Slots of each image.
    pub num_slots: Vec<usize>,
    /// When the request must be done.
    pub deadline: Instant,
    /// The request's concurrency permit, held until the answer is complete.
    pub _permit: OwnedSemaphorePermit,
}

impl RenderReply {
    /// Answers in the form the client accepts.
    pub async fn respond(mut self, headers: &HeaderMap) -> Result<Response, ApiError> {
        if accepts(headers, "text/event-stream") {
            return Ok(self.stream().into_response());
        }
        let images = wait_for_images(&mut self.events, self.num_slots.len(), self.deadline).await?;
        let s = &self.sampling;
        if accepts(headers, "image/png") && images.len() == 1 {
            return Ok(raw_png(&images[0], s));
        }
        let images = images
            .iter()
            .zip(&self.num_slots)
            .enumerate()
            .map(|(i, (img, &k))| rendered(img, s.seed_of(i), k))
            .collect();
        let response =
            RenderResponse { images, seed: s.seed, sampler: s.sampler.to_string(), steps: s.steps };
        Ok(Json(response).into_response())
    }

    /// The server-sent events: `progress` after every model evaluation, `image` for each
    /// finished image, `error` if the render fails or times out.
    fn stream(self) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
        let state = (self, false);
        let stream = futures::stream::unfold(state, |(mut reply, finished)| async move {
            if finished {
                return None;
            }
            let (event, last) =
                match tokio::time::timeout_at(reply.deadline, reply.events.recv()).await {
                    Ok(Some(event)) => reply.event(event),
                    Ok(None) => return None,
                    Err(_) => (error_event(&timeout()), true),
                };
            Some((Ok(event), (reply, last)))
        });
        Sse::new(stream).keep_alive(KeepAlive::default())
    }

    /// One engine event as an SSE event, and whether it ends the stream.
    fn event(&self, event: RenderEvent) -> (Event, bool) {
        match event {
            RenderEvent::Progress { index, step, of } => {
                (sse("progress", &ProgressEvent { index, step, of }), false)
            }
            RenderEvent::Image { index, image } => {
                let image = rendered(&image, self.sampling.seed_of(index), self.num_slots[index]);
                (sse("image", &ImageEvent { index, image }), false)
            }
            RenderEvent::Failed { error, .. } => (error_event(&ApiError::from(error)), true),
        }
    }
}

/// An image as a raw PNG body, with the seed that made it in `x-seed`.
pub fn png_response(image: &RgbImage, seed: u64) -> Response {
    let mut response = encode_png(image).into_response();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("image/png"));
    headers.insert("x-seed", HeaderValue::from(seed));
    response
}

/// One raw PNG with the sampling facts in headers.
fn raw_png(image: &RgbImage, s: &Sampling) -> Response {
    let mut response = png_response(image, s.seed);
    let headers = response.headers_mut();
    headers.insert("x-steps", HeaderValue::from(s.steps));
    headers.insert("x-sampler", HeaderValue::from_static(s.sampler.name()));
    response
}

fn sse(name: &'static str, payload: &impl Serialize) -> Event {
    Event::default()
        .event(name)
        .json_data(payload)
        .unwrap_or_else(|e| Event::default().event("error").data(e.to_string()))
}

fn error_event(error: &ApiError) -> Event {
    sse("error", &error.body())
}
