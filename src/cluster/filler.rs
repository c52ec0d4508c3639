//! filler: reads from PostgreSQL what Redis did not bring.
//!
//! One thread with its own connection answers the cores' reads, each through the reply the
//! request carries (as history requests are answered): the heads of conversations (where a
//! newly watched conversation starts, and the periodic catch-up that bounds the delay of any
//! lost publication) and ranges of a conversation's messages (a gap's fill). A full queue
//! refuses at once; the core asks again at its next gap check.

use crossbeam_channel::Sender;
use uuid::Uuid;

use crate::store::{Head, Message, PgFillReader, StoreError};

/// What a core asks the filler.
pub enum FillRequest {
    /// The heads of these conversations.
    Heads {
        /// The conversations.
        conversations: Vec<Uuid>,
        /// Where the answer goes.
        reply: Box<dyn FnOnce(Result<Vec<Head>, StoreError>) + Send>,
    },
    /// At most `limit` messages of `conversation` stored after `after` and before `before`
    /// (µs; `None`: up to the newest), oldest first.
    Range {
        /// The conversation.
        conversation: Uuid,
        /// Exclusive lower bound on `inserted_at`.
        after: i64,
        /// Exclusive upper bound on `inserted_at`, if any.
        before: Option<i64>,
        /// Most messages to read.
        limit: usize,
        /// Where the answer goes.
        reply: Box<dyn FnOnce(Result<Vec<Message>, StoreError>) + Send>,
    },
}

/// The cores' handle to the filler thread.
#[derive(Clone)]
pub struct Filler {
    tx: Sender<FillRequest>,
}

impl std::fmt::Debug for Filler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filler").field("queued", &self.tx.len()).finish()
    }
}

/// The filler's queue is full or its thread is gone: ask again later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the gap-fill reader is not taking requests")]
pub struct Busy;

impl Filler {
    /// Queues a read without blocking.
    pub fn try_request(&self, request: FillRequest) -> Result<(), Busy> {
        self.tx.try_send(request).map_err(|_| Busy)
    }

    /// Reads waiting for the thread.
    pub fn queued(&self) -> usize {
        self.tx.len()
    }
}

/// Starts the filler thread on `reader`, holding at most `queue` requests. It ends when every
/// [`Filler`] is dropped.
pub fn spawn_filler(mut reader: PgFillReader, queue: usize) -> std::io::Result<Filler> {
    let (tx, rx) = crossbeam_channel::bounded::<FillRequest>(queue.max(1));
    std::thread::Builder::new().name("filler".into()).spawn(move || {
        for request in rx {
            match request {
                FillRequest::Heads { conversations, reply } => reply(reader.heads(&conversations)),
                FillRequest::Range { conversation, after, before, limit, reply } => {
                    reply(reader.range(conversation, after, before, limit));
                }
            }
        }
    })?;
    Ok(Filler { tx })
}
