//! PostgreSQL storage (`NEXUS_DATABASE_URL`): the schema and its migrations, the writer's
//! one-statement batch append, the resolution of commits whose outcome a lost connection hid,
//! and the history readers. The only home of the `postgres` crate.
//!
//! The database orders messages: one statement per batch takes each conversation's row lock
//! (in id order, so concurrent writers never deadlock), gives every message the next dense
//! `seq` of its conversation and an `inserted_at` from the database clock that is strictly
//! greater than the conversation's previous one (whatever any clock does), and an id that is a
//! UUIDv7 of that instant. So `seq` order = `inserted_at` order = id order = commit order in
//! every conversation, the same guarantees the embedded store gives.
//!
//! Every thread owns its connection and reconnects by itself; there is no pool (the client is
//! blocking: it runs its own small runtime only inside calls, on its own thread).

use std::str::FromStr;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use postgres::{Client, NoTls, Statement};
use uuid::Uuid;

use super::history::{HistoryError, HistoryJob, HistoryPage, HistoryQuery, ReaderHandle};
use super::schema::OpenError;
use super::{Committed, Message, Store, StoreError};
use crate::backoff::Backoff;
use crate::limits;

/// Schema version this build writes; a newer database is refused.
pub const PG_SCHEMA_VERSION: i32 = 2;

/// Advisory lock key held while migrating, so nodes starting together migrate once.
const MIGRATION_LOCK: i64 = 0x6e65_7875_735f_7067; // "nexus_pg"

const MIGRATIONS: &[&str] = &[
    // 1: conversations (per-conversation sequence and last instant), messages clustered by
    // (conversation, inserted_at), batch tokens for commits whose outcome was lost.
    "CREATE TABLE conversations (id uuid PRIMARY KEY, seq bigint NOT NULL, last_at bigint NOT NULL);
     CREATE TABLE messages (
        conversation_id uuid NOT NULL,
        inserted_at bigint NOT NULL,
        seq bigint NOT NULL,
        id uuid NOT NULL,
        sender_id uuid NOT NULL,
        body text NOT NULL,
        PRIMARY KEY (conversation_id, inserted_at));
     CREATE TABLE nexus_batches (
        token uuid PRIMARY KEY,
        node text NOT NULL,
        at timestamptz NOT NULL DEFAULT now(),
        convs uuid[] NOT NULL,
        first_at bigint[] NOT NULL,
        counts bigint[] NOT NULL);
     CREATE INDEX nexus_batches_at ON nexus_batches (at);",
    // 2: a lost batch's rows are found by their ids' random bits, so the token row no longer
    // lists its conversations (those arrays were most of its cost on wide batches).
    "ALTER TABLE nexus_batches DROP COLUMN convs, DROP COLUMN first_at, DROP COLUMN counts;",
];

const _: () = assert!(MIGRATIONS.len() == PG_SCHEMA_VERSION as usize);

/// The batch append: one statement, one round trip, one transaction.
///
/// Per message, grouped by conversation (so the index inserts of a conversation follow each
/// other) and in batch order within it: `$1` conversation, `$2` sender, `$3` body, `$4` the
/// id's random low 64 bits, `$5` its position among its conversation's messages in the batch
/// (1, 2, …) and `$6` that conversation's count in the batch. Per conversation, sorted by id
/// (the order the row locks are taken in, so concurrent writers never deadlock): `$7` the
/// ids, `$8` the counts. `$9` the batch token, `$10` this node. The writer works out the
/// positions and counts itself, so the statement needs no grouping, window or sort over the
/// messages (each of which cost about a millisecond per 1,024 here).
///
/// Each conversation's row gives its messages the next dense `seq`s and `inserted_at`s from
/// the database clock, above its last one. The id is the UUIDv7 of `inserted_at` (48-bit ms,
/// version 7, the µs within the ms in the 12 `rand_a` bits, then the given bits, variant
/// included), built inline (a SQL function per row with `gen_random_uuid` cost 10 ms per 1,024
/// rows); [`crate::ids::v7`] is the same function in Rust, and `$4` are the low bits of the ids
/// the writer stamped. The token row records that the batch
/// committed, and when, so a writer that lost the answer can learn whether it did and find its
/// rows by their ids' random bits ([`BATCH_ROWS`]). Returns each conversation's new last `seq`
/// and `inserted_at`, from which the writer derives every message's stamp, id and `seq` (one row per
/// conversation rather than per message: encoding, sending and parsing a row per message was
/// a visible part of both the backend's and the writer's work).
const APPEND: &str = "
WITH up AS (INSERT INTO conversations AS c (id, seq, last_at)
    SELECT conv, n, (extract(epoch FROM clock_timestamp()) * 1e6)::bigint + n - 1
    FROM unnest($7::uuid[], $8::bigint[]) AS u(conv, n) ORDER BY conv
    ON CONFLICT (id) DO UPDATE SET seq = c.seq + excluded.seq,
                                   last_at = greatest(c.last_at + excluded.seq, excluded.last_at)
    RETURNING id, seq, last_at),
