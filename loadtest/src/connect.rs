//! Scenario `connect`: N connections opened at a rate, each joining one of T topics, held for a
//! duration with heartbeats. Reports established/failed, join latency percentiles, the
//! server's RSS before and after (`--server-pid`) and per connection, the kernel's TCP memory
//! (both ends of every loopback connection), and the load generator's own RSS.
//!
//! `--warm W` opens and joins W connections first and reads the "before" figures only then,
//! so that what the server's first connections touch once (per-core buffers, thread stacks,
//! allocator arenas) is not counted as a cost of every connection.
//!
//! One process holds at most what its descriptor limit allows; `--processes P` runs P copies of
//! this scenario as child processes (each with N/P connections and its own source addresses)
//! and adds their reports up, so one box can hold more than one process's worth of sockets.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::reactor::{self, rss_bytes, Frame, Poller, Sock};
use crate::stats::percentiles;
use crate::v2;

/// Arguments of `nexus-load connect`.
#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    target: crate::Target,
    /// Connections to open (over all processes).
    #[arg(long, default_value_t = 1_000)]
    connections: usize,
    /// Topics the connections join, round-robin.
    #[arg(long, default_value_t = 100)]
    topics: usize,
    /// Connections opened per second (per process).
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    /// How long to hold every connection once all are open.
    #[arg(long, default_value = "10", value_parser = crate::parse_secs)]
    hold: Duration,
    /// Heartbeat interval per connection (the server closes connections idle past its timeout).
    #[arg(long, default_value = "30", value_parser = crate::parse_secs)]
    heartbeat: Duration,
    /// Source addresses per process: 127.0.0.2 .. 127.0.0.(1+N); each gives ~28k ports.
    #[arg(long, default_value_t = 20)]
    sources: u8,
    /// Processes to spread the connections over (each below its own descriptor limit).
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// Server process id, for RSS before/after.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Connections opened, joined and held (from 127.0.0.252) before the "before" figures are
    /// read: the per-connection figures then count what one more connection costs, not the
    /// one-time cost of the server's first connections (per-core buffers, thread stacks and
    /// allocator arenas touched on first use).
    #[arg(long, default_value_t = 0)]
    warm: usize,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
    /// Internal: this is child `i` of `--processes`; print a ready line, then the JSON report.
    #[arg(long, hide = true)]
    child: Option<usize>,
    /// Internal: topic names shared by all children (comma-separated UUIDs).
    #[arg(long, hide = true)]
    topic_ids: Option<String>,
}

/// What one process measured.
#[derive(Default)]
struct Held {
    established: usize,
    failed: usize,
    closed: usize,
    heartbeats_ok: u64,
    join_us: Vec<u32>,
    own_rss: u64,
    first_error: Option<String>,
}

pub(crate) fn run(args: Args) -> Result<(), String> {
    crate::loopback(&args.target.addr)?;
    if args.connections == 0 || args.topics == 0 || args.rate == 0 || args.sources == 0 || args.processes == 0 {
        return Err("--connections, --topics, --rate, --sources and --processes must be at least 1".into());
    }
    if args.connections.div_ceil(args.processes) > 19_000 {
        return Err("more than 19,000 connections per process: raise --processes".into());
    }
    if args.processes * args.sources as usize > 250 {
        return Err("--processes x --sources must stay within 127.0.0.2..=127.0.0.251".into());
    }
    if let Some(child) = args.child {
        return run_child(&args, child);
    }
    let topics: Vec<String> = (0..args.topics).map(|_| Uuid::new_v4().to_string()).collect();
    let warm = warm_up(&args, &topics)?;
    let kernel_before = Kernel::read();
    let rss_before = args.server_pid.and_then(rss_bytes);
    let started = Instant::now();
    let (held, rss_after, kernel_after) = if args.processes == 1 {
        let mut held = Held::default();
        let mut after = (None, None);
        hold(&args, 0, &topics, &mut held, |_| after = (args.server_pid.and_then(rss_bytes), Some(Kernel::read())))?;
        (held, after.0, after.1.unwrap_or_default())
    } else {
        spawn_children(&args, &topics)?
    };
    let secs = started.elapsed().as_secs_f64();
    drop(warm);
    report(&args, &held, secs, rss_before, rss_after, kernel_before, kernel_after)
}

