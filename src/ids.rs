//! Identifier and timestamp formats shared by the wire and storage: canonical UUIDs and
//! RFC 3339 UTC timestamps with microseconds.

use uuid::Uuid;

/// Parses the canonical hyphenated UUID form only (36 characters, any case, any version):
/// braces, URNs and the simple 32-digit form are refused.
pub fn parse_canonical_uuid(s: &str) -> Option<Uuid> {
    let b = s.as_bytes();
    if b.len() != 36 || b[8] != b'-' || b[13] != b'-' || b[18] != b'-' || b[23] != b'-' {
        return None;
    }
    Uuid::try_parse(s).ok()
}

/// Formats microseconds since the Unix epoch as `2026-01-11T20:05:50.055142Z`.
pub fn format_micros(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let nanos = (micros.rem_euclid(1_000_000) * 1_000) as u32;
    match chrono::DateTime::from_timestamp(secs, nanos) {
        // Not `format("%Y-…")`: that parses its pattern on every call, and this runs once per
        // message on every core that delivers it (~3 % of a core's CPU at 58k msg/s).
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        None => "1970-01-01T00:00:00.000000Z".to_string(),
    }
}

/// The next of a splitmix64 sequence: fast random bits for message ids (unique by their time,
/// not secret; a `getrandom` call per message would cost a syscall each).
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The UUIDv7 of instant `at_us` (µs since the epoch): the 48-bit millisecond, version 7, the
/// µs within the millisecond in the 12 `rand_a` bits (so ids order exactly like their
/// instants), then `tail` as the low 64 bits with its top two replaced by the RFC 4122 variant
/// (so an id's own low bits give it back unchanged).
/// The writer stamps with it, and PostgreSQL's append builds the same layout in SQL.
pub fn v7(at_us: i64, tail: u64) -> Uuid {
    let hi = ((at_us / 1_000) << 16) as u64 | 0x7000 | (at_us % 1_000) as u64;
    Uuid::from_u64_pair(hi, tail & !(0b11 << 62) | 1 << 63)
}

/// Microseconds since the Unix epoch, from the system clock.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_only() {
        let id = "0195f1b2-7c3a-7d4e-8f00-123456789abc";
        assert!(parse_canonical_uuid(id).is_some());
        assert!(parse_canonical_uuid(&id.to_uppercase()).is_some());
        assert!(parse_canonical_uuid(&id.replace('-', "")).is_none());
        assert!(parse_canonical_uuid(&format!("{{{id}}}")).is_none());
        assert!(parse_canonical_uuid("0195f1b2-7c3a-7d4e-8f00-123456789abz").is_none());
    }

    #[test]
    fn micros_format() {
        assert_eq!(format_micros(1_768_161_950_055_142), "2026-01-11T20:05:50.055142Z");
        assert_eq!(format_micros(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(format_micros(1_768_161_950_000_000), "2026-01-11T20:05:50.000000Z");
        assert_eq!(format_micros(1_768_161_950_000_001), "2026-01-11T20:05:50.000001Z");
    }

    #[test]
    fn v7_layout() {
        let id = v7(1_768_161_950_055_142, u64::MAX);
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(id.as_u64_pair().0 >> 16, 1_768_161_950_055, "milliseconds");
        assert_eq!(id.as_u64_pair().0 & 0xfff, 142, "µs within the millisecond");
        assert_eq!(id.as_u64_pair().1 >> 62, 0b10, "RFC 4122 variant");
        assert_eq!(v7(5, id.as_u64_pair().1).as_u64_pair().1, id.as_u64_pair().1, "its own tail comes back");
        assert!(v7(1_000, 0) > v7(999, u64::MAX), "ordered by instant first");
    }
}
