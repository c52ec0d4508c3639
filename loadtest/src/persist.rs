//! Scenario `persist`: closed-loop senders, one small room each (socket → writer → broadcast →
//! ack), optionally with a history reader beside them.
//!
//! For crash tests (`loadtest/crashloop.sh`): `--acked-log FILE` appends one line per
//! acknowledged `new_msg`, `<conversation_uuid> <message_uuid>`, for `nexus-load verify`. Nexus's
//! ok reply carries no id, so the id comes from the sender's own copy of the broadcast, which a
//! server sends before the ack (each sender is alone in its rooms; the body starts with the
//! message's ref, `<ref>-xxx…`, which names the message the broadcast is for, and makes every
//! body unique so that a duplicate stored under another id can be found). `--until-server-dies`
//! makes a closed or refused socket (the server was killed) end its sender cleanly: the log is
//! flushed, the summary counts such senders, and the run exits 0.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::stats::{cpu_total, percentiles};
use crate::wire::Client;
use crate::{v2, Target};

/// Arguments of `nexus-load persist`.
#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    target: crate::Target,
    /// Concurrent senders, each on its own socket.
    #[arg(long, default_value_t = 64)]
    senders: usize,
    /// Conversations, dealt out to the senders (each joins its share and sends to them in
    /// turn); default: one per sender. Raise the server's `NEXUS_MAX_CHANNELS` to at least
    /// topics / senders.
    #[arg(long)]
    topics: Option<usize>,
    /// Derive the conversation ids from this seed instead of at random, so one run can fill
    /// the very conversations a later run measures (steady state: rows and index pages exist).
    #[arg(long)]
    seed: Option<u64>,
    /// Messages each sender keeps in flight.
    #[arg(long, default_value_t = 8)]
    window: usize,
    /// Aggregate send rate in messages/s, spread evenly over the senders (open loop, still
    /// capped by the window); 0 = as fast as the window allows.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Measured duration (seconds or `10s`).
    #[arg(long, default_value = "10", value_parser = crate::parse_secs)]
    duration: Duration,
    /// Body size in bytes.
    #[arg(long, default_value_t = 100)]
    body_bytes: usize,
    /// Server process ids (a comma list: the nodes of a cluster, its Redis and database), for
    /// the server CPU per message, summed over them.
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Also read history in a loop on one topic and report its latency.
    #[arg(long)]
    history: bool,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
    /// Append `<conversation_uuid> <message_uuid>` for every acknowledged message to FILE
    /// (buffered per sender, flushed when it ends); bodies become `<ref>-xxx…`.
    #[arg(long, value_name = "FILE")]
    acked_log: Option<PathBuf>,
    /// A sender whose socket is closed, reset or refused (the server went away) ends cleanly
    /// instead of failing the run; for crash tests that kill the server mid-run.
    #[arg(long)]
    until_server_dies: bool,
}

#[derive(Default)]
struct SenderResult {
    acked: u64,
    errors: u64,
    broadcasts: u64,
    latencies_us: Vec<u32>,
    failure: Option<String>,
    /// Acked messages whose broadcast (hence id) was not seen first: missing from the log.
    unlogged: u64,
    /// Ended by the server going away (`--until-server-dies`): why.
    gone: Option<String>,
}

