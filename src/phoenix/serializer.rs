//! V1 and V2 JSON serializers (docs/protocol.md, "Frames").

use serde::Deserialize;
use sonic_rs::LazyValue;

use super::json::{write_opt_str, write_str};

/// Serializer version negotiated from the `vsn` query parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Vsn {
    /// `{"topic","event","payload","ref"}` objects.
    V1,
    /// `[join_ref, ref, topic, event, payload]` arrays (phoenix.js default).
    V2,
}

impl Vsn {
    /// `vsn` absent or `1.x` → V1, `2.x` → V2, anything else → `None` (403, as Phoenix).
    pub fn negotiate(vsn: Option<&str>) -> Option<Vsn> {
        let Some(v) = vsn else { return Some(Vsn::V1) };
        let mut parts = v.split('.');
        let major = parts.next()?;
        let numeric = |p: &str| !p.is_empty() && p.len() <= 9 && p.bytes().all(|b| b.is_ascii_digit());
        let mut count = 1;
        for p in parts {
            count += 1;
            if !numeric(p) || count > 3 {
                return None;
            }
        }
        match major {
            "1" => Some(Vsn::V1),
            "2" => Some(Vsn::V2),
            _ => None,
        }
    }
}

/// A message from the client. `payload` is the raw JSON text of the payload, parsed only by
/// the handler that needs it (and echoed verbatim by `ping`).
#[derive(Debug)]
pub struct Inbound<'a> {
    /// Join reference (null outside channels and for heartbeats).
    pub join_ref: Option<String>,
    /// Message reference, echoed in the reply.
    pub reference: Option<String>,
    /// Topic.
    pub topic: String,
    /// Event name.
    pub event: String,
    payload: LazyValue<'a>,
}

impl Inbound<'_> {
    /// The raw JSON text of the payload.
    pub fn payload(&self) -> &str {
        self.payload.as_raw_str()
    }
}

/// Why a text frame is not a Phoenix message (logged and dropped; the socket stays open).
#[derive(Debug, thiserror::Error)]
#[error("not a phoenix {vsn:?} message: {why}")]
pub struct DecodeError {
    vsn: Vsn,
    why: String,
}

#[derive(Deserialize)]
struct V2<'a>(Option<String>, Option<String>, String, String, #[serde(borrow)] LazyValue<'a>);

#[derive(Deserialize)]
struct V1<'a> {
    topic: String,
    event: String,
    #[serde(borrow)]
    payload: LazyValue<'a>,
    // Phoenix requires the key (`from_map!`); only its value may be null.
    #[serde(rename = "ref", deserialize_with = "present")]
    reference: Option<String>,
    #[serde(default)]
    join_ref: Option<String>,
}

/// A nullable string whose key must be present (serde's `Option` default would allow absence).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<String>::deserialize(d)
}

/// Decodes one text frame.
pub fn decode(vsn: Vsn, text: &str) -> Result<Inbound<'_>, DecodeError> {
    if super::json::nests_deeper_than(text.as_bytes(), crate::limits::JSON_DEPTH_MAX) {
        return Err(DecodeError { vsn, why: format!("nested deeper than {}", crate::limits::JSON_DEPTH_MAX) });
    }
    let err = |e: sonic_rs::Error| DecodeError { vsn, why: e.to_string() };
    let inbound = match vsn {
        Vsn::V2 => {
            let V2(join_ref, reference, topic, event, payload) = sonic_rs::from_str(text).map_err(err)?;
            Inbound { join_ref, reference, topic, event, payload }
        }
        Vsn::V1 => {
            let m: V1<'_> = sonic_rs::from_str(text).map_err(err)?;
            Inbound { join_ref: m.join_ref, reference: m.reference, topic: m.topic, event: m.event, payload: m.payload }
        }
    };
    // sonic-rs skips the (lazy) payload without checking that `\u` has four hex digits, and a
    // payload can be echoed verbatim (`ping`): any `\u` gets a strict check (found by fuzzing).
    let payload = inbound.payload();
    let bytes = payload.as_bytes();
    if memchr::memchr_iter(b'\\', bytes).any(|i| bytes.get(i + 1) == Some(&b'u'))
        && serde_json::from_str::<serde::de::IgnoredAny>(payload).is_err()
    {
        return Err(DecodeError { vsn, why: "invalid \\u escape in the payload".to_string() });
    }
    Ok(inbound)
}

/// A message to the client; `payload` is raw JSON.
#[derive(Debug, Clone, Copy)]
pub struct Outbound<'a> {
    /// Join reference (null for broadcasts).
    pub join_ref: Option<&'a str>,
    /// Reference (set for replies, null for pushes and broadcasts; `phx_close` repeats the join_ref).
    pub reference: Option<&'a str>,
    /// Topic as the client spelled it.
    pub topic: &'a str,
    /// Event.
    pub event: &'a str,
    /// Raw JSON payload.
    pub payload: &'a [u8],
}

