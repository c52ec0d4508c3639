//! The join policy on a core (docs/protocol.md, "Private conversations"): the token grants of
//! this core's sockets, joins and history reads waiting for the join proxy, and the server
//! API's member removals and disconnects as they reach every core.
//!
//! A join waiting for the proxy pauses its socket ([`Conn::pause`]): nothing more is read from
//! it until the answer, as a Phoenix socket handles nothing while a channel joins, so the
//! client's later messages (a push to the channel, a leave) find the join decided.

use std::rc::Rc;

use uuid::Uuid;

use super::super::conn::{Conn, Phase};
use super::super::task;
use super::Core;
use crate::access::Refusal;
use crate::bus::CoreMsg;
use crate::close::Close;
use crate::session::PendingJoin;
use crate::store::HistoryQuery;

/// What waits for the join proxy's verdict.
pub(crate) enum AuthWait {
    /// A join; its socket is paused.
    Join { conn: Rc<Conn>, join: PendingJoin },
    /// A history request, parked in [`Phase::Waiting`].
    History { conn: Rc<Conn>, query: HistoryQuery },
}

impl Core {
    /// Remembers what `conn`'s token grants (the `token` policy; nothing is kept for none).
    pub(crate) fn set_grants(&self, conn: &Conn, grants: Vec<Uuid>) {
        if !grants.is_empty() {
            self.grants.borrow_mut().insert(conn.key, grants.into_boxed_slice());
        }
    }

    /// Asks the join proxy about a join; the socket reads nothing until the answer.
    pub(super) fn authorize_join(&self, conn: &Rc<Conn>, join: PendingJoin) {
        let (user, conversation) = (conn.user(), join.conversation);
        if !self.ask(user, conversation, AuthWait::Join { conn: conn.clone(), join }) {
            conn.pause();
        }
    }

    /// Asks the join proxy about a history read; the request waits parked.
    pub(crate) fn authorize_history(&self, conn: &Rc<Conn>, user: Uuid, query: HistoryQuery) {
        let conversation = query.conversation;
        if !self.ask(user, conversation, AuthWait::History { conn: conn.clone(), query }) {
            conn.set_phase(Phase::Waiting);
            // The proxy answers within its timeout; the margin covers the mailbox and the sweep.
            let timeout = match &self.config().join_policy {
                crate::config::JoinPolicy::Proxy(proxy) => proxy.timeout,
                _ => std::time::Duration::ZERO,
            };
            conn.set_deadline_ms(self.deadline_after_ms(timeout + crate::limits::HANDSHAKE_TIMEOUT));
        }
    }

    /// Registers `wait` and asks; `true` when it was answered (and handled) at once.
    fn ask(&self, user: Uuid, conversation: Uuid, wait: AuthWait) -> bool {
        let ticket = self.auth_waits.borrow_mut().insert(wait);
        let ticket = u32::try_from(ticket).expect("waits are bounded by the connections");
        let mailboxes = self.shared.mailboxes.clone();
        let core = self.id;
        let answer = move || -> crate::access::proxy::Answer {
            Box::new(move |verdict| mailboxes[core].push_blocking(CoreMsg::Authorized { ticket, verdict }))
        };
        let Some(verdict) = self.shared.access.ask(user, conversation, answer) else { return false };
        self.on_authorized(ticket, verdict);
        true
    }

    /// The join proxy answered the wait `ticket`.
    pub(super) fn on_authorized(&self, ticket: u32, verdict: Result<(), Refusal>) {
        let Some(wait) = self.auth_waits.borrow_mut().try_remove(ticket as usize) else { return };
        match wait {
            AuthWait::Join { conn, join } => {
                if conn.phase() == Phase::Open && !conn.closing() {
                    self.with_session(&conn, |session, env, out| session.authorized(&join, verdict, env, out));
                }
                conn.resume();
            }
            AuthWait::History { conn, query } => {
                if conn.phase() != Phase::Waiting && conn.phase() != Phase::Handshake {
                    return; // timed out meanwhile
                }
                match verdict {
                    Ok(()) => self.read_history(&conn, query),
                    Err(why) => self.answer_http(&conn, task::refused(why)),
                }
            }
        }
    }

    /// Server API: `user`'s sockets on this core leave `conversation` and lose its grant.
    pub(super) fn on_remove_member(&self, conversation: Uuid, user: Uuid) {
        // Every core forgets the proxy's answer (once would do; each is cheap and idempotent,
        // and so a command from another node needs no special path).
        self.shared.access.revoke(user, conversation);
        let mut removed = 0;
        for conn in self.sockets_of(user) {
            if let Some(grants) = self.grants.borrow_mut().get_mut(&conn.key) {
                if grants.contains(&conversation) {
                    *grants = grants.iter().copied().filter(|g| *g != conversation).collect();
                }
            }
            let mut effects = self.effects.take();
            if conn.session_mut().remove(conversation, &mut effects) {
                removed += 1;
            }
            for e in effects.drain(..) {
                self.execute(&conn, e);
            }
            self.effects.replace(effects);
        }
        tracing::info!(core = self.id, %user, %conversation, sockets = removed, "member removed");
    }

    /// Server API: close `user`'s sockets on this core.
    pub(super) fn on_disconnect(&self, user: Uuid) {
        if self.id == 0 {
            self.shared.access.revoke_user(user); // once per node
        }
        let sockets = self.sockets_of(user);
        for conn in &sockets {
            conn.request_close(Close::Disconnected);
        }
        tracing::info!(core = self.id, %user, sockets = sockets.len(), "user disconnected");
    }

    /// `user`'s open sockets on this core (a scan: the server API is rare, an index per user
    /// would cost every connection).
    fn sockets_of(&self, user: Uuid) -> Vec<Rc<Conn>> {
        let conns = self.conns.borrow();
        conns.iter().filter(|(_, c)| c.phase() == Phase::Open && c.user() == user).map(|(_, c)| c.clone()).collect()
    }
}
