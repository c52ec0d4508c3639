//! Message persistence (issue 3; PostgreSQL since issue 13): every acknowledged message is
//! stored exactly once, in the order every member saw it broadcast (concurrent senders on both
//! cores); SQLite's move from `recent` into `messages` changes nothing; SIGTERM commits what
//! was accepted and exits 0; a restart on the same file serves the old history and continues
//! after it.
//!
//! The store is read directly (SQLite read-only, both tables in one snapshot; PostgreSQL over
//! its own connection) and through the history API.

mod common;

use std::collections::HashSet;
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use sonic_rs::{JsonValueTrait, Value};

use common::*;

const RECV_TIMEOUT: Duration = Duration::from_secs(10);
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

fn join_threads<T>(handles: Vec<thread::JoinHandle<T>>) -> Vec<T> {
    handles.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
}

/// `(id, sender, text, inserted_at)` of a broadcast, to compare with a database row.
fn live_key(m: &Live) -> (String, String, String, String) {
    (m.id.clone(), m.sender.clone(), m.text.clone(), m.inserted_at.clone())
}

fn row_key(r: &DbRow) -> (String, String, String, String) {
    (r.id.clone(), r.sender.clone(), r.body.clone(), format_micros(r.inserted_at_us))
}

/// Rows are in commit order with unique seqs and ids and strictly increasing times.
#[track_caller]
fn check_rows_well_formed(rows: &[DbRow]) {
    let ids: HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), rows.len(), "a message is stored twice (both tables?)");
    for w in rows.windows(2) {
        assert!(w[0].seq < w[1].seq, "seq not strictly increasing: {:?} then {:?}", w[0], w[1]);
        assert!(w[0].inserted_at_us < w[1].inserted_at_us, "inserted_at not increasing: {:?} then {:?}", w[0], w[1]);
        assert!(w[0].id < w[1].id, "ids not increasing in commit order: {:?} then {:?}", w[0], w[1]);
    }
}

fn every_acked_message_is_stored_once_in_broadcast_order(backend: Backend) {
    const SOCKETS: usize = 12; // all on one of 2 cores with probability 2^-11
    const SENDERS: usize = 4;
    const PER_SENDER: usize = 50;
    const TOTAL: usize = SENDERS * PER_SENDER;

    let server = start_server_on(backend, &[("NEXUS_WORKERS", "2")]);
    let topic = new_topic();
    let conversation = conversation_of(&topic).to_string();
    let subs: Vec<String> = (0..SOCKETS).map(|_| new_sub()).collect();
    // Everyone is a member (join acknowledged) before anyone sends.
    let clients: Vec<Client> = subs.iter().map(|sub| joined(server.port, sub, &topic)).collect();
    let start = Arc::new(Barrier::new(SENDERS));

    let handles: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let topic = topic.clone();
            let start = Arc::clone(&start);
            thread::spawn(move || {
                let sender = i < SENDERS;
                if sender {
                    start.wait();
                    for k in 0..PER_SENDER {
                        c.send_text(&new_msg_push("1", &format!("m{k}"), &topic, &format!("s{i}-{k}")));
                    }
                }
                let mut msgs: Vec<Live> = Vec::with_capacity(TOTAL);
                let mut acks = 0usize;
                let deadline = Instant::now() + Duration::from_secs(30);
                while msgs.len() < TOTAL || (sender && acks < PER_SENDER) {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    let frame = c
                        .try_recv_text(remaining.min(RECV_TIMEOUT))
                        .unwrap_or_else(|e| panic!("socket {i}: {e} after {} messages and {acks} acks", msgs.len()));
                    if is_new_msg(&frame) {
                        msgs.push(parse_live(&frame, &topic));
                    } else {
                        assert!(sender, "socket {i}: unexpected {frame}");
                        assert_eq!(frame, v2_ok(Some("1"), &format!("m{acks}"), &topic), "socket {i}: acks in order");
                        let own = format!("s{i}-{acks}");
                        assert!(msgs.iter().any(|m| m.text == own), "socket {i}: ack of {own} before its broadcast");
                        acks += 1;
                    }
                }
                msgs
            })
        })
        .collect();
    let received = join_threads(handles);

    // One broadcast order for every member.
    let reference = &received[0];
    for (i, msgs) in received.iter().enumerate() {
        assert_eq!(msgs, reference, "socket {i} saw another order or content than socket 0");
    }
    // Each sender's messages in its send order.
    for (i, sub) in subs.iter().enumerate().take(SENDERS) {
        let mine: Vec<&str> = reference.iter().filter(|m| m.sender == *sub).map(|m| m.text.as_str()).collect();
        let expected: Vec<String> = (0..PER_SENDER).map(|k| format!("s{i}-{k}")).collect();
        assert_eq!(mine, expected, "sender {i}");
    }

    // Every acknowledged message is stored exactly once, in broadcast order.
    let live_keys: Vec<_> = reference.iter().map(live_key).collect();
    let rows = server.stored_rows();
    check_rows_well_formed(&rows);
    assert!(rows.iter().all(|r| r.conversation == conversation), "rows of another conversation");
    assert_eq!(rows.iter().map(row_key).collect::<Vec<_>>(), live_keys, "database order != broadcast order");
    // History (4 pages of 64, the last partial) carries the broadcast payloads.
    let payloads: Vec<Value> = reference.iter().map(|m| m.payload.clone()).collect();
    assert_eq!(full_history(server.port, &subs[5], &conversation, 64), payloads);

    if backend == Backend::Postgres {
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=TOTAL as i64).collect::<Vec<_>>(), "the conversation's seq is dense from 1");
        return;
    }
    // SQLite: once idle, the writer moves the rows from `recent` into `messages`: same content.
    let db = server.db_path();
    wait_for_files(server.dir(), Duration::from_secs(10), "recent rows moved into messages", || {
        db_recent_count(&db) == 1 // all but the newest row, kept for the next start-up
    });
    let merged = db_rows(&db);
    assert_eq!(merged, rows, "moving rows into `messages` changed them");
    assert_eq!(full_history(server.port, &subs[5], &conversation, 64), payloads, "history after the move");
}