ins AS (INSERT INTO messages
    SELECT b.conv, up.last_at - b.n + b.k, up.seq - b.n + b.k,
           encode(int8send(((up.last_at - b.n + b.k) / 1000 << 16) | 28672 | ((up.last_at - b.n + b.k) % 1000))
                  || int8send(b.tail), 'hex')::uuid,
           b.sender, b.body
    FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[])
         AS b(conv, sender, body, tail, k, n)
    JOIN up ON up.id = b.conv),
tok AS (INSERT INTO nexus_batches (token, node) VALUES ($9, $10))
SELECT id, seq, last_at FROM up";

/// The stamps of a batch whose token was found: the rows of its conversations (`$2`) stored
/// since its transaction began whose ids end in one of its random tails (`$3`, 8 bytes each).
const BATCH_ROWS: &str = "
SELECT m.conversation_id, m.id, m.inserted_at, m.seq
FROM nexus_batches b, unnest($2::uuid[]) AS c(conv),
  LATERAL (SELECT conversation_id, id, inserted_at, seq FROM messages
           WHERE conversation_id = c.conv AND inserted_at >= (extract(epoch FROM b.at) * 1e6)::bigint - 1000
             AND substring(uuid_send(id) FROM 9) = ANY($3::bytea[])) m
WHERE b.token = $1";

/// One history page, newest first: messages of a conversation with an id below `$3`
/// (`$2` bounds `inserted_at` from that id, so the primary key serves the scan).
const PAGE: &str = "
SELECT id, sender_id, body, inserted_at, seq FROM messages
WHERE conversation_id = $1 AND inserted_at < $2 AND id < $3
ORDER BY inserted_at DESC LIMIT $4";

/// A recovery read: the oldest messages of a conversation with an id above `$3` (`$2` bounds
/// `inserted_at` from below by that id's millisecond, so the primary key serves the scan).
const AFTER: &str = "
SELECT id, sender_id, body, inserted_at, seq FROM messages
WHERE conversation_id = $1 AND inserted_at >= $2 AND id > $3
ORDER BY inserted_at ASC LIMIT $4";

/// Where the database is: the parsed URL and a form safe to log (no password).
#[derive(Clone)]
pub struct PgTarget {
    config: postgres::Config,
    shown: String,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl PgTarget {
    /// Parses `postgres://…` / `postgresql://…` (TCP, or a unix-socket directory as `host`) or
    /// a `key=value` connection string. `timeout` bounds connecting and each statement (on the
    /// server); bytes the server's host does not acknowledge within
    /// [`limits::DB_UNACKED_MAX`] end the connection (TCP user timeout), so an unreachable
    /// database is noticed in well under a second, while a slow one is not mistaken for it.
    pub fn parse(url: &str, timeout: Duration) -> Result<PgTarget, OpenError> {
        let mut config = postgres::Config::from_str(url)
            .map_err(|e| OpenError::BadUrl { why: format!("NEXUS_DATABASE_URL is not a PostgreSQL URL: {e}") })?;
        let ms = timeout.as_millis().max(1);
        config
            .connect_timeout(timeout)
            .tcp_user_timeout(limits::DB_UNACKED_MAX.min(timeout))
            .keepalives(true)
            .application_name("nexus")
            // An ack means committed and flushed: never inherit an `off` from the server.
            .options(&format!("-c synchronous_commit=on -c statement_timeout={ms} -c lock_timeout={ms}"));
        let shown = show(&config);
        Ok(PgTarget { config, shown })
    }

    /// The URL without its password, for logs.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    fn connect(&self, timeout: Duration) -> Result<Client, postgres::Error> {
        let mut config = self.config.clone();
        config.connect_timeout(timeout);
        config.connect(NoTls)
    }
}

