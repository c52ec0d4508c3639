//! The writer thread: take one request, drain what else is queued up to a batch cap, stamp,
//! commit once, hand the batch to the cores once. Group commit: the busier it is, the bigger
//! the batches and the cheaper each message.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use uuid::{ContextV7, Timestamp, Uuid};

use super::{BatchSink, CommitBatch, Committed, InsertRequest, Store};
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

/// The cores' handle to the writer queue. Cloned once per core.
#[derive(Debug, Clone)]
pub struct StoreHandle {
    tx: Sender<InsertRequest>,
}

impl StoreHandle {
    /// Queues a request without blocking.
    pub fn try_submit(&self, req: InsertRequest) -> Result<(), SubmitError> {
        self.tx.try_send(req).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::Busy,
            TrySendError::Disconnected(_) => SubmitError::Closed,
        })
    }
}

/// Starts the writer thread. It runs until every [`StoreHandle`] is dropped, then commits what
/// it still holds and returns.
pub fn spawn_writer(store: Box<dyn Store>, sink: BatchSink) -> std::io::Result<(StoreHandle, JoinHandle<()>)> {
    let (tx, rx) = crossbeam_channel::bounded(limits::WRITER_QUEUE_MAX);
    let handle = std::thread::Builder::new().name("writer".into()).spawn(move || run(store, sink, rx))?;
    Ok((StoreHandle { tx }, handle))
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

fn run(mut store: Box<dyn Store>, mut sink: BatchSink, rx: Receiver<InsertRequest>) {
    let mut stamper = Stamper { last_us: 0, ctx: ContextV7::new() };
    while let Ok(first) = rx.recv() {
        let mut batch = Vec::with_capacity(64);
        batch.push(stamped(&mut stamper, first));
        while batch.len() < limits::WRITER_BATCH_MAX {
            match rx.try_recv() {
                Ok(req) => batch.push(stamped(&mut stamper, req)),
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
    }
    tracing::debug!("writer stopped");
}

fn stamped(stamper: &mut Stamper, req: InsertRequest) -> Committed {
    let (id, inserted_at_us) = stamper.stamp();
    Committed {
        id,
        conversation: req.conversation,
        sender: req.sender,
        body: req.body,
        inserted_at_us,
        origin: req.origin,
    }
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
        let (handle, join) =
            spawn_writer(Box::new(MemoryStore), Box::new(move |b| tx.send(b).expect("send"))).expect("spawn");
        for i in 0..100u32 {
            let origin = Origin { core: 0, ticket: i };
            let req = InsertRequest { conversation: Uuid::nil(), sender: Uuid::nil(), body: i.to_string(), origin };
            handle.try_submit(req).expect("queued");
        }
        drop(handle);
        join.join().expect("writer exits");
        let all: Vec<Committed> = rx.iter().flat_map(|b| b.messages.clone()).collect();
        let tickets: Vec<u32> = all.iter().map(|m| m.origin.ticket).collect();
        assert_eq!(tickets, (0..100).collect::<Vec<_>>());
        assert!(all.windows(2).all(|w| w[0].inserted_at_us < w[1].inserted_at_us && w[0].id < w[1].id));
    }
}
