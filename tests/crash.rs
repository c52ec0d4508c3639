//! Crash safety (issue 3; PostgreSQL since issue 13): senders stream messages, the server is
//! killed with SIGKILL in the middle of the stream, and a new server on the same store (SQLite
//! file or PostgreSQL database) has every message that had been
//! acknowledged, in each sender's send order. Messages committed but not yet acknowledged may
//! be there too, but only as a continuation of the acknowledged ones: what a sender finds
//! stored is always a prefix of what it sent, never a sequence with holes.

mod common;

use std::os::unix::process::ExitStatusExt as _;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use sonic_rs::{JsonValueTrait, Value};

use common::*;

const SENDERS: usize = 2;
/// Unacknowledged messages each sender keeps in flight.
const WINDOW: usize = 20;
/// Acknowledgements each sender must have before the kill.
const ACKED_BEFORE_KILL: usize = 200;
const WAIT: Duration = Duration::from_secs(15);

fn kill_mid_stream_then_restart(backend: Backend, env: &[(&str, &str)]) {
    // The senders flood on purpose (thousands of messages a second per socket): no rate limit.
    let env: &[(&str, &str)] = &[env, &[("NEXUS_MSG_RATE", "0")]].concat();
    let mut first = start_server_on(backend, env);
    let port = first.port;
    let topic = new_topic();
    let conversation = conversation_of(&topic).to_string();
    let subs: Vec<String> = (0..SENDERS).map(|_| new_sub()).collect();
    let (reached_tx, reached) = mpsc::channel();
    let handles: Vec<_> = subs
        .iter()
        .map(|sub| {
            let mut c = joined(port, sub, &topic);
            let (topic, reached_tx) = (topic.clone(), reached_tx.clone());
            // `max` is far more than the senders can get through before the kill.
            thread::spawn(move || {
                stream_messages(&mut c, &topic, WINDOW, 1_000_000, ACKED_BEFORE_KILL, reached_tx, WAIT)
            })
        })
        .collect();
    for _ in 0..SENDERS {
        reached.recv_timeout(WAIT).expect("every sender had its messages acknowledged before the kill");
    }
    first.signal(libc::SIGKILL);
    let status = first.wait_exit(WAIT);
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    let streamed: Vec<Streamed> =
        handles.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect();
    for s in &streamed {
        assert!(s.refused.is_empty(), "nothing is refused before the kill: {s:?}");
        assert!(s.end.starts_with("send") || s.end.starts_with("receive"), "still streaming at the kill: {s:?}");
        assert!(s.acked.len() >= ACKED_BEFORE_KILL && s.sent > s.acked.len(), "{s:?}");
    }

    // A new server on the same store.
    let second = restart_on_same_store(&first, env);
    let rows = second.stored_rows();
    assert!(rows.iter().all(|r| r.conversation == conversation), "rows of another conversation");
    let ids: std::collections::HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), rows.len(), "a message is stored twice");
    for w in rows.windows(2) {
        assert!(w[0].seq < w[1].seq && w[0].inserted_at_us < w[1].inserted_at_us && w[0].id < w[1].id, "{w:?}");
    }
    let mut kept = Vec::new();
    for (i, (sub, s)) in subs.iter().zip(&streamed).enumerate() {
        let mine: Vec<&str> = rows.iter().filter(|r| r.sender == *sub).map(|r| r.body.as_str()).collect();
        let k = check_stored_prefix(&format!("sender {i}"), &mine, s);
        kept.push(k);
    }

    // History on the new server returns the same messages, then new messages follow them.
    let history = full_history(second.port, &subs[0], &conversation, 200);
    let texts = |h: &[Value]| {
        h.iter().map(|m| m["content"]["text"].as_str().expect("text").to_string()).collect::<Vec<String>>()
    };
    assert_eq!(texts(&history), rows.iter().map(|r| r.body.clone()).collect::<Vec<_>>());
    let mut c = joined(second.port, &subs[0], &topic);
    let after = send_all(&mut c, "1", &topic, &[format!("m-{}", kept[0])]);
    let last_before = history.last().and_then(|m| m["inserted_at"].as_str()).expect("history is not empty");
    assert!(after[0].inserted_at.as_str() > last_before, "{} after {last_before}", after[0].inserted_at);
    let rows_after = second.stored_rows();
    assert_eq!(rows_after.len(), rows.len() + 1);
    assert_eq!(
        rows_after.last().map(|r| (r.id.as_str(), r.body.as_str())),
        Some((after[0].id.as_str(), after[0].text.as_str()))
    );
}

fn sigkill_mid_stream_loses_no_acknowledged_message(backend: Backend) {
    kill_mid_stream_then_restart(backend, &[]);
}

both_backends!(sigkill_mid_stream_loses_no_acknowledged_message);

#[test]
fn sigkill_mid_stream_loses_no_acknowledged_message_with_sync_full() {
    kill_mid_stream_then_restart(Backend::Sqlite, &[("NEXUS_SYNC", "full")]);
}
