//! The session's rules as tables: frames in, effects out (each effect rendered as text, frames
//! as their exact JSON). One row per rule of docs/protocol.md "Channels", plus the bad input
//! a socket may send. No sockets, no threads, no clock.

use super::*;
use crate::ws::Message;

const C: &str = "0195f1b2-7c3a-7d4e-8f00-123456789abc";
const T: &str = "chat:0195f1b2-7c3a-7d4e-8f00-123456789abc";
const T2: &str = "chat:0195f1b2-7c3a-7d4e-8f00-000000000002";
const USER: Uuid = Uuid::from_u128(0x0195f1b2_0000_7000_8000_000000000001);

/// A session with its surroundings.
struct Harness {
    session: Session,
    refs: RefMaker,
    counters: Counters,
    now_ms: u64,
    limits: Limits,
    joins_refused: bool,
    access: Access,
    grants: Vec<Uuid>,
}

const SECRET: &[u8] = b"session-test-secret-0123456789abcdef";

impl Harness {
    fn new(vsn: Vsn) -> Harness {
        Harness {
            session: Session::new(USER, vsn),
            refs: RefMaker::new(0),
            counters: Counters::default(),
            now_ms: 0,
            limits: Limits { max_channels: 100, msg_rate: 0 },
            joins_refused: false,
            access: Access::start(&crate::config::JoinPolicy::Open, SECRET, 0).expect("open policy"),
            grants: Vec::new(),
        }
    }

    /// A harness under `policy`.
    fn with_policy(policy: crate::config::JoinPolicy) -> Harness {
        Harness { access: Access::start(&policy, SECRET, 0).expect("policy starts"), ..Harness::new(Vsn::V2) }
    }

    fn env(&mut self) -> Env<'_> {
        Env {
            now_ms: self.now_ms,
            limits: self.limits,
            refs: &mut self.refs,
            counters: &self.counters,
            joins_refused: self.joins_refused,
            access: &self.access,
            grants: &self.grants,
            core: 0,
            conn: 0,
        }
    }

    fn message(&mut self, msg: Message<'_>) -> Vec<String> {
        let mut out = Vec::new();
        let mut session = std::mem::replace(&mut self.session, Session::new(USER, Vsn::V2));
        session.on_message(msg, &mut self.env(), &mut out);
        self.session = session;
        out.iter().flat_map(|e| render(e, self.session.vsn())).collect()
    }

    fn text(&mut self, text: &str) -> Vec<String> {
        self.message(Message::Text(text.into()))
    }
}

/// A frame as one line: its JSON text (control frames by opcode).
fn render_frame(frame: &[u8]) -> String {
    match frame[0] {
        0x81 => String::from_utf8(wire::frame_payload(frame).to_vec()).expect("UTF-8 text frame"),
        0x8a => format!("pong {:?}", String::from_utf8_lossy(wire::frame_payload(frame))),
        other => format!("frame {other:#x}"),
    }
}

/// An effect as lines: frames as their JSON text, the rest by what they say (a join, then the
/// reply it carries).
fn render(e: &Effect, vsn: Vsn) -> Vec<String> {
    let line = match e {
        Effect::Send(frame) => render_frame(frame),
        Effect::Join { conversation, topic, join_ref, reply, .. } => {
            return vec![format!("join {conversation} {topic} {}", &**join_ref), render_frame(reply)]
        }
        Effect::Leave { conversation, .. } => format!("leave {conversation}"),
        Effect::Submit { conversation, body, reply } => {
            let ok = reply.frame(vsn, None);
            format!("submit {conversation} {body:?} then {}", String::from_utf8_lossy(wire::frame_payload(&ok)))
        }
        Effect::Close(why) => format!("close {}", why.code()),
        Effect::Authorize(join) => format!("authorize {}", join.conversation),
    };
    vec![line]
}

