//! Request and response bodies of the HTTP API, with their OpenAPI schemas.

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::edit::{EditOp, Origin, SlotRef};
use crate::engine::ModelInfo;
use crate::slots::SlotSetJson;
use crate::summary::SlotSummary;

/// JSON body of `POST /decompose`: `image` or `images` (not both).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecomposeRequest {
    /// One image: base64 of a PNG or JPEG, or a `data:image/...;base64,` URL.
    pub image: Option<String>,
    /// Several images, in the same forms as `image`.
    pub images: Option<Vec<String>>,
}

/// Multipart body of `POST /decompose` (`curl -F image=@a.png -F image=@b.jpg`).
#[derive(Debug, Clone, ToSchema)]
pub struct DecomposeForm {
    /// One or more PNG or JPEG files; the field may also be named `images`.
    #[schema(value_type = Vec<String>, format = Binary)]
    pub image: Vec<Vec<u8>>,
}

/// Query options of `POST /decompose`.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DecomposeQuery {
    /// Include the mask and segmentation PNGs (default true); `false` returns slots, areas
    /// and boxes only.
    pub masks: Option<bool>,
}

/// Query options of `GET /scene`.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SceneQuery {
    /// Scene seed: the same seed always gives the same scene; random when absent (echoed in
    /// `x-seed`).
    pub seed: Option<u64>,
}

/// What `POST /decompose` returns.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DecomposeResponse {
    /// One entry per input image, in order.
    pub images: Vec<DecomposedImage>,
}

/// One decomposed image. Masks and boxes refer to the image as the model saw it: brought to
/// `width`×`height` by the model's preprocessing (see `GET /info`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DecomposedImage {
    /// The slot set, ready to send to `/render` or `/edit`.
    pub slots: SlotSetJson,
    /// Mask width in pixels.
    pub width: usize,
    /// Mask height in pixels.
    pub height: usize,
    /// One entry per slot, in slot order.
    pub objects: Vec<SlotObject>,
    /// Argmax segmentation as a palette PNG (base64) whose palette index is the slot id;
    /// absent with `masks=false`.
    pub segmentation: Option<String>,
}

/// What one slot covers: its area and box in the segmentation, and its soft mask.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SlotObject {
    /// Slot index, area and bounding box.
    #[serde(flatten)]
    pub summary: SlotSummary,
    /// Soft mask as an 8-bit greyscale PNG (base64); absent with `masks=false`.
    pub mask: Option<String>,
}

/// `slots` of a render request: one slot set or a list.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum SlotSetInput {
    /// One slot set.
    One(SlotSetJson),
    /// Several slot sets, rendered together.
    Many(Vec<SlotSetJson>),
}

impl SlotSetInput {
    /// The sets, in order.
    pub fn into_vec(self) -> Vec<SlotSetJson> {
        match self {
            Self::One(set) => vec![set],
            Self::Many(sets) => sets,
        }
    }
}

/// Deserializes as a list when the JSON is an array, as one set otherwise, so errors name
/// the field at fault instead of "no variant matched".
impl<'de> Deserialize<'de> for SlotSetInput {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        fn parse<T: DeserializeOwned, E: serde::de::Error>(
            value: serde_json::Value,
        ) -> Result<T, E> {
            serde_json::from_value(value).map_err(E::custom)
        }
        match serde_json::Value::deserialize(deserializer)? {
            v @ serde_json::Value::Array(_) => parse(v).map(Self::Many),
            v @ serde_json::Value::Object(_) => parse(v).map(Self::One),
            _ => Err(D::Error::custom("`slots` must be a slot set or a list of slot sets")),
        }
    }
}

/// Body of `POST /render`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"slots": {"shape": [2, 4], "dtype": "f32",
    "data": "AACAPwAAAEAAAEBAAACAQAAAgD8AAABAAABAQAAAgEA=", "model": "3f2a9c0d1e5b7a64"},
    "drop": [1], "seed": 7, "sampler": "dpm-solver++", "steps": 20}))]
