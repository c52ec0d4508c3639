//! The writer's own figures for `/metrics`: batch sizes and commit latency as cumulative
//! histograms. Written by the writer thread once per batch, read when `/metrics` is scraped
//! (relaxed atomics: a scrape may see a batch half-counted, never a torn value).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the batch-size buckets (messages per commit).
pub const BATCH_BUCKETS: [u64; 6] = [1, 8, 64, 256, 512, 1024];
/// Upper bounds of the commit-latency buckets, in µs.
pub const COMMIT_BUCKETS_US: [u64; 9] = [250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000];

/// A histogram with fixed bounds: per-bucket counts (the last one is `+Inf`), sum and count.
#[derive(Debug)]
pub struct Histogram<const N: usize> {
    bounds: [u64; N],
    buckets: [AtomicU64; N],
    overflow: AtomicU64,
    sum: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    fn new(bounds: [u64; N]) -> Self {
        Histogram {
            bounds,
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            overflow: AtomicU64::new(0),
            sum: AtomicU64::new(0),
        }
    }

    fn record(&self, v: u64) {
        match self.bounds.iter().position(|b| v <= *b) {
            Some(i) => self.buckets[i].fetch_add(1, Ordering::Relaxed),
            None => self.overflow.fetch_add(1, Ordering::Relaxed),
        };
        self.sum.fetch_add(v, Ordering::Relaxed);
    }

    /// `(upper bound, cumulative count)` per bucket, then the total count and the sum.
    pub fn cumulative(&self) -> (Vec<(u64, u64)>, u64, u64) {
        let mut total = 0;
        let mut out = Vec::with_capacity(N);
        for (b, c) in self.bounds.iter().zip(&self.buckets) {
            total += c.load(Ordering::Relaxed);
            out.push((*b, total));
        }
        total += self.overflow.load(Ordering::Relaxed);
        (out, total, self.sum.load(Ordering::Relaxed))
    }
}

/// What the writer reports.
#[derive(Debug)]
pub struct WriterStats {
    /// Messages per committed batch.
    pub batch_size: Histogram<6>,
    /// Commit time per batch (µs).
    pub commit_us: Histogram<9>,
    /// Batches whose commit failed (answered `storage unavailable`).
    pub failed_batches: AtomicU64,
}

impl Default for WriterStats {
    fn default() -> Self {
        WriterStats {
            batch_size: Histogram::new(BATCH_BUCKETS),
            commit_us: Histogram::new(COMMIT_BUCKETS_US),
            failed_batches: AtomicU64::new(0),
        }
    }
}

impl WriterStats {
    pub(crate) fn record(&self, rows: usize, took: Duration, ok: bool) {
        self.batch_size.record(rows as u64);
        self.commit_us.record(took.as_micros() as u64);
        if !ok {
            self.failed_batches.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative() {
        let s = WriterStats::default();
        s.record(1, Duration::from_micros(100), true);
        s.record(100, Duration::from_millis(3), true);
        s.record(5_000, Duration::from_secs(1), false);
        let (buckets, count, sum) = s.batch_size.cumulative();
        assert_eq!(buckets, vec![(1, 1), (8, 1), (64, 1), (256, 2), (512, 2), (1024, 2)]);
        assert_eq!((count, sum), (3, 5_101));
        assert_eq!(s.failed_batches.load(Ordering::Relaxed), 1);
        let (commit, count, _) = s.commit_us.cumulative();
        assert_eq!((commit[0], commit[4], count), ((250, 1), (5_000, 2), 3));
    }
}
