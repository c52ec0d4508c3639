//! The writer thread: take one request, drain what else is queued up to a batch cap, stamp,
//! commit once, hand the batch to the cores once. Group commit: the busier it is, the bigger
//! the batches and the cheaper each message.
//!
//! A store that takes concurrent transactions (PostgreSQL) gets several writer *lanes*, each a
//! thread with its own queue and connection, and each conversation always goes to the same
//! lane (by its id). A conversation's messages are therefore still taken, committed and handed
//! to the cores in one order, while lanes commit side by side: their conversations are
//! disjoint, so they never wait on each other's row locks. (Lanes sharing conversations would
//! serialize on those locks, and could even take them out of order.)

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use uuid::Uuid;

use super::stats::WriterStats;
use super::{BatchSink, CommitBatch, Committed, InsertRequest, Message, Store};
use crate::{ids, limits};

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full: answer `server busy` now rather than wait.
    #[error("server busy")]
    Busy,
    /// The writer has stopped.
    #[error("storage unavailable")]
    Closed,
}

/// What the writer's queue carries.
#[derive(Debug)]
enum Request {
    Insert(InsertRequest),
    /// Commit everything queued before this, then stop.
    Stop,
}

/// The cores' handle to the writer lanes' queues. Cloned once per core.
#[derive(Debug, Clone)]
pub struct StoreHandle {
    lanes: Vec<Sender<Request>>,
    stats: Arc<WriterStats>,
}

/// Stops the writer after everything accepted so far is committed (graceful shutdown).
#[derive(Debug)]
pub struct WriterStopper {
    lanes: Vec<(Sender<Request>, JoinHandle<()>)>,
}

impl WriterStopper {
    /// Queues the stop behind every accepted request and waits for every lane to finish (a
    /// lane that already ended refuses the stop and joins at once).
    pub fn stop(self) {
        for (tx, _) in &self.lanes {
            let _ = tx.send(Request::Stop);
        }
        for (_, join) in self.lanes {
            let _ = join.join();
        }
    }
}

impl StoreHandle {
    /// Queues a request on its conversation's lane without blocking.
    pub fn try_submit(&self, req: InsertRequest) -> Result<(), SubmitError> {
        let (hi, lo) = req.conversation.as_u64_pair();
        let lane = ((hi ^ lo) % self.lanes.len() as u64) as usize;
        self.lanes[lane].try_send(Request::Insert(req)).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::Busy,
            TrySendError::Disconnected(_) => SubmitError::Closed,
        })
    }

    /// Requests waiting for the writer now (all lanes).
    pub fn queued(&self) -> usize {
        self.lanes.iter().map(Sender::len).sum()
    }

    /// The writer's batch and commit histograms.
    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }
}

/// Starts the writer: one lane (thread and queue) per store. It runs until stopped through the
/// [`WriterStopper`] (or every handle is dropped), committing everything it accepted first.
/// `queue` bounds the requests waiting for each lane (the wait it bounds is the lane's own);
/// a full queue answers `server busy`. Under a steady load a lane starts its commits at least
/// `gap` apart, gathering what arrives meanwhile into the batch (see [`run`]).
pub fn spawn_writer(
    stores: Vec<Box<dyn Store>>,
    sink: BatchSink,
    queue: usize,
    gap: Duration,
) -> std::io::Result<(StoreHandle, WriterStopper)> {
    let stats = Arc::new(WriterStats::default());
    let single = stores.len() == 1;
    let mut lanes = Vec::with_capacity(stores.len());
    for (i, store) in stores.into_iter().enumerate() {
        let (tx, rx) = crossbeam_channel::bounded(queue.max(1));
        let (sink, recorder) = (sink.clone(), stats.clone());
        let name = if single { "writer".to_string() } else { format!("writer-{i}") };
        let join = std::thread::Builder::new().name(name).spawn(move || run(store, &sink, rx, &recorder, gap))?;
        lanes.push((tx, join));
    }
    let handle = StoreHandle { lanes: lanes.iter().map(|(tx, _)| tx.clone()).collect(), stats };
    Ok((handle, WriterStopper { lanes }))
}

/// Monotonic stamping: strictly increasing microseconds even if the wall clock steps back,
/// and ids that order exactly like them: a UUIDv7 whose 48-bit millisecond field and 12-bit
/// `rand_a` field hold the same instant (ms, then µs within the ms), with random low bits. So
/// id order = time order = commit order, across restarts too (the store hands back the last
/// stamp), which the history table's `(conversation_id, id)` order relies on.
struct Stamper {
    last_us: i64,
    /// State of [`ids::splitmix64`] for the random id bits.
    rng: u64,
}

