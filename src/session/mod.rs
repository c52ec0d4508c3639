//! The Phoenix socket protocol of one connection, as a pure state machine.
//!
//! A [`Session`] remembers what the protocol needs about one socket: its user, its serializer,
//! the channels it joined, its message budget. [`Session::on_message`] decides what one client
//! message means and says so as [`Effect`]s: frames for this socket, channel joins and leaves
//! for the core, a message for the writer, a close. The server carries them out; nothing here
//! touches a socket, a core or another thread, so every rule (join, duplicate join, leave,
//! stale `join_ref`, too many channels, rate limit, `new_msg` validation, bad input) is tested
//! from bytes in to effects out (`tests.rs`), the way tungstenite tests its codec.
//!
//! The rules follow Phoenix 1.8 and docs/protocol.md; the replies it gives are Phoenix's own.

mod budget;
#[cfg(test)]
mod tests;

use std::rc::Rc;

use bytes::Bytes;
use smallvec::SmallVec;
use uuid::Uuid;

pub use self::budget::{Budget, Spend};
use crate::access::{Access, Decision, Refusal};
use crate::close::Close;
use crate::metrics::{Counter, Counters};
use crate::phoenix::{self, Inbound, Outbound, Vsn};
use crate::presence::{PhxRef, RefMaker};
use crate::ws::Message;
use crate::{channel, chat, wire};

const UNMATCHED_TOPIC: &[u8] = br#"{"reason":"unmatched topic"}"#;
const TOO_MANY_CHANNELS: &[u8] = br#"{"reason":"too many channels joined"}"#;
const UNKNOWN_EVENT: &[u8] = br#"{"reason":"unknown event"}"#;
const BINARY_UNSUPPORTED: &[u8] = br#"{"reason":"binary payload not supported"}"#;
const RATE_LIMITED: &[u8] = br#"{"reason":"rate limited"}"#;
const SERVER_BUSY: &[u8] = br#"{"reason":"server busy"}"#;
/// Join error for a `last_seen_id` that is not a UUID (or not a string).
const INVALID_LAST_SEEN_ID: &[u8] = br#"{"reason":"invalid last_seen_id"}"#;

/// A join reference, inline up to 16 bytes (phoenix.js counts "1", "2", …): every joined
/// channel holds one, and a heap string would cost an allocation per idle connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinRef(SmallVec<[u8; 16]>);

impl From<&str> for JoinRef {
    fn from(s: &str) -> JoinRef {
        JoinRef(SmallVec::from_slice(s.as_bytes()))
    }
}

impl std::ops::Deref for JoinRef {
    type Target = str;

    fn deref(&self) -> &str {
        std::str::from_utf8(&self.0).expect("a JoinRef is only built from a &str")
    }
}

/// A channel this socket has joined.
#[derive(Debug)]
pub struct Joined {
    /// Conversation id (the topic's identity).
    pub conversation: Uuid,
    /// The topic as this client spelled it (shared with the core's copy once adopted).
    pub topic: Rc<str>,
    /// The join's reference, stamped on every push and reply of the channel.
    pub join_ref: JoinRef,
    /// This join's presence meta.
    pub phx_ref: PhxRef,
}

/// Where the answer to a `new_msg` goes once the writer has committed it (or not): the reply
/// is encoded by [`ReplyTo::frame`], from this alone.
#[derive(Debug)]
pub struct ReplyTo {
    /// The channel's join reference.
    pub join_ref: JoinRef,
    /// The push's `ref`.
    pub reference: Option<String>,
    /// The channel's topic, as this client spelled it.
    pub topic: Rc<str>,
}

impl ReplyTo {
    /// An ok reply with `response`.
    pub fn ok(&self, vsn: Vsn, response: &[u8]) -> Bytes {
        wire::reply(vsn, Some(&*self.join_ref), self.reference.as_deref(), &self.topic, true, response)
    }

    /// The reply frame: ok `{}`, or `Failed to save` with `detail`.
    pub fn frame(&self, vsn: Vsn, failure: Option<&str>) -> Bytes {
        let (jr, r) = (Some(&*self.join_ref), self.reference.as_deref());
        match failure {
            None => wire::reply(vsn, jr, r, &self.topic, true, phoenix::EMPTY),
            Some(detail) => wire::reply(vsn, jr, r, &self.topic, false, &chat::failed_to_save(detail)),
        }
    }
}

