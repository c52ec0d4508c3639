//! Recovery on rejoin: a join with `last_seen_id` gets, after its `presence_state`, every
//! message of the conversation committed after that id, then the live ones, with no gap and
//! no duplicate (docs/protocol.md, "Recovery on rejoin").
//!
//! The member's broadcasts are held from the moment it is a member; the store is read on a
//! reader thread (never on the core), the reply says how many messages were missed, and once
//! the `presence_state` is pushed the recovered messages follow, then the held ones newer than
//! the last recovered and than `last_seen_id` (ids are in commit order within a conversation).
//! The reader can see a commit before the writer has handed that batch to this core, so until a
//! broadcast newer than the last recovered message arrives, older ones are dropped for it
//! ([`crate::server::topics::LocalTopics::trail_recovery`]). When the readers' queue
//! is full (a reconnect storm), reads wait in a bounded per-core backlog. A read that fails, a
//! full backlog, more than `NEXUS_RECOVERY_MAX` missed messages or more than
//! `RECOVERY_HOLD_MAX` (src/limits.rs) held broadcasts all answer `{"recovered":false}`: nothing old
//! is pushed, the held broadcasts are dropped and live ones follow the reply, so the client
//! pages the history API back from its first live message without a gap.

use std::rc::Rc;

use bytes::Bytes;
use uuid::Uuid;

use super::{Conn, Core, CoreMsg, Counter};
use crate::chat::payload_id as id_of;
use crate::phoenix::Outbound;
use crate::presence::PhxRef;
use crate::session::Recovery;
use crate::store::{HistoryJob, HistoryQuery};
use crate::{chat, limits, wire};

/// A recovering join waiting for its read.
pub(crate) struct PendingRecovery {
    conn: Rc<Conn>,
    conversation: Uuid,
    phx_ref: PhxRef,
    recovery: Recovery,
}

impl Core {
    /// Starts holding the member's broadcasts (at once, when it becomes a member).
    pub(super) fn hold_for_recovery(&self, conn: &Conn, conversation: Uuid) {
        self.topics.borrow_mut().start_recovery(conversation, conn.key);
    }

    /// Reads what the member missed; the join is answered when the read is back
    /// ([`CoreMsg::Recovered`]).
    pub(super) fn begin_recovery(&self, conn: &Rc<Conn>, conversation: Uuid, phx_ref: PhxRef, recovery: Recovery) {
        let after = recovery.after;
        let pending = PendingRecovery { conn: conn.clone(), conversation, phx_ref, recovery };
        let ticket = self.recoveries.borrow_mut().insert(pending);
        let (mailboxes, core) = (self.shared.mailboxes.clone(), self.id);
        let reply = Box::new(move |result: Result<crate::store::HistoryPage, _>| {
            let messages = result
                .ok()
                .map(|page| page.messages.iter().map(|m| (m.id, Bytes::from(chat::new_msg_payload(m)))).collect());
            mailboxes[core].push_blocking(CoreMsg::Recovered { ticket, messages });
        });
        // One more than the limit: finding it means too many were missed.
        let limit = self.config().recovery_max + 1;
        let query = HistoryQuery { conversation, before: None, limit, after: Some(after) };
        let job = HistoryJob { query, reply };
        // Behind the reads already waiting, if any, to keep their order.
        let waiting = !self.recovery_backlog.borrow().is_empty();
        let refused = if waiting { Some(job) } else { self.shared.reader.try_submit(job).err() };
        if let Some(job) = refused {
            self.defer_recovery_read(ticket, job);
        }
    }

    /// The readers' queue is full (a reconnect storm): the read waits in this core's bounded
    /// backlog, submitted in order as the readers catch up; over the bound the join is answered
    /// `recovered: false` at once.
    fn defer_recovery_read(&self, ticket: usize, job: HistoryJob) {
        if self.recovery_backlog.borrow().len() >= limits::RECOVERY_BACKLOG_MAX {
            drop(job);
            return self.on_recovered(ticket, None);
        }
        self.recovery_backlog.borrow_mut().push_back(job);
        if !self.recovery_retry.replace(true) {
            if let Some(me) = self.me.upgrade() {
                monoio::spawn(me.drain_recovery_backlog());
            }
        }
    }

    async fn drain_recovery_backlog(self: Rc<Self>) {
        loop {
            monoio::time::sleep(limits::MAILBOX_RETRY).await;
            let mut backlog = self.recovery_backlog.borrow_mut();
            while let Some(job) = backlog.pop_front() {
                if let Err(job) = self.shared.reader.try_submit(job) {
                    backlog.push_front(job);
                    break;
                }
            }
            if backlog.is_empty() {
                self.recovery_retry.set(false);
                return;
            }
        }
    }

