//! Cross-thread mailboxes into the core runtimes: a bounded lock-free queue plus a wake-up the
//! runtime can await, and the bounded overflow a core keeps when another core's mailbox is
//! full.
//!
//! A crossbeam `ArrayQueue` + a wake fd + a "sleeping" flag moved 55M msg/s between two pinned
//! threads on the project's VM, 2-4x any channel we tried (BENCHMARKS.md, "Measured facts").
//! The wake fd is one end of a Unix socket pair (not an eventfd) so the core can await it with
//! readiness on both monoio drivers. Only the producer that sees the consumer asleep writes a
//! byte; extra bytes only cause a spurious wake. The fences are SeqCst: this is a Dekker-style
//! handshake between "push, then check sleeping" and "set sleeping, then check the queue".

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use uuid::Uuid;

use crate::limits;
use crate::presence::{Meta, PhxRef};
use crate::store::CommitBatch;

/// A connection on a given core: its slab key and its per-core id (keys are reused; ids are
/// not, so a message for a connection that closed never reaches its key's next owner).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct ConnRef {
    pub key: u32,
    pub id: u64,
}

/// What other threads tell a core. Fields are named for what they carry; `conversation` is
/// the topic's id.
#[derive(Debug)]
#[allow(missing_docs)]
pub enum CoreMsg {
    /// From the writer: broadcast the batch's messages, answer the requests made on this core.
    Committed(Arc<CommitBatch>),
    /// To a conversation's owner: a socket on core `from` joined with `meta`; track it and
    /// answer with the full state, to be pushed with `join_ref`.
    Track { conversation: Uuid, user: Uuid, meta: Meta, from: u16, conn: ConnRef, join_ref: Box<str> },
    /// To a conversation's owner: the meta `phx_ref` left (leave, rejoin, close).
    Untrack { conversation: Uuid, user: Uuid, phx_ref: PhxRef },
    /// From the owner to a joiner's core: push `presence_state` (`state`, shared by every
    /// joiner of one presence window) to that socket, if it is still in that join.
    PresenceState { conversation: Uuid, conn: ConnRef, join_ref: Box<str>, state: bytes::Bytes },
    /// From the owner to every core: broadcast `presence_diff` (encoded once for all cores).
    PresenceDiff { conversation: Uuid, diff: Arc<[u8]> },
    /// Graceful shutdown: refuse new sessions, close open sockets spread over the drain time.
    Drain,
    /// A reader's answer to an HTTP request parked on this core: the complete response for the
    /// wait `ticket` (the core's table of parked requests, not a connection key).
    HttpResponse { ticket: u32, bytes: Vec<u8> },
    /// From a reader to the core whose join asked: the messages a rejoin missed, oldest first,
    /// with their ids (`None`: the read failed), for the pending recovery `ticket`.
    Recovered { ticket: usize, messages: Option<Vec<(Uuid, bytes::Bytes)>> },
    /// Cluster, from the Redis subscriber to every core: other nodes' messages of
    /// `conversation` are being received (or Redis is down and the database covers it).
    FabricLive(Uuid),
    /// Cluster, from the Redis subscriber to every core: other nodes' messages, in `seq` order.
    Remote { conversation: Uuid, messages: Arc<[Sequenced]> },
    /// Cluster, from the Redis subscriber to every core: publications are being missed (`true`)
    /// or received again after an outage (`false`).
    FabricDown(bool),
    /// Cluster, from the gap-fill reader to the core that asked: the heads (`seq`,
    /// `inserted_at`) of the conversations `asked` (absent from `heads`: no message yet), or
    /// `None` when the database could not be read.
    Heads { asked: Vec<Uuid>, heads: Option<Vec<crate::store::Head>> },
    /// Cluster, to a conversation's owner: versioned changes of its presence (a publication,
    /// or the answer to this node's own changes).
    PresenceChanges { conversation: Uuid, changes: crate::cluster::presence::Changes },
    /// Cluster, to a conversation's owner: Redis could not take these local changes; they are
    /// applied on this node only until Redis is back.
    PresenceUnapplied { conversation: Uuid, changes: Vec<crate::cluster::presence::Change> },
    /// Cluster, to a conversation's owner: the whole presence at a version (`None`: Redis could
    /// not be read).
    PresenceSnapshot { conversation: Uuid, snapshot: Option<crate::cluster::presence::Changes> },
    /// Cluster, to every core: Redis may lack this node's presence; resync every replica.
    PresenceResync,
    /// From a join proxy thread to the core whose join or history read asked: the verdict for
    /// the wait `ticket`.
    Authorized { ticket: u32, verdict: Result<(), crate::access::Refusal> },
    /// To every core (server API, from this node or another): `user`'s sockets leave
    /// `conversation` (`phx_close`, presence leave) and lose the token's grant of it.
    RemoveMember { conversation: Uuid, user: Uuid },
    /// To every core (server API): close `user`'s sockets ([`crate::close::Close::Disconnected`]).
    Disconnect { user: Uuid },
    /// Cluster, from the gap-fill reader to the core that asked: `conversation`'s messages read
    /// from the database (`None`: the read failed); `full`: the read hit its row limit.
    Filled { conversation: Uuid, messages: Option<Vec<Sequenced>>, full: bool },
}

