//! Who may join a conversation and read its history: the join policy (docs/protocol.md,
//! "Private conversations").
//!
//! - `open`: any authenticated user ([`Decision::Allow`] always; nothing is parsed).
//! - `token`: the socket token's grants (`chats`, `chat`), or a join token in the join
//!   payload, decided on the core in microseconds.
//! - `proxy`: the app backend decides; its answers are cached per (user, conversation), and a
//!   miss is asked off the cores ([`proxy`]), the join waiting for the answer.

pub mod proxy;

use uuid::Uuid;

use crate::auth::Verifier;
use crate::config::JoinPolicy;
use crate::phoenix::string_field;

pub use self::proxy::{Proxy, ProxyStats};

/// Why a join (or a history read) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The policy says no: `{"reason":"unauthorized"}`, history 403.
    Unauthorized,
    /// The backend could not be asked (error, timeout, overload): `{"reason":"authorization
    /// unavailable"}`, history 503. Never cached: the next join asks again.
    Unavailable,
}

impl Refusal {
    /// The join's error response.
    pub fn response(self) -> &'static [u8] {
        match self {
            Refusal::Unauthorized => br#"{"reason":"unauthorized"}"#,
            Refusal::Unavailable => br#"{"reason":"authorization unavailable"}"#,
        }
    }

    /// The reason as the history API and the log say it.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Unauthorized => "unauthorized",
            Refusal::Unavailable => "authorization unavailable",
        }
    }
}

/// The policy's answer for one join or history read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allow,
    /// Refused.
    Refuse(Refusal),
    /// Only the backend knows: ask it ([`Access::ask`]) and wait.
    Ask,
}

impl From<Result<(), Refusal>> for Decision {
    fn from(verdict: Result<(), Refusal>) -> Decision {
        match verdict {
            Ok(()) => Decision::Allow,
            Err(why) => Decision::Refuse(why),
        }
    }
}

/// The node's join policy, shared read-only by the cores.
pub struct Access {
    verifier: Verifier,
    policy: Policy,
}

enum Policy {
    Open,
    Token,
    Proxy(Proxy),
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access").field("policy", &self.name()).finish_non_exhaustive()
    }
}

impl Access {
    /// The policy of `config`, checking tokens with `secret` (`leeway_secs` on `exp`/`nbf`).
    /// The `proxy` policy starts its threads here.
    pub fn start(policy: &JoinPolicy, secret: &[u8], leeway_secs: u64) -> std::io::Result<Access> {
        let mut verifier = Verifier::new(secret, leeway_secs);
        let policy = match policy {
            JoinPolicy::Open => Policy::Open,
            JoinPolicy::Token => {
                verifier = verifier.with_grants();
                Policy::Token
            }
            JoinPolicy::Proxy(config) => Policy::Proxy(Proxy::start(config.clone())?),
        };
        Ok(Access { verifier, policy })
    }

    /// The token verifier (reading grants under the `token` policy).
    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// The policy's name (`NEXUS_JOIN_POLICY`).
    pub fn name(&self) -> &'static str {
        match self.policy {
            Policy::Open => "open",
            Policy::Token => "token",
            Policy::Proxy(_) => "proxy",
        }
    }

    /// Whether the policy reads the socket token's grants.
    pub fn uses_grants(&self) -> bool {
        matches!(self.policy, Policy::Token)
    }

    /// The join proxy, under the `proxy` policy.
    pub fn proxy(&self) -> Option<&Proxy> {
        match &self.policy {
            Policy::Proxy(proxy) => Some(proxy),
            _ => None,
        }
    }

    /// May `user` join `conversation`? `payload` is the join's payload (its `token` is a join
    /// token); `grants` are the socket token's.
    pub fn join(&self, user: Uuid, conversation: Uuid, payload: &str, grants: &[Uuid]) -> Decision {
        match &self.policy {
            Policy::Open => Decision::Allow,
            Policy::Token if grants.contains(&conversation) => Decision::Allow,
            Policy::Token => {
                // Cheap test first: most refused joins carry no token at all.
                let token = payload.contains("token").then(|| string_field(payload, "token")).flatten();
                match token.map(|t| self.verifier.verify_join(&t, user, conversation)) {
                    Some(Ok(())) => Decision::Allow,
                    Some(Err(e)) => {
                        tracing::info!(%user, %conversation, error = %e, "join token refused");
                        Decision::Refuse(Refusal::Unauthorized)
                    }
                    None => Decision::Refuse(Refusal::Unauthorized),
                }
            }
            Policy::Proxy(proxy) => proxy.cached(user, conversation),
        }
    }

    /// May the holder of a token with `grants` read `conversation`'s history? The same rule as
    /// a join, without a join token.
    pub fn history(&self, user: Uuid, conversation: Uuid, grants: &[Uuid]) -> Decision {
        self.join(user, conversation, "", grants)
    }

    /// Asks the backend about `user` in `conversation` (after [`Decision::Ask`]). Returns the
    /// verdict when it is known at once (answered meanwhile, or the proxy is overloaded);
    /// otherwise the [`proxy::Answer`] made by `answer` gets it later, on a proxy thread.
    pub fn ask(
        &self,
        user: Uuid,
        conversation: Uuid,
        answer: impl FnOnce() -> proxy::Answer,
    ) -> Option<Result<(), Refusal>> {
        match &self.policy {
            Policy::Proxy(proxy) => proxy.ask(user, conversation, answer),
            _ => Some(Err(Refusal::Unavailable)),
        }
    }

    /// Forgets what the backend said about `user` (a disconnect), so reconnecting sockets are
    /// asked about again.
    pub fn revoke_user(&self, user: Uuid) {
        if let Policy::Proxy(proxy) = &self.policy {
            proxy.revoke_user(user);
        }
    }

    /// Forgets what is known about `user` in `conversation` (the member was removed): the next
    /// join asks the backend again, and a call in flight is answered `unauthorized`.
    pub fn revoke(&self, user: Uuid, conversation: Uuid) {
        if let Policy::Proxy(proxy) = &self.policy {
            proxy.revoke(user, conversation);
        }
    }
}