/// What the server must do for a session, in order.
#[derive(Debug)]
pub enum Effect {
    /// Queue this complete frame (a reply or a push) on the socket.
    Send(Bytes),
    /// The socket joined `conversation`: make it a local member and track its presence
    /// (`phx_ref`; the `presence_state` is pushed with `join_ref`).
    Join {
        /// Conversation id.
        conversation: Uuid,
        /// The topic as the client spelled it; the core may hand back a shared copy
        /// ([`Session::adopt_spelling`]).
        topic: Rc<str>,
        /// The join's reference.
        join_ref: JoinRef,
        /// The new presence meta's reference.
        phx_ref: PhxRef,
        /// The ok reply to the join, queued when the core is ready to serve the channel (at
        /// once, except on a cluster node's first join of a conversation).
        reply: Bytes,
        /// The join asked to recover what was missed (`last_seen_id`): the core answers it
        /// itself, once it knows how many messages it will push.
        recovery: Option<Recovery>,
    },
    /// The socket left `conversation`: drop the membership and untrack `phx_ref`.
    Leave {
        /// Conversation id.
        conversation: Uuid,
        /// The meta that leaves.
        phx_ref: PhxRef,
    },
    /// Persist a message; answer with [`ReplyTo::frame`] when the writer is done (after the
    /// broadcast), or at once if the writer cannot take it.
    Submit {
        /// Conversation id.
        conversation: Uuid,
        /// The validated body.
        body: String,
        /// Where the answer goes.
        reply: ReplyTo,
    },
    /// Close the socket.
    Close(Close),
    /// Only the app backend can allow this join: ask it, read nothing more from the socket
    /// until the answer, then hand it to [`Session::authorized`].
    Authorize(PendingJoin),
}

/// A join being decided, borrowing from the client's message.
struct JoinArgs<'m> {
    conversation: Uuid,
    topic: &'m str,
    join_ref: JoinRef,
    reference: Option<&'m str>,
    recover_after: Option<Uuid>,
}

/// A join waiting for the join proxy's answer.
#[derive(Debug)]
pub struct PendingJoin {
    /// Conversation id.
    pub conversation: Uuid,
    topic: String,
    join_ref: JoinRef,
    reference: Option<String>,
    recover_after: Option<Uuid>,
}

/// A join's request to recover the messages committed after `after` (docs/protocol.md,
/// "Recovery on rejoin").
#[derive(Debug)]
pub struct Recovery {
    /// The client's last seen message id (any UUID works as a bound).
    pub after: Uuid,
    /// Where the join's reply goes.
    pub reply: ReplyTo,
}

/// A join payload's `last_seen_id`: absent or `null` means no recovery; anything but a UUID
/// string is refused.
fn last_seen_id(payload: &str) -> Result<Option<Uuid>, ()> {
    use sonic_rs::JsonValueTrait;
    if !payload.contains("last_seen_id") {
        return Ok(None); // the common join: nothing to parse
    }
    let Ok(value) = sonic_rs::from_str::<sonic_rs::Value>(payload) else { return Ok(None) };
    match value.get("last_seen_id") {
        None => Ok(None),
        Some(v) if v.is_null() => Ok(None),
        Some(v) => v.as_str().and_then(|s| Uuid::try_parse(s).ok()).map(Some).ok_or(()),
    }
}

/// Per-socket limits from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most channels joined at once (`NEXUS_MAX_CHANNELS`).
    pub max_channels: usize,
    /// Messages per second (`NEXUS_MSG_RATE`, 0 = unlimited).
    pub msg_rate: u32,
}

/// What a session reads from its surroundings for one message; plain data.
#[derive(Debug)]
pub struct Env<'a> {
    /// The core's coarse clock, ms.
    pub now_ms: u64,
    /// Per-socket limits.
    pub limits: Limits,
    /// Makes `phx_ref`s unique on this core.
    pub refs: &'a mut RefMaker,
    /// The core's counters.
    pub counters: &'a Counters,
    /// New joins are refused (`server busy`): the core's queues to other cores are congested.
    pub joins_refused: bool,
    /// The join policy.
    pub access: &'a Access,
    /// Conversations the socket's token grants (the `token` policy; empty otherwise).
    pub grants: &'a [Uuid],
    /// Core id, for logs.
    pub core: usize,
    /// Connection id, for logs.
    pub conn: u64,
}

/// One socket's protocol state.
#[derive(Debug)]
pub struct Session {
    user: Uuid,
    vsn: Vsn,
    /// Joined channels (few per connection; a linear search beats a map at this size).
    channels: Vec<Joined>,
    budget: Budget,
}

impl Session {
    /// A socket of `user` speaking `vsn`, in no channel.
    pub fn new(user: Uuid, vsn: Vsn) -> Session {
        Session { user, vsn, channels: Vec::new(), budget: Budget::default() }
    }

