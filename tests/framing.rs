//! WebSocket framing (RFC 6455) with hand-built frames: ping/pong, close echo, fragmentation
//! and reassembly, the frame-size limit (1009), invalid UTF-8 (1007), protocol errors (1002)
//! and the idle timeout (1001). Server frames are parsed strictly (never masked, minimal
//! lengths).

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn ping_gets_a_pong_with_the_same_payload() {
    let server = start_server(&[]);
    let mut ws = RawWs::connect(server.port);
    for payload in [&b"hello"[..], b"", &[0xab; 125][..]] {
        ws.send(OP_PING, payload);
        assert_eq!(ws.frame(), Frame { fin: true, rsv: 0, opcode: OP_PONG, payload: payload.to_vec() });
    }
    // Unsolicited pongs are ignored.
    ws.send(OP_PONG, b"whatever");
    ws.heartbeat("1");
}

#[test]
fn client_close_is_echoed_then_tcp_is_closed() {
    let server = start_server(&[]);
    for code in [1000u16, 1001, 4001] {
        let mut ws = RawWs::connect(server.port);
        ws.send(OP_CLOSE, &close_payload(code, "bye"));
        let frame = ws.frame();
        assert!(frame.fin && frame.rsv == 0, "{frame:?}");
        assert_eq!(frame.close_code().0, Some(code), "{frame:?}");
        ws.expect_eof();
    }
}

#[test]
fn fragmented_text_is_reassembled() {
    let server = start_server(&[]);
    let mut ws = RawWs::connect(server.port);
    let text = heartbeat("frag");
    let (a, rest) = text.as_bytes().split_at(5);
    let (b, c) = rest.split_at(10);
    ws.send_raw(&encode_frame(false, 0, OP_TEXT, Some(MASK), a));
    ws.send_raw(&encode_frame(false, 0, OP_CONT, Some(MASK), b));
    ws.send_raw(&encode_frame(true, 0, OP_CONT, Some([1, 2, 3, 4]), c));
    ws.expect_text(&heartbeat_reply("frag"));

    // A control frame may arrive between fragments: it is answered at once.
    ws.send_raw(&encode_frame(false, 0, OP_TEXT, Some(MASK), a));
    ws.send_raw(&encode_frame(true, 0, OP_PING, Some(MASK), b"mid"));
    ws.send_raw(&encode_frame(true, 0, OP_CONT, Some(MASK), rest));
    assert_eq!(ws.frame(), Frame { fin: true, rsv: 0, opcode: OP_PONG, payload: b"mid".to_vec() });
    ws.expect_text(&heartbeat_reply("frag"));

    // A multi-byte character split across two fragments is valid UTF-8 once reassembled.
    let text = heartbeat("é");
    let bytes = text.as_bytes();
    let split = text.find('é').expect("é") + 1; // between 0xC3 and 0xA9
    ws.send_raw(&encode_frame(false, 0, OP_TEXT, Some(MASK), &bytes[..split]));
    ws.send_raw(&encode_frame(true, 0, OP_CONT, Some(MASK), &bytes[split..]));
    ws.expect_text(&heartbeat_reply("é"));
}

