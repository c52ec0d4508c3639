//! Cluster mode end to end: three real nodes (one worker each) on one PostgreSQL database and
//! one Redis act as one server. Every member on every node sees every message once, in the
//! database's `seq` order; faults (Redis killed, the subscription cut, PostgreSQL stopped)
//! lose nothing and duplicate nothing.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::pg::Postgres;
use common::*;
use sonic_rs::{JsonContainerTrait, JsonValueTrait, Value};

/// How long a test waits for everything it expects from a burst.
const BURST_TIMEOUT: Duration = Duration::from_secs(30);

/// How late a message may reach a member on another node while Redis is down or the
/// subscription is cut: a few catch-up periods (200 ms while Redis is down) and reconnects.
const FAULT_DELIVERY: Duration = Duration::from_secs(3);

/// A member's view: the `new_msg` payloads in arrival order, and the `ref`s of the replies to
/// its own sends, each with how many broadcasts it had seen when the reply came.
#[derive(Default)]
struct Seen {
    bodies: Vec<String>,
    ids: Vec<String>,
    replies: Vec<(String, String, usize)>,
}

/// Reads `client` until it has `messages` broadcasts and `replies` replies to `new_msg`
/// (presence frames and other replies skipped).
#[track_caller]
fn read(client: &mut Client, messages: usize, replies: usize, timeout: Duration) -> Seen {
    let deadline = Instant::now() + timeout;
    let mut seen = Seen::default();
    while seen.bodies.len() < messages || seen.replies.len() < replies {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let text = client.try_recv_text(remaining).unwrap_or_else(|e| {
            panic!(
                "after {} of {messages} messages and {} of {replies} replies: {e}",
                seen.bodies.len(),
                seen.replies.len()
            )
        });
        let v = parse(&text);
        match v.get(3).and_then(|e| e.as_str()) {
            Some("new_msg") => {
                let payload = v.get(4).expect("payload");
                let text = payload.get("content").and_then(|c| c.get("text")).and_then(|b| b.as_str());
                seen.bodies.push(text.expect("content.text").to_string());
                seen.ids.push(payload.get("id").and_then(|b| b.as_str()).expect("id").to_string());
            }
            Some("phx_reply") => {
                let reference = v.get(1).and_then(|r| r.as_str()).unwrap_or("").to_string();
                if reference.starts_with('m') {
                    let status = v.get(4).and_then(|p| p.get("status")).and_then(|s| s.as_str()).unwrap_or("");
                    seen.replies.push((reference, status.to_string(), seen.bodies.len()));
                }
            }
            _ => {}
        }
    }
    seen
}

/// A `new_msg` frame with ref `m<k>` (what [`read`] counts as a reply to the member's own send).
fn new_msg(topic: &str, k: usize, body: &str) -> String {
    new_msg_push("1", &format!("m{k}"), topic, body)
}

/// The stored bodies of `topic`'s conversation, in `seq` order, checking that ids and times
/// increase along it and that `seq` is dense.
#[track_caller]
fn stored(cluster: &Cluster, topic: &str) -> Vec<DbRow> {
    let conversation = topic.trim_start_matches("chat:");
    let rows: Vec<DbRow> = cluster.rows().into_iter().filter(|r| r.conversation == conversation).collect();
    for (i, pair) in rows.windows(2).enumerate() {
        assert_eq!(pair[1].seq, pair[0].seq + 1, "seq is dense at {i}");
        assert!(pair[1].inserted_at_us > pair[0].inserted_at_us, "inserted_at increases at {i}");
        assert!(pair[1].id > pair[0].id, "ids increase at {i}");
    }
    rows
}

/// Whether `view` is a contiguous run of `all` (no gap, no repeat), returning where it starts.
#[track_caller]
fn contiguous_in(view: &[String], all: &[String]) -> usize {
    let Some(first) = view.first() else { return all.len() };
    let start = all.iter().position(|b| b == first).unwrap_or_else(|| panic!("{first} is not stored"));
    assert_eq!(view, &all[start..start + view.len()], "a contiguous run of the stored order");
    start
}

