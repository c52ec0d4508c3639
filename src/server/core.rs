//! One core: its listener, its connections, its shard of topic memberships, its mailbox, and
//! the coarse sweep that replaces per-connection timers. Everything here is touched by this
//! core's thread only (`Rc`/`RefCell`, no locks).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use monoio::net::{TcpListener, TcpStream, UnixStream};
use slab::Slab;
use uuid::Uuid;

use super::conn::{Conn, JoinRef, Phase};
use super::metrics::{Counter, Counters, Published};
use super::presence::PresenceShard;
use super::{session, sys, task};
use crate::auth::Verifier;
use crate::bus::{CoreMsg, Mailbox};
use crate::close::Close;
use crate::config::Config;
use crate::phoenix::{self, Vsn};
use crate::store::{CommitBatch, Message, ReaderHandle, StoreHandle};
use crate::{chat, limits};

/// Read-only state every core shares.
pub(crate) struct Shared {
    pub config: Config,
    pub reader: ReaderHandle,
    pub verifier: Verifier,
    pub mailboxes: Vec<Mailbox>,
    /// Open connections over all cores (checked at accept only).
    pub connections: AtomicUsize,
    /// Most connections the descriptor limit allows.
    pub connections_max: usize,
    /// Graceful shutdown started: new sessions are refused, `/healthz` answers 503.
    pub draining: AtomicBool,
    /// Every core's last published counters, for `/metrics`.
    pub published: Published,
}

