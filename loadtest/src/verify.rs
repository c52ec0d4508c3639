//! Scenario `verify`: checks a database against the acknowledgements `persist --acked-log` wrote
//! (`loadtest/crashloop.sh` runs it after every restart). Offline: it reads the store, not the
//! server.
//!
//! Every acknowledged message must be stored exactly once, in its conversation: in SQLite a row
//! lives in `recent`, in `messages`, or (merged, not yet deleted) in both with the very same
//! fields, never twice in one table; in PostgreSQL once in `messages`. No message may be
//! stored twice under two ids either (the tagged bodies `persist` writes with an acked log are
//! unique per sender). In every conversation, ids and `inserted_at` increase together, each id
//! is the UUIDv7 of its `inserted_at`, and messages acknowledged in a later round (`--acked`
//! once per round, in order) sort after those of every earlier round: ids keep increasing
//! across restarts. SQLite also: `PRAGMA integrity_check`, and one writer stamps every
//! message, so `inserted_at` is unique over the whole database and the round order holds
//! across conversations. PostgreSQL also: each conversation's `seq` runs 1, 2, 3, … in id
//! order and its `conversations` row names the last `seq` and `inserted_at`.
//!
//! Reads one consistent snapshot (one read transaction), so it may run beside a live server.
//! Exit 1 with the violations (the first 20) if any check fails.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::time::Instant;

use uuid::Uuid;

/// Arguments of `nexus-load verify`.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// An acked log of `persist --acked-log` (`<conversation> <message id>` lines); give it once
    /// per round, in round order (a file may hold several logs concatenated: one round).
    #[arg(long, required = true, value_name = "FILE")]
    acked: Vec<PathBuf>,
    /// The SQLite database (opened read-only).
    #[arg(long, value_name = "PATH", required_unless_present = "postgres", conflicts_with = "postgres")]
    db: Option<PathBuf>,
    /// The PostgreSQL database, as `NEXUS_DATABASE_URL`.
    #[arg(long, value_name = "URL")]
    postgres: Option<String>,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
}

/// One stored message, as the checks need it.
#[derive(Clone, PartialEq, Eq, Debug)]
struct Row {
    conversation: Uuid,
    id: Uuid,
    sender: Uuid,
    body: String,
    inserted_at: i64,
    /// PostgreSQL's per-conversation sequence.
    seq: Option<i64>,
}

/// Violations found: counted all, the first few kept with their details.
#[derive(Default)]
struct Violations {
    count: u64,
    shown: Vec<String>,
}

impl Violations {
    fn add(&mut self, what: impl FnOnce() -> String) {
        self.count += 1;
        if self.shown.len() < 20 {
            self.shown.push(what());
        }
    }
}

/// The checks that run over the rows, one conversation at a time in id order.
struct Checker {
    /// Acked and not yet found: id → (conversation, round).
    acked: HashMap<Uuid, (Uuid, u32)>,
    acked_total: u64,
    /// (id, round) of every acked message found, for the global round order (SQLite).
    found: Vec<(Uuid, u32)>,
    /// Hashes of (conversation, sender, body) of tagged bodies.
    bodies: HashSet<u64>,
    /// Every `inserted_at` (SQLite: one writer, one clock, each instant used once).
    instants: Option<HashSet<i64>>,
    /// The previous row of the current conversation, and the latest round acked in it so far.
    prev: Option<(Uuid, Uuid, i64, Option<i64>)>,
    round_high: u32,
    rows: u64,
    conversations: u64,
    unacked: u64,
    v: Violations,
}

/// The µs instant a Nexus UUIDv7 encodes (`nexus::ids::v7`: ms, then µs within the ms in
/// `rand_a`).
fn id_micros(id: Uuid) -> i64 {
    let hi = id.as_u64_pair().0;
    ((hi >> 16) as i64) * 1000 + (hi & 0xfff) as i64
}

/// A body `persist --acked-log` wrote: `<ref>-…`.
fn tagged(body: &str) -> bool {
    let digits = body.bytes().take_while(u8::is_ascii_digit).count();
    digits > 0 && body.as_bytes().get(digits) == Some(&b'-')
}

impl Checker {
    fn new(acked: HashMap<Uuid, (Uuid, u32)>, global: bool) -> Checker {
        Checker {
            acked_total: acked.len() as u64,
            acked,
            found: Vec::new(),
            bodies: HashSet::new(),
            instants: global.then(HashSet::new),
            prev: None,
            round_high: 0,
            rows: 0,
            conversations: 0,
            unacked: 0,
            v: Violations::default(),
        }
    }

