//! Cluster mode on one core: every conversation this core has members of is delivered in
//! `seq` order, whichever source brings each message first (this node's writer, another node
//! through Redis, or a read of PostgreSQL), each message once.
//!
//! A conversation's first join on a core watches it (the Redis subscriber subscribes) and
//! waits for its head (the last committed `seq`, read after the subscription is live); only
//! then is the join answered and its presence tracked, so every message committed after the
//! reply reaches the member. Gaps left by lost or late publications are read from the database
//! after `NEXUS_GAP_WAIT_MS`, and a periodic catch-up of every watched conversation's head
//! bounds the delay of a loss nothing else reveals. A sender is acknowledged once its own
//! message has been delivered here (broadcast first, then the reply, as on a single node).

use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use uuid::Uuid;

use super::{Conn, Core, Fabric, Left, WaitingJoin};
use crate::bus::Sequenced;
use crate::cluster::order::Offered;
use crate::server::fabric::TopicOrder;
use crate::store::{CommitBatch, Head};
use crate::{chat, limits};

/// A core's cluster bookkeeping beside its topics.
#[derive(Debug)]
pub(crate) struct ClusterState {
    /// Conversations with messages held behind a gap (checked every tick).
    gappy: HashSet<Uuid>,
    /// Conversations waiting for their head whose request must be made (again).
    unheaded: HashSet<Uuid>,
    /// Redis is down: other nodes' messages come only from the catch-up.
    down: bool,
    /// When the next catch-up is due.
    next_catchup: Instant,
}

impl Default for ClusterState {
    fn default() -> ClusterState {
        ClusterState { gappy: HashSet::new(), unheaded: HashSet::new(), down: false, next_catchup: Instant::now() }
    }
}

impl Core {
    fn fabric(&self) -> &Fabric {
        self.shared.fabric.as_ref().expect("cluster mode")
    }

    /// A join of `conversation` (`new_topic`: the first on this core, which starts watching
    /// it). Returns the join when it can be answered now; otherwise it waits for the head.
    pub(super) fn join_ordered(
        &self,
        fabric: &Fabric,
        conversation: Uuid,
        new_topic: bool,
        join: WaitingJoin,
    ) -> Option<WaitingJoin> {
        let mut topics = self.topics.borrow_mut();
        if new_topic {
            topics.set_order(conversation, TopicOrder::pending(fabric.hold_max));
            if let Err(e) = fabric.subscriber.watch(conversation) {
                // The catch-up covers it until a later join watches again.
                tracing::warn!(core = self.id, %conversation, error = %e, "watch refused; reading the database");
                self.cluster.borrow_mut().unheaded.insert(conversation);
            }
        }
        let Some(order) = topics.order_mut(conversation) else { return Some(join) };
        if order.cursor.next_seq().is_some() {
            return Some(join);
        }
        order.joins.push(join);
        None
    }

    /// A member left: a waiting join of it is dropped; with the last member the conversation
    /// is unwatched and its senders still waiting are answered (their messages are stored).
    pub(super) fn left_ordered(&self, conn: &Conn, conversation: Uuid, left: Left) {
        match left {
            Left::Stays => {
                if let Some(order) = self.topics.borrow_mut().order_mut(conversation) {
                    order.joins.retain(|j| !(j.conn.key == conn.key && j.conn.id == conn.id));
                }
            }
            Left::Freed(order) => {
                let _ = self.fabric().subscriber.unwatch(conversation);
                let mut cluster = self.cluster.borrow_mut();
                cluster.gappy.remove(&conversation);
                cluster.unheaded.remove(&conversation);
                drop(cluster);
                for (_, ticket) in order.map(|o| o.acks).unwrap_or_default() {
                    self.ack(ticket, None);
                }
            }
        }
    }

    /// This node's writer committed a batch: each message goes through its conversation's
    /// order; a sender is answered once its message is delivered here.
    pub(super) fn on_committed_ordered(&self, batch: &CommitBatch) {
        for (i, m) in batch.messages.iter().enumerate() {
            let ticket = self.ticket_of(batch, i);
            let payload = batch.payloads.get(i).filter(|_| batch.failure.is_none());
            let Some(payload) = payload else {
                if let Some(ticket) = ticket {
                    self.ack(ticket, batch.failure);
                }
                continue;
            };
            let (seq, at) = (m.message.seq, m.message.inserted_at_us);
            let ordered = self.deliver_ordered(m.message.conversation, |order, now, out| {
                if let Some(ticket) = ticket {
                    order.acks.push((seq, ticket));
                }
                order.cursor.offer(seq, at, payload.clone(), now, out)
            });
            if !ordered {
                if let Some(ticket) = ticket {
                    self.ack(ticket, None); // no member here any more
                }
            }
        }
    }

