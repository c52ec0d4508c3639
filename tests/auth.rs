//! Token authentication of the WebSocket upgrade: where the token comes from (query, then the
//! phoenix.js `authToken` subprotocol entry), what is accepted (HS256, UUID `sub`, `exp`/`nbf`
//! enforced, other claims ignored) and the 403 + close answer for everything else.

mod common;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use jsonwebtoken::Algorithm;

use common::*;

const HS256_HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

/// Asserts the upgrade with `query` and `extra` headers is refused with 403 and a close.
fn assert_refused(port: u16, case: &str, query: &str, extra: &[&str]) {
    let mut resp = http_raw(port, upgrade_request(port, query, extra).as_bytes());
    assert_eq!(
        resp.status, 403,
        "case {case:?} must be refused with 403, got {:?}",
        resp.status_line
    );
    resp.assert_error(403);
}

/// Asserts the upgrade succeeds and the socket answers a heartbeat.
fn assert_accepted(port: u16, case: &str, query: &str, extra: &[&str]) {
    let resp = http_raw(port, upgrade_request(port, query, extra).as_bytes());
    assert_eq!(
        resp.status, 101,
        "case {case:?} must be accepted, got {:?} {:?}",
        resp.status_line,
        resp.body_text()
    );
    let mut ws = RawWs::from_response(resp);
    ws.heartbeat("1");
}

fn refused_token(port: u16, case: &str, token: &str) {
    assert_refused(port, case, &format!("vsn=2.0.0&token={token}"), &[]);
}

