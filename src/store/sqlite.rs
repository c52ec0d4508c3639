//! The SQLite store: the writer thread's only connection (see [`super::schema`] for the
//! two-table design).

use std::time::Instant;

use rusqlite::{params, Connection, TransactionBehavior};

use super::{Committed, Store, StoreError};
use crate::limits;

const INSERT_RECENT: &str = "INSERT INTO recent (seq, id, conversation_id, sender_id, body, inserted_at)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// Moves the oldest rows of `recent` into `messages`, sorted by conversation so consecutive
/// inserts hit the same index leaf.
const MERGE: &str = "INSERT INTO messages (seq, id, conversation_id, sender_id, body, inserted_at)
     SELECT seq, id, conversation_id, sender_id, body, inserted_at FROM recent WHERE seq <= ?1
     ORDER BY conversation_id, seq";
const MERGE_DELETE: &str = "DELETE FROM recent WHERE seq <= ?1";

/// Writer-side store over one SQLite connection.
pub struct SqliteStore {
    conn: Connection,
    /// Next `seq` to assign (seq is the commit order; never exposed).
    next_seq: i64,
    /// Rows currently in `recent` (seqs `next_seq - recent_rows .. next_seq`).
    recent_rows: i64,
    last_inserted_at_us: i64,
    /// Consecutive failed merges (a full disk keeps failing; log the first and then rarely).
    merge_failures: u32,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("next_seq", &self.next_seq).field("recent_rows", &self.recent_rows).finish()
    }
}

impl SqliteStore {
    /// Wraps a connection from [`super::schema::open_writer`].
    pub fn new(conn: Connection) -> Result<SqliteStore, rusqlite::Error> {
        let (max_seq, last_at): (i64, i64) = conn.query_row(
            "SELECT max(coalesce((SELECT max(seq) FROM messages), 0), coalesce((SELECT max(seq) FROM recent), 0)),
                    max(coalesce((SELECT max(inserted_at) FROM messages), 0),
                        coalesce((SELECT max(inserted_at) FROM recent), 0))",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let recent_rows: i64 = conn.query_row("SELECT count(*) FROM recent", [], |r| r.get(0))?;
        Ok(SqliteStore { conn, next_seq: max_seq + 1, recent_rows, last_inserted_at_us: last_at, merge_failures: 0 })
    }

    fn insert(&mut self, batch: &[Committed]) -> Result<(), rusqlite::Error> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut stmt = tx.prepare_cached(INSERT_RECENT)?;
            for (i, c) in batch.iter().enumerate() {
                let m = &c.message;
                stmt.execute(params![
                    self.next_seq + i as i64,
                    m.id.as_bytes(),
                    m.conversation.as_bytes(),
                    m.sender.as_bytes(),
                    m.body,
                    m.inserted_at_us
                ])?;
            }
        }
        tx.commit()
    }

    /// Moves up to [`limits::MERGE_ROWS`] of the oldest `recent` rows into `messages`.
    fn merge(&mut self) -> Result<(), rusqlite::Error> {
        let first = self.next_seq - self.recent_rows;
        let upto = (first + limits::MERGE_ROWS as i64 - 1).min(self.next_seq - 1);
        let started = Instant::now();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let moved = tx.prepare_cached(MERGE)?.execute([upto])?;
        tx.prepare_cached(MERGE_DELETE)?.execute([upto])?;
        tx.commit()?;
        self.recent_rows -= moved as i64;
        tracing::debug!(rows = moved, ms = started.elapsed().as_millis() as u64, "merged recent rows into history");
        Ok(())
    }
}

impl Store for SqliteStore {
    fn commit(&mut self, batch: &[Committed]) -> Result<(), StoreError> {
        match self.insert(batch) {
            Ok(()) => {
                self.next_seq += batch.len() as i64;
                self.recent_rows += batch.len() as i64;
                if let Some(last) = batch.last() {
                    self.last_inserted_at_us = last.message.inserted_at_us;
                }
                Ok(())
            }
            // The transaction rolled back (dropped uncommitted): seq stays where it was.
            Err(e) => Err(StoreError(e.to_string())),
        }
    }

    fn maintain(&mut self, idle: bool) {
        let due = self.recent_rows >= limits::MERGE_ROWS as i64 || (idle && self.recent_rows > 0);
        if !due {
            return;
        }
        match self.merge() {
            Ok(()) if self.merge_failures > 0 => {
                tracing::info!(failures = self.merge_failures, "moving recent rows into history works again");
                self.merge_failures = 0;
            }
            Ok(()) => {}
            Err(e) => {
                if self.merge_failures % 1000 == 0 {
                    tracing::warn!(error = %e, failures = self.merge_failures + 1, "moving recent rows into history failed; will retry");
                }
                self.merge_failures += 1;
            }
        }
    }

    fn last_inserted_at_us(&self) -> i64 {
        self.last_inserted_at_us
    }
}
