//! What each core counts, for `GET /metrics`.
//!
//! A core counts in plain `Cell`s (its thread only: no atomics, no sharing on the hot path)
//! and publishes a copy to [`Published`] on every sweep and before it answers a scrape; a
//! scrape adds up the cores' latest copies. The series table and the counter enum are one
//! list, checked against each other at compile time; the close counters come from the close
//! catalog ([`crate::close`]), so a new close reason is counted and exposed without touching
//! this file.

use std::cell::Cell;
use std::sync::Mutex;

use crate::close::Close;

/// What a core counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// TCP connections accepted.
    Accepted,
    /// Connections answered 503 at the connection cap.
    RefusedCapacity,
    /// Connections refused because `accept` ran out of descriptors.
    RefusedDescriptors,
    /// Upgrades answered 503 while draining.
    RefusedDraining,
    /// Channel joins accepted.
    Joins,
    /// Joins answered `server busy` while cross-core queues are congested.
    JoinsBusy,
    /// Joins refused by the join policy (`unauthorized`).
    JoinsUnauthorized,
    /// Joins refused because the join proxy could not be asked (`authorization unavailable`).
    JoinsUnavailable,
    /// Phoenix messages (text or binary frames) received.
    MessagesIn,
    /// Messages dropped as malformed (not a message of the socket's serializer).
    MessagesDropped,
    /// Replies and pushes queued to one socket.
    Replies,
    /// Broadcast frames queued to members.
    Deliveries,
    /// `new_msg` acknowledged ok.
    NewMsgAcked,
    /// `new_msg` refused at once because the writer queue was full.
    NewMsgBusy,
    /// Client messages refused over the message rate.
    RateLimited,
    /// Rejoins answered `recovered: false` (too many missed, reader busy, read failed).
    RecoveriesRefused,
    /// Missed messages pushed by recoveries.
    RecoveredMessages,
    /// Server API: messages posted.
    ApiMessages,
    /// Server API: member removals.
    ApiRemovals,
    /// Server API: user disconnects.
    ApiDisconnects,
    /// Sockets closed, by catalog entry.
    Closed(Close),
}

/// `(metric, labels, help)` of every counter before the closes, in [`Counter::index`] order.
/// Series of one metric are adjacent; only the first of them carries the help text.
const SERIES: [(&str, &str, &str); Counter::FIXED] = [
    ("nexus_connections_accepted_total", "", "TCP connections accepted."),
    ("nexus_connections_refused_total", "reason=\"capacity\"", "Connections or upgrades refused, by reason."),
    ("nexus_connections_refused_total", "reason=\"descriptors\"", ""),
    ("nexus_connections_refused_total", "reason=\"draining\"", ""),
    ("nexus_joins_total", "", "Channel joins accepted."),
    ("nexus_joins_refused_total", "reason=\"busy\"", "Joins refused, by reason (busy: cross-core queues congested)."),
    ("nexus_joins_refused_total", "reason=\"unauthorized\"", ""),
    ("nexus_joins_refused_total", "reason=\"unavailable\"", ""),
    ("nexus_messages_in_total", "", "Phoenix messages received from clients."),
    ("nexus_messages_dropped_total", "", "Client messages dropped as malformed (the socket stays open)."),
    ("nexus_replies_total", "", "Replies and pushes sent to one socket."),
    ("nexus_broadcast_deliveries_total", "", "Broadcast frames queued to members (new_msg, presence_diff)."),
    ("nexus_new_msg_total", "result=\"acked\"", "new_msg outcomes answered by this server."),
    ("nexus_new_msg_total", "result=\"busy\"", ""),
    ("nexus_rate_limited_total", "", "Client messages refused over NEXUS_MSG_RATE."),
    (
        "nexus_recoveries_refused_total",
        "",
        "Rejoins answered recovered:false (too many missed, readers busy or failed).",
    ),
    ("nexus_recovered_messages_total", "", "Missed messages pushed to rejoining sockets."),
    ("nexus_api_requests_total", "action=\"message\"", "Server API requests accepted, by action."),
    ("nexus_api_requests_total", "action=\"remove_member\"", ""),
    ("nexus_api_requests_total", "action=\"disconnect\"", ""),
];

/// The close counters' metric.
const CLOSES: (&str, &str) = ("nexus_closes_total", "Sockets closed, by reason.");

impl Counter {
    /// Counters before the per-close ones (checked below against the last of them).
    const FIXED: usize = 20;
    /// Every counter, closes included.
    pub const COUNT: usize = Counter::FIXED + Close::KINDS;

    /// Position in a [`Counters`] array.
    pub const fn index(self) -> usize {
        match self {
            Counter::Accepted => 0,
            Counter::RefusedCapacity => 1,
            Counter::RefusedDescriptors => 2,
            Counter::RefusedDraining => 3,
            Counter::Joins => 4,
            Counter::JoinsBusy => 5,
            Counter::JoinsUnauthorized => 6,
            Counter::JoinsUnavailable => 7,
            Counter::MessagesIn => 8,
            Counter::MessagesDropped => 9,
            Counter::Replies => 10,
            Counter::Deliveries => 11,
            Counter::NewMsgAcked => 12,
            Counter::NewMsgBusy => 13,
            Counter::RateLimited => 14,
            Counter::RecoveriesRefused => 15,
            Counter::RecoveredMessages => 16,
            Counter::ApiMessages => 17,
            Counter::ApiRemovals => 18,
            Counter::ApiDisconnects => 19,
            Counter::Closed(why) => Counter::FIXED + why.index(),
        }
    }
}

