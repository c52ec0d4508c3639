//! Scenario `storm`: N members join one topic as fast as the client can send the joins, and
//! every member reads everything the server sends. Reports presence traffic (frames and bytes
//! delivered to members) and the wall time until the last byte arrived, for comparing
//! `NEXUS_PRESENCE_BATCH_MS=0` (one diff per join: O(N²) frames) with coalescing.
//!
//! One thread reads all sockets with epoll and counts WebSocket frames per socket; the run ends
//! when nothing arrived for `--quiet` after the last join was sent (bounded by `--timeout`).
//! It also reports how long each member waited from its join to its `presence_state` (the
//! first frame whose head says `presence_state` with the member's join_ref: Nexus sends it right
//! after the join reply, Phoenix may send a `presence_diff` first); with `--interval` the joins
//! are paced, one per interval, which measures that wait in a quiet room. Until a member has its
//! state, the first bytes of each frame it receives are kept and read (`v2::head`); after that
//! frames are only counted.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::reactor;
use crate::v2;

/// Arguments of `nexus-load storm`.
#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    target: crate::Target,
    /// Members joining the one topic.
    #[arg(long, default_value_t = 10_000)]
    members: usize,
    /// Source addresses 127.0.0.2 .. 127.0.0.(1+N) to spread the client ports over.
    #[arg(long, default_value_t = 20)]
    sources: u8,
    /// End when nothing arrived for this long after the last join.
    #[arg(long, default_value = "1", value_parser = crate::parse_secs)]
    quiet: Duration,
    /// Hard bound on the whole storm.
    #[arg(long, default_value = "300", value_parser = crate::parse_secs)]
    timeout: Duration,
    /// Time between joins, in ms (0: as fast as the client can send them, 64 at a time).
    #[arg(long, default_value_t = 0)]
    interval: u64,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
}

/// Bytes of a frame's start kept to read its head (join_ref, ref, topic, event).
const HEAD_BYTES: usize = 512;

/// Per-socket frame counter: bytes left in the current frame, or a partial header.
#[derive(Default)]
struct Counter {
    header: Vec<u8>,
    left: u64,
    frames: u64,
    bytes: u64,
    closed: bool,
    /// This member's join_ref.
    join_ref: String,
    /// When the join was sent.
    joined: Option<Instant>,
    /// When this join's `presence_state` arrived (its head was read).
    state: Option<Instant>,
    /// The start of the current frame, kept until the state arrived.
    start: Vec<u8>,
    /// How much of the current frame's start to keep before reading it.
    want: usize,
}

impl Counter {
    fn feed(&mut self, mut data: &[u8], now: Instant) {
        self.bytes += data.len() as u64;
        while !data.is_empty() {
            if self.left > 0 {
                let n = (self.left as usize).min(data.len());
                if self.want > self.start.len() {
                    let keep = (self.want - self.start.len()).min(n);
                    self.start.extend_from_slice(&data[..keep]);
                    if self.start.len() == self.want {
                        self.read_head(now);
                    }
                }
                self.left -= n as u64;
                data = &data[n..];
                continue;
            }
            self.header.push(data[0]);
            data = &data[1..];
            let h = &self.header;
            let need = match h.get(1).map(|b| b & 0x7f) {
                None => continue,
                Some(126) => 4,
                Some(127) => 10,
                Some(_) => 2,
            };
            if h.len() < need {
                continue;
            }
            self.left = match need {
                4 => u16::from_be_bytes([h[2], h[3]]) as u64,
                10 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
                _ => (h[1] & 0x7f) as u64,
            };
            self.frames += 1;
            self.header.clear();
            self.start.clear();
            self.want = if self.state.is_some() { 0 } else { (self.left as usize).min(HEAD_BYTES) };
        }
    }

    /// Reads the head of the current frame's start: is it this join's `presence_state`?
    fn read_head(&mut self, now: Instant) {
        let state = v2::head(&self.start)
            .is_some_and(|h| h.is("presence_state") && h.join_ref.is_some_and(|j| j.is(&self.join_ref)));
        if state && self.state.is_none() {
            self.state = Some(now);
        }
        self.want = 0;
    }
}