/// `postgres://user@host:port/db` (or the socket directory), never the password.
fn show(c: &postgres::Config) -> String {
    let hosts: Vec<String> = c
        .get_hosts()
        .iter()
        .map(|h| match h {
            postgres::config::Host::Tcp(name) => name.clone(),
            postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = c.get_ports().iter().map(u16::to_string).collect();
    format!(
        "postgres://{}@{}:{}/{}",
        c.get_user().unwrap_or(""),
        hosts.join(","),
        ports.join(","),
        c.get_dbname().unwrap_or("")
    )
}

fn unreachable(target: &PgTarget, source: postgres::Error) -> OpenError {
    OpenError::Postgres { target: target.shown.clone(), source }
}

/// Connects (bounded by the target's timeout) and brings the schema to this build's version
/// under an advisory lock; refuses a newer schema.
fn migrate(target: &PgTarget, timeout: Duration) -> Result<(), OpenError> {
    let mut client = target.connect(timeout).map_err(|e| unreachable(target, e))?;
    let mut tx = client.transaction().map_err(|e| unreachable(target, e))?;
    let steps = (|| -> Result<i32, postgres::Error> {
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS nexus_schema (version integer NOT NULL)")?;
        let found: Option<i32> = tx.query_one("SELECT max(version) FROM nexus_schema", &[])?.get(0);
        Ok(found.unwrap_or(0))
    })();
    let found = steps.map_err(|e| unreachable(target, e))?;
    if found > PG_SCHEMA_VERSION {
        return Err(OpenError::TooNew { path: target.shown.clone(), found: i64::from(found) });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        let version = i32::try_from(i + 1).expect("few migrations");
        tx.batch_execute(sql).map_err(|e| unreachable(target, e))?;
        tx.execute("INSERT INTO nexus_schema (version) VALUES ($1)", &[&version])
            .map_err(|e| unreachable(target, e))?;
    }
    tx.commit().map_err(|e| unreachable(target, e))?;
    Ok(())
}

/// A live writer connection: the client, its prepared append, and its backend process (to end
/// it if the connection is lost mid-commit).
struct Live {
    client: Client,
    append: Statement,
    backend_pid: i32,
}

/// A batch whose outcome could not be learned in time: answered `storage unavailable`, and
/// looked up again once the database is back (a commit found then is broadcast late).
struct Unresolved {
    token: Uuid,
    backend_pid: i32,
    batch: Vec<Committed>,
}

/// What looking a batch token up found.
enum Outcome {
    /// Committed: its rows.
    Committed(Vec<Stamp>),
    /// Not committed, and it never will be (its backend is gone).
    Absent,
    /// Its backend still runs: not known yet.
    Running,
}

/// The writer's PostgreSQL store.
pub struct PgStore {
    target: PgTarget,
    node: String,
    timeout: Duration,
    live: Option<Live>,
    /// No reconnect attempt before this (fail fast while the database is down).
    reconnect: Backoff,
    /// When the connection was lost (logged once, then on reconnect).
    down_since: Option<Instant>,
    unresolved: Vec<Unresolved>,
    late: Vec<Committed>,
    /// Only lane 0 prunes the batch tokens.
    prunes: bool,
    pruned_at: Instant,
}

impl PgStore {
    /// Connects and migrates (start-up: failures are fatal): one store per writer lane, each
    /// with its own connection, naming this node in batch tokens.
    pub fn open(target: &PgTarget, node: &str, timeout: Duration, lanes: usize) -> Result<Vec<PgStore>, OpenError> {
        migrate(target, timeout)?;
        (0..lanes.max(1))
            .map(|lane| {
                let live = connect_live(target, timeout).map_err(|e| unreachable(target, e))?;
                Ok(PgStore {
                    target: target.clone(),
                    node: node.to_string(),
                    timeout,
                    live: Some(live),
                    reconnect: Backoff::new(limits::RECONNECT_BACKOFF_MIN, limits::RECONNECT_BACKOFF_MAX),
                    down_since: None,
                    unresolved: Vec::new(),
                    late: Vec::new(),
                    prunes: lane == 0,
                    pruned_at: Instant::now(),
                })
            })
            .collect()
    }

    /// The live connection, reconnecting when the back-off allows; `None` fails the batch at
    /// once (no waiting while the database is down).
    fn live(&mut self) -> Option<&mut Live> {
        self.live_within(limits::DB_RECONNECT_TIMEOUT)
    }

    /// [`PgStore::live`] with a reconnect attempt bounded by `cap`.
    fn live_within(&mut self, cap: Duration) -> Option<&mut Live> {
        if self.live.as_ref().is_some_and(|l| l.client.is_closed()) {
            self.live = None;
        }
        if self.live.is_none() && self.reconnect.ready() {
            match connect_live(&self.target, cap.min(limits::DB_RECONNECT_TIMEOUT).min(self.timeout)) {
                Ok(live) => {
                    let down_for = self.down_since.take().map(|t| t.elapsed());
                    tracing::info!(database = %self.target.shown, ?down_for, "reconnected to PostgreSQL");
                    self.live = Some(live);
                    self.reconnect.succeeded();
                    self.resolve_unresolved();
                }
                Err(e) => {
                    let retry_in = self.reconnect.failed();
                    if self.down_since.is_none() {
                        self.down_since = Some(Instant::now());
                        tracing::error!(database = %self.target.shown, error = %e, "PostgreSQL unreachable: new messages \
                            are answered 'storage unavailable' until it is back (retrying, at most every second)");
                    } else {
                        tracing::debug!(error = %e, ?retry_in, "PostgreSQL still unreachable");
                    }
                }
            }
        }
        self.live.as_mut()
    }

    /// After a lost connection: waits (until `deadline`) for the database, ends the old
    /// backend if it still runs, and reads the token.
    fn resolve(
        &mut self,
        token: Uuid,
        backend_pid: i32,
        batch: &mut [Committed],
        deadline: Instant,
    ) -> Result<(), StoreError> {
        loop {
            self.reconnect.retry_now();
            // Each attempt ends by the deadline, so the batch is answered in time either way.
            let remaining = deadline.saturating_duration_since(Instant::now()).max(limits::DB_OUTCOME_POLL);
            if let Some(live) = self.live_within(remaining) {
                match lookup(&mut live.client, token, backend_pid, batch, deadline) {
                    Ok(Outcome::Committed(rows)) => return restamp(batch, &rows),
                    Ok(Outcome::Absent) => return Err(StoreError::NotCommitted),
                    Ok(Outcome::Running) => break,
                    Err(e) => tracing::warn!(error = %e, "looking up a batch after a lost connection failed"),
                }
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(limits::DB_OUTCOME_POLL);
        }
        if self.unresolved.len() >= limits::DB_UNRESOLVED_BATCHES_MAX {
            let dropped = self.unresolved.remove(0);
            tracing::error!(token = %dropped.token, rows = dropped.batch.len(), "too many unresolved batches: \
                forgetting the oldest (if it committed, its messages are in history but were not broadcast)");
        }
        let batch = batch.iter().map(|c| Committed { message: c.message.clone(), origin: None }).collect();
        self.unresolved.push(Unresolved { token, backend_pid, batch });
        Err(StoreError::Unavailable)
    }

    /// Looks up batches answered `storage unavailable` without knowing; the committed ones
    /// become late broadcasts.
    fn resolve_unresolved(&mut self) {
        let Some(live) = self.live.as_mut() else { return };
        let mut keep = Vec::new();
        for mut u in std::mem::take(&mut self.unresolved) {
            let deadline = Instant::now() + limits::DB_OUTCOME_WAIT;
            match lookup(&mut live.client, u.token, u.backend_pid, &u.batch, deadline) {
                Ok(Outcome::Committed(rows)) => {
                    if restamp(&mut u.batch, &rows).is_ok() {
                        tracing::warn!(token = %u.token, rows = u.batch.len(), "a batch answered 'storage unavailable' had committed: broadcasting it late");
                        self.late.append(&mut u.batch);
                    }
                }
                Ok(Outcome::Absent) => {}
                Ok(Outcome::Running) | Err(_) => keep.push(u),
            }
        }
        self.unresolved = keep;
    }
}

fn connect_live(target: &PgTarget, timeout: Duration) -> Result<Live, postgres::Error> {
    let mut client = target.connect(timeout)?;
    let append = client.prepare(APPEND)?;
    let backend_pid: i32 = client.query_one("SELECT pg_backend_pid()", &[])?.get(0);
    Ok(Live { client, append, backend_pid })
}

/// The parameters of [`APPEND`] for one batch, and what the writer needs to stamp it from the
/// answer.
struct AppendParams<'a> {
    convs: Vec<Uuid>,
    senders: Vec<Uuid>,
    bodies: Vec<&'a str>,
    tails: Vec<i64>,
    positions: Vec<i64>,
    counts: Vec<i64>,
    /// The batch's conversations, sorted, and their counts.
    ids: Vec<Uuid>,
    totals: Vec<i64>,
    /// Batch index of each array element.
    order: Vec<usize>,
    /// Index in `ids` of each array element's conversation.
    group: Vec<usize>,
}

impl<'a> AppendParams<'a> {
    fn of(batch: &'a [Committed]) -> AppendParams<'a> {
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by_key(|&i| batch[i].message.conversation); // stable: batch order within one
        let (mut ids, mut totals) = (Vec::new(), Vec::new());
        let (mut positions, mut group) = (Vec::with_capacity(batch.len()), Vec::with_capacity(batch.len()));
        for &i in &order {
            let conv = batch[i].message.conversation;
            if ids.last() != Some(&conv) {
                ids.push(conv);
                totals.push(0);
            }
            let n = totals.last_mut().expect("pushed above");
            *n += 1;
            positions.push(*n);
            group.push(ids.len() - 1);
        }
        AppendParams {
            convs: order.iter().map(|&i| batch[i].message.conversation).collect(),
            senders: order.iter().map(|&i| batch[i].message.sender).collect(),
            bodies: order.iter().map(|&i| batch[i].message.body.as_str()).collect(),
            tails: order.iter().map(|&i| batch[i].message.id.as_u64_pair().1 as i64).collect(),
            counts: group.iter().map(|&j| totals[j]).collect(),
            positions,
            ids,
            totals,
            order,
            group,
        }
    }

    /// Each message's batch index and stamp from the append's answer: each conversation's
    /// new last `seq` and `inserted_at`.
    fn stamps(&self, rows: &[postgres::Row]) -> Result<Vec<(usize, Stamp)>, StoreError> {
        let mut last = vec![None; self.ids.len()];
        for row in rows {
            let conv: Uuid = row.try_get(0).map_err(StoreError::Postgres)?;
            let seq: i64 = row.try_get(1).map_err(StoreError::Postgres)?;
            let at: i64 = row.try_get(2).map_err(StoreError::Postgres)?;
            if let Ok(j) = self.ids.binary_search(&conv) {
                last[j] = Some((seq, at));
            }
        }
        self.stamps_after(&last)
    }

    /// [`AppendParams::stamps`] from each conversation's new last `(seq, inserted_at)` (by `ids`).
    fn stamps_after(&self, last: &[Option<(i64, i64)>]) -> Result<Vec<(usize, Stamp)>, StoreError> {
        (0..self.order.len())
            .map(|e| {
                let (seq, at) = last[self.group[e]]
                    .ok_or(StoreError::Inconsistent("the append did not answer for a conversation"))?;
                let back = self.counts[e] - self.positions[e];
                let at = at - back;
                let stamp = Stamp { id: crate::ids::v7(at, self.tails[e] as u64), at, seq: sequence(seq - back) };
                Ok((self.order[e], stamp))
            })
            .collect()
    }
}

/// What the database gave a stored message: its id, `inserted_at` and `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    id: Uuid,
    at: i64,
    seq: u64,
}

impl Stamp {
    fn apply(&self, message: &mut Message) {
        message.id = self.id;
        message.inserted_at_us = self.at;
        message.seq = self.seq;
    }
}

/// Whether batch `token` (holding `batch`, with the ids it was sent with) committed. A backend
/// that may still be running the batch is ended first, so "absent" is final; one that has not
/// ended by `deadline` leaves it undecided.
fn lookup(
    client: &mut Client,
    token: Uuid,
    backend_pid: i32,
    batch: &[Committed],
    deadline: Instant,
) -> Result<Outcome, postgres::Error> {
    client.execute("SELECT pg_terminate_backend($1) FROM pg_stat_activity WHERE pid = $1", &[&backend_pid])?;
    while client.query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&backend_pid])?.is_some() {
        if Instant::now() >= deadline {
            return Ok(Outcome::Running);
        }
        std::thread::sleep(limits::DB_OUTCOME_POLL);
    }
    let mut convs: Vec<Uuid> = batch.iter().map(|c| c.message.conversation).collect();
    convs.sort_unstable();
    convs.dedup();
    let tails: Vec<Vec<u8>> = batch.iter().map(|c| c.message.id.as_bytes()[8..].to_vec()).collect();
    let rows = client.query(BATCH_ROWS, &[&token, &convs, &tails])?;
    if rows.is_empty() {
        let recorded = client.query_opt("SELECT 1 FROM nexus_batches WHERE token = $1", &[&token])?;
        if recorded.is_none() {
            return Ok(Outcome::Absent);
        }
    }
    let stamp = |r: &postgres::Row| -> Result<Stamp, postgres::Error> {
        Ok(Stamp { id: r.try_get(1)?, at: r.try_get(2)?, seq: sequence(r.try_get(3)?) })
    };
    Ok(Outcome::Committed(rows.iter().map(stamp).collect::<Result<_, _>>()?))
}

