//! Bounded parsing of one HTTP/1.1 request head and routing it.
//!
//! The parser tells "need more bytes" (`Ok(None)`) from "invalid" (`Err`), so the connection
//! can keep reading a handshake split over many TCP segments, up to
//! [`limits::HANDSHAKE_BYTES_MAX`](crate::limits::HANDSHAKE_BYTES_MAX).

use base64::Engine;

use uuid::Uuid;

use super::origin::OriginPolicy;
use super::response::Status;
use crate::{ids, limits};

/// Why a request head could not be accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// Head larger than the limit, or too many headers: 431.
    #[error("request head too large")]
    TooLarge,
    /// Not HTTP/1.x: 400.
    #[error("malformed request")]
    Malformed,
}

impl HttpError {
    /// The status answered for this error.
    pub fn status(self) -> Status {
        match self {
            HttpError::TooLarge => Status::HEADERS_TOO_LARGE,
            HttpError::Malformed => Status::BAD_REQUEST,
        }
    }
}

/// The parts of a request head Nexus looks at, owned so the read buffer can be reused.
#[derive(Debug, Default, Clone)]
pub struct Head {
    /// Request method, as sent.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Raw query string (after `?`), if any.
    pub query: Option<String>,
    /// `1` for HTTP/1.1.
    pub minor_version: u8,
    /// `Upgrade` header.
    pub upgrade: Option<String>,
    /// `Connection` header.
    pub connection: Option<String>,
    /// `Sec-WebSocket-Key` header.
    pub ws_key: Option<String>,
    /// `Sec-WebSocket-Version` header.
    pub ws_version: Option<String>,
    /// First `Sec-WebSocket-Protocol` header.
    pub ws_protocol: Option<String>,
    /// `Origin` header.
    pub origin: Option<String>,
    /// `Authorization` header.
    pub authorization: Option<String>,
    /// How many `Host` headers (HTTP/1.1 needs exactly one, RFC 9112 §3.2).
    pub hosts: usize,
    /// `Content-Length` header.
    pub content_length: Option<String>,
    /// `Transfer-Encoding` header.
    pub transfer_encoding: Option<String>,
}

/// Parses a request head from the start of `buf`.
///
/// `Ok(None)`: incomplete, read more (the caller enforces the byte limit through
/// [`HttpError::TooLarge`] returned here once `buf` exceeds it). `Ok(Some((head, n)))`: the
/// head ends at byte `n`; bytes after it belong to the next protocol.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; limits::HANDSHAKE_HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= limits::HANDSHAKE_BYTES_MAX => return Err(HttpError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooLarge),
        Err(_) => return Err(HttpError::Malformed),
    };
    if n > limits::HANDSHAKE_BYTES_MAX {
        return Err(HttpError::TooLarge);
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (target, None),
    };
    let mut head = Head {
        method: req.method.unwrap_or("").to_string(),
        path: path.to_string(),
        query,
        minor_version: req.version.unwrap_or(0),
        ..Head::default()
    };
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("host") {
            head.hosts += 1;
            continue;
        }
        let slot = match h.name.to_ascii_lowercase().as_str() {
            "upgrade" => &mut head.upgrade,
            "connection" => &mut head.connection,
            "sec-websocket-key" => &mut head.ws_key,
            "sec-websocket-version" => &mut head.ws_version,
            "sec-websocket-protocol" => &mut head.ws_protocol,
            "origin" => &mut head.origin,
            "authorization" => &mut head.authorization,
            "content-length" => &mut head.content_length,
            "transfer-encoding" => &mut head.transfer_encoding,
            _ => continue,
        };
        if slot.is_none() {
            *slot = std::str::from_utf8(h.value).ok().map(|v| v.trim().to_string());
        }
    }
    Ok(Some((head, n)))
}

