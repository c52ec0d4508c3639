//! The failure path with a real SQLite fault (issue 3): `NEXUS_DB_MAX_BYTES` caps the file
//! (SQLite `max_page_count`), so large messages soon cannot be committed. A message whose
//! commit fails gets exactly `Failed to save` / `storage unavailable`, is broadcast to nobody
//! and stored nowhere; the server keeps serving; smaller messages that still fit succeed.
//!
//! With 4 KiB pages a ~2 KB message takes a page of its own (two do not fit in one), so the
//! last page of the table keeps ~2 KB free: enough for small messages after big ones fail.

mod common;

use common::*;

/// 16 pages of 4 KiB; a fresh database uses 6 (schema, two tables, three indexes).
const MAX_BYTES: &str = "65536";
const BIG: usize = 2_000;
/// Far more big messages than fit under the cap: the loop must end with a failure first.
const MAX_ATTEMPTS: usize = 200;
/// How long the member must stay silent after a failure (twice the writer's idle period).
const SILENCE: std::time::Duration = std::time::Duration::from_millis(400);

fn big(n: usize) -> String {
    let head = format!("big-{n}-");
    format!("{head}{}", "x".repeat(BIG - head.len()))
}

/// Sends one message from `s` and reads its frames up to the reply to `ref`: `Ok(broadcast)`
/// for an ack (the sender's own broadcast must come first), `Err(reply)` for an error reply
/// (nothing may be broadcast to the sender before it).
fn send_one(s: &mut Client, topic: &str, r#ref: &str, body: &str) -> Result<Live, String> {
    s.send_text(&new_msg_push("1", r#ref, topic, body));
    let first = s.recv();
    if !is_new_msg(&first) {
        return Err(first);
    }
    let own = parse_live(&first, topic);
    assert_eq!(own.text, body, "the sender's next broadcast is its own message");
    s.expect(&v2_ok(Some("1"), r#ref, topic));
    Ok(own)
}

#[test]
fn full_database_refuses_cleanly_and_the_server_keeps_serving() {
    let server = start_server(&[("NEXUS_DB_MAX_BYTES", MAX_BYTES)]);
    let port = server.port;
    let topic = new_topic();
    let conversation = conversation_of(&topic).to_string();
    let sub = new_sub();
    let mut sender = joined(port, &sub, &topic);
    let mut member = joined(port, &new_sub(), &topic);
    let storage_unavailable = |r: &str| failed_to_save("1", r, &topic, "storage unavailable");

    // Big messages until one fails.
    let mut stored: Vec<Live> = Vec::new();
    let mut failed_at = None;
    for n in 0..MAX_ATTEMPTS {
        match send_one(&mut sender, &topic, &format!("b{n}"), &big(n)) {
            Ok(live) => stored.push(live),
            Err(reply) => {
                assert_eq!(reply, storage_unavailable(&format!("b{n}")), "the first failure");
                failed_at = Some(n);
                break;
            }
        }
    }
    let failed_at =
        failed_at.unwrap_or_else(|| panic!("{MAX_ATTEMPTS} messages of {BIG} bytes fit under {MAX_BYTES} bytes"));
    assert!(failed_at >= 2, "a fresh database must take a few messages first (failed at {failed_at})");

    // Nothing is broadcast for the failed message: the member stays silent (this also leaves
    // the writer idle, so it tries its background move into `messages`, which cannot fit
    // either), and the sender's next frame is its heartbeat reply.
    let member_saw: Vec<Live> =
        (0..stored.len()).map(|_| parse_live(&member.recv_until(TIMEOUT, is_new_msg), &topic)).collect();
    assert_eq!(member_saw, stored);
    member.expect_silence(SILENCE);
    server.wait_for_log("commit failed");
    sender.heartbeat("hb1");
    // A small message still fits in the last page; it is the member's next broadcast after
    // the last stored big one, so the failed one was never broadcast to it (one FIFO order).
    let small1 = send_one(&mut sender, &topic, "s1", "small-1").expect("a small message fits after a failure");
    stored.push(small1);
    // Failure is repeatable and clean: big ones fail (also pipelined, each answered once, in
    // order), a small one succeeds again.
    let refs: Vec<String> = (0..4).map(|k| format!("again{k}")).collect();
    for (k, r) in refs.iter().enumerate() {
        sender.send_text(&new_msg_push("1", r, &topic, &big(failed_at + 1 + k)));
    }
    for r in &refs {
        sender.expect(&storage_unavailable(r));
    }
    sender.heartbeat("hb2");
    stored.push(send_one(&mut sender, &topic, "s2", "small-2").expect("small messages keep fitting"));

    // The member then saw exactly the two small ones, and nothing else.
    let member_saw: Vec<Live> = (0..2).map(|_| parse_live(&member.recv(), &topic)).collect();
    assert_eq!(member_saw, stored[failed_at..]);
    member.heartbeat("hb3");

    // New connections, joins and history still work; the database holds exactly the stored
    // messages.
    let mut newcomer = joined(port, &new_sub(), &topic);
    newcomer.heartbeat("hb4");
    let payloads: Vec<sonic_rs::Value> = stored.iter().map(|m| m.payload.clone()).collect();
    assert_eq!(full_history(port, &sub, &conversation, 200), payloads);
    let rows = db_rows(&server.db_path());
    let bodies: Vec<&str> = rows.iter().map(|r| r.body.as_str()).collect();
    assert_eq!(bodies, stored.iter().map(|m| m.text.as_str()).collect::<Vec<_>>());
    let healthz = http_raw(port, format!("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes());
    assert_eq!(healthz.status, 200);
}
