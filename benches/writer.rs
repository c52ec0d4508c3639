//! Criterion: one writer commit (plus the between-batch maintenance the writer thread runs) of
//! 1, 64 and 1024 messages spread over 10,000 conversations, on a database prefilled with
//! 200,000 messages. Throughput is in messages. The full-scale figure (≥ 1M rows, rows/s and
//! commit p99) comes from `benches/writer_throughput.rs`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use nexus::store::schema::{open_writer, Sync};
use nexus::store::{Committed, Message, Origin, SqliteStore, Store};
use uuid::Uuid;

const CONVERSATIONS: usize = 10_000;
const PREFILL: usize = 200_000;

fn batch(conversations: &[Uuid], n: usize, seed: &mut u64) -> Vec<Committed> {
    (0..n)
        .map(|_| {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let conversation = conversations[(*seed >> 33) as usize % conversations.len()];
            let message = Message {
                id: Uuid::now_v7(),
                conversation,
                sender: Uuid::from_u64_pair(1, *seed),
                body: "x".repeat(100),
                inserted_at_us: nexus::ids::now_micros(),
                seq: 0,
            };
            Committed { message, origin: Some(Origin { core: 0, ticket: 0 }) }
        })
        .collect()
}

fn writer(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("nexus-bench-writer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let conversations: Vec<Uuid> = (0..CONVERSATIONS).map(|_| Uuid::new_v4()).collect();
    let mut store =
        SqliteStore::new(open_writer(&dir.join("bench.db"), Sync::Normal, None).expect("open")).expect("store");
    let mut seed = 42u64;
    // Under `cargo test` (no `--bench`) the bench runs once as a smoke test: keep it small.
    let prefill = if std::env::args().any(|a| a == "--bench") { PREFILL } else { 4_096 };
    for _ in 0..prefill / 1024 {
        store.commit(&mut batch(&conversations, 1024, &mut seed)).expect("prefill");
        store.maintain(false);
    }
    let mut group = c.benchmark_group("writer_commit");
    for size in [1usize, 64, 1024] {
        group.throughput(Throughput::Elements(size as u64));
        group.bench_function(format!("batch_{size}"), |b| {
            b.iter_batched(
                || batch(&conversations, size, &mut seed),
                |mut rows| {
                    store.commit(black_box(&mut rows)).expect("commit");
                    store.maintain(false);
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, writer);
criterion_main!(benches);
