//! Cluster mode: several nodes, one server. PostgreSQL orders and stores every message; Redis
//! carries what is live between the nodes. The only home of the `redis` crate.
//!
//! The parts: the delivery order a core keeps per conversation ([`order`]), the wire form of a
//! node's message publications ([`publication`]), the thread that publishes committed batches
//! ([`publisher`]), the one that receives the other nodes' publications ([`subscriber`]), the
//! one that reads from PostgreSQL what Redis did not bring ([`filler`]), and the one that keeps
//! the cluster's presence in Redis and this node's heartbeat ([`presence`]); the server API's
//! commands travel between nodes as [`command`]s. The server starts
//! them when `NEXUS_REDIS_URL` is set (`server::fabric`); docs/architecture.md, "Cluster mode",
//! tells how they fit.

pub mod command;
pub mod filler;
pub mod order;
pub mod presence;
pub mod publication;
pub mod publisher;
pub mod subscriber;

use crate::limits;

/// A connection to Redis for one of the cluster threads, bounded by [`limits::REDIS_TIMEOUT`]
/// to connect, write and read (the subscriber shortens its reads to poll its queue).
fn connect(client: &redis::Client) -> redis::RedisResult<redis::Connection> {
    let conn = client.get_connection_with_timeout(limits::REDIS_TIMEOUT)?;
    conn.set_read_timeout(Some(limits::REDIS_TIMEOUT))?;
    conn.set_write_timeout(Some(limits::REDIS_TIMEOUT))?;
    Ok(conn)
}
