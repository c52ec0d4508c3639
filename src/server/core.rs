//! One core: its listener, its connections, its members of each conversation, the presence of
//! the conversations it owns, its mailbox, and the coarse sweep that replaces per-connection
//! timers. Everything here is touched by this core's thread only (`Rc`/`RefCell`, no locks).
//!
//! The state is private; the methods are the entry points the rest of the server uses:
//! connections come and go through [`Core::register`]/[`Core::unregister`], sessions act through
//! [`Core::join_channel`], [`Core::leave_channel`] and [`Core::submit`], other threads through
//! the mailbox ([`CoreMsg`]), and everything bound for another core through [`Core::send_to`].
//!
//! Borrow rules: every `RefCell` here is borrowed for one short, synchronous step and never
//! across an `.await`. The one long borrow is the read buffer ([`Core::read_buf`]), held while
//! the frames just read are handled: nothing a frame handler calls may read from a socket.

use std::cell::{Cell, RefCell, RefMut};
use std::os::fd::AsRawFd;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use monoio::net::{TcpListener, TcpStream, UnixStream};
use slab::Slab;
use uuid::Uuid;

use super::conn::{Conn, Phase};
use super::fabric::{Fabric, WaitingJoin};
use super::topics::{Left, LocalTopics};
use super::{sys, task};
use crate::access::Access;
use crate::bus::{ConnRef, CoreMsg, Mailbox, Overflow};
use crate::close::Close;
use crate::config::Config;
use crate::http::response;
use crate::metrics::{Counter, Counters, Gauges, Published};
use crate::presence::{Meta, PhxRef, PresenceShard, RefMaker};
use crate::session::{Effect, Env, Limits, ReplyTo, Session};
use crate::store::{
    CommitBatch, HistoryError, HistoryJob, HistoryPage, HistoryQuery, InsertRequest, Origin, ReaderHandle, StoreHandle,
};
use crate::{channel, chat, ids, limits, wire};

mod access;
mod cluster;
mod recovery;
mod replica;

/// Read-only state every core shares (plus atomics for the few process-wide facts).
pub(crate) struct Shared {
    pub config: Config,
    pub reader: ReaderHandle,
    /// The join policy (and the token verifier).
    pub access: Access,
    pub mailboxes: Arc<[Mailbox]>,
    /// Cluster mode's threads; `None` on a single node.
    pub fabric: Option<Fabric>,
    /// Open connections over all cores (checked at accept only).
    pub connections: AtomicUsize,
    /// Most connections the descriptor limit allows.
    pub connections_max: usize,
    /// Graceful shutdown started: new sessions are refused, `/healthz` answers 503.
    pub draining: AtomicBool,
    /// Cores whose overflow toward other cores is congested ([`Overflow`]): while any is, new
    /// joins are refused.
    pub congested_cores: AtomicUsize,
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

    fn joins_refused(&self) -> bool {
        self.congested_cores.load(Ordering::Relaxed) > 0
    }
}

/// A message waiting for the writer's answer.
struct PendingAck {
    conn: Rc<Conn>,
    to: AckTo,
}

/// Who is answered when a message is committed.
enum AckTo {
    /// A `new_msg` push: its reply.
    Socket(ReplyTo),
    /// A server API post: 201 with the stored message (known once the batch is here).
    Http { stored: Option<Bytes> },
}

/// A socket waiting for its `presence_state` from a conversation's owner.
#[derive(Debug)]
struct Joiner {
    core: u16,
    conn: ConnRef,
    join_ref: Box<str>,
}

