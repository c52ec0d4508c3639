//! Cluster mode's side of the server: the threads that connect this node to the others
//! (the Redis publisher and subscriber, the PostgreSQL gap-fill reader), how their events reach
//! the cores, and what a core keeps per conversation to deliver in `seq` order.
//!
//! The cores never touch Redis or PostgreSQL: they hand requests to these threads through
//! bounded queues and get the answers in their mailboxes, as they get committed batches.

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use uuid::Uuid;

use super::conn::Conn;
use crate::bus::{CoreMsg, Mailbox, Sequenced};
use crate::cluster::command::Command;
use crate::cluster::filler::{spawn_filler, FillRequest, Filler};
use crate::cluster::order::Cursor;
use crate::cluster::presence::{spawn_presence, Presence, PresenceEvent, PresenceSettings};
use crate::cluster::publisher::{spawn_publisher, Publisher};
use crate::cluster::subscriber::{spawn_subscriber, FabricEvent, Subscriber};
use crate::config::ClusterConfig;
use crate::limits;
use crate::presence::PhxRef;
use crate::store::{CommitBatch, Message, PgFillReader, PgTarget};

/// A cluster-mode start-up failure.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    /// `NEXUS_REDIS_URL` is not a Redis URL.
    #[error("invalid NEXUS_REDIS_URL: {0}")]
    Url(String),
    /// A thread could not be started.
    #[error("cannot start the cluster threads: {0}")]
    Start(#[from] std::io::Error),
}

/// What the cluster threads did, for `/metrics` (process-wide atomics: the cores count here
/// too, rarely: once per fill).
#[derive(Debug, Default)]
pub(crate) struct FabricStats {
    /// The subscription is live (publications are received).
    pub subscribed: AtomicBool,
    /// Presence replicas read again because a version was missed.
    pub presence_resyncs: AtomicU64,
    /// Gap fills read from the database.
    pub gap_fills: AtomicU64,
    /// Messages the catch-up found missing and read from the database.
    pub catchup_rows: AtomicU64,
}

/// This node's handle on the cluster threads (in [`super::core::Shared`]).
pub(crate) struct Fabric {
    pub node_id: String,
    pub subscriber: Subscriber,
    pub filler: Filler,
    pub publisher: Publisher,
    pub presence: Presence,
    pub stats: Arc<FabricStats>,
    pub gap_wait: Duration,
    pub catchup: Duration,
    pub hold_max: usize,
}

impl Fabric {
    /// Starts the publisher, the subscriber (its events go to every core's mailbox) and the
    /// gap-fill reader of `target`.
    pub(crate) fn start(
        config: &ClusterConfig,
        node_id: String,
        target: &PgTarget,
        db_timeout: Duration,
        mailboxes: Arc<[Mailbox]>,
    ) -> Result<Fabric, FabricError> {
        let client = redis::Client::open(config.redis_url.expose()).map_err(|e| FabricError::Url(e.to_string()))?;
        let incarnation = format!("{node_id}/{}", crate::ids::now_micros());
        let prefix = config.redis_prefix.clone();
        let publisher = spawn_publisher(client.clone(), prefix.clone(), incarnation.clone(), config.publish_queue)?;
        let stats = Arc::new(FabricStats { subscribed: AtomicBool::new(true), ..FabricStats::default() });
        let recorder = Arc::clone(&stats);
        let everyone = Arc::clone(&mailboxes);
        let resync = Arc::new(move |event: PresenceEvent| match event {
            PresenceEvent::Resync => everyone.iter().for_each(|m| m.push_blocking(CoreMsg::PresenceResync)),
        });
        let settings = PresenceSettings {
            prefix: prefix.clone(),
            node_id: node_id.clone(),
            incarnation: incarnation.clone(),
            node_timeout: config.node_timeout,
        };
        let presence = spawn_presence(client.clone(), settings, limits::PRESENCE_QUEUE_MAX, resync)?;
        let sink = Arc::new(move |event| route(&mailboxes, &recorder, event));
        let subscriber = spawn_subscriber(client, prefix, incarnation, limits::WATCH_QUEUE_MAX, sink)?;
        let filler = spawn_filler(PgFillReader::new(target, db_timeout), limits::FILLER_QUEUE_MAX)?;
        Ok(Fabric {
            node_id,
            subscriber,
            filler,
            publisher,
            presence,
            stats,
            gap_wait: config.gap_wait,
            catchup: config.catchup,
            hold_max: config.hold_max,
        })
    }

    /// Hands a committed batch to the publisher (never blocks; a full queue drops it, and the
    /// other nodes read it from the database).
    pub(crate) fn publish(&self, batch: &Arc<CommitBatch>) {
        self.publisher.offer(batch);
    }

    /// Whether Redis is reachable for both publishing and receiving.
    pub(crate) fn redis_up(&self) -> bool {
        self.stats.subscribed.load(Ordering::Relaxed) && self.publisher.stats().up.load(Ordering::Relaxed)
    }