both_backends!(every_acked_message_is_stored_once_in_broadcast_order);

/// Sends `per_sender` messages from each of `senders` sockets in parallel; returns their subs
/// and the broadcasts one extra member saw.
fn burst(port: u16, topic: &str, senders: usize, per_sender: usize) -> (Vec<String>, Vec<Live>) {
    let subs: Vec<String> = (0..senders).map(|_| new_sub()).collect();
    let mut watcher = joined(port, &new_sub(), topic);
    let clients: Vec<Client> = subs.iter().map(|s| joined(port, s, topic)).collect();
    let handles: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let topic = topic.to_string();
            thread::spawn(move || {
                let bodies: Vec<String> = (0..per_sender).map(|k| format!("s{i}-{k}")).collect();
                send_all(&mut c, "1", &topic, &bodies);
                c
            })
        })
        .collect();
    let _clients = join_threads(handles); // every message acknowledged
    let seen: Vec<Live> =
        (0..senders * per_sender).map(|_| parse_live(&watcher.recv_until(RECV_TIMEOUT, is_new_msg), topic)).collect();
    (subs, seen)
}

fn sigterm_after_a_burst_exits_0_with_every_acked_message_stored(backend: Backend) {
    let mut server = start_server_on(backend, &[]);
    let topic = new_topic();
    let (subs, seen) = burst(server.port, &topic, 2, 150);

    server.signal(libc::SIGTERM);
    let status = server.wait_exit(EXIT_TIMEOUT);
    assert_eq!(status.code(), Some(0), "exit status {status:?}; stderr:\n{}", server.logs());

    let rows = server.stored_rows();
    check_rows_well_formed(&rows);
    assert_eq!(rows.len(), 300);
    assert_eq!(rows.iter().map(row_key).collect::<Vec<_>>(), seen.iter().map(live_key).collect::<Vec<_>>());
    for (i, sub) in subs.iter().enumerate() {
        let mine: Vec<&str> = rows.iter().filter(|r| r.sender == *sub).map(|r| r.body.as_str()).collect();
        assert_eq!(mine, (0..150).map(|k| format!("s{i}-{k}")).collect::<Vec<_>>(), "sender {i}");
    }
}