/// A message with its place in its conversation (cluster mode): what the other nodes publish
/// and gap fills read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequenced {
    /// Its `seq`.
    pub seq: u64,
    /// Its `inserted_at`, µs since the epoch.
    pub inserted_at_us: i64,
    /// Its `new_msg` broadcast payload.
    pub payload: bytes::Bytes,
}

/// The producer side of one core's mailbox (shared by every producer).
#[derive(Debug)]
pub struct Mailbox {
    queue: ArrayQueue<CoreMsg>,
    sleeping: AtomicBool,
    wake: UnixStream,
}

/// The consumer end of the wake-up socket, handed to the core's runtime.
#[derive(Debug)]
pub struct WakeReceiver(pub UnixStream);

impl Mailbox {
    /// A mailbox of `capacity` messages and the receiver the core awaits.
    pub fn new(capacity: usize) -> std::io::Result<(Mailbox, WakeReceiver)> {
        let (tx, rx) = UnixStream::pair()?;
        tx.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        let mailbox = Mailbox { queue: ArrayQueue::new(capacity), sleeping: AtomicBool::new(false), wake: tx };
        Ok((mailbox, WakeReceiver(rx)))
    }

    /// Queues `msg`; gives it back when the mailbox is full (the caller decides how to wait).
    pub fn try_push(&self, msg: CoreMsg) -> Result<(), CoreMsg> {
        self.queue.push(msg)?;
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) && self.sleeping.swap(false, Ordering::SeqCst) {
            // WouldBlock means unread wake bytes are pending: the core will wake anyway.
            match (&self.wake).write(&[1]) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => tracing::error!(error = %e, "mailbox wake-up failed"),
            }
        }
        Ok(())
    }

    /// Queues `msg`, waiting while the mailbox is full. For non-core threads only (the
    /// writer, the readers): a core must never block.
    pub fn push_blocking(&self, mut msg: CoreMsg) {
        let mut pause = limits::MAILBOX_BLOCKING_PAUSE_MIN;
        loop {
            match self.try_push(msg) {
                Ok(()) => return,
                Err(back) => {
                    msg = back;
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(limits::MAILBOX_BLOCKING_PAUSE_MAX);
                }
            }
        }
    }

    /// Messages waiting (for `/metrics`).
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether no message waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Takes the next message (consumer side).
    pub fn pop(&self) -> Option<CoreMsg> {
        self.queue.pop()
    }

    /// Announces that the consumer is about to wait. Returns `false` if a message slipped in,
    /// in which case the consumer must drain again instead of waiting.
    pub fn prepare_sleep(&self) -> bool {
        self.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.queue.is_empty() {
            return true;
        }
        self.sleeping.store(false, Ordering::SeqCst);
        false
    }
}

/// What a core could not put in other cores' mailboxes yet (they were full), kept in order per
/// destination so every path between two cores stays FIFO, and bounded: a core never blocks,
/// so a peer that stops draining must not make it grow without end.
///
/// At `max` queued messages the overflow is *congested* until it drains to half of that. While
/// any core is congested the server refuses new joins (`server busy`): a join is what makes
/// cross-core traffic (the track, then the owner's state and diffs), while leaves and closes,
/// which must never be lost, are bounded by the joins already made. Nothing is ever dropped.
#[derive(Debug)]
pub struct Overflow {
    queues: Vec<VecDeque<CoreMsg>>,
    len: usize,
    max: usize,
    congested: bool,
}

impl Overflow {
    /// Overflow toward `cores` cores, congested from `max` messages.
    pub fn new(cores: usize, max: usize) -> Overflow {
        assert!(max >= 2, "the congestion bound needs room to drain to half of it");
        Overflow { queues: (0..cores).map(|_| VecDeque::new()).collect(), len: 0, max, congested: false }
    }

