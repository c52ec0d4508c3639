//! PostgreSQL storage (`NEXUS_DATABASE_URL`), what only it has: the per-conversation `seq`,
//! start-up refusals, and real faults — the database stopped (`pg_ctl stop -m immediate`)
//! while idle and while commits are in flight, then started again; its host unreachable
//! (packets dropped by an nftables rule); its answers lost by a proxy; the reads cluster
//! nodes fill gaps with. The behaviours both stores share (persistence, crash, history) run
//! against both in their own test files.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use common::pg::Postgres;
use common::*;

const WAIT: Duration = Duration::from_secs(10);

fn storage_unavailable(r: &str, topic: &str) -> String {
    failed_to_save("1", r, topic, "storage unavailable")
}

/// `GET` of a conversation's history as `sub`.
fn get_history(port: u16, sub: &str, conversation: &str) -> HttpResponse {
    let auth = format!("Bearer {}", token(sub));
    http_get(port, &format!("/api/conversations/{conversation}/messages"), Some(&auth))
}

/// Sends one `new_msg` and returns the sender's reply to it (broadcasts skipped).
fn push_reply(c: &mut Client, r: &str, topic: &str, body: &str) -> String {
    c.send_text(&new_msg_push("1", r, topic, body));
    c.recv_until(WAIT, |t| t.contains("phx_reply"))
}

/// Sends `new_msg`s with bodies `<prefix> 0`, `<prefix> 1`, … until one is acknowledged, each
/// refusal being `storage unavailable` (the writer reconnects with back-off, at most 1 s);
/// returns the acknowledged body.
fn send_until_acked(c: &mut Client, topic: &str, prefix: &str) -> String {
    let deadline = Instant::now() + WAIT;
    for k in 0.. {
        let (r, body) = (format!("{prefix}{k}"), format!("{prefix} {k}"));
        let reply = push_reply(c, &r, topic, &body);
        if reply == v2_ok(Some("1"), &r, topic) {
            return body;
        }
        assert_eq!(reply, storage_unavailable(&r, topic));
        assert!(Instant::now() < deadline, "no message acknowledged within {WAIT:?}");
        thread::sleep(Duration::from_millis(50)); // pace retries of a send that fails until recovery
    }
    unreachable!("the loop returns or fails")
}

/// The URL of the database `db_url` names, over TCP to 127.0.0.1:`port` (the test server's
/// TCP port, or a proxy in front of it).
fn tcp_url(db_url: &str, port: u16) -> String {
    let name = db_url.split('/').nth(3).and_then(|d| d.split('?').next()).expect("database name");
    format!("postgres://nexus@127.0.0.1:{port}/{name}")
}

#[test]
fn every_conversation_gets_a_dense_seq_in_broadcast_order() {
    let server = start_server_on(Backend::Postgres, &[("NEXUS_MSG_RATE", "0")]);
    let topics = [new_topic(), new_topic()];
    let sub = new_sub();
    let mut seen: HashMap<String, Vec<Live>> = HashMap::new();
    for topic in &topics {
        let mut c = joined(server.port, &sub, topic);
        let bodies: Vec<String> = (0..40).map(|k| format!("{topic}-{k}")).collect();
        seen.insert(conversation_of(topic).to_string(), send_all(&mut c, "1", topic, &bodies));
    }
    let rows = server.stored_rows();
    assert_eq!(rows.len(), 80);
    for (conversation, live) in &seen {
        let mine: Vec<&DbRow> = rows.iter().filter(|r| &r.conversation == conversation).collect();
        assert_eq!(mine.iter().map(|r| r.seq).collect::<Vec<_>>(), (1..=40).collect::<Vec<i64>>(), "dense from 1");
        for w in mine.windows(2) {
            assert!(w[0].inserted_at_us < w[1].inserted_at_us && w[0].id < w[1].id, "{w:?}");
        }
        for r in &mine {
            // A UUIDv7 of its own instant: ms, version 7, µs within the ms, RFC variant.
            let id = uuid::Uuid::parse_str(&r.id).expect("uuid");
            let (hi, lo) = id.as_u64_pair();
            assert_eq!((hi >> 16) as i64, r.inserted_at_us / 1_000, "{r:?}");
            assert_eq!((hi & 0xffff) as i64, 0x7000 | (r.inserted_at_us % 1_000), "{r:?}");
            assert_eq!(lo >> 62, 0b10, "{r:?}");
        }
        let stored: Vec<(&str, &str)> = mine.iter().map(|r| (r.id.as_str(), r.body.as_str())).collect();
        let broadcast: Vec<(&str, &str)> = live.iter().map(|m| (m.id.as_str(), m.text.as_str())).collect();
        assert_eq!(stored, broadcast, "seq order = broadcast order");
        let at: Vec<String> = mine.iter().map(|r| format_micros(r.inserted_at_us)).collect();
        assert_eq!(at, live.iter().map(|m| m.inserted_at.clone()).collect::<Vec<_>>());
    }
}

