//! This core's members of each conversation, and the broadcast to them.

use std::collections::HashMap;
use std::rc::Rc;

use bytes::Bytes;
use uuid::Uuid;

use super::conn::Conn;
use super::fabric::TopicOrder;
use crate::phoenix::{Outbound, Vsn};
use crate::{chat, limits, wire};

/// One local member of a topic.
struct Member {
    conn: Rc<Conn>,
    /// Its `presence_state` was pushed: presence diffs may follow (never before the state).
    presence_ready: bool,
    /// It is recovering missed messages: broadcasts are held for it (in [`LocalTopics`]'s
    /// `held`) until the recovered ones are pushed.
    recovering: bool,
}

/// What a recovering member's broadcasts wait in, and what its read found.
#[derive(Debug, Default)]
pub(crate) struct Held {
    /// `new_msg` payloads broadcast since the join, in order.
    pub live: Vec<Bytes>,
    /// More than [`limits::RECOVERY_HOLD_MAX`] arrived: `live` was dropped.
    pub overflowed: bool,
    /// The recovered messages' payloads, once read (pushed after the `presence_state`).
    pub missed: Option<Vec<Bytes>>,
    /// The client's `last_seen_id`, once read: held broadcasts at or below it were seen.
    pub after: Option<Uuid>,
    /// Set once the recovered messages are pushed: the newest message the member has.
    /// Broadcasts at or below it (their batch reached this core after the read saw it) are
    /// dropped; the first newer one is delivered and ends the recovery.
    pub trailing: Option<Uuid>,
}

/// This core's members of one conversation.
///
/// Frames echo the topic as each client spelled it, and the UUID is case-insensitive, so
/// spellings can differ; almost always they do not. The first member's spelling is the
/// topic's, and only members who spell it differently have an entry in `other_spellings`: a
/// member costs no spelling of its own (16 B less per connection), and a join finds its
/// spelling without scanning the members.
///
/// A topic is boxed in the map and its rare parts are boxed in it: the map's table holds a
/// slot for every bucket, used or not (up to twice the topics), so a small slot keeps a
/// thousand topics near 150 KiB per core rather than 280 KiB.
struct Topic {
    members: HashMap<usize, Member>,
    spelling: Rc<str>,
    // Boxed on purpose: 8 bytes in every topic instead of 48 for a map that is almost never used.
    #[allow(clippy::box_collection)]
    other_spellings: Option<Box<HashMap<usize, Rc<str>>>>,
    /// Cluster mode: the delivery order of the conversation's messages on this core.
    order: Option<Box<TopicOrder>>,
}

impl Topic {
    /// The spelling member `key` uses.
    fn spelling_of(&self, key: usize) -> &Rc<str> {
        match &self.other_spellings {
            Some(others) => others.get(&key).unwrap_or(&self.spelling),
            None => &self.spelling,
        }
    }
}

/// What a member's leave did to its topic.
pub(crate) enum Left {
    /// Other members remain (or it was no member).
    Stays,
    /// It was the last member: the topic is gone, with its order state (cluster mode).
    Freed(Option<Box<TopicOrder>>),
}

/// Conversation → local members, for the conversations this core's sockets joined.
#[derive(Default)]
pub(crate) struct LocalTopics {
    topics: HashMap<Uuid, Box<Topic>>,
    /// Recovering members' held broadcasts, by (slab key, conversation).
    held: HashMap<(usize, Uuid), Held>,
}

impl LocalTopics {
    /// Adds `conn` (slab key `key`) as a member spelling the topic `spelling`; returns the
    /// shared spelling the member should keep (`spelling` itself for a new topic), and whether
    /// the topic is new.
    pub(crate) fn add_member(&mut self, conversation: Uuid, conn: &Rc<Conn>, spelling: Rc<str>) -> (Rc<str>, bool) {
        let key = conn.key;
        let mut new = false;
        let topic = self.topics.entry(conversation).or_insert_with(|| {
            new = true;
            Box::new(Topic { members: HashMap::new(), spelling: spelling.clone(), other_spellings: None, order: None })
        });
        let interned = if *topic.spelling == *spelling {
            topic.spelling.clone()
        } else {
            let others = topic.other_spellings.get_or_insert_with(Box::default);
            let known = others.values().find(|t| ***t == *spelling).cloned();
            let other = known.unwrap_or(spelling);
            others.insert(key, other.clone());
            other
        };
        let member = Member { conn: conn.clone(), presence_ready: false, recovering: false };
        let previous = topic.members.insert(key, member);
        debug_assert!(previous.is_none(), "a socket is a member of a conversation once");
        (interned, new)
    }

