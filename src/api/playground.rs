//! The playground: a page at `/` that decomposes, edits and renders images through this
//! server's own HTTP API. Its files (plain HTML, CSS and JavaScript modules in
//! `src/api/playground/`) are embedded in the binary, so nothing is fetched from elsewhere at
//! run time. They are served without the API key since they hold no data; the page sends the
//! key the user types with its API calls.

use std::sync::LazyLock;

use axum::body::Bytes;
use axum::extract::Path;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH,
    X_CONTENT_TYPE_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use crate::imageio::SLOT_PALETTE;

/// The page itself may only load what this server serves: its own assets, images it made
/// in memory (`data:` and `blob:` URLs), and API calls to this origin.
const CONTENT_POLICY: &str = "default-src 'self'; img-src 'self' data: blob:; \
    object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'";

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: Bytes,
    /// Strong validator, so browsers revalidate cheaply and a new binary is never stale.
    etag: HeaderValue,
}

impl Asset {
    fn new(name: &'static str, content_type: &'static str, body: String) -> Self {
        let digest = Sha256::digest(body.as_bytes());
        let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        let etag = HeaderValue::from_str(&format!("\"{hex}\"")).expect("hex is a valid header");
        Self { name, content_type, body: body.into(), etag }
    }

    /// The file, or 304 when the client's copy (`If-None-Match`) is current.
    fn respond(&self, headers: &HeaderMap) -> Response {
        let current = headers
            .get_all(IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|tag| tag.trim() == self.etag || tag.trim() == "*");
        let mut response = match current {
            true => StatusCode::NOT_MODIFIED.into_response(),
            false => self.body.clone().into_response(),
        };
        let out = response.headers_mut();
        out.insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        out.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        out.insert(ETAG, self.etag.clone());
        out.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        out.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_POLICY));
        response
    }
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Every file of the playground; `index.html` is the page at `/`.
static ASSETS: LazyLock<Vec<Asset>> = LazyLock::new(|| {
    let file = |name, content_type, body: &str| Asset::new(name, content_type, body.to_string());
    vec![
        file("index.html", HTML, include_str!("playground/index.html")),
        file("style.css", CSS, include_str!("playground/style.css")),
        file("app.js", JS, include_str!("playground/app.js")),
        file("api.js", JS, include_str!("playground/api.js")),
        file("editor.js", JS, include_str!("playground/editor.js")),
        file("history.js", JS, include_str!("playground/history.js")),
        file("slots.js", JS, include_str!("playground/slots.js")),
        file("view.js", JS, include_str!("playground/view.js")),
        Asset::new("palette.js", JS, palette_module()),
    ]
});

/// The slot colours as a JavaScript module, made from [`SLOT_PALETTE`] so the page colours
/// slots exactly as the segmentation PNGs do.
fn palette_module() -> String {
    let colors: Vec<String> =
        SLOT_PALETTE.iter().map(|[r, g, b]| format!("[{r}, {g}, {b}]")).collect();
    format!(
        "// Made by the server from its slot palette: slot i has colour i modulo the length.\n\
         export const SLOT_COLORS = [{}];\n",
        colors.join(", ")
    )
}

fn find(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name)
}

/// `GET /`: the playground page.
pub async fn page(headers: HeaderMap) -> Response {
    find("index.html").expect("index.html is embedded").respond(&headers)
}

/// `GET /playground/{file}`: one of the page's scripts or styles; JSON 404 for others.
pub async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match find(&name) {
        Some(asset) => asset.respond(&headers),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("the playground has no file {name:?}"),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the page's assets are served, as its HTML refers to them.
    const ASSET_PREFIX: &str = "/playground/";

    /// Every file the page refers to (`/playground/NAME` in HTML, `./NAME` in imports) is
    /// embedded, and every embedded file is used, so a typo cannot ship a page that fails to
    /// load.
    #[test]
    fn referenced_and_embedded_files_agree() {
        let mut referenced = std::collections::BTreeSet::new();
        for asset in ASSETS.iter().filter(|a| a.content_type != CSS) {
            let text = std::str::from_utf8(&asset.body).expect("assets are text");
            let refs = text
                .split(['"', '\''])
                .filter_map(|s| s.strip_prefix(ASSET_PREFIX).or_else(|| s.strip_prefix("./")));
            for name in refs {
                assert!(find(name).is_some(), "{} refers to {name:?}, not embedded", asset.name);
                referenced.insert(name);
            }
        }
        let unused: Vec<_> =
            ASSETS.iter().map(|a| a.name).filter(|n| !referenced.contains(n)).collect();
        assert_eq!(unused, ["index.html"], "embedded but never loaded");
    }

    #[test]
    fn palette_module_lists_the_slot_colours() {
        let module = palette_module();
        assert!(module.contains("export const SLOT_COLORS = [[230, 25, 75], [60, 180, 75], "));
        assert_eq!(module.matches("], [").count(), SLOT_PALETTE.len() - 1);
    }
}
