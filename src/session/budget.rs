//! A socket's message budget: a token bucket of `rate` messages per second with a burst of one
//! second's worth, refilled from the core's coarse clock. Three `u32`s per connection.

use crate::limits;

/// What spending one message decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spend {
    /// Within the rate.
    Ok,
    /// Over the rate: answer `rate limited`.
    Refused,
    /// Over the rate [`limits::MSG_RATE_STRIKES_MAX`] times in a row: close the socket.
    Abusive,
}

/// The bucket. `refilled_ms` is core ms + 1 as a `u32` (wraps after 49 days; compared with
/// wrapping arithmetic), 0 meaning "never refilled": a fresh socket starts with a full burst.
#[derive(Debug, Default)]
pub struct Budget {
    tokens: u32,
    refilled_ms: u32,
    strikes: u32,
}

impl Budget {
    /// Spends one message at core time `now_ms` under `rate` per second (0 = unlimited).
    pub fn spend(&mut self, now_ms: u64, rate: u32) -> Spend {
        if rate == 0 {
            return Spend::Ok;
        }
        let now = (now_ms as u32).wrapping_add(1);
        if self.refilled_ms == 0 {
            self.tokens = rate;
            self.refilled_ms = now;
        } else {
            let elapsed = now.wrapping_sub(self.refilled_ms);
            let added = (u64::from(elapsed) * u64::from(rate) / 1_000).min(u64::from(rate)) as u32;
            if added > 0 {
                self.tokens = self.tokens.saturating_add(added).min(rate);
                self.refilled_ms = now;
            }
        }
        if self.tokens == 0 {
            self.strikes += 1;
            return if self.strikes > limits::MSG_RATE_STRIKES_MAX { Spend::Abusive } else { Spend::Refused };
        }
        self.tokens -= 1;
        self.strikes = 0;
        debug_assert!(self.tokens < rate, "a spent bucket holds less than its burst");
        Spend::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_refill_and_strikes() {
        let mut b = Budget::default();
        assert!((0..10).all(|_| b.spend(0, 10) == Spend::Ok), "a full burst first");
        assert_eq!(b.spend(0, 10), Spend::Refused);
        assert_eq!(b.spend(99, 10), Spend::Refused, "less than one token refilled");
        assert_eq!(b.spend(101, 10), Spend::Ok, "one token after 100 ms at 10/s");
        for _ in 0..limits::MSG_RATE_STRIKES_MAX {
            assert_eq!(b.spend(101, 10), Spend::Refused);
        }
        assert_eq!(b.spend(101, 10), Spend::Abusive);
        assert_eq!(b.spend(10_000, 10), Spend::Ok, "refilled after a pause; strikes reset");
        assert_eq!(Budget::default().spend(0, 0), Spend::Ok);
    }

    #[test]
    fn the_clock_wrapping_does_not_stall_the_bucket() {
        let mut b = Budget::default();
        let near = u64::from(u32::MAX) - 50;
        assert!((0..5).all(|_| b.spend(near, 5) == Spend::Ok));
        assert_eq!(b.spend(near, 5), Spend::Refused);
        assert_eq!(b.spend(near + 1_000, 5), Spend::Ok, "refilled across the wrap");
    }
}
