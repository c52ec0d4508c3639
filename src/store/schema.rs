//! Database schema and its migrations (`PRAGMA user_version`), and opening connections with
//! the pragmas the writer and readers need.
//!
//! Two tables (all `STRICT`, ids as 16-byte BLOBs, smaller and faster to compare than text):
//! - `recent`: what the writer commits to, in commit order (`seq`, the rowid). No secondary
//!   index, so a commit only appends at the right edge of one b-tree (a `(conversation_id,
//!   seq)` index on the commit path capped the writer near 60k rows/s once a batch spanned
//!   thousands of conversations; without it, 1.2M rows/s: BENCHMARKS.md, "Measured facts").
//! - `messages`: the history, clustered by `(conversation_id, id)` (`WITHOUT ROWID`): a history
//!   page is one range scan, and there is no other index to maintain. Message ids are UUIDv7
//!   assigned in commit order, so id order is commit order. The writer moves rows into it
//!   grouped by conversation, so each leaf is written once per many rows (see
//!   [`super::SqliteStore`]).
//!
//! History reads query both inside one read transaction (a consistent snapshot).

use std::path::Path;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rusqlite::{Connection, OpenFlags};

use crate::limits;

/// Schema version this build writes; a newer database is refused.
pub const SCHEMA_VERSION: i64 = 1;

const MIGRATIONS: &[&str] = &[
    // 1: recent (commit log) + messages (history clustered by conversation).
    "CREATE TABLE recent (
        seq INTEGER PRIMARY KEY,
        id BLOB NOT NULL,
        conversation_id BLOB NOT NULL,
        sender_id BLOB NOT NULL,
        body TEXT NOT NULL,
        inserted_at INTEGER NOT NULL
     ) STRICT;
     CREATE TABLE messages (
        conversation_id BLOB NOT NULL,
        id BLOB NOT NULL,
        sender_id BLOB NOT NULL,
        body TEXT NOT NULL,
        inserted_at INTEGER NOT NULL,
        PRIMARY KEY (conversation_id, id)
     ) STRICT, WITHOUT ROWID;",
];

const _: () = assert!(MIGRATIONS.len() as i64 == SCHEMA_VERSION);

/// Durability of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// `synchronous=NORMAL`: survives a process crash (kill -9); the last commits may be lost on
    /// power failure.
    Normal,
    /// `synchronous=FULL`: survives power loss.
    Full,
}

/// Why the database could not be opened (reported as one line, exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// SQLite refused (unreadable, not a database, corrupt, locked, ...).
    #[error("cannot open database {path}: {source}")]
    Sqlite {
        /// File path.
        path: String,
        /// Cause.
        source: rusqlite::Error,
    },
    /// The file is not in WAL mode and cannot be switched to it (e.g. a read-only directory,
    /// or a file system without shared memory).
    #[error("database {path} cannot use WAL mode (journal_mode is {mode})")]
    NotWal {
        /// File path.
        path: String,
        /// The journal mode SQLite reported.
        mode: String,
    },
    /// A database thread could not be started.
    #[error("cannot start the {name} thread: {source}")]
    Thread {
        /// Which thread.
        name: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// `NEXUS_DATABASE_URL` cannot be parsed.
    #[error("{why}")]
    BadUrl {
        /// What is wrong (never the URL itself: it may hold a password).
        why: String,
    },
    /// PostgreSQL could not be reached or refused the schema work.
    #[error("cannot use PostgreSQL at {target}: {source}")]
    Postgres {
        /// The database, without its password.
        target: String,
        /// Cause.
        source: postgres::Error,
    },
    /// The file was written by a newer Nexus.
    #[error("database {path} has schema version {found}, newer than this nexus supports")]
    TooNew {
        /// File path.
        path: String,
        /// Version found.
        found: i64,
    },
}

