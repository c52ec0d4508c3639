//! The join proxy: asks the app backend whether a user may join a conversation.
//!
//! `POST <NEXUS_JOIN_PROXY_URL>` with `{"user_id","conversation_id"}` and the bearer secret;
//! 2xx allows, 403/404 refuse, anything else (other statuses, timeouts, refused connections)
//! is `authorization unavailable`. Calls run on [`limits::JOIN_PROXY_WORKERS`] threads with a
//! blocking HTTP client (`ureq`), never on a core. One table, under one lock, holds both the
//! cache of answers and the calls in flight: a join for a pair already being asked waits for
//! that call instead of making another, so a reconnect storm of one user makes one call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use uuid::Uuid;

use super::{Decision, Refusal};
use crate::config::ProxyConfig;
use crate::limits;

/// Where one verdict goes (called once, on a proxy thread or the asking core).
pub type Answer = Box<dyn FnOnce(Result<(), Refusal>) + Send>;

/// What `/metrics` shows of the proxy.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Backend calls made.
    pub calls: AtomicU64,
    /// Calls that failed (status other than 2xx/403/404, timeout, connection).
    pub failures: AtomicU64,
    /// Joins and history reads answered from the cache.
    pub cache_hits: AtomicU64,
    /// Asks that joined a call already in flight for the same pair.
    pub coalesced: AtomicU64,
}

/// The join proxy's shared state: the table, the call queue, the stats.
pub struct Proxy {
    table: Arc<Mutex<Table>>,
    calls: Sender<Call>,
    stats: Arc<ProxyStats>,
}

/// A call to make: the pair, and when it was asked (its time budget started then).
type Call = (Uuid, Uuid, Instant);

/// Cached answers and calls in flight, by (user, conversation).
#[derive(Default)]
struct Table {
    entries: HashMap<(Uuid, Uuid), Entry>,
}

enum Entry {
    /// The backend's answer (allow or deny), good until `until`.
    Known { allowed: bool, until: Instant },
    /// A call is in flight; these wait for it. `revoked`: the member was removed meanwhile,
    /// so the answer is `unauthorized` whatever the backend says.
    Asking { waiters: Vec<Answer>, revoked: bool },
}

impl Proxy {
    /// Starts the proxy threads.
    pub fn start(config: ProxyConfig) -> std::io::Result<Proxy> {
        let (tx, rx) = crossbeam_channel::bounded(limits::JOIN_PROXY_QUEUE_MAX);
        let table = Arc::new(Mutex::new(Table::default()));
        let stats = Arc::new(ProxyStats::default());
        let caller = Arc::new(Caller::new(&config));
        for i in 0..limits::JOIN_PROXY_WORKERS {
            let (rx, table, stats, caller) = (rx.clone(), table.clone(), stats.clone(), caller.clone());
            let ttl = config.cache_ttl;
            std::thread::Builder::new()
                .name(format!("join-proxy-{i}"))
                .spawn(move || work(&rx, &table, &stats, &caller, ttl))?;
        }
        Ok(Proxy { table, calls: tx, stats })
    }

    /// The stats for `/metrics`.
    pub fn stats(&self) -> &ProxyStats {
        &self.stats
    }

    /// Calls waiting for a proxy thread.
    pub fn queued(&self) -> usize {
        self.calls.len()
    }

    /// Answers cached now.
    pub fn cached_entries(&self) -> usize {
        self.table().entries.len()
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        lock(&self.table)
    }

    /// The cached answer for the pair, or [`Decision::Ask`].
    pub fn cached(&self, user: Uuid, conversation: Uuid) -> Decision {
        let known = self.table().known(&(user, conversation));
        known.map_or(Decision::Ask, |verdict| self.hit(verdict).into())
    }

    fn hit(&self, verdict: Result<(), Refusal>) -> Result<(), Refusal> {
        self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
        verdict
    }

    /// Asks the backend, or joins the call in flight for the pair; `Some` when the verdict is
    /// known at once (a fresh cache entry, or no room to queue the call).
    pub fn ask(&self, user: Uuid, conversation: Uuid, answer: impl FnOnce() -> Answer) -> Option<Result<(), Refusal>> {
        let key = (user, conversation);
        let mut table = self.table();
        if let Some(verdict) = table.known(&key) {
            return Some(self.hit(verdict));
        }
        if let Some(Entry::Asking { waiters, .. }) = table.entries.get_mut(&key) {
            self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
            waiters.push(answer());
            return None;
        }
        if let Err(e) = self.calls.try_send((user, conversation, Instant::now())) {
            if matches!(e, TrySendError::Full(_)) {
                tracing::warn!(queued = limits::JOIN_PROXY_QUEUE_MAX, "join proxy: too many calls waiting");
            }
            return Some(Err(Refusal::Unavailable));
        }
        table.make_room();
        table.entries.insert(key, Entry::Asking { waiters: vec![answer()], revoked: false });
        None
    }

