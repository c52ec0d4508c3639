//! `GET /metrics` in the Prometheus text format.
//!
//! Each core counts in plain `Cell`s (no atomics, no sharing on the hot path) and publishes a
//! copy of its counters to [`Published`] on every sweep tick and before it answers a scrape;
//! a scrape adds up the cores' latest copies (so other cores' figures are at most one sweep,
//! 250 ms, old) and reads the gauges (connections, queue depths) and the writer's histograms
//! directly.

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::Mutex;

use super::core::Shared;
use crate::close::Close;
use crate::store::stats::Histogram;
use crate::store::StoreHandle;

/// What a core counts. The discriminant indexes [`SERIES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counter {
    Accepted,
    RefusedCapacity,
    RefusedDescriptors,
    RefusedDraining,
    Joins,
    MessagesIn,
    Replies,
    Deliveries,
    NewMsgAcked,
    NewMsgBusy,
    RateLimited,
    CloseIdle,
    CloseSlowConsumer,
    CloseTooBig,
    CloseInvalidUtf8,
    CloseProtocol,
    CloseClient,
    CloseGoingAway,
    CloseRateLimited,
}

const COUNTERS: usize = 19;

/// `(metric, labels, help)` per [`Counter`], in its order. Series of one metric are adjacent.
const SERIES: [(&str, &str, &str); COUNTERS] = [
    ("nexus_connections_accepted_total", "", "TCP connections accepted."),
    ("nexus_connections_refused_total", "reason=\"capacity\"", "Connections or upgrades refused, by reason."),
    ("nexus_connections_refused_total", "reason=\"descriptors\"", ""),
    ("nexus_connections_refused_total", "reason=\"draining\"", ""),
    ("nexus_joins_total", "", "Channel joins accepted."),
    ("nexus_messages_in_total", "", "Phoenix messages received from clients."),
    ("nexus_replies_total", "", "Replies and pushes sent to one socket."),
    ("nexus_broadcast_deliveries_total", "", "Broadcast frames queued to members (new_msg, presence_diff)."),
    ("nexus_new_msg_total", "result=\"acked\"", "new_msg outcomes answered by this server."),
    ("nexus_new_msg_total", "result=\"busy\"", ""),
    ("nexus_rate_limited_total", "", "Client messages refused over NEXUS_MSG_RATE."),
    ("nexus_closes_total", "reason=\"idle\"", "Sockets closed, by reason."),
    ("nexus_closes_total", "reason=\"slow_consumer\"", ""),
    ("nexus_closes_total", "reason=\"too_big\"", ""),
    ("nexus_closes_total", "reason=\"invalid_utf8\"", ""),
    ("nexus_closes_total", "reason=\"protocol\"", ""),
    ("nexus_closes_total", "reason=\"client\"", ""),
    ("nexus_closes_total", "reason=\"going_away\"", ""),
    ("nexus_closes_total", "reason=\"rate_limited\"", ""),
];

impl Counter {
    pub(crate) fn close(why: Close) -> Counter {
        match why {
            Close::Idle => Counter::CloseIdle,
            Close::SlowConsumer => Counter::CloseSlowConsumer,
            Close::TooBig => Counter::CloseTooBig,
            Close::InvalidUtf8 => Counter::CloseInvalidUtf8,
            Close::Protocol => Counter::CloseProtocol,
            Close::Echo(_) => Counter::CloseClient,
            Close::GoingAway => Counter::CloseGoingAway,
            Close::RateLimited => Counter::CloseRateLimited,
        }
    }
}

/// One core's counters (its thread only).
#[derive(Debug, Default)]
pub(crate) struct Counters([Cell<u64>; COUNTERS]);

impl Counters {
    pub(crate) fn add(&self, c: Counter, n: u64) {
        let cell = &self.0[c as usize];
        cell.set(cell.get() + n);
    }

    pub(crate) fn bump(&self, c: Counter) {
        self.add(c, 1);
    }

    fn snapshot(&self) -> [u64; COUNTERS] {
        std::array::from_fn(|i| self.0[i].get())
    }
}