/// What the server should do with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /healthz`.
    Health,
    /// `GET /metrics` (Prometheus text format).
    Metrics,
    /// `GET /favicon.ico`: answered with nothing (no 404 in every browser console).
    Favicon,
    /// `GET` of an embedded file (the demo page).
    Asset(super::assets::Asset),
    /// `POST /dev/token`: mint a token for `sub` (a random user if `None`); 404 unless the
    /// server runs with dev tokens.
    DevToken(Option<Uuid>),
    /// A WebSocket upgrade on the socket path that passed the checks that come before
    /// authentication (Phoenix order: method, origin, subprotocol, then `vsn` and `connect`).
    Upgrade(Upgrade),
    /// Answer with this status and close.
    Reject(Status, &'static str),
    /// `GET /api/conversations/<uuid>/messages` with valid parameters (token not yet checked).
    History(HistoryRequest),
    /// An `/api/` request refused before authentication or for bad parameters: a JSON error.
    ApiError(Status, &'static str),
    /// A server API request (key not yet checked; a body, if any, not yet read).
    Api(ApiRequest),
}

/// A server API request: what the app backend asks, with its bearer key.
#[derive(Debug, PartialEq, Eq)]
pub struct ApiRequest {
    /// What is asked.
    pub action: ApiAction,
    /// Bearer key from `Authorization`.
    pub key: Option<String>,
    /// The method is the action's (otherwise 405, said only after the key is checked: without
    /// a key the server API does not exist, 404).
    pub method_ok: bool,
}

/// The server API's actions (docs/protocol.md, "Server API").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiAction {
    /// `POST /api/conversations/<id>/messages`: store and broadcast a message (JSON body).
    PostMessage(Uuid),
    /// `DELETE /api/conversations/<id>/members/<user>`.
    RemoveMember(Uuid, Uuid),
    /// `POST /api/users/<user>/disconnect`.
    Disconnect(Uuid),
}

impl ApiAction {
    /// The label of `nexus_api_requests_total`.
    pub fn label(self) -> &'static str {
        match self {
            ApiAction::PostMessage(_) => "message",
            ApiAction::RemoveMember(..) => "remove_member",
            ApiAction::Disconnect(_) => "disconnect",
        }
    }
}

/// A history request, ready for token verification.
#[derive(Debug, PartialEq, Eq)]
pub struct HistoryRequest {
    /// Conversation id from the path.
    pub conversation: Uuid,
    /// Bearer token from `Authorization`.
    pub token: Option<String>,
    /// `before` cursor (a message id).
    pub before: Option<Uuid>,
    /// Page size.
    pub limit: usize,
}

/// The socket path's request, ready for token verification.
#[derive(Debug, PartialEq, Eq)]
pub struct Upgrade {
    /// The `vsn` query parameter, if given.
    pub vsn: Option<String>,
    /// The token (query `token`, else the phoenix.js `authToken` subprotocol entry).
    pub token: Option<String>,
    /// Whether to answer `Sec-WebSocket-Protocol: phoenix`.
    pub protocol_phoenix: bool,
    /// `Sec-WebSocket-Accept`, or why the upgrade headers are invalid (400, checked after
    /// authentication as Phoenix does).
    pub accept: Result<String, &'static str>,
}

/// Path of the WebSocket endpoint (phoenix.js appends `/websocket` to `/socket`).
pub const SOCKET_PATH: &str = "/socket/websocket";
/// Liveness endpoint.
pub const HEALTH_PATH: &str = "/healthz";
/// Prometheus scrape endpoint.
pub const METRICS_PATH: &str = "/metrics";
/// Where browsers look for a page's icon.
pub const FAVICON_PATH: &str = "/favicon.ico";
/// Why an upgrade with another `Sec-WebSocket-Version` is refused (400 naming version 13).
pub const BAD_WS_VERSION: &str = "Sec-WebSocket-Version must be 13";
/// Development token endpoint (only with `--dev-tokens`).
pub const DEV_TOKEN_PATH: &str = "/dev/token";
/// phoenix.js 1.8 `authToken` subprotocol prefix.
pub const AUTH_TOKEN_PREFIX: &str = "base64url.bearer.phx.";

