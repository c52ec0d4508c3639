//! Scenario `churn`: C clients over T topics join, leave, drop their sockets and reconnect at a
//! given rate while every joined client keeps its own presence view from `presence_state` and
//! `presence_diff` (the way the Phoenix JS `Presence` helper does: diffs that arrive before the
//! current join's `presence_state`, as Phoenix may send them, wait and are applied after it;
//! Nexus sends the state first). When the churn stops, every
//! joined client's view must converge to the truth the generator knows: for its topic, each
//! user with exactly as many metas as that user has joined sockets. Users are shared by two
//! clients each, so multi-meta users are covered.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use sonic_rs::{JsonContainerTrait, JsonValueTrait};
use uuid::Uuid;

use crate::reactor::{self, Frame, Poller, Sock};

/// Arguments of `nexus-load churn`.
#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    target: crate::Target,
    /// Clients (two share each user id).
    #[arg(long, default_value_t = 200)]
    clients: usize,
    /// Topics, round-robin over the clients.
    #[arg(long, default_value_t = 4)]
    topics: usize,
    /// Actions (join, leave, drop, reconnect) per second.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// How long to churn.
    #[arg(long, default_value = "10", value_parser = crate::parse_secs)]
    duration: Duration,
    /// How long the views may take to converge once the churn stops.
    #[arg(long, default_value = "10", value_parser = crate::parse_secs)]
    settle: Duration,
    /// Seed for the action sequence.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
}

/// user → phx_refs of that user's metas.
pub(crate) type View = HashMap<String, HashSet<String>>;

struct Client {
    user: Uuid,
    topic: usize,
    sock: Option<Sock>,
    /// The join_ref of the current join (sent, maybe not yet answered).
    join_ref: Option<u64>,
    /// The current join was answered ok.
    joined: bool,
    /// The presence view; `None` until this join's `presence_state` arrived.
    view: Option<View>,
    /// `presence_diff`s that arrived for this join before its `presence_state`, in order.
    early: Vec<sonic_rs::Value>,
    /// The ref of a `phx_leave` not yet answered: diffs until its reply are the old join's.
    leaving: Option<u64>,
}

#[derive(Default)]
struct Counts {
    joins: u64,
    leaves: u64,
    drops: u64,
    reconnects: u64,
    refused: u64,
}

