//! The WebSocket frame decoder on arbitrary bytes, looped as the connection task does
//! (decode at the read position until it needs more bytes or fails).
//!
//! Properties: no panic; every decoded frame consumes at least one byte and no more than
//! is left; a message never exceeds the limit; the limit is the default (65536) and the
//! smallest allowed (1024), so fragment reassembly reaches its limit with small inputs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nexus::limits::{FRAME_BYTES_MAX_DEFAULT, FRAME_BYTES_MAX_MIN};
use nexus::ws::{Decoder, Message};

fn run(data: &[u8], max: usize) {
    let mut buf = data.to_vec();
    let mut decoder = Decoder::default();
    let mut pos = 0;
    while pos < buf.len() {
        let left = buf.len() - pos;
        match decoder.decode(&mut buf[pos..], max) {
            Ok(None) | Err(_) => break,
            Ok(Some((msg, n))) => {
                assert!(n > 0 && n <= left, "consumed {n} of {left}");
                match msg {
                    Some(Message::Text(t)) => assert!(t.len() <= max),
                    Some(Message::Binary(b)) => assert!(b.len() <= max),
                    Some(Message::Ping(p)) => assert!(p.len() <= 125),
                    Some(Message::Close(code)) => assert!((1000..5000).contains(&code)),
                    Some(Message::Pong) | None => {}
                }
                pos += n;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    run(data, FRAME_BYTES_MAX_DEFAULT);
    run(data, FRAME_BYTES_MAX_MIN);
});