fn claims(sub: &str) -> String {
    format!(r#"{{"sub":"{sub}","exp":{}}}"#, now_secs() + 3600)
}

fn bearer(encoded: &str) -> String {
    format!("Sec-WebSocket-Protocol: phoenix, base64url.bearer.phx.{encoded}")
}

/// A valid token whose base64 encodings satisfy `pred` (padding claim varied until they do).
fn token_where(sub: &str, pred: impl Fn(&str) -> bool) -> String {
    for k in 0..300 {
        let t = token_with_claims(&format!(
            r#"{{"sub":"{sub}","exp":{},"pad":"{}"}}"#,
            now_secs() + 3600,
            "x".repeat(k)
        ));
        if pred(&t) {
            return t;
        }
    }
    panic!("no token matched the predicate");
}

#[test]
fn accepts_valid_tokens_in_the_query() {
    let server = start_server(&[]);
    let port = server.port;
    let sub = new_sub();
    assert_accepted(port, "exp in the future", &format!("vsn=2.0.0&token={}", token(&sub)), &[]);
    assert_accepted(
        port,
        "no exp",
        &format!("vsn=2.0.0&token={}", token_with_claims(&format!(r#"{{"sub":"{sub}"}}"#))),
        &[],
    );
    let v7 = uuid::Uuid::now_v7().to_string();
    assert_accepted(port, "UUIDv7 sub", &format!("vsn=2.0.0&token={}", token(&v7)), &[]);
    let now = now_secs();
    let extra = token_with_claims(&format!(
        r#"{{"sub":"{sub}","exp":{},"nbf":{},"iat":{now},"iss":"someone","aud":"something","name":"ann"}}"#,
        now + 3600,
        now - 10
    ));
    assert_accepted(port, "other claims ignored", &format!("vsn=2.0.0&token={extra}"), &[]);
}

#[test]
fn refuses_missing_and_garbage_tokens() {
    let server = start_server(&[]);
    let port = server.port;
    assert_refused(port, "no token", "vsn=2.0.0", &[]);
    assert_refused(port, "no token, no vsn", "", &[]);
    refused_token(port, "empty token", "");
    for garbage in ["not-a-jwt", "a.b.c", "...", "eyJhbGciOiJIUzI1NiJ9.e30", "%00%01"] {
        refused_token(port, garbage, garbage);
    }
}

#[test]
fn refuses_bad_signatures() {
    let server = start_server(&[]);
    let port = server.port;
    let sub = new_sub();
    let good = token(&sub);

    let wrong_secret = craft_jwt(
        HS256_HEADER,
        &claims(&sub),
        b"another-secret-another-secret-another-secret",
        Some(Algorithm::HS256),
    );
    refused_token(port, "wrong secret", &wrong_secret);

    // Claims of another user with the first user's signature.
    let other = token(&new_sub());
    let parts: Vec<&str> = good.split('.').collect();
    let other_parts: Vec<&str> = other.split('.').collect();
    let tampered = format!("{}.{}.{}", parts[0], other_parts[1], parts[2]);
    refused_token(port, "tampered claims", &tampered);

    // First signature character changed (changes real signature bits, not padding bits).
    let sig = parts[2];
    let flipped = if sig.starts_with('A') { "B" } else { "A" };
    let corrupted = format!("{}.{}.{flipped}{}", parts[0], parts[1], &sig[1..]);
    refused_token(port, "corrupted signature", &corrupted);

    refused_token(port, "signature stripped", &format!("{}.{}.", parts[0], parts[1]));
    refused_token(port, "two parts", &format!("{}.{}", parts[0], parts[1]));
}

#[test]
fn refuses_algorithms_other_than_hs256() {
    let server = start_server(&[]);
    let port = server.port;
    let sub = new_sub();
    let secret = SECRET.as_bytes();
    let c = claims(&sub);
    let cases = [
        (
            "HS384",
            craft_jwt(r#"{"alg":"HS384","typ":"JWT"}"#, &c, secret, Some(Algorithm::HS384)),
        ),
        (
            "HS512",
            craft_jwt(r#"{"alg":"HS512","typ":"JWT"}"#, &c, secret, Some(Algorithm::HS512)),
        ),
        (
            "RS256 header, HMAC signature",
            craft_jwt(r#"{"alg":"RS256","typ":"JWT"}"#, &c, secret, Some(Algorithm::HS256)),
        ),
        ("alg none", craft_jwt(r#"{"alg":"none","typ":"JWT"}"#, &c, secret, None)),
        ("alg None", craft_jwt(r#"{"alg":"None","typ":"JWT"}"#, &c, secret, None)),
        (
            "alg none with an HS256 signature",
            craft_jwt(r#"{"alg":"none","typ":"JWT"}"#, &c, secret, Some(Algorithm::HS256)),
        ),
        (
            "no alg",
            craft_jwt(r#"{"typ":"JWT"}"#, &c, secret, Some(Algorithm::HS256)),
        ),
    ];
    for (case, tok) in cases {
        refused_token(port, case, &tok);
    }
}

#[test]
fn refuses_expired_and_not_yet_valid_tokens() {
    let server = start_server(&[]);
    let port = server.port;
    let sub = new_sub();
    let now = now_secs();
    refused_token(
        port,
        "expired a minute ago",
        &token_with_claims(&format!(r#"{{"sub":"{sub}","exp":{}}}"#, now - 60)),
    );
    refused_token(
        port,
        "expired long ago",
        &token_with_claims(&format!(r#"{{"sub":"{sub}","exp":1000}}"#)),
    );
    refused_token(
        port,
        "nbf in an hour",
        &token_with_claims(&format!(
            r#"{{"sub":"{sub}","exp":{},"nbf":{}}}"#,
            now + 7200,
            now + 3600
        )),
    );
}

#[test]
fn refuses_missing_or_non_uuid_subjects() {
    let server = start_server(&[]);
    let port = server.port;
    let exp = now_secs() + 3600;
    let id = uuid::Uuid::new_v4();
    let cases = [
        ("missing sub", format!(r#"{{"exp":{exp}}}"#)),
        ("null sub", format!(r#"{{"sub":null,"exp":{exp}}}"#)),
        ("numeric sub", format!(r#"{{"sub":42,"exp":{exp}}}"#)),
        ("empty sub", format!(r#"{{"sub":"","exp":{exp}}}"#)),
        ("name sub", format!(r#"{{"sub":"alice","exp":{exp}}}"#)),
        ("braced uuid", format!(r#"{{"sub":"{{{id}}}","exp":{exp}}}"#)),
        (
            "uuid without hyphens",
            format!(r#"{{"sub":"{}","exp":{exp}}}"#, id.simple()),
        ),
        ("urn uuid", format!(r#"{{"sub":"{}","exp":{exp}}}"#, id.urn())),
        (
            "uuid with trailing text",
            format!(r#"{{"sub":"{id}x","exp":{exp}}}"#),
        ),
    ];
    for (case, c) in cases {
        refused_token(port, case, &token_with_claims(&c));
    }
}

#[test]
fn token_from_subprotocol_standard_alphabet() {
    let server = start_server(&[]);
    let port = server.port;
    // phoenix.js sends btoa(token) without '=': the standard alphabet, so pick a token whose
    // encoding really contains '+' or '/'.
    let tok = token_where(&new_sub(), |t| {
        STANDARD_NO_PAD.encode(t).contains(['+', '/'])
    });
    let encoded = STANDARD_NO_PAD.encode(&tok);
    let protocol = format!("base64url.bearer.phx.{encoded}");
    let mut client = try_connect(port, "vsn=2.0.0", &[], &["phoenix", &protocol])
        .unwrap_or_else(|e| panic!("authToken handshake refused: {e:?}"));
    let answered: Vec<_> = client
        .response
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .map(|v| v.to_str().unwrap_or("<non-ascii>").to_string())
        .collect();
    assert_eq!(answered, vec!["phoenix".to_string()], "only `phoenix` may be echoed");
    client.heartbeat("1");
}

#[test]
fn token_from_subprotocol_url_safe_and_padded() {
    let server = start_server(&[]);
    let port = server.port;
    let tok = token_where(&new_sub(), |t| {
        URL_SAFE_NO_PAD.encode(t).contains(['-', '_']) && t.len() % 3 != 0
    });
    let url_safe = URL_SAFE_NO_PAD.encode(&tok);
    let resp = http_raw(
        port,
        upgrade_request(port, "vsn=2.0.0", &[&bearer(&url_safe)]).as_bytes(),
    );
    assert_eq!(resp.status, 101, "url-safe alphabet: {:?}", resp.status_line);
    assert_eq!(resp.header("sec-websocket-protocol"), Some("phoenix"));
    RawWs::from_response(resp).heartbeat("1");

    let padded = STANDARD.encode(&tok);
    assert!(padded.ends_with('='));
    let resp = http_raw(
        port,
        upgrade_request(port, "vsn=2.0.0", &[&bearer(&padded)]).as_bytes(),
    );
    assert_eq!(resp.status, 101, "padded: {:?}", resp.status_line);
    assert_eq!(resp.header("sec-websocket-protocol"), Some("phoenix"));
    RawWs::from_response(resp).heartbeat("1");
}

#[test]
fn phoenix_subprotocol_is_echoed_with_a_query_token() {
    let server = start_server(&[]);
    let port = server.port;
    let resp = http_raw(
        port,
        upgrade_request(
            port,
            &v2_query(),
            &["Sec-WebSocket-Protocol: phoenix"],
        )
        .as_bytes(),
    );
    assert_eq!(resp.status, 101, "{:?}", resp.status_line);
    assert_eq!(resp.headers_named("sec-websocket-protocol"), vec!["phoenix"]);
    RawWs::from_response(resp).heartbeat("1");
}

#[test]
fn refuses_bad_subprotocol_tokens() {
    let server = start_server(&[]);
    let port = server.port;
    assert_refused(port, "not base64", "vsn=2.0.0", &[&bearer("!!!not*base64!!!")]);
    assert_refused(
        port,
        "base64 of garbage",
        "vsn=2.0.0",
        &[&bearer(&STANDARD_NO_PAD.encode("garbage"))],
    );
    assert_refused(port, "empty bearer", "vsn=2.0.0", &[&bearer("")]);
    let wrong = craft_jwt(
        HS256_HEADER,
        &claims(&new_sub()),
        b"wrong-secret-wrong-secret-wrong-secret!!",
        Some(Algorithm::HS256),
    );
    assert_refused(
        port,
        "wrong secret",
        "vsn=2.0.0",
        &[&bearer(&STANDARD_NO_PAD.encode(&wrong))],
    );
    assert_refused(
        port,
        "the raw, unencoded JWT",
        "vsn=2.0.0",
        &[&bearer(&token(&new_sub()))],
    );
}

#[test]
fn query_token_comes_first() {
    let server = start_server(&[]);
    let port = server.port;
    let good = STANDARD_NO_PAD.encode(token(&new_sub()));
    // A bad query token is not rescued by a good header token ...
    assert_refused(port, "bad query, good header", "vsn=2.0.0&token=bad", &[&bearer(&good)]);
    // ... and a good query token is used whatever the header holds.
    assert_accepted(
        port,
        "good query, bad header",
        &v2_query(),
        &[&bearer("!!!not*base64!!!")],
    );
}
