//! The history API (Nexus extension, docs/protocol.md "History API"):
//! `GET /api/conversations/<uuid>/messages?before=<id>&limit=<1..200>` with a Bearer token.
//! Pages are oldest first, follow `next_before`, and carry exactly the `new_msg` broadcast
//! payloads; bad parameters are 400, bad tokens 401, bad paths 404, other methods 405 (POST is
//! the server API's: 404 while it is off), all as JSON; and a client that joins and then reads
//! history sees no gap and no duplicate.

mod common;

use std::sync::mpsc;
use std::thread;

use sonic_rs::{JsonContainerTrait, JsonValueTrait, Value};

use common::*;

/// Sends `n` messages `<prefix>-<k>` on a fresh topic from a fresh user; returns the topic, the
/// sender's sub and the broadcasts.
fn conversation_with(port: u16, prefix: &str, n: usize) -> (String, String, Vec<Live>) {
    let topic = new_topic();
    let sub = new_sub();
    let mut c = joined(port, &sub, &topic);
    let bodies: Vec<String> = (0..n).map(|k| format!("{prefix}-{k}")).collect();
    let live = send_all(&mut c, "1", &topic, &bodies);
    assert_eq!(live.iter().map(|m| m.text.clone()).collect::<Vec<_>>(), bodies);
    (topic, sub, live)
}

fn payloads(live: &[Live]) -> Vec<Value> {
    live.iter().map(|m| m.payload.clone()).collect()
}

fn ids_of(messages: &[Value]) -> Vec<String> {
    messages.iter().map(|m| m["id"].as_str().expect("id").to_string()).collect()
}

/// A JSON error answer: `status`, the JSON error headers, `{"error": "<non-empty>"}`, closed.
/// Returns the error string.
#[track_caller]
fn expect_json_error(mut resp: HttpResponse, status: u16, case: &str) -> String {
    assert_eq!(resp.status, status, "{case}: {:?} {:?}", resp.status_line, resp.body_text());
    resp.assert_error(status);
    assert_eq!(resp.header("content-type"), Some("application/json"), "{case}: headers {:?}", resp.headers);
    let body = parse(&resp.body_text());
    let obj = body.as_object().unwrap_or_else(|| panic!("{case}: error body is not an object: {}", resp.body_text()));
    assert_eq!(obj.len(), 1, "{case}: error body must be exactly {{\"error\":..}}: {}", resp.body_text());
    let msg = body["error"].as_str().unwrap_or_else(|| panic!("{case}: no error string: {}", resp.body_text()));
    assert!(!msg.is_empty(), "{case}: empty error");
    msg.to_string()
}

#[track_caller]
fn get_as(port: u16, sub: &str, conversation: &str, query: &str) -> HttpResponse {
    http_get(port, &history_target(conversation, query), Some(&format!("Bearer {}", token(sub))))
}