/// Appends the JSON text of `msg` in `vsn` to `out`. V1 output never carries `join_ref`
/// (Phoenix's V1 serializer drops it).
pub fn encode(vsn: Vsn, msg: &Outbound<'_>, out: &mut Vec<u8>) {
    match vsn {
        Vsn::V2 => {
            out.push(b'[');
            write_opt_str(out, msg.join_ref);
            out.push(b',');
            write_opt_str(out, msg.reference);
            out.push(b',');
            write_str(out, msg.topic);
            out.push(b',');
            write_str(out, msg.event);
            out.push(b',');
            out.extend_from_slice(msg.payload);
            out.push(b']');
        }
        Vsn::V1 => {
            out.extend_from_slice(b"{\"topic\":");
            write_str(out, msg.topic);
            out.extend_from_slice(b",\"event\":");
            write_str(out, msg.event);
            out.extend_from_slice(b",\"payload\":");
            out.extend_from_slice(msg.payload);
            out.extend_from_slice(b",\"ref\":");
            write_opt_str(out, msg.reference);
            out.push(b'}');
        }
    }
}

/// The JSON of `msg` split around its payload: `(before, after)`, so a large shared payload
/// can be sent between two small per-connection pieces without being copied (`msg.payload`
/// is ignored).
pub fn encode_around(vsn: Vsn, msg: &Outbound<'_>) -> (Vec<u8>, Vec<u8>) {
    let mut out = Vec::with_capacity(64 + msg.topic.len());
    encode(vsn, &Outbound { payload: b"", ..*msg }, &mut out);
    let at = match vsn {
        Vsn::V2 => out.len() - 1,
        // `{"topic":..,"event":..,"payload":<here>,"ref":..}`: the last `,"ref":` is ours.
        Vsn::V1 => out.windows(7).rposition(|w| w == b",\"ref\":").unwrap_or(out.len() - 1),
    };
    let after = out.split_off(at);
    (out, after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_around_payload() {
        for vsn in [Vsn::V1, Vsn::V2] {
            let o =
                Outbound { join_ref: Some("1"), reference: None, topic: "t\",ref", event: "e", payload: b"{\"a\":1}" };
            let mut whole = Vec::new();
            encode(vsn, &o, &mut whole);
            let (a, b) = encode_around(vsn, &o);
            assert_eq!([a, o.payload.to_vec(), b].concat(), whole);
        }
    }

    #[test]
    fn payload_escapes_are_checked() {
        // The fuzzer's minimised input: `\u` swallows the payload string's closing quote.
        assert!(decode(Vsn::V2, r#"["","","","","\u}"}]"]"#).is_err());
        assert!(decode(Vsn::V2, r#"[null,"1","t","ping",{"k":"\uZZZZ"}]"#).is_err());
        assert!(decode(Vsn::V1, r#"{"topic":"t","event":"ping","payload":{"k":"\u12"},"ref":"1"}"#).is_err());
        let ok = decode(Vsn::V2, r#"[null,"1","t","ping",{"k":"\u00e9\n"}]"#).expect("valid escapes");
        assert_eq!(ok.payload(), r#"{"k":"\u00e9\n"}"#);
    }

    #[test]
    fn negotiation() {
        assert_eq!(Vsn::negotiate(None), Some(Vsn::V1));
        assert_eq!(Vsn::negotiate(Some("1.0.0")), Some(Vsn::V1));
        assert_eq!(Vsn::negotiate(Some("2.0.0")), Some(Vsn::V2));
        assert_eq!(Vsn::negotiate(Some("2")), Some(Vsn::V2));
        for bad in ["3.0.0", "abc", "", "2.x", "2.0.0.0", "2..0", " 2.0.0"] {
            assert_eq!(Vsn::negotiate(Some(bad)), None, "{bad}");
        }
    }

    #[test]
    fn v2_round_trip() {
        let m = decode(Vsn::V2, r#"["1","2","chat:x","ping",{"a":[1, 2]}]"#).expect("valid");
        assert_eq!((m.join_ref.as_deref(), m.reference.as_deref()), (Some("1"), Some("2")));
        assert_eq!((m.topic.as_str(), m.event.as_str(), m.payload()), ("chat:x", "ping", r#"{"a":[1, 2]}"#));
        let mut out = Vec::new();
        let o = Outbound { join_ref: None, reference: Some("2"), topic: "t", event: "e", payload: b"{}" };
        encode(Vsn::V2, &o, &mut out);
        assert_eq!(out, br#"[null,"2","t","e",{}]"#);
        out.clear();
        encode(Vsn::V1, &o, &mut out);
        assert_eq!(out, br#"{"topic":"t","event":"e","payload":{},"ref":"2"}"#);
    }

    #[test]
    fn v2_rejects_wrong_shapes() {
        for bad in [
            "not json",
            "[1,2]",
            r#"[null,"1","t","e"]"#,
            r#"[null,"1","t","e",{},1]"#,
            r#"[null,"1",5,"e",{}]"#,
            r#"[null,"1","t",null,{}]"#,
            r#"[7,"1","t","e",{}]"#,
            r#"{"topic":"t"}"#,
        ] {
            assert!(decode(Vsn::V2, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn v1_decode() {
        let m = decode(Vsn::V1, r#"{"topic":"t","event":"e","payload":{"x":1},"ref":"3"}"#).expect("valid");
        assert_eq!((m.join_ref.clone(), m.reference.as_deref(), m.payload()), (None, Some("3"), r#"{"x":1}"#));
        assert!(decode(Vsn::V1, r#"["1","2","t","e",{}]"#).is_err());
        assert!(decode(Vsn::V1, r#"{"topic":"t","payload":{}}"#).is_err());
        assert!(decode(Vsn::V1, r#"{"topic":"t","event":"e","payload":{}}"#).is_err(), "ref is required");
        assert!(decode(Vsn::V1, r#"{"topic":"t","event":"e","payload":{},"ref":null}"#).is_ok());
    }
}
