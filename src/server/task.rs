//! The per-connection task: the only place socket IO meets protocol code.
//!
//! One task per connection, parked on a readiness poll while idle, so an idle connection holds
//! no read buffer and no timer (a parked 4 KiB read costs ~4.5 KB per connection, a readiness
//! poll ~430 B: BENCHMARKS.md, "Measured facts"). Reads go through the core's scratch buffer;
//! only a partial frame is copied into the connection's own `inbuf`. Writes coalesce
//! everything queued into one `send` (a loopback write costs ~5.5 µs whatever its size).
//! What the bytes mean is decided elsewhere: HTTP by [`crate::http`], frames by
//! [`crate::ws`], Phoenix messages by the connection's [`crate::session::Session`].

use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::AsRawFd;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::Poll;

use bytes::Bytes;

use super::api;
use super::conn::{Conn, Phase};
use super::core::Core;
use super::metrics;
use super::sys::{self, Socket};
use crate::access::{Decision, Refusal};
use crate::close::Close;
use crate::http::{self, response, Route};
use crate::metrics::Counter;
use crate::phoenix::Vsn;
use crate::store::HistoryQuery;
use crate::ws::Decoder;
use crate::{limits, wire};

/// What woke the task.
enum Wake {
    Readable(io::Result<()>),
    Writable(io::Result<()>),
    Work,
}

/// Task-local connection state (lives in the task's future, not in shared state).
struct Local {
    /// Bytes of an incomplete request head or frame.
    inbuf: SpareBuf,
    /// Bytes a `send` could not take yet.
    unsent: SpareBuf,
    decoder: Decoder,
}

/// A byte buffer that holds no memory while empty, and costs 8 B in every connection's task
/// instead of a `Vec`'s 24 (idle connections are the common case).
/// (The `Box` is the point: `clippy::box_collection` weighs allocations, not this size.)
#[derive(Default)]
#[allow(clippy::box_collection)]
struct SpareBuf(Option<Box<Vec<u8>>>);

impl SpareBuf {
    fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    fn bytes(&self) -> &[u8] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().map_or(&mut [], Vec::as_mut_slice)
    }

    fn extend(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.0.get_or_insert_with(Box::default).extend_from_slice(bytes);
        }
    }

    /// Drops the first `n` bytes; frees the buffer when nothing is left.
    fn consume(&mut self, n: usize) {
        if let Some(v) = &mut self.0 {
            v.drain(..n.min(v.len()));
            if v.is_empty() {
                self.0 = None;
            }
        }
    }
}

/// Serves one accepted connection to its end.
/// `at_capacity`: answer 503 and close instead of serving.
pub(crate) async fn serve(core: Rc<Core>, stream: Socket, at_capacity: bool) {
    let conn = core.register(stream.as_raw_fd());
    if at_capacity {
        answer(&core, &conn, response::Status::UNAVAILABLE, "server at capacity");
    }
    if let Err(e) = drive(&core, &conn, &stream).await {
        tracing::debug!(core = core.id(), conn = conn.id, error = %e, "connection error");
    }
    core.unregister(&conn);
}

