//! Scenario `fanout`: N members over T topics, S senders (sender s in topic s mod T) sending
//! `new_msg` closed loop with a window (optionally paced to an aggregate rate). Reports
//! deliveries/s, ack and end-to-end latency percentiles (HDR histograms), lost messages and
//! per-sender order violations seen by each member, and the server's CPU per delivery.
//!
//! Every body is `<sender>.<seq>.<send time µs>` padded to `--body-bytes`, so a member checks
//! order and loss per sender without any per-message state on the sending side. Members are
//! read by `--readers` threads with epoll and parsed in place (the client must outrun a server
//! delivering a million frames a second on the same box).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use uuid::Uuid;

use crate::reactor::{self, Frame, Poller, Sock};
use crate::stats::{cpu_total, own_cpu_time};
use crate::v2;

/// Arguments of `nexus-load fanout`.
#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    target: crate::Target,
    /// Members (receivers), spread round-robin over the topics.
    #[arg(long, default_value_t = 2_000)]
    members: usize,
    /// Topics.
    #[arg(long, default_value_t = 10)]
    topics: usize,
    /// Senders (also members of their topic), spread round-robin over the topics.
    #[arg(long, default_value_t = 20)]
    senders: usize,
    /// Messages each sender keeps in flight (closed loop).
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Aggregate send rate in messages/s (open loop, still capped by the window); 0 = as fast
    /// as the window allows.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Warm-up before measuring (seconds or `2s`).
    #[arg(long, default_value = "2", value_parser = crate::parse_secs)]
    warmup: Duration,
    /// Measured duration.
    #[arg(long, default_value = "10", value_parser = crate::parse_secs)]
    duration: Duration,
    /// Body size in bytes (at least the `sender.seq.time` stamp).
    #[arg(long, default_value_t = 32)]
    body_bytes: usize,
    /// Threads reading members.
    #[arg(long, default_value_t = 1)]
    readers: usize,
    /// Source addresses 127.0.0.2 .. 127.0.0.(1+N) to spread the client ports over.
    #[arg(long, default_value_t = 20)]
    sources: u8,
    /// Server process ids (a comma list: the nodes of a cluster, its Redis and database), for
    /// the server CPU per delivery, summed over them.
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
}

/// State shared by the sender thread, the reader threads and the conductor.
struct Shared {
    epoch: Instant,
    measuring: AtomicBool,
    stop_sending: AtomicBool,
    senders_done: AtomicBool,
    /// Per sender: messages acknowledged ok (final once `senders_done`).
    acked: Vec<AtomicU64>,
    acked_total: AtomicU64,
    deliveries: AtomicU64,
    topics: usize,
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }
}

/// One receiving socket and what it saw.
struct Member {
    sock: Sock,
    topic: usize,
    seen: Seen,
}

/// A member's view: the last sequence seen from each sender, and how many arrived.
struct Seen {
    last: Vec<u64>,
    received: u64,
}

/// What a thread saw.
#[derive(Default)]
struct Tally {
    order_violations: u64,
    gaps: u64,
    lost: u64,
    closed: u64,
    errors: u64,
    e2e: Option<Histogram<u64>>,
    ack: Option<Histogram<u64>>,
    failure: Option<String>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 60 s, 3 significant digits; bounds are constants, so this cannot fail.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

impl Member {
    fn new(sock: Sock, topic: usize, senders: usize) -> Member {
        Member { sock, topic, seen: Seen { last: vec![0; senders], received: 0 } }
    }

