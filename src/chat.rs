//! Chat semantics, and only those: what a `new_msg` must contain, what its broadcast and its
//! replies look like. Pure functions; the server wires them to sockets and the writer.

use crate::ids;
use crate::phoenix::{string_field, write_str};
use crate::store::Committed;

/// Event carrying a chat message, in both directions.
pub const NEW_MSG: &str = "new_msg";
/// Event answered with its own payload.
pub const PING: &str = "ping";

/// `reason` of every failed `new_msg` (the seed app's wording).
const FAILED_TO_SAVE: &str = "Failed to save";
/// `detail` for a body that is not a non-empty string.
pub const BAD_BODY: &str = "body must be a non-empty string";

/// The body of a `new_msg` payload, or the `detail` saying why it is refused.
pub fn parse_body(payload: &str) -> Result<String, &'static str> {
    match string_field(payload, "body") {
        Some(body) if !body.is_empty() => Ok(body),
        _ => Err(BAD_BODY),
    }
}

/// The `new_msg` broadcast payload:
/// `{"id","content":{"text"},"sender_id","inserted_at"}`.
pub fn new_msg_payload(m: &Committed) -> Vec<u8> {
    let mut out = Vec::with_capacity(m.body.len() + 160);
    out.extend_from_slice(b"{\"id\":\"");
    out.extend_from_slice(m.id.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()).as_bytes());
    out.extend_from_slice(b"\",\"content\":{\"text\":");
    write_str(&mut out, &m.body);
    out.extend_from_slice(b"},\"sender_id\":\"");
    out.extend_from_slice(m.sender.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()).as_bytes());
    out.extend_from_slice(b"\",\"inserted_at\":\"");
    out.extend_from_slice(ids::format_micros(m.inserted_at_us).as_bytes());
    out.extend_from_slice(b"\"}");
    out
}

/// The error response `{"reason":"Failed to save","detail":...}`.
pub fn failed_to_save(detail: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + detail.len());
    out.extend_from_slice(b"{\"reason\":");
    write_str(&mut out, FAILED_TO_SAVE);
    out.extend_from_slice(b",\"detail\":");
    write_str(&mut out, detail);
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Origin;
    use uuid::Uuid;

    #[test]
    fn bodies() {
        assert_eq!(parse_body(r#"{"body":"hi"}"#), Ok("hi".to_string()));
        for bad in [r#"{"body":""}"#, r#"{"body":5}"#, r#"{"body":null}"#, "{}", "[]", "\"x\""] {
            assert_eq!(parse_body(bad), Err(BAD_BODY), "{bad}");
        }
    }

    #[test]
    fn broadcast_payload_shape() {
        let m = Committed {
            id: Uuid::nil(),
            conversation: Uuid::nil(),
            sender: Uuid::max(),
            body: "a\"b".into(),
            inserted_at_us: 1_768_161_950_055_142,
            origin: Origin { core: 0, ticket: 0 },
        };
        let got = String::from_utf8(new_msg_payload(&m)).expect("utf8");
        assert_eq!(
            got,
            r#"{"id":"00000000-0000-0000-0000-000000000000","content":{"text":"a\"b"},"sender_id":"ffffffff-ffff-ffff-ffff-ffffffffffff","inserted_at":"2026-01-11T20:05:50.055142Z"}"#
        );
        assert_eq!(failed_to_save("server busy"), br#"{"reason":"Failed to save","detail":"server busy"}"#);
    }
}