/// Opens (creating if needed) the database for writing and migrates it.
pub fn open_writer(path: &Path, sync: Sync, max_bytes: Option<u64>) -> Result<Connection, OpenError> {
    let err = |source| OpenError::Sqlite { path: path.display().to_string(), source };
    let conn = Connection::open(path).map_err(err)?;
    // Refuse a newer schema before changing anything in the file (journal mode included).
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(err)?;
    if found > SCHEMA_VERSION {
        return Err(OpenError::TooNew { path: path.display().to_string(), found });
    }
    // page_size only takes effect before the first table exists.
    conn.pragma_update(None, "page_size", limits::DB_PAGE_BYTES).map_err(err)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(OpenError::NotWal { path: path.display().to_string(), mode });
    }
    let sync = match sync {
        Sync::Normal => "NORMAL",
        Sync::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", sync).map_err(err)?;
    conn.pragma_update(None, "journal_size_limit", limits::WAL_SIZE_LIMIT_BYTES).map_err(err)?;
    conn.busy_timeout(limits::DB_BUSY_TIMEOUT).map_err(err)?;
    migrate(&conn).map_err(|e| match e {
        MigrateError::Sqlite(source) => err(source),
        MigrateError::TooNew(found) => OpenError::TooNew { path: path.display().to_string(), found },
    })?;
    // Checkpoints run on their own thread ([`spawn_checkpointer`]); the writer checkpoints
    // itself only if the WAL grows past this (the checkpointer stalled or cannot keep up).
    conn.pragma_update(None, "wal_autocheckpoint", limits::WAL_AUTOCHECKPOINT_PAGES).map_err(err)?;
    if let Some(bytes) = max_bytes {
        let pages = i64::try_from(bytes / u64::from(limits::DB_PAGE_BYTES)).unwrap_or(i64::MAX).max(1);
        conn.pragma_update(None, "max_page_count", pages).map_err(err)?;
    }
    Ok(conn)
}

/// How many frames the writer's WAL holds, as of the writer's last commit (shared with the
/// checkpointer, which checkpoints in proportion to what was written).
#[derive(Debug, Clone, Default)]
pub struct WalFrames(Arc<AtomicU64>);

impl WalFrames {
    /// Frames in the WAL after the last commit.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Has the writer's connection report its WAL's size after each commit (SQLite's WAL hook,
/// which replaces `wal_autocheckpoint`: the hook keeps that safety net itself, checkpointing
/// in the writer once the WAL reaches [`limits::WAL_AUTOCHECKPOINT_PAGES`]).
pub fn watch_wal(conn: &mut Connection, path: &Path) -> Result<WalFrames, OpenError> {
    let frames = WalFrames::default();
    let seen = frames.clone();
    let hook = move |wal: &mut rusqlite::hooks::Wal, pages: std::ffi::c_int| {
        seen.0.store(u64::try_from(pages).unwrap_or(0), Ordering::Relaxed);
        if i64::from(pages) >= limits::WAL_AUTOCHECKPOINT_PAGES {
            // PASSIVE, as SQLite's own autocheckpoint, and like it never an error: the commit
            // has happened, and an error returned here would be reported as the commit's own
            // (the writer would take a committed batch for rolled back). Busy (the
            // checkpointer is at it) is the common failure, and harmless.
            if let Err(e) = wal.checkpoint() {
                tracing::debug!(error = %e, "writer checkpoint skipped");
            }
        }
        Ok(())
    };
    conn.wal_hook(Some(hook)).map_err(|source| OpenError::Sqlite { path: path.display().to_string(), source })?;
    Ok(frames)
}

/// Starts the checkpointer: a thread with its own connection that copies committed WAL pages
/// into the database file (`PRAGMA wal_checkpoint(PASSIVE)`), so the writer's commits never
/// carry a checkpoint (profiled: a quarter of the writer's time when it checkpointed itself).
/// PASSIVE never blocks the writer or readers. It looks every [`limits::CHECKPOINT_INTERVAL`]
/// and checkpoints once [`limits::CHECKPOINT_MIN_FRAMES`] new frames were written, after
/// [`limits::CHECKPOINT_BACKSTOP`] with any, and again at once while a checkpoint left frames
/// behind: under load as often as before, while an almost idle server checkpoints (and
/// fsyncs) about once a second instead of after every commit.
pub fn spawn_checkpointer(path: &Path, wal: WalFrames) -> Result<(), OpenError> {
    let err = |source| OpenError::Sqlite { path: path.display().to_string(), source };
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(err)?;
    conn.busy_timeout(limits::CHECKPOINT_BUSY_TIMEOUT).map_err(err)?;
    let spawned = std::thread::Builder::new().name("checkpointer".into()).spawn(move || {
        // Frames of the current WAL already copied; whether the last checkpoint left some
        // behind (written while it ran); when it ran.
        let (mut copied, mut behind, mut last) = (0u64, false, std::time::Instant::now());
        loop {
            std::thread::sleep(limits::CHECKPOINT_INTERVAL);
            let frames = wal.get();
            // Fewer frames than copied: the WAL was restarted from its beginning.
            let new = if frames >= copied { frames - copied } else { frames };
            // Catching up matters: only a WAL copied to its end is restarted by the writer
            // (otherwise it grows until the writer checkpoints it itself).
            let due = behind
                || new >= limits::CHECKPOINT_MIN_FRAMES
                || (new > 0 && last.elapsed() >= limits::CHECKPOINT_BACKSTOP);
            if !due {
                continue;
            }
            last = std::time::Instant::now();
            let result = conn
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)));
            match result {
                Ok((log, done)) => {
                    copied = u64::try_from(done).unwrap_or(0);
                    behind = done < log;
                }
                Err(e) => tracing::debug!(error = %e, "checkpoint skipped"),
            }
        }
    });
    spawned.map(|_| ()).map_err(|source| OpenError::Thread { name: "checkpointer", source })
}

