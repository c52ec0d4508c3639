//! Chat semantics, and only those: what a `new_msg` must contain, what its broadcast and its
//! replies look like. Pure functions; the server wires them to sockets and the writer.

use crate::ids;
use crate::phoenix::{string_field, write_str};
use crate::store::{HistoryPage, Message};

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
pub fn new_msg_payload(m: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(m.body.len() + 160);
    write_message(&mut out, m);
    out
}

/// The history response body: `{"messages":[...oldest first...],"next_before":id|null}`,
/// each message in the `new_msg` broadcast shape.
pub fn history_json(page: &HistoryPage) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + page.messages.iter().map(|m| m.body.len() + 160).sum::<usize>());
    out.extend_from_slice(b"{\"messages\":[");
    for (i, m) in page.messages.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_message(&mut out, m);
    }
    out.extend_from_slice(b"],\"next_before\":");
    match page.next_before {
        Some(id) => {
            out.push(b'"');
            out.extend_from_slice(id.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()).as_bytes());
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
    out.push(b'}');
    out
}

fn write_message(out: &mut Vec<u8>, m: &Message) {
    out.extend_from_slice(b"{\"id\":\"");
    out.extend_from_slice(m.id.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()).as_bytes());
    out.extend_from_slice(b"\",\"content\":{\"text\":");
    write_str(out, &m.body);
    out.extend_from_slice(b"},\"sender_id\":\"");
    out.extend_from_slice(m.sender.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()).as_bytes());
    out.extend_from_slice(b"\",\"inserted_at\":\"");
    out.extend_from_slice(ids::format_micros(m.inserted_at_us).as_bytes());
    out.extend_from_slice(b"\"}");
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

/// The message id a `new_msg` payload starts with (`{"id":"<uuid>",…`, as
/// [`new_msg_payload`] writes it).
pub(crate) fn payload_id(payload: &[u8]) -> Option<uuid::Uuid> {
    let text = payload.strip_prefix(br#"{"id":""#)?.get(..36)?;
    uuid::Uuid::try_parse_ascii(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let m = Message {
            id: Uuid::nil(),
            conversation: Uuid::nil(),
            sender: Uuid::max(),
            body: "a\"b".into(),
            inserted_at_us: 1_768_161_950_055_142,
            seq: 0,
        };
        let got = String::from_utf8(new_msg_payload(&m)).expect("utf8");
        assert_eq!(
            got,
            r#"{"id":"00000000-0000-0000-0000-000000000000","content":{"text":"a\"b"},"sender_id":"ffffffff-ffff-ffff-ffff-ffffffffffff","inserted_at":"2026-01-11T20:05:50.055142Z"}"#
        );
        let page = HistoryPage { messages: vec![m.clone()], next_before: Some(Uuid::nil()) };
        let history = String::from_utf8(history_json(&page)).expect("utf8");
        assert_eq!(history, format!(r#"{{"messages":[{got}],"next_before":"00000000-0000-0000-0000-000000000000"}}"#));
        assert_eq!(history_json(&HistoryPage::default()), br#"{"messages":[],"next_before":null}"#);
        assert_eq!(failed_to_save("server busy"), br#"{"reason":"Failed to save","detail":"server busy"}"#);
    }
}
