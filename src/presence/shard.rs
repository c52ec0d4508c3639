//! The presence of the topics one core owns, as a pure data structure that says what to send.
//!
//! The owner of a topic is the single source of its diffs, so every member sees one sequence.
//! Changes are coalesced: [`PresenceShard::track`] and [`PresenceShard::untrack`] only record
//! them (and say when a flush must be scheduled); [`PresenceShard::flush`] returns the states
//! the new joiners wait for and one diff per changed topic. A join storm of N users thus costs
//! O(N) diff frames per member instead of O(N) per join, and one state encoding serves every
//! joiner of a window (instead of O(N) states of O(N) metas).
//!
//! `J` identifies a joiner to the caller (its core and connection); the shard only hands it
//! back.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use uuid::Uuid;

use super::{Diff, Meta, PhxRef, TopicPresence};

/// Presence state of the topics one core owns.
#[derive(Debug)]
pub struct PresenceShard<J> {
    topics: HashMap<Uuid, TopicPresence>,
    /// Diffs not yet sent, per topic.
    pending: HashMap<Uuid, Diff>,
    /// Joiners waiting for a state, per topic.
    waiting: HashMap<Uuid, Vec<J>>,
}

impl<J> Default for PresenceShard<J> {
    fn default() -> PresenceShard<J> {
        PresenceShard { topics: HashMap::new(), pending: HashMap::new(), waiting: HashMap::new() }
    }
}

/// What one flush sends.
#[derive(Debug)]
pub struct Flush<J> {
    /// Per topic: its full state (one encoding) and the joiners to push it to.
    pub states: Vec<(Uuid, Bytes, Vec<J>)>,
    /// Per changed topic: its `presence_diff` payload, for every core (each fans it out to its
    /// members of the topic, if any).
    pub diffs: Vec<(Uuid, Arc<[u8]>)>,
}

impl<J> PresenceShard<J> {
    /// Topics and metas held (for `/metrics`).
    pub fn sizes(&self) -> (usize, usize) {
        (self.topics.len(), self.topics.values().map(TopicPresence::len).sum())
    }

    /// A joiner's meta: added now, its state and the diff go out at the next flush (state
    /// first), which the caller schedules.
    pub fn track(&mut self, conversation: Uuid, user: Uuid, meta: Meta, joiner: J) {
        self.add(conversation, user, meta, Some(joiner))
    }

    /// A meta joined: added now, the diff (and the state of its joiner, if it has one here)
    /// go out at the next flush, which the caller schedules.
    pub fn add(&mut self, conversation: Uuid, user: Uuid, meta: Meta, joiner: Option<J>) {
        self.topics.entry(conversation).or_default().track(user, meta);
        if let Some(joiner) = joiner {
            self.waiting.entry(conversation).or_default().push(joiner);
        }
        self.pending.entry(conversation).or_default().join(user, meta);
    }

    /// A meta that was already there before anyone here watched the topic (a replica's first
    /// snapshot): added without a diff, since no member here has a state it would change.
    pub fn add_present(&mut self, conversation: Uuid, user: Uuid, meta: Meta) {
        self.topics.entry(conversation).or_default().track(user, meta);
    }

    /// Forgets a topic entirely, without a diff (no member here needs it any more).
    pub fn forget(&mut self, conversation: Uuid) {
        self.topics.remove(&conversation);
        self.pending.remove(&conversation);
        self.waiting.remove(&conversation);
    }

    /// A meta left (leave, rejoin, close); the table of a topic goes with its last meta.
    /// Returns `true` when it was there (a change: the caller schedules a flush).
    pub fn untrack(&mut self, conversation: Uuid, user: Uuid, phx_ref: &PhxRef) -> bool {
        let Some(topic) = self.topics.get_mut(&conversation) else { return false };
        let left = topic.untrack(user, phx_ref);
        if topic.is_empty() {
            self.topics.remove(&conversation);
        }
        match left {
            Some(meta) => {
                self.pending.entry(conversation).or_default().leave(user, meta);
                true
            }
            None => false,
        }
    }

    /// Everything to send now: the states the joiners wait for, then every non-empty diff.
    /// Per destination core the caller must send them in this order (state before diff).
    pub fn flush(&mut self) -> Flush<J> {
        let states = std::mem::take(&mut self.waiting)
            .into_iter()
            .map(|(conversation, joiners)| {
                let state = match self.topics.get(&conversation) {
                    Some(topic) => Bytes::from(topic.state_json()),
                    None => Bytes::from_static(b"{}"),
                };
                (conversation, state, joiners)
            })
            .collect();
        let diffs = std::mem::take(&mut self.pending)
            .into_iter()
            .filter(|(_, diff)| !diff.is_empty())
            .map(|(conversation, diff)| (conversation, Arc::from(diff.to_json())))
            .collect();
        Flush { states, diffs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(c: u8) -> Meta {
        Meta::new([c; 16], 0)
    }

    #[test]
    fn coalesces_until_flushed_and_states_include_the_joiner() {
        let mut shard = PresenceShard::<&str>::default();
        let (topic, ann, bob) = (Uuid::from_u128(7), Uuid::from_u128(1), Uuid::from_u128(2));
        shard.track(topic, ann, meta(b'a'), "ann's socket");
        shard.track(topic, bob, meta(b'b'), "bob's socket");
        let flush = shard.flush();
        assert_eq!(flush.states.len(), 1);
        let (t, state, joiners) = &flush.states[0];
        assert_eq!((*t, joiners.as_slice()), (topic, &["ann's socket", "bob's socket"][..]));
        let state = String::from_utf8(state.to_vec()).expect("utf8");
        assert!(state.contains("aaaaaaaaaaaaaaaa") && state.contains("bbbbbbbbbbbbbbbb"), "{state}");
        assert_eq!(flush.diffs.len(), 1, "one diff for both joins");
        let diff = String::from_utf8(flush.diffs[0].1.to_vec()).expect("utf8");
        assert!(
            diff.contains("aaaaaaaaaaaaaaaa") && diff.contains("bbbbbbbbbbbbbbbb") && diff.ends_with(r#""leaves":{}}"#)
        );
        assert_eq!(shard.sizes(), (1, 2));

        // A meta that joins and leaves within one window never shows up in a diff.
        shard.track(topic, ann, meta(b'c'), "ann's 2nd socket");
        assert!(shard.untrack(topic, ann, &[b'c'; 16]), "a change, though it cancels out");
        let flush = shard.flush();
        assert!(flush.diffs.is_empty(), "nothing changed for the members: {:?}", flush.diffs);
        assert_eq!(flush.states.len(), 1, "the joiner still gets its state");

        assert!(shard.untrack(topic, ann, &[b'a'; 16]));
        assert!(!shard.untrack(topic, ann, &[b'a'; 16]), "unknown meta: nothing to do");
        assert!(!shard.untrack(Uuid::from_u128(99), ann, &[b'a'; 16]), "unknown topic");
        assert!(shard.untrack(topic, bob, &[b'b'; 16]));
        let flush = shard.flush();
        assert!(flush.states.is_empty());
        let diff = String::from_utf8(flush.diffs[0].1.to_vec()).expect("utf8");
        assert!(diff.starts_with(r#"{"joins":{},"leaves":{"#), "{diff}");
        assert_eq!(shard.sizes(), (0, 0), "the last meta frees the topic");
    }
}
