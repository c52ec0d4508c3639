//! A real PostgreSQL for the tests: `initdb` + `postgres` on a temporary directory, listening
//! on a unix socket only, as the current user or (as root, since initdb refuses root) as the
//! `postgres` user. One shared instance per test binary with a fresh database per test, or a
//! private instance a fault test may stop and restart.
//!
//! Missing binaries fail the test with the package to install (Debian's `postgresql`;
//! tests/run.sh installs it); these tests never skip.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

/// How long PostgreSQL may take to start.
const PG_START_TIMEOUT: Duration = Duration::from_secs(30);

/// A PostgreSQL server on a unix socket in its own directory.
pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
    /// Port of the unix socket's name, and of the TCP listener on 127.0.0.1 if `tcp`.
    port: u16,
    tcp: bool,
}

/// The directory holding `initdb`, `postgres` and `pg_ctl`.
fn bin_dir() -> PathBuf {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev());
    }
    candidates.push(PathBuf::from("/usr/local/bin"));
    candidates.push(PathBuf::from("/usr/bin"));
    candidates.into_iter().find(|d| d.join("initdb").exists() && d.join("postgres").exists()).unwrap_or_else(|| {
        panic!("PostgreSQL binaries (initdb, postgres) not found: install Debian's `postgresql` package (tests/run.sh does)")
    })
}

/// `(uid, gid)` of the `postgres` user when running as root (initdb refuses root).
fn run_as() -> Option<(libc::uid_t, libc::gid_t)> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam with a valid C string; the result is read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(!pw.is_null(), "running as root and there is no `postgres` user: install Debian's `postgresql` package");
    // SAFETY: non-null result of getpwnam.
    unsafe { Some(((*pw).pw_uid, (*pw).pw_gid)) }
}

/// A command that runs as the `postgres` user when we are root, and dies with the thread that
/// started it (so a crashed test leaves no server behind).
fn pg_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    let user = run_as();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid)) = user {
                if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

impl Postgres {
    /// A new, private server (initdb + start) on a unix socket.
    pub fn start() -> Postgres {
        Postgres::start_on(false)
    }

    /// A new, private server that also listens on 127.0.0.1 ([`Postgres::tcp_port`]).
    pub fn start_tcp() -> Postgres {
        Postgres::start_on(true)
    }

    fn start_on(tcp: bool) -> Postgres {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("nexus-pg-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("pg dir");
        if let Some((uid, gid)) = run_as() {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown pg dir");
        }
        let bin = bin_dir();
        let out = pg_command(&bin.join("initdb"))
            .args(["-A", "trust", "-U", "nexus", "--no-sync", "-E", "UTF8", "-D"])
            .arg(dir.join("data"))
            .stdin(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let port = if tcp {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            probe.local_addr().expect("its address").port()
        } else {
            5432
        };
        let mut pg = Postgres { dir, bin, child: None, port, tcp };
        pg.run();
        pg
    }

    /// Starts the server on its existing data directory; returns once it accepts connections.
    pub fn run(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut child = pg_command(&self.bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-k")
            .arg(&self.dir)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(if self.tcp { "listen_addresses=127.0.0.1" } else { "listen_addresses=" })
            .args(["-c", "fsync=off", "-c", "max_connections=300"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn postgres");
        let stderr = child.stderr.take().expect("piped");
        if !super::wait_for_line(stderr, "ready to accept connections", PG_START_TIMEOUT) {
            let _ = child.kill();
            panic!("postgres did not become ready within {PG_START_TIMEOUT:?}");
        }
        self.child = Some(child);
    }

    /// `pg_ctl stop -m immediate`: the server dies at once, as in a crash.
    pub fn stop_immediate(&mut self) {
        let out = pg_command(&self.bin.join("pg_ctl"))
            .args(["stop", "-m", "immediate", "-D"])
            .arg(self.dir.join("data"))
            .stdin(Stdio::null())
            .output()
            .expect("run pg_ctl");
        assert!(out.status.success(), "pg_ctl stop failed: {}", String::from_utf8_lossy(&out.stderr));
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// The URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://nexus@/{db}?host={}&port={}", self.dir.display(), self.port)
    }

    /// The TCP port of a server from [`Postgres::start_tcp`].
    pub fn tcp_port(&self) -> u16 {
        assert!(self.tcp, "started without TCP");
        self.port
    }

    /// Creates a fresh database and returns its URL.
    pub fn create_db(&self) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("t{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let mut admin = postgres::Client::connect(&self.url("postgres"), postgres::NoTls).expect("connect to postgres");
        admin.batch_execute(&format!("CREATE DATABASE {name}")).expect("create database");
        self.url(&name)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGQUIT: immediate shutdown, no checkpoint (the data is thrown away).
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGQUIT) };
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The server shared by this test binary (started on first use, from a thread that lives as
/// long as the process, since the server dies with the thread that started it).
pub fn shared() -> &'static Postgres {
    static SHARED: OnceLock<Postgres> = OnceLock::new();
    SHARED.get_or_init(|| {
        remove_stale_dirs();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let started = std::panic::catch_unwind(Postgres::start);
            let _ = tx.send(started);
            loop {
                std::thread::park();
            }
        });
        match rx.recv() {
            Ok(Ok(pg)) => {
                // A static is never dropped: remove its directory when the process exits (the
                // server itself dies with its starter thread).
                let _ = SHARED_DIR.set(pg.dir.clone());
                // SAFETY: registering a plain function with no captured state.
                unsafe { libc::atexit(remove_shared_dir) };
                pg
            }
            Ok(Err(e)) => std::panic::resume_unwind(e),
            Err(_) => panic!("the postgres starter thread died"),
        }
    })
}

static SHARED_DIR: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_shared_dir() {
    if let Some(dir) = SHARED_DIR.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Removes the directories of test processes that are gone (killed before their exit hook).
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("nexus-pg-").and_then(|r| r.split('-').next()?.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let gone =
            unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Every stored message in the database at `url`, by conversation then `seq`.
pub fn rows(url: &str) -> Vec<super::DbRow> {
    let mut client = postgres::Client::connect(url, postgres::NoTls).expect("connect to the test database");
    let rows = client
        .query(
            "SELECT seq, id, conversation_id, sender_id, body, inserted_at FROM messages ORDER BY conversation_id, seq",
            &[],
        )
        .expect("read messages");
    rows.iter()
        .map(|r| super::DbRow {
            seq: r.get(0),
            id: r.get::<_, uuid::Uuid>(1).to_string(),
            conversation: r.get::<_, uuid::Uuid>(2).to_string(),
            sender: r.get::<_, uuid::Uuid>(3).to_string(),
            body: r.get(4),
            inserted_at_us: r.get(5),
        })
        .collect()
}