#[test]
fn pipelined_frames_and_long_lengths() {
    let server = start_server(&[]);
    let mut ws = RawWs::connect(server.port);
    // Two frames in one TCP write: two replies, in order.
    let mut both = client_frame(OP_TEXT, heartbeat("a").as_bytes());
    both.extend(client_frame(OP_TEXT, heartbeat("b").as_bytes()));
    ws.send_raw(&both);
    ws.expect_text(&heartbeat_reply("a"));
    ws.expect_text(&heartbeat_reply("b"));

    // 16-bit and 64-bit payload lengths, in and out.
    let topic = new_topic();
    ws.send_text(&v2(Some("1"), Some("1"), &topic, "phx_join", "{}"));
    let mut reply = ws.recv_text();
    while is_presence(&reply) {
        reply = ws.recv_text();
    }
    assert_eq!(reply, v2_ok(Some("1"), "1", &topic));
    for size in [300usize, 40_000] {
        let payload = format!(r#"{{"pad":"{}"}}"#, "x".repeat(size));
        ws.send_text(&v2(Some("1"), Some("p"), &topic, "ping", &payload));
        let mut got = ws.recv_text();
        while is_presence(&got) {
            got = ws.recv_text();
        }
        assert_eq!(got, v2_reply(Some("1"), Some("p"), &topic, "ok", &payload));
    }
}

#[test]
fn frame_over_the_default_limit_closes_with_1009() {
    let server = start_server(&[]);
    let mut ws = RawWs::connect(server.port);
    ws.send(OP_TEXT, &vec![b'a'; 70_000]);
    ws.expect_close_code(1009);
}

#[test]
fn tiny_frame_limit() {
    let server = start_server(&[("NEXUS_MAX_FRAME_BYTES", "1024")]);
    let port = server.port;

    // Under the limit: processed.
    let mut ws = RawWs::connect(port);
    let pad = "y".repeat(850);
    let frame = heartbeat(&pad);
    assert!(frame.len() < 1000);
    ws.send_text(&frame);
    ws.expect_text(&heartbeat_reply(&pad));

    // One frame over the limit.
    ws.send(OP_TEXT, &vec![b'a'; 2000]);
    ws.expect_close_code(1009);

    // A message over the limit made of fragments that are each under it.
    let mut ws = RawWs::connect(port);
    let chunk = vec![b'b'; 500];
    ws.send_raw(&encode_frame(false, 0, OP_TEXT, Some(MASK), &chunk));
    ws.send_raw(&encode_frame(false, 0, OP_CONT, Some(MASK), &chunk));
    ws.send_raw(&encode_frame(true, 0, OP_CONT, Some(MASK), &chunk));
    ws.expect_close_code(1009);

    // A binary frame over the limit too.
    let mut ws = RawWs::connect(port);
    ws.send(OP_BINARY, &vec![0u8; 2000]);
    ws.expect_close_code(1009);
}

#[test]
fn invalid_utf8_closes_with_1007() {
    let server = start_server(&[]);
    let port = server.port;
    let mut ws = RawWs::connect(port);
    ws.send(OP_TEXT, b"[null,\"\xff\xfe\",\"phoenix\",\"heartbeat\",{}]");
    ws.expect_close_code(1007);

    // Invalid in a later fragment.
    let mut ws = RawWs::connect(port);
    ws.send_raw(&encode_frame(false, 0, OP_TEXT, Some(MASK), b"[null,\""));
    ws.send_raw(&encode_frame(true, 0, OP_CONT, Some(MASK), b"\xc3\x28\"]"));
    ws.expect_close_code(1007);

    // Overlong encoding and a lone surrogate are invalid too.
    for bad in [&b"\"\xc0\xaf\""[..], b"\"\xed\xa0\x80\""] {
        let mut ws = RawWs::connect(port);
        ws.send(OP_TEXT, bad);
        ws.expect_close_code(1007);
    }
}

#[test]
fn unmasked_client_frame_closes_with_1002() {
    let server = start_server(&[]);
    let mut ws = RawWs::connect(server.port);
    ws.send_raw(&encode_frame(true, 0, OP_TEXT, None, heartbeat("1").as_bytes()));
    ws.expect_close_code(1002);
}

#[test]
fn reserved_bits_close_with_1002() {
    let server = start_server(&[]);
    for rsv in [0b100u8, 0b010, 0b001] {
        let mut ws = RawWs::connect(server.port);
        ws.send_raw(&encode_frame(true, rsv, OP_TEXT, Some(MASK), heartbeat("1").as_bytes()));
        ws.expect_close_code(1002);
    }
}

#[test]
fn bad_control_frames_close_with_1002() {
    let server = start_server(&[]);
    let port = server.port;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("fragmented ping", encode_frame(false, 0, OP_PING, Some(MASK), b"x")),
        ("fragmented close", encode_frame(false, 0, OP_CLOSE, Some(MASK), &close_payload(1000, ""))),
        ("ping over 125 bytes", encode_frame(true, 0, OP_PING, Some(MASK), &[0u8; 126])),
    ];
    for (name, bytes) in cases {
        let mut ws = RawWs::connect(port);
        ws.send_raw(&bytes);
        let (code, reason) = ws.expect_close();
        assert_eq!(code, Some(1002), "{name} (reason {reason:?})");
    }
}