    /// The authenticated user.
    pub fn user(&self) -> Uuid {
        self.user
    }

    /// The serializer.
    pub fn vsn(&self) -> Vsn {
        self.vsn
    }

    /// Channels joined now.
    pub fn channels(&self) -> usize {
        self.channels.len()
    }

    /// The topic of the join `join_ref` of `conversation`, if the socket is still in it.
    pub fn joined_topic(&self, conversation: Uuid, join_ref: &str) -> Option<Rc<str>> {
        let joined = self.channels.iter().find(|j| j.conversation == conversation && &*j.join_ref == join_ref)?;
        Some(joined.topic.clone())
    }

    /// Replaces the spelling of `conversation` by an equal, shared one (the core interns one
    /// copy per topic instead of one per member).
    pub fn adopt_spelling(&mut self, conversation: Uuid, topic: Rc<str>) {
        if let Some(j) = self.channels.iter_mut().find(|j| j.conversation == conversation) {
            debug_assert_eq!(*j.topic, *topic, "only an equal spelling may be adopted");
            j.topic = topic;
        }
    }

    /// Leaves every channel (the socket is closing): one [`Effect::Leave`] each.
    pub fn leave_all(&mut self, out: &mut Vec<Effect>) {
        for left in self.channels.drain(..) {
            out.push(Effect::Leave { conversation: left.conversation, phx_ref: left.phx_ref });
        }
    }

    /// The server removed this socket from `conversation` (server API): the channel closes
    /// (`phx_close`, as Phoenix pushes when a channel process stops) and its presence leaves.
    /// Returns whether the socket was in it.
    pub fn remove(&mut self, conversation: Uuid, out: &mut Vec<Effect>) -> bool {
        let Some(i) = self.channels.iter().position(|j| j.conversation == conversation) else { return false };
        let left = self.channels.swap_remove(i);
        out.push(Effect::Leave { conversation, phx_ref: left.phx_ref });
        let jr = Some(&*left.join_ref);
        self.send(out, jr, jr, &left.topic, "phx_close", phoenix::EMPTY);
        true
    }

    /// Handles one complete WebSocket message from the client.
    pub fn on_message(&mut self, msg: Message<'_>, env: &mut Env<'_>, out: &mut Vec<Effect>) {
        match msg {
            Message::Text(text) => self.on_text(&text, env, out),
            Message::Binary(data) => self.on_binary(&data, env, out),
            // Pings spend the budget too; over it they get no pong.
            Message::Ping(payload) => {
                if self.spend(env, out) == Spend::Ok {
                    out.push(Effect::Send(wire::pong(payload)));
                }
            }
            Message::Pong => {}
            Message::Close(code) => out.push(Effect::Close(Close::Client(code))),
        }
    }

    fn on_text(&mut self, text: &str, env: &mut Env<'_>, out: &mut Vec<Effect>) {
        env.counters.bump(Counter::MessagesIn);
        let spend = self.spend(env, out);
        if spend == Spend::Abusive {
            return;
        }
        match phoenix::decode(self.vsn, text) {
            Ok(m) if spend == Spend::Refused => {
                self.reply(out, m.join_ref.as_deref(), m.reference.as_deref(), &m.topic, false, RATE_LIMITED)
            }
            Ok(m) => self.dispatch(&m, env, out),
            Err(e) => {
                env.counters.bump(Counter::MessagesDropped);
                tracing::warn!(core = env.core, conn = env.conn, user = %self.user, error = %e, "dropped malformed message")
            }
        }
    }

    /// V2 binary pushes are answered with an error (Nexus events are JSON); anything else is
    /// dropped.
    fn on_binary(&mut self, data: &[u8], env: &mut Env<'_>, out: &mut Vec<Effect>) {
        env.counters.bump(Counter::MessagesIn);
        if self.spend(env, out) != Spend::Ok {
            return;
        }
        let push = match self.vsn {
            Vsn::V2 => phoenix::decode_binary_push(data),
            Vsn::V1 => None,
        };
        match push {
            Some(p) => self.reply(out, p.join_ref, p.reference, p.topic, false, BINARY_UNSUPPORTED),
            None => {
                env.counters.bump(Counter::MessagesDropped);
                tracing::warn!(core = env.core, conn = env.conn, len = data.len(), "dropped binary frame")
            }
        }
    }

