//! Presence across cores: the owner core of a topic (`channel::owner_core`) holds its
//! presence table and is the single source of its diffs; joiners' cores ask it to track and
//! untrack, receive the full state for the joiner, and fan each diff out to local members
//! (design.md "Presence path"). Diffs of one topic are coalesced over
//! `NEXUS_PRESENCE_BATCH_MS` into one `presence_diff`, so a join storm of N users costs O(N)
//! diff frames per member instead of O(N) per join.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use uuid::Uuid;

use super::conn::Conn;
use super::core::Core;
use crate::bus::{ConnRef, CoreMsg};
use crate::channel;
use crate::ids;
use crate::phoenix::{self, Outbound};
use crate::presence::{Diff, Meta, PhxRef, RefMaker, TopicPresence};
use crate::ws;

/// Presence state of the topics one core owns.
pub(crate) struct PresenceShard {
    refs: RefMaker,
    topics: HashMap<Uuid, TopicPresence>,
    /// Diffs not yet sent, per topic.
    pending: HashMap<Uuid, Diff>,
    /// Joiners waiting for a state, per topic: one state encoding serves every joiner of a
    /// batch window (a join storm would otherwise encode O(N) states of O(N) metas).
    waiting: HashMap<Uuid, Vec<(u16, ConnRef, Box<str>)>>,
    flush_scheduled: bool,
}

impl PresenceShard {
    /// Topics this core owns the presence of, and their metas (for `/metrics`).
    pub(crate) fn sizes(&self) -> (usize, usize) {
        (self.topics.len(), self.topics.values().map(TopicPresence::len).sum())
    }

    pub(crate) fn new(core: u16) -> PresenceShard {
        PresenceShard {
            refs: RefMaker::new(core),
            topics: HashMap::new(),
            pending: HashMap::new(),
            waiting: HashMap::new(),
            flush_scheduled: false,
        }
    }
}

impl Core {
    fn owner(&self, conversation: Uuid) -> usize {
        channel::owner_core(conversation, self.shared.mailboxes.len())
    }

    /// Starts tracking a fresh join of `conn`; returns its `phx_ref`.
    pub(crate) fn track(&self, conn: &Conn, conversation: Uuid, join_ref: &str) -> PhxRef {
        let phx_ref = self.presence.borrow_mut().refs.make();
        let meta = Meta::new(phx_ref, ids::now_micros());
        let msg = CoreMsg::Track {
            conversation,
            user: conn.user(),
            meta,
            from: self.id as u16,
            conn: ConnRef { key: conn.key as u32, id: conn.id },
            join_ref: join_ref.into(),
        };
        self.send_to(self.owner(conversation), msg);
        phx_ref
    }

    /// Stops tracking a join (leave, rejoin, close).
    pub(crate) fn untrack(&self, user: Uuid, conversation: Uuid, phx_ref: PhxRef) {
        self.send_to(self.owner(conversation), CoreMsg::Untrack { conversation, user, phx_ref });
    }

    /// Owner: add the meta, queue the joiner for the full state and the diff (both go out at
    /// the end of the batch window: the state first).
    pub(crate) fn on_track(
        &self,
        conversation: Uuid,
        user: Uuid,
        meta: Meta,
        from: u16,
        conn: ConnRef,
        join_ref: Box<str>,
    ) {
        {
            let mut shard = self.presence.borrow_mut();
            shard.topics.entry(conversation).or_default().track(user, meta);
            shard.waiting.entry(conversation).or_default().push((from, conn, join_ref));
        }
        self.queue_diff(conversation, |d| d.join(user, meta));
    }

    /// Owner: remove the meta (freeing the topic's table with its last meta), queue the diff.
    pub(crate) fn on_untrack(&self, conversation: Uuid, user: Uuid, phx_ref: PhxRef) {
        let left = {
            let mut shard = self.presence.borrow_mut();
            let Some(topic) = shard.topics.get_mut(&conversation) else { return };
            let left = topic.untrack(user, &phx_ref);
            if topic.is_empty() {
                shard.topics.remove(&conversation);
            }
            left
        };
        if let Some(meta) = left {
            self.queue_diff(conversation, |d| d.leave(user, meta));
        }
    }