#[test]
fn bad_opcodes_and_fragment_order_close_with_1002() {
    let server = start_server(&[]);
    let port = server.port;
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("opcode 3", vec![encode_frame(true, 0, 0x3, Some(MASK), b"x")]),
        ("opcode 0xB", vec![encode_frame(true, 0, 0xB, Some(MASK), b"x")]),
        ("continuation without a start", vec![encode_frame(true, 0, OP_CONT, Some(MASK), b"x")]),
        (
            "new text frame inside a fragmented message",
            vec![
                encode_frame(false, 0, OP_TEXT, Some(MASK), b"[null,"),
                encode_frame(true, 0, OP_TEXT, Some(MASK), b"x"),
            ],
        ),
    ];
    for (name, frames) in cases {
        let mut ws = RawWs::connect(port);
        for f in &frames {
            ws.send_raw(f);
        }
        let (code, reason) = ws.expect_close();
        assert_eq!(code, Some(1002), "{name} (reason {reason:?})");
    }
}

/// The idle timeout the idle tests run with, and when the close may come: never before the
/// timeout, and at most two sweeps of the core's coarse clock (250 ms each) plus a margin for
/// a busy test machine after it. A server that closed at 3x the timeout fails here.
const IDLE: Duration = Duration::from_secs(1);
const IDLE_CLOSE_LATEST: Duration = Duration::from_millis(1_000 + 2 * 250 + 400);

/// Asserts an idle close came no earlier than [`IDLE`] after `quiet_from` (taken before the
/// last client bytes were sent) and no later than [`IDLE_CLOSE_LATEST`] after `quiet_by`
/// (taken after the server answered them).
#[track_caller]
fn assert_idle_close_timing(quiet_from: Instant, quiet_by: Instant) {
    let closed = Instant::now();
    assert!(
        closed - quiet_from >= IDLE,
        "closed {:?} after the last activity: before the timeout",
        closed - quiet_from
    );
    assert!(
        closed - quiet_by <= IDLE_CLOSE_LATEST,
        "closed {:?} after the last activity: the timeout is {IDLE:?}",
        closed - quiet_by
    );
}

#[test]
fn idle_connection_is_closed_with_1001_at_the_timeout() {
    let server = start_server(&[("NEXUS_IDLE_TIMEOUT", "1")]);
    let before = Instant::now();
    let mut ws = RawWs::connect(server.port);
    let after = Instant::now();
    let frame = ws.read_frame(Duration::from_secs(5)).expect("a close frame before EOF");
    assert_idle_close_timing(before, after);
    assert_eq!(frame.opcode, OP_CLOSE, "{frame:?}");
    assert_eq!(frame.close_code().0, Some(1001), "{frame:?}");
    ws.send(OP_CLOSE, &close_payload(1001, ""));
    ws.expect_eof();
}

#[test]
fn activity_resets_the_idle_timer() {
    let server = start_server(&[("NEXUS_IDLE_TIMEOUT", "1")]);
    let mut ws = RawWs::connect(server.port);
    // Active for 2.4 s, more than twice the timeout, never idle for more than 0.3 s.
    for i in 0..8 {
        ws.heartbeat(&format!("{i}"));
        ws.expect_silence(Duration::from_millis(300));
    }
    // Then idle: closed one timeout after the last heartbeat.
    let before = Instant::now();
    ws.heartbeat("last");
    let after = Instant::now();
    let frame = ws.read_frame(Duration::from_secs(5)).expect("a close frame before EOF");
    assert_idle_close_timing(before, after);
    assert_eq!(frame.close_code().0, Some(1001), "{frame:?}");
    ws.send(OP_CLOSE, &close_payload(1001, ""));
    ws.expect_eof();
}
