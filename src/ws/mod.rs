//! Sans-IO WebSocket (RFC 6455) for the server side, on tungstenite's frame-header layer.
//!
//! tungstenite's message-level `WebSocketContext` costs ≥ 528 B per connection even with tiny
//! buffers (measured: BENCHMARKS.md, "Measured facts"); the header-level API plus our own unmasking and reassembly keeps
//! idle connections free of codec state: a [`Decoder`] is one `Option<Box<_>>`, `None` unless
//! a fragmented message is half-way. The only home of `tungstenite`.

mod codec;
mod encode;
mod mask;

pub use codec::{Decoder, Message, Violation, WsError};
pub use encode::{close_frame, pong_frame, text_header};
pub use mask::apply_mask;