/// Per-core state.
pub(crate) struct Core {
    id: usize,
    shared: Arc<Shared>,
    store: StoreHandle,
    /// This core itself, for spawning its own helper tasks.
    me: Weak<Core>,
    started: Instant,
    /// Coarse clock (ms since `started`), advanced by the sweeper and at accept.
    now_ms: Cell<u64>,
    next_conn_id: Cell<u64>,
    conns: RefCell<Slab<Rc<Conn>>>,
    topics: RefCell<LocalTopics>,
    acks: RefCell<Slab<PendingAck>>,
    /// HTTP requests waiting for another thread's response.
    http_waits: RefCell<Slab<Rc<Conn>>>,
    /// Scratch buffer for `recv`: one per core instead of one per connection.
    read_buf: RefCell<Vec<u8>>,
    /// Scratch buffer that coalesces a connection's queued frames into one `send`.
    write_buf: RefCell<Vec<u8>>,
    /// Scratch list of a session's effects, reused for every message.
    effects: RefCell<Vec<Effect>>,
    /// Makes this core's presence refs unique.
    refs: RefCell<RefMaker>,
    /// Presence of the conversations this core owns.
    presence: RefCell<PresenceShard<Joiner>>,
    /// A presence flush is scheduled.
    presence_flush: Cell<bool>,
    /// When each conversation's presence last changed or was flushed (kept while it is not
    /// quiet): a change soon after either waits for the scheduled flush; otherwise it flushes
    /// at once.
    presence_activity: RefCell<std::collections::HashMap<Uuid, Instant>>,
    /// Messages for other cores whose mailbox was full, retried in order.
    overflow: RefCell<Overflow>,
    retry_scheduled: Cell<bool>,
    /// This core's counters for `/metrics` (published on every sweep).
    counters: Counters,
    /// Cluster mode's per-core bookkeeping (unused on a single node).
    cluster: RefCell<cluster::ClusterState>,
    /// Cluster mode: replicas of the cluster-wide presence of the conversations this core owns.
    replicas: RefCell<std::collections::HashMap<Uuid, replica::Replica>>,
    /// Joins recovering missed messages, waiting for their read.
    recoveries: RefCell<Slab<recovery::PendingRecovery>>,
    /// Recovery reads waiting for room in the readers' queue, in order.
    recovery_backlog: RefCell<std::collections::VecDeque<crate::store::HistoryJob>>,
    recovery_retry: Cell<bool>,
    /// The `token` policy: the conversations each socket's token grants, by connection key
    /// (only sockets whose token grants any: nothing per connection otherwise).
    grants: RefCell<std::collections::HashMap<usize, Box<[Uuid]>>>,
    /// Joins and history reads waiting for the join proxy.
    auth_waits: RefCell<Slab<access::AuthWait>>,
}

impl Core {
    pub(crate) fn new(id: usize, shared: Arc<Shared>, store: StoreHandle, me: Weak<Core>) -> Core {
        let cores = shared.mailboxes.len();
        let core_id = u16::try_from(id).expect("NEXUS_WORKERS is at most 1024");
        Core {
            id,
            shared,
            store,
            me,
            started: Instant::now(),
            now_ms: Cell::new(0),
            next_conn_id: Cell::new(0),
            conns: RefCell::new(Slab::new()),
            topics: RefCell::new(LocalTopics::default()),
            acks: RefCell::new(Slab::new()),
            http_waits: RefCell::new(Slab::new()),
            read_buf: RefCell::new(vec![0; limits::READ_CHUNK_BYTES]),
            write_buf: RefCell::new(Vec::new()),
            effects: RefCell::new(Vec::new()),
            refs: RefCell::new(RefMaker::new(core_id)),
            presence: RefCell::new(PresenceShard::default()),
            presence_flush: Cell::new(false),
            presence_activity: RefCell::new(std::collections::HashMap::new()),
            overflow: RefCell::new(Overflow::new(cores, limits::CROSS_CORE_OVERFLOW_MSGS_MAX)),
            retry_scheduled: Cell::new(false),
            counters: Counters::default(),
            cluster: RefCell::new(cluster::ClusterState::default()),
            replicas: RefCell::new(std::collections::HashMap::new()),
            recoveries: RefCell::new(Slab::new()),
            recovery_backlog: RefCell::new(std::collections::VecDeque::new()),
            recovery_retry: Cell::new(false),
            grants: RefCell::new(std::collections::HashMap::new()),
            auth_waits: RefCell::new(Slab::new()),
        }
    }

