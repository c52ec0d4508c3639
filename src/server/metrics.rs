//! `GET /metrics` in the Prometheus text format: the cores' published counters
//! ([`crate::metrics`]; other cores' figures are at most one sweep, 250 ms, old), the gauges
//! (connections, queue depths) and the writer's histograms, read directly.

use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

use super::core::Shared;
use super::fabric::Fabric;
use crate::store::stats::Histogram;
use crate::store::StoreHandle;

/// The whole exposition.
pub(crate) fn render(shared: &Shared, store: &StoreHandle) -> String {
    let mut out = String::with_capacity(4096);
    let total = shared.published.total();
    let mut last = "";
    for (name, labels, help, value) in total.series() {
        if name != last {
            header(&mut out, name, help, "counter");
            last = name;
        }
        sample(&mut out, name, &labels, value);
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
    gauge(
        &mut out,
        "nexus_cross_core_congested",
        "Cores whose overflow toward other cores is congested (new joins are refused while > 0).",
        shared.congested_cores.load(std::sync::atomic::Ordering::Relaxed) as u64,
    );
    gauge(&mut out, "nexus_presence_topics", "Topics with presence entries.", total.gauges.presence_topics);
    gauge(&mut out, "nexus_presence_entries", "Presence metas (one per joined socket).", total.gauges.presence_metas);
    gauge(
        &mut out,
        "nexus_cross_core_overflow_messages",
        "Messages waiting for a full mailbox of another core.",
        total.gauges.overflow_msgs,
    );
    gauge(
        &mut out,
        "nexus_outbox_bytes",
        "Bytes queued for sockets that have not taken them yet (all cores).",
        total.gauges.outbox_bytes,
    );
    // SAFETY: sqlite3_memory_used only reads SQLite's global counters (thread-safe).
    let sqlite_bytes = unsafe { rusqlite::ffi::sqlite3_memory_used() };
    gauge(
        &mut out,
        "nexus_sqlite_memory_bytes",
        "Heap held by the embedded SQLite (page caches, statements); 0 on PostgreSQL.",
        sqlite_bytes.max(0) as u64,
    );
    if let Some((in_use, free)) = super::sys::heap_stats() {
        gauge(&mut out, "nexus_heap_in_use_bytes", "Heap the process uses, by glibc malloc's count.", in_use);
        gauge(
            &mut out,
            "nexus_heap_free_bytes",
            "Heap freed but kept by glibc malloc for reuse (the trim gives its whole pages back).",
            free,
        );
    }
    gauge(&mut out, "nexus_writer_queue_depth", "Messages waiting for the writer.", store.queued() as u64);
    header(&mut out, "nexus_mailbox_depth", "Cross-core messages waiting, per core.", "gauge");
    for (core, mailbox) in shared.mailboxes.iter().enumerate() {
        sample(&mut out, "nexus_mailbox_depth", &format!("core=\"{core}\""), mailbox.len() as u64);
    }
    let stats = store.stats();
    histogram(&mut out, "nexus_writer_batch_size", "Messages per committed batch.", &stats.batch_size, 1.0);
    histogram(&mut out, "nexus_writer_commit_seconds", "Time to commit one batch.", &stats.commit_us, 1e6);
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
    if let Some(fabric) = &shared.fabric {
        cluster(&mut out, fabric);
    }
    if let Some(proxy) = shared.access.proxy() {
        join_proxy(&mut out, proxy);
    }
    out
}

/// The join proxy's series (only under `NEXUS_JOIN_POLICY=proxy`).
fn join_proxy(out: &mut String, proxy: &crate::access::Proxy) {
    let stats = proxy.stats();
    let series: [(&str, &str, &str, u64); 6] = [
        ("nexus_join_proxy_calls_total", "counter", "Calls made to the join proxy.", stats.calls.load(Relaxed)),
        (
            "nexus_join_proxy_failures_total",
            "counter",
            "Join proxy calls that failed (status, timeout, connection): answered authorization unavailable.",
            stats.failures.load(Relaxed),
        ),
        (
            "nexus_join_proxy_cache_hits_total",
            "counter",
            "Joins and history reads answered from the join proxy's cache.",
            stats.cache_hits.load(Relaxed),
        ),
        (
            "nexus_join_proxy_coalesced_total",
            "counter",
            "Joins that waited for a call already in flight for the same user and conversation.",
            stats.coalesced.load(Relaxed),
        ),
        ("nexus_join_proxy_queue_depth", "gauge", "Calls waiting for a join proxy thread.", proxy.queued() as u64),
        (
            "nexus_join_proxy_cache_entries",
            "gauge",
            "Answers and calls in flight held by the join proxy's cache.",
            proxy.cached_entries() as u64,
        ),
    ];
    for (name, kind, help, value) in series {
        header(out, name, help, kind);
        sample(out, name, "", value);
    }
}

/// Cluster mode's series (absent on a single node).
fn cluster(out: &mut String, fabric: &Fabric) {
    let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
        header(out, name, help, "counter");
        sample(out, name, "", v.load(Relaxed));
    };
    let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
        header(out, name, help, "gauge");
        sample(out, name, "", v);
    };
    header(out, "nexus_cluster_node", "This node's NEXUS_NODE_ID (value 1).", "gauge");
    sample(out, "nexus_cluster_node", &format!("node=\"{}\"", fabric.node_id), 1);
    gauge(
        out,
        "nexus_redis_up",
        "1 while Redis carries live traffic; 0: degraded, other nodes' messages come from PostgreSQL.",
        u64::from(fabric.redis_up()),
    );
    let published = fabric.publisher.stats();
    counter(out, "nexus_publications_total", "Conversations' publications sent to Redis.", &published.published);
    counter(
        out,
        "nexus_publish_dropped_total",
        "Committed batches not published (queue full or Redis down); other nodes read them from PostgreSQL.",
        &published.dropped,
    );
    gauge(
        out,
        "nexus_publish_queue_depth",
        "Committed batches waiting to be published.",
        fabric.publisher.queued() as u64,
    );
    let stats = &fabric.stats;
    counter(
        out,
        "nexus_gap_fills_total",
        "Reads of missing messages from PostgreSQL (gaps, catch-up).",
        &stats.gap_fills,
    );
    counter(
        out,
        "nexus_catchup_rows_total",
        "Messages delivered from PostgreSQL reads rather than Redis.",
        &stats.catchup_rows,
    );
    gauge(out, "nexus_filler_queue_depth", "Reads waiting for the gap-fill reader.", fabric.filler.queued() as u64);
    gauge(
        out,
        "nexus_watch_queue_depth",
        "Subscribe and unsubscribe requests waiting for the Redis subscriber.",
        fabric.subscriber.queued() as u64,
    );
    counter(
        out,
        "nexus_presence_resyncs_total",
        "Presence replicas read again from Redis after a missed version.",
        &stats.presence_resyncs,
    );
    counter(
        out,
        "nexus_reaped_nodes_total",
        "Stopped nodes whose presence this node removed.",
        &fabric.presence.stats().reaped_nodes,
    );
    gauge(out, "nexus_presence_queue_depth", "Presence changes waiting for Redis.", fabric.presence.queued() as u64);
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

/// A cumulative histogram; bucket bounds and the sum are divided by `per_unit` to get the
/// exposed unit (dividing by a power of ten prints `0.025`, multiplying by its inverse
/// `0.024999999999999998`).
fn histogram<const N: usize>(out: &mut String, name: &str, help: &str, h: &Histogram<N>, per_unit: f64) {
    header(out, name, help, "histogram");
    let (buckets, count, sum) = h.cumulative();
    for (bound, c) in buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {c}", bound as f64 / per_unit);
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum {}", sum as f64 / per_unit);
    let _ = writeln!(out, "{name}_count {count}");
}