    /// Another node's messages.
    pub(super) fn on_remote(&self, conversation: Uuid, messages: &[Sequenced]) {
        self.offer_all(conversation, messages.iter().cloned());
    }

    /// The subscription of `conversation` is live: read its head.
    pub(super) fn on_live(&self, conversation: Uuid) {
        let mut topics = self.topics.borrow_mut();
        let Some(order) = topics.order_mut(conversation) else { return };
        if order.cursor.next_seq().is_some() || order.filling {
            return;
        }
        order.filling = true;
        if !self.fabric().ask_heads(&self.shared.mailboxes, self.id, vec![conversation]) {
            order.filling = false;
            self.cluster.borrow_mut().unheaded.insert(conversation);
        }
    }

    /// Redis went down (`true`) or came back: catch up now, then at the rate that fits; once
    /// back, read every presence replica again.
    pub(super) fn on_fabric_down(&self, down: bool) {
        {
            let mut cluster = self.cluster.borrow_mut();
            cluster.down = down;
            cluster.next_catchup = Instant::now();
        }
        if !down {
            // Presence publications were missed too.
            self.resync_replicas();
        }
    }

    /// Heads read from the database: a waiting conversation starts delivering after its head
    /// (its joins are answered); a delivering one that is behind reads what it missed.
    pub(super) fn on_heads(&self, asked: &[Uuid], heads: Option<Vec<Head>>) {
        let known: Option<HashMap<Uuid, (u64, i64)>> =
            heads.map(|h| h.into_iter().map(|h| (h.conversation, (h.seq, h.at))).collect());
        for &conversation in asked {
            let head = known.as_ref().map(|k| k.get(&conversation).copied().unwrap_or((0, 0)));
            let started = {
                let mut topics = self.topics.borrow_mut();
                let Some(order) = topics.order_mut(conversation) else { continue };
                order.cursor.next_seq().is_some()
            };
            match (started, head) {
                (false, Some(head)) => self.start(conversation, head),
                (false, None) => {
                    if let Some(order) = self.topics.borrow_mut().order_mut(conversation) {
                        order.filling = false;
                    }
                    self.cluster.borrow_mut().unheaded.insert(conversation);
                }
                (true, Some((seq, _))) => self.read_after_if_behind(conversation, seq),
                (true, None) => {}
            }
        }
    }

    /// Starts delivering `conversation` after `head`: answers the joins that waited for it,
    /// then delivers what arrived meanwhile past the head.
    fn start(&self, conversation: Uuid, head: (u64, i64)) {
        let mut out = Vec::new();
        let mut done = Vec::new();
        let (joins, held) = {
            let mut topics = self.topics.borrow_mut();
            let Some(order) = topics.order_mut(conversation) else { return };
            order.filling = false;
            order.cursor.start(head, Instant::now(), &mut out);
            order.settled(&mut done);
            (std::mem::take(&mut order.joins), order.cursor.held() > 0)
        };
        for join in joins {
            self.answer_join(join, conversation);
        }
        self.delivered(conversation, &out, done, held);
    }

    /// A database read of `conversation`'s messages came back.
    pub(super) fn on_filled(&self, conversation: Uuid, messages: Option<Vec<Sequenced>>, full: bool) {
        if let Some(order) = self.topics.borrow_mut().order_mut(conversation) {
            order.filling = false;
        }
        let Some(messages) = messages else { return }; // asked again at the next check
        let before = self.delivered_seq(conversation);
        self.offer_all(conversation, messages.into_iter());
        if let (Some(before), Some(after)) = (before, self.delivered_seq(conversation)) {
            self.fabric().stats.catchup_rows.fetch_add(after.saturating_sub(before), Ordering::Relaxed);
        }
        if full {
            self.read_after(conversation);
        }
    }

    fn delivered_seq(&self, conversation: Uuid) -> Option<u64> {
        let mut topics = self.topics.borrow_mut();
        Some(topics.order_mut(conversation)?.cursor.delivered()?.0)
    }

    /// Offers messages of one source (in `seq` order) to `conversation`'s order.
    fn offer_all(&self, conversation: Uuid, messages: impl Iterator<Item = Sequenced>) {
        let mut overflowed = false;
        self.deliver_ordered(conversation, |order, now, out| {
            let mut last = Offered::Repeat;
            for m in messages {
                last = order.cursor.offer(m.seq, m.inserted_at_us, m.payload, now, out);
                overflowed |= last == Offered::Overflow;
            }
            if overflowed {
                Offered::Overflow
            } else {
                last
            }
        });
    }

