//! The V2 binary push envelope decoder on arbitrary bytes.
//!
//! Properties: no panic; the fields it returns fit in the frame; the error reply the
//! server answers a binary push with (its refs and topic echoed) is valid JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nexus::phoenix::{decode_binary_push, encode, Outbound, Vsn};

fuzz_target!(|data: &[u8]| {
    let Some(p) = decode_binary_push(data) else { return };
    let used = 5 + p.join_ref.map_or(0, str::len) + p.reference.map_or(0, str::len) + p.topic.len() + p.event.len();
    assert!(used <= data.len(), "fields take {used} of {} bytes", data.len());
    let reply = Outbound {
        join_ref: p.join_ref,
        reference: p.reference,
        topic: p.topic,
        event: "phx_reply",
        payload: br#"{"status":"error","response":{"reason":"binary payload not supported"}}"#,
    };
    let mut out = Vec::new();
    encode(Vsn::V2, &reply, &mut out);
    let json: serde_json::Value = serde_json::from_slice(&out).expect("reply is JSON");
    assert_eq!(json[2].as_str(), Some(p.topic));
});