/// A `seq` as stored (a positive `bigint`).
fn sequence(seq: i64) -> u64 {
    u64::try_from(seq).unwrap_or(0)
}

/// Copies the stamps of a committed batch onto its messages: each message's row is the one
/// whose id ends in the same random bits as the id it was sent with.
fn restamp(batch: &mut [Committed], rows: &[Stamp]) -> Result<(), StoreError> {
    let by_tail: std::collections::HashMap<u64, &Stamp> = rows.iter().map(|s| (s.id.as_u64_pair().1, s)).collect();
    for c in batch.iter_mut() {
        let Some(stamp) = by_tail.get(&c.message.id.as_u64_pair().1) else {
            return Err(StoreError::Inconsistent("a committed batch has fewer rows than messages"));
        };
        stamp.apply(&mut c.message);
    }
    Ok(())
}

impl Store for PgStore {
    fn commit(&mut self, batch: &mut [Committed]) -> Result<(), StoreError> {
        let token = Uuid::new_v4();
        // A batch whose connection is lost is answered by then, committed or not.
        let answer_by = Instant::now() + limits::DB_OUTCOME_WAIT;
        if self.live().is_none() {
            return Err(StoreError::Unavailable);
        }
        // Each message keeps the random low bits of the id the writer stamped; they find its row
        // if the answer is lost.
        let p = AppendParams::of(batch);
        let live = self.live.as_mut().expect("connected just above");
        let backend_pid = live.backend_pid;
        let params: [&(dyn postgres::types::ToSql + Sync); 10] =
            [&p.convs, &p.senders, &p.bodies, &p.tails, &p.positions, &p.counts, &p.ids, &p.totals, &token, &self.node];
        match live.client.query(&live.append, &params) {
            Ok(rows) => {
                for (i, stamp) in p.stamps(&rows)? {
                    stamp.apply(&mut batch[i].message);
                }
                Ok(())
            }
            Err(e) if live.client.is_closed() => {
                tracing::warn!(error = %e, rows = batch.len(), "connection lost during a commit: looking the batch up");
                self.live = None;
                self.resolve(token, backend_pid, batch, answer_by)
            }
            Err(e) => Err(StoreError::Postgres(e)),
        }
    }