fn empty_conversation_is_an_empty_page(backend: Backend) {
    let server = start_server_on(backend, &[]);
    let conversation = uuid::Uuid::new_v4().to_string();
    let mut resp = get_as(server.port, &new_sub(), &conversation, "");
    assert_eq!(resp.status, 200, "{:?} {:?}", resp.status_line, resp.body_text());
    assert_eq!(resp.status_line, "HTTP/1.1 200 OK");
    assert_eq!(resp.body_text(), r#"{"messages":[],"next_before":null}"#);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.header("connection").map(|v| v.to_ascii_lowercase()), Some("close".to_string()));
    resp.assert_server_closes();
    for query in ["limit=1", "limit=200"] {
        assert_eq!(history_page(server.port, &new_sub(), &conversation, query), (Vec::new(), None), "?{query}");
    }
}

fn pages_follow_next_before_oldest_first(backend: Backend) {
    let server = start_server_on(backend, &[]);
    let port = server.port;
    let (topic, _sender, live) = conversation_with(port, "p", 7);
    let conversation = conversation_of(&topic);
    let reader = new_sub(); // any authenticated user may read

    let (page1, next1) = history_page(port, &reader, conversation, "limit=3");
    assert_eq!(page1, payloads(&live[4..7]), "first page: the newest 3, oldest first");
    assert_eq!(next1.as_deref(), Some(live[4].id.as_str()));
    let (page2, next2) = history_page(port, &reader, conversation, &format!("limit=3&before={}", live[4].id));
    assert_eq!(page2, payloads(&live[1..4]));
    assert_eq!(next2.as_deref(), Some(live[1].id.as_str()));
    let (page3, next3) = history_page(port, &reader, conversation, &format!("before={}&limit=3", live[1].id));
    assert_eq!(page3, payloads(&live[0..1]));
    assert_eq!(next3, None, "the last page has no next_before");

    let mut all: Vec<Value> = page3;
    all.extend(page2);
    all.extend(page1);
    assert_eq!(all, payloads(&live), "the pages together are every message, in send order");

    // Default limit (50) and exact fits.
    assert_eq!(history_page(port, &reader, conversation, ""), (payloads(&live), None), "default limit");
    assert_eq!(history_page(port, &reader, conversation, "limit=7"), (payloads(&live), None), "limit = count");
    assert_eq!(
        history_page(port, &reader, conversation, "limit=6"),
        (payloads(&live[1..]), Some(live[1].id.clone())),
        "limit = count - 1"
    );
    // `before` the oldest message: nothing older.
    assert_eq!(history_page(port, &reader, conversation, &format!("before={}", live[0].id)), (Vec::new(), None));
    // A cursor in the middle with the default limit.
    assert_eq!(
        history_page(port, &reader, conversation, &format!("before={}", live[3].id)),
        (payloads(&live[..3]), None)
    );
}

fn history_payloads_equal_the_live_broadcasts(backend: Backend) {
    let server = start_server_on(backend, &[]);
    let port = server.port;
    let topic = new_topic();
    let (alice, bob) = (new_sub(), new_sub());
    let mut a = joined(port, &alice, &topic);
    let mut b = joined(port, &bob, &topic);
    let tricky = [
        "plain".to_string(),
        r#"quotes " and \ backslash"#.to_string(),
        "new\nline\ttab\r\u{1}\u{1f}".to_string(),
        "ünïcødé ✓ 😀 中文".to_string(),
        "</script><script>alert(1)</script>".to_string(),
        " ".to_string(),
        "x".repeat(5000),
    ];
    let mut live = send_all(&mut a, "1", &topic, &tricky[..4]);
    // Bob sees Alice's four first, then sends the rest.
    let mut bob_saw: Vec<Live> = (0..4).map(|_| parse_live(&b.recv_until(TIMEOUT, is_new_msg), &topic)).collect();
    let from_bob = send_all(&mut b, "1", &topic, &tricky[4..]);
    bob_saw.extend(from_bob.iter().cloned());
    for _ in 4..tricky.len() {
        live.push(parse_live(&a.recv_until(TIMEOUT, is_new_msg), &topic));
    }
    assert_eq!(live, bob_saw, "both members saw the same broadcasts");
    let texts: Vec<&str> = live.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, tricky.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(live[0].sender, alice);
    assert_eq!(live[6].sender, bob);

    let (messages, next) = history_page(port, &new_sub(), conversation_of(&topic), "limit=200");
    assert_eq!(next, None);
    assert_eq!(messages.len(), live.len());
    for (h, l) in messages.iter().zip(&live) {
        assert_eq!(h, &l.payload, "history entry differs from the broadcast of {}", l.id);
        let keys: Vec<String> = h.as_object().expect("object").iter().map(|(k, _)| k.to_string()).collect();
        assert_eq!(keys.len(), 4, "exactly id, content, sender_id, inserted_at: {keys:?}");
    }
}

fn limit_bounds(backend: Backend) {
    let server = start_server_on(backend, &[]);
    let port = server.port;
    let (topic, sub, live) = conversation_with(port, "l", 3);
    let conversation = conversation_of(&topic);
    assert_eq!(history_page(port, &sub, conversation, "limit=1"), (payloads(&live[2..]), Some(live[2].id.clone())));
    assert_eq!(history_page(port, &sub, conversation, "limit=200"), (payloads(&live), None));
    for bad in ["limit=0", "limit=201", "limit=abc", "limit=-1", "limit=", "limit=1.5", "limit=99999999999999999999999"]
    {
        expect_json_error(get_as(port, &sub, conversation, bad), 400, bad);
    }
}

fn malformed_before_is_400_and_any_id_is_a_time_bound(backend: Backend) {
    let server = start_server_on(backend, &[]);
    let port = server.port;
    let (topic, sub, live) = conversation_with(port, "b", 2);
    let (other_topic, _, other_live) = conversation_with(port, "o", 1);
    let conversation = conversation_of(&topic);
    let id = &live[0].id;
    let malformed = [
        "before=nope".to_string(),
        "before=".to_string(),
        format!("before={}", id.replace('-', "")),
        format!("before={id}0"),
        format!("before={}", &id[..35]),
        format!("before=%7B{id}%7D"),
        format!("before={}&limit=2", id.replace('-', "_")),
    ];
    for query in &malformed {
        expect_json_error(get_as(port, &sub, conversation, query), 400, query);
    }
    // A well-formed id that is not a message of this conversation is still a bound: ids are
    // UUIDv7 in commit order, so `before` means "committed before that message".
    let foreign = format!("before={}", other_live[0].id); // committed after both b messages
    assert_eq!(history_page(port, &sub, conversation, &foreign), (payloads(&live), None));
    let future = format!("before={}", uuid::Uuid::now_v7());
    assert_eq!(history_page(port, &sub, conversation, &future), (payloads(&live), None));
    let oldest = format!("before={}", live[0].id);
    assert_eq!(history_page(port, &sub, conversation_of(&other_topic), &oldest), (Vec::new(), None));
    assert_eq!(history_page(port, &sub, conversation_of(&other_topic), &foreign), (Vec::new(), None));
}

fn bad_or_missing_tokens_are_401(backend: Backend) {
    let server = start_server_on(backend, &[]);
    let port = server.port;
    let (topic, sub, live) = conversation_with(port, "a", 1);
    let target = history_target(conversation_of(&topic), "");
    let now = now_secs();
    let valid = token(&sub);
    let hs256 = r#"{"alg":"HS256","typ":"JWT"}"#;
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no Authorization header", None),
        ("empty header", Some(String::new())),
        ("Bearer without a token", Some("Bearer".to_string())),
        ("Bearer and a space", Some("Bearer ".to_string())),
        ("garbage token", Some("Bearer not.a.jwt".to_string())),
        ("Basic scheme with a valid token", Some(format!("Basic {valid}"))),
        ("token without a scheme", Some(valid.clone())),
        (
            "wrong secret",
            Some(format!(
                "Bearer {}",
                craft_jwt(
                    hs256,
                    &format!(r#"{{"sub":"{sub}","exp":{}}}"#, now + 3600),
                    b"another-secret-that-is-long-enough-0123456789",
                    Some(jsonwebtoken::Algorithm::HS256)
                )
            )),
        ),
        ("expired", Some(format!("Bearer {}", token_with_claims(&format!(r#"{{"sub":"{sub}","exp":{}}}"#, now - 10))))),
        (
            "not yet valid",
            Some(format!("Bearer {}", token_with_claims(&format!(r#"{{"sub":"{sub}","nbf":{}}}"#, now + 3600)))),
        ),
        ("sub not a UUID", Some(format!("Bearer {}", token_with_claims(r#"{"sub":"alice"}"#)))),
        (
            "alg none",
            Some(format!(
                "Bearer {}",
                craft_jwt(r#"{"alg":"none","typ":"JWT"}"#, &format!(r#"{{"sub":"{sub}"}}"#), b"", None)
            )),
        ),
    ];
    for (case, auth) in &cases {
        let mut resp = http_get(port, &target, auth.as_deref());
        assert_eq!(resp.status, 401, "{case}: {:?} {:?}", resp.status_line, resp.body_text());
        assert_eq!(resp.body_text(), r#"{"error":"unauthorized"}"#, "{case}");
        assert_eq!(resp.header("content-type"), Some("application/json"), "{case}");
        assert!(
            resp.header("www-authenticate").is_some_and(|v| v.to_ascii_lowercase().starts_with("bearer")),
            "{case}: a 401 names the Bearer scheme (RFC 7235): {:?}",
            resp.headers
        );
        resp.assert_error(401);
    }
    // The scheme is case-insensitive (RFC 7235); the same token in a good header works.
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let mut resp = http_get(port, &target, Some(&format!("{scheme} {valid}")));
        assert_eq!(resp.status, 200, "{scheme}: {:?}", resp.body_text());
        resp.assert_server_closes();
        let body = parse(&resp.body_text());
        assert_eq!(ids_of(body["messages"].as_array().expect("messages")), vec![live[0].id.clone()]);
    }
}

fn bad_paths_are_404_and_other_methods_405(backend: Backend) {
    let server = start_server_on(backend, &[]);
    let port = server.port;
    let sub = new_sub();
    let auth = format!("Bearer {}", token(&sub));
    let id = uuid::Uuid::new_v4().to_string();
    let bad_paths = [
        "/api/conversations/nope/messages".to_string(),
        format!("/api/conversations/chat:{id}/messages"),
        format!("/api/conversations/{}/messages", id.replace('-', "")),
        format!("/api/conversations/{id}"),
        format!("/api/conversations/{id}/"),
        format!("/api/conversations/{id}/other"),
        format!("/api/conversations/{id}/messages/"),
        format!("/api/conversations/{id}/messages/extra"),
        "/api/conversations/".to_string(),
        "/api/conversations//messages".to_string(),
    ];
    for path in &bad_paths {
        expect_json_error(http_get(port, path, Some(&auth)), 404, path);
        expect_json_error(http_get(port, &format!("{path}?limit=3"), Some(&auth)), 404, path);
    }
    let target = history_target(&id, "");
    for method in ["PUT", "DELETE", "PATCH"] {
        expect_json_error(http_request(port, method, &target, Some(&auth)), 405, method);
        expect_json_error(http_request(port, method, &target, None), 405, method);
    }
    // POST is the server API's, off without NEXUS_API_KEY.
    expect_json_error(http_request(port, "POST", &target, Some(&auth)), 404, "POST");
    // The server is unharmed.
    assert_eq!(history_page(port, &sub, &id, ""), (Vec::new(), None));
}

/// Collects `new_msg` broadcasts on `c` until one has text `last`; returns them in order.
fn live_until(c: &mut Client, topic: &str, last: &str) -> Vec<Live> {
    let mut out = Vec::new();
    loop {
        let m = parse_live(&c.recv_until(TIMEOUT, is_new_msg), topic);
        let done = m.text == last;
        out.push(m);
        if done {
            return out;
        }
    }
}

fn join_then_history_before_the_first_live_message_has_no_gap_or_duplicate(backend: Backend) {
    let server = start_server_on(backend, &[]);
    let port = server.port;
    let topic = new_topic();
    let conversation = conversation_of(&topic);
    let bodies: Vec<String> = (1..=10).map(|k| format!("h-{k}")).collect();
    let mut b = joined(port, &new_sub(), &topic);
    let before_join = send_all(&mut b, "1", &topic, &bodies[..5]);

    let reader = new_sub();
    let mut a = joined(port, &reader, &topic);
    let after_join = send_all(&mut b, "1", &topic, &bodies[5..]);
    let live = live_until(&mut a, &topic, "h-10");
    assert_eq!(live, after_join, "A receives live exactly what was sent after its join");

    let (history, next) = history_page(port, &reader, conversation, &format!("before={}", live[0].id));
    assert_eq!(next, None);
    assert_eq!(history, payloads(&before_join), "history before the first live message is what A missed");
    let mut union: Vec<Value> = history;
    union.extend(payloads(&live));
    let texts: Vec<&str> = union.iter().map(|m| m["content"]["text"].as_str().expect("text")).collect();
    assert_eq!(texts, bodies.iter().map(String::as_str).collect::<Vec<_>>());
}

/// The same, with the join racing a burst of messages: wherever the join lands in the stream,
/// history before the first live message plus the live messages is every message once, in
/// order. Also the other recipe: read the newest page right after joining and drop live
/// messages whose id is not newer than the newest history id (UUIDv7 ids increase in commit
/// order, and canonical lower-case UUIDs compare as strings in the same order).
fn join_racing_a_burst_sees_no_gap_or_duplicate(backend: Backend) {
    let server = start_server_on(backend, &[]);
    let port = server.port;
    for round in 0..6 {
        let topic = new_topic();
        let conversation = conversation_of(&topic).to_string();
        let mut b = joined(port, &new_sub(), &topic);
        let first: Vec<String> = (0..5).map(|k| format!("r{round}-{k}")).collect();
        send_all(&mut b, "1", &topic, &first);

        let burst: Vec<String> = (5..40).map(|k| format!("r{round}-{k}")).collect();
        let topic_b = topic.clone();
        let (sub_a, sub_c) = (new_sub(), new_sub());
        // A uses recipe 1 (history before the first live id), C recipe 2 (newest page, then
        // drop live ids not newer than its newest).
        let mut a = connect_v2(port, &sub_a);
        let mut c = connect_v2(port, &sub_c);
        // One message per round trip, so the burst is spread over time; the joins start once
        // `5 * round` of it are acknowledged and land somewhere inside the rest.
        let (started, wait_started) = mpsc::channel();
        let sender = thread::spawn(move || {
            for (k, body) in burst.iter().enumerate() {
                if k == 5 * round {
                    let _ = started.send(());
                }
                send_all(&mut b, "1", &topic_b, std::slice::from_ref(body));
            }
            b
        });
        wait_started.recv_timeout(TIMEOUT).expect("burst started");
        a.join(&topic, "1");
        c.join(&topic, "1");
        let (newest_page, _) = history_page(port, &sub_c, &conversation, "limit=200");
        let mut b = sender.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        // Sent after both joins were acknowledged: both must receive it live.
        let marker = format!("r{round}-end");
        send_all(&mut b, "1", &topic, std::slice::from_ref(&marker));
        let mut expected: Vec<String> = (0..40).map(|k| format!("r{round}-{k}")).collect();
        expected.push(marker.clone());

        let live_a = live_until(&mut a, &topic, &marker);
        let (history_a, next_a) =
            history_page(port, &sub_a, &conversation, &format!("before={}&limit=200", live_a[0].id));
        assert_eq!(next_a, None);
        let mut union_a = history_a;
        union_a.extend(payloads(&live_a));
        let texts: Vec<&str> = union_a.iter().map(|m| m["content"]["text"].as_str().expect("text")).collect();
        assert_eq!(texts, expected, "round {round}, recipe 1 ({} live)", live_a.len());

        let live_c = live_until(&mut c, &topic, &marker);
        let newest = newest_page.last().and_then(|m| m["id"].as_str()).map(str::to_string).unwrap_or_default();
        let mut union_c = newest_page.clone();
        union_c.extend(payloads(&live_c).into_iter().filter(|m| m["id"].as_str().expect("id") > newest.as_str()));
        let texts: Vec<&str> = union_c.iter().map(|m| m["content"]["text"].as_str().expect("text")).collect();
        assert_eq!(texts, expected, "round {round}, recipe 2 ({} history, {} live)", newest_page.len(), live_c.len());
        let ids = ids_of(&union_c);
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase in commit order: {ids:?}");
    }
}

both_backends!(
    empty_conversation_is_an_empty_page,
    pages_follow_next_before_oldest_first,
    history_payloads_equal_the_live_broadcasts,
    limit_bounds,
    malformed_before_is_400_and_any_id_is_a_time_bound,
    bad_or_missing_tokens_are_401,
    bad_paths_are_404_and_other_methods_405,
    join_then_history_before_the_first_live_message_has_no_gap_or_duplicate,
    join_racing_a_burst_sees_no_gap_or_duplicate
);
