//! Phoenix V2 server frames, `[join_ref, ref, topic, event, payload]`, read in place.
//!
//! Nothing here depends on how a server lays its JSON out: whitespace between tokens, the order
//! of an object's keys (Phoenix's encoder sorts them, Nexus writes `status` first) and escapes
//! are all handled. It stays cheap because it reads only what a scenario asks for: [`head`]
//! reads the first four elements (a few `memchr` calls) and leaves the payload as raw bytes;
//! [`get`] then walks one object's keys, skipping the values it passes over without parsing
//! them. A frame's payload is never parsed when its event is not one the scenario wants.
//!
//! It is a reader, not a validator: malformed input gives `None`, never a panic or a loop.

use std::borrow::Cow;

/// A JSON string as it appears on the wire, quotes included, escapes not decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Str<'a> {
    quoted: &'a [u8],
    escaped: bool,
}

impl<'a> Str<'a> {
    /// The bytes between the quotes (escapes as sent).
    pub(crate) fn raw(&self) -> &'a [u8] {
        &self.quoted[1..self.quoted.len() - 1]
    }

    /// The decoded text (borrowed unless the string has escapes).
    pub(crate) fn text(&self) -> Cow<'a, str> {
        if !self.escaped {
            if let Ok(s) = std::str::from_utf8(self.raw()) {
                return Cow::Borrowed(s);
            }
        }
        Cow::Owned(sonic_rs::from_slice::<String>(self.quoted).unwrap_or_default())
    }

    /// Whether the decoded text is `want`.
    pub(crate) fn is(&self, want: &str) -> bool {
        if self.escaped {
            self.text() == want
        } else {
            self.raw() == want.as_bytes()
        }
    }

    /// The text as a decimal `u64` (refs the scenarios number themselves).
    pub(crate) fn to_u64(self) -> Option<u64> {
        std::str::from_utf8(self.raw()).ok()?.parse().ok()
    }
}

/// The first four elements of a server frame (the topic is passed over: every scenario knows
/// which socket joined what), and the raw payload after them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Head<'a> {
    pub join_ref: Option<Str<'a>>,
    pub reference: Option<Str<'a>>,
    pub event: Str<'a>,
    /// The frame from the payload's first byte on (the payload, then the closing `]`).
    pub payload: &'a [u8],
}

/// Reads `[join_ref, ref, topic, event,` (refs a string or `null`); `None` if the frame does not
/// start that way. Needs only the frame's first bytes (a prefix of a long frame will do).
pub(crate) fn head(frame: &[u8]) -> Option<Head<'_>> {
    let i = ws(frame, 0);
    if frame.get(i) != Some(&b'[') {
        return None;
    }
    let (join_ref, i) = nullable_str(frame, i + 1)?;
    let (reference, i) = nullable_str(frame, comma(frame, i)?)?;
    let (_topic, i) = string(frame, comma(frame, i)?)?;
    let (event, i) = string(frame, comma(frame, i)?)?;
    let i = comma(frame, i)?;
    Some(Head { join_ref, reference, event, payload: &frame[ws(frame, i)..] })
}

impl<'a> Head<'a> {
    /// Whether the event is `event`.
    pub(crate) fn is(&self, event: &str) -> bool {
        self.event.is(event)
    }

    /// A reply's status (`"ok"`, `"error"`, …); `None` for anything but a `phx_reply`.
    pub(crate) fn status(&self) -> Option<Str<'a>> {
        if !self.is("phx_reply") {
            return None;
        }
        get_str(self.payload, "status")
    }

    /// A `phx_reply` with status `ok`.
    pub(crate) fn ok(&self) -> bool {
        self.status().is_some_and(|s| s.is("ok"))
    }

    /// A reply's `response` (raw JSON).
    pub(crate) fn response(&self) -> Option<&'a [u8]> {
        get(self.payload, "response")
    }

    /// The reference as a number (the scenarios' own refs are decimal).
    pub(crate) fn ref_u64(&self) -> Option<u64> {
        self.reference?.to_u64()
    }
}

/// The text of a chat message payload: `content.text` (Nexus's shape) or else `body` (the
/// Phoenix guides' `broadcast!(socket, "new_msg", %{body: body})`).
pub(crate) fn message_text(payload: &[u8]) -> Option<Str<'_>> {
    match get(payload, "content") {
        Some(content) => get_str(content, "text"),
        None => get_str(payload, "body"),
    }
}

