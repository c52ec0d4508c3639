//! `nexus-load`: a load generator for Nexus (or any Phoenix Channels app that speaks the same
//! chat events) that speaks Phoenix V2 over WebSocket, mints its own tokens from `--secret`,
//! and targets loopback only. Bounded in time and count.
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
//!
//! Scenario `soak`: hours of connections, messages, churn with recovery, history reads, slow
//! consumers and hostile clients against one node, sampled every minute into a CSV; at the end,
//! memory growth, descriptors, lost or duplicated messages, gaps and presence are checked.
//!
//! `verify`: checks a database against `persist --acked-log` logs (every acknowledged message
//! stored exactly once, ids and `inserted_at` increasing across restarts): `loadtest/crashloop.sh`.

mod churn;
mod connect;
mod fanout;
mod persist;
mod reactor;
mod rejoin;
mod soak;
mod stats;
mod storm;
mod v2;
mod verify;
mod wire;

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use uuid::Uuid;

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
    /// Hours of a realistic mix against one node, sampled into a CSV, checked at the end.
    Soak(soak::Args),
    /// Checks a database against `persist --acked-log` logs: stored exactly once, ids increasing.
    Verify(verify::Args),
}

/// The server every scenario talks to, and how its sockets are opened and its topics named.
/// Nexus needs only `--addr` and `--secret`; the other flags fit another Phoenix Channels app
/// (BENCHMARKS.md, "Compare with your Phoenix app").
#[derive(clap::Args, Clone)]
pub(crate) struct Target {
    /// Server address (loopback only); a comma list spreads the connections over several
    /// nodes of a cluster, round-robin.
    #[arg(long, default_value = "127.0.0.1:4000")]
    pub addr: String,
    /// HS256 secret of the server: every connection gets its own JWT minted here (`sub` = the
    /// connection's user id, a random UUID; `iat`; `exp` in 1 h), sent as `token=`.
    #[arg(long, env = "JWT_SECRET")]
    pub secret: Option<String>,
    /// A fixed token sent as `token=` by every connection instead of a minted one (an app with
    /// tokens of its own, e.g. `Phoenix.Token`); wins over `--secret`.
    #[arg(long)]
    pub token: Option<String>,
    /// More query parameters for the socket URL (`a=1&b=2`); `{user}` becomes the connection's
    /// user id (e.g. `user_id={user}` for an app that takes the user from its params).
    #[arg(long, default_value = "")]
    pub params: String,
    /// Path of the socket (Phoenix: the endpoint's `socket` path + `/websocket`).
    #[arg(long, default_value = "/socket/websocket")]
    pub path: String,
    /// Topics are `<prefix><uuid>` (a fresh UUID per topic and run).
    #[arg(long, default_value = "chat:")]
    pub topic_prefix: String,
}

impl Target {
    /// Every address of `--addr`, each checked by [`loopback`].
    pub(crate) fn addrs(&self) -> Result<Vec<SocketAddr>, String> {
        self.addr.split(',').map(|a| loopback(a.trim())).collect()
    }

    /// The topic named by `id`.
    pub(crate) fn topic(&self, id: impl std::fmt::Display) -> String {
        format!("{}{id}", self.topic_prefix)
    }

    /// The token a connection of `user` presents: `--token`, else one minted from `--secret`.
    pub(crate) fn token(&self, user: Uuid) -> Result<Option<String>, String> {
        match (&self.token, &self.secret) {
            (Some(t), _) => Ok(Some(t.clone())),
            (None, Some(secret)) => wire::token(secret, user).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// The request target of the upgrade for a connection of `user`: path and query.
    pub(crate) fn socket_path(&self, user: Uuid) -> Result<String, String> {
        let mut url = format!("{}?vsn=2.0.0", self.path);
        if let Some(token) = self.token(user)? {
            url.push_str("&token=");
            url.push_str(&query_escape(&token));
        }
        let params = self.params.trim_start_matches(['?', '&']);
        if !params.is_empty() {
            url.push('&');
            url.push_str(&params.replace("{user}", &user.to_string()));
        }
        Ok(url)
    }

    /// The flags that rebuild this target in a child process.
    pub(crate) fn to_args(&self) -> Vec<String> {
        let mut out = vec!["--addr".into(), self.addr.clone()];
        for (flag, value) in [("--secret", &self.secret), ("--token", &self.token)] {
            if let Some(v) = value {
                out.extend([flag.to_string(), v.clone()]);
            }
        }
        for (flag, value) in
            [("--params", &self.params), ("--path", &self.path), ("--topic-prefix", &self.topic_prefix)]
        {
            out.extend([flag.to_string(), value.clone()]);
        }
        out
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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
        Scenario::Soak(args) => soak::run(args),
        Scenario::Verify(args) => verify::run(args),
    };
    if let Err(e) = result {
        eprintln!("nexus-load: {e}");
        std::process::exit(1);
    }
}
