//! fabric-in: receives the other nodes' messages for the conversations this node watches.
//!
//! One Redis connection in subscribe mode, owned by its own thread. The cores say which
//! conversations they have members in (`Watch` / `Unwatch`, through a bounded queue); the
//! thread subscribes to their channels, decodes what arrives, drops this node's own
//! publications (its cores had those from its writer) and hands the rest on as events.
//!
//! Redis only speeds delivery up: while it is down, or after a cut, the cores learn it
//! (`Down`, then `Up` once resubscribed) and read what they missed from PostgreSQL. A `Watch`
//! is answered `Live` once its subscription is confirmed, or at once while Redis is down (the
//! database covers that conversation until Redis returns).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use uuid::Uuid;

use super::command::{self, Command};
use super::connect;
use super::presence::{parse_publication, Changes};
use super::publication::decode;
use super::publisher::channel;
use crate::backoff::Backoff;
use crate::bus::Sequenced;
use crate::limits;

/// How long a read waits before the thread looks at its control queue again.
const POLL: Duration = Duration::from_millis(10);

/// What the subscriber tells the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FabricEvent {
    /// Messages published for `conversation` are being received (or Redis is down and the
    /// database covers it).
    Live(Uuid),
    /// Another node's messages for `conversation`, in its commit order.
    Remote {
        /// The conversation.
        conversation: Uuid,
        /// The messages.
        messages: Vec<Sequenced>,
    },
    /// A change of `conversation`'s presence (this node's own included: replicas apply every
    /// version in order).
    Presence {
        /// The conversation.
        conversation: Uuid,
        /// Its changes, with their version.
        changes: Changes,
    },
    /// The subscription connection is gone: publications are being missed.
    Down,
    /// Subscribed again to everything watched: what was missed meanwhile must be read from
    /// the database.
    Up,
    /// Another node's server API command.
    Command(Command),
}

/// Where events go (the cores' mailboxes, in the server).
pub type FabricSink = Arc<dyn Fn(FabricEvent) + Send + Sync>;

/// What the cores ask of the subscriber.
#[derive(Debug, Clone, Copy)]
enum Control {
    Watch(Uuid),
    Unwatch(Uuid),
}

/// The cores' handle to the subscriber thread.
#[derive(Debug, Clone)]
pub struct Subscriber {
    tx: Sender<Control>,
}

/// The subscriber's control queue is full or its thread is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the Redis subscriber is not taking requests")]
pub struct Unavailable;

impl Subscriber {
    /// Starts receiving `conversation`'s messages; a [`FabricEvent::Live`] follows.
    pub fn watch(&self, conversation: Uuid) -> Result<(), Unavailable> {
        self.send(Control::Watch(conversation))
    }

    /// Gives back one watch of `conversation`; its messages stop once every watch is given back
    /// (each core with members watches once).
    pub fn unwatch(&self, conversation: Uuid) -> Result<(), Unavailable> {
        self.send(Control::Unwatch(conversation))
    }

    /// Watch and unwatch requests waiting.
    pub fn queued(&self) -> usize {
        self.tx.len()
    }

    fn send(&self, control: Control) -> Result<(), Unavailable> {
        self.tx.try_send(control).map_err(|_| Unavailable)
    }
}

/// Starts the subscriber thread for `client`'s Redis; publications by `incarnation` (this node)
/// are skipped. It ends when every [`Subscriber`] is dropped.
pub fn spawn_subscriber(
    client: redis::Client,
    prefix: String,
    incarnation: String,
    queue: usize,
    sink: FabricSink,
) -> std::io::Result<Subscriber> {
    let (tx, rx) = crossbeam_channel::bounded(queue.max(1));
    let mut thread = Thread { client, prefix, incarnation, rx, sink, watched: HashMap::new() };
    std::thread::Builder::new().name("fabric-in".into()).spawn(move || thread.run())?;
    Ok(Subscriber { tx })
}

struct Thread {
    client: redis::Client,
    prefix: String,
    incarnation: String,
    rx: Receiver<Control>,
    sink: FabricSink,
    /// Watched conversations, with how many watches each has (one per core with members).
    watched: HashMap<Uuid, u32>,
}

/// Why a connected session ended.
enum Ended {
    /// Every handle is dropped: the thread ends.
    Closed,
    /// Redis failed: reconnect.
    Lost(redis::RedisError),
}

