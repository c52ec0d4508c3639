//! Runtime configuration: every knob from the environment or a flag (clap), validated once at
//! start-up into a [`Config`] the rest of the server trusts.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::http::origin::{OriginEntry, OriginPolicy};
use crate::limits;

/// Command line of the `nexus` binary.
#[derive(Debug, Parser)]
#[command(name = "nexus", version, about = "Phoenix Channels chat server on per-core io_uring runtimes")]
pub struct Cli {
    /// Without a command, `nexus` runs the server.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Server settings (also read by `token` for the secret).
    #[command(flatten)]
    pub server: ServerArgs,
}

/// Subcommands besides running the server.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print an HS256 token signed with JWT_SECRET, for trying the server.
    Token {
        /// The user id (`sub` claim): a UUID.
        #[arg(long)]
        sub: String,
        /// Lifetime of the token (`exp` = now + ttl), e.g. `24h`, `90m`, `3600`.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
        /// `token` join policy: conversations the socket token grants (`chats` claim), a
        /// comma list of UUIDs.
        #[arg(long, value_delimiter = ',')]
        chats: Vec<String>,
        /// `token` join policy: make a join token for this one conversation (`chat` claim).
        #[arg(long)]
        chat: Option<String>,
    },
}

/// Server flags; each also reads the environment variable it names.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// TCP port to listen on (0 picks a free port; the start-up log names it).
    #[arg(long, env = "PORT", default_value_t = 4000)]
    pub port: u16,
    /// Address to bind.
    #[arg(long = "bind", env = "NEXUS_BIND", default_value = "0.0.0.0")]
    pub bind: IpAddr,
    /// HS256 secret for client tokens (raw bytes of the value). Required.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Core threads, one monoio runtime each [default: number of CPUs].
    #[arg(long, env = "NEXUS_WORKERS")]
    pub workers: Option<usize>,
    /// Largest frame or message a client may send, in bytes; larger closes with 1009.
    #[arg(long, env = "NEXUS_MAX_FRAME_BYTES", default_value_t = limits::FRAME_BYTES_MAX_DEFAULT)]
    pub max_frame_bytes: usize,
    /// Close a socket that sent nothing for this long (1001). Seconds, or `90s`, `2m`.
    #[arg(long, env = "NEXUS_IDLE_TIMEOUT", default_value_t = Secs(limits::IDLE_TIMEOUT_DEFAULT))]
    pub idle_timeout: Secs,
    /// On SIGTERM/SIGINT, close open sockets (1001) spread over this long before exiting; a
    /// second signal exits at once. Seconds, or `10s`, `1m`.
    #[arg(long, env = "NEXUS_DRAIN_SECS", default_value_t = Secs(limits::DRAIN_DEFAULT))]
    pub drain: Secs,
    /// Serve `POST /dev/token`, which mints a token for anyone (development only: the demo
    /// page's one-click sign-in). Off by default; loudly logged when on.
    #[arg(long, env = "NEXUS_DEV_TOKENS", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    pub dev_tokens: bool,
    /// Messages per second one socket may send (token bucket, burst of one second's worth);
    /// over it: error reply `rate limited`, persistently over it: close 1008. 0 = no limit.
    #[arg(long, env = "NEXUS_MSG_RATE", default_value_t = limits::MSG_RATE_DEFAULT)]
    pub msg_rate: u32,
    /// Comma list of allowed `Origin`s (`https://host`, `//host:port`, `https://*.host`);
    /// empty = any origin (token auth, not cookies).
    #[arg(long, env = "NEXUS_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Window in ms after a topic's presence flush over which its joins/leaves are coalesced
    /// into one `presence_diff` (a quiet topic's first change goes out at once); 0 = a diff per
    /// change.
    #[arg(long, env = "NEXUS_PRESENCE_BATCH_MS", default_value_t = limits::PRESENCE_BATCH_MS_DEFAULT)]
    pub presence_batch_ms: u64,
    /// Most open connections (beyond it: 503) [default: what the open-file limit allows].
    #[arg(long, env = "NEXUS_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most topics one socket may join at once.
    #[arg(long, env = "NEXUS_MAX_CHANNELS", default_value_t = limits::CHANNELS_PER_CONN_MAX_DEFAULT)]
    pub max_channels: usize,
    /// Bytes queued for one connection before it is closed as a slow consumer (1013).
    #[arg(long, env = "NEXUS_MAX_OUTBOX_BYTES", default_value_t = limits::OUTBOX_BYTES_MAX_DEFAULT)]
    pub max_outbox_bytes: usize,
    /// Leeway for the token `exp`/`nbf` checks, in seconds.
    #[arg(long, env = "NEXUS_JWT_LEEWAY", default_value_t = 0)]
    pub jwt_leeway_secs: u64,
    /// SQLite database file (created if missing); unused with --database-url.
    #[arg(long, env = "DATABASE_PATH", default_value = "./nexus.db")]
    pub database_path: PathBuf,
    /// Store messages in PostgreSQL instead of SQLite: `postgres://user:pass@host:port/db`, or
    /// `postgresql:///db?host=/run/postgresql` for a unix socket. Never logged with its
    /// password.
    #[arg(long, env = "NEXUS_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// PostgreSQL timeout: connecting, each statement, unacknowledged writes. Seconds, or `5s`.
    #[arg(long, env = "NEXUS_DB_TIMEOUT", default_value_t = Secs(limits::DB_TIMEOUT_DEFAULT))]
    pub db_timeout: Secs,
    /// PostgreSQL history reader threads (one connection each).
    #[arg(long, env = "NEXUS_DB_READERS", default_value_t = limits::DB_READERS_DEFAULT)]
    pub db_readers: usize,
    /// PostgreSQL writer lanes (one connection each); each conversation is written by one.
    #[arg(long, env = "NEXUS_DB_WRITERS", default_value_t = limits::DB_WRITERS_DEFAULT)]
    pub db_writers: usize,
    /// PostgreSQL: least milliseconds between the starts of a writer lane's commits under a
    /// steady load (fewer, larger commits; an ack waits at most this much more); 0 = none.
    #[arg(long, env = "NEXUS_DB_COMMIT_GAP_MS", default_value_t = limits::DB_COMMIT_GAP_MS_DEFAULT)]
    pub db_commit_gap_ms: u64,
    /// Commit durability: `normal` survives a process crash, `full` also power loss.
    #[arg(long, env = "NEXUS_SYNC", default_value = "normal", value_parser = ["normal", "full"])]
    pub sync: String,
    /// Messages that may wait for the writer (for each lane with PostgreSQL); when full,
    /// `new_msg` is refused at once with `server busy` (size it from the wait you accept).
    #[arg(long, env = "NEXUS_WRITER_QUEUE", default_value_t = limits::WRITER_QUEUE_MAX_DEFAULT)]
    pub writer_queue: usize,
    /// Refuse to grow the database beyond this many bytes (writes then fail with
    /// `storage unavailable`); unset = no limit.
    #[arg(long, env = "NEXUS_DB_MAX_BYTES")]
    pub db_max_bytes: Option<u64>,
    /// Most missed messages a join with `last_seen_id` recovers; beyond it the reply is
    /// `recovered: false` and the client pages the history API.
    #[arg(long, env = "NEXUS_RECOVERY_MAX", default_value_t = limits::RECOVERY_MAX_DEFAULT)]
    pub recovery_max: usize,
    /// Cluster mode: several nodes on one PostgreSQL act as one server, exchanging live
    /// messages and presence through this Redis (`redis://host:6379/0` or
    /// `unix:///path/redis.sock`). Requires --database-url. Never logged with its password.
    #[arg(long, env = "NEXUS_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// This node's name in logs, metrics and presence; unique among the running nodes
    /// [default: <hostname>:<port>].
    #[arg(long, env = "NEXUS_NODE_ID")]
    pub node_id: Option<String>,
    /// Prefix of every Redis key and channel of this cluster.
    #[arg(long, env = "NEXUS_REDIS_PREFIX", default_value = limits::REDIS_PREFIX_DEFAULT)]
    pub redis_prefix: String,
    /// A node silent for this long is dead: its presence is removed everywhere. Seconds, or `3s`.
    #[arg(long, env = "NEXUS_NODE_TIMEOUT", default_value_t = Secs(limits::NODE_TIMEOUT_DEFAULT))]
    pub node_timeout: Secs,
    /// Milliseconds a gap in a conversation's messages may stay open before it is read from
    /// PostgreSQL.
    #[arg(long, env = "NEXUS_GAP_WAIT_MS", default_value_t = limits::GAP_WAIT_MS_DEFAULT)]
    pub gap_wait_ms: u64,
    /// Milliseconds between catch-up reads of the watched conversations' heads (200 while
    /// Redis is down): the longest a lost publication stays unnoticed.
    #[arg(long, env = "NEXUS_CATCHUP_MS", default_value_t = limits::CATCHUP_MS_DEFAULT)]
    pub catchup_ms: u64,
    /// Committed batches that may wait to be published to Redis; when full, other nodes read
    /// the batch from PostgreSQL instead.
    #[arg(long, env = "NEXUS_PUBLISH_QUEUE", default_value_t = limits::PUBLISH_QUEUE_DEFAULT)]
    pub publish_queue: usize,
    /// Messages a core holds per conversation behind a gap before it drops them and reads them
    /// from PostgreSQL.
    #[arg(long, env = "NEXUS_HOLD_MAX", default_value_t = limits::HOLD_MAX_DEFAULT)]
    pub hold_max: usize,
    /// Who may join a conversation: `open` (any authenticated user), `token` (the socket
    /// token's `chats` claim or a join token) or `proxy` (the app backend is asked).
    #[arg(long, env = "NEXUS_JOIN_POLICY", default_value = "open", value_parser = ["open", "token", "proxy"])]
    pub join_policy: String,
    /// `proxy` policy: the backend endpoint asked about each (user, conversation) pair
    /// (`http://host:port/path`).
    #[arg(long, env = "NEXUS_JOIN_PROXY_URL")]
    pub join_proxy_url: Option<String>,
    /// `proxy` policy: the bearer secret sent to the backend. Never logged.
    #[arg(long, env = "NEXUS_JOIN_PROXY_SECRET", hide_env_values = true)]
    pub join_proxy_secret: Option<String>,
    /// `proxy` policy: how long a backend call may take before the join is refused with
    /// `authorization unavailable`. Seconds, or `2s`, `500ms`.
    #[arg(long, env = "NEXUS_JOIN_PROXY_TIMEOUT", default_value_t = Secs(limits::JOIN_PROXY_TIMEOUT_DEFAULT))]
    pub join_proxy_timeout: Secs,
    /// `proxy` policy: how long the backend's allow and deny answers are reused for the same
    /// user and conversation (0 = ask every time). Seconds, or `60s`, `5m`.
    #[arg(long, env = "NEXUS_JOIN_PROXY_CACHE", default_value_t = Secs(limits::JOIN_PROXY_CACHE_DEFAULT))]
    pub join_proxy_cache: Secs,
    /// Log lines on stderr: `text` (for people) or `json` (one JSON object per line: timestamp,
    /// level, target, message and the event's fields, for log shippers).
    #[arg(long, env = "NEXUS_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Bearer key of the server API (`/api/conversations/<id>/messages` POST, members DELETE,
    /// `/api/users/<id>/disconnect`); unset = the server API is off (404). Never logged.
    #[arg(long, env = "NEXUS_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// How log lines are written (`NEXUS_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// Checks `NEXUS_LOG_FORMAT`. Read before the rest of the configuration, which is reported
    /// in that format.
    pub fn from_args(args: &ServerArgs) -> Result<LogFormat, ConfigError> {
        match args.log_format.trim() {
            "text" | "" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(invalid("NEXUS_LOG_FORMAT", "must be text or json")),
        }
    }
}

