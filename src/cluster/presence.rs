//! fabric-presence: the cluster's presence in Redis, and this node's heartbeat.
//!
//! Each conversation's presence is one Redis hash (`p:{conv}`: `phx_ref` → user, `online_at`,
//! incarnation) with a version (`pv:{conv}`). Nodes change it only through Lua scripts that
//! apply a batch of changes atomically and publish the effective ones, under the next version,
//! on the conversation's channel: every node's replica applies the same dense sequence of
//! versions, or sees a gap and reads a snapshot. A node's metas carry its incarnation
//! (`<node id>/<start µs>`), so the metas of a node that stopped beating (or restarted under
//! the same id) can be removed everywhere by whichever node claims it first.
//!
//! One thread with its own connection serves the owner cores' requests (each carries its
//! reply, answered with `None` at once while Redis is unreachable) and beats every fifth of
//! `NEXUS_NODE_TIMEOUT`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use uuid::Uuid;

use super::connect;
use super::publisher::channel;
use crate::backoff::Backoff;
use crate::limits;
use crate::presence::{Meta, PhxRef};

const APPLY: &str = include_str!("scripts/apply.lua");
const SYNC: &str = include_str!("scripts/sync.lua");
const BEAT: &str = include_str!("scripts/beat.lua");

/// Length of a user id as text, and where a stored value's `online_at` and incarnation begin.
const USER_LEN: usize = 36;
const ONLINE_AT_LEN: usize = 27;

/// One change of a conversation's presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A meta joined.
    Join {
        /// The meta's user.
        user: Uuid,
        /// The meta.
        meta: Meta,
    },
    /// The meta `phx_ref` left.
    Leave(PhxRef),
}

impl Change {
    /// The meta's reference.
    pub fn phx_ref(&self) -> PhxRef {
        match self {
            Change::Join { meta, .. } => meta.phx_ref,
            Change::Leave(r) => *r,
        }
    }

    /// The script argument: `+<ref><user><online_at><incarnation>` or `-<ref>`.
    fn encode(&self, incarnation: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 16 + USER_LEN + ONLINE_AT_LEN + incarnation.len());
        match self {
            Change::Join { user, meta } => {
                out.push(b'+');
                out.extend_from_slice(&meta.phx_ref);
                out.extend_from_slice(user.hyphenated().encode_lower(&mut Uuid::encode_buffer()).as_bytes());
                out.extend_from_slice(&meta.online_at);
                out.extend_from_slice(incarnation.as_bytes());
            }
            Change::Leave(r) => {
                out.push(b'-');
                out.extend_from_slice(r);
            }
        }
        out
    }

    /// Parses a change as scripts publish and return it.
    fn parse(op: &[u8]) -> Option<Change> {
        let (&kind, rest) = op.split_first()?;
        let phx_ref: PhxRef = rest.get(..16)?.try_into().ok()?;
        match kind {
            b'-' if rest.len() == 16 => Some(Change::Leave(phx_ref)),
            b'+' => joined(phx_ref, rest.get(16..)?).map(|(user, meta)| Change::Join { user, meta }),
            _ => None,
        }
    }
}

/// A stored value `<user><online_at><incarnation>` as the meta `phx_ref` of that user.
fn joined(phx_ref: PhxRef, value: &[u8]) -> Option<(Uuid, Meta)> {
    let user = Uuid::try_parse_ascii(value.get(..USER_LEN)?).ok()?;
    let online_at: [u8; ONLINE_AT_LEN] = value.get(USER_LEN..USER_LEN + ONLINE_AT_LEN)?.try_into().ok()?;
    Some((user, Meta { phx_ref, online_at }))
}

/// A versioned set of changes: a publication, a script's answer, or a snapshot (every meta as
/// a join).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    /// The conversation's presence version after them.
    pub version: u64,
    /// The changes, in order.
    pub changes: Vec<Change>,
}

/// Parses a presence publication `P<version>\n<change>\n…`.
pub fn parse_publication(bytes: &[u8]) -> Result<Changes, &'static str> {
    let rest = bytes.strip_prefix(b"P").ok_or("not a presence publication")?;
    let mut lines = rest.split(|&b| b == b'\n');
    let version = lines.next().and_then(|v| std::str::from_utf8(v).ok()?.parse().ok()).ok_or("bad version")?;
    let changes = lines.map(|l| Change::parse(l).ok_or("bad change")).collect::<Result<_, _>>()?;
    Ok(Changes { version, changes })
}

/// Where a request's answer goes: `None` when Redis could not be reached.
pub type Reply = Box<dyn FnOnce(Option<Changes>) + Send>;