    /// Forgets the pair's answer; a call in flight will answer `unauthorized`.
    pub fn revoke(&self, user: Uuid, conversation: Uuid) {
        let mut table = self.table();
        match table.entries.get_mut(&(user, conversation)) {
            Some(Entry::Asking { revoked, .. }) => *revoked = true,
            Some(Entry::Known { .. }) => {
                table.entries.remove(&(user, conversation));
            }
            None => {}
        }
    }

    /// Forgets every answer about `user` (a disconnect: the reconnecting sockets are asked
    /// about again); calls in flight for the user will answer `unauthorized`. A scan: rare.
    pub fn revoke_user(&self, user: Uuid) {
        self.table().entries.retain(|(u, _), entry| match entry {
            _ if *u != user => true,
            Entry::Known { .. } => false,
            Entry::Asking { revoked, .. } => {
                *revoked = true;
                true
            }
        });
    }
}

impl Table {
    /// The pair's cached answer, if still fresh.
    fn known(&self, key: &(Uuid, Uuid)) -> Option<Result<(), Refusal>> {
        match self.entries.get(key) {
            Some(Entry::Known { allowed: true, until }) if *until > Instant::now() => Some(Ok(())),
            Some(Entry::Known { allowed: false, until }) if *until > Instant::now() => Some(Err(Refusal::Unauthorized)),
            _ => None,
        }
    }

    /// Keeps the table under [`limits::JOIN_PROXY_CACHE_ENTRIES_MAX`]: expired answers go
    /// first, then arbitrary answers (calls in flight stay: they are bounded by the queue).
    fn make_room(&mut self) {
        if self.entries.len() < limits::JOIN_PROXY_CACHE_ENTRIES_MAX {
            return;
        }
        let now = Instant::now();
        self.entries.retain(|_, e| !matches!(e, Entry::Known { until, .. } if *until <= now));
        let mut excess = (self.entries.len() + 1).saturating_sub(limits::JOIN_PROXY_CACHE_ENTRIES_MAX);
        if excess > 0 {
            // Drop a tenth at once so the next inserts do not each scan the table.
            excess = excess.max(limits::JOIN_PROXY_CACHE_ENTRIES_MAX / 10);
            self.entries.retain(|_, e| match e {
                Entry::Known { .. } if excess > 0 => {
                    excess -= 1;
                    false
                }
                _ => true,
            });
        }
    }
}

fn lock(table: &Mutex<Table>) -> MutexGuard<'_, Table> {
    // A panic while holding the lock leaves a consistent table (each step is one map call).
    table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One proxy thread: call, record, answer every waiter.
fn work(calls: &Receiver<Call>, table: &Mutex<Table>, stats: &ProxyStats, caller: &Caller, ttl: Duration) {
    while let Ok((user, conversation, asked)) = calls.recv() {
        stats.calls.fetch_add(1, Ordering::Relaxed);
        let verdict = caller.call(user, conversation, asked);
        if verdict == Err(Refusal::Unavailable) {
            stats.failures.fetch_add(1, Ordering::Relaxed);
        }
        let (waiters, verdict) = {
            let mut table = lock(table);
            let key = (user, conversation);
            let (waiters, revoked) = match table.entries.remove(&key) {
                Some(Entry::Asking { waiters, revoked }) => (waiters, revoked),
                Some(known) => {
                    table.entries.insert(key, known); // cannot happen: one call per pair
                    (Vec::new(), false)
                }
                None => (Vec::new(), false),
            };
            if revoked {
                (waiters, Err(Refusal::Unauthorized))
            } else {
                if let (Some(allowed), false) = (cacheable(verdict), ttl.is_zero()) {
                    table.entries.insert(key, Entry::Known { allowed, until: Instant::now() + ttl });
                }
                (waiters, verdict)
            }
        };
        for answer in waiters {
            answer(verdict);
        }
    }
}

/// Allow and deny are cached; failures are not.
fn cacheable(verdict: Result<(), Refusal>) -> Option<bool> {
    match verdict {
        Ok(()) => Some(true),
        Err(Refusal::Unauthorized) => Some(false),
        Err(Refusal::Unavailable) => None,
    }
}

/// The HTTP side of a call.
struct Caller {
    agent: ureq::Agent,
    url: String,
    authorization: String,
    /// `NEXUS_JOIN_PROXY_TIMEOUT`, counted from when the join asked (time waiting for a
    /// thread included), so no join waits longer.
    timeout: Duration,
}