    /// Asks for the heads of `asked`; the answer comes to core `core` as [`CoreMsg::Heads`].
    pub(crate) fn ask_heads(&self, mailboxes: &Arc<[Mailbox]>, core: usize, asked: Vec<Uuid>) -> bool {
        let mailboxes = Arc::clone(mailboxes);
        let conversations = asked.clone();
        let reply = Box::new(move |result: Result<Vec<crate::store::Head>, _>| {
            mailboxes[core].push_blocking(CoreMsg::Heads { asked, heads: result.ok() });
        });
        self.filler.try_request(FillRequest::Heads { conversations, reply }).is_ok()
    }

    /// Asks for `conversation`'s messages after `after` (and before `before`, µs); the answer
    /// comes to core `core` as [`CoreMsg::Filled`], encoded on the reader's thread.
    pub(crate) fn ask_range(
        &self,
        mailboxes: &Arc<[Mailbox]>,
        core: usize,
        conversation: Uuid,
        after: i64,
        before: Option<i64>,
        limit: usize,
    ) -> bool {
        let mailboxes = Arc::clone(mailboxes);
        let reply = Box::new(move |result: Result<Vec<Message>, _>| {
            let full = result.as_ref().is_ok_and(|m| m.len() >= limit);
            let messages = result.ok().map(|messages| messages.iter().map(sequenced).collect());
            mailboxes[core].push_blocking(CoreMsg::Filled { conversation, messages, full });
        });
        self.filler.try_request(FillRequest::Range { conversation, after, before, limit, reply }).is_ok()
    }
}

fn sequenced(m: &Message) -> Sequenced {
    Sequenced { seq: m.seq, inserted_at_us: m.inserted_at_us, payload: Bytes::from(crate::chat::new_msg_payload(m)) }
}

/// The subscriber's events, to every core (a core without members of the conversation drops
/// them). Blocking here stops the subscriber reading, which Redis answers by cutting it off;
/// the cores then fill from the database.
fn route(mailboxes: &[Mailbox], stats: &FabricStats, event: FabricEvent) {
    let make: Box<dyn Fn() -> CoreMsg> = match event {
        FabricEvent::Live(c) => Box::new(move || CoreMsg::FabricLive(c)),
        FabricEvent::Remote { conversation, messages } => {
            let messages: Arc<[Sequenced]> = Arc::from(messages);
            Box::new(move || CoreMsg::Remote { conversation, messages: Arc::clone(&messages) })
        }
        FabricEvent::Presence { conversation, changes } => {
            let owner = crate::channel::owner_core(conversation, mailboxes.len());
            return mailboxes[owner].push_blocking(CoreMsg::PresenceChanges { conversation, changes });
        }
        FabricEvent::Command(command) => Box::new(move || command_msg(command)),
        FabricEvent::Down | FabricEvent::Up => {
            let down = event == FabricEvent::Down;
            stats.subscribed.store(!down, Ordering::Relaxed);
            Box::new(move || CoreMsg::FabricDown(down))
        }
    };
    for mailbox in mailboxes {
        mailbox.push_blocking(make());
    }
}

/// The core message that carries out a server API command.
pub(crate) fn command_msg(command: Command) -> CoreMsg {
    match command {
        Command::RemoveMember { conversation, user } => CoreMsg::RemoveMember { conversation, user },
        Command::Disconnect { user } => CoreMsg::Disconnect { user },
    }
}

/// A join to answer: at once, or, on a cluster node's first join of a conversation, once the
/// conversation is live on the core (its reply and presence wait with it).
pub(crate) struct WaitingJoin {
    pub conn: Rc<Conn>,
    pub join_ref: crate::session::JoinRef,
    pub phx_ref: PhxRef,
    pub reply: Bytes,
    /// The join recovers missed messages: it is answered by the recovery instead.
    pub recovery: Option<crate::session::Recovery>,
}

/// What a core keeps per conversation it has members of, in cluster mode.
pub(crate) struct TopicOrder {
    /// The next `seq` owed to the members, and what arrived ahead of it.
    pub cursor: Cursor<Bytes>,
    /// This core's senders waiting for their own message to be delivered: `(seq, ack ticket)`.
    pub acks: Vec<(u64, usize)>,
    /// Joins waiting for the conversation's head (the first ones on this core).
    pub joins: Vec<WaitingJoin>,
    /// A read of the database is in flight for this conversation.
    pub filling: bool,
}

impl TopicOrder {
    pub(crate) fn pending(hold_max: usize) -> TopicOrder {
        TopicOrder { cursor: Cursor::pending(hold_max), acks: Vec::new(), joins: Vec::new(), filling: false }
    }

    /// Takes the tickets of this core's messages delivered by now.
    pub(crate) fn settled(&mut self, done: &mut Vec<usize>) {
        let Some(next) = self.cursor.next_seq() else { return };
        self.acks.retain(|&(seq, ticket)| {
            let delivered = seq < next;
            if delivered {
                done.push(ticket);
            }
            !delivered
        });
    }
}