/// A configuration error, reported as one line before exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `JWT_SECRET` is missing or empty.
    #[error("JWT_SECRET is required: set the JWT_SECRET environment variable or pass --jwt-secret")]
    MissingSecret,
    /// A value is outside what the server accepts.
    #[error("invalid {name}: {why}")]
    Invalid {
        /// Setting name as the operator writes it.
        name: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// Validated server configuration. Each field is the checked form of the [`ServerArgs`] flag
/// of the same name (documented there), except where a comment says otherwise.
#[derive(Debug, Clone)]
#[allow(missing_docs)]
pub struct Config {
    /// `NEXUS_BIND` and `PORT` together (port 0: the kernel picks one).
    pub listen: SocketAddr,
    pub jwt_secret: Vec<u8>,
    pub jwt_leeway_secs: u64,
    /// `NEXUS_WORKERS`, or one per CPU.
    pub workers: usize,
    pub max_frame_bytes: usize,
    pub idle_timeout: Duration,
    /// `NEXUS_ALLOWED_ORIGINS`, parsed.
    pub origins: OriginPolicy,
    pub max_channels: usize,
    pub max_outbox_bytes: usize,
    pub database_path: PathBuf,
    /// `NEXUS_DATABASE_URL`: PostgreSQL instead of SQLite. Its `Debug` hides it (a password).
    pub database_url: Option<DatabaseUrl>,
    pub db_timeout: Duration,
    pub db_readers: usize,
    pub db_writers: usize,
    /// `NEXUS_DB_COMMIT_GAP_MS`.
    pub db_commit_gap: Duration,
    /// `NEXUS_SYNC=full`.
    pub sync_full: bool,
    pub db_max_bytes: Option<u64>,
    pub writer_queue: usize,
    /// `None`: derived from the open-file limit at start-up.
    pub max_connections: Option<usize>,
    /// `NEXUS_PRESENCE_BATCH_MS` (zero: a diff per change).
    pub presence_batch: Duration,
    pub drain: Duration,
    pub msg_rate: u32,
    pub dev_tokens: bool,
    pub recovery_max: usize,
    /// `NEXUS_REDIS_URL` and the settings that go with it; `None`: a single node.
    pub cluster: Option<ClusterConfig>,
    /// `NEXUS_JOIN_POLICY` and, for `proxy`, the backend it asks.
    pub join_policy: JoinPolicy,
    /// `NEXUS_API_KEY`; `None`: the server API answers 404. Its `Debug` hides it.
    pub api_key: Option<Secret>,
}

/// Who may join a conversation (and read its history).
#[derive(Debug, Clone)]
pub enum JoinPolicy {
    /// Any authenticated user.
    Open,
    /// The socket token's `chats` claim, or a join token in the join payload.
    Token,
    /// The app backend is asked.
    Proxy(ProxyConfig),
}

/// The `proxy` policy's backend (each the checked form of the [`ServerArgs`] flag of the same
/// name).
#[derive(Debug, Clone)]
#[allow(missing_docs)]
pub struct ProxyConfig {
    pub url: String,
    /// `NEXUS_JOIN_PROXY_SECRET`; its `Debug` hides it.
    pub secret: Secret,
    pub timeout: Duration,
    /// `NEXUS_JOIN_PROXY_CACHE` (zero: nothing is cached).
    pub cache_ttl: Duration,
}

impl JoinPolicy {
    fn from_args(args: &ServerArgs) -> Result<JoinPolicy, ConfigError> {
        match args.join_policy.as_str() {
            "token" => return Ok(JoinPolicy::Token),
            "proxy" => {}
            _ => return Ok(JoinPolicy::Open),
        }
        let url = args.join_proxy_url.as_deref().map(str::trim).unwrap_or_default();
        if url.is_empty() {
            return Err(invalid("NEXUS_JOIN_PROXY_URL", "the proxy join policy needs the backend's URL"));
        }
        if !url.starts_with("http://") {
            let why = "must be an http:// URL (reach an https backend through a local TLS proxy)";
            return Err(invalid("NEXUS_JOIN_PROXY_URL", why));
        }
        let Some(secret) = args.join_proxy_secret.as_ref().filter(|s| !s.is_empty()) else {
            return Err(invalid("NEXUS_JOIN_PROXY_SECRET", "the proxy join policy needs a secret for the backend"));
        };
        let timeout = args.join_proxy_timeout.0;
        if timeout < limits::JOIN_PROXY_TIMEOUT_MIN || timeout > limits::JOIN_PROXY_TIMEOUT_MAX {
            let why = format!(
                "must be from {} to {}",
                humantime::format_duration(limits::JOIN_PROXY_TIMEOUT_MIN),
                humantime::format_duration(limits::JOIN_PROXY_TIMEOUT_MAX)
            );
            return Err(invalid("NEXUS_JOIN_PROXY_TIMEOUT", &why));
        }
        Ok(JoinPolicy::Proxy(ProxyConfig {
            url: url.to_string(),
            secret: Secret::new(secret),
            timeout,
            cache_ttl: args.join_proxy_cache.0,
        }))
    }

    /// The policy's name, as `NEXUS_JOIN_POLICY` spells it.
    pub fn name(&self) -> &'static str {
        match self {
            JoinPolicy::Open => "open",
            JoinPolicy::Token => "token",
            JoinPolicy::Proxy(_) => "proxy",
        }
    }
}