/// What an owner core asks.
pub enum PresenceRequest {
    /// Applies this node's changes; answers the effective ones with their version.
    Apply {
        /// The conversation.
        conversation: Uuid,
        /// The changes, in order.
        changes: Vec<Change>,
        /// Where the answer goes.
        reply: Reply,
    },
    /// Makes this node's metas of the conversation exactly `metas` (joins), then answers a
    /// snapshot of the whole presence (every meta as a join, at its version).
    Resync {
        /// The conversation.
        conversation: Uuid,
        /// This node's live metas.
        metas: Vec<Change>,
        /// Where the snapshot goes.
        reply: Reply,
    },
    /// The node is stopping: removes every meta of this incarnation everywhere (publishing the
    /// leaves) and its heartbeat, then says so on `done`.
    Retire {
        /// Told when it is done (or Redis failed).
        done: crossbeam_channel::Sender<()>,
    },
}

/// What the presence thread tells every core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceEvent {
    /// Redis may have lost this node's metas (it was unreachable, restarted, or reaped this
    /// node): every replica must be resynced.
    Resync,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct PresenceStats {
    /// Dead incarnations whose metas this node removed.
    pub reaped_nodes: AtomicU64,
}

/// The owner cores' handle to the presence thread.
#[derive(Clone)]
pub struct Presence {
    tx: Sender<PresenceRequest>,
    stats: Arc<PresenceStats>,
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presence").field("queued", &self.tx.len()).finish()
    }
}

impl Presence {
    /// Queues a request without blocking; gives it back when the queue is full.
    pub fn try_request(&self, request: PresenceRequest) -> Result<(), PresenceRequest> {
        self.tx.try_send(request).map_err(|e| e.into_inner())
    }

    /// Requests waiting.
    pub fn queued(&self) -> usize {
        self.tx.len()
    }

    /// What it did so far.
    pub fn stats(&self) -> &PresenceStats {
        &self.stats
    }