/// Routes a parsed head.
pub fn route(head: &Head, origins: &OriginPolicy) -> Route {
    // RFC 9112 §3.2: an HTTP/1.1 request without exactly one Host is refused.
    if head.minor_version >= 1 && head.hosts != 1 {
        let why = if head.hosts == 0 { "missing Host header" } else { "more than one Host header" };
        return Route::Reject(Status::BAD_REQUEST, why);
    }
    match head.path.as_str() {
        HEALTH_PATH if head.method == "GET" || head.method == "HEAD" => Route::Health,
        HEALTH_PATH => Route::Reject(Status::METHOD_NOT_ALLOWED, "method not allowed"),
        METRICS_PATH if head.method == "GET" => Route::Metrics,
        METRICS_PATH => Route::Reject(Status::METHOD_NOT_ALLOWED, "method not allowed"),
        FAVICON_PATH if head.method == "GET" || head.method == "HEAD" => Route::Favicon,
        DEV_TOKEN_PATH if head.method == "POST" => route_dev_token(head),
        DEV_TOKEN_PATH => Route::Reject(Status::METHOD_NOT_ALLOWED, "method not allowed"),
        SOCKET_PATH => route_socket(head, origins),
        path if path.starts_with(API_PREFIX) => route_conversations(head, &path[API_PREFIX.len()..]),
        path if path.starts_with(USERS_PREFIX) => route_users(head, &path[USERS_PREFIX.len()..]),
        // A WebSocket upgrade anywhere but the socket path finds no endpoint there.
        path => match super::assets::get(path) {
            Some(asset) if head.method == "GET" && head.upgrade.is_none() => Route::Asset(asset),
            Some(_) if head.upgrade.is_some() => Route::Reject(Status::NOT_FOUND, "not found"),
            Some(_) => Route::Reject(Status::METHOD_NOT_ALLOWED, "method not allowed"),
            None => Route::Reject(Status::NOT_FOUND, "not found"),
        },
    }
}

/// Prefix of the conversation endpoints: `/api/conversations/<uuid>/messages` (history,
/// and the server API's post) and `/api/conversations/<uuid>/members/<uuid>`.
pub const API_PREFIX: &str = "/api/conversations/";
/// Prefix of the server API's user endpoint: `/api/users/<uuid>/disconnect`.
pub const USERS_PREFIX: &str = "/api/users/";

/// The bearer token of `Authorization`.
fn bearer(head: &Head) -> Option<String> {
    head.authorization.as_deref().and_then(|v| {
        let (scheme, token) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_string())
    })
}

fn api(head: &Head, method: &str, action: ApiAction) -> Route {
    Route::Api(ApiRequest { action, key: bearer(head), method_ok: head.method == method })
}

fn route_conversations(head: &Head, rest: &str) -> Route {
    const NOT_FOUND: Route = Route::ApiError(Status::NOT_FOUND, "not found");
    let mut parts = rest.split('/');
    let (Some(id), Some(what), member, None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return NOT_FOUND;
    };
    let Some(conversation) = ids::parse_canonical_uuid(id) else { return NOT_FOUND };
    match (what, member) {
        ("messages", None) if head.method == "POST" => api(head, "POST", ApiAction::PostMessage(conversation)),
        ("messages", None) => route_history(head, conversation),
        ("members", Some(user)) => match ids::parse_canonical_uuid(user) {
            Some(user) => api(head, "DELETE", ApiAction::RemoveMember(conversation, user)),
            None => NOT_FOUND,
        },
        _ => NOT_FOUND,
    }
}

fn route_users(head: &Head, rest: &str) -> Route {
    match rest.split_once('/') {
        Some((id, "disconnect")) => match ids::parse_canonical_uuid(id) {
            Some(user) => api(head, "POST", ApiAction::Disconnect(user)),
            None => Route::ApiError(Status::NOT_FOUND, "not found"),
        },
        _ => Route::ApiError(Status::NOT_FOUND, "not found"),
    }
}

fn route_history(head: &Head, conversation: Uuid) -> Route {
    if head.method != "GET" {
        return Route::ApiError(Status::METHOD_NOT_ALLOWED, "method not allowed");
    }
    let token = bearer(head);
    let (mut before, mut limit) = (None, limits::HISTORY_LIMIT_DEFAULT);
    for (k, v) in form_urlencoded::parse(head.query.as_deref().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "before" => match ids::parse_canonical_uuid(&v) {
                Some(id) => before = Some(id),
                None => return Route::ApiError(Status::BAD_REQUEST, "before must be a message id"),
            },
            "limit" => match v.parse::<usize>() {
                Ok(n) if (1..=limits::HISTORY_LIMIT_MAX).contains(&n) => limit = n,
                _ => return Route::ApiError(Status::BAD_REQUEST, limits::HISTORY_LIMIT_INVALID),
            },
            _ => {}
        }
    }
    Route::History(HistoryRequest { conversation, token, before, limit })
}

/// `?sub=<uuid>` picks the user; without it the server picks a random one.
fn route_dev_token(head: &Head) -> Route {
    let sub = form_urlencoded::parse(head.query.as_deref().unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "sub")
        .map(|(_, v)| crate::ids::parse_canonical_uuid(&v));
    match sub {
        None => Route::DevToken(None),
        Some(Some(id)) => Route::DevToken(Some(id)),
        Some(None) => Route::ApiError(Status::BAD_REQUEST, "sub must be a canonical UUID"),
    }
}

