//! Phoenix messages as complete WebSocket frames, ready to queue: the one place the Phoenix
//! serializers and WebSocket framing meet (the two codecs do not know each other).

use bytes::{Buf, Bytes};

use crate::close::Close;
use crate::phoenix::{self, Outbound, Vsn};
use crate::ws;

/// One Phoenix message as a complete WebSocket text frame in one allocation: the JSON is
/// written after room for the largest header, the header right before it (from a stack
/// buffer), and the frame starts where its header does. (A fan-out's first clone of the
/// `Bytes` adds the shared reference count, once per broadcast.)
pub fn encode_frame(vsn: Vsn, msg: &Outbound<'_>) -> Bytes {
    const HEADROOM: usize = 10; // largest unmasked header: 2 + 8 length bytes
    let mut buf = Vec::with_capacity(HEADROOM + 64 + msg.payload.len() + msg.topic.len());
    buf.resize(HEADROOM, 0);
    phoenix::encode(vsn, msg, &mut buf);
    let mut header = [0u8; HEADROOM];
    let mut rest = &mut header[..];
    ws::text_header(buf.len() - HEADROOM, &mut rest);
    let len = HEADROOM - rest.len();
    let start = HEADROOM - len;
    buf[start..HEADROOM].copy_from_slice(&header[..len]);
    let mut frame = Bytes::from(buf);
    frame.advance(start);
    frame
}

/// A `phx_reply` frame: `{"status": "ok"|"error", "response": response}`, with the request's
/// `join_ref` and `ref`.
pub fn reply(
    vsn: Vsn,
    join_ref: Option<&str>,
    reference: Option<&str>,
    topic: &str,
    ok: bool,
    response: &[u8],
) -> Bytes {
    let mut payload = Vec::with_capacity(32 + response.len());
    payload.extend_from_slice(if ok { br#"{"status":"ok","response":"# } else { br#"{"status":"error","response":"# });
    payload.extend_from_slice(response);
    payload.push(b'}');
    encode_frame(vsn, &Outbound { join_ref, reference, topic, event: "phx_reply", payload: &payload })
}

/// A `presence_state` push to one joiner, as three pieces: its header and message prefix,
/// the `state` payload (shared by every joiner of one presence window: a big room's state is
/// ~110 B per meta), and the message suffix.
pub fn presence_state(vsn: Vsn, join_ref: &str, topic: &str, state: Bytes) -> [Bytes; 3] {
    let msg = Outbound { join_ref: Some(join_ref), reference: None, topic, event: "presence_state", payload: b"" };
    let (before, after) = phoenix::encode_around(vsn, &msg);
    let mut head = Vec::with_capacity(before.len() + 10);
    ws::text_header(before.len() + state.len() + after.len(), &mut head);
    head.extend_from_slice(&before);
    [Bytes::from(head), state, Bytes::from(after)]
}

/// The close frame of a catalog entry.
pub fn close(why: Close) -> Bytes {
    let mut frame = Vec::with_capacity(4 + why.reason().len());
    ws::close_frame(why.code(), why.reason(), &mut frame);
    Bytes::from(frame)
}

/// The pong answering a ping with `payload`.
pub fn pong(payload: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(payload.len() + 2);
    ws::pong_frame(payload, &mut frame);
    Bytes::from(frame)
}

/// The payload of an unmasked, unfragmented server frame (tests and benchmarks read frames
/// back with it).
pub fn frame_payload(frame: &[u8]) -> &[u8] {
    let start = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => return &[],
    };
    frame.get(start..).unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_their_exact_message() {
        let r = reply(Vsn::V2, Some("1"), Some("2"), "chat:x", false, br#"{"reason":"nope"}"#);
        assert_eq!(
            frame_payload(&r),
            br#"["1","2","chat:x","phx_reply",{"status":"error","response":{"reason":"nope"}}]"#
        );
        assert_eq!(r[0], 0x81);
        let parts = presence_state(Vsn::V2, "3", "chat:x", Bytes::from_static(b"{}"));
        let whole: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        assert_eq!(frame_payload(&whole), br#"["3",null,"chat:x","presence_state",{}]"#);
        assert_eq!(&close(Close::Idle)[..], b"\x88\x0e\x03\xe9idle timeout");
        assert_eq!(&pong(b"hi")[..], b"\x8a\x02hi");
        let big = vec![b'a'; 70_000];
        let frame =
            encode_frame(Vsn::V1, &Outbound { join_ref: None, reference: None, topic: "t", event: "e", payload: &big });
        assert_eq!(frame[1], 127);
        assert_eq!(frame_payload(&frame).len(), frame.len() - 10);
    }
}
