//! Slow consumer (NEXUS_MAX_OUTBOX_BYTES): a member of a busy topic that stops reading is
//! closed by the server (1013 "slow consumer" when a frame boundary allows it, else a bare TCP
//! close) once its queued bytes would pass the limit, while the other members of the same topic
//! keep receiving every message in order, the sender gets every ack, and the server keeps
//! serving.
//!
//! The outbound queue only grows once the kernel buffers between the server and the client are
//! full, and on loopback those are megabytes. So the slow client shrinks its receive buffer
//! (SO_RCVBUF, set before connect so the window scale follows) and the sender pushes ~1 KiB
//! frames, in pipelined batches, until the server logs the slow-consumer close (bounded by
//! `MAX_MESSAGES`, far more than the kernel can absorb). Only then is the slow client read: it
//! must hold an in-order prefix of the messages and then end (close frame 1013 or EOF).
//!
//! Two endings are seen. Usually the socket is write-blocked with part of a frame still unsent
//! when the queue overflows, so the server sends no close frame: the client gets whole frames,
//! then EOF. Rarely (a few runs in 500, under CPU load) the slow client's core drains a backlog
//! of several batches from its mailbox in one go and the queue overflows while nothing is
//! pending on the socket: then the close frame 1013 follows the last whole frame.
//!
//! Sizing: a core queues everything it takes from its mailbox on every local member before any
//! of them flushes, so the outbox limit must hold what can be in flight for the healthy members.
//! Their reads gate the sender (one batch at a time), so that is one batch:
//! `BATCH` × ~1.1 KiB ≈ 55 KiB ≪ `OUTBOX_BYTES`.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use sonic_rs::JsonValueTrait;

use common::*;

/// Bytes of every message body: with the envelope a client frame stays under the 1024-byte
/// frame limit, and the broadcast frame is ~1.1 KiB.
const BODY_BYTES: usize = 900;

/// Messages sent before the sender waits for their acks (and the healthy member reads them).
const BATCH: usize = 50;

/// Upper bound on messages sent (~6.6 MB per member): more than the kernel buffers of one
/// loopback connection (tcp_wmem max 4 MiB + a tiny receive buffer) plus the outbox limit.
const MAX_MESSAGES: usize = 6_000;

/// Batches still sent after the server logged the close, to show that the other members go on
/// undisturbed.
const BATCHES_AFTER_CLOSE: usize = 2;

/// The outbox limit of the test server (bytes).
const OUTBOX_BYTES: usize = 256 * 1024;

/// Bytes queued for the non-reading client before it catches up: a backlog of hundreds of
/// frames, far more than a client that keeps up ever has queued.
const BACKLOG_BYTES: u64 = 192 * 1024;

/// SO_RCVBUF of the slow client (the kernel doubles it and applies its minimum).
const SLOW_RCVBUF: usize = 4096;

/// The whole test must finish well within this.
const TEST_BUDGET: Duration = Duration::from_secs(25);

/// Time the slow client has to reach its end once it starts reading (it may hold megabytes).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

fn body(seq: usize) -> String {
    let mut body = format!("{seq:06}:");
    body.extend(std::iter::repeat_n('x', BODY_BYTES - body.len()));
    body
}

/// The sequence number a body of [`body`] carries.
#[track_caller]
fn seq_of(text: &str) -> usize {
    assert_eq!(text.len(), BODY_BYTES, "body changed in transit: {text:?}");
    assert!(text[7..].bytes().all(|b| b == b'x'), "body changed in transit: {text:?}");
    text[..6].parse().unwrap_or_else(|e| panic!("body without a sequence number {text:?}: {e}"))
}