    /// Joiner's core: push `presence_state` if the connection is still in that join.
    pub(crate) fn on_presence_state(&self, conversation: Uuid, conn: ConnRef, join_ref: &str, state: Bytes) {
        let Some(target) = self.conns.borrow().get(conn.key as usize).filter(|c| c.id == conn.id).cloned() else {
            return;
        };
        let topic = {
            let channels = target.channels.borrow();
            let joined = channels.iter().find(|j| j.conversation == conversation && &*j.join_ref == join_ref);
            let Some(joined) = joined else { return };
            joined.topic.clone()
        };
        let msg = Outbound {
            join_ref: Some(join_ref),
            reference: None,
            topic: &topic,
            event: "presence_state",
            payload: b"",
        };
        // A big room's state is ~110 B per meta; every joiner of a window shares its bytes.
        let (before, after) = phoenix::encode_around(target.vsn(), &msg);
        let mut head = Vec::with_capacity(before.len() + 10);
        ws::text_header(before.len() + state.len() + after.len(), &mut head);
        head.extend_from_slice(&before);
        target.send_parts([Bytes::from(head), state, Bytes::from(after)], self.config().max_outbox_bytes);
        if let Some(m) = self.topics.borrow().get(&conversation).and_then(|t| t.members.get(&(conn.key as usize))) {
            m.presence_ready.set(true);
        }
    }

    fn queue_diff(&self, conversation: Uuid, change: impl FnOnce(&mut Diff)) {
        let window = self.config().presence_batch;
        let schedule = {
            let mut shard = self.presence.borrow_mut();
            change(shard.pending.entry(conversation).or_default());
            !std::mem::replace(&mut shard.flush_scheduled, true)
        };
        if window.is_zero() {
            self.flush_diffs();
        } else if schedule {
            if let Some(me) = self.me.upgrade() {
                monoio::spawn(async move {
                    monoio::time::sleep(window).await;
                    me.flush_diffs();
                });
            }
        }
    }

    /// Sends the states the joiners wait for, then every pending diff to every core (each fans
    /// it out to its local members). Per core the state arrives before the diff.
    fn flush_diffs(&self) {
        let (pending, waiting) = {
            let mut shard = self.presence.borrow_mut();
            shard.flush_scheduled = false;
            (std::mem::take(&mut shard.pending), std::mem::take(&mut shard.waiting))
        };
        for (conversation, joiners) in waiting {
            let state = match self.presence.borrow().topics.get(&conversation) {
                Some(topic) => Bytes::from(topic.state_json()),
                None => Bytes::from_static(b"{}"),
            };
            for (from, conn, join_ref) in joiners {
                let msg = CoreMsg::PresenceState { conversation, conn, join_ref, state: state.clone() };
                self.send_to(usize::from(from), msg);
            }
        }
        for (conversation, diff) in pending {
            if diff.is_empty() {
                continue;
            }
            let bytes: Arc<[u8]> = diff.to_json().into();
            for core in 0..self.shared.mailboxes.len() {
                self.send_to(core, CoreMsg::PresenceDiff { conversation, diff: bytes.clone() });
            }
        }
    }

    /// Queues a message for a core (this one included, through its own mailbox, so every
    /// path has one order). A full mailbox never blocks a core: the message waits in an
    /// ordered overflow queue that a retry task drains.
    pub(crate) fn send_to(&self, core: usize, msg: CoreMsg) {
        let mut outgoing = self.outgoing.borrow_mut();
        let queue = &mut outgoing[core];
        if queue.is_empty() {
            match self.shared.mailboxes[core].try_push(msg) {
                Ok(()) => return,
                Err(back) => queue.push_back(back),
            }
        } else {
            queue.push_back(msg);
        }
        drop(outgoing);
        if !self.retry_scheduled.replace(true) {
            if let Some(me) = self.me.upgrade() {
                monoio::spawn(me.retry_outgoing());
            }
        }
    }

    async fn retry_outgoing(self: Rc<Self>) {
        loop {
            monoio::time::sleep(crate::limits::MAILBOX_RETRY).await;
            let mut outgoing = self.outgoing.borrow_mut();
            for (core, queue) in outgoing.iter_mut().enumerate() {
                while let Some(msg) = queue.pop_front() {
                    if let Err(back) = self.shared.mailboxes[core].try_push(msg) {
                        queue.push_front(back);
                        break;
                    }
                }
            }
            if outgoing.iter().all(|q| q.is_empty()) {
                self.retry_scheduled.set(false);
                return;
            }
        }
    }
}
