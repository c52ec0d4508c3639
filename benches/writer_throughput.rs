//! The writer alone at full speed: full batches (or `NEXUS_BENCH_BATCH` messages each) over N conversations on a database
//! that already holds ≥ 1M messages, the way the writer thread runs (commit, then the
//! between-batch maintenance that moves `recent` rows into the indexed history).
//!
//! `cargo bench --bench writer_throughput` (only runs under `cargo bench`; `cargo test`
//! skips it). Env: `NEXUS_BENCH_PREFILL` (rows, default 1000000), `NEXUS_BENCH_SECS` (per run,
//! default 10), `NEXUS_BENCH_SYNC` (`normal`|`full`), `NEXUS_BENCH_CONVERSATIONS` (comma
//! list, default `100,1000,10000`), `NEXUS_BENCH_BATCH` (messages per measured batch, default
//! 1024; smaller batches show the fixed cost of each commit), `NEXUS_BENCH_DIR` (default the temp dir; use a real disk),
//! `NEXUS_BENCH_PG_URL` (measure PostgreSQL instead: a database whose Nexus tables are dropped
//! and recreated for each run). Prints one JSON line per conversation count.

use std::time::{Duration, Instant};

use nexus::store::schema::{open_writer, Sync};
use nexus::store::{Committed, Message, Origin, PgStore, PgTarget, SqliteStore, Store};
use uuid::Uuid;

/// A full writer batch, as the writer takes under load; the prefill always uses it.
const FULL: usize = 1024;

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Gen {
    seed: u64,
    /// Ids must increase like the writer's UUIDv7s (the history table is ordered by them).
    next_id: u64,
    conversations: Vec<Uuid>,
    /// Messages per batch.
    batch: usize,
}

impl Gen {
    fn batch(&mut self) -> Vec<Committed> {
        (0..self.batch)
            .map(|_| {
                self.seed = self.seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let conversation = self.conversations[(self.seed >> 33) as usize % self.conversations.len()];
                let message = Message {
                    id: {
                        self.next_id += 1;
                        Uuid::from_u64_pair(self.next_id, self.seed)
                    },
                    conversation,
                    sender: Uuid::from_u64_pair(1, self.seed % 100_000),
                    body: "x".repeat(100),
                    inserted_at_us: nexus::ids::now_micros(),
                    seq: 0,
                };
                Committed { message, origin: Some(Origin { core: 0, ticket: 0 }) }
            })
            .collect()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

/// A fresh PostgreSQL store: the Nexus tables of the database at `url` dropped and recreated.
fn pg_store(url: &str) -> Box<dyn Store> {
    let mut admin = postgres::Client::connect(url, postgres::NoTls).expect("connect to NEXUS_BENCH_PG_URL");
    admin
        .batch_execute("DROP TABLE IF EXISTS messages, conversations, nexus_batches, nexus_schema;")
        .expect("drop the Nexus tables");
    let timeout = Duration::from_secs(30);
    let target = PgTarget::parse(url, timeout).expect("NEXUS_BENCH_PG_URL");
    let mut lanes = PgStore::open(&target, "bench", timeout, 1).expect("open PostgreSQL");
    Box::new(lanes.pop().expect("one lane"))
}

fn run(conversations: usize, batch: usize, prefill: usize, secs: u64, sync: Sync, dir: &std::path::Path) {
    let path = dir.join(format!("throughput-{conversations}.db"));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let pg_url = std::env::var("NEXUS_BENCH_PG_URL").ok();
    let mut store: Box<dyn Store> = match &pg_url {
        Some(url) => pg_store(url),
        None => {
            let mut db = open_writer(&path, sync, None).expect("open");
            let wal = nexus::store::schema::watch_wal(&mut db, &path).expect("WAL hook");
            let store = SqliteStore::new(db).expect("store");
            nexus::store::schema::spawn_checkpointer(&path, wal).expect("checkpointer");
            Box::new(store)
        }
    };
    let mut gen =
        Gen { seed: 7, next_id: 1 << 40, conversations: (0..10_000).map(|_| Uuid::new_v4()).collect(), batch: FULL };
    for _ in 0..prefill.div_ceil(FULL) {
        store.commit(&mut gen.batch()).expect("prefill");
        store.maintain(false);
    }
    store.maintain(true);
    gen.conversations.truncate(conversations);
    gen.batch = batch;
    let mut commits = Vec::new();
    let mut stalls = Vec::new();
    let mut rows = 0usize;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        let mut batch = gen.batch();
        let t = Instant::now();
        store.commit(&mut batch).expect("commit");
        commits.push(t.elapsed());
        store.maintain(false);
        stalls.push(t.elapsed());
        rows += batch.len();
    }
    let elapsed = start.elapsed().as_secs_f64();
    commits.sort_unstable();
    stalls.sort_unstable();
    println!(
        "{{\"store\":\"{}\",\"conversations\":{conversations},\"batch\":{batch},\"prefill\":{prefill},\"sync\":\"{}\",\"rows_per_s\":{:.0},\
         \"commit_ms_p50\":{:.2},\"commit_ms_p99\":{:.2},\"batch_ms_p50\":{:.2},\"batch_ms_p99\":{:.2},\"batch_ms_max\":{:.2}}}",
        if pg_url.is_some() { "postgres" } else { "sqlite" },
        if sync == Sync::Full { "full" } else { "normal" },
        rows as f64 / elapsed,
        percentile(&commits, 0.5),
        percentile(&commits, 0.99),
        percentile(&stalls, 0.5),
        percentile(&stalls, 0.99),
        percentile(&stalls, 1.0),
    );
    drop(store);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("writer_throughput: skipped (run it with `cargo bench --bench writer_throughput`)");
        return;
    }
    let prefill = env_or("NEXUS_BENCH_PREFILL", 1_000_000usize);
    let batch = env_or("NEXUS_BENCH_BATCH", FULL).max(1);
    let secs = env_or("NEXUS_BENCH_SECS", 10u64);
    let sync = if std::env::var("NEXUS_BENCH_SYNC").is_ok_and(|v| v == "full") { Sync::Full } else { Sync::Normal };
    let dir = std::env::var("NEXUS_BENCH_DIR").map(std::path::PathBuf::from).unwrap_or_else(|_| std::env::temp_dir());
    let list = std::env::var("NEXUS_BENCH_CONVERSATIONS").unwrap_or_else(|_| "100,1000,10000".into());
    for n in list.split(',').filter_map(|s| s.trim().parse::<usize>().ok()) {
        run(n, batch, prefill, secs, sync, &dir);
    }
}