/// What a cluster node reads when it sees a gap: the writer hands each message its `seq`; a
/// conversation's head is its last `seq` and instant; a range between two instants comes back
/// in `seq` order, with the ids, times and `seq`s the writer handed out.
#[test]
fn the_writer_hands_out_seqs_and_fills_read_heads_and_ranges_back() {
    use nexus::store::{Committed, Head, Message, PgFillReader, PgStore, PgTarget, Store};
    let pg = common::pg::shared();
    let target = PgTarget::parse(&pg.create_db(), WAIT).expect("url");
    let mut lanes = PgStore::open(&target, "test-node", WAIT, 1).expect("open");
    let store = &mut lanes[0];
    let (a, b, silent) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let mut rng = 7u64;
    let mut message = |conversation| {
        let at = nexus::ids::now_micros();
        let id = nexus::ids::v7(at, nexus::ids::splitmix64(&mut rng));
        let message =
            Message { id, conversation, sender: uuid::Uuid::new_v4(), body: "x".into(), inserted_at_us: at, seq: 0 };
        Committed { message, origin: None }
    };
    let mut stored = Vec::new();
    for conversations in [[a, b, a, a], [a, b, a, a]] {
        let mut batch: Vec<Committed> = conversations.iter().map(|&c| message(c)).collect();
        store.commit(&mut batch).expect("commit");
        stored.extend(batch.into_iter().map(|c| c.message));
    }
    let of = |c| stored.iter().filter(|m| m.conversation == c).cloned().collect::<Vec<Message>>();
    let (in_a, in_b) = (of(a), of(b));
    assert_eq!(in_a.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6], "dense, in commit order");
    assert_eq!(in_b.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2]);
    let mut reader = PgFillReader::new(&target, WAIT);
    let mut heads = reader.heads(&[a, b, silent]).expect("heads");
    heads.sort_by_key(|h| h.seq);
    let head = |m: &Message| Head { conversation: m.conversation, seq: m.seq, at: m.inserted_at_us };
    assert_eq!(heads, [head(&in_b[1]), head(&in_a[5])], "a conversation without messages has no head");
    let between = reader.range(a, in_a[1].inserted_at_us, Some(in_a[5].inserted_at_us), 100).expect("range");
    assert_eq!(between, in_a[2..5], "after the 2nd, before the 6th: the 3rd to the 5th, as the writer stamped them");
    assert_eq!(reader.range(a, 0, None, 2).expect("range"), in_a[..2], "oldest first, at most the limit");
    assert_eq!(reader.range(silent, 0, None, 10).expect("range"), []);
}

