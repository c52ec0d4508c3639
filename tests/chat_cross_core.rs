//! Chat fan-out across cores (NEXUS_WORKERS=2), on both stores: many members of one topic, spread over both
//! cores by the kernel's SO_REUSEPORT hash, all receive every message in one common order,
//! each sender's messages in its send order, every send acknowledged; topics stay isolated;
//! members that go away do not disturb the others.
//!
//! With 40 connections from distinct ephemeral ports the chance that the kernel puts them all
//! on one of two listeners is 2^-39, so these tests exercise the cross-core path.

mod common;

use std::collections::{HashMap, HashSet};
use std::thread;
use std::time::{Duration, Instant};

use sonic_rs::JsonValueTrait;

use common::*;

const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// One received `new_msg`: (id, sender_id, text, inserted_at).
type Msg = (String, String, String, String);

fn new_msg_frame(topic: &str, r#ref: &str, body: &str) -> String {
    v2(Some("1"), Some(r#ref), topic, "new_msg", &format!(r#"{{"body":{}}}"#, js(Some(body))))
}

/// Parses a broadcast `new_msg` on `topic`, checking the envelope and generated fields.
fn parse_broadcast(frame: &str, topic: &str) -> Msg {
    let v = parse(frame);
    assert!(v[0].is_null() && v[1].is_null(), "broadcast refs must be null: {frame}");
    assert_eq!(v[2].as_str(), Some(topic), "{frame}");
    assert_eq!(v[3].as_str(), Some("new_msg"), "{frame}");
    let (id, ts) = check_generated_fields(&v[4]);
    let sender = v[4]["sender_id"].as_str().expect("sender_id").to_string();
    let text = v[4]["content"]["text"].as_str().expect("text").to_string();
    (id, sender, text, ts)
}

fn join_all(port: u16, topic: &str, subs: &[String]) -> Vec<Client> {
    subs.iter()
        .map(|sub| {
            let mut c = connect_v2(port, sub);
            c.join(topic, "1");
            c
        })
        .collect()
}

fn join_threads<T>(handles: Vec<thread::JoinHandle<T>>) -> Vec<T> {
    handles.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
}

fn every_member_sees_every_message_in_one_order(backend: Backend) {
    const SOCKETS: usize = 40;
    const SENDERS: usize = 4;
    const PER_SENDER: usize = 25;
    const TOTAL: usize = SENDERS * PER_SENDER;

    let server = start_server_on(backend, &[("NEXUS_WORKERS", "2")]);
    let topic = new_topic();
    let subs: Vec<String> = (0..SOCKETS).map(|_| new_sub()).collect();
    // Everyone is a member (join acknowledged) before anyone sends.
    let clients = join_all(server.port, &topic, &subs);

    let handles: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let topic = topic.clone();
            thread::spawn(move || {
                let sender = i < SENDERS;
                if sender {
                    for k in 0..PER_SENDER {
                        c.send_text(&new_msg_frame(&topic, &format!("m{k}"), &format!("s{i}-{k}")));
                    }
                }
                let mut msgs: Vec<Msg> = Vec::with_capacity(TOTAL);
                let mut acks = 0usize;
                let deadline = Instant::now() + Duration::from_secs(30);
                while msgs.len() < TOTAL || (sender && acks < PER_SENDER) {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    let frame = c
                        .try_recv_text(remaining.min(RECV_TIMEOUT))
                        .unwrap_or_else(|e| panic!("socket {i}: {e} after {} messages and {acks} acks", msgs.len()));
                    match parse(&frame)[3].as_str() {
                        Some("new_msg") => msgs.push(parse_broadcast(&frame, &topic)),
                        Some("phx_reply") if sender => {
                            assert_eq!(
                                frame,
                                v2_ok(Some("1"), &format!("m{acks}"), &topic),
                                "socket {i}: acks must be ok and in send order"
                            );
                            let own = format!("s{i}-{acks}");
                            assert!(msgs.iter().any(|m| m.2 == own), "socket {i}: ack of {own} before its broadcast");
                            acks += 1;
                        }
                        _ => panic!("socket {i}: unexpected frame {frame}"),
                    }
                }
                msgs
            })
        })
        .collect();
    let received = join_threads(handles);

    let reference = &received[0];
    // One order for everyone.
    for (i, msgs) in received.iter().enumerate() {
        assert_eq!(msgs.len(), TOTAL, "socket {i}");
        let ids: Vec<&str> = msgs.iter().map(|m| m.0.as_str()).collect();
        let ref_ids: Vec<&str> = reference.iter().map(|m| m.0.as_str()).collect();
        assert_eq!(ids, ref_ids, "socket {i} saw another order than socket 0");
        assert_eq!(msgs, reference, "socket {i} saw different content");
    }
    // Unique ids, strictly increasing inserted_at.
    let unique: HashSet<&str> = reference.iter().map(|m| m.0.as_str()).collect();
    assert_eq!(unique.len(), TOTAL, "duplicate ids");
    for w in reference.windows(2) {
        assert!(w[0].3 < w[1].3, "inserted_at not increasing: {} then {}", w[0].3, w[1].3);
    }
    // Each sender's messages, attributed to it, in its send order.
    for (i, sub) in subs.iter().enumerate().take(SENDERS) {
        let mine: Vec<&str> = reference.iter().filter(|m| m.1 == *sub).map(|m| m.2.as_str()).collect();
        let expected: Vec<String> = (0..PER_SENDER).map(|k| format!("s{i}-{k}")).collect();
        assert_eq!(mine, expected, "sender {i}");
    }
    // The broadcast order is the stored order.
    let stored: Vec<String> = server.stored_rows().into_iter().map(|r| r.id).collect();
    assert_eq!(stored, reference.iter().map(|m| m.0.clone()).collect::<Vec<_>>(), "stored order != broadcast order");
}

