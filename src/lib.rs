//! Nexus: a Phoenix Channels chat server on per-core io_uring runtimes.
//!
//! # Layout
//! Imports only go down this list, and modules on one layer do not import each other; nothing
//! imports `server`. docs/architecture.md explains the layers and where new code goes.
//! - L0 leaves: [`limits`] (every bound), [`ids`] (UUID/time formats), [`close`] (why
//!   connections end).
//! - L1 pure, sans-IO: [`config`], [`http`] (requests and routes), [`ws`] (frames),
//!   [`phoenix`] (V1/V2 serializers), [`auth`] (JWT), [`presence`] (presence tables, diffs and
//!   the per-core shard), [`metrics`] (what a core counts).
//! - L2 state without sockets: [`channel`] (topics and owners), [`store`] (writer and reader
//!   threads), [`bus`] (cross-core mailboxes), [`wire`] (Phoenix messages as WebSocket frames),
//!   [`access`] (the join policy and the join proxy's threads).
//! - L3 semantics: [`chat`] (what `new_msg` means, its broadcast and history shapes).
//! - L4 protocol: [`session`] (the Phoenix socket protocol as a pure state machine).
//! - L5 IO and wiring: [`server`] (runtimes, listeners, connections; carries out what
//!   sessions decide).
#![warn(missing_docs)]

pub mod access;
pub mod auth;
pub mod backoff;
pub mod bus;
pub mod channel;
pub mod chat;
pub mod close;
pub mod cluster;
pub mod config;
pub mod http;
pub mod ids;
pub mod limits;
pub mod metrics;
pub mod phoenix;
pub mod presence;
pub mod server;
pub mod session;
pub mod store;
pub mod wire;
pub mod ws;