/// Cluster mode's settings (each the checked form of the [`ServerArgs`] flag of the same name).
#[derive(Debug, Clone)]
#[allow(missing_docs)]
pub struct ClusterConfig {
    /// `NEXUS_REDIS_URL`; its `Debug` hides it.
    pub redis_url: DatabaseUrl,
    /// `None`: `<hostname>:<port>`, known once the port is bound.
    pub node_id: Option<String>,
    pub redis_prefix: String,
    pub node_timeout: Duration,
    pub gap_wait: Duration,
    pub catchup: Duration,
    pub publish_queue: usize,
    pub hold_max: usize,
}

impl ClusterConfig {
    fn from_args(args: &ServerArgs) -> Result<Option<ClusterConfig>, ConfigError> {
        let Some(url) = args.redis_url.as_ref().filter(|u| !u.trim().is_empty()) else { return Ok(None) };
        if args.database_url.as_ref().is_none_or(|u| u.trim().is_empty()) {
            let why = "cluster mode needs PostgreSQL: set NEXUS_DATABASE_URL too";
            return Err(invalid("NEXUS_REDIS_URL", why));
        }
        if let Some(id) = &args.node_id {
            let ok = !id.is_empty() && id.len() <= 100 && id.chars().all(|c| c.is_ascii_graphic() && c != '/');
            if !ok {
                return Err(invalid("NEXUS_NODE_ID", "must be 1 to 100 printable characters, no spaces or '/'"));
            }
        }
        if args.node_timeout.0 < limits::NODE_TIMEOUT_MIN {
            let why = format!("must be at least {}", Secs(limits::NODE_TIMEOUT_MIN));
            return Err(invalid("NEXUS_NODE_TIMEOUT", &why));
        }
        if args.gap_wait_ms > limits::GAP_WAIT_MS_MAX {
            return Err(invalid("NEXUS_GAP_WAIT_MS", &format!("must be at most {}", limits::GAP_WAIT_MS_MAX)));
        }
        if !(limits::CATCHUP_MS_MIN..=limits::CATCHUP_MS_MAX).contains(&args.catchup_ms) {
            let why = format!("must be from {} to {}", limits::CATCHUP_MS_MIN, limits::CATCHUP_MS_MAX);
            return Err(invalid("NEXUS_CATCHUP_MS", &why));
        }
        if args.publish_queue == 0 {
            return Err(invalid("NEXUS_PUBLISH_QUEUE", "must be at least 1"));
        }
        if args.hold_max == 0 {
            return Err(invalid("NEXUS_HOLD_MAX", "must be at least 1"));
        }
        Ok(Some(ClusterConfig {
            redis_url: DatabaseUrl(url.clone()),
            node_id: args.node_id.clone(),
            redis_prefix: args.redis_prefix.clone(),
            node_timeout: args.node_timeout.0,
            gap_wait: Duration::from_millis(args.gap_wait_ms),
            catchup: Duration::from_millis(args.catchup_ms),
            publish_queue: args.publish_queue,
            hold_max: args.hold_max,
        }))
    }
}

