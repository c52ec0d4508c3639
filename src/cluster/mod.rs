//! Cluster mode: several nodes, one server. PostgreSQL orders and stores every message; Redis
//! carries what is live between the nodes. The only home of the `redis` crate.
//!
//! Built so far: the delivery order a core keeps per conversation ([`order`]), the wire form
//! of a node's message publications ([`publication`]) and the thread that publishes committed
//! batches ([`publisher`]). The server does not start them yet: cluster mode is not switchable
//! on.

pub mod order;
pub mod publication;
pub mod publisher;