    fn maintain(&mut self, idle: bool) {
        if !self.unresolved.is_empty() && idle {
            self.live(); // reconnecting resolves them
        }
        if !self.prunes || self.pruned_at.elapsed() < limits::DB_TOKEN_PRUNE_EVERY {
            return;
        }
        self.pruned_at = Instant::now();
        let keep = format!("{} seconds", limits::DB_TOKEN_KEEP.as_secs());
        let chunk = i64::try_from(limits::DB_TOKEN_PRUNE_ROWS).unwrap_or(i64::MAX);
        if let Some(live) = self.live() {
            // A bounded chunk through the index on `at`: the writer's other work waits for it.
            let pruned = live.client.execute(
                "DELETE FROM nexus_batches WHERE token IN
                   (SELECT token FROM nexus_batches WHERE at < now() - $1::interval ORDER BY at LIMIT $2)",
                &[&keep, &chunk],
            );
            match pruned {
                Ok(n) if n as usize == limits::DB_TOKEN_PRUNE_ROWS => {
                    // More to delete: the next maintenance step goes on.
                    self.pruned_at = Instant::now().checked_sub(limits::DB_TOKEN_PRUNE_EVERY).unwrap_or(self.pruned_at);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "pruning batch tokens failed"),
            }
        }
    }

