//! The writer thread: take one request, drain what else is queued up to a batch cap, stamp,
//! commit once, hand the batch to the cores once. Group commit: the busier it is, the bigger
//! the batches and the cheaper each message.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use uuid::{ContextV7, Timestamp, Uuid};

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

/// The cores' handle to the writer queue. Cloned once per core.
#[derive(Debug, Clone)]
pub struct StoreHandle {
    tx: Sender<Request>,
}

/// Stops the writer after everything accepted so far is committed (graceful shutdown).
#[derive(Debug)]
pub struct WriterStopper {
    tx: Sender<Request>,
    join: JoinHandle<()>,
}

impl WriterStopper {
    /// Queues the stop behind every accepted request and waits for the writer to finish.
    pub fn stop(self) {
        if self.tx.send(Request::Stop).is_ok() {
            let _ = self.join.join();
        }
    }
}

impl StoreHandle {
    /// Queues a request without blocking.
    pub fn try_submit(&self, req: InsertRequest) -> Result<(), SubmitError> {
        self.tx.try_send(Request::Insert(req)).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::Busy,
            TrySendError::Disconnected(_) => SubmitError::Closed,
        })
    }
}

/// Starts the writer thread. It runs until stopped through the [`WriterStopper`] (or every
/// handle is dropped), committing everything it accepted first.
pub fn spawn_writer(store: Box<dyn Store>, sink: BatchSink) -> std::io::Result<(StoreHandle, WriterStopper)> {
    let (tx, rx) = crossbeam_channel::bounded(limits::WRITER_QUEUE_MAX);
    let join = std::thread::Builder::new().name("writer".into()).spawn(move || run(store, sink, rx))?;
    Ok((StoreHandle { tx: tx.clone() }, WriterStopper { tx, join }))
}

/// Monotonic stamping: strictly increasing microseconds even if the wall clock steps back,
/// and UUIDv7 ids drawn from the same instant, so id order = time order = commit order.
struct Stamper {
    last_us: i64,
    ctx: ContextV7,
}

impl Stamper {
    fn stamp(&mut self) -> (Uuid, i64) {
        let us = ids::now_micros().max(self.last_us + 1);
        self.last_us = us;
        let ts = Timestamp::from_unix(&self.ctx, (us / 1_000_000) as u64, (us % 1_000_000) as u32 * 1_000);
        (Uuid::new_v7(ts), us)
    }
}

fn run(mut store: Box<dyn Store>, mut sink: BatchSink, rx: Receiver<Request>) {
    let mut stamper = Stamper { last_us: store.last_inserted_at_us(), ctx: ContextV7::new() };
    let mut stopping = false;
    while !stopping {
        let first = match rx.recv_timeout(limits::WRITER_IDLE) {
            Ok(Request::Insert(req)) => req,
            Ok(Request::Stop) => break,
            Err(RecvTimeoutError::Timeout) => {
                store.maintain(true);
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut batch = Vec::with_capacity(64);
        batch.push(stamped(&mut stamper, first));
        while batch.len() < limits::WRITER_BATCH_MAX {
            match rx.try_recv() {
                Ok(Request::Insert(req)) => batch.push(stamped(&mut stamper, req)),
                Ok(Request::Stop) => {
                    stopping = true;
                    break;
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let failure = match store.commit(&batch) {
            Ok(()) => None,
            Err(e) => {
                tracing::error!(error = %e, rows = batch.len(), "commit failed");
                Some("storage unavailable")
            }
        };
        sink(Arc::new(CommitBatch { messages: batch, failure }));
        store.maintain(false);
    }
    tracing::info!("writer stopped; every accepted message is committed");
}

fn stamped(stamper: &mut Stamper, req: InsertRequest) -> Committed {
    let (id, inserted_at_us) = stamper.stamp();
    let message = Message { id, conversation: req.conversation, sender: req.sender, body: req.body, inserted_at_us };
    Committed { message, origin: req.origin }
}

#[cfg(test)]
mod tests {
    use super::super::{MemoryStore, Origin};
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn stamps_strictly_increase() {
        let mut s = Stamper { last_us: i64::MAX / 2, ctx: ContextV7::new() };
        let (a_id, a) = s.stamp();
        let (b_id, b) = s.stamp();
        assert!(b > a && b_id > a_id, "clock behind last stamp still increases");
    }

    #[test]
    fn batches_in_order_and_stops_when_handles_drop() {
        let (tx, rx) = mpsc::channel();
        let (handle, stopper) =
            spawn_writer(Box::new(MemoryStore), Box::new(move |b| tx.send(b).expect("send"))).expect("spawn");
        for i in 0..100u32 {
            let origin = Origin { core: 0, ticket: i };
            let req = InsertRequest { conversation: Uuid::nil(), sender: Uuid::nil(), body: i.to_string(), origin };
            handle.try_submit(req).expect("queued");
        }
        drop(handle);
        stopper.stop();
        let all: Vec<Committed> = rx.iter().flat_map(|b| b.messages.clone()).collect();
        let tickets: Vec<u32> = all.iter().map(|m| m.origin.ticket).collect();
        assert_eq!(tickets, (0..100).collect::<Vec<_>>());
        let ordered = |w: &[Committed]| {
            w[0].message.inserted_at_us < w[1].message.inserted_at_us && w[0].message.id < w[1].message.id
        };
        assert!(all.windows(2).all(ordered));
    }
}