    /// Removes this node's presence from the cluster (its leaves are published) and its
    /// heartbeat, waiting at most `wait`: a node stopping on purpose leaves no ghosts.
    pub fn retire(&self, wait: Duration) -> bool {
        let (done, finished) = crossbeam_channel::bounded(1);
        let deadline = Instant::now() + wait;
        let mut request = PresenceRequest::Retire { done };
        // Behind a full queue: retry until the deadline (the thread drains it).
        loop {
            match self.tx.try_send(request) {
                Ok(()) => break,
                Err(e) if Instant::now() < deadline => {
                    request = e.into_inner();
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return false,
            }
        }
        finished.recv_deadline(deadline).is_ok()
    }
}

/// The settings of the presence thread.
#[derive(Debug, Clone)]
pub struct PresenceSettings {
    /// Key and channel prefix.
    pub prefix: String,
    /// This node's id.
    pub node_id: String,
    /// This process's incarnation (`<node id>/<start µs>`).
    pub incarnation: String,
    /// A node silent this long is reaped; beats go every fifth of it.
    pub node_timeout: Duration,
}

/// Starts the presence thread; `events` reaches every core. It ends when every [`Presence`] is
/// dropped.
pub fn spawn_presence(
    client: redis::Client,
    settings: PresenceSettings,
    queue: usize,
    events: Arc<dyn Fn(PresenceEvent) + Send + Sync>,
) -> std::io::Result<Presence> {
    let (tx, rx) = crossbeam_channel::bounded(queue.max(1));
    let stats = Arc::new(PresenceStats::default());
    let link = Link {
        client,
        events: Arc::clone(&events),
        conn: None,
        reconnect: Backoff::new(limits::RECONNECT_BACKOFF_MIN, limits::RECONNECT_BACKOFF_MAX),
        lost: false,
    };
    let mut thread = Thread {
        settings,
        rx,
        events,
        stats: Arc::clone(&stats),
        link,
        beaten: false,
        apply: redis::Script::new(APPLY),
        sync: redis::Script::new(SYNC),
        beat: redis::Script::new(BEAT),
    };
    std::thread::Builder::new().name("fabric-presence".into()).spawn(move || thread.run())?;
    Ok(Presence { tx, stats })
}

struct Thread {
    settings: PresenceSettings,
    rx: Receiver<PresenceRequest>,
    events: Arc<dyn Fn(PresenceEvent) + Send + Sync>,
    stats: Arc<PresenceStats>,
    link: Link,
    /// The first beat of this incarnation happened (later, a missing entry means it was reaped).
    beaten: bool,
    apply: redis::Script,
    sync: redis::Script,
    beat: redis::Script,
}

impl Thread {
    fn run(&mut self) {
        let every = self.settings.node_timeout / 5;
        let mut next_beat = Instant::now();
        loop {
            if Instant::now() >= next_beat {
                self.heartbeat();
                next_beat = Instant::now() + every;
            }
            match self.rx.recv_timeout(next_beat.saturating_duration_since(Instant::now())) {
                Ok(request) => self.serve(request),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn serve(&mut self, request: PresenceRequest) {
        match request {
            PresenceRequest::Apply { conversation, changes, reply } => {
                let ops: Vec<Vec<u8>> = changes.iter().map(|c| c.encode(&self.settings.incarnation)).collect();
                reply(self.script(Script::Apply, conversation, &ops));
            }
            PresenceRequest::Resync { conversation, metas, reply } => {
                let ops: Vec<Vec<u8>> = metas.iter().map(|c| c.encode(&self.settings.incarnation)).collect();
                let synced = self.script(Script::Sync(self.settings.incarnation.clone()), conversation, &ops);
                reply(synced.and_then(|_| self.snapshot(conversation)));
            }
            PresenceRequest::Retire { done } => {
                let own = self.settings.incarnation.clone();
                if self.remove_metas(&own) {
                    let nodes = format!("{}nodes", self.settings.prefix);
                    if let Some(conn) = self.link.conn() {
                        let _: redis::RedisResult<()> = redis::cmd("ZREM").arg(nodes).arg(&own).query(conn);
                    }
                }
                let _ = done.send(());
            }
        }
    }

    fn keys(&self, conversation: Uuid, incarnation: &str) -> [String; 3] {
        let prefix = &self.settings.prefix;
        [
            format!("{prefix}p:{{{conversation}}}"),
            format!("{prefix}pv:{{{conversation}}}"),
            format!("{prefix}nt:{incarnation}"),
        ]
    }

    /// Runs apply.lua or sync.lua on `conversation` with `ops`.
    fn script(&mut self, script: Script, conversation: Uuid, ops: &[Vec<u8>]) -> Option<Changes> {
        let incarnation = match &script {
            Script::Apply => self.settings.incarnation.clone(),
            Script::Sync(incarnation) => incarnation.clone(),
        };
        let keys = self.keys(conversation, &incarnation);
        let channel = channel(&self.settings.prefix, conversation);
        let mut invocation = match script {
            Script::Apply => self.apply.prepare_invoke(),
            Script::Sync(_) => self.sync.prepare_invoke(),
        };
        invocation.key(&keys[0]).key(&keys[1]).key(&keys[2]).arg(channel).arg(conversation.to_string());
        if let Script::Sync(incarnation) = &script {
            invocation.arg(incarnation);
        }
        for op in ops {
            invocation.arg(op.as_slice());
        }
        let conn = self.link.conn()?;
        match invocation.invoke::<Vec<Vec<u8>>>(conn) {
            Ok(answer) => parse_answer(&answer),
            Err(e) => {
                self.link.failed(&e);
                None
            }
        }
    }

    /// The whole presence of `conversation`, read atomically with its version.
    fn snapshot(&mut self, conversation: Uuid) -> Option<Changes> {
        let [p, pv, _] = self.keys(conversation, "");
        let conn = self.link.conn()?;
        let read = redis::pipe().atomic().get(&pv).hgetall(&p).query::<(Option<u64>, Vec<(Vec<u8>, Vec<u8>)>)>(conn);
        match read {
            Ok((version, entries)) => {
                let changes = entries
                    .iter()
                    .filter_map(|(r, value)| joined(r.as_slice().try_into().ok()?, value))
                    .map(|(user, meta)| Change::Join { user, meta })
                    .collect();
                Some(Changes { version: version.unwrap_or(0), changes })
            }
            Err(e) => {
                self.link.failed(&e);
                None
            }
        }
    }

    /// Beats, and reaps the incarnations the beat claimed.
    fn heartbeat(&mut self) {
        let settings = &self.settings;
        let nodes = format!("{}nodes", settings.prefix);
        let timeout_ms = settings.node_timeout.as_millis() as u64;
        let mine = format!("{}/", settings.node_id);
        let mut invocation = self.beat.prepare_invoke();
        invocation.key(nodes).arg(&settings.incarnation).arg(timeout_ms).arg(mine);
        let Some(conn) = self.link.conn() else { return };
        let claimed = match invocation.invoke::<Vec<String>>(conn) {
            Ok(claimed) => claimed,
            Err(e) => return self.link.failed(&e),
        };
        let missing = claimed.first().is_some_and(|m| m == "1");
        if missing && std::mem::replace(&mut self.beaten, true) {
            tracing::warn!("presence: this node was reaped (cut off from Redis too long); resyncing");
            (self.events)(PresenceEvent::Resync);
        }
        for dead in claimed.iter().skip(1) {
            self.reap(dead);
        }
    }

    /// Removes a dead incarnation's metas from every conversation it touched.
    fn reap(&mut self, dead: &str) {
        if self.remove_metas(dead) {
            self.stats.reaped_nodes.fetch_add(1, Ordering::Relaxed);
            tracing::info!(incarnation = dead, "reaped a stopped node's presence");
        }
    }

    /// Removes an incarnation's metas from every conversation it touched, publishing the
    /// leaves; `false` if Redis failed (the rest stays until a restart under that id claims it).
    fn remove_metas(&mut self, incarnation: &str) -> bool {
        let touched = format!("{}nt:{incarnation}", self.settings.prefix);
        let Some(conn) = self.link.conn() else { return false };
        let conversations: Vec<String> = match redis::cmd("SMEMBERS").arg(&touched).query(conn) {
            Ok(c) => c,
            Err(e) => {
                self.link.failed(&e);
                return false;
            }
        };
        for conversation in conversations.iter().filter_map(|c| Uuid::parse_str(c).ok()) {
            if self.script(Script::Sync(incarnation.to_string()), conversation, &[]).is_none() {
                return false;
            }
        }
        if let Some(conn) = self.link.conn() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&touched).query(conn);
        }
        true
    }
}

/// The thread's connection to Redis, remade with back-off after a failure.
struct Link {
    client: redis::Client,
    events: Arc<dyn Fn(PresenceEvent) + Send + Sync>,
    conn: Option<redis::Connection>,
    reconnect: Backoff,
    /// The connection failed since the last success: the next one resyncs every replica.
    lost: bool,
}

impl Link {
    /// The connection, made (again) if the back-off allows; `None` while Redis is unreachable.
    fn conn(&mut self) -> Option<&mut redis::Connection> {
        if self.conn.is_none() && self.reconnect.ready() {
            match connect(&self.client) {
                Ok(conn) => {
                    self.reconnect.succeeded();
                    self.conn = Some(conn);
                    if std::mem::take(&mut self.lost) {
                        tracing::info!("presence: Redis reachable again; resyncing");
                        (self.events)(PresenceEvent::Resync);
                    }
                }
                Err(e) => self.failed(&e),
            }
        }
        self.conn.as_mut()
    }

