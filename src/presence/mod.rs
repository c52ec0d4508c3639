//! Phoenix.Presence as pure data structures: who is present in one topic (one meta per joined
//! connection, keyed by user) with the exact JSON of `presence_state` and `presence_diff`
//! (docs/protocol.md, "Presence"), and the [`PresenceShard`] of the topics one core owns.
//!
//! The core that owns a topic holds its [`TopicPresence`] and is the single source of every
//! diff for it, so every member sees the same sequence (docs/architecture.md, "Presence").

mod shard;

use std::collections::HashMap;

use base64::Engine;
use smallvec::SmallVec;
use uuid::Uuid;

pub use self::shard::{Flush, PresenceShard};
use crate::ids;

/// A meta's `phx_ref`: 16 URL-safe base64 characters, unique per connection-join (Phoenix's
/// own format and length).
pub type PhxRef = [u8; 16];

/// One joined connection's presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Unique reference of this meta.
    pub phx_ref: PhxRef,
    /// When the connection joined, as the wire's RFC 3339 text (formatted once, not per state).
    pub online_at: [u8; 27],
}

impl Meta {
    /// A meta joined at `online_at_us` (µs since the epoch).
    pub fn new(phx_ref: PhxRef, online_at_us: i64) -> Meta {
        let mut online_at = [b'0'; 27];
        let text = ids::format_micros(online_at_us);
        if text.len() == online_at.len() {
            online_at.copy_from_slice(text.as_bytes());
        }
        Meta { phx_ref, online_at }
    }
}

/// Makes unique `phx_ref`s: 12 bytes (time, salted core, counter) as 16 URL-safe base64
/// characters. The salt and the counter's start are random per process, so refs stay unique
/// across the nodes of a cluster (where core numbers repeat) and across restarts.
#[derive(Debug)]
pub struct RefMaker {
    core: u16,
    counter: u32,
}

impl RefMaker {
    /// A maker for one core (refs from different cores never collide).
    pub fn new(core: u16) -> RefMaker {
        let random = Uuid::new_v4().as_u128();
        RefMaker { core: core ^ process_salt(), counter: random as u32 }
    }

    /// The next reference.
    pub fn make(&mut self) -> PhxRef {
        self.counter = self.counter.wrapping_add(1);
        let mut raw = [0u8; 12];
        raw[..6].copy_from_slice(&ids::now_micros().to_be_bytes()[2..]);
        raw[6..8].copy_from_slice(&self.core.to_be_bytes());
        raw[8..].copy_from_slice(&self.counter.to_be_bytes());
        let mut out = [0u8; 16];
        // 12 bytes encode to exactly 16 characters without padding.
        let _ = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_slice(raw, &mut out);
        out
    }
}

/// One random value per process, mixed into every core's number: cores of one process stay
/// distinct, cores of two processes almost surely differ.
fn process_salt() -> u16 {
    static SALT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *SALT.get_or_init(|| Uuid::new_v4().as_u128() as u16)
}

/// The presence table of one topic.
#[derive(Debug, Default)]
pub struct TopicPresence {
    /// Metas by user; one meta per user is the common case and is kept inline (no allocation
    /// per presence).
    users: HashMap<Uuid, SmallVec<[Meta; 1]>>,
    metas: usize,
}

/// Joins and leaves since the last diff (for one topic).
#[derive(Debug, Default)]
pub struct Diff {
    /// Metas that joined.
    pub joins: Vec<(Uuid, Meta)>,
    /// Metas that left.
    pub leaves: Vec<(Uuid, Meta)>,
}

impl Diff {
    /// Whether there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.joins.is_empty() && self.leaves.is_empty()
    }

    /// Records a join.
    pub fn join(&mut self, user: Uuid, meta: Meta) {
        self.joins.push((user, meta));
    }

    /// Records a leave; a meta that joined within this same diff simply disappears (the
    /// members never saw it), which keeps coalesced diffs exact.
    pub fn leave(&mut self, user: Uuid, meta: Meta) {
        match self.joins.iter().position(|(_, m)| m.phx_ref == meta.phx_ref) {
            Some(i) => {
                self.joins.remove(i);
            }
            None => self.leaves.push((user, meta)),
        }
    }

    /// `{"joins":{...},"leaves":{...}}`.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + 96 * (self.joins.len() + self.leaves.len()));
        out.extend_from_slice(b"{\"joins\":");
        write_grouped(&mut out, &self.joins);
        out.extend_from_slice(b",\"leaves\":");
        write_grouped(&mut out, &self.leaves);
        out.push(b'}');
        out
    }
}

