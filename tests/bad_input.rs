//! The bad-input matrix (issue 6, item 5): every hostile input we know of, each on its own
//! fresh connection, each checked against its documented answer (exact HTTP status and body,
//! exact reply frames, exact close codes) — while a healthy client on the same core
//! (`NEXUS_WORKERS=1`) keeps chatting in a closed loop and must get every one of its messages,
//! in order, with no round trip over [`LATENCY_BOUND`].
//!
//! Layout of the main test:
//! - a healthy thread joins a topic and loops `new_msg` → own broadcast → ack, paced at most
//!   one message per [`HEALTHY_PERIOD`] so it stays far under the per-socket rate limit
//!   (`NEXUS_MSG_RATE`, 1000/s) that is itself one of the inputs checked here;
//! - two slowloris threads (one dribbling an endless header a byte per 500 ms, one silent)
//!   that must be dropped by the server at the handshake deadline (10 s, `limits.rs`), which
//!   sets the test's length (~10 s);
//! - the main thread runs the matrix (HTTP, tokens, frames on an open socket) pass after pass
//!   until the slowloris connections are gone, so the healthy client is under attack the
//!   whole time. At the end: every healthy message was broadcast back in order, acknowledged
//!   and stored, and the closes were counted by reason in `/metrics` (exactly, per pass).
//!
//! The first pass's answers are printed as a table (`--nocapture`), with the healthy client's
//! round-trip p50/p99/max. Deeply nested JSON has its own test
//! (`deeply_nested_json_does_not_abort_the_server`): it once aborted the whole server.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::Algorithm;

use common::*;

/// Least time between the starts of two healthy round trips (≤ 500 msg/s, half the default
/// per-socket rate, so the healthy client can never be rate limited).
const HEALTHY_PERIOD: Duration = Duration::from_millis(2);

/// Healthy round trips before the attack starts (the undisturbed baseline).
const BASELINE_MESSAGES: usize = 200;

/// Sanity bound on one healthy round trip (send → own broadcast → ack). Not a latency target:
/// a hostile input that stalls the shared core would blow through it.
const LATENCY_BOUND: Duration = Duration::from_secs(1);

/// The server's handshake deadline (`limits::HANDSHAKE_TIMEOUT`) and how late (sweep every
/// 250 ms, scheduling) the drop may come.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
const HANDSHAKE_DROP_SLACK: Duration = Duration::from_secs(2);

/// The whole test must end within this.
const TEST_BUDGET: Duration = Duration::from_secs(40);

/// Most passes of the matrix while the slowloris connections wait for their drop.
const MAX_PASSES: u64 = 100;

/// Default limits the matrix runs into (README "Configuration").
const MAX_CHANNELS: usize = 100;
const MSG_RATE: usize = 1000;
const STRIKES: usize = 100;
const MAX_FRAME: usize = 65_536;

const HS256: &str = r#"{"alg":"HS256","typ":"JWT"}"#;
const BAD_BODY: &str = "body must be a non-empty string";

// ---------------------------------------------------------------------------------------------
// The observed-answer table
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Matrix {
    rows: Vec<(String, String, String)>,
}

impl Matrix {
    fn row(&mut self, group: &str, input: impl Into<String>, answer: impl Into<String>) {
        self.rows.push((group.to_string(), input.into(), answer.into()));
    }