async fn drive(core: &Core, conn: &Rc<Conn>, stream: &Socket) -> io::Result<()> {
    let mut readable = pin!(stream.readable(false));
    // Boxed and made only while a send is blocked (rare): inline it would add its ~100 B to
    // every idle connection's task.
    let mut writable: Option<Pin<Box<dyn Future<Output = io::Result<()>> + '_>>> = None;
    let mut local = Local { inbuf: SpareBuf::default(), unsent: SpareBuf::default(), decoder: Decoder::default() };
    let mut write_blocked = false;
    loop {
        let wake = poll_fn(|cx| {
            if conn.has_work(write_blocked) {
                return Poll::Ready(Wake::Work);
            }
            if write_blocked {
                let w = writable.get_or_insert_with(|| Box::pin(stream.writable(false)));
                if let Poll::Ready(r) = w.as_mut().poll(cx) {
                    return Poll::Ready(Wake::Writable(r));
                }
            }
            // A paused connection (a join waiting for the join proxy) is not read: its bytes
            // wait in the kernel, not in memory.
            if !conn.paused() {
                if let Poll::Ready(r) = readable.as_mut().poll(cx) {
                    return Poll::Ready(Wake::Readable(r));
                }
            }
            conn.set_waker(cx.waker());
            Poll::Pending
        })
        .await;
        match wake {
            Wake::Readable(r) => {
                readable.set(stream.readable(false));
                r?;
                if !on_readable(core, conn, &mut local)? {
                    return Ok(()); // peer closed
                }
            }
            Wake::Writable(r) => {
                writable = None;
                r?;
            }
            Wake::Work => {}
        }
        if conn.take_resumed() && conn.phase() == Phase::Open && !local.inbuf.is_empty() {
            let used = on_frames(core, conn, &mut local.decoder, local.inbuf.bytes_mut());
            local.inbuf.consume(used);
        }
        if conn.expired() {
            return Ok(());
        }
        if let Some(why) = conn.take_close() {
            start_close(core, conn, why);
        }
        write_blocked = !flush(core, conn, &mut local.unsent)?;
        if !write_blocked && conn.phase() == Phase::Closing {
            sys::shutdown_write(conn.fd);
            conn.set_phase(Phase::Lingering);
        }
    }
}

/// Queues the close frame (when a WebSocket is open) and moves to [`Phase::Closing`].
fn start_close(core: &Core, conn: &Rc<Conn>, why: Close) {
    core.count(Counter::Closed(why));
    core.leave_all(conn);
    if conn.phase() == Phase::Open {
        // The close frame goes after everything already handed to `send`. For a slow consumer
        // whose queue was just dropped this is on a frame boundary unless a frame sent in
        // pieces (a presence_state) was cut between `unsent` and the dropped queue; the
        // connection is closing either way.
        conn.push_final(wire::close(why));
        tracing::debug!(core = core.id(), conn = conn.id, user = %conn.user(), code = why.code(), reason = why.reason(), "closing");
    }
    conn.set_phase(Phase::Closing);
    conn.set_deadline_ms(core.deadline_after_ms(limits::CLOSE_LINGER));
}

/// Reads what is available. Returns `false` at end of stream.
fn on_readable(core: &Core, conn: &Rc<Conn>, local: &mut Local) -> io::Result<bool> {
    for _ in 0..limits::READS_PER_WAKE_MAX {
        let mut buf = core.read_buf();
        let n = match sys::recv(conn.fd, &mut buf) {
            Ok(0) => return Ok(false),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) => return Err(e),
        };
        let full = n == buf.len();
        match conn.phase() {
            Phase::Handshake => {
                local.inbuf.extend(&buf[..n]);
                drop(buf);
                on_handshake_bytes(core, conn, local);
            }
            Phase::Open => {
                conn.set_deadline_ms(core.idle_deadline_ms());
                if local.inbuf.is_empty() {
                    let used = on_frames(core, conn, &mut local.decoder, &mut buf[..n]);
                    local.inbuf.extend(&buf[used..n]);
                } else {
                    local.inbuf.extend(&buf[..n]);
                    drop(buf);
                    let used = on_frames(core, conn, &mut local.decoder, local.inbuf.bytes_mut());
                    local.inbuf.consume(used);
                }
            }
            Phase::Waiting | Phase::Closing | Phase::Lingering => {} // discard
        }
        if !full || conn.paused() {
            break;
        }
    }
    Ok(true)
}

