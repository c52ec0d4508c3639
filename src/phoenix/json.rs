//! Small JSON writing helpers for frames assembled from pre-encoded parts.

/// Appends `s` as a JSON string literal (quoted and escaped).
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    // Serializing a &str into a Vec cannot fail.
    let _ = sonic_rs::to_writer(&mut *out, s);
}

/// Appends `s` as a JSON string, or `null`.
pub(crate) fn write_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => write_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// Whether `text` nests `[`/`{` deeper than `max` (outside strings). One pass, no parse: run
/// before the parser, which recurses per level and would overflow the stack on hostile input.
pub fn nests_deeper_than(text: &[u8], max: usize) -> bool {
    // Fast path (every ordinary message): fewer openers in all than the limit cannot nest
    // deeper; counting two bytes is SIMD work, the exact scan below is a byte loop.
    if memchr::memchr2_iter(b'[', b'{', text).count() <= max {
        return false;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in text {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// The string value of `key` when `payload` is a JSON object holding a string there.
pub fn string_field(payload: &str, key: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Object<'a>(#[serde(borrow)] std::collections::HashMap<std::borrow::Cow<'a, str>, sonic_rs::Value>);
    let Object(map) = sonic_rs::from_str(payload).ok()?;
    map.get(key).and_then(|v| sonic_rs::JsonValueTrait::as_str(v)).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_depth_outside_strings() {
        assert!(!nests_deeper_than(br#"[null,"1","t","e",{"a":[1,{"b":2}]}]"#, 4));
        assert!(nests_deeper_than(br#"[null,"1","t","e",{"a":[1,{"b":[]}]}]"#, 4));
        // Brackets inside strings, escaped quotes included, do not count.
        assert!(!nests_deeper_than(br#"["[[[[{{{{", "\"[[[[[[", {}]"#, 2));
        assert!(nests_deeper_than("[".repeat(40_000).as_bytes(), 32));
        // Unbalanced closers cannot go below zero and hide later depth.
        assert!(nests_deeper_than(b"]]]]][[[", 2));
    }

    #[test]
    fn string_fields() {
        assert_eq!(string_field(r#"{"body":"hi \u00e9"}"#, "body").as_deref(), Some("hi é"));
        assert_eq!(string_field(r#"{"body":5}"#, "body"), None);
        assert_eq!(string_field(r#"{"other":"x"}"#, "body"), None);
        assert_eq!(string_field(r#"["body"]"#, "body"), None);
        assert_eq!(string_field("null", "body"), None);
    }

    #[test]
    fn escapes() {
        let mut out = Vec::new();
        write_str(&mut out, "a\"b\\c\n\u{1}é");
        assert_eq!(std::str::from_utf8(&out).expect("utf8"), r#""a\"b\\c\n\u0001é""#);
    }
}
