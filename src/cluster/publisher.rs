//! fabric-out: hands this node's committed messages to the other nodes, over Redis.
//!
//! The writer's sink offers every committed batch; a thread of its own groups it by
//! conversation and sends one `PUBLISH` per conversation on that conversation's channel, all of
//! a batch in one pipeline (one round trip). Each message's broadcast payload is encoded here
//! once for the whole cluster.
//!
//! Publishing only speeds delivery up: every message is already committed, and a node that
//! misses a publication (a full queue here, Redis down, a subscriber cut) reads it from
//! PostgreSQL when it sees the gap or at its next catch-up. So nothing here blocks the writer
//! or retries: a batch that cannot be published now is dropped and counted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use uuid::Uuid;

use super::command::{self, Command};
use super::connect;
use super::publication::{encode, Entry};
use crate::backoff::Backoff;
use crate::limits;
use crate::store::{CommitBatch, Message};

/// The channel a conversation's messages are published on. The conversation is a hash tag, so
/// a Redis Cluster keeps each conversation's channel and keys on one shard.
pub fn channel(prefix: &str, conversation: Uuid) -> String {
    format!("{prefix}t:{{{conversation}}}")
}

/// What the publisher did, for `/metrics`.
#[derive(Debug, Default)]
pub struct PublishStats {
    /// Conversations' publications sent.
    pub published: AtomicU64,
    /// Batches not published (queue full or Redis down); other nodes read them from the
    /// database.
    pub dropped: AtomicU64,
    /// Whether the last attempt reached Redis (true until one fails).
    pub up: AtomicBool,
}

/// What the publisher sends.
enum Outgoing {
    /// A committed batch: one publication per conversation.
    Batch(Arc<CommitBatch>),
    /// A server API command for the other nodes.
    Command(Command),
}

/// The writer's side of the publisher.
#[derive(Debug, Clone)]
pub struct Publisher {
    tx: Sender<Outgoing>,
    stats: Arc<PublishStats>,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outgoing::Batch(b) => write!(f, "Batch({} messages)", b.messages.len()),
            Outgoing::Command(c) => write!(f, "{c:?}"),
        }
    }
}

impl Publisher {
    /// Queues a committed batch for publishing; never blocks (a full queue drops it).
    pub fn offer(&self, batch: &Arc<CommitBatch>) {
        if batch.failure.is_some() || batch.messages.is_empty() {
            return;
        }
        // Full, or the thread is gone: either way other nodes read this batch from the database.
        if self.tx.try_send(Outgoing::Batch(Arc::clone(batch))).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queues a command for the other nodes; `false` when the queue is full.
    pub fn command(&self, command: Command) -> bool {
        self.tx.try_send(Outgoing::Command(command)).is_ok()
    }

    /// Batches waiting to be published.
    pub fn queued(&self) -> usize {
        self.tx.len()
    }

    /// What it did so far.
    pub fn stats(&self) -> &PublishStats {
        &self.stats
    }
}

/// Starts the publisher thread for `client`'s Redis, naming this node's `incarnation` in every
/// publication and holding at most `queue` batches. It ends when every [`Publisher`] is dropped.
pub fn spawn_publisher(
    client: redis::Client,
    prefix: String,
    incarnation: String,
    queue: usize,
) -> std::io::Result<Publisher> {
    let (tx, rx) = crossbeam_channel::bounded(queue.max(1));
    let stats = Arc::new(PublishStats { up: AtomicBool::new(true), ..PublishStats::default() });
    let recorder = Arc::clone(&stats);
    std::thread::Builder::new()
        .name("fabric-out".into())
        .spawn(move || run(&client, &prefix, &incarnation, &rx, &recorder))?;
    Ok(Publisher { tx, stats })
}

fn run(client: &redis::Client, prefix: &str, incarnation: &str, rx: &Receiver<Outgoing>, stats: &PublishStats) {
    let mut conn: Option<redis::Connection> = None;
    let mut reconnect = Backoff::new(limits::RECONNECT_BACKOFF_MIN, limits::RECONNECT_BACKOFF_MAX);
    // Said once per outage.
    let mut warned = false;
    for outgoing in rx.iter() {
        if conn.is_none() && reconnect.ready() {
            match connect(client) {
                Ok(c) => {
                    tracing::info!("publishing to Redis");
                    conn = Some(c);
                    reconnect.succeeded();
                    warned = false;
                }
                Err(e) => {
                    stats.up.store(false, Ordering::Relaxed);
                    if !std::mem::replace(&mut warned, true) {
                        tracing::warn!(error = %e, "Redis unreachable: other nodes read this node's messages from the database");
                    }
                    reconnect.failed();
                }
            }
        }
        let Some(c) = conn.as_mut() else {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let publications = match &outgoing {
            Outgoing::Batch(batch) => publications(prefix, incarnation, batch),
            Outgoing::Command(command) => vec![(command::channel(prefix), command.encode(incarnation))],
        };
        let mut pipe = redis::pipe();
        for (channel, bytes) in &publications {
            pipe.cmd("PUBLISH").arg(channel).arg(bytes.as_slice()).ignore();
        }
        match pipe.query::<()>(c) {
            Ok(()) => {
                stats.up.store(true, Ordering::Relaxed);
                stats.published.fetch_add(publications.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(error = %e, "publishing to Redis failed: reconnecting");
                stats.up.store(false, Ordering::Relaxed);
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                conn = None;
            }
        }
    }
}

/// One publication per conversation of `batch`, on its channel, its messages in commit order.
pub fn publications(prefix: &str, incarnation: &str, batch: &CommitBatch) -> Vec<(String, Vec<u8>)> {
    let mut messages: Vec<(&Message, &[u8])> =
        batch.messages.iter().zip(&batch.payloads).map(|(c, p)| (&c.message, &p[..])).collect();
    messages.sort_by_key(|(m, _)| m.conversation); // stable: commit order within one
    messages
        .chunk_by(|(a, _), (b, _)| a.conversation == b.conversation)
        .map(|run| {
            let entries: Vec<Entry<'_>> = run
                .iter()
                .map(|(m, payload)| Entry { seq: m.seq, inserted_at_us: m.inserted_at_us, payload })
                .collect();
            (channel(prefix, run[0].0.conversation), encode(incarnation, &entries))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::publication::decode;
    use super::*;
    use crate::chat::new_msg_payload;
    use crate::store::Committed;

    fn committed(conversation: Uuid, seq: u64) -> Committed {
        let message = Message {
            id: crate::ids::v7(1_764_000_000_000_000 + seq as i64, seq),
            conversation,
            sender: Uuid::nil(),
            body: format!("m{seq}"),
            inserted_at_us: 1_764_000_000_000_000 + seq as i64,
            seq,
        };
        Committed { message, origin: None }
    }

    #[test]
    fn one_publication_per_conversation_in_commit_order() {
        let (a, b) = (Uuid::from_u128(2), Uuid::from_u128(1));
        let messages = vec![committed(a, 4), committed(b, 9), committed(a, 5)];
        let batch = CommitBatch::committed(messages.clone());
        let out = publications("nx:", "n1/1", &batch);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0, format!("nx:t:{{{b}}}"));
        assert_eq!(out[1].0, format!("nx:t:{{{a}}}"));
        let p = decode(&out[1].1).expect("decodes");
        assert_eq!(p.incarnation, "n1/1");
        let seqs: Vec<u64> = p.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [4, 5]);
        assert_eq!(p.entries[1].payload, new_msg_payload(&messages[2].message));
        assert_eq!(p.entries[1].inserted_at_us, messages[2].message.inserted_at_us);
    }
}
