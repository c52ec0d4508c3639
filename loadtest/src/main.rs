//! `nexus-load`: a load generator for Nexus that speaks Phoenix V2 over WebSocket, mints its
//! own tokens from `--secret`, and targets loopback only. Bounded in time and count.
//!
//! Scenario `persist`: S senders, each in its own small room, keep a window of `new_msg`s in
//! flight (closed loop); reports acknowledged messages/s, ack latency percentiles, errors,
//! and the server's CPU time per acknowledged message (`--server-pid`), optionally with a
//! history reader running beside it (`--history`).
//!
//! Scenario `storm`: N members join one topic at once; presence frames, bytes and settle time.
//!
//! Scenario `connect`: N connections over T topics held with heartbeats; join latency, server
//! RSS per connection, kernel TCP memory; `--processes` spreads the sockets over processes.
//!
//! Scenario `churn`: joins, leaves, drops and reconnects at a rate while every client keeps a
//! presence view; the views must converge to the truth once the churn stops.
//!
//! Scenario `fanout`: members over topics, senders closed loop; deliveries/s, loss, order,
//! latency percentiles and server CPU per delivery.
//!
//! Scenario `rejoin`: joins recovering missed messages, one at a time or as a storm; latency to
//! the last recovered message and server CPU per rejoin.

mod churn;
mod connect;
mod fanout;
mod persist;
mod reactor;
mod rejoin;
mod stats;
mod storm;
mod wire;

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "nexus-load", about = "Load generator for Nexus (loopback only)")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Closed-loop senders in small rooms: the persisted-message path end to end.
    Persist(persist::Args),
    /// N members join one topic at once: presence traffic and time to settle.
    Storm(storm::Args),
    /// Members over topics, senders closed loop: deliveries/s, loss, order, latency.
    Fanout(fanout::Args),
    /// N connections joined to T topics and held: join latency, memory per connection.
    Connect(connect::Args),
    /// Joins, leaves, drops and reconnects at a rate; presence views must converge.
    Churn(churn::Args),
    /// Rejoins with last_seen_id: latency to the last recovered message, CPU per rejoin.
    Rejoin(rejoin::Args),
}

/// The server every scenario talks to.
#[derive(clap::Args)]
pub(crate) struct Target {
    /// Server address (loopback only); a comma list spreads the connections over several
    /// nodes of a cluster, round-robin.
    #[arg(long, default_value = "127.0.0.1:4000")]
    pub addr: String,
    /// JWT secret of the server (tokens are minted here).
    #[arg(long, env = "JWT_SECRET")]
    pub secret: String,
}

impl Target {
    /// Every address of `--addr`, each checked by [`loopback`].
    pub(crate) fn addrs(&self) -> Result<Vec<SocketAddr>, String> {
        self.addr.split(',').map(|a| loopback(a.trim())).collect()
    }
}

/// Refuses anything but loopback: load runs here never leave the machine.
pub(crate) fn loopback(addr: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("{addr} is not a loopback address; nexus-load only targets 127.0.0.0/8 or ::1"));
    }
    Ok(addr)
}

pub(crate) fn parse_secs(s: &str) -> Result<Duration, String> {
    nexus::config::parse_duration(s)
}

/// Raises this process's descriptor limit to its hard limit (scenarios hold many sockets).
fn raise_nofile() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit write/read the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() {
    raise_nofile();
    let cli = Cli::parse();
    let result = match cli.scenario {
        Scenario::Persist(args) => persist::run(args),
        Scenario::Storm(args) => storm::run(args),
        Scenario::Fanout(args) => fanout::run(args),
        Scenario::Connect(args) => connect::run(args),
        Scenario::Churn(args) => churn::run(args),
        Scenario::Rejoin(args) => rejoin::run(args),
    };
    if let Err(e) = result {
        eprintln!("nexus-load: {e}");
        std::process::exit(1);
    }
}