/// Decodes and handles complete frames at the start of `buf`; returns the bytes consumed.
fn on_frames(core: &Core, conn: &Rc<Conn>, decoder: &mut Decoder, buf: &mut [u8]) -> usize {
    let max = core.config().max_frame_bytes;
    let mut pos = 0;
    while pos < buf.len() && conn.phase() == Phase::Open && !conn.stop_reading() {
        match decoder.decode(&mut buf[pos..], max) {
            Ok(None) => break,
            Ok(Some((msg, n))) => {
                pos += n;
                if let Some(msg) = msg {
                    core.on_message(conn, msg);
                }
            }
            Err(e) => {
                tracing::warn!(core = core.id(), conn = conn.id, user = %conn.user(), error = %e, "websocket error");
                conn.request_close(e.close());
                return buf.len();
            }
        }
    }
    if conn.close_requested() {
        return buf.len(); // closing: the rest is discarded
    }
    pos
}

/// Handles the request head once it is complete.
fn on_handshake_bytes(core: &Core, conn: &Rc<Conn>, local: &mut Local) {
    let (head, used) = match http::parse_head(local.inbuf.bytes()) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return,
        Err(e) => return answer(core, conn, e.status(), &e.to_string()),
    };
    let shared = core.shared();
    let upgrade = match http::route(&head, &core.config().origins) {
        Route::Health if shared.is_draining() => return answer(core, conn, response::Status::UNAVAILABLE, "draining"),
        Route::Health => return answer(core, conn, response::Status::OK, "ok"),
        Route::Favicon => return answer_bytes(core, conn, response::no_favicon()),
        Route::Metrics => {
            core.publish();
            return answer_bytes(core, conn, response::metrics(&metrics::render(shared, core.store())));
        }
        Route::Reject(status, why) => return answer(core, conn, status, why),
        Route::Asset(asset) => return answer_bytes(core, conn, response::asset(&asset)),
        Route::DevToken(_) if !core.config().dev_tokens => {
            return answer(core, conn, response::Status::NOT_FOUND, "not found")
        }
        Route::DevToken(sub) => return answer_bytes(core, conn, dev_token(core, sub)),
        Route::ApiError(status, why) => return answer_bytes(core, conn, response::json_error(status, why)),
        Route::History(h) => return history(core, conn, h),
        // Called again as more of the body arrives (the head is parsed again: it is small).
        Route::Api(request) => return api::serve(core, conn, &head, request, &local.inbuf.bytes()[used..]),
        Route::Upgrade(_) if shared.is_draining() => {
            core.count(Counter::RefusedDraining);
            return answer(core, conn, response::Status::UNAVAILABLE, "draining");
        }
        Route::Upgrade(up) => up,
    };
    let Some(vsn) = Vsn::negotiate(upgrade.vsn.as_deref()) else {
        return answer(core, conn, response::Status::FORBIDDEN, "unsupported vsn");
    };
    let user = match shared.access.verifier().identify(upgrade.token.as_deref()) {
        Ok(identity) => {
            core.set_grants(conn, identity.grants);
            identity.user
        }
        Err(e) => {
            tracing::info!(core = core.id(), conn = conn.id, error = %e, "upgrade refused");
            return answer(core, conn, response::Status::FORBIDDEN, "forbidden");
        }
    };
    let accept = match upgrade.accept {
        Ok(accept) => accept,
        Err(why) if why == http::request::BAD_WS_VERSION => {
            return answer_bytes(core, conn, response::unsupported_ws_version(why))
        }
        Err(why) => return answer(core, conn, response::Status::BAD_REQUEST, why),
    };
    conn.push_final(Bytes::from(response::switching_protocols(&accept, upgrade.protocol_phoenix)));
    conn.open(user, vsn);
    conn.set_deadline_ms(core.idle_deadline_ms());
    tracing::debug!(core = core.id(), conn = conn.id, user = %user, ?vsn, "connected");
    // Bytes after the head are the first WebSocket frames.
    local.inbuf.consume(used);
    if !local.inbuf.is_empty() {
        let consumed = on_frames(core, conn, &mut local.decoder, local.inbuf.bytes_mut());
        local.inbuf.consume(consumed);
    }
}