    /// Takes the next stored message (rows come grouped by conversation, each in id order).
    fn row(&mut self, r: &Row) {
        self.rows += 1;
        match self.prev {
            Some((conversation, id, at, seq)) if conversation == r.conversation => {
                if r.id <= id || r.inserted_at <= at {
                    self.v.add(|| {
                        format!(
                            "conversation {}: id {} (inserted_at {}) follows id {id} (inserted_at {at}): ids and \
                             inserted_at must increase together",
                            r.conversation, r.id, r.inserted_at
                        )
                    });
                }
                if let (Some(prev), Some(seq)) = (seq, r.seq) {
                    if seq != prev + 1 {
                        self.v.add(|| {
                            format!("conversation {}: seq {seq} (id {}) follows seq {prev}", r.conversation, r.id)
                        });
                    }
                }
            }
            _ => {
                self.conversations += 1;
                self.round_high = 0;
                if let Some(seq) = r.seq.filter(|&s| s != 1) {
                    self.v.add(|| format!("conversation {}: its first message {} has seq {seq}", r.conversation, r.id));
                }
            }
        }
        self.prev = Some((r.conversation, r.id, r.inserted_at, r.seq));
        if id_micros(r.id) != r.inserted_at {
            self.v.add(|| format!("message {}: the id's instant is not its inserted_at {}", r.id, r.inserted_at));
        }
        if let Some(instants) = &mut self.instants {
            if !instants.insert(r.inserted_at) {
                self.v.add(|| format!("message {}: inserted_at {} is used twice", r.id, r.inserted_at));
            }
        }
        if tagged(&r.body) {
            let mut h = DefaultHasher::new();
            (r.conversation, r.sender, &r.body).hash(&mut h);
            if !self.bodies.insert(h.finish()) {
                self.v.add(|| {
                    format!(
                        "message {} in {}: the same body from the same sender is stored under another id too \
                         (a duplicate)",
                        r.id, r.conversation
                    )
                });
            }
        }
        match self.acked.remove(&r.id) {
            None => self.unacked += 1,
            Some((conversation, round)) => {
                if conversation != r.conversation {
                    self.v.add(|| {
                        format!("message {} was acked in {conversation} but is stored in {}", r.id, r.conversation)
                    });
                }
                let high = self.round_high;
                if round < high {
                    self.v.add(|| {
                        format!(
                            "conversation {}: message {} acked in round {} sorts before a message acked in round {}",
                            r.conversation,
                            r.id,
                            round + 1,
                            high + 1
                        )
                    });
                }
                self.round_high = self.round_high.max(round);
                if self.instants.is_some() {
                    self.found.push((r.id, round));
                }
            }
        }
    }

    /// After the last row: acked messages never found, and the global round order.
    fn finish(&mut self) {
        let mut missing: Vec<(&Uuid, &(Uuid, u32))> = self.acked.iter().collect();
        missing.sort();
        for (id, (conversation, round)) in missing {
            self.v.add(|| format!("message {id} acked in round {} in {conversation} is not stored", round + 1));
        }
        if self.instants.is_some() {
            self.found.sort_unstable();
            let mut high = (Uuid::nil(), 0);
            for &(id, round) in &self.found {
                if round < high.1 {
                    self.v.add(|| {
                        format!(
                            "message {id} acked in round {} sorts after message {} of round {}",
                            round + 1,
                            high.0,
                            high.1 + 1
                        )
                    });
                }
                if round >= high.1 {
                    high = (id, round);
                }
            }
        }
    }
}

/// Reads the acked logs: id → (conversation, round index).
fn read_acked(files: &[PathBuf], v: &mut Violations) -> Result<HashMap<Uuid, (Uuid, u32)>, String> {
    let mut acked = HashMap::new();
    for (round, path) in files.iter().enumerate() {
        let f = std::fs::File::open(path).map_err(|e| format!("--acked {}: {e}", path.display()))?;
        for (n, line) in BufReader::with_capacity(1 << 20, f).lines().enumerate() {
            let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
            let parsed =
                line.split_once(' ').and_then(|(c, i)| Some((Uuid::try_parse(c).ok()?, Uuid::try_parse(i).ok()?)));
            let Some((conversation, id)) = parsed else {
                return Err(format!("{}:{}: not `<conversation> <id>`: {line:.80}", path.display(), n + 1));
            };
            if acked.insert(id, (conversation, round as u32)).is_some() {
                v.add(|| format!("message {id} is acknowledged twice ({}:{})", path.display(), n + 1));
            }
        }
    }
    Ok(acked)
}

/// What the store holds besides the checked rows, for the summary.
struct Store {
    name: String,
    integrity: Option<String>,
    tables: String,
}