fn new_msg_frame(topic: &str, seq: usize) -> String {
    v2(Some("1"), Some(&seq.to_string()), topic, "new_msg", &format!(r#"{{"body":{}}}"#, js(Some(&body(seq)))))
}

/// Checks a broadcast `new_msg` on `topic` from `sender` and returns its sequence number.
#[track_caller]
fn broadcast_seq(frame: &str, topic: &str, sender: &str) -> usize {
    let v = parse(frame);
    assert!(v[0].is_null() && v[1].is_null(), "broadcast refs must be null: {frame:.200}");
    assert_eq!(v[2].as_str(), Some(topic), "{frame:.200}");
    assert_eq!(v[3].as_str(), Some("new_msg"), "expected a new_msg: {frame:.200}");
    check_generated_fields(&v[4]);
    assert_eq!(v[4]["sender_id"].as_str(), Some(sender), "{frame:.200}");
    seq_of(v[4]["content"]["text"].as_str().unwrap_or_else(|| panic!("new_msg without text: {frame:.200}")))
}

/// The next text frame of `client`; on failure names `who` and shows the server's log (e.g. a
/// close of the wrong connection).
#[track_caller]
fn recv(client: &mut Client, who: &str, server: &Server) -> String {
    client.try_recv_text(TIMEOUT).unwrap_or_else(|e| {
        let logs = server.logs();
        let notable: Vec<&str> = logs.lines().filter(|l| !l.contains(" joined") && !l.contains(" connected")).collect();
        panic!("{who}: no text frame ({e}); server log (without joins and connects): {notable:#?}")
    })
}

/// How the slow client's connection ended.
#[derive(Debug)]
enum End {
    /// A close frame (code, reason), then EOF.
    CloseFrame(Option<u16>, String),
    /// EOF or reset without a close frame; `partial` bytes of an unfinished frame came first.
    Eof { partial: usize },
}

/// A raw WebSocket client whose socket has a small receive buffer, so that the kernel cannot
/// hide the fact that it stopped reading.
struct SlowClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl SlowClient {
    #[track_caller]
    fn connect(server: &Server, sub: &str) -> SlowClient {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
        socket.set_recv_buffer_size(SLOW_RCVBUF).expect("SO_RCVBUF");
        socket.connect_timeout(&server.addr().into(), TIMEOUT).expect("connect slow client");
        let mut stream: TcpStream = socket.into();
        stream.set_nodelay(true).expect("nodelay");
        stream.set_write_timeout(Some(TIMEOUT)).expect("write timeout");
        let request = upgrade_request(server.port, &format!("vsn=2.0.0&token={}", token(sub)), &[]);
        stream.write_all(request.as_bytes()).expect("send upgrade");
        let response = read_response(stream);
        assert_eq!(response.status, 101, "handshake refused: {:?} {:?}", response.status_line, response.body_text());
        assert_eq!(response.header("sec-websocket-accept"), Some(WS_ACCEPT));
        let HttpResponse { stream, rest, .. } = response;
        SlowClient { stream, buf: rest }
    }

    #[track_caller]
    fn send_text(&mut self, text: &str) {
        self.stream.write_all(&client_frame(OP_TEXT, text.as_bytes())).expect("slow client send");
    }

    /// The next complete frame, or how the connection ended; `Err` on timeout.
    fn next(&mut self, deadline: Instant) -> Result<Result<Frame, End>, String> {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Ok(Ok(frame));
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(format!("timeout with {} bytes of a frame buffered", self.buf.len()));
            }
            self.stream.set_read_timeout(Some(remaining)).expect("read timeout");
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(Err(End::Eof { partial: self.buf.len() })),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => {
                    return Ok(Err(End::Eof { partial: self.buf.len() }))
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    #[track_caller]
    fn join(&mut self, topic: &str) {
        self.send_text(&v2(Some("1"), Some("1"), topic, "phx_join", "{}"));
        match self.next(Instant::now() + TIMEOUT) {
            Ok(Ok(frame)) => assert_eq!(frame.text(), v2_ok(Some("1"), "1", topic)),
            other => panic!("slow client join: {other:?}"),
        }
    }

    /// Reads everything the server still delivers. The `new_msg` frames must be the messages
    /// `0..k` in order (the server dropped the rest with the queue); returns `k` and the end.
    #[track_caller]
    fn drain(&mut self, topic: &str, sender: &str, sent: usize) -> (usize, End) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let mut received = 0;
        loop {
            let frame = match self.next(deadline) {
                Ok(Ok(frame)) => frame,
                Ok(Err(end)) => return (received, end),
                Err(e) => panic!(
                    "the slow consumer was never closed: after reading {received} of the {sent} messages \
                     sent it is still open ({e})"
                ),
            };
            match frame.opcode {
                OP_TEXT => {
                    assert!(frame.fin && frame.rsv == 0, "bad text frame header {:?}", (frame.fin, frame.rsv));
                    let text = frame.text();
                    if is_presence(&text) {
                        continue;
                    }
                    let seq = broadcast_seq(&text, topic, sender);
                    assert_eq!(seq, received, "the slow consumer's messages must be an in-order prefix");
                    received += 1;
                }
                OP_CLOSE => {
                    let (code, reason) = frame.close_code();
                    // Answer the close, then the server must end the connection.
                    let _ = self.stream.write_all(&client_frame(OP_CLOSE, &close_payload(code.unwrap_or(1000), "")));
                    match self.next(deadline) {
                        Ok(Err(End::Eof { partial: 0 })) => return (received, End::CloseFrame(code, reason)),
                        other => panic!("after close frame {code:?} {reason:?}: expected EOF, got {other:?}"),
                    }
                }
                OP_PING | OP_PONG => {}
                op => panic!("unexpected frame opcode {op:#x}: {frame:?}"),
            }
        }
    }
}

#[test]
fn slow_consumer_is_closed_and_the_topic_goes_on() {
    let started = Instant::now();
    let outbox = OUTBOX_BYTES.to_string();
    let server = start_server(&[
        ("NEXUS_WORKERS", "2"),
        ("RUST_LOG", "debug"),
        ("NEXUS_MAX_FRAME_BYTES", "1024"),
        ("NEXUS_MAX_OUTBOX_BYTES", &outbox),
        // The sender floods on purpose (thousands of messages a second): no rate limit.
        ("NEXUS_MSG_RATE", "0"),
    ]);
    let topic = new_topic();
    let (slow_sub, healthy_sub, sender_sub) = (new_sub(), new_sub(), new_sub());

    let mut slow = SlowClient::connect(&server, &slow_sub);
    slow.join(&topic);
    let mut healthy = connect_v2(server.port, &healthy_sub);
    healthy.join(&topic, "1");
    let mut sender = connect_v2(server.port, &sender_sub);
    sender.join(&topic, "1");
    // From here on the slow client reads nothing until the sending is over.

    let mut sent = 0;
    let mut acked = vec![false; MAX_MESSAGES];
    let mut healthy_next = 0; // next sequence number the healthy member must receive
    let mut echo_next = 0; // same for the sender's own copy of the broadcast
    let mut close_logged_after = None; // messages sent when the close was first seen in the log
    while sent < MAX_MESSAGES {
        assert!(started.elapsed() < TEST_BUDGET, "over budget after {sent} messages");
        let end = (sent + BATCH).min(MAX_MESSAGES);
        for seq in sent..end {
            sender.send_text(&new_msg_frame(&topic, seq));
        }
        // Every message of the batch is acked ok (each ref once); the sender's own copies of
        // the broadcast arrive in order too.
        let mut pending = end - sent;
        while pending > 0 {
            let frame = recv(&mut sender, "sender", &server);
            match event_of(&frame).as_deref() {
                Some("phx_reply") => {
                    let v = parse(&frame);
                    let r#ref: usize = v[1].as_str().and_then(|r| r.parse().ok()).unwrap_or_else(|| panic!("{frame}"));
                    assert!((sent..end).contains(&r#ref), "ack for a message not in flight: {frame}");
                    assert_eq!(frame, v2_ok(Some("1"), &r#ref.to_string(), &topic), "message {} not acked ok", r#ref);
                    assert!(!acked[r#ref], "message {} acked twice", r#ref);
                    acked[r#ref] = true;
                    pending -= 1;
                }
                Some("new_msg") => {
                    assert_eq!(broadcast_seq(&frame, &topic, &sender_sub), echo_next, "sender's copy out of order");
                    echo_next += 1;
                }
                _ => panic!("unexpected frame for the sender: {frame:.200}"),
            }
        }
        // The healthy member gets the whole batch, in order.
        while healthy_next < end {
            let frame = recv(&mut healthy, "healthy member", &server);
            assert_eq!(broadcast_seq(&frame, &topic, &sender_sub), healthy_next, "healthy member: out of order");
            healthy_next += 1;
        }
        sent = end;
        match close_logged_after {
            None if server.logs().contains("slow consumer") => close_logged_after = Some(sent),
            Some(at) if sent >= at + BATCHES_AFTER_CLOSE * BATCH => break,
            _ => {}
        }
    }
    while echo_next < sent {
        let frame = recv(&mut sender, "sender", &server);
        assert_eq!(broadcast_seq(&frame, &topic, &sender_sub), echo_next, "sender's copy out of order");
        echo_next += 1;
    }

    // (1) The slow consumer was closed: it holds an in-order prefix of the messages, then the
    // connection ends (1013 when the close could follow a whole frame, else a bare close).
    let (slow_received, end) = slow.drain(&topic, &sender_sub, sent);
    eprintln!(
        "sent {sent} messages; close logged after {close_logged_after:?}; slow consumer got {slow_received}, \
         then {end:?}; {:?} elapsed",
        started.elapsed()
    );
    match &end {
        End::CloseFrame(code, reason) => {
            assert_eq!((*code, reason.as_str()), (Some(1013), "slow consumer"), "close frame of the slow consumer")
        }
        End::Eof { .. } => {}
    }
    assert!(slow_received < sent, "the slow consumer received all {sent} messages: its queue was never dropped");
    drop(slow);

    // (2) + (3) The healthy member got every message in order, every message was acked ok.
    assert_eq!(healthy_next, sent);
    assert_eq!(echo_next, sent);
    assert!(acked[..sent].iter().all(|a| *a), "some messages were not acked");

    // (4) The server still serves: heartbeats, and one more message reaches the healthy member.
    healthy.heartbeat("hb-healthy");
    sender.heartbeat("hb-sender");
    sender.send_text(&new_msg_frame(&topic, sent));
    let mut got_ack = false;
    let mut got_echo = false;
    while !(got_ack && got_echo) {
        let frame = recv(&mut sender, "sender", &server);
        if event_of(&frame).as_deref() == Some("new_msg") {
            assert_eq!(broadcast_seq(&frame, &topic, &sender_sub), sent);
            got_echo = true;
        } else {
            assert_eq!(frame, v2_ok(Some("1"), &sent.to_string(), &topic));
            got_ack = true;
        }
    }
    assert_eq!(broadcast_seq(&recv(&mut healthy, "healthy member", &server), &topic, &sender_sub), sent);

    // (5) The log names the slow consumer's close, for that connection only.
    let logs = server.wait_for_log("slow consumer");
    let closes: Vec<&str> = logs.lines().filter(|l| l.contains("closing") && l.contains("slow consumer")).collect();
    assert_eq!(closes.len(), 1, "expected one slow-consumer close in the log:\n{logs}");
    assert!(
        closes[0].contains(&slow_sub) && closes[0].contains("1013"),
        "close logged for another connection: {}",
        closes[0]
    );
    assert!(started.elapsed() < TEST_BUDGET, "took {:?}", started.elapsed());
}

/// Reads `nexus_outbox_bytes` from `/metrics`.
fn outbox_gauge(server: &Server) -> u64 {
    let body = http_get(server.port, "/metrics", None).body_text();
    body.lines()
        .find_map(|l| l.strip_prefix("nexus_outbox_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no nexus_outbox_bytes in /metrics:\n{body}"))
}

/// `nexus_outbox_bytes` shows the bytes queued for a client that stopped reading, and goes back
/// to 0 both when the client catches up (receiving its backlog intact and in order) and when its
/// socket goes away with bytes still queued.
#[test]
fn queued_bytes_show_in_metrics_until_read_or_closed() {
    let server = start_server(&[
        ("NEXUS_WORKERS", "2"),
        // Large enough that the client is never closed as slow: the bytes stay queued.
        ("NEXUS_MAX_OUTBOX_BYTES", "67108864"),
        ("NEXUS_MSG_RATE", "0"),
    ]);
    let topic = new_topic();
    let sender_sub = new_sub();
    let mut sender = connect_v2(server.port, &sender_sub);
    sender.join(&topic, "1");
    let mut sent = 0;
    // Sends batches (each acked, the sender's own copies read) until the server reports at least
    // `queued` bytes queued; the kernel buffers of the non-reading client fill first.
    let mut fill = |sent: &mut usize, queued: u64| {
        let limit = *sent + MAX_MESSAGES;
        while outbox_gauge(&server) < queued {
            assert!(*sent < limit, "{MAX_MESSAGES} messages sent and fewer than {queued} bytes queued in /metrics");
            for seq in *sent..*sent + BATCH {
                sender.send_text(&new_msg_frame(&topic, seq));
            }
            let mut acks = 0;
            while acks < BATCH {
                if event_of(&recv(&mut sender, "sender", &server)).as_deref() == Some("phx_reply") {
                    acks += 1;
                }
            }
            *sent += BATCH;
        }
    };

    let mut slow = SlowClient::connect(&server, &new_sub());
    slow.join(&topic);
    fill(&mut sent, BACKLOG_BYTES);
    // Catching up empties the queue, and every message arrives intact and in order.
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let mut received = 0;
    while received < sent {
        match slow.next(deadline) {
            Ok(Ok(frame)) if frame.opcode == OP_TEXT && !is_presence(&frame.text()) => {
                assert_eq!(broadcast_seq(&frame.text(), &topic, &sender_sub), received, "the backlog's order");
                received += 1;
            }
            Ok(Ok(_)) => {}
            other => panic!("slow client after {received} of {sent} messages: {other:?}"),
        }
    }
    wait_for_metric(server.port, "nexus_outbox_bytes", 0);

    // A client that goes away with bytes queued takes them with it.
    let mut gone = SlowClient::connect(&server, &new_sub());
    gone.join(&topic);
    fill(&mut sent, 1);
    drop(gone);
    drop(slow); // it stopped reading again; its queue leaves with it too
    wait_for_metric(server.port, "nexus_outbox_bytes", 0);
}
