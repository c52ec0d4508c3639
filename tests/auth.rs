//! Token authentication of the WebSocket upgrade: where the token comes from (query, then the
//! phoenix.js `authToken` subprotocol entry), what is accepted (HS256, UUID `sub`, `exp`/`nbf`
//! enforced, other claims ignored) and the 403 + close answer for everything else.

mod common;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use jsonwebtoken::Algorithm;
use sonic_rs::JsonValueTrait;

use common::*;

const HS256_HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

/// Asserts the upgrade with `query` and `extra` headers is refused with 403 and a close.
fn assert_refused(port: u16, case: &str, query: &str, extra: &[&str]) {
    let mut resp = http_raw(port, upgrade_request(port, query, extra).as_bytes());
    assert_eq!(resp.status, 403, "case {case:?} must be refused with 403, got {:?}", resp.status_line);
    resp.assert_error(403);
}

/// Asserts the upgrade succeeds and the socket answers a heartbeat.
fn assert_accepted(port: u16, case: &str, query: &str, extra: &[&str]) {
    let resp = http_raw(port, upgrade_request(port, query, extra).as_bytes());
    assert_eq!(resp.status, 101, "case {case:?} must be accepted, got {:?} {:?}", resp.status_line, resp.body_text());
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

/// A valid token for `sub` whose length is not a multiple of 3, so that its base64 form
/// needs padding (a `pad` claim is grown until it does).
fn token_needing_padding(sub: &str) -> String {
    for k in 0..3 {
        let claims = format!(r#"{{"sub":"{sub}","exp":{},"pad":"{}"}}"#, now_secs() + 3600, "x".repeat(k));
        let t = token_with_claims(&claims);
        if !t.len().is_multiple_of(3) {
            return t;
        }
    }
    unreachable!("one of three consecutive lengths is not a multiple of 3");
}

/// Joins a fresh topic, sends a message and returns the `sender_id` the server stamped on it:
/// the `sub` of the token the server authenticated the socket with.
fn authenticated_sub(c: &mut Client) -> String {
    let topic = new_topic();
    c.join(&topic, "1");
    c.send_text(&v2(Some("1"), Some("2"), &topic, "new_msg", r#"{"body":"who am i"}"#));
    let frame = c.recv();
    c.expect(&v2_ok(Some("1"), "2", &topic));
    let v = parse(&frame);
    v[4]["sender_id"].as_str().unwrap_or_else(|| panic!("no sender_id in {frame}")).to_string()
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

    let wrong_secret =
        craft_jwt(HS256_HEADER, &claims(&sub), b"another-secret-another-secret-another-secret", Some(Algorithm::HS256));
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
        ("HS384", craft_jwt(r#"{"alg":"HS384","typ":"JWT"}"#, &c, secret, Some(Algorithm::HS384))),
        ("HS512", craft_jwt(r#"{"alg":"HS512","typ":"JWT"}"#, &c, secret, Some(Algorithm::HS512))),
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
        ("no alg", craft_jwt(r#"{"typ":"JWT"}"#, &c, secret, Some(Algorithm::HS256))),
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
    refused_token(port, "expired long ago", &token_with_claims(&format!(r#"{{"sub":"{sub}","exp":1000}}"#)));
    refused_token(
        port,
        "nbf in an hour",
        &token_with_claims(&format!(r#"{{"sub":"{sub}","exp":{},"nbf":{}}}"#, now + 7200, now + 3600)),
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
        ("uuid without hyphens", format!(r#"{{"sub":"{}","exp":{exp}}}"#, id.simple())),
        ("urn uuid", format!(r#"{{"sub":"{}","exp":{exp}}}"#, id.urn())),
        ("uuid with trailing text", format!(r#"{{"sub":"{id}x","exp":{exp}}}"#)),
    ];
    for (case, c) in cases {
        refused_token(port, case, &token_with_claims(&c));
    }
}

// Note: a JWT only holds `[A-Za-z0-9_.-]`, and base64 of those bytes never produces the
// 62nd/63rd symbols (`+/` or `-_`), so for real tokens the standard and URL-safe alphabets
// coincide; what can differ is padding.

#[test]
fn token_from_subprotocol_unpadded_as_phoenix_js_sends_it() {
    let server = start_server(&[]);
    let port = server.port;
    let sub = new_sub();
    let tok = token_needing_padding(&sub);
    let encoded = STANDARD_NO_PAD.encode(&tok);
    assert!(!encoded.ends_with('='));
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
    assert_eq!(authenticated_sub(&mut client), sub);
}

#[test]
fn token_from_subprotocol_padded() {
    let server = start_server(&[]);
    let port = server.port;
    let tok = token_needing_padding(&new_sub());
    let padded = STANDARD.encode(&tok);
    assert!(padded.ends_with('='));
    let resp = http_raw(port, upgrade_request(port, "vsn=2.0.0", &[&bearer(&padded)]).as_bytes());
    assert_eq!(resp.status, 101, "padded: {:?} {:?}", resp.status_line, resp.body_text());
    assert_eq!(resp.headers_named("sec-websocket-protocol"), vec!["phoenix"]);
    RawWs::from_response(resp).heartbeat("1");
}

#[test]
fn phoenix_subprotocol_is_echoed_with_a_query_token() {
    let server = start_server(&[]);
    let port = server.port;
    let resp = http_raw(port, upgrade_request(port, &v2_query(), &["Sec-WebSocket-Protocol: phoenix"]).as_bytes());
    assert_eq!(resp.status, 101, "{:?}", resp.status_line);
    assert_eq!(resp.headers_named("sec-websocket-protocol"), vec!["phoenix"]);
    RawWs::from_response(resp).heartbeat("1");
}

#[test]
fn refuses_bad_subprotocol_tokens() {
    let server = start_server(&[]);
    let port = server.port;
    assert_refused(port, "not base64", "vsn=2.0.0", &[&bearer("!!!not*base64!!!")]);
    assert_refused(port, "base64 of garbage", "vsn=2.0.0", &[&bearer(&STANDARD_NO_PAD.encode("garbage"))]);
    assert_refused(port, "empty bearer", "vsn=2.0.0", &[&bearer("")]);
    let wrong = craft_jwt(
        HS256_HEADER,
        &claims(&new_sub()),
        b"wrong-secret-wrong-secret-wrong-secret!!",
        Some(Algorithm::HS256),
    );
    assert_refused(port, "wrong secret", "vsn=2.0.0", &[&bearer(&STANDARD_NO_PAD.encode(&wrong))]);
    assert_refused(port, "the raw, unencoded JWT", "vsn=2.0.0", &[&bearer(&token(&new_sub()))]);
}

#[test]
fn query_token_comes_first() {
    let server = start_server(&[]);
    let port = server.port;
    let header_sub = new_sub();
    let header_token = STANDARD_NO_PAD.encode(token(&header_sub));
    let protocol = format!("base64url.bearer.phx.{header_token}");
    // A bad query token is not rescued by a good header token ...
    assert_refused(port, "bad query, good header", "vsn=2.0.0&token=bad", &[&bearer(&header_token)]);
    // ... and with two good tokens the query's user is the one authenticated.
    let query_sub = new_sub();
    let mut c = try_connect(port, &format!("vsn=2.0.0&token={}", token(&query_sub)), &[], &["phoenix", &protocol])
        .unwrap_or_else(|e| panic!("two valid tokens refused: {e:?}"));
    assert_eq!(c.response_header("sec-websocket-protocol").as_deref(), Some("phoenix"));
    assert_eq!(authenticated_sub(&mut c), query_sub);
}
