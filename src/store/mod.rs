//! The message path's storage boundary: the writer thread that sequences every `new_msg`,
//! stamps its id and time, commits it through a [`Store`], and hands results back to the cores.
//!
//! The writer is the single sequencer of messages: whatever order it commits is the order every
//! core broadcasts, because each writer→core mailbox is FIFO. That is what gives every member of
//! a topic one order, on every core.

mod history;
pub mod schema;
mod sqlite;
pub mod stats;
mod writer;

use std::sync::Arc;

use uuid::Uuid;

pub use history::{read_history, spawn_reader, HistoryError, HistoryJob, HistoryPage, HistoryQuery, ReaderHandle};
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
}

/// A message the writer has stamped and committed, with where to acknowledge it.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The message.
    pub message: Message,
    /// Where to acknowledge.
    pub origin: Origin,
}

/// One commit's outcome, sent to every core.
#[derive(Debug)]
pub struct CommitBatch {
    /// The batch, in commit order.
    pub messages: Vec<Committed>,
    /// `Some(detail)` when the commit failed: nothing may be broadcast and every request gets
    /// `Failed to save` with this detail.
    pub failure: Option<&'static str>,
}

/// Persistence behind the writer thread. `commit` must be all-or-nothing for the batch.
pub trait Store: Send {
    /// Commits `batch` durably (per the store's sync policy) or fails as a whole.
    fn commit(&mut self, batch: &[Committed]) -> Result<(), StoreError>;

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

/// A failed commit (the batch is answered `storage unavailable`; nothing of it is stored).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused the transaction (disk full, `NEXUS_DB_MAX_BYTES` reached, I/O error...).
    #[error("storage unavailable: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// Receives each batch the writer finishes (the server fans it out to the core mailboxes).
pub type BatchSink = Box<dyn FnMut(Arc<CommitBatch>) + Send>;
