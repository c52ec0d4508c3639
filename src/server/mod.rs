//! Boot and wiring: listeners, the writer thread, one pinned monoio runtime per core, signals.
//! The only home of `monoio`; nothing imports this module but `main`.

mod api;
mod conn;
mod core;
mod fabric;
mod metrics;
mod sys;
mod task;
mod topics;

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use monoio::{FusionDriver, RuntimeBuilder};
use socket2::{Domain, Socket, Type};

use self::core::{Core, Shared};
use self::fabric::{Fabric, FabricError};
use crate::access::Access;
use crate::bus::{CoreMsg, Mailbox, WakeReceiver};
use crate::config::Config;
use crate::limits;
use crate::store::{
    schema, spawn_pg_readers, spawn_reader, spawn_writer, PgStore, PgTarget, ReaderHandle, SqliteStore, Store,
    StoreHandle,
};

/// A start-up failure (reported as one line, exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address tried.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Threads, runtimes or mailboxes could not be created.
    #[error("cannot start: {0}")]
    Start(#[from] std::io::Error),
    /// The database could not be opened or migrated.
    #[error("{0}")]
    Database(#[from] schema::OpenError),
    /// Cluster mode could not start.
    #[error("{0}")]
    Fabric(#[from] FabricError),
}

/// Runs the server until SIGINT/SIGTERM.
pub fn run(config: Config) -> Result<(), ServerError> {
    // Before any thread starts: a thread that does not block SIGTERM would take the signal
    // and die by it, ending the whole process without a drain.
    block_signals();
    sys::merge_freed_blocks_at_once();
    let listeners = bind_listeners(config.listen, config.workers)?;
    let local = listeners[0].local_addr().map_err(ServerError::Start)?;
    let node_id = match config.cluster.as_ref().and_then(|c| c.node_id.clone()) {
        Some(id) => id,
        None => format!("{}:{}", sys::hostname(), local.port()),
    };
    let Storage { lanes: store, commit_gap, reader, target, shown: database } = open_storage(&config, &node_id)?;
    let nofile = sys::raise_nofile_limit();
    let workers = config.workers;
    let reserved = limits::FDS_RESERVED + limits::FDS_PER_CORE * workers as u64;
    let fd_cap = nofile.saturating_sub(reserved).max(1) as usize;
    let connections_max = config.max_connections.unwrap_or(fd_cap);
    if connections_max > fd_cap {
        tracing::warn!(
            max_connections = connections_max,
            open_files = nofile,
            "NEXUS_MAX_CONNECTIONS is above what the open-file limit allows ({fd_cap}); connections past it \
             are refused when descriptors run out"
        );
    }
    let (mailboxes, wakes): (Vec<Mailbox>, Vec<WakeReceiver>) = (0..workers)
        .map(|_| Mailbox::new(limits::MAILBOX_MSGS_MAX))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .unzip();
    let mailboxes: Arc<[Mailbox]> = Arc::from(mailboxes);
    let fabric = match (&config.cluster, &target) {
        (Some(cluster), Some(target)) => {
            let fabric = Fabric::start(cluster, node_id.clone(), target, config.db_timeout, Arc::clone(&mailboxes))?;
            Some(fabric)
        }
        _ => None,
    };
    let cluster = config.cluster.as_ref().map_or(String::new(), |c| {
        format!(" cluster node={node_id} redis_prefix={} node_timeout={:?}", c.redis_prefix, c.node_timeout)
    });
    let access = Access::start(&config.join_policy, &config.jwt_secret, config.jwt_leeway_secs)?;
    let private =
        format!(" join_policy={} server_api={}", access.name(), if config.api_key.is_some() { "on" } else { "off" });
    let shared = Arc::new(Shared {
        reader,
        access,
        config,
        mailboxes,
        fabric,
        connections: AtomicUsize::new(0),
        connections_max,
        draining: AtomicBool::new(false),
        congested_cores: AtomicUsize::new(0),
        published: crate::metrics::Published::new(workers),
    });
    let fanout = shared.clone();
    let sink = Arc::new(move |batch: Arc<crate::store::CommitBatch>| {
        if let Some(fabric) = &fanout.fabric {
            fabric.publish(&batch); // first: the other nodes' members wait longest
        }
        for mailbox in fanout.mailboxes.iter() {
            mailbox.push_blocking(CoreMsg::Committed(Arc::clone(&batch)));
        }
    });
    let (store, writer) = spawn_writer(store, sink, shared.config.writer_queue, commit_gap)?;
    let uring = monoio::utils::detect_uring();
    for (id, (listener, wake)) in listeners.into_iter().zip(wakes).enumerate() {
        spawn_core(id, shared.clone(), store.clone(), listener, wake)?;
    }
    let driver = if uring { "io_uring" } else { "epoll (legacy fallback: io_uring unavailable)" };
    if !uring {
        tracing::warn!("io_uring is unavailable; running on the legacy epoll driver");
    }
    if shared.config.dev_tokens {
        tracing::warn!(
            "DEV TOKENS ARE ON: POST /dev/token mints a valid token for anyone who asks. Development only; \
             never run a public server with --dev-tokens / NEXUS_DEV_TOKENS"
        );
    }
    tracing::info!(
        "listening on {local} workers={workers} driver={driver} open_files={nofile} max_connections={connections_max} {database}{cluster}{private}"
    );
    let signal = wait_for_signal(None).unwrap_or("signal");
    drain(&shared, signal);
    if let Some(fabric) = &shared.fabric {
        // The sockets are gone; whatever presence of this node is still in Redis goes now,
        // rather than when the other nodes reap it.
        if !fabric.presence.retire(limits::RETIRE_WAIT) {
            tracing::warn!("could not remove this node's presence from Redis; the other nodes will reap it");
        }
    }
    tracing::info!("committing accepted messages");
    writer.stop();
    Ok(())
}

/// Graceful shutdown: refuse new sessions, have every core close its sockets (1001) over the
/// drain time, and return once all are gone, the time (plus the close linger) is up, or a
/// second signal asks to stop at once. The writer keeps committing meanwhile.
fn drain(shared: &Shared, signal: &str) {
    let over = shared.config.drain;
    let open = shared.connections();
    tracing::info!(
        signal,
        connections = open,
        ?over,
        "draining: closing sockets (1001), send the signal again to stop now"
    );
    shared.draining.store(true, Ordering::Relaxed);
    for mailbox in shared.mailboxes.iter() {
        mailbox.push_blocking(CoreMsg::Drain);
    }
    let deadline = Instant::now() + over + limits::CLOSE_LINGER;
    while shared.connections() > 0 && Instant::now() < deadline {
        if let Some(second) = wait_for_signal(Some(Duration::from_millis(50))) {
            let left = shared.connections();
            tracing::warn!(signal = second, connections = left, "second signal: stopping now");
            return;
        }
    }
}

/// The opened storage: a store per writer lane, the history readers, and a description for
/// the start-up line (never a password).
struct Storage {
    lanes: Vec<Box<dyn Store>>,
    /// Least time between a lane's commit starts under a steady load (PostgreSQL only).
    commit_gap: Duration,
    reader: ReaderHandle,
    /// The PostgreSQL database, if that is the store (cluster mode reads it too).
    target: Option<PgTarget>,
    shown: String,
}

/// Opens the configured store (migrating it) and starts its history readers; `node` names
/// this node in PostgreSQL's batch records.
fn open_storage(config: &Config, node: &str) -> Result<Storage, ServerError> {
    if let Some(url) = &config.database_url {
        let target = PgTarget::parse(url.expose(), config.db_timeout)?;
        let lanes = PgStore::open(&target, node, config.db_timeout, config.db_writers)?;
        let reader = spawn_pg_readers(&target, config.db_readers, config.db_timeout)?;
        let shown = format!(
            "database={} writers={} readers={} commit_gap={:?}",
            target.shown(),
            config.db_writers,
            config.db_readers,
            config.db_commit_gap
        );
        let lanes = lanes.into_iter().map(|s| Box::new(s) as Box<dyn Store>).collect();
        return Ok(Storage { lanes, commit_gap: config.db_commit_gap, reader, target: Some(target), shown });
    }
    let sync = if config.sync_full { schema::Sync::Full } else { schema::Sync::Normal };
    let mut db = schema::open_writer(&config.database_path, sync, config.db_max_bytes)?;
    let wal = schema::watch_wal(&mut db, &config.database_path)?;
    let store = SqliteStore::new(db)
        .map_err(|source| schema::OpenError::Sqlite { path: config.database_path.display().to_string(), source })?;
    let (reader, _reader_thread) = spawn_reader(&config.database_path)?;
    schema::spawn_checkpointer(&config.database_path, wal)?;
    let sync = if config.sync_full { "full" } else { "normal" };
    let shown = format!("database={} sync={sync}", config.database_path.display());
    Ok(Storage { lanes: vec![Box::new(store)], commit_gap: Duration::ZERO, reader, target: None, shown })
}

/// One `SO_REUSEPORT` listener per core, all on the same port (port 0 resolves once).
fn bind_listeners(addr: SocketAddr, n: usize) -> Result<Vec<std::net::TcpListener>, ServerError> {
    let mut out = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n {
        let bind = || -> std::io::Result<std::net::TcpListener> {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(limits::LISTEN_BACKLOG)?;
            Ok(socket.into())
        };
        let listener = bind().map_err(|source| ServerError::Bind { addr, source })?;
        if addr.port() == 0 {
            addr = listener.local_addr()?;
        }
        out.push(listener);
    }
    Ok(out)
}

fn spawn_core(
    id: usize,
    shared: Arc<Shared>,
    store: StoreHandle,
    listener: std::net::TcpListener,
    wake: WakeReceiver,
) -> std::io::Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::Builder::new().name(format!("core-{id}")).spawn(move || {
        if let Err(e) = monoio::utils::bind_to_cpu_set([id % cpus]) {
            tracing::warn!(core = id, error = %e, "could not pin core thread");
        }
        let result = RuntimeBuilder::<FusionDriver>::new().enable_timer().build().and_then(|mut rt| {
            rt.block_on(async move {
                let listener = monoio::net::TcpListener::from_std(listener)?;
                let wake = monoio::net::UnixStream::from_std(wake.0)?;
                Rc::new_cyclic(|me| Core::new(id, shared, store, me.clone())).run(listener, wake).await;
                Ok(())
            })
        });
        if let Err(e) = result {
            tracing::error!(core = id, error = %e, "core failed; exiting");
            std::process::exit(1);
        }
    })?;
    Ok(())
}

/// Blocks SIGINT/SIGTERM in this thread and every thread it starts afterwards (a mask is
/// inherited), so only [`wait_for_signal`] receives them.
fn block_signals() {
    // SAFETY: sigset operations on a local, zero-initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Waits for SIGINT/SIGTERM (blocked in every thread), at most `timeout` if given.
fn wait_for_signal(timeout: Option<Duration>) -> Option<&'static str> {
    // SAFETY: sigset operations on a local set; sigtimedwait only reads the set and timespec.
    let sig = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        match timeout {
            None => {
                let mut sig: libc::c_int = 0;
                libc::sigwait(&set, &mut sig);
                sig
            }
            Some(t) => {
                let ts =
                    libc::timespec { tv_sec: t.as_secs() as libc::time_t, tv_nsec: t.subsec_nanos() as libc::c_long };
                libc::sigtimedwait(&set, std::ptr::null_mut(), &ts)
            }
        }
    };
    match sig {
        libc::SIGINT => Some("SIGINT"),
        libc::SIGTERM => Some("SIGTERM"),
        _ => None,
    }
}