fn route_socket(head: &Head, origins: &OriginPolicy) -> Route {
    if head.method != "GET" {
        return Route::Reject(Status::BAD_REQUEST, "the socket endpoint takes GET");
    }
    if !origins.allows(head.origin.as_deref()) {
        return Route::Reject(Status::FORBIDDEN, "origin not allowed");
    }
    let offered = match Subprotocols::parse(head.ws_protocol.as_deref()) {
        Ok(offered) => offered,
        Err(why) => return Route::Reject(Status::FORBIDDEN, why),
    };
    let (mut token, mut vsn) = (None, None);
    if let Some(q) = &head.query {
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            match k.as_ref() {
                "token" if token.is_none() => token = Some(v.into_owned()),
                "vsn" if vsn.is_none() => vsn = Some(v.into_owned()),
                _ => {}
            }
        }
    }
    Route::Upgrade(Upgrade {
        vsn,
        token: token.or(offered.token),
        protocol_phoenix: offered.phoenix,
        accept: accept_key(head),
    })
}

/// The `Sec-WebSocket-Protocol` offer after taking the bearer token out of it.
struct Subprotocols {
    token: Option<String>,
    phoenix: bool,
}

impl Subprotocols {
    fn parse(header: Option<&str>) -> Result<Subprotocols, &'static str> {
        let mut out = Subprotocols { token: None, phoenix: false };
        let mut others = 0;
        for entry in header.unwrap_or("").split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if let Some(encoded) = entry.strip_prefix(AUTH_TOKEN_PREFIX) {
                if out.token.is_some() {
                    return Err("more than one auth token offered");
                }
                out.token = Some(decode_token(encoded).ok_or("auth token is not base64")?);
            } else if entry == "phoenix" {
                out.phoenix = true;
            } else {
                others += 1;
            }
        }
        // Phoenix negotiates against ["phoenix"]: offering only other protocols is refused.
        if others > 0 && !out.phoenix {
            return Err("no supported subprotocol offered");
        }
        Ok(out)
    }
}

/// Decodes the subprotocol token: phoenix.js uses `btoa` (standard alphabet) without padding;
/// the URL-safe alphabet and padding are accepted too.
fn decode_token(encoded: &str) -> Option<String> {
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
    use base64::engine::DecodePaddingMode;
    let cfg = GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let std = GeneralPurpose::new(&base64::alphabet::STANDARD, cfg);
    let url = GeneralPurpose::new(&base64::alphabet::URL_SAFE, cfg);
    let bytes = std.decode(encoded).or_else(|_| url.decode(encoded)).ok()?;
    String::from_utf8(bytes).ok()
}