    /// Messages this member should have received once the senders are done.
    fn expected(&self, shared: &Shared) -> u64 {
        (0..shared.acked.len())
            .filter(|s| s % shared.topics == self.topic)
            .map(|s| shared.acked[s].load(Ordering::Acquire))
            .sum()
    }
}

impl Seen {
    /// Checks one broadcast body `<sender>.<seq>.<t_us>...` (the payload's `content.text`, or
    /// `body`) against this member's history.
    fn on_new_msg(&mut self, payload: &[u8], shared: &Shared, tally: &mut Tally, e2e: &mut Histogram<u64>) {
        let Some(body) = v2::message_text(payload) else {
            tally.errors += 1;
            return;
        };
        let mut parts = body.raw().split(|b| *b == b'.');
        let mut num = || parts.next().and_then(|p| std::str::from_utf8(p).ok()).and_then(|p| p.parse::<u64>().ok());
        let (Some(sender), Some(seq), Some(sent)) = (num(), num(), num()) else {
            tally.errors += 1;
            return;
        };
        let Some(last) = self.last.get_mut(sender as usize) else {
            tally.errors += 1;
            return;
        };
        if seq <= *last {
            tally.order_violations += 1;
        } else {
            tally.gaps += seq - *last - 1;
            *last = seq;
        }
        self.received += 1;
        if shared.measuring.load(Ordering::Relaxed) {
            let _ = e2e.record(shared.now_us().saturating_sub(sent).max(1));
        }
    }
}

pub(crate) fn run(args: Args) -> Result<(), String> {
    let addrs = args.target.addrs()?;
    if args.topics == 0 || args.senders == 0 || args.window == 0 || args.readers == 0 || args.sources == 0 {
        return Err("--topics, --senders, --window, --readers and --sources must be at least 1".into());
    }
    if args.members + args.senders > 19_000 {
        return Err("--members + --senders must stay under one process's descriptors (19,000)".into());
    }
    let topics: Vec<String> = (0..args.topics).map(|_| args.target.topic(Uuid::new_v4())).collect();
    let source = |i: usize| 2 + (i % args.sources as usize) as u8;
    let open = |i: usize| -> Result<Sock, String> {
        // Socket i is in topic i mod T; (i / T) mod nodes spreads each topic over every node.
        let addr = addrs[(i / args.topics) % addrs.len()];
        reactor::open(addr, source(i), &args.target.socket_path(Uuid::new_v4())?)
    };
    let mut members = Vec::with_capacity(args.members);
    for i in 0..args.members {
        members.push(Member::new(open(i)?, i % args.topics, args.senders));
    }
    let mut senders = Vec::with_capacity(args.senders);
    for s in 0..args.senders {
        senders.push(Member::new(open(args.members + s)?, s % args.topics, args.senders));
    }
    join_all(members.iter_mut().chain(senders.iter_mut()), &topics)?;

    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        measuring: AtomicBool::new(false),
        stop_sending: AtomicBool::new(false),
        senders_done: AtomicBool::new(false),
        acked: (0..args.senders).map(|_| AtomicU64::new(0)).collect(),
        acked_total: AtomicU64::new(0),
        deliveries: AtomicU64::new(0),
        topics: args.topics,
    });
    let mut readers = Vec::new();
    let per = members.len().div_ceil(args.readers).max(1);
    while !members.is_empty() {
        let chunk: Vec<Member> = members.drain(..per.min(members.len())).collect();
        let shared = shared.clone();
        readers.push(std::thread::spawn(move || read_members(chunk, &shared)));
    }
    let plan = SendPlan { topics: topics.clone(), window: args.window, rate: args.rate, body_bytes: args.body_bytes };
    let sender = {
        let shared = shared.clone();
        std::thread::spawn(move || send_loop(senders, &plan, &shared))
    };

    std::thread::sleep(args.warmup);
    shared.measuring.store(true, Ordering::Relaxed);
    let before = Snapshot::take(&shared, &args.server_pid);
    std::thread::sleep(args.duration);
    let after = Snapshot::take(&shared, &args.server_pid);
    shared.measuring.store(false, Ordering::Relaxed);
    shared.stop_sending.store(true, Ordering::Release);

    let mut total =
        sender.join().unwrap_or_else(|_| Tally { failure: Some("sender thread panicked".into()), ..Tally::default() });
    for r in readers {
        let t =
            r.join().unwrap_or_else(|_| Tally { failure: Some("reader thread panicked".into()), ..Tally::default() });
        merge(&mut total, t);
    }
    report(&args, &before, &after, &total)
}