fn v2(join_ref: &str, reference: &str, topic: &str, event: &str, payload: &str) -> String {
    let js = |s: &str| if s == "null" { "null".to_string() } else { format!("\"{s}\"") };
    format!("[{},{},\"{topic}\",\"{event}\",{payload}]", js(join_ref), js(reference))
}

fn reply(join_ref: &str, reference: &str, topic: &str, status: &str, response: &str) -> String {
    v2(join_ref, reference, topic, "phx_reply", &format!(r#"{{"status":"{status}","response":{response}}}"#))
}

fn join(join_ref: &str, topic: &str) -> String {
    v2(join_ref, join_ref, topic, "phx_join", "{}")
}

/// One rule: frames sent first (their effects are not checked), the frame under test, and
/// exactly the effects it must have.
struct Row {
    rule: &'static str,
    before: Vec<String>,
    input: String,
    effects: Vec<String>,
}

fn row(rule: &'static str, before: &[String], input: String, effects: &[String]) -> Row {
    Row { rule, before: before.to_vec(), input, effects: effects.to_vec() }
}

fn run(rows: Vec<Row>, setup: impl Fn(&mut Harness)) {
    for r in rows {
        let mut h = Harness::new(Vsn::V2);
        setup(&mut h);
        for f in &r.before {
            h.text(f);
        }
        assert_eq!(h.text(&r.input), r.effects, "rule: {}\ninput: {}", r.rule, r.input);
    }
}

#[test]
fn channel_rules() {
    let joined = [join("1", T)];
    let close_1 = v2("1", "1", T, "phx_close", "{}");
    let failed = |detail: &str| format!(r#"{{"reason":"Failed to save","detail":"{detail}"}}"#);
    run(
        vec![
            row(
                "heartbeat is answered ok on the phoenix topic",
                &[],
                v2("null", "7", "phoenix", "heartbeat", "{}"),
                &[reply("null", "7", "phoenix", "ok", "{}")],
            ),
            row(
                "join a chat topic: membership, then the ok reply",
                &[],
                join("1", T),
                &[format!("join {C} {T} 1"), reply("1", "1", T, "ok", "{}")],
            ),
            row(
                "join echoes the topic as spelled (the UUID is case-insensitive)",
                &[],
                join("1", &T.to_uppercase().replace("CHAT:", "chat:")),
                &[
                    format!("join {C} {} 1", T.to_uppercase().replace("CHAT:", "chat:")),
                    reply("1", "1", &T.to_uppercase().replace("CHAT:", "chat:"), "ok", "{}"),
                ],
            ),
            row(
                "join without join_ref uses the ref",
                &[],
                v2("null", "5", T, "phx_join", "{}"),
                &[format!("join {C} {T} 5"), reply("5", "5", T, "ok", "{}")],
            ),
            row(
                "join of a topic that is not chat:<uuid>: unmatched, join_ref null",
                &[],
                join("1", "room:lobby"),
                &[reply("null", "1", "room:lobby", "error", r#"{"reason":"unmatched topic"}"#)],
            ),
            row(
                "join of chat:<not a uuid>: unmatched",
                &[],
                join("1", "chat:nope"),
                &[reply("null", "1", "chat:nope", "error", r#"{"reason":"unmatched topic"}"#)],
            ),
            row(
                "duplicate join: the old meta leaves, the new joins, new reply then phx_close of the old",
                &joined,
                join("2", T),
                &[format!("leave {C}"), format!("join {C} {T} 2"), reply("2", "2", T, "ok", "{}"), close_1.clone()],
            ),
            row(
                "leave: membership dropped, ok reply, then phx_close",
                &joined,
                v2("1", "2", T, "phx_leave", "{}"),
                &[format!("leave {C}"), reply("1", "2", T, "ok", "{}"), close_1.clone()],
            ),
            row(
                "leave of a topic not joined: ok, nothing else",
                &[],
                v2("4", "2", T, "phx_leave", "{}"),
                &[reply("4", "2", T, "ok", "{}")],
            ),
            row("leave with a stale join_ref: dropped silently", &joined, v2("9", "2", T, "phx_leave", "{}"), &[]),
            row(
                "event on a topic not joined: unmatched, join_ref null",
                &[],
                v2("1", "2", T, "new_msg", r#"{"body":"hi"}"#),
                &[reply("null", "2", T, "error", r#"{"reason":"unmatched topic"}"#)],
            ),
            row(
                "new_msg: submitted to the writer, ok reply later",
                &joined,
                v2("1", "2", T, "new_msg", r#"{"body":"hi"}"#),
                &[format!("submit {C} \"hi\" then {}", reply("1", "2", T, "ok", "{}"))],
            ),
            row(
                "new_msg with a null join_ref is not stale",
                &joined,
                v2("null", "2", T, "new_msg", r#"{"body":"hi"}"#),
                &[format!("submit {C} \"hi\" then {}", reply("1", "2", T, "ok", "{}"))],
            ),
            row("new_msg with a stale join_ref: dropped", &joined, v2("9", "2", T, "new_msg", r#"{"body":"x"}"#), &[]),
            row(
                "new_msg with an empty body: Failed to save",
                &joined,
                v2("1", "2", T, "new_msg", r#"{"body":""}"#),
                &[reply("1", "2", T, "error", &failed(chat::BAD_BODY))],
            ),
            row(
                "new_msg with a number body: Failed to save",
                &joined,
                v2("1", "2", T, "new_msg", r#"{"body":5}"#),
                &[reply("1", "2", T, "error", &failed(chat::BAD_BODY))],
            ),
            row(
                "new_msg without a body: Failed to save",
                &joined,
                v2("1", "2", T, "new_msg", r#"{"text":"hi"}"#),
                &[reply("1", "2", T, "error", &failed(chat::BAD_BODY))],
            ),
            row(
                "new_msg with a non-object payload: Failed to save",
                &joined,
                v2("1", "2", T, "new_msg", r#""hi""#),
                &[reply("1", "2", T, "error", &failed(chat::BAD_BODY))],
            ),
            row(
                "ping: ok with the same payload",
                &joined,
                v2("1", "3", T, "ping", r#"{"a":[1,{"b":null}]}"#),
                &[reply("1", "3", T, "ok", r#"{"a":[1,{"b":null}]}"#)],
            ),
            row(
                "unknown event: error",
                &joined,
                v2("1", "3", T, "shout", "{}"),
                &[reply("1", "3", T, "error", r#"{"reason":"unknown event"}"#)],
            ),
            row("malformed JSON: dropped", &[], "[null,\"1\",".to_string(), &[]),
            row("four elements: dropped", &[], r#"[null,"1","phoenix","heartbeat"]"#.to_string(), &[]),
            row("a number topic: dropped", &[], r#"[null,"1",5,"heartbeat",{}]"#.to_string(), &[]),
            row("a V1 object on a V2 socket: dropped", &[], r#"{"topic":"phoenix"}"#.to_string(), &[]),
            row("nested deeper than the limit: dropped", &[], format!("{}{}", "[".repeat(40), "]".repeat(40)), &[]),
        ],
        |_| {},
    );
}

#[test]
fn too_many_channels() {
    run(
        vec![
            row(
                "a join over the channel limit is refused with its join_ref",
                &[join("1", T)],
                join("2", T2),
                &[reply("2", "2", T2, "error", r#"{"reason":"too many channels joined"}"#)],
            ),
            row(
                "a rejoin of a joined topic is not a new channel",
                &[join("1", T)],
                join("2", T),
                &[
                    format!("leave {C}"),
                    format!("join {C} {T} 2"),
                    reply("2", "2", T, "ok", "{}"),
                    v2("1", "1", T, "phx_close", "{}"),
                ],
            ),
        ],
        |h| h.limits.max_channels = 1,
    );
}

#[test]
fn joins_are_refused_while_cross_core_queues_are_congested() {
    run(
        vec![
            row(
                "join answered server busy, nothing joined",
                &[],
                join("1", T),
                &[reply("1", "1", T, "error", r#"{"reason":"server busy"}"#)],
            ),
            row(
                "events of other topics are unaffected",
                &[],
                v2("null", "2", "phoenix", "heartbeat", "{}"),
                &[reply("null", "2", "phoenix", "ok", "{}")],
            ),
        ],
        |h| h.joins_refused = true,
    );
    let mut h = Harness::new(Vsn::V2);
    h.joins_refused = true;
    h.text(&join("1", T));
    assert_eq!(h.session.channels(), 0);
    assert_eq!(h.counters.get(Counter::JoinsBusy), 1);
    h.joins_refused = false;
    assert_eq!(h.text(&join("2", T)), [format!("join {C} {T} 2"), reply("2", "2", T, "ok", "{}")]);
}

#[test]
fn v1_sockets_get_v1_frames() {
    let mut h = Harness::new(Vsn::V1);
    let v1 = |topic: &str, event: &str, payload: &str, r: &str| {
        format!(r#"{{"topic":"{topic}","event":"{event}","payload":{payload},"ref":"{r}"}}"#)
    };
    assert_eq!(
        h.text(&v1(T, "phx_join", "{}", "1")),
        [format!("join {C} {T} 1"), v1(T, "phx_reply", r#"{"status":"ok","response":{}}"#, "1")]
    );
    assert_eq!(
        h.text(&v1(T, "shout", "{}", "2")),
        [v1(T, "phx_reply", r#"{"status":"error","response":{"reason":"unknown event"}}"#, "2")]
    );
    assert_eq!(h.text(&v2("1", "3", T, "ping", "{}")), Vec::<String>::new(), "a V2 array on a V1 socket");
}

#[test]
fn rate_limit_answers_then_closes() {
    let mut h = Harness::new(Vsn::V2);
    h.limits.msg_rate = 2;
    let hb = |r: &str| v2("null", r, "phoenix", "heartbeat", "{}");
    assert_eq!(h.text(&hb("1")), [reply("null", "1", "phoenix", "ok", "{}")]);
    assert_eq!(h.text(&hb("2")), [reply("null", "2", "phoenix", "ok", "{}")]);
    assert_eq!(h.text(&hb("3")), [reply("null", "3", "phoenix", "error", r#"{"reason":"rate limited"}"#)]);
    assert_eq!(h.message(Message::Ping(b"p")), Vec::<String>::new(), "no pong over the rate");
    assert_eq!(h.text("not json"), Vec::<String>::new(), "a malformed message is dropped either way");
    for i in 4..=crate::limits::MSG_RATE_STRIKES_MAX {
        assert_eq!(h.text(&hb(&i.to_string())).len(), 1);
    }
    assert_eq!(h.text(&hb("x")), ["close 1008"], "over the strikes: closed, no reply");
    assert_eq!(h.counters.get(Counter::RateLimited), u64::from(crate::limits::MSG_RATE_STRIKES_MAX) + 1);
    h.now_ms = 10_000;
    assert_eq!(h.text(&hb("later")), [reply("null", "later", "phoenix", "ok", "{}")], "refilled");
}

#[test]
fn websocket_messages() {
    let mut h = Harness::new(Vsn::V2);
    assert_eq!(h.message(Message::Ping(b"hi")), ["pong \"hi\""]);
    assert_eq!(h.message(Message::Pong), Vec::<String>::new());
    assert_eq!(h.message(Message::Close(4001)), ["close 4001"]);
    // A V2 binary push (phoenix.js sends one for an ArrayBuffer payload): error reply.
    let mut push = vec![0, 1, 1, T.len() as u8, 7];
    push.extend_from_slice(b"12");
    push.extend_from_slice(T.as_bytes());
    push.extend_from_slice(b"new_msg\x01\x02");
    assert_eq!(
        h.message(Message::Binary(push.into())),
        [reply("1", "2", T, "error", r#"{"reason":"binary payload not supported"}"#)]
    );
    assert_eq!(h.message(Message::Binary(vec![9, 9].into())), Vec::<String>::new(), "not a push: dropped");
    assert_eq!(h.counters.get(Counter::MessagesIn), 2);
    assert_eq!(h.counters.get(Counter::MessagesDropped), 1);
    assert_eq!(h.text("{not json"), Vec::<String>::new());
    assert_eq!(h.counters.get(Counter::MessagesDropped), 2);
}

#[test]
fn joined_channels_are_found_adopted_and_left() {
    let mut h = Harness::new(Vsn::V2);
    h.text(&join("1", T));
    h.text(&join("2", T2));
    let conversation = Uuid::try_parse(C).expect("uuid");
    assert_eq!(h.session.joined_topic(conversation, "1").as_deref(), Some(T));
    assert_eq!(h.session.joined_topic(conversation, "2"), None, "another join's ref");
    let shared: Rc<str> = Rc::from(T);
    h.session.adopt_spelling(conversation, shared.clone());
    assert!(Rc::ptr_eq(&h.session.joined_topic(conversation, "1").expect("joined"), &shared));
    let mut out = Vec::new();
    h.session.leave_all(&mut out);
    let left: Vec<String> = out.iter().flat_map(|e| render(e, Vsn::V2)).collect();
    assert_eq!(left, [format!("leave {C}"), "leave 0195f1b2-7c3a-7d4e-8f00-000000000002".to_string()]);
    assert_eq!(h.session.channels(), 0);
    assert_eq!(h.counters.get(Counter::Joins), 2);
}

#[test]
fn replies_to_committed_messages() {
    let reply_to = ReplyTo { join_ref: JoinRef::from("1"), reference: Some("9".into()), topic: Rc::from(T) };
    let text = |b: Bytes| String::from_utf8(wire::frame_payload(&b).to_vec()).expect("utf8");
    assert_eq!(text(reply_to.frame(Vsn::V2, None)), reply("1", "9", T, "ok", "{}"));
    assert_eq!(
        text(reply_to.frame(Vsn::V2, Some("storage unavailable"))),
        reply("1", "9", T, "error", r#"{"reason":"Failed to save","detail":"storage unavailable"}"#)
    );
}

/// An HS256 token with these claims, signed with `secret`.
fn jwt(secret: &[u8], claims: &serde_json::Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(secret);
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), claims, &key).expect("encode")
}

fn join_with_token(join_ref: &str, topic: &str, token: &str) -> String {
    v2(join_ref, join_ref, topic, "phx_join", &format!(r#"{{"token":"{token}"}}"#))
}

const UNAUTHORIZED: &str = r#"{"reason":"unauthorized"}"#;

#[test]
fn token_policy_grants_and_join_tokens() {
    let conversation = Uuid::try_parse(C).expect("uuid");
    let later = jsonwebtoken::get_current_timestamp() + 600;
    let mut h = Harness::with_policy(crate::config::JoinPolicy::Token);
    // No grant, no join token: refused, nothing joined.
    assert_eq!(h.text(&join("1", T)), [reply("1", "1", T, "error", UNAUTHORIZED)]);
    // A join token for this user and conversation.
    let good = jwt(SECRET, &serde_json::json!({"sub": USER.to_string(), "chat": C, "exp": later}));
    assert_eq!(h.text(&join_with_token("2", T, &good)), [format!("join {C} {T} 2"), reply("2", "2", T, "ok", "{}")]);
    // Hostile join tokens for T2, each refused.
    let other_user = Uuid::from_u128(7).to_string();
    let c2 = &T2["chat:".len()..];
    let hostile = [
        ("wrong chat", jwt(SECRET, &serde_json::json!({"sub": USER.to_string(), "chat": C, "exp": later}))),
        ("other sub", jwt(SECRET, &serde_json::json!({"sub": other_user, "chat": c2, "exp": later}))),
        ("expired", jwt(SECRET, &serde_json::json!({"sub": USER.to_string(), "chat": c2, "exp": later - 1200}))),
        ("no exp", jwt(SECRET, &serde_json::json!({"sub": USER.to_string(), "chat": c2}))),
        ("socket token, no chat", jwt(SECRET, &serde_json::json!({"sub": USER.to_string(), "exp": later}))),
        (
            "other secret",
            jwt(
                b"another-secret-0123456789abcdef!",
                &serde_json::json!({"sub": USER.to_string(), "chat": c2, "exp": later}),
            ),
        ),
        ("not a token", "garbage".to_string()),
    ];
    for (i, (what, token)) in hostile.iter().enumerate() {
        let jr = (10 + i).to_string();
        assert_eq!(h.text(&join_with_token(&jr, T2, token)), [reply(&jr, &jr, T2, "error", UNAUTHORIZED)], "{what}");
    }
    // alg "none": the good claims for T2, unsigned.
    let claims = jwt(SECRET, &serde_json::json!({"sub": USER.to_string(), "chat": c2, "exp": later}));
    let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.", claims.split('.').nth(1).expect("payload"));
    assert_eq!(h.text(&join_with_token("20", T2, &none)), [reply("20", "20", T2, "error", UNAUTHORIZED)]);
    assert_eq!(h.counters.get(Counter::JoinsUnauthorized), 1 + hostile.len() as u64 + 1);
    // A socket token's grant needs no join token.
    h.grants = vec![Uuid::try_parse(c2).expect("uuid")];
    assert_eq!(h.text(&join("21", T2)), [format!("join {c2} {T2} 21"), reply("21", "21", T2, "ok", "{}")]);
    assert_eq!(h.session.channels(), 2);
    let _ = conversation;
}

#[test]
fn a_join_waits_for_the_proxy_and_takes_its_verdict() {
    let proxy = crate::config::ProxyConfig {
        url: "http://127.0.0.1:9/never-called".into(),
        secret: crate::config::Secret::new("s"),
        timeout: std::time::Duration::from_secs(1),
        cache_ttl: std::time::Duration::from_secs(60),
    };
    let mut h = Harness::with_policy(crate::config::JoinPolicy::Proxy(proxy));
    let msg = join("1", T);
    let mut out = Vec::new();
    let mut session = Session::new(USER, Vsn::V2);
    session.on_message(Message::Text(msg.as_str().into()), &mut h.env(), &mut out);
    let [Effect::Authorize(pending)] = &out[..] else { panic!("expected one Authorize, got {out:?}") };
    assert_eq!(session.channels(), 0, "nothing joined before the verdict");
    let mut answered = Vec::new();
    session.authorized(pending, Err(Refusal::Unavailable), &mut h.env(), &mut answered);
    let lines: Vec<String> = answered.iter().flat_map(|e| render(e, Vsn::V2)).collect();
    assert_eq!(lines, [reply("1", "1", T, "error", r#"{"reason":"authorization unavailable"}"#)]);
    let mut allowed = Vec::new();
    session.authorized(pending, Ok(()), &mut h.env(), &mut allowed);
    let lines: Vec<String> = allowed.iter().flat_map(|e| render(e, Vsn::V2)).collect();
    assert_eq!(lines, [format!("join {C} {T} 1"), reply("1", "1", T, "ok", "{}")]);
    assert_eq!(h.counters.get(Counter::JoinsUnavailable), 1);
}

#[test]
fn a_removed_member_gets_phx_close() {
    let mut h = Harness::new(Vsn::V2);
    h.text(&join("1", T));
    let conversation = Uuid::try_parse(C).expect("uuid");
    let mut out = Vec::new();
    assert!(h.session.remove(conversation, &mut out));
    let lines: Vec<String> = out.iter().flat_map(|e| render(e, Vsn::V2)).collect();
    assert_eq!(lines, [format!("leave {C}"), v2("1", "1", T, "phx_close", "{}")]);
    assert!(!h.session.remove(conversation, &mut Vec::new()), "only once");
}
