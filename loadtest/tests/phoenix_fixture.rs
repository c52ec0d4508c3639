//! Every `nexus-load` scenario against a fixture server that answers the way a Phoenix 1.7 chat
//! app does, byte for byte where the load generator reads: Jason's sorted keys (a reply is
//! `{"response":{...},"status":"ok"}`, a broadcast `{"content":{"text":..},"id":..,
//! "inserted_at":..,"sender_id":..}`), integer message ids (an Ecto serial key), `room:` topics,
//! a join's `presence_diff` broadcast before its `presence_state` push (the channel tracks,
//! then pushes the list; the tracker's diff can overtake the push), `phx_close` after a leave,
//! and HS256 tokens checked as an app with a JWT library would (or a fixed token plus a
//! `user_id` param). Each scenario runs briefly, on loopback, and must exit 0.
//!
//! `every_scenario_against_nexus` (ignored: it needs a server binary) runs the same scenarios
//! against a real Nexus: `NEXUS_BIN=target/release/nexus cargo test -p nexus-load --test
//! phoenix_fixture -- --ignored` (without `NEXUS_BIN` it takes `nexus` from the target
//! directory of this test binary).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use sonic_rs::{JsonContainerTrait, JsonValueTrait, Value};
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::protocol::Role;
use tungstenite::{Message, WebSocket};

const SECRET: &str = "phoenix-fixture-secret-0123456789abcdef0123456789";

/// The scenarios share two CPUs: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// The fixture: a Phoenix 1.7 chat app's wire behaviour, thread per socket.

/// One joined channel of one socket.
struct Member {
    conn: u64,
    join_ref: String,
    user: String,
    /// The presence meta as Phoenix encodes it (keys sorted).
    meta: String,
    out: mpsc::Sender<String>,
}

#[derive(Default)]
struct Topic {
    members: Vec<Member>,
    /// (id, new_msg payload) in commit order.
    history: Vec<(u64, String)>,
}

#[derive(Default)]
struct Hub {
    topics: Mutex<HashMap<String, Topic>>,
    next_conn: AtomicU64,
    next_id: AtomicU64,
    next_phx_ref: AtomicU64,
}

impl Hub {
    fn topics(&self) -> MutexGuard<'_, HashMap<String, Topic>> {
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A fixture listening on 127.0.0.1 (it lives as long as the test process).
fn start_fixture() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fixture");
    let addr = listener.local_addr().expect("fixture address");
    let hub = Arc::new(Hub::default());
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let hub = hub.clone();
            thread::spawn(move || serve(stream, &hub));
        }
    });
    addr
}

/// A frame `[join_ref, ref, topic, event, payload]` as Phoenix's V2 serializer writes it.
fn frame(join_ref: Option<&str>, reference: Option<&str>, topic: &str, event: &str, payload: &str) -> String {
    let s = |v: Option<&str>| v.map_or("null".to_string(), json_str);
    format!("[{},{},{},{},{payload}]", s(join_ref), s(reference), json_str(topic), json_str(event))
}

fn json_str(s: &str) -> String {
    sonic_rs::to_string(s).unwrap_or_default()
}

