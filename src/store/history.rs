//! History reads: pages of a conversation, newest first by cursor, returned oldest first.
//! Served by a reader thread with its own read-only connection so no core blocks on disk.

use std::thread::JoinHandle;

use crossbeam_channel::{Sender, TrySendError};
use rusqlite::{params, Connection};
use uuid::Uuid;

use super::schema;
use super::Message;
use crate::limits;

/// One history request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Conversation.
    pub conversation: Uuid,
    /// Only messages older than this message id (a cursor from an earlier page; any UUID works
    /// as an upper bound, since ids are UUIDv7 in commit order).
    pub before: Option<Uuid>,
    /// Page size (1..=[`limits::HISTORY_LIMIT_MAX`] from the API; a recovery read asks more).
    pub limit: usize,
    /// Instead of the newest page: the oldest `limit` messages newer than this id (a client's
    /// last seen message, on rejoin), oldest first; `before` and `next_before` are unused.
    pub after: Option<Uuid>,
}

/// A page of history.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HistoryPage {
    /// Oldest first.
    pub messages: Vec<Message>,
    /// Cursor for the next (older) page, when there are older messages.
    pub next_before: Option<Uuid>,
}

/// Why a history read failed (503).
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// SQLite failed.
    #[error("storage unavailable: {0}")]
    Storage(#[from] rusqlite::Error),
    /// PostgreSQL failed.
    #[error("storage unavailable: {0}")]
    Postgres(::postgres::Error),
    /// PostgreSQL is unreachable (the reader reconnects with back-off).
    #[error("storage unavailable: database unreachable")]
    Unavailable,
}

/// Newest rows older than the cursor from each table; the caller merges the two. Ids are
/// UUIDv7 in commit order, so `id < before` is "older than that message" (any UUID works as a
/// bound). A row can be in both tables for a while after it is merged; the `recent` side skips
/// those. `recent` has no conversation index: it holds only the rows of the last sweep or two.
const PAGE: &str = "SELECT * FROM (SELECT id, sender_id, body, inserted_at FROM messages
         WHERE conversation_id = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3)
     UNION ALL
     SELECT * FROM (SELECT id, sender_id, body, inserted_at FROM recent r
         WHERE conversation_id = ?1 AND id < ?2
           AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = r.conversation_id AND m.id = r.id)
         ORDER BY id DESC LIMIT ?3)";

/// The oldest rows newer than a message from each table (a recovery read), as [`PAGE`].
const AFTER: &str = "SELECT * FROM (SELECT id, sender_id, body, inserted_at FROM messages
         WHERE conversation_id = ?1 AND id > ?2 ORDER BY id ASC LIMIT ?3)
     UNION ALL
     SELECT * FROM (SELECT id, sender_id, body, inserted_at FROM recent r
         WHERE conversation_id = ?1 AND id > ?2
           AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = r.conversation_id AND m.id = r.id)
         ORDER BY id ASC LIMIT ?3)";

/// Reads one page in one read transaction (a consistent snapshot of both tables).
pub fn read_history(conn: &mut Connection, q: &HistoryQuery) -> Result<HistoryPage, HistoryError> {
    let tx = conn.transaction()?;
    let (sql, bound) = match q.after {
        Some(after) => (AFTER, after),
        None => (PAGE, q.before.unwrap_or(Uuid::max())),
    };
    let mut messages: Vec<Message> = {
        let mut stmt = tx.prepare_cached(sql)?;
        let mapped = stmt.query_map(params![q.conversation.as_bytes(), bound.as_bytes(), q.limit as i64 + 1], |r| {
            let blob = |i: usize| -> rusqlite::Result<Uuid> {
                let b: Vec<u8> = r.get(i)?;
                Uuid::from_slice(&b)
                    .map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Blob, e.into()))
            };
            Ok(Message {
                id: blob(0)?,
                conversation: q.conversation,
                sender: blob(1)?,
                body: r.get(2)?,
                inserted_at_us: r.get(3)?,
                seq: 0,
            })
        })?;
        mapped.collect::<Result<_, _>>()?
    };
    tx.commit()?;
    if q.after.is_some() {
        messages.sort_unstable_by_key(|m| m.id);
        messages.truncate(q.limit);
        return Ok(HistoryPage { messages, next_before: None });
    }
    messages.sort_unstable_by_key(|m| std::cmp::Reverse(m.id));
    let more = messages.len() > q.limit;
    messages.truncate(q.limit);
    messages.reverse();
    let next_before = if more { messages.first().map(|m| m.id) } else { None };
    Ok(HistoryPage { messages, next_before })
}

/// A history job and where its answer goes.
pub struct HistoryJob {
    /// The query.
    pub query: HistoryQuery,
    /// Called on the reader thread with the result.
    pub reply: Box<dyn FnOnce(Result<HistoryPage, HistoryError>) + Send>,
}

/// The cores' handle to the reader thread.
#[derive(Clone)]
pub struct ReaderHandle {
    tx: Sender<HistoryJob>,
}

impl std::fmt::Debug for ReaderHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReaderHandle").finish_non_exhaustive()
    }
}

impl ReaderHandle {
    /// A handle and the queue its reader threads take jobs from
    /// ([`limits::READER_QUEUE_MAX`] jobs).
    pub(crate) fn channel() -> (ReaderHandle, crossbeam_channel::Receiver<HistoryJob>) {
        let (tx, rx) = crossbeam_channel::bounded::<HistoryJob>(limits::READER_QUEUE_MAX);
        (ReaderHandle { tx }, rx)
    }

    /// Queues a job without blocking; gives it back when the queue is full.
    pub fn try_submit(&self, job: HistoryJob) -> Result<(), HistoryJob> {
        self.tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(j) | TrySendError::Disconnected(j) => j,
        })
    }
}

