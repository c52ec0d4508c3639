//! Cluster mode's Redis side, against a real `redis-server`: what a node publishes when its
//! writer commits, and that publishing never holds the writer up when Redis is gone.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis::Redis;
use nexus::chat::new_msg_payload;
use nexus::cluster::publication::decode;
use nexus::cluster::publisher::{channel, spawn_publisher, Publisher};
use nexus::store::{CommitBatch, Committed, Message};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(10);

fn committed(conversation: Uuid, seq: u64) -> Committed {
    let at = nexus::ids::now_micros();
    let message = Message {
        id: nexus::ids::v7(at, seq),
        conversation,
        sender: Uuid::new_v4(),
        body: format!("message {seq}"),
        inserted_at_us: at,
        seq,
    };
    Committed { message, origin: None }
}

fn batch(messages: Vec<Committed>) -> Arc<CommitBatch> {
    Arc::new(CommitBatch { messages, failure: None })
}

/// A connection for subscribing, reading with a deadline.
fn subscriber(redis: &Redis) -> redis::Connection {
    let client = redis::Client::open(redis.url()).expect("redis url");
    let conn = client.get_connection_with_timeout(WAIT).expect("subscriber connects");
    conn.set_read_timeout(Some(WAIT)).expect("read timeout");
    conn
}

/// The next published message: (channel, payload).
fn next_message(sub: &mut redis::PubSub<'_>) -> (String, Vec<u8>) {
    let msg = sub.get_message().expect("a publication within the deadline");
    (msg.get_channel_name().to_string(), msg.get_payload_bytes().to_vec())
}

fn publisher(redis: &Redis) -> Publisher {
    let client = redis::Client::open(redis.url()).expect("redis url");
    spawn_publisher(client, "nx-test:".into(), "node-a/1".into(), 16).expect("publisher starts")
}

/// Waits until `f` holds, or fails after `WAIT` naming `what`.
fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_committed_batch_is_published_once_per_conversation_in_commit_order() {
    let redis = Redis::start();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut conn = subscriber(&redis);
    let mut sub = conn.as_pubsub();
    sub.subscribe(&[channel("nx-test:", a), channel("nx-test:", b)]).expect("subscribe");
    let publisher = publisher(&redis);
    let messages = vec![committed(a, 1), committed(b, 1), committed(a, 2), committed(a, 3)];
    publisher.offer(&batch(messages.clone()));
    let mut got = [next_message(&mut sub), next_message(&mut sub)];
    got.sort();
    let mut want = [channel("nx-test:", a), channel("nx-test:", b)];
    want.sort();
    assert_eq!(got.iter().map(|g| g.0.clone()).collect::<Vec<_>>(), want);
    let (_, bytes) = got.iter().find(|g| g.0 == channel("nx-test:", a)).expect("a's publication");
    let p = decode(bytes).expect("decodes");
    assert_eq!(p.incarnation, "node-a/1");
    let seqs: Vec<u64> = p.entries.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
    for (entry, m) in p.entries.iter().zip([&messages[0], &messages[2], &messages[3]]) {
        assert_eq!(entry.payload, new_msg_payload(&m.message), "the broadcast payload, encoded once");
        assert_eq!(entry.inserted_at_us, m.message.inserted_at_us);
    }
    // A failed batch is never published.
    publisher.offer(&Arc::new(CommitBatch { messages: vec![committed(a, 4)], failure: Some("storage unavailable") }));
    publisher.offer(&batch(vec![committed(b, 2)]));
    let (ch, bytes) = next_message(&mut sub);
    assert_eq!(ch, channel("nx-test:", b), "the failed batch was skipped");
    assert_eq!(decode(&bytes).expect("decodes").entries[0].seq, 2);
    // Counted once Redis answered, which may be just after the subscriber got it.
    wait_until("three publications counted", || publisher.stats().published.load(Ordering::Relaxed) == 3);
    assert_eq!(publisher.stats().dropped.load(Ordering::Relaxed), 0);
}

#[test]
fn without_redis_batches_are_dropped_at_once_and_publishing_resumes_when_it_returns() {
    let mut redis = Redis::start();
    let a = Uuid::new_v4();
    let publisher = publisher(&redis);
    publisher.offer(&batch(vec![committed(a, 1)]));
    wait_until("the first publication", || publisher.stats().published.load(Ordering::Relaxed) == 1);
    redis.kill();
    // Offering never waits for Redis: a whole burst is taken (and dropped) at once.
    let began = Instant::now();
    for seq in 2..=100 {
        publisher.offer(&batch(vec![committed(a, seq)]));
    }
    assert!(began.elapsed() < Duration::from_millis(500), "offer blocked: {:?}", began.elapsed());
    wait_until("every batch dropped", || publisher.stats().dropped.load(Ordering::Relaxed) == 99);
    assert!(!publisher.stats().up.load(Ordering::Relaxed));
    redis.run();
    let mut conn = subscriber(&redis);
    let mut sub = conn.as_pubsub();
    sub.subscribe(channel("nx-test:", a)).expect("subscribe");
    // Reconnects are spaced out (at most a second apart): offer until one gets through.
    let deadline = Instant::now() + WAIT;
    let mut seq = 101;
    while publisher.stats().published.load(Ordering::Relaxed) < 2 {
        assert!(Instant::now() < deadline, "publishing did not resume after Redis came back");
        publisher.offer(&batch(vec![committed(a, seq)]));
        seq += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, bytes) = next_message(&mut sub);
    assert!(decode(&bytes).expect("decodes").entries[0].seq > 100);
    assert!(publisher.stats().up.load(Ordering::Relaxed));
}