impl Stamper {
    fn stamp(&mut self) -> (Uuid, i64) {
        let us = ids::now_micros().max(self.last_us + 1);
        self.last_us = us;
        (ids::v7(us, ids::splitmix64(&mut self.rng)), us)
    }
}

/// One lane. A commit has a fixed cost (a round trip, a statement, an fsync, and a hand-off
/// to every core) whatever its size, so a lane that committed as soon as anything was queued
/// would, at a moderate steady rate, commit a few messages at a time as fast as it could and
/// spend about as much CPU as at its maximum rate. With a `gap`, a request that arrives
/// within `gap` of the previous commit's start waits for the rest of the gap, joined by what
/// arrives meanwhile; an idle lane (gap long passed) or a saturated one (commits longer than
/// the gap) commits at once, so the gap adds at most `gap` to an ack.
fn run(mut store: Box<dyn Store>, sink: &BatchSink, rx: Receiver<Request>, stats: &WriterStats, gap: Duration) {
    let probe = rx.clone();
    store.set_waiting_probe(Box::new(move || !probe.is_empty()));
    let mut stamper = Stamper { last_us: store.last_inserted_at_us(), rng: Uuid::new_v4().as_u64_pair().0 };
    let mut last_start = Instant::now().checked_sub(gap).unwrap_or_else(Instant::now);
    let mut stopping = false;
    while !stopping {
        let first = match rx.recv_timeout(limits::WRITER_IDLE) {
            Ok(Request::Insert(req)) => req,
            Ok(Request::Stop) => break,
            Err(RecvTimeoutError::Timeout) => {
                store.maintain(true);
                send_late(&mut *store, sink);
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut batch = Vec::with_capacity(64);
        batch.push(stamped(&mut stamper, first));
        let due = last_start + gap;
        while batch.len() < limits::WRITER_BATCH_MAX {
            // (No clock read per message when there is no gap: the SQLite writer's case.)
            let next = if !gap.is_zero() && Instant::now() < due {
                rx.recv_deadline(due).map_err(|e| e == RecvTimeoutError::Disconnected)
            } else {
                rx.try_recv().map_err(|e| e == TryRecvError::Disconnected)
            };
            match next {
                Ok(Request::Insert(req)) => batch.push(stamped(&mut stamper, req)),
                Ok(Request::Stop) => {
                    stopping = true;
                    break;
                }
                Err(_) => break,
            }
        }
        let started = Instant::now();
        last_start = started;
        let committed = store.commit(&mut batch);
        stats.record(batch.len(), started.elapsed(), committed.is_ok());
        let outcome = match committed {
            Ok(()) => CommitBatch::committed(batch),
            Err(e) => {
                tracing::error!(error = %e, rows = batch.len(), "commit failed");
                CommitBatch::failed(batch, "storage unavailable")
            }
        };
        // Late commits (found while reconnecting for this batch) are older: they go first.
        send_late(&mut *store, sink);
        sink(Arc::new(outcome));
        store.maintain(false);
    }
    tracing::info!("writer stopped; every message it accepted is committed");
}

fn stamped(stamper: &mut Stamper, req: InsertRequest) -> Committed {
    let (id, inserted_at_us) = stamper.stamp();
    let message =
        Message { id, conversation: req.conversation, sender: req.sender, body: req.body, inserted_at_us, seq: 0 };
    Committed { message, origin: Some(req.origin) }
}

/// Broadcasts what the store found committed after answering it as failed (no acks: the
/// senders were answered).
fn send_late(store: &mut dyn Store, sink: &BatchSink) {
    let late = store.take_late();
    if !late.is_empty() {
        sink(Arc::new(CommitBatch::committed(late)));
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Origin, StoreError};
    use super::*;

    /// Keeps nothing: the writer's batching, stamping and ordering without a database.
    struct MemoryStore;

    impl Store for MemoryStore {
        fn commit(&mut self, _batch: &mut [Committed]) -> Result<(), StoreError> {
            Ok(())
        }
    }
    use std::sync::{mpsc, Mutex};

    /// Keeps nothing but when each commit started.
    struct TimedStore(Arc<Mutex<Vec<Instant>>>);

    impl Store for TimedStore {
        fn commit(&mut self, _batch: &mut [Committed]) -> Result<(), StoreError> {
            self.0.lock().expect("lock").push(Instant::now());
            Ok(())
        }
    }

    fn request(ticket: u32) -> InsertRequest {
        let origin = Origin { core: 0, ticket };
        InsertRequest { conversation: Uuid::nil(), sender: Uuid::nil(), body: ticket.to_string(), origin }
    }

    fn tickets(batch: &CommitBatch) -> Vec<u32> {
        batch.messages.iter().filter_map(|m| m.origin.map(|o| o.ticket)).collect()
    }

    #[test]
    fn stamps_strictly_increase() {
        let mut s = Stamper { last_us: ids::now_micros() + 5_000_000, rng: 1 };
        let mut last = s.stamp();
        for _ in 0..5_000 {
            let next = s.stamp();
            assert!(next.1 > last.1 && next.0 > last.0, "clock behind last stamp still increases");
            assert_eq!(next.0.get_version_num(), 7);
            last = next;
        }
    }

    #[test]
    fn batches_in_order_and_stops_when_handles_drop() {
        let (tx, rx) = mpsc::channel();
        let (handle, stopper) = spawn_writer(
            vec![Box::new(MemoryStore)],
            Arc::new(move |b| tx.send(b).expect("send")),
            128,
            Duration::ZERO,
        )
        .expect("spawn");
        for i in 0..100u32 {
            handle.try_submit(request(i)).expect("queued");
        }
        drop(handle);
        stopper.stop();
        let all: Vec<Committed> = rx.iter().flat_map(|b| b.messages.clone()).collect();
        let tickets: Vec<u32> = all.iter().filter_map(|m| m.origin.map(|o| o.ticket)).collect();
        assert_eq!(tickets, (0..100).collect::<Vec<_>>());
        let ordered = |w: &[Committed]| {
            w[0].message.inserted_at_us < w[1].message.inserted_at_us && w[0].message.id < w[1].message.id
        };
        assert!(all.windows(2).all(ordered));
    }

    #[test]
    fn lanes_keep_each_conversation_in_order_and_stop_after_everything() {
        let (tx, rx) = mpsc::channel();
        let stores: Vec<Box<dyn Store>> = vec![Box::new(MemoryStore), Box::new(MemoryStore), Box::new(MemoryStore)];
        let (handle, stopper) =
            spawn_writer(stores, Arc::new(move |b| tx.send(b).expect("send")), 1_000, Duration::ZERO).expect("spawn");
        let conversations: Vec<Uuid> = (0..8).map(|_| Uuid::new_v4()).collect();
        for i in 0..800u32 {
            let conversation = conversations[i as usize % conversations.len()];
            let origin = Origin { core: 0, ticket: i };
            let req = InsertRequest { conversation, sender: Uuid::nil(), body: i.to_string(), origin };
            handle.try_submit(req).expect("queued");
        }
        drop(handle);
        stopper.stop();
        let all: Vec<Committed> = rx.iter().flat_map(|b| b.messages.clone()).collect();
        assert_eq!(all.len(), 800, "every accepted message handed off before the stop returns");
        for conversation in &conversations {
            let tickets: Vec<u32> = all
                .iter()
                .filter(|c| c.message.conversation == *conversation)
                .filter_map(|c| c.origin.map(|o| o.ticket))
                .collect();
            assert_eq!(tickets.len(), 100);
            assert!(tickets.windows(2).all(|w| w[0] < w[1]), "one order per conversation: {tickets:?}");
        }
    }

    /// A lane idle for longer than the gap commits at once; requests arriving within the gap
    /// of a commit's start wait for its end and go as one batch; a stop does not wait it out.
    #[test]
    fn the_commit_gap_spaces_commits_under_load_only() {
        let gap = Duration::from_secs(2);
        let starts = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let store = TimedStore(starts.clone());
        let (handle, stopper) =
            spawn_writer(vec![Box::new(store)], Arc::new(move |b| tx.send(b).expect("send")), 128, gap).expect("spawn");
        let began = Instant::now();
        handle.try_submit(request(0)).expect("queued");
        let first = rx.recv_timeout(4 * gap).expect("first batch");
        assert_eq!(tickets(&first), [0]);
        for i in 1..=5 {
            handle.try_submit(request(i)).expect("queued");
        }
        let second = rx.recv_timeout(4 * gap).expect("second batch");
        assert_eq!(tickets(&second), [1, 2, 3, 4, 5], "what arrives within the gap is one batch");
        let starts = starts.lock().expect("lock").clone();
        assert!(starts[0] - began < gap / 2, "an idle lane commits at once: {:?}", starts[0] - began);
        // The writer takes its own start instant just before the store records its own.
        let apart = starts[1] - starts[0];
        assert!(apart >= gap - Duration::from_millis(100), "commits start a gap apart: {apart:?}");
        handle.try_submit(request(6)).expect("queued");
        let stopping = Instant::now();
        stopper.stop();
        assert!(stopping.elapsed() < gap / 2, "a stop commits at once: {:?}", stopping.elapsed());
        assert_eq!(tickets(&rx.recv_timeout(gap).expect("last batch")), [6]);
    }
}
