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