fn sigterm_while_messages_stream_in_keeps_every_acked_message(backend: Backend) {
    const WINDOW: usize = 20;
    // A flood on purpose (thousands of messages a second per socket): no rate limit.
    let mut server = start_server_on(backend, &[("NEXUS_MSG_RATE", "0")]);
    let port = server.port;
    let topic = new_topic();
    let subs: Vec<String> = (0..2).map(|_| new_sub()).collect();
    let (reached_tx, reached) = mpsc::channel();
    let handles: Vec<_> = subs
        .iter()
        .map(|sub| {
            let mut c = joined(port, sub, &topic);
            let (topic, reached_tx) = (topic.clone(), reached_tx.clone());
            thread::spawn(move || stream_messages(&mut c, &topic, WINDOW, 50_000, 100, reached_tx, RECV_TIMEOUT))
        })
        .collect();
    for _ in 0..subs.len() {
        reached.recv_timeout(RECV_TIMEOUT).expect("both senders had 100 messages acknowledged");
    }
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(EXIT_TIMEOUT);
    assert_eq!(status.code(), Some(0), "exit status {status:?}; stderr:\n{}", server.logs());
    let streamed = join_threads(handles);

    let rows = server.stored_rows();
    check_rows_well_formed(&rows);
    for (sub, s) in subs.iter().zip(&streamed) {
        // The stream ends when the server goes away, or once it refuses messages while it
        // stops (after its writer has finished, a new message cannot be saved).
        let gone = s.end.starts_with("send") || s.end.starts_with("receive");
        assert!(gone || (s.end == "done" && !s.refused.is_empty()), "stream ended by {s:?}");
        assert!(s.acked.len() >= 100, "{s:?}");
        let mine: Vec<&str> = rows.iter().filter(|r| r.sender == *sub).map(|r| r.body.as_str()).collect();
        check_stored_prefix(sub, &mine, s);
    }
}

both_backends!(
    sigterm_after_a_burst_exits_0_with_every_acked_message_stored,
    sigterm_while_messages_stream_in_keeps_every_acked_message
);

#[test]
fn restart_on_the_same_file_serves_old_history_and_continues_after_it() {
    let mut first = start_server(&[]);
    let db = first.db_path();
    let topic = new_topic();
    let other = new_topic();
    let sub = new_sub();
    let old: Vec<String> = (0..5).map(|k| format!("old-{k}")).collect();
    let old_live = send_all(&mut joined(first.port, &sub, &topic), "1", &topic, &old);
    let other_live = send_all(&mut joined(first.port, &sub, &other), "1", &other, &["elsewhere".to_string()]);
    first.signal(libc::SIGTERM);
    let status = first.wait_exit(EXIT_TIMEOUT);
    assert_eq!(status.code(), Some(0), "first server: {status:?}; stderr:\n{}", first.logs());

    let db_str = db.to_str().expect("UTF-8 temp path");
    let second = start_server(&[("DATABASE_PATH", db_str)]);
    let port = second.port;
    let payloads = |live: &[Live]| live.iter().map(|m| m.payload.clone()).collect::<Vec<Value>>();
    assert_eq!(history_page(port, &sub, conversation_of(&topic), ""), (payloads(&old_live), None));
    assert_eq!(history_page(port, &sub, conversation_of(&other), ""), (payloads(&other_live), None));

    let new: Vec<String> = (0..5).map(|k| format!("new-{k}")).collect();
    let mut c = joined(port, &sub, &topic);
    let new_live = send_all(&mut c, "1", &topic, &new);
    let mut all = old_live.clone();
    all.extend(new_live.iter().cloned());
    let history = full_history(port, &sub, conversation_of(&topic), 3);
    assert_eq!(history, payloads(&all), "old messages, then the new ones");
    for w in all.windows(2) {
        assert!(
            w[0].inserted_at < w[1].inserted_at,
            "inserted_at not increasing: {} then {}",
            w[0].inserted_at,
            w[1].inserted_at
        );
        assert!(w[0].id < w[1].id, "ids not increasing: {} then {}", w[0].id, w[1].id);
    }
    // The file in use is the first server's, and it holds everything in commit order.
    let rows = db_rows(&db);
    check_rows_well_formed(&rows);
    let texts: Vec<&str> = rows.iter().map(|r| r.body.as_str()).collect();
    assert_eq!(
        texts,
        ["old-0", "old-1", "old-2", "old-3", "old-4", "elsewhere", "new-0", "new-1", "new-2", "new-3", "new-4"]
    );
    assert!(!second.db_path().exists(), "the second server must not create its default database");
    let text_of = |v: &Value| v["content"]["text"].as_str().map(str::to_string);
    assert_eq!(text_of(&history[5]), Some("new-0".to_string()));
}
