//! Private conversations (docs/protocol.md, "Private conversations"): the `token` join policy
//! from raw frames (grants, join tokens and their hostile forms, history), and the server API
//! (key, errors, a posted message as a `new_msg`, member removal, disconnect) across two cores.
//! The `proxy` policy against an in-test backend is in `tests/join_proxy.rs`; against a real
//! FastAPI backend in `tests/js/private.test.js`.

mod common;

use std::time::Duration;

use jsonwebtoken::Algorithm;
use sonic_rs::{JsonContainerTrait, JsonValueTrait};

use common::*;

const API_KEY: &str = "test-api-key-0123456789abcdef";

fn conversation_of(topic: &str) -> &str {
    topic.strip_prefix("chat:").expect("chat topic")
}

fn unauthorized(join_ref: &str, topic: &str) -> String {
    v2_error(Some(join_ref), join_ref, topic, "unauthorized")
}

fn join_with(join_ref: &str, topic: &str, payload: &str) -> String {
    v2(Some(join_ref), Some(join_ref), topic, "phx_join", payload)
}

/// A socket token for `sub` granting `chats`.
fn granting(sub: &str, chats: &[&str]) -> String {
    let list: Vec<String> = chats.iter().map(|c| format!("\"{c}\"")).collect();
    token_with_claims(&format!(r#"{{"sub":"{sub}","exp":{},"chats":[{}]}}"#, now_secs() + 3600, list.join(",")))
}

/// A join token for `sub` and `chat`.
fn join_token(sub: &str, chat: &str) -> String {
    token_with_claims(&format!(r#"{{"sub":"{sub}","chat":"{chat}","exp":{}}}"#, now_secs() + 600))
}

#[test]
fn token_policy_joins_by_grant_or_join_token_and_refuses_the_rest() {
    let server = start_server(&[("NEXUS_JOIN_POLICY", "token")]);
    let (granted, other) = (new_topic(), new_topic());
    let sub = new_sub();
    let mut c = connect(server.port, &format!("vsn=2.0.0&token={}", granting(&sub, &[conversation_of(&granted)])));
    c.join(&granted, "1");
    c.roundtrip(&join_with("2", &other, "{}"), &unauthorized("2", &other));
    c.roundtrip(&join_with("3", &other, r#"{"token":5}"#), &unauthorized("3", &other));

    let chat = conversation_of(&other);
    let later = now_secs() + 600;
    let hostile = [
        ("join token for another chat", join_token(&sub, conversation_of(&granted))),
        ("join token for another user", join_token(&new_sub(), chat)),
        ("expired", token_with_claims(&format!(r#"{{"sub":"{sub}","chat":"{chat}","exp":{}}}"#, now_secs() - 60))),
        ("no exp", token_with_claims(&format!(r#"{{"sub":"{sub}","chat":"{chat}"}}"#))),
        ("a socket token (no chat)", token(&sub)),
        (
            "alg none",
            craft_jwt(
                r#"{"alg":"none","typ":"JWT"}"#,
                &format!(r#"{{"sub":"{sub}","chat":"{chat}","exp":{later}}}"#),
                b"",
                None,
            ),
        ),
        (
            "HS384",
            craft_jwt(
                r#"{"alg":"HS384","typ":"JWT"}"#,
                &format!(r#"{{"sub":"{sub}","chat":"{chat}","exp":{later}}}"#),
                SECRET.as_bytes(),
                Some(Algorithm::HS384),
            ),
        ),
        (
            "another secret",
            craft_jwt(
                r#"{"alg":"HS256","typ":"JWT"}"#,
                &format!(r#"{{"sub":"{sub}","chat":"{chat}","exp":{later}}}"#),
                b"not-the-server-secret-0123456789",
                Some(Algorithm::HS256),
            ),
        ),
    ];
    for (i, (case, t)) in hostile.iter().enumerate() {
        let jr = (10 + i).to_string();
        let got = {
            c.send_text(&join_with(&jr, &other, &format!(r#"{{"token":"{t}"}}"#)));
            c.recv()
        };
        assert_eq!(got, unauthorized(&jr, &other), "{case}");
    }
    // The good join token, then the socket is a member: its messages are broadcast.
    c.join_with_payload(&other, "30", &format!(r#"{{"token":"{}"}}"#, join_token(&sub, chat)));
    let live = send_all(&mut c, "30", &other, &["hello".to_string()]);
    assert_eq!(live.len(), 1);

    let refused = 2 + hostile.len() as u64;
    wait_for_metric(server.port, r#"nexus_joins_refused_total{reason="unauthorized"}"#, refused);
    // Refusals are logged, without the token.
    let logs = server.logs();
    assert!(logs.contains("join refused"), "{logs}");
    assert!(!logs.contains(&hostile[0].1), "a token was logged");
}

#[test]
fn a_malformed_grant_is_refused_at_the_upgrade_only_under_the_token_policy() {
    let sub = new_sub();
    let bad = token_with_claims(&format!(r#"{{"sub":"{sub}","exp":{},"chats":["not-a-uuid"]}}"#, now_secs() + 60));
    let token_server = start_server(&[("NEXUS_JOIN_POLICY", "token")]);
    let refused = try_connect(token_server.port, &format!("vsn=2.0.0&token={bad}"), &[], &[]);
    assert!(matches!(refused, Err(ConnectError::Status(403))), "{:?}", refused.err());
    let open = start_server(&[]);
    let mut c = connect(open.port, &format!("vsn=2.0.0&token={bad}"));
    c.join(&new_topic(), "1"); // `open` ignores the claim, as before
}

#[test]
fn history_follows_the_token_policy() {
    let server = start_server(&[("NEXUS_JOIN_POLICY", "token")]);
    let topic = new_topic();
    let chat = conversation_of(&topic);
    let sub = new_sub();
    let mut c = connect(server.port, &format!("vsn=2.0.0&token={}", granting(&sub, &[chat])));
    c.join(&topic, "1");
    send_all(&mut c, "1", &topic, &["kept".to_string()]);
    let target = history_target(chat, "");
    let with_grant = http_get(server.port, &target, Some(&format!("Bearer {}", granting(&sub, &[chat]))));
    assert_eq!(with_grant.status, 200, "{}", with_grant.body_text());
    assert!(with_grant.body_text().contains("\"kept\""));
    let with_join_token = http_get(server.port, &target, Some(&format!("Bearer {}", join_token(&sub, chat))));
    assert_eq!(with_join_token.status, 200, "{}", with_join_token.body_text());
    let mut without = http_get(server.port, &target, Some(&format!("Bearer {}", token(&sub))));
    assert_eq!(without.status, 403);
    without.assert_error(403);
    assert_eq!(without.body_text(), r#"{"error":"unauthorized"}"#);
}

// --- Server API ------------------------------------------------------------------------------

fn api(port: u16, method: &str, target: &str, key: Option<&str>, body: Option<&str>) -> HttpResponse {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    if let Some(key) = key {
        req.push_str(&format!("Authorization: Bearer {key}\r\n"));
    }
    match body {
        Some(b) => req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len())),
        None => req.push_str("Content-Length: 0\r\n\r\n"),
    }
    http_raw(port, req.as_bytes())
}

fn post_message(port: u16, conversation: &str, sender: &str, text: &str) -> HttpResponse {
    let body = format!(r#"{{"sender_id":"{sender}","body":"{text}"}}"#);
    api(port, "POST", &format!("/api/conversations/{conversation}/messages"), Some(API_KEY), Some(&body))
}

#[test]
fn the_server_api_is_off_without_a_key_and_refuses_a_wrong_one() {
    let conversation = uuid::Uuid::new_v4().to_string();
    let user = uuid::Uuid::new_v4().to_string();
    let targets = [
        ("POST", format!("/api/conversations/{conversation}/messages")),
        ("DELETE", format!("/api/conversations/{conversation}/members/{user}")),
        ("POST", format!("/api/users/{user}/disconnect")),
    ];
    let off = start_server(&[]);
    for (method, target) in &targets {
        let r = api(off.port, method, target, Some(API_KEY), Some("{}"));
        assert_eq!((r.status, r.body_text()), (404, r#"{"error":"not found"}"#.to_string()), "{method} {target}");
    }
    // Without a key even a wrong method finds nothing; with it, the method is checked last.
    let wrong_method = format!("/api/users/{user}/disconnect");
    assert_eq!(api(off.port, "GET", &wrong_method, Some(API_KEY), None).status, 404);
    let on = start_server(&[("NEXUS_API_KEY", API_KEY)]);
    for (method, target) in &targets {
        for key in [None, Some("wrong"), Some(&API_KEY[1..]), Some(&format!("{API_KEY}x")[..])] {
            let r = api(on.port, method, target, key, Some("{}"));
            assert_eq!(r.status, 401, "{method} {target} {key:?}");
            assert_eq!(r.body_text(), r#"{"error":"unauthorized"}"#);
        }
    }
    assert_eq!(api(on.port, "GET", &wrong_method, Some("wrong"), None).status, 401);
    let r = api(on.port, "GET", &wrong_method, Some(API_KEY), None);
    assert_eq!((r.status, r.body_text()), (405, r#"{"error":"method not allowed"}"#.to_string()));
    // The history GET on the same path still takes a user token, not the key.
    let r = http_get(on.port, &history_target(&conversation, ""), Some(&format!("Bearer {API_KEY}")));
    assert_eq!(r.status, 401);
    let short = nexus_command().env("JWT_SECRET", SECRET).env("NEXUS_API_KEY", "short").output().expect("run nexus");
    assert_eq!(short.status.code(), Some(2), "a short key is refused at start");
    assert!(String::from_utf8_lossy(&short.stderr).contains("NEXUS_API_KEY"));
}

#[test]
fn a_posted_message_is_stored_and_broadcast_as_a_new_msg() {
    let server = start_server(&[("NEXUS_API_KEY", API_KEY), ("NEXUS_WORKERS", "2")]);
    let topic = new_topic();
    let conversation = conversation_of(&topic);
    // Members on both cores (connections alternate between the listeners).
    let mut members: Vec<Client> = (0..4).map(|_| joined(server.port, &new_sub(), &topic)).collect();
    let sender = new_sub();
    let mut r = post_message(server.port, conversation, &sender, "system: \\\"welcome\\\"");
    assert_eq!(r.status, 201, "{}", r.body_text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    r.assert_server_closes();
    let stored = parse(&r.body_text());
    assert_eq!(stored["sender_id"].as_str(), Some(sender.as_str()));
    assert_eq!(stored["content"]["text"].as_str(), Some("system: \"welcome\""));
    for m in &mut members {
        let live = parse_live(&m.recv_until(TIMEOUT, is_new_msg), &topic);
        assert_eq!(live.payload, stored, "the broadcast is the 201 body");
    }
    let history = http_get(server.port, &history_target(conversation, ""), Some(&format!("Bearer {}", token(&sender))));
    assert_eq!(parse(&history.body_text())["messages"][0], stored);

    let bad = [
        ("{", 400),
        ("[]", 400),
        (r#"{"body":"x"}"#, 400),
        (r#"{"sender_id":"nope","body":"x"}"#, 400),
        (&format!(r#"{{"sender_id":"{sender}","body":""}}"#)[..], 400),
        (&format!(r#"{{"sender_id":"{sender}","body":5}}"#)[..], 400),
    ];
    let target = format!("/api/conversations/{conversation}/messages");
    for (body, status) in bad {
        let r = api(server.port, "POST", &target, Some(API_KEY), Some(body));
        assert_eq!(r.status, status, "{body}: {}", r.body_text());
    }
    let deep = format!(r#"{{"sender_id":"{sender}","body":"x","d":{}{}}}"#, "[".repeat(100), "]".repeat(100));
    assert_eq!(api(server.port, "POST", &target, Some(API_KEY), Some(&deep)).status, 400);
    let chunked = format!(
        "POST {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    assert_eq!(http_raw(server.port, chunked.as_bytes()).status, 411);
    let huge = format!(
        "POST {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: 70000\r\n\r\n"
    );
    assert_eq!(http_raw(server.port, huge.as_bytes()).status, 413);
    // A body sent in pieces is read to its end.
    let body = format!(r#"{{"sender_id":"{sender}","body":"in pieces"}}"#);
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    let head = format!(
        "POST {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    write_lenient(&mut stream, head.as_bytes());
    std::thread::sleep(Duration::from_millis(50)); // not synchronization: makes a second segment likely
    write_lenient(&mut stream, body.as_bytes());
    assert_eq!(read_response(stream).status, 201);
    // Nothing else was broadcast meanwhile: the next frame is "in pieces".
    let live = parse_live(&members[0].recv_until(TIMEOUT, is_new_msg), &topic);
    assert_eq!(live.text, "in pieces");
}

#[test]
fn removing_a_member_closes_its_channel_on_every_core() {
    let server = start_server(&[("NEXUS_API_KEY", API_KEY), ("NEXUS_WORKERS", "2")]);
    let topic = new_topic();
    let conversation = conversation_of(&topic);
    let removed = new_sub();
    let mut watcher = joined(server.port, &new_sub(), &topic);
    watcher.skip_presence = false;
    // Two sockets of the removed user (one per core), and one in another conversation.
    let mut sockets: Vec<Client> = (0..2).map(|_| joined(server.port, &removed, &topic)).collect();
    // Both metas are in the watcher's view before the removal (a join and a leave in one
    // presence window would cancel out).
    let mut joined_metas = 0;
    while joined_metas < 2 {
        let frame = watcher.recv_until(TIMEOUT, |t| t.contains("presence_diff") && t.contains(&removed));
        joined_metas += parse(&frame)[4]["joins"][removed.as_str()]["metas"].as_array().map_or(0, |m| m.len());
    }
    let elsewhere = new_topic();
    let mut other = joined(server.port, &removed, &elsewhere);
    let target = format!("/api/conversations/{conversation}/members/{removed}");
    let r = api(server.port, "DELETE", &target, Some(API_KEY), None);
    assert_eq!(r.status, 204, "{}", r.body_text());
    assert!(r.body.is_empty());
    for s in &mut sockets {
        let close = s.recv_until(TIMEOUT, |t| event_of(t).as_deref() == Some("phx_close"));
        assert_eq!(close, v2(Some("1"), Some("1"), &topic, "phx_close", "{}"));
        // The channel is gone: a push is answered as for a topic never joined.
        s.roundtrip(&new_msg_push("1", "9", &topic, "after"), &v2_error(None, "9", &topic, "unmatched topic"));
    }
    // The watcher sees both metas leave.
    let mut left = 0;
    while left < 2 {
        let frame = watcher.recv_until(TIMEOUT, |t| t.contains("presence_diff") && t.contains(&removed));
        left += parse(&frame)[4]["leaves"][removed.as_str()]["metas"].as_array().map_or(0, |m| m.len());
    }
    // The user's other conversation is untouched.
    send_all(&mut other, "1", &elsewhere, &["still here".to_string()]);
    // Open policy: the user may join again.
    sockets[0].join(&topic, "2");
}

#[test]
fn disconnecting_a_user_closes_its_sockets_with_1008() {
    let server = start_server(&[("NEXUS_API_KEY", API_KEY), ("NEXUS_WORKERS", "2")]);
    let user = new_sub();
    let topic = new_topic();
    let mut sockets: Vec<Client> = (0..3).map(|_| joined(server.port, &user, &topic)).collect();
    let mut bystander = joined(server.port, &new_sub(), &topic);
    let r = api(server.port, "POST", &format!("/api/users/{user}/disconnect"), Some(API_KEY), None);
    assert_eq!(r.status, 204, "{}", r.body_text());
    for s in &mut sockets {
        let frame = loop {
            match s.try_recv_message(TIMEOUT) {
                Ok(tungstenite::Message::Close(frame)) => break frame.expect("a close code"),
                Ok(_) => continue,
                Err(e) => panic!("waiting for the close: {e}"),
            }
        };
        assert_eq!(u16::from(frame.code), 1008);
        assert_eq!(frame.reason.as_str(), "disconnected by the server");
    }
    send_all(&mut bystander, "1", &topic, &["unaffected".to_string()]);
    wait_for_metric(server.port, r#"nexus_closes_total{reason="disconnected"}"#, 3);
    wait_for_metric(server.port, r#"nexus_api_requests_total{action="disconnect"}"#, 1);
}

/// `nexus token --sub U [--chats A,B | --chat C]`.
fn cli_token(args: &[&str]) -> String {
    let out = nexus_command().env("JWT_SECRET", SECRET).arg("token").args(args).output().expect("run nexus token");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf8").trim().to_string()
}

#[test]
fn nexus_token_mints_grants_and_join_tokens() {
    let server = start_server(&[("NEXUS_JOIN_POLICY", "token")]);
    let sub = new_sub();
    let (a, b, c) = (new_topic(), new_topic(), new_topic());
    let socket_token =
        cli_token(&["--sub", &sub, "--chats", &format!("{},{}", conversation_of(&a), conversation_of(&b))]);
    let mut s = connect(server.port, &format!("vsn=2.0.0&token={socket_token}"));
    s.join(&a, "1");
    s.join(&b, "2");
    s.roundtrip(&join_with("3", &c, "{}"), &unauthorized("3", &c));
    let join = cli_token(&["--sub", &sub, "--chat", conversation_of(&c), "--ttl", "5m"]);
    s.join_with_payload(&c, "4", &format!(r#"{{"token":"{join}"}}"#));
    let bad = nexus_command().env("JWT_SECRET", SECRET).args(["token", "--sub", &sub, "--chats", "x"]).output();
    assert_eq!(bad.expect("run").status.code(), Some(2));
}

#[test]
fn a_refused_rejoin_recovers_nothing() {
    let server = start_server(&[("NEXUS_JOIN_POLICY", "token")]);
    let topic = new_topic();
    let chat = conversation_of(&topic);
    let (member, stranger) = (new_sub(), new_sub());
    let mut m = connect(server.port, &format!("vsn=2.0.0&token={}", granting(&member, &[chat])));
    m.join(&topic, "1");
    let live = send_all(&mut m, "1", &topic, &["one".to_string(), "two".to_string()]);
    let mut s = connect_v2(server.port, &stranger);
    s.skip_presence = false;
    let payload = format!(r#"{{"last_seen_id":"{}"}}"#, live[0].id);
    s.roundtrip(&join_with("1", &topic, &payload), &unauthorized("1", &topic));
    // Nothing follows the refusal: a heartbeat's reply is the next frame.
    s.heartbeat("2");
}
