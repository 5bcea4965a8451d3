//! The playground: one page, served at `/` and `/playground`, for people to generate and
//! edit images in a browser over the API (streamed progress and partial images, masks
//! painted on a canvas, a history kept in the browser).
//!
//! Plain HTML, CSS and JavaScript in `playground/`, embedded in the binary: no network,
//! no build step. The page and its assets need no API key (they hold no data); the page
//! sends the key, asked for when the API answers 401, with its API calls.

use poem::http::{header, HeaderValue, StatusCode};
use poem::{get, handler, Endpoint, IntoResponse, Request, Response, Route};

/// The page.
pub const INDEX_HTML: &str = include_str!("playground/index.html");
/// Its style sheet.
pub const STYLE_CSS: &str = include_str!("playground/style.css");
/// Its script.
pub const APP_JS: &str = include_str!("playground/app.js");

/// Where the assets are served; the page names them by these paths.
const STYLE_PATH: &str = "/playground/style.css";
const SCRIPT_PATH: &str = "/playground/app.js";

/// `api` with the page (`/`, `/playground`) and its assets in front of it.
///
/// A wrapper rather than more routes: poem's router sends a bare `/` to an endpoint
/// nested at `/` (the OpenAPI service) even when `/` has a route of its own.
pub fn with_playground<E: Endpoint>(api: E) -> Playground<E> {
    Playground {
        api,
        page: Route::new()
            .at("/", get(page))
            .at("/playground", get(page))
            .at(STYLE_PATH, get(style))
            .at(SCRIPT_PATH, get(script)),
    }
}

/// The endpoint [`with_playground`] makes: the page's paths here, the rest to the API.
pub struct Playground<E> {
    api: E,
    page: Route,
}

impl<E: Endpoint> Endpoint for Playground<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        match req.uri().path() {
            "/" | "/playground" | STYLE_PATH | SCRIPT_PATH => self.page.call(req).await,
            _ => self.api.call(req).await.map(IntoResponse::into_response),
        }
    }
}

/// The embedded files' total size in bytes (what a browser downloads, uncompressed).
pub fn size_bytes() -> usize {
    INDEX_HTML.len() + STYLE_CSS.len() + APP_JS.len()
}

/// A `200` answer with `body` (other methods than `GET`/`HEAD` get the API's 405).
fn asset(content_type: &'static str, body: &'static str) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        // The files change with the binary: revalidate rather than serve a stale page.
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-content-type-options", "nosniff")
        .body(body)
}

/// Where the page may load from and connect to: this server only. Images are `data:` and
/// `blob:` URLs made from the API's answers.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data: blob:; \
     style-src 'self'; script-src 'self'; connect-src 'self'; object-src 'none'; \
     base-uri 'none'; frame-ancestors 'none'";

#[handler]
fn page() -> Response {
    let mut resp = asset("text/html; charset=utf-8", INDEX_HTML);
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

#[handler]
fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

#[handler]
fn script() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}
