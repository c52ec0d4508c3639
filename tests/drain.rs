//! Graceful drain (issue 6): on SIGTERM the server answers `/healthz` with 503, refuses new
//! WebSocket sessions with 503, closes every open socket with 1001 "going away" spread over
//! `NEXUS_DRAIN_SECS`, commits everything it acknowledged, and exits 0. A second signal stops
//! the drain at once (still committing). Two workers, so both cores drain.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;

const WAIT: Duration = Duration::from_secs(10);

/// `n` sockets joined to `topic` (one sender among them has one acknowledged message).
fn joined_clients(port: u16, topic: &str, n: usize) -> Vec<Client> {
    (0..n)
        .map(|i| {
            let mut c = connect_v2(port, &new_sub());
            c.join(topic, &format!("{i}"));
            c
        })
        .collect()
}

fn send_acked(c: &mut Client, topic: &str, join_ref: &str, body: &str) {
    c.send_text(&v2(Some(join_ref), Some("99"), topic, "new_msg", &format!(r#"{{"body":"{body}"}}"#)));
    c.recv_until(WAIT, |t| t.contains(r#""99","#) && t.contains(r#""status":"ok""#));
}

/// Polls `/healthz` until it answers 503 (the drain started), within `WAIT`.
fn wait_until_draining(port: u16) {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = http_get(port, "/healthz", None);
        if r.status == 503 {
            assert_eq!(String::from_utf8_lossy(&r.body).trim(), "draining");
            return;
        }
        assert!(Instant::now() < deadline, "/healthz still {} after SIGTERM", r.status);
    }
}

#[test]
fn sigterm_drains_with_1001_spread_over_the_drain_time_then_exits_0() {
    let mut server = start_server(&[("NEXUS_DRAIN_SECS", "2")]);
    let port = server.port;
    assert_eq!(http_get(port, "/healthz", None).status, 200);
    let topic = new_topic();
    let mut clients = joined_clients(port, &topic, 10);
    send_acked(&mut clients[0], &topic, "0", "before the drain");

    let signalled = Instant::now();
    server.signal(libc::SIGTERM);
    wait_until_draining(port);
    let valid = format!("vsn=2.0.0&token={}", token(&new_sub()));
    match try_connect(port, &valid, &[], &[]) {
        Err(ConnectError::Status(503)) => {}
        Err(ConnectError::Status(s)) => panic!("upgrade during the drain: expected 503, got {s}"),
        Err(ConnectError::Other(e)) => panic!("upgrade during the drain: expected 503, got {e}"),
        Ok(_) => panic!("upgrade during the drain: expected 503, got 101"),
    }

    // Every socket gets 1001, one reader thread each so the arrival times are real.
    let closes: Vec<(Option<u16>, Duration)> = clients
        .into_iter()
        .map(|mut c| thread::spawn(move || (c.expect_close(WAIT), signalled.elapsed())))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().expect("reader"))
        .collect();
    assert!(closes.iter().all(|(code, _)| *code == Some(1001)), "close codes: {closes:?}");
    let first = closes.iter().map(|(_, t)| *t).min().unwrap_or_default();
    let last = closes.iter().map(|(_, t)| *t).max().unwrap_or_default();
    assert!(last - first >= Duration::from_millis(800), "closes not spread over 2 s: {first:?} .. {last:?}");
    assert!(last <= Duration::from_secs(4), "drain took {last:?} for a 2 s drain time");

    let status = server.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "exit status {status:?}; stderr:\n{}", server.logs());
    let rows = db_rows(&server.db_path());
    assert_eq!(rows.iter().map(|r| r.body.as_str()).collect::<Vec<_>>(), ["before the drain"]);
    let logs = server.logs();
    assert!(logs.contains("draining"), "no drain log line:\n{logs}");
}

#[test]
fn a_second_signal_stops_the_drain_at_once_and_still_commits() {
    let mut server = start_server(&[("NEXUS_DRAIN_SECS", "60")]);
    let port = server.port;
    let topic = new_topic();
    let mut clients = joined_clients(port, &topic, 4);
    send_acked(&mut clients[1], &topic, "1", "acked before the signals");

    server.signal(libc::SIGTERM);
    wait_until_draining(port);
    let second = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "exit status {status:?}; stderr:\n{}", server.logs());
    assert!(second.elapsed() < Duration::from_secs(5), "a second signal took {:?} to exit", second.elapsed());
    let rows = db_rows(&server.db_path());
    assert_eq!(rows.iter().map(|r| r.body.as_str()).collect::<Vec<_>>(), ["acked before the signals"]);
    assert!(server.logs().contains("second signal"), "stderr:\n{}", server.logs());
    drop(clients);
}
