//! The Phoenix socket protocol over one connection: heartbeat, join, leave, routing of pushes
//! to chat events, and the replies Phoenix gives for each case (phoenix-reference.md §3-§5).

use std::rc::Rc;

use super::conn::{Conn, JoinRef, Joined, Spend};
use super::core::{Core, PendingAck};
use super::metrics::Counter;
use crate::close::Close;
use crate::phoenix::{self, Inbound, Outbound};
use crate::store::{InsertRequest, Origin};
use crate::{channel, chat};

const UNMATCHED_TOPIC: &[u8] = br#"{"reason":"unmatched topic"}"#;
const TOO_MANY_CHANNELS: &[u8] = br#"{"reason":"too many channels joined"}"#;
const UNKNOWN_EVENT: &[u8] = br#"{"reason":"unknown event"}"#;
const BINARY_UNSUPPORTED: &[u8] = br#"{"reason":"binary payload not supported"}"#;
const RATE_LIMITED: &[u8] = br#"{"reason":"rate limited"}"#;

/// Handles one text frame.
pub(crate) fn on_text(core: &Core, conn: &Rc<Conn>, text: &str) {
    core.count(Counter::MessagesIn);
    let spend = over_budget(core, conn);
    if spend == Spend::Abusive {
        return;
    }
    match phoenix::decode(conn.vsn(), text) {
        Ok(msg) if spend == Spend::Refused => {
            reply(core, conn, msg.join_ref.as_deref(), msg.reference.as_deref(), &msg.topic, false, RATE_LIMITED)
        }
        Ok(msg) => dispatch(core, conn, &msg),
        Err(e) => {
            tracing::warn!(core = core.id, conn = conn.id, user = %conn.user(), error = %e, "dropped malformed message")
        }
    }
}

/// Handles one binary frame: V2 binary pushes are answered with an error (Nexus events are
/// JSON); anything else is dropped.
pub(crate) fn on_binary(core: &Core, conn: &Rc<Conn>, data: &[u8]) {
    core.count(Counter::MessagesIn);
    if over_budget(core, conn) != Spend::Ok {
        return;
    }
    let push = match conn.vsn() {
        phoenix::Vsn::V2 => phoenix::decode_binary_push(data),
        phoenix::Vsn::V1 => None,
    };
    match push {
        Some(p) => reply(core, conn, p.join_ref, p.reference, p.topic, false, BINARY_UNSUPPORTED),
        None => tracing::warn!(core = core.id, conn = conn.id, len = data.len(), "dropped binary frame"),
    }
}

/// Spends one message of the socket's rate budget, counting refusals; a persistently abusive
/// client is closed here (1008).
pub(crate) fn over_budget(core: &Core, conn: &Conn) -> Spend {
    let spend = conn.spend(core.now_ms(), core.config().msg_rate);
    if spend != Spend::Ok {
        core.count(Counter::RateLimited);
    }
    if spend == Spend::Abusive {
        tracing::warn!(core = core.id, conn = conn.id, user = %conn.user(), "closing: over the message rate");
        conn.request_close(Close::RateLimited);
    }
    spend
}

fn dispatch(core: &Core, conn: &Rc<Conn>, m: &Inbound<'_>) {
    let (jr, r, topic) = (m.join_ref.as_deref(), m.reference.as_deref(), m.topic.as_str());
    match (topic, m.event.as_str()) {
        ("phoenix", "heartbeat") => reply(core, conn, jr, r, topic, true, phoenix::EMPTY),
        (_, "phx_join") => join(core, conn, m),
        (_, "phx_leave") => leave(core, conn, m),
        _ => push(core, conn, m),
    }
}

/// The channel this socket has joined for `topic`, if any: (index, join_ref, spelling).
fn joined(conn: &Conn, topic: &str) -> Option<(usize, JoinRef, Rc<str>)> {
    let conversation = channel::parse_topic(topic)?;
    let channels = conn.channels.borrow();
    let i = channels.iter().position(|j| j.conversation == conversation)?;
    Some((i, channels[i].join_ref.clone(), channels[i].topic.clone()))
}