/// Opens a read-only connection for history reads (after [`open_writer`] migrated the file).
pub fn open_reader(path: &Path) -> Result<Connection, OpenError> {
    let err = |source| OpenError::Sqlite { path: path.display().to_string(), source };
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(err)?;
    conn.busy_timeout(limits::DB_BUSY_TIMEOUT).map_err(err)?;
    Ok(conn)
}

enum MigrateError {
    Sqlite(rusqlite::Error),
    TooNew(i64),
}

fn migrate(conn: &Connection) -> Result<(), MigrateError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(MigrateError::Sqlite)?;
    if version > SCHEMA_VERSION {
        return Err(MigrateError::TooNew(version));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        let next = i as i64 + 1;
        let batch = format!("BEGIN IMMEDIATE; {sql}; PRAGMA user_version = {next}; COMMIT;");
        conn.execute_batch(&batch).map_err(MigrateError::Sqlite)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("nexus-schema-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir.join("db")
    }

    #[test]
    fn migrates_once_and_refuses_newer() {
        let path = temp("newer");
        drop(open_writer(&path, Sync::Normal, None).expect("create"));
        drop(open_writer(&path, Sync::Normal, None).expect("reopen"));
        let c = Connection::open(&path).expect("open");
        c.pragma_update(None, "user_version", SCHEMA_VERSION + 1).expect("bump");
        drop(c);
        assert!(matches!(open_writer(&path, Sync::Normal, None), Err(OpenError::TooNew { .. })));
    }

    #[test]
    fn refuses_garbage() {
        let path = temp("garbage");
        std::fs::write(&path, vec![0x42u8; 8192]).expect("write");
        assert!(matches!(open_writer(&path, Sync::Normal, None), Err(OpenError::Sqlite { .. })));
    }
}

#[cfg(test)]
mod wal_hook_tests {
    use super::*;
    use crate::store::{Committed, Message, SqliteStore, Store};
    use uuid::Uuid;

    /// The writer's WAL hook checkpoints past [`limits::WAL_AUTOCHECKPOINT_PAGES`]; with a
    /// reader holding a snapshot (the WAL cannot restart and grows) and another connection
    /// checkpointing all the time (the writer's checkpoint finds it busy), every commit must
    /// still succeed: a failed checkpoint in the hook must not turn a commit into an error.
    #[test]
    fn a_busy_checkpoint_in_the_wal_hook_never_fails_a_commit() {
        let dir = std::env::temp_dir().join(format!("nexus-walhook-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("db");
        let mut db = open_writer(&path, Sync::Normal, None).expect("open");
        let wal = watch_wal(&mut db, &path).expect("hook");
        let mut store = SqliteStore::new(db).expect("store");
        let reader = open_reader(&path).expect("reader");
        reader.execute_batch("BEGIN; SELECT count(*) FROM recent;").expect("snapshot");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let checkpointer = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                let conn = Connection::open(&path).expect("open");
                while !stop.load(Ordering::Relaxed) {
                    let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
                }
            })
        };
        let conversation = Uuid::new_v4();
        let body = "x".repeat(3_000); // about a page per row
        let mut seq = 0;
        while wal.get() < 2 * limits::WAL_AUTOCHECKPOINT_PAGES as u64 {
            let mut batch: Vec<Committed> = (0..50)
                .map(|_| {
                    seq += 1;
                    let message = Message {
                        id: Uuid::now_v7(),
                        conversation,
                        sender: Uuid::nil(),
                        body: body.clone(),
                        inserted_at_us: seq,
                        seq: 0,
                    };
                    Committed { message, origin: None }
                })
                .collect();
            store.commit(&mut batch).unwrap_or_else(|e| panic!("commit at {} WAL frames: {e}", wal.get()));
        }
        stop.store(true, Ordering::Relaxed);
        checkpointer.join().expect("checkpointer");
        drop(reader);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