/// The raw JSON value of `key` in the object at the start of `obj` (after whitespace); `None`
/// if `obj` is not an object or has no such key. Values passed over are skipped, not parsed.
pub(crate) fn get<'a>(obj: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let mut i = ws(obj, 0);
    if obj.get(i) != Some(&b'{') {
        return None;
    }
    i = ws(obj, i + 1);
    if obj.get(i) == Some(&b'}') {
        return None;
    }
    loop {
        let (k, after) = string(obj, i)?;
        i = ws(obj, after);
        if obj.get(i) != Some(&b':') {
            return None;
        }
        let start = ws(obj, i + 1);
        let end = value_end(obj, start)?;
        if k.is(key) {
            return Some(&obj[start..end]);
        }
        i = ws(obj, end);
        match obj.get(i) {
            Some(b',') => i = ws(obj, i + 1),
            _ => return None,
        }
    }
}

/// The string value of `key` in the object at the start of `obj`.
pub(crate) fn get_str<'a>(obj: &'a [u8], key: &str) -> Option<Str<'a>> {
    let v = get(obj, key)?;
    let (s, end) = string(v, 0)?;
    (end == v.len()).then_some(s)
}

/// Orders message ids the way they were assigned, whatever their JSON type: by length, then
/// bytewise. That is numeric order for integers (JSON has no leading zeros) and decimal
/// strings, and the ids' own order for fixed-width ids (UUIDv7, ULID).
pub(crate) fn id_order(raw: &[u8]) -> (usize, &[u8]) {
    let inner = raw.strip_prefix(b"\"").and_then(|r| r.strip_suffix(b"\"")).unwrap_or(raw);
    (inner.len(), inner)
}

fn ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// The index after the `,` that follows optional whitespace at `i`.
fn comma(b: &[u8], i: usize) -> Option<usize> {
    let i = ws(b, i);
    (b.get(i) == Some(&b',')).then_some(i + 1)
}

/// A string starting (after whitespace) at `i`; returns it and the index after its quote.
fn string(b: &[u8], i: usize) -> Option<(Str<'_>, usize)> {
    let start = ws(b, i);
    if b.get(start) != Some(&b'"') {
        return None;
    }
    let (end, escaped) = string_end(b, start)?;
    Some((Str { quoted: &b[start..end], escaped }, end))
}

/// `null` or a string at `i`.
fn nullable_str(b: &[u8], i: usize) -> Option<(Option<Str<'_>>, usize)> {
    let i = ws(b, i);
    if b[i..].starts_with(b"null") {
        return Some((None, i + 4));
    }
    let (s, end) = string(b, i)?;
    Some((Some(s), end))
}

/// The index after the closing quote of the string whose opening quote is at `start`, and
/// whether it has escapes.
fn string_end(b: &[u8], start: usize) -> Option<(usize, bool)> {
    let mut i = start + 1;
    let mut escaped = false;
    loop {
        i += memchr::memchr2(b'"', b'\\', b.get(i..)?)?;
        if b[i] == b'"' {
            return Some((i + 1, escaped));
        }
        escaped = true;
        i += 2;
    }
}