    pub(crate) fn id(&self) -> usize {
        self.id
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub(crate) fn config(&self) -> &Config {
        &self.shared.config
    }

    pub(crate) fn store(&self) -> &StoreHandle {
        &self.store
    }

    /// Coarse core clock in ms (advanced every sweep).
    pub(crate) fn now_ms(&self) -> u64 {
        self.now_ms.get()
    }

    /// When a connection active now becomes idle. The coarse clock lags real time by up to one
    /// sweep, so one sweep is added: a socket is never closed before `idle_timeout` of silence,
    /// and at most two sweeps after it.
    pub(crate) fn idle_deadline_ms(&self) -> u64 {
        self.now_ms() + (self.config().idle_timeout + limits::SWEEP_INTERVAL).as_millis() as u64
    }

    /// When a connection that sent its last bytes (or is waiting) now must be gone.
    pub(crate) fn deadline_after_ms(&self, wait: std::time::Duration) -> u64 {
        self.now_ms() + wait.as_millis() as u64
    }

    pub(crate) fn count(&self, c: Counter) {
        self.counters.bump(c);
    }

    /// Copies this core's counters where a scrape on any core can add them up.
    pub(crate) fn publish(&self) {
        let (topics, metas) = self.presence.borrow().sizes();
        let gauges = Gauges {
            presence_topics: topics as u64,
            presence_metas: metas as u64,
            overflow_msgs: self.overflow.borrow().len() as u64,
            outbox_bytes: super::conn::core_outbox_bytes() as u64,
        };
        self.shared.published.publish(self.id, &self.counters, gauges);
    }

    /// The per-core read buffer. Held while the bytes just read are handled; see the borrow
    /// rules in the module doc.
    pub(crate) fn read_buf(&self) -> RefMut<'_, Vec<u8>> {
        self.read_buf.borrow_mut()
    }

    /// The per-core write-coalescing buffer, for one flush.
    pub(crate) fn write_buf(&self) -> RefMut<'_, Vec<u8>> {
        self.write_buf.borrow_mut()
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
        if self.shared.fabric.is_some() {
            monoio::spawn(self.clone().fabric_ticker());
        }
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
        self.grants.borrow_mut().remove(&conn.key);
        let removed = self.conns.borrow_mut().try_remove(conn.key);
        debug_assert!(removed.is_some_and(|c| Rc::ptr_eq(&c, conn)), "unregistered twice");
        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// Leaves every channel of a connection (presence leaves included). Called as soon as a
    /// close is decided, so members see the leave without waiting for the close to finish.
    pub(crate) fn leave_all(&self, conn: &Rc<Conn>) {
        let mut effects = self.effects.take();
        conn.session_mut().leave_all(&mut effects);
        for e in effects.drain(..) {
            self.execute(conn, e);
        }
        self.effects.replace(effects);
    }

    // --- Sessions ---------------------------------------------------------------------------

    /// Hands one client message to the connection's session and carries out what it decides.
    pub(crate) fn on_message(&self, conn: &Rc<Conn>, msg: crate::ws::Message<'_>) {
        self.with_session(conn, |session, env, effects| session.on_message(msg, env, effects));
    }

