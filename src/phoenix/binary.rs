//! The V2 binary push layout phoenix.js uses when a payload is an `ArrayBuffer`
//! (docs/protocol.md, "Binary frames"). Nexus events need JSON, so the server only decodes the
//! envelope to answer with an error reply.

/// The envelope of a client kind-0 binary push.
#[derive(Debug, PartialEq, Eq)]
pub struct BinaryPush<'a> {
    /// Join reference (`None` when empty).
    pub join_ref: Option<&'a str>,
    /// Reference (`None` when empty).
    pub reference: Option<&'a str>,
    /// Topic.
    pub topic: &'a str,
    /// Event.
    pub event: &'a str,
}

/// Decodes `00 len(join_ref) len(ref) len(topic) len(event) join_ref ref topic event payload`.
pub fn decode_binary_push(frame: &[u8]) -> Option<BinaryPush<'_>> {
    let [0, jl, rl, tl, el, rest @ ..] = frame else { return None };
    let lens = [*jl as usize, *rl as usize, *tl as usize, *el as usize];
    if rest.len() < lens.iter().sum::<usize>() {
        return None;
    }
    let mut at = 0;
    let mut field = |len: usize| {
        let s = std::str::from_utf8(&rest[at..at + len]).ok();
        at += len;
        s
    };
    let join_ref = field(lens[0])?;
    let reference = field(lens[1])?;
    let topic = field(lens[2])?;
    let event = field(lens[3])?;
    Some(BinaryPush { join_ref: non_empty(join_ref), reference: non_empty(reference), topic, event })
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_example() {
        let f = [0x00, 0x01, 0x01, 0x06, 0x02, 0x33, 0x37, 0x72, 0x6f, 0x6f, 0x6d, 0x3a, 0x31, 0x75, 0x70, 0x01, 0x02];
        let p = decode_binary_push(&f).expect("valid");
        assert_eq!(p, BinaryPush { join_ref: Some("3"), reference: Some("7"), topic: "room:1", event: "up" });
        assert_eq!(decode_binary_push(&f[..10]), None);
        assert_eq!(decode_binary_push(&[1, 0, 0, 0, 0]), None);
    }
}
