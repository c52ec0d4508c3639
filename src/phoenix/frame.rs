//! Phoenix messages as complete WebSocket frames, ready to queue.

use bytes::Bytes;

use super::{Outbound, Vsn};

/// One Phoenix message as a complete WebSocket text frame, in one allocation: the JSON is
/// written after room for the largest header, the header is written right before it, and the
/// frame is a slice of that buffer (every reply and broadcast goes through here).
pub fn encode_frame(vsn: Vsn, msg: &Outbound<'_>) -> Bytes {
    const HEADROOM: usize = 10; // largest unmasked header: 2 + 8 length bytes
    let mut buf = Vec::with_capacity(HEADROOM + 64 + msg.payload.len() + msg.topic.len());
    buf.resize(HEADROOM, 0);
    super::encode(vsn, msg, &mut buf);
    let mut header = Vec::with_capacity(HEADROOM);
    crate::ws::text_header(buf.len() - HEADROOM, &mut header);
    let start = HEADROOM - header.len();
    buf[start..HEADROOM].copy_from_slice(&header);
    Bytes::from(buf).slice(start..)
}