#[test]
fn every_member_on_every_node_sees_one_order_the_databases() {
    let cluster = Cluster::start(3, &[]);
    let topic = new_topic();
    let mut members: Vec<Client> = Vec::new();
    for port in cluster.ports() {
        members.push(joined(port, &new_sub(), &topic));
        members.push(joined(port, &new_sub(), &topic));
    }
    const N: usize = 200;
    // One sender per node (members 0, 2, 4), all sending at once.
    for node in 0..3 {
        for k in 0..N {
            members[2 * node].send_text(&new_msg(&topic, k, &format!("n{node}-{k}")));
        }
    }
    let views: Vec<Seen> = members
        .iter_mut()
        .enumerate()
        .map(|(i, m)| read(m, 3 * N, if i % 2 == 0 { N } else { 0 }, BURST_TIMEOUT))
        .collect();
    let rows = stored(&cluster, &topic);
    let order: Vec<String> = rows.iter().map(|r| r.body.clone()).collect();
    assert_eq!(order.len(), 3 * N, "every message stored once");
    for (i, view) in views.iter().enumerate() {
        assert_eq!(view.bodies, order, "member {i} (node {}) sees the database's order", i / 2);
        let ids: Vec<&String> = rows.iter().map(|r| &r.id).collect();
        assert_eq!(view.ids.iter().collect::<Vec<_>>(), ids, "member {i}: the stored ids");
    }
    for node in 0..3 {
        let view = &views[2 * node];
        // Each sender's own order is kept, and each ack follows its own broadcast.
        let mine: Vec<&String> = view.bodies.iter().filter(|b| b.starts_with(&format!("n{node}-"))).collect();
        let sent: Vec<String> = (0..N).map(|k| format!("n{node}-{k}")).collect();
        assert_eq!(mine, sent.iter().collect::<Vec<_>>(), "node {node}'s sender order");
        for (reference, status, seen_before) in &view.replies {
            assert_eq!(status, "ok", "{reference}");
            let k: usize = reference[1..].parse().expect("m<k>");
            let at = view.bodies.iter().position(|b| *b == format!("n{node}-{k}")).expect("broadcast");
            assert!(at < *seen_before, "node {node}: the reply to {reference} came after its broadcast");
        }
    }
}

#[test]
fn joins_during_a_burst_on_other_nodes_get_a_gapless_run_of_the_stored_order() {
    let cluster = Cluster::start(3, &[]);
    let topic = new_topic();
    const N: usize = 300;
    let (sender, acked) = paced_sender(cluster.nodes[0].port, &topic, N, "b");
    // Join on the other nodes (and the sender's) while the burst is under way.
    while acked.recv_timeout(BURST_TIMEOUT).expect("the sender progresses") < 50 {}
    let mut joiners: Vec<Client> = cluster.ports().into_iter().map(|p| joined(p, &new_sub(), &topic)).collect();
    sender.join().expect("sender thread");
    let order: Vec<String> = stored(&cluster, &topic).into_iter().map(|r| r.body).collect();
    assert_eq!(order.len(), N);
    for (node, joiner) in joiners.iter_mut().enumerate() {
        // Everything after the join: at least the last message, at most all after the 50th.
        let last = format!("b-{}", N - 1);
        let mut view = Vec::new();
        let deadline = Instant::now() + BURST_TIMEOUT;
        while view.last() != Some(&last) {
            let seen = read(joiner, 1, 0, deadline.saturating_duration_since(Instant::now()));
            view.extend(seen.bodies);
        }
        let start = contiguous_in(&view, &order);
        assert!(start >= 50, "node {node}: nothing from before the join ({start})");
    }
}

