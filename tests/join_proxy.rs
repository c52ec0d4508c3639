//! The `proxy` join policy against an in-test backend (a plain HTTP server on a thread, so
//! the test controls its answers and delays and counts its calls): the request Nexus sends,
//! allow/deny and their cache, one call for many concurrent joins, failures (5xx, timeout,
//! nothing listening) answered `authorization unavailable` and not cached, a socket that reads
//! nothing more while its join waits, history under the policy, and a removal that drops the
//! cached answer. The same against a real FastAPI backend is in `tests/js/private.test.js`.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::*;

const PROXY_SECRET: &str = "proxy-secret-for-tests";
const API_KEY: &str = "test-api-key-0123456789abcdef";

/// One request the backend received.
#[derive(Debug, Clone)]
struct Call {
    request_line: String,
    headers: HashMap<String, String>,
    body: String,
}

/// What the backend answers.
#[derive(Default)]
struct Script {
    /// Status per "user conversation"; absent: 403.
    statuses: HashMap<String, u16>,
    /// Wait before answering.
    delay: Duration,
    calls: Vec<Call>,
}

/// The in-test backend.
struct Backend {
    port: u16,
    script: Arc<Mutex<Script>>,
}

impl Backend {
    fn start() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind backend");
        let port = listener.local_addr().expect("addr").port();
        let script = Arc::new(Mutex::new(Script::default()));
        let shared = script.clone();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let script = shared.clone();
                thread::spawn(move || serve(stream, &script));
            }
        });
        Backend { port, script }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/nexus/authorize", self.port)
    }

    fn set(&self, user: &str, conversation: &str, status: u16) {
        self.script.lock().expect("script").statuses.insert(format!("{user} {conversation}"), status);
    }

    fn set_delay(&self, delay: Duration) {
        self.script.lock().expect("script").delay = delay;
    }

    fn calls(&self) -> Vec<Call> {
        self.script.lock().expect("script").calls.clone()
    }

    /// Calls about this pair so far.
    fn calls_for(&self, user: &str, conversation: &str) -> usize {
        self.calls().iter().filter(|c| c.body.contains(user) && c.body.contains(conversation)).count()
    }
}

/// Serves requests on one connection until it closes (ureq keeps connections alive).
fn serve(stream: TcpStream, script: &Mutex<Script>) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = HashMap::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let length: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let body = String::from_utf8_lossy(&body).into_owned();
        let (status, delay) = {
            let mut s = script.lock().expect("script");
            let key = sonic_rs::from_str::<sonic_rs::Value>(&body)
                .map(|v| {
                    use sonic_rs::JsonValueTrait;
                    format!("{} {}", v["user_id"].as_str().unwrap_or(""), v["conversation_id"].as_str().unwrap_or(""))
                })
                .unwrap_or_default();
            let status = s.statuses.get(&key).copied().unwrap_or(403);
            s.calls.push(Call { request_line: request_line.trim_end().to_string(), headers, body });
            (status, s.delay)
        };
        thread::sleep(delay);
        let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{{}}");
        if out.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

fn proxy_server(backend_url: &str, extra: &[(&str, &str)]) -> Server {
    let mut env = vec![
        ("NEXUS_JOIN_POLICY", "proxy"),
        ("NEXUS_JOIN_PROXY_URL", backend_url),
        ("NEXUS_JOIN_PROXY_SECRET", PROXY_SECRET),
        ("NEXUS_WORKERS", "2"),
    ];
    env.extend_from_slice(extra);
    start_server(&env)
}

fn conversation_of(topic: &str) -> &str {
    topic.strip_prefix("chat:").expect("chat topic")
}

fn join_frame(join_ref: &str, topic: &str) -> String {
    v2(Some(join_ref), Some(join_ref), topic, "phx_join", "{}")
}

