//! Presence on raw frames (docs/protocol.md "Channels" and "Presence"): exact shapes of
//! `presence_state` and `presence_diff`, who receives what and when, one meta per
//! connection-join, leaves exactly once whatever ends a membership (phx_leave, rejoin, close
//! handshake, TCP FIN, TCP reset, idle timeout), and the coalescing of diffs over
//! `NEXUS_PRESENCE_BATCH_MS`.
//!
//! Most tests run with 2 workers and 8+ sockets from distinct ephemeral ports, so members (and
//! topic owners) land on both cores; every member must then see the same sequence of diffs.
//!
//! Nothing waits by sleeping: a test waits for the frame it expects, with a deadline. "No
//! further presence frame" is proven with a barrier: a heartbeat reply (the connection's own
//! core) or, stronger, the join diff of a later joiner (the owner core sends a topic's diffs
//! in one order, so a stray diff would come before it).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::thread;
use std::time::{Duration, Instant};

use sonic_rs::{JsonContainerTrait, JsonValueTrait, Value};

use common::*;

/// How long a test waits for one expected frame (or set of frames).
const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Presence values
// ---------------------------------------------------------------------------------------------

/// One meta as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Meta {
    phx_ref: String,
    online_at: String,
}

/// `user → metas` (metas sorted by phx_ref: their order inside a key is unspecified).
type Presences = BTreeMap<String, Vec<Meta>>;

/// The same as a set of `(user, meta)`.
type Flat = BTreeSet<(String, Meta)>;

fn flat(p: &Presences) -> Flat {
    p.iter().flat_map(|(user, metas)| metas.iter().map(move |m| (user.clone(), m.clone()))).collect()
}

fn unflat(f: &Flat) -> Presences {
    let mut p = Presences::new();
    for (user, meta) in f {
        p.entry(user.clone()).or_default().push(meta.clone());
    }
    for metas in p.values_mut() {
        metas.sort();
    }
    p
}

/// A `presence_diff` payload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Diff {
    joins: Presences,
    leaves: Presences,
}

impl Diff {
    fn join(user: &str, meta: &Meta) -> Diff {
        Diff { joins: Presences::from([(user.to_string(), vec![meta.clone()])]), leaves: Presences::new() }
    }

    fn leave(user: &str, meta: &Meta) -> Diff {
        Diff { joins: Presences::new(), leaves: Presences::from([(user.to_string(), vec![meta.clone()])]) }
    }

    fn metas(&self) -> usize {
        flat(&self.joins).len() + flat(&self.leaves).len()
    }
}

/// A frame on a member's socket.
#[derive(Debug)]
enum Frame {
    /// `presence_state`; `join_ref` is `None` for V1 (which has no join_ref field).
    State {
        join_ref: Option<String>,
        state: Presences,
    },
    Diff(Diff),
    /// Anything else, verbatim.
    Other(String),
}

fn opt_str(v: &Value, text: &str) -> Option<String> {
    if v.is_null() {
        None
    } else {
        Some(v.as_str().unwrap_or_else(|| panic!("expected a string or null in {text}")).to_string())
    }
}

/// Keys of a JSON object, sorted.
fn keys(v: &Value, text: &str) -> Vec<String> {
    let obj = v.as_object().unwrap_or_else(|| panic!("expected an object, got {v:?} in {text}"));
    let mut keys: Vec<String> = obj.iter().map(|(k, _)| k.to_string()).collect();
    keys.sort();
    keys
}

/// `phx_ref`: 16 URL-safe base64 characters (Phoenix's own format).
#[track_caller]
fn check_phx_ref(r: &str, text: &str) {
    assert!(
        r.len() == 16 && r.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
        "phx_ref {r:?} is not 16 URL-safe base64 characters in {text}"
    );
}

/// Parses `{"<user>":{"metas":[{"phx_ref":..,"online_at":..},...]},...}` checking its exact
/// shape: only `metas` per user, a non-empty list, only `phx_ref` and `online_at` per meta.
#[track_caller]
fn parse_presences(v: &Value, text: &str) -> Presences {
    let obj = v.as_object().unwrap_or_else(|| panic!("presences are not an object in {text}"));
    let mut out = Presences::new();
    for (user, p) in obj.iter() {
        let parsed =
            uuid::Uuid::parse_str(user).unwrap_or_else(|e| panic!("key {user:?} is not a user id ({e}): {text}"));
        assert_eq!(parsed.hyphenated().to_string(), user, "user id not lower-case hyphenated in {text}");
        assert_eq!(keys(p, text), ["metas"], "presence of {user} must be exactly {{\"metas\":[...]}} in {text}");
        let metas = p["metas"].as_array().unwrap_or_else(|| panic!("metas of {user} is not an array in {text}"));
        assert!(!metas.is_empty(), "empty metas for {user} in {text}");
        let mut list = Vec::new();
        for m in metas.iter() {
            assert_eq!(keys(m, text), ["online_at", "phx_ref"], "meta fields in {text}");
            let phx_ref = m["phx_ref"].as_str().unwrap_or_else(|| panic!("phx_ref not a string in {text}"));
            let online_at = m["online_at"].as_str().unwrap_or_else(|| panic!("online_at not a string in {text}"));
            check_phx_ref(phx_ref, text);
            check_timestamp(online_at);
            list.push(Meta { phx_ref: phx_ref.to_string(), online_at: online_at.to_string() });
        }
        list.sort();
        let n = list.len();
        list.dedup_by(|a, b| a.phx_ref == b.phx_ref);
        assert_eq!(list.len(), n, "a phx_ref appears twice under {user} in {text}");
        assert!(out.insert(user.to_string(), list).is_none(), "user {user} appears twice in {text}");
    }
    out
}

