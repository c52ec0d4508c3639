//! The Phoenix V1 serializer (`vsn=1.0.0` or no vsn): object frames in, `topic, event,
//! payload, ref` objects out (never `join_ref`), and V1 and V2 clients sharing one topic.

mod common;

use common::*;

#[test]
fn heartbeat_reply_is_exact() {
    let server = start_server(&[]);
    let mut c = connect_v1(server.port, &new_sub());
    c.roundtrip(
        r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"1"}"#,
        r#"{"topic":"phoenix","event":"phx_reply","payload":{"status":"ok","response":{}},"ref":"1"}"#,
    );
    // join_ref in the input is accepted and never echoed.
    c.roundtrip(
        r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"2","join_ref":null}"#,
        r#"{"topic":"phoenix","event":"phx_reply","payload":{"status":"ok","response":{}},"ref":"2"}"#,
    );
    // Key order in the input does not matter.
    c.roundtrip(
        r#"{"ref":"3","payload":{},"event":"heartbeat","topic":"phoenix"}"#,
        r#"{"topic":"phoenix","event":"phx_reply","payload":{"status":"ok","response":{}},"ref":"3"}"#,
    );
}

#[test]
fn no_vsn_means_v1() {
    let server = start_server(&[]);
    let mut c = connect(server.port, &format!("token={}", token(&new_sub())));
    c.roundtrip(&v1(None, Some("1"), "phoenix", "heartbeat", "{}"), &v1_reply("phoenix", "1", "ok", "{}"));
}

#[test]
fn join_leave_and_close_in_v1() {
    let server = start_server(&[]);
    let mut c = connect_v1(server.port, &new_sub());
    let topic = new_topic();
    c.roundtrip(
        &format!(r#"{{"topic":"{topic}","event":"phx_join","payload":{{}},"ref":"1","join_ref":"1"}}"#),
        &format!(r#"{{"topic":"{topic}","event":"phx_reply","payload":{{"status":"ok","response":{{}}}},"ref":"1"}}"#),
    );
    c.roundtrip(
        &v1(Some("1"), Some("2"), &topic, "ping", r#"{"k":"v"}"#),
        &v1_reply(&topic, "2", "ok", r#"{"k":"v"}"#),
    );
    c.send_text(&v1(Some("1"), Some("3"), &topic, "phx_leave", "{}"));
    c.expect(&v1_reply(&topic, "3", "ok", "{}"));
    c.expect(&format!(r#"{{"topic":"{topic}","event":"phx_close","payload":{{}},"ref":"1"}}"#));
}

#[test]
fn errors_in_v1() {
    let server = start_server(&[]);
    let mut c = connect_v1(server.port, &new_sub());
    c.roundtrip(
        &v1(Some("1"), Some("1"), "room:lobby", "phx_join", "{}"),
        r#"{"topic":"room:lobby","event":"phx_reply","payload":{"status":"error","response":{"reason":"unmatched topic"}},"ref":"1"}"#,
    );
    let topic = new_topic();
    c.roundtrip(
        &v1(None, Some("2"), &topic, "new_msg", r#"{"body":"hi"}"#),
        &v1_reply(&topic, "2", "error", r#"{"reason":"unmatched topic"}"#),
    );
    c.join_v1(&topic, "3");
    c.roundtrip(
        &v1(Some("3"), Some("4"), &topic, "dance", "{}"),
        &v1_reply(&topic, "4", "error", r#"{"reason":"unknown event"}"#),
    );
    c.roundtrip(
        &v1(Some("3"), Some("5"), &topic, "new_msg", r#"{"body":""}"#),
        &v1_reply(&topic, "5", "error", r#"{"reason":"Failed to save","detail":"body must be a non-empty string"}"#),
    );
}

#[test]
fn new_msg_in_v1() {
    let server = start_server(&[]);
    let sub = new_sub();
    let mut c = connect_v1(server.port, &sub);
    let topic = new_topic();
    c.join_v1(&topic, "1");
    c.send_text(&v1(Some("1"), Some("2"), &topic, "new_msg", r#"{"body":"hello v1"}"#));
    let frame = c.recv();
    let v = parse(&frame);
    let (id, ts) = check_generated_fields(&v["payload"]);
    assert_eq!(
        frame,
        format!(
            r#"{{"topic":"{topic}","event":"new_msg","payload":{{"id":"{id}","content":{{"text":"hello v1"}},"sender_id":"{sub}","inserted_at":"{ts}"}},"ref":null}}"#
        )
    );
    c.expect(&v1_reply(&topic, "2", "ok", "{}"));
}

#[test]
fn v1_and_v2_members_each_get_their_own_format() {
    let server = start_server(&[]);
    let port = server.port;
    let topic = new_topic();
    let (s1, s2) = (new_sub(), new_sub());
    let mut c1 = connect_v1(port, &s1);
    let mut c2 = connect_v2(port, &s2);
    c1.join_v1(&topic, "1");
    c2.join(&topic, "1");

    // V2 sender.
    c2.send_text(&v2(Some("1"), Some("2"), &topic, "new_msg", r#"{"body":"from v2"}"#));
    let f2 = c2.recv();
    c2.expect(&v2_ok(Some("1"), "2", &topic));
    let p2 = parse(&f2);
    let (id, ts) = check_generated_fields(&p2[4]);
    let payload = format!(r#"{{"id":"{id}","content":{{"text":"from v2"}},"sender_id":"{s2}","inserted_at":"{ts}"}}"#);
    assert_eq!(f2, format!(r#"[null,null,"{topic}","new_msg",{payload}]"#));
    c1.expect(&v1_out(&topic, "new_msg", &payload, None));

    // V1 sender.
    c1.send_text(&v1(Some("1"), Some("3"), &topic, "new_msg", r#"{"body":"from v1"}"#));
    let f1 = c1.recv();
    c1.expect(&v1_reply(&topic, "3", "ok", "{}"));
    let p1 = parse(&f1);
    let (id, ts) = check_generated_fields(&p1["payload"]);
    let payload = format!(r#"{{"id":"{id}","content":{{"text":"from v1"}},"sender_id":"{s1}","inserted_at":"{ts}"}}"#);
    assert_eq!(f1, v1_out(&topic, "new_msg", &payload, None));
    c2.expect(&format!(r#"[null,null,"{topic}","new_msg",{payload}]"#));
}

#[test]
fn malformed_v1_frames_are_dropped() {
    let server = start_server(&[]);
    let mut c = connect_v1(server.port, &new_sub());
    let malformed = [
        "not json",
        "[]",
        r#"[null,"bad","phoenix","heartbeat",{}]"#,
        r#"{"event":"heartbeat","payload":{},"ref":"bad"}"#,
        r#"{"topic":"phoenix","payload":{},"ref":"bad"}"#,
        r#"{"topic":"phoenix","event":"heartbeat","ref":"bad"}"#,
        r#"{"topic":"phoenix","event":"heartbeat","payload":{}}"#,
        r#"{"topic":5,"event":"heartbeat","payload":{},"ref":"bad"}"#,
        r#"{"topic":"phoenix","event":null,"payload":{},"ref":"bad"}"#,
    ];
    for (i, text) in malformed.iter().enumerate() {
        let r = format!("ok{i}");
        c.send_text(text);
        c.send_text(&v1(None, Some(&r), "phoenix", "heartbeat", "{}"));
        // The next frame must be the reply to this heartbeat: the malformed one got nothing.
        assert_eq!(c.recv(), v1_reply("phoenix", &r, "ok", "{}"), "malformed frame {text:?} was not dropped silently");
    }
}