/// Joins every socket to its topic and waits for every reply, then lets the presence traffic
/// of the joins settle (nothing measured may include it).
fn join_all<'a>(members: impl Iterator<Item = &'a mut Member>, topics: &[String]) -> Result<(), String> {
    let mut all: Vec<&mut Member> = members.collect();
    let mut poller = Poller::new()?;
    for (i, m) in all.iter_mut().enumerate() {
        poller.add(m.sock.fd(), i)?;
        let join = format!(r#"["1","1","{}","phx_join",{{}}]"#, topics[m.topic]);
        m.sock.send_text(join.as_bytes()).map_err(|e| format!("join: {e}"))?;
    }
    let mut joined = vec![false; all.len()];
    let mut left = all.len();
    let mut scratch = vec![0u8; 256 * 1024];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut quiet_since = Instant::now();
    loop {
        let ready = poller.wait(50);
        if !ready.is_empty() {
            quiet_since = Instant::now();
        }
        for i in ready {
            let mut refused = false;
            let mut acked = false;
            all[i]
                .sock
                .read(&mut scratch, |f| {
                    let Frame::Text(t) = f else { return };
                    let Some(h) = v2::head(t) else { return };
                    if h.is("phx_reply") && h.reference.is_some_and(|r| r.is("1")) {
                        acked = h.ok();
                        refused = !acked;
                    }
                })
                .map_err(|e| format!("join read: {e}"))?;
            if refused || all[i].sock.closed {
                return Err("a join was refused or its socket closed".into());
            }
            if acked && !joined[i] {
                joined[i] = true;
                left -= 1;
            }
        }
        if left == 0 && quiet_since.elapsed() > Duration::from_millis(500) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{left} joins unanswered after 60 s"));
        }
    }
}

struct SendPlan {
    topics: Vec<String>,
    window: usize,
    rate: u64,
    body_bytes: usize,
}