/// Classifies a frame; presence frames are checked for their exact envelope on `topic`:
/// V2 `[join_ref, null, topic, "presence_state", state]` / `[null, null, topic,
/// "presence_diff", {"joins":..,"leaves":..}]`, V1 `{"topic","event","payload","ref":null}`.
#[track_caller]
fn parse_frame(text: &str, topic: &str) -> Frame {
    let event = event_of(text);
    if !matches!(event.as_deref(), Some("presence_state" | "presence_diff")) {
        return Frame::Other(text.to_string());
    }
    let v = parse(text);
    let (join_ref, reference, t, payload) = if let Some(a) = v.as_array() {
        assert_eq!(a.len(), 5, "a V2 frame has 5 elements: {text}");
        (opt_str(&a[0], text), opt_str(&a[1], text), a[2].as_str().map(str::to_string), &a[4])
    } else {
        assert_eq!(keys(&v, text), ["event", "payload", "ref", "topic"], "V1 frame fields: {text}");
        (None, opt_str(&v["ref"], text), v["topic"].as_str().map(str::to_string), &v["payload"])
    };
    assert_eq!(t.as_deref(), Some(topic), "topic of {text}");
    assert_eq!(reference, None, "presence frames have a null ref: {text}");
    if event.as_deref() == Some("presence_state") {
        Frame::State { join_ref, state: parse_presences(payload, text) }
    } else {
        assert_eq!(join_ref, None, "presence_diff is a broadcast (null join_ref): {text}");
        assert_eq!(keys(payload, text), ["joins", "leaves"], "diff payload: {text}");
        Frame::Diff(Diff {
            joins: parse_presences(&payload["joins"], text),
            leaves: parse_presences(&payload["leaves"], text),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Members
// ---------------------------------------------------------------------------------------------

/// A V2 (or V1) socket that sees presence frames.
#[track_caller]
fn open(port: u16, sub: &str) -> Client {
    let mut c = connect_v2(port, sub);
    c.skip_presence = false;
    c
}

#[track_caller]
fn open_v1(port: u16, sub: &str) -> Client {
    let mut c = connect_v1(port, sub);
    c.skip_presence = false;
    c
}

/// The topic of a V2 or V1 frame.
fn topic_of(text: &str) -> Option<String> {
    let v: Value = sonic_rs::from_str(text).ok()?;
    let t = if v.is_array() { v.get(2)?.as_str()? } else { v.get("topic")?.as_str()? };
    Some(t.to_string())
}

/// Whether `text` is about another conversation than `topic` (a socket in two topics gets
/// the other topic's frames too; they are skipped when reading for this one).
fn other_topic(text: &str, topic: &str) -> bool {
    topic_of(text).is_some_and(|t| t.starts_with("chat:") && !t.eq_ignore_ascii_case(topic))
}

/// The next frame on `c` about `topic` (or not about any topic) before `deadline`.
#[track_caller]
fn next(c: &mut Client, topic: &str, deadline: Instant, what: &str) -> Frame {
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match c.try_recv_text(remaining) {
            Ok(text) if other_topic(&text, topic) => continue,
            Ok(text) => return parse_frame(&text, topic),
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    }
}

/// The next frame must be exactly `expected` (a non-presence frame).
#[track_caller]
fn expect_exact(c: &mut Client, topic: &str, expected: &str, what: &str) {
    match next(c, topic, Instant::now() + WAIT, what) {
        Frame::Other(text) => assert_eq!(text, expected, "{what}"),
        other => panic!("{what}: expected {expected}, got {other:?}"),
    }
}

/// The next frame must be exactly the diff `expected`.
#[track_caller]
fn expect_diff(c: &mut Client, topic: &str, expected: &Diff, what: &str) {
    match next(c, topic, Instant::now() + WAIT, what) {
        Frame::Diff(d) => assert_eq!(&d, expected, "{what}"),
        other => panic!("{what}: expected the diff {expected:?}, got {other:?}"),
    }
}

/// Reads diffs until together they hold exactly `expected` (each diff only part of it, no
/// meta twice); returns them.
#[track_caller]
fn expect_union(c: &mut Client, topic: &str, expected: &Diff, what: &str) -> Vec<Diff> {
    let deadline = Instant::now() + WAIT;
    let (want_j, want_l) = (flat(&expected.joins), flat(&expected.leaves));
    let (mut got_j, mut got_l) = (Flat::new(), Flat::new());
    let mut diffs = Vec::new();
    while got_j != want_j || got_l != want_l {
        match next(c, topic, deadline, what) {
            Frame::Diff(d) => {
                for m in flat(&d.joins) {
                    assert!(want_j.contains(&m) && got_j.insert(m.clone()), "{what}: unexpected join {m:?} in {d:?}");
                }
                for m in flat(&d.leaves) {
                    assert!(want_l.contains(&m) && got_l.insert(m.clone()), "{what}: unexpected leave {m:?} in {d:?}");
                }
                diffs.push(d);
            }
            other => panic!("{what}: expected diffs adding up to {expected:?}, got {other:?}"),
        }
    }
    diffs
}

fn join_frame(v1: bool, topic: &str, jr: &str) -> String {
    if v1 {
        common::v1(Some(jr), Some(jr), topic, "phx_join", "{}")
    } else {
        v2(Some(jr), Some(jr), topic, "phx_join", "{}")
    }
}

fn join_reply(v1: bool, topic: &str, jr: &str) -> String {
    if v1 {
        v1_reply(topic, jr, "ok", "{}")
    } else {
        v2_ok(Some(jr), jr, topic)
    }
}

/// Heartbeat whose reply must be the very next frame (no frame about `topic` before it).
#[track_caller]
fn quiet_heartbeat(c: &mut Client, v1: bool, topic: &str, r#ref: &str, what: &str) {
    let (frame, reply) = if v1 {
        (common::v1(None, Some(r#ref), "phoenix", "heartbeat", "{}"), v1_reply("phoenix", r#ref, "ok", "{}"))
    } else {
        (heartbeat(r#ref), heartbeat_reply(r#ref))
    };
    c.send_text(&frame);
    match next(c, topic, Instant::now() + WAIT, &format!("{what}: heartbeat reply")) {
        Frame::Other(text) => assert_eq!(text, reply, "{what}: a frame arrived before the heartbeat reply"),
        other => panic!("{what}: {other:?} arrived before the heartbeat reply"),
    }
}

/// Joins `topic` when nothing else is changing (`model` is the topic's presence now): the next
/// frame is the exact ok reply; then, in either order, `presence_state` with this join_ref
/// (exactly `model` plus one new meta of `sub`) and the diff with exactly that meta. Diffs
/// flushed before the state (older news the state already reflects) are tolerated before it.
/// Returns the new meta.
#[track_caller]
fn join_and_sync(c: &mut Client, sub: &str, topic: &str, jr: &str, v1: bool, model: &Presences) -> Meta {
    let what = format!("join of {sub} ({jr})");
    c.send_text(&join_frame(v1, topic, jr));
    expect_exact(c, topic, &join_reply(v1, topic, jr), &what);
    let known = flat(model);
    let deadline = Instant::now() + WAIT;
    let (mut state_meta, mut diff_meta) = (None, None);
    while state_meta.is_none() || diff_meta.is_none() {
        match next(c, topic, deadline, &what) {
            Frame::State { join_ref, state } => {
                assert!(state_meta.is_none(), "{what}: second presence_state {state:?}");
                assert_eq!(join_ref.as_deref(), if v1 { None } else { Some(jr) }, "{what}: state join_ref");
                let have = flat(&state);
                let new: Vec<_> = have.difference(&known).cloned().collect();
                assert!(
                    known.is_subset(&have) && new.len() == 1 && new[0].0 == sub,
                    "{what}: state must be the topic's presences plus this connection;\n  state {state:?}\n  known {model:?}"
                );
                state_meta = Some(new[0].1.clone());
            }
            Frame::Diff(d) => {
                let joins = flat(&d.joins);
                if joins.is_subset(&known) && state_meta.is_none() {
                    // Older news, flushed before this join was tracked.
                    assert!(flat(&d.leaves).is_disjoint(&known), "{what}: stale diff {d:?} contradicts {model:?}");
                    continue;
                }
                assert!(diff_meta.is_none(), "{what}: unexpected second diff {d:?}");
                let mine: Vec<_> = joins.difference(&known).cloned().collect();
                assert!(mine.len() == 1 && mine[0].0 == sub, "{what}: own join diff {d:?}");
                assert_eq!(d, Diff::join(sub, &mine[0].1), "{what}: the own join diff holds only this meta");
                diff_meta = Some(mine[0].1.clone());
            }
            Frame::Other(text) => panic!("{what}: unexpected frame {text}"),
        }
    }
    assert_eq!(state_meta, diff_meta, "{what}: the state and the diff must show the same meta");
    state_meta.expect("state seen")
}

/// A joined member.
struct Member {
    c: Client,
    sub: String,
    /// The topic as this member spelled it.
    topic: String,
    jr: String,
    v1: bool,
    meta: Meta,
}

/// How a member goes away.
#[derive(Debug, Clone, Copy)]
enum Gone {
    /// `phx_leave`; the socket stays open.
    Leave,
    /// WebSocket close handshake.
    CloseHandshake,
    /// TCP close (FIN) without a close frame.
    Drop,
    /// TCP reset without a close frame.
    Abort,
    /// `phx_leave`, then a TCP reset right away (one leave only).
    LeaveThenAbort,
}

/// One topic's members and its true presence, for tests that change one thing at a time.
struct Room {
    port: u16,
    topic: String,
    members: Vec<Member>,
    model: Presences,
    seq: usize,
    /// Joins so far (rejoins included), for [`join_cores`].
    joins: usize,
}

impl Room {
    fn new(port: u16) -> Room {
        Room { port, topic: new_topic(), members: Vec::new(), model: Presences::new(), seq: 0, joins: 0 }
    }

    fn fresh_ref(&mut self, prefix: &str) -> String {
        self.seq += 1;
        format!("{prefix}{}", self.seq)
    }

    /// A new socket of `sub` joins; every member (strictly: as its next frame) gets the diff.
    #[track_caller]
    fn join(&mut self, sub: &str) -> usize {
        let c = open(self.port, sub);
        let topic = self.topic.clone();
        self.join_with(c, sub, &topic, false)
    }

    #[track_caller]
    fn join_with(&mut self, mut c: Client, sub: &str, topic: &str, v1: bool) -> usize {
        let jr = self.fresh_ref("j");
        let meta = join_and_sync(&mut c, sub, topic, &jr, v1, &self.model);
        self.joins += 1;
        let diff = Diff::join(sub, &meta);
        for (i, m) in self.members.iter_mut().enumerate() {
            expect_diff(&mut m.c, &m.topic, &diff, &format!("member {i} ({}) seeing {sub} join", m.sub));
        }
        self.model.entry(sub.to_string()).or_default().push(meta.clone());
        self.model.get_mut(sub).expect("just added").sort();
        self.members.push(Member { c, sub: sub.to_string(), topic: topic.to_string(), jr, v1, meta });
        self.members.len() - 1
    }

    /// Member `i` goes away `how`; every remaining member gets exactly its leave. Returns the
    /// socket if it is still open (after a plain phx_leave).
    #[track_caller]
    fn remove(&mut self, i: usize, how: Gone) -> Option<Client> {
        let mut m = self.members.remove(i);
        let what = format!("{:?} of {} ({})", how, m.sub, m.jr);
        let mut kept = None;
        match how {
            Gone::Leave | Gone::LeaveThenAbort => {
                assert!(!m.v1, "leave helper speaks V2");
                m.c.send_text(&v2(Some(&m.jr), Some("99"), &m.topic, "phx_leave", "{}"));
                if let Gone::LeaveThenAbort = how {
                    m.c.abort();
                } else {
                    expect_exact(&mut m.c, &m.topic, &v2_ok(Some(&m.jr), "99", &m.topic), &what);
                    let close = v2(Some(&m.jr), Some(&m.jr), &m.topic, "phx_close", "{}");
                    expect_exact(&mut m.c, &m.topic, &close, &what);
                    // No longer a member: no presence frame (not even its own leave).
                    quiet_heartbeat(&mut m.c, false, &m.topic, "after-leave", &what);
                    kept = Some(m.c);
                }
            }
            Gone::CloseHandshake => {
                m.c.close_handshake();
            }
            Gone::Drop => drop(m.c),
            Gone::Abort => m.c.abort(),
        }
        self.forget(&m.sub, &m.meta, &what);
        kept
    }

    /// A socket that is not one of `members` (it is a member of another room) joins this
    /// topic too; returns its meta here.
    #[track_caller]
    fn join_external(&mut self, c: &mut Client, sub: &str) -> Meta {
        let jr = self.fresh_ref("x");
        let meta = join_and_sync(c, sub, &self.topic, &jr, false, &self.model);
        self.joins += 1;
        let diff = Diff::join(sub, &meta);
        for (i, m) in self.members.iter_mut().enumerate() {
            expect_diff(&mut m.c, &m.topic, &diff, &format!("member {i} ({}) seeing {sub} join", m.sub));
        }
        self.model.entry(sub.to_string()).or_default().push(meta.clone());
        self.model.get_mut(sub).expect("just added").sort();
        meta
    }

    /// `meta` of `sub` went away: every member gets exactly that leave as its next frame.
    #[track_caller]
    fn forget(&mut self, sub: &str, meta: &Meta, what: &str) {
        let metas = self.model.get_mut(sub).expect("member in model");
        let before = metas.len();
        metas.retain(|x| x != meta);
        assert_eq!(metas.len() + 1, before, "{what}: meta in the model");
        if metas.is_empty() {
            self.model.remove(sub);
        }
        let diff = Diff::leave(sub, meta);
        for (j, o) in self.members.iter_mut().enumerate() {
            expect_diff(&mut o.c, &o.topic, &diff, &format!("member {j} ({}) seeing {what}", o.sub));
        }
    }

    /// Member `i` joins the topic again on the same socket (duplicate join): it gets the new
    /// reply, the old membership's phx_close, a state with its new meta instead of the old
    /// one; every member (it included) gets the old meta's leave and the new meta's join, in
    /// one diff or two.
    #[track_caller]
    fn rejoin(&mut self, i: usize) {
        let new_jr = self.fresh_ref("r");
        let m = &mut self.members[i];
        let what = format!("rejoin of {} ({} -> {new_jr})", m.sub, m.jr);
        m.c.send_text(&join_frame(m.v1, &m.topic, &new_jr));
        expect_exact(&mut m.c, &m.topic, &join_reply(m.v1, &m.topic, &new_jr), &what);
        let close = if m.v1 {
            v1_out(&m.topic, "phx_close", "{}", Some(&m.jr))
        } else {
            v2(Some(&m.jr), Some(&m.jr), &m.topic, "phx_close", "{}")
        };
        expect_exact(&mut m.c, &m.topic, &close, &what);
        self.joins += 1;
        let old = (m.sub.clone(), m.meta.clone());
        let mut rest = flat(&self.model);
        assert!(rest.remove(&old), "{what}: old meta in the model");

        // The rejoiner: its new state and its new meta's join diff. The old meta's leave may
        // reach it too (before or with the join), or not at all when it was sent before the
        // new state: the state already lacks the old meta.
        let deadline = Instant::now() + WAIT;
        let mut new_meta: Option<Meta> = None;
        let (mut joins, mut leaves) = (Flat::new(), Flat::new());
        while new_meta.is_none() || joins.is_empty() {
            match next(&mut m.c, &m.topic, deadline, &what) {
                Frame::State { join_ref, state } => {
                    assert!(new_meta.is_none(), "{what}: second state");
                    assert_eq!(join_ref.as_deref(), if m.v1 { None } else { Some(new_jr.as_str()) }, "{what}");
                    let have = flat(&state);
                    let new: Vec<_> = have.difference(&rest).cloned().collect();
                    assert!(
                        rest.is_subset(&have) && new.len() == 1 && new[0].0 == m.sub,
                        "{what}: state {state:?} must be {rest:?} plus one new meta"
                    );
                    assert_ne!(new[0].1.phx_ref, old.1.phx_ref, "{what}: a rejoin gets a fresh phx_ref");
                    new_meta = Some(new[0].1.clone());
                }
                Frame::Diff(d) => {
                    for x in flat(&d.joins) {
                        assert!(x.0 == m.sub && !rest.contains(&x) && joins.insert(x), "{what}: diff {d:?}");
                    }
                    for x in flat(&d.leaves) {
                        assert!(x == old && leaves.insert(x), "{what}: diff {d:?}");
                    }
                }
                Frame::Other(text) => panic!("{what}: unexpected frame {text}"),
            }
        }
        let new_meta = new_meta.expect("state seen");
        assert_eq!(joins, Flat::from([(m.sub.clone(), new_meta.clone())]), "{what}: joined meta");
        let expected = Diff { joins: unflat(&joins), leaves: unflat(&Flat::from([old.clone()])) };
        m.jr = new_jr;
        m.meta = new_meta.clone();
        rest.insert((m.sub.clone(), new_meta));
        self.model = unflat(&rest);
        for (j, o) in self.members.iter_mut().enumerate() {
            if j != i {
                expect_union(&mut o.c, &o.topic, &expected, &format!("member {j} ({}) seeing {what}", o.sub));
            }
        }
    }

    /// Every member: the heartbeat reply is the next frame (no presence frame pending).
    #[track_caller]
    fn quiet(&mut self, label: &str) {
        for (i, m) in self.members.iter_mut().enumerate() {
            quiet_heartbeat(&mut m.c, m.v1, &m.topic, &format!("{label}-{i}"), &format!("{label}: member {i}"));
        }
    }

    /// A fresh user joins: its state must be exactly the model (plus itself) and every member's
    /// next presence frame must be its join: no stray diff was pending anywhere.
    #[track_caller]
    fn sentinel(&mut self) -> usize {
        self.join(&new_sub())
    }
}

/// A server with 2 workers (start_server's default) that logs each join with its core.
#[track_caller]
fn start(env: &[(&str, &str)]) -> Server {
    let mut env = env.to_vec();
    env.push(("RUST_LOG", "debug"));
    start_server(&env)
}

/// `core → joins` of `topic` from the server's debug log, once it holds at least `joins`
/// lines (the log is read by another thread; bounded wait, no sleep).
fn join_cores(server: &Server, topic: &str, joins: usize) -> BTreeMap<String, usize> {
    let topic = format!("topic={}", topic.to_lowercase());
    let deadline = Instant::now() + WAIT;
    loop {
        let mut cores = BTreeMap::new();
        for line in server.logs().lines() {
            if line.contains(" joined ") && line.to_lowercase().contains(&topic) {
                let core = line.split_whitespace().find_map(|w| w.strip_prefix("core=")).unwrap_or("?");
                *cores.entry(core.to_string()).or_insert(0) += 1;
            }
        }
        if cores.values().sum::<usize>() >= joins || Instant::now() > deadline {
            return cores;
        }
        thread::yield_now();
    }
}

/// Says (on stderr) how the joins of `topic` spread over the cores.
fn report_cores(server: &Server, topic: &str, joins: usize) {
    eprintln!("joins of {topic} per core: {:?}", join_cores(server, topic, joins));
}

fn users(n: usize) -> Vec<String> {
    (0..n).map(|_| new_sub()).collect()
}

// ---------------------------------------------------------------------------------------------
// Shapes and basic flow
// ---------------------------------------------------------------------------------------------

#[test]
fn joiner_gets_a_state_with_itself_and_its_own_join_diff() {
    let server = start(&[]);
    let mut refs = BTreeSet::new();
    // One topic per socket: owners and joiners spread over both cores.
    for i in 0..8 {
        let (sub, topic, jr) = (new_sub(), new_topic(), format!("{}", 3 + i));
        let mut c = open(server.port, &sub);
        c.send_text(&v2(Some(&jr), Some(&jr), &topic, "phx_join", "{}"));
        // Phoenix order: the reply comes first.
        expect_exact(&mut c, &topic, &v2_ok(Some(&jr), &jr, &topic), "join reply");
        let (mut state, mut diff) = (None, None);
        let deadline = Instant::now() + WAIT;
        while state.is_none() || diff.is_none() {
            match next(&mut c, &topic, deadline, "state and own diff") {
                Frame::State { join_ref, state: s } => {
                    assert!(state.is_none(), "second presence_state {s:?}");
                    assert_eq!(join_ref.as_deref(), Some(jr.as_str()), "state is pushed with the join_ref");
                    state = Some(s);
                }
                Frame::Diff(d) => {
                    assert!(diff.is_none(), "second presence_diff {d:?}");
                    diff = Some(d);
                }
                Frame::Other(text) => panic!("unexpected frame {text}"),
            }
        }
        let state = state.expect("state");
        assert_eq!(state.keys().collect::<Vec<_>>(), [&sub], "the state holds exactly the joiner: {state:?}");
        assert_eq!(state[&sub].len(), 1, "one meta for one connection: {state:?}");
        let meta = &state[&sub][0];
        assert_eq!(diff.expect("diff"), Diff::join(&sub, meta), "own join diff: exactly the same meta, no leaves");
        assert!(refs.insert(meta.phx_ref.clone()), "phx_ref {} reused", meta.phx_ref);
        // Nothing else follows.
        quiet_heartbeat(&mut c, false, &topic, "hb", "after the join");
    }
}

/// The window coalesces changes that follow a flush, not the first one: a join into a quiet room
/// gets its `presence_state` at once even with a one-second window (waiting for the window would
/// take the whole second; half of it is the bound checked here).
#[test]
fn a_quiet_rooms_joiner_does_not_wait_for_the_window() {
    let server = start(&[("NEXUS_PRESENCE_BATCH_MS", "1000")]);
    for i in 0..4 {
        let (sub, topic, jr) = (new_sub(), new_topic(), format!("{}", 3 + i));
        let mut c = open(server.port, &sub);
        c.send_text(&v2(Some(&jr), Some(&jr), &topic, "phx_join", "{}"));
        expect_exact(&mut c, &topic, &v2_ok(Some(&jr), &jr, &topic), "join reply");
        let replied = Instant::now();
        match next(&mut c, &topic, replied + WAIT, "presence_state") {
            Frame::State { .. } => {}
            other => panic!("expected the presence_state first, got {other:?}"),
        }
        let waited = replied.elapsed();
        assert!(
            waited < Duration::from_millis(500),
            "join {i}: presence_state after {waited:?}: it waited for the window"
        );
    }
}

#[test]
fn members_see_each_join_and_a_joiner_sees_everyone() {
    const N: usize = 20;
    let server = start(&[]);
    let mut room = Room::new(server.port);
    // join() checks each joiner's state (everyone so far plus itself, exact metas) and that
    // every earlier member gets exactly the new meta as its next frame.
    for sub in users(N) {
        room.join(&sub);
    }
    assert_eq!(room.model.len(), N);
    assert!(room.model.values().all(|m| m.len() == 1));
    room.quiet("end");
    // 20 sockets from distinct ports all on one of two listeners: chance 2^-19.
    let cores = join_cores(&server, &room.topic, N);
    assert_eq!(cores.len(), 2, "members must be on both cores for this test to mean anything: {cores:?}");
}

#[test]
fn same_user_on_many_sockets_has_one_meta_per_socket() {
    let server = start(&[]);
    let mut room = Room::new(server.port);
    room.join(&new_sub()); // an observer, another user
    let user = new_sub();
    for _ in 0..7 {
        room.join(&user);
    }
    room.join(&new_sub()); // a second observer
    assert_eq!(room.model[&user].len(), 7, "seven sockets, seven metas under one key: {:?}", room.model);
    // The last sockets' states (checked by join) listed all seven; now four go one by one.
    let sockets_of = |room: &Room| room.members.iter().position(|m| m.sub == user).expect("a socket of user");
    for how in [Gone::CloseHandshake, Gone::Drop, Gone::Abort, Gone::Leave] {
        let i = sockets_of(&room);
        room.remove(i, how);
        room.quiet(&format!("{how:?}"));
    }
    assert_eq!(room.model[&user].len(), 3);
    // A later joiner's state proves the user's three other metas remain.
    room.sentinel();
    room.quiet("end");
    report_cores(&server, &room.topic, room.joins);
}

#[test]
fn phx_leave_sends_the_leave_to_the_remaining_members_and_a_rejoin_gets_a_new_state() {
    let server = start(&[]);
    let mut room = Room::new(server.port);
    for sub in users(10) {
        room.join(&sub);
    }
    for i in [0, 3, 7] {
        let sub = room.members[i].sub.clone();
        let c = room.remove(i, Gone::Leave).expect("socket kept");
        room.quiet("after leave");
        // Same socket, same topic again: a full state with a fresh meta.
        let topic = room.topic.clone();
        room.join_with(c, &sub, &topic, false);
    }
    room.sentinel();
    room.quiet("end");
    report_cores(&server, &room.topic, room.joins);
}

fn duplicate_join(env: &[(&str, &str)]) {
    let server = start(env);
    let mut room = Room::new(server.port);
    for sub in users(10) {
        room.join(&sub);
    }
    for i in [1, 4, 6, 9] {
        room.rejoin(i);
        room.quiet("after rejoin");
    }
    // The same member twice in a row.
    room.rejoin(6);
    room.sentinel();
    room.quiet("end");
    report_cores(&server, &room.topic, room.joins);
}

#[test]
fn duplicate_join_leaves_the_old_meta_and_joins_a_new_one() {
    duplicate_join(&[]);
}

#[test]
fn duplicate_join_without_batching() {
    // With no window the leave and the join are two diffs (the leave may even precede the
    // rejoiner's state).
    duplicate_join(&[("NEXUS_PRESENCE_BATCH_MS", "0")]);
}

#[test]
fn every_way_of_going_away_leaves_exactly_once() {
    let server = start(&[]);
    let mut room = Room::new(server.port);
    for sub in users(10) {
        room.join(&sub);
    }
    // remove() checks that every remaining member's next frame is exactly that leave;
    // quiet() that nothing follows it on the member's core; sentinel() that nothing more was
    // pending at the owner (a second leave sent when the socket ended would come before the
    // sentinel's join: the leave awaited here is itself sent when the socket ends, except
    // after a phx_leave, which the two-topic test below covers).
    for how in [Gone::Drop, Gone::Abort, Gone::CloseHandshake, Gone::Leave, Gone::LeaveThenAbort] {
        room.remove(2, how);
        room.quiet(&format!("{how:?}"));
        room.sentinel();
    }
    // A member that rejoined, then drops: the new meta leaves once, the old one never again.
    room.rejoin(1);
    room.remove(1, Gone::Abort);
    room.sentinel();
    room.quiet("end");
    report_cores(&server, &room.topic, room.joins);
}

#[test]
fn a_socket_in_two_topics_leaves_each_exactly_once() {
    let server = start(&[]);
    let (mut a, mut b) = (Room::new(server.port), Room::new(server.port));
    for _ in 0..5 {
        a.join(&new_sub());
        b.join(&new_sub());
    }
    // Four sockets in both topics: members of `a`, tracked by hand in `b`.
    let mut both = Vec::new();
    for _ in 0..4 {
        let sub = new_sub();
        let i = a.join(&sub);
        let meta_b = b.join_external(&mut a.members[i].c, &sub);
        both.push((sub, meta_b));
    }
    let index = |a: &Room, sub: &str| a.members.iter().position(|m| m.sub == sub).expect("member of a");
    // The leave in `b` is sent when the socket ends, so once `b`'s members saw it, any second
    // leave in `a` from the socket's end was sent too, before the sentinel's join.
    let check = |a: &mut Room, b: &mut Room, label: &str| {
        a.sentinel();
        b.sentinel();
        a.quiet(label);
        b.quiet(label);
    };

    // phx_leave on `a` (awaited), then the socket closes: `b` sees the close, `a` nothing more.
    let (sub, meta_b) = &both[0];
    let c = a.remove(index(&a, sub), Gone::Leave).expect("socket kept");
    drop(c);
    b.forget(sub, meta_b, "close after leaving a");
    check(&mut a, &mut b, "leave+close");

    // phx_leave on `a` and a reset at once.
    let (sub, meta_b) = &both[1];
    a.remove(index(&a, sub), Gone::LeaveThenAbort);
    b.forget(sub, meta_b, "reset right after leaving a");
    check(&mut a, &mut b, "leave+reset");

    // Rejoin `a`, then the close handshake: `a` loses the new meta once, `b` its meta.
    let (sub, meta_b) = &both[2];
    a.rejoin(index(&a, sub));
    a.remove(index(&a, sub), Gone::CloseHandshake);
    b.forget(sub, meta_b, "close after rejoining a");
    check(&mut a, &mut b, "rejoin+close");

    // A reset leaves both.
    let (sub, meta_b) = &both[3];
    a.remove(index(&a, sub), Gone::Abort);
    b.forget(sub, meta_b, "reset");
    check(&mut a, &mut b, "reset");
    report_cores(&server, &a.topic, a.joins);
    report_cores(&server, &b.topic, b.joins);
}

#[test]
fn topic_spelling_and_serializer_are_per_member() {
    let server = start(&[]);
    let mut room = Room::new(server.port);
    let upper = format!("chat:{}", room.topic["chat:".len()..].to_uppercase());
    let topic = room.topic.clone();
    for i in 0..10 {
        let sub = new_sub();
        let (c, v1) = if i % 3 == 2 { (open_v1(server.port, &sub), true) } else { (open(server.port, &sub), false) };
        let spelling = if i % 2 == 0 { &topic } else { &upper };
        room.join_with(c, &sub, spelling, v1);
    }
    room.remove(0, Gone::Abort);
    room.rejoin(1);
    room.rejoin(2); // a V1 member
    room.sentinel();
    room.quiet("end");
    report_cores(&server, &room.topic, room.joins);
}

// ---------------------------------------------------------------------------------------------
// Idle timeout
// ---------------------------------------------------------------------------------------------

#[test]
fn idle_members_leave_within_the_timeout() {
    const OBSERVERS: usize = 4;
    const VICTIMS: usize = 4;
    // Never before the timeout; at most two coarse-clock sweeps (250 ms) and a margin after it.
    const IDLE: Duration = Duration::from_secs(1);
    const LEAVE_LATEST: Duration = Duration::from_millis(1_000 + 2 * 250 + 400);
    let server = start(&[("NEXUS_IDLE_TIMEOUT", "1")]);
    let mut room = Room::new(server.port);
    // Each member's last bytes are sent after this instant (its connect and join).
    let mut quiet_from = std::collections::HashMap::new();
    for _ in 0..OBSERVERS + VICTIMS {
        let sub = new_sub();
        quiet_from.insert(sub.clone(), Instant::now());
        room.join(&sub);
    }
    // Even members go silent (never read nor write again); odd ones keep beating.
    let last_activity = Instant::now();
    let mut victims = Vec::new();
    let mut observers = Vec::new();
    for (i, m) in room.members.drain(..).enumerate() {
        if i % 2 == 0 {
            victims.push(m);
        } else {
            observers.push(m);
        }
    }
    let gone: Flat = victims.iter().map(|m| (m.sub.clone(), m.meta.clone())).collect();
    // Observers that saw every leave keep beating until all have: one that went quiet while
    // another still waits would be closed as idle itself.
    let finished = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));

    let handles: Vec<_> = observers
        .into_iter()
        .map(|mut m| {
            let gone = gone.clone();
            let quiet_from = quiet_from.clone();
            let finished = finished.clone();
            thread::spawn(move || {
                let deadline = last_activity + Duration::from_secs(6);
                let mut left = Flat::new();
                let mut diffs = Vec::new();
                let mut all_left = Duration::MAX;
                let mut beat = 0;
                // Beat every ~250 ms (timeout 1 s) while waiting for the leaves.
                while left != gone || finished.load(std::sync::atomic::Ordering::SeqCst) < OBSERVERS {
                    assert!(Instant::now() < deadline, "observer {}: leaves so far {left:?}", m.sub);
                    beat += 1;
                    m.c.send_text(&heartbeat(&format!("{beat}")));
                    let until = Instant::now() + Duration::from_millis(250);
                    loop {
                        let remaining = until.saturating_duration_since(Instant::now());
                        let text = match m.c.try_recv_text(remaining) {
                            Ok(text) => text,
                            Err(e) if e.starts_with("timeout") => break,
                            Err(e) => panic!("observer {} lost its socket: {e}", m.sub),
                        };
                        match parse_frame(&text, &m.topic) {
                            Frame::Diff(d) => {
                                assert!(d.joins.is_empty(), "only leaves expected: {d:?}");
                                for x in flat(&d.leaves) {
                                    let quiet = quiet_from[&x.0].elapsed();
                                    assert!(quiet >= IDLE, "{} left {quiet:?} after its last activity", x.0);
                                    assert!(
                                        gone.contains(&x),
                                        "observer {}: leave of a non-idle member in {d:?}",
                                        m.sub
                                    );
                                    assert!(
                                        left.insert(x),
                                        "observer {}: second leave in {d:?}; earlier {diffs:?}",
                                        m.sub
                                    );
                                }
                                diffs.push(d);
                                if left == gone {
                                    all_left = last_activity.elapsed(); // not at the next beat
                                    finished.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                }
                            }
                            Frame::Other(t) if t.contains("\"phoenix\",\"phx_reply\"") => {}
                            other => panic!("observer {}: unexpected {other:?}", m.sub),
                        }
                    }
                }
                (m, all_left, diffs)
            })
        })
        .collect();
    // Every observer is kept open (and beating) until all are done (a closing one would be a
    // leave the others do not expect).
    let results: Vec<_> =
        handles.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect();
    let mut seen = Vec::new();
    for (mut m, elapsed, diffs) in results {
        eprintln!("observer saw all {VICTIMS} idle leaves {elapsed:?} after their last activity");
        assert!(elapsed <= LEAVE_LATEST, "idle leaves took {elapsed:?} for a timeout of {IDLE:?}");
        // Still alive, nothing more pending on its core.
        quiet_heartbeat(&mut m.c, false, &m.topic, "end", "observer after the idle leaves");
        seen.push((m, diffs));
    }
    let seen: Vec<Vec<Diff>> = seen.into_iter().map(|(_, d)| d).collect();
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "observers saw different diff sequences: {seen:#?}");
    for mut v in victims {
        assert_eq!(v.c.expect_close(WAIT), Some(1001), "an idle socket is closed with 1001");
    }
    report_cores(&server, &room.topic, room.joins);
}

// ---------------------------------------------------------------------------------------------
// Coalescing
// ---------------------------------------------------------------------------------------------

/// Observers watch 10 sockets join back-to-back (9 users, one of them on two sockets); returns
/// the diffs every observer saw (identical for all) after checking everyone's view.
fn join_storm(batch_ms: &str) -> Vec<Diff> {
    const STORM: usize = 10;
    let server = start(&[("NEXUS_PRESENCE_BATCH_MS", batch_ms)]);
    let mut room = Room::new(server.port);
    for _ in 0..4 {
        room.join(&new_sub());
    }
    let mut subs = users(STORM - 1);
    subs.push(subs[STORM - 2].clone());
    let mut storm: Vec<(String, String, Client)> =
        subs.iter().enumerate().map(|(i, s)| (s.clone(), format!("s{i}"), open(server.port, s))).collect();
    let topic = room.topic.clone();
    for (_, jr, c) in &mut storm {
        c.send_text(&v2(Some(jr), Some(jr), &topic, "phx_join", "{}"));
    }

    // Observers: diffs that add up to the 10 new metas, nothing else, same sequence for all.
    let mut sequences = Vec::new();
    for (i, m) in room.members.iter_mut().enumerate() {
        let deadline = Instant::now() + WAIT;
        let mut joined = Flat::new();
        let mut diffs = Vec::new();
        while joined.len() < STORM {
            match next(&mut m.c, &m.topic, deadline, &format!("observer {i}: storm joins ({joined:?})")) {
                Frame::Diff(d) => {
                    assert!(d.leaves.is_empty(), "no leaves in a join storm: {d:?}");
                    for x in flat(&d.joins) {
                        assert!(subs.contains(&x.0) && joined.insert(x), "observer {i}: unexpected join in {d:?}");
                    }
                    diffs.push(d);
                }
                other => panic!("observer {i}: unexpected {other:?}"),
            }
        }
        sequences.push(diffs);
    }
    for s in &sequences[1..] {
        assert_eq!(s, &sequences[0], "members on both cores must get the same diff sequence");
    }
    let diffs = sequences.swap_remove(0);
    let storm_metas: Flat = diffs.iter().flat_map(|d| flat(&d.joins)).collect();
    let by_user = unflat(&storm_metas);
    assert_eq!(by_user.len(), STORM - 1, "9 users: {by_user:?}");
    assert_eq!(by_user[&subs[STORM - 1]].len(), 2, "the user on two sockets has two metas: {by_user:?}");
    let before: Flat = flat(&room.model);
    let all: Flat = before.union(&storm_metas).cloned().collect();

    // A sentinel: its state is everything; every observer's next frame is its join.
    room.model = unflat(&all);
    room.sentinel();
    let sentinel = room.members.last().expect("sentinel");
    let sentinel_join = Diff::join(&sentinel.sub, &sentinel.meta);
    let mut everything = all.clone();
    everything.insert((sentinel.sub.clone(), sentinel.meta.clone()));

    // Each storm socket: reply first, one state (with its join_ref), then diffs up to the
    // sentinel's join; the state plus the diffs is exactly everything (what the JS helper
    // would show).
    for (sub, jr, c) in &mut storm {
        let what = format!("storm socket {jr}");
        expect_exact(c, &topic, &v2_ok(Some(jr), jr, &topic), &what);
        let deadline = Instant::now() + WAIT;
        let mut state = None;
        let mut view = Flat::new();
        loop {
            match next(c, &topic, deadline, &what) {
                Frame::State { join_ref, state: s } => {
                    assert!(state.is_none(), "{what}: second state");
                    assert_eq!(join_ref.as_deref(), Some(jr.as_str()), "{what}");
                    assert!(s.contains_key(sub.as_str()), "{what}: state without itself: {s:?}");
                    let s = flat(&s);
                    assert!(s.is_subset(&all), "{what}: state {s:?}");
                    view.extend(s.iter().cloned());
                    state = Some(s);
                }
                Frame::Diff(d) if d == sentinel_join => break,
                Frame::Diff(d) => {
                    assert!(d.leaves.is_empty(), "{what}: {d:?}");
                    let j = flat(&d.joins);
                    assert!(j.is_subset(&storm_metas), "{what}: {d:?}");
                    view.extend(j);
                }
                Frame::Other(t) => panic!("{what}: unexpected {t}"),
            }
        }
        assert!(state.is_some(), "{what}: no presence_state before the sentinel's join");
        view.insert((sentinel.sub.clone(), sentinel.meta.clone()));
        assert_eq!(view, everything, "{what}: state + diffs must show everyone");
        quiet_heartbeat(c, false, &topic, "end", &what);
    }
    room.quiet("end");
    report_cores(&server, &room.topic, room.joins + STORM);
    diffs
}

#[test]
fn without_batching_every_join_is_its_own_diff() {
    let diffs = join_storm("0");
    assert_eq!(diffs.len(), 10, "one diff per join: {diffs:#?}");
    assert!(diffs.iter().all(|d| d.metas() == 1), "{diffs:#?}");
}

#[test]
fn a_batch_window_coalesces_a_join_storm() {
    let diffs = join_storm("300");
    eprintln!("10 back-to-back joins in {} diff(s)", diffs.len());
    assert!(diffs.len() < 10, "a 300 ms window must coalesce 10 back-to-back joins: {diffs:#?}");
    // The socket pair of one user, if in one diff, is grouped under one key.
    for d in &diffs {
        assert_eq!(flat(&d.joins).len(), d.joins.values().map(Vec::len).sum::<usize>());
    }
}

#[test]
fn a_join_and_leave_inside_one_window_is_never_sent() {
    let server = start(&[("NEXUS_PRESENCE_BATCH_MS", "300")]);
    let mut room = Room::new(server.port);
    for _ in 0..6 {
        room.join(&new_sub());
    }
    let topic = room.topic.clone();
    // Several flickers: join and leave back-to-back.
    let flickers: Vec<String> = users(4);
    for (i, sub) in flickers.iter().enumerate() {
        let mut c = open(server.port, sub);
        let jr = format!("f{i}");
        c.send_text(&v2(Some(&jr), Some(&jr), &topic, "phx_join", "{}"));
        c.send_text(&v2(Some(&jr), Some("l"), &topic, "phx_leave", "{}"));
        expect_exact(&mut c, &topic, &v2_ok(Some(&jr), &jr, &topic), "flicker join reply");
        // The state may or may not reach it (it may already have left); no diff does.
        let deadline = Instant::now() + WAIT;
        loop {
            match next(&mut c, &topic, deadline, "flicker leave") {
                Frame::Other(t) => {
                    assert_eq!(t, v2_ok(Some(&jr), "l", &topic), "flicker leave reply");
                    break;
                }
                Frame::State { join_ref, .. } => assert_eq!(join_ref.as_deref(), Some(jr.as_str())),
                Frame::Diff(d) => panic!("a flicker is no member when diffs arrive: {d:?}"),
            }
        }
        expect_exact(&mut c, &topic, &v2(Some(&jr), Some(&jr), &topic, "phx_close", "{}"), "flicker close");
    }
    // The sentinel's join is the next (and only) diff every member gets; its state shows no
    // flicker.
    room.sentinel();
    room.quiet("end");
    report_cores(&server, &room.topic, room.joins + flickers.len());
}

/// What the JS Presence helper does with a diff: joins first (a known phx_ref is not added
/// twice), then leaves (unknown ones ignored).
fn apply(view: &mut Flat, d: &Diff) {
    view.extend(flat(&d.joins));
    for x in flat(&d.leaves) {
        view.remove(&x);
    }
}

#[test]
fn a_join_and_leave_inside_the_window_never_leaves_a_ghost() {
    // X joins, Y joins, X leaves, all inside one window. If Y's presence_state lists X (a
    // state built before X left) while the coalesced diff drops X's join and leave as
    // cancelling out, Y keeps a ghost of X forever. Whatever the server does, Y's list (its
    // state plus its diffs, as the JS helper applies them) must end as the truth: a later
    // sentinel's state. The window is long (1 s) so all of it happens inside it.
    let server = start(&[("NEXUS_PRESENCE_BATCH_MS", "1000")]);
    let mut room = Room::new(server.port);
    for _ in 0..2 {
        room.join(&new_sub());
    }
    let topic = room.topic.clone();
    let before = flat(&room.model);
    let (x, y, s) = (new_sub(), new_sub(), new_sub());
    let (mut cx, mut cy, mut cs) = (open(server.port, &x), open(server.port, &y), open(server.port, &s));

    cx.send_text(&v2(Some("x1"), Some("x1"), &topic, "phx_join", "{}"));
    expect_exact(&mut cx, &topic, &v2_ok(Some("x1"), "x1", &topic), "X join reply");
    cy.send_text(&v2(Some("y1"), Some("y1"), &topic, "phx_join", "{}"));
    expect_exact(&mut cy, &topic, &v2_ok(Some("y1"), "y1", &topic), "Y join reply");
    // Y's state may already be here (a server that answers at once) or come with the window.
    cx.send_text(&v2(Some("x1"), Some("x2"), &topic, "phx_leave", "{}"));
    let deadline = Instant::now() + WAIT;
    loop {
        match next(&mut cx, &topic, deadline, "X leave reply") {
            Frame::Other(t) => {
                assert_eq!(t, v2_ok(Some("x1"), "x2", &topic), "X leave reply");
                break;
            }
            Frame::State { .. } => {} // X's own state, if it came before the leave
            Frame::Diff(d) => panic!("X: unexpected diff before its leave reply: {d:?}"),
        }
    }

    // The sentinel: its state is the truth.
    cs.send_text(&v2(Some("s1"), Some("s1"), &topic, "phx_join", "{}"));
    expect_exact(&mut cs, &topic, &v2_ok(Some("s1"), "s1", &topic), "sentinel join reply");
    let truth = loop {
        match next(&mut cs, &topic, Instant::now() + WAIT, "sentinel state") {
            Frame::State { state, .. } => break flat(&state),
            Frame::Diff(_) => {} // tolerated here: another test is about diffs before the state
            other => panic!("sentinel: unexpected {other:?}"),
        }
    };
    let meta_of = |u: &str| truth.iter().find(|(v, _)| v == u).map(|(_, m)| m.clone());
    let (s_meta, y_meta) = (meta_of(&s).expect("sentinel in its own state"), meta_of(&y).expect("Y in the state"));
    let mut expected = before.clone();
    expected.insert((y.clone(), y_meta));
    expected.insert((s.clone(), s_meta.clone()));
    assert_eq!(truth, expected, "the sentinel's state: the members, Y and itself, no X");

    // Y: state and diffs up to the sentinel's join, applied like the JS helper.
    let deadline = Instant::now() + WAIT;
    let (mut y_view, mut got_state, mut frames) = (Flat::new(), false, Vec::new());
    while !(got_state && y_view.contains(&(s.clone(), s_meta.clone()))) {
        let frame = next(&mut cy, &topic, deadline, "Y: its state and the diffs up to the sentinel's join");
        match &frame {
            Frame::State { state, .. } => {
                assert!(!got_state, "Y: second state");
                got_state = true;
                y_view = flat(state);
            }
            Frame::Diff(d) if got_state => apply(&mut y_view, d),
            Frame::Diff(_) => {} // before the state: see no_diff_reaches_a_joiner_before_its_state
            Frame::Other(t) => panic!("Y: unexpected {t}"),
        }
        frames.push(frame);
    }
    assert_eq!(y_view, truth, "Y's presence list keeps a ghost; frames Y got: {frames:#?}");
    // The earlier members reach the truth by diffs alone.
    for (i, m) in room.members.iter_mut().enumerate() {
        let mut view = before.clone();
        let deadline = Instant::now() + WAIT;
        while view != truth {
            match next(&mut m.c, &topic, deadline, &format!("member {i}: diffs up to the truth ({view:?})")) {
                Frame::Diff(d) => apply(&mut view, &d),
                other => panic!("member {i}: unexpected {other:?}"),
            }
        }
    }
    room.quiet("end");
}

#[test]
fn no_diff_reaches_a_joiner_before_its_state() {
    // docs/protocol.md "Join": reply, then presence_state, then diffs. A diff the joiner gets before its
    // state is old news the state already holds, but the JS helper buffers it as a "pending
    // diff" and, if the socket rejoins before that state arrives, applies it after the next
    // join's state: a ghost (found by presence_churn.test.js). Concurrent joins, no window:
    // every diff is flushed at once, so other joins' diffs race each joiner's state.
    const STORM: usize = 30;
    let server = start(&[("NEXUS_PRESENCE_BATCH_MS", "0")]);
    let mut room = Room::new(server.port);
    for _ in 0..2 {
        room.join(&new_sub());
    }
    let topic = room.topic.clone();
    let mut storm: Vec<(String, Client)> =
        (0..STORM).map(|i| (format!("s{i}"), open(server.port, &new_sub()))).collect();
    for (jr, c) in &mut storm {
        c.send_text(&v2(Some(jr), Some(jr), &topic, "phx_join", "{}"));
    }
    let mut early = Vec::new();
    for (jr, c) in &mut storm {
        expect_exact(c, &topic, &v2_ok(Some(jr), jr, &topic), "join reply");
        match next(c, &topic, Instant::now() + WAIT, "the first presence frame") {
            Frame::State { join_ref, .. } => assert_eq!(join_ref.as_deref(), Some(jr.as_str())),
            Frame::Diff(d) => early.push((jr.clone(), d)),
            Frame::Other(t) => panic!("{jr}: unexpected {t}"),
        }
    }
    assert!(
        early.is_empty(),
        "{} of {STORM} joiners got a presence_diff before their presence_state: {early:#?}",
        early.len()
    );
}
