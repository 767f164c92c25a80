//! HTTP answers built from the shared results: base64 PNGs in JSON, and the three forms of a
//! render answer (JSON, raw PNG, server-sent events).

use std::convert::Infallible;

use axum::http::header::{HeaderMap, ACCEPT, CONTENT_TYPE};
use axum::http::HeaderValue;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use futures::{Stream, StreamExt};
use image::RgbImage;
use serde::Serialize;

use super::decomposition::{describe_all, DecomposedParts};
use super::editing::Edited;
use super::error::ApiError;
use super::rendering::{RenderUpdate, Rendering};
use super::types::{
    DecomposeResponse, DecomposedImage, EditResponse, EditedImage, ImageEvent, ProgressEvent,
    RenderResponse, RenderedImage, SlotObject,
};
use super::Sampling;
use crate::engine::Decomposed;
use crate::imageio::encode_png;

/// Whether the client's `Accept` header lists `mime`.
pub fn accepts(headers: &HeaderMap, mime: &str) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| item.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case(mime)))
}

/// A rendered image as the API reports it: base64 PNG, seed, slot count.
pub fn rendered(image: &RgbImage, seed: u64, num_slots: usize) -> RenderedImage {
    RenderedImage { png: STANDARD.encode(encode_png(image)), seed, num_slots }
}

/// The JSON form of one decomposed image.
fn json_form(parts: DecomposedParts) -> DecomposedImage {
    let objects = parts
        .objects
        .into_iter()
        .map(|o| SlotObject { summary: o.summary, mask: o.mask.map(|png| STANDARD.encode(png)) })
        .collect();
    DecomposedImage {
        slots: parts.slots.to_json(),
        width: parts.width,
        height: parts.height,
        objects,
        segmentation: parts.segmentation.map(|png| STANDARD.encode(png)),
    }
}

/// The `/decompose` answer.
pub async fn decomposition(
    outs: Vec<Decomposed>,
    with_pngs: bool,
) -> Result<DecomposeResponse, ApiError> {
    Ok(DecomposeResponse { images: describe_all(outs, with_pngs, json_form).await? })
}

/// The `/edit` answer.
pub fn edited(edited: Edited) -> EditResponse {
    let outputs = edited
        .outputs
        .into_iter()
        .map(|out| EditedImage {
            origin: out.origin,
            sources: out.sources,
            image: rendered(&out.image, out.seed, out.slots.num_slots()),
            slots: out.slots.to_json(),
        })
        .collect();
    let s = &edited.sampling;
    EditResponse { outputs, seed: s.seed, sampler: s.sampler.to_string(), steps: s.steps }
}

/// Answers a render in the form the client's `Accept` header asks for: a stream of events,
/// one raw PNG, or JSON.
pub async fn render_answer(
    mut rendering: Rendering,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    if accepts(headers, "text/event-stream") {
        return Ok(event_stream(rendering).into_response());
    }
    let outputs = rendering.outputs().await?;
    let s = &rendering.sampling;
    if accepts(headers, "image/png") && outputs.len() == 1 {
        return Ok(raw_png(&outputs[0].image, s));
    }
    let images = outputs.iter().map(|o| rendered(&o.image, o.seed, o.num_slots)).collect();
    let response =
        RenderResponse { images, seed: s.seed, sampler: s.sampler.to_string(), steps: s.steps };
    Ok(Json(response).into_response())
}

/// The server-sent events: `progress` after every model evaluation, `image` for each
/// finished image, `error` if the render fails or times out.
fn event_stream(rendering: Rendering) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let events = rendering.updates().map(|update| {
        Ok(match update {
            Ok(RenderUpdate::Progress { index, step, of }) => {
                sse("progress", &ProgressEvent { index, step, of })
            }
            Ok(RenderUpdate::Image { index, output: o }) => {
                sse("image", &ImageEvent { index, image: rendered(&o.image, o.seed, o.num_slots) })
            }
            Err(error) => sse("error", &error.body()),
        })
    });
    Sse::new(events).keep_alive(KeepAlive::default())
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
