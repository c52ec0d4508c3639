//! A connection's state shared between its task and the rest of its core (the broadcaster,
//! the sweeper, pending acknowledgements). Small on purpose: it is most of what an idle
//! connection costs.

use std::cell::{Cell, Ref, RefCell, RefMut};
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::task::Waker;

use bytes::Bytes;
use uuid::Uuid;

use crate::close::Close;
use crate::phoenix::Vsn;
use crate::session::Session;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Reading the HTTP request head.
    Handshake,
    /// HTTP request handed to another thread; waiting for the response.
    Waiting,
    /// WebSocket open.
    Open,
    /// Flushing the last bytes (an HTTP answer or a close frame); input is discarded.
    Closing,
    /// Our side is shut down; draining the client's input until it closes or time runs out.
    Lingering,
}

/// Whether a connection's task reads and handles the client's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reading {
    /// As usual.
    On,
    /// A join waits for the join proxy: nothing more is read or handled until its answer.
    Paused,
    /// The answer came: handle what was read meanwhile, then read on.
    Resumed,
}

thread_local! {
    /// Bytes queued in every outbox of this core (a core is one thread and its connections
    /// never leave it), published as `nexus_outbox_bytes`.
    static CORE_OUTBOX_BYTES: Cell<usize> = const { Cell::new(0) };
}

/// Bytes queued in the outboxes of the calling core's connections.
pub(crate) fn core_outbox_bytes() -> usize {
    CORE_OUTBOX_BYTES.with(Cell::get)
}

/// Shared per-connection state.
pub(crate) struct Conn {
    /// Key in the core's connection slab (also the member key in topics).
    pub key: usize,
    /// Per-core sequence number, for logs.
    pub id: u64,
    /// Socket descriptor (owned by the task's stream).
    pub fd: RawFd,
    /// The Phoenix protocol state (user, serializer, channels, budget); a placeholder until
    /// the upgrade. Borrowed mutably only while it decides one message (a pure call), so the
    /// shared borrows below never conflict.
    session: RefCell<Session>,
    phase: Cell<Phase>,
    /// Core clock (ms) after which the sweeper acts on this connection.
    deadline_ms: Cell<u64>,
    /// Set by the sweeper when a closing/handshaking connection ran out of time.
    expired: Cell<bool>,
    /// Whether the task reads the client's messages (paused while a join waits for the join
    /// proxy, as a Phoenix socket waits for its channel's join).
    reading: Cell<Reading>,
    close: Cell<Option<Close>>,
    outbox: RefCell<VecDeque<Bytes>>,
    outbox_bytes: Cell<usize>,
    waker: Cell<Option<Waker>>,
}

impl Conn {
    pub(crate) fn new(key: usize, id: u64, fd: RawFd, deadline_ms: u64) -> Conn {
        Conn {
            key,
            id,
            fd,
            session: RefCell::new(Session::new(Uuid::nil(), Vsn::V2)),
            phase: Cell::new(Phase::Handshake),
            deadline_ms: Cell::new(deadline_ms),
            expired: Cell::new(false),
            reading: Cell::new(Reading::On),
            close: Cell::new(None),
            outbox: RefCell::new(VecDeque::new()),
            outbox_bytes: Cell::new(0),
            waker: Cell::new(None),
        }
    }

    pub(crate) fn user(&self) -> Uuid {
        self.session.borrow().user()
    }

    pub(crate) fn vsn(&self) -> Vsn {
        self.session.borrow().vsn()
    }