    /// Sends `msg` to `mailboxes[core]`, or queues it behind what already waits for that core.
    /// Returns `true` when it was queued (the caller must schedule a [`Overflow::retry`]).
    pub fn send(&mut self, mailboxes: &[Mailbox], core: usize, msg: CoreMsg) -> bool {
        let queue = &mut self.queues[core];
        if queue.is_empty() {
            match mailboxes[core].try_push(msg) {
                Ok(()) => return false,
                Err(back) => queue.push_back(back),
            }
        } else {
            queue.push_back(msg);
        }
        self.len += 1;
        true
    }

    /// Moves what fits into the mailboxes, in order. Returns `true` while messages still wait.
    pub fn retry(&mut self, mailboxes: &[Mailbox]) -> bool {
        for (core, queue) in self.queues.iter_mut().enumerate() {
            while let Some(msg) = queue.pop_front() {
                if let Err(back) = mailboxes[core].try_push(msg) {
                    queue.push_front(back);
                    break;
                }
                self.len -= 1;
            }
        }
        debug_assert_eq!(self.len, self.queues.iter().map(VecDeque::len).sum::<usize>());
        self.len > 0
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `Some(now)` when the congestion state just changed: congested at `max` waiting, clear
    /// again at `max / 2` (hysteresis, so the state does not flap at the bound).
    pub fn congestion_changed(&mut self) -> Option<bool> {
        let now = if self.congested { self.len > self.max / 2 } else { self.len >= self.max };
        (now != std::mem::replace(&mut self.congested, now)).then_some(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn batch() -> CoreMsg {
        CoreMsg::Committed(Arc::new(CommitBatch::committed(Vec::new())))
    }

    #[test]
    fn wakes_only_a_sleeper_and_reports_full() {
        let (mb, WakeReceiver(mut rx)) = Mailbox::new(2).expect("mailbox");
        mb.try_push(batch()).expect("room");
        let mut byte = [0u8; 8];
        assert_eq!(rx.read(&mut byte).map_err(|e| e.kind()), Err(ErrorKind::WouldBlock));
        assert!(!mb.prepare_sleep(), "queue not empty: must not sleep");
        assert!(mb.pop().is_some());
        assert!(mb.prepare_sleep());
        mb.try_push(batch()).expect("room");
        assert_eq!(rx.read(&mut byte).expect("woken"), 1);
        mb.try_push(batch()).expect("room");
        assert!(mb.try_push(batch()).is_err(), "full");
    }

    #[test]
    fn overflow_keeps_order_and_reports_congestion() {
        let (mb, _rx) = Mailbox::new(1).expect("mailbox");
        let mailboxes = [mb];
        let mut overflow = Overflow::new(1, 4);
        let drain = |mailboxes: &[Mailbox]| -> Vec<u32> {
            std::iter::from_fn(|| mailboxes[0].pop())
                .map(|m| match m {
                    CoreMsg::HttpResponse { ticket, .. } => ticket,
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        let msg = |ticket| CoreMsg::HttpResponse { ticket, bytes: Vec::new() };
        assert!(!overflow.send(&mailboxes, 0, msg(0)), "room in the mailbox");
        for t in 1..4 {
            assert!(overflow.send(&mailboxes, 0, msg(t)), "mailbox full: queued");
        }
        assert_eq!(overflow.congestion_changed(), None, "3 waiting, bound 4");
        assert!(overflow.send(&mailboxes, 0, msg(4)));
        assert_eq!(overflow.congestion_changed(), Some(true), "at the bound");
        assert_eq!(overflow.congestion_changed(), None, "reported once");
        assert_eq!(drain(&mailboxes), [0]);
        assert!(overflow.retry(&mailboxes), "one moved, three wait");
        assert_eq!(overflow.len(), 3);
        assert_eq!(overflow.congestion_changed(), None, "still above half the bound");
        assert_eq!(drain(&mailboxes), [1]);
        assert!(overflow.retry(&mailboxes));
        assert_eq!(overflow.congestion_changed(), Some(false), "drained to half the bound");
        let mut order = Vec::new();
        while !overflow.is_empty() {
            order.extend(drain(&mailboxes));
            overflow.retry(&mailboxes);
        }
        order.extend(drain(&mailboxes));
        assert_eq!(order, [2, 3, 4], "FIFO per destination");
    }
}