pub(crate) fn run(args: Args) -> Result<(), String> {
    let began = Instant::now();
    let mut early = Violations::default();
    let acked = read_acked(&args.acked, &mut early)?;
    let rounds = args.acked.len() as u32;
    let (checker, store) = match (&args.db, &args.postgres) {
        (Some(path), _) => {
            let mut c = Checker::new(acked, true);
            c.v = early;
            let store = sqlite(path, &mut c)?;
            (c, store)
        }
        (None, Some(url)) => {
            let mut c = Checker::new(acked, false);
            c.v = early;
            let store = postgres(url, &mut c)?;
            (c, store)
        }
        (None, None) => return Err("verify needs --db or --postgres".into()),
    };
    let secs = began.elapsed().as_secs_f64();
    let Checker { acked_total, rows, conversations, unacked, v, .. } = checker;
    if args.json {
        println!(
            "{{\"scenario\":\"verify\",\"store\":\"{}\",\"rounds\":{rounds},\"acked\":{acked_total},\"rows\":{rows},\
             \"conversations\":{conversations},\"stored_not_acked\":{unacked},\"integrity\":\"{}\",\
             \"violations\":{},\"secs\":{secs:.2}}}",
            store.name,
            store.integrity.as_deref().unwrap_or("n/a").replace(['"', '\\', '\n'], " "),
            v.count
        );
    } else {
        println!("verify: {} in {secs:.1} s", store.name);
        println!(
            "  {rounds} rounds, {acked_total} acknowledged messages, {rows} stored in {conversations} conversations"
        );
        println!("  {} ({unacked} stored without an ack: in flight at a kill, or answered as failed)", store.tables);
        if let Some(i) = &store.integrity {
            println!("  integrity_check: {i}");
        }
    }
    for s in &v.shown {
        eprintln!("  VIOLATION: {s}");
    }
    if v.count > 0 {
        return Err(format!("{} violations", v.count));
    }
    if !args.json {
        println!(
            "  ok: every acknowledged message stored exactly once, ids and inserted_at increasing, rounds in order"
        );
    }
    Ok(())
}

fn sqlite_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let uuid = |i: usize| -> rusqlite::Result<Uuid> {
        let b: Vec<u8> = r.get(i)?;
        Uuid::from_slice(&b)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Blob, e.into()))
    };
    Ok(Row {
        conversation: uuid(0)?,
        id: uuid(1)?,
        sender: uuid(2)?,
        body: r.get(3)?,
        inserted_at: r.get(4)?,
        seq: None,
    })
}

fn sqlite(path: &std::path::Path, c: &mut Checker) -> Result<Store, String> {
    use rusqlite::{Connection, OpenFlags};
    let e = |e: rusqlite::Error| format!("{}: {e}", path.display());
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(e)?;
    conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(e)?;
    // One read transaction: a merge step moving rows between the tables is seen whole or not.
    conn.execute_batch("BEGIN").map_err(e)?;
    let integrity: Vec<String> = {
        let mut stmt = conn.prepare("PRAGMA integrity_check").map_err(e)?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(e)?;
        rows.collect::<Result<_, _>>().map_err(e)?
    };
    let integrity = integrity.join("; ");
    if integrity != "ok" {
        c.v.add(|| format!("PRAGMA integrity_check: {integrity:.2000}"));
    }
    // `recent` is the commit log not yet merged (small); `messages` streams in key order.
    let mut recent: BTreeMap<(Uuid, Uuid), Row> = BTreeMap::new();
    let n_recent = {
        let mut stmt = conn
            .prepare("SELECT conversation_id, id, sender_id, body, inserted_at FROM recent ORDER BY seq")
            .map_err(e)?;
        let mut rows = stmt.query([]).map_err(e)?;
        let mut n = 0u64;
        while let Some(r) = rows.next().map_err(e)? {
            let row = sqlite_row(r).map_err(e)?;
            n += 1;
            if let Some(old) = recent.insert((row.conversation, row.id), row) {
                c.v.add(|| format!("message {} is in `recent` twice", old.id));
            }
        }
        n
    };
    let (mut n_messages, mut n_both) = (0u64, 0u64);
    {
        let mut stmt = conn
            .prepare(
                "SELECT conversation_id, id, sender_id, body, inserted_at FROM messages ORDER BY conversation_id, id",
            )
            .map_err(e)?;
        let mut rows = stmt.query([]).map_err(e)?;
        while let Some(r) = rows.next().map_err(e)? {
            let row = sqlite_row(r).map_err(e)?;
            n_messages += 1;
            let key = (row.conversation, row.id);
            // Rows only in `recent` that sort before this one come first.
            while let Some(entry) = recent.first_entry() {
                if *entry.key() >= key {
                    break;
                }
                c.row(&entry.remove());
            }
            if let Some(entry) = recent.first_entry().filter(|en| *en.key() == key) {
                n_both += 1;
                let other = entry.remove();
                if other != row {
                    c.v.add(|| format!("message {}: `recent` and `messages` hold different rows for it", row.id));
                }
            }
            c.row(&row);
        }
    }
    while let Some((_, row)) = recent.pop_first() {
        c.row(&row);
    }
    c.finish();
    conn.execute_batch("COMMIT").map_err(e)?;
    Ok(Store {
        name: format!("sqlite {}", path.display()),
        integrity: Some(integrity),
        tables: format!("recent {n_recent} rows, messages {n_messages}, {n_both} in both"),
    })
}