    pub(crate) fn session(&self) -> Ref<'_, Session> {
        self.session.borrow()
    }

    pub(crate) fn session_mut(&self) -> RefMut<'_, Session> {
        self.session.borrow_mut()
    }

    pub(crate) fn phase(&self) -> Phase {
        self.phase.get()
    }

    /// Switches to [`Phase::Open`] for `user` speaking `vsn`.
    pub(crate) fn open(&self, user: Uuid, vsn: Vsn) {
        debug_assert_eq!(self.phase.get(), Phase::Handshake, "a connection opens once");
        *self.session.borrow_mut() = Session::new(user, vsn);
        self.phase.set(Phase::Open);
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        self.phase.set(phase);
    }

    pub(crate) fn deadline_ms(&self) -> u64 {
        self.deadline_ms.get()
    }

    pub(crate) fn set_deadline_ms(&self, ms: u64) {
        self.deadline_ms.set(ms);
    }

    /// Marks the connection as out of time and wakes its task (sweeper).
    pub(crate) fn expire(&self) {
        self.expired.set(true);
        self.wake();
    }

    pub(crate) fn expired(&self) -> bool {
        self.expired.get()
    }

    /// Stops handling the client's messages until [`Conn::resume`].
    pub(crate) fn pause(&self) {
        self.reading.set(Reading::Paused);
    }

    /// Handles the client's messages again (and what was read while paused).
    pub(crate) fn resume(&self) {
        if self.reading.get() == Reading::Paused {
            self.reading.set(Reading::Resumed);
            self.wake();
        }
    }

    pub(crate) fn paused(&self) -> bool {
        self.reading.get() == Reading::Paused
    }

    /// Whether the connection was just resumed (then it reads as usual again).
    pub(crate) fn take_resumed(&self) -> bool {
        let resumed = self.reading.get() == Reading::Resumed;
        if resumed {
            self.reading.set(Reading::On);
        }
        resumed
    }

    /// Whether the task must stop handling the bytes it read: a close is requested, time ran
    /// out, or a join waits for its answer.
    pub(crate) fn stop_reading(&self) -> bool {
        self.close_requested() || self.paused()
    }

    /// Whether a close is requested or time ran out (what was read is then discarded).
    pub(crate) fn close_requested(&self) -> bool {
        self.close.get().is_some() || self.expired.get()
    }

    /// Asks the task to close the socket for `why` (first reason wins).
    pub(crate) fn request_close(&self, why: Close) {
        if self.close.get().is_none() {
            self.close.set(Some(why));
            self.wake();
        }
    }

    /// Takes a pending close request.
    pub(crate) fn take_close(&self) -> Option<Close> {
        self.close.take()
    }

    /// Whether a close was requested or already handled.
    pub(crate) fn closing(&self) -> bool {
        self.close.get().is_some() || matches!(self.phase.get(), Phase::Closing | Phase::Lingering)
    }

    /// Queues one complete frame. Over `max_bytes` queued, the connection is a slow
    /// consumer: its queue is dropped and it is closed with 1013.
    pub(crate) fn send(&self, frame: Bytes, max_bytes: usize) {
        self.send_parts([frame], max_bytes);
    }

    /// Queues one frame given as consecutive pieces (a large shared payload between small
    /// per-connection pieces), with the same limit as [`Conn::send`].
    pub(crate) fn send_parts<const N: usize>(&self, parts: [Bytes; N], max_bytes: usize) {
        if self.closing() {
            return;
        }
        // One frame larger than the limit (a big room's presence_state) may still go to a
        // connection that is keeping up; only a backlog on top of it counts as slow.
        let queued = self.outbox_bytes.get();
        let len: usize = parts.iter().map(Bytes::len).sum();
        if queued > 0 && queued + len > max_bytes {
            self.clear_outbox();
            self.request_close(Close::SlowConsumer);
            return;
        }
        for part in parts {
            self.push_final(part);
        }
    }

    /// Queues bytes the task itself must send even while closing (an HTTP answer, the close
    /// frame); no limit applies.
    pub(crate) fn push_final(&self, frame: Bytes) {
        self.set_outbox_bytes(self.outbox_bytes.get() + frame.len());
        self.outbox.borrow_mut().push_back(frame);
        self.wake();
    }

    /// Drops everything queued.
    pub(crate) fn clear_outbox(&self) {
        *self.outbox.borrow_mut() = VecDeque::new();
        self.set_outbox_bytes(0);
    }

    /// Sets this connection's queued byte count and moves the core's total by the difference.
    fn set_outbox_bytes(&self, bytes: usize) {
        let before = self.outbox_bytes.replace(bytes);
        CORE_OUTBOX_BYTES.with(|total| total.set(total.get() - before + bytes));
    }

    /// Whether frames are queued.
    pub(crate) fn has_output(&self) -> bool {
        self.outbox_bytes.get() > 0
    }

    /// Whether the task has something to act on besides socket readiness.
    pub(crate) fn has_work(&self, write_blocked: bool) -> bool {
        self.close.get().is_some()
            || self.expired.get()
            || self.reading.get() == Reading::Resumed
            || (!write_blocked && self.has_output())
    }

    /// Moves queued frames into `out` until it holds at least `limit` bytes; returns the count.
    pub(crate) fn drain_outbox_into(&self, out: &mut Vec<u8>, limit: usize) -> usize {
        let mut outbox = self.outbox.borrow_mut();
        let mut moved = 0;
        while out.len() < limit {
            let Some(frame) = outbox.pop_front() else { break };
            out.extend_from_slice(&frame);
            moved += frame.len();
        }
        self.set_outbox_bytes(self.outbox_bytes.get() - moved);
        if outbox.is_empty() {
            // Idle connections hold no queue memory (even four slots are 128 B per connection);
            // the next burst allocates again, once per flush.
            *outbox = VecDeque::new();
        }
        moved
    }

    pub(crate) fn set_waker(&self, waker: &Waker) {
        let current = self.waker.take();
        match current {
            Some(w) if w.will_wake(waker) => self.waker.set(Some(w)),
            _ => self.waker.set(Some(waker.clone())),
        }
    }

    fn wake(&self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

impl Drop for Conn {
    /// What a closed connection still had queued leaves the core's total.
    fn drop(&mut self) {
        self.set_outbox_bytes(0);
    }
}