impl Config {
    /// Validates parsed arguments.
    pub fn from_args(args: &ServerArgs) -> Result<Config, ConfigError> {
        let secret = secret(args)?;
        let workers = match args.workers {
            Some(0) => return Err(invalid("NEXUS_WORKERS", "must be at least 1")),
            Some(n) if n > limits::WORKERS_MAX => {
                return Err(invalid("NEXUS_WORKERS", &format!("must be at most {}", limits::WORKERS_MAX)))
            }
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()).min(limits::WORKERS_MAX),
        };
        if args.max_frame_bytes < limits::FRAME_BYTES_MAX_MIN {
            let why = format!("must be at least {}", limits::FRAME_BYTES_MAX_MIN);
            return Err(invalid("NEXUS_MAX_FRAME_BYTES", &why));
        }
        if args.idle_timeout.0 < limits::IDLE_TIMEOUT_MIN {
            return Err(invalid("NEXUS_IDLE_TIMEOUT", &format!("must be at least {}", Secs(limits::IDLE_TIMEOUT_MIN))));
        }
        if args.drain.0 > limits::DRAIN_MAX {
            return Err(invalid("NEXUS_DRAIN_SECS", &format!("must be at most {}", Secs(limits::DRAIN_MAX))));
        }
        if args.presence_batch_ms > limits::PRESENCE_BATCH_MS_MAX {
            let why = format!("must be at most {}", limits::PRESENCE_BATCH_MS_MAX);
            return Err(invalid("NEXUS_PRESENCE_BATCH_MS", &why));
        }
        if args.writer_queue == 0 {
            return Err(invalid("NEXUS_WRITER_QUEUE", "must be at least 1"));
        }
        if args.db_readers == 0 || args.db_readers > limits::DB_READERS_MAX {
            return Err(invalid("NEXUS_DB_READERS", &format!("must be from 1 to {}", limits::DB_READERS_MAX)));
        }
        if args.db_writers == 0 || args.db_writers > limits::DB_WRITERS_MAX {
            return Err(invalid("NEXUS_DB_WRITERS", &format!("must be from 1 to {}", limits::DB_WRITERS_MAX)));
        }
        if args.db_commit_gap_ms > limits::DB_COMMIT_GAP_MS_MAX {
            let why = format!("must be at most {}", limits::DB_COMMIT_GAP_MS_MAX);
            return Err(invalid("NEXUS_DB_COMMIT_GAP_MS", &why));
        }
        if args.db_timeout.0 < Duration::from_millis(100) {
            return Err(invalid("NEXUS_DB_TIMEOUT", "must be at least 100ms"));
        }
        if args.max_channels == 0 {
            return Err(invalid("NEXUS_MAX_CHANNELS", "must be at least 1"));
        }
        if args.max_outbox_bytes < args.max_frame_bytes {
            return Err(invalid("NEXUS_MAX_OUTBOX_BYTES", "must be at least NEXUS_MAX_FRAME_BYTES"));
        }
        let entries = args
            .allowed_origins
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(|s| OriginEntry::parse(s).ok_or_else(|| invalid("NEXUS_ALLOWED_ORIGINS", s)))
            .collect::<Result<Vec<_>, _>>()?;
        if args.recovery_max > limits::RECOVERY_MAX_MAX {
            return Err(invalid("NEXUS_RECOVERY_MAX", &format!("must be at most {}", limits::RECOVERY_MAX_MAX)));
        }
        let cluster = ClusterConfig::from_args(args)?;
        let join_policy = JoinPolicy::from_args(args)?;
        let api_key = match args.api_key.as_deref().filter(|k| !k.is_empty()) {
            None => None,
            Some(key) if key.len() < limits::API_KEY_BYTES_MIN => {
                let why = format!("must be at least {} bytes", limits::API_KEY_BYTES_MIN);
                return Err(invalid("NEXUS_API_KEY", &why));
            }
            Some(key) => Some(Secret::new(key)),
        };
        Ok(Config {
            listen: SocketAddr::new(args.bind, args.port),
            jwt_secret: secret,
            jwt_leeway_secs: args.jwt_leeway_secs,
            workers,
            max_frame_bytes: args.max_frame_bytes,
            idle_timeout: args.idle_timeout.0,
            origins: OriginPolicy::new(entries),
            max_channels: args.max_channels,
            max_outbox_bytes: args.max_outbox_bytes,
            database_path: args.database_path.clone(),
            database_url: args.database_url.clone().filter(|u| !u.trim().is_empty()).map(DatabaseUrl),
            db_timeout: args.db_timeout.0,
            db_readers: args.db_readers,
            db_writers: args.db_writers,
            db_commit_gap: Duration::from_millis(args.db_commit_gap_ms),
            sync_full: args.sync == "full",
            db_max_bytes: args.db_max_bytes,
            writer_queue: args.writer_queue,
            max_connections: args.max_connections,
            presence_batch: Duration::from_millis(args.presence_batch_ms),
            drain: args.drain.0,
            msg_rate: args.msg_rate,
            dev_tokens: args.dev_tokens,
            recovery_max: args.recovery_max,
            cluster,
            join_policy,
            api_key,
        })
    }
}

