//! The V1 and V2 Phoenix JSON serializers on arbitrary UTF-8.
//!
//! Properties: `decode` never panics; a decoded message re-encoded in either version (the
//! payload raw, as replies and `ping` echo it) is valid JSON and decodes back to the same
//! fields (V1 drops `join_ref`, as Phoenix does); `encode_around` splits `encode`'s output
//! exactly; any string written as topic, event or refs survives `encode` and `decode`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nexus::phoenix::{decode, encode, encode_around, string_field, Outbound, Vsn};
use nexus::wire::encode_frame;

/// Whether `json` is one valid JSON text (grammar only: any depth, any number size).
fn valid_json(json: &[u8]) -> bool {
    let mut de = serde_json::Deserializer::from_slice(json);
    de.disable_recursion_limit();
    serde::de::Deserialize::deserialize(&mut de).map(|serde::de::IgnoredAny| ()).is_ok() && de.end().is_ok()
}

fn round_trip(msg: &Outbound<'_>) {
    for vsn in [Vsn::V1, Vsn::V2] {
        let mut out = Vec::new();
        encode(vsn, msg, &mut out);
        assert!(valid_json(&out), "{vsn:?} encode is not JSON: {}", String::from_utf8_lossy(&out));
        let text = std::str::from_utf8(&out).expect("encode writes UTF-8");
        let back = decode(vsn, text).unwrap_or_else(|e| panic!("{vsn:?} encode does not decode: {e}: {text}"));
        assert_eq!(back.topic, msg.topic);
        assert_eq!(back.event, msg.event);
        assert_eq!(back.reference.as_deref(), msg.reference);
        let join_ref = if vsn == Vsn::V2 { msg.join_ref } else { None };
        assert_eq!(back.join_ref.as_deref(), join_ref);
        assert_eq!(back.payload().as_bytes(), msg.payload);
        let (before, after) = encode_around(vsn, msg);
        assert_eq!([before, msg.payload.to_vec(), after].concat(), out);
        let _ = encode_frame(vsn, msg);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for vsn in [Vsn::V1, Vsn::V2] {
        let Ok(m) = decode(vsn, text) else { continue };
        let payload = m.payload();
        assert!(valid_json(payload.as_bytes()), "{vsn:?} accepted a payload that is not JSON: {payload}");
        let _ = string_field(payload, "body");
        let _ = nexus::channel::parse_topic(&m.topic);
        round_trip(&Outbound {
            join_ref: m.join_ref.as_deref(),
            reference: m.reference.as_deref(),
            topic: &m.topic,
            event: &m.event,
            payload: payload.as_bytes(),
        });
    }
    // Arbitrary strings in every string slot, around a fixed payload.
    let (a, b) = text.split_at(text.char_indices().nth(text.chars().count() / 2).map_or(0, |(i, _)| i));
    round_trip(&Outbound { join_ref: Some(a), reference: Some(b), topic: text, event: a, payload: b"{}" });
});