fn reply(join_ref: Option<&str>, reference: &str, topic: &str, status: &str, response: &str) -> String {
    frame(join_ref, Some(reference), topic, "phx_reply", &format!(r#"{{"response":{response},"status":"{status}"}}"#))
}

/// `{user: {"metas": [meta, ...]}, ...}` with users sorted, as Jason writes a small map.
fn presence(entries: &[(&str, &str)]) -> String {
    let mut by_user: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (user, meta) in entries {
        by_user.entry(user).or_default().push(meta);
    }
    let users: Vec<String> =
        by_user.iter().map(|(u, metas)| format!(r#"{}:{{"metas":[{}]}}"#, json_str(u), metas.join(","))).collect();
    format!("{{{}}}", users.join(","))
}

fn diff(topic: &str, joins: &[(&str, &str)], leaves: &[(&str, &str)]) -> String {
    let payload = format!(r#"{{"joins":{},"leaves":{}}}"#, presence(joins), presence(leaves));
    frame(None, None, topic, "presence_diff", &payload)
}

fn broadcast(t: &Topic, text: &str) {
    for m in &t.members {
        let _ = m.out.send(text.to_string());
    }
}

/// The socket's user: the `user_id` param, else the `sub` of a valid HS256 token.
fn user_of(query: &str) -> Option<String> {
    let param = |k: &str| query.split('&').find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='));
    if let Some(user) = param("user_id") {
        return Some(user.to_string());
    }
    let token = param("token")?;
    nexus::auth::Verifier::new(SECRET.as_bytes(), 0).verify(Some(token)).ok().map(|u| u.to_string())
}

// The handshake callback's error type is tungstenite's (`Response<Option<String>>`).
#[allow(clippy::result_large_err)]
fn serve(stream: TcpStream, hub: &Hub) {
    let _ = stream.set_nodelay(true);
    let mut user = None;
    let accepted = tungstenite::accept_hdr(stream, |req: &Request, resp: Response| {
        let uri = req.uri();
        let query = uri.query().unwrap_or_default();
        user = user_of(query);
        let refuse = |code: u16| {
            let mut r = ErrorResponse::new(None);
            *r.status_mut() = tungstenite::http::StatusCode::from_u16(code).unwrap_or_default();
            r
        };
        if uri.path() != "/socket/websocket" {
            return Err(refuse(404));
        }
        if !query.split('&').any(|kv| kv == "vsn=2.0.0") || user.is_none() {
            return Err(refuse(403));
        }
        Ok(resp)
    });
    let Ok(mut ws) = accepted else { return };
    let Some(user) = user else { return };
    let Ok(write_half) = ws.get_ref().try_clone() else { return };
    let (out, rx) = mpsc::channel::<String>();
    let writer = thread::spawn(move || write_loop(WebSocket::from_raw_socket(write_half, Role::Server, None), &rx));
    let conn = hub.next_conn.fetch_add(1, Ordering::Relaxed);
    let mut joined: Vec<String> = Vec::new();
    while let Ok(msg) = ws.read() {
        let Message::Text(text) = msg else { continue };
        let Ok(v) = sonic_rs::from_str::<Value>(&text) else { break };
        let Some(a) = v.as_array() else { break };
        let s = |i: usize| a.get(i).and_then(|x| x.as_str()).map(str::to_string);
        let (join_ref, Some(reference), Some(topic), Some(event)) = (s(0), s(1), s(2), s(3)) else { break };
        let payload = a.get(4).cloned().unwrap_or_default();
        let jr = join_ref.as_deref();
        match event.as_str() {
            "heartbeat" if topic == "phoenix" => {
                let _ = out.send(reply(None, &reference, &topic, "ok", "{}"));
            }
            "phx_join" if topic.starts_with("room:") => {
                let join_ref = join_ref.clone().unwrap_or_else(|| reference.clone());
                if joined.contains(&topic) {
                    leave(hub, conn, &topic);
                } else {
                    joined.push(topic.clone());
                }
                join(hub, conn, &user, &topic, &join_ref, &reference, &payload, &out);
            }
            "phx_join" => {
                let _ = out.send(reply(None, &reference, &topic, "error", r#"{"reason":"unmatched topic"}"#));
            }
            "phx_leave" => {
                let was = joined.iter().position(|t| *t == topic).map(|i| joined.remove(i));
                let old = was.and_then(|_| leave(hub, conn, &topic));
                let _ = out.send(reply(jr, &reference, &topic, "ok", "{}"));
                if let Some(old) = old {
                    let _ = out.send(frame(Some(&old), Some(&old), &topic, "phx_close", "{}"));
                }
            }
            "new_msg" if joined.contains(&topic) => {
                let body = payload.get("body").and_then(|b| b.as_str()).unwrap_or_default().to_string();
                let mut topics = hub.topics();
                let t = topics.entry(topic.clone()).or_default();
                let id = hub.next_id.fetch_add(1, Ordering::Relaxed) + 1;
                let msg = format!(
                    r#"{{"content":{{"text":{}}},"id":{id},"inserted_at":"2026-12-06T18:00:00","sender_id":{}}}"#,
                    json_str(&body),
                    json_str(&user)
                );
                broadcast(t, &frame(None, None, &topic, "new_msg", &msg));
                t.history.push((id, msg));
                let _ = out.send(reply(jr, &reference, &topic, "ok", "{}"));
            }
            _ => {
                let _ = out.send(reply(None, &reference, &topic, "error", r#"{"reason":"unmatched topic"}"#));
            }
        }
    }
    for topic in joined {
        leave(hub, conn, &topic);
    }
    let _ = ws.get_ref().shutdown(Shutdown::Both);
    drop(out);
    let _ = writer.join();
}

/// Reply, the presence_diff broadcast (joiner included), then the presence_state push and, for
/// a join with `last_seen_id`, the messages after it. The state is taken under the topic's
/// lock but pushed after it, up to 2 ms later: diffs of changes made meanwhile reach the joiner
/// before its state, although the state does not include them (in Phoenix the channel lists
/// the presences and then pushes, while the tracker's diffs go to the socket directly).
#[allow(clippy::too_many_arguments)]
fn join(
    hub: &Hub,
    conn: u64,
    user: &str,
    topic: &str,
    join_ref: &str,
    reference: &str,
    payload: &Value,
    out: &mpsc::Sender<String>,
) {
    let n = hub.next_phx_ref.fetch_add(1, Ordering::Relaxed);
    let (state, missed) = {
        let mut topics = hub.topics();
        let t = topics.entry(topic.to_string()).or_default();
        let last_seen = payload.get("last_seen_id").and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()));
        let missed: Vec<String> = match last_seen {
            Some(last) => t.history.iter().filter(|(id, _)| *id > last).map(|(_, m)| m.clone()).collect(),
            None => Vec::new(),
        };
        let response = match last_seen {
            Some(_) => format!(r#"{{"missed":{},"recovered":true}}"#, missed.len()),
            None => "{}".to_string(),
        };
        let _ = out.send(reply(Some(join_ref), reference, topic, "ok", &response));
        let meta = format!(r#"{{"online_at":"1765044000","phx_ref":"F{n:015}"}}"#);
        t.members.push(Member {
            conn,
            join_ref: join_ref.to_string(),
            user: user.to_string(),
            meta: meta.clone(),
            out: out.clone(),
        });
        broadcast(t, &diff(topic, &[(user, &meta)], &[]));
        let state: Vec<(&str, &str)> = t.members.iter().map(|m| (m.user.as_str(), m.meta.as_str())).collect();
        (presence(&state), missed)
    };
    thread::sleep(Duration::from_micros(n * 7919 % 2_000));
    let _ = out.send(frame(Some(join_ref), None, topic, "presence_state", &state));
    for m in missed {
        let _ = out.send(frame(Some(join_ref), None, topic, "new_msg", &m));
    }
}

/// Untracks `conn` from `topic` (the leave diff goes to those left); returns its join_ref.
fn leave(hub: &Hub, conn: u64, topic: &str) -> Option<String> {
    let mut topics = hub.topics();
    let t = topics.get_mut(topic)?;
    let at = t.members.iter().position(|m| m.conn == conn)?;
    let m = t.members.remove(at);
    broadcast(t, &diff(topic, &[], &[(&m.user, &m.meta)]));
    Some(m.join_ref)
}

/// Writes what the socket's channels queue, flushing once the queue is empty.
fn write_loop(mut ws: WebSocket<TcpStream>, rx: &mpsc::Receiver<String>) {
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(text) = next {
            if ws.write(Message::text(text)).is_err() {
                return;
            }
            next = rx.try_recv().ok();
        }
        if ws.flush().is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running nexus-load

/// Runs `nexus-load <args>` (bounded: it is killed after `limit`) and returns its output.
fn load(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nexus-load"))
        .args(args)
        .env_remove("JWT_SECRET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nexus-load");
    let started = Instant::now();
    while child.try_wait().expect("wait for nexus-load").is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("nexus-load output")
}

/// Runs a scenario that must succeed; returns its JSON report.
#[track_caller]
fn must_pass(args: &[&str]) -> Value {
    let out = load(args, Duration::from_secs(60));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "nexus-load {args:?} failed ({}):\n{stdout}\n{stderr}", out.status);
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON report:\n{stdout}"));
    eprintln!("{line}");
    sonic_rs::from_str(line).unwrap_or_else(|e| panic!("report {line}: {e}"))
}

fn n(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(|x| x.as_u64()).unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// The flags that name the fixture (topics `room:<uuid>`, tokens minted from its secret).
fn fixture_target(addr: SocketAddr) -> Vec<String> {
    ["--addr", &addr.to_string(), "--secret", SECRET, "--topic-prefix", "room:"].map(str::to_string).to_vec()
}

fn with(target: &[String], args: &[&str]) -> Vec<String> {
    let mut all = vec![args[0].to_string()];
    all.extend(target.iter().cloned());
    all.extend(args[1..].iter().map(|s| s.to_string()));
    all
}

fn run(target: &[String], args: &[&str]) -> Value {
    let all = with(target, args);
    must_pass(&all.iter().map(String::as_str).collect::<Vec<_>>())
}

// Each scenario, as a function of the target, so the fixture and Nexus run the same checks.

fn connect(target: &[String]) {
    let r = run(
        target,
        &[
            "connect",
            "--connections",
            "60",
            "--topics",
            "6",
            "--rate",
            "600",
            "--hold",
            "2",
            "--heartbeat",
            "1",
            "--processes",
            "2",
            "--sources",
            "4",
            "--json",
        ],
    );
    assert_eq!((n(&r, "established"), n(&r, "failed"), n(&r, "closed")), (60, 0, 0), "{r}");
    assert!(n(&r, "heartbeats_ok") >= 60, "{r}");
}

fn fanout(target: &[String]) {
    let r = run(
        target,
        &[
            "fanout",
            "--members",
            "40",
            "--topics",
            "4",
            "--senders",
            "4",
            "--window",
            "4",
            "--rate",
            "400",
            "--warmup",
            "500ms",
            "--duration",
            "2",
            "--sources",
            "4",
            "--json",
        ],
    );
    assert!(n(&r, "deliveries") > 1_000, "{r}");
    assert_eq!((n(&r, "lost"), n(&r, "order_violations"), n(&r, "errors"), n(&r, "closed")), (0, 0, 0, 0), "{r}");
}

fn persist(target: &[String]) {
    let r = run(
        target,
        &["persist", "--senders", "4", "--topics", "8", "--window", "4", "--rate", "400", "--duration", "2", "--json"],
    );
    assert!(n(&r, "acked") > 200, "{r}");
    assert_eq!((n(&r, "errors"), n(&r, "lost_broadcasts"), n(&r, "failed_senders")), (0, 0, 0), "{r}");
}

fn storm(target: &[String]) {
    let r = run(target, &["storm", "--members", "80", "--sources", "4", "--quiet", "1", "--timeout", "30", "--json"]);
    assert_eq!((n(&r, "with_state"), n(&r, "closed")), (80, 0), "{r}");
    // A reply, a state and at least the own join's diff each.
    assert!(n(&r, "min_frames_per_member") >= 3, "{r}");
}

fn churn(target: &[String]) {
    let r = run(
        target,
        &["churn", "--clients", "40", "--topics", "2", "--rate", "300", "--duration", "3", "--settle", "5", "--json"],
    );
    assert_eq!((n(&r, "mismatched_views"), n(&r, "refused")), (0, 0), "{r}");
    assert!(n(&r, "joined_at_end") > 0 && n(&r, "leaves") > 0 && n(&r, "drops") > 0, "{r}");
}

fn rejoin(target: &[String]) {
    let r = run(target, &["rejoin", "--topics", "2", "--missed", "15", "--clients", "6", "--sources", "4", "--json"]);
    assert_eq!(n(&r, "clients"), 6, "{r}");
    let r = run(
        target,
        &["rejoin", "--topics", "2", "--missed", "15", "--clients", "20", "--storm", "--sources", "4", "--json"],
    );
    assert_eq!(n(&r, "clients"), 20, "{r}");
}

#[test]
fn connect_against_phoenix() {
    let _one = serial();
    connect(&fixture_target(start_fixture()));
}

#[test]
fn fanout_against_phoenix() {
    let _one = serial();
    fanout(&fixture_target(start_fixture()));
}

#[test]
fn persist_against_phoenix() {
    let _one = serial();
    persist(&fixture_target(start_fixture()));
}

#[test]
fn storm_against_phoenix() {
    let _one = serial();
    storm(&fixture_target(start_fixture()));
}

#[test]
fn churn_against_phoenix() {
    let _one = serial();
    churn(&fixture_target(start_fixture()));
}

#[test]
fn rejoin_against_phoenix() {
    let _one = serial();
    rejoin(&fixture_target(start_fixture()));
}

/// An app with its own tokens: one fixed token for every socket, the user from a param.
#[test]
fn a_fixed_token_and_params() {
    let _one = serial();
    let addr = start_fixture().to_string();
    let target: Vec<String> =
        ["--addr", &addr, "--token", "SFMyNTY.g2gDbQ==.sig", "--params", "user_id={user}", "--topic-prefix", "room:"]
            .map(str::to_string)
            .to_vec();
    churn(&target);
    // Without the param the fixture finds no user in the fixed token and refuses the upgrade.
    let out = load(
        &["connect", "--addr", &addr, "--token", "not-a-jwt", "--connections", "1", "--hold", "0"],
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("403"), "{}", String::from_utf8_lossy(&out.stdout));
}

/// The fixture's frames really are Phoenix's: sorted keys, diff before state.
#[test]
fn the_fixture_speaks_like_phoenix() {
    let _one = serial();
    let addr = start_fixture();
    let token =
        nexus::auth::mint(SECRET.as_bytes(), uuid::Uuid::new_v4(), Duration::from_secs(60), &Default::default())
            .expect("mint");
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let url = format!("ws://{addr}/socket/websocket?vsn=2.0.0&token={token}");
    let (mut ws, _) = tungstenite::client(url.as_str(), stream).expect("upgrade");
    ws.send(Message::text(r#"["1","1","room:x","phx_join",{}]"#)).expect("join");
    let mut next = || ws.read().expect("frame").into_text().expect("text").to_string();
    assert_eq!(next(), r#"["1","1","room:x","phx_reply",{"response":{},"status":"ok"}]"#);
    assert!(next().starts_with(r#"[null,null,"room:x","presence_diff",{"joins":{"#));
    assert!(next().starts_with(r#"["1",null,"room:x","presence_state",{"#));
}

// ---------------------------------------------------------------------------------------------
// The same scenarios against Nexus.

/// A `nexus` child on an ephemeral loopback port; killed on drop.
struct Nexus {
    child: Child,
    addr: SocketAddr,
    dir: std::path::PathBuf,
}

impl Drop for Nexus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_nexus() -> Nexus {
    let bin = std::env::var_os("NEXUS_BIN").map(std::path::PathBuf::from).unwrap_or_else(|| {
        // target/<profile>/deps/phoenix_fixture-… → target/<profile>/nexus
        let exe = std::env::current_exe().expect("test binary path");
        exe.parent().and_then(|d| d.parent()).expect("target dir").join("nexus")
    });
    assert!(bin.exists(), "no nexus binary at {} (build it, or set NEXUS_BIN)", bin.display());
    let dir = std::env::temp_dir().join(format!("nexus-load-fixture-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("data dir");
    let mut child = Command::new(&bin)
        .env("PORT", "0")
        .env("NEXUS_BIND", "127.0.0.1")
        .env("JWT_SECRET", SECRET)
        .env("NEXUS_WORKERS", "2")
        .env("NEXUS_MSG_RATE", "0")
        .env("DATABASE_PATH", dir.join("nexus.db"))
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nexus");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(port) = line.split("listening on ").nth(1).and_then(|r| r.split_whitespace().next()) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(port.rsplit(':').next().unwrap_or_default().to_string());
                }
            }
        }
    });
    let port: u16 = rx.recv_timeout(Duration::from_secs(20)).expect("nexus logs `listening on`").parse().expect("port");
    Nexus { child, addr: SocketAddr::from(([127, 0, 0, 1], port)), dir }
}

#[test]
#[ignore = "needs a nexus binary: NEXUS_BIN, or target/<profile>/nexus"]
fn every_scenario_against_nexus() {
    let _one = serial();
    let nexus = start_nexus();
    let target: Vec<String> = ["--addr", &nexus.addr.to_string(), "--secret", SECRET].map(str::to_string).to_vec();
    connect(&target);
    fanout(&target);
    persist(&target);
    storm(&target);
    churn(&target);
    rejoin(&target);
}