    /// Spends one message of the budget, counting refusals; a persistently abusive client is
    /// closed (1008).
    fn spend(&mut self, env: &mut Env<'_>, out: &mut Vec<Effect>) -> Spend {
        let spend = self.budget.spend(env.now_ms, env.limits.msg_rate);
        if spend != Spend::Ok {
            env.counters.bump(Counter::RateLimited);
        }
        if spend == Spend::Abusive {
            tracing::warn!(core = env.core, conn = env.conn, user = %self.user, "closing: over the message rate");
            out.push(Effect::Close(Close::RateLimited));
        }
        spend
    }

    fn dispatch(&mut self, m: &Inbound<'_>, env: &mut Env<'_>, out: &mut Vec<Effect>) {
        let (jr, r, topic) = (m.join_ref.as_deref(), m.reference.as_deref(), m.topic.as_str());
        match (topic, m.event.as_str()) {
            ("phoenix", "heartbeat") => self.reply(out, jr, r, topic, true, phoenix::EMPTY),
            (_, "phx_join") => self.join(m, env, out),
            (_, "phx_leave") => self.leave(m, out),
            _ => self.push(m, out),
        }
    }

    /// The index of the channel joined for `topic`, if any.
    fn position(&self, topic: &str) -> Option<usize> {
        let conversation = channel::parse_topic(topic)?;
        self.channels.iter().position(|j| j.conversation == conversation)
    }

    fn join(&mut self, m: &Inbound<'_>, env: &mut Env<'_>, out: &mut Vec<Effect>) {
        let r = m.reference.as_deref();
        let Some(conversation) = channel::parse_topic(&m.topic) else {
            tracing::warn!(core = env.core, conn = env.conn, topic = %m.topic, "join: unmatched topic");
            return self.reply(out, None, r, &m.topic, false, UNMATCHED_TOPIC);
        };
        let Ok(recover_after) = last_seen_id(m.payload()) else {
            return self.reply(out, m.join_ref.as_deref(), r, &m.topic, false, INVALID_LAST_SEEN_ID);
        };
        if self.position(&m.topic).is_none() && self.channels.len() >= env.limits.max_channels {
            return self.reply(out, m.join_ref.as_deref(), r, &m.topic, false, TOO_MANY_CHANNELS);
        }
        if env.joins_refused {
            env.counters.bump(Counter::JoinsBusy);
            return self.reply(out, m.join_ref.as_deref(), r, &m.topic, false, SERVER_BUSY);
        }
        // phoenix.js always sends join_ref == ref; fall back to ref for hand-written clients.
        let join_ref = JoinRef::from(m.join_ref.as_deref().or(r).unwrap_or(""));
        let join = JoinArgs { conversation, topic: &m.topic, join_ref, reference: r, recover_after };
        match env.access.join(self.user, conversation, m.payload(), env.grants) {
            Decision::Allow => self.admit(join, env, out),
            Decision::Refuse(why) => self.refuse(&join, why, env, out),
            Decision::Ask => out.push(Effect::Authorize(PendingJoin {
                conversation,
                topic: join.topic.to_string(),
                join_ref: join.join_ref,
                reference: m.reference.clone(),
                recover_after,
            })),
        }
    }

    /// Finishes a join the join proxy answered.
    pub fn authorized(
        &mut self,
        join: &PendingJoin,
        verdict: Result<(), Refusal>,
        env: &mut Env<'_>,
        out: &mut Vec<Effect>,
    ) {
        let args = JoinArgs {
            conversation: join.conversation,
            topic: &join.topic,
            join_ref: join.join_ref.clone(),
            reference: join.reference.as_deref(),
            recover_after: join.recover_after,
        };
        match verdict {
            Ok(()) => self.admit(args, env, out),
            Err(why) => self.refuse(&args, why, env, out),
        }
    }

    fn refuse(&mut self, join: &JoinArgs<'_>, why: Refusal, env: &mut Env<'_>, out: &mut Vec<Effect>) {
        env.counters.bump(match why {
            Refusal::Unauthorized => Counter::JoinsUnauthorized,
            Refusal::Unavailable => Counter::JoinsUnavailable,
        });
        let (user, conversation) = (self.user, join.conversation);
        tracing::info!(core = env.core, conn = env.conn, %user, %conversation, reason = why.reason(), "join refused");
        self.reply(out, Some(&join.join_ref), join.reference, join.topic, false, why.response());
    }

