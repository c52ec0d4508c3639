//! Shared helpers for the integration tests: start the real `nexus` binary on port 0, mint
//! (and deliberately break) JWTs, talk WebSocket to it with tungstenite or with hand-built raw
//! frames, and speak raw HTTP for handshake tests.
//!
//! Rules the helpers enforce: every socket is on 127.0.0.1, every read has a deadline, and
//! nothing waits by sleeping: a test waits for the frame it expects (or for EOF) with a timeout.
#![allow(dead_code)]

pub mod cluster;
pub mod pg;
pub mod redis;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey};
use sonic_rs::{JsonValueTrait, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::Response;
use tungstenite::http::Uri;
use tungstenite::protocol::WebSocket;
use tungstenite::{ClientRequestBuilder, HandshakeError, Message};

/// The HS256 secret every test server uses (≥ 32 bytes, as the design asks of real secrets).
pub const SECRET: &str = "nexus-integration-test-secret-0123456789abcdef";

/// How long a test waits for a frame, a reply or a close before it fails.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// How long the server may take to print its `listening on` line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The `Sec-WebSocket-Key` of the raw handshakes (RFC 6455 §1.3 sample) and its accept value.
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

// ---------------------------------------------------------------------------------------------
// Server process
// ---------------------------------------------------------------------------------------------

/// A running `nexus` child process. Dropping it kills the process and removes its data dir.
pub struct Server {
    pub port: u16,
    child: Child,
    log: Arc<Log>,
    dir: PathBuf,
    /// The PostgreSQL database it stores in (its `NEXUS_DATABASE_URL`).
    pub pg_url: Option<String>,
    /// The SQLite file it uses (its `DATABASE_PATH`).
    sqlite_path: PathBuf,
}

/// Where a test server stores messages: the same tests run against both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded SQLite file (the default).
    Sqlite,
    /// A fresh database on the test binary's PostgreSQL ([`pg::shared`]).
    Postgres,
}

/// Runs each named `fn(Backend)` as two tests, `<name>::sqlite` and `<name>::postgres`: one
/// behaviour, checked against both stores.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[test]
                fn sqlite() {
                    super::$name($crate::common::Backend::Sqlite)
                }
                #[test]
                fn postgres() {
                    super::$name($crate::common::Backend::Postgres)
                }
            }
        )+
    };
}

/// A second server on the store `first` used (same SQLite file or PostgreSQL database).
#[track_caller]
pub fn restart_on_same_store(first: &Server, env: &[(&str, &str)]) -> Server {
    match &first.pg_url {
        Some(url) => start_server(&[env, &[("NEXUS_DATABASE_URL", url.as_str())]].concat()),
        None => {
            let db = first.db_path();
            let db = db.to_str().expect("UTF-8 temp path");
            start_server(&[env, &[("DATABASE_PATH", db)]].concat())
        }
    }
}

/// [`start_server`] on `backend`.
#[track_caller]
pub fn start_server_on(backend: Backend, env: &[(&str, &str)]) -> Server {
    match backend {
        Backend::Sqlite => start_server(env),
        Backend::Postgres => {
            let url = pg::shared().create_db();
            start_server(&[env, &[("NEXUS_DATABASE_URL", url.as_str())]].concat())
        }
    }
}

/// The server's stderr as collected by a background thread: lines so far, whether the pipe
/// reached EOF, and a condition variable so a test can wait for a line instead of reading the
/// log once and racing the collector.
#[derive(Default)]
pub struct Log {
    state: Mutex<LogState>,
    grew: Condvar,
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    eof: bool,
}

impl Log {
    fn push(&self, line: String) {
        if let Ok(mut s) = self.state.lock() {
            s.lines.push(line);
        }
        self.grew.notify_all();
    }

    fn close(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.eof = true;
        }
        self.grew.notify_all();
    }

    fn text(&self) -> String {
        self.state.lock().map(|s| s.lines.join("\n")).unwrap_or_default()
    }

    /// Waits until `done(lines, eof)` holds or `timeout` passes; returns whether it held.
    fn wait(&self, timeout: Duration, mut done: impl FnMut(&[String], bool) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let Ok(mut s) = self.state.lock() else { return false };
        loop {
            if done(&s.lines, s.eof) {
                return true;
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return false;
            }
            s = match self.grew.wait_timeout(s, remaining) {
                Ok((s, _)) => s,
                Err(_) => return false,
            };
        }
    }
}

impl Server {
    /// Everything the server wrote on stderr so far (ANSI colours stripped). The lines are
    /// collected by another thread: to check for a line the server writes in reaction to
    /// something the test just did, use [`Server::wait_for_log`] instead.
    pub fn logs(&self) -> String {
        self.log.text()
    }

    /// Waits (up to [`TIMEOUT`]) until a line of the server's stderr contains `needle`;
    /// returns the whole log then. Panics with the log if no such line comes (or stderr
    /// closed without one).
    #[track_caller]
    pub fn wait_for_log(&self, needle: &str) -> String {
        let found = self.log.wait(TIMEOUT, |lines, eof| eof || lines.iter().any(|l| l.contains(needle)));
        let logs = self.logs();
        assert!(
            found && logs.contains(needle),
            "no log line containing {needle:?} within {TIMEOUT:?}; stderr:\n{logs}"
        );
        logs
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Drains a child's output pipe on a thread for the child's whole life (so it never blocks on
/// a full pipe) and returns whether a line containing `ready` appeared within `timeout`.
pub fn wait_for_line(pipe: impl std::io::Read + Send + 'static, ready: &'static str, timeout: Duration) -> bool {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut tx = Some(tx);
        for line in std::io::BufRead::lines(std::io::BufReader::new(pipe)).map_while(Result::ok) {
            if line.contains(ready) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(());
                }
            }
        }
    });
    rx.recv_timeout(timeout).is_ok()
}

/// A fresh, empty directory for one server's database.
pub fn unique_temp_dir() -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("nexus-test-{}-{n}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create test data dir");
    dir
}

/// A `Command` for the `nexus` binary with no configuration inherited from the environment
/// of whoever runs the tests.
pub fn nexus_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nexus"));
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("NEXUS_") || matches!(key, "PORT" | "JWT_SECRET" | "DATABASE_PATH" | "RUST_LOG") {
            cmd.env_remove(key);
        }
    }
    cmd.env("NO_COLOR", "1");
    cmd
}

