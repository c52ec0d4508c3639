//! Scenario `rejoin`: what recovery on rejoin costs. Each of T topics gets an anchor message,
//! then `--missed` more; then `--clients` sockets (spread over the topics) join with
//! `last_seen_id` = their topic's anchor, one at a time (`--storm` off: the cost of one rejoin)
//! or all at once (`--storm`: a reconnect storm, as after a drain). Reports the time from each
//! join to its last recovered message (p50/p99/max), the whole run's time, the server's CPU
//! per rejoin, and checks that every client got exactly `--missed` messages, ids increasing.

use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::reactor::{self, Frame, Poller, Sock};
use crate::stats::{cpu_total, percentiles};
use crate::v2;
use crate::wire::Client;
use crate::Target;

/// Arguments of `nexus-load rejoin`.
#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    target: crate::Target,
    /// Topics (each with its own anchor and missed messages).
    #[arg(long, default_value_t = 1)]
    topics: usize,
    /// Messages each rejoining client missed.
    #[arg(long, default_value_t = 100)]
    missed: usize,
    /// Rejoining clients, spread round-robin over the topics.
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// All clients join at once (a reconnect storm) instead of one after the other.
    #[arg(long)]
    storm: bool,
    /// Source addresses 127.0.0.2 .. 127.0.0.(1+N) to spread the client ports over.
    #[arg(long, default_value_t = 20)]
    sources: u8,
    /// Server process ids (comma list), for the server CPU per rejoin.
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: Args) -> Result<(), String> {
    let addr = *args.target.addrs()?.first().ok_or("no --addr")?;
    if args.topics == 0 || args.clients == 0 || args.sources == 0 || args.clients > 19_000 {
        return Err("--topics, --clients (at most 19,000) and --sources must be at least 1".into());
    }
    let topics: Vec<String> = (0..args.topics).map(|_| args.target.topic(Uuid::new_v4())).collect();
    let mut anchors = Vec::new();
    for topic in &topics {
        anchors.push(prefill(addr, &args.target, topic, args.missed)?);
    }
    let mut socks = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let source = 2 + (i % args.sources as usize) as u8;
        socks.push(reactor::open(addr, source, &args.target.socket_path(Uuid::new_v4())?)?);
    }
    let cpu_before = cpu_total(&args.server_pid);
    let began = Instant::now();
    let mut latencies_us = Vec::with_capacity(args.clients);
    if args.storm {
        let joins: Vec<usize> = (0..args.clients).collect();
        latencies_us = rejoin(&mut socks, &joins, &topics, &anchors, args.missed)?;
    } else {
        for i in 0..args.clients {
            latencies_us.extend(rejoin(&mut socks, &[i], &topics, &anchors, args.missed)?);
            // Gone before the next one joins: each rejoin is measured alone, without the
            // presence traffic of a growing room.
            let _ = socks[i].stream.shutdown(std::net::Shutdown::Both);
        }
    }
    let elapsed = began.elapsed();
    let cpu_us = match (cpu_total(&args.server_pid), cpu_before) {
        (Some(after), Some(before)) => Some(after.saturating_sub(before).as_secs_f64() * 1e6 / args.clients as f64),
        _ => None,
    };
    let [p50, p99, _] = percentiles(latencies_us.clone());
    let max = latencies_us.iter().max().copied().unwrap_or(0) as f64 / 1000.0;
    let cpu = cpu_us.map_or("null".to_string(), |c| format!("{c:.0}"));
    if args.json {
        println!(
            "{{\"scenario\":\"rejoin\",\"topics\":{},\"missed\":{},\"clients\":{},\"storm\":{},\"secs\":{:.3},\
             \"last_recovered_ms_p50\":{p50:.3},\"last_recovered_ms_p99\":{p99:.3},\"last_recovered_ms_max\":{max:.3},\
             \"server_cpu_us_per_rejoin\":{cpu}}}",
            args.topics,
            args.missed,
            args.clients,
            args.storm,
            elapsed.as_secs_f64()
        );
    } else {
        println!(
            "rejoin: {} clients, {} missed each, {} topic(s), {}: all recovered in {:.3} s; join → last recovered \
             message p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms; server CPU {cpu} µs per rejoin",
            args.clients,
            args.missed,
            args.topics,
            if args.storm { "all at once" } else { "one at a time" },
            elapsed.as_secs_f64()
        );
    }
    Ok(())
}