/// Starts the reader thread on a read-only connection to `path`.
pub fn spawn_reader(path: &std::path::Path) -> Result<(ReaderHandle, JoinHandle<()>), schema::OpenError> {
    let mut conn = schema::open_reader(path)?;
    let (handle, rx) = ReaderHandle::channel();
    let spawned = std::thread::Builder::new().name("reader".into()).spawn(move || {
        for job in rx {
            (job.reply)(read_history(&mut conn, &job.query));
        }
    });
    let join = spawned.map_err(|source| schema::OpenError::Thread { name: "reader", source })?;
    Ok((handle, join))
}

#[cfg(test)]
mod tests {
    use super::super::schema::{open_writer, Sync};
    use super::super::{Committed, Origin, SqliteStore, Store};
    use super::*;

    fn msg(conv: Uuid, n: i64) -> Committed {
        let message = Message {
            id: Uuid::now_v7(),
            conversation: conv,
            sender: Uuid::nil(),
            body: format!("m{n}"),
            inserted_at_us: 1_000 + n,
            seq: 0,
        };
        Committed { message, origin: Some(Origin { core: 0, ticket: 0 }) }
    }

    /// A writer store on a new database in its own temp dir.
    fn fresh_store(name: &str) -> (SqliteStore, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("nexus-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("db");
        (SqliteStore::new(open_writer(&path, Sync::Normal, None).expect("open")).expect("store"), path)
    }

    #[test]
    fn pages_span_both_tables_oldest_first() {
        let (mut store, path) = fresh_store("history");
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut batch: Vec<Committed> = (0..10).map(|n| msg(if n % 2 == 0 { a } else { b }, n)).collect();
        store.commit(&mut batch[..6]).expect("commit");
        store.maintain(true); // rows 0..6 move to `messages`
        store.commit(&mut batch[6..]).expect("commit"); // rows 6..10 stay in `recent`
        let mut reader = schema::open_reader(&path).expect("reader");
        let q = HistoryQuery { conversation: a, before: None, limit: 3, after: None };
        let page = read_history(&mut reader, &q).expect("page");
        let bodies: Vec<&str> = page.messages.iter().map(|m| m.body.as_str()).collect();
        assert_eq!(bodies, ["m4", "m6", "m8"]);
        let q2 = HistoryQuery { before: page.next_before, ..q.clone() };
        let page2 = read_history(&mut reader, &q2).expect("page 2");
        let bodies: Vec<&str> = page2.messages.iter().map(|m| m.body.as_str()).collect();
        assert_eq!((bodies, page2.next_before), (vec!["m0", "m2"], None));
        // Any id is a bound: b's messages older than a's cursor.
        let other = HistoryQuery { conversation: b, before: page.next_before, limit: 3, after: None };
        let bodies: Vec<String> =
            read_history(&mut reader, &other).expect("page").messages.into_iter().map(|m| m.body).collect();
        assert_eq!(bodies, ["m1", "m3"]);
        let empty = HistoryQuery { conversation: Uuid::new_v4(), before: None, limit: 3, after: None };
        assert_eq!(read_history(&mut reader, &empty).expect("empty"), HistoryPage::default());
    }

    /// Merge steps that always find requests waiting stop after every few hundred rows, in
    /// the middle of a conversation; the sweep must still move every row exactly once, delete
    /// `recent` only behind it, and history must see every message at every point.
    #[test]
    fn preempted_merge_steps_lose_and_duplicate_nothing() {
        let (mut store, path) = fresh_store("preempt");
        store.set_waiting_probe(Box::new(|| true));
        let convs = [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()];
        let mut reader = schema::open_reader(&path).expect("reader");
        let all_bodies = |reader: &mut rusqlite::Connection, conv: Uuid| {
            let mut bodies = Vec::new();
            let mut before = None;
            loop {
                let q = HistoryQuery { conversation: conv, before, limit: 200, after: None };
                let page = read_history(reader, &q).expect("page");
                let mut chunk: Vec<String> = page.messages.into_iter().map(|m| m.body).collect();
                chunk.extend(bodies);
                bodies = chunk;
                match page.next_before {
                    Some(b) => before = Some(b),
                    None => return bodies,
                }
            }
        };
        let expected = |conv: usize, upto: i64| -> Vec<String> {
            (0..upto).filter(|n| *n as usize % convs.len() == conv).map(|n| format!("m{n}")).collect()
        };
        let mut n = 0;
        for round in 0..4 {
            let mut batch: Vec<Committed> = (n..n + 1_500).map(|i| msg(convs[i as usize % convs.len()], i)).collect();
            store.commit(&mut batch).expect("commit");
            n += 1_500;
            // A few preempted steps per round, then check history mid-sweep.
            for _ in 0..3 + round {
                store.maintain(true);
            }
            for (c, conv) in convs.iter().enumerate() {
                assert_eq!(all_bodies(&mut reader, *conv), expected(c, n), "round {round}, conversation {c}");
            }
        }
        for _ in 0..500 {
            store.maintain(true);
        }
        let count = |sql: &str| reader.query_row(sql, [], |r| r.get::<_, i64>(0)).expect("count");
        assert_eq!(count("SELECT count(*) FROM messages"), n);
        assert_eq!(count("SELECT count(*) FROM recent"), 1, "recent keeps only its newest row");
        for (c, conv) in convs.iter().enumerate() {
            assert_eq!(all_bodies(&mut reader, *conv), expected(c, n));
        }
        // A restart reads the stamper's floor from that row, not from a scan of `messages`.
        drop(store);
        let reopened = SqliteStore::new(open_writer(&path, Sync::Normal, None).expect("reopen")).expect("store");
        assert_eq!(crate::store::Store::last_inserted_at_us(&reopened), 1_000 + n - 1);
    }
}