impl Thread {
    fn run(&mut self) {
        let mut reconnect = Backoff::new(limits::RECONNECT_BACKOFF_MIN, limits::RECONNECT_BACKOFF_MAX);
        let mut down = false;
        loop {
            match connect(&self.client) {
                Ok(mut conn) => {
                    reconnect.succeeded();
                    match self.session(&mut conn, &mut down) {
                        Ended::Closed => return,
                        Ended::Lost(e) => tracing::warn!(error = %e, "Redis subscription lost: reconnecting"),
                    }
                }
                Err(e) if !down => {
                    tracing::warn!(error = %e, "Redis unreachable: reading other nodes' messages from the database")
                }
                Err(_) => {}
            }
            if !down {
                (self.sink)(FabricEvent::Down);
                down = true;
            }
            // Down: watches are answered at once (the database covers them) until the next try.
            reconnect.failed();
            while let Some(wait) = reconnect.retry_at().checked_duration_since(Instant::now()) {
                match self.rx.recv_timeout(wait) {
                    Ok(control) => {
                        if let Some(c) = self.apply(control) {
                            (self.sink)(FabricEvent::Live(c));
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        }
    }

    /// Records a control; returns the conversation it watches, if any (a repeated watch is
    /// answered too, so no join ever waits on a watch that changed nothing).
    fn apply(&mut self, control: Control) -> Option<Uuid> {
        match control {
            Control::Watch(c) => {
                *self.watched.entry(c).or_default() += 1;
                Some(c)
            }
            Control::Unwatch(c) => {
                if let Some(n) = self.watched.get_mut(&c) {
                    *n -= 1;
                    if *n == 0 {
                        self.watched.remove(&c);
                    }
                }
                None
            }
        }
    }

    /// One connected session: subscribe to everything watched (then, if the node was told
    /// `Down`, tell it `Up`), then serve controls and messages until Redis fails or every
    /// handle is dropped.
    fn session(&mut self, conn: &mut redis::Connection, down: &mut bool) -> Ended {
        let mut ps = conn.as_pubsub();
        let mut channels: Vec<String> = self.watched.keys().map(|&c| channel(&self.prefix, c)).collect();
        channels.push(command::channel(&self.prefix));
        if let Err(e) = confirmed(&mut ps, |ps| ps.subscribe(&channels)) {
            return Ended::Lost(e);
        }
        if *down {
            tracing::info!(conversations = self.watched.len(), "Redis subscription restored");
            (self.sink)(FabricEvent::Up);
            *down = false;
        }
        if let Err(e) = ps.set_read_timeout(Some(POLL)) {
            return Ended::Lost(e);
        }
        loop {
            loop {
                let control = match self.rx.try_recv() {
                    Ok(control) => control,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return Ended::Closed,
                };
                let result = match control {
                    Control::Watch(c) if !self.watched.contains_key(&c) => {
                        confirmed(&mut ps, |ps| ps.subscribe(channel(&self.prefix, c)))
                    }
                    Control::Unwatch(c) if self.watched.get(&c) == Some(&1) => {
                        confirmed(&mut ps, |ps| ps.unsubscribe(channel(&self.prefix, c)))
                    }
                    Control::Watch(_) | Control::Unwatch(_) => Ok(()),
                };
                // Recorded even when Redis failed: the reconnect subscribes to what is watched,
                // and until then the database covers it.
                if let Some(c) = self.apply(control) {
                    (self.sink)(FabricEvent::Live(c));
                }
                if let Err(e) = result {
                    return Ended::Lost(e);
                }
            }
            match ps.get_message() {
                Ok(msg) => self.deliver(msg.get_channel_name(), msg.get_payload_bytes()),
                Err(e) if e.is_timeout() => {}
                Err(e) => return Ended::Lost(e),
            }
        }
    }

    /// Decodes one publication and hands on another node's messages, or a presence change.
    fn deliver(&self, channel_name: &str, bytes: &[u8]) {
        if channel_name.strip_prefix(&self.prefix) == Some(command::CHANNEL) {
            match Command::decode(bytes) {
                Some((_, from)) if from == self.incarnation => {}
                Some((command, _)) => (self.sink)(FabricEvent::Command(command)),
                None => tracing::warn!(channel = channel_name, "dropped a command that is not ours"),
            }
            return;
        }
        if bytes.first() == Some(&b'P') {
            let Some(conversation) = self.conversation_of(channel_name) else { return };
            match parse_publication(bytes) {
                Ok(changes) => (self.sink)(FabricEvent::Presence { conversation, changes }),
                Err(e) => tracing::warn!(error = e, channel = channel_name, "dropped a presence publication"),
            }
            return;
        }
        let buf = Bytes::copy_from_slice(bytes);
        let publication = match decode(&buf) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, channel = channel_name, "dropped a publication that is not ours");
                return;
            }
        };
        if publication.incarnation == self.incarnation {
            return;
        }
        let Some(conversation) = self.conversation_of(channel_name) else { return };
        let messages = publication
            .entries
            .iter()
            .map(|e| Sequenced { seq: e.seq, inserted_at_us: e.inserted_at_us, payload: buf.slice_ref(e.payload) })
            .collect();
        (self.sink)(FabricEvent::Remote { conversation, messages });
    }

    /// The watched conversation a channel name belongs to.
    fn conversation_of(&self, channel_name: &str) -> Option<Uuid> {
        let tag = channel_name.strip_prefix(&self.prefix)?.strip_prefix("t:{")?.strip_suffix('}')?;
        Uuid::parse_str(tag).ok().filter(|c| self.watched.contains_key(c))
    }
}

/// Runs a (un)subscribe with the longer timeout its confirmation may take, then polls again.
fn confirmed(
    ps: &mut redis::PubSub<'_>,
    f: impl FnOnce(&mut redis::PubSub<'_>) -> redis::RedisResult<()>,
) -> redis::RedisResult<()> {
    ps.set_read_timeout(Some(limits::REDIS_TIMEOUT))?;
    f(ps)?;
    ps.set_read_timeout(Some(POLL))
}