    fn take_late(&mut self) -> Vec<Committed> {
        std::mem::take(&mut self.late)
    }
}

/// Each listed conversation's last `seq` and `inserted_at` (conversations without messages
/// are absent).
const HEADS: &str = "SELECT id, seq, last_at FROM conversations WHERE id = ANY($1)";

/// A conversation's messages stored after one instant and before another, in order: one
/// range of the primary key.
const RANGE: &str = "
SELECT id, sender_id, body, inserted_at, seq FROM messages
WHERE conversation_id = $1 AND inserted_at > $2 AND inserted_at < $3
ORDER BY inserted_at LIMIT $4";

/// A conversation's newest stored message: its `seq` and `inserted_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// The conversation.
    pub conversation: Uuid,
    /// Its last `seq`.
    pub seq: u64,
    /// Its last `inserted_at`, µs.
    pub at: i64,
}

/// Reads for cluster mode's gap fills and catch-up, on a connection of its own.
pub struct PgFillReader {
    conn: ReaderConn,
}

impl PgFillReader {
    /// A reader of `target`; `timeout` bounds connecting and each statement.
    pub fn new(target: &PgTarget, timeout: Duration) -> PgFillReader {
        PgFillReader { conn: ReaderConn::new(target, timeout, "gap-fill reader") }
    }