impl Caller {
    fn new(config: &ProxyConfig) -> Caller {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_idle_connections(limits::JOIN_PROXY_WORKERS)
            .user_agent(concat!("nexus/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        let authorization = format!("Bearer {}", config.secret.expose());
        Caller { agent, url: config.url.clone(), authorization, timeout: config.timeout }
    }

    fn call(&self, user: Uuid, conversation: Uuid, asked: Instant) -> Result<(), Refusal> {
        let started = Instant::now();
        let Some(budget) = self.timeout.checked_sub(started - asked).filter(|b| !b.is_zero()) else {
            tracing::warn!(%user, %conversation, waited = ?(started - asked), "join proxy: timed out waiting for a thread");
            return Err(Refusal::Unavailable);
        };
        let body = format!(r#"{{"user_id":"{user}","conversation_id":"{conversation}"}}"#);
        let response = self
            .agent
            .post(&self.url)
            .config()
            .timeout_global(Some(budget))
            .build()
            .header("Authorization", &self.authorization)
            .header("Content-Type", "application/json")
            .send(body.as_str());
        let mut response = match response {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%user, %conversation, error = %e, elapsed = ?started.elapsed(), "join proxy: call failed");
                return Err(Refusal::Unavailable);
            }
        };
        // Read (a bounded amount of) the body so the connection can be reused.
        let _ = response.body_mut().with_config().limit(limits::JOIN_PROXY_BODY_MAX).read_to_vec();
        let status = response.status().as_u16();
        match status {
            200..=299 => Ok(()),
            403 | 404 => Err(Refusal::Unauthorized),
            _ => {
                tracing::warn!(%user, %conversation, status, "join proxy: unexpected status");
                Err(Refusal::Unavailable)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(allowed: bool, until: Instant) -> Entry {
        Entry::Known { allowed, until }
    }

    #[test]
    fn a_full_table_drops_expired_answers_first_then_a_tenth() {
        let now = Instant::now();
        let mut table = Table::default();
        let max = limits::JOIN_PROXY_CACHE_ENTRIES_MAX as u128;
        for i in 0..max {
            let until = if i % 2 == 0 { now } else { now + Duration::from_secs(60) };
            table.entries.insert((Uuid::from_u128(i), Uuid::nil()), known(true, until));
        }
        table.make_room();
        assert_eq!(table.entries.len() as u128, max / 2, "the expired half went");
        for i in max..2 * max {
            table.entries.insert((Uuid::from_u128(i), Uuid::nil()), known(true, now + Duration::from_secs(60)));
            table.make_room();
        }
        assert!(table.entries.len() <= limits::JOIN_PROXY_CACHE_ENTRIES_MAX);
        table.entries.insert((Uuid::max(), Uuid::nil()), Entry::Asking { waiters: Vec::new(), revoked: false });
        assert_eq!(table.known(&(Uuid::max(), Uuid::nil())), None, "a call in flight is no answer");
    }

    #[test]
    fn revoking_a_user_forgets_its_answers_and_spoils_its_calls() {
        let config = ProxyConfig {
            url: "http://127.0.0.1:9/unused".into(),
            secret: crate::config::Secret::new("s"),
            timeout: Duration::from_secs(1),
            cache_ttl: Duration::from_secs(60),
        };
        let proxy = Proxy::start(config).expect("start");
        let (user, other) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let later = Instant::now() + Duration::from_secs(60);
        {
            let mut table = proxy.table();
            table.entries.insert((user, Uuid::from_u128(10)), known(true, later));
            table.entries.insert((user, Uuid::from_u128(11)), known(false, later));
            table.entries.insert((user, Uuid::from_u128(12)), Entry::Asking { waiters: Vec::new(), revoked: false });
            table.entries.insert((other, Uuid::from_u128(10)), known(true, later));
        }
        assert_eq!(proxy.cached(user, Uuid::from_u128(10)), Decision::Allow);
        assert_eq!(proxy.cached(user, Uuid::from_u128(11)), Decision::Refuse(Refusal::Unauthorized));
        proxy.revoke_user(user);
        assert_eq!(proxy.cached(user, Uuid::from_u128(10)), Decision::Ask);
        assert_eq!(proxy.cached(user, Uuid::from_u128(11)), Decision::Ask);
        assert!(matches!(
            proxy.table().entries.get(&(user, Uuid::from_u128(12))),
            Some(Entry::Asking { revoked: true, .. })
        ));
        assert_eq!(proxy.cached(other, Uuid::from_u128(10)), Decision::Allow, "other users keep theirs");
    }
}
