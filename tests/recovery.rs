//! Recovery on rejoin (docs/protocol.md, "Recovery on rejoin"): a join carrying
//! `{"last_seen_id": id}` is answered `{"recovered":true,"missed":n}`, then gets its
//! `presence_state`, then every message committed after that id as ordinary `new_msg` pushes,
//! then live messages: no gap, no duplicate, one order. Exact frames, on both stores, and in
//! cluster mode with the rejoin on another node.

mod common;

use std::thread;
use std::time::Duration;

use common::cluster::Cluster;
use common::*;

const WAIT: Duration = Duration::from_secs(10);

/// A join with `payload`, ref and join_ref `jr`.
fn join_frame(topic: &str, jr: &str, payload: &str) -> String {
    v2(Some(jr), Some(jr), topic, "phx_join", payload)
}

/// Sends `n` messages `<tag>-<k>` from a fresh member of `topic` and returns them as broadcast.
fn send_messages(port: u16, topic: &str, tag: &str, n: usize) -> Vec<Live> {
    let mut sender = joined(port, &new_sub(), topic);
    let bodies: Vec<String> = (0..n).map(|k| format!("{tag}-{k}")).collect();
    send_all(&mut sender, "1", topic, &bodies)
}

/// The next `n` `new_msg` pushes on `c` (other frames skipped).
#[track_caller]
fn next_messages(c: &mut Client, topic: &str, n: usize) -> Vec<Live> {
    (0..n).map(|_| parse_live(&c.recv_until(WAIT, is_new_msg), topic)).collect()
}

fn texts(messages: &[Live]) -> Vec<String> {
    messages.iter().map(|m| m.text.clone()).collect()
}