/// The gap-fill thread answers every read, at once while the database is down, and reconnects
/// by itself when it is back.
#[test]
fn the_gap_fill_thread_answers_at_once_while_the_database_is_down_and_reconnects() {
    use nexus::cluster::filler::{spawn_filler, FillRequest};
    use nexus::store::{PgFillReader, PgStore, PgTarget, StoreError};
    let mut pg = Postgres::start();
    let target = PgTarget::parse(&pg.create_db(), WAIT).expect("url");
    drop(PgStore::open(&target, "test-node", WAIT, 1).expect("migrated"));
    let filler = spawn_filler(PgFillReader::new(&target, WAIT), 4).expect("filler starts");
    let conversation = uuid::Uuid::new_v4();
    let heads = || {
        let (tx, rx) = mpsc::channel();
        let reply = Box::new(move |r: Result<Vec<_>, StoreError>| tx.send(r.map(|h| h.len())).expect("listening"));
        filler.try_request(FillRequest::Heads { conversations: vec![conversation], reply }).expect("queued");
        let started = Instant::now();
        let answer = rx.recv_timeout(WAIT).expect("answered");
        (answer, started.elapsed())
    };
    assert_eq!(heads().0.ok(), Some(0), "no message yet: no head");
    pg.stop_immediate();
    for _ in 0..3 {
        let (answer, took) = heads();
        assert!(answer.is_err(), "a read while the database is down fails");
        assert!(took < Duration::from_secs(1), "and fails fast: {took:?}");
    }
    pg.run();
    let deadline = Instant::now() + WAIT;
    while heads().0.is_err() {
        assert!(Instant::now() < deadline, "the filler did not reconnect");
        thread::sleep(Duration::from_millis(50));
    }
    let (tx, rx) = mpsc::channel();
    let reply = Box::new(move |r: Result<Vec<_>, StoreError>| tx.send(r.map(|m| m.len())).expect("listening"));
    let range = FillRequest::Range { conversation, after: 0, before: None, limit: 10, reply };
    filler.try_request(range).expect("queued");
    assert_eq!(rx.recv_timeout(WAIT).expect("answered").ok(), Some(0));
}

