//! Frame decoding, validation and reassembly of client frames.

use std::borrow::Cow;
use std::io::Cursor;

use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use super::mask::apply_mask;
use crate::close::Close;

/// Why the connection must be closed; each maps to an RFC 6455 close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// An RFC 6455 violation: 1002.
    #[error("protocol error: {0}")]
    Protocol(Violation),
    /// Frame or reassembled message over the limit: 1009.
    #[error("message too big")]
    TooBig,
    /// Text that is not UTF-8: 1007.
    #[error("invalid UTF-8 in text")]
    InvalidUtf8,
}

/// The RFC 6455 rules a client frame can break (each closes with 1002).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// An opcode RFC 6455 reserves.
    #[error("reserved opcode")]
    ReservedOpcode,
    /// A client frame must be masked (§5.1).
    #[error("unmasked client frame")]
    Unmasked,
    /// RSV bits without a negotiated extension.
    #[error("reserved bits set")]
    ReservedBits,
    /// A text or binary frame while a fragmented message is unfinished.
    #[error("new message inside a fragmented one")]
    NewMessageInFragmented,
    /// A continuation frame with no message to continue.
    #[error("continuation without a message")]
    ContinuationWithoutMessage,
    /// Control frames cannot be fragmented (§5.5).
    #[error("fragmented control frame")]
    FragmentedControl,
    /// Control frames carry at most 125 bytes (§5.5).
    #[error("control frame over 125 bytes")]
    ControlTooLong,
    /// A 64-bit payload length must have its top bit clear (§5.2).
    #[error("64-bit length with the most significant bit set")]
    LengthTopBit,
    /// A close payload is empty or at least 2 bytes (§5.5.1).
    #[error("one-byte close payload")]
    OneByteClose,
    /// A close code a client may not send (§7.4).
    #[error("invalid close code")]
    InvalidCloseCode,
}

impl WsError {
    /// The close this error calls for.
    pub fn close(self) -> Close {
        match self {
            WsError::Protocol(_) => Close::Protocol,
            WsError::TooBig => Close::TooBig,
            WsError::InvalidUtf8 => Close::InvalidUtf8,
        }
    }
}

