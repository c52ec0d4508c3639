//! criterion: presence state encoding and diff building for 1 / 100 / 10,000 presences — the
//! owner core's work per join (a full state for the joiner) and per flushed diff.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nexus::presence::{Diff, Meta, RefMaker, TopicPresence};
use uuid::Uuid;

fn presence(c: &mut Criterion) {
    let mut refs = RefMaker::new(0);
    let mut group = c.benchmark_group("presence");
    for n in [1usize, 100, 10_000] {
        let metas: Vec<(Uuid, Meta)> =
            (0..n).map(|i| (Uuid::from_u128(i as u128 / 2), Meta::new(refs.make(), 1))).collect();
        let mut topic = TopicPresence::default();
        for (user, meta) in &metas {
            topic.track(*user, *meta);
        }
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("state_json_{n}"), |b| b.iter(|| black_box(topic.state_json())));
        group.bench_function(format!("diff_json_{n}_joins"), |b| {
            b.iter(|| {
                let mut diff = Diff::default();
                for (user, meta) in &metas {
                    diff.join(*user, *meta);
                }
                black_box(diff.to_json())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, presence);
criterion_main!(benches);
