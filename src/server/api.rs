//! The server API (docs/protocol.md, "Server API"): what the app backend asks of Nexus with
//! `NEXUS_API_KEY`. A posted message takes the `new_msg` path (the writer, then the broadcast
//! and the answer); a member removal or a disconnect goes to every core, and in cluster mode
//! to every node through Redis.

use std::rc::Rc;

use sonic_rs::JsonValueTrait;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::conn::Conn;
use super::core::Core;
use super::fabric::command_msg;
use crate::chat;
use crate::cluster::command::Command;
use crate::http::response::{self, Status};
use crate::http::{ApiAction, ApiRequest, Head};
use crate::ids::parse_canonical_uuid;
use crate::limits;
use crate::phoenix::{nests_deeper_than, string_field};

/// Serves one server API request; `body` is what was read after the head. A body not all
/// here yet is waited for: the caller calls again with more.
pub(crate) fn serve(core: &Core, conn: &Rc<Conn>, head: &Head, request: ApiRequest, body: &[u8]) {
    let Some(key) = &core.config().api_key else {
        core.answer_http(conn, response::json_error(Status::NOT_FOUND, "not found"));
        return;
    };
    let given = request.key.as_deref().unwrap_or("");
    if !bool::from(given.as_bytes().ct_eq(key.expose().as_bytes())) {
        tracing::info!(core = core.id(), conn = conn.id, action = request.action.label(), "server API: key refused");
        core.answer_http(conn, response::json_error(Status::UNAUTHORIZED, "unauthorized"));
        return;
    }
    if !request.method_ok {
        core.answer_http(conn, response::json_error(Status::METHOD_NOT_ALLOWED, "method not allowed"));
        return;
    }
    let command = match request.action {
        ApiAction::PostMessage(conversation) => {
            match message_body(head, body, core.config().max_frame_bytes) {
                Ok(None) => {} // read more
                Ok(Some((sender, text))) => {
                    core.count_api(request.action);
                    core.submit_api(conn, conversation, sender, text);
                }
                Err((status, why)) => core.answer_http(conn, response::json_error(status, why)),
            }
            return;
        }
        ApiAction::RemoveMember(conversation, user) => Command::RemoveMember { conversation, user },
        ApiAction::Disconnect(user) => Command::Disconnect { user },
    };
    core.count_api(request.action);
    core.answer_http(conn, everywhere(core, command));
}

/// Carries out `command` on every core of this node and, in cluster mode, on every other node.
fn everywhere(core: &Core, command: Command) -> Vec<u8> {
    // The join proxy's answers are forgotten before the answer (the cores forget them again
    // as the command reaches them, as for a command from another node).
    let access = &core.shared().access;
    match command {
        Command::RemoveMember { conversation, user } => access.revoke(user, conversation),
        Command::Disconnect { user } => access.revoke_user(user),
    }
    for id in 0..core.shared().mailboxes.len() {
        core.send_to(id, command_msg(command));
    }
    tracing::info!(core = core.id(), ?command, "server API");
    match &core.shared().fabric {
        // While Redis is down the publication would be lost: say so (both commands are safe to
        // repeat).
        Some(fabric) if !fabric.redis_up() || !fabric.publisher.command(command) => {
            tracing::warn!(?command, "server API: Redis cannot take the command; carried out on this node only");
            response::json_error(Status::UNAVAILABLE, "cluster unavailable: carried out on this node only")
        }
        _ => response::no_content(),
    }
}

type Refused = (Status, &'static str);

/// The `{"sender_id","body"}` of a posted message, once all of it is read (`Ok(None)` before).
fn message_body(head: &Head, body: &[u8], max: usize) -> Result<Option<(Uuid, String)>, Refused> {
    if head.transfer_encoding.is_some() {
        return Err((Status::LENGTH_REQUIRED, "send the body with Content-Length"));
    }
    let length = match head.content_length.as_deref().map(str::parse::<usize>) {
        None => return Err((Status::LENGTH_REQUIRED, "send the body with Content-Length")),
        Some(Err(_)) => return Err((Status::BAD_REQUEST, "invalid Content-Length")),
        Some(Ok(n)) if n > max => return Err((Status::TOO_LARGE, "body over NEXUS_MAX_FRAME_BYTES")),
        Some(Ok(n)) => n,
    };
    if body.len() < length {
        return Ok(None);
    }
    let json = std::str::from_utf8(&body[..length]).map_err(|_| (Status::BAD_REQUEST, "body is not UTF-8"))?;
    let object = !nests_deeper_than(json.as_bytes(), limits::JSON_DEPTH_MAX)
        && sonic_rs::from_str::<sonic_rs::Value>(json).is_ok_and(|v| v.is_object());
    if !object {
        return Err((Status::BAD_REQUEST, "body is not a JSON object"));
    }
    let sender = string_field(json, "sender_id").as_deref().and_then(parse_canonical_uuid);
    let Some(sender) = sender else { return Err((Status::BAD_REQUEST, "sender_id must be a user id (UUID)")) };
    let text = chat::parse_body(json).map_err(|detail| (Status::BAD_REQUEST, detail))?;
    Ok(Some((sender, text)))
}