    /// The heads of `conversations` (in no particular order; absent: no message yet).
    pub fn heads(&mut self, conversations: &[Uuid]) -> Result<Vec<Head>, StoreError> {
        let client = self.conn.client().ok_or(StoreError::Unavailable)?;
        let head = |r: &postgres::Row| -> Result<Head, postgres::Error> {
            Ok(Head { conversation: r.try_get(0)?, seq: sequence(r.try_get(1)?), at: r.try_get(2)? })
        };
        let rows = client.query(HEADS, &[&conversations]).map_err(StoreError::Postgres)?;
        rows.iter().map(head).collect::<Result<_, _>>().map_err(StoreError::Postgres)
    }

    /// At most `limit` messages of `conversation` stored after `after` and before `before`
    /// (µs; `None`: up to the newest), oldest first.
    pub fn range(
        &mut self,
        conversation: Uuid,
        after: i64,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let (before, limit) = (before.unwrap_or(i64::MAX), i64::try_from(limit).unwrap_or(i64::MAX));
        let client = self.conn.client().ok_or(StoreError::Unavailable)?;
        messages(client, RANGE, &[&conversation, &after, &before, &limit], conversation).map_err(StoreError::Postgres)
    }
}

/// Runs a query of one conversation's messages (`id, sender_id, body, inserted_at, seq`).
fn messages(
    client: &mut Client,
    sql: &str,
    params: &[&(dyn postgres::types::ToSql + Sync)],
    conversation: Uuid,
) -> Result<Vec<Message>, postgres::Error> {
    client.query(sql, params)?.iter().map(|r| message_of(r, conversation)).collect()
}

/// A reader thread's connection: made on first use and remade after a failure, at most every
/// [`limits::RECONNECT_BACKOFF_MIN`]; while the database is down a read fails at once.
struct ReaderConn {
    target: PgTarget,
    timeout: Duration,
    client: Option<Client>,
    reconnect: Backoff,
    /// Who reads, for the log.
    reader: &'static str,
}

impl ReaderConn {
    fn new(target: &PgTarget, timeout: Duration, reader: &'static str) -> ReaderConn {
        let reconnect = Backoff::new(limits::RECONNECT_BACKOFF_MIN, limits::RECONNECT_BACKOFF_MIN);
        ReaderConn { target: target.clone(), timeout, client: None, reconnect, reader }
    }

    /// The connection, if the database can be reached.
    fn client(&mut self) -> Option<&mut Client> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        if self.client.is_none() && self.reconnect.ready() {
            match self.target.connect(limits::DB_RECONNECT_TIMEOUT.min(self.timeout)) {
                Ok(c) => self.client = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, reader = self.reader, "PostgreSQL unreachable");
                    self.reconnect.failed();
                }
            }
        }
        self.client.as_mut()
    }
}

/// A stored message from a row of `id, sender_id, body, inserted_at, seq`.
fn message_of(r: &postgres::Row, conversation: Uuid) -> Result<Message, postgres::Error> {
    Ok(Message {
        id: r.try_get(0)?,
        conversation,
        sender: r.try_get(1)?,
        body: r.try_get(2)?,
        inserted_at_us: r.try_get(3)?,
        seq: sequence(r.try_get(4)?),
    })
}

/// Starts `readers` history threads, each with its own connection (made on first use and
/// remade after a failure); a request that finds the database down is answered 503 at once.
pub fn spawn_readers(target: &PgTarget, readers: usize, timeout: Duration) -> Result<ReaderHandle, OpenError> {
    let (handle, rx) = ReaderHandle::channel();
    for i in 0..readers.max(1) {
        let (target, rx) = (target.clone(), rx.clone());
        std::thread::Builder::new()
            .name(format!("pg-reader-{i}"))
            .spawn(move || serve_history(&target, &rx, timeout))
            .map_err(|source| OpenError::Thread { name: "history reader", source })?;
    }
    Ok(handle)
}

