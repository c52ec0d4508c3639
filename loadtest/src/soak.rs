//! Scenario `soak`: a realistic mix against one node for a long time, sampled into a CSV, with
//! pass criteria checked at the end (`loadtest/soak.sh` runs it and plots the CSV).
//!
//! The mix: `--connections` sockets held with heartbeats, each a member of one conversation
//! (the first `--large-room` share one large room, the rest are spread over `--topics` small
//! rooms); `--rate` `new_msg`/s from random members; `--churn` actions/s, each taking a member
//! away for `--away` (a leave then a rejoin, or a dropped socket then a reconnect), every
//! rejoin recovering what it missed with `last_seen_id`; history reads; `--slow` consumers that
//! never read (small receive window: the server's queue limit closes them, and they
//! reconnect), fed by a firehose conversation of their own (`--firehose-rate`
//! messages/s of `--firehose-bytes`); and a hostile client trying one bad input after another.
//!
//! Every `--sample` one CSV row: server RSS (the mean and the highest of readings about once a
//! second over the interval: the server trims its heap once a minute, so RSS is a sawtooth,
//! and one reading per row would show wherever the row fell in it), descriptors, `/metrics`
//! gauges (connections, writer queue, mailboxes, outbox bytes, SQLite's heap, the heap in use
//! and free by glibc malloc's count: growth in the one is data, in the other fragmentation),
//! database and WAL size, and the interval's ack and end-to-end p99 (live deliveries; messages
//! recovered on a rejoin are old by design and left out).
//!
//! Checked at the end (any failure exits 1):
//! - RSS growth after `--warmup` at most `--rss-growth-max` percent, read from the
//!   least-squares line through the samples' interval means: the load has cycles of its own
//!   (the slow consumers' minutes-long fill and close), and they move a line through every
//!   sample far less than medians at either end (a two-sample cycle of half-swing `a` moves a
//!   line over `n` samples by about `6a/(n+1)`, and not at all when both ends fall on one phase);
//! - every acknowledged message is in the database exactly once, and the database holds no
//!   more rows than were sent;
//! - every member's received messages, live and recovered, are in id order without a
//!   duplicate, and each unbroken stretch of them is exactly the database's run of that
//!   conversation between its first and last message (no gap);
//! - every presence view kept (small-room members and `--observers` of the large room) equals
//!   the truth once the churn stops;
//! - no hostile input got an answer other than the documented one, no member was closed by
//!   the server, no join or message was refused;
//! - once every client has gone, the server holds no more sockets than before the first came.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use uuid::Uuid;

use crate::churn::{apply_diff, merge, mix, Rng, View};
use crate::reactor::{self, rss_bytes, Frame, Poller, Sock};
use crate::v2;
use crate::Target;

/// Arguments of `nexus-load soak`.
#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    target: Target,
    /// Sockets held, each a member of one conversation.
    #[arg(long, default_value_t = 15_000)]
    connections: usize,
    /// Small rooms the members beyond the large room are spread over.
    #[arg(long, default_value_t = 1_000)]
    topics: usize,
    /// Members of the one large room (the first sockets).
    #[arg(long, default_value_t = 1_000)]
    large_room: usize,
    /// Large-room members that keep a presence view (every small-room member keeps one).
    #[arg(long, default_value_t = 10)]
    observers: usize,
    /// `new_msg`s per second, each from a random member.
    #[arg(long, default_value_t = 100)]
    rate: u64,
    /// Churn actions per second (a leave or a dropped socket; the member comes back `--away`
    /// later, recovering what it missed).
    #[arg(long, default_value_t = 20)]
    churn: u64,
    /// How long a churned member stays away.
    #[arg(long, default_value = "2s", value_parser = crate::parse_secs)]
    away: Duration,
    /// History pages read per second.
    #[arg(long, default_value_t = 2.0)]
    history_rate: f64,
    /// Slow consumers (they never read), members of the firehose.
    #[arg(long, default_value_t = 4)]
    slow: usize,
    /// Messages per second into the firehose, a conversation of one sender and the slow
    /// consumers: it fills their queues (the kernel's buffers, then the server's outbox up to its
    /// limit) in minutes, so their close-and-reconnect cycle is part of the steady state.
    #[arg(long, default_value_t = 20)]
    firehose_rate: u64,
    /// Body bytes of a firehose message.
    #[arg(long, default_value_t = 2000)]
    firehose_bytes: usize,
    /// One hostile probe every this long.
    #[arg(long, default_value = "2s", value_parser = crate::parse_secs)]
    hostile_every: Duration,
    /// How long the load runs (after the sockets are open).
    #[arg(long, default_value = "60m", value_parser = crate::parse_secs)]
    duration: Duration,
    /// RSS growth is judged after this (default: a quarter of the duration).
    #[arg(long, value_parser = crate::parse_secs)]
    warmup: Option<Duration>,
    /// One CSV row every this long.
    #[arg(long, default_value = "60s", value_parser = crate::parse_secs)]
    sample: Duration,
    /// Heartbeat interval of every socket.
    #[arg(long, default_value = "30s", value_parser = crate::parse_secs)]
    heartbeat: Duration,
    /// Most RSS growth after the warm-up, in percent.
    #[arg(long, default_value_t = 2.0)]
    rss_growth_max: f64,
    /// How long the views, acks and descriptors may take to settle at the end.
    #[arg(long, default_value = "30s", value_parser = crate::parse_secs)]
    settle: Duration,
    /// The server's process id (RSS, descriptors).
    #[arg(long)]
    server_pid: u32,
    /// The server's SQLite database (read-only, for the checks and its size).
    #[arg(long)]
    db: PathBuf,
    /// Where the samples go.
    #[arg(long)]
    csv: PathBuf,
    /// Source addresses 127.0.0.2 .. 127.0.0.(1+N) to spread the client ports over.
    #[arg(long, default_value_t = 20)]
    sources: u8,
    /// Seed for the random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// An unbroken stretch of one member's messages: ids increasing, nothing missing in between.
struct Stretch {
    first: u128,
    last: u128,
    count: u64,
    /// Sum of [`mix`] over the ids: with the count, tells the exact set apart from another.
    hash: u64,
}