/// Sends closed loop (window per sender, optional aggregate pacing) until told to stop, then
/// waits for the last acknowledgements. Senders are members of their topic too.
fn send_loop(mut senders: Vec<Member>, plan: &SendPlan, shared: &Shared) -> Tally {
    let mut tally = Tally::default();
    let (mut ack_h, mut e2e_h) = (histogram(), histogram());
    let result = (|| -> Result<(), String> {
        let mut poller = Poller::new()?;
        for (i, s) in senders.iter().enumerate() {
            poller.add(s.sock.fd(), i)?;
        }
        let n = senders.len();
        let mut inflight: Vec<VecDeque<(u64, u64)>> = (0..n).map(|_| VecDeque::with_capacity(plan.window)).collect();
        let mut next_seq = vec![1u64; n];
        let mut scratch = vec![0u8; 256 * 1024];
        let mut out = Vec::with_capacity(64 * 1024);
        let mut text = Vec::with_capacity(256);
        let began = shared.now_us();
        let mut sent_total = 0u64;
        let mut stop_at: Option<Instant> = None;
        loop {
            let stopping = shared.stop_sending.load(Ordering::Acquire);
            if stopping {
                let at = *stop_at.get_or_insert_with(Instant::now);
                if inflight.iter().all(VecDeque::is_empty) || at.elapsed() > Duration::from_secs(10) {
                    tally.lost += inflight.iter().map(|q| q.len() as u64).sum::<u64>();
                    break;
                }
            } else {
                // Pacing: messages allowed so far at the aggregate rate.
                let allowed =
                    if plan.rate == 0 { u64::MAX } else { (shared.now_us() - began) * plan.rate / 1_000_000 + 1 };
                for (s, sender) in senders.iter_mut().enumerate() {
                    out.clear();
                    while inflight[s].len() < plan.window && sent_total < allowed {
                        let seq = next_seq[s];
                        next_seq[s] += 1;
                        let now = shared.now_us();
                        text.clear();
                        let stamp = format!("{s}.{seq}.{now}.");
                        let pad = plan.body_bytes.saturating_sub(stamp.len());
                        text.extend_from_slice(
                            format!(r#"["1","{seq}","{}","new_msg",{{"body":"{stamp}"#, plan.topics[sender.topic])
                                .as_bytes(),
                        );
                        text.resize(text.len() + pad, b'x');
                        text.extend_from_slice(b"\"}]");
                        reactor::masked_text(&text, &mut out);
                        inflight[s].push_back((seq, now));
                        sent_total += 1;
                    }
                    if !out.is_empty() {
                        sender.sock.write_all(&out).map_err(|e| format!("send: {e}"))?;
                    }
                }
            }
            let mut delivered = 0u64;
            for i in poller.wait(if plan.rate == 0 { 10 } else { 1 }) {
                let Member { sock, seen, .. } = &mut senders[i];
                let queue = &mut inflight[i];
                let read = sock.read(&mut scratch, |f| {
                    let Frame::Text(t) = f else { return };
                    let Some(h) = v2::head(t) else {
                        tally.errors += 1;
                        return;
                    };
                    if h.is("new_msg") {
                        seen.on_new_msg(h.payload, shared, &mut tally, &mut e2e_h);
                        delivered += 1;
                        return;
                    }
                    if !h.is("phx_reply") {
                        return;
                    }
                    let Some(seq) = h.ref_u64() else { return };
                    let Some(pos) = queue.iter().position(|(q, _)| *q == seq) else { return };
                    let Some((_, sent)) = queue.remove(pos) else { return };
                    if h.ok() {
                        shared.acked[i].fetch_add(1, Ordering::AcqRel);
                        shared.acked_total.fetch_add(1, Ordering::Relaxed);
                        if shared.measuring.load(Ordering::Relaxed) {
                            let _ = ack_h.record(shared.now_us().saturating_sub(sent).max(1));
                        }
                    } else {
                        tally.errors += 1;
                    }
                });
                read.map_err(|e| format!("sender read: {e}"))?;
                if sock.closed {
                    tally.closed += 1;
                    return Err("a sender's socket was closed by the server".into());
                }
            }
            shared.deliveries.fetch_add(delivered, Ordering::Relaxed);
        }
        shared.senders_done.store(true, Ordering::Release);
        // Senders are members too: wait for their own topic's last broadcasts.
        settle(&mut senders, &mut poller, shared, &mut tally, &mut e2e_h, &mut scratch)
    })();
    shared.senders_done.store(true, Ordering::Release);
    tally.failure = result.err();
    tally.ack = Some(ack_h);
    tally.e2e = Some(e2e_h);
    tally
}

/// Reads members until the senders are done and every member has what it should (or nothing
/// arrived for 3 s), then counts what is missing.
fn read_members(mut members: Vec<Member>, shared: &Shared) -> Tally {
    let mut tally = Tally::default();
    let mut e2e = histogram();
    let result = (|| -> Result<(), String> {
        let mut poller = Poller::new()?;
        for (i, m) in members.iter().enumerate() {
            poller.add(m.sock.fd(), i)?;
        }
        let mut scratch = vec![0u8; 256 * 1024];
        while !shared.senders_done.load(Ordering::Acquire) {
            let delivered = read_ready(&mut members, &mut poller, shared, &mut tally, &mut e2e, &mut scratch, 10);
            shared.deliveries.fetch_add(delivered, Ordering::Relaxed);
        }
        settle(&mut members, &mut poller, shared, &mut tally, &mut e2e, &mut scratch)
    })();
    tally.failure = result.err();
    tally.e2e = Some(e2e);
    tally
}

/// One poll round over `members`; returns the broadcasts delivered.
fn read_ready(
    members: &mut [Member],
    poller: &mut Poller,
    shared: &Shared,
    tally: &mut Tally,
    e2e: &mut Histogram<u64>,
    scratch: &mut [u8],
    timeout_ms: i32,
) -> u64 {
    let mut delivered = 0;
    for i in poller.wait(timeout_ms) {
        let Member { sock, seen, .. } = &mut members[i];
        let res = sock.read(scratch, |f| {
            let Frame::Text(t) = f else { return };
            match v2::head(t) {
                Some(h) if h.is("new_msg") => {
                    seen.on_new_msg(h.payload, shared, tally, e2e);
                    delivered += 1;
                }
                Some(_) => {}
                None => tally.errors += 1,
            }
        });
        if res.is_err() || sock.closed {
            poller.remove(sock.fd());
            tally.closed += 1;
        }
    }
    delivered
}

/// After the senders are done: reads until every member has its expected count, or nothing
/// arrived for 3 s; then counts the missing messages as lost.
fn settle(
    members: &mut [Member],
    poller: &mut Poller,
    shared: &Shared,
    tally: &mut Tally,
    e2e: &mut Histogram<u64>,
    scratch: &mut [u8],
) -> Result<(), String> {
    let mut quiet = Instant::now();
    loop {
        if members.iter().all(|m| m.sock.closed || m.seen.received >= m.expected(shared)) {
            break;
        }
        if read_ready(members, poller, shared, tally, e2e, scratch, 50) > 0 {
            quiet = Instant::now();
        } else if quiet.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    tally.lost += members.iter().map(|m| m.expected(shared).saturating_sub(m.seen.received)).sum::<u64>();
    Ok(())
}

fn merge(into: &mut Tally, t: Tally) {
    into.order_violations += t.order_violations;
    into.gaps += t.gaps;
    into.lost += t.lost;
    into.closed += t.closed;
    into.errors += t.errors;
    if let (Some(a), Some(b)) = (into.e2e.as_mut(), t.e2e.as_ref()) {
        let _ = a.add(b);
    }
    if into.failure.is_none() {
        into.failure = t.failure;
    }
}

/// Counters at one instant of the run.
struct Snapshot {
    at: Instant,
    deliveries: u64,
    acked: u64,
    server_cpu: Option<Duration>,
    own_cpu: Option<Duration>,
}

impl Snapshot {
    fn take(shared: &Shared, pids: &[u32]) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            deliveries: shared.deliveries.load(Ordering::Relaxed),
            acked: shared.acked_total.load(Ordering::Relaxed),
            server_cpu: cpu_total(pids),
            own_cpu: own_cpu_time(),
        }
    }
}