pub(crate) fn run(args: Args) -> Result<(), String> {
    let addrs = args.target.addrs()?;
    if args.senders == 0 || args.senders > 10_000 || args.window == 0 || args.window > 10_000 {
        return Err("--senders and --window must be 1..=10000".into());
    }
    let history_secret = match (args.history, &args.target.secret) {
        (false, _) => None,
        (true, Some(secret)) => Some(secret.clone()),
        (true, None) => {
            return Err("--history reads Nexus's HTTP history with a minted token: it needs --secret".into())
        }
    };
    let body = "x".repeat(args.body_bytes);
    let n_topics = args.topics.unwrap_or(args.senders);
    if n_topics < args.senders || n_topics > 1_000_000 {
        return Err("--topics must be from --senders to 1000000".into());
    }
    let topics: Vec<Uuid> = (0..n_topics as u64)
        .map(|i| args.seed.map_or_else(Uuid::new_v4, |seed| Uuid::from_u64_pair(seed, i)))
        .collect();
    let acked_log = match &args.acked_log {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("--acked-log {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let start = Arc::new(Barrier::new(args.senders + 1));
    let mut handles = Vec::new();
    for (i, share) in deal(&topics, args.senders).into_iter().enumerate() {
        let addr = addrs[i % addrs.len()];
        let (target, body, start) = (args.target.clone(), body.clone(), start.clone());
        let (window, duration) = (args.window, args.duration);
        // Each sender's share of the rate, as the gap between its sends.
        let gap = (args.rate > 0).then(|| Duration::from_secs_f64(args.senders as f64 / args.rate as f64));
        // Every sender appends whole lines to the one O_APPEND file through its own buffer.
        let log = match &acked_log {
            Some(f) => Some(BufWriter::with_capacity(64 * 1024, f.try_clone().map_err(|e| e.to_string())?)),
            None => None,
        };
        let pace = Pace { window, gap, duration, log, until_server_dies: args.until_server_dies };
        handles.push(std::thread::spawn(move || sender(addr, &target, &share, &body, pace, &start)));
    }
    let history = history_secret.map(|secret| {
        let (topic, duration, addr) = (topics[0], args.duration, addrs[0]);
        std::thread::spawn(move || history_reader(addr, &secret, topic, duration))
    });
    start.wait();
    let cpu_before = cpu_total(&args.server_pid);
    let began = Instant::now();
    let results: Vec<SenderResult> = handles.into_iter().map(|h| h.join().unwrap_or_default()).collect();
    let elapsed = began.elapsed().as_secs_f64();
    let cpu = match (cpu_total(&args.server_pid), cpu_before) {
        (Some(after), Some(before)) => Some(after.saturating_sub(before)),
        _ => None,
    };
    let history = history.map(|h| h.join().unwrap_or_default());
    report(&args, &results, elapsed, cpu, history)
}

fn report(
    args: &Args,
    results: &[SenderResult],
    elapsed: f64,
    cpu: Option<Duration>,
    history: Option<Vec<u32>>,
) -> Result<(), String> {
    let acked: u64 = results.iter().map(|r| r.acked).sum();
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    let broadcasts: u64 = results.iter().map(|r| r.broadcasts).sum();
    let failures: Vec<&String> = results.iter().filter_map(|r| r.failure.as_ref()).collect();
    let gone: Vec<&String> = results.iter().filter_map(|r| r.gone.as_ref()).collect();
    let unlogged: u64 = results.iter().map(|r| r.unlogged).sum();
    let [p50, p99, p999] = percentiles(results.iter().flat_map(|r| r.latencies_us.iter().copied()).collect());
    let cpu_us = cpu.map(|c| c.as_secs_f64() * 1e6 / acked.max(1) as f64);
    let [h50, h99, _] = percentiles(history.clone().unwrap_or_default());
    let rate = acked as f64 / elapsed;
    if args.json {
        println!(
            "{{\"scenario\":\"persist\",\"senders\":{},\"window\":{},\"rate\":{},\"secs\":{elapsed:.2},\"acked\":{acked},\
             \"acks_per_s\":{rate:.0},\"errors\":{errors},\"lost_broadcasts\":{},\"ack_ms_p50\":{p50:.3},\
             \"ack_ms_p99\":{p99:.3},\"ack_ms_p999\":{p999:.3},\"server_cpu_us_per_msg\":{},\
             \"history_reads\":{},\"history_ms_p50\":{h50:.3},\"history_ms_p99\":{h99:.3},\"failed_senders\":{},\
             \"senders_ended_by_server_gone\":{},\"acked_unlogged\":{unlogged}}}",
            args.senders,
            args.window,
            args.rate,
            acked.saturating_sub(broadcasts),
            cpu_us.map_or("null".into(), |c| format!("{c:.2}")),
            history.as_ref().map_or(0, Vec::len),
            failures.len(),
            gone.len()
        );
    } else {
        println!("persist: {} senders x window {} for {elapsed:.1} s", args.senders, args.window);
        println!(
            "  acked {acked} ({rate:.0}/s), errors {errors}, own broadcasts missing {}",
            acked.saturating_sub(broadcasts)
        );
        println!("  ack latency ms p50 {p50:.3} p99 {p99:.3} p99.9 {p999:.3}");
        if let Some(c) = cpu_us {
            println!("  server CPU {c:.2} µs per acknowledged message");
        }
        if let Some(h) = &history {
            println!("  history reads {} p50 {h50:.3} ms p99 {h99:.3} ms", h.len());
        }
        for f in &failures {
            println!("  sender failed: {f}");
        }
        if let Some(first) = gone.first() {
            println!("  {} senders ended as the server went away (first: {first})", gone.len());
        }
        if args.acked_log.is_some() {
            println!("  acked-log: {} lines, {unlogged} acks without their broadcast (not logged)", acked - unlogged);
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{} senders failed", failures.len()))
    }
}

/// How one sender sends: at most `window` in flight, one every `gap` if paced, for `duration`;
/// where its acks are logged and whether the server going away ends it cleanly.
struct Pace {
    window: usize,
    gap: Option<Duration>,
    duration: Duration,
    log: Option<BufWriter<File>>,
    until_server_dies: bool,
}

/// Whether a client error says the server went away (killed: connection refused, reset, closed
/// without a close frame, or closed with 1001 "going away") rather than that it closed the socket
/// for a reason of its own (rate limit, slow consumer) or misbehaved. Matches the texts of
/// `std::io` and tungstenite errors.
fn server_gone(e: &str) -> bool {
    const GONE: [&str; 8] = [
        "Connection refused",
        "Connection reset",
        "Broken pipe",
        "code: Away",
        "Connection closed normally",
        "closed connection",
        "end of file",
        "Connection aborted",
    ];
    GONE.iter().any(|g| e.contains(g))
}

/// Sender `i` gets topics `i`, `i + senders`, … (each topic to one sender).
fn deal(topics: &[Uuid], senders: usize) -> Vec<Vec<Uuid>> {
    (0..senders).map(|i| topics.iter().skip(i).step_by(senders).copied().collect()).collect()
}

fn sender(addr: SocketAddr, target: &Target, topics: &[Uuid], body: &str, pace: Pace, start: &Barrier) -> SenderResult {
    let (mut log, until_server_dies) = (pace.log, pace.until_server_dies);
    let mut out = send_loop(addr, target, topics, body, (pace.window, pace.gap, pace.duration), log.as_mut(), start);
    if let Some(Err(e)) = log.as_mut().map(BufWriter::flush) {
        out.failure.get_or_insert(format!("--acked-log: {e}"));
    }
    if until_server_dies && out.failure.as_deref().is_some_and(server_gone) {
        out.gone = out.failure.take();
    }
    out
}

/// One acknowledged message as a log line: `<conversation> <id>\n`.
fn log_ack(log: &mut BufWriter<File>, conversation: Uuid, id: Uuid) -> Result<(), String> {
    let mut line = [0u8; 74];
    conversation.hyphenated().encode_lower(&mut line[..36]);
    line[36] = b' ';
    id.hyphenated().encode_lower(&mut line[37..73]);
    line[73] = b'\n';
    log.write_all(&line).map_err(|e| format!("--acked-log: {e}"))
}

/// The ref a tagged body (`<ref>-xxx…`) starts with.
fn body_ref(text: &[u8]) -> Option<u64> {
    let end = text.iter().position(|&b| b == b'-')?;
    std::str::from_utf8(&text[..end]).ok()?.parse().ok()
}

fn send_loop(
    addr: SocketAddr,
    target: &Target,
    topics: &[Uuid],
    body: &str,
    (window, gap, duration): (usize, Option<Duration>, Duration),
    mut log: Option<&mut BufWriter<File>>,
    start: &Barrier,
) -> SenderResult {
    let mut out = SenderResult::default();
    let setup = target.socket_path(Uuid::new_v4()).and_then(|p| Client::connect(addr, &p)).and_then(|mut c| {
        for (i, topic) in topics.iter().enumerate() {
            c.join(&target.topic(topic), i + 1)?;
        }
        Ok(c)
    });
    start.wait();
    let mut client = match setup {
        Ok(c) => c,
        Err(e) => {
            out.failure = Some(e);
            return out;
        }
    };
    const WAIT_MAX: Duration = Duration::from_millis(200);
    let mut timeout = WAIT_MAX;
    client.set_timeout(Some(timeout));
    // Message n goes to the sender's topics in turn, under that channel's join ref.
    // With an acked log the body starts with the ref (see the module doc).
    let tagged = log.is_some();
    let frame = |n: u64| {
        let i = n as usize % topics.len();
        let tag = if tagged { format!("{n}-") } else { String::new() };
        format!(r#"["{}","{n}","{}","new_msg",{{"body":"{tag}{body}"}}]"#, i + 1, target.topic(topics[i]))
    };
    // In flight: ref, when it was due or sent, and (logging) the id its broadcast carried.
    let mut inflight: VecDeque<(u64, Instant, Option<Uuid>)> = VecDeque::with_capacity(window);
    let (mut next, began) = (2u64, Instant::now());
    // Paced: the next send is due at `due`; a late sender catches up at once (open loop).
    let mut due = began;
    let hard_stop = began + duration + Duration::from_secs(10);
    loop {
        let sending = began.elapsed() < duration;
        // Closed loop: refill once half the window is acknowledged, so sends go out in
        // bursts (one write for many frames, like a client flushing a queue) rather than one
        // syscall per ack; paced: whenever a send is due.
        let refill = gap.is_some() || inflight.len() <= window / 2;
        if sending && refill {
            while inflight.len() < window && Instant::now() >= due {
                if let Err(e) = client.send(frame(next)) {
                    out.failure = Some(e);
                    return out;
                }
                // The latency counts from when the message was due, not from when a full
                // window let it go (coordinated omission).
                let sent_at = if gap.is_some() { due } else { Instant::now() };
                inflight.push_back((next, sent_at, None));
                next += 1;
                if let Some(gap) = gap {
                    due += gap;
                }
            }
            if gap.is_some() {
                // Wake in time for the next due send. A timeout set earlier is kept unless it
                // is too long for that or far too short (a syscall per frame cost the load
                // generator as much CPU as the server spent on the message).
                let wait = due.saturating_duration_since(Instant::now()).clamp(Duration::from_micros(100), WAIT_MAX);
                if wait < timeout || wait > 4 * timeout {
                    timeout = wait;
                    client.set_timeout(Some(wait));
                }
            }
            if let Err(e) = client.flush() {
                out.failure = Some(e);
                return out;
            }
        } else if !sending && (inflight.is_empty() || Instant::now() > hard_stop) {
            return out;
        }
        let text = match client.recv_text() {
            Ok(Some(t)) => t,
            Ok(None) => continue,
            Err(e) => {
                out.failure = Some(e);
                return out;
            }
        };
        let Some(f) = v2::head(text.as_bytes()) else {
            out.failure = Some(format!("not a V2 frame: {:.80}", text.as_str()));
            return out;
        };
        if f.is("new_msg") {
            out.broadcasts += 1;
            if tagged {
                // Our own broadcast: its body names the ref, and it carries the id.
                let id = v2::get_str(f.payload, "id").and_then(|s| Uuid::try_parse_ascii(s.raw()).ok());
                let n = v2::message_text(f.payload).and_then(|t| body_ref(t.raw()));
                if let (Some(id), Some(n)) = (id, n) {
                    if let Some(entry) = inflight.iter_mut().find(|(m, _, _)| *m == n) {
                        entry.2 = Some(id);
                    }
                }
            }
        } else if f.is("phx_reply") {
            let Some(pos) = f.ref_u64().and_then(|r| inflight.iter().position(|(n, _, _)| *n == r)) else {
                continue;
            };
            let Some((n, sent, id)) = inflight.remove(pos) else { continue };
            if f.ok() {
                out.acked += 1;
                out.latencies_us.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                if let Some(log) = log.as_deref_mut() {
                    match id {
                        Some(id) => {
                            if let Err(e) = log_ack(log, topics[n as usize % topics.len()], id) {
                                out.failure = Some(e);
                                return out;
                            }
                        }
                        None => out.unlogged += 1,
                    }
                }
            } else {
                out.errors += 1;
            }
        }
    }
}

/// Reads the newest history page of `topic` in a loop; returns latencies in µs.
fn history_reader(addr: SocketAddr, secret: &str, topic: Uuid, duration: Duration) -> Vec<u32> {
    let Ok(token) = crate::wire::token(secret, Uuid::new_v4()) else { return Vec::new() };
    let request = format!(
        "GET /api/conversations/{topic}/messages?limit=50 HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    let mut out = Vec::new();
    let began = Instant::now();
    let mut buf = Vec::with_capacity(64 * 1024);
    while began.elapsed() < duration {
        let t = Instant::now();
        let Ok(mut s) = TcpStream::connect(addr) else { break };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        buf.clear();
        if s.write_all(request.as_bytes()).is_err()
            || s.read_to_end(&mut buf).is_err()
            || !buf.starts_with(b"HTTP/1.1 200")
        {
            break;
        }
        out.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_server_is_told_from_a_closing_one() {
        for gone in [
            "connect 127.0.0.1:1: Connection refused (os error 111)",
            "IO error: Connection reset by peer (os error 104)",
            "WebSocket protocol error: Connection reset without closing handshake",
            "closed by server: Some(CloseFrame { code: Away, reason: Utf8Bytes(b\"\") })",
        ] {
            assert!(server_gone(gone), "{gone}");
        }
        assert!(!server_gone(
            "closed by server: Some(CloseFrame { code: Policy, reason: Utf8Bytes(b\"rate limited\") })"
        ));
        assert!(!server_gone("join chat:x refused"));
        assert_eq!(body_ref(b"42-xxxx"), Some(42));
        assert_eq!(body_ref(b"xxxx"), None);
    }
}