/// Starts `nexus` on 127.0.0.1, port 0, 2 workers, the test secret and a private database;
/// `env` adds or overrides variables. Returns once the server printed `listening on`.
#[track_caller]
pub fn start_server(env: &[(&str, &str)]) -> Server {
    let dir = unique_temp_dir();
    let db = dir.join("nexus.db");
    let mut cmd = nexus_command();
    cmd.env("PORT", "0")
        .env("NEXUS_BIND", "127.0.0.1")
        .env("JWT_SECRET", SECRET)
        .env("NEXUS_WORKERS", "2")
        .env("DATABASE_PATH", &db)
        // SIGTERM drains sockets over this long before exiting; short keeps shutdown tests quick.
        .env("NEXUS_DRAIN_SECS", "1")
        .env("RUST_LOG", "info");
    for (key, value) in env {
        if *key == "RLIMIT_NOFILE" {
            // Not a server variable: start the server under this open-file limit.
            let limit: libc::rlim_t = value.parse().expect("RLIMIT_NOFILE is a number");
            let rlim = libc::rlimit { rlim_cur: limit, rlim_max: limit };
            // SAFETY: setrlimit is async-signal-safe and only touches the child.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlim) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
            continue;
        }
        cmd.env(key, value);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn nexus");
    let stderr = child.stderr.take().expect("piped stderr");
    let sqlite_path = env.iter().find(|(k, _)| *k == "DATABASE_PATH").map_or(db, |(_, v)| PathBuf::from(v));
    let pg_url = env.iter().find(|(k, _)| *k == "NEXUS_DATABASE_URL").map(|(_, v)| v.to_string());

    let log = Arc::new(Log::default());
    let (tx, rx) = mpsc::channel::<String>();
    {
        let log = Arc::clone(&log);
        thread::spawn(move || {
            // Keep draining stderr for the whole life of the server so it never blocks on a
            // full pipe; keep the lines for failure messages.
            let mut reader = std::io::BufReader::new(stderr);
            let mut raw = Vec::new();
            loop {
                raw.clear();
                match std::io::BufRead::read_until(&mut reader, b'\n', &mut raw) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = strip_ansi(&String::from_utf8_lossy(&raw));
                        let line = line.trim_end().to_string();
                        log.push(line.clone());
                        let _ = tx.send(line);
                    }
                }
            }
            log.close();
        });
    }

    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(remaining) {
            Ok(line) => {
                if let Some(port) = parse_listening_port(&line) {
                    return Server { port, child, log, dir, pg_url, sqlite_path };
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                let logs = log.text();
                let _ = std::fs::remove_dir_all(&dir);
                panic!(
                    "nexus did not print `listening on 127.0.0.1:<port>` within {STARTUP_TIMEOUT:?}; stderr:\n{logs}"
                );
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait();
                let logs = log.text();
                let _ = std::fs::remove_dir_all(&dir);
                panic!("nexus exited before listening ({status:?}); stderr:\n{logs}");
            }
        }
    }
}

fn parse_listening_port(line: &str) -> Option<u16> {
    const MARK: &str = "listening on 127.0.0.1:";
    let start = line.find(MARK)? + MARK.len();
    let digits: String = line[start..].chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok().filter(|p| *p != 0)
}

/// Removes ANSI escape sequences (`ESC [ ... letter`) so log matching ignores colours.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs()
}

pub fn new_sub() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub fn new_topic() -> String {
    format!("chat:{}", uuid::Uuid::new_v4())
}

pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Builds `b64url(header).b64url(claims).<signature>` where the signature is computed with
/// `sign_alg` and `secret`, whatever `header` claims. `sign_alg = None` leaves it empty.
pub fn craft_jwt(header: &str, claims: &str, secret: &[u8], sign_alg: Option<Algorithm>) -> String {
    let message = format!("{}.{}", b64url(header.as_bytes()), b64url(claims.as_bytes()));
    let signature = match sign_alg {
        Some(alg) => jsonwebtoken::crypto::sign(message.as_bytes(), &EncodingKey::from_secret(secret), alg)
            .expect("sign test token"),
        None => String::new(),
    };
    format!("{message}.{signature}")
}