#[test]
fn the_backend_decides_and_its_answers_are_cached() {
    let backend = Backend::start();
    let server = proxy_server(&backend.url(), &[]);
    let user = new_sub();
    let (allowed, denied, unknown) = (new_topic(), new_topic(), new_topic());
    backend.set(&user, conversation_of(&allowed), 204);
    backend.set(&user, conversation_of(&denied), 403);
    backend.set(&user, conversation_of(&unknown), 404);
    let mut c = connect_v2(server.port, &user);
    c.join(&allowed, "1");
    c.roundtrip(&join_frame("2", &denied), &v2_error(Some("2"), "2", &denied, "unauthorized"));
    c.roundtrip(&join_frame("3", &unknown), &v2_error(Some("3"), "3", &unknown, "unauthorized"));
    // The request, as the backend saw it.
    let first = backend.calls().into_iter().next().expect("a call");
    assert_eq!(first.request_line, "POST /nexus/authorize HTTP/1.1");
    assert_eq!(first.headers.get("authorization").map(String::as_str), Some(&format!("Bearer {PROXY_SECRET}")[..]));
    assert_eq!(first.headers.get("content-type").map(String::as_str), Some("application/json"));
    assert_eq!(first.body, format!(r#"{{"user_id":"{user}","conversation_id":"{}"}}"#, conversation_of(&allowed)));
    // Other sockets of the user, and rejoins, are answered from the cache.
    for _ in 0..3 {
        let mut again = connect_v2(server.port, &user);
        again.join(&allowed, "1");
        again.roundtrip(&join_frame("2", &denied), &v2_error(Some("2"), "2", &denied, "unauthorized"));
    }
    assert_eq!(backend.calls().len(), 3, "one call per pair");
    // Another user is asked about separately.
    let stranger = new_sub();
    connect_v2(server.port, &stranger)
        .roundtrip(&join_frame("1", &allowed), &v2_error(Some("1"), "1", &allowed, "unauthorized"));
    assert_eq!(backend.calls_for(&stranger, conversation_of(&allowed)), 1);
    wait_for_metric(server.port, "nexus_join_proxy_calls_total", 4);
    wait_for_metric(server.port, "nexus_join_proxy_cache_hits_total", 6);
    wait_for_metric(server.port, r#"nexus_joins_refused_total{reason="unauthorized"}"#, 6);
}

#[test]
fn concurrent_joins_of_one_pair_make_one_call() {
    let backend = Backend::start();
    let server = proxy_server(&backend.url(), &[]);
    let user = new_sub();
    let topic = new_topic();
    backend.set(&user, conversation_of(&topic), 200);
    backend.set_delay(Duration::from_millis(300));
    let mut sockets: Vec<Client> = (0..20).map(|_| connect_v2(server.port, &user)).collect();
    for s in &mut sockets {
        s.send_text(&join_frame("1", &topic));
    }
    for s in &mut sockets {
        s.expect(&v2_ok(Some("1"), "1", &topic));
    }
    assert_eq!(backend.calls().len(), 1);
    wait_for_metric(server.port, "nexus_join_proxy_coalesced_total", 19);
}

#[test]
fn failures_are_unavailable_and_never_cached() {
    let backend = Backend::start();
    let server = proxy_server(&backend.url(), &[("NEXUS_JOIN_PROXY_TIMEOUT", "200ms")]);
    let user = new_sub();
    let topic = new_topic();
    let conversation = conversation_of(&topic);
    let mut c = connect_v2(server.port, &user);
    let unavailable = |jr: &str| v2_error(Some(jr), jr, &topic, "authorization unavailable");
    backend.set(&user, conversation, 500);
    c.roundtrip(&join_frame("1", &topic), &unavailable("1"));
    backend.set(&user, conversation, 401);
    c.roundtrip(&join_frame("2", &topic), &unavailable("2"));
    backend.set(&user, conversation, 200);
    backend.set_delay(Duration::from_millis(1_000));
    c.roundtrip(&join_frame("3", &topic), &unavailable("3"));
    backend.set_delay(Duration::ZERO);
    c.join(&topic, "4");
    assert_eq!(backend.calls_for(&user, conversation), 4, "no failure was cached");
    wait_for_metric(server.port, "nexus_join_proxy_failures_total", 3);
    wait_for_metric(server.port, r#"nexus_joins_refused_total{reason="unavailable"}"#, 3);

    // Nothing listening at all.
    let closed = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let dead = proxy_server(&format!("http://127.0.0.1:{closed}/gone"), &[]);
    let mut c = connect_v2(dead.port, &user);
    c.roundtrip(&join_frame("1", &topic), &unavailable("1"));
    c.heartbeat("2"); // the socket stays usable
}

#[test]
fn a_socket_handles_nothing_else_until_its_join_is_answered() {
    let backend = Backend::start();
    let server = proxy_server(&backend.url(), &[]);
    let user = new_sub();
    let topic = new_topic();
    backend.set(&user, conversation_of(&topic), 200);
    backend.set_delay(Duration::from_millis(300));
    let mut c = connect_v2(server.port, &user);
    // Sent back to back: Phoenix handles them in order, so the push finds the channel joined.
    c.send_text(&join_frame("1", &topic));
    c.send_text(&new_msg_push("1", "2", &topic, "right after the join"));
    c.send_text(&heartbeat("3"));
    c.expect(&v2_ok(Some("1"), "1", &topic));
    // The heartbeat is answered at once; the push once stored (its broadcast, then its ack).
    c.expect(&heartbeat_reply("3"));
    assert_eq!(parse_live(&c.recv(), &topic).text, "right after the join");
    c.expect(&v2_ok(Some("1"), "2", &topic));
}

#[test]
fn history_asks_the_backend_too() {
    let backend = Backend::start();
    let server = proxy_server(&backend.url(), &[]);
    let (member, stranger) = (new_sub(), new_sub());
    let topic = new_topic();
    let conversation = conversation_of(&topic);
    backend.set(&member, conversation, 200);
    let target = history_target(conversation, "");
    let ok = http_get(server.port, &target, Some(&format!("Bearer {}", token(&member))));
    assert_eq!((ok.status, ok.body_text()), (200, r#"{"messages":[],"next_before":null}"#.to_string()));
    let mut refused = http_get(server.port, &target, Some(&format!("Bearer {}", token(&stranger))));
    assert_eq!((refused.status, refused.body_text()), (403, r#"{"error":"unauthorized"}"#.to_string()));
    refused.assert_error(403);
    let again = http_get(server.port, &target, Some(&format!("Bearer {}", token(&stranger))));
    assert_eq!(again.status, 403, "the answer is cached for the pair");
    assert_eq!(backend.calls_for(&stranger, conversation), 1);
    let failing = new_sub();
    backend.set(&failing, conversation, 503);
    let down = http_get(server.port, &target, Some(&format!("Bearer {}", token(&failing))));
    assert_eq!((down.status, down.body_text()), (503, r#"{"error":"authorization unavailable"}"#.to_string()));
}

/// A server with the API key, and a socket of a user the backend allows in a fresh topic,
/// joined (one backend call).
fn allowed_member(backend: &Backend) -> (Server, String, String, Client) {
    let server = proxy_server(&backend.url(), &[("NEXUS_API_KEY", API_KEY)]);
    let (user, topic) = (new_sub(), new_topic());
    backend.set(&user, conversation_of(&topic), 200);
    let mut c = connect_v2(server.port, &user);
    c.join(&topic, "1");
    (server, user, topic, c)
}

#[test]
fn removing_a_member_forgets_the_cached_answer() {
    let backend = Backend::start();
    let (server, user, topic, mut c) = allowed_member(&backend);
    let conversation = conversation_of(&topic);
    // The backend drops the member, then tells Nexus.
    backend.set(&user, conversation, 403);
    let target = format!("/api/conversations/{conversation}/members/{user}");
    assert_eq!(http_request(server.port, "DELETE", &target, Some(&format!("Bearer {API_KEY}"))).status, 204);
    c.expect(&v2(Some("1"), Some("1"), &topic, "phx_close", "{}"));
    c.roundtrip(&join_frame("2", &topic), &v2_error(Some("2"), "2", &topic, "unauthorized"));
    assert_eq!(backend.calls_for(&user, conversation), 2, "asked again after the removal");
}

#[test]
fn a_disconnect_forgets_the_users_cached_answers() {
    let backend = Backend::start();
    let (server, user, topic, mut c) = allowed_member(&backend);
    let conversation = conversation_of(&topic);
    // The backend revokes the grant and disconnects the user; the reconnect is asked again.
    backend.set(&user, conversation, 403);
    let target = format!("/api/users/{user}/disconnect");
    assert_eq!(http_request(server.port, "POST", &target, Some(&format!("Bearer {API_KEY}"))).status, 204);
    assert_eq!(c.expect_close(TIMEOUT), Some(1008));
    let mut again = connect_v2(server.port, &user);
    again.roundtrip(&join_frame("1", &topic), &v2_error(Some("1"), "1", &topic, "unauthorized"));
    assert_eq!(backend.calls_for(&user, conversation), 2);
}

#[test]
fn proxy_settings_are_checked_at_start() {
    let run = |env: &[(&str, &str)]| {
        let mut cmd = nexus_command();
        cmd.env("JWT_SECRET", SECRET).env("NEXUS_JOIN_POLICY", "proxy");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run nexus");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(&[("NEXUS_JOIN_PROXY_SECRET", "s")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("NEXUS_JOIN_PROXY_URL"), "{err}");
    let (code, err) = run(&[("NEXUS_JOIN_PROXY_URL", "https://backend/authorize"), ("NEXUS_JOIN_PROXY_SECRET", "s")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("http://"), "{err}");
    let (code, err) = run(&[("NEXUS_JOIN_PROXY_URL", "http://backend/authorize")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("NEXUS_JOIN_PROXY_SECRET"), "{err}");
    let (code, err) = run(&[
        ("NEXUS_JOIN_PROXY_URL", "http://backend/authorize"),
        ("NEXUS_JOIN_PROXY_SECRET", "s"),
        ("NEXUS_JOIN_PROXY_TIMEOUT", "1h"),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("NEXUS_JOIN_PROXY_TIMEOUT"), "{err}");
}