#[test]
fn an_unreachable_database_exits_2_with_one_line_and_no_secret() {
    let dir = unique_temp_dir();
    let url = format!("postgresql://nexus:hunter2secret@/db?host={}&port=5432", dir.display());
    let mut cmd = nexus_command();
    cmd.env("JWT_SECRET", SECRET).env("PORT", "0").env("NEXUS_BIND", "127.0.0.1").env("NEXUS_DATABASE_URL", &url);
    let started = Instant::now();
    let (status, stderr) = run_to_exit(cmd, WAIT);
    assert_eq!(status.code(), Some(2), "stderr:\n{stderr}");
    assert!(started.elapsed() < Duration::from_secs(8), "bounded by the connect timeout");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].starts_with("nexus: cannot use PostgreSQL at postgres://nexus@"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "the password leaked: {stderr}");

    let mut cmd = nexus_command();
    cmd.env("JWT_SECRET", SECRET).env("NEXUS_DATABASE_URL", "postgres://nexus:hunter2@host:notaport/db");
    let (status, stderr) = run_to_exit(cmd, WAIT);
    assert_eq!(status.code(), Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("NEXUS_DATABASE_URL is not a PostgreSQL URL") && !stderr.contains("hunter2"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_newer_schema_is_refused_and_migrations_run_once() {
    let url = pg::shared().create_db();
    let mut first = start_server(&[("NEXUS_DATABASE_URL", url.as_str())]);
    // A second node on the same database at the same time migrates nothing twice.
    let second = start_server(&[("NEXUS_DATABASE_URL", url.as_str())]);
    drop(second);
    first.signal(libc::SIGTERM);
    first.wait_exit(WAIT);
    let mut db = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    let versions: Vec<i32> = db
        .query("SELECT version FROM nexus_schema ORDER BY version", &[])
        .expect("versions")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [1, 2]);
    db.execute("INSERT INTO nexus_schema (version) VALUES (99)", &[]).expect("bump");
    let mut cmd = nexus_command();
    cmd.env("JWT_SECRET", SECRET).env("PORT", "0").env("NEXUS_DATABASE_URL", &url);
    let (status, stderr) = run_to_exit(cmd, WAIT);
    assert_eq!(status.code(), Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("schema version 99, newer than this nexus supports"), "{stderr}");
}

#[test]
fn a_stopped_database_fails_fast_and_recovers_without_a_restart() {
    let mut pg = Postgres::start();
    let url = pg.create_db();
    let server = start_server(&[("NEXUS_DATABASE_URL", url.as_str()), ("NEXUS_MSG_RATE", "0")]);
    let topic = new_topic();
    let conversation = conversation_of(&topic).to_string();
    let (ann, bob) = (new_sub(), new_sub());
    let mut sender = joined(server.port, &ann, &topic);
    let mut member = joined(server.port, &bob, &topic);
    send_all(&mut sender, "1", &topic, &["before".to_string()]);
    member.recv_until(WAIT, |t| t.contains("before"));

    pg.stop_immediate();
    for k in 0..3 {
        let started = Instant::now();
        let reply = push_reply(&mut sender, &format!("down{k}"), &topic, &format!("while down {k}"));
        assert_eq!(reply, storage_unavailable(&format!("down{k}"), &topic));
        assert!(started.elapsed() < Duration::from_secs(1), "answered after {:?}", started.elapsed());
    }
    member.expect_silence(Duration::from_millis(200)); // nothing was broadcast
    sender.heartbeat("still-here"); // the cores stay responsive
    let history = get_history(server.port, &bob, &conversation);
    assert_eq!(history.status, 503, "history while the database is down");
    assert!(std::str::from_utf8(&history.body).is_ok_and(|b| b.contains("storage unavailable")));

    pg.run();
    // The writer reconnects by itself (back-off at most 1 s): keep trying until a message is
    // acknowledged.
    let acked = send_until_acked(&mut sender, &topic, "after");
    member.recv_until(WAIT, |t| t.contains(&acked));
    let bodies: Vec<String> = server.stored_rows().into_iter().map(|r| r.body).collect();
    assert_eq!(bodies, ["before".to_string(), acked], "nothing refused was stored");
    let history = get_history(server.port, &bob, &conversation);
    assert_eq!(history.status, 200, "history is back");
}

/// A network partition between Nexus and PostgreSQL, made real with an nftables rule that drops
/// every packet to the database's TCP port (no reset, no answer: the database host is
/// unreachable rather than down). Removed when dropped.
struct Partition {
    table: String,
}

impl Partition {
    fn cut(port: u16) -> Partition {
        assert!(
            std::process::Command::new("nft").arg("--version").output().is_ok(),
            "this test needs nft (install Debian's nftables; tests/run.sh does)"
        );
        let table = format!("nexus_test_{}_{port}", std::process::id());
        let rules = format!(
            "add table inet {table}\n\
             add chain inet {table} input {{ type filter hook input priority 0; }}\n\
             add rule inet {table} input tcp dport {port} drop\n"
        );
        let mut nft = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("run nft");
        nft.stdin.take().expect("stdin").write_all(rules.as_bytes()).expect("write the rules");
        assert!(nft.wait().expect("nft").success(), "nft refused the rules (this test runs as root)");
        Partition { table }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft").args(["delete", "table", "inet", &self.table]).status();
    }
}

#[test]
fn an_unreachable_database_host_fails_fast_and_recovers_without_a_restart() {
    let pg = Postgres::start_tcp();
    let db = pg.create_db();
    let url = tcp_url(&db, pg.tcp_port());
    let server = start_server(&[("NEXUS_DATABASE_URL", url.as_str()), ("NEXUS_MSG_RATE", "0")]);
    let topic = new_topic();
    let (ann, bob) = (new_sub(), new_sub());
    let mut sender = joined(server.port, &ann, &topic);
    let mut member = joined(server.port, &bob, &topic);
    send_all(&mut sender, "1", &topic, &["before".to_string()]);
    member.recv_until(WAIT, |t| t.contains("before"));

    let partition = Partition::cut(pg.tcp_port());
    // The first commit's bytes go unacknowledged (the writer gives the connection up), the
    // look-up cannot get through either: `storage unavailable`, in time, for it and the next.
    for k in 0..3 {
        let started = Instant::now();
        let reply = push_reply(&mut sender, &format!("cut{k}"), &topic, &format!("while cut {k}"));
        assert_eq!(reply, storage_unavailable(&format!("cut{k}"), &topic));
        assert!(started.elapsed() < Duration::from_secs(1), "answered after {:?}", started.elapsed());
    }
    member.expect_silence(Duration::from_millis(200));
    sender.heartbeat("still-here");
    let started = Instant::now();
    let history = get_history(server.port, &bob, conversation_of(&topic));
    assert_eq!(history.status, 503, "history while the database is unreachable");
    assert!(started.elapsed() < Duration::from_secs(2), "history answered after {:?}", started.elapsed());

    drop(partition);
    let acked = send_until_acked(&mut sender, &topic, "after");
    member.recv_until(WAIT, |t| t.contains(&acked));
    let bodies: Vec<String> = pg::rows(&db).into_iter().map(|r| r.body).collect();
    assert_eq!(bodies, ["before".to_string(), acked], "nothing refused was stored");
}

#[test]
fn commits_cut_by_a_crash_lose_no_acked_message_and_store_none_twice() {
    const SENDERS: usize = 3;
    let mut pg = Postgres::start();
    let url = pg.create_db();
    let server = start_server(&[("NEXUS_DATABASE_URL", url.as_str()), ("NEXUS_MSG_RATE", "0")]);
    let topic = new_topic();
    let subs: Vec<String> = (0..SENDERS).map(|_| new_sub()).collect();
    let (reached_tx, reached) = mpsc::channel();
    let handles: Vec<_> = subs
        .iter()
        .map(|sub| {
            let mut c = joined(server.port, sub, &topic);
            let (topic, reached_tx) = (topic.clone(), reached_tx.clone());
            thread::spawn(move || stream_messages(&mut c, &topic, 16, 1_000_000, 100, reached_tx, WAIT))
        })
        .collect();
    for _ in 0..SENDERS {
        reached.recv_timeout(WAIT).expect("every sender had messages acknowledged before the crash");
    }
    pg.stop_immediate(); // commits in flight lose their connection
    let streamed: Vec<Streamed> =
        handles.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect();
    for s in &streamed {
        assert!(s.end == "done" && !s.refused.is_empty(), "each stream ends on a refusal: {s:?}");
        assert!(s.refused.iter().all(|(_, d)| d == "storage unavailable"), "{s:?}");
    }
    // A member who joins now (joins need no database) sees, once the database is back, every
    // batch answered `storage unavailable` that had in fact committed (broadcast late, once,
    // in order), then new messages.
    let mut member = joined(server.port, &new_sub(), &topic);
    let mut probe = joined(server.port, &new_sub(), &topic);
    pg.run();
    let probed = send_until_acked(&mut probe, &topic, "probe");
    let rows = server.stored_rows();
    let ids: std::collections::HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), rows.len());
    assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), (1..=rows.len() as i64).collect::<Vec<_>>());
    for (i, (sub, s)) in subs.iter().zip(&streamed).enumerate() {
        let mine: Vec<&str> = rows.iter().filter(|r| r.sender == *sub).map(|r| r.body.as_str()).collect();
        let expected: Vec<String> = (0..mine.len()).map(|n| format!("m-{n}")).collect();
        assert_eq!(mine, expected, "sender {i}: stored = m-0.. in send order, each once ({s:?})");
        let last_acked = s.acked.last().copied().unwrap_or(0);
        assert!(mine.len() > last_acked, "sender {i}: acknowledged m-{last_acked} is not stored ({s:?})");
    }
    // The probe's broadcast comes after every late one.
    let mut got = Vec::new();
    while got.last().map(|m: &Live| m.text.as_str()) != Some(probed.as_str()) {
        let frame = member.recv_until(WAIT, is_new_msg);
        got.push(parse_live(&frame, &topic));
    }
    let late: Vec<&str> = got.iter().map(|m| m.text.as_str()).filter(|t| *t != probed).collect();
    let stored_late: Vec<&str> =
        rows.iter().filter(|r| r.body != probed && !acked(&streamed, &subs, r)).map(|r| r.body.as_str()).collect();
    assert_eq!(late, stored_late, "committed-but-refused messages are broadcast once, late, in order");
}