/// splitmix64: a reproducible action sequence without a dependency.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// splitmix64's finaliser.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub(crate) fn run(args: Args) -> Result<(), String> {
    let addr = crate::loopback(&args.target.addr)?;
    if args.clients < 2 || args.clients > 10_000 || args.topics == 0 || args.rate == 0 {
        return Err("--clients must be 2..=10000, --topics and --rate at least 1".into());
    }
    let topics: Vec<String> = (0..args.topics).map(|_| args.target.topic(Uuid::new_v4())).collect();
    let users: Vec<Uuid> = (0..args.clients.div_ceil(2)).map(|_| Uuid::new_v4()).collect();
    let mut clients: Vec<Client> = (0..args.clients)
        .map(|i| Client {
            user: users[i / 2],
            topic: i % args.topics,
            sock: None,
            join_ref: None,
            joined: false,
            view: None,
            early: Vec::new(),
            leaving: None,
        })
        .collect();
    let mut poller = Poller::new()?;
    let mut rng = Rng(args.seed);
    let mut counts = Counts::default();
    let mut next_ref = 1u64;
    let mut scratch = vec![0u8; 256 * 1024];
    let connect = |c: &mut Client, i: usize, poller: &Poller| -> Result<(), String> {
        let sock = reactor::open(addr, 2 + (i % 20) as u8, &args.target.socket_path(c.user)?)?;
        poller.add(sock.fd(), i)?;
        (c.sock, c.leaving) = (Some(sock), None);
        Ok(())
    };
    let send_join = |c: &mut Client, next_ref: &mut u64, topics: &[String]| -> Result<(), String> {
        let r = *next_ref;
        *next_ref += 1;
        let frame = format!(r#"["{r}","{r}","{}","phx_join",{{}}]"#, topics[c.topic]);
        c.sock.as_mut().ok_or("not connected")?.send_text(frame.as_bytes()).map_err(|e| e.to_string())?;
        (c.join_ref, c.joined, c.view) = (Some(r), false, None);
        c.early.clear();
        Ok(())
    };

    let started = Instant::now();
    let mut done_actions = 0u64;
    while started.elapsed() < args.duration {
        let due = (started.elapsed().as_secs_f64() * args.rate as f64) as u64;
        while done_actions < due {
            done_actions += 1;
            let i = (rng.next() % clients.len() as u64) as usize;
            let roll = rng.next() % 10;
            let c = &mut clients[i];
            match (&c.sock, c.join_ref) {
                (None, _) => {
                    connect(c, i, &poller)?;
                    send_join(c, &mut next_ref, &topics)?;
                    counts.reconnects += 1;
                }
                (Some(_), None) => {
                    send_join(c, &mut next_ref, &topics)?;
                    counts.joins += 1;
                }
                (Some(_), Some(jr)) if roll < 6 => {
                    let frame = format!(r#"["{jr}","{}","{}","phx_leave",{{}}]"#, next_ref, topics[c.topic]);
                    if let Some(s) = c.sock.as_mut() {
                        s.send_text(frame.as_bytes()).map_err(|e| e.to_string())?;
                    }
                    (c.join_ref, c.joined, c.view, c.leaving) = (None, false, None, Some(next_ref));
                    c.early.clear();
                    next_ref += 1;
                    counts.leaves += 1;
                }
                (Some(_), Some(_)) => {
                    if let Some(s) = c.sock.take() {
                        poller.remove(s.fd());
                    }
                    (c.join_ref, c.joined, c.view) = (None, false, None);
                    c.early.clear();
                    counts.drops += 1;
                }
            }
        }
        read_round(&mut clients, &mut poller, &mut scratch, &mut counts, 5)?;
    }
    // Settle: no more actions; wait for the views to match the truth.
    let settling = Instant::now();
    let mut mismatched = usize::MAX;
    while settling.elapsed() < args.settle {
        read_round(&mut clients, &mut poller, &mut scratch, &mut counts, 20)?;
        mismatched = mismatches(&clients, &topics);
        if mismatched == 0 {
            break;
        }
    }
    let settle_ms = settling.elapsed().as_secs_f64() * 1000.0;
    let joined = clients.iter().filter(|c| c.joined).count();
    if args.json {
        println!(
            "{{\"scenario\":\"churn\",\"clients\":{},\"topics\":{},\"rate\":{},\"secs\":{:.1},\"joins\":{},\"leaves\":{},\
             \"drops\":{},\"reconnects\":{},\"refused\":{},\"joined_at_end\":{joined},\"mismatched_views\":{mismatched},\
             \"converged_ms\":{settle_ms:.0}}}",
            args.clients,
            args.topics,
            args.rate,
            args.duration.as_secs_f64(),
            counts.joins,
            counts.leaves,
            counts.drops,
            counts.reconnects,
            counts.refused
        );
    } else {
        println!(
            "churn: {} clients over {} topics, {} actions/s for {:.0} s (seed {})",
            args.clients,
            args.topics,
            args.rate,
            args.duration.as_secs_f64(),
            args.seed
        );
        println!(
            "  joins {}, leaves {}, drops {}, reconnects {}, refused {}",
            counts.joins, counts.leaves, counts.drops, counts.reconnects, counts.refused
        );
        if mismatched == 0 {
            println!("  all {joined} joined clients' presence views match the truth {settle_ms:.0} ms after the churn stopped");
        } else {
            println!(
                "  {mismatched} of {joined} joined clients' views still differ from the truth after {settle_ms:.0} ms"
            );
        }
    }
    if counts.refused > 0 || mismatched != 0 {
        return Err("presence did not converge (or joins were refused)".into());
    }
    Ok(())
}

/// Reads every ready socket and applies replies and presence frames to the clients.
fn read_round(
    clients: &mut [Client],
    poller: &mut Poller,
    scratch: &mut [u8],
    counts: &mut Counts,
    wait_ms: i32,
) -> Result<(), String> {
    for i in poller.wait(wait_ms) {
        let c = &mut clients[i];
        let Some(sock) = c.sock.as_mut() else { continue };
        let mut frames = Vec::new();
        let _ = sock.read(scratch, |f| {
            if let Frame::Text(t) = f {
                frames.push(t.to_vec());
            }
        });
        if sock.closed {
            return Err(format!("the server closed client {i}'s socket"));
        }
        for f in frames {
            apply(c, &f, counts)?;
        }
    }
    Ok(())
}

/// One server frame for a client: its join reply, its presence_state, a presence_diff, or the
/// reply to its leave. A diff before the current join's state waits for it (phoenix.js does the
/// same); diffs while no join is current, or before the reply to a leave, belong to an old join
/// and are dropped.
fn apply(c: &mut Client, frame: &[u8], counts: &mut Counts) -> Result<(), String> {
    let v: sonic_rs::Value = sonic_rs::from_slice(frame).map_err(|e| format!("bad frame: {e}"))?;
    let Some(a) = v.as_array() else { return Err("frame is not an array".into()) };
    let num = |i: usize| a.get(i).and_then(|x| x.as_str()).and_then(|s| s.parse::<u64>().ok());
    let (join_ref, reference) = (num(0), num(1));
    let event = a.get(3).and_then(|x| x.as_str()).unwrap_or_default();
    let Some(payload) = a.get(4) else { return Ok(()) };
    let current = c.join_ref.is_some() && join_ref == c.join_ref;
    match event {
        "phx_reply" if reference.is_some() && reference == c.leaving => c.leaving = None,
        "phx_reply" if current && reference == c.join_ref => {
            if payload.get("status").and_then(|s| s.as_str()) == Some("ok") {
                c.joined = true;
            } else {
                counts.refused += 1;
            }
        }
        "presence_state" if current => {
            let mut view = View::new();
            merge(&mut view, payload, true);
            for diff in std::mem::take(&mut c.early) {
                apply_diff(&mut view, &diff);
            }
            c.view = Some(view);
        }
        "presence_diff" => match c.view.as_mut() {
            Some(view) => apply_diff(view, payload),
            None if c.join_ref.is_some() && c.leaving.is_none() => c.early.push(payload.clone()),
            None => {}
        },
        _ => {}
    }
    Ok(())
}

/// Applies one `presence_diff` payload: its joins, then its leaves.
pub(crate) fn apply_diff(view: &mut View, diff: &sonic_rs::Value) {
    if let Some(joins) = diff.get("joins") {
        merge(view, joins, true);
    }
    if let Some(leaves) = diff.get("leaves") {
        merge(view, leaves, false);
    }
}

/// Adds (or removes) the metas of `{user: {"metas": [{"phx_ref": ..}, ..]}, ..}`.
pub(crate) fn merge(view: &mut View, users: &sonic_rs::Value, add: bool) {
    let Some(obj) = users.as_object() else { return };
    for (user, entry) in obj.iter() {
        let refs = entry.get("metas").and_then(|m| m.as_array());
        for meta in refs.into_iter().flat_map(|m| m.iter()) {
            let Some(r) = meta.get("phx_ref").and_then(|r| r.as_str()) else { continue };
            let set = view.entry(user.to_string()).or_default();
            if add {
                set.insert(r.to_string());
            } else {
                set.remove(r);
            }
        }
        if view.get(user).is_some_and(HashSet::is_empty) {
            view.remove(user);
        }
    }
}

/// Joined clients whose view differs from the truth (user → joined sockets, per topic).
fn mismatches(clients: &[Client], topics: &[String]) -> usize {
    let mut truth: Vec<HashMap<String, usize>> = vec![HashMap::new(); topics.len()];
    for c in clients.iter().filter(|c| c.joined) {
        *truth[c.topic].entry(c.user.to_string()).or_default() += 1;
    }
    clients
        .iter()
        .filter(|c| c.joined)
        .filter(|c| {
            let Some(view) = &c.view else { return true };
            let counts: HashMap<String, usize> = view.iter().map(|(u, refs)| (u.clone(), refs.len())).collect();
            counts != truth[c.topic]
        })
        .count()
}