/// The secret from the arguments, or [`ConfigError::MissingSecret`].
pub fn secret(args: &ServerArgs) -> Result<Vec<u8>, ConfigError> {
    match &args.jwt_secret {
        Some(s) if !s.is_empty() => Ok(s.as_bytes().to_vec()),
        _ => Err(ConfigError::MissingSecret),
    }
}

fn invalid(name: &'static str, why: &str) -> ConfigError {
    ConfigError::Invalid { name, why: why.to_string() }
}

/// A database or Redis URL; shown as `[redacted]` by `Debug` (it may carry a password).
#[derive(Clone)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// The URL itself, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatabaseUrl([redacted])")
    }
}

/// A secret setting (a key, a bearer secret); shown as `[redacted]` by `Debug`.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: &str) -> Secret {
        Secret(value.to_string())
    }

    /// The secret itself, for sending or comparing only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// A duration flag: plain seconds (`60`) or humantime (`90s`, `2m`); shown as seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Secs(pub Duration);

impl std::str::FromStr for Secs {
    type Err = String;

    fn from_str(s: &str) -> Result<Secs, String> {
        parse_duration(s).map(Secs)
    }
}

impl std::fmt::Display for Secs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.subsec_nanos() == 0 {
            write!(f, "{}", self.0.as_secs())
        } else {
            write!(f, "{}", humantime::format_duration(self.0))
        }
    }
}

