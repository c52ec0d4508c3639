//! The message path's storage boundary: the writer thread that sequences every `new_msg`,
//! stamps its id and time, commits it through a [`Store`], and hands results back to the cores.
//!
//! The writer is the single sequencer of each conversation's messages: whatever order it
//! commits them in is the order every core broadcasts, because each writer→core mailbox is
//! FIFO. That is what gives every member of a topic one order, on every core. (With PostgreSQL
//! the writer runs several lanes, each owning a share of the conversations.)

mod history;
mod postgres;
pub mod schema;
mod sqlite;
pub mod stats;
mod writer;

use std::sync::Arc;

use bytes::Bytes;
use uuid::Uuid;

pub use history::{read_history, spawn_reader, HistoryError, HistoryJob, HistoryPage, HistoryQuery, ReaderHandle};
pub use postgres::{spawn_readers as spawn_pg_readers, Head, PgFillReader, PgStore, PgTarget};
pub use sqlite::SqliteStore;
pub use writer::{spawn_writer, StoreHandle, SubmitError, WriterStopper};

/// Where the answer to a request goes: the core that holds the sender's connection and the
/// key of the pending acknowledgement there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// Core index.
    pub core: u16,
    /// Pending-ack key on that core.
    pub ticket: u32,
}

/// A message a core asks the writer to persist.
#[derive(Debug)]
pub struct InsertRequest {
    /// Conversation (topic) id.
    pub conversation: Uuid,
    /// Sender's user id.
    pub sender: Uuid,
    /// Message text.
    pub body: String,
    /// Where to acknowledge.
    pub origin: Origin,
}

/// A stored chat message (what `new_msg` broadcasts and history returns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// UUIDv7, increasing in commit order.
    pub id: Uuid,
    /// Conversation (topic) id.
    pub conversation: Uuid,
    /// Sender's user id.
    pub sender: Uuid,
    /// Message text.
    pub body: String,
    /// Microseconds since the epoch, strictly increasing in commit order.
    pub inserted_at_us: i64,
    /// The message's place in its conversation, 1, 2, 3, … without gaps, where the store
    /// numbers them (PostgreSQL, so that cluster nodes can tell a gap from a repeat); 0 where it
    /// does not (SQLite).
    pub seq: u64,
}

/// A message the writer has stamped and committed, with where to acknowledge it.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The message.
    pub message: Message,
    /// Where to acknowledge; `None` for a message whose sender was already answered (a commit
    /// found committed only after its batch was answered `storage unavailable`).
    pub origin: Option<Origin>,
}

/// One commit's outcome, sent to every core.
#[derive(Debug)]
pub struct CommitBatch {
    /// The batch, in commit order.
    pub messages: Vec<Committed>,
    /// Each message's `new_msg` broadcast payload, in the same order (empty on failure):
    /// encoded once, on the writer's thread, for every core and every other node.
    pub payloads: Vec<Bytes>,
    /// `Some(detail)` when the commit failed: nothing may be broadcast and every request gets
    /// `Failed to save` with this detail.
    pub failure: Option<&'static str>,
}

impl CommitBatch {
    /// A committed batch, its broadcast payloads encoded.
    pub fn committed(messages: Vec<Committed>) -> CommitBatch {
        let payloads = messages.iter().map(|c| Bytes::from(crate::chat::new_msg_payload(&c.message))).collect();
        CommitBatch { messages, payloads, failure: None }
    }

    /// A batch whose commit failed with `detail`: answered, never broadcast.
    pub fn failed(messages: Vec<Committed>, detail: &'static str) -> CommitBatch {
        CommitBatch { messages, payloads: Vec::new(), failure: Some(detail) }
    }
}

/// Persistence behind the writer thread. `commit` must be all-or-nothing for the batch.
pub trait Store: Send {
    /// Commits `batch` durably (per the store's sync policy) or fails as a whole. The writer
    /// stamps every message first; a store that orders messages itself (PostgreSQL)
    /// overwrites the ids and times with its own.
    fn commit(&mut self, batch: &mut [Committed]) -> Result<(), StoreError>;

    /// Messages found committed after their batch was answered as failed, to broadcast now.
    fn take_late(&mut self) -> Vec<Committed> {
        Vec::new()
    }

    /// Background work between batches (`idle`: nothing is waiting). Must stay short: the
    /// writer does it on its own thread while requests queue.
    fn maintain(&mut self, _idle: bool) {}

    /// Gives the store a probe that says whether requests are waiting, so background work can
    /// stop early and let them through (the writer installs it once).
    fn set_waiting_probe(&mut self, _probe: Box<dyn Fn() -> bool + Send>) {}

    /// The newest `inserted_at` already stored, so stamps keep increasing across restarts
    /// even if the clock stepped back.
    fn last_inserted_at_us(&self) -> i64 {
        0
    }
}

/// A failed commit: the batch is answered `storage unavailable` and nothing of it is
/// broadcast.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused the transaction (disk full, `NEXUS_DB_MAX_BYTES` reached, I/O error...).
    #[error("storage unavailable: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL refused the batch; it was not committed.
    #[error("storage unavailable: {0}")]
    Postgres(::postgres::Error),
    /// The database is unreachable (or its answer to this batch was lost and could not be
    /// looked up in time; it is looked up again later).
    #[error("storage unavailable: database unreachable")]
    Unavailable,
    /// The connection was lost during the commit, and the batch turned out not committed.
    #[error("storage unavailable: connection lost, batch not committed")]
    NotCommitted,
    /// The database answered something the batch cannot match (a bug, not an outage).
    #[error("storage inconsistent: {0}")]
    Inconsistent(&'static str),
}

/// Receives each batch the writer lanes finish (the server fans it out to the core mailboxes).
pub type BatchSink = Arc<dyn Fn(Arc<CommitBatch>) + Send + Sync>;
