//! A real Redis for the tests: `redis-server` on a unix socket in its own temporary directory,
//! persistence off, restartable on the same socket (for the "Redis restarted" faults).
//!
//! A missing binary fails the test with the package to install (Debian's `redis-server`;
//! tests/run.sh installs it); these tests never skip.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// How long Redis may take to start.
const REDIS_START_TIMEOUT: Duration = Duration::from_secs(10);

/// A Redis server on a unix socket.
pub struct Redis {
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    /// A new, private server.
    pub fn start() -> Redis {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("nexus-redis-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut redis = Redis { dir, child: None };
        redis.run();
        redis
    }

    /// The socket's path.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("redis.sock")
    }

    /// `unix://…` for clients.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// A client of this server.
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("a unix socket URL")
    }

    /// Starts the server on its socket; returns once it says it accepts connections.
    pub fn run(&mut self) {
        assert!(self.child.is_none(), "already running");
        let _ = std::fs::remove_file(self.socket());
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", "0", "--unixsocket"])
            .arg(self.socket())
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        // SAFETY: only an async-signal-safe call between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot run redis-server ({e}): install Debian's `redis-server` package (tests/run.sh does)")
        });
        let stdout = child.stdout.take().expect("piped");
        if !super::wait_for_line(stdout, "ready to accept connections", REDIS_START_TIMEOUT) {
            let _ = child.kill();
            panic!("redis-server did not become ready within {REDIS_START_TIMEOUT:?}");
        }
        self.child = Some(child);
    }

    /// Kills the server (SIGKILL: nothing is saved, clients see their connections end).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
