//! Cluster presence end to end: three real nodes share one Phoenix.Presence per conversation.
//! Every member, on every node, builds the same view from its `presence_state` and
//! `presence_diff` pushes, equal to the live connections; a user on two nodes has two metas;
//! every leave is seen once; a killed node's metas leave everywhere within
//! `NEXUS_NODE_TIMEOUT`, or at once when it restarts under the same id; after a Redis restart
//! the views converge again.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, PresenceView};
use common::*;
use sonic_rs::JsonValueTrait;

/// How long presence may take to settle after a change.
const CONVERGE: Duration = Duration::from_secs(5);

struct Member {
    client: Client,
    user: String,
    view: PresenceView,
}

/// `user` joins `topic` on `port`; its first `presence_state` must include itself.
#[track_caller]
fn join(port: u16, topic: &str, user: &str) -> Member {
    let mut client = connect_v2(port, user);
    client.join(topic, "1");
    client.skip_presence = false;
    let mut view = PresenceView { me: user.to_string(), ..PresenceView::default() };
    view.pump_until(&mut client, CONVERGE, |v| v.synced);
    assert!(view.users.contains_key(user), "the joiner is in its own presence_state: {view:?}");
    Member { client, user: user.to_string(), view }
}

/// Waits until every member's view has exactly `counts` (user → metas), then checks that all
/// views hold the same refs.
#[track_caller]
fn converge(members: &mut [&mut Member], counts: &BTreeMap<String, usize>, timeout: Duration) {
    for m in members.iter_mut() {
        m.view.pump_until(&mut m.client, timeout, |v| v.counts() == *counts);
    }
    let first = members[0].view.users.clone();
    for m in members.iter() {
        assert_eq!(m.view.users, first, "{}'s view differs", m.user);
        assert_eq!(m.view.repeated_joins, 0, "{} got joins of metas it held: diffs carry only changes", m.user);
    }
}

/// A member on node 0 and one on node 2 (whose node the tests then stop), each seeing both.
#[track_caller]
fn on_nodes_0_and_2(cluster: &Cluster, topic: &str) -> (Member, Member) {
    let ports = cluster.ports();
    let (mut a, c) = (join(ports[0], topic, &new_sub()), join(ports[2], topic, &new_sub()));
    let both = counts(&[(&a.user, 1), (&c.user, 1)]);
    converge(&mut [&mut a], &both, CONVERGE);
    (a, c)
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(u, n)| (u.to_string(), *n)).collect()
}

