//! Phoenix messages as complete WebSocket frames, ready to queue.

use bytes::{Buf, Bytes};

use super::{Outbound, Vsn};

/// One Phoenix message as a complete WebSocket text frame in one allocation: the JSON is
/// written after room for the largest header, the header right before it (from a stack
/// buffer), and the frame starts where its header does. (A fan-out's first clone of the
/// `Bytes` adds the shared reference count, once per broadcast.)
pub fn encode_frame(vsn: Vsn, msg: &Outbound<'_>) -> Bytes {
    const HEADROOM: usize = 10; // largest unmasked header: 2 + 8 length bytes
    let mut buf = Vec::with_capacity(HEADROOM + 64 + msg.payload.len() + msg.topic.len());
    buf.resize(HEADROOM, 0);
    super::encode(vsn, msg, &mut buf);
    let mut header = [0u8; HEADROOM];
    let mut rest = &mut header[..];
    crate::ws::text_header(buf.len() - HEADROOM, &mut rest);
    let len = HEADROOM - rest.len();
    let start = HEADROOM - len;
    buf[start..HEADROOM].copy_from_slice(&header[..len]);
    let mut frame = Bytes::from(buf);
    frame.advance(start);
    frame
}