// The series table names exactly the counters before the closes, and they end where the
// closes begin.
const _: () = assert!(SERIES.len() == Counter::FIXED);
const _: () = assert!(Counter::ApiDisconnects.index() + 1 == Counter::FIXED);

/// One core's counters (its thread only).
#[derive(Debug, Default)]
pub struct Counters([Cell<u64>; Counter::COUNT]);

impl Counters {
    /// Adds `n` to `c`.
    pub fn add(&self, c: Counter, n: u64) {
        let cell = &self.0[c.index()];
        cell.set(cell.get() + n);
    }

    /// Adds one to `c`.
    pub fn bump(&self, c: Counter) {
        self.add(c, 1);
    }

    /// The current value of `c`.
    pub fn get(&self, c: Counter) -> u64 {
        self.0[c.index()].get()
    }

    fn snapshot(&self) -> [u64; Counter::COUNT] {
        std::array::from_fn(|i| self.0[i].get())
    }
}

/// A core's gauges, published with its counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Gauges {
    /// Topics whose presence this core owns.
    pub presence_topics: u64,
    /// Presence metas in those topics.
    pub presence_metas: u64,
    /// Messages waiting in this core's overflow toward other cores.
    pub overflow_msgs: u64,
    /// Bytes queued in this core's connection outboxes.
    pub outbox_bytes: u64,
}

/// A core's last published figures (or their sum over the cores).
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    counters: [u64; Counter::COUNT],
    /// Gauges.
    pub gauges: Gauges,
}

impl Default for Snapshot {
    fn default() -> Snapshot {
        Snapshot { counters: [0; Counter::COUNT], gauges: Gauges::default() }
    }
}

impl Snapshot {
    /// Every counter as `(metric, labels, help, value)`, in exposition order (help only on
    /// the first series of each metric).
    pub fn series(&self) -> impl Iterator<Item = (&'static str, String, &'static str, u64)> + '_ {
        let fixed = SERIES.iter().enumerate().map(|(i, (name, labels, help))| (*name, labels.to_string(), *help, i));
        let closes = Close::ALL.iter().enumerate().map(|(i, why)| {
            let help = if i == 0 { CLOSES.1 } else { "" };
            (CLOSES.0, format!("reason=\"{}\"", why.label()), help, Counter::Closed(*why).index())
        });
        fixed.chain(closes).map(|(name, labels, help, i)| (name, labels, help, self.counters[i]))
    }
}

/// Every core's last published snapshot.
#[derive(Debug, Default)]
pub struct Published(Vec<Mutex<Snapshot>>);

impl Published {
    /// Room for `cores` snapshots.
    pub fn new(cores: usize) -> Published {
        Published((0..cores).map(|_| Mutex::new(Snapshot::default())).collect())
    }

    /// Stores core `id`'s current figures.
    pub fn publish(&self, id: usize, counters: &Counters, gauges: Gauges) {
        let snapshot = Snapshot { counters: counters.snapshot(), gauges };
        if let Some(slot) = self.0.get(id) {
            // A poisoned lock only means a panic mid-copy elsewhere; the data is plain numbers.
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = snapshot;
        }
    }

    /// The sum over every core.
    pub fn total(&self) -> Snapshot {
        let mut sum = Snapshot::default();
        for slot in &self.0 {
            let s = *slot.lock().unwrap_or_else(|e| e.into_inner());
            for (t, v) in sum.counters.iter_mut().zip(s.counters) {
                *t += v;
            }
            sum.gauges.presence_topics += s.gauges.presence_topics;
            sum.gauges.presence_metas += s.gauges.presence_metas;
            sum.gauges.overflow_msgs += s.gauges.overflow_msgs;
            sum.gauges.outbox_bytes += s.gauges.outbox_bytes;
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_has_one_series_and_one_slot() {
        let all = [
            Counter::Accepted,
            Counter::RefusedCapacity,
            Counter::RefusedDescriptors,
            Counter::RefusedDraining,
            Counter::Joins,
            Counter::JoinsBusy,
            Counter::JoinsUnauthorized,
            Counter::JoinsUnavailable,
            Counter::MessagesIn,
            Counter::MessagesDropped,
            Counter::Replies,
            Counter::Deliveries,
            Counter::NewMsgAcked,
            Counter::NewMsgBusy,
            Counter::RateLimited,
            Counter::RecoveriesRefused,
            Counter::RecoveredMessages,
            Counter::ApiMessages,
            Counter::ApiRemovals,
            Counter::ApiDisconnects,
        ]
        .into_iter()
        .chain(Close::ALL.into_iter().map(Counter::Closed));
        let counters = Counters::default();
        for (i, c) in all.enumerate() {
            assert_eq!(c.index(), i, "{c:?}");
            counters.add(c, i as u64 + 1);
        }
        let published = Published::new(2);
        published.publish(
            0,
            &counters,
            Gauges { presence_topics: 1, presence_metas: 2, overflow_msgs: 5, outbox_bytes: 7 },
        );
        published.publish(
            1,
            &counters,
            Gauges { presence_topics: 3, presence_metas: 4, overflow_msgs: 0, outbox_bytes: 1 },
        );
        let total = published.total();
        let series: Vec<_> = total.series().collect();
        assert_eq!(series.len(), Counter::COUNT);
        for (i, (_, _, _, v)) in series.iter().enumerate() {
            assert_eq!(*v, 2 * (i as u64 + 1));
        }
        assert_eq!(total.gauges, Gauges { presence_topics: 4, presence_metas: 6, overflow_msgs: 5, outbox_bytes: 8 });
        let idle = series.iter().find(|s| s.1 == "reason=\"idle\"").expect("idle close series");
        assert_eq!((idle.0, idle.2), ("nexus_closes_total", "Sockets closed, by reason."));
    }
}