/// A valid HS256 token with the test secret and the given claims (raw JSON object).
pub fn token_with_claims(claims: &str) -> String {
    craft_jwt(r#"{"alg":"HS256","typ":"JWT"}"#, claims, SECRET.as_bytes(), Some(Algorithm::HS256))
}

/// A valid token for `sub`, expiring in an hour.
pub fn token(sub: &str) -> String {
    let exp = now_secs() + 3600;
    token_with_claims(&format!(r#"{{"sub":"{sub}","exp":{exp}}}"#))
}

// ---------------------------------------------------------------------------------------------
// Phoenix frame builders
// ---------------------------------------------------------------------------------------------

/// A JSON string literal or `null`.
pub fn js(v: Option<&str>) -> String {
    match v {
        Some(s) => sonic_rs::to_string(s).expect("encode string"),
        None => "null".to_string(),
    }
}

/// A V2 frame `[join_ref, ref, topic, event, payload]`; `payload` is raw JSON.
pub fn v2(join_ref: Option<&str>, r#ref: Option<&str>, topic: &str, event: &str, payload: &str) -> String {
    format!("[{},{},{},{},{payload}]", js(join_ref), js(r#ref), js(Some(topic)), js(Some(event)))
}

/// The exact V2 reply the server must write.
pub fn v2_reply(join_ref: Option<&str>, r#ref: Option<&str>, topic: &str, status: &str, response: &str) -> String {
    v2(join_ref, r#ref, topic, "phx_reply", &format!(r#"{{"status":"{status}","response":{response}}}"#))
}

pub fn v2_ok(join_ref: Option<&str>, r#ref: &str, topic: &str) -> String {
    v2_reply(join_ref, Some(r#ref), topic, "ok", "{}")
}

pub fn v2_error(join_ref: Option<&str>, r#ref: &str, topic: &str, reason: &str) -> String {
    v2_reply(join_ref, Some(r#ref), topic, "error", &format!(r#"{{"reason":{}}}"#, js(Some(reason))))
}

#[track_caller]
pub fn heartbeat(r#ref: &str) -> String {
    v2(None, Some(r#ref), "phoenix", "heartbeat", "{}")
}

pub fn heartbeat_reply(r#ref: &str) -> String {
    v2_ok(None, r#ref, "phoenix")
}

/// A V1 frame from the client; `join_ref` is left out when `None`.
pub fn v1(join_ref: Option<&str>, r#ref: Option<&str>, topic: &str, event: &str, payload: &str) -> String {
    let mut s =
        format!(r#"{{"topic":{},"event":{},"payload":{payload},"ref":{}"#, js(Some(topic)), js(Some(event)), js(r#ref));
    if let Some(j) = join_ref {
        s.push_str(&format!(r#","join_ref":{}"#, js(Some(j))));
    }
    s.push('}');
    s
}

/// The exact V1 frame the server must write (`topic, event, payload, ref`; never join_ref).
pub fn v1_out(topic: &str, event: &str, payload: &str, r#ref: Option<&str>) -> String {
    format!(r#"{{"topic":{},"event":{},"payload":{payload},"ref":{}}}"#, js(Some(topic)), js(Some(event)), js(r#ref))
}

pub fn v1_reply(topic: &str, r#ref: &str, status: &str, response: &str) -> String {
    v1_out(topic, "phx_reply", &format!(r#"{{"status":"{status}","response":{response}}}"#), Some(r#ref))
}

#[track_caller]
pub fn parse(text: &str) -> Value {
    sonic_rs::from_str(text).unwrap_or_else(|e| panic!("server sent invalid JSON {text:?}: {e}"))
}

/// The event of a V2 array or V1 object frame, if it has one.
pub fn event_of(text: &str) -> Option<String> {
    let v: Value = sonic_rs::from_str(text).ok()?;
    let event = if v.is_array() { v.get(3)?.as_str()?.to_string() } else { v.get("event")?.as_str()?.to_string() };
    Some(event)
}

/// Presence frames follow every join and change; tests of other behaviour skip them.
pub fn is_presence(text: &str) -> bool {
    matches!(event_of(text).as_deref(), Some("presence_state" | "presence_diff"))
}

/// Checks a `new_msg` payload's generated fields and returns `(id, inserted_at)`.
#[track_caller]
pub fn check_generated_fields(payload: &Value) -> (String, String) {
    let id = payload
        .get("id")
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("new_msg payload without string id: {payload:?}"))
        .to_string();
    let parsed = uuid::Uuid::parse_str(&id).unwrap_or_else(|e| panic!("id {id:?} is not a UUID: {e}"));
    assert_eq!(parsed.get_version_num(), 7, "id {id} is not a UUIDv7");
    assert_eq!(parsed.hyphenated().to_string(), id, "id is not canonical lower-case hyphenated");
    let ts = payload
        .get("inserted_at")
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("new_msg payload without inserted_at: {payload:?}"))
        .to_string();
    check_timestamp(&ts);
    (id, ts)
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ`, a real date, within a minute of now.
#[track_caller]
pub fn check_timestamp(ts: &str) {
    let b = ts.as_bytes();
    let shape_ok = b.len() == 27
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            26 => *c == b'Z',
            _ => c.is_ascii_digit(),
        });
    assert!(shape_ok, "inserted_at {ts:?} is not YYYY-MM-DDTHH:MM:SS.ffffffZ");
    let parsed = chrono::NaiveDateTime::parse_from_str(&ts[..26], "%Y-%m-%dT%H:%M:%S%.f")
        .unwrap_or_else(|e| panic!("inserted_at {ts:?} is not a valid time: {e}"));
    let now = chrono::Utc::now().naive_utc();
    let skew = (now - parsed).num_seconds().abs();
    assert!(skew < 60, "inserted_at {ts} is {skew}s away from now");
}

// ---------------------------------------------------------------------------------------------
// WebSocket client (tungstenite)
// ---------------------------------------------------------------------------------------------

/// Why a WebSocket connection attempt failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The server answered with this HTTP status instead of 101.
    Status(u16),
    Other(String),
}

/// A Phoenix client over tungstenite. `skip_presence` (on by default) makes the receive helpers
/// skip `presence_state`/`presence_diff` frames, which follow joins and are not what most
/// tests are about.
pub struct Client {
    ws: WebSocket<TcpStream>,
    pub response: Response,
    pub skip_presence: bool,
}

pub fn ws_uri(port: u16, query: &str) -> String {
    if query.is_empty() {
        format!("ws://127.0.0.1:{port}/socket/websocket")
    } else {
        format!("ws://127.0.0.1:{port}/socket/websocket?{query}")
    }
}

fn tcp_connect(port: u16) -> TcpStream {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream.set_nodelay(true).expect("nodelay");
    stream.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    stream.set_write_timeout(Some(TIMEOUT)).expect("write timeout");
    stream
}

/// Opens `/socket/websocket?<query>` with extra headers and offered subprotocols.
pub fn try_connect(
    port: u16,
    query: &str,
    headers: &[(&str, &str)],
    protocols: &[&str],
) -> Result<Client, ConnectError> {
    let uri: Uri = ws_uri(port, query).parse().map_err(|e| ConnectError::Other(format!("bad uri: {e}")))?;
    let mut builder = ClientRequestBuilder::new(uri);
    for (k, v) in headers {
        builder = builder.with_header(*k, *v);
    }
    for p in protocols {
        builder = builder.with_sub_protocol(*p);
    }
    let request = builder.into_client_request().map_err(|e| ConnectError::Other(format!("request: {e}")))?;
    let stream = tcp_connect(port);
    match tungstenite::client(request, stream) {
        Ok((ws, response)) => Ok(Client { ws, response, skip_presence: true }),
        Err(HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            Err(ConnectError::Status(resp.status().as_u16()))
        }
        Err(HandshakeError::Failure(e)) => Err(ConnectError::Other(e.to_string())),
        Err(HandshakeError::Interrupted(_)) => Err(ConnectError::Other("handshake timed out".to_string())),
    }
}

/// Connects or panics.
#[track_caller]
pub fn connect(port: u16, query: &str) -> Client {
    try_connect(port, query, &[], &[]).unwrap_or_else(|e| panic!("connect ?{query} failed: {e:?}"))
}

/// A V2 client authenticated as `sub`.
#[track_caller]
pub fn connect_v2(port: u16, sub: &str) -> Client {
    connect(port, &format!("vsn=2.0.0&token={}", token(sub)))
}

/// A V1 client authenticated as `sub`.
#[track_caller]
pub fn connect_v1(port: u16, sub: &str) -> Client {
    connect(port, &format!("vsn=1.0.0&token={}", token(sub)))
}

impl Client {
    #[track_caller]
    pub fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).unwrap_or_else(|e| panic!("send {text:?}: {e}"));
    }

    #[track_caller]
    pub fn send_binary(&mut self, bytes: &[u8]) {
        self.ws.send(Message::binary(bytes.to_vec())).unwrap_or_else(|e| panic!("send binary: {e}"));
    }

    /// The next WebSocket message of any kind, or an error string (timeout, closed, ...).
    pub fn try_recv_message(&mut self, timeout: Duration) -> Result<Message, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(format!("timeout after {timeout:?}"));
            }
            self.ws.get_mut().set_read_timeout(Some(remaining)).map_err(|e| e.to_string())?;
            match self.ws.read() {
                Ok(message) => return Ok(message),
                Err(tungstenite::Error::Io(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// The next text frame (ping/pong and, if `skip_presence`, presence frames skipped).
    pub fn try_recv_text(&mut self, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.try_recv_message(remaining)? {
                Message::Text(text) => {
                    let text = text.as_str().to_string();
                    if self.skip_presence && is_presence(&text) {
                        continue;
                    }
                    return Ok(text);
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => return Err(format!("expected a text frame, got {other:?}")),
            }
        }
    }

    #[track_caller]
    pub fn recv_text(&mut self, timeout: Duration) -> String {
        self.try_recv_text(timeout).unwrap_or_else(|e| panic!("waiting for a text frame: {e}"))
    }

    /// The next text frame within [`TIMEOUT`].
    #[track_caller]
    pub fn recv(&mut self) -> String {
        self.recv_text(TIMEOUT)
    }

    /// Reads text frames until one satisfies `pred` and returns it; the others are dropped.
    #[track_caller]
    pub fn recv_until(&mut self, timeout: Duration, mut pred: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.try_recv_text(remaining) {
                Ok(text) if pred(&text) => return text,
                Ok(text) => seen.push(text),
                Err(e) => panic!("no matching frame ({e}); skipped frames: {seen:#?}"),
            }
        }
    }

    /// Asserts that the next text frame is exactly `expected`.
    #[track_caller]
    pub fn expect(&mut self, expected: &str) {
        match self.try_recv_text(TIMEOUT) {
            Ok(got) => assert_eq!(got, expected, "unexpected frame"),
            Err(e) => panic!("waiting for {expected}: {e}"),
        }
    }

    /// Sends `frame` and asserts the next text frame is exactly `expected`.
    #[track_caller]
    pub fn roundtrip(&mut self, frame: &str, expected: &str) {
        self.send_text(frame);
        self.expect(expected);
    }

    /// V2 heartbeat with `ref`, asserting the exact reply is the next frame.
    #[track_caller]
    pub fn heartbeat(&mut self, r#ref: &str) {
        self.roundtrip(&heartbeat(r#ref), &heartbeat_reply(r#ref));
    }

    /// V2 join with `join_ref == ref`, asserting the exact ok reply is the next frame.
    #[track_caller]
    pub fn join(&mut self, topic: &str, join_ref: &str) {
        self.roundtrip(
            &v2(Some(join_ref), Some(join_ref), topic, "phx_join", "{}"),
            &v2_ok(Some(join_ref), join_ref, topic),
        );
    }

    /// V2 join with this payload, asserting the exact ok reply is the next frame.
    #[track_caller]
    pub fn join_with_payload(&mut self, topic: &str, join_ref: &str, payload: &str) {
        self.roundtrip(
            &v2(Some(join_ref), Some(join_ref), topic, "phx_join", payload),
            &v2_ok(Some(join_ref), join_ref, topic),
        );
    }

    /// V1 join (join_ref sent), asserting the exact V1 ok reply.
    #[track_caller]
    pub fn join_v1(&mut self, topic: &str, join_ref: &str) {
        self.roundtrip(
            &v1(Some(join_ref), Some(join_ref), topic, "phx_join", "{}"),
            &v1_reply(topic, join_ref, "ok", "{}"),
        );
    }

    /// Waits for the server's close frame (skipping text and control frames) and returns its
    /// code (None for a close without a code).
    #[track_caller]
    pub fn expect_close(&mut self, timeout: Duration) -> Option<u16> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.try_recv_message(remaining) {
                Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(e) => panic!("waiting for a close frame: {e}"),
            }
        }
    }

    /// Starts the close handshake (code 1001, as a browser leaving the page) and returns the
    /// code of the server's echo.
    #[track_caller]
    pub fn close_handshake(&mut self) -> Option<u16> {
        let frame = tungstenite::protocol::CloseFrame {
            code: tungstenite::protocol::frame::coding::CloseCode::Away,
            reason: "".into(),
        };
        self.ws.close(Some(frame)).unwrap_or_else(|e| panic!("send close: {e}"));
        self.expect_close(TIMEOUT)
    }

    /// The value of a response header of the handshake.
    pub fn response_header(&self, name: &str) -> Option<String> {
        self.response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
    }

    /// The underlying TCP stream (e.g. to shut it down without a close frame).
    pub fn tcp(&self) -> &TcpStream {
        self.ws.get_ref()
    }

    /// Drops the connection without a close frame, with a TCP reset (`SO_LINGER` 0): the
    /// peer vanished.
    pub fn abort(self) {
        let fd = std::os::fd::AsRawFd::as_raw_fd(self.ws.get_ref());
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY: a valid socket descriptor we own and a correctly sized `linger` value.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
        drop(self);
    }
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP
// ---------------------------------------------------------------------------------------------

/// A parsed HTTP response plus the still-open stream.
pub struct HttpResponse {
    pub status_line: String,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Bytes read past the head and body (e.g. WebSocket frames after a 101).
    pub rest: Vec<u8>,
    pub stream: TcpStream,
    /// The server already closed the connection while we read the body.
    pub eof: bool,
}

impl HttpResponse {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts that the server closes the connection (read returns 0 or a reset) within
    /// [`TIMEOUT`] and sends nothing more.
    #[track_caller]
    pub fn assert_server_closes(&mut self) {
        if self.eof {
            return;
        }
        assert!(self.rest.is_empty(), "unexpected bytes after the response: {:?}", String::from_utf8_lossy(&self.rest));
        expect_eof(&mut self.stream, TIMEOUT);
        self.eof = true;
    }

    /// Asserts an error response: the status, a matching content-length, `connection: close`
    /// and that the server closes the connection.
    #[track_caller]
    pub fn assert_error(&mut self, status: u16) {
        assert_eq!(self.status, status, "status line {:?}, body {:?}", self.status_line, self.body_text());
        assert!(self.status_line.starts_with("HTTP/1.1 "), "status line {:?}", self.status_line);
        assert_eq!(
            self.header("content-length").map(str::trim),
            Some(self.body.len().to_string().as_str()),
            "content-length must match the body; headers {:?}",
            self.headers
        );
        assert_eq!(
            self.header("connection").map(|v| v.trim().to_ascii_lowercase()),
            Some("close".to_string()),
            "headers {:?}",
            self.headers
        );
        self.assert_server_closes();
    }
}

/// Reads until EOF or reset; fails on data or on timeout.
#[track_caller]
pub fn expect_eof(stream: &mut TcpStream, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        assert!(!remaining.is_zero(), "server did not close the connection within {timeout:?}");
        stream.set_read_timeout(Some(remaining)).expect("timeout");
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                panic!("expected the server to close, got {n} more bytes: {:?}", String::from_utf8_lossy(&buf[..n]))
            }
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => return,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => panic!("read while waiting for close: {e}"),
        }
    }
}

/// Writes everything, ignoring errors: the server may close (and reset) before it has read
/// all of a request it refuses, and the test is about its answer.
pub fn write_lenient(stream: &mut TcpStream, bytes: &[u8]) {
    let _ = stream.write_all(bytes);
    let _ = stream.flush();
}

/// Reads one more chunk into `buf`; `Ok(false)` on EOF/reset.
fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, deadline: Instant) -> Result<bool, String> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err("timeout".to_string());
        }
        stream.set_read_timeout(Some(remaining)).map_err(|e| e.to_string())?;
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(true);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => {
                return Ok(false)
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads an HTTP response from `stream`. The body is `content-length` bytes if given, empty
/// for a 101, else everything up to EOF.
#[track_caller]
pub fn read_response(mut stream: TcpStream) -> HttpResponse {
    let deadline = Instant::now() + TIMEOUT;
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        match fill(&mut stream, &mut buf, deadline) {
            Ok(true) => {}
            Ok(false) => {
                panic!("connection closed before a full response head; got {:?}", String::from_utf8_lossy(&buf))
            }
            Err(e) => panic!("reading response head: {e}; got {:?}", String::from_utf8_lossy(&buf)),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default().to_string();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap_or_else(|| panic!("bad header line {l:?}"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let mut rest = buf[head_end + 4..].to_vec();
    let content_length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse::<usize>().unwrap_or_else(|_| panic!("bad content-length {v:?}")));
    let mut eof = false;
    let body = match (content_length, status) {
        (Some(n), _) => {
            while rest.len() < n {
                match fill(&mut stream, &mut rest, deadline) {
                    Ok(true) => {}
                    Ok(false) => panic!("closed after {} of {n} body bytes", rest.len()),
                    Err(e) => panic!("reading body: {e}"),
                }
            }
            rest.drain(..n).collect()
        }
        (None, 101) => Vec::new(),
        (None, _) => {
            loop {
                match fill(&mut stream, &mut rest, deadline) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => panic!("reading body up to EOF: {e}"),
                }
            }
            eof = true;
            std::mem::take(&mut rest)
        }
    };
    HttpResponse { status_line, status, headers, body, rest, stream, eof }
}

/// Sends `request` as is (one write) and reads the response.
#[track_caller]
pub fn http_raw(port: u16, request: &[u8]) -> HttpResponse {
    let mut stream = tcp_connect(port);
    write_lenient(&mut stream, request);
    read_response(stream)
}

/// A complete, valid WebSocket upgrade request for `/socket/websocket?<query>` plus
/// `extra` header lines (each without CRLF).
pub fn upgrade_request(port: u16, query: &str, extra: &[&str]) -> String {
    upgrade_request_with(port, "GET", "/socket/websocket", query, extra)
}

pub fn upgrade_request_with(port: u16, method: &str, path: &str, query: &str, extra: &[&str]) -> String {
    let target = if query.is_empty() { path.to_string() } else { format!("{path}?{query}") };
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for line in extra {
        req.push_str(line);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req
}

/// The query string of a V2 connection for a fresh user.
pub fn v2_query() -> String {
    format!("vsn=2.0.0&token={}", token(&new_sub()))
}

// ---------------------------------------------------------------------------------------------
// Raw WebSocket frames
// ---------------------------------------------------------------------------------------------

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The mask every raw client frame uses unless a test says otherwise.
pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// One frame as the server sent it (the server must never mask).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn text(&self) -> String {
        assert_eq!(self.opcode, OP_TEXT, "not a text frame: {self:?}");
        String::from_utf8(self.payload.clone()).expect("server text frame is valid UTF-8")
    }

    /// `(code, reason)` of a close frame.
    pub fn close_code(&self) -> (Option<u16>, String) {
        assert_eq!(self.opcode, OP_CLOSE, "not a close frame: {self:?}");
        if self.payload.len() < 2 {
            assert!(self.payload.is_empty(), "close payload of 1 byte");
            return (None, String::new());
        }
        let code = u16::from_be_bytes([self.payload[0], self.payload[1]]);
        let reason = String::from_utf8(self.payload[2..].to_vec()).expect("close reason UTF-8");
        (Some(code), reason)
    }
}

/// Encodes a client frame. `rsv` is the 3 RSV bits (0..=7); `mask: None` sends it unmasked.
pub fn encode_frame(fin: bool, rsv: u8, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(((fin as u8) << 7) | ((rsv & 0x7) << 4) | (opcode & 0xF));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let len = payload.len();
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    match mask {
        Some(m) => {
            out.extend_from_slice(&m);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A masked, final client frame.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    encode_frame(true, 0, opcode, Some(MASK), payload)
}

/// A close frame payload: code + reason.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

/// A WebSocket connection driven byte by byte: the handshake and every frame are built here,
/// and server frames are parsed strictly.
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
    pub handshake: HttpResponse,
}

impl RawWs {
    /// Connects with a fresh V2 user.
    #[track_caller]
    pub fn connect(port: u16) -> RawWs {
        RawWs::connect_query(port, &v2_query())
    }

    /// Sends a valid upgrade request and asserts the exact 101 answer.
    #[track_caller]
    pub fn connect_query(port: u16, query: &str) -> RawWs {
        let request = upgrade_request(port, query, &[]);
        let response = http_raw(port, request.as_bytes());
        RawWs::from_response(response)
    }

    /// Checks a 101 answer (status line, Upgrade, Connection, Sec-WebSocket-Accept) and wraps
    /// its stream.
    #[track_caller]
    pub fn from_response(response: HttpResponse) -> RawWs {
        assert_eq!(response.status, 101, "handshake refused: {:?} {:?}", response.status_line, response.body_text());
        assert_eq!(response.status_line, "HTTP/1.1 101 Switching Protocols");
        assert_eq!(response.header("upgrade").map(|v| v.to_ascii_lowercase()), Some("websocket".to_string()));
        assert_eq!(response.header("connection").map(|v| v.to_ascii_lowercase()), Some("upgrade".to_string()));
        assert_eq!(response.header("sec-websocket-accept"), Some(WS_ACCEPT));
        let stream = response.stream.try_clone().expect("clone stream");
        let buf = response.rest.clone();
        RawWs { stream, buf, handshake: response }
    }

    /// Writes raw bytes, ignoring errors (see [`write_lenient`]).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        write_lenient(&mut self.stream, bytes);
    }

    /// Sends a masked, final frame.
    pub fn send(&mut self, opcode: u8, payload: &[u8]) {
        self.send_raw(&client_frame(opcode, payload));
    }

    #[track_caller]
    pub fn send_text(&mut self, text: &str) {
        self.send(OP_TEXT, text.as_bytes());
    }

    /// The next frame, `Ok(None)` on EOF, `Err` on timeout. Panics on a malformed or masked
    /// server frame.
    pub fn try_read_frame(&mut self, timeout: Duration) -> Result<Option<Frame>, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Ok(Some(frame));
            }
            match fill(&mut self.stream, &mut self.buf, deadline) {
                Ok(true) => {}
                Ok(false) => {
                    assert!(self.buf.is_empty(), "connection closed in the middle of a frame: {:?}", self.buf);
                    return Ok(None);
                }
                Err(e) => return Err(format!("{e}; buffered {:?}", self.buf)),
            }
        }
    }

    /// The next frame, `None` on EOF. Panics on timeout.
    #[track_caller]
    pub fn read_frame(&mut self, timeout: Duration) -> Option<Frame> {
        self.try_read_frame(timeout).unwrap_or_else(|e| panic!("waiting for a frame: {e}"))
    }

    /// Asserts the server sends nothing (and keeps the connection) for `period`.
    #[track_caller]
    pub fn expect_silence(&mut self, period: Duration) {
        match self.try_read_frame(period) {
            Err(_) => {}
            Ok(Some(frame)) => panic!("expected silence for {period:?}, got {frame:?}"),
            Ok(None) => panic!("expected silence for {period:?}, the server closed TCP"),
        }
    }

    /// The next frame, which must exist.
    #[track_caller]
    pub fn frame(&mut self) -> Frame {
        self.read_frame(TIMEOUT).expect("server closed the connection instead of sending a frame")
    }

    /// The next frame must be a final, unfragmented text frame; returns its text.
    #[track_caller]
    pub fn recv_text(&mut self) -> String {
        let f = self.frame();
        assert!(f.fin && f.rsv == 0 && f.opcode == OP_TEXT, "expected a text frame: {f:?}");
        f.text()
    }

    #[track_caller]
    pub fn expect_text(&mut self, expected: &str) {
        assert_eq!(self.recv_text(), expected);
    }

    /// The next frame must be a close frame; answers it (RFC 6455 §5.5.1), then asserts the
    /// server closes TCP. Returns the code and reason.
    #[track_caller]
    pub fn expect_close_within(&mut self, timeout: Duration) -> (Option<u16>, String) {
        let frame = self.read_frame(timeout).expect("server closed TCP without a close frame");
        assert!(frame.fin && frame.rsv == 0, "bad close frame {frame:?}");
        let (code, reason) = frame.close_code();
        let echo = match code {
            Some(c) => close_payload(c, ""),
            None => Vec::new(),
        };
        self.send(OP_CLOSE, &echo);
        self.expect_eof();
        (code, reason)
    }

    #[track_caller]
    pub fn expect_close(&mut self) -> (Option<u16>, String) {
        self.expect_close_within(TIMEOUT)
    }

    /// Asserts that the next frame is a close with `code` and the TCP connection then ends.
    #[track_caller]
    pub fn expect_close_code(&mut self, code: u16) {
        let (got, reason) = self.expect_close();
        assert_eq!(got, Some(code), "close code (reason {reason:?})");
    }

    /// Asserts the server closes TCP with no more frames.
    #[track_caller]
    pub fn expect_eof(&mut self) {
        assert!(self.buf.is_empty(), "unexpected bytes before EOF: {:?}", self.buf);
        expect_eof(&mut self.stream, TIMEOUT);
    }

    /// V2 heartbeat round trip over raw frames.
    #[track_caller]
    pub fn heartbeat(&mut self, r#ref: &str) {
        self.send_text(&heartbeat(r#ref));
        self.expect_text(&heartbeat_reply(r#ref));
    }
}

/// Parses one server frame from the front of `buf`; `None` if more bytes are needed.
pub fn parse_server_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let fin = buf[0] & 0x80 != 0;
    let rsv = (buf[0] >> 4) & 0x7;
    let opcode = buf[0] & 0xF;
    assert_eq!(buf[1] & 0x80, 0, "server frames must not be masked: {:?}", &buf[..2]);
    let len7 = (buf[1] & 0x7F) as usize;
    let (len, header) = match len7 {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
            assert!(len >= 126, "non-minimal 16-bit length {len}");
            (len, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            assert!(len > u16::MAX as u64, "non-minimal 64-bit length {len}");
            (len as usize, 10)
        }
        n => (n, 2),
    };
    if buf.len() < header + len {
        return None;
    }
    let frame = Frame { fin, rsv, opcode, payload: buf[header..header + len].to_vec() };
    Some((frame, header + len))
}

// ---------------------------------------------------------------------------------------------
// Persistence: process control, the database file, chat messages, the history API
// ---------------------------------------------------------------------------------------------

impl Server {
    /// The server's private data directory (removed when the `Server` is dropped).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The private database [`start_server`] gives it (not the file in use when the caller
    /// overrode `DATABASE_PATH`).
    pub fn db_path(&self) -> PathBuf {
        self.dir.join("nexus.db")
    }

    /// Every stored message, whichever backend holds it (SQLite: in commit order; PostgreSQL:
    /// by conversation, then its `seq`).
    pub fn stored_rows(&self) -> Vec<DbRow> {
        match &self.pg_url {
            Some(url) => pg::rows(url),
            None => db_rows(&self.sqlite_path),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`, `libc::SIGKILL`) to the running server process.
    #[track_caller]
    pub fn signal(&mut self, sig: libc::c_int) {
        let exited = self.child.try_wait().expect("try_wait");
        assert!(exited.is_none(), "nexus already exited ({exited:?}); stderr:\n{}", self.logs());
        // SAFETY: kill(2) of the child this test spawned, still unreaped (checked above), so
        // its pid cannot have been reused.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({}, {sig}): {}", self.child.id(), std::io::Error::last_os_error());
    }

    /// Waits for the process to exit, then for its stderr to be read to the end (so
    /// [`Server::logs`] holds every line it wrote); panics (with the logs) if it is still
    /// running after `timeout`.
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let status = match wait_child(&mut self.child, timeout) {
            Some(status) => status,
            None => panic!("nexus did not exit within {timeout:?}; stderr:\n{}", self.logs()),
        };
        let drained = self.log.wait(TIMEOUT, |_, eof| eof);
        assert!(drained, "stderr of the exited nexus still open after {TIMEOUT:?}");
        status
    }
}

/// Waits up to `timeout` for `child` to exit and reaps it; `None` if it is still running.
/// Waits on a pidfd (Linux ≥ 5.3), so no polling and no sleeping.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    if let Some(status) = child.try_wait().expect("try_wait") {
        return Some(status);
    }
    // SAFETY: pidfd_open(2) on our own unreaped child; the fd is closed below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) } as libc::c_int;
    assert!(fd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
    let deadline = Instant::now() + timeout;
    let exited = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, remaining.as_millis().min(i32::MAX as u128) as libc::c_int) };
        if n > 0 {
            break true;
        }
        if n == 0 {
            break false;
        }
        let err = std::io::Error::last_os_error();
        assert_eq!(err.kind(), ErrorKind::Interrupted, "poll(pidfd): {err}");
    };
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    if exited {
        Some(child.wait().expect("wait for nexus"))
    } else {
        None
    }
}

/// Runs `cmd` (stdin null, stdout discarded, stderr captured) to completion. Kills it and
/// panics if it has not exited within `timeout`. Returns the status and stderr (ANSI stripped).
#[track_caller]
pub fn run_to_exit(mut cmd: Command, timeout: Duration) -> (std::process::ExitStatus, String) {
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn nexus");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stderr.read_to_end(&mut out);
        let _ = tx.send(out);
    });
    let Some(status) = wait_child(&mut child, timeout) else {
        let _ = child.kill();
        let _ = child.wait();
        let err = rx.recv_timeout(TIMEOUT).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        panic!("nexus did not exit within {timeout:?}; stderr:\n{err}");
    };
    // The pipe closes when the process (and any child holding it) is gone.
    let err = rx.recv_timeout(TIMEOUT).expect("stderr of the exited process");
    (status, strip_ansi(&String::from_utf8_lossy(&err)))
}

/// One row of the database (`messages` or `recent`), ids as canonical UUID strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbRow {
    /// Position in commit order (1-based).
    pub seq: i64,
    pub id: String,
    pub conversation: String,
    pub sender: String,
    pub body: String,
    pub inserted_at_us: i64,
}

/// Every stored message, from both tables, in `seq` (commit) order, read in one statement
/// (one snapshot) over a read-only connection. Works while the server runs (WAL).
#[track_caller]
pub fn db_rows(path: &std::path::Path) -> Vec<DbRow> {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = rusqlite::Connection::open_with_flags(path, flags)
        .unwrap_or_else(|e| panic!("open {} read-only: {e}", path.display()));
    conn.busy_timeout(TIMEOUT).expect("busy_timeout");
    let mut stmt = conn
        .prepare(
            // A row sits in both tables for a while after it is merged: UNION keeps one.
            // Ids are UUIDv7 in commit order, so id order is commit order.
            "SELECT id, conversation_id, sender_id, body, inserted_at FROM messages
             UNION
             SELECT id, conversation_id, sender_id, body, inserted_at FROM recent
             ORDER BY id",
        )
        .unwrap_or_else(|e| panic!("query {}: {e}", path.display()));
    let uuid = |b: Vec<u8>| uuid::Uuid::from_slice(&b).expect("16-byte id").hyphenated().to_string();
    let rows = stmt
        .query_map([], |r| {
            Ok(DbRow {
                seq: 0,
                id: uuid(r.get(0)?),
                conversation: uuid(r.get(1)?),
                sender: uuid(r.get(2)?),
                body: r.get(3)?,
                inserted_at_us: r.get(4)?,
            })
        })
        .expect("query rows");
    let mut rows = rows.collect::<Result<Vec<_>, _>>().expect("read rows");
    for (i, row) in rows.iter_mut().enumerate() {
        row.seq = i as i64 + 1; // commit position
    }
    rows
}

/// The rows of one conversation (`<uuid>` of `chat:<uuid>`), in commit order.
#[track_caller]
pub fn db_conversation(path: &std::path::Path, conversation: &str) -> Vec<DbRow> {
    db_rows(path).into_iter().filter(|r| r.conversation == conversation).collect()
}

/// Microseconds since the epoch as the wire format `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
pub fn format_micros(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .expect("timestamp in range")
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

/// The conversation id of a `chat:<uuid>` topic.
pub fn conversation_of(topic: &str) -> &str {
    topic.strip_prefix("chat:").expect("chat:<uuid> topic")
}

/// A V2 `new_msg` push `[join_ref, ref, topic, "new_msg", {"body": body}]`.
pub fn new_msg_push(join_ref: &str, r#ref: &str, topic: &str, body: &str) -> String {
    v2(Some(join_ref), Some(r#ref), topic, "new_msg", &format!(r#"{{"body":{}}}"#, js(Some(body))))
}

/// The exact `Failed to save` reply with a `detail`.
pub fn failed_to_save(join_ref: &str, r#ref: &str, topic: &str, detail: &str) -> String {
    v2_reply(
        Some(join_ref),
        Some(r#ref),
        topic,
        "error",
        &format!(r#"{{"reason":"Failed to save","detail":{}}}"#, js(Some(detail))),
    )
}

/// A `new_msg` broadcast as a member saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    pub id: String,
    pub sender: String,
    pub text: String,
    pub inserted_at: String,
    /// The whole payload, for comparison with history.
    pub payload: Value,
}

/// Parses `frame` as a `new_msg` broadcast on `topic` (null refs, generated fields checked).
#[track_caller]
pub fn parse_live(frame: &str, topic: &str) -> Live {
    let v = parse(frame);
    assert!(v[0].is_null() && v[1].is_null(), "broadcast refs must be null: {frame}");
    assert_eq!(v[2].as_str(), Some(topic), "{frame}");
    assert_eq!(v[3].as_str(), Some("new_msg"), "{frame}");
    let (id, inserted_at) = check_generated_fields(&v[4]);
    let sender = v[4]["sender_id"].as_str().unwrap_or_else(|| panic!("no sender_id: {frame}")).to_string();
    let text = v[4]["content"]["text"].as_str().unwrap_or_else(|| panic!("no content.text: {frame}")).to_string();
    Live { id, sender, text, inserted_at, payload: v[4].clone() }
}

/// `true` if `frame` is a `new_msg` broadcast.
pub fn is_new_msg(frame: &str) -> bool {
    event_of(frame).as_deref() == Some("new_msg")
}

impl Client {
    /// Sends a text frame; an error (the server is gone) is returned instead of panicking.
    pub fn try_send_text(&mut self, text: &str) -> Result<(), String> {
        self.ws.send(Message::text(text)).map_err(|e| e.to_string())
    }
}

/// `GET <target>` with an optional `Authorization` header value; the server answers and
/// closes.
#[track_caller]
pub fn http_get(port: u16, target: &str, authorization: Option<&str>) -> HttpResponse {
    http_request(port, "GET", target, authorization)
}

#[track_caller]
pub fn http_request(port: u16, method: &str, target: &str, authorization: Option<&str>) -> HttpResponse {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n");
    if let Some(auth) = authorization {
        req.push_str(&format!("Authorization: {auth}\r\n"));
    }
    if method != "GET" && method != "HEAD" {
        req.push_str("Content-Length: 0\r\n");
    }
    req.push_str("\r\n");
    http_raw(port, req.as_bytes())
}

/// The history path of a conversation with a query string (may be empty).
pub fn history_target(conversation: &str, query: &str) -> String {
    if query.is_empty() {
        format!("/api/conversations/{conversation}/messages")
    } else {
        format!("/api/conversations/{conversation}/messages?{query}")
    }
}

/// One history page read as user `sub`: asserts 200, `application/json`, `connection: close`
/// and that the server closes; returns `(messages, next_before)`.
#[track_caller]
pub fn history_page(port: u16, sub: &str, conversation: &str, query: &str) -> (Vec<Value>, Option<String>) {
    use sonic_rs::JsonContainerTrait as _;
    let auth = format!("Bearer {}", token(sub));
    let mut resp = http_get(port, &history_target(conversation, query), Some(&auth));
    assert_eq!(resp.status, 200, "history ?{query}: {:?} {:?}", resp.status_line, resp.body_text());
    assert_eq!(resp.header("content-type"), Some("application/json"), "headers {:?}", resp.headers);
    assert_eq!(
        resp.header("content-length").map(str::trim),
        Some(resp.body.len().to_string().as_str()),
        "content-length must match the body"
    );
    assert_eq!(resp.header("connection").map(|v| v.to_ascii_lowercase()), Some("close".to_string()));
    resp.assert_server_closes();
    let body = parse(&resp.body_text());
    assert_eq!(body.as_object().map(|o| o.len()), Some(2), "exactly messages and next_before: {}", resp.body_text());
    let messages = body["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("messages is not an array: {}", resp.body_text()))
        .iter()
        .cloned()
        .collect::<Vec<Value>>();
    let next = &body["next_before"];
    let next_before = if next.is_null() {
        assert!(body.get("next_before").is_some(), "next_before missing: {}", resp.body_text());
        None
    } else {
        Some(next.as_str().unwrap_or_else(|| panic!("next_before is not a string: {}", resp.body_text())).to_string())
    };
    (messages, next_before)
}

/// The whole history of a conversation, oldest first, following `next_before` with pages of
/// `limit`.
#[track_caller]
pub fn full_history(port: u16, sub: &str, conversation: &str, limit: usize) -> Vec<Value> {
    let mut pages: Vec<Vec<Value>> = Vec::new();
    let mut before: Option<String> = None;
    for _ in 0..10_000 {
        let query = match &before {
            Some(b) => format!("limit={limit}&before={b}"),
            None => format!("limit={limit}"),
        };
        let (messages, next) = history_page(port, sub, conversation, &query);
        assert!(messages.len() <= limit, "page larger than limit {limit}");
        if next.is_some() {
            assert_eq!(messages.len(), limit, "a page with older messages after it must be full");
            assert_eq!(next.as_deref(), messages[0]["id"].as_str(), "next_before is the oldest id of the page");
        }
        pages.push(messages);
        match next {
            Some(n) => before = Some(n),
            None => return pages.into_iter().rev().flatten().collect(),
        }
    }
    panic!("history of {conversation} did not end");
}

/// Sends `bodies` as `new_msg` pushes (refs `m0`, `m1`, …), pipelined, on a socket that joined
/// `topic` with `join_ref`, and waits for every acknowledgement. Each ack must be ok, in send
/// order, and come after the sender's own broadcast of that message. Returns every broadcast
/// the socket saw up to the last ack, in order.
#[track_caller]
pub fn send_all(c: &mut Client, join_ref: &str, topic: &str, bodies: &[String]) -> Vec<Live> {
    for (k, body) in bodies.iter().enumerate() {
        c.send_text(&new_msg_push(join_ref, &format!("m{k}"), topic, body));
    }
    let mut seen: Vec<Live> = Vec::new();
    let mut acks = 0;
    while acks < bodies.len() {
        let frame = c.recv_text(TIMEOUT);
        if is_new_msg(&frame) {
            seen.push(parse_live(&frame, topic));
            continue;
        }
        assert_eq!(frame, v2_ok(Some(join_ref), &format!("m{acks}"), topic), "acks must be ok and in send order");
        let own = &bodies[acks];
        assert!(seen.iter().any(|m| &m.text == own), "ack of {own:?} before its broadcast");
        acks += 1;
    }
    seen
}

/// A sender on its own thread: joins `topic` on `port`, then sends `<tag>-0` … `<tag>-<n-1>`
/// one after the other, each after the previous one's ack (a burst paced by round trips);
/// the receiver gets how many are acknowledged so far, after each ack.
pub fn paced_sender(
    port: u16,
    topic: &str,
    n: usize,
    tag: &'static str,
) -> (thread::JoinHandle<()>, mpsc::Receiver<usize>) {
    let (tx, rx) = mpsc::channel();
    let topic = topic.to_string();
    let handle = thread::spawn(move || {
        let mut sender = joined(port, &new_sub(), &topic);
        for k in 0..n {
            let r = format!("m{k}");
            sender.send_text(&new_msg_push("1", &r, &topic, &format!("{tag}-{k}")));
            let quoted = format!("\"{r}\"");
            sender.recv_until(PACED_ACK_TIMEOUT, |t| t.contains(&quoted) && t.contains("phx_reply"));
            let _ = tx.send(k + 1);
        }
    });
    (handle, rx)
}

/// How long [`paced_sender`] waits for one ack (a failure bound; a busy box may be slow).
const PACED_ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// A fresh socket for `sub` that joined `topic` (join_ref `"1"`).
#[track_caller]
pub fn joined(port: u16, sub: &str, topic: &str) -> Client {
    let mut c = connect_v2(port, sub);
    c.join(topic, "1");
    c
}

/// Rows in the `recent` table (committed, not yet moved into `messages`).
#[track_caller]
pub fn db_recent_count(path: &std::path::Path) -> i64 {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = rusqlite::Connection::open_with_flags(path, flags)
        .unwrap_or_else(|e| panic!("open {} read-only: {e}", path.display()));
    conn.busy_timeout(TIMEOUT).expect("busy_timeout");
    conn.query_row("SELECT count(*) FROM recent", [], |r| r.get(0)).expect("count recent")
}

/// Waits until `done()` holds, re-checking each time a file in `dir` (the database, its WAL)
/// is written: an inotify watch, no polling on a timer. Panics after `timeout`.
#[track_caller]
pub fn wait_for_files(dir: &std::path::Path, timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    use std::os::unix::ffi::OsStrExt as _;
    // SAFETY: inotify_init1 returns a new fd (closed below) or -1.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    assert!(fd >= 0, "inotify_init1: {}", std::io::Error::last_os_error());
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).expect("path without NUL");
    let mask = libc::IN_MODIFY | libc::IN_CREATE | libc::IN_DELETE | libc::IN_MOVED_TO;
    // SAFETY: valid fd and NUL-terminated path.
    let wd = unsafe { libc::inotify_add_watch(fd, path.as_ptr(), mask) };
    assert!(wd >= 0, "inotify_add_watch {}: {}", dir.display(), std::io::Error::last_os_error());
    let deadline = Instant::now() + timeout;
    let mut events = [0u8; 4096];
    let mut check = true;
    let result = loop {
        // The watch exists before each check, so a write after the check wakes the poll.
        if check && done() {
            break Ok(());
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            break Err(format!("{what}: not done within {timeout:?}"));
        }
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, remaining.as_millis().clamp(1, i32::MAX as u128) as libc::c_int) };
        if n < 0 && std::io::Error::last_os_error().kind() != ErrorKind::Interrupted {
            break Err(format!("poll(inotify): {}", std::io::Error::last_os_error()));
        }
        // Re-check only for changes of the database or its WAL, not of the `-shm` index our
        // own read-only checks touch.
        check = false;
        loop {
            // SAFETY: reading into a local buffer of the given length (non-blocking fd).
            let got = unsafe { libc::read(fd, events.as_mut_ptr().cast(), events.len()) };
            if got <= 0 {
                break;
            }
            let mut at = 0usize;
            while at + 16 <= got as usize {
                let len = u32::from_ne_bytes(events[at + 12..at + 16].try_into().expect("4 bytes")) as usize;
                let name = &events[at + 16..(at + 16 + len).min(got as usize)];
                let name = name.split(|b| *b == 0).next().unwrap_or_default();
                if !name.ends_with(b"-shm") {
                    check = true;
                }
                at += 16 + len;
            }
        }
    };
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// How a [`stream_messages`] sender ended.
#[derive(Debug)]
pub struct Streamed {
    /// Messages written to the socket (`m-0` … `m-<sent-1>`).
    pub sent: usize,
    /// Indexes of the messages acknowledged ok, in the order the acks came (must be increasing).
    pub acked: Vec<usize>,
    /// Indexes of the messages answered `Failed to save`, with the detail.
    pub refused: Vec<(usize, String)>,
    /// Why it stopped: `"done"`, `"deadline"`, or the send/receive error.
    pub end: String,
}

/// Streams `new_msg` pushes with bodies `m-0`, `m-1`, … (refs `m0`, `m1`, …) on `topic` from
/// `c` (joined with join_ref `"1"`), keeping up to `window` unanswered, until the connection
/// fails, `max` are answered, or `run_for` has passed. Every reply must be an ok ack or a
/// `Failed to save` error of an outstanding message; ok acks must come in send order;
/// broadcasts are skipped. Stops sending after the first refusal. Sends `()` on `reached` once
/// `notify_after` messages are acknowledged.
pub fn stream_messages(
    c: &mut Client,
    topic: &str,
    window: usize,
    max: usize,
    notify_after: usize,
    reached: mpsc::Sender<()>,
    run_for: Duration,
) -> Streamed {
    let deadline = Instant::now() + run_for;
    let mut out = Streamed { sent: 0, acked: Vec::new(), refused: Vec::new(), end: String::new() };
    let answered = |o: &Streamed| o.acked.len() + o.refused.len();
    out.end = 'outer: loop {
        while out.sent < max && out.sent - answered(&out) < window && out.refused.is_empty() {
            let n = out.sent;
            if let Err(e) = c.try_send_text(&new_msg_push("1", &format!("m{n}"), topic, &format!("m-{n}"))) {
                break 'outer format!("send: {e}");
            }
            out.sent += 1;
        }
        if answered(&out) == out.sent && (out.sent == max || !out.refused.is_empty()) {
            break "done".to_string();
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            break "deadline".to_string();
        }
        let frame = match c.try_recv_text(remaining) {
            Err(e) => break format!("receive: {e}"),
            Ok(frame) if is_new_msg(&frame) => continue,
            Ok(frame) => frame,
        };
        let v = parse(&frame);
        let n = v[1]
            .as_str()
            .and_then(|r| r.strip_prefix('m'))
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("unexpected frame {frame}"));
        assert!(n < out.sent, "reply to a message not sent: {frame}");
        let done_before = out.acked.contains(&n) || out.refused.iter().any(|(k, _)| *k == n);
        assert!(!done_before, "second reply for m{n}: {frame}");
        if frame == v2_ok(Some("1"), &format!("m{n}"), topic) {
            if let Some(last) = out.acked.last() {
                assert!(*last < n, "ok acks out of send order: m{last} then m{n}");
            }
            out.acked.push(n);
            if out.acked.len() == notify_after {
                let _ = reached.send(());
            }
        } else {
            let detail = v[4]["response"]["detail"].as_str().unwrap_or_default().to_string();
            assert_eq!(frame, failed_to_save("1", &format!("m{n}"), topic, &detail), "not an ack nor Failed to save");
            out.refused.push((n, detail));
        }
    };
    out
}

/// Checks a sender's stored bodies (in commit order) against what it streamed: exactly
/// `m-0 … m-<k-1>` for some `k <= sent` — in send order, without a hole — containing every
/// acknowledged message and no refused one. Returns `k`.
#[track_caller]
pub fn check_stored_prefix(who: &str, stored: &[&str], s: &Streamed) -> usize {
    let k = stored.len();
    let expected: Vec<String> = (0..k).map(|n| format!("m-{n}")).collect();
    assert_eq!(stored, expected, "{who}: stored messages must be m-0.. in send order without holes ({s:?})");
    assert!(k <= s.sent, "{who}: {k} stored but only {} sent ({s:?})", s.sent);
    if let Some(last) = s.acked.last() {
        assert!(*last < k, "{who}: m-{last} was acknowledged but only m-0..m-{k} are stored ({s:?})");
    }
    for (n, detail) in &s.refused {
        assert!(*n >= k, "{who}: m-{n} was refused ({detail}) but is stored ({s:?})");
    }
    k
}

impl Client {
    /// Asserts the server sends no text frame (presence skipped per `skip_presence`) and
    /// keeps the connection for `period`.
    #[track_caller]
    pub fn expect_silence(&mut self, period: Duration) {
        match self.try_recv_text(period) {
            Err(e) if e.starts_with("timeout") => {}
            Err(e) => panic!("expected silence for {period:?}, got {e}"),
            Ok(frame) => panic!("expected silence for {period:?}, got {frame}"),
        }
    }
}

impl Client {
    /// Writes every frame, then flushes once (one or few TCP segments: a burst).
    #[track_caller]
    pub fn send_burst(&mut self, frames: &[String]) {
        for f in frames {
            self.ws.write(Message::text(f.as_str())).unwrap_or_else(|e| panic!("write {f:?}: {e}"));
        }
        self.ws.flush().unwrap_or_else(|e| panic!("flush: {e}"));
    }
}

/// Scrapes `/metrics` until it holds the line `series value` (cores publish their counters
/// on their sweep, so a scrape may lag the other cores by one sweep); panics after
/// [`TIMEOUT`] with the last exposition.
#[track_caller]
pub fn wait_for_metric(port: u16, series: &str, value: u64) {
    let line = format!("{series} {value}\n");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let body = http_get(port, "/metrics", None).body_text();
        if body.contains(&line) {
            return;
        }
        assert!(Instant::now() < deadline, "no {line:?} in /metrics:\n{body}");
        thread::sleep(Duration::from_millis(20));
    }
}
