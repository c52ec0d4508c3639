//! Response bytes for the few answers Nexus gives over plain HTTP.

/// An HTTP status with its reason phrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(pub u16, pub &'static str);

impl Status {
    /// 200.
    pub const OK: Status = Status(200, "OK");
    /// 400: malformed request or invalid upgrade.
    pub const BAD_REQUEST: Status = Status(400, "Bad Request");
    /// 403: refused token, origin, subprotocol or `vsn`.
    pub const FORBIDDEN: Status = Status(403, "Forbidden");
    /// 404: unknown path.
    pub const NOT_FOUND: Status = Status(404, "Not Found");
    /// 405: wrong method on a plain endpoint.
    pub const METHOD_NOT_ALLOWED: Status = Status(405, "Method Not Allowed");
    /// 431: request head over the limit.
    pub const HEADERS_TOO_LARGE: Status = Status(431, "Request Header Fields Too Large");
    /// 401: missing or refused token on the API.
    pub const UNAUTHORIZED: Status = Status(401, "Unauthorized");
    /// 503: over capacity or draining.
    pub const UNAVAILABLE: Status = Status(503, "Service Unavailable");
    /// 201: the server API stored a message.
    pub const CREATED: Status = Status(201, "Created");
    /// 204: the server API did what was asked; nothing to say.
    pub const NO_CONTENT: Status = Status(204, "No Content");
    /// 411: a server API body without `Content-Length`.
    pub const LENGTH_REQUIRED: Status = Status(411, "Length Required");
    /// 413: a server API body over the limit.
    pub const TOO_LARGE: Status = Status(413, "Content Too Large");
}

/// A complete `204` that closes the connection.
pub fn no_content() -> Vec<u8> {
    b"HTTP/1.1 204 No Content\r\ncache-control: no-store\r\nconnection: close\r\n\r\n".to_vec()
}

/// A complete `text/plain` response that closes the connection.
pub fn plain(status: Status, body: &str) -> Vec<u8> {
    plain_with(status, body, "")
}

/// [`plain`] with extra header lines (each ending in CRLF).
fn plain_with(status: Status, body: &str, headers: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n{headers}\
         connection: close\r\n\r\n{}",
        status.0,
        status.1,
        body.len(),
        body
    )
    .into_bytes()
}

/// The 400 for a WebSocket version other than 13, naming the one supported (RFC 6455 §4.4).
pub fn unsupported_ws_version(body: &str) -> Vec<u8> {
    plain_with(Status::BAD_REQUEST, body, "sec-websocket-version: 13\r\n")
}

/// The answer to `GET /favicon.ico`: nothing, cacheable for a day (browsers ask every page
/// load otherwise, and log the 404).
pub fn no_favicon() -> Vec<u8> {
    b"HTTP/1.1 204 No Content\r\ncache-control: public, max-age=86400\r\nconnection: close\r\n\r\n".to_vec()
}

/// A complete `200` Prometheus exposition that closes the connection.
pub fn metrics(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{}",
        body.len(),
        body
    )
    .into_bytes()
}

/// An embedded file (the demo page), `200`, closing the connection.
pub fn asset(asset: &super::assets::Asset) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: {}\r\ncontent-length: {}\r\ncache-control: no-cache\r\n\
         x-content-type-options: nosniff\r\nconnection: close\r\n\r\n",
        asset.content_type,
        asset.body.len()
    )
    .into_bytes();
    out.extend_from_slice(asset.body.as_bytes());
    out
}

/// The 101 answer to an accepted WebSocket upgrade.
pub fn switching_protocols(accept: &str, protocol_phoenix: bool) -> Vec<u8> {
    let protocol = if protocol_phoenix { "sec-websocket-protocol: phoenix\r\n" } else { "" };
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-accept: {accept}\r\n{protocol}\r\n"
    )
    .into_bytes()
}

/// A complete `application/json` response that closes the connection.
pub fn json(status: Status, body: &[u8]) -> Vec<u8> {
    let auth = if status == Status::UNAUTHORIZED { "www-authenticate: Bearer\r\n" } else { "" };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{auth}\
         cache-control: no-store\r\nconnection: close\r\n\r\n",
        status.0,
        status.1,
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// A JSON error response `{"error": message}`.
pub fn json_error(status: Status, message: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(message.len() + 12);
    body.extend_from_slice(b"{\"error\":\"");
    // Messages are our own ASCII constants; escape quotes and backslashes anyway.
    for c in message.chars() {
        match c {
            '"' | '\\' => body.extend_from_slice(&[b'\\', c as u8]),
            c if c.is_ascii() && !c.is_ascii_control() => body.push(c as u8),
            _ => body.push(b'?'),
        }
    }
    body.extend_from_slice(b"\"}");
    json(status, &body)
}