    /// Runs one offering `step` on `conversation`'s order, then broadcasts what became
    /// deliverable and answers the senders it settled. Returns `false` when this core has no
    /// member of the conversation.
    fn deliver_ordered(
        &self,
        conversation: Uuid,
        step: impl FnOnce(&mut TopicOrder, Instant, &mut Vec<Bytes>) -> Offered,
    ) -> bool {
        let mut out = Vec::new();
        let mut done = Vec::new();
        let (offered, held) = {
            let mut topics = self.topics.borrow_mut();
            let Some(order) = topics.order_mut(conversation) else { return false };
            let offered = step(order, Instant::now(), &mut out);
            order.settled(&mut done);
            (offered, order.cursor.held() > 0)
        };
        self.delivered(conversation, &out, done, held);
        if offered == Offered::Overflow {
            // The hold is cleared: read from the last delivered message on.
            self.read_after(conversation);
        }
        true
    }

    /// Broadcasts `out` (in order), then answers the settled senders; notes a gap to check.
    fn delivered(&self, conversation: Uuid, out: &[Bytes], done: Vec<usize>, held: bool) {
        for payload in out {
            self.fan_out(conversation, chat::NEW_MSG, payload, false);
        }
        for ticket in done {
            self.ack(ticket, None);
        }
        if held {
            self.cluster.borrow_mut().gappy.insert(conversation);
        }
    }

    /// Reads what follows the last delivered message when the head `seq` is past it.
    fn read_after_if_behind(&self, conversation: Uuid, head_seq: u64) {
        if self.delivered_seq(conversation).is_some_and(|delivered| head_seq > delivered) {
            self.read_after(conversation);
        }
    }

    /// Reads up to [`limits::FILL_ROWS_MAX`] messages after the last delivered one (unless a
    /// read is in flight).
    fn read_after(&self, conversation: Uuid) {
        let mut topics = self.topics.borrow_mut();
        let Some(order) = topics.order_mut(conversation) else { return };
        let Some((_, at)) = order.cursor.delivered() else { return };
        if order.filling {
            return;
        }
        let fabric = self.fabric();
        if fabric.ask_range(&self.shared.mailboxes, self.id, conversation, at, None, limits::FILL_ROWS_MAX) {
            order.filling = true;
            fabric.stats.gap_fills.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reads the gap before `conversation`'s held messages once it has been open for
    /// `NEXUS_GAP_WAIT_MS`.
    fn check_gap(&self, conversation: Uuid, now: Instant) {
        let fabric = self.fabric();
        let mut topics = self.topics.borrow_mut();
        let order = topics.order_mut(conversation);
        let Some(order) = order.filter(|o| o.cursor.held() > 0) else {
            self.cluster.borrow_mut().gappy.remove(&conversation);
            return;
        };
        if order.filling {
            return;
        }
        let Some(fill) = order.cursor.gap_due(now, fabric.gap_wait) else { return };
        order.cursor.gap_asked(now);
        let missing = fill.before.0.saturating_sub(fill.after.0 + 1);
        let limit = usize::try_from(missing).unwrap_or(usize::MAX).clamp(1, limits::FILL_ROWS_MAX);
        let (after, before) = (fill.after.1, Some(fill.before.1));
        if fabric.ask_range(&self.shared.mailboxes, self.id, conversation, after, before, limit) {
            order.filling = true;
            fabric.stats.gap_fills.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The cluster timer: gap checks, head requests to retry, and the periodic catch-up.
    pub(super) async fn fabric_ticker(self: Rc<Self>) {
        let fabric = self.fabric();
        let tick = (fabric.gap_wait / 2).clamp(Duration::from_millis(5), Duration::from_millis(100));
        let catchup = fabric.catchup;
        loop {
            monoio::time::sleep(tick).await;
            let now = Instant::now();
            let gappy: Vec<Uuid> = self.cluster.borrow().gappy.iter().copied().collect();
            for conversation in gappy {
                self.check_gap(conversation, now);
            }
            let due = {
                let mut cluster = self.cluster.borrow_mut();
                let due = now >= cluster.next_catchup;
                if due {
                    cluster.next_catchup = now + if cluster.down { limits::CATCHUP_DOWN } else { catchup };
                }
                due
            };
            if due {
                // Heads that could not be read (database down, reader busy) are asked again
                // at the catch-up's pace, not every tick.
                let unheaded: Vec<Uuid> = self.cluster.borrow_mut().unheaded.drain().collect();
                for conversation in unheaded {
                    self.on_live(conversation);
                }
                self.catch_up();
            }
        }
    }

    /// Asks for the heads of every delivering conversation (a head past what was delivered
    /// means a publication was lost).
    fn catch_up(&self) {
        let conversations: Vec<Uuid> = self.topics.borrow().ordered().collect();
        for chunk in conversations.chunks(limits::CATCHUP_HEADS_MAX) {
            if !self.fabric().ask_heads(&self.shared.mailboxes, self.id, chunk.to_vec()) {
                return; // the reader is busy: the next catch-up asks again
            }
        }
    }
}
