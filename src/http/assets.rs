//! The browser demo page, embedded in the binary: no CDN, no build step. The official phoenix
//! client (1.8.16, MIT, `static/vendor/LICENSE-phoenix.md`) is vendored as its ESM build.

/// A static file served at a fixed path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asset {
    /// `content-type` header value.
    pub content_type: &'static str,
    /// The bytes.
    pub body: &'static str,
}

/// `GET /`: the chat page.
pub const INDEX: Asset =
    Asset { content_type: "text/html; charset=utf-8", body: include_str!("../../static/index.html") };

/// `GET /assets/phoenix.mjs`: the phoenix client the page imports.
pub const PHOENIX: Asset = Asset {
    content_type: "text/javascript; charset=utf-8",
    body: include_str!("../../static/vendor/phoenix-1.8.16.mjs"),
};

/// The asset at `path`, if any.
pub fn get(path: &str) -> Option<Asset> {
    match path {
        "/" | "/index.html" => Some(INDEX),
        "/assets/phoenix.mjs" => Some(PHOENIX),
        _ => None,
    }
}