fn report(args: &Args, before: &Snapshot, after: &Snapshot, t: &Tally) -> Result<(), String> {
    let secs = (after.at - before.at).as_secs_f64();
    let deliveries = after.deliveries - before.deliveries;
    let acked = after.acked - before.acked;
    let per_s = deliveries as f64 / secs;
    let cpu_per = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
        (Some(a), Some(b)) if deliveries > 0 => Some(a.saturating_sub(b).as_secs_f64() * 1e6 / deliveries as f64),
        _ => None,
    };
    let server_us = cpu_per(after.server_cpu, before.server_cpu);
    let client_us = cpu_per(after.own_cpu, before.own_cpu);
    let pct = |h: &Option<Histogram<u64>>, q: f64| h.as_ref().map_or(0.0, |h| h.value_at_quantile(q) as f64 / 1000.0);
    let opt = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.3}"));
    if args.json {
        println!(
            "{{\"scenario\":\"fanout\",\"members\":{},\"topics\":{},\"senders\":{},\"window\":{},\"rate\":{},\
             \"secs\":{secs:.2},\"deliveries\":{deliveries},\"deliveries_per_s\":{per_s:.0},\"acked_per_s\":{:.0},\
             \"ack_ms_p50\":{:.3},\"ack_ms_p99\":{:.3},\"ack_ms_p999\":{:.3},\"e2e_ms_p50\":{:.3},\"e2e_ms_p99\":{:.3},\
             \"e2e_ms_p999\":{:.3},\"lost\":{},\"order_violations\":{},\"gaps\":{},\"errors\":{},\"closed\":{},\
             \"server_cpu_us_per_delivery\":{},\"client_cpu_us_per_delivery\":{},\"failure\":{}}}",
            args.members,
            args.topics,
            args.senders,
            args.window,
            args.rate,
            acked as f64 / secs,
            pct(&t.ack, 0.5),
            pct(&t.ack, 0.99),
            pct(&t.ack, 0.999),
            pct(&t.e2e, 0.5),
            pct(&t.e2e, 0.99),
            pct(&t.e2e, 0.999),
            t.lost,
            t.order_violations,
            t.gaps,
            t.errors,
            t.closed,
            opt(server_us),
            opt(client_us),
            t.failure.as_ref().map_or("null".to_string(), |f| format!("{f:?}")),
        );
    } else {
        println!(
            "fanout: {} members over {} topics, {} senders x window {}{} for {secs:.1} s",
            args.members,
            args.topics,
            args.senders,
            args.window,
            if args.rate > 0 { format!(" at {} msg/s", args.rate) } else { String::new() }
        );
        println!("  {deliveries} deliveries ({per_s:.0}/s), {acked} acked ({:.0}/s)", acked as f64 / secs);
        println!(
            "  ack ms p50 {:.3} p99 {:.3} p99.9 {:.3}; end-to-end ms p50 {:.3} p99 {:.3} p99.9 {:.3}",
            pct(&t.ack, 0.5),
            pct(&t.ack, 0.99),
            pct(&t.ack, 0.999),
            pct(&t.e2e, 0.5),
            pct(&t.e2e, 0.99),
            pct(&t.e2e, 0.999)
        );
        println!(
            "  lost {}, order violations {}, gaps {}, error replies {}, sockets closed {}",
            t.lost, t.order_violations, t.gaps, t.errors, t.closed
        );
        if let Some(us) = server_us {
            println!("  server CPU {us:.3} µs per delivery");
        }
        if let Some(us) = client_us {
            println!("  load generator CPU {us:.3} µs per delivery");
        }
    }
    if let Some(f) = &t.failure {
        return Err(f.clone());
    }
    if t.lost > 0 || t.order_violations > 0 || t.closed > 0 {
        return Err("messages lost, out of order, or sockets closed".into());
    }
    Ok(())
}