/// A core's last published figures.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Snapshot {
    counters: [u64; COUNTERS],
    /// Topics whose presence this core owns, and their metas.
    presence_topics: u64,
    presence_metas: u64,
}

/// Every core's last published snapshot.
#[derive(Debug, Default)]
pub(crate) struct Published(Vec<Mutex<Snapshot>>);

impl Published {
    pub(crate) fn new(cores: usize) -> Published {
        Published((0..cores).map(|_| Mutex::new(Snapshot::default())).collect())
    }

    /// Stores core `id`'s current figures.
    pub(crate) fn publish(&self, id: usize, counters: &Counters, presence: (usize, usize)) {
        let snapshot = Snapshot {
            counters: counters.snapshot(),
            presence_topics: presence.0 as u64,
            presence_metas: presence.1 as u64,
        };
        if let Some(slot) = self.0.get(id) {
            // A poisoned lock only means a panic mid-copy elsewhere; the data is plain numbers.
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = snapshot;
        }
    }

    fn total(&self) -> Snapshot {
        let mut sum = Snapshot::default();
        for slot in &self.0 {
            let s = *slot.lock().unwrap_or_else(|e| e.into_inner());
            for (t, v) in sum.counters.iter_mut().zip(s.counters) {
                *t += v;
            }
            sum.presence_topics += s.presence_topics;
            sum.presence_metas += s.presence_metas;
        }
        sum
    }
}

/// The whole exposition.
pub(crate) fn render(shared: &Shared, store: &StoreHandle) -> String {
    let mut out = String::with_capacity(4096);
    let total = shared.published.total();
    let mut last = "";
    for (i, (name, labels, help)) in SERIES.iter().enumerate() {
        if *name != last {
            header(&mut out, name, help, "counter");
            last = name;
        }
        sample(&mut out, name, labels, total.counters[i]);
    }
    let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
        header(out, name, help, "gauge");
        sample(out, name, "", v);
    };
    gauge(&mut out, "nexus_connections", "Open connections (all cores).", shared.connections() as u64);
    gauge(
        &mut out,
        "nexus_connections_max",
        "Connections allowed (NEXUS_MAX_CONNECTIONS or the descriptor limit).",
        shared.connections_max as u64,
    );
    gauge(&mut out, "nexus_draining", "1 while a graceful shutdown drains sockets.", u64::from(shared.is_draining()));
    gauge(&mut out, "nexus_presence_topics", "Topics with presence entries.", total.presence_topics);
    gauge(&mut out, "nexus_presence_entries", "Presence metas (one per joined socket).", total.presence_metas);
    gauge(&mut out, "nexus_writer_queue_depth", "Messages waiting for the writer.", store.queued() as u64);
    header(&mut out, "nexus_mailbox_depth", "Cross-core messages waiting, per core.", "gauge");
    for (core, mailbox) in shared.mailboxes.iter().enumerate() {
        sample(&mut out, "nexus_mailbox_depth", &format!("core=\"{core}\""), mailbox.len() as u64);
    }
    let stats = store.stats();
    histogram(&mut out, "nexus_writer_batch_size", "Messages per committed batch.", &stats.batch_size, 1.0);
    histogram(&mut out, "nexus_writer_commit_seconds", "Time to commit one batch.", &stats.commit_us, 1e-6);
    header(
        &mut out,
        "nexus_writer_failed_batches_total",
        "Batches whose commit failed (storage unavailable).",
        "counter",
    );
    sample(
        &mut out,
        "nexus_writer_failed_batches_total",
        "",
        stats.failed_batches.load(std::sync::atomic::Ordering::Relaxed),
    );
    out
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &str, v: u64) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {v}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {v}");
    }
}

/// A cumulative histogram; `scale` converts bucket bounds and the sum to the exposed unit.
fn histogram<const N: usize>(out: &mut String, name: &str, help: &str, h: &Histogram<N>, scale: f64) {
    header(out, name, help, "histogram");
    let (buckets, count, sum) = h.cumulative();
    for (bound, c) in buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {c}", bound as f64 * scale);
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum {}", sum as f64 * scale);
    let _ = writeln!(out, "{name}_count {count}");
}