/// Mints a token for `sub` (or a new random user): the demo page's one-click sign-in.
fn dev_token(core: &Core, sub: Option<uuid::Uuid>) -> Vec<u8> {
    let sub = sub.unwrap_or_else(uuid::Uuid::new_v4);
    match crate::auth::mint(&core.config().jwt_secret, sub, limits::DEV_TOKEN_TTL, &Default::default()) {
        Ok(token) => {
            let mut body = Vec::with_capacity(token.len() + 64);
            body.extend_from_slice(b"{\"token\":");
            crate::phoenix::write_str(&mut body, &token);
            body.extend_from_slice(b",\"sub\":");
            crate::phoenix::write_str(&mut body, &sub.to_string());
            body.push(b'}');
            tracing::info!(core = core.id(), %sub, "dev token minted");
            response::json(response::Status::OK, &body)
        }
        Err(e) => {
            tracing::error!(error = %e, "dev token: minting failed");
            response::json_error(response::Status::UNAVAILABLE, "cannot mint a token")
        }
    }
}

/// Authenticates a history request, checks the join policy, and hands it to a reader thread
/// ([`Core::read_history`]); under the `proxy` policy the backend may be asked first.
fn history(core: &Core, conn: &Rc<Conn>, h: http::HistoryRequest) {
    let access = &core.shared().access;
    let identity = match access.verifier().identify(h.token.as_deref()) {
        Ok(identity) => identity,
        Err(e) => {
            tracing::info!(core = core.id(), conn = conn.id, error = %e, "history refused");
            return answer_bytes(core, conn, response::json_error(response::Status::UNAUTHORIZED, "unauthorized"));
        }
    };
    let query = HistoryQuery { conversation: h.conversation, before: h.before, limit: h.limit, after: None };
    match access.history(identity.user, h.conversation, &identity.grants) {
        Decision::Allow => core.read_history(conn, query),
        Decision::Refuse(why) => core.answer_http(conn, refused(why)),
        Decision::Ask => core.authorize_history(conn, identity.user, query),
    }
}

/// The history API's answer to a refusal of the join policy: 403, or 503 when the join proxy
/// could not be asked.
pub(crate) fn refused(why: Refusal) -> Vec<u8> {
    let status = match why {
        Refusal::Unauthorized => response::Status::FORBIDDEN,
        Refusal::Unavailable => response::Status::UNAVAILABLE,
    };
    response::json_error(status, why.reason())
}

/// Answers the HTTP request and closes after the answer is sent.
fn answer(core: &Core, conn: &Conn, status: response::Status, body: &str) {
    answer_bytes(core, conn, response::plain(status, body));
}

fn answer_bytes(core: &Core, conn: &Conn, bytes: Vec<u8>) {
    core.answer_http(conn, bytes);
}

/// Sends what is queued: leftovers first, then queued frames coalesced through the core's
/// write buffer. Returns `false` if the socket is full (wait for writability).
fn flush(core: &Core, conn: &Conn, unsent: &mut SpareBuf) -> io::Result<bool> {
    if !unsent.is_empty() {
        let n = send_some(conn, unsent.bytes())?;
        unsent.consume(n);
        if !unsent.is_empty() {
            return Ok(false);
        }
    }
    let mut buf = core.write_buf();
    while conn.has_output() {
        buf.clear();
        conn.drain_outbox_into(&mut buf, limits::WRITE_BATCH_BYTES);
        let n = send_some(conn, &buf)?;
        if n < buf.len() {
            unsent.extend(&buf[n..]);
            return Ok(false);
        }
    }
    if buf.capacity() > limits::WRITE_BATCH_BYTES * 2 {
        *buf = Vec::new();
    }
    Ok(true)
}

/// One non-blocking send; a full socket counts as 0 bytes.
fn send_some(conn: &Conn, bytes: &[u8]) -> io::Result<usize> {
    match sys::send(conn.fd, bytes) {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(e),
    }
}