pub struct RenderRequest {
    /// One slot set, or a list rendered together.
    pub slots: SlotSetInput,
    /// Render only these slots (indices into each set, in this order).
    pub keep: Option<Vec<usize>>,
    /// Render without these slots (indices into each set).
    pub drop: Option<Vec<usize>>,
    /// Seed of the first image (image i uses seed + i); random when absent, always echoed.
    pub seed: Option<u64>,
    /// `dpm-solver++`, `ddim` or `ddpm`; the model's default when absent (`GET /info`).
    pub sampler: Option<String>,
    /// Model evaluations per image (1 to the server's limit); the model's default when
    /// absent. DDPM always runs all T steps.
    pub steps: Option<usize>,
}

/// Body of `POST /edit`: inputs (`images` or `slots`), operations, sampling options.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"images": ["<base64 PNG>", "<base64 PNG>"],
    "operations": [{"op": "swap", "a": {"image": 0, "slot": 2}, "b": {"image": 1, "slot": 5}},
                   {"op": "remove", "image": 0, "slot": 3}],
    "seed": 7, "sampler": "dpm-solver++", "steps": 20}))]
pub struct EditRequest {
    /// Input images (decomposed first), as for `/decompose`.
    pub images: Option<Vec<String>>,
    /// Input slot sets (instead of images).
    pub slots: Option<Vec<SlotSetJson>>,
    /// Operations; slot references always name the inputs' slots.
    pub operations: Vec<EditOp>,
    /// Seed of the first output (output i uses seed + i); random when absent, echoed.
    pub seed: Option<u64>,
    /// Sampler, as for `/render`.
    pub sampler: Option<String>,
    /// Model evaluations per image, as for `/render`.
    pub steps: Option<usize>,
}

/// One rendered image.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RenderedImage {
    /// The image as base64 PNG.
    pub png: String,
    /// The seed it was rendered with.
    pub seed: u64,
    /// Slots it was rendered from.
    pub num_slots: usize,
}

/// What `POST /render` returns (JSON form).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RenderResponse {
    /// One image per slot set, in order.
    pub images: Vec<RenderedImage>,
    /// Seed of the first image.
    pub seed: u64,
    /// Sampler used.
    pub sampler: String,
    /// Model evaluations per image.
    pub steps: usize,
}

/// One output of an edit.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EditedImage {
    /// The input image this output edits, or the compose operation it comes from.
    pub origin: Origin,
    /// Input slots the output was rendered from, in order.
    pub sources: Vec<SlotRef>,
    /// The edited slot set.
    pub slots: SlotSetJson,
    /// The rendered image.
    pub image: RenderedImage,
}

/// What `POST /edit` returns: the touched input images in input order, then one output per
/// `compose`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EditResponse {
    /// The outputs.
    pub outputs: Vec<EditedImage>,
    /// Seed of the first output.
    pub seed: u64,
    /// Sampler used.
    pub sampler: String,
    /// Model evaluations per image.
    pub steps: usize,
}

/// A render progress event (`event: progress` on the SSE stream).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProgressEvent {
    /// Which image of the request.
    pub index: usize,
    /// Model evaluations done.
    pub step: usize,
    /// Model evaluations in all.
    pub of: usize,
}

/// A finished image (`event: image` on the SSE stream).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImageEvent {
    /// Which image of the request.
    pub index: usize,
    /// The image.
    #[serde(flatten)]
    pub image: RenderedImage,
}

/// `GET /health` when ready.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    /// Always `ready`.
    pub status: String,
}

/// The server's limits, as `GET /info` reports them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Limits {
    /// Most images decomposed or render jobs denoised in one batch.
    pub max_batch_size: usize,
    /// Most requests waiting for the model; beyond, 429.
    pub max_queue: usize,
    /// Most model requests handled at once; beyond, 429.
    pub max_concurrent: usize,
    /// Most images (or slot sets) in one request.
    pub max_images: usize,
    /// Most slots in one slot set.
    pub max_slots: usize,
    /// Most model evaluations per image.
    pub max_steps: usize,
    /// Largest request body, in bytes.
    pub payload_limit: usize,
    /// Largest input image, in pixels (width × height).
    pub max_image_pixels: u64,
    /// Largest input image side, in pixels.
    pub max_image_side: u32,
    /// Longest a request may take, in seconds.
    pub request_timeout_secs: u64,
}

/// What `GET /info` returns.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct InfoResponse {
    /// The served model.
    pub model: ModelInfo,
    /// Samplers a request may name.
    pub samplers: Vec<String>,
    /// The server's limits.
    pub limits: Limits,
    /// slotserve version.
    pub version: String,
}