/// Parses a duration: plain seconds (`60`) or humantime (`90s`, `2m`, `24h`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (use seconds, or e.g. 90s, 2m, 24h)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("soon").is_err());
        assert_eq!("2m".parse::<Secs>().map(|s| s.to_string()), Ok("120".to_string()));
        assert_eq!(Secs(Duration::from_millis(1_500)).to_string(), "1s 500ms");
    }

    /// The defaults users rely on (README's configuration table), as declared on the flags,
    /// whatever the environment of the test run holds.
    #[test]
    fn documented_defaults() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let default_of = |id: &str| {
            let arg = cli.get_arguments().find(|a| a.get_id() == id).unwrap_or_else(|| panic!("no flag {id}"));
            let values: Vec<_> = arg.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
            values.join(",")
        };
        let expected = [
            ("port", "4000"),
            ("bind", "0.0.0.0"),
            ("msg_rate", "1000"),
            ("idle_timeout", "60"),
            ("max_frame_bytes", "65536"),
            ("max_outbox_bytes", "1048576"),
            ("max_channels", "100"),
            ("drain", "10"),
            ("presence_batch_ms", "5"),
            ("database_path", "./nexus.db"),
            ("sync", "normal"),
            ("jwt_leeway_secs", "0"),
            ("writer_queue", "8192"),
            ("db_timeout", "5"),
            ("db_readers", "2"),
            ("db_writers", "2"),
            ("db_commit_gap_ms", "3"),
            ("redis_prefix", "nx:"),
            ("node_timeout", "15"),
            ("gap_wait_ms", "25"),
            ("catchup_ms", "1000"),
            ("publish_queue", "4096"),
            ("hold_max", "4096"),
            ("recovery_max", "1000"),
            ("join_policy", "open"),
            ("join_proxy_timeout", "2"),
            ("join_proxy_cache", "60"),
            ("log_format", "text"),
        ];
        for (id, value) in expected {
            assert_eq!(default_of(id), value, "default of {id}");
        }
        // Unset means "derived": one worker per CPU, connections from the open-file limit.
        for id in [
            "workers",
            "max_connections",
            "db_max_bytes",
            "jwt_secret",
            "database_url",
            "redis_url",
            "node_id",
            "api_key",
        ] {
            assert_eq!(default_of(id), "", "{id} has no fixed default");
        }
    }

    #[test]
    fn missing_secret_is_an_error() {
        let cli = Cli::try_parse_from(["nexus"]).expect("parses");
        let mut args = cli.server;
        args.jwt_secret = None;
        assert!(matches!(Config::from_args(&args), Err(ConfigError::MissingSecret)));
    }

    #[test]
    fn the_database_url_never_shows_in_debug_output() {
        let cli = Cli::try_parse_from(["nexus", "--jwt-secret", "s", "--database-url", "postgres://u:hunter2@db/x"]);
        let config = Config::from_args(&cli.expect("parses").server).expect("valid");
        assert_eq!(config.database_url.as_ref().map(DatabaseUrl::expose), Some("postgres://u:hunter2@db/x"));
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn redis_turns_cluster_mode_on_only_with_postgres() {
        let parse = |extra: &[&str]| {
            let argv = ["nexus", "--jwt-secret", "s"].iter().chain(extra).copied();
            Config::from_args(&Cli::try_parse_from(argv).expect("parses").server)
        };
        let alone = parse(&["--redis-url", "redis://:hunter2@r/0"]);
        assert!(matches!(alone, Err(ConfigError::Invalid { name: "NEXUS_REDIS_URL", .. })), "{alone:?}");
        let both = parse(&["--redis-url", "redis://:hunter2@r/0", "--database-url", "postgres://db/x"]);
        let cluster = both.expect("valid").cluster.expect("cluster mode");
        assert_eq!(cluster.redis_url.expose(), "redis://:hunter2@r/0");
        assert!(!format!("{cluster:?}").contains("hunter2"));
        let bad_id = parse(&["--redis-url", "redis://r", "--database-url", "postgres://db/x", "--node-id", "a/b"]);
        assert!(matches!(bad_id, Err(ConfigError::Invalid { name: "NEXUS_NODE_ID", .. })));
        assert!(parse(&["--database-url", "postgres://db/x"]).expect("valid").cluster.is_none());
    }
}