/// Opens `--warm` connections joined to `topics` round-robin and waits until every join is
/// answered and the presence traffic has been quiet for 500 ms; returns them, to be held.
fn warm_up(args: &Args, topics: &[String]) -> Result<Vec<Sock>, String> {
    if args.warm == 0 {
        return Ok(Vec::new());
    }
    let addr = crate::loopback(&args.target.addr)?;
    let poller = Poller::new()?;
    let mut socks = Vec::with_capacity(args.warm);
    for i in 0..args.warm {
        let mut sock = reactor::open(addr, 252, &args.target.socket_path(Uuid::new_v4())?)?;
        let join = format!(r#"["1","1","{}","phx_join",{{}}]"#, args.target.topic(&topics[i % topics.len()]));
        sock.send_text(join.as_bytes()).map_err(|e| e.to_string())?;
        poller.add(sock.fd(), i)?;
        socks.push(sock);
    }
    let mut poller = poller;
    let (mut joined, mut answered, mut last) = (vec![false; socks.len()], 0, Instant::now());
    let mut scratch = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(30);
    while answered < socks.len() || last.elapsed() < Duration::from_millis(500) {
        if Instant::now() > deadline {
            return Err(format!("{} warm-up joins unanswered after 30 s", socks.len() - answered));
        }
        for i in poller.wait(50) {
            let mut ok = false;
            let _ = socks[i].read(&mut scratch, |f| {
                if let Frame::Text(t) = f {
                    ok |= v2::head(t).is_some_and(|h| h.ok() && h.reference.is_some_and(|r| r.is("1")));
                }
            });
            last = Instant::now();
            if socks[i].closed {
                return Err("the server closed a warm-up connection".into());
            }
            if ok && !joined[i] {
                joined[i] = true;
                answered += 1;
            }
        }
    }
    Ok(socks)
}

/// Opens, joins and holds this process's share; calls `ready` once every join was answered
/// (and the presence traffic settled), then holds for `--hold`.
fn hold(
    args: &Args,
    child: usize,
    topics: &[String],
    held: &mut Held,
    mut ready: impl FnMut(&Held),
) -> Result<(), String> {
    let addr = crate::loopback(&args.target.addr)?;
    let count = args.connections / args.processes + usize::from(child < args.connections % args.processes);
    let first_source = 2 + child * args.sources as usize;
    let mut h = Holder {
        poller: Poller::new()?,
        socks: Vec::with_capacity(count),
        join_sent: Vec::with_capacity(count),
        joined: vec![false; count],
        scratch: vec![0u8; 64 * 1024],
        last_frame: Instant::now(),
    };
    let began = Instant::now();
    let mut answered = 0;
    for i in 0..count {
        // Pace the opens; read replies while waiting.
        let due = began + Duration::from_secs_f64(i as f64 / args.rate as f64);
        answered += h.round(held, 0);
        while let Some(left) = due.checked_duration_since(Instant::now()) {
            if left < Duration::from_millis(1) {
                std::thread::sleep(left);
                break;
            }
            answered += h.round(held, left.as_millis() as i32);
        }
        let source = (first_source + i % args.sources as usize) as u8;
        let topic = &topics[(child + i * args.processes) % topics.len()];
        h.join_sent.push(Instant::now());
        let opened = args.target.socket_path(Uuid::new_v4()).and_then(|p| reactor::open(addr, source, &p));
        match opened {
            Ok(mut sock) => {
                let join = format!(r#"["1","1","{}","phx_join",{{}}]"#, args.target.topic(topic));
                h.join_sent[i] = Instant::now();
                let sent = sock.send_text(join.as_bytes()).map_err(|e| e.to_string());
                if let Err(e) = sent.and_then(|()| h.poller.add(sock.fd(), i)) {
                    held.failed += 1;
                    held.first_error.get_or_insert(e);
                    h.socks.push(None);
                    answered += 1;
                    continue;
                }
                held.established += 1;
                h.socks.push(Some(sock));
            }
            Err(e) => {
                held.failed += 1;
                held.first_error.get_or_insert(e);
                h.socks.push(None);
                answered += 1;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while answered < count || h.last_frame.elapsed() < Duration::from_millis(500) {
        answered += h.round(held, 50);
        if Instant::now() > deadline {
            held.first_error.get_or_insert_with(|| format!("{} joins unanswered after 60 s", count - answered));
            break;
        }
    }
    held.own_rss = rss_bytes(std::process::id()).unwrap_or(0);
    ready(held);
    // Hold, spreading heartbeats evenly over the interval: by time t, t / interval heartbeats
    // per connection are due.
    let holding = Instant::now();
    let (mut sent, mut hb_ref) = (0u64, 2u64);
    while holding.elapsed() < args.hold {
        h.round(held, 20);
        let due = (holding.elapsed().as_secs_f64() / args.heartbeat.as_secs_f64().max(0.01) * count as f64) as u64;
        while sent < due {
            if let Some(sock) = h.socks[(sent % count as u64) as usize].as_mut() {
                let hb = format!(r#"[null,"{hb_ref}","phoenix","heartbeat",{{}}]"#);
                let _ = sock.send_text(hb.as_bytes());
                hb_ref += 1;
            }
            sent += 1;
        }
    }
    Ok(())
}

/// One process's sockets and their join bookkeeping.
struct Holder {
    poller: Poller,
    socks: Vec<Option<Sock>>,
    join_sent: Vec<Instant>,
    joined: Vec<bool>,
    scratch: Vec<u8>,
    last_frame: Instant,
}

impl Holder {
    /// One poll round: reads what arrived, records join replies and heartbeat answers, forgets
    /// closed sockets. Returns the join replies seen.
    fn round(&mut self, held: &mut Held, wait_ms: i32) -> usize {
        let mut answers = 0;
        for i in self.poller.wait(wait_ms) {
            let Some(sock) = self.socks[i].as_mut() else { continue };
            let mut join_reply = None;
            let mut heartbeats = 0;
            let _ = sock.read(&mut self.scratch, |f| {
                let Frame::Text(t) = f else { return };
                let Some(h) = v2::head(t).filter(|h| h.is("phx_reply")) else { return };
                match h.reference {
                    Some(r) if r.is("1") => join_reply = Some(h.ok()),
                    Some(_) if h.ok() => heartbeats += 1,
                    _ => {}
                }
            });
            self.last_frame = Instant::now();
            held.heartbeats_ok += heartbeats;
            if let Some(ok) = join_reply {
                if !self.joined[i] {
                    self.joined[i] = true;
                    answers += 1;
                    if ok {
                        held.join_us.push(self.join_sent[i].elapsed().as_micros().min(u32::MAX as u128) as u32);
                    } else {
                        held.first_error.get_or_insert_with(|| "join refused".into());
                    }
                }
            }
            if sock.closed {
                self.poller.remove(sock.fd());
                self.socks[i] = None;
                held.closed += 1;
            }
        }
        answers
    }
}

/// Child mode: a ready line (server RSS is measured by the parent then), then the report.
fn run_child(args: &Args, child: usize) -> Result<(), String> {
    let topics: Vec<String> = args.topic_ids.as_deref().unwrap_or_default().split(',').map(str::to_string).collect();
    let mut held = Held::default();
    hold(args, child, &topics, &mut held, |_| println!("ready"))?;
    let joins: Vec<String> = held.join_us.iter().map(u32::to_string).collect();
    println!(
        "{{\"established\":{},\"failed\":{},\"closed\":{},\"heartbeats_ok\":{},\"own_rss\":{},\"error\":{},\"join_us\":[{}]}}",
        held.established,
        held.failed,
        held.closed,
        held.heartbeats_ok,
        held.own_rss,
        held.first_error.as_ref().map_or("null".to_string(), |e| format!("{e:?}")),
        joins.join(",")
    );
    Ok(())
}

/// Runs the children, measures the server once all are ready, and adds their reports up.
fn spawn_children(args: &Args, topics: &[String]) -> Result<(Held, Option<u64>, Kernel), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut children = Vec::new();
    for i in 0..args.processes {
        let child = Command::new(&exe)
            .arg("connect")
            .args(args.target.to_args())
            .args(["--connections", &args.connections.to_string(), "--topics", &args.topics.to_string()])
            .args(["--rate", &args.rate.to_string(), "--sources", &args.sources.to_string()])
            .args(["--processes", &args.processes.to_string(), "--child", &i.to_string()])
            .args(["--hold", &format!("{}ms", args.hold.as_millis())])
            .args(["--heartbeat", &format!("{}ms", args.heartbeat.as_millis())])
            .args(["--topic-ids", &topics.join(",")])
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn child: {e}"))?;
        children.push(child);
    }
    let mut readers: Vec<_> =
        children.iter_mut().map(|c| BufReader::new(c.stdout.take().expect("stdout is piped")).lines()).collect();
    for r in &mut readers {
        match r.next() {
            Some(Ok(line)) if line == "ready" => {}
            other => return Err(format!("a child failed before holding: {other:?}")),
        }
    }
    let rss_after = args.server_pid.and_then(rss_bytes);
    let kernel_after = Kernel::read();
    let mut held = Held::default();
    for (r, mut c) in readers.into_iter().zip(children) {
        let line = r.last().and_then(Result::ok).unwrap_or_default();
        let _ = c.wait();
        let v: sonic_rs::Value = sonic_rs::from_str(&line).map_err(|e| format!("child report {line:.80}: {e}"))?;
        use sonic_rs::{JsonContainerTrait, JsonValueTrait};
        let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        held.established += n("established") as usize;
        held.failed += n("failed") as usize;
        held.closed += n("closed") as usize;
        held.heartbeats_ok += n("heartbeats_ok");
        held.own_rss += n("own_rss");
        if held.first_error.is_none() {
            held.first_error = v.get("error").and_then(|e| e.as_str()).map(str::to_string);
        }
        if let Some(a) = v.get("join_us").and_then(|a| a.as_array()) {
            held.join_us.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32));
        }
    }
    Ok((held, rss_after, kernel_after))
}

/// Kernel memory figures, system-wide.
#[derive(Default, Clone, Copy)]
struct Kernel {
    tcp_buffers: Option<u64>,
    slab: Option<u64>,
}

impl Kernel {
    fn read() -> Kernel {
        Kernel { tcp_buffers: tcp_mem_bytes(), slab: slab_bytes() }
    }
}

/// Kernel slab memory (`/proc/meminfo` "Slab"): socket, file and inode objects of every
/// connection live there (system-wide, so both loopback ends and any other activity count).
fn slab_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("Slab:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Kernel memory of all TCP sockets' buffers (`/proc/net/sockstat` "TCP: ... mem N", in pages).
fn tcp_mem_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = s.lines().find(|l| l.starts_with("TCP:"))?;
    let mut it = line.split_whitespace();
    while let Some(word) = it.next() {
        if word == "mem" {
            return Some(it.next()?.parse::<u64>().ok()? * 4096);
        }
    }
    None
}

fn report(
    args: &Args,
    held: &Held,
    secs: f64,
    rss_before: Option<u64>,
    rss_after: Option<u64>,
    kernel_before: Kernel,
    kernel_after: Kernel,
) -> Result<(), String> {
    let [p50, p99, p999] = percentiles(held.join_us.clone());
    let n = held.established.max(1) as f64;
    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) => Some((a as f64 - b as f64) / n),
        _ => None,
    };
    let delta = |b: Option<u64>, a: Option<u64>| Some((a? as f64 - b? as f64) / n);
    let kernel_per = delta(kernel_before.tcp_buffers, kernel_after.tcp_buffers);
    let slab_per = delta(kernel_before.slab, kernel_after.slab);
    let opt = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.0}"));
    let optu = |v: Option<u64>| v.map_or("null".to_string(), |v| v.to_string());
    if args.json {
        println!(
            "{{\"scenario\":\"connect\",\"connections\":{},\"topics\":{},\"processes\":{},\"established\":{},\
             \"failed\":{},\"closed\":{},\"heartbeats_ok\":{},\"join_ms_p50\":{p50:.3},\"join_ms_p99\":{p99:.3},\
             \"join_ms_p999\":{p999:.3},\"warm\":{},\"server_rss_before\":{},\"server_rss_after\":{},\
             \"server_rss_per_conn\":{},\"kernel_tcp_buffer_bytes_per_conn\":{},\"kernel_slab_bytes_per_conn\":{},\"loadgen_rss\":{},\"secs\":{secs:.1},\
             \"error\":{}}}",
            args.connections,
            args.topics,
            args.processes,
            held.established,
            held.failed,
            held.closed,
            held.heartbeats_ok,
            args.warm,
            optu(rss_before),
            optu(rss_after),
            opt(per_conn),
            opt(kernel_per),
            opt(slab_per),
            held.own_rss,
            held.first_error.as_ref().map_or("null".to_string(), |e| format!("{e:?}")),
        );
    } else {
        println!(
            "connect: {} connections over {} topics in {} process(es), held {:.0} s",
            args.connections,
            args.topics,
            args.processes,
            args.hold.as_secs_f64()
        );
        println!(
            "  established {}, failed {}, closed by the server {}, heartbeats answered {}",
            held.established, held.failed, held.closed, held.heartbeats_ok
        );
        println!("  join latency ms p50 {p50:.3} p99 {p99:.3} p99.9 {p999:.3}");
        if let (Some(b), Some(a), Some(p)) = (rss_before, rss_after, per_conn) {
            println!(
                "  server RSS {:.1} MB -> {:.1} MB = {p:.0} B per connection (baseline after {} warm-up connections)",
                b as f64 / 1e6,
                a as f64 / 1e6,
                args.warm
            );
        }
        if let (Some(k), Some(s)) = (kernel_per, slab_per) {
            println!("  kernel per connection (both loopback ends): TCP buffers {k:.0} B, slab objects {s:.0} B");
        }
        println!("  load generator RSS {:.1} MB", held.own_rss as f64 / 1e6);
        if let Some(e) = &held.first_error {
            println!("  first error: {e}");
        }
    }
    if held.failed > 0 || held.closed > 0 {
        return Err(format!("{} connections failed, {} closed", held.failed, held.closed));
    }
    Ok(())
}