    /// Runs one step of `conn`'s session, then carries out its effects.
    fn with_session(&self, conn: &Rc<Conn>, step: impl FnOnce(&mut Session, &mut Env<'_>, &mut Vec<Effect>)) {
        let mut effects = self.effects.take();
        {
            let config = self.config();
            let access = &self.shared.access;
            let grants = self.grants.borrow();
            // Only the `token` policy keeps grants: no lookup per message otherwise.
            let grants = if access.uses_grants() { grants.get(&conn.key).map_or(&[][..], |g| &g[..]) } else { &[] };
            let mut env = Env {
                now_ms: self.now_ms(),
                limits: Limits { max_channels: config.max_channels, msg_rate: config.msg_rate },
                refs: &mut self.refs.borrow_mut(),
                counters: &self.counters,
                joins_refused: self.shared.joins_refused(),
                access,
                grants,
                core: self.id,
                conn: conn.id,
            };
            step(&mut conn.session_mut(), &mut env, &mut effects);
        }
        for e in effects.drain(..) {
            self.execute(conn, e);
        }
        self.effects.replace(effects);
    }

    fn execute(&self, conn: &Rc<Conn>, effect: Effect) {
        match effect {
            Effect::Send(frame) => {
                self.count(Counter::Replies);
                conn.send(frame, self.config().max_outbox_bytes);
            }
            Effect::Join { conversation, topic, join_ref, phx_ref, reply, recovery } => {
                let join = WaitingJoin { conn: conn.clone(), join_ref, phx_ref, reply, recovery };
                self.join_channel(conversation, topic, join)
            }
            Effect::Leave { conversation, phx_ref } => self.leave_channel(conn, conversation, phx_ref),
            Effect::Submit { conversation, body, reply } => self.submit(conn, conversation, body, reply),
            Effect::Close(why) => conn.request_close(why),
            Effect::Authorize(join) => self.authorize_join(conn, join),
        }
    }

    /// Makes the joining socket a local member of `conversation`, then answers the join
    /// ([`Core::answer_join`]). In cluster mode the answer waits until the conversation is live
    /// on this core ([`Core::join_ordered`]); a recovering join's broadcasts are held from now.
    pub(crate) fn join_channel(&self, conversation: Uuid, topic: Rc<str>, join: WaitingJoin) {
        let conn = &join.conn;
        let (shared_spelling, new_topic) = self.topics.borrow_mut().add_member(conversation, conn, topic);
        conn.session_mut().adopt_spelling(conversation, shared_spelling);
        if join.recovery.is_some() {
            self.hold_for_recovery(conn, conversation);
        }
        let ready = match &self.shared.fabric {
            Some(fabric) => self.join_ordered(fabric, conversation, new_topic, join),
            None => Some(join),
        };
        if let Some(join) = ready {
            self.answer_join(join, conversation);
        }
    }

    /// Answers a join: the reply, then the presence tracking (whose state follows it); a
    /// recovering join reads what it missed first.
    fn answer_join(&self, join: WaitingJoin, conversation: Uuid) {
        if join.conn.session().joined_topic(conversation, &join.join_ref).is_none() {
            return; // left or rejoined meanwhile
        }
        if let Some(recovery) = join.recovery {
            return self.begin_recovery(&join.conn, conversation, join.phx_ref, recovery);
        }
        self.count(Counter::Replies);
        join.conn.send(join.reply, self.config().max_outbox_bytes);
        self.track(&join.conn, conversation, &join.join_ref, join.phx_ref);
    }

    /// Asks the owner of `conversation` to track `conn`'s new meta.
    fn track(&self, conn: &Conn, conversation: Uuid, join_ref: &str, phx_ref: PhxRef) {
        let conn_ref = ConnRef { key: u32::try_from(conn.key).expect("connections fit in u32"), id: conn.id };
        let msg = CoreMsg::Track {
            conversation,
            user: conn.user(),
            meta: Meta::new(phx_ref, ids::now_micros()),
            from: u16::try_from(self.id).expect("core ids fit in u16 (limits::WORKERS_MAX)"),
            conn: conn_ref,
            join_ref: join_ref.into(),
        };
        self.send_to(self.owner(conversation), msg);
    }

    /// Drops `conn`'s membership of `conversation` and asks the owner to untrack `phx_ref`.
    pub(crate) fn leave_channel(&self, conn: &Conn, conversation: Uuid, phx_ref: PhxRef) {
        let left = self.topics.borrow_mut().remove_member(conversation, conn.key);
        if self.shared.fabric.is_some() {
            self.left_ordered(conn, conversation, left);
        }
        self.send_to(self.owner(conversation), CoreMsg::Untrack { conversation, user: conn.user(), phx_ref });
    }

    /// Hands a message to the writer; the answer comes back with the committed batch
    /// ([`Core::on_committed`]), or at once when the writer's queue is full.
    pub(crate) fn submit(&self, conn: &Rc<Conn>, conversation: Uuid, body: String, reply: ReplyTo) {
        self.submit_as(conn, conversation, conn.user(), body, AckTo::Socket(reply));
    }

    /// Server API: stores and broadcasts a message from `sender` exactly as a `new_msg`; the
    /// parked request is answered 201 with the stored message.
    pub(crate) fn submit_api(&self, conn: &Rc<Conn>, conversation: Uuid, sender: Uuid, body: String) {
        conn.set_phase(Phase::Waiting);
        conn.set_deadline_ms(self.deadline_after_ms(limits::HANDSHAKE_TIMEOUT));
        self.submit_as(conn, conversation, sender, body, AckTo::Http { stored: None });
    }

    fn submit_as(&self, conn: &Rc<Conn>, conversation: Uuid, sender: Uuid, body: String, to: AckTo) {
        let ticket = self.acks.borrow_mut().insert(PendingAck { conn: conn.clone(), to });
        let origin = Origin {
            core: u16::try_from(self.id).expect("core ids fit in u16 (limits::WORKERS_MAX)"),
            ticket: u32::try_from(ticket).expect("pending acks are bounded by the writer queue"),
        };
        let req = InsertRequest { conversation, sender, body, origin };
        if let Err(e) = self.store.try_submit(req) {
            self.count(Counter::NewMsgBusy);
            tracing::warn!(core = self.id, conn = conn.id, error = %e, "new_msg refused");
            self.ack(ticket, Some(&e.to_string()));
        }
    }

    /// Counts a server API request.
    pub(crate) fn count_api(&self, action: crate::http::ApiAction) {
        self.count(match action {
            crate::http::ApiAction::PostMessage(_) => Counter::ApiMessages,
            crate::http::ApiAction::RemoveMember(..) => Counter::ApiRemovals,
            crate::http::ApiAction::Disconnect(_) => Counter::ApiDisconnects,
        });
    }

    /// Broadcasts a committed batch to local members and answers this core's senders
    /// (broadcast first, then the reply: Phoenix's order). In cluster mode the broadcast goes
    /// through each conversation's order ([`Core::on_committed_ordered`]).
    fn on_committed(&self, batch: &CommitBatch) {
        if self.shared.fabric.is_some() {
            return self.on_committed_ordered(batch);
        }
        for (i, m) in batch.messages.iter().enumerate() {
            if let Some(payload) = batch.payloads.get(i) {
                if self.topics.borrow().has_members(m.message.conversation) {
                    self.fan_out(m.message.conversation, chat::NEW_MSG, payload, false);
                }
            }
            if let Some(ticket) = self.ticket_of(batch, i) {
                self.ack(ticket, batch.failure);
            }
        }
    }

    /// The pending-ack key of the batch's `i`th message, if sent from this core; a server API
    /// sender keeps the stored message for its answer.
    fn ticket_of(&self, batch: &CommitBatch, i: usize) -> Option<usize> {
        let origin = batch.messages[i].origin.filter(|o| usize::from(o.core) == self.id)?;
        let ticket = origin.ticket as usize;
        if let (Some(payload), Some(ack)) = (batch.payloads.get(i), self.acks.borrow_mut().get_mut(ticket)) {
            if let AckTo::Http { stored } = &mut ack.to {
                *stored = Some(payload.clone());
            }
        }
        Some(ticket)
    }

    /// Answers a pending message: ok (201 for the server API), or `Failed to save` (503) with
    /// `failure`.
    fn ack(&self, ticket: usize, failure: Option<&str>) {
        let Some(ack) = self.acks.borrow_mut().try_remove(ticket) else { return };
        if failure.is_none() {
            self.count(Counter::NewMsgAcked);
        }
        match ack.to {
            AckTo::Socket(reply) => {
                self.count(Counter::Replies);
                ack.conn.send(reply.frame(ack.conn.vsn(), failure), self.config().max_outbox_bytes);
            }
            AckTo::Http { stored } => {
                let bytes = match (failure, stored) {
                    (None, Some(message)) => response::json(response::Status::CREATED, &message),
                    (failure, _) => {
                        response::json_error(response::Status::UNAVAILABLE, failure.unwrap_or("not stored"))
                    }
                };
                if ack.conn.phase() == Phase::Waiting {
                    self.answer_http(&ack.conn, bytes);
                }
            }
        }
    }

    fn fan_out(&self, conversation: Uuid, event: &str, payload: &[u8], presence: bool) {
        let max = self.config().max_outbox_bytes;
        let delivered = self.topics.borrow_mut().fan_out(conversation, event, payload, presence, max);
        self.counters.add(Counter::Deliveries, delivered);
    }

    // --- HTTP requests answered by other threads --------------------------------------------

    /// Parks `conn` until another thread's response arrives ([`CoreMsg::HttpResponse`] with
    /// the returned ticket).
    pub(crate) fn wait_http(&self, conn: &Rc<Conn>) -> u32 {
        let ticket = self.http_waits.borrow_mut().insert(conn.clone());
        u32::try_from(ticket).expect("waiting requests are bounded by the connections")
    }

    /// Forgets a wait whose request was never handed over.
    pub(crate) fn cancel_http(&self, ticket: u32) {
        self.http_waits.borrow_mut().try_remove(ticket as usize);
    }

    /// Reads a history page for a parked HTTP request ([`Phase::Waiting`]); the response comes
    /// back through this core's mailbox.
    pub(crate) fn read_history(&self, conn: &Rc<Conn>, query: HistoryQuery) {
        let ticket = self.wait_http(conn);
        let shared = self.shared.clone();
        let core_id = self.id;
        let reply = Box::new(move |result: Result<HistoryPage, HistoryError>| {
            let bytes = match result {
                Ok(page) => response::json(response::Status::OK, &chat::history_json(&page)),
                Err(e) => {
                    tracing::warn!(error = %e, "history read failed");
                    response::json_error(response::Status::UNAVAILABLE, "storage unavailable")
                }
            };
            shared.mailboxes[core_id].push_blocking(CoreMsg::HttpResponse { ticket, bytes });
        });
        if self.shared.reader.try_submit(HistoryJob { query, reply }).is_err() {
            self.cancel_http(ticket);
            return self.answer_http(conn, response::json_error(response::Status::UNAVAILABLE, "server busy"));
        }
        conn.set_phase(Phase::Waiting);
        conn.set_deadline_ms(self.deadline_after_ms(limits::HANDSHAKE_TIMEOUT));
    }

    /// Answers an HTTP request and closes after the answer is sent.
    pub(crate) fn answer_http(&self, conn: &Conn, bytes: Vec<u8>) {
        conn.push_final(Bytes::from(bytes));
        conn.set_phase(Phase::Closing);
        conn.set_deadline_ms(self.deadline_after_ms(limits::CLOSE_LINGER));
    }

    fn on_http_response(&self, ticket: u32, bytes: Vec<u8>) {
        let Some(conn) = self.http_waits.borrow_mut().try_remove(ticket as usize) else { return };
        if conn.phase() == Phase::Waiting {
            self.answer_http(&conn, bytes);
        }
    }

    // --- Presence ---------------------------------------------------------------------------

    fn owner(&self, conversation: Uuid) -> usize {
        channel::owner_core(conversation, self.shared.mailboxes.len())
    }

    /// Owner: a socket on core `from` joined.
    fn on_track(&self, conversation: Uuid, user: Uuid, meta: Meta, from: u16, conn: ConnRef, join_ref: Box<str>) {
        let joiner = Joiner { core: from, conn, join_ref };
        if self.shared.fabric.is_some() {
            return self.track_replicated(conversation, user, meta, joiner);
        }
        self.presence.borrow_mut().track(conversation, user, meta, joiner);
        self.schedule_presence_flush(conversation);
    }

    /// Owner: a meta left.
    fn on_untrack(&self, conversation: Uuid, user: Uuid, phx_ref: PhxRef) {
        if self.shared.fabric.is_some() {
            return self.untrack_replicated(conversation, phx_ref);
        }
        if self.presence.borrow_mut().untrack(conversation, user, &phx_ref) {
            self.schedule_presence_flush(conversation);
        }
    }

    /// Flushes presence changes adaptively, per conversation: a change of a quiet conversation
    /// (no change and no flush of it in the window before) goes out at once, so a join into a
    /// quiet room gets its `presence_state` without waiting; any other change waits for the
    /// window and goes out with everything else then, so a join storm still coalesces. Without
    /// a window every change flushes at once.
    fn schedule_presence_flush(&self, conversation: Uuid) {
        let window = self.config().presence_batch;
        if window.is_zero() {
            return self.flush_presence();
        }
        let now = Instant::now();
        let last = self.presence_activity.borrow_mut().insert(conversation, now);
        if last.is_none_or(|at| now.duration_since(at) >= window) {
            return self.flush_presence();
        }
        if self.presence_flush.replace(true) {
            return; // the scheduled flush carries this change
        }
        if let Some(me) = self.me.upgrade() {
            monoio::spawn(async move {
                monoio::time::sleep(window).await;
                me.presence_flush.set(false);
                me.flush_presence();
            });
        }
    }

    /// Sends the states the joiners wait for, then every pending diff to every core (each
    /// fans it out to its local members). Per core the state arrives before the diff.
    fn flush_presence(&self) {
        self.send_presence_changes();
        let flush = self.presence.borrow_mut().flush();
        // A flush is activity too (see `schedule_presence_flush`); conversations idle for a
        // window are quiet again and forgotten.
        let (now, window) = (Instant::now(), self.config().presence_batch);
        let mut activity = self.presence_activity.borrow_mut();
        activity.retain(|_, at| now.duration_since(*at) < window);
        activity.extend(flush.diffs.iter().map(|(c, _)| (*c, now)));
        drop(activity);
        for (conversation, state, joiners) in flush.states {
            for j in joiners {
                let msg =
                    CoreMsg::PresenceState { conversation, conn: j.conn, join_ref: j.join_ref, state: state.clone() };
                self.send_to(usize::from(j.core), msg);
            }
        }
        for (conversation, diff) in flush.diffs {
            for core in 0..self.shared.mailboxes.len() {
                self.send_to(core, CoreMsg::PresenceDiff { conversation, diff: diff.clone() });
            }
        }
        self.drop_idle_replicas();
    }

    /// Joiner's core: push `presence_state` if the connection is still in that join.
    fn on_presence_state(&self, conversation: Uuid, conn: ConnRef, join_ref: &str, state: Bytes) {
        let target = self.conns.borrow().get(conn.key as usize).filter(|c| c.id == conn.id).cloned();
        let Some(target) = target else { return };
        let Some(topic) = target.session().joined_topic(conversation, join_ref) else { return };
        let parts = wire::presence_state(target.vsn(), join_ref, &topic, state);
        target.send_parts(parts, self.config().max_outbox_bytes);
        self.topics.borrow_mut().presence_ready(conversation, target.key);
        self.finish_recovery(&target, conversation, &topic);
    }

    // --- Cross-core traffic -----------------------------------------------------------------

    /// Queues a message for a core (this one included, through its own mailbox, so every
    /// path has one order). A full mailbox never blocks a core: the message waits in the
    /// bounded, ordered [`Overflow`] that a retry task drains.
    pub(crate) fn send_to(&self, core: usize, msg: CoreMsg) {
        let queued = self.overflow.borrow_mut().send(&self.shared.mailboxes, core, msg);
        if queued {
            self.note_congestion();
            if !self.retry_scheduled.replace(true) {
                if let Some(me) = self.me.upgrade() {
                    monoio::spawn(me.retry_overflow());
                }
            }
        }
    }

    async fn retry_overflow(self: Rc<Self>) {
        loop {
            monoio::time::sleep(limits::MAILBOX_RETRY).await;
            let waiting = self.overflow.borrow_mut().retry(&self.shared.mailboxes);
            self.note_congestion();
            if !waiting {
                self.retry_scheduled.set(false);
                return;
            }
        }
    }

    /// Publishes a change of this core's congestion (joins are refused while any core is).
    fn note_congestion(&self) {
        let changed = self.overflow.borrow_mut().congestion_changed();
        match changed {
            Some(true) => {
                self.shared.congested_cores.fetch_add(1, Ordering::Relaxed);
                let waiting = self.overflow.borrow().len();
                tracing::warn!(core = self.id, waiting, "cross-core queues congested: refusing new joins");
            }
            Some(false) => {
                self.shared.congested_cores.fetch_sub(1, Ordering::Relaxed);
                tracing::info!(core = self.id, "cross-core queues drained: joins accepted again");
            }
            None => {}
        }
    }

    // --- Timers, mailbox, drain -------------------------------------------------------------

    /// The coarse timer: every [`limits::SWEEP_INTERVAL`], act on connections whose deadline
    /// passed (idle → close 1001; handshake, closing, lingering → drop). Core 0 also trims the
    /// process's heap every [`limits::HEAP_TRIM_INTERVAL`].
    async fn sweep(self: Rc<Self>) {
        let mut next_trim = limits::HEAP_TRIM_INTERVAL.as_millis() as u64;
        loop {
            monoio::time::sleep(limits::SWEEP_INTERVAL).await;
            let now = self.tick();
            self.publish();
            if self.id == 0 && now >= next_trim {
                sys::trim_heap();
                next_trim = now + limits::HEAP_TRIM_INTERVAL.as_millis() as u64;
            }
            for (_, conn) in self.conns.borrow().iter() {
                if conn.deadline_ms() > now {
                    continue;
                }
                match conn.phase() {
                    Phase::Open => conn.request_close(Close::Idle),
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
                    CoreMsg::FabricLive(conversation) => self.on_live(conversation),
                    CoreMsg::Remote { conversation, messages } => self.on_remote(conversation, &messages),
                    CoreMsg::FabricDown(down) => self.on_fabric_down(down),
                    CoreMsg::Heads { asked, heads } => self.on_heads(&asked, heads),
                    CoreMsg::Filled { conversation, messages, full } => self.on_filled(conversation, messages, full),
                    CoreMsg::PresenceChanges { conversation, changes } => {
                        self.on_presence_changes(conversation, changes)
                    }
                    CoreMsg::PresenceUnapplied { conversation, changes } => {
                        self.on_presence_unapplied(conversation, &changes)
                    }
                    CoreMsg::PresenceSnapshot { conversation, snapshot } => {
                        self.on_presence_snapshot(conversation, snapshot)
                    }
                    CoreMsg::PresenceResync => self.resync_replicas(),
                    CoreMsg::Recovered { ticket, messages } => self.on_recovered(ticket, messages),
                    CoreMsg::Authorized { ticket, verdict } => self.on_authorized(ticket, verdict),
                    CoreMsg::RemoveMember { conversation, user } => self.on_remove_member(conversation, user),
                    CoreMsg::Disconnect { user } => self.on_disconnect(user),
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