fn topics_are_isolated(backend: Backend) {
    const TOPICS: usize = 4;
    const MEMBERS: usize = 6;
    const MESSAGES: usize = 10;

    let server = start_server_on(backend, &[("NEXUS_WORKERS", "2")]);
    let topics: Vec<String> = (0..TOPICS).map(|_| new_topic()).collect();
    let mut handles = Vec::new();
    let mut groups = Vec::new();
    for topic in &topics {
        let subs: Vec<String> = (0..MEMBERS).map(|_| new_sub()).collect();
        groups.push((topic.clone(), join_all(server.port, topic, &subs)));
    }
    for (t, (topic, clients)) in groups.into_iter().enumerate() {
        for (m, mut c) in clients.into_iter().enumerate() {
            let topic = topic.clone();
            handles.push(thread::spawn(move || {
                let sender = m == 0;
                if sender {
                    for k in 0..MESSAGES {
                        c.send_text(&new_msg_frame(&topic, &format!("m{k}"), &format!("t{t}-{k}")));
                    }
                }
                let mut texts = Vec::new();
                let mut acks = 0;
                while texts.len() < MESSAGES || (sender && acks < MESSAGES) {
                    let frame = c.recv_text(RECV_TIMEOUT);
                    let v = parse(&frame);
                    assert_eq!(v[2].as_str(), Some(topic.as_str()), "topic {t} member {m} got {frame}");
                    match v[3].as_str() {
                        Some("new_msg") => texts.push(parse_broadcast(&frame, &topic).2),
                        Some("phx_reply") if sender => {
                            assert_eq!(frame, v2_ok(Some("1"), &format!("m{acks}"), &topic));
                            acks += 1;
                        }
                        _ => panic!("topic {t} member {m}: unexpected {frame}"),
                    }
                }
                let expected: Vec<String> = (0..MESSAGES).map(|k| format!("t{t}-{k}")).collect();
                assert_eq!(texts, expected, "topic {t} member {m}");
                c
            }));
        }
    }
    let mut clients = join_threads(handles);
    // All sends are acknowledged everywhere; a heartbeat now is answered before anything else
    // (no late message from another topic sneaks in).
    for (i, c) in clients.iter_mut().enumerate() {
        c.heartbeat(&format!("end{i}"));
    }
}

fn members_leaving_do_not_disturb_the_others(backend: Backend) {
    let server = start_server_on(backend, &[("NEXUS_WORKERS", "2")]);
    let port = server.port;
    let topic = new_topic();
    let shared_sub = new_sub();
    // Two sockets of the same user, plus others.
    let mut subs: Vec<String> = (0..8).map(|_| new_sub()).collect();
    subs[1] = shared_sub.clone();
    subs[2] = shared_sub.clone();
    let mut clients = join_all(port, &topic, &subs);

    // Three leave in three ways: TCP drop, close frame, phx_leave.
    drop(clients.remove(7));
    let mut closing = clients.remove(6);
    closing.send_text(&v2(Some("1"), Some("2"), &topic, "phx_leave", "{}"));
    closing.expect(&v2_ok(Some("1"), "2", &topic));
    closing.expect(&format!(r#"["1","1","{topic}","phx_close",{{}}]"#));
    let mut gone = clients.remove(5);
    assert_eq!(gone.close_handshake(), Some(1001));

    let sender_sub = subs[0].clone();
    let sender = &mut clients[0];
    sender.send_text(&new_msg_frame(&topic, "x", "after leaves"));
    let (id, from, text, _) = parse_broadcast(&sender.recv(), &topic);
    assert_eq!((from.as_str(), text.as_str()), (sender_sub.as_str(), "after leaves"));
    sender.expect(&v2_ok(Some("1"), "x", &topic));
    let mut seen: HashMap<usize, String> = HashMap::new();
    for (i, c) in clients.iter_mut().enumerate().skip(1) {
        let (got_id, _, got_text, _) = parse_broadcast(&c.recv(), &topic);
        assert_eq!(got_text, "after leaves", "member {i}");
        seen.insert(i, got_id);
    }
    assert!(seen.values().all(|v| *v == id));
    // The socket that left with phx_leave gets nothing more: its next frame is its heartbeat.
    closing.heartbeat("after");
}

both_backends!(
    every_member_sees_every_message_in_one_order,
    topics_are_isolated,
    members_leaving_do_not_disturb_the_others
);
