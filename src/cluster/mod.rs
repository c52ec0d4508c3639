//! Cluster mode: several nodes, one server. PostgreSQL orders and stores every message; Redis
//! carries what is live between the nodes. The only home of the `redis` crate.
//!
//! Built so far: the delivery order a core keeps per conversation ([`order`]), the wire form
//! of a node's message publications ([`publication`]), the thread that publishes committed
//! batches ([`publisher`]), the one that receives the other nodes' ([`subscriber`]) and the
//! one that reads from PostgreSQL what Redis did not bring ([`filler`]). The server does not
//! start them yet: cluster mode cannot be switched on.

pub mod filler;
pub mod order;
pub mod publication;
pub mod publisher;
pub mod subscriber;
