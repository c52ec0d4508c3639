//! What one node publishes to the others for each conversation in a committed batch: the
//! conversation's new messages, each with its `seq`, its `inserted_at` and its `new_msg`
//! broadcast payload already encoded, so a message is encoded once for the whole cluster.
//!
//! Layout (integers little-endian):
//!
//! ```text
//! b'M'  u8 incarnation length  incarnation (UTF-8)  u32 count
//! count × ( u64 seq  i64 inserted_at µs  u32 payload length  payload (JSON) )
//! ```
//!
//! The incarnation names the publishing node's process, so a node skips its own messages (it
//! delivered them from its writer already). Decoding trusts nothing: a short, long or
//! malformed publication is an error, never a panic, and never an allocation sized by it.

/// First byte of a message publication.
const TAG: u8 = b'M';

/// Fixed bytes per message: `seq`, `inserted_at`, payload length.
const ENTRY_HEAD: usize = 8 + 8 + 4;

/// One message in a publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Its place in the conversation.
    pub seq: u64,
    /// Its `inserted_at`, µs since the epoch.
    pub inserted_at_us: i64,
    /// Its `new_msg` broadcast payload.
    pub payload: &'a [u8],
}

/// Why a publication was not understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not a message publication.
    #[error("not a message publication")]
    Tag,
    /// It ends inside a field.
    #[error("publication truncated")]
    Truncated,
    /// Bytes follow the last message.
    #[error("bytes after the last message")]
    Trailing,
    /// The incarnation is not UTF-8.
    #[error("incarnation is not UTF-8")]
    Incarnation,
}

/// Encodes one conversation's messages, in `seq` order, published by `incarnation`.
///
/// # Panics
/// If `incarnation` is longer than 255 bytes or a payload longer than `u32::MAX` (both are
/// ours: node ids are validated at start-up, payloads bounded by the frame limit).
pub fn encode<'a>(incarnation: &str, entries: &[Entry<'a>]) -> Vec<u8> {
    let len = u8::try_from(incarnation.len()).expect("incarnation ids are at most 255 bytes");
    let size = 2 + incarnation.len() + 4 + entries.iter().map(|e| ENTRY_HEAD + e.payload.len()).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.push(TAG);
    out.push(len);
    out.extend_from_slice(incarnation.as_bytes());
    out.extend_from_slice(&u32::try_from(entries.len()).expect("a batch is bounded").to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.seq.to_le_bytes());
        out.extend_from_slice(&e.inserted_at_us.to_le_bytes());
        out.extend_from_slice(&u32::try_from(e.payload.len()).expect("payloads are bounded").to_le_bytes());
        out.extend_from_slice(e.payload);
    }
    out
}

/// A decoded publication: who published it and its messages, borrowing from the bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Publication<'a> {
    /// The publishing node's incarnation.
    pub incarnation: &'a str,
    /// The messages, in the order they were published.
    pub entries: Vec<Entry<'a>>,
}

/// Decodes a publication made by [`encode`].
pub fn decode(bytes: &[u8]) -> Result<Publication<'_>, DecodeError> {
    let mut r = Reader(bytes);
    if r.take(1)? != [TAG] {
        return Err(DecodeError::Tag);
    }
    let len = usize::from(r.take(1)?[0]);
    let incarnation = std::str::from_utf8(r.take(len)?).map_err(|_| DecodeError::Incarnation)?;
    let count = r.u32()? as usize;
    // Each entry takes at least its fixed head: a count the bytes cannot hold is a lie, and
    // must not size an allocation.
    if count > r.0.len() / ENTRY_HEAD {
        return Err(DecodeError::Truncated);
    }
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let seq = u64::from_le_bytes(r.array()?);
        let inserted_at_us = i64::from_le_bytes(r.array()?);
        let len = r.u32()? as usize;
        entries.push(Entry { seq, inserted_at_us, payload: r.take(len)? });
    }
    if !r.0.is_empty() {
        return Err(DecodeError::Trailing);
    }
    Ok(Publication { incarnation, entries })
}

/// The unread rest of a publication.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let (head, rest) = self.0.split_at_checked(n).ok_or(DecodeError::Truncated)?;
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.take(N)?.try_into().map_err(|_| DecodeError::Truncated)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let entries = [
            Entry { seq: 7, inserted_at_us: 1_764_000_000_000_001, payload: br#"{"id":"a"}"# },
            Entry { seq: 8, inserted_at_us: 1_764_000_000_000_002, payload: b"" },
        ];
        encode("node-a:4000/1764000000000000", &entries)
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let p = decode(&bytes).expect("decodes");
        assert_eq!(p.incarnation, "node-a:4000/1764000000000000");
        assert_eq!(p.entries.len(), 2);
        assert_eq!(p.entries[0], Entry { seq: 7, inserted_at_us: 1_764_000_000_000_001, payload: br#"{"id":"a"}"# });
        assert_eq!(p.entries[1].payload, b"");
        assert_eq!(decode(&encode("", &[])), Ok(Publication { incarnation: "", entries: Vec::new() }));
    }

    #[test]
    fn every_truncation_and_any_trailing_byte_is_an_error() {
        let bytes = sample();
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]), Err(DecodeError::Truncated), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(DecodeError::Trailing));
    }

    #[test]
    fn hostile_headers_are_refused_without_allocating_for_them() {
        assert_eq!(decode(b"P\x00\x00\x00\x00\x00"), Err(DecodeError::Tag));
        assert_eq!(decode(b"M\x02\xff\xfe\x00\x00\x00\x00"), Err(DecodeError::Incarnation));
        // A count of 4 billion messages in a few bytes.
        assert_eq!(decode(b"M\x00\xff\xff\xff\xff"), Err(DecodeError::Truncated));
        // A payload length past the end.
        let mut bytes = encode("n", &[Entry { seq: 1, inserted_at_us: 1, payload: b"x" }]);
        let at = bytes.len() - 5;
        bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&bytes), Err(DecodeError::Truncated));
    }
}