    /// Removes a member; frees the topic with its last member.
    pub(crate) fn remove_member(&mut self, conversation: Uuid, key: usize) -> Left {
        let Some(topic) = self.topics.get_mut(&conversation) else { return Left::Stays };
        topic.members.remove(&key);
        self.held.remove(&(key, conversation));
        if let Some(others) = topic.other_spellings.as_mut() {
            others.remove(&key);
            if others.is_empty() {
                topic.other_spellings = None;
            }
        }
        if !topic.members.is_empty() {
            return Left::Stays;
        }
        Left::Freed(self.topics.remove(&conversation).and_then(|t| t.order))
    }

    /// Gives a topic its order state (cluster mode, when it is created).
    pub(crate) fn set_order(&mut self, conversation: Uuid, order: TopicOrder) {
        if let Some(topic) = self.topics.get_mut(&conversation) {
            topic.order = Some(Box::new(order));
        }
    }

    /// The order state of a topic (cluster mode).
    pub(crate) fn order_mut(&mut self, conversation: Uuid) -> Option<&mut TopicOrder> {
        self.topics.get_mut(&conversation)?.order.as_deref_mut()
    }

    /// The conversations whose delivery has started (cluster mode), for the catch-up.
    pub(crate) fn ordered(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.topics
            .iter()
            .filter(|(_, t)| t.order.as_ref().is_some_and(|o| o.cursor.next_seq().is_some()))
            .map(|(c, _)| *c)
    }

    /// Starts holding `conversation`'s broadcasts for member `key` (a join recovering missed
    /// messages).
    pub(crate) fn start_recovery(&mut self, conversation: Uuid, key: usize) {
        if let Some(m) = self.topics.get_mut(&conversation).and_then(|t| t.members.get_mut(&key)) {
            m.recovering = true;
            self.held.insert((key, conversation), Held::default());
        }
    }

    /// A recovering member's held broadcasts and read, while it still recovers.
    pub(crate) fn held_mut(&mut self, conversation: Uuid, key: usize) -> Option<&mut Held> {
        self.held.get_mut(&(key, conversation))
    }

    /// Ends a member's recovery: its broadcasts go to it directly again; returns what was held.
    pub(crate) fn finish_recovery(&mut self, conversation: Uuid, key: usize) -> Option<Held> {
        let held = self.held.remove(&(key, conversation))?;
        if let Some(m) = self.topics.get_mut(&conversation).and_then(|t| t.members.get_mut(&key)) {
            m.recovering = false;
        }
        Some(held)
    }

    /// After its recovered messages are pushed, member `key` gets broadcasts directly again,
    /// except those at or below `floor` (see [`Held::trailing`]).
    pub(crate) fn trail_recovery(&mut self, conversation: Uuid, key: usize, floor: Uuid) {
        if let Some(m) = self.topics.get_mut(&conversation).and_then(|t| t.members.get_mut(&key)) {
            m.recovering = true;
            self.held.insert((key, conversation), Held { trailing: Some(floor), ..Held::default() });
        }
    }

    /// Marks a member's `presence_state` as pushed: diffs may go to it from now on.
    pub(crate) fn presence_ready(&mut self, conversation: Uuid, key: usize) {
        if let Some(m) = self.topics.get_mut(&conversation).and_then(|t| t.members.get_mut(&key)) {
            m.presence_ready = true;
        }
    }

    /// Whether this core has members of `conversation`.
    pub(crate) fn has_members(&self, conversation: Uuid) -> bool {
        self.topics.contains_key(&conversation)
    }