impl Shared {
    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// One local member of a topic.
pub(crate) struct Member {
    pub conn: Rc<Conn>,
    /// Its presence_state was pushed: presence diffs may follow.
    pub presence_ready: Cell<bool>,
}

/// This core's members of one conversation.
///
/// Frames echo the topic as each client spelled it, and the UUID is case-insensitive, so
/// spellings can differ; almost always they do not. The first member's spelling is the
/// topic's, and only members who spell it differently have an entry in `other_spellings`: a
/// member costs no spelling of its own (16 B less per connection), and a join finds its
/// spelling without scanning the members.
pub(crate) struct Topic {
    pub members: HashMap<usize, Member>,
    pub spelling: Rc<str>,
    pub other_spellings: HashMap<usize, Rc<str>>,
}

impl Topic {
    /// The spelling member `key` uses.
    fn spelling_of(&self, key: usize) -> &Rc<str> {
        if self.other_spellings.is_empty() {
            return &self.spelling;
        }
        self.other_spellings.get(&key).unwrap_or(&self.spelling)
    }
}

/// A `new_msg` waiting for the writer's answer.
pub(crate) struct PendingAck {
    pub conn: Rc<Conn>,
    pub join_ref: JoinRef,
    pub reference: Option<String>,
    pub topic: Rc<str>,
}

/// Per-core state.
pub(crate) struct Core {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub store: StoreHandle,
    pub conns: RefCell<Slab<Rc<Conn>>>,
    pub topics: RefCell<HashMap<Uuid, Topic>>,
    pub acks: RefCell<Slab<PendingAck>>,
    /// HTTP requests waiting for another thread's response.
    pub http_waits: RefCell<Slab<Rc<Conn>>>,
    /// Scratch buffer for `recv`: one per core instead of one per connection.
    pub read_buf: RefCell<Vec<u8>>,
    /// Scratch buffer that coalesces a connection's queued frames into one `send`.
    pub write_buf: RefCell<Vec<u8>>,
    started: Instant,
    now_ms: Cell<u64>,
    next_conn_id: Cell<u64>,
    /// This core itself, for spawning its own helper tasks.
    pub me: Weak<Core>,
    /// Presence of the topics this core owns, and their diffs not yet sent.
    pub presence: RefCell<PresenceShard>,
    /// Messages for other cores whose mailbox was full, retried in order.
    pub outgoing: RefCell<Vec<VecDeque<CoreMsg>>>,
    pub retry_scheduled: Cell<bool>,
    /// This core's counters for `/metrics` (published on every sweep).
    pub counters: Counters,
}

impl Core {
    pub(crate) fn new(id: usize, shared: Arc<Shared>, store: StoreHandle, me: Weak<Core>) -> Core {
        let cores = shared.mailboxes.len();
        Core {
            id,
            shared,
            store,
            conns: RefCell::new(Slab::new()),
            topics: RefCell::new(HashMap::new()),
            acks: RefCell::new(Slab::new()),
            http_waits: RefCell::new(Slab::new()),
            read_buf: RefCell::new(vec![0; limits::READ_CHUNK_BYTES]),
            write_buf: RefCell::new(Vec::new()),
            started: Instant::now(),
            now_ms: Cell::new(0),
            next_conn_id: Cell::new(0),
            me,
            presence: RefCell::new(PresenceShard::new(id as u16)),
            outgoing: RefCell::new((0..cores).map(|_| VecDeque::new()).collect()),
            retry_scheduled: Cell::new(false),
            counters: Counters::default(),
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Coarse core clock in ms, advanced by the sweeper (and at accept).
    pub(crate) fn now_ms(&self) -> u64 {
        self.now_ms.get()
    }

    /// When a connection active now becomes idle. The coarse clock lags real time by up to one
    /// sweep, so one sweep is added: a socket is never closed before `idle_timeout` of silence,
    /// and at most two sweeps after it.
    pub(crate) fn idle_deadline_ms(&self) -> u64 {
        self.now_ms() + (self.config().idle_timeout + limits::SWEEP_INTERVAL).as_millis() as u64
    }

    pub(crate) fn count(&self, c: Counter) {
        self.counters.bump(c);
    }

    /// Copies this core's counters where a scrape on any core can add them up.
    pub(crate) fn publish(&self) {
        self.shared.published.publish(self.id, &self.counters, self.presence.borrow().sizes());
    }

    fn tick(&self) -> u64 {
        let now = self.started.elapsed().as_millis() as u64;
        self.now_ms.set(now);
        now
    }

    /// Runs the core until the process exits.
    pub(crate) async fn run(self: Rc<Self>, listener: TcpListener, wake: UnixStream) {
        monoio::spawn(self.clone().sweep());
        monoio::spawn(self.clone().mailbox(wake));
        self.accept_loop(listener).await;
    }

    async fn accept_loop(self: Rc<Self>, listener: TcpListener) {
        let mut spare = sys::SpareFd::open();
        loop {
            match listener.accept().await {
                Ok((stream, _peer)) => self.admit(stream),
                Err(e) if sys::is_resource_exhaustion(&e) => {
                    let refused = spare.refuse_one(listener.as_raw_fd());
                    if refused {
                        self.count(Counter::RefusedDescriptors);
                    }
                    tracing::warn!(core = self.id, error = %e, refused, "accept: out of descriptors; backing off");
                    monoio::time::sleep(limits::ACCEPT_BACKOFF).await;
                }
                Err(e) => tracing::debug!(core = self.id, error = %e, "accept failed"),
            }
        }
    }

    fn admit(self: &Rc<Self>, stream: TcpStream) {
        let shared = &self.shared;
        // Counted either way; `unregister` gives it back. Over the cap the connection is
        // still served, but only with a 503 and a linger, never upgraded: the client gets an
        // answer instead of a reset.
        let over = shared.connections.fetch_add(1, Ordering::Relaxed) >= shared.connections_max;
        self.count(Counter::Accepted);
        if over {
            self.count(Counter::RefusedCapacity);
            tracing::warn!(core = self.id, max = shared.connections_max, "connection refused: at capacity");
        }
        let _ = stream.set_nodelay(true);
        match sys::into_socket(stream) {
            Ok(socket) => {
                monoio::spawn(task::serve(self.clone(), socket, over));
            }
            Err(e) => {
                tracing::warn!(core = self.id, error = %e, "accepted socket could not be registered");
                shared.connections.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Registers a freshly accepted socket.
    pub(crate) fn register(&self, fd: i32) -> Rc<Conn> {
        let id = self.next_conn_id.get();
        self.next_conn_id.set(id + 1);
        let deadline = self.tick() + limits::HANDSHAKE_TIMEOUT.as_millis() as u64;
        let mut conns = self.conns.borrow_mut();
        let entry = conns.vacant_entry();
        let conn = Rc::new(Conn::new(entry.key(), id, fd, deadline));
        entry.insert(conn.clone());
        conn
    }

    /// Forgets a connection: leaves its channels (presence leaves included), drops it.
    pub(crate) fn unregister(&self, conn: &Rc<Conn>) {
        self.leave_all(conn);
        self.conns.borrow_mut().try_remove(conn.key);
        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// Leaves every channel of a connection (presence leaves included). Called as soon as a
    /// close is decided, so members see the leave without waiting for the close to finish.
    pub(crate) fn leave_all(&self, conn: &Conn) {
        let channels = std::mem::take(&mut *conn.channels.borrow_mut());
        for joined in channels {
            self.remove_member(joined.conversation, conn.key);
            self.untrack(conn.user(), joined.conversation, joined.phx_ref);
        }
    }

    /// Adds `conn` to a topic's local members; returns the interned spelling to store.
    pub(crate) fn add_member(&self, conversation: Uuid, conn: &Rc<Conn>, spelling: &str) -> Rc<str> {
        let mut topics = self.topics.borrow_mut();
        let topic = topics.entry(conversation).or_insert_with(|| Topic {
            members: HashMap::new(),
            spelling: Rc::from(spelling),
            other_spellings: HashMap::new(),
        });
        let interned = if *topic.spelling == *spelling {
            topic.spelling.clone()
        } else {
            let known = topic.other_spellings.values().find(|t| ***t == *spelling).cloned();
            let other = known.unwrap_or_else(|| Rc::from(spelling));
            topic.other_spellings.insert(conn.key, other.clone());
            other
        };
        topic.members.insert(conn.key, Member { conn: conn.clone(), presence_ready: Cell::new(false) });
        interned
    }

    /// Removes a member; frees the topic when it was the last one.
    pub(crate) fn remove_member(&self, conversation: Uuid, key: usize) {
        let mut topics = self.topics.borrow_mut();
        if let Some(topic) = topics.get_mut(&conversation) {
            topic.members.remove(&key);
            topic.other_spellings.remove(&key);
            if topic.members.is_empty() {
                topics.remove(&conversation);
            }
        }
    }

    /// The coarse timer: every [`limits::SWEEP_INTERVAL`], act on connections whose deadline
    /// passed (idle → close 1001; handshake, closing, lingering → drop).
    async fn sweep(self: Rc<Self>) {
        loop {
            monoio::time::sleep(limits::SWEEP_INTERVAL).await;
            let now = self.tick();
            self.publish();
            for (_, conn) in self.conns.borrow().iter() {
                if conn.deadline_ms() > now {
                    continue;
                }
                match conn.phase() {
                    Phase::Open => {
                        conn.request_close(Close::Idle);
                    }
                    Phase::Handshake | Phase::Waiting | Phase::Closing | Phase::Lingering => conn.expire(),
                }
            }
        }
    }

    /// Drains this core's mailbox; sleeps on the wake socket when empty.
    async fn mailbox(self: Rc<Self>, wake: UnixStream) {
        let mailbox = &self.shared.mailboxes[self.id];
        let mut sink = [0u8; 64];
        loop {
            while let Some(msg) = mailbox.pop() {
                match msg {
                    CoreMsg::Committed(batch) => self.on_committed(&batch),
                    CoreMsg::HttpResponse { ticket, bytes } => self.on_http_response(ticket, bytes),
                    CoreMsg::Drain => {
                        monoio::spawn(self.clone().drain());
                    }
                    CoreMsg::Track { conversation, user, meta, from, conn, join_ref } => {
                        self.on_track(conversation, user, meta, from, conn, join_ref)
                    }
                    CoreMsg::Untrack { conversation, user, phx_ref } => self.on_untrack(conversation, user, phx_ref),
                    CoreMsg::PresenceState { conversation, conn, join_ref, state } => {
                        self.on_presence_state(conversation, conn, &join_ref, state)
                    }
                    CoreMsg::PresenceDiff { conversation, diff } => {
                        self.fan_out(conversation, "presence_diff", &diff, true)
                    }
                }
                // Let the woken connections flush before the next batch: a backlog of batches
                // broadcast in one go could push a member that reads fine over its queue limit.
                yield_now().await;
            }
            if !mailbox.prepare_sleep() {
                continue;
            }
            if let Err(e) = wake.readable(false).await {
                tracing::error!(core = self.id, error = %e, "mailbox wait failed");
            }
            while matches!(sys::recv(wake.as_raw_fd(), &mut sink), Ok(n) if n > 0) {}
        }
    }

    /// Graceful shutdown: closes this core's open sockets with 1001 in equal slices over the
    /// drain time, so clients reconnect (elsewhere) spread out instead of all at once.
    async fn drain(self: Rc<Self>) {
        let open: Vec<Rc<Conn>> =
            self.conns.borrow().iter().filter(|(_, c)| c.phase() == Phase::Open).map(|(_, c)| c.clone()).collect();
        let ticks = (self.config().drain.as_millis() / limits::DRAIN_TICK.as_millis()).max(1) as usize;
        tracing::info!(core = self.id, sockets = open.len(), over = ?self.config().drain, "draining");
        // By the end of tick t (of `ticks`), t / ticks of the sockets are closed.
        let mut closed = 0;
        for tick in 1..=ticks {
            monoio::time::sleep(limits::DRAIN_TICK).await;
            let upto = open.len() * tick / ticks;
            for conn in &open[closed..upto] {
                conn.request_close(Close::GoingAway);
            }
            closed = upto;
        }
    }

    fn on_http_response(&self, ticket: u32, bytes: Vec<u8>) {
        let Some(conn) = self.http_waits.borrow_mut().try_remove(ticket as usize) else { return };
        if conn.phase() == Phase::Waiting {
            conn.push_final(Bytes::from(bytes));
            conn.set_phase(Phase::Closing);
            conn.set_deadline_ms(self.now_ms() + limits::CLOSE_LINGER.as_millis() as u64);
        }
    }

    /// Broadcasts a committed batch to local members and answers this core's senders
    /// (broadcast first, then the reply: Phoenix's order).
    fn on_committed(&self, batch: &CommitBatch) {
        for m in &batch.messages {
            if batch.failure.is_none() {
                self.broadcast(&m.message);
            }
            if usize::from(m.origin.core) != self.id {
                continue;
            }
            let Some(ack) = self.acks.borrow_mut().try_remove(m.origin.ticket as usize) else { continue };
            let failed = batch.failure.map(chat::failed_to_save);
            if failed.is_none() {
                self.count(Counter::NewMsgAcked);
            }
            let response = failed.as_deref().unwrap_or(phoenix::EMPTY);
            let (join_ref, reference) = (Some(&*ack.join_ref), ack.reference.as_deref());
            session::reply(self, &ack.conn, join_ref, reference, &ack.topic, failed.is_none(), response);
        }
    }

    fn broadcast(&self, m: &Message) {
        if self.topics.borrow().contains_key(&m.conversation) {
            self.fan_out(m.conversation, chat::NEW_MSG, &chat::new_msg_payload(m), false);
        }
    }

    /// Broadcasts `[null, null, topic, event, payload]` to every local member of a
    /// conversation: encoded once per (serializer, topic spelling) present, the bytes shared.
    pub(crate) fn fan_out(&self, conversation: Uuid, event: &str, payload: &[u8], presence: bool) {
        let topics = self.topics.borrow();
        let Some(topic) = topics.get(&conversation) else { return };
        let mut frames: Vec<(Vsn, Rc<str>, Bytes)> = Vec::new();
        let max = self.config().max_outbox_bytes;
        let mut delivered = 0;
        for (key, member) in &topic.members {
            if presence && !member.presence_ready.get() {
                continue;
            }
            let vsn = member.conn.vsn();
            let spelling = topic.spelling_of(*key);
            // Spellings are interned per topic: pointer equality is string equality.
            let cached = frames.iter().find(|(v, t, _)| *v == vsn && Rc::ptr_eq(t, spelling));
            let frame = match cached {
                Some((_, _, f)) => f.clone(),
                None => {
                    let msg = phoenix::Outbound { join_ref: None, reference: None, topic: spelling, event, payload };
                    let f = phoenix::encode_frame(vsn, &msg);
                    frames.push((vsn, spelling.clone(), f.clone()));
                    f
                }
            };
            member.conn.send(frame, max);
            delivered += 1;
        }
        self.counters.add(Counter::Deliveries, delivered);
    }
}

/// Yields once to the runtime so other ready tasks run.
async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}