    fn print(&self) {
        eprintln!("\nbad-input matrix ({} inputs):", self.rows.len());
        eprintln!("| group | input | answer |\n|---|---|---|");
        for (g, i, a) in &self.rows {
            eprintln!("| {g} | {} | {} |", i.replace('|', "\\|"), a.replace('|', "\\|"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Healthy client
// ---------------------------------------------------------------------------------------------

struct HealthyReport {
    topic: String,
    sent: usize,
    /// `(start, round trip)` of every message.
    latencies: Vec<(Instant, Duration)>,
}

/// Joins a topic and runs closed-loop round trips until `stop`; panics on any frame that is
/// not its own next broadcast followed by its ack. Signals `ready` after
/// [`BASELINE_MESSAGES`] round trips.
fn healthy(port: u16, stop: Arc<AtomicBool>, ready: mpsc::Sender<()>) -> HealthyReport {
    let sub = new_sub();
    let topic = new_topic();
    let mut c = connect_v2(port, &sub);
    c.join(&topic, "1");
    let mut latencies = Vec::new();
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let body = format!("h-{n}");
        c.send_text(&new_msg_push("1", &format!("h{n}"), &topic, &body));
        let frame = c.recv();
        let live = parse_live(&frame, &topic);
        assert_eq!((live.text.as_str(), live.sender.as_str()), (body.as_str(), sub.as_str()), "healthy broadcast {n}");
        c.expect(&v2_ok(Some("1"), &format!("h{n}"), &topic));
        let took = started.elapsed();
        latencies.push((started, took));
        n += 1;
        if n == BASELINE_MESSAGES {
            let _ = ready.send(());
        }
        // Pacing only (stay under the rate limit), not synchronization.
        if let Some(rest) = HEALTHY_PERIOD.checked_sub(started.elapsed()) {
            thread::sleep(rest);
        }
    }
    // Still answering after everything.
    c.heartbeat("last");
    HealthyReport { topic, sent: n, latencies }
}

// ---------------------------------------------------------------------------------------------
// Slowloris
// ---------------------------------------------------------------------------------------------

/// Opens a connection that never finishes its request head (dribbling one byte per 500 ms of
/// an endless header when `dribble`, else sending nothing) and returns how long the server
/// took to close it. The wait for the next byte is a read with a timeout, so the close is
/// seen as soon as it happens. Panics if the server sends anything.
fn slowloris(port: u16, dribble: bool) -> Duration {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let started = Instant::now();
    if dribble {
        let head = format!("GET /socket/websocket?{} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ", v2_query());
        s.write_all(head.as_bytes()).expect("write head start");
    }
    let mut buf = [0u8; 256];
    let mut dribbled = 0;
    loop {
        assert!(
            started.elapsed() < HANDSHAKE_DEADLINE + HANDSHAKE_DROP_SLACK,
            "slowloris (dribble {dribble}) still connected after {:?}",
            started.elapsed()
        );
        s.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
        match s.read(&mut buf) {
            Ok(0) => return started.elapsed(),
            Ok(n) => panic!("server answered a never-finished head: {:?}", String::from_utf8_lossy(&buf[..n])),
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => {
                return started.elapsed()
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if dribble {
                    let _ = s.write_all(b"a");
                    dribbled += 1;
                    assert!(dribbled < 100);
                }
            }
            Err(e) => panic!("slowloris read: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Sends `request` raw and asserts an HTTP error answer: `status`, exact `body`,
/// content-length, `connection: close`, then the server's close.
#[track_caller]
fn http_error(m: &mut Matrix, port: u16, input: &str, request: &[u8], status: u16, body: &str) {
    let mut resp = http_raw(port, request);
    assert_eq!((resp.status, resp.body_text().as_str()), (status, body), "{input}: {:?}", resp.status_line);
    resp.assert_error(status);
    m.row("HTTP", input, format!("{} `{body}`, closed", resp.status_line.trim_start_matches("HTTP/1.1 ")));
}

/// An upgrade with `query` and `extra` header lines must be refused 403 `forbidden`.
#[track_caller]
fn refused(m: &mut Matrix, port: u16, input: &str, query: &str, extra: &[&str]) {
    refused_with(m, port, input, query, extra, "forbidden");
}

#[track_caller]
fn refused_with(m: &mut Matrix, port: u16, input: &str, query: &str, extra: &[&str], body: &str) {
    let mut resp = http_raw(port, upgrade_request(port, query, extra).as_bytes());
    assert_eq!((resp.status, resp.body_text().as_str()), (403, body), "{input}: {:?}", resp.status_line);
    resp.assert_error(403);
    m.row("token", input, format!("403 `{body}`, closed"));
}

fn q(token: &str) -> String {
    format!("vsn=2.0.0&token={token}")
}

fn claims(sub: &str) -> String {
    format!(r#"{{"sub":"{sub}","exp":{}}}"#, now_secs() + 3600)
}

fn bearer(token: &str) -> String {
    format!("Sec-WebSocket-Protocol: phoenix, base64url.bearer.phx.{}", STANDARD_NO_PAD.encode(token))
}

/// A fresh V2 socket for a fresh user.
fn fresh(port: u16) -> Client {
    connect_v2(port, &new_sub())
}

/// Sends `frame` on a fresh socket and asserts it is dropped without an answer: the next
/// frame is the reply to a heartbeat sent after it, and the socket stays open.
#[track_caller]
fn dropped(m: &mut Matrix, port: u16, group: &str, input: &str, frame: &str) {
    let mut c = fresh(port);
    c.send_text(frame);
    c.heartbeat("after");
    m.row(group, input, "dropped (no reply), socket stays open");
}

/// Sends `frame` on a fresh socket (after joining `topic` when given) and asserts the exact
/// `reply`.
#[track_caller]
fn answered(m: &mut Matrix, port: u16, group: &str, input: &str, join: Option<&str>, frame: &str, reply: &str) {
    let mut c = fresh(port);
    if let Some(topic) = join {
        c.join(topic, "1");
    }
    c.roundtrip(frame, reply);
    c.heartbeat("after");
    m.row(group, input, format!("`{reply}`"));
}

/// A 16-bit-or-64-bit-length masked frame header announcing `len` payload bytes.
fn frame_header(fin: bool, opcode: u8, len: u64) -> Vec<u8> {
    let mut out = vec![((fin as u8) << 7) | opcode];
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as u64 {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    out
}

/// Reads frames until the server's close frame; answers it and waits for EOF. Returns the
/// non-presence text frames before it and the close `(code, reason)`.
#[track_caller]
fn texts_until_close(ws: &mut RawWs) -> (Vec<String>, Option<u16>, String) {
    let mut texts = Vec::new();
    loop {
        let f = ws.frame();
        match f.opcode {
            OP_TEXT => {
                let t = f.text();
                if !is_presence(&t) {
                    texts.push(t);
                }
            }
            OP_CLOSE => {
                let (code, reason) = f.close_code();
                ws.send(OP_CLOSE, &close_payload(code.unwrap_or(1000), ""));
                ws.expect_eof();
                return (texts, code, reason);
            }
            _ => panic!("unexpected frame {f:?}"),
        }
    }
}

/// Sends `frame` raw on a fresh socket and asserts the close `code`, then EOF.
#[track_caller]
fn closes(m: &mut Matrix, port: u16, input: &str, bytes: &[u8], code: u16) {
    let mut ws = RawWs::connect(port);
    ws.send_raw(bytes);
    let (texts, got, reason) = texts_until_close(&mut ws);
    assert!(texts.is_empty(), "{input}: frames before the close: {texts:?}");
    assert_eq!(got, Some(code), "{input}: close reason {reason:?}");
    m.row("frame", input, format!("close {code} `{reason}`"));
}

fn rate_limited(join_ref: Option<&str>, r: &str, topic: &str) -> String {
    v2_reply(join_ref, Some(r), topic, "error", r#"{"reason":"rate limited"}"#)
}

/// Checks the tail of a flood's replies: exactly [`STRIKES`] `rate limited` answers in a row
/// (the one before them, if any, is not a refusal), closed with 1008 right after.
#[track_caller]
fn check_rate_limit_tail(what: &str, replies: &[String], is_refusal: impl Fn(usize, &str) -> bool, code: Option<u16>) {
    assert_eq!(code, Some(1008), "{what}: close code");
    assert!(replies.len() >= STRIKES, "{what}: only {} replies", replies.len());
    let tail = replies.len() - STRIKES;
    for (i, r) in replies.iter().enumerate().skip(tail) {
        assert!(is_refusal(i, r), "{what}: reply {i} of the final run is not `rate limited`: {r}");
    }
    if tail > 0 {
        assert!(!is_refusal(tail - 1, &replies[tail - 1]), "{what}: more than {STRIKES} refusals before the close");
    }
}

/// The value of one `/metrics` series (`name{labels}`).
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}")) as u64
}

// ---------------------------------------------------------------------------------------------
// The matrix
// ---------------------------------------------------------------------------------------------

fn http_cases(m: &mut Matrix, port: u16) {
    let query = v2_query();
    let good = upgrade_request(port, &query, &[]);
    let malformed = "malformed request";
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("request line `GARBAGE`", b"GARBAGE\r\n\r\n".to_vec()),
        ("TLS ClientHello bytes", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".to_vec()),
        ("request line `GET / HTTP/9`", b"GET / HTTP/9\r\n\r\n".to_vec()),
        ("request line `GET` only", b"GET\r\n\r\n".to_vec()),
        ("NUL bytes in the request line", b"GET /\x00 HTTP/1.1\r\n\r\n".to_vec()),
        ("header line without a colon", b"GET /socket/websocket HTTP/1.1\r\nno colon here\r\n\r\n".to_vec()),
    ];
    for (input, request) in cases {
        http_error(m, port, input, &request, 400, malformed);
    }

    // Partial head, then the client closes its side: dropped without an answer.
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(&good.as_bytes()[..good.len() / 2]).expect("write half a head");
    s.shutdown(Shutdown::Write).expect("shutdown");
    expect_eof(&mut s, TIMEOUT);
    m.row("HTTP", "half a request head, then FIN", "connection closed, no bytes sent");

    let too_large = "request head too large";
    let padded = upgrade_request(port, &query, &[&format!("X-Padding: {}", "a".repeat(9000))]);
    http_error(m, port, "complete head of 9 KiB (limit 8 KiB)", padded.as_bytes(), 431, too_large);
    let endless = format!("GET /socket/websocket?{query} HTTP/1.1\r\nHost: x\r\nX-Padding: {}", "b".repeat(10_000));
    http_error(m, port, "10 KB head without an end", endless.as_bytes(), 431, too_large);
    let many: Vec<String> = (0..70).map(|i| format!("X-H{i}: v")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let request = upgrade_request(port, &query, &many);
    assert!(request.len() < 8192);
    http_error(m, port, "75 headers in 1.3 KiB (limit 64)", request.as_bytes(), 431, too_large);

    for method in ["POST", "PUT", "DELETE"] {
        let request = upgrade_request_with(port, method, "/socket/websocket", &query, &["Content-Length: 0"]);
        http_error(
            m,
            port,
            &format!("{method} /socket/websocket"),
            request.as_bytes(),
            400,
            "the socket endpoint takes GET",
        );
    }
    for (method, path) in [("POST", "/healthz"), ("DELETE", "/metrics")] {
        let request = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
        http_error(m, port, &format!("{method} {path}"), request.as_bytes(), 405, "method not allowed");
    }
    let api = format!("/api/conversations/{}/messages", uuid::Uuid::new_v4());
    let request = format!("PUT {api} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    http_error(
        m,
        port,
        "PUT /api/conversations/<id>/messages",
        request.as_bytes(),
        405,
        r#"{"error":"method not allowed"}"#,
    );
    // POST there is the server API's, off without NEXUS_API_KEY.
    let request = format!("POST {api} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    http_error(m, port, "POST /api/conversations/<id>/messages", request.as_bytes(), 404, r#"{"error":"not found"}"#);

    for path in ["/", "/nope", "/socket", "/socket/longpoll", "/socket/websocket/x"] {
        let request = upgrade_request_with(port, "GET", path, &query, &[]);
        http_error(m, port, &format!("upgrade on GET {path}"), request.as_bytes(), 404, "not found");
    }

    let cases = [
        ("no Upgrade header", good.replace("Upgrade: websocket\r\n", ""), "missing Upgrade: websocket"),
        ("Upgrade: h2c", good.replace("Upgrade: websocket\r\n", "Upgrade: h2c\r\n"), "missing Upgrade: websocket"),
        ("no Connection header", good.replace("Connection: Upgrade\r\n", ""), "missing Connection: Upgrade"),
        (
            "no Sec-WebSocket-Key",
            good.replace(&format!("Sec-WebSocket-Key: {WS_KEY}\r\n"), ""),
            "missing Sec-WebSocket-Key",
        ),
        ("Sec-WebSocket-Key not 16 bytes of base64", good.replace(WS_KEY, "c2hvcnQ="), "invalid Sec-WebSocket-Key"),
        (
            "Sec-WebSocket-Version: 8",
            good.replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"),
            "Sec-WebSocket-Version must be 13",
        ),
        (
            "Sec-WebSocket-Version: 14",
            good.replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 14"),
            "Sec-WebSocket-Version must be 13",
        ),
        (
            "no Sec-WebSocket-Version",
            good.replace("Sec-WebSocket-Version: 13\r\n", ""),
            "Sec-WebSocket-Version must be 13",
        ),
        ("HTTP/1.0 upgrade", good.replacen("HTTP/1.1", "HTTP/1.0", 1), "WebSocket needs HTTP/1.1"),
    ];
    for (input, request, body) in cases {
        assert_ne!(request, good, "{input} did not change the request");
        http_error(m, port, &format!("{input} (valid token)"), request.as_bytes(), 400, body);
    }
    // RFC 6455 §4.4: the refusal names the version the server speaks.
    let request = good.replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let mut resp = http_raw(port, request.as_bytes());
    assert_eq!(resp.status, 400);
    assert_eq!(resp.header("sec-websocket-version"), Some("13"), "headers {:?}", resp.headers);
    resp.assert_error(400);
    // The upgrade headers are checked after authentication (as Phoenix): no token → 403 first.
    let request = upgrade_request(port, "vsn=2.0.0", &[]).replace("Upgrade: websocket\r\n", "");
    http_error(m, port, "no Upgrade header and no token", request.as_bytes(), 403, "forbidden");
    let request =
        upgrade_request(port, "vsn=2.0.0", &[]).replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    http_error(m, port, "Sec-WebSocket-Version: 8 and no token", request.as_bytes(), 403, "forbidden");
    let request = upgrade_request(port, &format!("vsn=3.0.0&{}", &query[10..]), &[]);
    http_error(m, port, "vsn=3.0.0 (valid token)", request.as_bytes(), 403, "unsupported vsn");
    let request = upgrade_request(port, &query, &["Sec-WebSocket-Protocol: mqtt"]);
    http_error(
        m,
        port,
        "only an unknown subprotocol offered",
        request.as_bytes(),
        403,
        "no supported subprotocol offered",
    );

    // No Host header: 400 (RFC 9112 §3.2), as for two.
    let request = good.replace(&format!("Host: 127.0.0.1:{port}\r\n"), "");
    assert_ne!(request, good);
    http_error(m, port, "upgrade without a Host header", request.as_bytes(), 400, "missing Host header");
    let request = good.replace("Host: ", "Host: a\r\nHost: ");
    http_error(m, port, "upgrade with two Host headers", request.as_bytes(), 400, "more than one Host header");
}

fn token_cases(m: &mut Matrix, port: u16) {
    let sub = new_sub();
    let secret = SECRET.as_bytes();
    let c = claims(&sub);
    let now = now_secs();
    let other_secret = b"the-attackers-own-secret-0123456789abcdef";

    refused(m, port, "no token", "vsn=2.0.0", &[]);
    refused(m, port, "empty token", &q(""), &[]);
    for garbage in ["not-a-jwt", "a.b.c", "...", "%00%01", "eyJhbGciOiJIUzI1NiJ9.e30"] {
        refused(m, port, &format!("garbage token `{garbage}`"), &q(garbage), &[]);
    }
    refused(m, port, "wrong secret", &q(&craft_jwt(HS256, &c, other_secret, Some(Algorithm::HS256))), &[]);
    let expired = token_with_claims(&format!(r#"{{"sub":"{sub}","exp":{}}}"#, now - 60));
    refused(m, port, "expired a minute ago", &q(&expired), &[]);
    let nbf = token_with_claims(&format!(r#"{{"sub":"{sub}","exp":{},"nbf":{}}}"#, now + 7200, now + 3600));
    refused(m, port, "nbf an hour ahead", &q(&nbf), &[]);
    let none_cases = [
        ("alg none, empty signature", craft_jwt(r#"{"alg":"none","typ":"JWT"}"#, &c, secret, None)),
        ("alg None, empty signature", craft_jwt(r#"{"alg":"None"}"#, &c, secret, None)),
        ("alg none, HS256 signature", craft_jwt(r#"{"alg":"none"}"#, &c, secret, Some(Algorithm::HS256))),
        ("no alg, HS256 signature", craft_jwt(r#"{"typ":"JWT"}"#, &c, secret, Some(Algorithm::HS256))),
        ("alg RS256, HS256 signature", craft_jwt(r#"{"alg":"RS256"}"#, &c, secret, Some(Algorithm::HS256))),
        ("alg ES256, HS256 signature", craft_jwt(r#"{"alg":"ES256"}"#, &c, secret, Some(Algorithm::HS256))),
        ("alg HS512, HS256 signature", craft_jwt(r#"{"alg":"HS512"}"#, &c, secret, Some(Algorithm::HS256))),
        ("alg HS512, valid HS512 signature", craft_jwt(r#"{"alg":"HS512"}"#, &c, secret, Some(Algorithm::HS512))),
        ("alg HS384, valid HS384 signature", craft_jwt(r#"{"alg":"HS384"}"#, &c, secret, Some(Algorithm::HS384))),
        ("alg `hs256` (lower case)", craft_jwt(r#"{"alg":"hs256"}"#, &c, secret, Some(Algorithm::HS256))),
    ];
    for (input, tok) in none_cases {
        refused(m, port, input, &q(&tok), &[]);
    }

    // kid / jku / x5u are ignored: with the real secret the token works ...
    let kid_header = r#"{"alg":"HS256","typ":"JWT","kid":"../../attacker","jku":"https://evil.example/jwks.json","x5u":"https://evil.example/x5"}"#;
    let valid = craft_jwt(kid_header, &c, secret, Some(Algorithm::HS256));
    let mut ws = RawWs::from_response(http_raw(port, upgrade_request(port, &q(&valid), &[]).as_bytes()));
    ws.heartbeat("1");
    m.row("token", "valid HS256 token with kid/jku/x5u headers", "accepted (101), headers ignored");
    // ... and signed with the key they point at, it does not.
    let forged = craft_jwt(kid_header, &c, other_secret, Some(Algorithm::HS256));
    refused(m, port, "kid/jku headers, signed with the attacker's key", &q(&forged), &[]);
    let jwk_header = r#"{"alg":"HS256","jwk":{"kty":"oct","k":"YXR0YWNrZXI"}}"#;
    let forged = craft_jwt(jwk_header, &c, b"attacker", Some(Algorithm::HS256));
    refused(m, port, "embedded jwk header, signed with that key", &q(&forged), &[]);

    for (input, sub_json) in [
        ("sub `alice`", r#""alice""#),
        ("sub 42 (number)", "42"),
        ("sub null", "null"),
        ("sub UUID without hyphens", &format!(r#""{}""#, uuid::Uuid::new_v4().simple())),
        ("sub UUID + trailing text", &format!(r#""{}x""#, uuid::Uuid::new_v4())),
    ] {
        let tok = token_with_claims(&format!(r#"{{"sub":{sub_json},"exp":{}}}"#, now + 3600));
        refused(m, port, input, &q(&tok), &[]);
    }
    let tok = token_with_claims(&format!(r#"{{"exp":{}}}"#, now + 3600));
    refused(m, port, "no sub", &q(&tok), &[]);

    // Oversized: the token makes the head larger than 8 KiB → 431 before any token check.
    let huge = format!("{}.{}.{}", "A".repeat(33_000), "B".repeat(33_000), "C".repeat(34_000));
    let request = upgrade_request(port, &q(&huge), &[]);
    let mut resp = http_raw(port, request.as_bytes());
    assert_eq!((resp.status, resp.body_text().as_str()), (431, "request head too large"), "100 KB token");
    resp.assert_error(431);
    m.row("token", "100 KB token in the query", "431 `request head too large`, closed");
    let request = upgrade_request(port, "vsn=2.0.0", &[&bearer(&huge)]);
    let mut resp = http_raw(port, request.as_bytes());
    assert_eq!((resp.status, resp.body_text().as_str()), (431, "request head too large"), "100 KB bearer");
    resp.assert_error(431);
    m.row("token", "100 KB token in the subprotocol", "431 `request head too large`, closed");
    // Large but under the head limit: a 7 KB token is just refused.
    let big = craft_jwt(
        HS256,
        &format!(r#"{{"sub":"{sub}","pad":"{}"}}"#, "p".repeat(5000)),
        other_secret,
        Some(Algorithm::HS256),
    );
    refused(m, port, "7 KB token, wrong secret (head under 8 KiB)", &q(&big), &[]);

    // Token in both the query and the subprotocol: the query's token is the one used.
    let query_sub = new_sub();
    let header_sub = new_sub();
    let both = bearer(&token(&header_sub));
    refused(m, port, "bad query token + valid subprotocol token", &q("bad"), &[&both]);
    let forged = craft_jwt(HS256, &claims(&header_sub), other_secret, Some(Algorithm::HS256));
    let resp = http_raw(port, upgrade_request(port, &q(&token(&query_sub)), &[&bearer(&forged)]).as_bytes());
    assert_eq!(resp.headers_named("sec-websocket-protocol"), vec!["phoenix"]);
    let mut ws = RawWs::from_response(resp);
    ws.heartbeat("1");
    m.row(
        "token",
        "valid query token + forged subprotocol token",
        "accepted (101) as the query's user; bearer ignored",
    );
    let mut c = try_connect(
        port,
        &q(&token(&query_sub)),
        &[],
        &["phoenix", &both["Sec-WebSocket-Protocol: phoenix, ".len()..]],
    )
    .unwrap_or_else(|e| panic!("two valid tokens refused: {e:?}"));
    let topic = new_topic();
    c.join(&topic, "1");
    c.send_text(&new_msg_push("1", "2", &topic, "who"));
    let live = parse_live(&c.recv(), &topic);
    c.expect(&v2_ok(Some("1"), "2", &topic));
    assert_eq!(live.sender, query_sub, "the query token must win");
    m.row("token", "valid query token + valid subprotocol token (other user)", "accepted (101) as the query's user");
    refused_with(
        m,
        port,
        "valid query token + bearer that is not base64",
        &q(&token(&query_sub)),
        &["Sec-WebSocket-Protocol: phoenix, base64url.bearer.phx.!!!"],
        "auth token is not base64",
    );
    let two =
        format!("{}, base64url.bearer.phx.{}", bearer(&token(&header_sub)), STANDARD_NO_PAD.encode(token(&query_sub)));
    refused_with(
        m,
        port,
        "two bearer entries in the subprotocol",
        "vsn=2.0.0",
        &[&two],
        "more than one auth token offered",
    );
}

fn frame_cases(m: &mut Matrix, port: u16) {
    // Invalid JSON, wrong arity, wrong types: dropped, the socket stays open.
    let cases: Vec<(&str, String)> = vec![
        ("invalid JSON `{not json`", "{not json".into()),
        ("truncated JSON `[null,\"1\",`", r#"[null,"1","#.into()),
        ("empty text frame", String::new()),
        ("JSON `null`", "null".into()),
        ("JSON string", r#""heartbeat""#.into()),
        ("V1 object on a V2 socket", v1(None, Some("1"), "phoenix", "heartbeat", "{}")),
        ("empty array", "[]".into()),
        ("3 elements", r#"[null,"1","phoenix"]"#.into()),
        ("4 elements", r#"[null,"1","phoenix","heartbeat"]"#.into()),
        ("6 elements", r#"[null,"1","phoenix","heartbeat",{},"extra"]"#.into()),
        ("topic a number", r#"[null,"1",42,"heartbeat",{}]"#.into()),
        ("topic an array", r#"[null,"1",["phoenix"],"heartbeat",{}]"#.into()),
        ("topic null", r#"[null,"1",null,"heartbeat",{}]"#.into()),
        ("topic an object", r#"[null,"1",{"t":"phoenix"},"heartbeat",{}]"#.into()),
        ("ref a number", r#"[null,1,"phoenix","heartbeat",{}]"#.into()),
        ("join_ref a number", r#"[1,"1","phoenix","heartbeat",{}]"#.into()),
        ("ref an array", r#"[null,["1"],"phoenix","heartbeat",{}]"#.into()),
        ("ref an object", r#"[null,{"r":1},"phoenix","heartbeat",{}]"#.into()),
        ("event a number", r#"[null,"1","phoenix",7,{}]"#.into()),
        ("event null", r#"[null,"1","phoenix",null,{}]"#.into()),
        ("trailing garbage after the array", r#"[null,"1","phoenix","heartbeat",{}]xyz"#.into()),
    ];
    for (input, frame) in &cases {
        dropped(m, port, "frame", input, frame);
    }
    // V1 socket: its own malformed messages.
    for (input, frame) in [
        ("V1 socket: V2 array", heartbeat("1")),
        ("V1 socket: object without `ref`", r#"{"topic":"phoenix","event":"heartbeat","payload":{}}"#.to_string()),
        ("V1 socket: topic a number", r#"{"topic":1,"event":"heartbeat","payload":{},"ref":"1"}"#.to_string()),
    ] {
        let mut c = connect_v1(port, &new_sub());
        c.send_text(&frame);
        c.roundtrip(&v1(None, Some("2"), "phoenix", "heartbeat", "{}"), &v1_reply("phoenix", "2", "ok", "{}"));
        m.row("frame", input, "dropped (no reply), socket stays open");
    }

    // (Deeply nested JSON: `deeply_nested_json_does_not_abort_the_server` below.)

    // Payload not an object: ignored where the event has no payload, echoed by `ping`, refused
    // by `new_msg`.
    for payload in ["[]", "null", "42", r#""text""#] {
        answered(
            m,
            port,
            "frame",
            &format!("heartbeat with payload {payload}"),
            None,
            &v2(None, Some("9"), "phoenix", "heartbeat", payload),
            &heartbeat_reply("9"),
        );
    }
    let topic = new_topic();
    answered(
        m,
        port,
        "frame",
        "phx_join with payload `\"x\"`",
        None,
        &v2(Some("5"), Some("5"), &topic, "phx_join", r#""x""#),
        &v2_ok(Some("5"), "5", &topic),
    );
    answered(
        m,
        port,
        "frame",
        "ping with payload 42 (joined)",
        Some(&topic),
        &v2(Some("1"), Some("9"), &topic, "ping", "42"),
        &v2_reply(Some("1"), Some("9"), &topic, "ok", "42"),
    );

    // new_msg bodies.
    for (input, payload) in [
        ("new_msg body \"\"", r#"{"body":""}"#),
        ("new_msg body 42", r#"{"body":42}"#),
        ("new_msg body null", r#"{"body":null}"#),
        ("new_msg body an object", r#"{"body":{"text":"x"}}"#),
        ("new_msg body an array", r#"{"body":["x"]}"#),
        ("new_msg without body", r#"{"text":"x"}"#),
        ("new_msg payload an array", r#"["x"]"#),
        ("new_msg payload a string", r#""x""#),
        ("new_msg payload null", "null"),
    ] {
        let topic = new_topic();
        answered(
            m,
            port,
            "frame",
            input,
            Some(&topic),
            &v2(Some("1"), Some("3"), &topic, "new_msg", payload),
            &failed_to_save("1", "3", &topic, BAD_BODY),
        );
    }

    // A huge body that fits the frame limit is a normal message.
    let topic = new_topic();
    let mut c = fresh(port);
    c.join(&topic, "1");
    let body = "x".repeat(60_000);
    let frame = new_msg_push("1", "3", &topic, &body);
    assert!(frame.len() < MAX_FRAME);
    c.send_text(&frame);
    let live = parse_live(&c.recv(), &topic);
    assert_eq!(live.text, body);
    c.expect(&v2_ok(Some("1"), "3", &topic));
    m.row("frame", "new_msg with a 60,000-byte body (frame under 64 KiB)", "broadcast + ok (stored)");
    let body = "x".repeat(70_000);
    let frame = client_frame(OP_TEXT, new_msg_push("1", "3", &topic, &body).as_bytes());
    closes(m, port, "new_msg with a 70,000-byte body (frame over 64 KiB)", &frame, 1009);

    // 10 MB frames: only the header and a first chunk are sent; the server closes from the
    // header alone.
    let ten_mb = 10 * 1024 * 1024;
    let chunk = vec![b'a' ^ MASK[0]; 64 * 1024];
    for (input, opcode) in [("10 MB text frame (header + 64 KiB sent)", OP_TEXT), ("10 MB binary frame", OP_BINARY)] {
        let mut bytes = frame_header(true, opcode, ten_mb);
        bytes.extend_from_slice(&chunk);
        closes(m, port, input, &bytes, 1009);
    }
    closes(m, port, "10 MB text frame, header only", &frame_header(true, OP_TEXT, ten_mb), 1009);
    let bytes = frame_header(true, OP_TEXT, u64::MAX >> 1);
    closes(m, port, "frame announcing 2^63-1 bytes", &bytes, 1009);
    let mut bytes = encode_frame(false, 0, OP_TEXT, Some(MASK), &[b'['; 40_000]);
    bytes.extend(frame_header(true, OP_CONT, ten_mb));
    closes(m, port, "40 KB fragment + 10 MB continuation", &bytes, 1009);
    let mut bytes = encode_frame(false, 0, OP_TEXT, Some(MASK), &[b'['; 40_000]);
    bytes.extend(encode_frame(true, 0, OP_CONT, Some(MASK), &[b']'; 40_000]));
    closes(m, port, "two 40 KB fragments (message over 64 KiB)", &bytes, 1009);

    // Invalid UTF-8.
    closes(
        m,
        port,
        "text frame with 0xFF 0xFE",
        &client_frame(OP_TEXT, b"[null,\"\xff\xfe\",\"phoenix\",\"heartbeat\",{}]"),
        1007,
    );
    closes(m, port, "text frame with a lone surrogate", &client_frame(OP_TEXT, b"\"\xed\xa0\x80\""), 1007);
    let mut bytes = encode_frame(false, 0, OP_TEXT, Some(MASK), b"[null,\"\xc3");
    bytes.extend(encode_frame(true, 0, OP_CONT, Some(MASK), b"\x28\"]"));
    closes(m, port, "invalid UTF-8 across two fragments", &bytes, 1007);
    closes(m, port, "close frame with an invalid UTF-8 reason", &client_frame(OP_CLOSE, b"\x03\xe8\xff"), 1007);

    // Binary frames.
    let topic = new_topic();
    let mut push = vec![0u8, 1, 1, topic.len() as u8, 7];
    push.extend_from_slice(b"37");
    push.extend_from_slice(topic.as_bytes());
    push.extend_from_slice(b"new_msg");
    push.extend_from_slice(&[1, 2, 3]);
    let mut c = fresh(port);
    c.send_binary(&push);
    let expected = v2_error(Some("3"), "7", &topic, "binary payload not supported");
    c.expect(&expected);
    c.heartbeat("after");
    m.row("frame", "V2 binary push (kind 0) on an unjoined topic", format!("`{expected}`"));
    let mut c = fresh(port);
    c.join(&topic, "1");
    let mut push = vec![0u8, 0, 1, topic.len() as u8, 7, b'8'];
    push.extend_from_slice(topic.as_bytes());
    push.extend_from_slice(b"new_msg{\"body\":\"x\"}");
    c.send_binary(&push);
    let expected = v2_error(None, "8", &topic, "binary payload not supported");
    c.expect(&expected);
    c.heartbeat("after");
    m.row("frame", "V2 binary push, empty join_ref, joined topic", format!("`{expected}`"));
    for (input, bytes) in [
        ("binary kind 1 (reply layout)", vec![1u8, 1, 1, 1, 1, b'a', b'b', b'c', b'd']),
        ("binary kind 2 (broadcast layout)", vec![2u8, 1, 1, b't', b'e']),
        ("binary push with lengths past the end", vec![0u8, 200, 200, 200, 200, b'x']),
        ("binary push with invalid UTF-8 topic", vec![0u8, 0, 1, 1, 1, b'1', 0xff, b'e']),
        ("empty binary frame", vec![]),
        ("64 KiB of random-ish binary", (0..65_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()),
    ] {
        let mut c = fresh(port);
        c.send_binary(&bytes);
        c.heartbeat("after");
        m.row("frame", input, "dropped (no reply), socket stays open");
    }
    let mut c = connect_v1(port, &new_sub());
    c.send_binary(&[0u8, 1, 1, 1, 1, b'1', b'2', b't', b'e']);
    c.roundtrip(&v1(None, Some("2"), "phoenix", "heartbeat", "{}"), &v1_reply("phoenix", "2", "ok", "{}"));
    m.row("frame", "binary push on a V1 socket", "dropped (no reply), socket stays open");

    // Frames before (or without) a join.
    let topic = new_topic();
    for (input, frame, reply) in [
        (
            "new_msg on an unjoined topic",
            new_msg_push("1", "2", &topic, "hi"),
            v2_error(None, "2", &topic, "unmatched topic"),
        ),
        (
            "ping on an unjoined topic",
            v2(Some("1"), Some("2"), &topic, "ping", "{}"),
            v2_error(None, "2", &topic, "unmatched topic"),
        ),
        (
            "phx_leave on an unjoined topic",
            v2(Some("1"), Some("2"), &topic, "phx_leave", "{}"),
            v2_ok(Some("1"), "2", &topic),
        ),
        (
            "phx_join on `room:lobby`",
            v2(Some("1"), Some("2"), "room:lobby", "phx_join", "{}"),
            v2_error(None, "2", "room:lobby", "unmatched topic"),
        ),
        (
            "phx_join on `chat:not-a-uuid`",
            v2(Some("1"), Some("2"), "chat:not-a-uuid", "phx_join", "{}"),
            v2_error(None, "2", "chat:not-a-uuid", "unmatched topic"),
        ),
        (
            "heartbeat on a chat topic",
            v2(None, Some("2"), &topic, "heartbeat", "{}"),
            v2_error(None, "2", &topic, "unmatched topic"),
        ),
    ] {
        answered(m, port, "frame", input, None, &frame, &reply);
    }
    answered(
        m,
        port,
        "frame",
        "unknown event on a joined topic",
        Some(&topic),
        &v2(Some("1"), Some("2"), &topic, "shout", "{}"),
        &v2_error(Some("1"), "2", &topic, "unknown event"),
    );
    let mut c = fresh(port);
    c.join(&topic, "1");
    c.send_text(&new_msg_push("stale", "2", &topic, "stale"));
    c.heartbeat("after");
    m.row("frame", "new_msg with a stale join_ref", "dropped (no reply)");

    // Thousands of joins in one write: 100 joined, then `too many channels joined` for the rest
    // of the burst (the rate budget is 1000 messages), then `rate limited`, then 1008.
    let joins = 3000;
    let topics: Vec<String> = (0..joins).map(|_| new_topic()).collect();
    let mut ws = RawWs::connect(port);
    let mut bytes = Vec::new();
    for (i, t) in topics.iter().enumerate() {
        let r = format!("j{i}");
        bytes.extend(client_frame(OP_TEXT, v2(Some(&r), Some(&r), t, "phx_join", "{}").as_bytes()));
    }
    ws.send_raw(&bytes);
    let (replies, code, reason) = texts_until_close(&mut ws);
    let too_many = |i: usize| {
        let r = format!("j{i}");
        v2_error(Some(&r), &r, &topics[i], "too many channels joined")
    };
    let limited = |i: usize, got: &str| {
        let r = format!("j{i}");
        got == rate_limited(Some(&r), &r, &topics[i])
    };
    assert!(replies.len() < joins, "{joins} joins all answered: never closed");
    for (i, got) in replies.iter().enumerate() {
        let r = format!("j{i}");
        if i < MAX_CHANNELS {
            assert_eq!(*got, v2_ok(Some(&r), &r, &topics[i]), "join {i}");
        } else if i < MSG_RATE {
            assert_eq!(*got, too_many(i), "join {i}");
        } else {
            assert!(*got == too_many(i) || limited(i, got), "join {i}: {got}");
        }
    }
    check_rate_limit_tail("join flood", &replies, limited, code);
    let refused_channels = replies.iter().enumerate().filter(|(i, g)| **g == too_many(*i)).count();
    m.row(
        "frame",
        format!("{joins} phx_join to distinct topics in one write"),
        format!(
            "{MAX_CHANNELS} ok; {refused_channels} `too many channels joined`; then {STRIKES} `rate limited`; close {} `{reason}`",
            code.unwrap_or(0)
        ),
    );

    // Heartbeat flood: the first 1000 (the burst) answered ok, then `rate limited` (no other
    // effect), and after 100 refusals in a row the socket is closed with 1008.
    let beats = 3000;
    let mut ws = RawWs::connect(port);
    let mut bytes = Vec::new();
    for i in 0..beats {
        bytes.extend(client_frame(OP_TEXT, heartbeat(&i.to_string()).as_bytes()));
    }
    ws.send_raw(&bytes);
    let (replies, code, reason) = texts_until_close(&mut ws);
    let limited = |i: usize, got: &str| got == rate_limited(None, &i.to_string(), "phoenix");
    assert!(replies.len() < beats, "{beats} heartbeats all answered: never closed");
    for (i, got) in replies.iter().enumerate() {
        let ok = heartbeat_reply(&i.to_string());
        if i < MSG_RATE {
            assert_eq!(*got, ok, "heartbeat {i}");
        } else {
            assert!(*got == ok || limited(i, got), "heartbeat {i}: {got}");
        }
    }
    check_rate_limit_tail("heartbeat flood", &replies, limited, code);
    let oks = replies.iter().enumerate().filter(|(i, g)| **g == heartbeat_reply(&i.to_string())).count();
    m.row(
        "frame",
        format!("{beats} heartbeats in one write (rate 1000/s)"),
        format!("{oks} ok; then {STRIKES} `rate limited`; close {} `{reason}`", code.unwrap_or(0)),
    );
    // Pings over the budget get no pong and count as strikes too.
    let mut ws = RawWs::connect(port);
    let mut bytes = Vec::new();
    for i in 0..beats {
        bytes.extend(client_frame(OP_PING, i.to_string().as_bytes()));
    }
    ws.send_raw(&bytes);
    let mut pongs = 0;
    let (code, reason) = loop {
        let f = ws.frame();
        match f.opcode {
            OP_PONG => {
                assert_eq!(f.payload, pongs.to_string().into_bytes(), "pong {pongs}");
                pongs += 1;
            }
            OP_CLOSE => {
                let (code, reason) = f.close_code();
                ws.send(OP_CLOSE, &close_payload(code.unwrap_or(1000), ""));
                ws.expect_eof();
                break (code, reason);
            }
            _ => panic!("unexpected frame in a ping flood: {f:?}"),
        }
    };
    assert_eq!(code, Some(1008), "ping flood close ({reason})");
    assert!((MSG_RATE..beats - STRIKES).contains(&pongs), "{pongs} pongs");
    m.row(
        "frame",
        format!("{beats} WebSocket pings in one write"),
        format!("{pongs} pongs; the rest unanswered; close 1008 `{reason}`"),
    );
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

#[test]
fn hostile_inputs_get_their_documented_answers_and_a_healthy_client_on_the_same_core_is_untouched() {
    let test_started = Instant::now();
    let server = start_server(&[("NEXUS_WORKERS", "1")]);
    let port = server.port;

    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();
    let healthy_thread = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || healthy(port, stop, ready_tx))
    };
    ready_rx.recv_timeout(TIMEOUT).expect("healthy client's baseline round trips");
    let dribbler = thread::spawn(move || slowloris(port, true));
    let silent = thread::spawn(move || slowloris(port, false));

    // The matrix, pass after pass until the slowloris connections are dropped, so the healthy
    // client is under attack for the whole run. The table is the first pass's.
    let mut m = Matrix::default();
    let attack_started = Instant::now();
    let mut passes = 0;
    while passes == 0 || (passes < MAX_PASSES && !(dribbler.is_finished() && silent.is_finished())) {
        let mut pass = Matrix::default();
        http_cases(&mut pass, port);
        token_cases(&mut pass, port);
        frame_cases(&mut pass, port);
        if passes == 0 {
            m = pass;
        }
        passes += 1;
    }
    let attack_ended = Instant::now();

    let dribble_closed = dribbler.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
    let silent_closed = silent.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
    for (what, took) in [("dribbling", dribble_closed), ("silent", silent_closed)] {
        assert!(
            took + Duration::from_millis(100) >= HANDSHAKE_DEADLINE
                && took <= HANDSHAKE_DEADLINE + HANDSHAKE_DROP_SLACK,
            "{what} slowloris closed after {took:?}, expected ~{HANDSHAKE_DEADLINE:?}"
        );
    }
    m.row(
        "HTTP",
        "head dribbled 1 byte / 500 ms, never finished (slowloris)",
        format!("dropped without an answer after {dribble_closed:.2?}"),
    );
    m.row("HTTP", "connection that sends nothing", format!("dropped without an answer after {silent_closed:.2?}"));
    stop.store(true, Ordering::Relaxed);
    let report = healthy_thread.join().unwrap_or_else(|e| std::panic::resume_unwind(e));

    // Every healthy message is stored, in order (each was broadcast to it and acknowledged in
    // order above).
    let stored: Vec<String> =
        db_conversation(&server.db_path(), conversation_of(&report.topic)).into_iter().map(|r| r.body).collect();
    let expected: Vec<String> = (0..report.sent).map(|n| format!("h-{n}")).collect();
    assert_eq!(stored, expected, "healthy messages in the database");

    // The closes were counted by reason.
    let mut resp = http_get(port, "/metrics", None);
    assert_eq!(resp.status, 200);
    resp.assert_server_closes();
    let metrics = resp.body_text();
    for (series, per_pass) in [
        ("nexus_closes_total{reason=\"too_big\"}", 7),
        ("nexus_closes_total{reason=\"invalid_utf8\"}", 4),
        ("nexus_closes_total{reason=\"rate_limited\"}", 3),
        ("nexus_closes_total{reason=\"slow_consumer\"}", 0),
        ("nexus_closes_total{reason=\"idle\"}", 0),
    ] {
        assert_eq!(metric(&metrics, series), per_pass * passes, "{series} after {passes} passes");
    }

    assert!(report.sent >= 100, "the healthy client only completed {} round trips", report.sent);
    let stats = |during_attack: bool| {
        let mut lat: Vec<Duration> = report
            .latencies
            .iter()
            .filter(|(at, _)| (*at >= attack_started && *at < attack_ended) == during_attack)
            .map(|(_, took)| *took)
            .collect();
        lat.sort();
        assert!(!lat.is_empty(), "no healthy round trip (during attack: {during_attack})");
        let pct = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1];
        (lat.len(), pct(0.50), pct(0.99), *lat.last().expect("non-empty"))
    };
    let (quiet, q50, q99, qmax) = stats(false);
    let (attacked, a50, a99, amax) = stats(true);
    m.print();
    eprintln!(
        "\nhealthy client (same core, NEXUS_WORKERS=1): {} messages, every one broadcast back in order, \
         acked and stored. Round trip (send -> own broadcast -> ack):\n  \
         without attack ({quiet}): p50 {q50:.2?}, p99 {q99:.2?}, max {qmax:.2?}\n  \
         under attack   ({attacked}): p50 {a50:.2?}, p99 {a99:.2?}, max {amax:.2?}",
        report.sent
    );
    eprintln!(
        "matrix: {} inputs x {passes} passes in {:.2?}; whole test {:.2?}",
        m.rows.len(),
        attack_ended - attack_started,
        test_started.elapsed()
    );
    let max = qmax.max(amax);
    assert!(max <= LATENCY_BOUND, "a healthy round trip took {max:?}");
    assert!(test_started.elapsed() < TEST_BUDGET, "test took {:?}", test_started.elapsed());
}

/// A payload nested deeper than the core thread's stack can recurse (sonic_rs `skip_one` →
/// `skip_array` is recursive, no depth limit) must be dropped or answered like any other
/// message. Before `limits::JSON_DEPTH_MAX` it overflowed the core thread's stack and aborted
/// the whole process, every connection on every core: a debug build at 38 levels (a 110-byte
/// frame), a release build at ~18,500 (a 37 KB frame, under the 64 KiB limit).
#[test]
fn deeply_nested_json_does_not_abort_the_server() {
    let server = start_server(&[("NEXUS_WORKERS", "1")]);
    let port = server.port;
    let mut bystander = fresh(port);
    let levels = 30_000; // 60 KB of brackets: fits the default 64 KiB frame limit
    let nested = format!("{}{}", "[".repeat(levels), "]".repeat(levels));
    let topic = new_topic();
    // At the limit (JSON_DEPTH_MAX = 32 levels, the frame's array included) the parser runs;
    // past it the message is dropped before parsing.
    let at_limit = format!("{}{}", "[".repeat(31), "]".repeat(31));
    let cases = [
        ("payload at the depth limit", v2(None, Some("1"), "phoenix", "heartbeat", &at_limit)),
        ("heartbeat payload", v2(None, Some("1"), "phoenix", "heartbeat", &nested)),
        ("topic", format!(r#"[null,"1",{nested},"heartbeat",{{}}]"#)),
        (
            "new_msg sibling key",
            v2(Some("1"), Some("1"), &topic, "new_msg", &format!(r#"{{"body":"x","n":{nested}}}"#)),
        ),
    ];
    for (what, frame) in cases {
        assert!(frame.len() < MAX_FRAME, "{what}: {} bytes", frame.len());
        let mut c = fresh(port);
        c.join(&topic, "1");
        c.send_text(&frame);
        // Whatever the answer to the nested frame (a reply, or none for a malformed message),
        // the socket and the server must still be there.
        c.send_text(&heartbeat("after"));
        loop {
            match c.try_recv_text(TIMEOUT) {
                Ok(t) if t == heartbeat_reply("after") => break,
                Ok(_) => continue,
                Err(e) => panic!("{what} nested {levels} deep: {e}; server stderr:\n{}", server.logs()),
            }
        }
        bystander.heartbeat(what);
    }
}