#[test]
fn history_is_the_same_from_every_node() {
    let cluster = Cluster::start(3, &[]);
    let topic = new_topic();
    let mut sender = joined(cluster.nodes[1].port, &new_sub(), &topic);
    for k in 0..20 {
        sender.send_text(&new_msg(&topic, k, &format!("h-{k}")));
    }
    read(&mut sender, 20, 20, BURST_TIMEOUT);
    let conversation = topic.trim_start_matches("chat:");
    let bodies: Vec<String> = cluster
        .ports()
        .into_iter()
        .map(|port| {
            let bearer = format!("Bearer {}", token(&new_sub()));
            let target = format!("/api/conversations/{conversation}/messages?limit=50");
            let response = http_get(port, &target, Some(&bearer));
            assert_eq!(response.status, 200, "{}", response.body_text());
            response.body_text()
        })
        .collect();
    assert_eq!(bodies[0], bodies[1]);
    assert_eq!(bodies[1], bodies[2]);
    let page: Value = sonic_rs::from_str(&bodies[0]).expect("JSON");
    assert_eq!(page.get("messages").and_then(|m| m.as_array()).map(|m| m.len()), Some(20));
    for port in cluster.ports() {
        let metrics = http_get(port, "/metrics", None).body_text();
        assert!(metrics.contains("\nnexus_redis_up 1\n"), "a healthy node says Redis is up: {metrics}");
    }
}

/// Members on every node, a paced sender on node 0; `fault` runs once `AT` messages are
/// acked. Once `2 * AT` are, every member must have them all (during the fault), and after
/// `heal`, every message once, in the stored order.
fn survives(cluster: &mut Cluster, fault: impl FnOnce(&mut Cluster), heal: impl FnOnce(&mut Cluster)) {
    let topic = new_topic();
    let mut members: Vec<Client> = cluster.ports().into_iter().map(|p| joined(p, &new_sub(), &topic)).collect();
    const N: usize = 150;
    const AT: usize = 40;
    let (sender, acked) = paced_sender(cluster.nodes[0].port, &topic, N, "f");
    while acked.recv_timeout(BURST_TIMEOUT).expect("the sender progresses") < AT {}
    fault(cluster);
    while acked.recv_timeout(BURST_TIMEOUT).expect("the sender progresses through the fault") < 2 * AT {}
    let mut views: Vec<Vec<String>> = Vec::new();
    for (node, m) in members.iter_mut().enumerate() {
        let during = read(m, 2 * AT, 0, FAULT_DELIVERY);
        let expected: Vec<String> = (0..2 * AT).map(|k| format!("f-{k}")).collect();
        assert_eq!(during.bodies, expected, "node {node}: delivered during the fault");
        views.push(during.bodies);
    }
    heal(cluster);
    sender.join().expect("every message acked");
    let order: Vec<String> = stored(cluster, &topic).into_iter().map(|r| r.body).collect();
    assert_eq!(order.len(), N, "every message stored once");
    for (node, (m, view)) in members.iter_mut().zip(&mut views).enumerate() {
        view.extend(read(m, N - 2 * AT, 0, BURST_TIMEOUT).bodies);
        assert_eq!(*view, order, "node {node}: everything, once, in the stored order");
    }
}

#[test]
fn redis_killed_and_restarted_while_messages_flow_loses_nothing() {
    let mut cluster = Cluster::start(3, &[]);
    survives(&mut cluster, |c| c.redis.kill(), |c| c.redis.run());
    let metrics = http_get(cluster.nodes[1].port, "/metrics", None).body_text();
    assert!(metrics.contains("nexus_catchup_rows_total"), "{metrics}");
}

#[test]
fn a_cut_subscription_is_filled_from_the_database() {
    let mut cluster = Cluster::start(3, &[]);
    let kill_subscribers = |c: &mut Cluster| {
        let mut conn = c.redis.client().get_connection().expect("redis");
        let killed: i64 = ::redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query(&mut conn).expect("kill");
        assert!(killed >= 3, "every node's subscriber was cut ({killed})");
    };
    survives(&mut cluster, kill_subscribers, |_| {});
}