/// A complete message or control frame from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// Text message (validated UTF-8).
    Text(Cow<'a, str>),
    /// Binary message.
    Binary(Cow<'a, [u8]>),
    /// Ping with its payload (answer with a pong).
    Ping(&'a [u8]),
    /// Pong (ignored).
    Pong,
    /// Close with the code to echo (1000 when the client sent none).
    Close(u16),
}

/// A message being reassembled from fragments.
#[derive(Debug)]
struct Partial {
    text: bool,
    data: Vec<u8>,
    /// Bytes of a text message already checked to be UTF-8 (up to a whole character).
    checked: usize,
}

impl Partial {
    /// Fails as soon as a fragmented text message stops being UTF-8 (RFC 6455 §8.1: fail
    /// fast), not only once it is complete; a character split across fragments waits for its
    /// next bytes.
    fn check_utf8(&mut self) -> Result<(), WsError> {
        if !self.text {
            return Ok(());
        }
        match std::str::from_utf8(&self.data[self.checked..]) {
            Ok(_) => self.checked = self.data.len(),
            Err(e) if e.error_len().is_none() => self.checked += e.valid_up_to(),
            Err(_) => return Err(WsError::InvalidUtf8),
        }
        Ok(())
    }
}

/// Per-connection decoder state: nothing unless a fragmented message is half-way.
#[derive(Debug, Default)]
pub struct Decoder {
    partial: Option<Box<Partial>>,
}

impl Decoder {
    /// Decodes the next frame at the start of `buf`, unmasking it in place.
    ///
    /// `Ok(None)`: the frame is incomplete, read more. `Ok(Some((msg, n)))`: `n` bytes were
    /// consumed; `msg` is `None` for a non-final fragment (buffered here). `max_bytes` bounds
    /// both single frames and reassembled messages and is checked from the header, before the
    /// payload is buffered.
    #[allow(clippy::type_complexity)]
    pub fn decode<'a>(
        &mut self,
        buf: &'a mut [u8],
        max_bytes: usize,
    ) -> Result<Option<(Option<Message<'a>>, usize)>, WsError> {
        let mut cursor = Cursor::new(&*buf);
        let (header, len) = match FrameHeader::parse(&mut cursor) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return Ok(None),
            Err(_) => return Err(WsError::Protocol(Violation::ReservedOpcode)),
        };
        let start = cursor.position() as usize;
        check_header(&header, len, max_bytes)?;
        let len = len as usize;
        if buf.len() - start < len {
            return Ok(None);
        }
        let end = start + len;
        let Some(mask) = header.mask else { return Err(WsError::Protocol(Violation::Unmasked)) };
        let payload = &mut buf[start..end];
        apply_mask(payload, mask);
        let payload: &'a [u8] = payload;
        let msg = match header.opcode {
            OpCode::Control(Control::Ping) => Some(Message::Ping(payload)),
            OpCode::Control(Control::Pong) => Some(Message::Pong),
            OpCode::Control(Control::Close) => Some(Message::Close(close_code(payload)?)),
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                return Err(WsError::Protocol(Violation::ReservedOpcode))
            }
            OpCode::Data(Data::Continue) => self.continuation(payload, header.is_final, max_bytes)?,
            OpCode::Data(data) => self.start(data == Data::Text, payload, header.is_final)?,
        };
        Ok(Some((msg, end)))
    }

    fn start<'a>(&mut self, text: bool, payload: &'a [u8], fin: bool) -> Result<Option<Message<'a>>, WsError> {
        if self.partial.is_some() {
            return Err(WsError::Protocol(Violation::NewMessageInFragmented));
        }
        if !fin {
            let mut partial = Partial { text, data: payload.to_vec(), checked: 0 };
            partial.check_utf8()?;
            self.partial = Some(Box::new(partial));
            return Ok(None);
        }
        whole(text, Cow::Borrowed(payload)).map(Some)
    }

    fn continuation<'a>(
        &mut self,
        payload: &[u8],
        fin: bool,
        max_bytes: usize,
    ) -> Result<Option<Message<'a>>, WsError> {
        let partial = self.partial.as_mut().ok_or(WsError::Protocol(Violation::ContinuationWithoutMessage))?;
        if partial.data.len() + payload.len() > max_bytes {
            self.partial = None;
            return Err(WsError::TooBig);
        }
        partial.data.extend_from_slice(payload);
        if !fin {
            if let Err(e) = partial.check_utf8() {
                self.partial = None;
                return Err(e);
            }
            return Ok(None);
        }
        match self.partial.take() {
            Some(p) => whole(p.text, Cow::Owned(p.data)).map(Some),
            None => Err(WsError::Protocol(Violation::ContinuationWithoutMessage)),
        }
    }
}