#[test]
fn every_member_on_every_node_sees_the_same_presence_and_each_leave_once() {
    let cluster = Cluster::start(3, &[]);
    let ports = cluster.ports();
    let topic = new_topic();
    let (u0, u1, u2) = (new_sub(), new_sub(), new_sub());
    let mut a = join(ports[0], &topic, &u0);
    let mut b = join(ports[1], &topic, &u1);
    let mut c = join(ports[2], &topic, &u2);
    // The same user on a second node: a second meta.
    let mut d = join(ports[2], &topic, &u0);
    let everyone = counts(&[(&u0, 2), (&u1, 1), (&u2, 1)]);
    converge(&mut [&mut a, &mut b, &mut c, &mut d], &everyone, CONVERGE);
    let b_ref = b.view.users[&u1].iter().next().expect("b's meta").clone();

    b.client.send_text(&v2(Some("1"), Some("2"), &topic, "phx_leave", "{}"));
    converge(&mut [&mut a, &mut c, &mut d], &counts(&[(&u0, 2), (&u2, 1)]), CONVERGE);
    // A message sent after the leave marks the end: no second leave may come before it.
    a.client.send_text(&v2(Some("1"), Some("3"), &topic, "new_msg", r#"{"body":"after the leave"}"#));
    for m in [&mut a, &mut c, &mut d] {
        let view = &mut m.view;
        m.client.recv_until(CONVERGE, |t| {
            view.apply(t);
            t.contains("after the leave")
        });
        assert_eq!(m.view.leaves.get(&b_ref), Some(&1), "{} saw b leave once: {:?}", m.user, m.view.leaves);
    }
}

#[test]
fn a_killed_nodes_metas_leave_everywhere_within_the_node_timeout() {
    let mut cluster = Cluster::start(3, &[("NEXUS_NODE_TIMEOUT", "3s")]);
    let ports = cluster.ports();
    let topic = new_topic();
    let (u0, u1, u2) = (new_sub(), new_sub(), new_sub());
    let mut a = join(ports[0], &topic, &u0);
    let mut b = join(ports[1], &topic, &u1);
    let _c = join(ports[2], &topic, &u2);
    let _d = join(ports[2], &topic, &u0);
    converge(&mut [&mut a, &mut b], &counts(&[(&u0, 2), (&u1, 1), (&u2, 1)]), CONVERGE);
    drop(cluster.nodes.remove(2)); // SIGKILL: no leave is ever sent by that node
    let killed = Instant::now();
    // 3 s of silence, plus one beat (a fifth of it) before a node claims it, plus slack.
    converge(&mut [&mut a, &mut b], &counts(&[(&u0, 1), (&u1, 1)]), Duration::from_secs(10));
    let took = killed.elapsed();
    assert!(took >= Duration::from_secs(2), "not before the node timeout: {took:?}");
    let metrics = http_get(ports[0], "/metrics", None).body_text() + &http_get(ports[1], "/metrics", None).body_text();
    assert!(metrics.contains("nexus_reaped_nodes_total 1"), "one node reaped the dead one: {metrics}");
}

#[test]
fn a_node_restarted_under_its_id_clears_its_ghosts_at_once() {
    let mut cluster = Cluster::start(3, &[("NEXUS_NODE_TIMEOUT", "60s")]);
    let topic = new_topic();
    let (mut a, c) = on_nodes_0_and_2(&cluster, &topic);
    let (u0, u2) = (a.user.clone(), c.user.clone());
    drop(cluster.nodes.remove(2));
    let restarted = cluster.start_node(2);
    // Far sooner than the 60 s timeout: the restarted node claims its earlier incarnation.
    converge(&mut [&mut a], &counts(&[(&u0, 1)]), CONVERGE);
    let mut e = join(restarted.port, &topic, &u2);
    converge(&mut [&mut a, &mut e], &counts(&[(&u0, 1), (&u2, 1)]), CONVERGE);
}

#[test]
fn presence_converges_after_redis_restarts() {
    let mut cluster = Cluster::start(3, &[]);
    let ports = cluster.ports();
    let topic = new_topic();
    let (u0, u1, u2, u3) = (new_sub(), new_sub(), new_sub(), new_sub());
    let mut a = join(ports[0], &topic, &u0);
    let mut b = join(ports[1], &topic, &u1);
    let mut c = join(ports[2], &topic, &u2);
    converge(&mut [&mut a, &mut b, &mut c], &counts(&[(&u0, 1), (&u1, 1), (&u2, 1)]), CONVERGE);

    cluster.redis.kill();
    // While Redis is down: a join on node 1 and a leave on node 2, seen on their own nodes.
    let mut d = join(ports[1], &topic, &u3);
    c.client.send_text(&v2(Some("1"), Some("2"), &topic, "phx_leave", "{}"));
    cluster.redis.run();
    let restarted = Instant::now();
    converge(&mut [&mut a, &mut b, &mut d], &counts(&[(&u0, 1), (&u1, 1), (&u3, 1)]), CONVERGE);
    assert!(restarted.elapsed() < CONVERGE);
}

#[test]
fn a_killed_nodes_client_rejoins_elsewhere_with_the_full_presence_and_every_later_message() {
    let mut cluster = Cluster::start(3, &[("NEXUS_NODE_TIMEOUT", "3s")]);
    let ports = cluster.ports();
    let topic = new_topic();
    let (mut a, c) = on_nodes_0_and_2(&cluster, &topic);
    let (u0, u2) = (a.user.clone(), c.user.clone());
    let ghost = a.view.users[&u2].clone();
    drop(cluster.nodes.remove(2));
    drop(c);
    // The client comes back through another node (as phoenix.js does through a balancer) and
    // rejoins: its state holds the other member and itself, and the ghost of its old
    // connection goes once the dead node is reaped.
    let mut back = join(ports[1], &topic, &u2);
    assert!(back.view.users.contains_key(&u0), "the full presence: {:?}", back.view);
    let mine: BTreeSet<String> = back.view.users[&u2].difference(&ghost).cloned().collect();
    assert_eq!(mine.len(), 1, "its own new meta: {:?}", back.view);
    let mut expected = a.view.users.clone();
    expected.insert(u2.clone(), mine);
    for m in [&mut a, &mut back] {
        m.view.pump_until(&mut m.client, Duration::from_secs(10), |v| v.users == expected);
    }
    // Every message sent after the rejoin reaches it, once, in order.
    for k in 0..20 {
        a.client.send_text(&v2(
            Some("1"),
            Some(&format!("m{k}")),
            &topic,
            "new_msg",
            &format!(r#"{{"body":"r-{k}"}}"#),
        ));
    }
    let mut got = Vec::new();
    while got.len() < 20 {
        let text = back.client.recv_until(CONVERGE, |t| event_of(t).as_deref() == Some("new_msg"));
        got.push(parse(&text)[4]["content"]["text"].as_str().unwrap_or("").to_string());
    }
    assert_eq!(got, (0..20).map(|k| format!("r-{k}")).collect::<Vec<_>>());
}

#[test]
fn a_drained_node_leaves_no_ghosts() {
    let mut cluster = Cluster::start(3, &[("NEXUS_NODE_TIMEOUT", "60s")]);
    let topic = new_topic();
    let (mut a, _c) = on_nodes_0_and_2(&cluster, &topic);
    let u0 = a.user.clone();
    cluster.nodes[2].signal(libc::SIGTERM);
    // Far sooner than the 60 s timeout: the drained node's leaves are published as it stops.
    converge(&mut [&mut a], &counts(&[(&u0, 1)]), CONVERGE);
}
