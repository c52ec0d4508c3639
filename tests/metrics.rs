//! `GET /metrics` (issue 6): Prometheus text format, per-core counters added up on scrape
//! (two workers: the scrape may land on either core), gauges, and the writer's histograms.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;

const WAIT: Duration = Duration::from_secs(10);

/// Scrapes and parses: `series (name plus labels as written) -> value`. Panics on a line that
/// is neither a comment nor `series value`.
fn scrape(port: u16) -> HashMap<String, f64> {
    let r = http_get(port, "/metrics", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    let body = String::from_utf8(r.body).expect("UTF-8 exposition");
    let mut out = HashMap::new();
    let mut typed = Vec::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, kind) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(!typed.contains(&name.to_string()), "TYPE twice for {name}");
            typed.push(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
        let name = series.split('{').next().unwrap_or_default();
        assert!(name.starts_with("nexus_") && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line}");
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        assert!(typed.iter().any(|t| t == name || t == base), "sample before its TYPE: {line}");
        let v: f64 = value.parse().unwrap_or_else(|e| panic!("bad value in {line:?}: {e}"));
        assert!(out.insert(series.to_string(), v).is_none(), "series twice: {series}");
    }
    out
}

/// Scrapes until `ok` holds (other cores publish every 250 ms), within `WAIT`.
fn scrape_until(port: u16, what: &str, ok: impl Fn(&HashMap<String, f64>) -> bool) -> HashMap<String, f64> {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = scrape(port);
        if ok(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "{what} never held; last scrape: {m:#?}");
    }
}

fn get(m: &HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series).unwrap_or_else(|| panic!("no series {series}"))
}

#[test]
fn counters_gauges_and_histograms_follow_what_clients_do() {
    let server = start_server(&[]);
    let port = server.port;
    let before = scrape(port);
    assert_eq!(get(&before, "nexus_joins_total"), 0.0);
    assert_eq!(get(&before, "nexus_writer_batch_size_count"), 0.0);
    assert_eq!(get(&before, r#"nexus_writer_batch_size_bucket{le="+Inf"}"#), 0.0);
    assert!(get(&before, "nexus_connections_max") > 0.0);

    let topic = new_topic();
    let mut a = connect_v2(port, &new_sub());
    let mut b = connect_v2(port, &new_sub());
    a.join(&topic, "1");
    b.join(&topic, "1");
    a.send_text(&v2(Some("1"), Some("2"), &topic, "new_msg", r#"{"body":"counted"}"#));
    a.recv_until(WAIT, |t| t.contains(r#""new_msg""#));
    a.expect(&v2_ok(Some("1"), "2", &topic));
    b.recv_until(WAIT, |t| t.contains(r#""new_msg""#));

    let m = scrape_until(port, "joins, message and broadcast counted on both cores", |m| {
        get(m, "nexus_joins_total") >= 2.0
            && get(m, r#"nexus_new_msg_total{result="acked"}"#) >= 1.0
            && get(m, "nexus_broadcast_deliveries_total") >= 2.0
            && get(m, "nexus_presence_entries") == 2.0
    });
    assert!(get(&m, "nexus_messages_in_total") >= 3.0, "2 joins + 1 new_msg");
    assert!(get(&m, "nexus_replies_total") >= 3.0);
    assert!(get(&m, "nexus_connections_accepted_total") >= 3.0);
    assert!(get(&m, "nexus_connections") >= 2.0);
    assert_eq!(get(&m, "nexus_presence_topics"), 1.0);
    assert_eq!(get(&m, "nexus_draining"), 0.0);
    assert!(get(&m, "nexus_writer_batch_size_count") >= 1.0);
    assert!(get(&m, "nexus_writer_batch_size_sum") >= 1.0);
    assert_eq!(
        get(&m, r#"nexus_writer_commit_seconds_bucket{le="+Inf"}"#),
        get(&m, "nexus_writer_commit_seconds_count")
    );
    // Bounds print as written (0.025, not 0.024999999999999998).
    for le in ["0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1"] {
        assert!(m.contains_key(&format!(r#"nexus_writer_commit_seconds_bucket{{le="{le}"}}"#)), "bucket {le}");
    }
    assert!(m.contains_key(r#"nexus_mailbox_depth{core="1"}"#));
    // The embedded database's own heap (page caches, statements) is counted.
    assert!(get(&m, "nexus_sqlite_memory_bytes") > 0.0);
    // The allocator's own count (a default, glibc build): the heap in use includes SQLite's.
    assert!(get(&m, "nexus_heap_in_use_bytes") >= get(&m, "nexus_sqlite_memory_bytes"));
    assert!(m.contains_key("nexus_heap_free_bytes"));
    assert_eq!(get(&m, "nexus_outbox_bytes"), 0.0);

    assert_eq!(get(&m, "nexus_messages_dropped_total"), 0.0);
    assert_eq!(get(&m, r#"nexus_joins_refused_total{reason="busy"}"#), 0.0);
    assert_eq!(get(&m, "nexus_cross_core_congested"), 0.0);
    assert_eq!(get(&m, "nexus_cross_core_overflow_messages"), 0.0);

    // A malformed message is dropped (the socket stays) and counted.
    a.send_text("[not json");
    a.heartbeat("after-garbage");
    scrape_until(port, "the malformed message counted", |m| get(m, "nexus_messages_dropped_total") >= 1.0);

    // A client close is counted by reason, and presence follows.
    assert_eq!(b.close_handshake(), Some(1001));
    scrape_until(port, "the client close counted", |m| {
        get(m, r#"nexus_closes_total{reason="client"}"#) >= 1.0 && get(m, "nexus_presence_entries") == 1.0
    });
}

#[test]
fn only_get() {
    let server = start_server(&[]);
    assert_eq!(http_request(server.port, "POST", "/metrics", None).status, 405);
}