fn whole(text: bool, data: Cow<'_, [u8]>) -> Result<Message<'_>, WsError> {
    if !text {
        return Ok(Message::Binary(data));
    }
    match data {
        Cow::Borrowed(b) => std::str::from_utf8(b).map(|s| Message::Text(Cow::Borrowed(s))),
        Cow::Owned(v) => String::from_utf8(v).map(|s| Message::Text(Cow::Owned(s))).map_err(|e| e.utf8_error()),
    }
    .map_err(|_| WsError::InvalidUtf8)
}

fn check_header(h: &FrameHeader, len: u64, max_bytes: usize) -> Result<(), WsError> {
    if h.rsv1 || h.rsv2 || h.rsv3 {
        return Err(WsError::Protocol(Violation::ReservedBits));
    }
    if let OpCode::Control(_) = h.opcode {
        if !h.is_final {
            return Err(WsError::Protocol(Violation::FragmentedControl));
        }
        if len > 125 {
            return Err(WsError::Protocol(Violation::ControlTooLong));
        }
    }
    if len >> 63 != 0 {
        return Err(WsError::Protocol(Violation::LengthTopBit));
    }
    if len > max_bytes as u64 {
        return Err(WsError::TooBig);
    }
    Ok(())
}

/// The code to echo for a close payload (RFC 6455 §5.5.1, §7.4).
fn close_code(payload: &[u8]) -> Result<u16, WsError> {
    match payload {
        [] => Ok(1000),
        [_] => Err(WsError::Protocol(Violation::OneByteClose)),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                return Err(WsError::Protocol(Violation::InvalidCloseCode));
            }
            std::str::from_utf8(reason).map_err(|_| WsError::InvalidUtf8)?;
            Ok(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn one(buf: &mut [u8]) -> Result<Option<(Option<Message<'_>>, usize)>, WsError> {
        Decoder::default().decode(buf, 1000)
    }

    #[test]
    fn text_and_incomplete() {
        let mut f = masked(0x81, b"hello");
        let n = f.len();
        for cut in 0..n {
            assert_eq!(one(&mut f.clone()[..cut]), Ok(None));
        }
        assert_eq!(one(&mut f), Ok(Some((Some(Message::Text("hello".into())), n))));
    }

    #[test]
    fn fragments_with_ping_between() {
        let mut d = Decoder::default();
        let mut a = masked(0x01, b"he");
        let mut p = masked(0x89, b"!");
        let mut b = masked(0x80, b"llo");
        assert_eq!(d.decode(&mut a, 1000).map(|o| o.map(|(m, _)| m)), Ok(Some(None)));
        assert_eq!(d.decode(&mut p, 1000).map(|o| o.map(|(m, _)| m)), Ok(Some(Some(Message::Ping(b"!")))));
        let got = d.decode(&mut b, 1000).map(|o| o.map(|(m, _)| m));
        assert_eq!(got, Ok(Some(Some(Message::Text(Cow::Owned("hello".into()))))));
        assert!(d.partial.is_none());
    }

    #[test]
    fn violations() {
        let unmasked = &mut [0x81, 0x01, b'x'];
        assert_eq!(one(unmasked), Err(WsError::Protocol(Violation::Unmasked)));
        assert!(matches!(one(&mut masked(0xC1, b"x")), Err(WsError::Protocol(_))));
        assert!(matches!(one(&mut masked(0x09, b"x")), Err(WsError::Protocol(_))));
        assert!(matches!(one(&mut masked(0x80, b"x")), Err(WsError::Protocol(_))));
        assert!(matches!(one(&mut masked(0x83, b"x")), Err(WsError::Protocol(_))));
        assert_eq!(one(&mut masked(0x81, &[0xff, 0xfe])), Err(WsError::InvalidUtf8));
        assert_eq!(one(&mut masked(0x81, &[b'a'; 1001])), Err(WsError::TooBig));
        assert!(matches!(one(&mut masked(0x88, &[0x03, 0xec])), Err(WsError::Protocol(_))));
    }

    #[test]
    fn too_big_is_seen_from_the_header_alone() {
        // 64-bit length header announcing 2^40 bytes, no payload: refused at once.
        let mut f = vec![0x81, 0xff, 0, 0, 1, 0, 0, 0, 0, 0, 1, 2, 3, 4];
        assert_eq!(one(&mut f), Err(WsError::TooBig));
    }

    #[test]
    fn reassembled_too_big() {
        let mut d = Decoder::default();
        assert!(d.decode(&mut masked(0x01, &[b'a'; 600]), 1000).is_ok());
        assert_eq!(d.decode(&mut masked(0x80, &[b'a'; 600]), 1000), Err(WsError::TooBig));
    }

    #[test]
    fn close_codes() {
        assert_eq!(one(&mut masked(0x88, b"")).map(|o| o.map(|(m, _)| m)), Ok(Some(Some(Message::Close(1000)))));
        let mut f = masked(0x88, &[0x03, 0xe9, b'b', b'y', b'e']);
        assert_eq!(one(&mut f).map(|o| o.map(|(m, _)| m)), Ok(Some(Some(Message::Close(1001)))));
    }
}