#[test]
fn redis_down_from_the_start_still_delivers_through_the_database() {
    let mut cluster = Cluster::start(2, &[]);
    cluster.redis.kill();
    let topic = new_topic();
    let mut a = joined(cluster.nodes[0].port, &new_sub(), &topic);
    let mut b = joined(cluster.nodes[1].port, &new_sub(), &topic);
    for k in 0..10 {
        a.send_text(&new_msg(&topic, k, &format!("d-{k}")));
    }
    let sent = read(&mut a, 10, 10, BURST_TIMEOUT);
    let got = read(&mut b, 10, 0, BURST_TIMEOUT);
    assert_eq!(got.bodies, sent.bodies);
    assert_eq!(http_get(cluster.nodes[1].port, "/healthz", None).status, 200, "degraded, not dead");
    let metrics = http_get(cluster.nodes[1].port, "/metrics", None).body_text();
    assert!(metrics.contains("\nnexus_redis_up 0\n"), "{metrics}");
    assert!(metrics.contains("nexus_cluster_node{node=\"node-1\"} 1"), "{metrics}");
    for series in [
        "nexus_publications_total",
        "nexus_publish_dropped_total",
        "nexus_publish_queue_depth",
        "nexus_gap_fills_total",
        "nexus_catchup_rows_total",
        "nexus_filler_queue_depth",
        "nexus_watch_queue_depth",
        "nexus_presence_resyncs_total",
        "nexus_reaped_nodes_total",
        "nexus_presence_queue_depth",
    ] {
        assert!(metrics.contains(&format!("\n{series} ")), "{series} missing: {metrics}");
    }
    let rows: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("nexus_catchup_rows_total "))
        .and_then(|v| v.parse().ok())
        .expect("catch-up rows");
    assert!(rows >= 10, "node 1 read node 0's messages from the database: {rows}");
}

#[test]
fn postgres_stopped_refuses_at_once_broadcasts_nothing_and_recovers() {
    let mut pg = Postgres::start();
    let cluster = Cluster::on_database(pg.create_db(), 2, &[]);
    let topic = new_topic();
    let mut a = joined(cluster.nodes[0].port, &new_sub(), &topic);
    let mut b = joined(cluster.nodes[1].port, &new_sub(), &topic);
    a.send_text(&new_msg(&topic, 0, "before"));
    assert_eq!(read(&mut b, 1, 0, BURST_TIMEOUT).bodies, ["before"]);
    pg.stop_immediate();
    let started = Instant::now();
    a.send_text(&new_msg(&topic, 1, "refused"));
    let reply = a.recv_until(BURST_TIMEOUT, |t| t.contains("\"m1\""));
    assert_eq!(reply, failed_to_save("1", "m1", &topic, "storage unavailable"));
    assert!(started.elapsed() < Duration::from_secs(2), "refused at once: {:?}", started.elapsed());
    pg.run();
    // The writer reconnects by itself; retry until a send is acknowledged.
    let deadline = Instant::now() + BURST_TIMEOUT;
    let acked = (2..)
        .find(|&k| {
            a.send_text(&new_msg(&topic, k, &format!("after-{k}")));
            let reply = a.recv_until(BURST_TIMEOUT, |t| t.contains(&format!("\"m{k}\"")) && t.contains("phx_reply"));
            assert!(Instant::now() < deadline, "no send acknowledged after PostgreSQL returned");
            let ok = reply.contains("\"ok\"");
            if !ok {
                thread::sleep(Duration::from_millis(50)); // pace retries until the writer is back
            }
            ok
        })
        .expect("an acknowledged send");
    // Nothing refused was broadcast: the next broadcast b sees is the acknowledged one.
    assert_eq!(read(&mut b, 1, 0, BURST_TIMEOUT).bodies, [format!("after-{acked}")]);
    let bodies: Vec<String> = stored(&cluster, &topic).into_iter().map(|r| r.body).collect();
    assert_eq!(bodies, ["before".to_string(), format!("after-{acked}")]);
}

