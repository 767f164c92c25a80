//! The OpenAPI document, generated from the handlers and types. The committed
//! `openapi.yaml` is this document; a test fails when they differ.

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::ErrorResponse;
use super::routes;
use super::types::{
    DecomposeForm, DecomposeRequest, DecomposeResponse, DecomposedImage, EditRequest, EditResponse,
    EditedImage, HealthResponse, ImageEvent, InfoResponse, Limits, ProgressEvent, RenderRequest,
    RenderResponse, RenderedImage, SlotObject, SlotSetInput,
};
use crate::edit::{EditOp, Origin, SlotRef};
use crate::engine::ModelInfo;
use crate::slots::SlotSetJson;

/// The API's documentation root.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "slotserve",
        description = "Object-centric image editing with SlotDiffusion models: decompose images into \
            slots, edit slot sets, render images from them. Slot sets travel inline, so the API is \
            stateless. Errors are JSON `{\"error\", \"error_type\"}`.",
        license(name = "MIT OR Apache-2.0"),
    ),
    paths(
        routes::decompose,
        routes::render,
        routes::edit,
        routes::scene,
        routes::health,
        routes::info,
        routes::metrics,
        routes::openapi_json,
    ),
    components(schemas(
        DecomposeForm, DecomposeRequest, DecomposeResponse, DecomposedImage, EditOp, EditRequest,
        EditResponse, EditedImage, ErrorResponse, HealthResponse, ImageEvent, InfoResponse, Limits,
        ModelInfo, Origin, ProgressEvent, RenderRequest, RenderResponse, RenderedImage, SlotObject,
        SlotRef, SlotSetInput, SlotSetJson,
    )),
    modifiers(&Security),
    tags(
        (name = "model", description = "Decompose, render and edit"),
        (name = "service", description = "Health, facts, metrics, this document and test scenes"),
    ),
)]
struct ApiDoc;

/// Declares the optional API key (bearer token or `x-api-key` header).
struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))),
        );
    }
}

/// The OpenAPI document of this server.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The OpenAPI document as YAML, exactly as `openapi.yaml` holds it.
pub fn openapi_yaml() -> String {
    openapi().to_yaml().expect("the OpenAPI document serializes to YAML")
}
