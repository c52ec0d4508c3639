//! Nexus: a Phoenix Channels chat server on per-core io_uring runtimes.
//!
//! # Layout
//! Imports only go down this list; nothing imports `server`.
//! - L0 leaves: [`limits`] (every bound), [`ids`] (UUID/time formats), [`close`] (why
//!   connections end).
//! - L1 pure, sans-IO: [`config`], [`http`] (upgrade parsing), [`ws`] (frames), [`phoenix`]
//!   (V1/V2 serializers), [`auth`] (JWT), [`presence`] (presence tables and diffs).
//! - L2 state without sockets: [`channel`] (topics and owners), [`store`] (writer thread),
//!   [`bus`] (cross-core mailboxes).
//! - L3 semantics: [`chat`] (what `new_msg` means).
//! - L4 IO and wiring: [`server`] (runtimes, listeners, connections).
#![warn(missing_docs)]

pub mod auth;
pub mod bus;
pub mod channel;
pub mod chat;
pub mod close;
pub mod config;
pub mod http;
pub mod ids;
pub mod limits;
pub mod phoenix;
pub mod presence;
pub mod server;
pub mod store;
pub mod ws;