#[test]
fn redis_without_postgres_is_refused_at_start() {
    let out = nexus_command()
        .env("JWT_SECRET", SECRET)
        .env("NEXUS_REDIS_URL", "redis://127.0.0.1:1/0")
        .output()
        .expect("run nexus");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("NEXUS_DATABASE_URL"), "{stderr}");
}

/// A server API request to `port` with the test key.
fn api(port: u16, method: &str, target: &str, body: &str) -> HttpResponse {
    let req = format!(
        "{method} {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLUSTER_API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    http_raw(port, req.as_bytes())
}

const CLUSTER_API_KEY: &str = "cluster-api-key-0123456789";

/// Waits for the `phx_close` of join `1` on `topic`.
#[track_caller]
fn expect_phx_close(c: &mut Client, topic: &str) {
    let close = c.recv_until(BURST_TIMEOUT, |t| event_of(t).as_deref() == Some("phx_close"));
    assert_eq!(close, v2(Some("1"), Some("1"), topic, "phx_close", "{}"));
}

#[test]
fn the_server_api_acts_on_every_node() {
    let mut cluster = Cluster::start(3, &[("NEXUS_API_KEY", CLUSTER_API_KEY)]);
    let ports = cluster.ports();
    let topic = new_topic();
    let conversation = &topic["chat:".len()..];
    let user = new_sub();
    // The user on nodes 1 and 2; a bystander on node 2.
    let mut on1 = joined(ports[1], &user, &topic);
    let mut on2 = joined(ports[2], &user, &topic);
    let mut bystander = joined(ports[2], &new_sub(), &topic);

    // A message posted to node 0 reaches every member, as its 201 body.
    let body = format!(r#"{{"sender_id":"{}","body":"from the backend"}}"#, new_sub());
    let posted = api(ports[0], "POST", &format!("/api/conversations/{conversation}/messages"), &body);
    assert_eq!(posted.status, 201, "{}", posted.body_text());
    let stored = parse(&posted.body_text());
    for c in [&mut on1, &mut on2, &mut bystander] {
        assert_eq!(parse_live(&c.recv_until(BURST_TIMEOUT, is_new_msg), &topic).payload, stored);
    }

    // A removal asked of node 0 closes the user's channel on nodes 1 and 2.
    let removed = api(ports[0], "DELETE", &format!("/api/conversations/{conversation}/members/{user}"), "");
    assert_eq!(removed.status, 204, "{}", removed.body_text());
    expect_phx_close(&mut on1, &topic);
    expect_phx_close(&mut on2, &topic);
    send_all(&mut bystander, "1", &topic, &["still a member".to_string()]);

    // A disconnect asked of node 1 closes the user's sockets on every node (once node 0 closed
    // its one, node 0 has carried the command out: the sockets below come after it).
    let mut on0 = connect_v2(ports[0], &user);
    on0.heartbeat("h");
    let disconnected = api(ports[1], "POST", &format!("/api/users/{user}/disconnect"), "");
    assert_eq!(disconnected.status, 204);
    for c in [&mut on0, &mut on1, &mut on2] {
        assert_eq!(c.expect_close(BURST_TIMEOUT), Some(1008));
    }

    // With Redis down a command reaches this node only, and the answer says so.
    let mut local = joined(ports[0], &user, &topic);
    let mut remote = joined(ports[2], &user, &topic);
    cluster.redis.kill();
    let deadline = Instant::now() + BURST_TIMEOUT;
    while !http_get(ports[0], "/metrics", None).body_text().contains("nexus_redis_up 0\n") {
        assert!(Instant::now() < deadline, "node 0 never saw Redis down");
        thread::sleep(Duration::from_millis(50));
    }
    let partial = api(ports[0], "DELETE", &format!("/api/conversations/{conversation}/members/{user}"), "");
    assert_eq!(
        (partial.status, partial.body_text()),
        (503, r#"{"error":"cluster unavailable: carried out on this node only"}"#.to_string())
    );
    expect_phx_close(&mut local, &topic);
    send_all(&mut remote, "1", &topic, &["still joined on node 2".to_string()]);
}