    /// The read is back: answer the join (recovered or not) and track its presence; recovered
    /// messages wait for the `presence_state`.
    pub(super) fn on_recovered(&self, ticket: usize, messages: Option<Vec<(Uuid, Bytes)>>) {
        let Some(pending) = self.recoveries.borrow_mut().try_remove(ticket) else { return };
        let PendingRecovery { conn, conversation, phx_ref, recovery } = pending;
        let join_ref = recovery.reply.join_ref.clone();
        if conn.session().joined_topic(conversation, &join_ref).is_none() {
            return; // left or rejoined meanwhile (its hold went with the membership)
        }
        let max = self.config().recovery_max;
        let recovered = {
            let mut topics = self.topics.borrow_mut();
            match (topics.held_mut(conversation, conn.key), messages) {
                (Some(held), Some(messages)) if !held.overflowed && messages.len() <= max => {
                    let n = messages.len();
                    held.missed = Some(messages.into_iter().map(|(_, payload)| payload).collect());
                    held.after = Some(recovery.after);
                    Some(n)
                }
                _ => {
                    topics.finish_recovery(conversation, conn.key);
                    None
                }
            }
        };
        let response = match recovered {
            Some(n) => format!(r#"{{"recovered":true,"missed":{n}}}"#),
            None => {
                self.count(Counter::RecoveriesRefused);
                r#"{"recovered":false}"#.to_string()
            }
        };
        self.count(Counter::Replies);
        conn.send(recovery.reply.ok(conn.vsn(), response.as_bytes()), self.config().max_outbox_bytes);
        self.track(&conn, conversation, &join_ref, phx_ref);
    }

    /// After a recovering member's `presence_state`: pushes what it missed, then what was
    /// held meanwhile (newer than the last recovered message), and lets broadcasts through.
    pub(super) fn finish_recovery(&self, conn: &Conn, conversation: Uuid, topic: &str) {
        let Some(held) = self.topics.borrow_mut().finish_recovery(conversation, conn.key) else { return };
        let Some(missed) = held.missed else { return };
        if held.overflowed {
            // More broadcasts than a join may hold arrived after the reply promised a seamless
            // recovery: rather than a silent gap, the socket is closed as too slow (1013) and
            // the client rejoins from the last message it got.
            return conn.request_close(crate::close::Close::SlowConsumer);
        }
        let max = self.config().max_outbox_bytes;
        let mut pushed = 0;
        for payload in to_push(&missed, &held.live, held.after) {
            let msg = Outbound { join_ref: None, reference: None, topic, event: chat::NEW_MSG, payload };
            conn.send(wire::encode_frame(conn.vsn(), &msg), max);
            pushed += 1;
        }
        // The read may have seen a commit before that batch reached this core: its broadcast
        // can still come, and must not be delivered twice.
        if let Some(floor) = floor(&missed, held.after) {
            self.topics.borrow_mut().trail_recovery(conversation, conn.key, floor);
        }
        self.counters.add(Counter::Deliveries, pushed);
        self.counters.add(Counter::RecoveredMessages, missed.len() as u64);
    }
}

/// The newest message a recovered member has: the last recovered one, else its `last_seen_id`.
fn floor(missed: &[Bytes], after: Option<Uuid>) -> Option<Uuid> {
    missed.last().and_then(|p| id_of(p)).max(after)
}

/// What a recovering member gets after its `presence_state`: the recovered messages, then the
/// held broadcasts newer than the last of them, and newer than the client's `last_seen_id`.
///
/// Ids rise in commit order, so a held broadcast at or below the last recovered message is
/// one the read already had. One at or below `last_seen_id` is one the client saw: every core
/// gets each committed batch, but a core that lags (starved of CPU) may deliver a message the
/// client already had on a socket on another core only after this join, and, when nothing
/// was missed, nothing else would tell it apart.
fn to_push<'a>(missed: &'a [Bytes], live: &'a [Bytes], after: Option<Uuid>) -> impl Iterator<Item = &'a Bytes> {
    let floor = floor(missed, after);
    let newer = live.iter().filter(move |p| match (floor, id_of(p)) {
        (Some(floor), Some(id)) => id > floor,
        _ => true,
    });
    missed.iter().chain(newer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(id: Uuid) -> Bytes {
        Bytes::from(format!(r#"{{"id":"{id}","content":{{"text":"x"}}}}"#))
    }

    #[test]
    fn held_broadcasts_the_client_or_the_read_had_are_not_pushed_again() {
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
        let pushed = |missed: &[usize], live: &[usize], after: Option<usize>| -> Vec<Uuid> {
            let missed: Vec<Bytes> = missed.iter().map(|&i| payload(ids[i])).collect();
            let live: Vec<Bytes> = live.iter().map(|&i| payload(ids[i])).collect();
            to_push(&missed, &live, after.map(|i| ids[i])).filter_map(|p| id_of(p)).collect()
        };
        // Recovered 2 and 3 after 1; held 3 (the read had it) and 4.
        assert_eq!(pushed(&[2, 3], &[3, 4], Some(1)), vec![ids[2], ids[3], ids[4]]);
        // Nothing missed after 2, but a lagging core held 2 (seen) before 3 and 4.
        assert_eq!(pushed(&[], &[2, 3, 4], Some(2)), vec![ids[3], ids[4]]);
        // Nothing missed, nothing seen held: everything held goes.
        assert_eq!(pushed(&[], &[3, 4], Some(2)), vec![ids[3], ids[4]]);
    }

    #[test]
    fn ids_come_from_the_payloads_head() {
        let id = Uuid::now_v7();
        let payload = format!(r#"{{"id":"{id}","content":{{"text":"x"}}}}"#);
        assert_eq!(id_of(payload.as_bytes()), Some(id));
        assert_eq!(id_of(b"{\"id\":\"nope\"}"), None);
        assert_eq!(id_of(b"[]"), None);
    }
}
