//! Cross-thread mailboxes into the core runtimes: a bounded lock-free queue plus a wake-up the
//! runtime can await.
//!
//! field-notes §2 measured `ArrayQueue` + a wake fd + a "sleeping" flag at 55M msg/s, 2-4x any
//! channel. The wake fd is one end of a Unix socket pair (not an eventfd) so the core can await
//! it with readiness on both monoio drivers. Only the producer that sees the consumer asleep
//! writes a byte; extra bytes only cause a spurious wake. The fences are SeqCst: this is a
//! Dekker-style handshake between "push, then check sleeping" and "set sleeping, then check
//! the queue".

use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;

use uuid::Uuid;

use crate::presence::{Meta, PhxRef};
use crate::store::CommitBatch;

/// A connection on a given core: its slab key and its per-core id (keys are reused; ids not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnRef {
    /// Slab key on its core.
    pub key: u32,
    /// Per-core connection id.
    pub id: u64,
}

/// What other threads tell a core.
#[derive(Debug)]
pub enum CoreMsg {
    /// A batch from the writer: broadcast its messages, answer its requests from this core.
    Committed(Arc<CommitBatch>),
    /// To a topic's owner: a connection on core `from` joined; add its meta and answer with the
    /// full state.
    Track {
        /// Conversation (topic) id.
        conversation: Uuid,
        /// User id.
        user: Uuid,
        /// The new meta.
        meta: Meta,
        /// Core of the joining connection.
        from: u16,
        /// The joining connection.
        conn: ConnRef,
        /// Its join reference (the state is pushed with it).
        join_ref: Box<str>,
    },
    /// To a topic's owner: a meta left (leave, rejoin, close).
    Untrack {
        /// Conversation (topic) id.
        conversation: Uuid,
        /// User id.
        user: Uuid,
        /// The meta that left.
        phx_ref: PhxRef,
    },
    /// From the owner to the joiner's core: push `presence_state` to that connection.
    PresenceState {
        /// Conversation (topic) id.
        conversation: Uuid,
        /// The joined connection.
        conn: ConnRef,
        /// The join the state belongs to.
        join_ref: Box<str>,
        /// `presence_state` payload (shared by every joiner of one batch window).
        state: bytes::Bytes,
    },
    /// From the owner to every core: broadcast `presence_diff` to local members.
    PresenceDiff {
        /// Conversation (topic) id.
        conversation: Uuid,
        /// `presence_diff` payload, encoded once for all cores.
        diff: Arc<[u8]>,
    },
    /// Graceful shutdown: refuse new sessions, close open sockets spread over the drain time.
    Drain,
    /// The reader's answer to an HTTP request waiting on this core: complete response bytes.
    HttpResponse {
        /// Key of the waiting connection on the core.
        ticket: u32,
        /// The response.
        bytes: Vec<u8>,
    },
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
    /// writer): a core must never block.
    pub fn push_blocking(&self, mut msg: CoreMsg) {
        let mut pause = Duration::from_micros(20);
        loop {
            match self.try_push(msg) {
                Ok(()) => return,
                Err(back) => {
                    msg = back;
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(5));
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn batch() -> CoreMsg {
        CoreMsg::Committed(Arc::new(CommitBatch { messages: Vec::new(), failure: None }))
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
}