    /// Queues `[null, null, topic, event, payload]` to every local member of a conversation
    /// (with `presence`, only to those whose state was pushed): encoded once per (serializer,
    /// spelling) present, the bytes shared. Returns the number of members it was queued to.
    pub(crate) fn fan_out(
        &mut self,
        conversation: Uuid,
        event: &str,
        payload: &[u8],
        presence: bool,
        max_outbox_bytes: usize,
    ) -> u64 {
        let Some(topic) = self.topics.get(&conversation) else { return 0 };
        let mut frames: Vec<(Vsn, Rc<str>, Bytes)> = Vec::new();
        let mut delivered = 0;
        let mut caught_up = Vec::new();
        for (key, member) in &topic.members {
            if presence && !member.presence_ready {
                continue;
            }
            if member.recovering && !presence {
                let Some(held) = self.held.get_mut(&(*key, conversation)) else { continue };
                match held.trailing {
                    Some(floor) => match chat::payload_id(payload) {
                        Some(id) if id <= floor => continue, // recovered already
                        _ => caught_up.push(*key),           // delivered below
                    },
                    None => {
                        if held.live.len() >= limits::RECOVERY_HOLD_MAX {
                            held.live = Vec::new();
                            held.overflowed = true;
                        } else if !held.overflowed {
                            held.live.push(Bytes::copy_from_slice(payload));
                        }
                        continue;
                    }
                }
            }
            let vsn = member.conn.vsn();
            let spelling = topic.spelling_of(*key);
            // Spellings are interned per topic: pointer equality is string equality.
            let cached = frames.iter().find(|(v, t, _)| *v == vsn && Rc::ptr_eq(t, spelling));
            let frame = match cached {
                Some((_, _, f)) => f.clone(),
                None => {
                    let msg = Outbound { join_ref: None, reference: None, topic: spelling, event, payload };
                    let f = wire::encode_frame(vsn, &msg);
                    frames.push((vsn, spelling.clone(), f.clone()));
                    f
                }
            };
            member.conn.send(frame, max_outbox_bytes);
            delivered += 1;
        }
        for key in caught_up {
            self.finish_recovery(conversation, key);
        }
        delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One conversation with members `a` and `b`.
    fn two_members() -> (Uuid, Rc<Conn>, Rc<Conn>, LocalTopics) {
        let conversation = Uuid::from_u128(7);
        let (a, b) = (Rc::new(Conn::new(0, 0, -1, 0)), Rc::new(Conn::new(1, 1, -1, 0)));
        let mut topics = LocalTopics::default();
        topics.add_member(conversation, &a, Rc::from("chat:x"));
        topics.add_member(conversation, &b, Rc::from("chat:x"));
        (conversation, a, b, topics)
    }

    /// A recovering member's broadcasts are held up to the bound, then dropped and the
    /// overflow remembered (the join then answers `recovered: false`); other members get
    /// every frame meanwhile.
    #[test]
    fn a_recovering_members_hold_is_bounded() {
        let (conversation, a, b, mut topics) = two_members();
        topics.start_recovery(conversation, a.key);
        for _ in 0..limits::RECOVERY_HOLD_MAX {
            assert_eq!(topics.fan_out(conversation, "new_msg", b"{}", false, usize::MAX), 1, "b only");
        }
        let held = topics.held_mut(conversation, a.key).expect("held");
        assert_eq!((held.live.len(), held.overflowed), (limits::RECOVERY_HOLD_MAX, false));
        topics.fan_out(conversation, "new_msg", b"{}", false, usize::MAX);
        let held = topics.held_mut(conversation, a.key).expect("held");
        assert!(held.live.is_empty() && held.overflowed, "over the bound: dropped, remembered");
        assert!(!a.has_output() && b.has_output(), "nothing reached the recovering member");
        assert!(topics.finish_recovery(conversation, a.key).is_some_and(|h| h.overflowed));
        assert_eq!(topics.fan_out(conversation, "new_msg", b"{}", false, usize::MAX), 2, "both again");
        topics.start_recovery(conversation, a.key);
        topics.remove_member(conversation, a.key);
        assert!(topics.held_mut(conversation, a.key).is_none(), "the hold goes with the membership");
    }

    /// After its recovered messages are pushed, a member gets no broadcast of a message it
    /// recovered (its batch can reach the core after the read saw it), and the first newer one
    /// ends the recovery.
    #[test]
    fn a_recovered_member_gets_no_late_broadcast_of_what_it_recovered() {
        let (conversation, a, _b, mut topics) = two_members();
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
        let payload = |id: Uuid| format!(r#"{{"id":"{id}","content":{{"text":"x"}}}}"#);
        topics.start_recovery(conversation, a.key);
        topics.finish_recovery(conversation, a.key);
        topics.trail_recovery(conversation, a.key, ids[1]);
        for id in &ids[..2] {
            assert_eq!(
                topics.fan_out(conversation, "new_msg", payload(*id).as_bytes(), false, usize::MAX),
                1,
                "b only"
            );
        }
        assert!(!a.has_output(), "nothing the member recovered reached it again");
        assert_eq!(topics.fan_out(conversation, "new_msg", payload(ids[2]).as_bytes(), false, usize::MAX), 2);
        assert!(a.has_output() && topics.held_mut(conversation, a.key).is_none(), "newer: delivered, recovery over");
    }
}
