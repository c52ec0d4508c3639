//! Spacing of reconnect attempts, shared by every thread that owns a connection to another
//! server (the PostgreSQL writer lanes and readers, the Redis publisher and subscriber): while
//! the server is unreachable, attempts are `min` apart at first, twice as far apart after each
//! failure, never more than `max`; a success starts over.

use std::time::{Duration, Instant};

/// When the next reconnect attempt may be made.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    wait: Duration,
    retry_at: Instant,
}

impl Backoff {
    /// A back-off that allows an attempt now.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max: max.max(min), wait: min, retry_at: Instant::now() }
    }

    /// Whether an attempt may be made now.
    pub fn ready(&self) -> bool {
        Instant::now() >= self.retry_at
    }

    /// When the next attempt may be made.
    pub fn retry_at(&self) -> Instant {
        self.retry_at
    }

    /// An attempt failed: the next one waits; returns how long.
    pub fn failed(&mut self) -> Duration {
        let wait = self.wait;
        self.retry_at = Instant::now() + wait;
        self.wait = (wait * 2).min(self.max);
        wait
    }

    /// An attempt succeeded: the next failure waits `min` again.
    pub fn succeeded(&mut self) {
        self.wait = self.min;
    }

    /// Allows an attempt now, whatever the last failure said (keeping the current spacing).
    pub fn retry_now(&mut self) {
        self.retry_at = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_starts_over_after_a_success() {
        let (min, max) = (Duration::from_millis(100), Duration::from_millis(350));
        let mut b = Backoff::new(min, max);
        assert!(b.ready());
        let waits: Vec<u64> = (0..4).map(|_| b.failed().as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 350, 350]);
        assert!(!b.ready(), "waiting after a failure");
        b.retry_now();
        assert!(b.ready());
        b.succeeded();
        assert_eq!(b.failed(), min);
    }
}