struct Member {
    user: Uuid,
    topic: usize,
    keeps_view: bool,
    sock: Option<Sock>,
    join_ref: Option<u64>,
    joined: bool,
    leaving: Option<u64>,
    view: Option<View>,
    early: Vec<sonic_rs::Value>,
    last_id: Option<u128>,
    /// The next message continues the current stretch (false before the first message and
    /// after a join that could not recover).
    continuing: bool,
    stretches: Vec<Stretch>,
    away: bool,
    /// Recovered messages still to come after the last join reply.
    recovering: u64,
    /// The last messages received, newest last: (id, recovered, ms since the load began).
    recent: VecDeque<(u128, bool, u64)>,
    /// When the last join reply came (ms since the load began).
    joined_at: u64,
}

struct Inflight {
    member: usize,
    sent: Instant,
}

#[derive(Default)]
struct Counts {
    sent: u64,
    acked: u64,
    refused_msgs: u64,
    deliveries: u64,
    out_of_order: u64,
    churn: u64,
    reconnects: u64,
    not_recovered: u64,
    refused_joins: u64,
    server_closes: u64,
    slow_reconnects: u64,
    abandoned: u64,
}

/// What the side threads (history reader, hostile client) report at the end.
#[derive(Default)]
struct Side {
    ok: u64,
    failures: Vec<String>,
}

impl Side {
    fn fail(&mut self, what: String) {
        if self.failures.len() < 20 {
            self.failures.push(what);
        }
    }
}

/// A message body this scenario sent, `s<ref> <µs since the start>`: the sender's ref (unique
/// in the run) and when it was sent.
fn body_ref(body: &str) -> Option<(u64, u64)> {
    let mut words = body.strip_prefix('s')?.split(' ');
    Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
}

/// Records `us` in the interval's histogram and the run's.
fn record(h: &mut [Histogram<u64>; 2], us: u64) {
    for h in h {
        let _ = h.record(us.max(1));
    }
}

fn id_hash(id: u128) -> u64 {
    mix(id as u64 ^ mix((id >> 64) as u64))
}

/// The whole run's state, owned by the one thread that drives every socket.
struct Soak {
    args: Args,
    addr: SocketAddr,
    topics: Vec<Uuid>,
    members: Vec<Member>,
    slow: Vec<Option<Sock>>,
    poller: Poller,
    rng: Rng,
    next_ref: u64,
    inflight: HashMap<u64, Inflight>,
    /// (conversation, ref) of every acknowledged message; the ref is in its body.
    acked: Vec<(u128, u64)>,
    counts: Counts,
    started: Instant,
    /// Latencies since the last sample, and over the whole run.
    ack_us: [Histogram<u64>; 2],
    e2e_us: [Histogram<u64>; 2],
    scratch: Vec<u8>,
    /// Members whose socket the server closed since the last [`Soak::take_closed`].
    closed: Vec<usize>,
    /// The first order violations, described.
    violations: Vec<String>,
    /// The server's RSS read since the last sample.
    rss: RssReads,
}

/// RSS readings between two samples. Their mean does not depend on where the samples fall in
/// the server's minute-long heap-trim cycle; the highest shows the peak.
#[derive(Default)]
struct RssReads {
    sum: u64,
    n: u64,
    max: u64,
}

impl RssReads {
    fn add(&mut self, rss: u64) {
        self.sum += rss;
        self.n += 1;
        self.max = self.max.max(rss);
    }

    /// The interval's (mean, highest), `last` included; starts the next interval.
    fn take(&mut self, last: u64) -> (u64, u64) {
        self.add(last);
        let taken = (self.sum / self.n, self.max);
        *self = RssReads::default();
        taken
    }
}