fn join(core: &Core, conn: &Rc<Conn>, m: &Inbound<'_>) {
    let r = m.reference.as_deref();
    let Some(conversation) = channel::parse_topic(&m.topic) else {
        tracing::warn!(core = core.id, conn = conn.id, topic = %m.topic, "join: unmatched topic");
        return reply(core, conn, None, r, &m.topic, false, UNMATCHED_TOPIC);
    };
    // phoenix.js always sends join_ref == ref; fall back to ref for hand-written clients.
    let join_ref = JoinRef::from(m.join_ref.as_deref().or(r).unwrap_or(""));
    let previous = joined(conn, &m.topic);
    if previous.is_none() && conn.channels.borrow().len() >= core.config().max_channels {
        return reply(core, conn, m.join_ref.as_deref(), r, &m.topic, false, TOO_MANY_CHANNELS);
    }
    if let Some((i, _, _)) = previous {
        let old = conn.channels.borrow_mut().swap_remove(i);
        core.remove_member(conversation, conn.key);
        core.untrack(conn.user(), conversation, old.phx_ref);
    }
    let topic = core.add_member(conversation, conn, &m.topic);
    reply(core, conn, Some(&join_ref), r, &topic, true, phoenix::EMPTY);
    core.count(Counter::Joins);
    // After the reply (Phoenix order): the owner core answers with presence_state.
    let phx_ref = core.track(conn, conversation, &join_ref);
    let mut channels = conn.channels.borrow_mut();
    // Most connections join one channel: grow one slot at a time (a first push would reserve
    // four, 256 B per idle connection).
    channels.reserve_exact(1);
    channels.push(Joined { conversation, topic: topic.clone(), join_ref: join_ref.clone(), phx_ref });
    drop(channels);
    if let Some((_, old_ref, old_topic)) = previous {
        // Duplicate join: the new reply first, then the close of the old membership.
        send(core, conn, Some(&old_ref), Some(&old_ref), &old_topic, "phx_close", phoenix::EMPTY);
    }
    tracing::debug!(core = core.id, conn = conn.id, user = %conn.user(), topic = %m.topic, "joined");
}

fn leave(core: &Core, conn: &Rc<Conn>, m: &Inbound<'_>) {
    let r = m.reference.as_deref();
    let Some((i, join_ref, topic)) = joined(conn, &m.topic) else {
        return reply(core, conn, m.join_ref.as_deref(), r, &m.topic, true, phoenix::EMPTY);
    };
    if m.join_ref.as_deref().is_some_and(|jr| jr != &*join_ref) {
        return; // stale: the client raced a server close (Phoenix ignores it too)
    }
    let left = conn.channels.borrow_mut().swap_remove(i);
    core.remove_member(left.conversation, conn.key);
    core.untrack(conn.user(), left.conversation, left.phx_ref);
    reply(core, conn, Some(&join_ref), r, &m.topic, true, phoenix::EMPTY);
    send(core, conn, Some(&join_ref), Some(&join_ref), &topic, "phx_close", phoenix::EMPTY);
}

fn push(core: &Core, conn: &Rc<Conn>, m: &Inbound<'_>) {
    let r = m.reference.as_deref();
    let Some((_, join_ref, topic)) = joined(conn, &m.topic) else {
        return reply(core, conn, None, r, &m.topic, false, UNMATCHED_TOPIC);
    };
    if m.join_ref.as_deref().is_some_and(|jr| jr != &*join_ref) {
        return; // stale join_ref: dropped silently (Phoenix >= 1.8.3)
    }
    match m.event.as_str() {
        chat::NEW_MSG => new_msg(core, conn, m, join_ref, topic),
        chat::PING => reply(core, conn, Some(&join_ref), r, &m.topic, true, m.payload().as_bytes()),
        _ => reply(core, conn, Some(&join_ref), r, &m.topic, false, UNKNOWN_EVENT),
    }
}

fn new_msg(core: &Core, conn: &Rc<Conn>, m: &Inbound<'_>, join_ref: JoinRef, topic: Rc<str>) {
    let r = m.reference.as_deref();
    let body = match chat::parse_body(m.payload()) {
        Ok(body) => body,
        Err(detail) => return reply(core, conn, Some(&join_ref), r, &m.topic, false, &chat::failed_to_save(detail)),
    };
    let Some(conversation) = channel::parse_topic(&topic) else { return };
    let ack = PendingAck { conn: conn.clone(), join_ref: join_ref.clone(), reference: m.reference.clone(), topic };
    let ticket = core.acks.borrow_mut().insert(ack);
    let origin = Origin { core: core.id as u16, ticket: ticket as u32 };
    let req = InsertRequest { conversation, sender: conn.user(), body, origin };
    if let Err(e) = core.store.try_submit(req) {
        core.acks.borrow_mut().try_remove(ticket);
        core.count(Counter::NewMsgBusy);
        tracing::warn!(core = core.id, conn = conn.id, error = %e, "new_msg refused");
        reply(core, conn, Some(&join_ref), r, &m.topic, false, &chat::failed_to_save(&e.to_string()));
    }
}

/// Queues a `phx_reply` with `{"status": ok|error, "response": response}`.
pub(crate) fn reply(
    core: &Core,
    conn: &Conn,
    join_ref: Option<&str>,
    reference: Option<&str>,
    topic: &str,
    ok: bool,
    response: &[u8],
) {
    let mut payload = Vec::with_capacity(32 + response.len());
    payload.extend_from_slice(if ok { br#"{"status":"ok","response":"# } else { br#"{"status":"error","response":"# });
    payload.extend_from_slice(response);
    payload.push(b'}');
    send(core, conn, join_ref, reference, topic, "phx_reply", &payload);
}

fn send(
    core: &Core,
    conn: &Conn,
    join_ref: Option<&str>,
    reference: Option<&str>,
    topic: &str,
    event: &str,
    payload: &[u8],
) {
    let msg = Outbound { join_ref, reference, topic, event, payload };
    core.count(Counter::Replies);
    conn.send(phoenix::encode_frame(conn.vsn(), &msg), core.config().max_outbox_bytes);
}