#[test]
fn a_slow_database_fills_the_bounded_queue_and_new_messages_get_server_busy() {
    const QUEUE: usize = 8;
    let url = pg::shared().create_db();
    let queue = QUEUE.to_string();
    let server = start_server(&[
        ("NEXUS_DATABASE_URL", url.as_str()),
        ("NEXUS_WRITER_QUEUE", queue.as_str()),
        ("NEXUS_MSG_RATE", "0"),
    ]);
    let topic = new_topic();
    let mut c = joined(server.port, &new_sub(), &topic);
    send_all(&mut c, "1", &topic, &["first".to_string()]);
    // Another session holds the conversations table: the writer's next batch waits on it.
    let mut blocker = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    let mut tx = blocker.transaction().expect("begin");
    tx.batch_execute("LOCK TABLE conversations IN EXCLUSIVE MODE").expect("lock");
    // One message gets the writer stuck on the lock (seen in pg_stat_activity), QUEUE more
    // wait for it, and every one after them is refused at once.
    c.send_text(&new_msg_push("1", "stuck", &topic, "stuck"));
    let deadline = Instant::now() + WAIT;
    while blocker_sees_no_waiter(&url) {
        assert!(Instant::now() < deadline, "the writer never waited on the lock");
        thread::sleep(Duration::from_millis(10)); // poll the database's own view of its sessions
    }
    let n = 1 + 3 * QUEUE;
    for k in 1..n {
        c.send_text(&new_msg_push("1", &format!("s{k}"), &topic, &format!("slow {k}")));
    }
    let mut busy = 0;
    while busy < n - 1 - QUEUE {
        let reply = c.recv_until(WAIT, |t| t.contains("phx_reply"));
        assert!(reply.contains(r#""detail":"server busy""#), "only busy refusals while the table is locked: {reply}");
        busy += 1;
    }
    tx.rollback().expect("release the lock");
    // Everything accepted is committed once the database answers, in order.
    let mut acked = 0;
    while acked < 1 + QUEUE {
        let reply = c.recv_until(WAIT, |t| t.contains("phx_reply"));
        assert!(reply.contains(r#""status":"ok""#), "what was accepted is committed: {reply}");
        acked += 1;
    }
    let stored: Vec<String> = server.stored_rows().into_iter().map(|r| r.body).collect();
    let mut expected = vec!["first".to_string(), "stuck".to_string()];
    expected.extend((1..=QUEUE).map(|k| format!("slow {k}")));
    assert_eq!(stored, expected, "every accepted message stored in order, no refused one");
}

/// Whether no session waits on a lock (the writer has not reached the held table yet).
fn blocker_sees_no_waiter(url: &str) -> bool {
    let mut db = postgres::Client::connect(url, postgres::NoTls).expect("connect");
    let waiting = db
        .query_opt("SELECT 1 FROM pg_stat_activity WHERE application_name = 'nexus' AND wait_event_type = 'Lock'", &[])
        .expect("pg_stat_activity");
    waiting.is_none()
}

/// Whether `row` was acknowledged to its sender (so it was broadcast before the crash).
fn acked(streamed: &[Streamed], subs: &[String], row: &DbRow) -> bool {
    let Some(i) = subs.iter().position(|s| *s == row.sender) else { return false };
    let n: usize = row.body.strip_prefix("m-").and_then(|n| n.parse().ok()).unwrap_or(usize::MAX);
    streamed[i].acked.contains(&n)
}

/// A TCP proxy in front of PostgreSQL that can cut the line: while cut, whatever the server
/// sends next is thrown away and the connection closed (the client never learns how its
/// statement ended), and new connections are closed at once.
struct CuttableProxy {
    port: u16,
    cut: Arc<AtomicBool>,
}

impl CuttableProxy {
    fn start(target: u16) -> CuttableProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let cut = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                if flag.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                let (c2, s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                thread::spawn(move || pipe(c2, s2, None));
                let flag = flag.clone();
                thread::spawn(move || pipe(server, client, Some(flag)));
            }
        });
        CuttableProxy { port, cut }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either ends; with `cut` set, the next bytes are dropped and both
/// sockets closed instead.
fn pipe(mut from: TcpStream, mut to: TcpStream, cut: Option<Arc<AtomicBool>>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if cut.as_ref().is_some_and(|c| c.load(Ordering::SeqCst)) {
            break;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[test]
fn a_commit_whose_answer_was_lost_is_broadcast_late_once_the_database_answers_again() {
    let pg = Postgres::start_tcp();
    let db = pg.create_db();
    let proxy = CuttableProxy::start(pg.tcp_port());
    let url = tcp_url(&db, proxy.port);
    let server = start_server(&[("NEXUS_DATABASE_URL", url.as_str()), ("NEXUS_MSG_RATE", "0")]);
    let topic = new_topic();
    let mut sender = joined(server.port, &new_sub(), &topic);
    let mut member = joined(server.port, &new_sub(), &topic);
    send_all(&mut sender, "1", &topic, &["before".to_string()]);
    member.recv_until(WAIT, |t| t.contains("before"));

    // The append reaches the database and commits; its answer is lost with the connection, and
    // the writer cannot get back in to look the batch up: it answers `storage unavailable`.
    proxy.set_cut(true);
    let started = Instant::now();
    let reply = push_reply(&mut sender, "lost", &topic, "answer lost");
    assert_eq!(reply, storage_unavailable("lost", &topic));
    assert!(started.elapsed() < Duration::from_secs(1), "answered after {:?}", started.elapsed());
    member.expect_silence(Duration::from_millis(200));
    let bodies = |url: &str| -> Vec<String> { pg::rows(url).into_iter().map(|r| r.body).collect() };
    assert_eq!(bodies(&db), ["before", "answer lost"], "it did commit");

    // Once the line is back, the writer finds the batch committed: the member gets it, late,
    // before the next message, and only once; its sender was answered already (no second reply).
    proxy.set_cut(false);
    let after = send_until_acked(&mut sender, &topic, "after");
    let late = parse_live(&member.recv_until(WAIT, is_new_msg), &topic);
    assert_eq!(late.text, "answer lost");
    let next = parse_live(&member.recv_until(WAIT, is_new_msg), &topic);
    assert_eq!(next.text, after);
    assert!(late.id < next.id && late.inserted_at < next.inserted_at);
    // Restamped from the batch's token row: the id and time it was stored with.
    let rows = pg::rows(&db);
    let stored = rows.iter().find(|r| r.body == "answer lost").expect("stored");
    assert_eq!(
        (late.id.as_str(), late.inserted_at.clone()),
        (stored.id.as_str(), format_micros(stored.inserted_at_us))
    );
    assert_eq!(bodies(&db), ["before".to_string(), "answer lost".to_string(), after], "each once, in order");
    sender.heartbeat("no stray replies");
}