pub(crate) fn run(args: Args) -> Result<(), String> {
    let addr = crate::loopback(&args.target.addr)?;
    if args.members == 0 || args.members > 19_000 || args.sources == 0 || args.sources > 250 {
        return Err("--members must be 1..=19000 (one process's descriptors) and --sources 1..=250".into());
    }
    let topic = args.target.topic(Uuid::new_v4());
    let mut socks = Vec::with_capacity(args.members);
    for i in 0..args.members {
        let path = args.target.socket_path(Uuid::new_v4())?;
        socks.push(reactor::open(addr, 2 + (i % args.sources as usize) as u8, &path)?.stream);
    }
    // SAFETY: plain epoll syscalls on descriptors we own; events buffer sized below.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err("epoll_create1 failed".into());
    }
    for (i, s) in socks.iter().enumerate() {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: i as u64 };
        // SAFETY: valid epoll fd, socket fd and event pointer.
        if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) } != 0 {
            return Err("epoll_ctl failed".into());
        }
    }
    let mut counters: Vec<Counter> =
        (0..socks.len()).map(|i| Counter { join_ref: i.to_string(), ..Counter::default() }).collect();
    let join = |i: usize| {
        let mut frame = Vec::new();
        reactor::masked_text(format!(r#"["{i}","{i}","{topic}","phx_join",{{}}]"#).as_bytes(), &mut frame);
        frame
    };
    let started = Instant::now();
    let interval = Duration::from_millis(args.interval);
    let mut next_join = 0;
    let mut last_byte = started;
    let mut buf = vec![0u8; 256 * 1024];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    loop {
        // Send joins in slices so reading keeps up (members' queues are bounded server-side),
        // or one per interval.
        let until = if interval.is_zero() {
            (next_join + 64).min(socks.len())
        } else {
            let due = (started.elapsed().as_nanos() / interval.as_nanos()) as usize + 1;
            due.min(socks.len())
        };
        while next_join < until {
            socks[next_join].write_all(&join(next_join)).map_err(|e| format!("join {next_join}: {e}"))?;
            counters[next_join].joined = Some(Instant::now());
            next_join += 1;
        }
        let all_sent = next_join == socks.len();
        let wait_ms = match (all_sent, interval.is_zero()) {
            (true, _) => 50,
            (false, true) => 0,
            (false, false) => 1,
        };
        // SAFETY: events has room for its length.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, wait_ms) };
        for ev in events.iter().take(n.max(0) as usize) {
            let i = ev.u64 as usize;
            loop {
                match socks[i].read(&mut buf) {
                    Ok(0) => {
                        counters[i].closed = true;
                        // SAFETY: removing a registered descriptor.
                        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_DEL, socks[i].as_raw_fd(), std::ptr::null_mut()) };
                        break;
                    }
                    Ok(k) => {
                        last_byte = Instant::now();
                        counters[i].feed(&buf[..k], last_byte);
                    }
                    Err(_) => break,
                }
            }
        }
        if all_sent && last_byte.elapsed() >= args.quiet {
            break;
        }
        if started.elapsed() > args.timeout {
            return Err(format!("storm did not settle within {:?}", args.timeout));
        }
    }
    let secs = (last_byte - started).as_secs_f64();
    let frames: u64 = counters.iter().map(|c| c.frames).sum();
    let bytes: u64 = counters.iter().map(|c| c.bytes).sum();
    let closed = counters.iter().filter(|c| c.closed).count();
    // Every member must at least have its join reply and its presence_state.
    let min_frames = counters.iter().map(|c| c.frames).min().unwrap_or(0);
    let with_state = counters.iter().filter(|c| c.state.is_some()).count();
    let mut waits: Vec<f64> =
        counters.iter().filter_map(|c| Some((c.state? - c.joined?).as_secs_f64() * 1e3)).collect();
    waits.sort_by(f64::total_cmp);
    let pct = |p: f64| waits.get(((waits.len() as f64 * p) as usize).min(waits.len().saturating_sub(1))).copied();
    let (p50, p99, max) = (pct(0.50).unwrap_or(f64::NAN), pct(0.99).unwrap_or(f64::NAN), pct(1.0).unwrap_or(f64::NAN));
    if args.json {
        println!(
            "{{\"scenario\":\"storm\",\"members\":{},\"interval_ms\":{},\"frames\":{frames},\"bytes\":{bytes},\"secs\":{secs:.2},\"closed\":{closed},\"min_frames_per_member\":{min_frames},\"with_state\":{with_state},\"state_ms_p50\":{p50:.3},\"state_ms_p99\":{p99:.3},\"state_ms_max\":{max:.3}}}",
            args.members, args.interval
        );
    } else {
        println!("storm: {} members joined one topic", args.members);
        println!(
            "  delivered {frames} frames, {:.1} MB, last byte after {secs:.2} s, {closed} closed by the server",
            bytes as f64 / 1e6
        );
        println!(
            "  join -> presence_state ({with_state} of {} members got theirs): p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms",
            args.members
        );
    }
    Ok(())
}
