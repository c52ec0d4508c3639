//! Cluster mode's Redis side, against a real `redis-server`: what a node publishes when its
//! writer commits, that publishing never holds the writer up when Redis is gone, and what a
//! node receives for the conversations it watches, across cuts and restarts of Redis.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::redis::Redis;
use nexus::bus::Sequenced;
use nexus::chat::new_msg_payload;
use nexus::cluster::publication::decode;
use nexus::cluster::publisher::{channel, spawn_publisher, Publisher};
use nexus::cluster::subscriber::{spawn_subscriber, FabricEvent, Subscriber};
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
    Arc::new(CommitBatch::committed(messages))
}

/// A plain connection (to subscribe, or to send a command), reading with a deadline.
fn connection(redis: &Redis) -> redis::Connection {
    let conn = redis.client().get_connection_with_timeout(WAIT).expect("connects");
    conn.set_read_timeout(Some(WAIT)).expect("read timeout");
    conn
}

/// The next published message: (channel, payload).
fn next_message(sub: &mut redis::PubSub<'_>) -> (String, Vec<u8>) {
    let msg = sub.get_message().expect("a publication within the deadline");
    (msg.get_channel_name().to_string(), msg.get_payload_bytes().to_vec())
}

fn publisher(redis: &Redis) -> Publisher {
    publisher_of(redis, "node-a/1")
}

fn publisher_of(redis: &Redis, incarnation: &str) -> Publisher {
    spawn_publisher(redis.client(), "nx-test:".into(), incarnation.into(), 16).expect("publisher starts")
}

/// A subscriber for node `node-b/1`, and the events it hands on.
fn subscriber_b(redis: &Redis) -> (Subscriber, mpsc::Receiver<FabricEvent>) {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let sink = Arc::new(move |e| tx.lock().expect("lock").send(e).expect("test still listening"));
    (spawn_subscriber(redis.client(), "nx-test:".into(), "node-b/1".into(), 64, sink).expect("subscriber starts"), rx)
}

fn next_event(rx: &mpsc::Receiver<FabricEvent>) -> FabricEvent {
    rx.recv_timeout(WAIT).expect("an event within the deadline")
}

/// What a subscriber should hand on for `messages` of `conversation`.
fn remote(conversation: Uuid, messages: &[Committed]) -> FabricEvent {
    let messages = messages
        .iter()
        .map(|c| Sequenced {
            seq: c.message.seq,
            inserted_at_us: c.message.inserted_at_us,
            payload: new_msg_payload(&c.message).into(),
        })
        .collect();
    FabricEvent::Remote { conversation, messages }
}

/// Offers `messages` and waits until Redis has taken them (so later publications follow them).
fn publish(publisher: &Publisher, messages: &[Committed]) {
    let before = publisher.stats().published.load(Ordering::Relaxed);
    let conversations: std::collections::HashSet<Uuid> = messages.iter().map(|c| c.message.conversation).collect();
    publisher.offer(&batch(messages.to_vec()));
    let want = before + conversations.len() as u64;
    wait_until("the publication taken by Redis", || publisher.stats().published.load(Ordering::Relaxed) >= want);
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
    let mut conn = connection(&redis);
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
    publisher.offer(&Arc::new(CommitBatch::failed(vec![committed(a, 4)], "storage unavailable")));
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
    let mut conn = connection(&redis);
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

#[test]
fn a_watched_conversation_gets_other_nodes_messages_in_order_and_never_its_own() {
    let redis = Redis::start();
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let (sub, events) = subscriber_b(&redis);
    sub.watch(a).expect("watch");
    assert_eq!(next_event(&events), FabricEvent::Live(a));
    sub.watch(b).expect("watch");
    assert_eq!(next_event(&events), FabricEvent::Live(b));
    sub.watch(b).expect("watch");
    assert_eq!(next_event(&events), FabricEvent::Live(b), "a repeated watch is answered too");
    let (node_a, own) = (publisher(&redis), publisher_of(&redis, "node-b/1"));
    publish(&own, &[committed(a, 1)]);
    let from_a = [committed(a, 2), committed(a, 3)];
    publish(&node_a, &from_a);
    assert_eq!(next_event(&events), remote(a, &from_a), "its own publication was skipped");
    // After an unwatch (done once the next watch is answered), nothing more arrives for it.
    sub.unwatch(a).expect("unwatch");
    sub.watch(c).expect("watch");
    assert_eq!(next_event(&events), FabricEvent::Live(c));
    publish(&node_a, &[committed(a, 4)]);
    let for_b = [committed(b, 1)];
    publish(&node_a, &for_b);
    assert_eq!(next_event(&events), remote(b, &for_b), "nothing for the unwatched conversation");
    // Bytes that are not a publication are dropped, and the subscription goes on.
    let mut conn = connection(&redis);
    redis::cmd("PUBLISH").arg(channel("nx-test:", c)).arg(&b"M\xff"[..]).exec(&mut conn).expect("publish junk");
    let for_c = [committed(c, 1)];
    publish(&node_a, &for_c);
    assert_eq!(next_event(&events), remote(c, &for_c));
}

#[test]
fn a_cut_or_restarted_redis_is_reported_and_every_watch_is_restored() {
    let mut redis = Redis::start();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let (sub, events) = subscriber_b(&redis);
    sub.watch(a).expect("watch");
    assert_eq!(next_event(&events), FabricEvent::Live(a));
    // Redis cuts the subscriber (as it does to a client over its output buffer limit).
    let mut conn = connection(&redis);
    redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").exec(&mut conn).expect("client kill");
    assert_eq!(next_event(&events), FabricEvent::Down);
    assert_eq!(next_event(&events), FabricEvent::Up, "resubscribed after the cut");
    let node_a = publisher(&redis);
    let first = [committed(a, 1)];
    publish(&node_a, &first);
    assert_eq!(next_event(&events), remote(a, &first));
    // Redis gone: watching is answered at once (the database covers it meanwhile).
    redis.kill();
    assert_eq!(next_event(&events), FabricEvent::Down);
    sub.watch(b).expect("watch");
    assert_eq!(next_event(&events), FabricEvent::Live(b));
    redis.run();
    assert_eq!(next_event(&events), FabricEvent::Up, "resubscribed after the restart");
    let (to_a, to_b) = ([committed(a, 2)], [committed(b, 1)]);
    let deadline = Instant::now() + WAIT;
    // The publisher reconnects on its own schedule: offer until Redis takes it.
    while node_a.stats().published.load(Ordering::Relaxed) < 2 {
        assert!(Instant::now() < deadline, "the publisher did not reconnect");
        node_a.offer(&batch(to_a.to_vec()));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(next_event(&events), remote(a, &to_a));
    publish(&node_a, &to_b);
    let mut got = next_event(&events);
    while got == remote(a, &to_a) {
        got = next_event(&events); // the same batch, offered again while reconnecting
    }
    assert_eq!(got, remote(b, &to_b), "the watch made while Redis was down is subscribed");
}
