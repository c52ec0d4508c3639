//! Server-to-client frames: unmasked, never fragmented.

use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

fn header(opcode: OpCode, len: usize, out: &mut impl std::io::Write) {
    let h = FrameHeader { opcode, ..FrameHeader::default() };
    // Callers write into a Vec or a 10-byte array (the largest header): cannot fail.
    let _ = h.format(len as u64, out);
}

/// Writes the header of an unfragmented text frame of `len` payload bytes (at most 10 bytes).
pub fn text_header(len: usize, out: &mut impl std::io::Write) {
    header(OpCode::Data(Data::Text), len, out);
}

/// A pong answering a ping with `payload` (≤ 125 bytes, checked by the decoder).
pub fn pong_frame(payload: &[u8], out: &mut Vec<u8>) {
    header(OpCode::Control(Control::Pong), payload.len(), out);
    out.extend_from_slice(payload);
}

/// A close frame with `code` and a short `reason` (truncated to fit 125 bytes).
pub fn close_frame(code: u16, reason: &str, out: &mut Vec<u8>) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    header(OpCode::Control(Control::Close), 2 + end, out);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&reason.as_bytes()[..end]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_sizes() {
        let mut out = Vec::new();
        text_header(148, &mut out);
        assert_eq!(out, [0x81, 0x7e, 0x00, 0x94]);
        out.clear();
        text_header(2, &mut out);
        assert_eq!(out, [0x81, 0x02]);
        out.clear();
        close_frame(1001, "idle", &mut out);
        assert_eq!(out, b"\x88\x06\x03\xe9idle");
    }
}