/// The index after the JSON value starting at `i` (strings and containers followed to their
/// end, scalars to the next delimiter).
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => Some(string_end(b, i)?.0),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match *b.get(j)? {
                    b'"' => {
                        j = string_end(b, j)?.0;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let len = b[i..].iter().position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'));
            Some(i + len?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same frames as Nexus writes them and as Phoenix 1.7 (Jason, keys sorted) does.
    #[test]
    fn reads_nexus_and_phoenix_layouts_alike() {
        for reply in [
            r#"["1","7","chat:x","phx_reply",{"status":"ok","response":{}}]"#,
            r#"["1","7","chat:x","phx_reply",{"response":{},"status":"ok"}]"#,
            r#"["1","7","chat:x","phx_reply",{"response":{"a":[1,{"b":"}"}],"c":"\"}"},"status":"ok"}]"#,
            " [ \"1\" , \"7\" ,\n\"chat:x\", \"phx_reply\" , { \"response\" : { } , \"status\" : \"ok\" } ] ",
            r#"["1","7","chat:x","phx_\u0072eply",{"response":{},"st\u0061tus":"ok"}]"#,
        ] {
            let h = head(reply.as_bytes()).expect(reply);
            assert_eq!(h.join_ref.map(|s| s.text()), Some("1".into()), "{reply}");
            assert_eq!(h.ref_u64(), Some(7), "{reply}");
            assert!(h.is("phx_reply") && h.ok(), "{reply}");
        }
        for refused in [
            r#"[null,"8","chat:x","phx_reply",{"status":"error","response":{"reason":"nope"}}]"#,
            r#"[null,"8","chat:x","phx_reply",{"response":{"reason":"status ok"},"status":"error"}]"#,
        ] {
            let h = head(refused.as_bytes()).expect(refused);
            assert_eq!(h.join_ref, None);
            assert!(!h.ok() && h.status().is_some_and(|s| s.is("error")), "{refused}");
        }
        let nexus = r#"[null,null,"chat:x","new_msg",{"id":"0197","content":{"text":"1.2.3"},"sender_id":"u","inserted_at":"t"}]"#;
        let phoenix = r#"[null,null,"chat:x","new_msg",{"content":{"text":"1.2.3"},"id":"0197","inserted_at":"t","sender_id":"u"}]"#;
        for push in [nexus, phoenix] {
            let h = head(push.as_bytes()).expect(push);
            assert!(h.reference.is_none() && h.is("new_msg") && !h.ok() && h.status().is_none());
            assert_eq!(message_text(h.payload).map(|s| s.raw()), Some(&b"1.2.3"[..]));
            assert_eq!(get(h.payload, "id"), Some(&br#""0197""#[..]));
        }
        let guide = br#"[null,null,"room:lobby","new_msg",{"body":"1.2.3"}]"#;
        assert_eq!(message_text(head(guide).unwrap().payload).map(|s| s.raw()), Some(&b"1.2.3"[..]));
        let rejoin = br#"["1","1","t","phx_reply",{"response":{"missed":3,"recovered":true},"status":"ok"}]"#;
        let h = head(rejoin).unwrap();
        assert_eq!(h.response().and_then(|r| get(r, "recovered")), Some(&b"true"[..]));
        assert_eq!(h.response().and_then(|r| get(r, "missed")), Some(&b"3"[..]));
    }

    #[test]
    fn a_prefix_is_enough_for_the_head() {
        let frame = br#"["3",null,"chat:x","presence_state",{"u":{"metas":[{"online_at":"#;
        let h = head(frame).expect("head of a prefix");
        assert!(h.is("presence_state") && h.join_ref.is_some_and(|j| j.is("3")));
        assert_eq!(get(h.payload, "u"), None);
    }

    #[test]
    fn malformed_input_gives_none() {
        for bad in [
            &b""[..],
            b"[",
            b"{}",
            br#"["1""#,
            br#"["1","2","t""#,
            br#"[1,"2","t","e",{}]"#,
            br#"["1","2","t","e"]"#,
            br#"["1","2","t\"#,
            b"nul",
        ] {
            assert!(head(bad).is_none(), "{}", String::from_utf8_lossy(bad));
        }
        for bad in [&b"{"[..], b"{\"a\"", b"{\"a\":", b"{\"a\":{", b"{\"a\":\"x", b"{\"a\":1", b"[]", b"{\"a\" 1}"] {
            assert_eq!(get(bad, "a"), None, "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(get(b"{}", "a"), None);
        assert_eq!(get_str(br#"{"a":1}"#, "a"), None);
        assert_eq!(get(br#"{"b":[1,2],"a":null}"#, "a"), Some(&b"null"[..]));
    }

    #[test]
    fn ids_order_by_value() {
        let ordered: [&[u8]; 5] = [
            b"9",
            b"10",
            b"\"11\"",
            b"\"0197a1b2-0000-7000-8000-000000000000\"",
            b"\"0197a1b2-0001-7000-8000-000000000000\"",
        ];
        for w in ordered.windows(2) {
            assert!(id_order(w[0]) < id_order(w[1]));
        }
    }

    /// Per-frame cost of reading what fanout reads (a broadcast's body, a reply's ref and
    /// status): this module against the byte-pattern matching it replaced (which only read
    /// Nexus's layout) and against a full sonic-rs parse. Run:
    /// `cargo test --release -p nexus-load per_frame_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a timing, not a check"]
    fn per_frame_cost() {
        use sonic_rs::{JsonContainerTrait, JsonValueTrait};
        use std::hint::black_box;
        use std::time::Instant;

        fn old_event_is(frame: &[u8], event: &[u8]) -> bool {
            let mut pat = Vec::with_capacity(event.len() + 4);
            pat.extend_from_slice(b"\",\"");
            pat.extend_from_slice(event);
            pat.extend_from_slice(b"\",");
            memchr::memmem::find(frame, &pat).is_some()
        }
        fn old_json_str(b: &[u8]) -> Option<&[u8]> {
            let rest = b.strip_prefix(b"\"")?;
            Some(&rest[..memchr::memchr(b'"', rest)?])
        }
        fn old_ref(frame: &[u8]) -> Option<&[u8]> {
            let rest = frame.strip_prefix(b"[")?;
            let rest = match rest.strip_prefix(b"null,") {
                Some(r) => r,
                None => rest.get(old_json_str(rest)?.len() + 3..)?,
            };
            old_json_str(rest)
        }
        fn old(frame: &[u8]) -> usize {
            if old_event_is(frame, b"new_msg") {
                let Some(at) = memchr::memmem::find(frame, br#""text":"#) else { return 0 };
                return old_json_str(&frame[at + 7..]).map_or(0, <[u8]>::len);
            }
            if !old_event_is(frame, b"phx_reply") {
                return 0;
            }
            let ok = memchr::memmem::find(frame, br#""phx_reply",{"status":"ok""#).is_some();
            old_ref(frame).map_or(0, <[u8]>::len) + usize::from(ok)
        }
        fn new(frame: &[u8]) -> usize {
            let Some(h) = head(frame) else { return 0 };
            if h.is("new_msg") {
                return message_text(h.payload).map_or(0, |t| t.raw().len());
            }
            if !h.is("phx_reply") {
                return 0;
            }
            h.ref_u64().map_or(0, |r| r as usize) + usize::from(h.ok())
        }
        fn sonic(frame: &[u8]) -> usize {
            let v: sonic_rs::Value = sonic_rs::from_slice(frame).unwrap();
            let a = v.as_array().unwrap();
            match a.get(3).and_then(|e| e.as_str()) {
                Some("new_msg") => a
                    .get(4)
                    .and_then(|p| p.get("content"))
                    .and_then(|c| c.get("text"))
                    .and_then(|t| t.as_str())
                    .map_or(0, str::len),
                Some("phx_reply") => {
                    usize::from(a.get(4).and_then(|p| p.get("status")).and_then(|s| s.as_str()) == Some("ok"))
                }
                _ => 0,
            }
        }
        let body = "3.1234.567890123.xxxxxxxxxxxxxxx";
        let frames = [
            (
                "nexus new_msg",
                format!(
                    r#"[null,null,"chat:0197a1b2-7c3d-7000-8000-00000000abcd","new_msg",{{"id":"0197a1b2-7c3d-7000-8000-00000000abce","content":{{"text":"{body}"}},"sender_id":"6f1c1d2e-0000-4000-8000-000000000001","inserted_at":"2026-12-06T18:00:00.123456Z"}}]"#
                ),
            ),
            (
                "phoenix new_msg",
                format!(
                    r#"[null,null,"chat:0197a1b2-7c3d-7000-8000-00000000abcd","new_msg",{{"content":{{"text":"{body}"}},"id":"0197a1b2-7c3d-7000-8000-00000000abce","inserted_at":"2026-12-06T18:00:00.123456Z","sender_id":"6f1c1d2e-0000-4000-8000-000000000001"}}]"#
                ),
            ),
            (
                "nexus reply",
                r#"["1","1234","chat:0197a1b2-7c3d-7000-8000-00000000abcd","phx_reply",{"status":"ok","response":{}}]"#
                    .to_string(),
            ),
            (
                "phoenix reply",
                r#"["1","1234","chat:0197a1b2-7c3d-7000-8000-00000000abcd","phx_reply",{"response":{},"status":"ok"}]"#
                    .to_string(),
            ),
        ];
        const N: u32 = 2_000_000;
        for (name, frame) in &frames {
            let f = frame.as_bytes();
            let time = |read: fn(&[u8]) -> usize| {
                let t = Instant::now();
                let mut sum = 0;
                for _ in 0..N {
                    sum += read(black_box(f));
                }
                black_box(sum);
                t.elapsed().as_nanos() as f64 / f64::from(N)
            };
            let (o, n, s) = (time(old), time(new), time(sonic));
            println!(
                "{name:16} {} B: byte patterns {o:6.1} ns (finds {}), v2 {n:6.1} ns, sonic-rs Value {s:6.1} ns",
                f.len(),
                old(f) > 0
            );
        }
    }
}