fn has_token(list: Option<&str>, token: &str) -> bool {
    list.is_some_and(|l| l.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// RFC 6455 §4.2.1 checks; the accept key on success.
fn accept_key(head: &Head) -> Result<String, &'static str> {
    if head.minor_version < 1 {
        return Err("WebSocket needs HTTP/1.1");
    }
    if !has_token(head.upgrade.as_deref(), "websocket") {
        return Err("missing Upgrade: websocket");
    }
    if !has_token(head.connection.as_deref(), "upgrade") {
        return Err("missing Connection: Upgrade");
    }
    if head.ws_version.as_deref() != Some("13") {
        return Err(BAD_WS_VERSION);
    }
    let key = head.ws_key.as_deref().ok_or("missing Sec-WebSocket-Key")?;
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(raw) if raw.len() == 16 => Ok(tungstenite::handshake::derive_accept_key(key.as_bytes())),
        _ => Err("invalid Sec-WebSocket-Key"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &str = "GET /socket/websocket?token=abc&vsn=2.0.0 HTTP/1.1\r\nHost: x\r\n\
        Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

    fn parse(s: &str) -> Head {
        parse_head(s.as_bytes()).expect("valid").expect("complete").0
    }

    #[test]
    fn incomplete_until_blank_line() {
        for cut in 0..UPGRADE.len() {
            assert_eq!(parse_head(&UPGRADE.as_bytes()[..cut]).map(|o| o.is_none()), Ok(true));
        }
    }

    #[test]
    fn upgrade_route() {
        let head = parse(UPGRADE);
        let Route::Upgrade(up) = route(&head, &OriginPolicy::default()) else { panic!() };
        assert_eq!(up.token.as_deref(), Some("abc"));
        assert_eq!(up.vsn.as_deref(), Some("2.0.0"));
        assert_eq!(up.accept.as_deref(), Ok("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
        assert!(!up.protocol_phoenix);
    }

    #[test]
    fn auth_token_subprotocol() {
        // btoa("a.b?c>") = "YS5iP2M+" (standard alphabet with '+').
        let req = UPGRADE
            .replace("token=abc&", "")
            .replace("Host: x\r\n", "Host: x\r\nSec-WebSocket-Protocol: phoenix, base64url.bearer.phx.YS5iP2M+\r\n");
        let Route::Upgrade(up) = route(&parse(&req), &OriginPolicy::default()) else { panic!() };
        assert_eq!(up.token.as_deref(), Some("a.b?c>"));
        assert!(up.protocol_phoenix);
        let url_safe = req.replace("YS5iP2M+", "YS5iP2M-");
        let Route::Upgrade(up) = route(&parse(&url_safe), &OriginPolicy::default()) else { panic!() };
        assert_eq!(up.token.as_deref(), Some("a.b?c>"));
    }

    #[test]
    fn rejections() {
        let p = OriginPolicy::default();
        let post = UPGRADE.replacen("GET", "POST", 1);
        assert!(matches!(route(&parse(&post), &p), Route::Reject(s, _) if s == Status::BAD_REQUEST));
        let other = UPGRADE.replace("/socket/websocket", "/socket/longpoll");
        assert!(matches!(route(&parse(&other), &p), Route::Reject(s, _) if s == Status::NOT_FOUND));
        let proto = UPGRADE.replace("Host: x\r\n", "Host: x\r\nSec-WebSocket-Protocol: mqtt\r\n");
        assert!(matches!(route(&parse(&proto), &p), Route::Reject(s, _) if s == Status::FORBIDDEN));
        let bad_b64 =
            UPGRADE.replace("Host: x\r\n", "Host: x\r\nSec-WebSocket-Protocol: phoenix, base64url.bearer.phx.%%%\r\n");
        assert!(matches!(route(&parse(&bad_b64), &p), Route::Reject(s, _) if s == Status::FORBIDDEN));
        let no_key = UPGRADE.replace("Sec-WebSocket-Key", "X-Key");
        let Route::Upgrade(up) = route(&parse(&no_key), &p) else { panic!() };
        assert!(up.accept.is_err());
    }

    #[test]
    fn history_route() {
        let p = OriginPolicy::default();
        let id = "0195f1b2-7c3a-7d4e-8f00-123456789abc";
        let get =
            |target: &str| parse(&format!("GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0k\r\n\r\n"));
        let Route::History(h) = route(&get(&format!("/api/conversations/{id}/messages?limit=5&before={id}")), &p)
        else {
            panic!()
        };
        assert_eq!((h.token.as_deref(), h.limit, h.before.is_some()), (Some("t0k"), 5, true));
        let bad = |target: &str| matches!(route(&get(target), &p), Route::ApiError(s, _) if s == Status::BAD_REQUEST);
        assert!(bad(&format!("/api/conversations/{id}/messages?limit=0")));
        assert!(bad(&format!("/api/conversations/{id}/messages?limit=201")));
        assert!(bad(&format!("/api/conversations/{id}/messages?limit=x")));
        assert!(bad(&format!("/api/conversations/{id}/messages?before=nope")));
        let missing = |target: &str| matches!(route(&get(target), &p), Route::ApiError(s, _) if s == Status::NOT_FOUND);
        assert!(missing("/api/conversations/nope/messages"));
        assert!(missing(&format!("/api/conversations/{id}/other")));
        assert!(missing(&format!("/api/conversations/{id}")));
        let max = limits::HISTORY_LIMIT_MAX;
        assert!(limits::HISTORY_LIMIT_INVALID.ends_with(&format!(" 1 to {max}")), "the answer names the limit");
        assert!(!bad(&format!("/api/conversations/{id}/messages?limit={max}")));
    }

    #[test]
    fn oversized_head() {
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(limits::HANDSHAKE_BYTES_MAX));
        assert_eq!(parse_head(big.as_bytes()).map(|_| ()), Err(HttpError::TooLarge));
        let garbage = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
        assert_eq!(parse_head(garbage).map(|_| ()), Err(HttpError::Malformed));
    }
}
