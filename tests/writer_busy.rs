//! A full writer queue answers `Failed to save` / `server busy` at once (no waiting, no
//! unbounded memory), broadcasts nothing for the refused messages, and the server keeps
//! serving. `NEXUS_WRITER_QUEUE=1` makes the queue fill under one burst.

mod common;

use std::time::Duration;

use common::*;
use sonic_rs::JsonValueTrait;

#[test]
fn a_full_writer_queue_answers_server_busy_and_nothing_else_changes() {
    let server = start_server(&[("NEXUS_WRITER_QUEUE", "1")]);
    let topic = new_topic();
    let (sender_sub, watcher_sub) = (new_sub(), new_sub());
    let mut sender = connect_v2(server.port, &sender_sub);
    let mut watcher = connect_v2(server.port, &watcher_sub);
    sender.join(&topic, "1");
    watcher.join(&topic, "1");

    const N: usize = 400;
    let frames: Vec<String> = (0..N).map(|i| new_msg_push("1", &format!("m{i}"), &topic, &format!("b{i}"))).collect();
    sender.send_burst(&frames);

    let (mut ok, mut busy, mut own_broadcasts) = (Vec::new(), Vec::new(), 0);
    while ok.len() + busy.len() < N {
        let frame = sender.recv_text(Duration::from_secs(10));
        if is_new_msg(&frame) {
            own_broadcasts += 1;
            continue;
        }
        let v = parse(&frame);
        let r = v[1].as_str().expect("reply ref").to_string();
        if frame == v2_ok(Some("1"), &r, &topic) {
            ok.push(r);
        } else {
            assert_eq!(frame, failed_to_save("1", &r, &topic, "server busy"), "only ok or server busy");
            busy.push(r);
        }
    }
    assert!(!busy.is_empty(), "a 1-deep writer queue must refuse part of a {N}-message burst");
    assert!(!ok.is_empty(), "the writer still takes what fits");

    // The watcher sees exactly the accepted messages, in the sender's order.
    let accepted: Vec<String> = ok.iter().map(|r| format!("b{}", &r[1..])).collect();
    let mut seen = Vec::new();
    while seen.len() < accepted.len() {
        let frame = watcher.recv_text(Duration::from_secs(10));
        if is_new_msg(&frame) {
            seen.push(parse(&frame)[4]["content"]["text"].as_str().expect("text").to_string());
        }
    }
    let mut in_order = accepted.clone();
    in_order.sort_by_key(|b| b[1..].parse::<usize>().expect("number"));
    assert_eq!(seen, in_order);
    // Nothing else was broadcast: after the sender's own copies, the watcher's next frame is
    // its heartbeat reply.
    while own_broadcasts < ok.len() {
        if is_new_msg(&sender.recv_text(Duration::from_secs(10))) {
            own_broadcasts += 1;
        }
    }
    watcher.heartbeat("hb");

    // And the server keeps serving: one more message is broadcast, then acked.
    sender.send_text(&new_msg_push("1", "after", &topic, "after"));
    let frame = sender.recv_text(Duration::from_secs(10));
    assert_eq!(parse(&frame)[4]["content"]["text"].as_str(), Some("after"), "{frame}");
    assert_eq!(sender.recv_text(Duration::from_secs(10)), v2_ok(Some("1"), "after", &topic));
}