fn recovers_what_was_missed_after_the_presence_state(backend: Backend) {
    let server = start_server_on(backend, &[]);
    let topic = new_topic();
    let sent = send_messages(server.port, &topic, "a", 5);
    let mut c = connect_v2(server.port, &new_sub());
    c.skip_presence = false;
    let last_seen = &sent[1].id;
    c.send_text(&join_frame(&topic, "1", &format!(r#"{{"last_seen_id":"{last_seen}"}}"#)));
    c.expect(&v2_reply(Some("1"), Some("1"), &topic, "ok", r#"{"recovered":true,"missed":3}"#));
    let state = c.recv_text(WAIT);
    assert_eq!(event_of(&state).as_deref(), Some("presence_state"), "{state}");
    let recovered = next_messages(&mut c, &topic, 3);
    assert_eq!(recovered, sent[2..], "the missed messages, in the broadcast shape, oldest first");
    // Then live messages, as for any member.
    let live = send_messages(server.port, &topic, "b", 1);
    assert_eq!(next_messages(&mut c, &topic, 1), live);
}

fn a_join_without_last_seen_id_or_with_null_answers_as_before(backend: Backend) {
    let server = start_server_on(backend, &[]);
    let topic = new_topic();
    send_messages(server.port, &topic, "a", 2);
    let mut c = connect_v2(server.port, &new_sub());
    c.roundtrip(&join_frame(&topic, "1", "{}"), &v2_ok(Some("1"), "1", &topic));
    let mut d = connect_v2(server.port, &new_sub());
    d.roundtrip(&join_frame(&topic, "1", r#"{"last_seen_id":null}"#), &v2_ok(Some("1"), "1", &topic));
    // Nothing old follows (only live messages would).
    d.expect_silence(Duration::from_millis(300));
}

fn a_last_seen_id_that_is_not_a_uuid_is_refused(backend: Backend) {
    let server = start_server_on(backend, &[]);
    let topic = new_topic();
    let mut c = connect_v2(server.port, &new_sub());
    for (i, bad) in [r#""not-a-uuid""#, "42", r#"{"id":1}"#, r#""""#].iter().enumerate() {
        let jr = format!("{}", i + 1);
        c.roundtrip(
            &join_frame(&topic, &jr, &format!(r#"{{"last_seen_id":{bad}}}"#)),
            &v2_error(Some(&jr), &jr, &topic, "invalid last_seen_id"),
        );
    }
    // The socket is fine and can still join.
    c.join(&topic, "9");
}

fn more_than_the_limit_is_not_recovered(backend: Backend) {
    let server = start_server_on(backend, &[("NEXUS_RECOVERY_MAX", "3")]);
    let topic = new_topic();
    let sent = send_messages(server.port, &topic, "a", 6);
    let mut c = connect_v2(server.port, &new_sub());
    c.send_text(&join_frame(&topic, "1", &format!(r#"{{"last_seen_id":"{}"}}"#, sent[1].id)));
    c.expect(&v2_reply(Some("1"), Some("1"), &topic, "ok", r#"{"recovered":false}"#));
    // Nothing old is pushed; live messages are.
    let live = send_messages(server.port, &topic, "b", 1);
    assert_eq!(next_messages(&mut c, &topic, 1), live, "the first push is live, not recovered");
    // Exactly the limit is recovered.
    let mut d = connect_v2(server.port, &new_sub());
    d.send_text(&join_frame(&topic, "1", &format!(r#"{{"last_seen_id":"{}"}}"#, sent[3].id)));
    d.expect(&v2_reply(Some("1"), Some("1"), &topic, "ok", r#"{"recovered":true,"missed":3}"#));
    assert_eq!(texts(&next_messages(&mut d, &topic, 3)), ["a-4", "a-5", "b-0"]);
}

/// Rejoins from `last_seen` while others keep sending: the pushes are exactly the stored
/// messages after it, each once, in order, through the end of the burst.
#[track_caller]
fn rejoin_during_a_burst(port: u16, rows_of: impl Fn() -> Vec<DbRow>, sender_port: u16) {
    let topic = new_topic();
    const N: usize = 200;
    let (sender, acked) = paced_sender(sender_port, &topic, N, "p");
    while acked.recv_timeout(WAIT).expect("the sender progresses") < 40 {}
    let conversation = topic.trim_start_matches("chat:").to_string();
    let first = rows_of().into_iter().filter(|r| r.conversation == conversation).nth(9).expect("10 stored");
    let mut c = connect_v2(port, &new_sub());
    c.send_text(&join_frame(&topic, "1", &format!(r#"{{"last_seen_id":"{}"}}"#, first.id)));
    let reply = c.recv_until(WAIT, |t| event_of(t).as_deref() == Some("phx_reply"));
    assert!(reply.contains(r#""recovered":true"#), "{reply}");
    sender.join().expect("sender");
    let stored: Vec<DbRow> = rows_of().into_iter().filter(|r| r.conversation == conversation).collect();
    let expected: Vec<String> = stored.iter().skip(10).map(|r| r.body.clone()).collect();
    let got = texts(&next_messages(&mut c, &topic, expected.len()));
    assert_eq!(got, expected, "every message after the last seen one, once, in the stored order");
    c.expect_silence(Duration::from_millis(300));
}

fn a_rejoin_during_a_burst_has_no_gap_and_no_duplicate(backend: Backend) {
    let server = start_server_on(backend, &[("NEXUS_MSG_RATE", "0")]);
    rejoin_during_a_burst(server.port, || server.stored_rows(), server.port);
}

both_backends!(
    recovers_what_was_missed_after_the_presence_state,
    a_join_without_last_seen_id_or_with_null_answers_as_before,
    a_last_seen_id_that_is_not_a_uuid_is_refused,
    more_than_the_limit_is_not_recovered,
    a_rejoin_during_a_burst_has_no_gap_and_no_duplicate,
);

#[test]
fn in_a_cluster_a_rejoin_on_another_node_recovers_from_the_database() {
    let cluster = Cluster::start(3, &[]);
    let topic = new_topic();
    let sent = send_messages(cluster.nodes[0].port, &topic, "a", 5);
    // The member was on node 0; it comes back on node 2.
    let mut c = connect_v2(cluster.nodes[2].port, &new_sub());
    c.send_text(&join_frame(&topic, "1", &format!(r#"{{"last_seen_id":"{}"}}"#, sent[1].id)));
    c.expect(&v2_reply(Some("1"), Some("1"), &topic, "ok", r#"{"recovered":true,"missed":3}"#));
    assert_eq!(next_messages(&mut c, &topic, 3), sent[2..]);
    // And during a burst on node 1, rejoining on node 2.
    rejoin_during_a_burst(cluster.nodes[2].port, || cluster.rows(), cluster.nodes[1].port);
}

#[test]
fn a_recovery_that_cannot_read_answers_not_recovered_and_live_messages_follow() {
    use common::pg::Postgres;
    let mut pg = Postgres::start();
    let server = start_server(&[("NEXUS_DATABASE_URL", &pg.create_db())]);
    let topic = new_topic();
    let sent = send_messages(server.port, &topic, "a", 3);
    let mut member = joined(server.port, &new_sub(), &topic);
    pg.stop_immediate();
    let mut c = connect_v2(server.port, &new_sub());
    c.send_text(&join_frame(&topic, "1", &format!(r#"{{"last_seen_id":"{}"}}"#, sent[0].id)));
    c.expect(&v2_reply(Some("1"), Some("1"), &topic, "ok", r#"{"recovered":false}"#));
    pg.run();
    // Once the database is back, live messages reach it as any member (retry until stored).
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        member.send_text(&new_msg_push("1", "after", &topic, "after"));
        let reply = member.recv_until(WAIT, |t| t.contains(r#""after""#) && t.contains("phx_reply"));
        if reply.contains(r#""ok""#) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the writer did not recover");
        thread::sleep(Duration::from_millis(50)); // pace retries until the writer reconnects
    }
    assert_eq!(texts(&next_messages(&mut c, &topic, 1)), ["after"], "no old message, then live ones");
    // Other cores publish their counters every sweep (250 ms): poll until this one shows.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let metrics = http_get(server.port, "/metrics", None).body_text();
        if metrics.contains("nexus_recoveries_refused_total 1") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{metrics}");
        thread::sleep(Duration::from_millis(50)); // polling a gauge; no event to wait for
    }
}