    fn failed(&mut self, e: &redis::RedisError) {
        if !self.lost {
            tracing::warn!(error = %e, "presence: Redis unreachable; presence changes stay on this node");
        }
        self.conn = None;
        self.lost = true;
        self.reconnect.failed();
    }
}

enum Script {
    Apply,
    /// sync.lua for this incarnation.
    Sync(String),
}

/// A script's answer `[version, change…]`.
fn parse_answer(answer: &[Vec<u8>]) -> Option<Changes> {
    let (version, changes) = answer.split_first()?;
    let version = std::str::from_utf8(version).ok()?.parse().ok()?;
    let changes = changes.iter().filter_map(|c| Change::parse(c)).collect();
    Some(Changes { version, changes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_round_trip_through_the_script_and_publication_forms() {
        let user = Uuid::from_u128(0x1234);
        let meta = Meta::new(*b"abcdefghijklmnop", 1_700_000_000_000_000);
        let join = Change::Join { user, meta };
        let leave = Change::Leave(*b"ABCDEFGHIJKLMNOP");
        let encoded = join.encode("node-1/17");
        assert_eq!(Change::parse(&encoded), Some(join));
        assert_eq!(Change::parse(&leave.encode("node-1/17")), Some(leave));
        let mut publication = b"P42\n".to_vec();
        publication.extend_from_slice(&encoded);
        publication.extend_from_slice(b"\n-ABCDEFGHIJKLMNOP");
        assert_eq!(parse_publication(&publication), Ok(Changes { version: 42, changes: vec![join, leave] }));
        assert!(parse_publication(b"P\n").is_err());
        assert!(parse_publication(b"Px\n-ABCDEFGHIJKLMNOP").is_err());
        assert!(parse_publication(b"P1\n-short").is_err());
        assert!(parse_publication(b"M....").is_err());
        assert_eq!(Change::parse(b"+abcdefghijklmnopnot-a-uuid"), None);
    }
}