fn serve_history(target: &PgTarget, rx: &Receiver<HistoryJob>, timeout: Duration) {
    let mut conn = ReaderConn::new(target, timeout, "history reader");
    for job in rx {
        let result = match conn.client() {
            Some(c) => read_page(c, &job.query),
            None => Err(HistoryError::Unavailable),
        };
        (job.reply)(result);
    }
}

/// One page: messages with an id below `before` (any UUID), oldest first; or, for a recovery
/// read, the oldest ones with an id above `after`.
fn read_page(client: &mut Client, q: &HistoryQuery) -> Result<HistoryPage, HistoryError> {
    if let Some(after) = q.after {
        let ms = after.as_u64_pair().0 >> 16;
        let bound = i64::try_from(ms * 1_000).unwrap_or(i64::MAX);
        let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
        let messages = messages(client, AFTER, &[&q.conversation, &bound, &after, &limit], q.conversation)
            .map_err(HistoryError::Postgres)?;
        return Ok(HistoryPage { messages, next_before: None });
    }
    let before = q.before.unwrap_or(Uuid::max());
    // A v7 id's first 48 bits are its millisecond: every id below `before` has an instant
    // before the end of that millisecond (the exact test is `id < before`).
    let ms = before.as_u64_pair().0 >> 16;
    let bound = i64::try_from((ms + 1) * 1_000).unwrap_or(i64::MAX);
    let limit = i64::try_from(q.limit + 1).unwrap_or(i64::MAX);
    let mut messages = messages(client, PAGE, &[&q.conversation, &bound, &before, &limit], q.conversation)
        .map_err(HistoryError::Postgres)?;
    let more = messages.len() > q.limit;
    messages.truncate(q.limit);
    messages.reverse();
    let next_before = if more { messages.first().map(|m| m.id) } else { None };
    Ok(HistoryPage { messages, next_before })
}

#[cfg(test)]
mod tests {
    use super::super::Origin;
    use super::*;

    fn message(conversation: Uuid, body: &str) -> Committed {
        // As the writer stamps it: the id carries its random tail.
        let id = crate::ids::v7(1, crate::ids::splitmix64(&mut 7));
        let message = Message { id, conversation, sender: Uuid::nil(), body: body.into(), inserted_at_us: 1, seq: 0 };
        Committed { message, origin: Some(Origin { core: 0, ticket: 0 }) }
    }

    #[test]
    fn messages_go_grouped_by_conversation_and_get_stamps_back_in_batch_order() {
        let (a, b) = (Uuid::from_u128(2), Uuid::from_u128(1));
        let batch = [message(a, "a1"), message(b, "b1"), message(a, "a2"), message(a, "a3"), message(b, "b2")];
        let p = AppendParams::of(&batch);
        assert_eq!(p.bodies, ["b1", "b2", "a1", "a2", "a3"]);
        assert_eq!(p.positions, [1, 2, 1, 2, 3]);
        assert_eq!(p.counts, [2, 2, 3, 3, 3]);
        assert_eq!((p.ids.clone(), p.totals.clone()), (vec![b, a], vec![2, 3]));
        // The database answers each conversation's new last `seq` and instant.
        let mut stamps = p.stamps_after(&[Some((12, 9_000_002)), Some((3, 5_000_003))]).expect("stamps");
        stamps.sort_by_key(|s| s.0);
        let ats: Vec<i64> = stamps.iter().map(|s| s.1.at).collect();
        assert_eq!(ats, [5_000_001, 9_000_001, 5_000_002, 5_000_003, 9_000_002]);
        let seqs: Vec<u64> = stamps.iter().map(|s| s.1.seq).collect();
        assert_eq!(seqs, [1, 11, 2, 3, 12]);
        let id = stamps[0].1.id;
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(id.as_u64_pair().0 >> 16, 5_000, "milliseconds");
        assert_eq!(id.as_u64_pair().0 & 0xfff, 1, "microseconds within the millisecond");
        assert_eq!(id.as_u64_pair().1 >> 62, 0b10, "RFC 4122 variant");
        assert!(p.stamps_after(&[Some((1, 1)), None]).is_err(), "a conversation without an answer");
    }
}