    /// Makes an allowed join a channel of this socket (a duplicate join replaces the old one).
    fn admit(&mut self, join: JoinArgs<'_>, env: &mut Env<'_>, out: &mut Vec<Effect>) {
        let JoinArgs { conversation, topic, join_ref, reference, recover_after } = join;
        let previous = self.position(topic);
        if previous.is_none() && self.channels.len() >= env.limits.max_channels {
            // Only after a proxy call: the limit is checked before asking too.
            return self.reply(out, Some(&join_ref), reference, topic, false, TOO_MANY_CHANNELS);
        }
        let old = previous.map(|i| self.channels.swap_remove(i));
        if let Some(old) = &old {
            out.push(Effect::Leave { conversation, phx_ref: old.phx_ref });
        }
        let reply = wire::reply(self.vsn, Some(&join_ref), reference, topic, true, phoenix::EMPTY);
        let topic: Rc<str> = Rc::from(topic);
        let phx_ref = env.refs.make();
        // Most connections join one channel: grow one slot at a time (a first push would
        // reserve four, 256 B per idle connection).
        self.channels.reserve_exact(1);
        self.channels.push(Joined { conversation, topic: topic.clone(), join_ref: join_ref.clone(), phx_ref });
        tracing::debug!(core = env.core, conn = env.conn, user = %self.user, topic = %topic, "joined");
        let recovery = recover_after.map(|after| Recovery {
            after,
            reply: ReplyTo {
                join_ref: join_ref.clone(),
                reference: reference.map(str::to_string),
                topic: topic.clone(),
            },
        });
        out.push(Effect::Join { conversation, topic, join_ref, phx_ref, reply, recovery });
        env.counters.bump(Counter::Joins);
        if let Some(old) = old {
            // Duplicate join: the new reply first, then the close of the old membership.
            let old_ref = Some(&*old.join_ref);
            self.send(out, old_ref, old_ref, &old.topic, "phx_close", phoenix::EMPTY);
        }
    }

    fn leave(&mut self, m: &Inbound<'_>, out: &mut Vec<Effect>) {
        let r = m.reference.as_deref();
        let Some(i) = self.position(&m.topic) else {
            return self.reply(out, m.join_ref.as_deref(), r, &m.topic, true, phoenix::EMPTY);
        };
        if m.join_ref.as_deref().is_some_and(|jr| jr != &*self.channels[i].join_ref) {
            return; // stale: the client raced a server close (Phoenix ignores it too)
        }
        let left = self.channels.swap_remove(i);
        out.push(Effect::Leave { conversation: left.conversation, phx_ref: left.phx_ref });
        let jr = Some(&*left.join_ref);
        self.reply(out, jr, r, &m.topic, true, phoenix::EMPTY);
        self.send(out, jr, jr, &left.topic, "phx_close", phoenix::EMPTY);
    }

    /// An event on a channel: `new_msg`, `ping`, or unknown.
    fn push(&mut self, m: &Inbound<'_>, out: &mut Vec<Effect>) {
        let r = m.reference.as_deref();
        let Some(i) = self.position(&m.topic) else {
            return self.reply(out, None, r, &m.topic, false, UNMATCHED_TOPIC);
        };
        let joined = &self.channels[i];
        if m.join_ref.as_deref().is_some_and(|jr| jr != &*joined.join_ref) {
            return; // stale join_ref: dropped silently (Phoenix >= 1.8.3)
        }
        let jr = Some(&*joined.join_ref);
        match m.event.as_str() {
            chat::NEW_MSG => match chat::parse_body(m.payload()) {
                Ok(body) => {
                    let reply = ReplyTo {
                        join_ref: joined.join_ref.clone(),
                        reference: m.reference.clone(),
                        topic: joined.topic.clone(),
                    };
                    out.push(Effect::Submit { conversation: joined.conversation, body, reply });
                }
                Err(detail) => self.reply(out, jr, r, &m.topic, false, &chat::failed_to_save(detail)),
            },
            chat::PING => self.reply(out, jr, r, &m.topic, true, m.payload().as_bytes()),
            _ => self.reply(out, jr, r, &m.topic, false, UNKNOWN_EVENT),
        }
    }

    fn reply(
        &self,
        out: &mut Vec<Effect>,
        join_ref: Option<&str>,
        reference: Option<&str>,
        topic: &str,
        ok: bool,
        response: &[u8],
    ) {
        out.push(Effect::Send(wire::reply(self.vsn, join_ref, reference, topic, ok, response)));
    }

    fn send(
        &self,
        out: &mut Vec<Effect>,
        join_ref: Option<&str>,
        reference: Option<&str>,
        topic: &str,
        event: &str,
        payload: &[u8],
    ) {
        let msg = Outbound { join_ref, reference, topic, event, payload };
        out.push(Effect::Send(wire::encode_frame(self.vsn, &msg)));
    }
}
