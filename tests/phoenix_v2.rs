//! The Phoenix V2 channel protocol, frame by frame: heartbeat, join / duplicate join / leave,
//! unmatched topics, stale join_refs, `ping`, unknown events, `new_msg` (broadcast then reply,
//! generated fields, validation), the per-socket channel limit, malformed and binary frames.
//! Every expected frame is compared byte for byte. Presence frames are skipped by the client
//! helpers (see `common::Client::skip_presence`).

mod common;

use sonic_rs::{JsonValueTrait, Value};

use common::*;

#[test]
fn heartbeat_reply_is_exact() {
    let server = start_server(&[]);
    let mut c = connect_v2(server.port, &new_sub());
    c.roundtrip(
        r#"[null,"1","phoenix","heartbeat",{}]"#,
        r#"[null,"1","phoenix","phx_reply",{"status":"ok","response":{}}]"#,
    );
    // Refs are opaque strings, echoed as sent.
    c.heartbeat("12345678901234567890");
    c.heartbeat("ref-é-✓");
}

#[test]
fn join_reply_is_exact_and_echoes_the_topic() {
    let server = start_server(&[]);
    let mut c = connect_v2(server.port, &new_sub());
    let id = uuid::Uuid::new_v4();
    let topic = format!("chat:{id}");
    c.roundtrip(
        &format!(r#"["1","1","{topic}","phx_join",{{}}]"#),
        &format!(r#"["1","1","{topic}","phx_reply",{{"status":"ok","response":{{}}}}]"#),
    );
    // Upper-case hex is valid input and the topic is echoed exactly as sent.
    let upper = format!("chat:{}", uuid::Uuid::new_v4().to_string().to_uppercase());
    c.join(&upper, "2");
    // Join params are accepted and ignored.
    let t3 = new_topic();
    c.roundtrip(&v2(Some("3"), Some("3"), &t3, "phx_join", r#"{"name":"ann","n":[1,2]}"#), &v2_ok(Some("3"), "3", &t3));
    c.heartbeat("4");
}

#[test]
fn join_of_an_unknown_topic_is_unmatched_with_null_join_ref() {
    let server = start_server(&[]);
    let mut c = connect_v2(server.port, &new_sub());
    let simple = format!("chat:{}", uuid::Uuid::new_v4().simple());
    for topic in ["room:lobby", "chat:nope", "chat:", "phoenix", simple.as_str()] {
        c.roundtrip(
            &v2(Some("1"), Some("1"), topic, "phx_join", "{}"),
            &format!(
                r#"[null,"1",{},"phx_reply",{{"status":"error","response":{{"reason":"unmatched topic"}}}}]"#,
                js(Some(topic))
            ),
        );
    }
    c.heartbeat("2");
}

#[test]
fn duplicate_join_replies_then_closes_the_old_join() {
    let server = start_server(&[]);
    let mut c = connect_v2(server.port, &new_sub());
    let topic = new_topic();
    c.join(&topic, "1");
    c.send_text(&v2(Some("5"), Some("5"), &topic, "phx_join", "{}"));
    c.expect(&format!(r#"["5","5","{topic}","phx_reply",{{"status":"ok","response":{{}}}}]"#));
    c.expect(&format!(r#"["1","1","{topic}","phx_close",{{}}]"#));
    // The new join is the current one: a push with it is answered with it.
    c.roundtrip(&v2(Some("5"), Some("6"), &topic, "ping", "{}"), &v2_ok(Some("5"), "6", &topic));
}

#[test]
fn leave_replies_then_closes() {
    let server = start_server(&[]);
    let mut c = connect_v2(server.port, &new_sub());
    let topic = new_topic();
    c.join(&topic, "1");
    c.send_text(&v2(Some("1"), Some("2"), &topic, "phx_leave", "{}"));
    c.expect(&format!(r#"["1","2","{topic}","phx_reply",{{"status":"ok","response":{{}}}}]"#));
    c.expect(&format!(r#"["1","1","{topic}","phx_close",{{}}]"#));
    // After the leave the topic is no longer joined.
    c.roundtrip(&v2(Some("1"), Some("3"), &topic, "ping", "{}"), &v2_error(None, "3", &topic, "unmatched topic"));
    // And it can be joined again.
    c.join(&topic, "4");
}

#[test]
fn leave_of_a_topic_not_joined_is_ok_with_the_join_ref_as_sent() {
    let server = start_server(&[]);
    let mut c = connect_v2(server.port, &new_sub());
    let topic = new_topic();
    c.roundtrip(
        &v2(Some("7"), Some("2"), &topic, "phx_leave", "{}"),
        &format!(r#"["7","2","{topic}","phx_reply",{{"status":"ok","response":{{}}}}]"#),
    );
    c.roundtrip(
        &v2(None, Some("3"), "room:lobby", "phx_leave", "{}"),
        r#"[null,"3","room:lobby","phx_reply",{"status":"ok","response":{}}]"#,
    );
    // No phx_close follows: the next frame is the heartbeat reply.
    c.heartbeat("4");
}

#[test]
fn push_on_a_topic_not_joined_is_unmatched() {
    let server = start_server(&[]);
    let mut c = connect_v2(server.port, &new_sub());
    let topic = new_topic();
    for (event, payload) in [("new_msg", r#"{"body":"hi"}"#), ("ping", "{}"), ("whatever", "{}")] {
        c.roundtrip(
            &v2(Some("1"), Some("3"), &topic, event, payload),
            &format!(
                r#"[null,"3","{topic}","phx_reply",{{"status":"error","response":{{"reason":"unmatched topic"}}}}]"#
            ),
        );
    }
    c.roundtrip(
        &v2(None, Some("4"), "room:lobby", "new_msg", r#"{"body":"hi"}"#),
        &v2_error(None, "4", "room:lobby", "unmatched topic"),
    );
}

#[test]
fn stale_join_refs_are_dropped_silently() {
    let server = start_server(&[]);
    let mut c = connect_v2(server.port, &new_sub());
    let topic = new_topic();
    c.join(&topic, "1");
    // A join_ref that was never used.
    c.send_text(&v2(Some("9"), Some("2"), &topic, "ping", "{}"));
    c.heartbeat("hb1");
    // Rejoin: "1" becomes stale.
    c.send_text(&v2(Some("5"), Some("5"), &topic, "phx_join", "{}"));
    c.expect(&v2_ok(Some("5"), "5", &topic));
    c.expect(&format!(r#"["1","1","{topic}","phx_close",{{}}]"#));
    c.send_text(&v2(Some("1"), Some("6"), &topic, "ping", "{}"));
    c.send_text(&v2(Some("1"), Some("7"), &topic, "new_msg", r#"{"body":"stale"}"#));
    // A stale leave is ignored too: no reply, no close, still joined.
    c.send_text(&v2(Some("1"), Some("8"), &topic, "phx_leave", "{}"));
    c.heartbeat("hb2");
    c.roundtrip(&v2(Some("5"), Some("9"), &topic, "ping", "{}"), &v2_ok(Some("5"), "9", &topic));
}

#[test]
fn null_join_ref_is_routed_and_replies_carry_the_current_join_ref() {
    let server = start_server(&[]);
    let mut c = connect_v2(server.port, &new_sub());
    let topic = new_topic();
    c.join(&topic, "1");
    c.roundtrip(
        &v2(None, Some("2"), &topic, "ping", r#"{"x":1}"#),
        &v2_reply(Some("1"), Some("2"), &topic, "ok", r#"{"x":1}"#),
    );
}

#[test]
fn ping_echoes_its_payload() {
    let server = start_server(&[]);
    let mut c = connect_v2(server.port, &new_sub());
    let topic = new_topic();
    c.join(&topic, "1");
    c.send_text(&v2(Some("1"), Some("3"), &topic, "ping", r#"{"a":[1,2],"b":"x"}"#));
    let reply = c.recv();
    assert!(reply.starts_with(&format!(r#"["1","3","{topic}","phx_reply",{{"status":"ok","response":"#)), "{reply}");
    let v = parse(&reply);
    let expected: Value = sonic_rs::from_str(r#"{"a":[1,2],"b":"x"}"#).expect("json");
    assert_eq!(v[4]["response"], expected, "{reply}");
    assert_eq!(reply, format!(r#"["1","3","{topic}","phx_reply",{{"status":"ok","response":{{"a":[1,2],"b":"x"}}}}]"#));
    // Nested, unicode and escaped content survives the round trip.
    let payload = r#"{"s":"quote \" backslash \\ é ✓ 😀","n":{"deep":[true,false,null,-1.5]}}"#;
    c.send_text(&v2(Some("1"), Some("4"), &topic, "ping", payload));
    let reply = parse(&c.recv());
    let expected: Value = sonic_rs::from_str(payload).expect("json");
    assert_eq!(reply[4]["status"].as_str(), Some("ok"));
    assert_eq!(reply[4]["response"], expected);
    assert_eq!(reply[1].as_str(), Some("4"));
}

#[test]
fn unknown_event_is_an_error_reply() {
    let server = start_server(&[]);
    let mut c = connect_v2(server.port, &new_sub());
    let topic = new_topic();
    c.join(&topic, "1");
    c.roundtrip(
        &v2(Some("1"), Some("3"), &topic, "dance", "{}"),
        &format!(r#"["1","3","{topic}","phx_reply",{{"status":"error","response":{{"reason":"unknown event"}}}}]"#),
    );
    // The channel survives.
    c.roundtrip(&v2(Some("1"), Some("4"), &topic, "ping", "{}"), &v2_ok(Some("1"), "4", &topic));
}

/// Reads the next frame, checks it is the `new_msg` broadcast of `text` by `sender` on
/// `topic` with exact bytes, and returns `(frame, id, inserted_at)`.
fn expect_new_msg(c: &mut Client, topic: &str, sender: &str, text: &str) -> (String, String, String) {
    let frame = c.recv();
    let v = parse(&frame);
    let (id, ts) = check_generated_fields(&v[4]);
    let expected = format!(
        r#"[null,null,"{topic}","new_msg",{{"id":"{id}","content":{{"text":{}}},"sender_id":"{sender}","inserted_at":"{ts}"}}]"#,
        js(Some(text))
    );
    if frame != expected {
        // Escaping may legitimately differ (e.g. \u00e9 vs é); the content must not.
        assert_eq!(v[4]["content"]["text"].as_str(), Some(text), "{frame}");
        let ascii_expected = format!(r#"[null,null,"{topic}","new_msg",{{"id":"{id}","content":{{"text":"#);
        assert!(frame.starts_with(&ascii_expected), "{frame}\nexpected {expected}");
        assert!(
            frame.ends_with(&format!(r#"}},"sender_id":"{sender}","inserted_at":"{ts}"}}]"#)),
            "{frame}\nexpected {expected}"
        );
    }
    (frame, id, ts)
}

#[test]
fn new_msg_broadcasts_to_every_member_then_replies() {
    let server = start_server(&[]);
    let port = server.port;
    let topic = new_topic();
    let (sa, sb) = (new_sub(), new_sub());
    let mut a = connect_v2(port, &sa);
    let mut b = connect_v2(port, &sb);
    a.join(&topic, "1");
    b.join(&topic, "1");

    a.send_text(&v2(Some("1"), Some("4"), &topic, "new_msg", r#"{"body":"hi"}"#));
    // Sender: broadcast first, then the reply.
    let (frame_a, id, ts) = expect_new_msg(&mut a, &topic, &sa, "hi");
    a.expect(&format!(r#"["1","4","{topic}","phx_reply",{{"status":"ok","response":{{}}}}]"#));
    // The other member gets the identical broadcast.
    let (frame_b, id_b, ts_b) = expect_new_msg(&mut b, &topic, &sa, "hi");
    assert_eq!(frame_a, frame_b);
    assert_eq!((id.as_str(), ts.as_str()), (id_b.as_str(), ts_b.as_str()));

    // Other direction, with text that needs escaping.
    let text = "he said \"hi\" \\ tab\t é ✓ 😀 </script>";
    b.send_text(&v2(Some("1"), Some("7"), &topic, "new_msg", &format!(r#"{{"body":{}}}"#, js(Some(text)))));
    let (_, id2, ts2) = expect_new_msg(&mut b, &topic, &sb, text);
    b.expect(&v2_ok(Some("1"), "7", &topic));
    let (_, id2a, _) = expect_new_msg(&mut a, &topic, &sb, text);
    assert_eq!(id2, id2a);
    assert_ne!(id, id2);
    assert!(ts2 > ts, "inserted_at must increase within a topic: {ts} then {ts2}");
}

#[test]
fn new_msg_is_not_delivered_to_non_members() {
    let server = start_server(&[]);
    let port = server.port;
    let (t1, t2) = (new_topic(), new_topic());
    let sa = new_sub();
    let mut a = connect_v2(port, &sa);
    let mut outsider = connect_v2(port, &new_sub());
    a.join(&t1, "1");
    outsider.join(&t2, "1");
    a.send_text(&v2(Some("1"), Some("2"), &t1, "new_msg", r#"{"body":"for t1"}"#));
    expect_new_msg(&mut a, &t1, &sa, "for t1");
    a.expect(&v2_ok(Some("1"), "2", &t1));
    // The outsider's own topic works, and its next frame is its own message, not t1's.
    let so = outsider_sub_roundtrip(&mut outsider, &t2);
    assert!(!so.contains("for t1"));
}

fn outsider_sub_roundtrip(c: &mut Client, topic: &str) -> String {
    c.send_text(&v2(Some("1"), Some("2"), topic, "new_msg", r#"{"body":"for t2"}"#));
    let frame = c.recv();
    let v = parse(&frame);
    assert_eq!(v[2].as_str(), Some(topic), "{frame}");
    assert_eq!(v[4]["content"]["text"].as_str(), Some("for t2"), "{frame}");
    c.expect(&v2_ok(Some("1"), "2", topic));
    frame
}

#[test]
fn new_msg_with_a_bad_body_fails_and_broadcasts_nothing() {
    let server = start_server(&[]);
    let port = server.port;
    let topic = new_topic();
    let (sa, sb) = (new_sub(), new_sub());
    let mut a = connect_v2(port, &sa);
    let mut b = connect_v2(port, &sb);
    a.join(&topic, "1");
    b.join(&topic, "1");
    for (i, payload) in [
        "{}",
        r#"{"body":""}"#,
        r#"{"body":5}"#,
        r#"{"body":null}"#,
        r#"{"body":["x"]}"#,
        r#"{"body":{"text":"x"}}"#,
        r#"{"text":"x"}"#,
    ]
    .iter()
    .enumerate()
    {
        let r = format!("b{i}");
        a.roundtrip(
            &v2(Some("1"), Some(&r), &topic, "new_msg", payload),
            &format!(
                r#"["1","{r}","{topic}","phx_reply",{{"status":"error","response":{{"reason":"Failed to save","detail":"body must be a non-empty string"}}}}]"#
            ),
        );
    }
    // Nothing was broadcast: the next message both members see is this one.
    a.send_text(&v2(Some("1"), Some("ok"), &topic, "new_msg", r#"{"body":"valid"}"#));
    expect_new_msg(&mut a, &topic, &sa, "valid");
    a.expect(&v2_ok(Some("1"), "ok", &topic));
    expect_new_msg(&mut b, &topic, &sa, "valid");
}

#[test]
fn inserted_at_and_ids_follow_send_order() {
    let server = start_server(&[]);
    let port = server.port;
    let topic = new_topic();
    let sa = new_sub();
    let mut a = connect_v2(port, &sa);
    a.join(&topic, "1");
    // Pipelined: all sent before any reply is read.
    for i in 0..20 {
        a.send_text(&v2(Some("1"), Some(&format!("m{i}")), &topic, "new_msg", &format!(r#"{{"body":"n{i}"}}"#)));
    }
    let mut last_ts = String::new();
    let mut ids = std::collections::HashSet::new();
    for i in 0..20 {
        let (_, id, ts) = expect_new_msg(&mut a, &topic, &sa, &format!("n{i}"));
        a.expect(&v2_ok(Some("1"), &format!("m{i}"), &topic));
        assert!(ts > last_ts, "inserted_at not increasing: {last_ts} then {ts}");
        assert!(ids.insert(id.clone()), "duplicate id {id}");
        last_ts = ts;
    }
}

#[test]
fn more_than_100_channels_is_refused() {
    let server = start_server(&[]);
    let mut c = connect_v2(server.port, &new_sub());
    let topics: Vec<String> = (0..101).map(|_| new_topic()).collect();
    for (i, topic) in topics.iter().take(100).enumerate() {
        c.join(topic, &format!("j{i}"));
    }
    let extra = &topics[100];
    c.roundtrip(
        &v2(Some("x1"), Some("x1"), extra, "phx_join", "{}"),
        &format!(
            r#"["x1","x1","{extra}","phx_reply",{{"status":"error","response":{{"reason":"too many channels joined"}}}}]"#
        ),
    );
    // Re-joining a topic already joined is a replacement, not a 101st channel.
    c.send_text(&v2(Some("r0"), Some("r0"), &topics[0], "phx_join", "{}"));
    c.expect(&v2_ok(Some("r0"), "r0", &topics[0]));
    c.expect(&format!(r#"["j0","j0","{}","phx_close",{{}}]"#, topics[0]));
    // Leaving one frees a slot.
    c.send_text(&v2(Some("j1"), Some("l1"), &topics[1], "phx_leave", "{}"));
    c.expect(&v2_ok(Some("j1"), "l1", &topics[1]));
    c.expect(&format!(r#"["j1","j1","{}","phx_close",{{}}]"#, topics[1]));
    c.join(extra, "x2");
}

#[test]
fn malformed_frames_are_dropped_and_the_socket_stays_open() {
    let server = start_server(&[]);
    let port = server.port;
    let topic = new_topic();
    let sb = new_sub();
    let mut c = connect_v2(port, &new_sub());
    let mut bystander = connect_v2(port, &sb);
    c.join(&topic, "1");
    bystander.join(&topic, "1");
    let malformed = [
        "not json",
        "",
        "null",
        "42",
        "{}",
        "[]",
        "[1,2]",
        r#"[null,"bad","phoenix","heartbeat"]"#,
        r#"[null,"bad","phoenix","heartbeat",{},"extra"]"#,
        r#"[null,"bad",5,"heartbeat",{}]"#,
        r#"[null,"bad","phoenix",null,{}]"#,
        r#"[null,5,"phoenix","heartbeat",{}]"#,
        r#"[7,"bad","phoenix","heartbeat",{}]"#,
        r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"bad"}"#,
        r#"[null,"bad","phoenix","heartbeat",{}"#,
        "[[],[],[],[],[]]",
    ];
    for (i, text) in malformed.iter().enumerate() {
        let r = format!("ok{i}");
        c.send_text(text);
        c.send_text(&heartbeat(&r));
        assert_eq!(c.recv(), heartbeat_reply(&r), "malformed frame {text:?} was not dropped silently");
    }
    // The channel membership survived too, and so did the other member.
    c.roundtrip(&v2(Some("1"), Some("p"), &topic, "ping", "{}"), &v2_ok(Some("1"), "p", &topic));
    bystander.send_text(&v2(Some("1"), Some("2"), &topic, "new_msg", r#"{"body":"still"}"#));
    expect_new_msg(&mut bystander, &topic, &sb, "still");
    bystander.expect(&v2_ok(Some("1"), "2", &topic));
    expect_new_msg(&mut c, &topic, &sb, "still");
}

/// Phoenix V2 binary push (kind 0): header, then join_ref, ref, topic, event, payload.
fn binary_push(join_ref: &str, r#ref: &str, topic: &str, event: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8, join_ref.len() as u8, r#ref.len() as u8, topic.len() as u8, event.len() as u8];
    for part in [join_ref, r#ref, topic, event] {
        out.extend_from_slice(part.as_bytes());
    }
    out.extend_from_slice(payload);
    out
}

#[test]
fn binary_push_gets_an_error_reply() {
    let server = start_server(&[]);
    let mut c = connect_v2(server.port, &new_sub());
    let topic = new_topic();
    c.join(&topic, "1");
    // The reference layout from the spec, byte for byte.
    let sample = binary_push("3", "7", "room:1", "up", &[1, 2]);
    assert_eq!(
        sample,
        [0x00, 0x01, 0x01, 0x06, 0x02, 0x33, 0x37, 0x72, 0x6f, 0x6f, 0x6d, 0x3a, 0x31, 0x75, 0x70, 0x01, 0x02]
    );
    c.send_binary(&binary_push("1", "7", &topic, "new_msg", &[0xde, 0xad, 0xbe, 0xef]));
    c.expect(&format!(
        r#"["1","7","{topic}","phx_reply",{{"status":"error","response":{{"reason":"binary payload not supported"}}}}]"#
    ));
    c.heartbeat("2");
}

#[test]
fn garbage_binary_frames_are_dropped() {
    let server = start_server(&[]);
    let mut c = connect_v2(server.port, &new_sub());
    let topic = new_topic();
    c.join(&topic, "1");
    let garbage: [&[u8]; 5] = [
        &[],
        &[0x07, 0xff, 0x00],
        &[0x00, 0x05],
        &[0x00, 0x01, 0x01, 0xff, 0x02, b'1'],
        b"[null,\"x\",\"phoenix\",\"heartbeat\",{}]",
    ];
    for (i, bytes) in garbage.iter().enumerate() {
        let r = format!("ok{i}");
        c.send_binary(bytes);
        c.send_text(&heartbeat(&r));
        assert_eq!(c.recv(), heartbeat_reply(&r), "binary frame {bytes:02x?} was not dropped silently");
    }
    c.roundtrip(&v2(Some("1"), Some("p"), &topic, "ping", "{}"), &v2_ok(Some("1"), "p", &topic));
}