impl TopicPresence {
    /// Adds a meta.
    pub fn track(&mut self, user: Uuid, meta: Meta) {
        self.users.entry(user).or_default().push(meta);
        self.metas += 1;
    }

    /// Removes a meta; returns it if it was present.
    pub fn untrack(&mut self, user: Uuid, phx_ref: &PhxRef) -> Option<Meta> {
        let metas = self.users.get_mut(&user)?;
        let i = metas.iter().position(|m| &m.phx_ref == phx_ref)?;
        let meta = metas.remove(i);
        if metas.is_empty() {
            self.users.remove(&user);
        }
        self.metas -= 1;
        Some(meta)
    }

    /// Whether nobody is present (the table can be freed).
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Number of metas.
    pub fn len(&self) -> usize {
        self.metas
    }

    /// The full state `{"<user>":{"metas":[...]},...}`.
    pub fn state_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + 110 * self.metas);
        out.push(b'{');
        for (i, (user, metas)) in self.users.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_user(&mut out, user, metas.iter());
        }
        out.push(b'}');
        out
    }
}

/// Writes `{user: {"metas": [...]}, ...}` with users in first-seen order, metas in order.
fn write_grouped(out: &mut Vec<u8>, entries: &[(Uuid, Meta)]) {
    let mut index: HashMap<Uuid, usize> = HashMap::with_capacity(entries.len());
    let mut groups: Vec<(Uuid, Vec<&Meta>)> = Vec::new();
    for (user, meta) in entries {
        let i = *index.entry(*user).or_insert_with(|| {
            groups.push((*user, Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(meta);
    }
    out.push(b'{');
    for (i, (user, metas)) in groups.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_user(out, user, metas.iter().copied());
    }
    out.push(b'}');
}

fn write_user<'a>(out: &mut Vec<u8>, user: &Uuid, metas: impl Iterator<Item = &'a Meta>) {
    out.push(b'"');
    out.extend_from_slice(user.hyphenated().encode_lower(&mut Uuid::encode_buffer()).as_bytes());
    out.extend_from_slice(b"\":{\"metas\":[");
    for (i, m) in metas.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"phx_ref\":\"");
        out.extend_from_slice(&m.phx_ref);
        out.extend_from_slice(b"\",\"online_at\":\"");
        out.extend_from_slice(&m.online_at);
        out.extend_from_slice(b"\"}");
    }
    out.extend_from_slice(b"]}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_are_unique_and_url_safe() {
        let mut a = RefMaker::new(0);
        let mut b = RefMaker::new(1);
        let refs: Vec<PhxRef> = (0..1000).flat_map(|_| [a.make(), b.make()]).collect();
        let unique: std::collections::HashSet<_> = refs.iter().collect();
        assert_eq!(unique.len(), refs.len());
        assert!(refs.iter().flatten().all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_'));
    }

    #[test]
    fn state_and_diffs() {
        let mut t = TopicPresence::default();
        let (u1, u2) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let m = |c: u8, at: i64| Meta::new([c; 16], at);
        t.track(u1, m(b'a', 0));
        t.track(u1, m(b'b', 1_000_000));
        let state = String::from_utf8(t.state_json()).expect("utf8");
        assert_eq!(
            state,
            r#"{"00000000-0000-0000-0000-000000000001":{"metas":[{"phx_ref":"aaaaaaaaaaaaaaaa","online_at":"1970-01-01T00:00:00.000000Z"},{"phx_ref":"bbbbbbbbbbbbbbbb","online_at":"1970-01-01T00:00:01.000000Z"}]}}"#
        );
        assert_eq!(t.untrack(u1, &[b'a'; 16]), Some(m(b'a', 0)));
        assert_eq!(t.untrack(u1, &[b'a'; 16]), None);
        assert_eq!(t.len(), 1);
        t.untrack(u1, &[b'b'; 16]);
        assert!(t.is_empty() && t.state_json() == b"{}");

        let mut d = Diff::default();
        d.join(u1, m(b'c', 0));
        d.join(u2, m(b'd', 0));
        d.leave(u1, m(b'c', 0)); // joined and left within one diff: gone
        d.leave(u2, m(b'e', 0));
        let json = String::from_utf8(d.to_json()).expect("utf8");
        assert!(json.starts_with(
            r#"{"joins":{"00000000-0000-0000-0000-000000000002":{"metas":[{"phx_ref":"dddddddddddddddd""#
        ));
        assert!(json
            .contains(r#""leaves":{"00000000-0000-0000-0000-000000000002":{"metas":[{"phx_ref":"eeeeeeeeeeeeeeee""#));
        assert_eq!(Diff::default().to_json(), br#"{"joins":{},"leaves":{}}"#);
    }
}
