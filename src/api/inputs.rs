//! Image inputs: base64 strings or data URLs in JSON, files in multipart forms, or one raw
//! image body; decoded within the limits and brought to the model's resolution.

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::Json;
use base64::engine::general_purpose::STANDARD_PAD_INDIFFERENT;
use base64::Engine as _;
use image::RgbImage;

use super::blocking::on_blocking_thread;
use super::error::ApiError;
use super::types::DecomposeRequest;
use crate::imageio::{decode_image, preprocess, ImageLimits, Preprocess};

/// Multipart field names that carry images.
const IMAGE_FIELDS: [&str; 4] = ["image", "images", "image[]", "images[]"];

/// 422 when a request carries more than `max` images (or slot sets).
pub fn check_count(count: usize, max: usize, what: &str) -> Result<(), ApiError> {
    match count {
        0 => Err(ApiError::bad_request(format!("no {what} given"))),
        n if n > max => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "too_many_images",
            format!("{n} {what} given; this server accepts at most {max} per request"),
        )),
        _ => Ok(()),
    }
}

/// 400 for an image with no bytes.
fn empty_image() -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_image", "the image is empty")
}

/// Image files sent as raw bytes (gRPC, a raw body): at most `max`, none empty.
pub fn check_images(images: Vec<Vec<u8>>, max: usize) -> Result<Vec<Vec<u8>>, ApiError> {
    check_count(images.len(), max, "images")?;
    match images.iter().position(Vec::is_empty) {
        Some(i) => Err(empty_image().at(format!("image {i}"))),
        None => Ok(images),
    }
}

/// The bytes of a base64 image or `data:<type>;base64,<data>` URL.
pub fn decode_base64_image(text: &str) -> Result<Vec<u8>, ApiError> {
    let data = match text.strip_prefix("data:") {
        Some(url) => match url.split_once(',') {
            Some((meta, data)) if meta.ends_with(";base64") => data,
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_base64",
                    "data URLs must be base64",
                ))
            }
        },
        None => text,
    };
    let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let bytes = STANDARD_PAD_INDIFFERENT.decode(compact).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_base64", format!("invalid base64: {e}"))
    })?;
    match bytes.is_empty() {
        true => Err(empty_image()),
        false => Ok(bytes),
    }
}

/// The images of a JSON list of base64 strings, each checked.
pub fn decode_base64_images(texts: &[String], max: usize) -> Result<Vec<Vec<u8>>, ApiError> {
    check_count(texts.len(), max, "images")?;
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| decode_base64_image(t).map_err(|e| e.at(format!("image {i}"))))
        .collect()
}

/// The images of a JSON `/decompose` body: `image` or `images`.
fn json_images(body: DecomposeRequest, max: usize) -> Result<Vec<Vec<u8>>, ApiError> {
    match (body.image, body.images) {
        (Some(one), None) => decode_base64_images(&[one], max),
        (None, Some(many)) => decode_base64_images(&many, max),
        (Some(_), Some(_)) => Err(ApiError::bad_request("give `image` or `images`, not both")),
        (None, None) => Err(ApiError::bad_request("no image given: send `image` or `images`")),
    }
}

/// The image files of a multipart form.
async fn multipart_images(mut form: Multipart, max: usize) -> Result<Vec<Vec<u8>>, ApiError> {
    let mut images = Vec::new();
    while let Some(field) = form.next_field().await? {
        let name = field.name().unwrap_or_default().to_string();
        if !IMAGE_FIELDS.contains(&name.as_str()) {
            return Err(ApiError::bad_request(format!(
                "unexpected form field `{name}`: send files as `image`"
            )));
        }
        check_count(images.len() + 1, max, "images")?;
        let bytes = field.bytes().await?;
        if bytes.is_empty() {
            return Err(empty_image().at(format!("image {}", images.len())));
        }
        images.push(bytes.to_vec());
    }
    check_count(images.len(), max, "images")?;
    Ok(images)
}

/// The images of a `/decompose` request: JSON, multipart form, or a raw PNG/JPEG body.
pub async fn read_images(request: Request, max: usize) -> Result<Vec<Vec<u8>>, ApiError> {
    let content_type =
        request.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match essence.as_str() {
        "multipart/form-data" => multipart_images(Multipart::from_request(request, &()).await?, max).await,
        "image/png" | "image/jpeg" => {
            check_images(vec![Bytes::from_request(request, &()).await?.to_vec()], max)
        }
        t if t == "application/json" || t.ends_with("+json") => {
            let Json(body) = Json::<DecomposeRequest>::from_request(request, &()).await?;
            json_images(body, max)
        }
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("content type `{content_type}` is not accepted: send application/json, multipart/form-data, image/png or image/jpeg"),
        )),
    }
}

/// Decodes every image within `limits` and brings it to the model's square input, on a
/// blocking thread (decoding and resizing are CPU work).
pub async fn prepare_images(
    images: Vec<Vec<u8>>,
    limits: ImageLimits,
    rule: Preprocess,
    resolution: usize,
) -> Result<Vec<RgbImage>, ApiError> {
    let work = move || {
        images
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                let img = decode_image(bytes, &limits)
                    .map_err(|e| ApiError::from(e).at(format!("image {i}")))?;
                Ok(preprocess(&img, rule, resolution as u32))
            })
            .collect::<Result<Vec<_>, ApiError>>()
    };
    on_blocking_thread("image decoding", work).await?
}