/// Sends an anchor and then `missed` messages to `topic`; returns the anchor's id (its raw
/// JSON: a string or a number, as the server sends it).
fn prefill(addr: std::net::SocketAddr, target: &Target, topic: &str, missed: usize) -> Result<Vec<u8>, String> {
    let mut c = Client::connect(addr, &target.socket_path(Uuid::new_v4())?)?;
    c.join(topic, 1)?;
    c.send(format!(r#"["1","a","{topic}","new_msg",{{"body":"anchor"}}]"#))?;
    c.flush()?;
    c.set_timeout(Some(Duration::from_secs(30)));
    let anchor = loop {
        let t = c.recv_text()?.ok_or("prefill: no anchor broadcast within 30 s")?;
        let Some(h) = v2::head(t.as_bytes()) else { return Err(format!("not a V2 frame: {t:.80}")) };
        if h.is("new_msg") {
            break v2::get(h.payload, "id").ok_or("no id in the anchor's new_msg")?.to_vec();
        }
        if h.is("phx_reply") && !h.ok() {
            return Err(format!("the anchor was refused: {t:.200}"));
        }
    };
    for k in 0..missed {
        c.send(format!(r#"["1","m{k}","{topic}","new_msg",{{"body":"missed {k}"}}]"#))?;
    }
    c.flush()?;
    let mut acked = 0;
    while acked < missed {
        match c.recv()? {
            Some(f) if f.event == "phx_reply" && f.reference.as_deref().is_some_and(|r| r.starts_with('m')) => {
                if !f.ok {
                    return Err("a prefill message was refused (run the server with NEXUS_MSG_RATE=0)".into());
                }
                acked += 1;
            }
            Some(_) => {}
            None => return Err("prefill: no ack within 30 s".into()),
        }
    }
    Ok(anchor)
}

/// One rejoin's progress.
struct Progress {
    /// `new_msg` pushes received.
    count: usize,
    /// The id of the last one (raw JSON).
    last: Option<Vec<u8>>,
    /// When the join was sent.
    started: Instant,
    /// The join was answered.
    replied: bool,
    /// µs from the join to its last recovered message, once complete.
    done: Option<u32>,
}

/// Sends the recovering joins of `which` at once and waits until each has its `missed`
/// messages; returns each one's time from its join to its last recovered message, in µs.
fn rejoin(
    socks: &mut [Sock],
    which: &[usize],
    topics: &[String],
    anchors: &[Vec<u8>],
    missed: usize,
) -> Result<Vec<u32>, String> {
    let mut poller = Poller::new()?;
    let mut state: Vec<Progress> = Vec::with_capacity(which.len());
    for (slot, &i) in which.iter().enumerate() {
        let t = i % topics.len();
        poller.add(socks[i].fd(), slot)?;
        let anchor = String::from_utf8_lossy(&anchors[t]);
        let join = format!(r#"["1","1","{}","phx_join",{{"last_seen_id":{anchor}}}]"#, topics[t]);
        socks[i].send_text(join.as_bytes()).map_err(|e| format!("join: {e}"))?;
        state.push(Progress { count: 0, last: None, started: Instant::now(), replied: false, done: None });
    }
    let mut left = which.len();
    let mut scratch = vec![0u8; 256 * 1024];
    let deadline = Instant::now() + Duration::from_secs(120);
    while left > 0 {
        for slot in poller.wait(100) {
            let i = which[slot];
            let Progress { count, last, started, replied, done } = &mut state[slot];
            let mut failure = None;
            socks[i]
                .read(&mut scratch, |f| {
                    let Frame::Text(text) = f else { return };
                    let Some(h) = v2::head(text) else {
                        failure = Some(format!("not a V2 frame: {}", String::from_utf8_lossy(text)));
                        return;
                    };
                    if h.is("phx_reply") {
                        *replied = true;
                        let recovered = h.response().and_then(|r| v2::get(r, "recovered"));
                        if !h.ok() || recovered != Some(b"true") {
                            failure = Some(String::from_utf8_lossy(text).into_owned());
                        }
                    } else if h.is("new_msg") {
                        let Some(id) = v2::get(h.payload, "id") else {
                            failure = Some(format!("no id: {}", String::from_utf8_lossy(text)));
                            return;
                        };
                        if let Some(l) = last.as_deref().filter(|l| v2::id_order(id) <= v2::id_order(l)) {
                            let (id, l) = (String::from_utf8_lossy(id), String::from_utf8_lossy(l));
                            failure = Some(format!("ids out of order: {id} after {l}"));
                        }
                        *last = Some(id.to_vec());
                        *count += 1;
                    }
                })
                .map_err(|e| format!("read: {e}"))?;
            if let Some(f) = failure {
                return Err(format!("a rejoin was not recovered as expected: {f}"));
            }
            if *replied && *count >= missed && done.is_none() {
                *done = Some(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
                left -= 1;
            }
        }
        if Instant::now() > deadline {
            return Err(format!("{left} rejoins incomplete after 120 s"));
        }
    }
    for &i in which {
        poller.remove(socks[i].fd());
    }
    Ok(state.into_iter().filter_map(|s| s.done).collect())
}