pub(crate) fn run(args: Args) -> Result<(), String> {
    let addr = crate::loopback(&args.target.addr)?;
    if args.connections == 0 || args.topics == 0 || args.large_room > args.connections || args.sources == 0 {
        return Err(
            "--connections, --topics and --sources must be at least 1, --large-room at most --connections".into()
        );
    }
    if args.target.secret.is_none() {
        return Err("soak mints its tokens (history, hostile probes): it needs --secret".into());
    }
    let warmup = args.warmup.unwrap_or(args.duration / 4);
    let hist = || Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).map_err(|e| e.to_string());
    // Topic 0 is the large room.
    // Topic 0 is the large room, 1..=topics the small rooms, the last the firehose.
    let topics: Vec<Uuid> = (0..args.topics + 2).map(|_| Uuid::new_v4()).collect();
    let firehose = topics.len() - 1;
    // The last member is the firehose's sender.
    let members = (0..=args.connections)
        .map(|i| {
            let topic = match i {
                i if i == args.connections => firehose,
                i if i < args.large_room => 0,
                i => 1 + i % args.topics,
            };
            Member {
                user: Uuid::new_v4(),
                topic,
                keeps_view: (topic != 0 && topic != firehose) || i < args.observers,
                sock: None,
                join_ref: None,
                joined: false,
                leaving: None,
                view: None,
                early: Vec::new(),
                last_id: None,
                continuing: false,
                stretches: Vec::new(),
                away: false,
                recovering: 0,
                recent: VecDeque::new(),
                joined_at: 0,
            }
        })
        .collect();
    let mut csv = std::fs::File::create(&args.csv).map_err(|e| format!("{}: {e}", args.csv.display()))?;
    writeln!(csv, "{}", CSV_HEADER).map_err(|e| e.to_string())?;
    let mut soak = Soak {
        addr,
        topics,
        members,
        slow: Vec::new(),
        poller: Poller::new()?,
        rng: Rng(args.seed),
        next_ref: 1,
        inflight: HashMap::new(),
        acked: Vec::new(),
        counts: Counts::default(),
        started: Instant::now(),
        ack_us: [hist()?, hist()?],
        e2e_us: [hist()?, hist()?],
        scratch: vec![0u8; 256 * 1024],
        closed: Vec::new(),
        violations: Vec::new(),
        rss: RssReads::default(),
        args,
    };

    // The baseline: the server's descriptors before any client, after one history read and one
    // scrape (so files opened on first use are already open).
    let secret = soak.args.target.secret.clone().unwrap_or_default();
    let token = crate::wire::token(&secret, Uuid::new_v4())?;
    http_get(addr, &format!("/api/conversations/{}/messages?limit=1", soak.topics[1]), Some(&token))?;
    scrape(addr)?;
    let pid = soak.args.server_pid;
    let sockets_before = socket_count(pid).ok_or("cannot read the server's descriptors (/proc/<pid>/fd)")?;

    eprintln!("soak: opening {} sockets", soak.members.len());
    for i in 0..soak.members.len() {
        soak.connect(i)?;
        soak.join(i)?;
        if i % 200 == 199 {
            soak.read_round(0)?;
        }
    }
    for _ in 0..soak.args.slow {
        let sock = soak.open_slow()?;
        soak.slow.push(Some(sock));
    }
    eprintln!("soak: {} sockets open; load for {:?}", soak.members.len(), soak.args.duration);

    let stop = Arc::new(AtomicBool::new(false));
    let history = {
        let (stop, topics, rate) = (stop.clone(), soak.topics.clone(), soak.args.history_rate);
        let secret = secret.clone();
        std::thread::spawn(move || history_reader(addr, &secret, &topics, rate, &stop))
    };
    let hostile = {
        let (stop, target, every) = (stop.clone(), soak.args.target.clone(), soak.args.hostile_every);
        std::thread::spawn(move || hostile_client(addr, &target, every, &stop))
    };

    let load = Instant::now();
    soak.started = load;
    let (mut sent_due, mut churn_due, mut firehose_due, mut heartbeats) = (0u64, 0u64, 0u64, 0u64);
    let mut hb_cursor = 0usize;
    let mut returns: VecDeque<(Instant, usize)> = VecDeque::new();
    let mut samples: Vec<Sample> = Vec::new();
    let mut next_sample = load + soak.args.sample;
    let mut next_rss = load;
    while load.elapsed() < soak.args.duration {
        let secs = load.elapsed().as_secs_f64();
        while sent_due < (secs * soak.args.rate as f64) as u64 {
            sent_due += 1;
            soak.send_one()?;
        }
        while firehose_due < (secs * soak.args.firehose_rate as f64) as u64 {
            firehose_due += 1;
            let sender = soak.args.connections;
            if soak.members[sender].joined {
                soak.send_from(sender, soak.args.firehose_bytes)?;
            }
        }
        while churn_due < (secs * soak.args.churn as f64) as u64 {
            churn_due += 1;
            if let Some(i) = soak.churn_one()? {
                returns.push_back((Instant::now() + soak.args.away, i));
            }
        }
        while returns.front().is_some_and(|(at, _)| *at <= Instant::now()) {
            if let Some((_, i)) = returns.pop_front() {
                soak.come_back(i)?;
            }
        }
        // Heartbeats spread evenly: by time t, t / interval of them per socket.
        let n = soak.members.len() + soak.slow.len();
        let due = (secs / soak.args.heartbeat.as_secs_f64().max(0.01) * n as f64) as u64;
        while heartbeats < due {
            heartbeats += 1;
            hb_cursor = (hb_cursor + 1) % n;
            soak.heartbeat(hb_cursor)?;
        }
        soak.read_round(5)?;
        // A member the server closed comes back like a churned one (and is counted).
        for i in soak.take_closed() {
            returns.push_back((Instant::now() + soak.args.away, i));
        }
        if Instant::now() >= next_rss {
            next_rss += RSS_READ_EVERY;
            if let Some(rss) = rss_bytes(soak.args.server_pid) {
                soak.rss.add(rss);
            }
        }
        if Instant::now() >= next_sample {
            next_sample += soak.args.sample;
            let s = soak.sample()?;
            writeln!(csv, "{}", s.row()).map_err(|e| e.to_string())?;
            eprintln!("soak: {}", s.summary());
            samples.push(s);
        }
    }

    // The end: the slow consumers go, the rest settles (acks, replies, presence).
    let load_secs = load.elapsed().as_secs_f64();
    for slow in soak.slow.iter_mut() {
        if let Some(s) = slow.take() {
            soak.poller.remove(s.fd());
        }
    }
    let settling = Instant::now();
    let mut mismatched = soak.mismatches();
    while settling.elapsed() < soak.args.settle && (mismatched > 0 || !soak.inflight.is_empty()) {
        soak.read_round(20)?;
        soak.take_closed();
        mismatched = soak.mismatches();
    }
    let last = soak.sample()?;
    writeln!(csv, "{}", last.row()).map_err(|e| e.to_string())?;
    samples.push(last);
    stop.store(true, Ordering::Relaxed);
    let history = history.join().map_err(|_| "the history reader panicked")?;
    let hostile = hostile.join().map_err(|_| "the hostile client panicked")?;
    let stored = Stored::read(&soak.args.db)?;
    let checked = stored.check(&soak);

    // Every client leaves; the server's descriptors must come back to the baseline.
    for m in soak.members.iter_mut() {
        m.sock = None;
    }
    let closing = Instant::now();
    let mut sockets_after = socket_count(pid).unwrap_or(usize::MAX);
    while sockets_after > sockets_before && closing.elapsed() < soak.args.settle {
        std::thread::sleep(Duration::from_millis(100)); // polling /proc, bounded by --settle
        sockets_after = socket_count(pid).unwrap_or(usize::MAX);
    }

    let growth = growth_after(&samples, warmup, |s| s.rss);
    let c = &soak.counts;
    let mut failures: Vec<String> = Vec::new();
    match growth.map(|(_, _, g)| g) {
        Some(g) if g > soak.args.rss_growth_max => {
            failures.push(format!("RSS grew {g:.2} % after the warm-up (limit {} %)", soak.args.rss_growth_max))
        }
        None => failures.push("too few samples after the warm-up to judge RSS growth (need 6)".into()),
        _ => {}
    }
    if sockets_after > sockets_before {
        failures
            .push(format!("the server holds {sockets_after} sockets after every client left, {sockets_before} before"));
    }
    failures.extend(checked.failures.iter().cloned());
    if mismatched > 0 {
        failures.push(format!("{mismatched} presence views differ from the truth after {:?}", soak.args.settle));
    }
    if !soak.inflight.is_empty() {
        failures.push(format!("{} messages never answered", soak.inflight.len()));
    }
    for (what, n) in [
        ("messages out of order or duplicated", c.out_of_order),
        ("messages refused", c.refused_msgs),
        ("joins refused", c.refused_joins),
        ("members closed by the server", c.server_closes),
    ] {
        if n > 0 {
            failures.push(format!("{n} {what}"));
        }
    }
    for (side, name) in [(&history, "history read"), (&hostile, "hostile probe")] {
        for f in &side.failures {
            failures.push(format!("{name}: {f}"));
        }
    }

    println!(
        "soak: {} sockets ({} in the large room, the rest over {} rooms), {} msg/s, {} churn/s, {:.0} s of load",
        soak.members.len(),
        soak.args.large_room,
        soak.args.topics,
        soak.args.rate,
        soak.args.churn,
        load_secs
    );
    println!(
        "  sent {}, acked {}, deliveries {}, churn {} (reconnects {}), joins not recovered {}, slow reconnects {}, \
         answers lost with a dropped socket {}",
        c.sent, c.acked, c.deliveries, c.churn, c.reconnects, c.not_recovered, c.slow_reconnects, c.abandoned
    );
    println!(
        "  ack p99 {:.1} ms, e2e p99 {:.1} ms (whole run); history reads {}; hostile probes {}",
        soak.ack_us[1].value_at_quantile(0.99) as f64 / 1000.0,
        soak.e2e_us[1].value_at_quantile(0.99) as f64 / 1000.0,
        history.ok,
        hostile.ok
    );
    println!(
        "  database: {} rows; {} acked found once; {} stretches of member messages match it",
        checked.rows, checked.acked_once, checked.stretches_ok
    );
    // The heap in use, by the allocator's count, is not checked: it tells a creep in RSS that
    // is data from one that is fragmentation.
    let heap = match growth_after(&samples, warmup, |s| s.heap_in_use) {
        Some((first, last, g)) if first > 0.0 => {
            format!(" (heap in use {:.2} → {:.2} MiB, {g:.2} %)", first / 1048576.0, last / 1048576.0)
        }
        _ => String::new(),
    };
    let growth = growth.map_or("n/a".into(), |(first, last, g)| {
        format!(
            "{:.2} MiB after the warm-up, {:.2} MiB at the end, growth {g:.2} %{heap}",
            first / 1048576.0,
            last / 1048576.0
        )
    });
    println!(
        "  RSS (least-squares line after the warm-up): {growth} (limit {} %); \
         server sockets {sockets_before} before the clients, {sockets_after} after they left",
        soak.args.rss_growth_max
    );
    println!("  presence views differing from the truth: {mismatched}");
    for v in &soak.violations {
        println!("  out of order: {v}");
    }
    if failures.is_empty() {
        println!("soak: PASS");
        Ok(())
    } else {
        for f in &failures {
            println!("  FAIL {f}");
        }
        Err(format!("{} checks failed", failures.len()))
    }
}

