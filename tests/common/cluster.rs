//! Several real `nexus` nodes acting as one server: one fresh PostgreSQL database on the test
//! binary's server ([`super::pg::shared`]), a private `redis-server`, and nodes with one worker
//! each, named `node-0`, `node-1`, ….

use super::pg;
use super::redis::Redis;
use super::{start_server, Server};

/// A cluster of nodes on one database and one Redis.
pub struct Cluster {
    pub redis: Redis,
    pub pg_url: String,
    pub nodes: Vec<Server>,
    env: Vec<(String, String)>,
}

impl Cluster {
    /// Starts Redis and `n` nodes on a fresh database of the shared PostgreSQL; `env` is given
    /// to every node.
    #[track_caller]
    pub fn start(n: usize, env: &[(&str, &str)]) -> Cluster {
        Cluster::on_database(pg::shared().create_db(), n, env)
    }

    /// [`Cluster::start`] on the database at `pg_url`.
    #[track_caller]
    pub fn on_database(pg_url: String, n: usize, env: &[(&str, &str)]) -> Cluster {
        let redis = Redis::start();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut cluster = Cluster { redis, pg_url, nodes: Vec::new(), env };
        for i in 0..n {
            let node = cluster.start_node(i);
            cluster.nodes.push(node);
        }
        cluster
    }

    /// Starts node `i` (again, after it was killed: same id, same database and Redis).
    #[track_caller]
    pub fn start_node(&self, i: usize) -> Server {
        let id = format!("node-{i}");
        let redis = self.redis.url();
        let mut env: Vec<(&str, &str)> = vec![
            ("NEXUS_WORKERS", "1"),
            ("NEXUS_DATABASE_URL", &self.pg_url),
            ("NEXUS_REDIS_URL", &redis),
            ("NEXUS_NODE_ID", &id),
            ("NEXUS_MSG_RATE", "0"),
        ];
        env.extend(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        start_server(&env)
    }

    /// The nodes' ports.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// Every message stored, by conversation then `seq`.
    pub fn rows(&self) -> Vec<super::DbRow> {
        pg::rows(&self.pg_url)
    }
}

/// What one member knows of a conversation's presence, built from its `presence_state` and
/// `presence_diff` pushes exactly as Phoenix.Presence's client does: user → its metas' refs.
#[derive(Debug, Default)]
pub struct PresenceView {
    pub users: std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    /// How many times each ref was seen leaving.
    pub leaves: std::collections::HashMap<String, usize>,
    /// Joins of another user's ref the view already held (Phoenix never sends one: diffs carry
    /// only changes; only the joiner's own join follows the state that already holds it).
    pub repeated_joins: usize,
    /// The member's own user.
    pub me: String,
    /// The first state arrived.
    pub synced: bool,
}

impl PresenceView {
    /// Applies one frame (ignoring everything but presence pushes).
    pub fn apply(&mut self, text: &str) {
        use sonic_rs::{JsonContainerTrait, JsonValueTrait};
        let v = super::parse(text);
        let (Some(event), Some(payload)) = (v.get(3).and_then(|e| e.as_str()), v.get(4)) else { return };
        let metas = |users: &sonic_rs::Value| -> Vec<(String, String)> {
            let mut out = Vec::new();
            for (user, entry) in users.as_object().into_iter().flat_map(|o| o.iter()) {
                for meta in entry.get("metas").and_then(|m| m.as_array()).into_iter().flat_map(|a| a.iter()) {
                    let phx_ref = meta.get("phx_ref").and_then(|r| r.as_str()).unwrap_or("").to_string();
                    out.push((user.to_string(), phx_ref));
                }
            }
            out
        };
        match event {
            "presence_state" => {
                self.users.clear();
                for (user, r) in metas(payload) {
                    self.users.entry(user).or_default().insert(r);
                }
                self.synced = true;
            }
            "presence_diff" => {
                for (user, r) in metas(payload.get("leaves").expect("leaves")) {
                    *self.leaves.entry(r.clone()).or_default() += 1;
                    if let Some(refs) = self.users.get_mut(&user) {
                        refs.remove(&r);
                        if refs.is_empty() {
                            self.users.remove(&user);
                        }
                    }
                }
                for (user, r) in metas(payload.get("joins").expect("joins")) {
                    let mine = user == self.me;
                    if !self.users.entry(user).or_default().insert(r) && !mine {
                        self.repeated_joins += 1;
                    }
                }
            }
            _ => {}
        }
    }

    /// Users with how many metas each.
    pub fn counts(&self) -> std::collections::BTreeMap<String, usize> {
        self.users.iter().map(|(u, refs)| (u.clone(), refs.len())).collect()
    }

    /// Reads `client` until `done(self)` holds; fails after `timeout` with the view.
    #[track_caller]
    pub fn pump_until(
        &mut self,
        client: &mut super::Client,
        timeout: std::time::Duration,
        done: impl Fn(&Self) -> bool,
    ) {
        let deadline = std::time::Instant::now() + timeout;
        while !done(self) {
            let remaining = deadline.saturating_duration_since(std::time::Instant::now());
            match client.try_recv_text(remaining) {
                Ok(text) => self.apply(&text),
                Err(e) => panic!("presence did not converge ({e}): {self:?}"),
            }
        }
    }
}