fn postgres(url: &str, c: &mut Checker) -> Result<Store, String> {
    use postgres::fallible_iterator::FallibleIterator;
    let e = |e: postgres::Error| format!("postgres: {e}");
    let mut client = postgres::Client::connect(url, postgres::NoTls).map_err(e)?;
    let mut tx = client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(e)?;
    // conversation → (seq, last_at) as the conversations table says.
    let mut heads: HashMap<Uuid, (i64, i64)> = HashMap::new();
    for r in tx.query("SELECT id, seq, last_at FROM conversations", &[]).map_err(e)? {
        heads.insert(r.get(0), (r.get(1), r.get(2)));
    }
    let mut n = 0u64;
    let mut last: Option<(Uuid, i64, i64)> = None;
    let mut check_head = |c: &mut Checker, last: Option<(Uuid, i64, i64)>| {
        if let Some((conversation, seq, at)) = last {
            match heads.remove(&conversation) {
                Some(head) if head == (seq, at) => {}
                head => c.v.add(|| {
                    format!("conversation {conversation}: its row says (seq, last_at) {head:?}, its messages end at ({seq}, {at})")
                }),
            }
        }
    };
    {
        let mut rows = tx
            .query_raw(
                "SELECT conversation_id, inserted_at, seq, id, sender_id, body FROM messages \
                 ORDER BY conversation_id, inserted_at",
                std::iter::empty::<i32>(),
            )
            .map_err(e)?;
        while let Some(r) = rows.next().map_err(e)? {
            let row = Row {
                conversation: r.try_get(0).map_err(e)?,
                inserted_at: r.try_get(1).map_err(e)?,
                seq: Some(r.try_get(2).map_err(e)?),
                id: r.try_get(3).map_err(e)?,
                sender: r.try_get(4).map_err(e)?,
                body: r.try_get(5).map_err(e)?,
            };
            n += 1;
            if last.is_some_and(|l| l.0 != row.conversation) {
                check_head(c, last);
            }
            last = Some((row.conversation, row.seq.unwrap_or(0), row.inserted_at));
            c.row(&row);
        }
    }
    check_head(c, last);
    c.finish();
    tx.commit().map_err(e)?;
    Ok(Store { name: "postgres".into(), integrity: None, tables: format!("messages {n} rows") })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(conversation: Uuid, at: i64, body: &str) -> Row {
        let id = nexus::ids::v7(at, at as u64);
        Row { conversation, id, sender: Uuid::from_u128(9), body: body.into(), inserted_at: at, seq: None }
    }

    fn check(acked: &[(&Row, u32)], rows: &[Row]) -> Violations {
        let map = acked.iter().map(|(r, round)| (r.id, (r.conversation, *round))).collect();
        let mut c = Checker::new(map, true);
        for r in rows {
            c.row(r);
        }
        c.finish();
        c.v
    }

    #[test]
    fn ids_give_back_their_instant() {
        let at = 1_768_161_950_055_142;
        assert_eq!(id_micros(nexus::ids::v7(at, u64::MAX)), at);
        assert!(tagged("12-xx") && !tagged("xx") && !tagged("-x") && !tagged("12"));
    }

    #[test]
    fn clean_rounds_pass() {
        let c = Uuid::from_u128(1);
        let (a, b, x) = (row(c, 1_000, "1-x"), row(c, 2_000, "2-x"), row(c, 3_000, "3-x"));
        // `x` is stored but was never acknowledged (in flight at a kill): allowed.
        assert_eq!(check(&[(&a, 0), (&b, 1)], &[a.clone(), b.clone(), x]).count, 0);
    }

    #[test]
    fn lost_duplicated_and_reordered_messages_fail() {
        let c = Uuid::from_u128(1);
        let (a, b) = (row(c, 1_000, "1-x"), row(c, 2_000, "2-x"));
        assert_eq!(check(&[(&a, 0), (&b, 0)], std::slice::from_ref(&a)).count, 1, "lost");
        let again = Row { body: a.body.clone(), ..row(c, 3_000, "") };
        assert_eq!(check(&[(&a, 0)], &[a.clone(), again]).count, 1, "stored twice under two ids");
        assert_eq!(check(&[(&a, 1), (&b, 0)], &[a.clone(), b.clone()]).count, 2, "a later round sorts first");
        let stale = Row { inserted_at: 500, ..b.clone() };
        assert!(check(&[], &[a, stale]).count >= 2, "inserted_at going back, and not the id's instant");
    }
}