impl Soak {
    fn take_ref(&mut self) -> u64 {
        let r = self.next_ref;
        self.next_ref += 1;
        r
    }

    fn source(&self, i: usize) -> u8 {
        2 + (i % self.args.sources as usize) as u8
    }

    fn connect(&mut self, i: usize) -> Result<(), String> {
        let path = self.args.target.socket_path(self.members[i].user)?;
        let sock = reactor::open(self.addr, self.source(i), &path)?;
        self.poller.add(sock.fd(), i)?;
        let m = &mut self.members[i];
        (m.sock, m.leaving, m.joined, m.join_ref) = (Some(sock), None, false, None);
        Ok(())
    }

    fn open_slow(&mut self) -> Result<Sock, String> {
        let source = self.source(self.slow.len());
        let mut sock =
            reactor::open_with(self.addr, source, &self.args.target.socket_path(Uuid::new_v4())?, Some(4096))?;
        let r = self.take_ref();
        let firehose = self.topics[self.topics.len() - 1];
        let frame = format!(r#"["{r}","{r}","{}","phx_join",{{}}]"#, self.args.target.topic(firehose));
        sock.send_text(frame.as_bytes()).map_err(|e| e.to_string())?;
        Ok(sock)
    }

    /// Joins member `i`'s conversation, recovering from its last message if it has one.
    fn join(&mut self, i: usize) -> Result<(), String> {
        let r = self.take_ref();
        let topic = self.args.target.topic(self.topics[self.members[i].topic]);
        let m = &mut self.members[i];
        let payload = match m.last_id {
            Some(id) => format!(r#"{{"last_seen_id":"{}"}}"#, Uuid::from_u128(id)),
            None => "{}".into(),
        };
        let frame = format!(r#"["{r}","{r}","{topic}","phx_join",{payload}]"#);
        let sock = m.sock.as_mut().ok_or("join without a socket")?;
        if sock.send_text(frame.as_bytes()).is_err() {
            return Ok(()); // the server closed it: take_closed brings it back
        }
        (m.join_ref, m.joined, m.view, m.away) = (Some(r), false, None, false);
        m.early.clear();
        Ok(())
    }

    fn send_one(&mut self) -> Result<(), String> {
        let Some(i) = (0..8).map(|_| self.rng.below(self.args.connections)).find(|&i| self.members[i].joined) else {
            return Ok(());
        };
        self.send_from(i, 0)
    }

    /// One `new_msg` from member `i`, its body padded with `pad` bytes.
    fn send_from(&mut self, i: usize, pad: usize) -> Result<(), String> {
        let r = self.take_ref();
        let m = &mut self.members[i];
        let (Some(jr), Some(sock)) = (m.join_ref, m.sock.as_mut()) else { return Ok(()) };
        let t = self.started.elapsed().as_micros();
        let topic = self.args.target.topic(self.topics[m.topic]);
        let padding = if pad > 0 { format!(" {}", "x".repeat(pad)) } else { String::new() };
        let frame = format!(r#"["{jr}","{r}","{topic}","new_msg",{{"body":"s{r} {t}{padding}"}}]"#);
        if sock.send_text(frame.as_bytes()).is_ok() {
            self.inflight.insert(r, Inflight { member: i, sent: Instant::now() });
            self.counts.sent += 1;
        }
        Ok(())
    }

    /// Takes a random joined member away: a leave (6 in 10) or a dropped socket.
    fn churn_one(&mut self) -> Result<Option<usize>, String> {
        let observers = self.args.observers.min(self.args.large_room);
        let Some(i) = (0..8)
            .map(|_| self.rng.below(self.args.connections))
            .find(|&i| self.members[i].joined && !(i < observers && self.members[i].topic == 0))
        else {
            return Ok(None);
        };
        self.counts.churn += 1;
        let leave = self.rng.below(10) < 6;
        let r = self.take_ref();
        let topic = self.args.target.topic(self.topics[self.members[i].topic]);
        let m = &mut self.members[i];
        if leave {
            let jr = m.join_ref.unwrap_or(0);
            let frame = format!(r#"["{jr}","{r}","{topic}","phx_leave",{{}}]"#);
            if let Some(s) = m.sock.as_mut() {
                let _ = s.send_text(frame.as_bytes());
            }
            m.leaving = Some(r);
        } else {
            self.drop_socket(i);
        }
        let m = &mut self.members[i];
        (m.join_ref, m.joined, m.view, m.away) = (None, false, None, true);
        m.early.clear();
        Ok(Some(i))
    }

    /// Closes member `i`'s socket; answers still owed to it are forgotten (those messages may
    /// or may not be stored: the check only requires the database to hold no more than sent).
    fn drop_socket(&mut self, i: usize) {
        if let Some(s) = self.members[i].sock.take() {
            self.poller.remove(s.fd());
        }
        let before = self.inflight.len();
        self.inflight.retain(|_, f| f.member != i);
        self.counts.abandoned += (before - self.inflight.len()) as u64;
    }

    fn come_back(&mut self, i: usize) -> Result<(), String> {
        if self.members[i].sock.is_none() {
            self.connect(i)?;
            self.counts.reconnects += 1;
        }
        self.join(i)
    }

    fn heartbeat(&mut self, k: usize) -> Result<(), String> {
        let r = self.take_ref();
        let frame = format!(r#"[null,"{r}","phoenix","heartbeat",{{}}]"#);
        if k < self.members.len() {
            if let Some(s) = self.members[k].sock.as_mut() {
                let _ = s.send_text(frame.as_bytes()); // a closed socket shows up in the next read
            }
            return Ok(());
        }
        let j = k - self.members.len();
        let failed = match self.slow[j].as_mut() {
            Some(s) => s.send_text(frame.as_bytes()).is_err(),
            None => true,
        };
        if failed {
            // Closed by the server as a slow consumer (the write fails once the peer is gone).
            self.slow[j] = Some(self.open_slow()?);
            self.counts.slow_reconnects += 1;
        }
        Ok(())
    }

    /// Members whose socket the server closed: forgotten sockets, back after `--away`.
    fn take_closed(&mut self) -> Vec<usize> {
        let closed = std::mem::take(&mut self.closed);
        for &i in &closed {
            self.counts.server_closes += 1;
            self.drop_socket(i);
            let m = &mut self.members[i];
            (m.join_ref, m.joined, m.view, m.away) = (None, false, None, true);
        }
        closed
    }

    fn read_round(&mut self, wait_ms: i32) -> Result<(), String> {
        let mut frames: Vec<Vec<u8>> = Vec::new();
        for i in self.poller.wait(wait_ms) {
            let Some(sock) = self.members[i].sock.as_mut() else { continue };
            frames.clear();
            let _ = sock.read(&mut self.scratch, |f| {
                if let Frame::Text(t) = f {
                    frames.push(t.to_vec());
                }
            });
            if sock.closed {
                self.poller.remove(sock.fd());
                self.closed.push(i);
            }
            for f in &frames {
                self.on_frame(i, f)?;
            }
        }
        Ok(())
    }

    fn on_frame(&mut self, i: usize, frame: &[u8]) -> Result<(), String> {
        let Some(h) = v2::head(frame) else {
            return Err(format!("unreadable frame {}", String::from_utf8_lossy(frame)));
        };
        if h.is("new_msg") {
            return self.on_message(i, h.payload);
        }
        if h.is("phx_reply") {
            let r = h.ref_u64();
            let m = &mut self.members[i];
            if r.is_some() && r == m.leaving {
                m.leaving = None;
            } else if r.is_some() && r == m.join_ref {
                if h.ok() {
                    m.joined = true;
                    m.joined_at = self.started.elapsed().as_millis() as u64;
                    // `{"recovered":false}`: too much was missed; the next message starts a
                    // new stretch (none of this run's members misses that much).
                    let response = h.response().unwrap_or_default();
                    if v2::get(response, "recovered") == Some(b"false") {
                        m.continuing = false;
                        self.counts.not_recovered += 1;
                    }
                    // The next `missed` messages are old ones: not counted in e2e latency.
                    m.recovering = v2::get(response, "missed")
                        .and_then(|n| std::str::from_utf8(n).ok()?.parse().ok())
                        .unwrap_or(0);
                } else {
                    self.counts.refused_joins += 1;
                }
            } else if let Some((r, f)) = r.and_then(|r| self.inflight.remove_entry(&r)) {
                if h.ok() {
                    self.counts.acked += 1;
                    self.acked.push((self.topics[m.topic].as_u128(), r));
                    record(&mut self.ack_us, f.sent.elapsed().as_micros() as u64);
                } else {
                    self.counts.refused_msgs += 1;
                }
            }
            return Ok(());
        }
        let (state, diff) = (h.is("presence_state"), h.is("presence_diff"));
        let m = &mut self.members[i];
        if !(state || diff) || !m.keeps_view {
            return Ok(());
        }
        let current = m.join_ref.is_some() && h.join_ref.and_then(|s| s.to_u64()) == m.join_ref;
        let end = h.payload.len().saturating_sub(1); // the frame's closing `]`
        let payload: sonic_rs::Value =
            sonic_rs::from_slice(&h.payload[..end]).map_err(|e| format!("bad presence payload: {e}"))?;
        if state && current {
            let mut view = View::new();
            merge(&mut view, &payload, true);
            for early in std::mem::take(&mut m.early) {
                apply_diff(&mut view, &early);
            }
            m.view = Some(view);
        } else if diff {
            match m.view.as_mut() {
                Some(view) => apply_diff(view, &payload),
                None if m.join_ref.is_some() && m.leaving.is_none() => m.early.push(payload),
                None => {}
            }
        }
        Ok(())
    }

    fn on_message(&mut self, i: usize, payload: &[u8]) -> Result<(), String> {
        let id = v2::get_str(payload, "id")
            .and_then(|s| Uuid::parse_str(&s.text()).ok())
            .ok_or("a new_msg without an id")?
            .as_u128();
        self.counts.deliveries += 1;
        let text = v2::message_text(payload).map(|t| t.text().into_owned()).unwrap_or_default();
        let now_ms = self.started.elapsed().as_millis() as u64;
        let m = &mut self.members[i];
        let recovered = m.recovering > 0;
        if m.recent.len() == 8 {
            m.recent.pop_front();
        }
        m.recent.push_back((id, recovered, now_ms));
        if recovered {
            m.recovering -= 1;
        } else if let Some((_, t)) = body_ref(&text) {
            let now = self.started.elapsed().as_micros() as u64;
            record(&mut self.e2e_us, now.saturating_sub(t));
        }
        if m.last_id.is_some_and(|last| id <= last) {
            self.counts.out_of_order += 1;
            if self.violations.len() < 5 {
                let recent: Vec<String> = m
                    .recent
                    .iter()
                    .map(|(id, r, at)| {
                        format!("{}{}@{at}", &Uuid::from_u128(*id).to_string()[..13], if *r { "R" } else { "" })
                    })
                    .collect();
                self.violations.push(format!(
                    "member {i} (topic {}, joined {} ms ago, join_ref {:?}, leaving {:?}): {} after {}; last received: {}",
                    m.topic,
                    now_ms.saturating_sub(m.joined_at),
                    m.join_ref,
                    m.leaving,
                    Uuid::from_u128(id),
                    Uuid::from_u128(m.last_id.unwrap_or_default()),
                    recent.join(" ")
                ));
            }
            return Ok(());
        }
        m.last_id = Some(id);
        match m.stretches.last_mut() {
            Some(s) if m.continuing => {
                s.last = id;
                s.count += 1;
                s.hash = s.hash.wrapping_add(id_hash(id));
            }
            _ => {
                m.stretches.push(Stretch { first: id, last: id, count: 1, hash: id_hash(id) });
                m.continuing = true;
            }
        }
        Ok(())
    }

    /// Members keeping a view whose view differs from the truth (per conversation: every
    /// joined member's user, one meta each).
    fn mismatches(&self) -> usize {
        let mut truth: Vec<HashMap<String, usize>> = vec![HashMap::new(); self.topics.len()];
        for m in self.members.iter().filter(|m| m.joined) {
            *truth[m.topic].entry(m.user.to_string()).or_default() += 1;
        }
        self.members
            .iter()
            .filter(|m| m.joined && m.keeps_view)
            .filter(|m| {
                let Some(view) = &m.view else { return true };
                view.len() != truth[m.topic].len()
                    || view.iter().any(|(u, refs)| truth[m.topic].get(u) != Some(&refs.len()))
            })
            .count()
    }

    fn sample(&mut self) -> Result<Sample, String> {
        let pid = self.args.server_pid;
        let metrics = scrape(self.addr)?;
        let file = |suffix: &str| {
            let mut p = self.args.db.clone().into_os_string();
            p.push(suffix);
            std::fs::metadata(p).map_or(0, |m| m.len())
        };
        let (rss, rss_max) = self.rss.take(rss_bytes(pid).ok_or("the server is gone")?);
        let s = Sample {
            at: self.started.elapsed().as_secs_f64(),
            rss,
            rss_max,
            sqlite: metric(&metrics, "nexus_sqlite_memory_bytes"),
            fds: fd_count(pid).unwrap_or(0),
            connections: metric(&metrics, "nexus_connections"),
            writer_queue: metric(&metrics, "nexus_writer_queue_depth"),
            mailbox: metric(&metrics, "nexus_mailbox_depth"),
            outbox: metric(&metrics, "nexus_outbox_bytes"),
            heap_in_use: metric(&metrics, "nexus_heap_in_use_bytes"),
            heap_free: metric(&metrics, "nexus_heap_free_bytes"),
            db: file(""),
            wal: file("-wal"),
            ack_p99_ms: self.ack_us[0].value_at_quantile(0.99) as f64 / 1000.0,
            e2e_p99_ms: self.e2e_us[0].value_at_quantile(0.99) as f64 / 1000.0,
            acked: self.counts.acked,
            deliveries: self.counts.deliveries,
            churn: self.counts.churn,
        };
        // The percentiles are per interval; the run's own are reported at the end.
        self.ack_us[0].reset();
        self.e2e_us[0].reset();
        Ok(s)
    }
}

/// How often the server's RSS is read between samples (see [`RssReads`]).
const RSS_READ_EVERY: Duration = Duration::from_secs(1);

const CSV_HEADER: &str = "elapsed_s,rss_bytes,fds,connections,writer_queue,mailbox,outbox_bytes,db_bytes,wal_bytes,\
                          ack_p99_ms,e2e_p99_ms,acked,deliveries,churn,sqlite_bytes,rss_max_bytes,heap_in_use_bytes,heap_free_bytes";

struct Sample {
    at: f64,
    /// Mean of the interval's readings (see [`RssReads`]).
    rss: u64,
    /// Highest reading of the interval.
    rss_max: u64,
    fds: usize,
    connections: u64,
    writer_queue: u64,
    mailbox: u64,
    outbox: u64,
    db: u64,
    wal: u64,
    ack_p99_ms: f64,
    e2e_p99_ms: f64,
    acked: u64,
    deliveries: u64,
    churn: u64,
    sqlite: u64,
    /// `nexus_heap_in_use_bytes` and `nexus_heap_free_bytes` (0 when the server has none).
    heap_in_use: u64,
    heap_free: u64,
}

impl Sample {
    fn row(&self) -> String {
        format!(
            "{:.0},{},{},{},{},{},{},{},{},{:.2},{:.2},{},{},{},{},{},{},{}",
            self.at,
            self.rss,
            self.fds,
            self.connections,
            self.writer_queue,
            self.mailbox,
            self.outbox,
            self.db,
            self.wal,
            self.ack_p99_ms,
            self.e2e_p99_ms,
            self.acked,
            self.deliveries,
            self.churn,
            self.sqlite,
            self.rss_max,
            self.heap_in_use,
            self.heap_free
        )
    }

    fn summary(&self) -> String {
        format!(
            "{:>5.0} s  rss {:.1} MiB (sqlite {:.1})  fds {}  conns {}  writer {}  mailbox {}  outbox {} B  db {:.1} MiB  wal {:.1} MiB  \
             ack p99 {:.1} ms  e2e p99 {:.1} ms  acked {}",
            self.at,
            self.rss as f64 / 1048576.0,
            self.sqlite as f64 / 1048576.0,
            self.fds,
            self.connections,
            self.writer_queue,
            self.mailbox,
            self.outbox,
            self.db as f64 / 1048576.0,
            self.wal as f64 / 1048576.0,
            self.ack_p99_ms,
            self.e2e_p99_ms,
            self.acked
        )
    }
}

/// A figure after `warmup` (RSS, the heap in use) as (first, last, growth in percent), read
/// from the least-squares line through the samples under load (the final, settled one is left
/// out): its values at the first and the last of them. Medians of a few samples at either end
/// were not enough: this load swings RSS by about 1 MB in a two-minute cycle, and which end of
/// it three samples fell on decided a 2 % check. `None` with fewer than six samples.
fn growth_after(samples: &[Sample], warmup: Duration, figure: impl Fn(&Sample) -> u64) -> Option<(f64, f64, f64)> {
    let loaded = samples.get(..samples.len().saturating_sub(1))?;
    let after: Vec<(f64, f64)> =
        loaded.iter().filter(|s| s.at >= warmup.as_secs_f64()).map(|s| (s.at, figure(s) as f64)).collect();
    if after.len() < 6 {
        return None;
    }
    trend(&after)
}

/// The least-squares line through `points` (x, y): its y at the first and the last x, and the
/// growth between them in percent. `None` for fewer than two distinct x.
fn trend(points: &[(f64, f64)]) -> Option<(f64, f64, f64)> {
    let (&(x0, _), &(x1, _)) = (points.first()?, points.last()?);
    let n = points.len() as f64;
    let mx = points.iter().map(|(x, _)| x).sum::<f64>() / n;
    let my = points.iter().map(|(_, y)| y).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    let sxy: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let at = |x: f64| my + sxy / sxx * (x - mx);
    let (first, last) = (at(x0), at(x1));
    Some((first, last, (last - first) / first * 100.0))
}

/// What the database holds: per conversation, every message id, sorted; and where each body
/// this run sent is stored.
struct Stored {
    ids: HashMap<u128, Vec<u128>>,
    /// ref in the body → (conversation, rows holding it).
    bodies: HashMap<u64, (u128, u32)>,
    rows: u64,
    /// Ids stored twice (in both tables, or twice in one).
    duplicate_ids: u64,
    /// Rows whose body this run did not send.
    foreign: u64,
}

struct Checked {
    rows: u64,
    acked_once: u64,
    stretches_ok: u64,
    failures: Vec<String>,
}

impl Stored {
    /// Reads both tables (the commit log and the history it is merged into) in one snapshot.
    fn read(path: &std::path::Path) -> Result<Stored, String> {
        let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let db = rusqlite::Connection::open_with_flags(path, flags).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut stmt = db
            .prepare(
                // A row may sit in both tables for a while (the merge copies before it deletes,
                // and keeps the newest row in `recent`): the copy in `recent` is the same row.
                "SELECT conversation_id, id, body FROM recent r WHERE NOT EXISTS \
                 (SELECT 1 FROM messages m WHERE m.conversation_id = r.conversation_id AND m.id = r.id) \
                 UNION ALL SELECT conversation_id, id, body FROM messages",
            )
            .map_err(|e| e.to_string())?;
        let mut rows = stmt.query([]).map_err(|e| e.to_string())?;
        let mut stored = Stored { ids: HashMap::new(), bodies: HashMap::new(), rows: 0, duplicate_ids: 0, foreign: 0 };
        let blob = |row: &rusqlite::Row, i: usize| -> Result<u128, String> {
            let b: Vec<u8> = row.get(i).map_err(|e| e.to_string())?;
            Ok(u128::from_be_bytes(b.as_slice().try_into().map_err(|_| "an id that is not 16 bytes")?))
        };
        while let Some(row) = rows.next().map_err(|e| e.to_string())? {
            let conv = blob(row, 0)?;
            stored.ids.entry(conv).or_default().push(blob(row, 1)?);
            let body: String = row.get(2).map_err(|e| e.to_string())?;
            match body_ref(&body) {
                Some((r, _)) => stored.bodies.entry(r).or_insert((conv, 0)).1 += 1,
                None => stored.foreign += 1,
            }
            stored.rows += 1;
        }
        for v in stored.ids.values_mut() {
            v.sort_unstable();
            let before = v.len();
            v.dedup();
            stored.duplicate_ids += (before - v.len()) as u64;
        }
        Ok(stored)
    }

    fn check(&self, soak: &Soak) -> Checked {
        let mut out = Checked { rows: self.rows, acked_once: 0, stretches_ok: 0, failures: Vec::new() };
        let twice = self.bodies.values().filter(|(_, n)| *n > 1).count() as u64 + self.duplicate_ids;
        if twice > 0 {
            out.failures.push(format!("{twice} messages are stored more than once"));
        }
        if self.foreign > 0 {
            out.failures.push(format!("{} stored messages were never sent", self.foreign));
        }
        let (mut lost, mut misplaced) = (0u64, 0u64);
        for (conv, r) in &soak.acked {
            match self.bodies.get(r) {
                Some((c, 1)) if c == conv => out.acked_once += 1,
                Some((c, _)) if c != conv => misplaced += 1,
                Some(_) => {} // counted as stored more than once above
                None => lost += 1,
            }
        }
        if lost > 0 {
            out.failures.push(format!("{lost} acknowledged messages are not in the database"));
        }
        if misplaced > 0 {
            out.failures.push(format!("{misplaced} acknowledged messages are stored in another conversation"));
        }
        let empty = Vec::new();
        let mut gaps = 0;
        for m in &soak.members {
            let stored = self.ids.get(&soak.topics[m.topic].as_u128()).unwrap_or(&empty);
            for s in &m.stretches {
                let (from, to) =
                    (stored.partition_point(|id| *id < s.first), stored.partition_point(|id| *id <= s.last));
                let run = &stored[from..to];
                let hash = run.iter().fold(0u64, |h, id| h.wrapping_add(id_hash(*id)));
                if run.len() as u64 == s.count && hash == s.hash {
                    out.stretches_ok += 1;
                } else {
                    gaps += 1;
                }
            }
        }
        if gaps > 0 {
            out.failures.push(format!("{gaps} stretches of a member's messages differ from the database (a gap)"));
        }
        out
    }
}

fn fd_count(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// The process's socket descriptors (listeners and connections; files the server opens on
/// first use, such as a reader's database handle, are not the clients' to give back).
fn socket_count(pid: u32) -> Option<usize> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(
        dir.filter_map(Result::ok)
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:")))
            .count(),
    )
}

/// One HTTP GET on its own connection; the body of a 200.
fn http_get(addr: SocketAddr, path: &str, bearer: Option<&str>) -> Result<Vec<u8>, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let auth = bearer.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| format!("GET {path}: {e}"))?;
    if !buf.starts_with(b"HTTP/1.1 200") {
        let line = buf.split(|b| *b == b'\r').next().unwrap_or_default();
        return Err(format!("GET {path}: {}", String::from_utf8_lossy(line)));
    }
    let body = memchr::memmem::find(&buf, b"\r\n\r\n").map_or(0, |i| i + 4);
    Ok(buf.split_off(body))
}

fn scrape(addr: SocketAddr) -> Result<String, String> {
    http_get(addr, "/metrics", None).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// The sum of every series of `name` (all labels) in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let base = series.split('{').next()?;
            (base == name).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum::<f64>() as u64
}

/// Reads history pages of random conversations at `rate` per second until `stop`, each with a
/// token minted for it (as a client gets fresh ones from its backend), so a run longer than a
/// token's life still reads.
fn history_reader(addr: SocketAddr, secret: &str, topics: &[Uuid], rate: f64, stop: &AtomicBool) -> Side {
    let mut side = Side::default();
    if rate <= 0.0 {
        return side;
    }
    let gap = Duration::from_secs_f64(1.0 / rate);
    let mut rng = Rng(7);
    let mut due = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let topic = topics[rng.below(topics.len())];
        let read = crate::wire::token(secret, Uuid::new_v4())
            .and_then(|token| http_get(addr, &format!("/api/conversations/{topic}/messages?limit=50"), Some(&token)));
        match read {
            Ok(body) if body.starts_with(b"{") || body.starts_with(b"[") => side.ok += 1,
            Ok(body) => side.fail(format!("not JSON: {}", String::from_utf8_lossy(&body))),
            Err(e) => side.fail(e),
        }
        due += gap;
        std::thread::sleep(due.saturating_duration_since(Instant::now())); // pacing, not synchronisation
    }
    side
}

/// One bad input after another, each on a fresh connection, until `stop`; each must get its
/// documented answer (and the server keeps serving everyone else).
fn hostile_client(addr: SocketAddr, target: &Target, every: Duration, stop: &AtomicBool) -> Side {
    let mut side = Side::default();
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let result = probe(addr, target, n % PROBES);
        match result {
            Ok(()) => side.ok += 1,
            Err(e) => side.fail(format!("probe {}: {e}", n % PROBES)),
        }
        n += 1;
        std::thread::sleep(every); // pacing, not synchronisation
    }
    side
}

const PROBES: usize = 6;

/// Bad input `which`, and the answer it must get.
fn probe(addr: SocketAddr, target: &Target, which: usize) -> Result<(), String> {
    let raw = |request: &[u8], want: &[u8]| -> Result<(), String> {
        let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        s.write_all(request).map_err(|e| e.to_string())?;
        expect(&mut s, want)
    };
    let upgraded = |frames: &[Vec<u8>], want: &[u8]| -> Result<(), String> {
        let mut sock = reactor::open(addr, 2, &target.socket_path(Uuid::new_v4())?)?;
        sock.stream.set_nonblocking(false).map_err(|e| e.to_string())?;
        sock.stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        for f in frames {
            sock.write_all(f).map_err(|e| e.to_string())?;
        }
        expect(&mut sock.stream, want)
    };
    let text = |t: &[u8]| {
        let mut out = Vec::new();
        reactor::masked_text(t, &mut out);
        out
    };
    let heartbeat = text(br#"[null,"9","phoenix","heartbeat",{}]"#);
    let heartbeat_ok: &[u8] = br#""9","phoenix","phx_reply",{"status":"ok""#;
    match which {
        // Not HTTP at all: 400.
        0 => raw(b"HELLO\r\n\r\n", b"HTTP/1.1 400"),
        // A forged token: refused at the upgrade.
        1 => {
            let req = format!(
                "GET {}?vsn=2.0.0&token=eyJhbGciOiJub25lIn0.e30. HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                target.path
            );
            raw(req.as_bytes(), b"HTTP/1.1 40")
        }
        // Invalid JSON, then a heartbeat: the bad message is dropped, the socket still answers.
        2 => upgraded(&[text(b"{not json"), heartbeat], heartbeat_ok),
        // The wrong types, then a heartbeat.
        3 => upgraded(&[text(br#"[1,2,3,4,5]"#), heartbeat], heartbeat_ok),
        // A frame header announcing 1 GiB: close 1009.
        4 => {
            let mut f = vec![0x81, 0x80 | 127];
            f.extend_from_slice(&(1u64 << 30).to_be_bytes());
            f.extend_from_slice(&[0, 0, 0, 0]);
            upgraded(&[f], &[0x03, 0xF1]) // the close frame's code
        }
        // A join with a last_seen_id that is not a UUID: refused with its reason.
        _ => upgraded(
            &[text(
                format!(r#"["1","1","{}","phx_join",{{"last_seen_id":5}}]"#, target.topic(Uuid::new_v4())).as_bytes(),
            )],
            b"invalid last_seen_id",
        ),
    }
}

/// Reads until `want` appears (Ok), or the peer closes or 5 s pass (Err with what came).
fn expect(s: &mut TcpStream, want: &[u8]) -> Result<(), String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if memchr::memmem::find(&got, want).is_some() {
            return Ok(());
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => {
                return Err(format!(
                    "wanted {:?}, got {:?}",
                    String::from_utf8_lossy(want),
                    String::from_utf8_lossy(&got[..got.len().min(200)])
                ))
            }
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{trend, RssReads};

    /// A load cycle of two samples (high, low, high, ...) reads as little growth, wherever the
    /// run starts and ends in it (about `6a/(n+1)` for half-swing `a`); a steady rise is read
    /// exactly.
    #[test]
    fn a_cycle_moves_the_trend_little_and_a_rise_reads_exactly() {
        let swing = |start: u64, n: u64| -> Vec<(f64, f64)> {
            (start..start + n).map(|i| (i as f64 * 60.0, if i % 2 == 0 { 100.0 } else { 105.0 })).collect()
        };
        // Three high samples at the end against three low at the start read +5 % by medians.
        for (start, n) in [(0, 45), (1, 45), (0, 46), (1, 46)] {
            let (_, _, g) = trend(&swing(start, n)).expect("a line");
            assert!(g.abs() < 0.5, "a cycle read as {g:.2} % ({start}, {n})");
        }
        let rise: Vec<(f64, f64)> = (0..46).map(|i| (i as f64 * 60.0, 100.0 + i as f64 * 0.1)).collect();
        let (first, last, g) = trend(&rise).expect("a line");
        assert!((first - 100.0).abs() < 1e-9 && (last - 104.5).abs() < 1e-9 && (g - 4.5).abs() < 1e-9);
        assert!(trend(&[(1.0, 5.0)]).is_none() && trend(&[(1.0, 5.0), (1.0, 6.0)]).is_none());
    }

    /// A sawtooth read at two different phases has one mean: what a sample shows no longer
    /// depends on where it falls in the cycle.
    #[test]
    fn the_mean_of_a_sawtooth_does_not_depend_on_its_phase() {
        let tooth = |i: u64| 100 + (i % 10) * 10;
        let mean = |phase: u64| {
            let mut reads = RssReads::default();
            (phase..phase + 19).for_each(|i| reads.add(tooth(i)));
            reads.take(tooth(phase + 19))
        };
        assert_eq!(mean(0), (145, 190));
        assert_eq!(mean(7), (145, 190));
        let mut reads = RssReads::default();
        assert_eq!(reads.take(42), (42, 42), "no reading in between: the last alone");
    }
}
